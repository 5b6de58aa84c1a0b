"""Training runner of the synthetic ablations (nbs/experiments/synthetic_ablations.ipynb reads its CSV files).

Usage (from the repository root, one process, one thread):
    OMP_NUM_THREADS=1 nohup python nbs/experiments/run_synthetic.py > nbs/experiments/results/run.log 2>&1 &
    python nbs/experiments/run_synthetic.py --only table1 --dry   # list the runs that are still missing

Every finished run appends one row to results/runs.csv (runs whose `run_id` is already there are skipped, so an
interruption loses at most the run in progress) and the predicted density map of one test image to
results/densities.csv. All runs share the same synthetic data (seed 0) and the same fixed budget (EPOCHS epochs,
batch 8, Adam lr 1e-3, best epoch by validation MAE); only the loss, its settings, the backbone and the seed change.
This file is not a notebook (no cell markers): it is a plain module that the notebook imports.
"""
from __future__ import annotations
import argparse, csv, json, os, sys, time, tempfile
from pathlib import Path
import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
RUNS_CSV, DENSITY_CSV = RESULTS / 'runs.csv', RESULTS / 'densities.csv'

DATA = dict(n_train=256, n_val=48, n_test=96, size=96)   # synthetic images, 96x96 px, up to 150 heads
EPOCHS, BATCH, LR = 8, 8, 1e-3
THRESHOLDS = (4., 8.)          # localization distances in px
DENSITY_IMAGE = 3              # test image whose density map is stored for the figures
SPARSE_BELOW = 1e-3            # sparsity: share of density pixels below this (paper, Fig. 5/6)

# per-loss settings for 96-px images and stride-4 maps (all coordinates in input pixels unless said otherwise)
LOSS_DEFAULTS = {
    'gl': dict(cost='perspective', eps=0.01, tau=0.1, tau_solve=0.5),   # package defaults = official code
    'l2': dict(sigma=4.),                                                # Gaussian bandwidth 4 px (one map cell)
    'bl': dict(sigma=4.),                                                # BL likelihood bandwidth 4 px, no background
    'dmcount': dict(),                                                   # reg 10 px^2, 100 iters, weights 1/0.1/0.01
    'gl-official': dict(scale=96.),                                      # the official trainer's objective; coordinates / crop size
}

