# %% [markdown]
# # Training
#
# > `TrainConfig`, `fit` and `validate`: Adam training with best-by-validation checkpoints, exact resume, bf16/fp16 autocast, DDP under `torchrun`, CSV/PNG logs.

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations
import contextlib, csv, json, math, os, platform, random, sys, time, warnings
from dataclasses import dataclass, field, asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm
from uotcrowd.core import (get_device, seed_everything, count_metrics, reuse_host_memory, HostMemory, check_choice,
                           literal_values)
from uotcrowd.data import collate
from uotcrowd.models import get_model
from uotcrowd.plots import plot_curves
from uotcrowd.checkpoints import save_checkpoint, load_checkpoint, config_precision

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
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

# %% [markdown]
# ## Precision
#
# Convolutions take most of a training step, and their arithmetic is chosen by `precision`:
#
# | precision | the model runs in | memory format | gradients |
# |---|---|---|---|
# | `fp32` | float32 | contiguous (NCHW) | plain |
# | `bf16` | bfloat16 autocast (float32's exponent range, 8-bit mantissa) | channels_last (NHWC) | plain |
# | `fp16` | float16 autocast | channels_last | through a `GradScaler` (float16 underflows on small gradients) |
# | `auto` | `bf16` where the device computes it in hardware, `fp32` elsewhere | | |
#
# "In hardware" means CUDA GPUs that support bfloat16 natively (Ampere and later), CPUs with AVX512-BF16 or AMX
# (x86) or the BF16 extension (Arm); elsewhere bfloat16 is emulated and slower than float32. channels_last is the
# layout oneDNN's CPU kernels and cuDNN's tensor-core kernels prefer; it changes no value, only speed.
#
# Whatever the precision, the density map is cast to float32 before the loss and before any count is summed: the
# losses (Sinkhorn iterations, Gaussian smoothing) always compute in float32. Checkpoints record the precision used,
# and `uotcrowd eval` / `predict` use it unless `--precision` says otherwise.
#
# **Bit-reproducible runs: `--precision fp32`** (`TrainConfig(precision='fp32')`). It runs exactly the float32
# kernels of earlier versions, so a run repeats bit for bit on a CPU and matches runs trained before
# `precision` existed. bf16 runs repeat bit for bit on one machine too (exact resume holds), but their weights
# differ from fp32 ones and from machine to machine.
#
# On this project's CPU (Xeon with AVX512-BF16, no AMX), one MCNN step on 4 crops of 256² px with one thread
# (forward, generalized loss on 50 heads per crop, backward, Adam) took 0.91 s in fp32, 0.56 s in fp32 with
# channels_last and 0.32 s in bf16 with channels_last (2.8× faster; one measurement on a lightly loaded machine);
# `uotcrowd bench` measures it on any machine.

# %%
#| export
Precision = Literal['auto', 'fp32', 'bf16', 'fp16']   # 'auto': bf16 where native, else fp32
ResolvedPrecision = Literal['fp32', 'bf16', 'fp16']   # what runs once 'auto' is resolved
PRECISIONS = literal_values(Precision)
_AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}

def _cpu_flags() -> set[str]:
    "Feature flags of the first CPU listed in `/proc/cpuinfo` (empty where that file does not exist)."
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')): return set(line.split(':', 1)[1].split())
    except OSError: pass
    return set()

def is_native(precision:ResolvedPrecision, # 'fp32', 'bf16' or 'fp16'
              device:str|torch.device # the device that computes
             ) -> bool:
    "Whether `device` runs convolutions in `precision` in hardware (not emulated, hence faster than fp32)."
    device = torch.device(device)
    if precision == 'fp32': return True
    if device.type == 'cuda':
        if not torch.cuda.is_available(): return False
        if precision == 'fp16': return True
        with torch.cuda.device(device): return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == 'mps': return precision == 'fp16'
    if device.type != 'cpu' or not torch.backends.mkldnn.is_available(): return False
    if precision == 'fp16': return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported(): return False
    if platform.machine().lower() in ('x86_64', 'amd64', 'x86', 'i686'):  # oneDNN also says yes to plain AVX512 (emulated)
        return bool(_cpu_flags() & {'avx512_bf16', 'amx_bf16'})
    return True  # Arm: oneDNN says yes only with the BF16 extension

def resolve_precision(precision:Precision, # one of `PRECISIONS`
                      device:str|torch.device # the device that computes
                     ) -> ResolvedPrecision: # 'fp32', 'bf16' or 'fp16'
    "The precision to run: `auto` becomes `bf16` where `device` runs it natively, `fp32` elsewhere."
    if check_choice(precision, Precision, 'precision') == 'auto': return 'bf16' if is_native('bf16', device) else 'fp32'
    return precision

def autocast(device:str|torch.device, # the device that computes
             precision:ResolvedPrecision # 'fp32', 'bf16' or 'fp16' (resolved)
            ):
    "`torch.autocast` context for `precision` on `device`; a no-op for fp32."
    if precision == 'fp32': return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])

def memory_format(precision:ResolvedPrecision # 'fp32', 'bf16' or 'fp16' (resolved)
                 ) -> torch.memory_format:
    "channels_last for the reduced precisions, the contiguous layout for fp32."
    return torch.contiguous_format if precision == 'fp32' else torch.channels_last


# %% [markdown]
# `auto` agrees with the hardware check; under autocast a convolution computes in the reduced precision while the
# float32 cast of its output, as the loss receives it, is unchanged in layout and dtype:

# %%
test_eq(resolve_precision('auto', 'cpu'), 'bf16' if is_native('bf16', 'cpu') else 'fp32')
test_eq([resolve_precision(p, 'cpu') for p in ('fp32', 'bf16', 'fp16')], ['fp32', 'bf16', 'fp16'])
test_fail(lambda: resolve_precision('float16', 'cpu'), contains='auto, fp32, bf16, fp16')
_conv, _x = nn.Conv2d(3, 2, 3), torch.randn(1, 3, 8, 8)
for p in ('fp32', 'bf16'):
    with torch.no_grad(), autocast('cpu', p):
        _y = _conv.to(memory_format=memory_format(p))(_x.to(memory_format=memory_format(p)))
    test_eq(_y.dtype, {'fp32': torch.float32, 'bf16': torch.bfloat16}[p])
    test_eq(_x.to(memory_format=memory_format(p)).is_contiguous(memory_format=torch.channels_last), p != 'fp32')
    test_close(_y.float(), _conv(_x), eps=0.05)  # bfloat16 keeps about 3 significant digits
    test_eq(_y.float().dtype, torch.float32)
_conv.to(memory_format=torch.contiguous_format)


