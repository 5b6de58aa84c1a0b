# %% [markdown]
# # Command line
#
# > `uotcrowd train | eval | predict | demo | bench`: train, evaluate and run counting models from the shell.

# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations
import argparse, json, math, os, sys, time, warnings
from pathlib import Path
from typing import Sequence
import numpy as np
import torch
from uotcrowd.core import get_device, seed_everything
from uotcrowd.losses import LOSS_NAMES
from uotcrowd.train import TrainConfig, fit, evaluate, load_model, write_csv, default_lr
from uotcrowd.train import PRECISIONS, resolve_precision, autocast, memory_format, checkpoint_precision, checkpoint_loc_threshold

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import contextlib, csv, io, tempfile, subprocess

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
# | `uotcrowd predict` | counts, density overlays and located points for image files | `predictions.csv`, `points.json`, PNGs, NWPU `.txt` |
# | `uotcrowd bench` | speed, memory and accuracy of the loss solvers; training and evaluation speed per precision | `bench.json`, `bench.md` |
#
# ```sh
# uotcrowd demo                                   # no data, no weights needed
# uotcrowd train --dataset shanghaitech-a --data-dir data/ShanghaiTech --model vgg19 --loss gl \
#                --weights vgg19_imagenet.pth --out runs/sha
# torchrun --nproc_per_node=4 -m uotcrowd.cli train --dataset qnrf --data-dir data/UCF-QNRF ... # 4 GPUs
# uotcrowd eval --checkpoint runs/sha/best.pt --data-dir data/ShanghaiTech
# uotcrowd predict --checkpoint runs/sha/best.pt photos/ --out predictions
# ```

# %% [markdown]
# ## Names and data layouts
#
# Unknown dataset, model or loss names are rejected by `argparse` with the list of choices. A missing data
# folder is reported with the layout the dataset reader expects.

# %%
#| export
DATASETS = ('shanghaitech-a', 'shanghaitech-b', 'qnrf', 'jhu', 'nwpu', 'synthetic')
MODELS = ('vgg19', 'csrnet', 'mcnn')
LOSSES = LOSS_NAMES  # the loss registry's names

def layouts() -> dict:
    "Expected folder layout per dataset name (the texts of `uotcrowd.data`)."
    from uotcrowd import data
    return {'shanghaitech-a': data.SHANGHAITECH_LAYOUT, 'shanghaitech-b': data.SHANGHAITECH_LAYOUT,
            'qnrf': data.QNRF_LAYOUT, 'jhu': data.JHU_LAYOUT, 'nwpu': data.NWPU_LAYOUT}

def check_data_dir(dataset:str, # one of `DATASETS`
                   data_dir:str|Path|None # the dataset's folder
                  ) -> Path|None:
    "Return `data_dir` as a `Path`; a missing folder raises `FileNotFoundError` with the expected layout."
    if dataset == 'synthetic': return Path(data_dir) if data_dir else None
    if not data_dir or not Path(data_dir).is_dir():
        what = 'no --data-dir given' if not data_dir else f"data folder {str(data_dir)!r} does not exist"
        raise FileNotFoundError(f"{what} for dataset {dataset!r}; expected layout:\n{layouts()[dataset]}")
    return Path(data_dir)


# %%
test_eq(check_data_dir('synthetic', None), None)
test_fail(lambda: check_data_dir('qnrf', '/nonexistent/qnrf'), contains='ROOT/Train/img_0001_ann.mat')
test_fail(lambda: check_data_dir('shanghaitech-a', None), contains='no --data-dir')


# %% [markdown]
# ## The parser
#
# One sub-parser per command; `uotcrowd CMD --help` documents every flag with its default. Loss
# hyper-parameters left unset keep the defaults of `uotcrowd.losses` (those of the paper's code).

# %%
#| export
class _Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter): pass

def _add_data(p, required_dataset=True):
    p.add_argument('--dataset', choices=DATASETS, required=required_dataset, default=None,
                   help='dataset name' + ('' if required_dataset else ' (default: the one recorded in the checkpoint)'))
    p.add_argument('--data-dir', default=None, help='dataset root folder (not needed for synthetic)')
    p.add_argument('--synthetic-n', type=int, default=None, help='synthetic: number of training images (validation and test get a quarter each)')
    p.add_argument('--synthetic-size', type=int, default=None, help='synthetic: image side in pixels')

def _add_precision(p, from_checkpoint=False):
    p.add_argument('--precision', choices=PRECISIONS, default=None if from_checkpoint else 'auto',
                   help='arithmetic of the model: auto (bf16 where the device runs it natively, fp32 elsewhere), '
                        'fp32 (float32, bit-reproducible), bf16 or fp16 (autocast, channels_last); the loss is always float32'
                        + (' (default: the precision the checkpoint was trained in)' if from_checkpoint else ''))

def _add_common(p):
    p.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'")
    p.add_argument('--quiet', action='store_true', help='no progress bars or per-epoch lines')

