# %% [markdown]
# # Command line
#
# > `uotcrowd train | eval | predict | models | serve | export | demo | bench`: the library's commands wired to the shell, their flags generated from the functions' signatures.

# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations
import argparse, ast, dataclasses, inspect, io, sys, textwrap, tokenize, types, typing, warnings
from collections.abc import Sequence as AbcSequence
from functools import partial
from typing import Callable, Sequence
from uotcrowd import __version__
from uotcrowd.core import HOST_MEMORY
from uotcrowd.costs import COSTS
from uotcrowd.data import DATASET_NAMES
from uotcrowd.models import MODELS
from uotcrowd.registry import LOSS_NAMES, LOSS_ARGS, loss_class
from uotcrowd.train import TrainConfig, PRECISIONS, SCHEDULES
from uotcrowd.evaluate import evaluate_checkpoint
from uotcrowd.commands import train, demo
from uotcrowd import bench as benchmarks
from uotcrowd.checkpoints import models_cmd
from uotcrowd.predict import predict
from uotcrowd.serve import serve
from uotcrowd.deploy import export, EXPORT_FORMATS

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import contextlib, io, json, tempfile
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
# ```
#
# This module only wires: each command is a Python function of the library (`uotcrowd.commands.train`,
# `uotcrowd.evaluate.evaluate_checkpoint`, `uotcrowd.predict.predict`, `uotcrowd.checkpoints.models_cmd`,
# `uotcrowd.serve.serve`, `uotcrowd.deploy.export`, `uotcrowd.commands.demo`, and `bench` below over
# `uotcrowd.bench.run_bench`), and its flags are generated from that function's signature: the name (`data_dir` →
# `--data-dir`), the type, the default and, as help, the comment after the parameter. The training flags come the
# same way from the fields of `uotcrowd.train.TrainConfig`, so a default can only be set in one place.

# %% [markdown]
# ## Flags from signatures
#
# `docments` reads the comment after each parameter of a function (or each field of a dataclass), the
# convention of fastcore's `docments`. `add_arguments` turns every parameter into a flag: `bool` into a switch, a
# list or sequence into several values (at least one if the default is `None`), a parameter without default into a
# required flag (a positional argument for a list). The names of datasets, models, losses, costs and precisions come
# from the modules that own them (`CHOICES`). `add_command` makes a sub-command of a function: one line per command.

# %%
#| export
def docments(obj) -> dict[str, str]:
    "The comment after each parameter of a function (or field of a dataclass, or argument of a class's `__init__`)."
    if inspect.isclass(obj) and not dataclasses.is_dataclass(obj): obj = obj.__init__
    src = textwrap.dedent(inspect.getsource(obj))
    node = ast.parse(src).body[0]
    if isinstance(node, ast.ClassDef): items = [(n.target.id, n) for n in node.body if isinstance(n, ast.AnnAssign)]
    else:
        a = node.args
        pos = a.posonlyargs + a.args
        defaults = [None] * (len(pos) - len(a.defaults)) + a.defaults + a.kw_defaults
        items = [(p.arg, d or p) for p, d in zip(pos + a.kwonlyargs, defaults)]
    comments = {t.start[0]: t.string[1:].strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    return {name: comments[n.end_lineno] for name, n in items if n.end_lineno in comments}

def _element_type(hint) -> tuple[type, bool]:
    "The type a flag converts to, and whether it takes several values."
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType): return _element_type(args[0])
    if typing.get_origin(hint) in (list, tuple, AbcSequence): return args[0], True
    return hint, False

CHOICES = dict(dataset=DATASET_NAMES, model=tuple(MODELS), loss=LOSS_NAMES, precision=PRECISIONS, host_memory=HOST_MEMORY, cost=tuple(COSTS),
               schedule=SCHEDULES, format=EXPORT_FORMATS,
               split=('test', 'val'), out_act=('relu', 'abs'), mode=('official', 'converged'), methods=benchmarks.METHODS)

