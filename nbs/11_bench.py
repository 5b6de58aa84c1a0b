# %% [markdown]
# # Benchmarks
#
# > `uotcrowd bench`: the loss against the official per-image recipe (geomloss) and POT, its share of a VGG19 training step, the loss at training sizes, training throughput per precision and ONNX Runtime, measured on one device in one run and written as JSON and Markdown.

# %%
#| default_exp bench

# %%
#| export
from __future__ import annotations
import json, math, sys, time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence
import torch
from uotcrowd.core import get_device, check_choice
from uotcrowd.losses import GeneralizedLoss
from uotcrowd.measure import (exp_throughput, cpu_counters, other_load, load_sentence, machine_info, versions,
                              has_module, torch_threads, target, strict_json, markdown_table)
from uotcrowd.loss_bench import (METHODS, BenchMethod, bench_case, profile_case, train_step_times, loss_sizes,
                                 loss_sizes_markdown, LOSS_SIZES_QUICK)
from uotcrowd.throughput import training_throughput, throughput_markdown, THROUGHPUT_MODELS, THROUGHPUT_QUICK
from uotcrowd.onnx_bench import onnx_inference, onnx_markdown, ONNX_QUICK

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import os, tempfile
from uotcrowd.loss_bench import CASE_KEYS
from uotcrowd.throughput import THROUGHPUT_VARIANTS

# %%
#| hide
_threads = torch.get_num_threads()   # restored for the full benchmark below
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))

# %% [markdown]
# `run_bench` (and `uotcrowd bench`, which calls it) measures on one device, in one run, what the benchmark
# notebooks define: [the loss](10d_loss_bench.ipynb) against the official trainer's recipe on geomloss and
# against POT ([the references](10c_references.ipynb)), its share of a VGG19 training step and the loss at the
# sizes people train with; [training throughput](10e_throughput.ipynb) per precision; and
# [ONNX Runtime](10f_onnx_bench.ipynb) against PyTorch. Every number is taken with the functions of
# [Measurements](10b_measure.ipynb), and every target is a ratio of numbers measured side by side in the same
# run.

# %% [markdown]
# ## `run_bench`
#
# One call measures everything on one device and writes `bench.json` (all numbers, with the machine, versions
# and settings) and `bench.md` (the tables) into `out_dir`. The full run covers the configurations `CONFIGS`:
# B=8 with a 64×64 map (512-px crops, stride 8) and 500 points and with a 32×32 map and 200 points, each with
# 1 and 2 torch threads, then B=8 with 2000 points and a single image with 500 points (64×64, one thread), and
# the VGG19 step at B=8, 500 points; it takes several minutes on a CPU. `configs=` lists others as
# `(B, points, map side, threads)` (threads None: as set); `batch_sizes` × `n_points` on one map `size` gives
# the grid of earlier runs. `quick=True` runs a small subset (B=2, 50 points, a 32×32 map, VGG19 on 128-px
# crops) in well under a minute, for tests. geomloss and POT are optional (the `bench` extra); methods whose
# package is missing are reported as skipped. A run of the default configurations also runs `loss_sizes` (the
# two training sizes at 1 and 2 threads, each ratio against the official trainer's recipe measured round by
# round); `training_sizes=` switches it on or off, or gives its arguments (a quick run takes
# `LOSS_SIZES_QUICK`).
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
# **Targets per configuration** (`config_targets`): in each configuration with both solver modes and the
# geomloss loop, `official` ≥ 5× faster than the geomloss loop with a loss within 1e-4 of it, `converged`
# (marginal error ≤ 1e-3) no slower than the geomloss loop, and the peak memory of `official` no larger than
# the loop's.

# %% [markdown]
# ## Targets

# %%
#| export
def _same_config(row:dict, # a case row (`CASE_KEYS`)
                 cfg:dict # a configuration: `batch_size`, `n_points` and possibly `size`, `threads`
                ) -> bool:
    "Whether a case row belongs to a configuration (B, points and, where it names them, map and threads)."
    return all(row.get(k) == cfg[k] for k in ('batch_size', 'n_points', 'size', 'threads') if k in cfg)