def build_parser() -> argparse.ArgumentParser:
    "The `uotcrowd` argument parser with the `train`, `eval`, `predict`, `demo` and `bench` sub-commands."
    parser = argparse.ArgumentParser(prog='uotcrowd', formatter_class=_Fmt,
        description='Crowd counting and localization with the generalized unbalanced-OT loss (Wan, Liu, Chan, CVPR 2021).',
        epilog='Run `uotcrowd COMMAND --help` for the flags of a command. Start with `uotcrowd demo`.')
    from uotcrowd import __version__
    parser.add_argument('--version', action='version', version=f'uotcrowd {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    t = sub.add_parser('train', help='train a counting model', formatter_class=_Fmt,
                       description='Train a density model; under `torchrun --nproc_per_node=K -m uotcrowd.cli train ...` '
                                   'it uses DistributedDataParallel. Writes last.pt, best.pt (by validation MAE), '
                                   'log.csv, curves.png and config.json to --out.')
    _add_data(t)
    t.add_argument('--model', choices=MODELS, default='vgg19', help='network')
    t.add_argument('--loss', choices=LOSSES, default='gl', help='loss: generalized (gl: Eq. 1; gl-official: the official trainer\'s objective), L2 density, Bayesian, DM-Count')
    t.add_argument('--out', required=True, help='output folder')
    t.add_argument('--weights', default=None, help='initial weights: torchvision VGG state dict or a uotcrowd checkpoint')
    t.add_argument('--out-act', choices=('relu', 'abs'), default=None,
                   help="non-negative output of the network (default: the model's own, abs for mcnn, relu otherwise)")
    t.add_argument('--resume', default=None, help='continue an interrupted run from its last.pt')
    t.add_argument('--crop-size', type=int, default=512, help='training crop side')
    t.add_argument('--batch-size', type=int, default=1, help='images per step (per process)')
    t.add_argument('--lr', type=float, default=None, help='Adam learning rate (default 1e-5 vgg19/csrnet, 1e-4 mcnn)')
    t.add_argument('--weight-decay', type=float, default=1e-5, help='Adam weight decay')
    t.add_argument('--max-epoch', type=int, default=1000, help='number of epochs')
    t.add_argument('--val-epoch', type=int, default=5, help='validate every N epochs')
    t.add_argument('--val-start', type=int, default=0, help='first epoch that may be validated')
    t.add_argument('--val-fraction', type=float, default=0.1, help='share of the training images held out for validation')
    t.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    _add_precision(t)
    t.add_argument('--seed', type=int, default=0, help='random seed (initialisation, order, augmentation)')
    t.add_argument('--deterministic', action='store_true', help='deterministic torch kernels')
    t.add_argument('--num-workers', type=int, default=0, help='data-loading processes')
    t.add_argument('--time-budget', type=float, default=None, help='stop once the run, resumed segments included, has trained this many seconds')
    t.add_argument('--patience', type=int, default=None, help='stop after this many epochs without a better validation MAE')
    t.add_argument('--lr-patience', type=int, default=None, help='decay the learning rate after this many epochs without a better validation MAE')
    t.add_argument('--lr-decay', type=float, default=0.1, help='factor of each learning-rate decay (see --lr-patience)')
    t.add_argument('--max-steps', type=int, default=None, help='at most this many steps per epoch (smoke tests)')
    g = t.add_argument_group('loss hyper-parameters (unset: the defaults of uotcrowd.losses)')
    g.add_argument('--eps', type=float, default=None, help='gl: entropic regularization epsilon')
    g.add_argument('--tau', type=float, default=None, help='gl: marginal penalty tau')
    g.add_argument('--cost', default=None, help="gl: transport cost ('perspective', 'exp', 'dist', 'sqdist')")
    g.add_argument('--mode', choices=('official', 'converged'), default=None,
                   help="gl: 'official' (12 annealed Sinkhorn pairs) or 'converged' (iterate to --tol marginal error)")
    g.add_argument('--tol', type=float, default=None, help='gl, converged mode: relative marginal error to reach')
    g.add_argument('--sigma', type=float, default=None, help='l2/bl: Gaussian bandwidth in pixels')
    g.add_argument('--coord-scale', type=float, default=None,
                   help="dmcount: pixel coordinates are divided by this before the squared-distance cost "
                        "(DM-Count's --norm-cood 1 is crop-size/2)")
    _add_common(t)

    e = sub.add_parser('eval', help='evaluate a checkpoint on a dataset split', formatter_class=_Fmt,
                       description='Count metrics (MAE, RMSE, NAE) over full images and localization P/R/F1 at 4 and 8 px '
                                   'when the points are known; prints them and writes metrics.json and per_image.csv.')
    e.add_argument('--checkpoint', required=True, help='checkpoint written by `uotcrowd train` (best.pt)')
    _add_data(e, required_dataset=False)
    e.add_argument('--split', choices=('test', 'val'), default='test', help='which split to evaluate')
    e.add_argument('--out', default=None, help='output folder (default: CHECKPOINT_DIR/eval-SPLIT)')
    e.add_argument('--overwrite', action='store_true', help='replace the results already in the output folder')
    e.add_argument('--thresholds', type=float, nargs='*', default=[4., 8.], help='localization distances in px (none: skip)')
    e.add_argument('--loc-threshold', type=float, default=None,
                   help="density threshold of the localization (default: the checkpoint's, chosen on validation, else 0.05)")
    _add_precision(e, from_checkpoint=True)
    _add_common(e)

    p = sub.add_parser('predict', help='count the people in image files', formatter_class=_Fmt,
                       description='For each image: the count, a density heat-map overlay PNG and a PNG of the located '
                                   'points; predictions.csv and points.json for all images (--nwpu: NWPU submission files).')
    p.add_argument('--checkpoint', required=True, help='checkpoint written by `uotcrowd train`')
    p.add_argument('inputs', nargs='+', metavar='IMAGE_OR_DIR', help='image files or folders of images')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--loc-threshold', type=float, default=None,
                   help="density threshold of the localization (default: the checkpoint's, chosen on validation, else 0.05)")
    p.add_argument('--nwpu', action='store_true', help='also write the NWPU-Crowd counting and localization submission files')
    p.add_argument('--no-plots', action='store_true', help='skip the PNGs')
    p.add_argument('--dpi', type=int, default=80, help='resolution of the PNGs')
    _add_precision(p, from_checkpoint=True)
    _add_common(p)

    d = sub.add_parser('demo', help='train and evaluate on synthetic crowds (no data or weights needed)', formatter_class=_Fmt,
                       description='Generates a synthetic crowd set, trains MCNN with the generalized loss for a fixed time '
                                   'budget, evaluates counting (MAE vs. predicting the mean training count) and '
                                   'localization (F1 at 4 and 8 px), and writes plots and predictions.')
    d.add_argument('--out', default='demo_out', help='output folder')
    d.add_argument('--budget-s', type=float, default=None, help='training time budget in seconds (default 240; 20 with --quick)')
    d.add_argument('--quick', action='store_true', help='tiny data set and budget (tests, smoke runs)')
    d.add_argument('--seed', type=int, default=0, help='random seed')
    d.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    _add_common(d)

    b = sub.add_parser('bench', help='benchmark the generalized loss against the official recipe, POT and a training step',
                       formatter_class=_Fmt,
                       description='Time, peak memory, iteration count and marginal error of the loss solvers '
                                   '(uotcrowd.bench.run_bench); writes bench.json and bench.md to --out.')
    b.add_argument('--out', default='bench_out', help='output folder')
    b.add_argument('--quick', action='store_true', help='small subset (under a minute on a CPU)')
    b.add_argument('--batch-sizes', type=int, nargs='+', default=None, help='batch sizes B (default 1 8; quick 2)')
    b.add_argument('--points', type=int, nargs='+', default=None, help='points per image (default 50 500 2000; quick 50)')
    b.add_argument('--size', type=int, default=None, help='density map side (default 64; quick 32)')
    b.add_argument('--methods', nargs='+', default=None, metavar='METHOD',
                   help='methods to run (default: all of uotcrowd.bench.METHODS that are installed)')
    b.add_argument('--no-vgg', action='store_true', help='skip the VGG19 training-step timing (and VGG19 in the throughput section)')
    b.add_argument('--no-throughput', action='store_true', help='skip the training-throughput section (step and evaluation time per precision)')
    b.add_argument('--throughput-only', action='store_true', help='only the training-throughput section (no loss benchmark)')
    b.add_argument('--throughput-threads', type=int, nargs='+', default=None, help='torch thread counts of the throughput section (default 1 2; quick 1)')
    _add_common(b)
    return parser


