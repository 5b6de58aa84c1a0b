# %% [markdown]
# # Training configuration
#
# > `TrainConfig`, the learning rate of each model family, the learning-rate schedules of `fit` (a fixed cosine, or decays on validation plateaus) and the weight average it validates and saves.

# %%
#| default_exp config

# %%
#| export
from __future__ import annotations
import json, math
from dataclasses import dataclass, field, asdict, fields
from typing import Literal, Sequence
import torch
from torch import nn
from uotcrowd.core import HostMemory, check_choice
from uotcrowd.checkpoints import config_precision
from uotcrowd.precision import Precision

# %%
#| hide
from pathlib import Path
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.models import get_model

# %% [markdown]
# ## Configuration
#
# One dataclass holds every knob. Fields that only describe the run (`model`, `loss`, `dataset`, their keyword
# arguments) are stored in the checkpoint, so `uotcrowd eval` and `uotcrowd predict` can rebuild the model
# from the checkpoint alone. `lr=None` picks the learning rate of the paper for the model family.

# %%
#| export
DEFAULT_LR = {'mcnn': 1e-4, 'effnetlite0': 1e-4}  # others (VGG19, CSRNet): 1e-5

# %%
#| export
_MODEL_KEYS = {'MCNN': 'mcnn', 'EffNetLiteDensity': 'effnetlite0'}


# %%
#| export
def default_lr(model:str|nn.Module|None # a name ('vgg19', 'mcnn', 'effnet-lite0', ...), a network, or None
              ) -> float:
    """Adam learning rate by model family: 1e-4 for MCNN (the paper's code, DM-Count) and EfficientNet-Lite0,
    1e-5 otherwise (VGG19, CSRNet)."""
    key = (_MODEL_KEYS.get(type(model).__name__) if isinstance(model, nn.Module)
           else str(model or '').lower().replace('-', '').replace('_', ''))
    return DEFAULT_LR.get(key, 1e-5)


# %%
test_eq([default_lr(m) for m in (nn.Conv2d(3, 1, 1), get_model('mcnn'))], [1e-5, 1e-4])

# %%
#| export
Schedule = Literal['cosine', 'constant', 'plateau']   # the learning-rate schedules of `fit`


# %%
#| export
@dataclass
class TrainConfig:
    "Everything `fit` needs besides the model, the loss and the datasets."
    out_dir:str='runs/exp' # folder for checkpoints, logs and plots
    max_epoch:int=100 # number of epochs (the last epoch index is `max_epoch-1`)
    batch_size:int=1 # images per step (per process under DDP)
    crop_size:int=512 # training crop side, recorded for the data pipeline
    lr:float|None=None # Adam learning rate (the peak of the schedule); None: `default_lr` of the model
    # the parameters under `model.backbone` (a pretrained front-end) train at `lr` times this
    backbone_lr_scale:float=1.0
    # 'cosine': warm-up, then cosine decay to `lr * min_lr_ratio` at the last epoch; 'constant';
    # 'plateau': decays on validation plateaus (`lr_patience`, `patience`)
    schedule:Schedule='cosine'
    warmup_epochs:int=0 # linear warm-up to `lr` over this many epochs
    min_lr_ratio:float=0.01 # `cosine`: the learning rate of the last epoch, as a share of `lr`
    # exponential moving average of the weights per step (validated, saved as `ema`, what evaluation loads);
    # None: off
    ema_decay:float|None=0.998
    val_raw:bool=False # with `ema_decay`: also validate the raw weights (logged as `val_mae_raw`)
    weight_decay:float=1e-5 # Adam weight decay
    val_epoch:int=1 # validate every `val_epoch` epochs (and after the last one)
    val_start:int=0 # first epoch at which validation may run
    clip_grad:float|None=None # clip the global gradient norm to this value
    # 'auto' (bf16 where native, else fp32), 'fp32' (bit-reproducible), 'bf16' or 'fp16'; see Precision
    precision:Precision='auto'
    seed:int=0 # seed of initialisation, data order and augmentation
    deterministic:bool=False # request deterministic torch kernels
    num_workers:int=0 # DataLoader worker processes
    # 'reuse': freed host memory stays in the process for the next step (glibc; see `reuse_host_memory`);
    # 'release'
    host_memory:HostMemory='reuse'
    # 'auto', 'cpu', 'cuda', 'cuda:1', ...; under torchrun each process uses its LOCAL_RANK GPU
    device:str='auto'
    resume:str|None=None # checkpoint (`last.pt`) to continue from
    quiet:bool=False # no progress bars and no per-epoch lines
    time_budget_s:float|None=None # stop (validate + checkpoint) once this many seconds of training are spent
    # `plateau`: stop once the validation MAE has not improved for this many epochs (None: never)
    patience:int|None=None
    # `plateau`: multiply the learning rate by `lr_decay` after this many epochs without improvement
    lr_patience:int|None=None
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
    # dataset arguments (e.g. synthetic `n`, `size`), for the record
    data_kwargs:dict=field(default_factory=dict)

    def __post_init__(self):
        if self.lr is None and self.model is not None:
            self.lr = default_lr(self.model)  # otherwise `fit` asks the network
        check_choice(self.schedule, Schedule, 'schedule')
        if self.schedule != 'plateau' and (self.patience is not None or self.lr_patience is not None):
            raise ValueError(f"patience and lr_patience need schedule='plateau' "
                             f"(got schedule={self.schedule!r})")
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