# %%
row_a = dict(batch_size=8, n_points=500, size=64, threads=1)
test_eq([_same_config(row_a, c) for c in (dict(batch_size=8, n_points=500), dict(batch_size=8, n_points=500,
                                                                                threads=2))], [True, False])


# %%
#| export
def _rows_of(results:dict, # the results of `run_bench` so far (`cases`)
             cfg:dict # the configuration
            ) -> dict: # method -> its row
    "The measured (not skipped) rows of one configuration, by method."
    return {r['method']: r for r in results['cases'] if _same_config(r, cfg) and not r.get('skipped')}


# %%
two_rows = [dict(row_a, method='pot', skipped=None), dict(row_a, method='geomloss', skipped='x')]
test_eq(list(_rows_of(dict(cases=two_rows), row_a)), ['pot'])


# %%
#| export
def _ratio(x:float|None, y:float|None) -> float|None:
    "x / y, None where either is missing or y is not positive."
    return x / y if x is not None and y is not None and y > 0 else None


# %%
test_eq([_ratio(6., 2.), _ratio(None, 2.), _ratio(1., 0.)], [3., None, None])

# %%
#| export
CONFIG_GOALS = (('official speed-up over the geomloss loop', '>=', 5.),
                ('loss difference official vs geomloss', '<=', 1e-4),
                ('converged time / geomloss loop', '<=', 1.), ('converged marginal error', '<=', 1e-3),
                ('peak memory official / geomloss loop', '<=', 1.))

def config_targets(results:dict # the results of `run_bench` so far (`config`, `cases`)
                  ) -> list[dict]:
    "For each configuration of the run, the values of `CONFIG_GOALS` (None where missing) and whether met."
    out = []
    for cfg in results['config']['configs']:
        rows = _rows_of(results, cfg)
        get = lambda m, k: None if rows.get(m, {}).get(k) is None else float(rows[m][k])
        off, geo = get('gl_official', 'loss'), get('geomloss', 'loss')
        values = [_ratio(get('geomloss', 'time_s'), get('gl_official', 'time_s')),
                  None if off is None or geo is None else abs(off - geo) / abs(geo),
                  _ratio(get('gl_converged', 'time_s'), get('geomloss', 'time_s')),
                  get('gl_converged', 'marginal_error'),
                  _ratio(get('gl_official', 'peak_mem_mib'), get('geomloss', 'peak_mem_mib'))]
        targets = [target(name, v, op, bound) for (name, op, bound), v in zip(CONFIG_GOALS, values)]
        out.append(dict(cfg, targets=targets))
    return out

# %% [markdown]
# On made-up rows (times in seconds, two configurations that differ in their thread count), each
# configuration's targets come from its own rows:

# %%
def made_up_row(method, threads, time_s, loss=1., err=None, mem=None):
    return dict(method=method, batch_size=8, n_points=500, size=64, threads=threads, skipped=None,
                time_s=time_s, loss=loss, iterations=12, marginal_error=err, peak_mem_mib=mem)
made_up = dict(config=dict(configs=[dict(batch_size=8, n_points=500, size=64, threads=t) for t in (1, 2)],
                           target_case=dict(batch_size=8, n_points=500, size=64, threads=1)),
               cases=[made_up_row('gl_official', 1, 0.1, mem=10.),
                      made_up_row('gl_converged', 1, 0.3, err=5e-4),
                      made_up_row('geomloss', 1, 0.6, loss=1.00002, mem=20.),
                      made_up_row('gl_official', 2, 0.2), made_up_row('geomloss', 2, 0.4)])
ct = config_targets(made_up)
test_eq([[t['value'] is not None for t in c['targets']] for c in ct],
        [[True] * 5, [True, True, False, False, False]])
