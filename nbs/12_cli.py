# %% [markdown]
# # Command line
#
# > `uotcrowd train | eval | predict | models | serve | export | demo | bench`: the library's commands wired to the shell, their flags generated from the functions' signatures.

# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations
import argparse, dataclasses, inspect, sys, types, typing, warnings
from collections.abc import Sequence as AbcSequence
from functools import partial
from typing import Callable, Sequence
from fastcore.docments import docments
from uotcrowd import __version__
from uotcrowd.core import literal_values
from uotcrowd.registry import LOSS_ARGS, loss_class
from uotcrowd.config import TrainConfig
from uotcrowd.evaluate import evaluate_checkpoint
from uotcrowd.commands import train, demo
from uotcrowd.measure import has_module
from uotcrowd.loss_bench import METHODS, BenchMethod, LOSS_SIZES_QUICK
from uotcrowd.throughput import THROUGHPUT_MODELS, THROUGHPUT_QUICK
from uotcrowd.bench import run_bench
from uotcrowd.checkpoints import models_cmd
from uotcrowd.predict import predict
from uotcrowd.serve import serve
from uotcrowd.deploy import export

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from typing import Literal
from unittest.mock import patch
import contextlib, io, json, re, tempfile
from pathlib import Path

# %% [markdown]
# The `uotcrowd` command (installed as a console script, also `python -m uotcrowd`) follows the habits of the
# DM-Count and GL training scripts: `--dataset`, `--data-dir`, `--crop-size`, `--lr`, `--max-epoch`,
# `--val-epoch`, `--device`, with everything a run produces under one `--out` folder.
#
# | command | what it does | writes |
# |---|---|---|
# | `uotcrowd demo` | synthetic crowds → MCNN + generalized loss → evaluation, on a laptop CPU in a few minutes | checkpoints, `log.csv`, `curves.png`, `metrics.json`, `per_image.csv`, `examples.png` |
# | `uotcrowd train` | trains a model on a dataset (DDP under `torchrun`) | `last.pt`, `best.pt`, `log.csv`, `curves.png`, `config.json` |
# | `uotcrowd eval` | MAE/RMSE/NAE and localization F1 at 4 and 8 px on the test (or validation) split | `metrics.json`, `per_image.csv` |
# | `uotcrowd predict` | counts, density overlays and located points for photos (tiled when large), folders and videos | `predictions.csv`, `points.json`, PNGs, NWPU `.txt`; per video `NAME_counts.csv`, a plot, optionally an annotated video |
# | `uotcrowd models` | the models committed in the repository, by name, with their cards | (prints) |
# | `uotcrowd serve` | a local web page: drop a photo, see the count, the density and the located heads; a JSON API | (serves on 127.0.0.1) |
# | `uotcrowd export` | a model as ONNX (any image size, its card in the metadata), for onnxruntime and other runtimes | `NAME.onnx` |
# | `uotcrowd bench` | speed, memory and accuracy of the loss solvers; training and evaluation speed per precision | `bench.json`, `bench.md` |
#
# ```sh
# uotcrowd demo                                   # no data, no weights needed
# uotcrowd train --dataset shanghaitech-a --data-dir data/ShanghaiTech --model vgg19 --loss gl \
#                --weights vgg19_imagenet.pth --out runs/sha
# torchrun --nproc_per_node=4 -m uotcrowd.cli train --dataset qnrf --data-dir data/UCF-QNRF ... # 4 GPUs
# uotcrowd eval --checkpoint runs/sha/best.pt --data-dir data/ShanghaiTech
# uotcrowd predict --checkpoint runs/sha/best.pt photos/ --out predictions
# uotcrowd predict --checkpoint shb-mcnn-gl clip.mp4 --every 10 --out counts   # a named model, a video
# uotcrowd serve --checkpoint shb-mcnn-gl                                        # http://127.0.0.1:8000
# uotcrowd export --checkpoint shb-mcnn-gl --format onnx                         # shb-mcnn-gl.onnx
# uotcrowd bench --loss-sizes-only --out bench_out                              # the loss at training sizes
# ```
#
# This module only wires: each command is a Python function of the library (`uotcrowd.commands.train`,
# `uotcrowd.evaluate.evaluate_checkpoint`, `uotcrowd.predict.predict`, `uotcrowd.checkpoints.models_cmd`,
# `uotcrowd.serve.serve`, `uotcrowd.deploy.export`, `uotcrowd.commands.demo`, and `bench` below over
# `uotcrowd.bench.run_bench`), and its flags are generated from that function's signature: the name
# (`data_dir` → `--data-dir`), the type, the default and, as help, the comment after the parameter. The
# training flags come the same way from the fields of `uotcrowd.config.TrainConfig`, so a default can only be
# set in one place.