# %% [markdown]
# The learning rate follows the model family unless it is given:

# %%
test_eq(TrainConfig(model='mcnn').lr, 1e-4)
test_eq(TrainConfig(model='vgg19').lr, 1e-5)
test_eq(TrainConfig(model='csrnet', lr=3e-4).lr, 3e-4)
test_eq(TrainConfig(model='effnet-lite0').lr, 1e-4)
test_eq(TrainConfig().lr, None)   # resolved by `fit` from the network: MCNN gets 1e-4 there too
test_eq(TrainConfig().weight_decay, 1e-5)
test_eq(TrainConfig().precision, 'auto')
test_eq(TrainConfig().host_memory, 'reuse')

# %% [markdown]
# Inconsistent or out-of-range settings are refused when the config is made, before any training starts:

# %%
test_fail(lambda: TrainConfig(patience=5), contains="patience and lr_patience need schedule='plateau'")
test_fail(lambda: TrainConfig(schedule='step'), contains='schedule must be one of cosine, constant, plateau')
test_fail(lambda: TrainConfig(ema_decay=1.0), contains='ema_decay must be in [0, 1)')
test_fail(lambda: TrainConfig(val_epoch=0), contains='val_epoch')
test_fail(lambda: TrainConfig(plateau_start=-1), contains='plateau_start must be >= 0, got -1')
test_fail(lambda: TrainConfig(precision='half'), contains='precision must be one of auto, fp32')
test_fail(lambda: TrainConfig(host_memory='cache'), contains='host_memory must be one of reuse, release')

# %% [markdown]
# A config goes to a checkpoint as a plain dict and comes back from it, also from older and newer versions:

# %%
cfg = TrainConfig(out_dir=Path('x'), model='mcnn', loss_kwargs={'eps': 0.01})
test_eq(TrainConfig.from_dict(cfg.to_dict()), cfg)
test_eq(TrainConfig.from_dict({**cfg.to_dict(), 'unknown_key': 1}), cfg)
# configs written before `precision` existed trained in float32, or float16 with `amp`
test_eq([TrainConfig.from_dict({'amp': a}).precision for a in (False, True)], ['fp32', 'fp16'])


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
                     # `lr`, `lr_patience`, `lr_decay`, `patience`, `val_window`, `plateau_start`
                     cfg:TrainConfig
                    ) -> tuple[float, bool]: # learning rate of the next epoch, whether to stop
    "The learning rate for the next epoch and whether the patience is spent, from the log alone."
    lr, best, since_best, since_decay, maes = cfg.lr, math.inf, 0, 0, []
    for row in history[cfg.plateau_start:]:
        since_best += 1
        since_decay += 1
        if row.get('val_mae') is not None:
            maes.append(row['val_mae'])
            # only full windows: a first lucky validation is no plateau's reference
            if len(maes) >= cfg.val_window:
                smooth = sum(maes[-cfg.val_window:]) / cfg.val_window
                if smooth < best: best, since_best = smooth, 0
        if cfg.lr_patience is not None and min(since_best, since_decay) >= cfg.lr_patience:
            lr, since_decay = lr * cfg.lr_decay, 0
    return lr, cfg.patience is not None and since_best >= cfg.patience


# %%
_rows = lambda maes: [{'epoch': e, 'val_mae': m} for e, m in enumerate(maes)]
_cfg = TrainConfig(schedule='plateau', lr=1.0, lr_patience=2, lr_decay=0.5, patience=4)
test_eq(plateau_schedule([], _cfg), (1.0, False))
test_eq(plateau_schedule(_rows([5, 4, 3]), _cfg), (1.0, False))   # improving
# 2 epochs without improvement: halve
test_eq(plateau_schedule(_rows([5, 4, 4, 4]), _cfg), (0.5, False))
# 2 more: halve again; 4 in all: stop
test_eq(plateau_schedule(_rows([5, 4, 4, 4, 4, 4]), _cfg), (0.25, True))
# an improvement restarts both counts
test_eq(plateau_schedule(_rows([5, 4, 4, 4, 3, 3]), _cfg), (0.5, False))
# epochs without validation count too
test_eq(plateau_schedule(_rows([5, None, None, 4]), _cfg), (0.5, False))
# defaults: constant, no stop
test_eq(plateau_schedule(_rows([5, 4, 4, 4]), TrainConfig(lr=1.0)), (1.0, False))

# %% [markdown]
# A noisy validation MAE: one lucky epoch (2) would end the run with a window of 1, while the means over 3 keep
# improving:

