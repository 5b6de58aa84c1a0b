# %% [markdown]
# # Training
#
# > `fit` and `validate`: Adam training with best-by-validation checkpoints, exact resume, bf16/fp16 autocast, DDP under `torchrun`, CSV/PNG logs; its settings are a `TrainConfig`.

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations
import csv, math, os, random, sys, time, warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm
from uotcrowd.core import get_device, seed_everything, count_metrics, reuse_host_memory
from uotcrowd.data import collate
from uotcrowd.models import get_model
from uotcrowd.plots import plot_curves
from uotcrowd.checkpoints import save_checkpoint, load_checkpoint
from uotcrowd.precision import (Precision, ResolvedPrecision, is_native, resolve_precision, autocast,
                                memory_format)
from uotcrowd.config import TrainConfig, default_lr, plateau_schedule, epoch_lr, WeightAverage

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail, test_stdout
import tempfile
from uotcrowd.checkpoints import load_model


# %% [markdown]
# Training follows the recipe of the paper's official code and of DM-Count: Adam with learning rate $10^{-5}$
# for the VGG19 and CSRNet backbones ($10^{-4}$ for the small MCNN), weight decay $10^{-5}$, random crops with
# horizontal flips, and the model with the lowest **validation** MAE kept as `best.pt`. The validation images come
# from the training split (see `uotcrowd.data.build_datasets`); the test split is never used to choose a model.
#
# `fit` takes any `nn.Module` returning a `(B, 1, h, w)` density, any loss with the `loss(density, points)`
# contract and any dataset of `(image, points, meta)` items, so the same loop trains every model/loss pair.
#
# Everything the test cells below use is defined in them: a two-layer convolutional net and a plain count loss
# $\frac1B\sum_b(\sum_{ij} D_b - N_b)^2$ on a small in-memory dataset, so the mechanics (seeding, resume, NaN
# handling, logging) are checked without the real models.
#
# The settings of a run (`TrainConfig`), its learning-rate schedules and the weight average are in
# [Training configuration](07a_config.ipynb), the arithmetic (`precision`) in [Precision](07_precision.ipynb).

# %% [markdown]
# ## Checkpoints
#
# A checkpoint is a plain dict: model and optimizer state, the number of finished epochs, the best validation MAE,
# the RNG states, the config as a dict and the history of logged metrics. It is written and read by
# `uotcrowd.checkpoints` (atomic writes, `weights_only` loading: only tensors, numbers, strings, lists, tuples and
# dicts go in), so the generator states are stored as tensors and plain numbers.

# %%
#| export
def rng_state() -> dict:
    "The states of Python's, NumPy's and torch's (CPU and CUDA) generators as `weights_only`-safe objects."
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64),
                        'gauss': gauss},
             'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached': float(cached)},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available(): state['cuda'] = torch.cuda.get_rng_state_all()
    return state


# %%
_saved = rng_state()
test_eq(sorted(k for k in _saved if k != 'cuda'), ['numpy', 'python', 'torch'])
test_eq((type(_saved['python']['state']), type(_saved['numpy']['keys'])), (torch.Tensor, torch.Tensor))


# %% [markdown]
# Restoring them makes the generators continue exactly where they were saved:

# %%
#| export
def set_rng_state(state:dict # from `rng_state`
                 ):
    "Restore the generator states saved by `rng_state`."
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss']))
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


# %%
seed_everything(5)
saved = rng_state()
a = (random.random(), np.random.rand(), torch.rand(1).item())
random.seed(1)
np.random.seed(1)
torch.manual_seed(1)
set_rng_state(saved)
test_eq((random.random(), np.random.rand(), torch.rand(1).item()), a)


# %% [markdown]
# ## Reproducible epochs
#
# Exact resume needs every random choice of epoch $e$ to depend only on `(seed, e)`, not on what happened before.
# At the start of each epoch we reseed Python, NumPy and torch (augmentations drawn in the main process and
# dropout), and the `DataLoader` gets its own generator (shuffling, and the base seed of its worker processes,
# which torch derives for each worker). Under DDP each rank adds its rank to the seed (different crops per rank)
# and the `DistributedSampler` shuffles from `seed` and `set_epoch(e)`.

# %%
#| export
def epoch_seed(seed:int, # run seed
               epoch:int, # epoch index
               rank:int=0 # process rank under DDP
              ) -> int:
    "A 31-bit seed from `(seed, epoch, rank)` by NumPy's `SeedSequence` (well mixed, order-sensitive)."
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)


# %%
test_eq(epoch_seed(0, 3), epoch_seed(0, 3))
assert len({epoch_seed(0, e) for e in range(50)} | {epoch_seed(1, e) for e in range(50)}) == 100
assert epoch_seed(0, 1, rank=0) != epoch_seed(0, 1, rank=1)


# %% [markdown]
# ## Distributed training
#
# `torchrun --nproc_per_node=K ...` starts K processes and sets `RANK`, `LOCAL_RANK` and `WORLD_SIZE`.
# `setup_distributed` joins the process group (NCCL on GPUs, gloo on CPU); each process then owns one GPU, wraps
# the model in `DistributedDataParallel` (gradients averaged across ranks during `backward`) and reads its own
# shard of the data. Losses and validation predictions are gathered across ranks, so every rank takes the same
# best-model decision, and only rank 0 writes files. Multi-node runs work the same way
# (`torchrun --nnodes=N --node_rank=... --rdzv_endpoint=host:port`).

# %%
#| export
def setup_distributed(device:str|torch.device='auto' # requested device
                     # (rank, world size, device, whether we created the group)
                     ) -> tuple[int, int, torch.device, bool]:
    "Join the process group when launched by `torchrun` (`WORLD_SIZE` > 1); otherwise return rank 0 of 1."
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if dist.is_available() and dist.is_initialized():
        dev = get_device(device)
        if dev.type == 'cuda': dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        return dist.get_rank(), dist.get_world_size(), dev, False
    if world <= 1: return 0, 1, get_device(device), False
    dev = get_device(device)
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(dev)
    dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size(), dev, True


# %%
test_eq(setup_distributed('cpu')[:3], (0, 1, torch.device('cpu')))


# %%
#| export
def _gather(obj, world:int) -> list:
    "Every rank's `obj`, in rank order (just `[obj]` without DDP)."
    if world == 1: return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# %%
test_eq(_gather({'rows': [1, 2]}, 1), [{'rows': [1, 2]}])


