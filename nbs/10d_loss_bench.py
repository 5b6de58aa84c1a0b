# %% [markdown]
# # The loss benchmark
#
# > Time, peak memory, iteration count and marginal error of the generalized loss against the official per-image recipe (geomloss) and POT, its share of a VGG19 training step, and the loss at the sizes people train with.

# %%
#| default_exp loss_bench

# %%
#| export
from __future__ import annotations
import json, os, statistics, sys, warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Sequence
import torch
import torch.utils.benchmark as benchmark
from uotcrowd.core import get_device, seed_everything, check_choice, literal_values
from uotcrowd.losses import GeneralizedLoss, loss_per_image
from uotcrowd.models import get_model
from uotcrowd.measure import (time_call, peak_memory, synchronize, has_module, torch_threads, cpu_counters,
                              other_load, load_sentence, machine_info, versions, target, strict_json,
                              markdown_table)
from uotcrowd.references import (make_problem, reference_loss, gl_diagnostics, official_recipe_loss,
                                 RECIPE_KWARGS)

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import math, tempfile
from unittest.mock import patch
from uotcrowd.measure import exp_throughput

# %%
#| hide
_threads = torch.get_num_threads()   # the tests below run on the threads the test run was given
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))

# %% [markdown]
# The generalized loss solves one unbalanced optimal-transport problem per image per training step, between
# the $n = hw$ pixels of the predicted density map and the $m$ annotated heads. Its price is what decides
# whether the loss is usable: this notebook measures it, always **side by side in one run on one device**,
# because only ratios between methods measured together mean anything on a shared machine
# ([Measurements](10b_measure.ipynb)).
#
# What is measured for each method, batch size $B$ and number of points $m$ (density map $64\times64$, i.e. a
# 512-px crop at stride 8):
#
# * **time** of forward + backward (median over repeats, after a warm-up call);
# * **peak memory** allocated during that call, above what was allocated before it;
# * the **loss** value, the number of **iterations** the solver ran and the **marginal error** it left, so
#   that speed is never bought by stopping early;
# * **time / floor**: the time divided by (iterations × the time of a plain `torch.exp` over the $2Bnm$ cost
#   entries that one symmetric Sinkhorn iteration exponentiates when each direction has its own log-sum-exp,
#   measured in cache), so the ratio says how much is left on the table. (`uotcrowd.sinkhorn` gets both
#   directions of a pair from one `exp2` per entry, which on a CPU is also cheaper than `exp`: its ratio can
#   go below 1.)

# %% [markdown]
# ## The methods under test
#
# Each method is a function `(density, points) -> loss` whose forward and backward are timed, plus a
# diagnostic run that reports the loss value, the solver's iterations (soft-min pairs per solve), the marginal
# error, and the number of `exp` the iterations need at least (`exp_entries`), from
# [the references](10c_references.ipynb):
#
# * `gl_official`, `gl_converged`: `uotcrowd.losses.GeneralizedLoss` on the whole batch, in its two solver
#   modes;
# * `loop_official`: the same loss called on one image at a time (`uotcrowd.losses.loss_per_image`), what the
#   official code does;
# * `geomloss`: the official trainer's recipe as the trainer writes it (`official_recipe_loss`): per image the
#   potentials from geomloss, the plan rebuilt from them and its transport, pixel and point terms. The `gl_*`
#   rows compute the same objective (`RECIPE_KWARGS`), so the loss difference checks the loss under test;
# * `pot`: the loss summed from POT's log-stabilized unbalanced Sinkhorn (`pot_iters` iterations,
#   `reference_loss(..., 'pot')`).
#
# Every row of the results has the keys `CASE_KEYS` (None where a number is not measured); a method whose
# package is missing (geomloss, POT: the `bench` extra) gives a row marked skipped.

# %%
#| export
BenchMethod = Literal['gl_official', 'gl_converged', 'loop_official', 'geomloss', 'pot']   # the rows of a case
METHODS = literal_values(BenchMethod)
_NEEDS = dict(geomloss='geomloss', pot='ot')   # the package each reference needs
CASE_KEYS = ('method', 'batch_size', 'n_points', 'size', 'stride', 'threads', 'skipped', 'time_s', 'time_min_s',
             'repeats', 'first_call_s', 'peak_mem_mib', 'loss', 'iterations', 'marginal_error', 'exp_entries',
             'floor_per_iteration_s', 'floor_s', 'time_over_floor')   # the keys of every row (None: not measured)