# %% [markdown]
# ## Flags from signatures
#
# `add_arguments` turns every parameter of a function (or field of a dataclass, or argument of a class's
# `__init__`) into a flag: the name (`data_dir` → `--data-dir`), the type, the default and, as help, the
# comment after the parameter, which fastcore's `docments` reads. `bool` becomes a switch, a list or sequence
# several values (at least one if the default is `None`), a parameter without default a required flag (a
# positional argument for a list). A parameter whose type is a `typing.Literal` alias (`precision:Precision`,
# `methods:list[BenchMethod]`, `dataset:DatasetName|None`) offers its values as the flag's choices: the names
# of datasets, models, losses, costs, precisions, schedules and formats are declared once, in the module that
# owns them. `add_command` makes a sub-command of a function: one line per command.

# %%
#| export
def _element_type(hint # a parameter's type hint
                 ) -> tuple[type, bool, tuple|None]: # converter, whether several values, the allowed values
    "The type a flag converts to, whether it takes several values, and its choices (those of a `Literal`)."
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType): return _element_type(args[0])
    if origin in (list, tuple, AbcSequence):
        typ, _, choices = _element_type(args[0])
        return typ, True, choices
    if origin is typing.Literal: return type(args[0]), False, literal_values(hint)
    return hint, False, None


# %%
test_eq(_element_type(Sequence[int]), (int, True, None))
test_eq(_element_type(float|None), (float, False, None))
test_eq(_element_type(tuple[float, float]|None), (float, True, None))
test_eq(_element_type(Literal['a', 'b']|None), (str, False, ('a', 'b')))
test_eq(_element_type(list[Literal['x', 'y']]|None), (str, True, ('x', 'y')))
test_eq(_element_type(Literal[1, 2]), (int, False, (1, 2)))


# %%
#| export
def add_arguments(parser, # an `argparse` parser or argument group
                  fn:Callable, # a function, a dataclass (its fields) or a class (its `__init__`)
                  skip:Sequence[str]=(), # parameters that get no flag
                  only:Sequence[str]|None=None, # the parameters that get a flag (default: all)
                  flags:dict|None=None, # option strings of a parameter, where not `--param-name`
                  default=inspect.Parameter.empty, # one default for every flag (e.g. None: "unset"), if given
                  prefix:str='' # put before each help text
                 ):
    "A flag for each parameter of `fn`, with the type, choices, default and comment of its signature."
    docs = docments(fn)
    plain_class = inspect.isclass(fn) and not dataclasses.is_dataclass(fn)
    hints = typing.get_type_hints(fn.__init__ if plain_class else fn)
    for name, prm in inspect.signature(fn).parameters.items():
        if name in skip or (only is not None and name not in only): continue
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD): continue
        typ, several, choices = _element_type(hints.get(name, str))
        dflt = prm.default if default is inspect.Parameter.empty else default
        kw = dict(help=prefix + (docs.get(name) or ''))
        if typ is bool: kw['action'] = 'store_true'
        else: kw.update(type=typ, **({'nargs': '+' if dflt in (None, prm.empty) else '*'} if several else {}))
        if choices: kw['choices'] = choices
        if dflt is prm.empty and several:
            parser.add_argument(name, metavar=name.upper(), **kw)
            continue
        kw.update(required=True) if dflt is prm.empty else kw.update(default=dflt)
        parser.add_argument(*(flags or {}).get(name, [f"--{name.replace('_', '-')}"]), dest=name, **kw)


# %%
def f(a:int, # the first
      b:list[float]|None=None, c:bool=False, # two on one line
      d:Literal['x', 'y']='x', # the last
      e:list[Literal['p', 'q']]|None=None
     ) -> int: # not a parameter
    "Doc."
    return a