# %% [markdown]
# ## Validation
#
# Counting is validated on full images (padded to a multiple of the stride by the dataset), one image at a time
# because their sizes differ: the count MAE, RMSE and NAE of `uotcrowd.core.count_metrics`, the MAE choosing the best
# checkpoint. Images whose count is unknown (`meta['count'] == -1`, e.g. NWPU's test set) get predictions but no
# metrics. `precision` runs the model as in training (autocast and channels_last for `bf16`/`fp16`, see
# [Precision](07_precision.ipynb); the density is cast to float32 before anything is summed); `validate` defaults to
# `fp32`. Under DDP each rank predicts a share of the images and every rank gets all the rows.
# `each(row, density, points)` may add to the row of every image: `uotcrowd.evaluate.evaluate` adds the located
# points that way.

# %% [markdown]
# The test cells use a tiny in-memory dataset with the `(image, points, meta)` contract, a two-layer net and a
# plain count loss, and a model that predicts a constant density $c$ per pixel:

# %%
class TinyCrowd(Dataset):
    "n random 32x32 images, each with k_i points; the count can be read off the image (bright pixels)."
    def __init__(self, n=16, seed=0, size=32):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            k = int(torch.randint(0, 6, (1,), generator=g))
            pts = torch.rand(k, 2, generator=g) * (size - 1)
            img = torch.zeros(3, size, size)
            for x, y in pts.long().tolist(): img[:, y, x] += 4.
            self.items.append((img, pts, {'name': f'img{i:02d}', 'path': '', 'count': k}))
    def __len__(self): return len(self.items)
    def __getitem__(self, i):
        img, pts, meta = self.items[i]
        if torch.rand(1).item() < 0.5:  # random horizontal flip: exercises the per-epoch seeding
            img = img.flip(-1)
            pts = pts.clone()
            pts[:, 0] = img.shape[-1] - 1 - pts[:, 0]
        return img, pts, meta


# %%
class TinyNet(nn.Module):
    stride = 4
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4),
                                  nn.Conv2d(8, 1, 1))
    def forward(self, x): return nn.functional.softplus(self.body(x)) * 0.01


# %%
class CountLoss(nn.Module):
    def forward(self, density, points):
        return torch.stack([(d.sum() - len(p))**2 for d, p in zip(density, points)]).mean()


# %%
class ConstNet(nn.Module):
    stride = 4
    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))
    def forward(self, x): return self.c.expand(x.shape[0], 1, x.shape[2] // 4, x.shape[3] // 4)

ds = TinyCrowd(10)


# %%
#| export
def predict_counts(model:nn.Module, # density model
                   ds:Dataset, # full-image `(image, points, meta)` items
                   device:torch.device, # where the model runs
                   indices:Sequence[int], # which items
                   precision:ResolvedPrecision='fp32', # resolved precision
                   quiet:bool=True, # no progress bar
                   each:Callable|None=None # `each(row, density, points)` may add to each row
                  ) -> list[dict]: # `index`, `name`, `gt_count`, `pred_count`, `abs_err` per image
    "Predicted and annotated count of `ds[i]` for `i` in `indices`, the density summed in float32."
    rows, fmt = [], memory_format(precision)
    for i in tqdm(indices, desc='eval', disable=quiet, leave=False, dynamic_ncols=True):
        image, points, meta = ds[i]
        with autocast(device, precision):
            density = model(image.unsqueeze(0).to(device, memory_format=fmt))
        density = density.float()  # counts are summed in float32
        gt, pred = int(meta.get('count', len(points))), float(density.sum())
        rows.append({'index': int(i), 'name': str(meta.get('name', i)), 'gt_count': gt if gt >= 0 else None,
                     'pred_count': pred, 'abs_err': abs(pred - gt) if gt >= 0 else None})
        if each is not None: each(rows[-1], density, points)
    return rows


# %% [markdown]
# A constant density of 0.05 on the 8×8 map of a 32×32 image counts 3.2 people; an unknown count (-1) gets a
# prediction but no error, and `each` sees every row:

# %%
_pc = predict_counts(ConstNet(0.05), ds, torch.device('cpu'), [0, 3],
                     each=lambda row, density, points: row.update(heads=len(points)))
test_eq([(r['index'], r['name'], r['gt_count']) for r in _pc],
        [(i, f'img{i:02d}', ds.items[i][2]['count']) for i in (0, 3)])
test_close([r['pred_count'] for r in _pc], [3.2, 3.2], eps=1e-5)
test_close([r['abs_err'] for r in _pc], [abs(3.2 - r['gt_count']) for r in _pc], eps=1e-5)
test_eq([r['heads'] for r in _pc], [r['gt_count'] for r in _pc])
_unknown = [(torch.zeros(3, 32, 32), torch.zeros(0, 2), {'count': -1})]
test_eq(predict_counts(ConstNet(0.), _unknown, torch.device('cpu'), [0])[0],
        {'index': 0, 'name': '0', 'gt_count': None, 'pred_count': 0., 'abs_err': None})


# %% [markdown]
# The per-image rows and `log.csv` are written as CSV:

# %%
#| export
def write_csv(rows:Sequence[dict], # one dict per line
              path:str|Path, # destination (written atomically)
              columns:Sequence[str]|None=None # column order; default: keys of the first row
             ) -> Path:
    "Write dicts as a CSV file with a header (missing values left empty)."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        w.writeheader()
        for r in rows: w.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in columns})
    os.replace(tmp, path)
    return path


# %%
_csv = write_csv([{'a': 1, 'b': None}, {'a': 2.5, 'b': 'x'}], Path(tempfile.mkdtemp()) / 'sub' / 't.csv')
test_eq(_csv.read_text().splitlines(), ['a,b', '1,', '2.5,x'])              # missing values left empty
test_eq(write_csv([{'a': 1, 'b': 2}], _csv, ['b']).read_text().splitlines(), ['b', '2'])   # chosen columns


# %%
#| export
@torch.no_grad()
def validate(model:nn.Module, # density model
             ds:Dataset, # dataset of full `(image, points, meta)` items
             device:str|torch.device|None=None, # default: the model's device
             precision:Precision='fp32', # one of `PRECISIONS` ('auto': bf16 where native); see Precision
             quiet:bool=True, # no progress bar
             rank:int=0, world:int=1, # shard the images across DDP ranks; results are gathered on every rank
             each:Callable|None=None # `each(row, density, points)` may add to the row of each image
            ) -> dict:
    "Count metrics (MAE, RMSE, NAE) over full images; the per-image rows are under `'per_image'`."
    device = get_device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try: rows = predict_counts(model, ds, device, range(rank, len(ds), world), precision, quiet or rank != 0,
                               each)
    finally: model.train(was_training)
    rows = sorted((r for part in _gather(rows, world) for r in part), key=lambda r: r['index'])
    out = {'n': len(rows)}
    known = [r for r in rows if r['gt_count'] is not None]
    if known:
        cm = count_metrics([r['pred_count'] for r in known], [r['gt_count'] for r in known])
        out.update(mae=cm['mae'], rmse=cm['rmse'], nae=cm['nae'])
    out['per_image'] = rows
    return out


