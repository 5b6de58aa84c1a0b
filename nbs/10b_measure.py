# %% [markdown]
# # Measurements
#
# > What every benchmark needs: call times from `torch.utils.benchmark`, peak memory, how busy the machine was, the `exp` floor, a description of the machine, targets, strict JSON and Markdown tables.

# %%
#| default_exp measure

# %%
#| export
from __future__ import annotations
import contextlib, ctypes, ctypes.util, importlib.util, itertools, math, os, platform, time
from typing import Callable, Iterable, Literal, Sequence
import torch
import torch.utils.benchmark as benchmark
from uotcrowd.core import check_choice

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import multiprocessing

# %% [markdown]
# The benchmarks of the package ([the loss](10d_loss_bench.ipynb),
# [training throughput](10e_throughput.ipynb), [ONNX Runtime](10f_onnx_bench.ipynb), all run by
# [`uotcrowd bench`](11_bench.ipynb)) measure with the functions of this notebook, so that every number of a
# results file is taken the same way. Only ratios between numbers measured side by side in one run on one
# device mean anything on a shared machine.

# %% [markdown]
# ## Threads and optional packages
#
# `torch_threads` runs a block with a given number of torch intra-op threads and restores the previous number;
# `has_module` says whether an optional package (geomloss, POT, onnxruntime) can be imported.

# %%
#| export
@contextlib.contextmanager
def torch_threads(n:int|None # intra-op threads for the block; None: leave as is
                 ):
    "Run the block with `n` torch threads, then restore the previous number."
    before = torch.get_num_threads()
    if n: torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(before)


# %%
_before = torch.get_num_threads()
with torch_threads(1): test_eq(torch.get_num_threads(), 1)
test_eq(torch.get_num_threads(), _before)
with torch_threads(None): test_eq(torch.get_num_threads(), _before)


# %%
#| export
def has_module(name:str # a top-level package name
              ) -> bool:
    "Whether `name` can be imported (optional dependencies of the benchmarks)."
    try: return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError): return False


# %%
test_eq([has_module('math'), has_module('no_such_package_here')], [True, False])

# %% [markdown]
# ## Call times
#
# `time_call` times a function of no arguments with `torch.utils.benchmark.Timer`, which synchronizes the
# accelerator around each block of calls; the Timer runs with the caller's torch thread count (its own default
# is one thread). The first call is a warm-up (allocations, first-call dispatch), timed on the same
# synchronizing clock (`torch.utils.benchmark.timer`) and reported as `first`. A warm-up longer than
# `long_call` seconds is the only measurement: one-time costs are negligible next to such a call, and a full
# benchmark must stay within minutes. Otherwise `Timer.adaptive_autorange` measures until the interquartile
# range of its blocks is within 10 % of their median, or until it has spent about `repeats` calls' worth of
# time, at most `budget` seconds (at least one block is timed). `median` and `min` are seconds per call;
# `repeats` counts the timed calls.

# %%
#| export
def synchronize(device:torch.device|str # the device whose queued work to wait for
               ):
    "Wait until `device` has finished its queued work (CUDA; nothing to wait for elsewhere)."
    device = torch.device(device)
    if device.type == 'cuda': torch.cuda.synchronize(device)


# %%
synchronize('cpu')


# %%
#| export
def time_call(fn:Callable, # function of no arguments to time
              repeats:int=5, # about this many calls' worth of time at most
              budget:float=2.0, # seconds of timed calls at most (at least one block of calls is timed)
              long_call:float=10.0, # a warm-up longer than this is used as the only measurement
              threshold:float=0.1, # stop once the blocks' interquartile range is below this share of median
             ) -> dict: # seconds per call: `median`, `min`, `first` (the warm-up); `repeats`: timed calls
    "Median and minimum time of `fn()` from `torch.utils.benchmark.Timer`, after a timed warm-up call."
    start = benchmark.timer()
    fn()
    first = benchmark.timer() - start
    if first > long_call: return dict(median=first, min=first, repeats=1, first=first)
    timer = benchmark.Timer('fn()', globals={'fn': fn}, num_threads=torch.get_num_threads())
    run_time = max(min(budget, repeats * first), 1e-9)
    m = timer.adaptive_autorange(threshold, min_run_time=0., max_run_time=run_time)
    return dict(median=m.median, min=min(m.times), repeats=len(m.raw_times) * m.number_per_run, first=first)