def add_arguments(parser, # an `argparse` parser or argument group
                  fn:Callable, # a function, a dataclass (its fields) or a class (its `__init__`)
                  skip:Sequence[str]=(), # parameters that get no flag
                  only:Sequence[str]|None=None, # the parameters that get a flag (default: all)
                  flags:dict|None=None, # option strings of a parameter, where not `--param-name`
                  default=inspect.Parameter.empty, # one default for every flag (e.g. None: "unset"), if given
                  prefix:str='' # put before each help text
                 ):
    "A flag for each parameter of `fn`, with the type, default and comment of its signature."
    docs = docments(fn)
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) and not dataclasses.is_dataclass(fn) else fn)
    for name, prm in inspect.signature(fn).parameters.items():
        if name in skip or (only is not None and name not in only) or prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD): continue
        typ, several = _element_type(hints.get(name, str))
        dflt = prm.default if default is inspect.Parameter.empty else default
        kw = dict(help=prefix + docs.get(name, ''))
        if typ is bool: kw['action'] = 'store_true'
        else: kw.update(type=typ, **({'nargs': '+' if dflt in (None, prm.empty) else '*'} if several else {}))
        if name in CHOICES: kw['choices'] = CHOICES[name]
        if dflt is prm.empty and several: parser.add_argument(name, metavar=name.upper(), **kw); continue
        kw.update(required=True) if dflt is prm.empty else kw.update(default=dflt)
        parser.add_argument(*(flags or {}).get(name, [f"--{name.replace('_', '-')}"]), dest=name, **kw)

class _Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter): pass

def _call(fn:Callable, args) -> object:
    "`fn` called with the parsed flags that are its parameters."
    return fn(**{k: getattr(args, k) for k in inspect.signature(fn).parameters if hasattr(args, k)})

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
def f(a:int, # the first
      b:list[float]|None=None, c:bool=False, # two on one line
      d:str='x' # the last
     ) -> int: # not a parameter
    "Doc."
    return a
test_eq(docments(f), dict(a='the first', b='two on one line', c='two on one line', d='the last'))
test_eq(docments(TrainConfig)['max_epoch'], 'number of epochs (the last epoch index is `max_epoch-1`)')
test_eq(_element_type(Sequence[int]), (int, True)); test_eq(_element_type(float|None), (float, False))
parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest='command')
add_command(sub, f)
a = parser.parse_args(['f', '--a', '3', '--b', '1', '2.5', '--c'])
test_eq((a.a, a.b, a.c, a.d), (3, [1., 2.5], True, 'x')); test_eq(a.run(a), 3)

# %% [markdown]
# ## The commands
#
# `train` gets the flags of `uotcrowd.commands.train` (dataset, model, loss, weights), those of `TrainConfig` (with
# `--out` for `out_dir` and `--time-budget` for `time_budget_s`, the names the command has always had) and the loss
# hyper-parameters of `uotcrowd.registry.LOSS_ARGS`, unset by default so that each loss keeps its own defaults; a
# hyper-parameter the chosen loss does not take is reported and ignored. Under `torchrun --nproc_per_node=K -m
# uotcrowd.cli train ...` training uses DistributedDataParallel.
#
# `--precision` defaults to `auto`: bfloat16 autocast with channels_last tensors where the device runs bfloat16 in
# hardware (recent GPUs, CPUs with AVX512-BF16 or AMX), float32 elsewhere; the losses always compute in float32.
# **`--precision fp32` gives bit-reproducible float32 runs** (see Precision in the training notebook). `eval` and
# `predict` default to the precision the checkpoint was trained in.

# %%
#| export
_RECORD = ('model', 'model_kwargs', 'loss', 'loss_kwargs', 'dataset', 'data_dir', 'data_kwargs')  # set by `train`
_LOSS_FLAGS = tuple(dict.fromkeys(k for ks in LOSS_ARGS.values() for k in ks))

def loss_kwargs(args) -> dict:
    "The hyper-parameters of the chosen loss set on the command line; the others are reported as ignored."
    kw = {k: getattr(args, k) for k in LOSS_ARGS[args.loss] if getattr(args, k, None) is not None}
    ignored = [k for k in _LOSS_FLAGS if k not in kw and getattr(args, k, None) is not None]
    if ignored: warnings.warn(f"--{', --'.join(k.replace('_', '-') for k in ignored)} not used by the {args.loss!r} loss")
    return kw

def _train(args) -> dict:
    "`train` with the parsed flags: its own, the `TrainConfig` fields and the loss hyper-parameters."
    config = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in _RECORD}
    return _call(partial(train, loss_kwargs=loss_kwargs(args), **config), args)