# %% [markdown]
# Evaluation of a model that predicts a constant density $c$ per pixel on $h\times w$ maps must give
# MAE $=\frac1n\sum_i|c\,hw - N_i|$:

# %%
gt = torch.tensor([float(m['count']) for _, _, m in ds.items])
res = validate(ConstNet(0.05), ds, 'cpu')
pred = torch.full_like(gt, 0.05 * 64)
test_close(res['mae'], (pred - gt).abs().mean().item(), eps=1e-5)
test_close(res['rmse'], (pred - gt).pow(2).mean().sqrt().item(), eps=1e-5)
test_eq(res['n'], 10)
test_eq([r['name'] for r in res['per_image']], [f'img{i:02d}' for i in range(10)])

# %% [markdown]
# In bf16 the counts of a small convolutional net stay within 1 % of the float32 ones:

# %%
seed_everything(0)
_net = TinyNet()
r32, r16 = validate(_net, ds, 'cpu'), validate(_net, ds, 'cpu', precision='bf16')
c32, c16 = (torch.tensor([r['pred_count'] for r in r_['per_image']]) for r_ in (r32, r16))
assert ((c16 - c32).abs() / c32).max() < 0.01, (c32, c16)

# %% [markdown]
# ## Logs and curves
#
# After every epoch, rank 0 rewrites `log.csv` (one line per epoch: training loss and MAE, learning rate,
# seconds, and the validation metrics when they were computed) and `curves.png`, the figure of
# `uotcrowd.plots.plot_curves` (drawn on an Agg canvas of its own: headless machines are fine).

# %%
#| export
LOG_COLUMNS = ['epoch', 'train_loss', 'train_mae', 'lr', 'time_s', 'val_mae', 'val_rmse', 'val_nae',
               'val_mae_raw']


# %% [markdown]
# ## Guards of a training step
#
# Three things can end a run in the middle of an epoch: a density that is not finite (the model diverged), a
# non-finite loss, and the time budget. Under DDP every rank must take the same decision at the same step, or one
# rank waits forever in a collective the others never reach. So each step makes one small all-reduce of two
# flags: *bad* (any rank saw a non-finite density or loss) and *over budget* (decided on rank 0's clock alone and
# shared). A non-finite density never reaches the loss (whose input checks would raise a `ValueError` and bypass
# the guard); it gives a NaN loss value, and the run stops with the same `FloatingPointError` as a NaN loss.

# %%
#| export
def step_loss(loss:nn.Module, # `loss(density, points) -> scalar`
              density:torch.Tensor, # the model's output for the batch
              points:Sequence[torch.Tensor] # head points per image
             ) -> torch.Tensor:
    "The loss of a batch in float32, or a NaN scalar when the density itself is not finite."
    if not bool(torch.isfinite(density).all()):
        return density.new_full((), float('nan'), dtype=torch.float32)
    return loss(density.float(), points)


# %%
class _Count(nn.Module):
    def forward(self, density, points):
        return (density.sum((1, 2, 3)) - torch.tensor([float(len(p)) for p in points])).abs().mean()
d = torch.ones(2, 1, 4, 4, dtype=torch.bfloat16)
# |16-3|, |16-20|
test_eq(step_loss(_Count(), d, [torch.zeros(3, 2), torch.zeros(20, 2)]).item(), (13 + 4) / 2)
test_eq(step_loss(_Count(), d, [torch.zeros(3, 2)]).dtype, torch.float32)
d[1, 0, 2, 2] = float('nan')
assert torch.isnan(step_loss(_Count(), d, [torch.zeros(3, 2), torch.zeros(20, 2)]))


# %%
#| export
def step_flags(value:torch.Tensor, # this rank's loss value
               over_budget:bool, # this rank's view of the time budget (only rank 0's counts)
               world:int=1 # number of processes
              ) -> tuple[bool, bool]:
    "`(bad, over_budget)` agreed by every rank: any non-finite loss, or rank 0's budget spent."
    flags = torch.tensor([float(not bool(torch.isfinite(value.detach()))), float(over_budget)],
                         dtype=torch.float64)
    if world > 1: dist.all_reduce(flags)
    return bool(flags[0] > 0), bool(flags[1] > 0)


# %%
test_eq(step_flags(torch.tensor(1.), False), (False, False))
test_eq(step_flags(torch.tensor(float('inf')), True), (True, True))
test_eq(step_flags(torch.tensor(float('nan')), False), (True, False))


# %%
#| export
def nonfinite_message(value, epoch:int, step:int, rank:int, metas:Sequence[dict], last:Path) -> str:
    "What stopped the run, where, and which checkpoint is kept."
    names = [m.get('name', '?') for m in metas]
    kept = (f"the last good checkpoint is {last}" if last.exists()
            else "no epoch had finished, so no checkpoint was written")
    return (f"non-finite loss ({float(value)}) at epoch {epoch + 1}, step {step} on rank {rank}, "
            f"images {names}; training stopped, {kept} (lower --lr, or use --clip-grad)")


# %%
with tempfile.TemporaryDirectory() as d:
    msg = nonfinite_message(torch.tensor(float('nan')), 2, 5, 0, [{'name': 'IMG_1.jpg'}], Path(d) / 'last.pt')
    assert 'epoch 3, step 5' in msg and 'IMG_1.jpg' in msg and 'no checkpoint was written' in msg
    (Path(d) / 'last.pt').write_bytes(b'x')
    msg = nonfinite_message(1., 0, 0, 0, [], Path(d) / 'last.pt')
    assert f"last good checkpoint is {Path(d) / 'last.pt'}" in msg, msg


# %%
#| export
def load_weights(model:nn.Module, # the network to fill
                 ckpt:dict, # a checkpoint dict (`load_checkpoint`)
                 path:str|Path # the file it came from, for the message
                ):
    "Load `ckpt['model']` into `model`; a mismatch is one `ValueError` line naming the file and what differs."
    try: model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        own, theirs = model.state_dict(), ckpt['model']
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        shapes = [k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape]
        what = ckpt.get('model_name') or ckpt.get('config', {}).get('model') or 'another model'
        detail = '; '.join(x for x in (
            f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else '',
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else '',
            f"{len(shapes)} shape mismatches (e.g. {sorted(shapes)[0]})" if shapes else '') if x)
        raise ValueError(f"{path} holds weights of {what} that do not fit this {type(model).__name__}: "
                         f"{detail or e}") from None


# %%
_small, _big = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 8, 3))
load_weights(_small, {'model': nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict()}, 'a.pt')
test_fail(lambda: load_weights(_small, {'model': _big.state_dict(), 'model_name': 'vgg19'}, 'b.pt'),
          contains='b.pt holds weights of vgg19 that do not fit this Sequential: 2 shape mismatches')