# %% [markdown]
# ## Configuration
#
# One dataclass holds every knob. Fields that only describe the run (`model`, `loss`, `dataset`, their keyword
# arguments) are stored in the checkpoint, so `uotcrowd eval` and `uotcrowd predict` can rebuild the model
# from the checkpoint alone. `lr=None` picks the learning rate of the paper for the model family.

# %%
#| export
DEFAULT_LR = {'mcnn': 1e-4, 'effnetlite0': 1e-4}  # others (VGG19, CSRNet): 1e-5
_MODEL_KEYS = {'MCNN': 'mcnn', 'EffNetLiteDensity': 'effnetlite0'}

def default_lr(model:str|nn.Module|None # a model name ('vgg19', 'mcnn', 'effnet-lite0', ...), a network, or None
              ) -> float:
    "Adam learning rate by model family: 1e-4 for MCNN (the paper's code, DM-Count) and EfficientNet-Lite0, 1e-5 otherwise (VGG19, CSRNet)."
    key = _MODEL_KEYS.get(type(model).__name__) if isinstance(model, nn.Module) else str(model or '').lower().replace('-', '').replace('_', '')
    return DEFAULT_LR.get(key, 1e-5)

Schedule = Literal['cosine', 'constant', 'plateau']   # the learning-rate schedules of `fit`

@dataclass
class TrainConfig:
    "Everything `fit` needs besides the model, the loss and the datasets."
    out_dir:str='runs/exp' # folder for checkpoints, logs and plots
    max_epoch:int=100 # number of epochs (the last epoch index is `max_epoch-1`)
    batch_size:int=1 # images per step (per process under DDP)
    crop_size:int=512 # training crop side, recorded for the data pipeline
    lr:float|None=None # Adam learning rate (the peak of the schedule); None: `default_lr` of the model
    backbone_lr_scale:float=1.0 # the parameters under `model.backbone` (a pretrained front-end) train at `lr` times this
    schedule:Schedule='cosine' # 'cosine': warm-up, then cosine decay to `lr * min_lr_ratio` at the last epoch; 'constant'; 'plateau': decays on validation plateaus (`lr_patience`, `patience`)
    warmup_epochs:int=0 # linear warm-up to `lr` over this many epochs
    min_lr_ratio:float=0.01 # `cosine`: the learning rate of the last epoch, as a share of `lr`
    ema_decay:float|None=0.998 # exponential moving average of the weights per step (validated, saved as `ema`, what evaluation loads); None: off
    val_raw:bool=False # with `ema_decay`: also validate the raw weights (logged as `val_mae_raw`)
    weight_decay:float=1e-5 # Adam weight decay
    val_epoch:int=1 # validate every `val_epoch` epochs (and after the last one)
    val_start:int=0 # first epoch at which validation may run
    clip_grad:float|None=None # clip the global gradient norm to this value
    precision:Precision='auto' # 'auto' (bf16 where native, else fp32), 'fp32' (bit-reproducible), 'bf16' or 'fp16'; see Precision
    seed:int=0 # seed of initialisation, data order and augmentation
    deterministic:bool=False # request deterministic torch kernels
    num_workers:int=0 # DataLoader worker processes
    host_memory:HostMemory='reuse' # 'reuse': freed host memory stays in the process for the next step (glibc; see `reuse_host_memory`); 'release'
    device:str='auto' # 'auto', 'cpu', 'cuda', 'cuda:1', ...; under torchrun each process uses its LOCAL_RANK GPU
    resume:str|None=None # checkpoint (`last.pt`) to continue from
    quiet:bool=False # no progress bars and no per-epoch lines
    time_budget_s:float|None=None # stop (validate + checkpoint) once this many seconds of training are spent
    patience:int|None=None # `plateau`: stop once the validation MAE has not improved for this many epochs (None: never)
    lr_patience:int|None=None # `plateau`: multiply the learning rate by `lr_decay` after this many epochs without improvement
    lr_decay:float=0.1 # factor of each learning-rate decay (see `lr_patience`)
    val_window:int=1 # `patience` and `lr_patience` compare the mean of the last this-many validation MAEs
    plateau_start:int=0 # `patience` and `lr_patience` ignore the first this-many epochs (a warm-up at `lr`)
    max_steps:int|None=None # at most this many steps per epoch (smoke tests)
    model:str|None=None # model name for `uotcrowd.models.get_model`
    model_kwargs:dict=field(default_factory=dict) # its keyword arguments
    loss:str|None=None # loss name for `uotcrowd.registry.get_loss`
    loss_kwargs:dict=field(default_factory=dict) # its keyword arguments
    dataset:str|None=None # dataset name, for the record
    data_dir:str|None=None # dataset folder, for the record
    data_kwargs:dict=field(default_factory=dict) # dataset arguments (e.g. synthetic `n`, `size`), for the record

    def __post_init__(self):
        if self.lr is None and self.model is not None: self.lr = default_lr(self.model)  # otherwise `fit` asks the network
        check_choice(self.schedule, Schedule, 'schedule')
        if self.schedule != 'plateau' and (self.patience is not None or self.lr_patience is not None):
            raise ValueError(f"patience and lr_patience need schedule='plateau' (got schedule={self.schedule!r})")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.warmup_epochs < 0: raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.max_epoch < 1: raise ValueError(f"max_epoch must be >= 1, got {self.max_epoch}")
        if self.batch_size < 1: raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.val_epoch < 1: raise ValueError(f"val_epoch must be >= 1, got {self.val_epoch}")
        if self.plateau_start < 0: raise ValueError(f"plateau_start must be >= 0, got {self.plateau_start}")
        check_choice(self.precision, Precision, 'precision')
        check_choice(self.host_memory, HostMemory, 'host_memory')
        self.out_dir = str(self.out_dir)
        if self.resume is not None: self.resume = str(self.resume)

    def to_dict(self) -> dict:
        "The config as a plain dict (safe for `torch.load(weights_only=True)` and JSON)."
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d:dict) -> 'TrainConfig':
        "Rebuild a config from `to_dict()`, ignoring unknown keys (configs from newer versions)."
        names = {f.name for f in fields(cls)}
        d = dict(d)
        d['precision'] = config_precision(d)  # older configs: the `amp` flag
        return cls(**{k: v for k, v in d.items() if k in names})