p_f = argparse.ArgumentParser()
add_arguments(p_f, f, skip=('e',))
a = p_f.parse_args(['--a', '3', '--b', '1', '2.5', '--c', '--d', 'y'])
test_eq((a.a, a.b, a.c, a.d, hasattr(a, 'e')), (3, [1., 2.5], True, 'y', False))
with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit):
    p_f.parse_args(['--a', '1', '--d', 'z'])
assert "argument --d: invalid choice: 'z' (choose from" in err.getvalue(), err.getvalue()
p_e = argparse.ArgumentParser()
add_arguments(p_e, f, only=['e'], default=None, prefix='of f: ')
test_eq((p_e.parse_args([]).e, p_e.parse_args(['--e', 'q', 'p']).e), (None, ['q', 'p']))
assert 'of f:' in p_e.format_help()


# %%
#| export
class _Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    "Help with each flag's default, and descriptions printed as they are written."


# %%
p_fmt = argparse.ArgumentParser(formatter_class=_Fmt, description='one\n  two')
p_fmt.add_argument('--n', type=int, default=3, help='how many')
assert 'how many (default: 3)' in p_fmt.format_help() and 'one\n  two' in p_fmt.format_help()


# %%
#| export
def _call(fn:Callable, # the command
          args # the parsed flags
         ) -> object:
    "`fn` called with the parsed flags that are its parameters."
    return fn(**{k: getattr(args, k) for k in inspect.signature(fn).parameters if hasattr(args, k)})


# %%
test_eq(_call(lambda a, d='x': (a, d), argparse.Namespace(a=1, b=2)), (1, 'x'))


# %%
#| export
def add_command(sub, # the sub-parsers of the main parser
                fn:Callable, # the command: a function with typed, commented parameters
                name:str|None=None, # the command's name (default: the function's)
                **kwargs # passed to `add_arguments`
               ) -> argparse.ArgumentParser:
    "A sub-command that runs `fn`: its help is the docstring, its flags the parameters."
    doc = inspect.getdoc(fn) or ''
    p = sub.add_parser(name or fn.__name__, help=doc.split('\n')[0], description=doc, formatter_class=_Fmt)
    add_arguments(p, fn, **kwargs)
    p.set_defaults(run=lambda args: _call(fn, args))
    return p


# %%
parser = argparse.ArgumentParser()
sub = parser.add_subparsers(dest='command')
add_command(sub, f, skip=('e',))
a = parser.parse_args(['f', '--a', '3', '--b', '1', '2.5', '--c'])
test_eq((a.a, a.b, a.c, a.d), (3, [1., 2.5], True, 'x'))
test_eq(a.run(a), 3)

# %% [markdown]
# ## The commands
#
# `train` gets the flags of `uotcrowd.commands.train` (dataset, model, loss, weights), those of `TrainConfig`
# (with `--out` for `out_dir` and `--time-budget` for `time_budget_s`, the names the command has always had)
# and the loss hyper-parameters of `uotcrowd.registry.LOSS_ARGS`, unset by default so that each loss keeps its
# own defaults; a hyper-parameter the chosen loss does not take is reported and ignored. Under
# `torchrun --nproc_per_node=K -m uotcrowd.cli train ...` training uses DistributedDataParallel.
#
# `--precision` defaults to `auto`: bfloat16 autocast with channels_last tensors where the device runs
# bfloat16 in hardware (recent GPUs, CPUs with AVX512-BF16 or AMX), float32 elsewhere; the losses always
# compute in float32. **`--precision fp32` gives bit-reproducible float32 runs** (see Precision in the
# training notebook). `eval` defaults to the precision the checkpoint was trained in; `predict` and `serve` to that
# precision where the device runs it natively, float32 elsewhere (`Counter`'s default).

# %%
#| export
_RECORD = ('model', 'model_kwargs', 'loss', 'loss_kwargs', 'dataset', 'data_dir', 'data_kwargs')  # `train` sets
_LOSS_FLAGS = tuple(dict.fromkeys(k for ks in LOSS_ARGS.values() for k in ks))

def loss_kwargs(args # the parsed flags of `train`
               ) -> dict:
    "The hyper-parameters of the chosen loss set on the command line; the others are reported as ignored."
    kw = {k: getattr(args, k) for k in LOSS_ARGS[args.loss] if getattr(args, k, None) is not None}
    ignored = [k for k in _LOSS_FLAGS if k not in kw and getattr(args, k, None) is not None]
    if ignored:
        flags = ', --'.join(k.replace('_', '-') for k in ignored)
        warnings.warn(f"--{flags} not used by the {args.loss!r} loss")
    return kw