test_fail(lambda: load_weights(_small, {'model': {'x.weight': torch.zeros(1)}}, 'c.pt'),
          contains='2 missing keys (e.g. 0.bias); 1 unexpected')


# %% [markdown]
# ## The training loop
#
# `fit` runs epochs `start .. max_epoch-1`. Each step computes the density in the configured precision (autocast
# and channels_last for bf16/fp16, see [Precision](07_precision.ipynb)), the loss in float32, checks that the loss
# is finite, back-propagates (through the `GradScaler` in fp16), optionally clips the gradient norm and takes an
# Adam step. A non-finite loss stops the run with a `FloatingPointError` naming the epoch, the step and the images
# of the batch; the checkpoints of the last finished epoch stay untouched. After each epoch (rank 0):
#
# - `last.pt`: full state for `resume`; `best.pt`: the same for the best validation MAE so far;
# - `log.csv` and `curves.png`.
#
# On the host, `fit` runs inside `reuse_host_memory(cfg.host_memory)` (see Core): with the default `'reuse'`, the
# memory a step frees is kept for the next step instead of being handed back and faulted in again, which takes
# 11 % off an MCNN step in float32 and 17 % in bfloat16 (B=4, 256², one thread, each case in a new process;
# `uotcrowd bench`), and 31 % off a float32 evaluation of a 1024×768 image; resident memory stays at the run's
# peak. `host_memory='release'` keeps the C library's defaults.
#
# The model is moved to channels_last in bf16/fp16 (and stays so after `fit`; values are unaffected), and the
# checkpoints record the precision that ran (`'precision'`: `fp32`, `bf16` or `fp16`).
#
# With `resume=PATH`, the model, optimizer, scaler, history, best metric and RNG states are restored and
# training continues at the next epoch. Because each epoch reseeds everything from `(seed, epoch)`, a run
# interrupted after epoch $k$ and resumed ends with exactly the weights of an uninterrupted run (on CPU; cuDNN
# kernels may differ across runs unless `deterministic=True`).
#
# `time_budget_s` turns the epoch count into a maximum: when the budget is spent the current epoch stops, is
# validated and saved, and `fit` returns (the demo uses this). The budget counts the whole run: the seconds
# already trained are stored in each checkpoint (`train_time_s`), so a resumed run gets only what is left.

# %%
#| export
def _train_loader(ds, cfg:TrainConfig, epoch:int, rank:int, world:int, device) -> DataLoader:
    # datasets with their own augmentation streams (`aug_seed`)
    if hasattr(ds, 'set_epoch'): ds.set_epoch(epoch)
    g = torch.Generator()
    g.manual_seed(epoch_seed(cfg.seed, epoch, rank))
    sampler = None
    if world > 1:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=False)
        sampler.set_epoch(epoch)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=g,
                      num_workers=cfg.num_workers, collate_fn=collate, pin_memory=device.type == 'cuda',
                      drop_last=False, persistent_workers=False)


# %% [markdown]
# The order of an epoch's batches depends on `(seed, epoch)` alone:

# %%
def _order(epoch, seed=0):
    "Names of the items in the order the loader of `epoch` yields them."
    cfg = TrainConfig(batch_size=4, seed=seed)
    loader = _train_loader(TinyCrowd(10).items, cfg, epoch, 0, 1, torch.device('cpu'))
    return [m['name'] for _, _, metas in loader for m in metas]
test_eq(len(_order(0)), 10)
test_eq(_order(1), _order(1))
assert _order(0) != _order(1) and _order(1) != _order(1, seed=1)


# %%
#| export
def _log(msg:str, cfg:TrainConfig, rank:int):
    if rank == 0 and not cfg.quiet: print(msg, flush=True)


# %%
test_stdout(lambda: _log('epoch 1/2', TrainConfig(), 0), 'epoch 1/2')
test_stdout(lambda: _log('epoch 1/2', TrainConfig(quiet=True), 0), '')
test_stdout(lambda: _log('epoch 1/2', TrainConfig(), 1), '')


# %% [markdown]
# `fit` is assembled from the small steps below, each checked on its own.
#
# **Set-up.** `training_state` moves the model (channels_last in bf16/fp16) and the loss to the device and builds
# Adam and the gradient scaler (active in fp16 only).

