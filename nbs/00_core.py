# %% [markdown]
# # Core
#
# > Device choice, host memory between steps, seeding, pixel-centre grids of a stride-s density map, padded point batches, and counting errors.

# %%
#| default_exp core

# %%
#| export
from __future__ import annotations
import contextlib, ctypes, os, random, sys, typing, warnings
from collections.abc import Collection
from typing import Literal, Sequence
import numpy as np
import torch

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from pathlib import Path
import subprocess
from unittest.mock import patch
import math

# %% [markdown]
# ## Devices
#
# Every module takes a `device` argument and never assumes CUDA. `get_device` resolves `'auto'` (or `None`) to
# the best available backend: CUDA, then Apple's MPS, then the CPU.

# %%
#| export
def get_device(device:str|torch.device|None='auto' # 'auto', None, 'cpu', 'cuda', 'cuda:1', 'mps' or a device
              ) -> torch.device:
    "Resolve `device` to a `torch.device`; `'auto'`/`None` picks CUDA, then MPS, then CPU."
    if isinstance(device, torch.device): return device
    if device is None or str(device).lower() == 'auto':
        if torch.cuda.is_available(): return torch.device('cuda')
        mps = getattr(torch.backends, 'mps', None)
        if mps is not None and mps.is_available(): return torch.device('mps')
        return torch.device('cpu')
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return dev


# %%
test_eq(get_device('cpu'), torch.device('cpu'))
test_eq(get_device(torch.device('cuda', 1)), torch.device('cuda', 1))   # a torch.device is returned as it is
def backends(cuda, mps):   # pretend which backends this machine has
    return (patch.object(torch.cuda, 'is_available', return_value=cuda),
            patch.object(torch.backends.mps, 'is_available', return_value=mps))
c, m = backends(True, True)
with c, m:
    test_eq([get_device(), get_device(None), get_device('AUTO'), get_device('cuda:1')],
            [torch.device('cuda')] * 3 + [torch.device('cuda', 1)])
c, m = backends(False, True)
with c, m: test_eq(get_device('auto'), torch.device('mps'))
c, m = backends(False, False)
with c, m:
    test_eq(get_device(), torch.device('cpu'))
    test_fail(lambda: get_device('cuda'), contains='CUDA is not available')

# %% [markdown]
# ## Allowed values
#
# A parameter that takes one of a few names (a loss, a precision, a solver mode) declares them once, as a
# `typing.Literal` alias in its signature (`host_memory:HostMemory='reuse'`). `literal_values` reads the names
# back from the alias, so that the command line offers them as its choices, and `check_choice` checks a value
# against them (or against a registry's names) with one message that names the parameter, the value and what
# is allowed.

# %%
#| export
def literal_values(hint # a `Literal[...]` alias, or a type holding some (`Literal[...]|None`, `list[...]`)
                  ) -> tuple: # the allowed values in their declared order (none without a `Literal`)
    "The values a `Literal` type hint allows."
    if typing.get_origin(hint) is Literal: return typing.get_args(hint)
    return tuple(v for arg in typing.get_args(hint) for v in literal_values(arg))


# %%
test_eq(literal_values(Literal['a', 'b']), ('a', 'b'))
test_eq(literal_values(Literal['a', 'b'] | None), ('a', 'b'))
test_eq(literal_values(list[Literal[1, 2]]), (1, 2))
test_eq(literal_values(int | None), ())


# %%
#| export
def check_choice(value, # the value given
                 allowed, # a `Literal` alias, or a collection of the allowed values (a registry's names)
                 name:str, # the parameter, named in the message
                 error:type[ValueError]=ValueError # the exception raised (`ValueError` or a subclass)
                ):
    "`value` when `allowed` holds it, else an `error` naming the parameter, the value and the allowed values."
    values = tuple(allowed) if isinstance(allowed, Collection) else literal_values(allowed)
    if value not in values: raise error(f"{name} must be one of {', '.join(map(str, values))}, got {value!r}")
    return value


