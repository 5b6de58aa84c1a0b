# %% [markdown]
# # Precision
#
# > The arithmetic a model computes in: float32, or bfloat16/float16 autocast with channels_last, and `auto`, which picks bfloat16 where the device computes it in hardware.

# %%
#| default_exp precision

# %%
#| export
from __future__ import annotations
import contextlib, platform
from typing import Literal
import torch
from uotcrowd.core import check_choice, literal_values

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from torch import nn

# %% [markdown]
# ## The four settings
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

# %%
#| export
ResolvedPrecision = Literal['fp32', 'bf16', 'fp16']   # what runs once 'auto' is resolved

# %%
#| export
PRECISIONS = literal_values(Precision)

# %%
#| export
_AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}

# %%
test_eq(PRECISIONS, ('auto', 'fp32', 'bf16', 'fp16'))
test_eq(set(_AUTOCAST_DTYPES), set(literal_values(ResolvedPrecision)) - {'fp32'})


# %% [markdown]
# ## Which precisions run in hardware
#
# On a CPU, oneDNN says whether it can compute bfloat16; on x86 it also says yes to plain AVX512, where bfloat16 is
# emulated, so the CPU's own feature flags decide there.

# %%
#| export
def _cpu_flags() -> set[str]:
    "Feature flags of the first CPU listed in `/proc/cpuinfo` (empty where that file does not exist)."
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')): return set(line.split(':', 1)[1].split())
    except OSError: pass
    return set()


# %%
#| export
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
    # oneDNN also says yes to plain AVX512 (emulated)
    if platform.machine().lower() in ('x86_64', 'amd64', 'x86', 'i686'):
        return bool(_cpu_flags() & {'avx512_bf16', 'amx_bf16'})
    return True  # Arm: oneDNN says yes only with the BF16 extension


# %%
test_eq(is_native('fp32', 'cpu'), True)
test_eq(is_native('bf16', 'meta'), False)   # neither a CPU nor a GPU


# %% [markdown]
# ## Resolving `auto`

# %%
#| export
def resolve_precision(precision:Precision, # one of `PRECISIONS`
                      device:str|torch.device # the device that computes
                     ) -> ResolvedPrecision: # 'fp32', 'bf16' or 'fp16'
    "The precision to run: `auto` becomes `bf16` where `device` runs it natively, `fp32` elsewhere."
    if check_choice(precision, Precision, 'precision') == 'auto':
        return 'bf16' if is_native('bf16', device) else 'fp32'
    return precision


# %% [markdown]
# `auto` agrees with the hardware check:

# %%
test_eq(resolve_precision('auto', 'cpu'), 'bf16' if is_native('bf16', 'cpu') else 'fp32')
test_eq([resolve_precision(p, 'cpu') for p in ('fp32', 'bf16', 'fp16')], ['fp32', 'bf16', 'fp16'])
test_fail(lambda: resolve_precision('float16', 'cpu'), contains='auto, fp32, bf16, fp16')


# %% [markdown]
# ## Running in a precision

# %%
#| export
def autocast(device:str|torch.device, # the device that computes
             precision:ResolvedPrecision # 'fp32', 'bf16' or 'fp16' (resolved)
            ):
    "`torch.autocast` context for `precision` on `device`; a no-op for fp32."
    if precision == 'fp32': return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


# %%
test_eq(type(autocast('cpu', 'fp32')), contextlib.nullcontext)
test_eq(type(autocast('cpu', 'bf16')), torch.autocast)


# %%
#| export
def memory_format(precision:ResolvedPrecision # 'fp32', 'bf16' or 'fp16' (resolved)
                 ) -> torch.memory_format:
    "channels_last for the reduced precisions, the contiguous layout for fp32."
    return torch.contiguous_format if precision == 'fp32' else torch.channels_last


# %% [markdown]
# Under autocast a convolution computes in the reduced precision while the float32 cast of its output, as the loss
# receives it, is unchanged in layout and dtype:

# %%
_conv, _x = nn.Conv2d(3, 2, 3), torch.randn(1, 3, 8, 8)
for p in ('fp32', 'bf16'):
    with torch.no_grad(), autocast('cpu', p):
        _y = _conv.to(memory_format=memory_format(p))(_x.to(memory_format=memory_format(p)))
    test_eq(_y.dtype, {'fp32': torch.float32, 'bf16': torch.bfloat16}[p])
    _last = _x.to(memory_format=memory_format(p)).is_contiguous(memory_format=torch.channels_last)
    test_eq(_last, p != 'fp32')
    test_close(_y.float(), _conv(_x), eps=0.05)  # bfloat16 keeps about 3 significant digits
    test_eq(_y.float().dtype, torch.float32)
_conv.to(memory_format=torch.contiguous_format)


# %%
#| hide
import nbdev
nbdev.nbdev_export()
