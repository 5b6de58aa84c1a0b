# %% [markdown]
# # Commands
#
# > `train`, `predict` and `demo` as Python functions with typed, documented arguments: what `uotcrowd train`, `uotcrowd predict` and `uotcrowd demo` run.

# %%
#| default_exp commands

# %%
#| export
from __future__ import annotations
import json, os, sys, time
from pathlib import Path
from typing import Sequence
import numpy as np
import torch
from tqdm import tqdm
from uotcrowd.core import get_device, seed_everything
from uotcrowd.data import build_datasets, check_data_dir, synthetic_kwargs, list_images, read_image
from uotcrowd.models import get_model
from uotcrowd.registry import get_loss
from uotcrowd.train import (TrainConfig, fit, load_model, write_csv, resolve_precision, autocast, memory_format,
                            checkpoint_precision, checkpoint_loc_threshold)
from uotcrowd.localize import localize
from uotcrowd.metrics import write_nwpu_predictions
from uotcrowd.evaluate import evaluate, format_metrics
from uotcrowd.plots import plot_prediction, plot_examples

# %%
#| hide
import contextlib, csv, io, tempfile
from fastcore.test import test_eq, test_close, test_fail
from PIL import Image
from uotcrowd.data import denormalize

# %% [markdown]
# Each command is a plain function: its parameters (types, defaults and the comment after each) are what the command
# line offers as flags, so the two cannot disagree (`uotcrowd.cli` builds its parser from them). Each writes
# everything it produces under one output folder and returns what it computed.
#
# ## `train`
#
# Builds the datasets, the model (optionally from `weights`) and the loss from their names, writes `config.json`, and
# calls `uotcrowd.train.fit` with `cfg`. The checkpoint records the model, loss and dataset names and arguments, so
# `evaluate_checkpoint` and `predict` later need only the checkpoint. `seed` fixes the initial weights too, not only the
# crops and their order. With `gl-official` the coordinates are divided by the crop size, as in the official trainer.

# %%
#| export
def train(dataset:str, # dataset name
          data_dir:str|None=None, # dataset root folder (not needed for synthetic)
          synthetic_n:int|None=None, # synthetic: number of training images (validation and test get a quarter each)
          synthetic_size:int|None=None, # synthetic: image side in pixels
          model:str='vgg19', # network
          loss:str='gl', # loss: generalized (gl: Eq. 1; gl-official: the official trainer's objective), L2 density, Bayesian, DM-Count
          weights:str|None=None, # initial weights: torchvision VGG state dict or a uotcrowd checkpoint
          out_act:str|None=None, # non-negative output of the network (default: the model's own, abs for mcnn, relu otherwise)
          val_fraction:float=0.1, # share of the training images held out for validation
          loss_kwargs:dict|None=None, # loss hyper-parameters (unset: the loss's defaults)
          **config # `TrainConfig` fields: `out_dir`, `max_epoch`, `lr`, `precision`, ...
         ) -> dict: # the summary of `fit`
    "Train a model given by name on a dataset given by name; writes checkpoints, logs and `config.json`."
    check_data_dir(dataset, data_dir)  # before building a model: a wrong path fails fast
    model_kw = {} if out_act is None else {'out_act': out_act}
    data_kw = synthetic_kwargs(synthetic_n, synthetic_size)
    cfg = TrainConfig(**config, model=model, model_kwargs=model_kw, loss=loss, loss_kwargs=dict(loss_kwargs or {}), dataset=dataset,
                      data_dir=str(Path(data_dir).resolve()) if data_dir else None,
                      data_kwargs={**data_kw, 'val_fraction': val_fraction})
    seed_everything(cfg.seed)
    net = get_model(model, weights=weights, **model_kw)
    stride = int(net.stride)
    train_ds, val_ds, _ = build_datasets(dataset, data_dir, cfg.crop_size, stride, val_fraction, cfg.seed, **data_kw)
    if loss == 'gl-official': cfg.loss_kwargs['scale'] = float(cfg.crop_size)  # the official code divides by the crop size
    criterion = get_loss(loss, stride=stride, **cfg.loss_kwargs)
    main_rank = int(os.environ.get('RANK', '0')) == 0
    if main_rank:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / 'config.json').write_text(json.dumps({**cfg.to_dict(), 'weights': weights}, indent=2))
    if not cfg.quiet and main_rank:
        print(f"training {model} with the {loss} loss on {dataset}: {len(train_ds)} training and "
              f"{len(val_ds) if val_ds is not None else 0} validation images, lr {cfg.lr:g}, output in {cfg.out_dir}", flush=True)
    res = fit(net, criterion, train_ds, val_ds, cfg)
    if not cfg.quiet and res['rank'] == 0:
        print(f"done: best validation MAE {res['best_mae']:.3f} at epoch {res['best_epoch'] + 1}; "
              f"checkpoints {res['best']} and {res['last']}", flush=True)
    return res