# %%
test_eq(METHODS, ('gl_official', 'gl_converged', 'loop_official', 'geomloss', 'pot'))
assert set(_NEEDS) <= set(METHODS) and len(set(CASE_KEYS)) == len(CASE_KEYS)


# %%
#| export
def _bench_kwargs(size:int, # density map side
                  stride:int, # input pixels per map pixel
                  gl_kwargs:dict|None # `GeneralizedLoss` arguments that override the recipe's
                 ) -> dict:
    "`GeneralizedLoss` arguments of the rows: the official recipe on `size*stride` crops, then `gl_kwargs`."
    return dict(dict(scale=float(size * stride), stride=stride, **RECIPE_KWARGS), **(gl_kwargs or {}))


# %%
test_eq(_bench_kwargs(16, 8, dict(eps=0.02, cost='dist')), {**RECIPE_KWARGS, 'scale': 128., 'stride': 8,
                                                           'eps': 0.02, 'cost': 'dist'})


# %%
#| export
def _forward_backward(fn:Callable, # loss `(density, points) -> scalar`
                      density:torch.Tensor, # the predicted density (left untouched)
                      points # the heads
                     ) -> Callable: # of no arguments: one forward and backward, returns the loss
    "One forward and backward of `fn` on a fresh leaf copy of `density`, as a function of no arguments."
    def call():
        d = density.detach().clone().requires_grad_()
        loss = fn(d, points)
        loss.backward()
        return loss
    return call


# %%
dens0 = torch.ones(1, 1, 2, 2)
test_eq([_forward_backward(lambda d, p: (d ** 2).sum(), dens0, None)().item() for _ in range(2)], [4., 4.])
test_eq(dens0.grad, None)


# %%
#| export
def _methods(gl_kwargs:dict, # `GeneralizedLoss` arguments (`_bench_kwargs`)
             pot_iters:int # POT iterations
            ) -> dict: # method name -> (loss function, diagnostics function)
    "The loss function and the diagnostics of each of `METHODS`."
    off = GeneralizedLoss(mode='official', **gl_kwargs)
    conv = GeneralizedLoss(mode='converged', **gl_kwargs)
    recipe = lambda d, p: official_recipe_loss(d, p, gl_kwargs['scale'], gl_kwargs['stride'])
    pot = lambda d, p: reference_loss(off, d, p, 'pot', pot_iters=pot_iters)
    def pot_diag(d, p):
        info = {}
        with torch.no_grad(): loss = reference_loss(off, d, p, 'pot', pot_iters=pot_iters, diagnostics=info)
        return dict(loss=float(loss), **info)
    def recipe_diag(d, p):
        info = {}
        with torch.no_grad(): loss = official_recipe_loss(d, p, gl_kwargs['scale'], gl_kwargs['stride'], info)
        return dict(loss=float(loss), **info)
    return dict(gl_official=(off, lambda d, p: gl_diagnostics(off, d, p)),
                gl_converged=(conv, lambda d, p: gl_diagnostics(conv, d, p)),
                loop_official=(lambda d, p: loss_per_image(off, d, p),
                               lambda d, p: gl_diagnostics(off, d, p, per_image=True)),
                geomloss=(recipe, recipe_diag), pot=(pot, pot_diag))


# %%
meths = _methods(_bench_kwargs(8, 8, None), 50)
test_eq(tuple(meths), METHODS)
dens_m, pts_m = make_problem(2, 6, size=8, seed=5)
l_ref = GeneralizedLoss(mode='official', **_bench_kwargs(8, 8, None))(dens_m, pts_m).item()
for name in ('gl_official', 'loop_official', 'geomloss'):          # the same objective, the same schedule
    fn, diag = meths[name]
    test_close(fn(dens_m, pts_m).item(), l_ref, eps=1e-5 * l_ref)
    test_close(diag(dens_m, pts_m)['loss'], l_ref, eps=1e-5 * l_ref)
test_eq(meths['pot'][1](dens_m, pts_m)['iterations'], 50)

# %% [markdown]
# ## One case
#
# `bench_case` measures one method on one problem: time (`time_call`), peak memory (`peak_memory`, one more
# call), the diagnostics of the method, and the floor: `floor_per_iteration_s` is the time of $2Bnm$ in-cache
# `exp`, and `time_over_floor` = time / (`exp_entries` / exp rate), i.e. time / (iterations × floor per
# iteration). `_measure_case` fills the row of one case that `bench_case` has checked and set up.