# %% [markdown]
# `time.sleep` gives calls of known length (a lower bound, whatever the machine's load): one warm-up call,
# then the timed ones; a budget shorter than the calls stops after about one call's worth of time; a long
# warm-up is the measurement; and the Timer keeps the caller's thread count.

# %%
calls = []
r = time_call(lambda: calls.append(time.sleep(0.01)), repeats=3, budget=1.)
assert 0.01 <= r['min'] <= r['median'] and r['first'] >= 0.01, r
assert 1 <= r['repeats'] < len(calls), (r, len(calls))       # the warm-up call is not among the timed ones
r = time_call(lambda: time.sleep(0.03), repeats=10, budget=0.05)
assert r['repeats'] >= 1, r                                      # how many blocks fit the budget depends on the machine
r = time_call(lambda: time.sleep(0.03), long_call=0.01)
test_eq((r['repeats'], r['median'], r['min']), (1, r['first'], r['first']))
threads_seen = []
with torch_threads(2): time_call(lambda: threads_seen.append(torch.get_num_threads()), repeats=2, budget=0.)
test_eq(set(threads_seen), {2})

# %% [markdown]
# ## Peak memory
#
# On CUDA, `torch.cuda.max_memory_allocated` after resetting the peak, minus what was allocated before the
# call. The CPU allocator keeps no statistics; on Linux we measure what the process takes from the system:
# freed heap memory is first handed back (`malloc_trim`), the kernel's resident-set high-water mark is reset
# to the current size (writing `5` to `/proc/self/clear_refs`), and after the call the mark (`VmHWM`) minus
# the size before it is the peak. This is exact, costs nothing and holds no record of the call (the profiler's
# memory events hold one per allocation and ran out of memory on converged solves). It counts what the
# allocator could not reuse (a loop that frees and allocates many blocks needs more than its live tensors: at
# B=8, 64×64, 500 points the geomloss loop peaked at 501 MiB of memory against 95 MiB of live tensors) and
# nothing that existed before the call. Elsewhere (no `/proc`), `method='profiler'` gives the peak of the live
# tensor bytes from `torch.profiler`'s memory events, the quantity `max_memory_allocated` measures on CUDA.
# Each measured call is a separate, untimed run.

# %%
#| export
def status_bytes(field:str # a size field of `/proc/self/status`: 'VmRSS', 'VmHWM', ...
                 ) -> int:
    "A size field of `/proc/self/status` in bytes."
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(field + ':'): return 1024 * int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


# %%
if os.path.exists('/proc/self/status'):
    assert status_bytes('VmHWM') >= status_bytes('VmRSS') > 0
    test_fail(lambda: status_bytes('VmNothing'), contains='has no VmNothing')


# %%
#| export
def _rss_peak(fn:Callable # function of no arguments
             ) -> float|None: # bytes; None where the resident set cannot be measured
    "Peak resident memory during `fn()` above the level before it (Linux)."
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        if hasattr(libc, 'malloc_trim'): libc.malloc_trim(0)   # freed heap goes back (and counts when reused)
        with open('/proc/self/clear_refs', 'w') as fh:
            fh.write('5')                                    # the high-water mark restarts at the size now
        base = status_bytes('VmRSS')
    except (OSError, AttributeError): return None
    fn()
    return float(max(0, status_bytes('VmHWM') - base))


# %%
assert _rss_peak(lambda: None) is None or _rss_peak(lambda: None) >= 0


# %%
#| export
def _profiler_peak(fn:Callable # function of no arguments
                  ) -> float: # bytes
    "Peak of the live CPU tensor bytes during `fn()`, from `torch.profiler`'s memory events."
    from torch.profiler import profile, ProfilerActivity
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')   # the profiler logs nothing (unless the user set a level)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = itertools.accumulate(e.nbytes() for e in events)
    return float(max(0, max(running, default=0)))


# %%
test_close(_profiler_peak(lambda: torch.zeros(250, 1000).sum()), 1e6, eps=1e3)

# %%
#| export
PeakMethod = Literal['auto', 'rss', 'profiler']   # how `peak_memory` measures on the CPU