def bench(out:str='bench_out', # output folder
          quick:bool=False, # small subset (under a minute on a CPU)
          batch_sizes:list[int]|None=None, # batch sizes B (default 1 8; quick 2)
          points:list[int]|None=None, # points per image (default 50 500 2000; quick 50)
          size:int|None=None, # density map side (default 64; quick 32)
          methods:list[str]|None=None, # methods to run (default: all that are installed)
          no_vgg:bool=False, # skip the VGG19 training-step timing (and VGG19 in the throughput section)
          no_throughput:bool=False, # skip the training-throughput section (step and evaluation time per precision)
          throughput_only:bool=False, # only the training-throughput section (no loss benchmark)
          throughput_threads:list[int]|None=None, # torch thread counts of the throughput section (default 1 2; quick 1)
          device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
          quiet:bool=False, # no per-case lines
         ) -> dict: # the results of `uotcrowd.bench.run_bench`
    "Benchmark the generalized loss against the official recipe, POT and a training step; writes bench.json and bench.md."
    if no_throughput and throughput_only: raise ValueError("--no-throughput and --throughput-only exclude each other")
    throughput = False if no_throughput else {}  # a dict: arguments of `training_throughput`
    if throughput is not False and throughput_threads: throughput['threads'] = tuple(throughput_threads)
    if throughput_only:  # no loss cases and no loss-share step, but VGG19 stays in the throughput rows
        methods = ()
        if not no_vgg: throughput['models'] = benchmarks.THROUGHPUT_QUICK['models'] if quick else benchmarks.THROUGHPUT_MODELS
    return benchmarks.run_bench(out, device=device, quick=quick, batch_sizes=batch_sizes, n_points=points, size=size,
                                methods=benchmarks.METHODS if methods is None else tuple(methods),
                                vgg=not no_vgg and not throughput_only, throughput=throughput or not no_throughput,
                                verbose=not quiet)