test_close([t['value'] for t in ct[0]['targets']], [6., 2e-5 / 1.00002, 0.5, 5e-4, 0.5])
test_eq([t['met'] for t in ct[0]['targets']], [True, True, True, True, True])
test_eq((ct[1]['targets'][0]['value'], ct[1]['targets'][0]['met']), (2., False))


# %%
#| export
def evaluate_targets(results:dict # the results of `run_bench` so far (`config`, `cases`, `vgg19`)
                    ) -> list[dict]:
    "The speed, memory and accuracy targets of the benchmark, evaluated on the rows of the target case."
    rows = _rows_of(results, results['config']['target_case'])
    def get(m, k):
        v = rows.get(m, {}).get(k)
        return float(v) if v is not None else None
    off, conv, geo, pot = (get(m, 'time_s') for m in ('gl_official', 'gl_converged', 'geomloss', 'pot'))
    l_off, l_geo = get('gl_official', 'loss'), get('geomloss', 'loss')
    ldiff = None if l_off is None or l_geo is None else abs(l_off - l_geo) / abs(l_geo)
    mem = get('gl_official', 'peak_mem_mib')
    vgg = results.get('vgg19') or {}
    mem_geo, mem_loop = get('geomloss', 'peak_mem_mib'), get('loop_official', 'peak_mem_mib')
    floor_off, floor_conv = get('gl_official', 'time_over_floor'), get('gl_converged', 'time_over_floor')
    return [target('speed-up of official over the geomloss loop', _ratio(geo, off), '>=', 5.,
                   method='gl_official'),
            target('relative loss difference official vs geomloss', ldiff, '<=', 1e-4),
            target('speed-up of official over POT', _ratio(pot, off), '>=', 10., method='gl_official'),
            target('peak memory official / geomloss loop', _ratio(mem, mem_geo), '<=', 1.),
            target('peak memory official / per-image loop', _ratio(mem, mem_loop), '<=', 1.),
            target('marginal error of converged', get('gl_converged', 'marginal_error'), '<=', 1e-3),
            target('time converged / geomloss loop', _ratio(conv, geo), '<=', 1., method='gl_converged'),
            target('official time / (iterations x exp floor)', floor_off, '<=', 3., method='gl_official'),
            target('converged time / (iterations x exp floor)', floor_conv, '<=', 3., method='gl_converged'),
            target('loss share of a VGG19 training step', vgg.get('share'), '<=', 0.15,
                   note='time of the loss inside the step / step time')]


# %%
tg = {t['name']: t for t in evaluate_targets(made_up)}
test_close(tg['speed-up of official over the geomloss loop']['value'], 6.)
test_eq(tg['speed-up of official over POT']['value'], None)           # no POT row
test_eq(tg['loss share of a VGG19 training step']['met'], None)       # no VGG19 step
test_eq(tg['time converged / geomloss loop']['method'], 'gl_converged')

# %% [markdown]
# ## The report
#
# `results_markdown` writes the machine line, one table of cases per map size and thread count, the targets,
# the targets per configuration, the VGG19 step and the tables of the other sections.

# %%
#| export
def _fmt(v, # a number, a string, or None
         kind:str='g' # 'ms' (seconds shown in ms), 'e', 'x' (ratio), 'mib' or 'g'
        ) -> str:
    "A table cell: '-' for a missing or non-finite number."
    if v is None: return '-'
    if isinstance(v, str): return v
    if isinstance(v, float) and not math.isfinite(v): return '-'
    if kind == 'ms': return f"{1e3 * v:.1f}"
    if kind == 'e': return f"{v:.1e}"
    if kind in ('x', 'mib'): return f"{v:.1f}" if kind == 'mib' else f"{v:.2f}"
    return f"{v:.5g}" if isinstance(v, float) else str(v)