# %%
test_eq(loss_kwargs(argparse.Namespace(loss='gl', eps=0.02, tau=None, sigma=None)), {'eps': 0.02})
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    test_eq(loss_kwargs(argparse.Namespace(loss='l2', eps=1., sigma=4.)), {'sigma': 4.})
test_eq(str(w[0].message), "--eps not used by the 'l2' loss")


# %%
#| export
def _train(args # the parsed flags of `train`
          ) -> dict:
    "`train` with the parsed flags: its own, the `TrainConfig` fields and the loss hyper-parameters."
    config = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in _RECORD}
    return _call(partial(train, loss_kwargs=loss_kwargs(args), **config), args)


# %%
defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
args_t = argparse.Namespace(**{**defaults, 'dataset': 'synthetic', 'loss': 'gl', 'eps': 0.05})
train_calls = []
with patch.dict(globals(), train=lambda **kw: train_calls.append(kw)):    # what `train` would be called with
    _train(args_t)
called = train_calls[0]
test_eq((called['loss_kwargs'], called['max_epoch'], called['precision']), ({'eps': 0.05}, 100, 'auto'))
test_eq(set(called) & set(_RECORD), {'loss_kwargs'})   # the other records are `train`'s own

# %% [markdown]
# `bench` runs `uotcrowd.bench.run_bench` with the sections its flags choose: `--throughput-only` the training
# throughput alone, `--no-throughput` everything but it, `--loss-sizes-only` only the loss at training sizes
# against the official trainer's recipe (`uotcrowd.loss_bench.loss_sizes`: B=8 with 32×32 maps and 200 heads
# and with 64×64 maps and 500 heads, 1 and 2 threads; `--quick`: one small size, one thread, one round; a size
# of one's own with `--batch-sizes`, `--points` and `--size`).

# %%
#| export
def bench(out:str='bench_out', # output folder
          quick:bool=False, # small subset (under a minute on a CPU)
          batch_sizes:list[int]|None=None, # batch sizes B (default 1 8; quick 2)
          points:list[int]|None=None, # points per image (default 50 500 2000; quick 50)
          size:int|None=None, # density map side (default 64; quick 32)
          methods:list[BenchMethod]|None=None, # methods to run (default: all that are installed)
          no_vgg:bool=False, # skip the VGG19 training-step timing (and VGG19 in the throughput section)
          no_throughput:bool=False, # skip the training-throughput section (step and evaluation time per precision)
          throughput_only:bool=False, # only the training-throughput section (no loss benchmark)
          throughput_threads:list[int]|None=None, # torch thread counts of the throughput section (default 1 2; quick 1)
          loss_sizes_only:bool=False, # only the loss at training sizes against the official trainer's recipe
          device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
          quiet:bool=False, # no per-case lines
         ) -> dict: # the results of `uotcrowd.bench.run_bench`
    "Benchmark the generalized loss against the official recipe, POT and a training step; writes bench.json and bench.md."
    if no_throughput and throughput_only:
        raise ValueError("--no-throughput and --throughput-only exclude each other")
    if throughput_only and loss_sizes_only:
        raise ValueError("--throughput-only and --loss-sizes-only exclude each other")
    common = dict(device=device, quick=quick, verbose=not quiet)
    if loss_sizes_only:
        if not has_module('geomloss'):
            raise ValueError("--loss-sizes-only times the official recipe, which needs geomloss (bench extra)")
        sizes = dict(LOSS_SIZES_QUICK) if quick else {}
        if batch_sizes or points or size:
            sizes['sizes'] = [(B, m, size or 32) for B in batch_sizes or (8,) for m in points or (200,)]
        return run_bench(out, methods=(), vgg=False, throughput=False, onnx=False,
                         training_sizes=sizes or True, **common)
    throughput = False if no_throughput else {}  # a dict: arguments of `training_throughput`
    if throughput is not False and throughput_threads: throughput['threads'] = tuple(throughput_threads)
    if throughput_only:  # no loss cases and no loss-share step, but VGG19 stays in the throughput rows
        methods = ()
        if not no_vgg: throughput['models'] = THROUGHPUT_QUICK['models'] if quick else THROUGHPUT_MODELS
    return run_bench(out, batch_sizes=batch_sizes, n_points=points, size=size,
                     methods=METHODS if methods is None else tuple(methods),
                     vgg=not no_vgg and not throughput_only, throughput=throughput or not no_throughput,
                     **common)