class SmallVGG(nn.Module):
    "A small VGG-style counting network: 3x3 conv blocks 32 | 64-64 | 128-128 with two max-pools, head 128-64-1; stride 4."
    stride = 4
    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import make_layers
        from uotcrowd.models import init_weights
        self.features = make_layers([32, 'M', 64, 64, 'M', 128, 128])   # torchvision's VGG blocks
        self.head = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1))
        init_weights(self, last=self.head[-1])
    def forward(self, x):
        H, W = x.shape[-2:]
        x = nn.functional.pad(x, (0, -W % 4, 0, -H % 4))
        return nn.functional.relu(self.head(self.features(x)))[..., :-(-H // 4), :-(-W // 4)]

def make_model(name:str) -> nn.Module:
    if name == 'mcnn':
        from uotcrowd.models import get_model
        return get_model('mcnn')
    if name == 'vgg_small': return SmallVGG()
    raise ValueError(name)

def run(model='mcnn', loss='gl', seed=0, **params) -> dict:
    "A run's config: backbone, loss, loss settings that differ from LOSS_DEFAULTS, training seed."
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    rid = f"{model}-{loss}-s{seed}" + ''.join(f"-{k}={v if not isinstance(v, list) else '+'.join(v)}" for k, v in sorted(params.items()))
    return dict(run_id=rid, model=model, loss=loss, seed=seed, params=params)

def grid() -> list[tuple[str, dict]]:
    "All runs, in the order they are trained: (group, config). A config may appear in several groups."
    g = []
    for model in ('mcnn', 'vgg_small'):
        for loss in ('l2', 'bl', 'dmcount', 'gl', 'gl-official'): g.append(('table1', run(model, loss, 0)))
    for t in (['transport', 'pixel', 'point'], ['transport', 'entropy', 'point'], ['transport', 'entropy', 'pixel']):
        g.append(('table2', run('mcnn', 'gl', 0, terms=t)))
    for c in ('dist', 'sqdist', 'exp'): g.append(('cost', run('mcnn', 'gl', 0, cost=c)))
    for e in (0.0025, 0.005, 0.02, 0.04): g.append(('eps', run('mcnn', 'gl', 0, eps=e)))
    for t in (0.01, 0.3, 1.0): g.append(('tau', run('mcnn', 'gl', 0, tau=t)))
    for dp, dq in (('l2', 'l2'), ('l1', 'l1'), ('l1', 'l2')): g.append(('divergence', run('mcnn', 'gl', 0, d_pixel=dp, d_point=dq)))
    for seed in (1, 2):
        for loss in ('l2', 'bl', 'dmcount', 'gl', 'gl-official'): g.append(('table1', run('mcnn', loss, seed)))
    for s in (2., 8.): g.append(('sigma', run('mcnn', 'l2', 0, sigma=s)))
    for s in (2., 8.): g.append(('sigma', run('mcnn', 'bl', 0, sigma=s)))
    return g

def read_rows(path=RUNS_CSV) -> list[dict]:
    if not Path(path).exists(): return []
    with open(path, newline='') as f: return list(csv.DictReader(f))

def append_row(row:dict, path:Path):
    "Append one CSV row (header on first write), flushed and fsynced."
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new: w.writeheader()
        w.writerow(row); f.flush(); os.fsync(f.fileno())

RUN_COLUMNS = ['run_id', 'model', 'loss', 'seed', 'params', 'epochs', 'best_epoch', 'best_val_mae', 'mae', 'rmse', 'nae',
               'precision@4', 'recall@4', 'f1@4', 'precision@8', 'recall@8', 'f1@8', 'sparsity', 'pred_points',
               'gt_points', 'train_s', 'finished']

_DATA_CACHE = {}
def datasets():
    if 'ds' not in _DATA_CACHE:
        from uotcrowd.data import build_datasets
        _DATA_CACHE['ds'] = build_datasets('synthetic', crop_size=DATA['size'], stride=4, seed=0, **DATA)
    return _DATA_CACHE['ds']

@torch.no_grad()
def density_stats(model, ds):
    "Sparsity (share of pixels below SPARSE_BELOW over all test maps) and the density of test image DENSITY_IMAGE."
    model.eval(); small, total, keep = 0, 0, None
    for i in range(len(ds)):
        image, _, _ = ds[i]
        d = model(image[None]).float()
        small += int((d < SPARSE_BELOW).sum()); total += d.numel()
        if i == DENSITY_IMAGE: keep = d[0, 0].numpy()
    return small / total, keep

def run_one(cfg:dict, quiet:bool=True) -> dict:
    "Train one config with the fixed budget, evaluate the best-by-validation model on the test split; returns its CSV row."
    from uotcrowd.registry import get_loss
    from uotcrowd.config import TrainConfig
    from uotcrowd.train import fit
    from uotcrowd.evaluate import evaluate
    from uotcrowd.core import seed_everything
    train_ds, val_ds, test_ds = datasets()
    seed_everything(cfg['seed'])
    model = make_model(cfg['model'])
    loss_kw = {**LOSS_DEFAULTS[cfg['loss']], **cfg['params']}
    if 'terms' in loss_kw: loss_kw['terms'] = tuple(loss_kw['terms'])
    loss = get_loss(cfg['loss'], stride=model.stride, **loss_kw)
    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(out_dir=tmp, max_epoch=EPOCHS, batch_size=BATCH, crop_size=DATA['size'], lr=LR, val_epoch=1,
                         seed=cfg['seed'], device='cpu', quiet=quiet, model=None, loss=cfg['loss'], dataset='synthetic')
        t0 = time.perf_counter()
        res = fit(model, loss, train_ds, val_ds, tc)
        train_s = time.perf_counter() - t0
        model.load_state_dict(torch.load(res['best'] or res['last'], weights_only=True)['model'])
    ev = evaluate(model, test_ds, thresholds=THRESHOLDS)
    sparsity, dens = density_stats(model, test_ds)
    row = dict(run_id=cfg['run_id'], model=cfg['model'], loss=cfg['loss'], seed=cfg['seed'], params=json.dumps(cfg['params'], sort_keys=True),
               epochs=res['epochs'], best_epoch=res['best_epoch'] + 1, best_val_mae=round(res['best_mae'], 4),
               **{k: round(ev[k], 4) for k in ('mae', 'rmse', 'nae')},
               **{f'{m}@{t:g}': round(ev[f'{m}@{t:g}'], 4) for t in THRESHOLDS for m in ('precision', 'recall', 'f1')},
               sparsity=round(sparsity, 4), pred_points=sum(r['pred_points'] for r in ev['per_image']),
               gt_points=sum(r['gt_count'] for r in ev['per_image']), train_s=round(train_s, 1),
               finished=time.strftime('%Y-%m-%dT%H:%M:%S'))
    return {k: row[k] for k in RUN_COLUMNS}, dens

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--only', nargs='*', help='groups to run (default: all)')
    p.add_argument('--dry', action='store_true', help='list the missing runs and stop')
    p.add_argument('--limit', type=int, default=None, help='stop after this many runs')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    done = {r['run_id'] for r in read_rows()}
    todo, seen = [], set()
    for group, cfg in grid():
        if args.only and group not in args.only: continue
        if cfg['run_id'] in done or cfg['run_id'] in seen: continue
        seen.add(cfg['run_id']); todo.append((group, cfg))
    print(f"{len(todo)} runs to do ({len(done)} done)", flush=True)
    for k, (group, cfg) in enumerate(todo[:args.limit]):
        if args.dry: print(group, cfg['run_id']); continue
        t0 = time.perf_counter()
        row, dens = run_one(cfg)
        append_row(row, RUNS_CSV)
        if dens is not None:
            h, w = dens.shape
            append_row(dict(run_id=cfg['run_id'], image=DENSITY_IMAGE, h=h, w=w, values=' '.join(f'{v:.4g}' for v in dens.ravel())), DENSITY_CSV)
        print(f"[{k + 1}/{len(todo)}] {group} {cfg['run_id']}: MAE {row['mae']} RMSE {row['rmse']} F1@8 {row['f1@8']} "
              f"sparsity {row['sparsity']} ({time.perf_counter() - t0:.0f}s)", flush=True)

if __name__ == '__main__': main()