# %%
test_eq([_fmt(None), _fmt(float('nan')), _fmt(0.01234, 'ms'), _fmt(3e-5, 'e'), _fmt(2., 'x'),
         _fmt(1.25, 'mib'), _fmt(3), _fmt(1 / 3)], ['-', '-', '12.3', '3.0e-05', '2.00', '1.2', '3', '0.33333'])


# %%
#| export
def _case_tables(results:dict # the results of `run_bench`
                ) -> list[str]: # lines
    "One table of the case rows per map size and thread count."
    m, c, lines = results['machine'], results['config'], []
    header = ['method', 'B', 'points', 'time (ms)', 'peak mem (MiB)', 'loss', 'iterations', 'marginal error',
              'time / floor']
    for size, threads in dict.fromkeys((r['size'], r.get('threads')) for r in results['cases']):
        n = threads or m['torch_threads']
        rows = [[r['method'], r['batch_size'], r['n_points'], f"skipped: {r['skipped']}", '', '', '', '', '']
                if r.get('skipped') else
                [r['method'], r['batch_size'], r['n_points'], _fmt(r['time_s'], 'ms'),
                 _fmt(r['peak_mem_mib'], 'mib'), _fmt(r['loss']), r['iterations'],
                 _fmt(r['marginal_error'], 'e'), _fmt(r.get('time_over_floor'), 'x')]
                for r in results['cases'] if (r['size'], r.get('threads')) == (size, threads)]
        title = f"*Map {size}×{size} (crop {size * c['stride']}), {n} torch thread{'s' if n != 1 else ''}:*"
        lines += ['', title, '', *markdown_table(header, rows, 'l' + 'r' * 8)]
    return lines

# %% [markdown]
# The report of made-up rows: one table per thread count, with the row of a skipped method.

# %%
made_up['cases'].append(dict(made_up_row('pot', 2, None), skipped='ot not installed'))
report = dict(made_up, date='today', machine=dict(device='cpu', processor='x86_64', torch_threads=1),
              versions=dict(torch='2'), exp_rate=1e9, targets=evaluate_targets(made_up),
              config_targets=config_targets(made_up), config=dict(made_up['config'], stride=8, pot_iters=100,
                                                                  quick=False))
case_lines = _case_tables(report)
test_eq([l for l in case_lines if l.startswith('*Map')],
        ['*Map 64×64 (crop 512), 1 torch thread:*', '*Map 64×64 (crop 512), 2 torch threads:*'])
assert '| pot | 8 | 500 | skipped: ot not installed | | | | | |' in case_lines, case_lines
assert '| gl_official | 8 | 500 | 100.0 | 10.0 | 1 | 12 | - | - |' in case_lines, case_lines


# %%
#| export
def _target_tables(results:dict # the results of `run_bench`
                  ) -> list[str]: # lines
    "The table of the targets at the target case and, where the run has them, the targets per configuration."
    tc, m = results['config']['target_case'], results['machine']
    kind = lambda t: 'e' if 'error' in t['name'] or 'difference' in t['name'] else 'x'
    rows = [[t['name'], _fmt(t['value'], kind(t)), f"{t['op']} {t['target']:g}",
             '-' if t['met'] is None else ('yes' if t['met'] else '**no**')] for t in results['targets']]
    lines = ['', f"**Targets** at B={tc['batch_size']}, {tc['n_points']} points:", '',
             *markdown_table(['target', 'value', 'goal', 'met'], rows, 'lrrc')]
    if not results.get('config_targets'): return lines
    header = ['B', 'points', 'map', 'threads', *(f"{n} ({op} {g:g})" for n, op, g in CONFIG_GOALS)]
    cell = lambda t: ('-' if t['value'] is None else
                      f"{_fmt(t['value'], kind(t))} {'yes' if t['met'] else '**no**'}")
    rows = [[ct['batch_size'], ct['n_points'], f"{ct['size']}×{ct['size']}",
             ct.get('threads') or m['torch_threads'], *(cell(t) for t in ct['targets'])]
            for ct in results['config_targets']]
    return lines + ['', '**Targets per configuration** (value, and whether the goal is met):', '',
                    *markdown_table(header, rows, 'r' * len(header))]