# %%
#| export
def _measure_case(row:dict, # the case's row (`CASE_KEYS`), filled here
                  method:BenchMethod, batch_size:int, n_points:int, size:int, stride:int, device:torch.device,
                  exp_rate:float|None, gl_kwargs:dict|None, pot_iters:int, repeats:int, budget:float,
                  long_call:float, memory:bool, seed:int): # as in `bench_case`
    "Fill `row` with the measurements of one case (see `bench_case`)."
    gl_kwargs = _bench_kwargs(size, stride, gl_kwargs)
    fn, diag = _methods(gl_kwargs, pot_iters)[method]
    density, points = make_problem(batch_size, n_points, size, stride, seed, device)
    call = _forward_backward(fn, density, points)
    t = time_call(call, repeats, budget, long_call)
    row.update(time_s=t['median'], time_min_s=t['min'], repeats=t['repeats'], first_call_s=t['first'])
    # No target concerns the converged mode's memory on the CPU: its working set is the official mode's (the
    # same buffers every pass, see 02a_kernels), and the profiler fallback of `peak_memory` would keep one event
    # per allocation of hundreds of passes. It is measured on CUDA.
    skip_mem = device.type == 'cpu' and method == 'gl_converged'
    row['peak_mem_mib'] = peak_memory(call, device) / 2**20 if memory and not skip_mem else float('nan')
    row.update(diag(density, points))
    if exp_rate:
        row['floor_per_iteration_s'] = 2 * batch_size * size * size * n_points / exp_rate
        row['floor_s'] = row['exp_entries'] / exp_rate
        row['time_over_floor'] = row['time_s'] / row['floor_s'] if row['floor_s'] > 0 else float('nan')


# %%
row0 = dict.fromkeys(CASE_KEYS)
_measure_case(row0, 'gl_official', 2, 20, 16, 8, torch.device('cpu'), None, None, 10, 1, 0., 10., False, 0)
test_eq((row0['iterations'], row0['floor_s']), (12, None))         # the official schedule; no exp rate: no floor
assert row0['time_s'] > 0 and math.isnan(row0['peak_mem_mib']), row0


# %%
#| export
def bench_case(method:BenchMethod, # one of `METHODS`
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
    "Time, peak memory, loss, iterations, marginal error and floor ratio of a method on a problem (`CASE_KEYS`)."
    device = torch.device(device)
    check_choice(method, BenchMethod, 'method')
    row = dict.fromkeys(CASE_KEYS)
    row.update(method=method, batch_size=batch_size, n_points=n_points, size=size, stride=stride,
               threads=threads)
    if method in _NEEDS and not has_module(_NEEDS[method]):
        row['skipped'] = f"{_NEEDS[method]} not installed"
        return row
    with torch_threads(threads):
        _measure_case(row, method, batch_size, n_points, size, stride, device, exp_rate, gl_kwargs, pot_iters,
                      repeats, budget, long_call, memory, seed)
    return row


# %%
rate = exp_throughput(min_time=0.05)
r = bench_case('gl_official', 2, 20, size=16, exp_rate=rate, repeats=1, budget=0.)
test_eq(tuple(r), CASE_KEYS)
test_eq(r['skipped'], None)
for k in ('time_s', 'peak_mem_mib', 'loss', 'floor_s', 'time_over_floor'):
    assert math.isfinite(r[k]) and r[k] > 0, (k, r)
test_eq(r['iterations'], 12)
test_eq(r['exp_entries'], 12 * 2 * 2 * 16 * 16 * 20)
test_close(r['time_over_floor'], r['time_s'] * rate / r['exp_entries'], eps=1e-9 * r['time_over_floor'])
with patch.dict(sys.modules, {'geomloss': None}):          # as where geomloss is not installed
    r0 = bench_case('geomloss', 1, 5, size=8)
test_eq(tuple(r0), CASE_KEYS)
test_eq(r0['skipped'], 'geomloss not installed')
test_eq([k for k in CASE_KEYS if r0[k] is not None],
        ['method', 'batch_size', 'n_points', 'size', 'stride', 'skipped'])
test_eq(bench_case('pot', 1, 5, size=8, memory=False)['method'], 'pot')
threads_before = torch.get_num_threads()
test_eq(bench_case('gl_official', 1, 5, size=8, memory=False, threads=2)['threads'], 2)
test_eq(torch.get_num_threads(), threads_before)                   # the thread count is restored
test_fail(lambda: bench_case('sinkhorn', 1, 5), contains='method must be one of gl_official, gl_converged')

# %% [markdown]
# ## Where the time goes
#
# `profile_case` runs one forward + backward of a method under `torch.profiler` and returns the table of the
# most expensive operators (self CPU/CUDA time), to find out why a target is missed. `run_bench` appends such
# a table to its report for each solver mode that misses a speed target.

# %%
#| export
def profile_case(method:BenchMethod='gl_official', # one of `METHODS`
                 batch_size:int=8, n_points:int=500, size:int=64, stride:int=8, # the problem (`make_problem`)
                 device:str|torch.device='auto',
                 row_limit:int=15, # operators listed
                 gl_kwargs:dict|None=None, # `GeneralizedLoss` arguments
                 pot_iters:int=100, # POT iterations
                 seed:int=0) -> str:
    "torch.profiler table (sorted by self time) of one forward + backward of `method`."
    from torch.profiler import profile, ProfilerActivity
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')
    device = get_device(device)
    fn, _ = _methods(_bench_kwargs(size, stride, gl_kwargs), pot_iters)[method]
    density, points = make_problem(batch_size, n_points, size, stride, seed, device)
    call = _forward_backward(fn, density, points)
    call()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=acts) as prof:
        call()
        synchronize(device)
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