# %%
_plateau = lambda **kw: TrainConfig(schedule='plateau', lr=1.0, **kw)
_noisy = [9, 8, 2, 7, 6, 5.5, 5, 4.5]
test_eq(plateau_schedule(_rows(_noisy), _plateau(patience=5))[1], True)
test_eq(plateau_schedule(_rows(_noisy), _plateau(patience=5, val_window=3)), (1.0, False))
# only full windows count: with a window of 3 the lucky first value (2) is never a "best" on its own
# (a partial window would make mean([2]) = 2 the best and stop the run;
# full windows: 5.33, 6.33, 5, 5, best 5 at epoch 4)
test_eq(plateau_schedule(_rows([2, 9, 5, 5, 5, 5]), _plateau(patience=4, val_window=3)), (1.0, False))
test_eq(plateau_schedule(_rows([2, 9, 5, 5, 5, 5]), _plateau(patience=4, val_window=1)), (1.0, True))

# %% [markdown]
# A warm-up: the lucky 2 at epoch 2 is not watched, so the later 7, 6, 5.5, ... are improvements, not a plateau:

# %%
test_eq(plateau_schedule(_rows(_noisy), _plateau(patience=5, plateau_start=3)), (1.0, False))
# watched from epoch 3: best 7, two epochs without a better one, then a halving
test_eq(plateau_schedule(_rows([9, 8, 2, 7, 7, 7, 7]),
                         _plateau(lr_patience=2, lr_decay=0.5, plateau_start=3)), (0.5, False))
# still warming up
test_eq(plateau_schedule(_rows([9, 8, 2, 7, 7]), _plateau(lr_patience=2, plateau_start=10)), (1.0, False))


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


# %%
test_close([warmup_factor(TrainConfig(warmup_epochs=4), e) for e in range(5)], [0.25, 0.5, 0.75, 1.0, 1.0])
test_eq(warmup_factor(TrainConfig(), 0), 1.)


# %%
#| export
def scheduled_lr(cfg:TrainConfig, # `lr`, `schedule`, `warmup_epochs`, `min_lr_ratio`, `max_epoch`
                 epoch:int # epoch index
                ) -> float:
    "Learning rate of `epoch` under the fixed part of the schedule (warm-up, then cosine or constant)."
    if epoch < cfg.warmup_epochs or cfg.schedule != 'cosine': return cfg.lr * warmup_factor(cfg, epoch)
    t = (epoch - cfg.warmup_epochs) / max(1, cfg.max_epoch - 1 - cfg.warmup_epochs)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.))))


# %%
_c = TrainConfig(lr=1.0, max_epoch=12, warmup_epochs=1, min_lr_ratio=0.0)
test_close([scheduled_lr(_c, e) for e in (0, 1, 6, 11)], [1.0, 1.0, 0.5, 0.0])   # cos(0), cos(pi/2), cos(pi)
test_close([scheduled_lr(TrainConfig(lr=2.0, warmup_epochs=4), e) for e in range(5)],
           [0.5, 1.0, 1.5, 2.0, 2.0])
test_close(scheduled_lr(TrainConfig(lr=1.0, max_epoch=5, min_lr_ratio=0.1), 4), 0.1)
test_eq([scheduled_lr(TrainConfig(lr=0.3, schedule='constant'), e) for e in (0, 50)], [0.3, 0.3])


# %%
#| export
def epoch_lr(history:Sequence[dict], # rows of `log.csv` so far: the next epoch is `len(history)`
             cfg:TrainConfig # the schedule
            ) -> float:
    "Learning rate of the next epoch: the fixed schedule, or the plateau rules' decays."
    epoch = len(history)
    if cfg.schedule != 'plateau': return scheduled_lr(cfg, epoch)
    return plateau_schedule(history, cfg)[0] * warmup_factor(cfg, epoch)


# %%
test_eq(epoch_lr(_rows([5, 4, 4, 4]), TrainConfig(schedule='plateau', lr=1.0, lr_patience=2, lr_decay=0.5)),
        0.5)
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
        # state tensors are updated in place: pair them once
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, list(zip(self.module.state_dict().values(), model.state_dict().values())))
        for avg, new in self._pairs[1]:
            if avg.is_floating_point(): avg.lerp_(new.detach().to(avg.dtype), 1 - d)
            else: avg.copy_(new)

    def state_dict(self) -> dict: return self.module.state_dict()
    def load_state_dict(self, state:dict, updates:int):
        self.module.load_state_dict(state)
        self.updates = int(updates)

# %%
_w = nn.Linear(1, 1, bias=False)
nn.init.constant_(_w.weight, 0.)
_avg = WeightAverage(_w, decay=0.5)
_want = 0.
for t in range(1, 6):
    nn.init.constant_(_w.weight, float(t))
    _avg.update(_w)
    d = min(0.5, (1 + t) / (10 + t))
    _want = d * _want + (1 - d) * t   # the recursion written out
    test_close(_avg.module.weight.item(), _want, eps=1e-6)
test_eq((_avg.updates, _avg.module.weight.requires_grad), (5, False))
test_close(_avg.module.weight.item(), 4.40020, eps=1e-4)  # by hand: d = 2/11, 3/12, 4/13, 5/14, 6/15

# %%
#| hide
import nbdev
nbdev.nbdev_export()