# %%
target_lines = _target_tables(report)
assert '| speed-up of official over the geomloss loop | 6.00 | >= 5 | yes |' in target_lines, target_lines
assert '| 8 | 500 | 64×64 | 2 | 2.00 **no** | 0.0e+00 yes | - | - | - |' in target_lines, target_lines


# %%
#| export
def results_markdown(results:dict # the results of `run_bench`
                    ) -> str:
    "The results as Markdown: machine line, per-case tables, targets, the VGG19 step and the other sections."
    m, c = results['machine'], results['config']
    lines = [f"**Device** {m.get('gpu') or m.get('cpu_model') or m['processor']} ({m['device']}, "
             f"{m['torch_threads']} torch threads), torch {results['versions']['torch']}, {results['date']}. "
             f"`exp` floor: {results['exp_rate'] / 1e9:.2f} G exp/s in cache. "
             f"Stride {c['stride']}; POT {c['pot_iters']} iterations." + (" Quick run." if c['quick'] else '')
             + load_sentence(m.get('load'))]
    lines += _case_tables(results) + _target_tables(results)
    v = results.get('vgg19')
    if v:
        with_loss, in_step = _fmt(v.get('with_loss'), 'ms'), _fmt(v.get('loss_in_step'), 'ms')
        lines += ['', f"**VGG19 training step** (B={v['batch_size']}, {v['crop']}×{v['crop']} crops, "
                  f"{v['n_points']} points, Adam): {_fmt(v['without_loss'], 'ms')} ms without the loss, "
                  f"{with_loss} ms with `GeneralizedLoss` (official mode), of which the loss takes {in_step} ms: "
                  f"{100 * v['share']:.1f} % of the step (difference of the two step times: "
                  f"{100 * v['share_diff']:.1f} %)." if 'share' in v else '']
    if results.get('throughput'): lines += ['', throughput_markdown(results['throughput']).rstrip('\n')]
    if results.get('onnx'): lines += ['', onnx_markdown(results['onnx']).rstrip('\n')]
    if results.get('loss_sizes'): lines += ['', loss_sizes_markdown(results['loss_sizes']).rstrip('\n')]
    for meth, table in (results.get('profiles') or {}).items():
        what = "one forward + backward at the target case, operators by self time"
        lines += ['', f"**Profile of `{meth}`** ({what}):", '', '```', table.strip('\n'), '```']
    return '\n'.join(lines) + '\n'


# %%
md_r = results_markdown(report)
assert md_r.startswith('**Device** x86_64 (cpu, 1 torch threads), torch 2, today.'), md_r
assert all(l in md_r.splitlines() for l in case_lines + target_lines)

# %% [markdown]
# ## The run

# %%
#| export
CONFIGS = ((8, 500, 64, 1), (8, 500, 64, 2), (8, 200, 32, 1), (8, 200, 32, 2), (8, 2000, 64, 1),
           (1, 500, 64, 1))   # (B, points, map side, torch threads) of the full run