# %%
parser = build_parser()
a = parser.parse_args(['train', '--dataset', 'synthetic', '--model', 'mcnn', '--out', 'x', '--eps', '0.01'])
test_eq((a.command, a.dataset, a.model, a.loss, a.eps, a.tau, a.lr), ('train', 'synthetic', 'mcnn', 'gl', 0.01, None, None))
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
code, _, err = parse(['eval', '--checkpoint', 'c.pt', '--model', 'resnet'])
test_eq(code, 2)
for cmd in ('train', 'eval', 'predict', 'demo', 'bench'):
    code, out, _ = parse([cmd, '--help'])
    test_eq(code, 0); assert f'usage: uotcrowd {cmd}' in out


# %% [markdown]
# ## Datasets, models and losses from flags
#
# `make_datasets` calls `uotcrowd.data.build_datasets` (the validation images come from the training split);
# `make_loss` passes only the hyper-parameters given on the command line, plus the model's stride.

# %%
#| export
def _data_kwargs(args) -> dict:
    kw = {}
    if getattr(args, 'synthetic_n', None) is not None:
        n = args.synthetic_n
        kw.update(n_train=n, n_val=max(n // 4, 2), n_test=max(n // 4, 2))
    if getattr(args, 'synthetic_size', None) is not None: kw['size'] = args.synthetic_size
    return kw

def make_datasets(dataset:str, # one of `DATASETS`
                  data_dir:str|Path|None, # dataset folder
                  crop_size:int=512, # training crop side
                  stride:int=8, # model stride (full images are padded to a multiple of it)
                  val_fraction:float=0.1, # share of the training images held out for validation
                  seed:int=0, # seed of the train/val split
                  **kwargs # dataset-specific arguments (synthetic: `n`, `size`)
                 ):
    "`(train_ds, val_ds, test_ds)` for a dataset name; a missing folder is reported with the expected layout."
    from uotcrowd.data import build_datasets
    root = check_data_dir(dataset, data_dir)
    return build_datasets(dataset, root=root, crop_size=crop_size, stride=stride, val_fraction=val_fraction,
                          seed=seed, **kwargs)

LOSS_ARGS = {'gl': ('eps', 'tau', 'cost', 'mode', 'tol'), 'gl-official': ('eps', 'tau', 'cost'), 'l2': ('sigma',), 'bl': ('sigma',), 'dmcount': ('coord_scale',)}

def loss_kwargs(args) -> dict:
    "The loss hyper-parameters set on the command line."
    names = LOSS_ARGS[args.loss]
    kw = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    ignored = [k for k in dict.fromkeys(k for ks in LOSS_ARGS.values() for k in ks)  # every loss flag, in order
               if k not in names and getattr(args, k, None) is not None]
    if ignored: warnings.warn(f"--{', --'.join(k.replace('_', '-') for k in ignored)} not used by the {args.loss!r} loss")
    return kw


# %%
test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--out', 'x', '--tau', '0.5', '--cost', 'exp'])),
        {'tau': 0.5, 'cost': 'exp'})
test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--out', 'x', '--mode', 'converged', '--tol', '1e-3'])),
        {'mode': 'converged', 'tol': 1e-3})
test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--out', 'x', '--loss', 'dmcount',
                                       '--coord-scale', '128'])), {'coord_scale': 128.})
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    test_eq(loss_kwargs(parser.parse_args(['train', '--dataset', 'synthetic', '--out', 'x', '--loss', 'l2', '--eps', '1'])), {})
assert 'not used' in str(w[0].message)