# %%
assert 'exp2' in profile_case('gl_official', 2, 10, size=8, device='cpu', row_limit=200)   # all operators

# %% [markdown]
# ## A VGG19 training step
#
# The loss only matters in proportion to the rest of a training step. `train_step_times` times one Adam step
# of the paper's VGG19 density network (`uotcrowd.models.get_model('vgg19')`, random weights: speed does not
# depend on them) on a batch of `crop`×`crop` images, once with the loss and once with a trivial count loss
# $\frac1B\sum_b|\sum_i a_{bi}-m_b|$ in its place. The network's output goes through `abs` rather than `relu`
# so a randomly initialized network still predicts a non-zero density everywhere, as a trained one does around
# heads.
#
# Inside the step the loss runs on a detached copy of the predicted density (forward and backward), and the
# network's backward then starts from that copy's gradient: the result is the same step, and the loss's own
# time (`loss_in_step`, on the synchronizing clock `torch.utils.benchmark.timer`) is measured directly rather
# than as the small difference of two large, noisy step times (that difference is reported too, as
# `share_diff`). `share` = `loss_in_step` / step time with the loss.

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
        start = benchmark.timer()
        leaf = density.detach().requires_grad_()
        fn(leaf, points).backward()
        segments.append(benchmark.timer() - start)
        density.backward(leaf.grad)
        opt.step()
    out = dict(batch_size=batch_size, n_points=n_points, crop=crop)
    t = time_call(lambda: step(count_loss), repeats, budget, long_call)
    out.update(without_loss=t['median'], without_loss_repeats=t['repeats'])
    if loss_fn is not None:
        segments.clear()
        t = time_call(lambda: step(loss_fn), repeats, budget, long_call)
        out.update(with_loss=t['median'], with_loss_repeats=t['repeats'])
        out['loss_in_step'] = statistics.median(segments[-t['repeats']:])
        out['share'] = out['loss_in_step'] / out['with_loss']
        out['share_diff'] = (out['with_loss'] - out['without_loss']) / out['with_loss']
    return out


# %%
r = train_step_times(lambda d, p: (d - 1).pow(2).sum(), batch_size=1, n_points=5, crop=32, repeats=1, budget=0.)
assert r['without_loss'] > 0 and r['with_loss'] > r['loss_in_step'] > 0 and 0 < r['share'] < 1
test_close(r['share'], r['loss_in_step'] / r['with_loss'], eps=1e-12)