# %% [markdown]
# Two epochs of MCNN on 16 synthetic images of 48×48 px, then the same call again: the seed fixes the whole run, the
# initial weights included.

# %%
tmp = Path(tempfile.mkdtemp())
tiny = dict(dataset='synthetic', synthetic_n=16, synthetic_size=48, model='mcnn', crop_size=32, batch_size=4,
            lr=1e-3, device='cpu', quiet=True, precision='fp32')
res = train(**tiny, max_epoch=2, out_dir=tmp / 'run', loss_kwargs={'eps': 0.01})
test_eq(sorted(p.name for p in (tmp / 'run').iterdir()), ['best.pt', 'config.json', 'curves.png', 'last.pt', 'log.csv'])
config = json.loads((tmp / 'run' / 'config.json').read_text())
test_eq((config['model'], config['loss'], config['loss_kwargs'], config['data_kwargs']['n_train'], config['max_epoch']),
        ('mcnn', 'gl', {'eps': 0.01}, 16, 2))
again = train(**tiny, max_epoch=1, max_steps=1, out_dir=tmp / 'again')
first = train(**tiny, max_epoch=1, max_steps=1, out_dir=tmp / 'first')
for k, v in torch.load(tmp / 'again' / 'last.pt', weights_only=True)['model'].items():
    assert torch.equal(v, torch.load(tmp / 'first' / 'last.pt', weights_only=True)['model'][k]), k
test_fail(lambda: train('qnrf', out_dir=tmp / 'x'), contains='no --data-dir')

# %% [markdown]
# ## `predict`
#
# Reads image files (or every image in the given folders), normalizes them like the datasets, and writes for each
# one the predicted count, a heat-map of the density over the image and the located points (`plot_prediction`);
# `predictions.csv` and `points.json` gather all images. With `nwpu`, the NWPU-Crowd submission files are written too
# (`uotcrowd.metrics.write_nwpu_predictions`). The model runs in the checkpoint's precision unless told otherwise;
# counts are summed from the float32 density. A file that cannot be read is reported and skipped, and the error at the
# end names it once the others are counted.

# %%
#| export
def _write_nwpu(results:list[dict], out:Path) -> list[Path]:
    "NWPU-Crowd submission files: `nwpu_count.txt` (`id count`) and `nwpu_loc.txt` (`id num x y ...`)."
    ids = [int(r['name']) if str(r['name']).isdigit() else k + 1 for k, r in enumerate(results)]
    (out / 'nwpu_count.txt').write_text(''.join(f"{i} {r['count']:.4f}\n" for i, r in zip(ids, results)))
    loc = write_nwpu_predictions(out / 'nwpu_loc.txt', {i: np.asarray(r['points'], dtype=np.float64).reshape(-1, 2)
                                                       for i, r in zip(ids, results)})
    return [out / 'nwpu_count.txt', Path(loc)]