# %% [markdown]
# ## `train`
#
# Builds the datasets, the model (optionally from `--weights`) and the loss, writes `config.json`, and calls
# `uotcrowd.train.fit`. The checkpoint records the model, loss and dataset names and arguments, so `eval` and
# `predict` later need only `--checkpoint`.
#
# `--precision` defaults to `auto`: bfloat16 autocast with channels_last tensors where the device runs bfloat16 in
# hardware (recent GPUs, CPUs with AVX512-BF16 or AMX), float32 elsewhere; the losses always compute in float32.
# **`--precision fp32` gives bit-reproducible float32 runs**, identical to runs trained before the flag existed
# (see Precision in the training notebook).

# %%
#| export
def cmd_train(args) -> dict:
    "Run `uotcrowd train`; returns the summary of `fit`."
    from uotcrowd.models import get_model
    from uotcrowd.losses import get_loss
    check_data_dir(args.dataset, args.data_dir)  # before building a model: a wrong path fails fast
    model_kw = {} if args.out_act is None else {'out_act': args.out_act}
    seed_everything(args.seed)  # --seed fixes the initial weights too, not only crops and order
    model = get_model(args.model, weights=args.weights, **model_kw)
    stride = int(model.stride)
    data_kw = _data_kwargs(args)
    train_ds, val_ds, _ = make_datasets(args.dataset, args.data_dir, args.crop_size, stride, args.val_fraction,
                                        args.seed, **data_kw)
    loss_kw = loss_kwargs(args)
    if args.loss == 'gl-official': loss_kw['scale'] = float(args.crop_size)  # the official code divides by the crop size
    loss = get_loss(args.loss, stride=stride, **loss_kw)
    cfg = TrainConfig(out_dir=args.out, max_epoch=args.max_epoch, batch_size=args.batch_size, crop_size=args.crop_size,
                      lr=args.lr, weight_decay=args.weight_decay, val_epoch=args.val_epoch, val_start=args.val_start,
                      clip_grad=args.clip_grad, precision=args.precision, seed=args.seed, deterministic=args.deterministic,
                      num_workers=args.num_workers, device=args.device, resume=args.resume, quiet=args.quiet,
                      time_budget_s=args.time_budget, patience=args.patience, lr_patience=args.lr_patience,
                      lr_decay=args.lr_decay, max_steps=args.max_steps, model=args.model, model_kwargs=model_kw,
                      loss=args.loss,
                      loss_kwargs=loss_kw, dataset=args.dataset,
                      data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
                      data_kwargs={**data_kw, 'val_fraction': args.val_fraction})
    if int(os.environ.get('RANK', '0')) == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / 'config.json').write_text(json.dumps({**cfg.to_dict(), 'weights': args.weights}, indent=2))
    if not args.quiet and int(os.environ.get('RANK', '0')) == 0:
        print(f"training {args.model} with the {args.loss} loss on {args.dataset}: {len(train_ds)} training and "
              f"{len(val_ds) if val_ds is not None else 0} validation images, lr {cfg.lr:g}, output in {args.out}", flush=True)
    res = fit(model, loss, train_ds, val_ds, cfg)
    if not args.quiet and res['rank'] == 0:
        print(f"done: best validation MAE {res['best_mae']:.3f} at epoch {res['best_epoch'] + 1}; "
              f"checkpoints {res['best']} and {res['last']}", flush=True)
    return res


# %% [markdown]
# ## `eval`
#
# Rebuilds the model from the checkpoint and evaluates it on the test split (or `--split val`: the validation
# images held out of the training split with the seed of the run). The dataset defaults to the one the model was
# trained on, the precision to the one it was trained in (`--precision` overrides it; the metrics record it).