# %% [markdown]
# ## The loss at the sizes people train with
#
# `loss_sizes` times the loss against the official trainer's recipe (`official_recipe_loss`) at the sizes
# training produces: B=8 with 32×32 maps and 200 heads (256-pixel crops at stride 8, ShanghaiTech part B) and
# with 64×64 maps and 500 heads (512-pixel crops), forward + backward, at 1 and 2 torch threads. At each size
# and thread count the three calls (official mode, converged mode, recipe) are timed in turn on the
# synchronizing clock `torch.utils.benchmark.timer`, once per round, `runs` rounds after one warm-up round, so
# that the ratios of a round are measured side by side; a ratio is the median of its per-round ratios,
# reported with their minimum and maximum (the spread within the run). Targets: official mode ≥ 5× the recipe,
# converged mode (marginal error ≤ 1e-3) ≥ 2×, the official mode's loss within 1e-4 of the recipe's. It runs
# on its own in about a minute on a 2-core CPU (`uotcrowd bench --loss-sizes-only`; `run_bench` includes it in
# a full run); `LOSS_SIZES_QUICK` is its quick subset.

# %%
#| export
LOSS_SIZES = ((8, 200, 32), (8, 500, 64))  # (B, heads per image, map side) of `loss_sizes`
LOSS_SIZES_QUICK = dict(sizes=((2, 50, 32),), threads=(1,), runs=1)   # `loss_sizes` arguments of a quick run
SIZE_GOALS = (('official speed-up over the recipe', '>=', 5.), ('converged speed-up over the recipe', '>=', 2.),
              ('loss difference official vs recipe', '<=', 1e-4),
              ('converged marginal error', '<=', 1e-3))

def _size_row(B:int, m:int, size:int, stride:int, # the problem (`make_problem`)
              threads:int|None, device:torch.device, runs:int, seed:int,
              gl_kwargs:dict|None) -> dict: # as in `loss_sizes`
    "One size at one thread count: the three calls timed in turn for `runs` rounds (after a warm-up round)."
    kw = _bench_kwargs(size, stride, gl_kwargs)
    off, conv = GeneralizedLoss(mode='official', **kw), GeneralizedLoss(mode='converged', **kw)
    density, points = make_problem(B, m, size, stride, seed, device)
    recipe = lambda d, p: official_recipe_loss(d, p, kw['scale'], stride)
    losses = dict(official=off, converged=conv, recipe=recipe)
    calls = {name: _forward_backward(fn, density, points) for name, fn in losses.items()}
    times = {name: [] for name in calls}
    with torch_threads(threads):
        for r in range(runs + 1):
            for name, call in calls.items():
                start = benchmark.timer()
                call()
                if r: times[name].append(benchmark.timer() - start)
        d_off, d_conv = gl_diagnostics(off, density, points), gl_diagnostics(conv, density, points)
        with torch.no_grad(): l_rec = float(official_recipe_loss(density, points, kw['scale'], stride))
    ratios = {k: [a / b for a, b in zip(times['recipe'], times[k])] for k in ('official', 'converged')}
    spread = (('', statistics.median), ('_min', min), ('_max', max))
    row = dict(batch_size=B, n_points=m, size=size, threads=threads, runs=runs,
               **{f'{k}_ms': 1e3 * statistics.median(v) for k, v in times.items()},
               **{f'{k}_speedup{q}': f(ratios[k]) for k in ratios for q, f in spread},
               loss_official=d_off['loss'], loss_converged=d_conv['loss'], loss_recipe=l_rec,
               loss_difference=abs(d_off['loss'] - l_rec) / abs(l_rec),
               converged_iterations=d_conv['iterations'], converged_marginal_error=d_conv['marginal_error'])
    values = (row['official_speedup'], row['converged_speedup'], row['loss_difference'],
              row['converged_marginal_error'])
    row['targets'] = [target(name, v, op, bound) for (name, op, bound), v in zip(SIZE_GOALS, values)]
    return row


# %%
row_s = _size_row(2, 20, 8, 8, 1, torch.device('cpu'), 2, 0, None)
test_eq((row_s['batch_size'], row_s['size'], row_s['threads'], row_s['runs']), (2, 8, 1, 2))
assert row_s['official_speedup_min'] <= row_s['official_speedup'] <= row_s['official_speedup_max'], row_s
test_close(row_s['loss_difference'], abs(row_s['loss_official'] - row_s['loss_recipe']) / row_s['loss_recipe'])
test_eq([t['name'] for t in row_s['targets']], [n for n, _, _ in SIZE_GOALS])