# %%
Shade = Literal['dark', 'light']
test_eq(check_choice('dark', Shade, 'shade'), 'dark')
test_fail(lambda: check_choice('grey', Shade, 'shade'),
          contains="shade must be one of dark, light, got 'grey'")
test_fail(lambda: check_choice('c', {'a': 1, 'b': 2}, 'key'), contains="key must be one of a, b, got 'c'")
class SizeError(ValueError): pass
with contextlib.suppress(SizeError):   # the exception asked for, with the same message
    check_choice(3, (1, 2), 'n', error=SizeError)
    raise AssertionError('no SizeError raised')
test_fail(lambda: check_choice(3, (1, 2), 'n', error=SizeError), contains='n must be one of 1, 2, got 3')

# %% [markdown]
# ## Host memory between steps
#
# A training step on the CPU allocates the same large activations again and again. glibc's `malloc` serves
# blocks above a threshold (at most 32 MB) with fresh `mmap` pages and gives them back on `free`, and trims
# the top of its heap, so every step touches new pages: an MCNN step at B=4, 256² took 61,600 page faults
# (0.11 s of system time out of 0.8 s) in float32 and 27,300 in bfloat16. `reuse_host_memory` asks `malloc`
# (through `mallopt`) to keep freed memory in the process for the next allocation instead, as a caching
# allocator does on a GPU; resident memory then stays at its peak until the block ends, when glibc's default
# settings come back (its thresholds no longer adapt by themselves) and the cached memory is returned
# (`malloc_trim`). It acts only where the C library is glibc (Linux); elsewhere it does nothing and yields
# `False`. `uotcrowd train`, `eval` and `predict` run inside it (`host_memory='reuse'`, the default).

# %%
#| export
def _glibc():
    "The C library as a `ctypes` handle when it is glibc (has `mallopt` and `malloc_trim`), else None."
    if not sys.platform.startswith('linux'): return None
    try: libc = ctypes.CDLL(None)
    except OSError: return None
    return libc if all(hasattr(libc, f) for f in ('gnu_get_libc_version', 'mallopt', 'malloc_trim')) else None


# %%
has_name = 'CS_GNU_LIBC_VERSION' in getattr(os, 'confstr_names', {})
libc_name = os.confstr('CS_GNU_LIBC_VERSION') if has_name else None   # 'glibc 2.36' where it is glibc
test_eq(_glibc() is not None, sys.platform.startswith('linux') and str(libc_name).startswith('glibc'))

# %%
#| export
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # mallopt parameter numbers (glibc <malloc.h>)
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
HostMemory = Literal['reuse', 'release']   # the host-memory policies of `reuse_host_memory`

@contextlib.contextmanager
def reuse_host_memory(policy:HostMemory='reuse' # 'reuse': freed memory serves the next allocation; 'release'
                     ):
    "Within the block, freed host memory stays in the process (glibc); yields whether the policy was applied."
    check_choice(policy, HostMemory, 'host_memory')
    libc = _glibc() if policy == 'reuse' else None
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_MAX, 0)                  # no mmap blocks
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)    # no trimming
    try: yield True
    finally:
        for param, value in _GLIBC_DEFAULTS.items(): libc.mallopt(param, value)
        libc.malloc_trim(0)

# %% [markdown]
# The effect is counted in page faults, not seconds: a 64 MB block from `malloc`, filled, first touches
# $64\,\text{MB}/\text{page size}$ pages when its memory is new, and none when it reuses a freed block. (Torch
# asks for 64-byte aligned blocks, which settle into reuse after a few steps: the MCNN step above then takes
# about one page fault instead of tens of thousands.)