# %%
test_eq(TrainConfig(model='mcnn').lr, 1e-4)
test_eq(TrainConfig(model='vgg19').lr, 1e-5)
test_eq(TrainConfig(model='csrnet', lr=3e-4).lr, 3e-4)
test_eq(TrainConfig(model='effnet-lite0').lr, 1e-4)
test_eq(TrainConfig().lr, None)   # resolved by `fit` from the network: MCNN gets 1e-4 there too
test_eq([default_lr(m) for m in (nn.Conv2d(3, 1, 1), get_model('mcnn'))], [1e-5, 1e-4])
test_fail(lambda: TrainConfig(patience=5), contains="patience and lr_patience need schedule='plateau'")
test_fail(lambda: TrainConfig(schedule='step'), contains='schedule must be one of cosine, constant, plateau')
test_fail(lambda: TrainConfig(ema_decay=1.0), contains='ema_decay must be in [0, 1)')
test_eq(TrainConfig().weight_decay, 1e-5)
cfg = TrainConfig(out_dir=Path('x'), model='mcnn', loss_kwargs={'eps': 0.01})
test_eq(TrainConfig.from_dict(cfg.to_dict()), cfg)
test_eq(TrainConfig.from_dict({**cfg.to_dict(), 'unknown_key': 1}), cfg)
test_fail(lambda: TrainConfig(val_epoch=0), contains='val_epoch')
test_fail(lambda: TrainConfig(plateau_start=-1), contains='plateau_start must be >= 0, got -1')
test_fail(lambda: TrainConfig(precision='half'), contains='precision must be one of auto, fp32')
# configs written before `precision` existed trained in float32, or float16 with `amp`
test_eq([TrainConfig.from_dict({'amp': a}).precision for a in (False, True)], ['fp32', 'fp16'])
test_eq(TrainConfig().precision, 'auto')
test_eq(TrainConfig().host_memory, 'reuse')
test_fail(lambda: TrainConfig(host_memory='cache'), contains='host_memory must be one of reuse, release')


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
    state = {'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64), 'gauss': gauss},
             'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached': float(cached)},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available(): state['cuda'] = torch.cuda.get_rng_state_all()
    return state

def set_rng_state(state:dict # from `rng_state`
                 ):
    "Restore the generator states saved by `rng_state`."
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss']))
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


# %%
seed_everything(5); saved = rng_state()
a = (random.random(), np.random.rand(), torch.rand(1).item())
random.seed(1); np.random.seed(1); torch.manual_seed(1)
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
    "A 31-bit seed derived from `(seed, epoch, rank)` with NumPy's `SeedSequence` (well mixed, order-sensitive)."
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
                     ) -> tuple[int, int, torch.device, bool]: # (rank, world size, device, whether we created the group)
    "Join the process group when launched by `torchrun` (`WORLD_SIZE` > 1); otherwise return rank 0 of 1."
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if dist.is_available() and dist.is_initialized():
        dev = get_device(device)
        if dev.type == 'cuda': dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        return dist.get_rank(), dist.get_world_size(), dev, False
    if world <= 1: return 0, 1, get_device(device), False
    dev = get_device(device)
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))); torch.cuda.set_device(dev)
    dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size(), dev, True

def _gather(obj, world:int) -> list:
    "Every rank's `obj`, in rank order (just `[obj]` without DDP)."
    if world == 1: return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# %%
test_eq(setup_distributed('cpu')[:3], (0, 1, torch.device('cpu')))


# %% [markdown]
# ## Validation
#
# Counting is validated on full images (padded to a multiple of the stride by the dataset), one image at a time
# because their sizes differ: the count MAE, RMSE and NAE of `uotcrowd.core.count_metrics`, the MAE choosing the best
# checkpoint. Images whose count is unknown (`meta['count'] == -1`, e.g. NWPU's test set) get predictions but no
# metrics. `precision` runs the model as in training (autocast and channels_last for `bf16`/`fp16`, see Precision;
# the density is cast to float32 before anything is summed); `validate` defaults to `fp32`. Under DDP each rank
# predicts a share of the images and every rank gets all the rows. `each(row, density, points)` may add to the row of
# every image: `uotcrowd.evaluate.evaluate` adds the located points that way.

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

def write_csv(rows:Sequence[dict], # one dict per line
              path:str|Path, # destination (written atomically)
              columns:Sequence[str]|None=None # column order; default: keys of the first row
             ) -> Path:
    "Write dicts as a CSV file with a header (missing values left empty)."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        w.writeheader()
        for r in rows: w.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in columns})
    os.replace(tmp, path)
    return path


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
    was_training = model.training; model.eval()
    try: rows = predict_counts(model, ds, device, range(rank, len(ds), world), precision, quiet or rank != 0, each)
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
# The test cells use a tiny in-memory dataset with the `(image, points, meta)` contract, a two-layer net and a
# plain count loss. Evaluation of a model that predicts a constant density $c$ per pixel on $h\times w$ maps must
# give MAE $=\frac1n\sum_i|c\,hw - N_i|$:

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
            img = img.flip(-1); pts = pts.clone(); pts[:, 0] = img.shape[-1] - 1 - pts[:, 0]
        return img, pts, meta

class TinyNet(nn.Module):
    stride = 4
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Conv2d(8, 1, 1))
    def forward(self, x): return nn.functional.softplus(self.body(x)) * 0.01

class CountLoss(nn.Module):
    def forward(self, density, points):
        return torch.stack([(d.sum() - len(p))**2 for d, p in zip(density, points)]).mean()