# %%
#| export
def loss_sizes_markdown(res:dict # result of `loss_sizes`
                       ) -> str:
    "The table of `loss_sizes`."
    span = lambda r, k: f"{r[k]:.2f} ({r[k + '_min']:.2f}-{r[k + '_max']:.2f})"
    rows = [[r['batch_size'], r['n_points'], f"{r['size']}×{r['size']}", r['threads'] or '-',
             f"{r['official_ms']:.1f}", f"{r['converged_ms']:.1f}", f"{r['recipe_ms']:.1f}",
             span(r, 'official_speedup'), span(r, 'converged_speedup'), f"{r['loss_difference']:.1e}",
             f"{r['converged_marginal_error']:.1e} ({r['converged_iterations']})",
             'yes' if all(t['met'] for t in r['targets']) else '**no**'] for r in res['rows']]
    header = ['B', 'heads', 'map', 'threads', 'official (ms)', 'converged (ms)', 'recipe (ms)',
              'recipe / official', 'recipe / converged', 'loss diff', 'converged error (pairs)', 'targets met']
    lines = [f"**The loss at training sizes** against the official trainer's recipe (forward + backward, median "
             f"of {res['runs']} rounds; speed-ups: median of the per-round ratios, with their min-max):", '',
             *markdown_table(header, rows, 'r' * 11 + 'c'),
             '', 'Goals: ' + '; '.join(f"{n} {op} {g:g}" for n, op, g in SIZE_GOALS) + '.']
    return '\n'.join(lines) + '\n'


# %%
md_s = loss_sizes_markdown(dict(runs=2, rows=[row_s]))
assert md_s.startswith('**The loss at training sizes**') and '| 2 | 20 | 8×8 | 1 |' in md_s, md_s
assert '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|' in md_s


# %%
#| export
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
    "Official and converged mode against the official trainer's recipe at training sizes, per thread count."
    device = get_device(device)
    counters, rows = cpu_counters(), []
    for B, m, size in sizes:
        for th in threads:
            r = _size_row(B, m, size, stride, th, device, runs, seed, gl_kwargs)
            rows.append(r)
            if verbose: print(f"  B={B} m={m} {size}x{size} {th} thr: official {r['official_ms']:.1f} ms, "
                              f"converged {r['converged_ms']:.1f} ms, recipe {r['recipe_ms']:.1f} ms: "
                              f"x{r['official_speedup']:.2f} (x{r['official_speedup_min']:.2f}-"
                              f"{r['official_speedup_max']:.2f}), x{r['converged_speedup']:.2f} "
                              f"(x{r['converged_speedup_min']:.2f}-{r['converged_speedup_max']:.2f})",
                              file=sys.stderr, flush=True)
    machine = machine_info(device)
    machine['load'] = other_load(counters, cpu_counters())
    res = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), machine=machine,
               versions=versions(), runs=runs, rows=rows)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f'{stem}.json').write_text(json.dumps(strict_json(res), indent=1, allow_nan=False))
        where = machine.get('gpu') or machine.get('cpu_model') or machine['processor']
        (out_dir / f'{stem}.md').write_text(f"**Device** {where} ({machine['device']}), {res['date']}."
                                            f"{load_sentence(machine['load'])}\n\n" + loss_sizes_markdown(res))
    return res

# %% [markdown]
# A small run (two tiny sizes, one round): every row holds its three times, the per-round ratios and the
# targets computed from them, and the official mode's loss equals the recipe's.

# %%
with tempfile.TemporaryDirectory() as tmp:
    ls = loss_sizes(tmp, sizes=((2, 20, 8), (1, 10, 12)), threads=(1,), runs=1, verbose=False)
    ls_md = (Path(tmp) / 'loss_sizes.md').read_text()
    saved_ls = json.loads((Path(tmp) / 'loss_sizes.json').read_text())
test_eq([(r['batch_size'], r['size'], r['threads']) for r in ls['rows']], [(2, 8, 1), (1, 12, 1)])
for r in ls['rows']:
    test_close(r['official_speedup'], r['recipe_ms'] / r['official_ms'], eps=1e-9 * r['official_speedup'])
    test_eq(r['official_speedup_min'], r['official_speedup_max'])          # one round
    test_eq([t['name'] for t in r['targets']], [n for n, _, _ in SIZE_GOALS])
    assert r['loss_difference'] <= 1e-5 and r['converged_marginal_error'] <= 1e-3, r
assert ls_md.startswith('**Device**') and '| 2 | 20 | 8×8 | 1 |' in ls_md
test_eq(saved_ls['rows'][1]['n_points'], 10)

# %%
#| hide
torch.set_num_threads(_threads)

# %%
#| hide
import nbdev
nbdev.nbdev_export()