def run_bench(out_dir:str|Path, # folder for bench.json and bench.md (created)
              device:str|torch.device='auto', # 'auto', 'cpu', 'cuda', ...
              quick:bool=False, # small subset (< 60 s), for tests
              batch_sizes:Sequence[int]|None=None, # with `n_points`, `size`: a grid (default (1, 8); quick (2,))
              n_points:Sequence[int]|None=None, # points of the grid (default (50, 500, 2000); quick (50,))
              size:int|None=None, # density map side of the grid; default 64, quick 32
              configs:Sequence[tuple]|None=None, # (B, points, map side, threads or None) per configuration
              stride:int=8, # input pixels per map pixel
              methods:Sequence[BenchMethod]=METHODS, # which methods to run
              target_case:tuple|None=None, # (B, points) of the targets; default (8, 500) or the largest
              pot_iters:int=100, # POT iterations
              vgg:bool=True, # time the VGG19 training step
              vgg_crop:int|None=None, # crop side of the VGG19 step (default size*stride; quick 128)
              gl_kwargs:dict|None=None, # extra `GeneralizedLoss` arguments
              repeats:int|None=None, # timed calls per case at most, about (default 5, quick 2)
              budget:float|None=None, # seconds of timed calls per case (default 3, quick 0.3)
              memory:bool=True, # measure peak memory
              seed:int=0,
              profile:bool|None=None, # profile the solver modes that miss a speed target (default: not quick)
              throughput:bool|dict=True, # training throughput; a dict: `training_throughput` arguments
              onnx:bool|dict|None=None, # onnxruntime (default: on a CPU, with onnx); a dict: its arguments
              training_sizes:bool|dict|None=None, # `loss_sizes` (default: a full run); a dict: its arguments
              stem:str='bench', # file names: `{stem}.json`, `{stem}.md`
              verbose:bool=True, # print one line per case (to stderr)
             ) -> dict:
    "Run the benchmark on one device, write `bench.json` and `bench.md` into `out_dir`, return the results."
    device = get_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = configs is None and not (quick or batch_sizes or n_points or size)    # the default configurations
    if configs is None and not full:
        grid_b = batch_sizes or ((2,) if quick else (1, 8))
        grid_m = n_points or ((50,) if quick else (50, 500, 2000))
        configs = [(B, m, size or (32 if quick else 64), None) for B in grid_b for m in grid_m]
    configs = [dict(batch_size=B, n_points=m, size=sz, threads=th) for B, m, sz, th in (configs or CONFIGS)]
    pairs = [(c['batch_size'], c['n_points']) for c in configs]
    if target_case is None: target_case = (8, 500) if (8, 500) in pairs else max(pairs)
    target_cfg = next((c for c in configs if (c['batch_size'], c['n_points']) == tuple(target_case)),
                  dict(batch_size=target_case[0], n_points=target_case[1]))
    size = target_cfg.get('size', configs[0]['size'])
    repeats = repeats or (2 if quick else 5)
    budget = budget if budget is not None else (0.3 if quick else 3.)
    vgg_crop = vgg_crop or (128 if quick else size * stride)
    for meth in methods: check_choice(meth, BenchMethod, 'methods')
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    t_start, counters = time.perf_counter(), cpu_counters()
    exp_rate = exp_throughput(device)
    log(f"bench on {device}: exp floor {exp_rate / 1e9:.2f} G exp/s")
    config = dict(quick=quick, batch_sizes=sorted({c['batch_size'] for c in configs}),
                  n_points=sorted({c['n_points'] for c in configs}), size=size, stride=stride,
                  configs=configs, methods=list(methods), pot_iters=pot_iters, repeats=repeats, budget=budget,
                  seed=seed,
                  gl_kwargs=dict(gl_kwargs or {}), vgg_crop=vgg_crop, target_case=target_cfg)
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
    results = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                   machine=machine_info(device), versions=versions(), exp_rate=exp_rate, config=config,
                   cases=cases)
    if vgg:
        gl = GeneralizedLoss(mode='official', **{'scale': float(vgg_crop), 'stride': stride,
                                                 **(gl_kwargs or {})})
        v = results['vgg19'] = train_step_times(gl, target_case[0], target_case[1], vgg_crop, device, seed=seed,
                                                repeats=1 if quick else 3, budget=0. if quick else 20.)
        log(f"  vgg19 step B={target_case[0]} crop {vgg_crop}: {v['without_loss']:.2f} s without, "
            f"{v['with_loss']:.2f} s with the loss ({100 * v['share']:.1f} %)")
    if throughput:
        kw = dict(THROUGHPUT_QUICK) if quick else dict(models=THROUGHPUT_MODELS)
        if not vgg: kw['models'] = tuple(m for m in kw['models'] if m[0] != 'vgg19')  # `models` given still win
        kw.update(throughput if isinstance(throughput, dict) else {})
        log("training throughput (step and evaluation time per precision):")
        results['throughput'] = training_throughput(device=device, seed=seed, log=log, **kw)
    if onnx is None: onnx = device.type == 'cpu' and has_module('onnx') and has_module('onnxruntime')
    if onnx:
        kw = dict(ONNX_QUICK) if quick else {}
        kw.update(onnx if isinstance(onnx, dict) else {})
        log("onnxruntime against PyTorch (evaluation of one image, float32, CPU):")
        results['onnx'] = onnx_inference(seed=seed, log=log, **kw)
    if training_sizes is None:
        training_sizes = full and {'gl_official', 'gl_converged', 'geomloss'} <= set(methods)
    if training_sizes and has_module('geomloss'):
        kw = dict(LOSS_SIZES_QUICK) if quick else {}
        kw.update(training_sizes if isinstance(training_sizes, dict) else {})
        log("the loss at training sizes against the official recipe:")
        results['loss_sizes'] = loss_sizes(None, device=device, stride=stride, seed=seed, gl_kwargs=gl_kwargs,
                                           verbose=verbose, **kw)
    results['targets'] = evaluate_targets(results)
    results['config_targets'] = config_targets(results)
    if profile is None: profile = not quick
    missed = {t['method'] for t in results['targets'] if t['met'] is False and t.get('method')}
    if profile and missed:
        results['profiles'] = {}
        for meth in sorted(missed & set(methods)):
            log(f"  profiling {meth} (a speed target is missed)")
            with torch_threads(target_cfg.get('threads')):
                results['profiles'][meth] = profile_case(meth, *target_case, size, stride, device, row_limit=12,
                                                         gl_kwargs=gl_kwargs, pot_iters=pot_iters, seed=seed)
    results['total_time_s'] = time.perf_counter() - t_start
    results['machine']['load'] = other_load(counters, cpu_counters())
    (out_dir / f'{stem}.json').write_text(json.dumps(strict_json(results), indent=1, allow_nan=False))
    (out_dir / f'{stem}.md').write_text(results_markdown(results))
    log(f"wrote {out_dir / stem}.json and .md in {results['total_time_s']:.0f} s")
    return results