def peak_memory(fn:Callable, # function of no arguments
                device:torch.device=torch.device('cpu'), # device whose allocations are measured
                method:PeakMethod='auto', # CPU: 'rss' (Linux), 'profiler' (live tensors) or 'auto' (rss if possible)
               ) -> float: # peak bytes during `fn()` above the level before it (NaN if unknown)
    "Peak memory `fn()` needs on `device` (CUDA: allocator statistics; CPU: resident-set high-water mark)."
    device = torch.device(device)
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    if device.type != 'cpu': return float('nan')
    if check_choice(method, PeakMethod, 'method') == 'profiler': return _profiler_peak(fn)
    peak = _rss_peak(fn)
    if peak is not None: return peak
    return float('nan') if method == 'rss' else _profiler_peak(fn)

# %% [markdown]
# A check with known sizes: a 4 MB tensor, its exponential (8 MB live), the first freed, a doubled copy (8 MB
# live again); the peak is 8 MB and inputs that exist before the call do not count. Live tensor bytes are
# exact; the resident set counts whole pages and a little of the interpreter's own memory (measured 9.66-10.04
# MB for the 10 MB buffer over repeated runs, and up to 10.03 MB for the 8 MB case inside a busy test worker:
# the bound allows 4 MB of the interpreter's own, far below the hundreds of MB that a wrong baseline would
# add).

# %%
def _two_live_buffers(x):
    y = x.exp()
    z = y * 2
    del y
    return z.sum()
x0 = torch.randn(1000, 1000)
test_close(peak_memory(lambda: _two_live_buffers(x0), method='profiler'), 8e6, eps=1e4)
test_close(peak_memory(lambda: torch.zeros(250, 1000).sum(), method='profiler'), 1e6, eps=1e3)
if _rss_peak(lambda: None) is not None:
    _two_live_buffers(x0)          # first-call costs (a second thread's stack, lazy set-up) are not counted
    for _ in range(2):             # the second time the freed pages of the first are back with the system too
        for fn, live in ((lambda: _two_live_buffers(x0), 8e6), (lambda: torch.zeros(2500, 1000).sum(), 1e7)):
            peak = peak_memory(fn)     # every live page counted; at most 4 MB more of the interpreter's own
            assert live - 5e5 <= peak <= live + 4e6, (peak, live)
test_fail(lambda: peak_memory(lambda: None, method='tracemalloc'), contains="method must be one of auto, rss")

# %% [markdown]
# ## Was the machine quiet?
#
# Timings mean little if something else ran at the same time (a training run, the test suite), and on a
# virtual machine the host can take time away too ("steal"). `cpu_counters` reads the busy time of all CPUs
# from `/proc/stat` and this process's own CPU time (with its finished children); `other_load` turns two
# readings into the share of the machine that other processes used in between, and the share stolen by the
# host. The benchmarks record both in their results and say in their reports when the machine was not quiet
# (other processes above 10 %).