# %%
class ConstNet(nn.Module):
    stride = 4
    def __init__(self, c): super().__init__(); self.c = nn.Parameter(torch.tensor(c))
    def forward(self, x): return self.c.expand(x.shape[0], 1, x.shape[2] // 4, x.shape[3] // 4)

ds = TinyCrowd(10)
gt = torch.tensor([float(m['count']) for _, _, m in ds.items])
res = validate(ConstNet(0.05), ds, 'cpu')
pred = torch.full_like(gt, 0.05 * 64)
test_close(res['mae'], (pred - gt).abs().mean().item(), eps=1e-5)
test_close(res['rmse'], (pred - gt).pow(2).mean().sqrt().item(), eps=1e-5)
test_eq(res['n'], 10); test_eq([r['name'] for r in res['per_image']], [f'img{i:02d}' for i in range(10)])

# %% [markdown]
# In bf16 the counts of a small convolutional net stay within 1 % of the float32 ones:

# %%
seed_everything(0); _net = TinyNet()
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
LOG_COLUMNS = ['epoch', 'train_loss', 'train_mae', 'lr', 'time_s', 'val_mae', 'val_rmse', 'val_nae', 'val_mae_raw']


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
    if not bool(torch.isfinite(density).all()): return density.new_full((), float('nan'), dtype=torch.float32)
    return loss(density.float(), points)


# %%
class _Count(nn.Module):
    def forward(self, density, points): return (density.sum((1, 2, 3)) - torch.tensor([float(len(p)) for p in points])).abs().mean()
d = torch.ones(2, 1, 4, 4, dtype=torch.bfloat16)
test_eq(step_loss(_Count(), d, [torch.zeros(3, 2), torch.zeros(20, 2)]).item(), (13 + 4) / 2)  # |16-3|, |16-20|
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
    flags = torch.tensor([float(not bool(torch.isfinite(value.detach()))), float(over_budget)], dtype=torch.float64)
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
    kept = f"the last good checkpoint is {last}" if last.exists() else "no epoch had finished, so no checkpoint was written"
    return (f"non-finite loss ({float(value)}) at epoch {epoch + 1}, step {step} on rank {rank}, images {names}; "
            f"training stopped, {kept} (lower --lr, or use --clip-grad)")


# %%
with tempfile.TemporaryDirectory() as d:
    msg = nonfinite_message(torch.tensor(float('nan')), 2, 5, 0, [{'name': 'IMG_1.jpg'}], Path(d) / 'last.pt')
    assert 'epoch 3, step 5' in msg and 'IMG_1.jpg' in msg and 'no checkpoint was written' in msg
    (Path(d) / 'last.pt').write_bytes(b'x')
    assert f"last good checkpoint is {Path(d) / 'last.pt'}" in nonfinite_message(1., 0, 0, 0, [], Path(d) / 'last.pt')


# %%
#| export
def load_weights(model:nn.Module, # the network to fill
                 ckpt:dict, # a checkpoint dict (`load_checkpoint`)
                 path:str|Path # the file it came from, for the message
                ):
    "Load `ckpt['model']` into `model`; a mismatch is one `ValueError` line naming the file and the difference."
    try: model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        own, theirs = model.state_dict(), ckpt['model']
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        shapes = [k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape]
        what = ckpt.get('model_name') or ckpt.get('config', {}).get('model') or 'another model'
        detail = '; '.join(x for x in (f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else '',
                                       f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else '',
                                       f"{len(shapes)} shape mismatches (e.g. {sorted(shapes)[0]})" if shapes else '') if x)
        raise ValueError(f"{path} holds weights of {what} that do not fit this {type(model).__name__}: {detail or e}") from None


# %%
_small, _big = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 8, 3))
load_weights(_small, {'model': nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict()}, 'a.pt')
test_fail(lambda: load_weights(_small, {'model': _big.state_dict(), 'model_name': 'vgg19'}, 'b.pt'),
          contains='b.pt holds weights of vgg19 that do not fit this Sequential: 2 shape mismatches')
test_fail(lambda: load_weights(_small, {'model': {'x.weight': torch.zeros(1)}}, 'c.pt'), contains='2 missing keys (e.g. 0.bias); 1 unexpected')


# %% [markdown]
# ## Plateaus: learning-rate decay and early stopping
#
# "Train until the validation MAE stops improving" needs two numbers: after `lr_patience` epochs without a better
# validation MAE the learning rate is multiplied by `lr_decay` (and the count starts again), and after `patience`
# epochs without one the run stops. On a small validation set the MAE jumps from one validation to the next, and one
# lucky value would stop a run that is still improving: `val_window` compares the mean of the last few validations
# instead. Early in training from scratch the validation MAE can swing by tens of people between validations, and
# the counts would run out inside that swing: `plateau_start` lets the rules watch only the epochs after a warm-up
# at the first learning rate. All of it is read off the log (`history`) alone, so a resumed run continues with
# exactly the learning rate and counters it had, and nothing but the log needs to be stored.

# %%
#| export
def plateau_schedule(history:Sequence[dict], # rows of `log.csv` so far (`val_mae` None where not validated)
                     cfg:TrainConfig # `lr`, `lr_patience`, `lr_decay`, `patience`, `val_window`, `plateau_start`
                    ) -> tuple[float, bool]: # learning rate of the next epoch, whether to stop
    "The learning rate for the next epoch and whether the patience is spent, from the log alone."
    lr, best, since_best, since_decay, maes = cfg.lr, math.inf, 0, 0, []
    for row in history[cfg.plateau_start:]:
        since_best += 1; since_decay += 1
        if row.get('val_mae') is not None:
            maes.append(row['val_mae'])
            if len(maes) >= cfg.val_window:  # only full windows: a first lucky validation is no plateau's reference
                smooth = sum(maes[-cfg.val_window:]) / cfg.val_window
                if smooth < best: best, since_best = smooth, 0
        if cfg.lr_patience is not None and min(since_best, since_decay) >= cfg.lr_patience:
            lr, since_decay = lr * cfg.lr_decay, 0
    return lr, cfg.patience is not None and since_best >= cfg.patience


# %%
_rows = lambda maes: [{'epoch': e, 'val_mae': m} for e, m in enumerate(maes)]
_cfg = TrainConfig(schedule='plateau', lr=1.0, lr_patience=2, lr_decay=0.5, patience=4)
test_eq(plateau_schedule([], _cfg), (1.0, False))
test_eq(plateau_schedule(_rows([5, 4, 3]), _cfg), (1.0, False))            # improving
test_eq(plateau_schedule(_rows([5, 4, 4, 4]), _cfg), (0.5, False))         # 2 epochs without improvement: halve
test_eq(plateau_schedule(_rows([5, 4, 4, 4, 4, 4]), _cfg), (0.25, True))   # 2 more: halve again; 4 in all: stop
test_eq(plateau_schedule(_rows([5, 4, 4, 4, 3, 3]), _cfg), (0.5, False))   # an improvement restarts both counts
test_eq(plateau_schedule(_rows([5, None, None, 4]), _cfg), (0.5, False))   # epochs without validation count too
test_eq(plateau_schedule(_rows([5, 4, 4, 4]), TrainConfig(lr=1.0)), (1.0, False))  # defaults: constant, no stop
# a noisy validation MAE: one lucky epoch (2) would end the run with a window of 1; means over 3 keep improving
_noisy = [9, 8, 2, 7, 6, 5.5, 5, 4.5]
test_eq(plateau_schedule(_rows(_noisy), TrainConfig(schedule='plateau', lr=1.0, patience=5))[1], True)
test_eq(plateau_schedule(_rows(_noisy), TrainConfig(schedule='plateau', lr=1.0, patience=5, val_window=3)), (1.0, False))
# only full windows count: with a window of 3 the lucky first value (2) is never a "best" on its own
# (a partial window would make mean([2]) = 2 the best and stop the run; full windows: 5.33, 6.33, 5, 5, best 5 at epoch 4)
test_eq(plateau_schedule(_rows([2, 9, 5, 5, 5, 5]), TrainConfig(schedule='plateau', lr=1.0, patience=4, val_window=3)), (1.0, False))
test_eq(plateau_schedule(_rows([2, 9, 5, 5, 5, 5]), TrainConfig(schedule='plateau', lr=1.0, patience=4, val_window=1)), (1.0, True))
# a warm-up: the lucky 2 at epoch 2 is not watched, so the later 7, 6, 5.5, ... are improvements, not a plateau
test_eq(plateau_schedule(_rows(_noisy), TrainConfig(schedule='plateau', lr=1.0, patience=5, plateau_start=3)), (1.0, False))
test_eq(plateau_schedule(_rows([9, 8, 2, 7, 7, 7, 7]), TrainConfig(schedule='plateau', lr=1.0, lr_patience=2, lr_decay=0.5, plateau_start=3)),
        (0.5, False))  # watched from epoch 3: best 7, two epochs without a better one, then a halving