# %% [markdown]
# What each choice of flags asks `run_bench` for (the runs themselves are tested in `tests/test_cli.py`):

# %%
def bench_call(**flags):
    "The arguments `bench` passes to `run_bench`."
    with patch.dict(globals(), run_bench=lambda out, **kw: kw): return bench(**flags)
test_eq(bench_call()['methods'], METHODS)
test_eq({k: bench_call(throughput_only=True)[k] for k in ('methods', 'vgg', 'throughput')},
        dict(methods=(), vgg=False, throughput={'models': THROUGHPUT_MODELS}))
test_eq(bench_call(no_throughput=True, methods=['pot'])['throughput'], False)
only = bench_call(loss_sizes_only=True, quick=True, batch_sizes=[2], points=[10, 20], size=8)
test_eq({k: only[k] for k in ('methods', 'vgg', 'throughput', 'onnx')},
        dict(methods=(), vgg=False, throughput=False, onnx=False))
test_eq(only['training_sizes'], dict(LOSS_SIZES_QUICK, sizes=[(2, 10, 8), (2, 20, 8)]))
test_eq(bench_call(loss_sizes_only=True)['training_sizes'], True)       # the sizes of `loss_sizes`
test_fail(lambda: bench_call(throughput_only=True, loss_sizes_only=True), contains='exclude each other')
test_fail(lambda: bench_call(throughput_only=True, no_throughput=True), contains='exclude each other')