# %%
#| export
def training_state(model:nn.Module, # the network
                   loss:nn.Module, # the loss
                   cfg:TrainConfig, # `precision`, `lr`, `weight_decay`
                   device:torch.device # where training runs
                  ) -> tuple: # `(model, loss, optimizer, scaler, precision)`
    "Model and loss on `device` in the run's precision, with Adam and the fp16 `GradScaler`."
    precision = resolve_precision(cfg.precision, device)
    if not is_native(precision, device):
        warnings.warn(f"{device} has no native {precision}: it is emulated and slower than fp32 "
                      f"(--precision auto picks the fast one)")
    model = model.to(device, memory_format=memory_format(precision))
    loss = loss.to(device)
    optimizer = torch.optim.Adam(param_groups(model, cfg.backbone_lr_scale), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    set_lr(optimizer, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    return model, loss, optimizer, scaler, precision


# %% [markdown]
# Its optimizer holds one parameter group, or two where a pretrained backbone trains at a scaled learning rate:

# %%
#| export
def param_groups(model:nn.Module, # the network
                 backbone_lr_scale:float=1.0 # learning-rate factor of the parameters under `model.backbone`
                ) -> list[dict]:
    "Adam parameter groups with their `lr_scale`: the pretrained backbone's apart where its factor is not 1."
    backbone = getattr(model, 'backbone', None)
    if backbone_lr_scale == 1 or not isinstance(backbone, nn.Module):
        return [{'params': list(model.parameters()), 'lr_scale': 1.}]
    ids = {id(p) for p in backbone.parameters()}
    return [{'params': [p for p in model.parameters() if id(p) not in ids], 'lr_scale': 1.},
            {'params': list(backbone.parameters()), 'lr_scale': float(backbone_lr_scale)}]


# %%
# a network with a pretrained `backbone`: its parameters form the second group, at lr times the factor
class _WithBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 1, 1)
_wb = _WithBackbone()
_pg = param_groups(_wb, 0.3)
test_eq([(len(g['params']), g['lr_scale']) for g in _pg], [(2, 1.), (2, 0.3)])
assert _pg[0]['params'][0] is _wb.head.weight and _pg[1]['params'][0] is _wb.backbone.weight
test_eq([(len(g['params']), g['lr_scale']) for g in param_groups(_wb)], [(4, 1.)])
test_eq(len(param_groups(TinyNet(), 0.3)), 1)   # no backbone: one group whatever the factor


# %%
#| export
def set_lr(optimizer, # Adam from `training_state`
           lr:float # the schedule's learning rate
          ):
    "Set every group's learning rate to `lr` times its `lr_scale`."
    for g in optimizer.param_groups: g['lr'] = lr * g.get('lr_scale', 1.)


# %%
_o = torch.optim.Adam(param_groups(_wb, 0.3), lr=1.)
set_lr(_o, 0.1)
test_close([g['lr'] for g in _o.param_groups], [0.1, 0.03])


# %% [markdown]
# With its helpers defined, `training_state` on the CPU in fp32: Adam at the configured learning rate and weight
# decay, the scaler off; with a backbone factor, two groups:

# %%
_cfg = TrainConfig(lr=0.5, precision='fp32')
_m, _l, _opt, _sc, _p = training_state(TinyNet(), CountLoss(), _cfg, torch.device('cpu'))
test_eq((_p, _sc.is_enabled(), _opt.param_groups[0]['lr'], _opt.param_groups[0]['weight_decay']),
        ('fp32', False, 0.5, 1e-5))
_cfg = TrainConfig(lr=1e-3, backbone_lr_scale=0.3, precision='fp32')
_o = training_state(_wb, CountLoss(), _cfg, torch.device('cpu'))[2]
test_eq([len(g['params']) for g in _o.param_groups], [2, 2])
test_close([g['lr'] for g in _o.param_groups], [1e-3, 3e-4])
assert _o.param_groups[1]['params'][0] is _wb.backbone.weight
test_eq(len(training_state(_wb, CountLoss(), TrainConfig(lr=1e-3), torch.device('cpu'))[2].param_groups), 1)

# %% [markdown]
# **Resume.** `resume_state` says where a run starts: epoch 0 with no history, or, with `cfg.resume`, the epoch after
# the checkpoint's, with its weights, optimizer and scaler state, RNG states, history, best validation MAE, the
# training seconds already spent and the learning rate its history implies (`plateau_schedule`).

# %%
#| export
def resume_state(cfg:TrainConfig, # `resume`: the checkpoint to continue from (None: a fresh run)
                 model:nn.Module, optimizer, scaler, # restored in place from the checkpoint
                 rank:int=0, # only rank 0 restores the RNG states
                average:WeightAverage|None=None # the weight average, restored from the checkpoint's `ema`
                ) -> dict: # `start`, `best_mae`, `best_epoch`, `history`, `spent`
    "The state a run starts from: fresh, or restored from `cfg.resume`."
    state = dict(start=0, best_mae=math.inf, best_epoch=-1, history=[], spent=0.)
    if not cfg.resume: return state
    ckpt = load_checkpoint(cfg.resume)
    load_weights(model, ckpt, cfg.resume)
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'): scaler.load_state_dict(ckpt['scaler'])
    if average is not None:
        if 'ema' in ckpt: average.load_state_dict(ckpt['ema'], ckpt.get('ema_updates', 0))
        # a run saved without an average starts one here
        else: average.module.load_state_dict(model.state_dict())
    state.update(start=int(ckpt['epoch']), best_mae=float(ckpt['best_mae']),
                 best_epoch=int(ckpt['best_epoch']), history=list(ckpt.get('history', [])),
                 spent=float(ckpt.get('train_time_s', 0.)))
    if rank == 0 and 'rng' in ckpt: set_rng_state(ckpt['rng'])
    set_lr(optimizer, epoch_lr(state['history'], cfg))
    return state

# %%
_tmp = Path(tempfile.mkdtemp())
test_eq(resume_state(TrainConfig(), _m, _opt, _sc),
        dict(start=0, best_mae=math.inf, best_epoch=-1, history=[], spent=0.))
_hist = [dict(epoch=e, val_mae=v) for e, v in enumerate([3., 2., 2.5, 2.4])]
_src = TinyNet()
save_checkpoint({'model': _src.state_dict(), 'optimizer': _opt.state_dict(), 'epoch': 4, 'best_mae': 2.,
                 'best_epoch': 1, 'history': _hist, 'train_time_s': 7.5}, _tmp/'last.pt')
_net = TinyNet()
_cfg = TrainConfig(resume=_tmp/'last.pt', lr=1., schedule='plateau', lr_patience=2, lr_decay=0.5)
_st = resume_state(_cfg, _net, _opt, _sc)
test_eq(_st, dict(start=4, best_mae=2., best_epoch=1, history=_hist, spent=7.5))
test_eq(_opt.param_groups[0]['lr'], 0.5)   # decayed once: two epochs without improvement
for k, v in _src.state_dict().items(): assert torch.equal(_net.state_dict()[k], v), k

# %% [markdown]
# **One epoch.** `train_epoch` runs the steps of one epoch (reseeded from `(seed, epoch, rank)`) and returns its log
# row: mean training loss and count MAE over the images it saw, summed over ranks. It stops early when the time
# budget is spent (rank 0's clock decides for every rank), and raises `FloatingPointError` on a non-finite loss.

# %%
#| export
def train_epoch(net:nn.Module, # the model (DDP-wrapped under torchrun)
                loss:nn.Module, optimizer, scaler, # from `training_state`
                train_ds:Dataset, # the training crops
                cfg:TrainConfig, # batch size, seed, clipping, `max_steps`, `time_budget_s`
                epoch:int, # epoch index
                precision:ResolvedPrecision, # resolved precision
                device:torch.device, rank:int=0, world:int=1,
                # training seconds spent so far (the time budget's clock)
                elapsed:Callable[[], float]=lambda: 0.,
                out:Path|None=None, # the run's folder, named in the error message of a non-finite loss
                average:WeightAverage|None=None # updated after every step
                # log row (epoch, train_loss, train_mae, lr, time_s), whether the budget stopped it
               ) -> tuple[dict, bool]:
    "Train one epoch; returns its log row and whether the time budget stopped it."
    t0 = time.perf_counter()
    seed_everything(epoch_seed(cfg.seed, epoch, rank))
    loader = _train_loader(train_ds, cfg, epoch, rank, world, device)
    fmt, show = memory_format(precision), rank == 0 and not cfg.quiet and sys.stderr.isatty()
    net.train()
    loss_sum, abs_sum, n_img, stopped = torch.zeros((), dtype=torch.float64), 0., 0, False
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.max_epoch}', disable=not show, leave=False,
               dynamic_ncols=True)
    for step, (images, points, metas) in enumerate(bar):
        if cfg.max_steps is not None and step >= cfg.max_steps: break
        images = images.to(device, non_blocking=True, memory_format=fmt)
        points = [p.to(device) for p in points]
        with autocast(device, precision):
            density = net(images)  # the loss and the counts below get it as float32
        value = step_loss(loss, density, points)
        bad, stopped = step_flags(value, rank == 0 and cfg.time_budget_s is not None
                                  and elapsed() > cfg.time_budget_s, world)
        if bad: raise FloatingPointError(nonfinite_message(value.detach(), epoch, step, rank, metas,
                                                           Path(out or cfg.out_dir) / 'last.pt'))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(value).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if average is not None:
            average.update(net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net)
        with torch.no_grad():
            loss_sum += value.detach().double().cpu() * len(points)
            n_img += len(points)
            abs_sum += float((density.detach().float().sum((1, 2, 3)).cpu()
                              - torch.tensor([float(len(p)) for p in points])).abs().sum())
        if show: bar.set_postfix(loss=f'{value.item():.4g}')
        if stopped: break  # rank 0's clock decides, every rank stops at this step
    bar.close()
    totals = torch.tensor([float(loss_sum), abs_sum, float(n_img)], dtype=torch.float64)
    if world > 1: dist.all_reduce(totals)
    n = max(float(totals[2]), 1.)
    return {'epoch': epoch, 'train_loss': float(totals[0]) / n, 'train_mae': float(totals[1]) / n,
            'lr': optimizer.param_groups[0]['lr'], 'time_s': time.perf_counter() - t0}, stopped