@torch.no_grad()
def predict(checkpoint:str, # checkpoint written by `uotcrowd train`
            inputs:Sequence[str], # image files or folders of images
            out:str, # output folder
            loc_threshold:float|None=None, # density threshold of the localization (default: the checkpoint's, chosen on validation, else 0.05)
            nwpu:bool=False, # also write the NWPU-Crowd counting and localization submission files
            no_plots:bool=False, # skip the PNGs
            dpi:int=80, # resolution of the PNGs
            precision:str|None=None, # 'auto', 'fp32', 'bf16' or 'fp16' (default: the precision the checkpoint was trained in)
            device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
            quiet:bool=False, # no progress bars or per-image lines
           ) -> list[dict]: # one dict per image: name, path, count, n_points, points (and error)
    "Count the people in image files; writes `predictions.csv`, `points.json` and a PNG per image."
    device = get_device(device)
    model, ckpt = load_model(checkpoint, device)
    precision = resolve_precision(precision or checkpoint_precision(ckpt), device)
    loc_threshold = checkpoint_loc_threshold(ckpt) if loc_threshold is None else loc_threshold
    fmt = memory_format(precision)
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    files = list_images(inputs)
    stems = [f.stem for f in files]
    if len(set(stems)) < len(stems): stems = [f"{f.parent.name}_{f.stem}" for f in files]
    results, failed = [], []
    for f, stem in zip(tqdm(files, desc='predict', disable=quiet or not sys.stderr.isatty()), stems):
        try: image = read_image(f)
        except (ValueError, OSError) as e:  # a corrupt file is reported, the others are still counted
            print(f"uotcrowd predict: skipped {e}", file=sys.stderr, flush=True)
            failed.append(str(f))
            results.append({'name': stem, 'path': str(f), 'count': None, 'n_points': None, 'points': [], 'error': str(e)})
            continue
        with autocast(device, precision):
            density = model(image.unsqueeze(0).to(device, memory_format=fmt))
        density = density.float()
        pts = localize(density, stride=int(model.stride), threshold=loc_threshold)[0].cpu()
        count = float(density.sum())
        results.append({'name': stem, 'path': str(f), 'count': count, 'n_points': len(pts),
                        'points': [[round(float(x), 2), round(float(y), 2)] for x, y in pts.tolist()]})
        if not no_plots:
            plot_prediction(image, density, pts, title=f'{f.name}: {count:.1f} people', path=out / f'{stem}_pred.png', dpi=dpi)
        if not quiet: print(f"{f}: count {count:.1f}, {len(pts)} points", flush=True)
    write_csv(results, out / 'predictions.csv', ['name', 'path', 'count', 'n_points', 'error'])
    good = [r for r in results if r['count'] is not None]
    (out / 'points.json').write_text(json.dumps({r['name']: {'count': r['count'], 'points': r['points']} for r in good}))
    written = [out / 'predictions.csv', out / 'points.json'] + (_write_nwpu(good, out) if nwpu else [])
    if not quiet:
        print(f"wrote {', '.join(map(str, written))}" + ('' if no_plots else f" and {len(good)} PNGs (*_pred.png) in {out}"))
    if failed: raise ValueError(f"{len(failed)} of {len(files)} images could not be read ({', '.join(failed)}); "
                                f"the other {len(good)} are in {out / 'predictions.csv'}")
    return results

# %% [markdown]
# The model trained above on two test images saved as PNG files, with the NWPU files; the counts are those of the
# density the model gives the dataset's own images (the PNGs hold the same pixels), and a corrupt file is skipped:

# %%
_, _, test_ds = build_datasets('synthetic', crop_size=32, stride=4, **synthetic_kwargs(16, 48))
(tmp / 'photos').mkdir()
for i in range(2): Image.fromarray((denormalize(test_ds[i][0]) * 255 + 0.5).astype(np.uint8)).save(tmp / 'photos' / f'{i + 1:04d}.png')
rows = predict(tmp / 'run' / 'best.pt', [tmp / 'photos'], tmp / 'pred', nwpu=True, device='cpu', quiet=True)
test_eq(sorted(p.name for p in (tmp / 'pred').iterdir()),
        ['0001_pred.png', '0002_pred.png', 'nwpu_count.txt', 'nwpu_loc.txt', 'points.json', 'predictions.csv'])