# %% [markdown]
# A miniature run checks the files and their contents (the test in `tests/test_bench.py` runs `quick=True`):

# %%
with tempfile.TemporaryDirectory() as tmp:
    res = run_bench(tmp, device='cpu', quick=True, size=12, vgg_crop=32, verbose=False, memory=False,
                    methods=('gl_official', 'geomloss', 'pot'), profile=True)
    saved = json.loads((Path(tmp) / 'bench.json').read_text())
    md = (Path(tmp) / 'bench.md').read_text()
test_eq(saved['config']['target_case'], dict(batch_size=2, n_points=50, size=12, threads=None))
test_eq([ct['batch_size'] for ct in saved['config_targets']], [2])   # one configuration: one row of targets
test_eq([t['name'] for t in saved['config_targets'][0]['targets']], [n for n, _, _ in CONFIG_GOALS])
assert '**Targets per configuration**' in md and '| 2 | 50 | 12×12 |' in md
test_eq([tuple(r) for r in saved['cases']], [CASE_KEYS] * 3)           # uniform rows, skipped or not
assert all(r['peak_mem_mib'] is None for r in saved['cases'])   # memory=False: null, not NaN (strict JSON)
test_eq([r['method'] for r in saved['cases']], ['gl_official', 'geomloss', 'pot'])
test_eq([r['skipped'] for r in saved['cases']], [None, None, None])   # geomloss, POT: dev dependencies
assert all(r['time_s'] > 0 and r['loss'] > 0 and r['iterations'] >= 1 for r in saved['cases'])
assert '| gl_official | 2 | 50 |' in md and '**Targets**' in md and 'VGG19 training step' in md
assert {t['name'] for t in saved['targets']} >= {'speed-up of official over the geomloss loop',
                                                 'loss share of a VGG19 training step'}