test_eq(plateau_schedule(_rows([9, 8, 2, 7, 7]), TrainConfig(schedule='plateau', lr=1.0, lr_patience=2, plateau_start=10)), (1.0, False))  # still warming up


# %% [markdown]
# ## Fixed schedules and the weight average
#
# On a 40- to 60-image validation set the MAE has a standard error of 5-10 people, and the ShanghaiTech B study
# showed what follows when single validations steer a run: the first validation counted as the best of a window,
# learning rates were cut inside the early swing, and `best.pt` was the luckiest of a hundred draws, up to 11 people
# below its neighbours. The default protocol lets no validation decide anything:
#
# - **a fixed schedule** (`schedule='cosine'`): a linear warm-up over `warmup_epochs`, then a cosine decay from `lr`
#   to `lr * min_lr_ratio` at the last epoch, a function of the epoch alone, so a resumed run continues it exactly;
# - **an exponential moving average of the weights** (`ema_decay`, per step, with the usual short-run correction
#   $d_t = \min(d, \frac{1+t}{10+t})$): $\bar\theta \leftarrow d_t\,\bar\theta + (1-d_t)\,\theta$ after every
#   Adam step. The average is what is validated, saved (`ema` in the checkpoints) and loaded for evaluation;
# - **the final weights scored**: the run's result is the average after its last epoch (`last.pt`), whatever the
#   validations along the way said. The validations are a learning curve, not a selector.
#
# `schedule='plateau'` keeps the older rules (decay and stop on plateaus of the mean of `val_window` validations,
# full windows only, after `plateau_start` epochs), and `constant` a fixed learning rate.

# %%
#| export
def warmup_factor(cfg:TrainConfig, # `warmup_epochs`
                  epoch:int # epoch index
                 ) -> float:
    "Share of the learning rate reached at `epoch` by the linear warm-up (1 after it)."
    return (epoch + 1) / cfg.warmup_epochs if epoch < cfg.warmup_epochs else 1.

def scheduled_lr(cfg:TrainConfig, # `lr`, `schedule`, `warmup_epochs`, `min_lr_ratio`, `max_epoch`
                 epoch:int # epoch index
                ) -> float:
    "Learning rate of `epoch` under the fixed part of the schedule (warm-up, then cosine or constant)."
    if epoch < cfg.warmup_epochs or cfg.schedule != 'cosine': return cfg.lr * warmup_factor(cfg, epoch)
    t = (epoch - cfg.warmup_epochs) / max(1, cfg.max_epoch - 1 - cfg.warmup_epochs)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.))))

def epoch_lr(history:Sequence[dict], # rows of `log.csv` so far: the next epoch is `len(history)`
             cfg:TrainConfig # the schedule
            ) -> float:
    "Learning rate of the next epoch: the fixed schedule, or the plateau rules' decays."
    epoch = len(history)
    if cfg.schedule != 'plateau': return scheduled_lr(cfg, epoch)
    return plateau_schedule(history, cfg)[0] * warmup_factor(cfg, epoch)

# %%
_c = TrainConfig(lr=1.0, max_epoch=12, warmup_epochs=1, min_lr_ratio=0.0)
test_close([scheduled_lr(_c, e) for e in (0, 1, 6, 11)], [1.0, 1.0, 0.5, 0.0])   # cos(0), cos(pi/2), cos(pi)
test_close([scheduled_lr(TrainConfig(lr=2.0, warmup_epochs=4), e) for e in range(5)], [0.5, 1.0, 1.5, 2.0, 2.0])
test_close(scheduled_lr(TrainConfig(lr=1.0, max_epoch=5, min_lr_ratio=0.1), 4), 0.1)
test_eq([scheduled_lr(TrainConfig(lr=0.3, schedule='constant'), e) for e in (0, 50)], [0.3, 0.3])
test_eq(epoch_lr(_rows([5, 4, 4, 4]), TrainConfig(schedule='plateau', lr=1.0, lr_patience=2, lr_decay=0.5)), 0.5)
test_close(epoch_lr([{}] * 6, _c), 0.5)

# %% [markdown]
# `WeightAverage` keeps the average as a copy of the network (so it can be validated like one) and updates every
# floating-point tensor of its state in place; integer buffers (batch-norm counters) are copied.

# %%
#| export
class WeightAverage:
    "Exponential moving average of a network's weights and buffers, updated after each optimizer step."
    def __init__(self, model:nn.Module, # the network being trained
                 decay:float # per-step decay `d` (0.998: a horizon of about 500 steps)
                ):
        import copy
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters(): p.requires_grad_(False)
        self._pairs = None  # (average tensor, network tensor) of each state entry, paired at the first update

    @torch.no_grad()
    def update(self, model:nn.Module):
        "One step: average <- d_t * average + (1 - d_t) * weights, with d_t = min(d, (1+t)/(10+t))."
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._pairs is None or self._pairs[0] is not model:  # state tensors are updated in place: pair them once
            self._pairs = (model, list(zip(self.module.state_dict().values(), model.state_dict().values())))
        for avg, new in self._pairs[1]:
            if avg.is_floating_point(): avg.lerp_(new.detach().to(avg.dtype), 1 - d)
            else: avg.copy_(new)

    def state_dict(self) -> dict: return self.module.state_dict()
    def load_state_dict(self, state:dict, updates:int):
        self.module.load_state_dict(state); self.updates = int(updates)

# %%
_w = nn.Linear(1, 1, bias=False); nn.init.constant_(_w.weight, 0.)
_avg = WeightAverage(_w, decay=0.5)
_want = 0.
for t in range(1, 6):
    nn.init.constant_(_w.weight, float(t))
    _avg.update(_w)
    d = min(0.5, (1 + t) / (10 + t)); _want = d * _want + (1 - d) * t   # the recursion written out
    test_close(_avg.module.weight.item(), _want, eps=1e-6)
test_eq((_avg.updates, _avg.module.weight.requires_grad), (5, False))
test_close(_avg.module.weight.item(), 4.40020, eps=1e-4)  # by hand: d = 2/11, 3/12, 4/13, 5/14, 6/15