# %% [markdown]
# With a learning rate of 0 the weights do not move, so the row holds the loss and the count error of the initial
# network on every image (here a plain list of items, without the random flips of `TinyCrowd`):

# %%
_ds = TinyCrowd(10, seed=3).items
seed_everything(0)
_net = TinyNet()
_m, _l, _opt, _sc, _p = training_state(_net, CountLoss(), TrainConfig(lr=0.), torch.device('cpu'))
_cfg = TrainConfig(lr=0., batch_size=4, quiet=True)
_row, _stopped = train_epoch(_m, _l, _opt, _sc, _ds, _cfg, 0, 'fp32', torch.device('cpu'))
with torch.no_grad(): _err = torch.tensor([float(_net(im[None]).sum()) - len(p) for im, p, _ in _ds])
test_close(_row['train_loss'], _err.square().mean().item(), eps=1e-5)
test_close(_row['train_mae'], _err.abs().mean().item(), eps=1e-5)
test_eq((_row['epoch'], _row['lr'], _stopped), (0, 0., False))
_cfg = TrainConfig(batch_size=4, quiet=True, time_budget_s=1.)
_row, _stopped = train_epoch(_m, _l, _opt, _sc, _ds, _cfg, 0, 'fp32', torch.device('cpu'), elapsed=lambda: 2.)
test_eq(_stopped, True)   # after its first step
test_fail(lambda: train_epoch(_m, lambda d, p: d.sum() * float('nan'), _opt, _sc, _ds,
                              TrainConfig(batch_size=4, quiet=True), 0, 'fp32', torch.device('cpu')),
          contains='non-finite loss')

# %% [markdown]
# **Validation and records.** The validation MAE is computed every `val_epoch` epochs from `val_start` on, and after
# the last epoch (or the one the time budget cut short). Rank 0 then writes `last.pt` (and `best.pt` when the
# validation MAE improved, or, without validation, once), `log.csv` and `curves.png`, and prints one line.

# %%
#| export
def validation_due(cfg:TrainConfig, # `val_start`, `val_epoch`, `max_epoch`
                   epoch:int, # epoch index
                   stopped:bool=False # the time budget ended this epoch
                  ) -> bool:
    "Whether the validation set is evaluated after `epoch`."
    last = epoch == cfg.max_epoch - 1 or stopped
    return epoch >= cfg.val_start and ((epoch + 1) % cfg.val_epoch == 0 or last)


# %%
_cfg = TrainConfig(max_epoch=10, val_epoch=3, val_start=4)
test_eq([e for e in range(10) if validation_due(_cfg, e)], [5, 8, 9])
assert validation_due(_cfg, 4, stopped=True) and not validation_due(_cfg, 3, stopped=True)


# %%
#| export
def write_epoch(out:Path, # the run's folder
                state:dict, # checkpoint contents
                history:Sequence[dict], # rows of `log.csv`
                best:bool # also write `best.pt`
               ):
    "Rank 0's files after an epoch: `last.pt` (and `best.pt`), `log.csv`, `curves.png`."
    save_checkpoint(state, out / 'last.pt')
    if best: save_checkpoint(state, out / 'best.pt')
    write_csv(history, out / 'log.csv', LOG_COLUMNS)
    plot_curves(history, out / 'curves.png')


# %%
_rows = [dict(epoch=0, train_loss=2., train_mae=1.5, lr=1e-3, time_s=0.5, val_mae=1.25, val_rmse=2.,
              val_nae=0.1)]
write_epoch(_tmp/'run', {'model': {}, 'epoch': 1}, _rows, best=False)
test_eq(sorted(p.name for p in (_tmp/'run').iterdir()), ['curves.png', 'last.pt', 'log.csv'])


# %%
#| export
def epoch_message(row:dict, # the epoch's log row
                  cfg:TrainConfig, # `max_epoch`, `time_budget_s`
                  improved:bool, # a new best validation MAE
                  elapsed:float # training seconds so far
                 ) -> str:
    "The line printed after an epoch."
    val = ('' if row['val_mae'] is None
           else f"  val MAE {row['val_mae']:.3f} RMSE {row['val_rmse']:.3f}" + (' *' if improved else ''))
    when = f"epoch {row['epoch'] + 1}/{cfg.max_epoch}" if cfg.time_budget_s is None else \
           f"epoch {row['epoch'] + 1} ({elapsed:.0f}/{cfg.time_budget_s:g}s)"
    return (f"{when}  loss {row['train_loss']:.4g}  train MAE {row['train_mae']:.3f}{val}  "
            f"({row['time_s']:.1f}s)")


# %%
test_eq(epoch_message(_rows[0], TrainConfig(max_epoch=10), True, 3.),
        'epoch 1/10  loss 2  train MAE 1.500  val MAE 1.250 RMSE 2.000 *  (0.5s)')
test_eq(epoch_message(_rows[0], TrainConfig(time_budget_s=60), False, 3.)[:13], 'epoch 1 (3/60')

# %% [markdown]
# **The loop.** `fit` joins the process group under `torchrun`, and for each epoch trains, validates when due,
# updates the best MAE and the learning rate, writes the files and stops on the time budget or when the patience is
# spent.

# %%
#| export
def fit(model:nn.Module, # density model; `model.stride` is recorded in the checkpoint
        loss:nn.Module, # loss with the `loss(density, points) -> scalar` contract
        train_ds:Dataset, # training dataset (random crops), `(image, points, meta)` items
        val_ds:Dataset|None, # validation dataset of full images (never the test split); None: no validation
        cfg:TrainConfig|None=None, # training configuration
       ) -> dict:
    """Train `model` with Adam; writes `last.pt`, `best.pt`, `log.csv`, `curves.png` to `cfg.out_dir`;
    returns a summary dict."""
    cfg = cfg or TrainConfig()
    rank, world, device, own_group = setup_distributed(cfg.device)
    try:
        with reuse_host_memory(cfg.host_memory):
            summary = _fit(model, loss, train_ds, val_ds, cfg, rank, world, device)
        if own_group and world > 1: dist.barrier()  # no rank tears gloo down while another still talks to it
        return summary
    finally:
        if own_group: dist.destroy_process_group()