# %%
#| export
def cpu_counters() -> dict|None:
    "Busy and stolen CPU seconds of the machine, this process's CPU seconds and the time; None without /proc."
    try: fields = open('/proc/stat').readline().split()
    except OSError: return None
    if not fields or fields[0] != 'cpu': return None
    hz, ticks = os.sysconf('SC_CLK_TCK'), [int(v) for v in fields[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    t = os.times()
    return dict(busy_s=(user + nice + system + irq + softirq) / hz, steal_s=steal / hz,
                own_s=t.user + t.system + t.children_user + t.children_system, wall_s=time.perf_counter(),
                cpus=os.cpu_count() or 1)


# %%
c0 = cpu_counters()
assert c0 is None or (c0['busy_s'] > 0 and c0['cpus'] >= 1 and c0['own_s'] > 0), c0


# %%
#| export
def other_load(before:dict|None, # `cpu_counters()` at the start
               after:dict|None # `cpu_counters()` at the end
              ) -> dict|None: # `other` and `steal`: shares of all CPUs over the interval
    "Share of the machine's CPUs used by other processes, and stolen by the host, between two `cpu_counters`."
    if not before or not after: return None
    span = max(after['wall_s'] - before['wall_s'], 1e-9) * after['cpus']
    other = (after['busy_s'] - before['busy_s']) - (after['own_s'] - before['own_s'])
    steal = (after['steal_s'] - before['steal_s']) / span
    return dict(other=min(max(other / span, 0.), 1.), steal=min(max(steal, 0.), 1.))

# %% [markdown]
# A busy process started beside us (a fresh interpreter summing an endless range) is seen, read before it is
# reaped so that its time is not ours; and the arithmetic on made-up counters: our own CPU time is not other
# load.

# %%
if cpu_counters() is not None:
    busy = multiprocessing.get_context('spawn').Process(target=sum, args=(range(10**15),), daemon=True)
    busy.start()
    try:
        time.sleep(0.5)
        c0 = cpu_counters()
        time.sleep(1.5)
        c1 = cpu_counters()
    finally:
        busy.kill()
        busy.join()
    seen = other_load(c0, c1)['other']
    assert seen >= 0.6 / c1['cpus'], seen       # one busy core of `cpus` (more if the machine is busy)
# 2 CPUs for 10 s: 12 busy CPU-seconds of which 5 are ours, 1 stolen -> others used 7 / 20, the host 1 / 20
a = dict(busy_s=100., steal_s=3., own_s=40., wall_s=50., cpus=2)
r = other_load(a, dict(busy_s=112., steal_s=4., own_s=45., wall_s=60., cpus=2))
test_eq(sorted(r), ['other', 'steal'])
test_close([r['other'], r['steal']], [0.35, 0.05])
test_eq(other_load(None, cpu_counters()), None)


# %%
#| export
def load_sentence(load:dict|None # `other_load` over a run
                 ) -> str: # '' without a measurement
    "The sentence of a report that says how much of the machine others used during the run."
    if not load: return ''
    quiet = load['other'] <= 0.1
    end = '.' if quiet else ': **not a quiet machine**, timings are pessimistic.'
    return (f" Other processes used {100 * load['other']:.0f} % of the CPUs during the run, the host stole "
            f"{100 * load['steal']:.0f} %" + end)


# %%
test_eq(load_sentence(None), '')
test_eq(load_sentence(dict(other=0.05, steal=0.)),
        ' Other processes used 5 % of the CPUs during the run, the host stole 0 %.')
assert 'not a quiet machine' in load_sentence(dict(other=0.3, steal=0.01))

# %% [markdown]
# ## The `exp` floor
#
# Every iteration of a log-domain Sinkhorn solver computes a log-sum-exp over all $B\,n\,m$ cost entries in
# each direction, so it exponentiates at least $2Bnm$ numbers. `exp_throughput` measures how many `torch.exp`
# the device does per second on a buffer small enough to stay in cache (32 K floats in and out, 256 KB, on the
# CPU; 4 M floats, 32 MB, inside an H100's 50 MB L2 on CUDA), the fastest block of `Timer.blocked_autorange`.
# The arguments are drawn in $[-80, 0]$: the range a stabilized solver feeds to `exp` (below about $-87$
# float32 `exp` underflows and torch's CPU kernel takes a path 20-70× slower, which a good solver avoids by
# clamping).

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
    timer = benchmark.Timer('torch.exp(x, out=y)', globals=dict(x=x, y=torch.empty_like(x)),
                            num_threads=torch.get_num_threads())
    return numel / min(timer.blocked_autorange(min_run_time=min_time).times)

# %% [markdown]
# The rate is that of the machine; what a test can check is that it is a rate of `exp` on this buffer: a
# buffer twice as long takes about twice as long (the rate changes far less than 2×).

# %%
rate = exp_throughput(min_time=0.05)
assert math.isfinite(rate) and rate > 0, rate
assert 0.4 < exp_throughput(numel=64 * 2**10, min_time=0.05) / rate < 2.5

# %% [markdown]
# ## The machine and the versions
#
# Each results file says where it was measured: the device, the platform, the CPU model (from
# `/proc/cpuinfo`), the GPU's name on CUDA, the CPU count and torch's thread count; and with which versions of
# Python, torch and the optional references.

# %%
#| export
def machine_info(device:torch.device|str # the device measured
                ) -> dict: # `device`, `platform`, `processor`, `cpu_count`, `torch_threads`, `cpu_model`, ...
    "A description of the machine a benchmark ran on."
    device = torch.device(device)
    out = dict(device=str(device), platform=platform.platform(),
               processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads())
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                out['cpu_model'] = line.split(':', 1)[1].strip()
                break
    except OSError: pass
    if device.type == 'cuda': out['gpu'] = torch.cuda.get_device_name(device)
    return out


# %%
m = machine_info('cpu')
test_eq((m['device'], m['cpu_count'], m['torch_threads']), ('cpu', os.cpu_count(), torch.get_num_threads()))


# %%
#| export
def versions() -> dict:
    "Versions of Python, torch and the optional packages the benchmarks compare with (those installed)."
    out = dict(python=platform.python_version(), torch=torch.__version__)
    for mod in ('geomloss', 'ot', 'numpy'):
        if has_module(mod):
            try: out[mod] = getattr(__import__(mod), '__version__', '?')
            except Exception: out[mod] = '?'
    return out


# %%
test_eq((versions()['torch'], versions()['python']), (torch.__version__, platform.python_version()))

# %% [markdown]
# ## Targets, JSON and tables
#
# A target is a value, a comparison with a goal and whether it is met (`None` when the value is missing or not
# finite). Results are written as strict JSON (`strict_json`: NaN and infinities become `null`, tensors and
# NumPy scalars plain numbers) and as Markdown tables (`markdown_table`, one alignment letter per column).

# %%
#| export
def target(name:str, # what is measured
           value:float|None, # the measured value (None: not measured)
           op:str, # '>=' or '<='
           bound:float, # the goal
           note:str='', # how it was measured
           method:str|None=None # the method whose speed it is, if any (profiled when the target is missed)
          ) -> dict: # `name`, `value`, `op`, `target`, `met`, `note`, `method`
    "A benchmark target and whether `value` meets it."
    measured = value is not None and math.isfinite(value)
    ok = (value >= bound if op == '>=' else value <= bound) if measured else None
    return dict(name=name, value=value, op=op, target=bound, met=ok, note=note, method=method)


# %%
test_eq([target('x', v, '>=', 5.)['met'] for v in (6., 4., None, float('nan'))], [True, False, None, None])
test_eq(target('y', 1e-5, '<=', 1e-4, method='m'),
        dict(name='y', value=1e-5, op='<=', target=1e-4, met=True, note='', method='m'))


# %%
#| export
def strict_json(obj # nested dicts, lists, tuples, numbers, tensors
               ):
    "A copy of `obj` for strict JSON: NaN/inf become None, tensors and NumPy scalars plain numbers."
    if isinstance(obj, dict): return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return [strict_json(v) for v in obj]
    if isinstance(obj, torch.Tensor): obj = obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, 'item') and not isinstance(obj, (str, bytes)): obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj): return None
    return obj