missed = {t['method'] for t in saved['targets'] if t['met'] is False and t['method']}
test_eq(set(saved.get('profiles', {})), missed)
for m_ in missed: assert f"**Profile of `{m_}`**" in md
test_fail(lambda: run_bench(tmp, methods=('magic',)), contains='methods must be one of gl_official')

# %% [markdown]
# Two configurations that differ only in the thread count: one table each, and per configuration the targets
# are computed from that configuration's rows alone.

# %%
with tempfile.TemporaryDirectory() as tmp:
    res2 = run_bench(tmp, device='cpu', configs=[(2, 20, 8, 1), (2, 20, 8, 2)],
                     methods=('gl_official', 'gl_converged', 'geomloss'), vgg=False, throughput=False,
                     memory=False, repeats=1, budget=0., verbose=False, profile=False)
    md2 = (Path(tmp) / 'bench.md').read_text()
test_eq([(r['threads'], r['method']) for r in res2['cases']],
        [(t, m) for t in (1, 2) for m in ('gl_official', 'gl_converged', 'geomloss')])
test_eq(res2['config']['target_case'], dict(batch_size=2, n_points=20, size=8, threads=1))
test_eq([ct['threads'] for ct in res2['config_targets']], [1, 2])   # geomloss is a dev dependency: both computed
for ct in res2['config_targets']:
    rows = {r['method']: r for r in res2['cases'] if r['threads'] == ct['threads']}
    vals = {t['name']: t['value'] for t in ct['targets']}
    time_of = lambda m: rows[m]['time_s']
    test_close(vals['official speed-up over the geomloss loop'], time_of('geomloss') / time_of('gl_official'),
               eps=1e-12)
    test_close(vals['converged time / geomloss loop'], time_of('gl_converged') / time_of('geomloss'), eps=1e-12)
    test_eq(vals['converged marginal error'], rows['gl_converged']['marginal_error'])
    test_eq(vals['peak memory official / geomloss loop'], None)                 # memory was not measured
assert md2.count('| method | B | points |') == 2, md2
assert '1 torch thread:' in md2 and '2 torch threads:' in md2, md2

# %% [markdown]
# The quick run holds the training-throughput rows (MCNN B=2 and VGG19 B=1 on 64-px crops, one thread):

# %%
tp_rows = saved['throughput']['rows']
test_eq([(r['model'], r['batch_size'], r['crop'], r['variant']) for r in tp_rows],
        [(m, b, 64, v) for m, b in (('mcnn', 2), ('vgg19', 1)) for v in THROUGHPUT_VARIANTS])
assert all(r['step_s'] > 0 and r['eval_s'] > 0 and r['threads'] == 1 for r in tp_rows)
assert '**Training throughput**' in md and '| vgg19 | 1 | 64 | 1 | bf16+cl |' in md
assert 'Target: MCNN training step in bf16' in md

# %% [markdown]
# Only the loss at training sizes (what `uotcrowd bench --loss-sizes-only` runs): no cases, no other section,
# and the `loss_sizes` rows in the results and the report.

# %%
with tempfile.TemporaryDirectory() as tmp:
    res3 = run_bench(tmp, device='cpu', quick=True, methods=(), vgg=False, throughput=False, onnx=False,
                     training_sizes=dict(sizes=((2, 10, 8),)), verbose=False)
    md3 = (Path(tmp) / 'bench.md').read_text()
test_eq((res3['cases'], [(r['batch_size'], r['n_points'], r['size'], r['threads'], r['runs'])
                         for r in res3['loss_sizes']['rows']]), ([], [(2, 10, 8, 1, 1)]))
assert '**The loss at training sizes**' in md3 and '| 2 | 10 | 8×8 | 1 |' in md3 and 'throughput' not in res3

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
import nbdev
nbdev.nbdev_export()