# %% [markdown]
# `_fit` is the loop itself, which `fit` runs inside the process group and the host-memory setting:

# %%
#| export
def _fit(model, loss, train_ds, val_ds, cfg, rank, world, device):
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    if rank == 0: out.mkdir(parents=True, exist_ok=True)
    if cfg.deterministic: seed_everything(cfg.seed, deterministic=True)
    # the network's family decides, as on the command line
    if cfg.lr is None: cfg = replace(cfg, lr=default_lr(model))
    model, loss, optimizer, scaler, precision = training_state(model, loss, cfg, device)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    st = resume_state(cfg, model, optimizer, scaler, rank, average)
    if not cfg.resume and cfg.seed is not None and not cfg.deterministic: seed_everything(cfg.seed)
    if cfg.resume:
        _log(f"resumed from {cfg.resume} after epoch {st['start']} (best val MAE {st['best_mae']:.3f})", cfg,
             rank)
    best_mae, best_epoch, history = st['best_mae'], st['best_epoch'], st['history']
    elapsed = lambda: st['spent'] + time.perf_counter() - t_start  # resumed segments included
    net = (nn.parallel.DistributedDataParallel(model,
                                               device_ids=[device.index] if device.type == 'cuda' else None)
           if world > 1 else model)
    meta = {'model_name': cfg.model, 'model_kwargs': dict(cfg.model_kwargs), 'loss_name': cfg.loss,
            'loss_kwargs': dict(cfg.loss_kwargs), 'stride': int(getattr(model, 'stride', 8)),
            'dataset': cfg.dataset, 'world_size': world, 'torch_version': str(torch.__version__),
            'precision': precision}
    show, stopped, epoch = rank == 0 and not cfg.quiet and sys.stderr.isatty(), False, st['start'] - 1
    for epoch in range(st['start'], cfg.max_epoch):
        if cfg.schedule == 'plateau' and plateau_schedule(history, cfg)[1]:  # patience already spent
            epoch -= 1
            break
        set_lr(optimizer, epoch_lr(history, cfg))
        row, stopped = train_epoch(net, loss, optimizer, scaler, train_ds, cfg, epoch, precision, device,
                                   rank, world, elapsed, out, average)
        row.update(val_mae=None, val_rmse=None, val_nae=None, val_mae_raw=None)
        # the weights that are validated and evaluated
        scored = average.module if average is not None else model
        if val_ds is not None and len(val_ds) and validation_due(cfg, epoch, stopped):
            res = validate(scored, val_ds, device, precision=precision, quiet=not show, rank=rank,
                           world=world)
            row.update(val_mae=res.get('mae'), val_rmse=res.get('rmse'), val_nae=res.get('nae'))
            if average is not None and cfg.val_raw:
                row['val_mae_raw'] = validate(model, val_ds, device, precision=precision, quiet=True,
                                              rank=rank, world=world).get('mae')
        history.append(row)
        improved = row['val_mae'] is not None and row['val_mae'] < best_mae
        if improved: best_mae, best_epoch = row['val_mae'], epoch
        patience_spent = cfg.schedule == 'plateau' and plateau_schedule(history, cfg)[1]
        if rank == 0:
            state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                     'scaler': scaler.state_dict(), 'epoch': epoch + 1, 'best_mae': best_mae,
                     'best_epoch': best_epoch, 'history': history, 'config': cfg.to_dict(),
                     'rng': rng_state(), 'train_time_s': elapsed(), **meta}
            if average is not None: state.update(ema=average.state_dict(), ema_updates=average.updates)
            write_epoch(out, state, history, improved or (val_ds is None and not math.isfinite(best_mae)))
            _log(epoch_message(row, cfg, improved, elapsed()), cfg, rank)
        if world > 1: dist.barrier()
        if stopped:
            _log(f"time budget of {cfg.time_budget_s:g}s spent: stopped during epoch {epoch + 1}", cfg, rank)
            break
        if patience_spent:
            _log(f"no validation improvement for {cfg.patience} epochs: stopped after epoch {epoch + 1}", cfg,
                 rank)
            break
    return {'out_dir': str(out), 'last': str(out / 'last.pt'),
            'best': str(out / 'best.pt') if (out / 'best.pt').exists() else None,
            'best_mae': best_mae, 'best_epoch': best_epoch, 'epochs': epoch + 1, 'history': history,
            'stopped_early': stopped,
            'converged': cfg.schedule == 'plateau' and plateau_schedule(history, cfg)[1],
            'time_s': elapsed(), 'rank': rank, 'world': world}


# %% [markdown]
# A short run on the tiny dataset: the count loss falls, the files are written and `best.pt` holds the epoch
# with the lowest validation MAE.

# %%
tmp = Path(tempfile.mkdtemp())
train_ds, val_ds = TinyCrowd(24, seed=0), TinyCrowd(8, seed=1)
seed_everything(0)
net = TinyNet()
cfg = TrainConfig(out_dir=tmp/'run', max_epoch=4, batch_size=4, lr=3e-2, quiet=True, model='tiny')
res = fit(net, CountLoss(), train_ds, val_ds, cfg)
hist = res['history']
assert hist[-1]['train_loss'] < hist[0]['train_loss'], hist
test_eq(sorted(p.name for p in (tmp/'run').iterdir()), ['best.pt', 'curves.png', 'last.pt', 'log.csv'])
best = load_checkpoint(tmp/'run'/'best.pt')
test_eq(best['best_epoch'], min(range(4), key=lambda e: hist[e]['val_mae']))
test_eq(best['stride'], 4)
with open(tmp/'run'/'log.csv') as f: test_eq(len(list(csv.DictReader(f))), 4)
# the logged validation MAE is that of the weight average, which is what `load_model` rebuilds from `last.pt`
_net = TinyNet()
_net.load_state_dict(load_checkpoint(tmp/'run'/'last.pt')['ema'])
# bf16 in another memory format
test_close(validate(_net, val_ds, precision=best['precision'])['mae'], hist[-1]['val_mae'], eps=1e-4)
# with no learning rate given, the network's family decides (MCNN: 1e-4, as `uotcrowd train` gives it)
_cfg = TrainConfig(out_dir=tmp/'lr', max_epoch=1, max_steps=1, batch_size=4, quiet=True)
_r = fit(get_model('mcnn'), CountLoss(), train_ds, None, _cfg)
test_eq(_r['history'][0]['lr'], 1e-4)