# %%
test_eq(strict_json({'a': [float('nan'), torch.tensor(2.)], 'b': float('inf'), 1: (3,)}),
        {'a': [None, 2.0], 'b': None, '1': [3]})


# %%
#| export
def markdown_table(header:Sequence[str], # column titles
                   rows:Iterable[Sequence], # the cells of each row (written with `str`; '' leaves it empty)
                   align:str # one letter per column: 'l' left, 'r' right, 'c' centred
                  ) -> list[str]: # the lines of the table
    "A Markdown table: the header line, the alignment line and one line per row."
    rule = dict(l='---', r='---:', c=':---:')
    line = lambda cells: '|' + '|'.join(f' {c} ' if str(c) else ' ' for c in cells) + '|'
    return [line(header), '|' + '|'.join(rule[a] for a in align) + '|', *(line(r) for r in rows)]


# %%
test_eq(markdown_table(['a', 'b', 'ok'], [[1, 'x', 'yes'], ['skipped', '', '']], 'lrc'),
        ['| a | b | ok |', '|---|---:|:---:|', '| 1 | x | yes |', '| skipped | | |'])


# %%
#| export
def fixed(v:float|None, # a number, or None where it was not measured
          digits:int=3 # decimals
         ) -> str:
    "`v` with `digits` decimals, '-' for None (a table cell)."
    return '-' if v is None else f"{v:.{digits}f}"


# %%
test_eq([fixed(0.12345), fixed(2, 2), fixed(None)], ['0.123', '2.00', '-'])

# %%
#| hide
import nbdev
nbdev.nbdev_export()