net, _ = load_model(tmp / 'run' / 'best.pt')
for r, i in zip(rows, range(2)):
    test_close(r['count'], net(read_image(tmp / 'photos' / f'{i + 1:04d}.png')[None]).sum().item(), eps=1e-4)
(tmp / 'photos' / 'broken.png').write_bytes(b'not an image')
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_fail(lambda: predict(tmp / 'run' / 'best.pt', [tmp / 'photos'], tmp / 'pred2', no_plots=True, device='cpu', quiet=True),
              contains='1 of 3 images could not be read')
assert 'broken.png' in err.getvalue()
test_eq([r['name'] for r in csv.DictReader(open(tmp / 'pred2' / 'predictions.csv'))], ['0001', '0002', 'broken'])

# %% [markdown]
# ## `demo`
#
# The README's command. With no data and no weights it
#
# 1. generates a synthetic crowd set (`uotcrowd.data.SyntheticCrowd`: people of varying density and size on
#    textured backgrounds, with exact point annotations; 256 training, 32 validation and 64 test images of 96×96 px),
# 2. trains MCNN (stride 4, Adam with lr $10^{-3}$, batches of 8) with the generalized loss for a fixed time budget
#    (default 240 s), keeping the best model by validation MAE,
# 3. evaluates on held-out test images: count MAE/RMSE against the MAE of always predicting the mean training
#    count (a model that learned nothing matches that baseline), and localization F1 at 4 and 8 px,
# 4. writes the training curves, `examples.png` (density and located points on test images, `plot_examples`),
#    per-image predictions and `metrics.json`, and prints a summary.
#
# The sizes were chosen by measuring on this project's 2-core CPU while other jobs shared it: one MCNN + GL step on
# 8 images of 96×96 px (24×24 density maps, about 50 heads each) costs about 0.2 s of CPU time (0.06 s of it the
# loss), so an epoch of 256 images takes 8-12 s on a quiet core and up to a minute on a crowded one. The budget, not
# the epoch count, ends training (slower machines train fewer epochs); the best model by validation MAE is kept.
# Two 240 s runs on the shared machine (load average 5-9 on its 2 cores): with one thread, 12 epochs, test MAE 10.1
# against 44.3 for the mean-count baseline (23 % of it), F1 0.36 at 4 px and 0.45 at 8 px, 4 min in all; with the
# default two threads, slowed more by the sharing, 3 epochs, test MAE 16.2 (37 % of the baseline), F1 0.28 / 0.38,
# 4 min 12 s in all. `threads` sets the number of torch threads. Larger images or VGG19 learn better
# but do not fit the budget on a CPU; `uotcrowd train` is the tool for real runs.

# %%
#| export
DEMO = {'full': dict(n_train=256, n_val=32, n_test=64, size=96, budget_s=240., batch_size=8, val_epoch=1, lr=1e-3),
        'quick': dict(n_train=32, n_val=8, n_test=8, size=48, budget_s=20., batch_size=8, val_epoch=1, lr=1e-3)}