# %% [markdown]
# **Resume equivalence.** Two epochs in one go, or one epoch and a resumed second epoch, give identical weights
# and optimizer state (the dataset's random flips make this a real test of the per-epoch seeding):

# %%
def train_run(out, max_epoch, resume=None, seed=7):
    seed_everything(0)
    net = TinyNet()
    cfg = TrainConfig(out_dir=out, max_epoch=max_epoch, batch_size=4, lr=3e-2, quiet=True, resume=resume,
                      seed=seed)
    fit(net, CountLoss(), train_ds, val_ds, cfg)
    return net

full = train_run(tmp/'full', 2)
train_run(tmp/'part', 1)
seed_everything(123)  # a different global RNG state before resuming must not matter
resumed = train_run(tmp/'part', 2, resume=tmp/'part'/'last.pt')
for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
    assert torch.equal(a, b), k
opt_a = load_checkpoint(tmp/'full'/'last.pt')['optimizer']
opt_b = load_checkpoint(tmp/'part'/'last.pt')['optimizer']
for k in opt_a['state']: assert torch.equal(opt_a['state'][k]['exp_avg_sq'], opt_b['state'][k]['exp_avg_sq'])
test_eq(len(load_checkpoint(tmp/'part'/'last.pt')['history']), 2)
# the weight average and the cosine learning rates continue exactly too
ck_a, ck_b = load_checkpoint(tmp/'full'/'last.pt'), load_checkpoint(tmp/'part'/'last.pt')
for k in ck_a['ema']: assert torch.equal(ck_a['ema'][k], ck_b['ema'][k]), k
test_eq((ck_a['ema_updates'], [r['lr'] for r in ck_a['history']]),
        (ck_b['ema_updates'], [r['lr'] for r in ck_b['history']]))
test_close([r['lr'] for r in ck_a['history']], [3e-2, 3e-4])   # two epochs of a cosine from lr to lr/100
assert not torch.equal(ck_a['ema']['body.0.weight'], ck_a['model']['body.0.weight'])
# while a different data seed gives different weights
assert not torch.equal(full.body[0].weight, train_run(tmp/'seed', 2, seed=8).body[0].weight)


# %% [markdown]
# **A NaN loss** stops training with a message naming the batch, and the last good checkpoint is kept:

# %%
class NaNAfter(nn.Module):
    "Count loss that returns NaN from the `k`-th call on."
    def __init__(self, k):
        super().__init__()
        self.k, self.calls = k, 0
    def forward(self, density, points):
        self.calls += 1
        v = CountLoss()(density, points)
        return v * float('nan') if self.calls > self.k else v

before = load_checkpoint(tmp/'part'/'last.pt')['model']
cfg = TrainConfig(out_dir=tmp/'part', max_epoch=3, batch_size=4, lr=3e-2, quiet=True,
                  resume=str(tmp/'part'/'last.pt'))
test_fail(lambda: fit(TinyNet(), NaNAfter(2), train_ds, val_ds, cfg), contains='epoch 3, step 2')
after = load_checkpoint(tmp/'part'/'last.pt')
test_eq(after['epoch'], 2)
for k in before: assert torch.equal(before[k], after['model'][k])

# %% [markdown]
# **The time budget spans resumes.** Each checkpoint stores the training seconds spent so far; a run resumed with a
# budget that those seconds already exceed stops at its first step and says so, instead of starting the clock anew:

# %%
spent = load_checkpoint(tmp/'full'/'last.pt')['train_time_s']
assert spent > 0, spent
seed_everything(0)
cfg = TrainConfig(out_dir=tmp/'full', max_epoch=6, batch_size=4, lr=3e-2, quiet=True,
                  resume=str(tmp/'full'/'last.pt'), time_budget_s=spent/2, seed=7)
res = fit(TinyNet(), CountLoss(), train_ds, val_ds, cfg)
test_eq((res['stopped_early'], res['epochs']), (True, 3))  # epochs 1-2 before, one step of epoch 3 now
assert res['time_s'] > spent
test_eq(load_checkpoint(tmp/'full'/'last.pt')['epoch'], 3)

# %% [markdown]
# ## Training on synthetic crowds
#
# With the real pieces: the synthetic crowd set of `uotcrowd.data`, MCNN, and the generalized loss. The figure
# is the `curves.png` that `fit` writes; the full experiment behind the README is `uotcrowd demo`.

# %%
from uotcrowd.data import build_datasets
from uotcrowd.models import get_model
from uotcrowd.registry import get_loss
from IPython.display import Image as ShowImage

# %% [markdown]
# Eight short epochs of MCNN + generalized loss on 64 synthetic crowd images of 64×64 px (about 10 s of CPU time):
# the training loss and the training and validation MAE fall from the first epochs on. Sixty-four steps are too few
# for a decaying schedule or a weight average to help, so this run keeps a constant learning rate and no average.

# %%
train_ds, val_ds, test_ds = build_datasets('synthetic', crop_size=64, stride=4, n_train=64, n_val=16,
                                           n_test=16, size=64)
seed_everything(0)
model = get_model('mcnn')
cfg = TrainConfig(out_dir=tmp/'synthetic', max_epoch=8, batch_size=8, lr=1e-3, val_epoch=1, quiet=True,
                  schedule='constant', ema_decay=None, model='mcnn', loss='gl', dataset='synthetic')
res = fit(model, get_loss('gl', stride=model.stride), train_ds, val_ds, cfg)
h = res['history']
print(f"{res['epochs']} epochs in {res['time_s']:.0f}s; val MAE {h[0]['val_mae']:.2f} after epoch 1 -> "
      f"best {res['best_mae']:.2f} (epoch {res['best_epoch'] + 1})")
val_mae = np.array([r['val_mae'] for r in h])
# the mean-count predictor
mean_count = np.mean([train_ds.load(i)[2]['count'] for i in range(len(train_ds))])
mean_count_mae = np.mean([abs(val_ds.load(i)[2]['count'] - mean_count) for i in range(len(val_ds))])
assert np.polyfit(np.arange(len(val_mae)), val_mae, 1)[0] < 0, val_mae              # the trend is down
assert val_mae[-1] <= 0.6 * val_mae[0] and val_mae[-1] <= 0.5 * mean_count_mae, (val_mae, mean_count_mae)
ShowImage(filename=str(tmp/'synthetic'/'curves.png'))

# %% [markdown]
# The best checkpoint on the test images (their localization is measured in [evaluation](09a_evaluate.ipynb)):

# %%
best_model, ckpt = load_model(tmp/'synthetic'/'best.pt')
ev = validate(best_model, test_ds)
{k: round(v, 3) for k, v in ev.items() if k != 'per_image'}

# %%
#| hide
import nbdev
nbdev.nbdev_export()