# %%
#| export
def cmd_eval(args) -> dict:
    "Run `uotcrowd eval`; returns the metrics dict (without the per-image rows)."
    device = get_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    cfg = ckpt.get('config', {})
    dataset = args.dataset or cfg.get('dataset')
    if dataset is None: raise ValueError("the checkpoint does not record its dataset; pass --dataset")
    data_dir = args.data_dir or (cfg.get('data_dir') if dataset == cfg.get('dataset') else None)
    data_kw = dict(cfg.get('data_kwargs', {})) if dataset == cfg.get('dataset') else {}
    data_kw.update(_data_kwargs(args))
    val_fraction = data_kw.pop('val_fraction', 0.1)
    _, val_ds, test_ds = make_datasets(dataset, data_dir, cfg.get('crop_size', 512), int(model.stride), val_fraction,
                                       cfg.get('seed', 0), **data_kw)
    ds = test_ds if args.split == 'test' else val_ds
    out = Path(args.out or Path(args.checkpoint).parent / f'eval-{args.split}')
    kept = [f for f in ('metrics.json', 'per_image.csv') if (out / f).exists()]
    if kept and not args.overwrite:
        raise FileExistsError(f"{out} already holds {' and '.join(kept)}: choose another --out, or pass --overwrite to replace them")
    precision = resolve_precision(args.precision or checkpoint_precision(ckpt), device)
    loc_threshold = checkpoint_loc_threshold(ckpt) if args.loc_threshold is None else args.loc_threshold
    res = evaluate(model, ds, device, thresholds=args.thresholds or None, loc_threshold=loc_threshold, precision=precision,
                   csv_path=out / 'per_image.csv', quiet=args.quiet or not sys.stderr.isatty())
    metrics = {k: v for k, v in res.items() if k != 'per_image'}
    metrics.update(checkpoint=str(args.checkpoint), dataset=dataset, split=args.split, model=ckpt.get('model_name'),
                   precision=precision, loc_threshold=loc_threshold)
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    print(format_metrics(metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'per_image.csv'}")
    return metrics

def format_metrics(m:dict) -> str:
    "One line per metric group, e.g. `MAE 1.23  RMSE 2.34  NAE 0.05` and `F1@4px 0.61 (P 0.6, R 0.62)`."
    lines = [f"{m.get('dataset', '')} {m.get('split', '')} ({m.get('n', '?')} images"
             f"{', ' + m['precision'] if m.get('precision') else ''}):".strip()]
    if 'mae' in m: lines.append(f"  MAE {m['mae']:.3f}  RMSE {m['rmse']:.3f}  NAE {m['nae']:.4f}")
    else: lines.append('  no ground-truth counts: predictions only')
    for k in sorted((k for k in m if k.startswith('f1@')), key=lambda k: float(k[3:])):
        t = k[3:]
        lines.append(f"  F1@{t}px {m[k]:.3f}  (precision {m['precision@' + t]:.3f}, recall {m['recall@' + t]:.3f})")
    return '\n'.join(lines)


# %%
m = {'dataset': 'synthetic', 'split': 'test', 'n': 4, 'mae': 1.5, 'rmse': 2., 'nae': 0.1,
     'f1@8': 0.5, 'precision@8': 0.4, 'recall@8': 2/3, 'f1@4': 0.25, 'precision@4': 0.2, 'recall@4': 1/3}
lines = format_metrics(m).split('\n')
test_eq(lines[1], '  MAE 1.500  RMSE 2.000  NAE 0.1000')
assert lines[2].startswith('  F1@4px 0.250') and lines[3].startswith('  F1@8px 0.500')  # sorted numerically

# %% [markdown]
# ## `predict`
#
# Reads image files (or every image in the given folders), normalizes them like the datasets, and writes for each
# one the predicted count, a heat-map of the density over the image, and the located points; `predictions.csv`
# and `points.json` gather all images. With `--nwpu`, the NWPU-Crowd submission files are written too
# (`uotcrowd.metrics.write_nwpu_predictions`). The model runs in the checkpoint's precision unless `--precision`
# says otherwise; counts are summed from the float32 density.

# %%
#| export
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')

def list_images(inputs:Sequence[str|Path] # image files or folders
               ) -> list[Path]:
    "Image files named by `inputs` (folders are searched, non-recursively, for common image extensions)."
    files = []
    for item in map(Path, inputs):
        if item.is_dir(): files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        elif item.is_file(): files.append(item)
        else: raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    if not files: raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {', '.join(map(str, inputs))}")
    return files

def read_image(path:str|Path # image file
              ) -> torch.Tensor:
    "An image file as an ImageNet-normalized `(3, H, W)` float tensor, like the datasets' images."
    from uotcrowd.data import load_image, to_uint8_tensor, normalize
    return normalize(to_uint8_tensor(load_image(path)))


# %%
from PIL import Image

# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    for n in ('b.png', 'a.JPG', 'notes.txt'): (d / n).write_bytes(b'')
    test_eq([p.name for p in list_images([d])], ['a.JPG', 'b.png'])
    test_fail(lambda: list_images([d / 'missing.png']), contains='neither an image file nor a folder')
    Image.fromarray(np.full((5, 7, 3), 255, np.uint8)).save(d / 'white.png')
    x = read_image(d / 'white.png')
    test_eq(x.shape, (3, 5, 7)); test_close(x[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


# %%
#| export
def plot_prediction(image:torch.Tensor, # normalized `(3, H, W)` image
                    density:torch.Tensor, # `(1, 1, h, w)` or `(h, w)` density
                    points:torch.Tensor|None=None, # `(K, 2)` located points
                    gt_points:torch.Tensor|None=None, # `(N, 2)` annotations, if known
                    title:str='', # figure title
                    path:str|Path|None=None, # write a PNG here
                    dpi:int=80 # resolution
                   ):
    "Image with the density heat-map overlaid (left) and with the located points (right); returns the figure."
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from uotcrowd.data import denormalize
    from uotcrowd.localize import plot_points
    rgb = denormalize(image); H, W = rgb.shape[:2]
    dens = density.detach().float().cpu().reshape(density.shape[-2:]).numpy()
    fig = Figure(figsize=(8, 4 * H / max(W, 1) + 0.5)); FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(rgb); ax1.imshow(dens, cmap='jet', alpha=0.5, extent=(0, W, H, 0), interpolation='bilinear')
    ax1.set_title(f'density map, count {dens.sum():.1f}', fontsize=9)
    plot_points(rgb, pred_points=points, gt_points=gt_points, ax=ax2, size=12,
                title=f'{0 if points is None else len(points)} located points', legend=gt_points is not None)
    ax2.title.set_fontsize(9)
    for ax in (ax1, ax2): ax.set_xlim(0, W); ax.set_ylim(H, 0); ax.axis('off')
    if title: fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=dpi)
    return fig


# %%
#| export
@torch.no_grad()
def cmd_predict(args) -> list[dict]:
    "Run `uotcrowd predict`; returns one dict per image (name, count, points)."
    from uotcrowd.localize import localize
    device = get_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    stride = int(model.stride)
    precision = resolve_precision(args.precision or checkpoint_precision(ckpt), device)
    loc_threshold = checkpoint_loc_threshold(ckpt) if args.loc_threshold is None else args.loc_threshold
    fmt = memory_format(precision)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    files = list_images(args.inputs)
    stems = [f.stem for f in files]
    if len(set(stems)) < len(stems): stems = [f"{f.parent.name}_{f.stem}" for f in files]
    results = []
    from tqdm import tqdm
    failed = []
    for f, stem in zip(tqdm(files, desc='predict', disable=args.quiet or not sys.stderr.isatty()), stems):
        try: image = read_image(f)
        except (ValueError, OSError) as e:  # a corrupt file is reported, the others are still counted
            print(f"uotcrowd predict: skipped {e}", file=sys.stderr, flush=True)
            failed.append(str(f))
            results.append({'name': stem, 'path': str(f), 'count': None, 'n_points': None, 'points': [], 'error': str(e)})
            continue
        with autocast(device, precision):
            density = model(image.unsqueeze(0).to(device, memory_format=fmt))
        density = density.float()
        pts = localize(density, stride=stride, threshold=loc_threshold)[0].cpu()
        count = float(density.sum())
        results.append({'name': stem, 'path': str(f), 'count': count, 'n_points': len(pts),
                        'points': [[round(float(x), 2), round(float(y), 2)] for x, y in pts.tolist()]})
        if not args.no_plots:
            plot_prediction(image, density, pts, title=f'{f.name}: {count:.1f} people', path=out / f'{stem}_pred.png', dpi=args.dpi)
        if not args.quiet: print(f"{f}: count {count:.1f}, {len(pts)} points", flush=True)
    write_csv(results, out / 'predictions.csv', ['name', 'path', 'count', 'n_points', 'error'])
    good = [r for r in results if r['count'] is not None]
    (out / 'points.json').write_text(json.dumps({r['name']: {'count': r['count'], 'points': r['points']} for r in good}))
    written = [out / 'predictions.csv', out / 'points.json']
    if args.nwpu:
        written += _write_nwpu(good, out)
    if not args.quiet:
        print(f"wrote {', '.join(map(str, written))}" + ('' if args.no_plots else f" and {len(good)} PNGs (*_pred.png) in {out}"))
    if failed: raise ValueError(f"{len(failed)} of {len(files)} images could not be read ({', '.join(failed)}); "
                                f"the other {len(good)} are in {out / 'predictions.csv'}")
    return results


# %%
#| export
def _write_nwpu(results:list[dict], out:Path) -> list[Path]:
    "NWPU-Crowd submission files: `nwpu_count.txt` (`id count`) and `nwpu_loc.txt` (`id num x y ...`)."
    from uotcrowd.metrics import write_nwpu_predictions
    ids = [int(r['name']) if str(r['name']).isdigit() else k + 1 for k, r in enumerate(results)]
    (out / 'nwpu_count.txt').write_text(''.join(f"{i} {r['count']:.4f}\n" for i, r in zip(ids, results)))
    loc = write_nwpu_predictions(out / 'nwpu_loc.txt', {i: np.asarray(r['points'], dtype=np.float64).reshape(-1, 2)
                                                       for i, r in zip(ids, results)})
    return [out / 'nwpu_count.txt', Path(loc)]


# %% [markdown]
# ## `demo`
#
# The README's command. With no data and no weights it
#
# 1. generates a synthetic crowd set (`uotcrowd.data.SyntheticCrowd`: blob-like "heads" of varying density on
#    textured backgrounds, with exact point annotations; 256 training, 32 validation and 64 test images of 96×96 px),
# 2. trains MCNN (stride 4, Adam with lr $10^{-3}$, batches of 8) with the generalized loss for a fixed time budget
#    (default 240 s), keeping the best model by validation MAE,
# 3. evaluates on held-out test images: count MAE/RMSE against the MAE of always predicting the mean training
#    count (a model that learned nothing matches that baseline), and localization F1 at 4 and 8 px,
# 4. writes the training curves, `examples.png` (density and located points on test images), per-image
#    predictions and `metrics.json`, and prints a summary.
#
# The sizes were chosen by measuring on this project's 2-core CPU while other jobs shared it: one MCNN + GL step on
# 8 images of 96×96 px (24×24 density maps, about 50 heads each) costs about 0.2 s of CPU time (0.06 s of it the
# loss), so an epoch of 256 images takes 8-12 s on a quiet core and up to a minute on a crowded one. The budget, not
# the epoch count, ends training (slower machines train fewer epochs); the best model by validation MAE is kept.
# Two 240 s runs on the shared machine (load average 5-9 on its 2 cores): with one thread, 12 epochs, test MAE 10.1
# against 44.3 for the mean-count baseline (23 % of it), F1 0.36 at 4 px and 0.45 at 8 px, 4 min in all; with the
# default two threads, slowed more by the sharing, 3 epochs, test MAE 16.2 (37 % of the baseline), F1 0.28 / 0.38,
# 4 min 12 s in all. `--threads` sets the number of torch threads. Larger images or VGG19 learn better
# but do not fit the budget on a CPU; `uotcrowd train` is the tool for real runs.

# %%
#| export
DEMO = {'full': dict(n_train=256, n_val=32, n_test=64, size=96, budget_s=240., batch_size=8, val_epoch=1, lr=1e-3),
        'quick': dict(n_train=32, n_val=8, n_test=8, size=48, budget_s=20., batch_size=8, val_epoch=1, lr=1e-3)}

def cmd_demo(args) -> dict:
    "Run `uotcrowd demo`; returns the metrics dict."
    from uotcrowd.models import get_model
    from uotcrowd.losses import get_loss
    t0 = time.perf_counter()
    if args.threads: torch.set_num_threads(args.threads)
    setting = DEMO['quick' if args.quick else 'full']
    budget = setting['budget_s'] if args.budget_s is None else args.budget_s
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    seed_everything(args.seed)
    model = get_model('mcnn')
    data_kw = {k: setting[k] for k in ('n_train', 'n_val', 'n_test', 'size')}
    train_ds, val_ds, test_ds = make_datasets('synthetic', None, crop_size=setting['size'], stride=model.stride,
                                              seed=args.seed, **data_kw)
    say(f"uotcrowd demo: {len(train_ds)} training, {len(val_ds)} validation and {len(test_ds)} test synthetic images "
        f"({setting['size']}x{setting['size']}); training MCNN with the generalized loss for {budget:g}s on "
        f"{torch.get_num_threads()} CPU threads")
    loss = get_loss('gl', stride=model.stride)
    cfg = TrainConfig(out_dir=str(out), max_epoch=10_000, batch_size=setting['batch_size'], crop_size=setting['size'],
                      lr=setting['lr'], val_epoch=setting['val_epoch'], seed=args.seed, device=args.device, quiet=args.quiet,
                      time_budget_s=budget, model='mcnn', loss='gl', dataset='synthetic',
                      data_kwargs=data_kw)
    res = fit(model, loss, train_ds, val_ds, cfg)
    t_train = time.perf_counter() - t0
    model, _ = load_model(res['best'] or res['last'], get_device(args.device))
    ev = evaluate(model, test_ds, thresholds=(4., 8.), csv_path=out / 'per_image.csv')
    train_counts = [float(train_ds.load(i)[2]['count']) for i in range(len(train_ds))]  # full images, no crop
    mean_count = float(np.mean(train_counts))
    gts = np.array([r['gt_count'] for r in ev['per_image']], dtype=float)
    baseline_mae = float(np.abs(gts - mean_count).mean())
    metrics = {k: v for k, v in ev.items() if k != 'per_image'}
    metrics.update(dataset='synthetic', split='test', model='mcnn', loss='gl', epochs=res['epochs'],
                   best_epoch=res['best_epoch'] + 1, best_val_mae=res['best_mae'], mean_train_count=mean_count,
                   baseline_mae=baseline_mae, train_time_s=t_train)
    _demo_examples(model, test_ds, ev, out / 'examples.png')
    metrics['total_time_s'] = time.perf_counter() - t0
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    say(format_metrics(metrics))
    say(f"  baseline (predict the mean training count {mean_count:.1f}): MAE {baseline_mae:.3f}  -> "
        f"the trained model's error is {metrics['mae'] / max(baseline_mae, 1e-9):.0%} of it")
    say(f"trained {res['epochs']} epochs in {t_train:.0f}s (best validation MAE {res['best_mae']:.3f} at epoch "
        f"{res['best_epoch'] + 1}); total {metrics['total_time_s']:.0f}s. Wrote:")
    for name, what in [('best.pt', 'best checkpoint (by validation MAE)'), ('last.pt', 'last checkpoint'),
                       ('log.csv', 'losses and metrics per epoch'), ('curves.png', 'training curves'),
                       ('per_image.csv', 'test predictions per image'), ('examples.png', 'density maps and located points'),
                       ('metrics.json', 'test metrics')]:
        say(f"  {out / name}: {what}")
    say(f"next: uotcrowd predict --checkpoint {out / 'best.pt'} IMAGE.jpg --out {out / 'predictions'}")
    return metrics

def _demo_examples(model, ds, ev, path, k:int=3, dpi:int=70):
    "A row per test image: the image with annotated and located points, and the density map."
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from uotcrowd.localize import localize
    from uotcrowd.data import denormalize
    device = next(model.parameters()).device
    fig = Figure(figsize=(6, 3 * k)); FigureCanvasAgg(fig)
    axes = fig.subplots(k, 2, squeeze=False)
    for row, i in zip(axes, np.linspace(0, len(ds) - 1, k).astype(int)):
        image, gt, meta = ds[int(i)]
        with torch.no_grad(): density = model(image.unsqueeze(0).to(device)).float()
        pts = localize(density, stride=model.stride)[0].cpu()
        rgb = denormalize(image)
        row[0].imshow(rgb)
        if len(gt): row[0].scatter(*gt.T.numpy(), s=16, facecolors='none', edgecolors='lime', linewidths=1)
        if len(pts): row[0].scatter(*pts.T.numpy(), s=5, c='red')
        row[0].set_title(f"{meta['name']}: {len(gt)} annotated (green), {len(pts)} located (red)", fontsize=7)
        row[1].imshow(density[0, 0].cpu().numpy(), cmap='jet')
        row[1].set_title(f"density: count {density.sum():.1f}", fontsize=7)
        for ax in row: ax.axis('off')
    fig.tight_layout(); fig.savefig(path, dpi=dpi)


# %% [markdown]
# ## `bench`
#
# A thin wrapper over `uotcrowd.bench.run_bench` (see the benchmarks notebook for what is measured). Besides the
# loss solvers it times training steps and full-image evaluation of MCNN and VGG19 per precision
# (`--throughput-only` for just that, `--no-throughput` to skip it).

# %%
#| export
def cmd_bench(args) -> dict:
    "Run `uotcrowd bench`; returns the results of `uotcrowd.bench.run_bench`."
    from uotcrowd import bench
    methods = tuple(args.methods) if args.methods else bench.METHODS
    unknown = [m for m in methods if m not in bench.METHODS]
    if unknown: raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(bench.METHODS)}")
    if args.no_throughput and args.throughput_only: raise ValueError("--no-throughput and --throughput-only exclude each other")
    throughput = False if args.no_throughput else {}  # a dict: arguments of `training_throughput`
    if throughput is not False and args.throughput_threads: throughput['threads'] = tuple(args.throughput_threads)
    if args.throughput_only:  # no loss cases and no loss-share step, but VGG19 stays in the throughput rows
        methods = ()
        if not args.no_vgg: throughput['models'] = bench.THROUGHPUT_QUICK['models'] if args.quick else bench.THROUGHPUT_MODELS
    res = bench.run_bench(args.out, device=args.device, quick=args.quick, batch_sizes=args.batch_sizes,
                          n_points=args.points, size=args.size, methods=methods,
                          vgg=not args.no_vgg and not args.throughput_only,
                          throughput=throughput or not args.no_throughput, verbose=not args.quiet)
    return res


# %% [markdown]
# ## Entry point

# %%
#| export
COMMANDS = {'train': cmd_train, 'eval': cmd_eval, 'predict': cmd_predict, 'demo': cmd_demo, 'bench': cmd_bench}

def main(argv:Sequence[str]|None=None # arguments (default: `sys.argv[1:]`)
        ) -> int:
    "The `uotcrowd` console script; returns the exit status."
    args = build_parser().parse_args(argv)
    try: COMMANDS[args.command](args)
    except FloatingPointError as e:
        print(f"uotcrowd {args.command}: {e}", file=sys.stderr); return 3
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # includes uotcrowd.data.DatasetError
        print(f"uotcrowd {args.command}: error: {e}", file=sys.stderr); return 2
    return 0

if __name__ == '__main__' and '__file__' in globals(): sys.exit(main())  # `python -m uotcrowd.cli` (torchrun)

# %% [markdown]
# ## A session on tiny synthetic data
#
# `main` takes the argument list, so the commands can be run from Python too. Train for two epochs, evaluate the
# best checkpoint (nothing but `--checkpoint` is needed), then predict on PNG files:

# %%
tmp = Path(tempfile.mkdtemp())
tiny = ['--dataset', 'synthetic', '--synthetic-n', '16', '--synthetic-size', '48']
test_eq(main(['train', *tiny, '--model', 'mcnn', '--loss', 'gl', '--crop-size', '32', '--batch-size', '4',
              '--max-epoch', '2', '--val-epoch', '1', '--lr', '1e-3', '--device', 'cpu', '--out', str(tmp/'run')]), 0)

# %%
test_eq(main(['eval', '--checkpoint', str(tmp/'run'/'best.pt'), '--quiet']), 0)
metrics = json.loads((tmp/'run'/'eval-test'/'metrics.json').read_text())
test_eq(metrics['n'], 4); assert {'mae', 'rmse', 'nae', 'f1@4', 'f1@8'} <= set(metrics)

# %% [markdown]
# The run trained in the precision `auto` picks on this machine, and `eval` used the same one; `--precision fp32`
# evaluates in float32 instead, with counts within 1 % of the bf16 ones:

# %%
trained_in = torch.load(tmp/'run'/'best.pt', weights_only=True)['precision']
test_eq(trained_in, resolve_precision('auto', 'cpu')); test_eq(metrics['precision'], trained_in)
with contextlib.redirect_stdout(io.StringIO()) as printed:
    test_eq(main(['eval', '--checkpoint', str(tmp/'run'/'best.pt'), '--precision', 'fp32', '--out', str(tmp/'eval32'), '--quiet']), 0)
assert printed.getvalue().startswith('synthetic test (4 images, fp32):'), printed.getvalue()
test_eq(json.loads((tmp/'eval32'/'metrics.json').read_text())['precision'], 'fp32')
counts = [np.array([float(r['pred_count']) for r in csv.DictReader(open(d/'per_image.csv'))]) for d in (tmp/'run'/'eval-test', tmp/'eval32')]
assert (np.abs(counts[0] - counts[1]) <= 0.01 * counts[1]).all(), counts

# %% [markdown]
# `--seed` fixes the whole run, the initial weights included: the same command twice gives the same weights after
# a training step, another seed different ones (here from the very start: both runs stop after one step).

# %%
def one_step(seed, out):
    test_eq(main(['train', *tiny, '--model', 'mcnn', '--crop-size', '32', '--batch-size', '4', '--max-epoch', '1',
                  '--max-steps', '1', '--val-epoch', '1', '--device', 'cpu', '--quiet', '--seed', str(seed),
                  '--out', str(tmp/out)]), 0)
    return torch.load(tmp/out/'last.pt', weights_only=True)['model']

torch.manual_seed(1); a = one_step(3, 'seed3')
torch.manual_seed(2); b = one_step(3, 'seed3b')  # a different global RNG state before the command
c = one_step(4, 'seed4')
for k in a: assert torch.equal(a[k], b[k]), k
assert not torch.equal(a['column1.0.weight'], c['column1.0.weight'])

# %%
from uotcrowd.data import build_datasets, denormalize
from PIL import Image

# %%
_, _, test_ds = build_datasets('synthetic', crop_size=32, stride=4, n_train=16, n_val=4, n_test=4, size=48)
(tmp/'photos').mkdir()
for i in range(2): Image.fromarray((denormalize(test_ds[i][0]) * 255 + 0.5).astype(np.uint8)).save(tmp/'photos'/f'{i + 1:04d}.png')
test_eq(main(['predict', '--checkpoint', str(tmp/'run'/'best.pt'), str(tmp/'photos'), '--out', str(tmp/'pred'), '--nwpu']), 0)
test_eq(sorted(p.name for p in (tmp/'pred').iterdir()),
        ['0001_pred.png', '0002_pred.png', 'nwpu_count.txt', 'nwpu_loc.txt', 'points.json', 'predictions.csv'])

# %% [markdown]
# Errors are reported as one line and a non-zero exit status, not a traceback:

# %%
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(main(['eval', '--checkpoint', str(tmp/'missing.pt')]), 2)
assert 'does not exist' in err.getvalue()

# %%
#| hide
import nbdev; nbdev.nbdev_export()