# %%
FAULTS_SCRIPT = """
import ctypes, resource, sys
from pathlib import Path
from uotcrowd.core import reuse_host_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
# 4 KB pages whatever /sys/kernel/mm/transparent_hugepage says (PR_SET_THP_DISABLE = 41, Linux >= 3.15):
# with 2 MB pages a fresh 64 MB block takes only 32 faults, and fresh and reused memory could not be told apart
thp_off = libc.prctl(41, 1, 0, 0, 0) == 0 and libc.prctl(42, 0, 0, 0, 0) == 1
def touch_block(nbytes=64 * 2**20):   # malloc, fill, free: a block used as a step's activation would be
    block = libc.malloc(nbytes)
    ctypes.memset(block, 1, nbytes)
    libc.free(block)
def minor_faults(repeats=3):          # minor page faults of the last of `repeats` blocks
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touch_block()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return after - before
def resident_mb():
    return int(Path('/proc/self/statm').read_text().split()[1]) * resource.getpagesize() / 2**20
default = minor_faults()
with reuse_host_memory('reuse') as applied:
    reused, kept = minor_faults(), resident_mb()
print(applied, resource.getpagesize(), default, reused, kept - resident_mb(), thp_off)
"""

# %% [markdown]
# The counts come from a fresh interpreter, so that what earlier code did to this process's heap cannot change
# them:

# %%
if _glibc() is None:   # the policy acts on glibc only
    with reuse_host_memory('reuse') as applied: test_eq(applied, False)