def demo(out:str='demo_out', # output folder
         budget_s:float|None=None, # training time budget in seconds (default 240; 20 with --quick)
         quick:bool=False, # tiny data set and budget (tests, smoke runs)
         max_epoch:int|None=None, # also stop after this many epochs (a run that is the same on any machine)
         seed:int=0, # random seed
         threads:int|None=None, # torch CPU threads (default: torch's choice)
         device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
         quiet:bool=False, # no progress bars or per-epoch lines
        ) -> dict: # the test metrics
    "Train MCNN with the generalized loss on synthetic crowds for a time budget, then evaluate it on held-out images."
    t0 = time.perf_counter()
    if threads: torch.set_num_threads(threads)
    setting = DEMO['quick' if quick else 'full']
    budget = setting['budget_s'] if budget_s is None else budget_s
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    seed_everything(seed)
    model = get_model('mcnn')
    data_kw = {k: setting[k] for k in ('n_train', 'n_val', 'n_test', 'size')}
    train_ds, val_ds, test_ds = build_datasets('synthetic', None, crop_size=setting['size'], stride=model.stride,
                                               seed=seed, **data_kw)
    say(f"uotcrowd demo: {len(train_ds)} training, {len(val_ds)} validation and {len(test_ds)} test synthetic images "
        f"({setting['size']}x{setting['size']}); training MCNN with the generalized loss for {budget:g}s on "
        f"{torch.get_num_threads()} CPU threads")
    cfg = TrainConfig(out_dir=str(out), max_epoch=max_epoch or 10_000, batch_size=setting['batch_size'], crop_size=setting['size'],
                      lr=setting['lr'], val_epoch=setting['val_epoch'], seed=seed, device=device, quiet=quiet,
                      time_budget_s=budget, model='mcnn', loss='gl', dataset='synthetic', data_kwargs=data_kw)
    res = fit(model, get_loss('gl', stride=model.stride), train_ds, val_ds, cfg)
    t_train = time.perf_counter() - t0
    model, _ = load_model(res['best'] or res['last'], get_device(device))
    ev = evaluate(model, test_ds, thresholds=(4., 8.), csv_path=out / 'per_image.csv')
    mean_count = float(np.mean([float(train_ds.load(i)[2]['count']) for i in range(len(train_ds))]))  # full images
    gts = np.array([r['gt_count'] for r in ev['per_image']], dtype=float)
    baseline_mae = float(np.abs(gts - mean_count).mean())
    metrics = {k: v for k, v in ev.items() if k != 'per_image'}
    metrics.update(dataset='synthetic', split='test', model='mcnn', loss='gl', epochs=res['epochs'],
                   best_epoch=res['best_epoch'] + 1, best_val_mae=res['best_mae'], mean_train_count=mean_count,
                   baseline_mae=baseline_mae, train_time_s=t_train)
    plot_examples(model, test_ds, path=out / 'examples.png')
    metrics['total_time_s'] = time.perf_counter() - t0
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    say(format_metrics(metrics))
    say(f"  baseline (predict the mean training count {mean_count:.1f}): MAE {baseline_mae:.3f}  -> "
        f"the trained model's error is {metrics['mae'] / max(baseline_mae, 1e-9):.0%} of it")
    say(f"trained {res['epochs']} epochs in {t_train:.0f}s (best validation MAE {res['best_mae']:.3f} at epoch "
        f"{res['best_epoch'] + 1}); total {metrics['total_time_s']:.0f}s. Wrote:")
    for name, what in [('best.pt', 'best checkpoint (by validation MAE)'), ('last.pt', 'last checkpoint'),
                       ('log.csv', 'losses and metrics per epoch'), ('curves.png', 'training curves'),
                       ('per_image.csv', 'test predictions per image'), ('examples.png', 'density maps and located points'),
                       ('metrics.json', 'test metrics')]:
        say(f"  {out / name}: {what}")
    say(f"next: uotcrowd predict --checkpoint {out / 'best.pt'} IMAGE.jpg --out {out / 'predictions'}")
    return metrics

# %% [markdown]
# `uotcrowd demo --quick` is run by `tests/test_cli.py`; here a two-second budget checks the files and the baseline.

# %%
m = demo(tmp / 'demo', budget_s=2., quick=True, device='cpu', quiet=True)
test_eq(sorted(p.name for p in (tmp / 'demo').iterdir()),
        ['best.pt', 'curves.png', 'examples.png', 'last.pt', 'log.csv', 'metrics.json', 'per_image.csv'])
gts = [float(r['gt_count']) for r in csv.DictReader(open(tmp / 'demo' / 'per_image.csv'))]
test_close(m['baseline_mae'], np.abs(np.array(gts) - m['mean_train_count']).mean(), eps=1e-9)
assert {'mae', 'f1@4', 'f1@8'} <= set(m) and m['epochs'] >= 1

# %%
#| hide
import nbdev; nbdev.nbdev_export()