def build_parser() -> argparse.ArgumentParser:
    "The `uotcrowd` argument parser with the `train`, `eval`, `predict`, `models`, `serve`, `export`, `demo` and `bench` sub-commands."
    parser = argparse.ArgumentParser(prog='uotcrowd', formatter_class=_Fmt,
        description='Crowd counting and localization with the generalized unbalanced-OT loss (Wan, Liu, Chan, CVPR 2021).',
        epilog='Run `uotcrowd COMMAND --help` for the flags of a command. Start with `uotcrowd demo`.')
    parser.add_argument('--version', action='version', version=f'uotcrowd {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    t = add_command(sub, train, skip=('loss_kwargs',))
    add_arguments(t, TrainConfig, skip=_RECORD, flags={'out_dir': ['--out'], 'time_budget_s': ['--time-budget']})
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
# ## Entry point
#
# A command's error (a missing file or folder, a bad value, results that would be overwritten) is one line on stderr
# and exit status 2; a non-finite training loss is exit status 3.

# %%
#| export
def main(argv:Sequence[str]|None=None # arguments (default: `sys.argv[1:]`)
        ) -> int:
    "The `uotcrowd` console script; returns the exit status."
    args = build_parser().parse_args(argv)
    try: args.run(args)
    except FloatingPointError as e:
        print(f"uotcrowd {args.command}: {e}", file=sys.stderr); return 3
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # includes uotcrowd.data.DatasetError
        print(f"uotcrowd {args.command}: error: {e}", file=sys.stderr); return 2
    return 0

if __name__ == '__main__' and '__file__' in globals(): sys.exit(main())  # `python -m uotcrowd.cli` (torchrun)

# %% [markdown]
# Every flag the commands have always had, with the defaults of the functions behind them; unknown names are
# rejected with the list of choices:

# %%
parser = build_parser()
a = parser.parse_args(['train', '--dataset', 'synthetic', '--model', 'mcnn', '--out', 'x', '--eps', '0.01'])
test_eq((a.dataset, a.model, a.loss, a.eps, a.tau, a.lr, a.out_dir), ('synthetic', 'mcnn', 'gl', 0.01, None, None, 'x'))
test_eq((a.max_epoch, a.val_epoch, a.crop_size, a.time_budget_s), (TrainConfig.max_epoch, TrainConfig.val_epoch, 512, None))
def parse(args):
    "Exit code (None: parsed), stdout and stderr of `parser.parse_args(args)`."
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try: parser.parse_args(args); code = None
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()

code, _, err = parse(['train', '--dataset', 'ucf', '--out', 'x'])
test_eq(code, 2); assert "invalid choice: 'ucf'" in err and 'shanghaitech-a' in err and 'synthetic' in err
code, _, err = parse(['train', '--dataset', 'qnrf', '--loss', 'mse', '--out', 'x'])
test_eq(code, 2); assert 'dmcount' in err
test_eq(parse(['eval', '--checkpoint', 'c.pt', '--model', 'resnet'])[0], 2)
for cmd in ('train', 'eval', 'predict', 'models', 'serve', 'export', 'demo', 'bench'):
    code, out, _ = parse([cmd, '--help'])
    test_eq(code, 0); assert f'usage: uotcrowd {cmd}' in out
_, out, _ = parse(['train', '--help'])
for flag in ('--data-dir', '--synthetic-n', '--weights', '--out-act', '--resume', '--crop-size', '--batch-size', '--lr',
             '--weight-decay', '--max-epoch', '--val-epoch', '--val-start', '--val-fraction', '--clip-grad', '--precision',
             '--seed', '--deterministic', '--num-workers', '--host-memory', '--time-budget', '--patience', '--lr-patience', '--lr-decay', '--val-window',
             '--max-steps', '--eps', '--tau', '--cost', '--mode', '--tol', '--sigma', '--coord-scale', '--device', '--quiet'):
    assert flag in out, flag
a = parser.parse_args(['predict', '--checkpoint', 'c.pt', 'a.jpg', 'photos', '--out', 'o'])
test_eq((a.inputs, a.precision, a.dpi), (['a.jpg', 'photos'], None, 80))
test_eq(parser.parse_args(['eval', '--checkpoint', 'c.pt', '--thresholds']).thresholds, [])
for cmd in (['train', '--dataset', 'synthetic'], ['eval', '--checkpoint', 'c.pt'], ['predict', '--checkpoint', 'c.pt', 'a.jpg', '--out', 'o']):
    test_eq(parser.parse_args(cmd).host_memory, 'reuse')
    test_eq(parser.parse_args(cmd + ['--host-memory', 'release']).host_memory, 'release')
    test_eq(parse(cmd + ['--host-memory', 'cache'])[0], 2)

# %%
test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--tau', '0.5', '--cost', 'exp'])),
        {'tau': 0.5, 'cost': 'exp'})
test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--mode', 'converged', '--tol', '1e-3'])),
        {'mode': 'converged', 'tol': 1e-3})
test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--loss', 'dmcount', '--coord-scale', '128'])),
        {'coord_scale': 128.})
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--loss', 'l2', '--eps', '1'])), {})
assert 'not used' in str(w[0].message)

# %% [markdown]
# ## A session on tiny synthetic data
#
# `main` takes the argument list, so the commands can be run from Python too. Train for two epochs, evaluate the
# best checkpoint (nothing but `--checkpoint` is needed), and see an error reported as one line:

# %%
tmp = Path(tempfile.mkdtemp())
tiny = ['--dataset', 'synthetic', '--synthetic-n', '16', '--synthetic-size', '48']
test_eq(main(['train', *tiny, '--model', 'mcnn', '--loss', 'gl', '--crop-size', '32', '--batch-size', '4',
              '--max-epoch', '2', '--val-epoch', '1', '--lr', '1e-3', '--device', 'cpu', '--out', str(tmp/'run')]), 0)
with contextlib.redirect_stdout(io.StringIO()):
    test_eq(main(['eval', '--checkpoint', str(tmp/'run'/'best.pt'), '--quiet']), 0)
metrics = json.loads((tmp/'run'/'eval-test'/'metrics.json').read_text())
test_eq(metrics['n'], 4); assert {'mae', 'rmse', 'nae', 'f1@4', 'f1@8'} <= set(metrics)
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(main(['eval', '--checkpoint', str(tmp/'missing.pt')]), 2)
assert 'does not exist' in err.getvalue()

# %%
#| hide
import nbdev; nbdev.nbdev_export()