else:
    out = subprocess.run([sys.executable, '-c', FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    out = out.stdout.split()
    applied, pages = out[0] == 'True', 64 * 2**20 // int(out[1])
    default, reused, returned_mb, thp_off = int(out[2]), int(out[3]), float(out[4]), out[5] == 'True'
    test_eq((applied, thp_off), (True, True))
    assert default > pages // 2, default   # glibc's default: a block this size is a fresh mapping every time
    assert reused < pages // 100, f'a freed block should be reused without new pages, got {reused} faults'
    assert returned_mb > 32, f'on exit the cached memory goes back to the system, got {returned_mb:.1f} MB'
with reuse_host_memory('release') as applied: test_eq(applied, False)
test_fail(lambda: reuse_host_memory('keep').__enter__(), contains='host_memory must be one of reuse, release')

# %% [markdown]
# ## Seeding
#
# One call seeds Python, NumPy and torch (all devices). With `deterministic=True` it also asks torch for
# deterministic kernels, which training uses when exact reproducibility matters more than speed.

# %%
#| export
def seed_everything(seed:int=0, # the seed for `random`, NumPy and torch
                    deterministic:bool=False # also request deterministic torch kernels
                   ) -> int:
    "Seed every random number generator the project uses and return `seed`."
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available(): torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
        if hasattr(torch.backends, 'cudnn'): torch.backends.cudnn.benchmark = False
    return seed


# %%
def draws(seed):   # one number from each generator after seeding
    seed_everything(seed)
    return random.random(), np.random.rand(), torch.rand(1).item()
test_eq(draws(3), draws(3))
assert draws(3) != draws(4)

# %% [markdown]
# ## Pixel centres of a density map
#
# A network with output stride $s$ predicts one value per $s\times s$ cell of the input image. Pixel $(i, j)$
# (row $i$, column $j$) of that map stands for the cell centred at
# $$\boldsymbol{x}_{ij} = \big(s\,(j+\tfrac12),\; s\,(i+\tfrac12)\big)$$
# in input-image pixels, written as $(x, y)$ like the annotations. The official GL code places the centres at
# $s j + s/2$ in one place and $s j$ in another (a 4 px offset at $s=8$); we use the cell centre everywhere,
# so a head annotated exactly at a cell centre has distance zero to that pixel. Pixels are flattened
# row-major, matching `density.flatten(-2)`.

# %%
#| export
def pixel_centres(h:int, # rows of the density map
                  w:int, # columns of the density map
                  stride:int=8, # input pixels per density pixel
                  device=None, # torch device of the result
                  dtype=torch.float32 # dtype of the result
                 ) -> torch.Tensor: # `(h*w, 2)` tensor of `(x, y)` centres, row-major
    "Input-image coordinates `(x, y)` of the centres of the `h`×`w` pixels of a stride-`stride` map."
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * stride
    gy, gx = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


# %%
c = pixel_centres(2, 3, stride=8)
test_eq(c.shape, (6, 2))
test_eq([c[0].tolist(), c[2].tolist(), c[3].tolist()], [[4., 4.], [20., 4.], [4., 12.]])
# row-major: index i*w + j is row i, column j
d = torch.zeros(1, 1, 2, 3)
d[0, 0, 1, 2] = 1
test_eq(c[d.flatten().argmax()].tolist(), [20., 12.])
test_eq(pixel_centres(4, 4, stride=1)[5].tolist(), [1.5, 1.5])

# %% [markdown]
# ## Batches of points
#
# Images in a batch have different numbers of heads. Losses receive `points` as a list of `(N_b, 2)` tensors;
# batched solvers need one `(B, M, 2)` tensor padded to the largest `N_b` with a boolean mask of the real
# points. `check_points` validates user input with messages that say what is wrong.

# %%
#| export
def check_points(points:Sequence[torch.Tensor], # one `(N_b, 2)` tensor of `(x, y)` per image
                 batch_size:int|None=None, # expected number of images, if known
                ) -> list[torch.Tensor]:
    "Validate a list of point tensors and return it with each entry as a float `(N_b, 2)` tensor."
    if isinstance(points, torch.Tensor) and points.dim() == 3: points = list(points)
    if not isinstance(points, (list, tuple)):
        raise TypeError(f"points must be a list of (N, 2) tensors, one per image, got {type(points).__name__}")
    if batch_size is not None and len(points) != batch_size:
        raise ValueError(f"got {len(points)} point sets for a batch of {batch_size} density maps")
    out = []
    for k, p in enumerate(points):
        p = torch.as_tensor(p)
        if p.numel() == 0: p = p.reshape(0, 2)
        if p.dim() != 2 or p.shape[1] != 2:
            raise ValueError(f"points[{k}] must have shape (N, 2), got {tuple(p.shape)}")
        if not torch.isfinite(p).all():
            raise ValueError(f"points[{k}] contains NaN or infinite coordinates")
        out.append(p if p.is_floating_point() else p.float())
    return out


# %%
test_fail(lambda: check_points([torch.tensor([[float('nan'), 1.]])]), contains='NaN')
test_fail(lambda: check_points([torch.zeros(3)]), contains='shape (N, 2)')
test_fail(lambda: check_points([torch.zeros(1, 2)], batch_size=2), contains='batch of 2')
test_fail(lambda: check_points(torch.zeros(4, 2)), contains='a list of (N, 2) tensors')
test_eq([p.dtype for p in check_points([torch.tensor([[1, 2]]), torch.zeros(0)])], [torch.float32] * 2)
test_eq(check_points(torch.zeros(2, 3, 2))[1].shape, (3, 2))     # a (B, M, 2) tensor: one entry per image


# %%
#| export
def pad_points(points:Sequence[torch.Tensor], # one `(N_b, 2)` tensor per image
               device=None, # device of the result (default: that of the first tensor)
               dtype=torch.float32 # dtype of the padded coordinates
              ) -> tuple[torch.Tensor, torch.Tensor]: # `(B, M, 2)` coordinates and `(B, M)` bool mask
    "Stack variable-length point sets into a zero-padded `(B, M, 2)` tensor and a mask of real points."
    points = check_points(points)
    if device is None: device = points[0].device if len(points) else 'cpu'
    B, M = len(points), max([len(p) for p in points], default=0)
    coords = torch.zeros(B, M, 2, device=device, dtype=dtype)
    mask = torch.zeros(B, M, device=device, dtype=torch.bool)
    for k, p in enumerate(points):
        coords[k, :len(p)] = p.to(device=device, dtype=dtype)
        mask[k, :len(p)] = True
    return coords, mask


# %%
pts = [torch.tensor([[1., 2.], [3., 4.]]), torch.zeros(0, 2), torch.tensor([[5, 6]])]
coords, mask = pad_points(pts)
test_eq(coords.shape, (3, 2, 2))
test_eq(mask.tolist(), [[True, True], [False, False], [True, False]])
test_eq(coords[2, 0].tolist(), [5., 6.])
test_eq(pad_points([torch.zeros(0, 2)])[0].shape, (1, 0, 2))

# %% [markdown]
# ## Density maps
#
# `check_density` enforces the `(B, 1, h, w)` contract of the losses with a message naming the shape.

# %%
#| export
def check_density(density:torch.Tensor # predicted density maps, `(B, 1, h, w)`
                 ) -> torch.Tensor:
    "Check that `density` is a `(B, 1, h, w)` floating-point tensor and return it."
    if not isinstance(density, torch.Tensor) or density.dim() != 4 or density.shape[1] != 1:
        shape = tuple(density.shape) if isinstance(density, torch.Tensor) else type(density).__name__
        raise ValueError(f"density must be a (B, 1, h, w) tensor, got {shape}")
    if not density.is_floating_point(): raise TypeError(f"density must be floating point, got {density.dtype}")
    return density


# %%
check_density(torch.zeros(2, 1, 4, 4))
test_fail(lambda: check_density(torch.zeros(2, 4, 4)), contains='(B, 1, h, w)')

# %% [markdown]
# ## Counting errors
#
# Training validates by counts, evaluation adds localization; both measure counts the same way. With predicted
# counts $\hat y_i$ and ground-truth counts $y_i$ over $n$ images,
# $$\mathrm{MAE}=\frac1n\sum_i|\hat y_i-y_i|,\qquad \mathrm{RMSE}=\sqrt{\frac1n\sum_i(\hat y_i-y_i)^2},\qquad
# \mathrm{NAE}=\frac1{|\{i:y_i>0\}|}\sum_{i:\,y_i>0}\frac{|\hat y_i-y_i|}{y_i}.$$ Crowd-counting papers (the
# GL paper included) call the RMSE "MSE": the figure in their "MSE" columns is the square root of the mean
# squared error. We name it `rmse`. NAE skips images with no people, as NWPU-Crowd's evaluation does (the
# ratio is undefined there); with no such image it is `nan`.

# %%
#| export
def to_numpy(x, # array-like or torch tensor on any device
             dtype=np.float64 # dtype of the copy
            ) -> np.ndarray:
    "A NumPy copy of an array-like or (any-device) torch tensor."
    if hasattr(x, 'detach'): x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# %%
test_eq(to_numpy(torch.tensor([1, 2], requires_grad=False)), np.array([1., 2.]))
test_eq(to_numpy([3], dtype=np.int64).dtype, np.int64)


# %%
#| export
def count_metrics(pred_counts, # predicted count per image (sequence, array or tensor)
                  gt_counts, # ground-truth count per image
                 ) -> dict: # `mae`, `rmse` (papers' "MSE"), `nae` (images with people only), `n`
    "Mean absolute error, root mean squared error and normalized absolute error of counts."
    pred, gt = to_numpy(pred_counts).reshape(-1), to_numpy(gt_counts).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"got {pred.size} predicted counts for {gt.size} ground-truth counts")
    if pred.size == 0: raise ValueError("count_metrics needs at least one image")
    err = pred - gt
    people = gt > 0
    nae = float(np.mean(np.abs(err[people]) / gt[people])) if people.any() else float('nan')
    return dict(mae=float(np.mean(np.abs(err))), rmse=float(np.sqrt(np.mean(err**2))), nae=nae,
                n=int(pred.size))

# %% [markdown]
# Worked example: errors 1, −2, 0, 3 (the last image is empty), so MAE = 6/4, RMSE = √(14/4), and NAE averages
# 1/10, 2/4 and 0/5 only.

# %%
m = count_metrics([11, 2, 5, 3], torch.tensor([10, 4, 5, 0]))
test_close([m['mae'], m['rmse'], m['nae']], [1.5, math.sqrt(3.5), (0.1 + 0.5 + 0) / 3])
test_eq(m['n'], 4)
assert math.isnan(count_metrics([1, 2], [0, 0])['nae'])
test_fail(lambda: count_metrics([1, 2], [1]), contains='2 predicted counts for 1')

# %%
#| hide
import nbdev
nbdev.nbdev_export()