# %%
#| export
def build_parser() -> argparse.ArgumentParser:
    "The `uotcrowd` parser: `train`, `eval`, `predict`, `models`, `serve`, `export`, `demo` and `bench`."
    parser = argparse.ArgumentParser(prog='uotcrowd', formatter_class=_Fmt,
        description='Crowd counting and localization with the generalized unbalanced-OT loss '
                    '(Wan, Liu, Chan, CVPR 2021).',
        epilog='Run `uotcrowd COMMAND --help` for the flags of a command. Start with `uotcrowd demo`.')
    parser.add_argument('--version', action='version', version=f'uotcrowd {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    t = add_command(sub, train, skip=('loss_kwargs',))
    renamed = {'out_dir': ['--out'], 'time_budget_s': ['--time-budget']}   # the names the flags have always had
    add_arguments(t, TrainConfig, skip=_RECORD, flags=renamed)
    g = t.add_argument_group('loss hyper-parameters (unset: the defaults of each loss)')
    for k in _LOSS_FLAGS:
        losses = [n for n, ks in LOSS_ARGS.items() if k in ks]
        add_arguments(g, loss_class(losses[0]), only=[k], default=None, prefix=f"{', '.join(losses)}: ")
    t.set_defaults(run=_train)
    add_command(sub, evaluate_checkpoint, 'eval')
    add_command(sub, predict)
    add_command(sub, models_cmd, 'models')
    add_command(sub, serve)
    add_command(sub, export)
    add_command(sub, demo)
    add_command(sub, bench)
    return parser

# %% [markdown]
# Every flag the commands have always had, with the defaults of the functions behind them; unknown names are
# rejected with the list of choices, which come from the `Literal` hints of the signatures:

# %%
parser = build_parser()
a = parser.parse_args(['train', '--dataset', 'synthetic', '--model', 'mcnn', '--out', 'x', '--eps', '0.01'])
test_eq((a.dataset, a.model, a.loss, a.eps, a.tau, a.lr, a.out_dir),
        ('synthetic', 'mcnn', 'gl', 0.01, None, None, 'x'))
test_eq((a.max_epoch, a.val_epoch, a.crop_size, a.time_budget_s),
        (TrainConfig.max_epoch, TrainConfig.val_epoch, 512, None))
def parse(args):
    "Exit code (None: parsed), stdout and stderr of `parser.parse_args(args)`."
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parser.parse_args(args)
            code = None
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()

code, _, err = parse(['train', '--dataset', 'ucf', '--out', 'x'])
test_eq(code, 2)
assert "invalid choice: 'ucf'" in err and 'shanghaitech-a' in err and 'synthetic' in err
code, _, err = parse(['train', '--dataset', 'qnrf', '--loss', 'mse', '--out', 'x'])
test_eq(code, 2)
assert 'dmcount' in err
test_eq(parse(['eval', '--checkpoint', 'c.pt', '--model', 'resnet'])[0], 2)
for cmd in ('train', 'eval', 'predict', 'models', 'serve', 'export', 'demo', 'bench'):
    code, out, _ = parse([cmd, '--help'])
    test_eq(code, 0)
    assert f'usage: uotcrowd {cmd}' in out
_, out, _ = parse(['train', '--help'])
for flag in ('--data-dir', '--synthetic-n', '--weights', '--out-act', '--resume', '--crop-size',
             '--batch-size', '--lr', '--weight-decay', '--max-epoch', '--val-epoch', '--val-start',
             '--val-fraction', '--clip-grad', '--precision', '--seed', '--deterministic', '--num-workers',
             '--host-memory', '--time-budget', '--patience', '--lr-patience', '--lr-decay', '--val-window',
             '--max-steps', '--eps', '--tau', '--cost', '--mode', '--tol', '--sigma', '--coord-scale',
             '--device', '--quiet'):
    assert flag in out, flag
a = parser.parse_args(['predict', '--checkpoint', 'c.pt', 'a.jpg', 'photos', '--out', 'o'])
test_eq((a.inputs, a.precision, a.dpi), (['a.jpg', 'photos'], None, 80))
test_eq(parser.parse_args(['eval', '--checkpoint', 'c.pt', '--thresholds']).thresholds, [])
for cmd in (['train', '--dataset', 'synthetic'], ['eval', '--checkpoint', 'c.pt'],
            ['predict', '--checkpoint', 'c.pt', 'a.jpg', '--out', 'o']):
    test_eq(parser.parse_args(cmd).host_memory, 'reuse')
    test_eq(parser.parse_args(cmd + ['--host-memory', 'release']).host_memory, 'release')
    test_eq(parse(cmd + ['--host-memory', 'cache'])[0], 2)

# %% [markdown]
# The choices are those of the `Literal` hints, and the hints agree with the registries that build the things
# they name (each module tests that): the datasets, models, losses, costs, precisions, schedules, host-memory
# policies, splits, output activations, solver modes, export formats and benchmark methods.

# %%
from uotcrowd.core import HostMemory
from uotcrowd.costs import COSTS
from uotcrowd.data import DATASET_NAMES
from uotcrowd.models import MODELS
from uotcrowd.registry import LOSS_NAMES
from uotcrowd.precision import PRECISIONS


# %%
def choices_of(command, dest):
    "The choices of the flag that sets `dest` in a sub-command's parser."
    p = argparse.ArgumentParser()
    add_arguments(p, command)
    return next(a.choices for a in p._actions if a.dest == dest)
test_eq(choices_of(train, 'dataset'), DATASET_NAMES)
test_eq(choices_of(train, 'model'), tuple(MODELS))
test_eq(choices_of(train, 'loss'), LOSS_NAMES)
test_eq(choices_of(train, 'out_act'), ('relu', 'abs'))
test_eq(choices_of(TrainConfig, 'precision'), PRECISIONS)
test_eq(choices_of(TrainConfig, 'schedule'), ('cosine', 'constant', 'plateau'))
test_eq(choices_of(TrainConfig, 'host_memory'), literal_values(HostMemory))
test_eq(choices_of(loss_class('gl'), 'cost'), tuple(COSTS))
test_eq(choices_of(loss_class('gl'), 'mode'), ('official', 'converged'))
test_eq(choices_of(evaluate_checkpoint, 'split'), ('test', 'val'))
test_eq(choices_of(export, 'format'), ('onnx',))
test_eq(choices_of(bench, 'methods'), METHODS)

# %%
synthetic = ['train', '--dataset', 'synthetic']
test_eq(loss_kwargs(parser.parse_args(synthetic + ['--tau', '0.5', '--cost', 'exp'])),
        {'tau': 0.5, 'cost': 'exp'})
test_eq(loss_kwargs(parser.parse_args(synthetic + ['--mode', 'converged', '--tol', '1e-3'])),
        {'mode': 'converged', 'tol': 1e-3})
test_eq(loss_kwargs(parser.parse_args(synthetic + ['--loss', 'dmcount', '--coord-scale', '128'])),
        {'coord_scale': 128.})
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    test_eq(loss_kwargs(parser.parse_args(synthetic + ['--loss', 'l2', '--eps', '1'])), {})
assert 'not used' in str(w[0].message)

# %% [markdown]
# ## Help from the comments
#
# The help of a flag is the comment after its parameter in the source, word for word (fastcore's `docments`
# reads it): checked here against the comment read straight from the source lines, for flags of a function, of
# a dataclass's fields and of a class's `__init__`.

# %%
def source_comment(obj, name):
    "The comment of parameter (or field) `name` in the source of `obj`: after it, or the comment lines just above."
    plain_class = inspect.isclass(obj) and not dataclasses.is_dataclass(obj)
    lines = inspect.getsource(obj.__init__ if plain_class else obj).splitlines()
    k = next(i for i, l in enumerate(lines) if re.match(rf'\s*(def \w+\(|\w+\()?{name}\s*:', l))
    if ' # ' in lines[k]: return lines[k].split(' # ', 1)[1].strip()
    above = []
    while k > 0 and lines[k - 1].strip().startswith('#'):
        k -= 1
        above.insert(0, lines[k].strip().lstrip('#').strip())
    return ' '.join(above)

def flag_help(command, flag):
    "The entry of `flag` in the options of `uotcrowd COMMAND --help`, its lines joined."
    text = ' '.join(parse([command, '--help'])[1].split())
    options = text[text.index('options:'):]
    return options[re.search(re.escape(flag) + '(?=[ ,])', options).start():]
flags_of = (('bench', bench, 'quick'), ('bench', bench, 'no_throughput'), ('bench', bench, 'out'),
            ('eval', evaluate_checkpoint, 'split'), ('train', TrainConfig, 'max_epoch'),
            ('train', TrainConfig, 'lr'), ('train', train, 'val_seed'))
for command, obj, name in flags_of:
    comment, entry = source_comment(obj, name), flag_help(command, '--' + name.replace('_', '-'))
    assert entry.split(' (default')[0].endswith(comment), (name, comment, entry[:200])
test_eq(source_comment(bench, 'quick'), 'small subset (under a minute on a CPU)')
eps_help = 'gl, gl-official: ' + source_comment(loss_class('gl'), 'eps')
assert flag_help('train', '--eps').startswith('--eps EPS ' + eps_help)

# %% [markdown]
# ## Entry point
#
# A command's error (a missing file or folder, a bad value, results that would be overwritten) is one line on
# stderr and exit status 2; a non-finite training loss is exit status 3.

# %%
#| export
def main(argv:Sequence[str]|None=None # arguments (default: `sys.argv[1:]`)
        ) -> int:
    "The `uotcrowd` console script; returns the exit status."
    args = build_parser().parse_args(argv)
    try: args.run(args)
    except FloatingPointError as e:
        print(f"uotcrowd {args.command}: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # includes uotcrowd.images.DatasetError
        print(f"uotcrowd {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == '__main__' and '__file__' in globals(): sys.exit(main())  # `python -m uotcrowd.cli` (torchrun)

# %% [markdown]
# ## A session on tiny synthetic data
#
# `main` takes the argument list, so the commands can be run from Python too. Train for two epochs, evaluate
# the best checkpoint (nothing but `--checkpoint` is needed), and see an error reported as one line:

# %%
tmp = Path(tempfile.mkdtemp())
tiny = ['--dataset', 'synthetic', '--synthetic-n', '16', '--synthetic-size', '48']
test_eq(main(['train', *tiny, '--model', 'mcnn', '--loss', 'gl', '--crop-size', '32', '--batch-size', '4',
              '--max-epoch', '2', '--val-epoch', '1', '--lr', '1e-3', '--device', 'cpu',
              '--out', str(tmp/'run')]), 0)
with contextlib.redirect_stdout(io.StringIO()):
    test_eq(main(['eval', '--checkpoint', str(tmp/'run'/'best.pt'), '--quiet']), 0)
metrics = json.loads((tmp/'run'/'eval-test'/'metrics.json').read_text())
test_eq(metrics['n'], 4)
assert {'mae', 'rmse', 'nae', 'f1@4', 'f1@8'} <= set(metrics)
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(main(['eval', '--checkpoint', str(tmp/'missing.pt')]), 2)
assert 'does not exist' in err.getvalue()

# %%
#| hide
import nbdev
nbdev.nbdev_export()