# %% [markdown]
# ## The training loop
#
# `fit` runs epochs `start .. max_epoch-1`. Each step computes the density in the configured precision (autocast
# and channels_last for bf16/fp16, see Precision), the loss in float32, checks that the loss is finite,
# back-propagates (through the `GradScaler` in fp16), optionally clips the gradient norm and takes an Adam step. A non-finite loss stops the run with a
# `FloatingPointError` naming the epoch, the step and the images of the batch; the checkpoints of the last
# finished epoch stay untouched. After each epoch (rank 0):
#
# - `last.pt`: full state for `resume`; `best.pt`: the same for the best validation MAE so far;
# - `log.csv` and `curves.png`.
#
# On the host, `fit` runs inside `reuse_host_memory(cfg.host_memory)` (see Core): with the default `'reuse'`, the
# memory a step frees is kept for the next step instead of being handed back and faulted in again, which takes
# 11 % off an MCNN step in float32 and 17 % in bfloat16 (B=4, 256², one thread, each case in a new process;
# `uotcrowd bench`), and 31 % off a float32 evaluation of a 1024×768 image; resident memory stays at the run's peak. `host_memory='release'` keeps the C library's defaults.
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
    if hasattr(ds, 'set_epoch'): ds.set_epoch(epoch)  # datasets with their own augmentation streams (`aug_seed`)
    g = torch.Generator(); g.manual_seed(epoch_seed(cfg.seed, epoch, rank))
    sampler = None
    if world > 1:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=g,
                      num_workers=cfg.num_workers, collate_fn=collate, pin_memory=device.type == 'cuda',
                      drop_last=False, persistent_workers=False)

def _log(msg:str, cfg:TrainConfig, rank:int):
    if rank == 0 and not cfg.quiet: print(msg, flush=True)


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
        warnings.warn(f"{device} has no native {precision}: it is emulated and slower than fp32 (--precision auto picks the fast one)")
    model = model.to(device, memory_format=memory_format(precision)); loss = loss.to(device)
    optimizer = torch.optim.Adam(param_groups(model, cfg.backbone_lr_scale), lr=cfg.lr, weight_decay=cfg.weight_decay)
    set_lr(optimizer, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    return model, loss, optimizer, scaler, precision

def param_groups(model:nn.Module, # the network
                 backbone_lr_scale:float=1.0 # learning-rate factor of the parameters under `model.backbone`
                ) -> list[dict]:
    "Adam parameter groups, each with its `lr_scale`: the pretrained backbone's apart where its factor is not 1."
    backbone = getattr(model, 'backbone', None)
    if backbone_lr_scale == 1 or not isinstance(backbone, nn.Module): return [{'params': list(model.parameters()), 'lr_scale': 1.}]
    ids = {id(p) for p in backbone.parameters()}
    return [{'params': [p for p in model.parameters() if id(p) not in ids], 'lr_scale': 1.},
            {'params': list(backbone.parameters()), 'lr_scale': float(backbone_lr_scale)}]

def set_lr(optimizer, # Adam from `training_state`
           lr:float # the schedule's learning rate
          ):
    "Set every group's learning rate to `lr` times its `lr_scale`."
    for g in optimizer.param_groups: g['lr'] = lr * g.get('lr_scale', 1.)

# %%
_m, _l, _opt, _sc, _p = training_state(TinyNet(), CountLoss(), TrainConfig(lr=0.5, precision='fp32'), torch.device('cpu'))
test_eq((_p, _sc.is_enabled(), _opt.param_groups[0]['lr'], _opt.param_groups[0]['weight_decay']), ('fp32', False, 0.5, 1e-5))
# a network with a pretrained `backbone`: its parameters form the second group, at lr times the factor
class _WithBackbone(nn.Module):
    def __init__(self): super().__init__(); self.backbone, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 1, 1)
_wb = _WithBackbone()
_o = training_state(_wb, CountLoss(), TrainConfig(lr=1e-3, backbone_lr_scale=0.3, precision='fp32'), torch.device('cpu'))[2]
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
    load_weights(model, ckpt, cfg.resume); optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'): scaler.load_state_dict(ckpt['scaler'])
    if average is not None:
        if 'ema' in ckpt: average.load_state_dict(ckpt['ema'], ckpt.get('ema_updates', 0))
        else: average.module.load_state_dict(model.state_dict())  # a run saved without an average starts one here
    state.update(start=int(ckpt['epoch']), best_mae=float(ckpt['best_mae']), best_epoch=int(ckpt['best_epoch']),
                 history=list(ckpt.get('history', [])), spent=float(ckpt.get('train_time_s', 0.)))
    if rank == 0 and 'rng' in ckpt: set_rng_state(ckpt['rng'])
    set_lr(optimizer, epoch_lr(state['history'], cfg))
    return state

# %%
_tmp = Path(tempfile.mkdtemp())
test_eq(resume_state(TrainConfig(), _m, _opt, _sc), dict(start=0, best_mae=math.inf, best_epoch=-1, history=[], spent=0.))
_hist = [dict(epoch=e, val_mae=v) for e, v in enumerate([3., 2., 2.5, 2.4])]
_src = TinyNet()
save_checkpoint({'model': _src.state_dict(), 'optimizer': _opt.state_dict(), 'epoch': 4, 'best_mae': 2., 'best_epoch': 1,
                 'history': _hist, 'train_time_s': 7.5}, _tmp/'last.pt')
_net = TinyNet()
_st = resume_state(TrainConfig(resume=_tmp/'last.pt', lr=1., schedule='plateau', lr_patience=2, lr_decay=0.5), _net, _opt, _sc)
test_eq(_st, dict(start=4, best_mae=2., best_epoch=1, history=_hist, spent=7.5))
test_eq(_opt.param_groups[0]['lr'], 0.5)                         # decayed once: two epochs without improvement
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
                elapsed:Callable[[], float]=lambda: 0., # training seconds spent so far (the time budget's clock)
                out:Path|None=None, # the run's folder, named in the error message of a non-finite loss
                average:WeightAverage|None=None # updated after every step
               ) -> tuple[dict, bool]: # log row (epoch, train_loss, train_mae, lr, time_s), whether the budget stopped it
    "Train one epoch; returns its log row and whether the time budget stopped it."
    t0 = time.perf_counter()
    seed_everything(epoch_seed(cfg.seed, epoch, rank))
    loader = _train_loader(train_ds, cfg, epoch, rank, world, device)
    fmt, show = memory_format(precision), rank == 0 and not cfg.quiet and sys.stderr.isatty()
    net.train()
    loss_sum, abs_sum, n_img, stopped = torch.zeros((), dtype=torch.float64), 0., 0, False
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.max_epoch}', disable=not show, leave=False, dynamic_ncols=True)
    for step, (images, points, metas) in enumerate(bar):
        if cfg.max_steps is not None and step >= cfg.max_steps: break
        images = images.to(device, non_blocking=True, memory_format=fmt); points = [p.to(device) for p in points]
        with autocast(device, precision):
            density = net(images)  # the loss and the counts below get it as float32
        value = step_loss(loss, density, points)
        bad, stopped = step_flags(value, rank == 0 and cfg.time_budget_s is not None and elapsed() > cfg.time_budget_s, world)
        if bad: raise FloatingPointError(nonfinite_message(value.detach(), epoch, step, rank, metas, Path(out or cfg.out_dir) / 'last.pt'))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(value).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        scaler.step(optimizer); scaler.update()
        if average is not None: average.update(net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net)
        with torch.no_grad():
            loss_sum += value.detach().double().cpu() * len(points); n_img += len(points)
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
seed_everything(0); _net = TinyNet()
_m, _l, _opt, _sc, _p = training_state(_net, CountLoss(), TrainConfig(lr=0.), torch.device('cpu'))
_row, _stopped = train_epoch(_m, _l, _opt, _sc, _ds, TrainConfig(lr=0., batch_size=4, quiet=True), 0, 'fp32', torch.device('cpu'))
with torch.no_grad(): _err = torch.tensor([float(_net(im[None]).sum()) - len(p) for im, p, _ in _ds])
test_close(_row['train_loss'], _err.square().mean().item(), eps=1e-5); test_close(_row['train_mae'], _err.abs().mean().item(), eps=1e-5)
test_eq((_row['epoch'], _row['lr'], _stopped), (0, 0., False))
_row, _stopped = train_epoch(_m, _l, _opt, _sc, _ds, TrainConfig(batch_size=4, quiet=True, time_budget_s=1.), 0, 'fp32',
                             torch.device('cpu'), elapsed=lambda: 2.)
test_eq(_stopped, True)                                           # after its first step
test_fail(lambda: train_epoch(_m, lambda d, p: d.sum() * float('nan'), _opt, _sc, _ds, TrainConfig(batch_size=4, quiet=True),
                              0, 'fp32', torch.device('cpu')), contains='non-finite loss')

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

def epoch_message(row:dict, # the epoch's log row
                  cfg:TrainConfig, # `max_epoch`, `time_budget_s`
                  improved:bool, # a new best validation MAE
                  elapsed:float # training seconds so far
                 ) -> str:
    "The line printed after an epoch."
    val = '' if row['val_mae'] is None else f"  val MAE {row['val_mae']:.3f} RMSE {row['val_rmse']:.3f}" + (' *' if improved else '')
    when = f"epoch {row['epoch'] + 1}/{cfg.max_epoch}" if cfg.time_budget_s is None else \
           f"epoch {row['epoch'] + 1} ({elapsed:.0f}/{cfg.time_budget_s:g}s)"
    return f"{when}  loss {row['train_loss']:.4g}  train MAE {row['train_mae']:.3f}{val}  ({row['time_s']:.1f}s)"

# %%
_cfg = TrainConfig(max_epoch=10, val_epoch=3, val_start=4)
test_eq([e for e in range(10) if validation_due(_cfg, e)], [5, 8, 9])
assert validation_due(_cfg, 4, stopped=True) and not validation_due(_cfg, 3, stopped=True)
_rows = [dict(epoch=0, train_loss=2., train_mae=1.5, lr=1e-3, time_s=0.5, val_mae=1.25, val_rmse=2., val_nae=0.1)]
write_epoch(_tmp/'run', {'model': {}, 'epoch': 1}, _rows, best=False)
test_eq(sorted(p.name for p in (_tmp/'run').iterdir()), ['curves.png', 'last.pt', 'log.csv'])
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
    "Train `model` with Adam; writes `last.pt`, `best.pt`, `log.csv`, `curves.png` to `cfg.out_dir`; returns a summary dict."
    cfg = cfg or TrainConfig()
    rank, world, device, own_group = setup_distributed(cfg.device)
    try:
        with reuse_host_memory(cfg.host_memory): summary = _fit(model, loss, train_ds, val_ds, cfg, rank, world, device)
        if own_group and world > 1: dist.barrier()  # no rank tears gloo down while another still talks to it
        return summary
    finally:
        if own_group: dist.destroy_process_group()

def _fit(model, loss, train_ds, val_ds, cfg, rank, world, device):
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    if rank == 0: out.mkdir(parents=True, exist_ok=True)
    if cfg.deterministic: seed_everything(cfg.seed, deterministic=True)
    if cfg.lr is None: cfg = replace(cfg, lr=default_lr(model))  # the network's family decides, as on the command line
    model, loss, optimizer, scaler, precision = training_state(model, loss, cfg, device)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    st = resume_state(cfg, model, optimizer, scaler, rank, average)
    if not cfg.resume and cfg.seed is not None and not cfg.deterministic: seed_everything(cfg.seed)
    if cfg.resume: _log(f"resumed from {cfg.resume} after epoch {st['start']} (best val MAE {st['best_mae']:.3f})", cfg, rank)
    best_mae, best_epoch, history = st['best_mae'], st['best_epoch'], st['history']
    elapsed = lambda: st['spent'] + time.perf_counter() - t_start  # resumed segments included
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
          if world > 1 else model
    meta = {'model_name': cfg.model, 'model_kwargs': dict(cfg.model_kwargs), 'loss_name': cfg.loss,
            'loss_kwargs': dict(cfg.loss_kwargs), 'stride': int(getattr(model, 'stride', 8)), 'dataset': cfg.dataset,
            'world_size': world, 'torch_version': str(torch.__version__), 'precision': precision}
    show, stopped, epoch = rank == 0 and not cfg.quiet and sys.stderr.isatty(), False, st['start'] - 1
    for epoch in range(st['start'], cfg.max_epoch):
        if cfg.schedule == 'plateau' and plateau_schedule(history, cfg)[1]: epoch -= 1; break  # patience already spent
        set_lr(optimizer, epoch_lr(history, cfg))
        row, stopped = train_epoch(net, loss, optimizer, scaler, train_ds, cfg, epoch, precision, device, rank, world,
                                   elapsed, out, average)
        row.update(val_mae=None, val_rmse=None, val_nae=None, val_mae_raw=None)
        scored = average.module if average is not None else model  # the weights that are validated and evaluated
        if val_ds is not None and len(val_ds) and validation_due(cfg, epoch, stopped):
            res = validate(scored, val_ds, device, precision=precision, quiet=not show, rank=rank, world=world)
            row.update(val_mae=res.get('mae'), val_rmse=res.get('rmse'), val_nae=res.get('nae'))
            if average is not None and cfg.val_raw:
                row['val_mae_raw'] = validate(model, val_ds, device, precision=precision, quiet=True, rank=rank, world=world).get('mae')
        history.append(row)
        improved = row['val_mae'] is not None and row['val_mae'] < best_mae
        if improved: best_mae, best_epoch = row['val_mae'], epoch
        patience_spent = cfg.schedule == 'plateau' and plateau_schedule(history, cfg)[1]
        if rank == 0:
            state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                     'epoch': epoch + 1, 'best_mae': best_mae, 'best_epoch': best_epoch, 'history': history,
                     'config': cfg.to_dict(), 'rng': rng_state(), 'train_time_s': elapsed(), **meta}
            if average is not None: state.update(ema=average.state_dict(), ema_updates=average.updates)
            write_epoch(out, state, history, improved or (val_ds is None and not math.isfinite(best_mae)))
            _log(epoch_message(row, cfg, improved, elapsed()), cfg, rank)
        if world > 1: dist.barrier()
        if stopped:
            _log(f"time budget of {cfg.time_budget_s:g}s spent: stopped during epoch {epoch + 1}", cfg, rank); break
        if patience_spent:
            _log(f"no validation improvement for {cfg.patience} epochs: stopped after epoch {epoch + 1}", cfg, rank); break
    return {'out_dir': str(out), 'last': str(out / 'last.pt'),
            'best': str(out / 'best.pt') if (out / 'best.pt').exists() else None,
            'best_mae': best_mae, 'best_epoch': best_epoch, 'epochs': epoch + 1, 'history': history,
            'stopped_early': stopped, 'converged': cfg.schedule == 'plateau' and plateau_schedule(history, cfg)[1], 'time_s': elapsed(),
            'rank': rank, 'world': world}


# %% [markdown]
# A short run on the tiny dataset: the count loss falls, the files are written and `best.pt` holds the epoch
# with the lowest validation MAE.

# %%
tmp = Path(tempfile.mkdtemp())
train_ds, val_ds = TinyCrowd(24, seed=0), TinyCrowd(8, seed=1)
seed_everything(0); net = TinyNet()
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
_net = TinyNet(); _net.load_state_dict(load_checkpoint(tmp/'run'/'last.pt')['ema'])
test_close(validate(_net, val_ds, precision=best['precision'])['mae'], hist[-1]['val_mae'], eps=1e-4)  # bf16 in another memory format
# with no learning rate given, the network's family decides (MCNN: 1e-4, as `uotcrowd train` gives it)
_r = fit(get_model('mcnn'), CountLoss(), train_ds, None, TrainConfig(out_dir=tmp/'lr', max_epoch=1, max_steps=1, batch_size=4, quiet=True))
test_eq(_r['history'][0]['lr'], 1e-4)


# %% [markdown]
# **Resume equivalence.** Two epochs in one go, or one epoch and a resumed second epoch, give identical weights
# and optimizer state (the dataset's random flips make this a real test of the per-epoch seeding):

# %%
def train_run(out, max_epoch, resume=None, seed=7):
    seed_everything(0); net = TinyNet()
    cfg = TrainConfig(out_dir=out, max_epoch=max_epoch, batch_size=4, lr=3e-2, quiet=True, resume=resume, seed=seed)
    fit(net, CountLoss(), train_ds, val_ds, cfg)
    return net

full = train_run(tmp/'full', 2)
train_run(tmp/'part', 1)
seed_everything(123)  # a different global RNG state before resuming must not matter
resumed = train_run(tmp/'part', 2, resume=tmp/'part'/'last.pt')
for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()): assert torch.equal(a, b), k
opt_a, opt_b = load_checkpoint(tmp/'full'/'last.pt')['optimizer'], load_checkpoint(tmp/'part'/'last.pt')['optimizer']
for k in opt_a['state']: assert torch.equal(opt_a['state'][k]['exp_avg_sq'], opt_b['state'][k]['exp_avg_sq'])
test_eq(len(load_checkpoint(tmp/'part'/'last.pt')['history']), 2)
# the weight average and the cosine learning rates continue exactly too
ck_a, ck_b = load_checkpoint(tmp/'full'/'last.pt'), load_checkpoint(tmp/'part'/'last.pt')
for k in ck_a['ema']: assert torch.equal(ck_a['ema'][k], ck_b['ema'][k]), k
test_eq((ck_a['ema_updates'], [r['lr'] for r in ck_a['history']]), (ck_b['ema_updates'], [r['lr'] for r in ck_b['history']]))
test_close([r['lr'] for r in ck_a['history']], [3e-2, 3e-4])   # two epochs of a cosine from lr to lr/100
assert not torch.equal(ck_a['ema']['body.0.weight'], ck_a['model']['body.0.weight'])
# while a different data seed gives different weights
assert not torch.equal(full.body[0].weight, train_run(tmp/'seed', 2, seed=8).body[0].weight)


# %% [markdown]
# **A NaN loss** stops training with a message naming the batch, and the last good checkpoint is kept:

# %%
class NaNAfter(nn.Module):
    "Count loss that returns NaN from the `k`-th call on."
    def __init__(self, k): super().__init__(); self.k, self.calls = k, 0
    def forward(self, density, points):
        self.calls += 1
        v = CountLoss()(density, points)
        return v * float('nan') if self.calls > self.k else v

before = load_checkpoint(tmp/'part'/'last.pt')['model']
cfg = TrainConfig(out_dir=tmp/'part', max_epoch=3, batch_size=4, lr=3e-2, quiet=True, resume=str(tmp/'part'/'last.pt'))
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
cfg = TrainConfig(out_dir=tmp/'full', max_epoch=6, batch_size=4, lr=3e-2, quiet=True, resume=str(tmp/'full'/'last.pt'),
                  time_budget_s=spent/2, seed=7)
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
train_ds, val_ds, test_ds = build_datasets('synthetic', crop_size=64, stride=4, n_train=64, n_val=16, n_test=16, size=64)
seed_everything(0); model = get_model('mcnn')
cfg = TrainConfig(out_dir=tmp/'synthetic', max_epoch=8, batch_size=8, lr=1e-3, val_epoch=1, quiet=True,
                  schedule='constant', ema_decay=None, model='mcnn', loss='gl', dataset='synthetic')
res = fit(model, get_loss('gl', stride=model.stride), train_ds, val_ds, cfg)
h = res['history']
print(f"{res['epochs']} epochs in {res['time_s']:.0f}s; val MAE {h[0]['val_mae']:.2f} after epoch 1 -> "
      f"best {res['best_mae']:.2f} (epoch {res['best_epoch'] + 1})")
val_mae = np.array([r['val_mae'] for r in h])
mean_count = np.mean([train_ds.load(i)[2]['count'] for i in range(len(train_ds))])   # the mean-count predictor
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
import nbdev; nbdev.nbdev_export()
