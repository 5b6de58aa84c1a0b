# %% [markdown]
# # Checkpoints and model cards
#
# > Checkpoint files (atomic writes, `weights_only` loading), named models, slim model files with their localization threshold and precision, and the cards that say what a shared model is and how well it did.

# %%
#| default_exp checkpoints

# %%
#| export
from __future__ import annotations
import csv, json, os
from pathlib import Path
import torch
from torch import nn
from uotcrowd.core import get_device
from uotcrowd.images import IMAGENET_MEAN, IMAGENET_STD
from uotcrowd.models import get_model

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# A checkpoint is a plain dict: the weights, what is needed to rebuild the network (its name, keyword
# arguments and stride), and whatever its writer adds. Training (`uotcrowd.train.fit`) adds the optimizer
# state, the RNG states, the config and the history of logged metrics, so a run can be resumed exactly; a
# model that is shared keeps only its weights, its precision, its localization threshold and its **card**.
# This notebook writes and reads them: named models, atomic files, the network rebuilt from a file, slim
# copies, and the cards.

# %%
#| hide
root = Path('..')   # the repository checkout

# %% [markdown]
# ## Named models
#
# Models committed in the repository live in its `models/` folder, one `NAME.pt` each. Wherever a checkpoint
# path is taken, such a name is accepted too (`Counter(NAME)`, `--checkpoint NAME`). The folder is found
# beside the package (an install from a checkout: `pip install -e .`), or where the environment variable
# `UOTCROWD_MODELS` points.

# %%
#| export
MODELS_ENV = 'UOTCROWD_MODELS'   # the environment variable naming a folder of named models


# %%
#| export
def models_dir(folder:str|Path|None=None # a folder of `NAME.pt` files (default: `$UOTCROWD_MODELS`, `models/`)
              ) -> Path:
    "The folder of named models: `folder`, else `$UOTCROWD_MODELS`, else `models/` of the package's checkout."
    if folder is None: folder = os.environ.get(MODELS_ENV) or None
    if folder is None:
        import uotcrowd
        folder = Path(uotcrowd.__file__).resolve().parent.parent / 'models'
    return Path(folder)


# %%
#| export
def model_names(folder:str|Path|None=None # see `models_dir`
               ) -> list[str]:
    "Names of the models in `models_dir(folder)`; a clear error when that folder is absent."
    d = models_dir(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"no models folder at {d}: named models are committed in the repository's "
                                f"models/ folder, found when uotcrowd is installed from a checkout (pip "
                                f"install -e .); set {MODELS_ENV} to such a folder, or pass the path of a "
                                f"checkpoint file")
    return sorted(p.stem for p in d.glob('*.pt'))


# %%
#| export
def resolve_checkpoint(checkpoint:str|Path, # a checkpoint file, or the name of a model in `models_dir(folder)`
                       folder:str|Path|None=None # see `models_dir`
                      ) -> Path:
    "The checkpoint file that `checkpoint` names: a path (with a folder or a suffix), else a named model."
    p = Path(checkpoint)
    if p.is_file() or len(p.parts) != 1 or p.suffix: return p  # a path (`load_checkpoint` reports a missing one)
    d = models_dir(folder)
    if len(p.parts) == 1 and (d / f'{p.name}.pt').is_file(): return d / f'{p.name}.pt'
    names = ', '.join(model_names(folder)) if d.is_dir() else f'none, {d} is absent'
    raise FileNotFoundError(f"{checkpoint} is neither a checkpoint file nor a named model "
                            f"(named models: {names})")


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d / 'a-model.pt').write_bytes(b''); (d / 'notes.txt').write_bytes(b'')
    test_eq(model_names(d), ['a-model'])
    test_eq(resolve_checkpoint('a-model', d), d / 'a-model.pt')
    test_eq(resolve_checkpoint(d / 'notes.txt', d), d / 'notes.txt')      # an existing file is taken as it is
    test_eq(resolve_checkpoint(d / 'missing.pt', d), d / 'missing.pt')    # and any path with a folder or suffix
    test_fail(lambda: resolve_checkpoint('b-model', d), contains='named models: a-model')
    test_fail(lambda: model_names(d / 'absent'), contains='no models folder at')
    test_fail(lambda: resolve_checkpoint('b-model', d / 'absent'), contains='is absent')
    old = os.environ.get(MODELS_ENV); os.environ[MODELS_ENV] = str(d)
    try: test_eq(models_dir(), d)
    finally:
        if old is None: del os.environ[MODELS_ENV]
        else: os.environ[MODELS_ENV] = old
test_eq(models_dir(), Path('../models').resolve())     # the checkout this notebook belongs to


# %% [markdown]
# ## Checkpoint files
#
# Only tensors, numbers, strings, lists, tuples and dicts go into a checkpoint, so it loads with
# `torch.load(..., weights_only=True)` (no pickled code runs when a downloaded checkpoint is opened). Writes
# are atomic: the file is written next to its destination and moved with `os.replace`, so a run killed while
# saving leaves the previous checkpoint intact.

# %%
#| export
def save_checkpoint(state:dict, # plain dict of tensors, numbers, strings, lists and dicts
                    path:str|Path # destination file
                   ) -> Path:
    "Write `state` to `path` atomically (temporary file in the same folder, fsync, `os.replace`)."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f); f.flush(); os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists(): tmp.unlink()
    return path


# %%
#| export
def load_checkpoint(path:str|Path, # a checkpoint written by `fit`, or a named model
                    map_location='cpu' # where to put its tensors
                   ) -> dict:
    "Load a checkpoint (a file or a named model) with `weights_only=True`; errors name the file."
    path = resolve_checkpoint(path)
    if not path.is_file(): raise FileNotFoundError(f"checkpoint {path} does not exist")
    try: ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e: raise ValueError(f"{path} is not a readable uotcrowd checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise ValueError(f"{path} is not a uotcrowd checkpoint (no 'model' entry)")
    return ckpt


# %%
with tempfile.TemporaryDirectory() as d:
    state = {'model': {'w': torch.arange(3.)}, 'config': {'lr': 1e-4, 'model_kwargs': {}},
             'rng': {'torch': torch.get_rng_state()}, 'history': [{'epoch': 0, 'val_mae': None}]}
    ck = load_checkpoint(save_checkpoint(state, Path(d) / 'a.pt'))
    test_eq(ck['model']['w'], torch.arange(3.)); test_eq(ck['config'], state['config'])
    test_eq((ck['rng']['torch'], ck['history']), (state['rng']['torch'], state['history']))
    test_eq(sorted(os.listdir(d)), ['a.pt'])  # no temporary file left behind
    test_fail(lambda: load_checkpoint(Path(d) / 'missing.pt'), contains='does not exist')
    torch.save({'weights': torch.ones(1)}, Path(d) / 'other.pt')
    test_fail(lambda: load_checkpoint(Path(d) / 'other.pt'), contains="no 'model' entry")
    (Path(d) / 'notes.pt').write_text('not a checkpoint')
    test_fail(lambda: load_checkpoint(Path(d) / 'notes.pt'), contains='notes.pt is not a readable uotcrowd')


# %% [markdown]
# ## The network of a checkpoint
#
# `load_model` rebuilds the network from the names stored in the checkpoint (`uotcrowd.models.get_model`) and
# loads its weights, the weight average where the run kept one, so evaluation and prediction need nothing but
# the checkpoint file.

# %%
#| export
def load_model(path:str|Path, # checkpoint written by `fit` (`best.pt` or `last.pt`), or a named model
               device='cpu' # device of the returned model
              ) -> tuple[nn.Module, dict]:
    "Rebuild the model stored in a checkpoint; returns `(model in eval mode, checkpoint dict)`."
    ckpt = load_checkpoint(path)
    name = ckpt.get('model_name') or ckpt.get('config', {}).get('model')
    if not name:
        raise ValueError(f"{path} does not record its model name; it was not written by uotcrowd's `fit`")
    weights = ckpt['ema'] if 'ema' in ckpt else ckpt['model']  # the weight average is what was validated
    model = get_model(name, weights=weights, **ckpt.get('model_kwargs', {}))
    return model.to(get_device(device)).eval(), ckpt


# %%
torch.manual_seed(0)
_raw, _avg = get_model('mcnn', out_act='abs').state_dict(), get_model('mcnn', out_act='abs').state_dict()
with tempfile.TemporaryDirectory() as d:
    base = {'model_kwargs': {'out_act': 'abs'}, 'model': _raw}
    net, ck = load_model(save_checkpoint({**base, 'model_name': 'mcnn'}, Path(d) / 'raw.pt'))
    assert not net.training and all(torch.equal(v, _raw[k]) for k, v in net.state_dict().items())
    net, _ = load_model(save_checkpoint({**base, 'config': {'model': 'mcnn'}, 'ema': _avg}, Path(d) / 'avg.pt'))
    assert all(torch.equal(v, _avg[k]) for k, v in net.state_dict().items())   # the average, not the raw weights
    anonymous = save_checkpoint(base, Path(d) / 'anon.pt')
    test_fail(lambda: load_model(anonymous), contains='does not record its model name')


# %% [markdown]
# ## The precision a checkpoint was trained in
#
# A checkpoint records the precision it was trained in (`'precision'`, resolved: `fp32`, `bf16` or `fp16`),
# what `uotcrowd eval` and `uotcrowd predict` use unless told otherwise. Checkpoints written before that field
# existed say it in their config; configs written before the config had a `precision` trained in float32, or
# float16 when they set `amp` (`uotcrowd.config.TrainConfig.from_dict` reads old configs with the same rule).

# %%
#| export
def config_precision(config:dict # a training config as a dict (`TrainConfig.to_dict()`), of any version
                    ) -> str:
    "The precision a training config asks for; configs without one: float16 if they set `amp`, else float32."
    if 'precision' in config: return config['precision']
    return 'fp16' if config.get('amp') else 'fp32'


# %%
#| export
def checkpoint_precision(ckpt:dict # a checkpoint dict (`load_checkpoint`)
                        ) -> str: # one of `uotcrowd.precision.PRECISIONS`
    "The precision a checkpoint was trained in (what `eval` and `predict` use unless told otherwise)."
    return ckpt.get('precision') or config_precision(ckpt.get('config', {}))


# %%
test_eq([config_precision(c) for c in ({'precision': 'bf16'}, {'amp': True}, {'amp': False}, {})],
        ['bf16', 'fp16', 'fp32', 'fp32'])
test_eq(checkpoint_precision({'precision': 'bf16', 'config': {'precision': 'auto'}}), 'bf16')
test_eq(checkpoint_precision({'config': {'precision': 'auto'}}), 'auto')
test_eq(checkpoint_precision({'config': {'amp': True}}), 'fp16')
test_eq(checkpoint_precision({'config': {'amp': False}}), 'fp32')
test_eq(checkpoint_precision({}), 'fp32')

# %% [markdown]
# ## Slim checkpoints for evaluation
#
# `last.pt` holds everything a resumed run needs (optimizer moments, RNG states). A model that is evaluated,
# shared or committed needs only its weights, how to rebuild it (names, keyword arguments, stride), its
# precision, its training record, and the localization threshold chosen on the validation images, which
# `uotcrowd eval` and `uotcrowd predict` then use unless told otherwise.

# %%
#| export
SLIM_KEYS = ('model', 'model_name', 'model_kwargs', 'loss_name', 'loss_kwargs', 'stride', 'dataset',
             'precision', 'config', 'epoch', 'best_mae', 'best_epoch', 'history', 'train_time_s', 'world_size',
             'torch_version', 'loc_threshold', 'weights')   # what a slim checkpoint keeps of a full one

# %%
#| export
DEFAULT_LOC_THRESHOLD = 0.05   # the paper's density threshold of the localization (Sec. 3.4)


# %%
#| export
def slim_checkpoint(src:str|Path, # a checkpoint written by `fit`
                    dst:str|Path|None=None, # where to write the slim copy (default: over `src`)
                    loc_threshold:float|None=None # localization threshold chosen on validation, to store
                   ) -> Path:
    "A copy of `src` without optimizer, scaler and RNG state, optionally with its localization threshold."
    ckpt = load_checkpoint(src)
    slim = {k: ckpt[k] for k in SLIM_KEYS if k in ckpt}
    if 'ema' in ckpt: slim.update(model=ckpt['ema'], weights='ema')  # the scored weights: the average
    if loc_threshold is not None: slim['loc_threshold'] = float(loc_threshold)
    return save_checkpoint(slim, dst or src)


# %%
#| export
def checkpoint_loc_threshold(ckpt:dict # a checkpoint dict (`load_checkpoint`)
                            ) -> float:
    "The localization threshold stored in a checkpoint, or the library default."
    return float(ckpt.get('loc_threshold', DEFAULT_LOC_THRESHOLD))


# %%
with tempfile.TemporaryDirectory() as d:
    full = {'model': {'w': torch.ones(2)}, 'model_name': 'mcnn', 'optimizer': {'state': {0: torch.zeros(2)}},
            'rng': {'torch': torch.get_rng_state()}, 'scaler': {}, 'epoch': 7, 'config': {'lr': 1e-4}}
    src = save_checkpoint(full, Path(d) / 'best.pt')
    out = slim_checkpoint(src, Path(d) / 'slim.pt', loc_threshold=0.02)
    slim = load_checkpoint(out)
    test_eq(sorted(slim), ['config', 'epoch', 'loc_threshold', 'model', 'model_name'])
    test_eq((checkpoint_loc_threshold(slim), checkpoint_loc_threshold(full)), (0.02, 0.05))
    assert out.stat().st_size < src.stat().st_size
    slim_checkpoint(out)  # slimming a slim checkpoint keeps its threshold
    # a run with a weight average: the slim copy's weights are the average, and says so
    last = save_checkpoint({**full, 'ema': {'w': torch.full((2,), 3.)}}, Path(d) / 'last.pt')
    averaged = load_checkpoint(slim_checkpoint(last, Path(d) / 'avg.pt'))
    test_eq((averaged['model']['w'].tolist(), averaged['weights']), ([3., 3.], 'ema'))
    test_eq(load_checkpoint(out)['loc_threshold'], 0.02)

# %% [markdown]
# ## Model cards
#
# A model that is shared carries a **card**: what network it is, which loss and data set trained it, how it
# was trained and for how long, how well it did on the test split (MAE, RMSE, NAE, localization F1), the
# localization threshold chosen on the validation images, and how its input is normalized. Model files are
# slim: weights, what is needed to rebuild the network, the card, and the card's threshold and the run's
# precision; no optimizer state, training history or config (whose paths are those of the machine that trained
# it).

# %%
#| export
MODEL_KEYS = ('model', 'model_name', 'model_kwargs', 'stride', 'precision', 'loc_threshold', 'card',
              'torch_version')   # what a model file holds

# %%
#| export
INPUT_NORMALIZATION = {'channels': 'RGB', 'scale': 1 / 255, 'mean': list(IMAGENET_MEAN),
                       'std': list(IMAGENET_STD)}   # the card's `input`: pixels / 255, then ImageNet statistics


# %% [markdown]
# A checkpoint without a card still has one: `model_card` derives what its training record says and leaves the
# test metrics unknown.

# %%
#| export
def _architecture(ckpt:dict) -> dict:
    "The card's `architecture`: the model's name and keyword arguments, its stride and number of weights."
    cfg = ckpt.get('config', {})
    return {'model': ckpt.get('model_name') or cfg.get('model'), 'kwargs': dict(ckpt.get('model_kwargs', {})),
            'stride': ckpt.get('stride'), 'weights': int(sum(v.numel() for v in ckpt['model'].values()))}


# %%
#| export
def _loss(ckpt:dict) -> dict:
    "The card's `loss`: the name and keyword arguments of the loss that trained it."
    return {'name': ckpt.get('loss_name') or ckpt.get('config', {}).get('loss'),
            'kwargs': dict(ckpt.get('loss_kwargs', {}))}


# %%
#| export
def model_card(ckpt:dict # a checkpoint dict (`load_checkpoint`)
              ) -> dict:
    "The card stored in `ckpt`, or the one its training record gives (test metrics unknown)."
    if 'card' in ckpt: return ckpt['card']
    cfg = ckpt.get('config', {})
    secs = ckpt.get('train_time_s')
    return {'name': None, 'architecture': _architecture(ckpt), 'loss': _loss(ckpt),
            'dataset': ckpt.get('dataset') or cfg.get('dataset'),
            'training': {'epochs': ckpt.get('epoch', -1) + 1 if 'epoch' in ckpt else cfg.get('max_epoch'),
                         'best_epoch': ckpt.get('best_epoch'),
                         'minutes': None if secs is None else round(secs / 60, 1),
                         'seed': cfg.get('seed'), 'precision': checkpoint_precision(ckpt)},
            'test': None,
            'localization': {'threshold': checkpoint_loc_threshold(ckpt), 'chosen_on': 'validation F1 at 8 px'
                             if 'loc_threshold' in ckpt else 'library default'},
            'input': dict(INPUT_NORMALIZATION)}


# %%
_ck = {'model': {'w': torch.ones(2, 3)}, 'model_name': 'mcnn', 'model_kwargs': {'out_act': 'abs'},
       'stride': 4, 'epoch': 9, 'best_epoch': 6, 'train_time_s': 600.,
       'config': {'loss': 'gl', 'seed': 3, 'amp': True}}
_card = model_card(_ck)
test_eq((_card['architecture'], _card['loss']), ({'model': 'mcnn', 'kwargs': {'out_act': 'abs'}, 'stride': 4,
                                                   'weights': 6}, {'name': 'gl', 'kwargs': {}}))
test_eq(_card['training'], {'epochs': 10, 'best_epoch': 6, 'minutes': 10.0, 'seed': 3, 'precision': 'fp16'})
test_eq((_card['test'], _card['localization']), (None, {'threshold': 0.05, 'chosen_on': 'library default'}))
test_eq(model_card({**_ck, 'card': {'name': 'x'}}), {'name': 'x'})


# %% [markdown]
# The card of a published model is built from the records its training run left, never typed by hand: the test
# metrics from the results table of an experiment (one row per run: `seed, epochs, train_minutes, mae, rmse,
# nae, f1_4, f1_8, checkpoint, precision, ...`), the threshold from the `loc_threshold.json` written beside
# the checkpoint when it was chosen on the validation images, and how it was trained from the config stored in
# the checkpoint. The card is what a user downloads with the model, so it carries the numbers and the protocol
# themselves, and no path of the experiment's files. `training_protocol` says the protocol in words.

# %%
#| export
def _schedule(config:dict) -> str:
    "The learning-rate schedule of a training config, in words."
    c, epochs = config, config['max_epoch']
    # configs from before `schedule` existed had the plateau rules when they set a patience
    schedule = c.get('schedule') or ('plateau' if c.get('patience') or c.get('lr_patience') else 'constant')
    if schedule == 'cosine':
        warm = f"{c['warmup_epochs']} warm-up epochs, then " if c.get('warmup_epochs') else ''
        return f"{warm}cosine decay to {c.get('min_lr_ratio', 0.01):.0%} of it at epoch {epochs}"
    if schedule == 'plateau':
        window = c.get('val_window', 1)
        better = 'validation MAE' if window == 1 else f'mean of the last {window} validation MAEs'
        rules = [f"×{c.get('lr_decay', 0.1):g} after {c['lr_patience']} epochs without a better {better}"
                 if c.get('lr_patience') else f"constant while the {better} improves",
                 f"stopped after {c['patience']} epochs without one" if c.get('patience') else '']
        return ', '.join(r for r in rules if r) + f" (at most {epochs} epochs)"
    return f"constant for {epochs} epochs"


# %%
#| export
def training_protocol(config:dict # a run's config as stored in its checkpoint (`TrainConfig.to_dict()`)
                     ) -> str:
    "How a run was trained, in words: optimizer, learning-rate schedule, weight average, crops, validation."
    c = config
    backbone = c.get('backbone_lr_scale', 1)
    lr = f"Adam at learning rate {c['lr']:g}"
    if backbone != 1: lr += f" ({backbone:g}× for the pretrained backbone)"
    average = (f"weights averaged over the steps (exponential decay {c['ema_decay']:g})" if c.get('ema_decay')
               else 'no weight average')
    held_out = c.get('data_kwargs', {}).get('val_fraction')
    validation = f"validated every {c.get('val_epoch', 1)} epochs" + (
        f" on {held_out:.0%} of the training images, held out" if held_out else '')
    crops = f"random {c['crop_size']}-px crops, {c['batch_size']} a batch, {c['precision']}"
    optimizer = f"{lr}, weight decay {c.get('weight_decay', 0):g}, {_schedule(c)}"
    return '; '.join([optimizer, average, crops, validation])


# %%
_cosine = {'lr': 1e-4, 'backbone_lr_scale': 0.3, 'weight_decay': 1e-5, 'schedule': 'cosine',
           'warmup_epochs': 2, 'min_lr_ratio': 0.01, 'max_epoch': 40, 'ema_decay': 0.998, 'crop_size': 256,
           'batch_size': 4, 'precision': 'bf16', 'val_epoch': 2, 'data_kwargs': {'val_fraction': 0.15}}
test_eq(training_protocol(_cosine),
        'Adam at learning rate 0.0001 (0.3× for the pretrained backbone), weight decay 1e-05, 2 warm-up epochs, '
        'then cosine decay to 1% of it at epoch 40; weights averaged over the steps (exponential decay 0.998); '
        'random 256-px crops, 4 a batch, bf16; validated every 2 epochs on 15% of the training images, held out')
# a config from before `schedule` and `ema_decay` existed: its plateau rules, and no average
_plateau = {'lr': 1e-4, 'weight_decay': 1e-5, 'max_epoch': 400, 'patience': 40, 'lr_patience': 20,
            'lr_decay': 0.1, 'val_window': 5, 'crop_size': 256, 'batch_size': 4, 'precision': 'bf16',
            'val_epoch': 2}
test_eq(training_protocol(_plateau),
        'Adam at learning rate 0.0001, weight decay 1e-05, ×0.1 after 20 epochs without a better mean of the '
        'last 5 validation MAEs, stopped after 40 epochs without one (at most 400 epochs); no weight average; '
        'random 256-px crops, 4 a batch, bf16; validated every 2 epochs')
test_eq(_schedule({'schedule': 'constant', 'max_epoch': 20}), 'constant for 20 epochs')
test_eq(_schedule({'schedule': 'plateau', 'patience': 5, 'max_epoch': 9}),
        'constant while the validation MAE improves, stopped after 5 epochs without one (at most 9 epochs)')


# %%
#| export
def results_card(results_csv:str|Path, # an experiment's results table (a row per run, with its `checkpoint`)
                 checkpoint:str, # the run's checkpoint as written in that table (relative to `root`)
                 name:str, # short name of the model
                 root:str|Path='.' # the folder the table's paths are relative to (the repository)
                ) -> dict:
    "The card of the run of `checkpoint`: test metrics from its row of `results_csv`, threshold from its run."
    root, results_csv = Path(root), Path(results_csv)
    with open(results_csv, newline='') as f:
        rows = [r for r in csv.DictReader(f) if r.get('checkpoint') == str(checkpoint)]
    if len(rows) != 1:
        raise ValueError(f"{results_csv}: expected one row with checkpoint {checkpoint}, found {len(rows)}")
    row = rows[0]
    ckpt = load_checkpoint(root / checkpoint)
    loc_file = (root / checkpoint).parent / 'loc_threshold.json'
    if not loc_file.is_file():
        raise FileNotFoundError(f"{loc_file} is missing: the validation-chosen threshold is part of the card")
    loc = json.loads(loc_file.read_text())
    threshold = float(loc['threshold'])
    val_f1 = {float(k): v for k, v in loc.get('val_f1_8', {}).items()}
    cfg = ckpt['config']
    return {'name': name, 'architecture': _architecture(ckpt), 'loss': _loss(ckpt),
            'dataset': ckpt.get('dataset') or cfg.get('dataset'),
            'training': {'epochs': int(row['epochs']), 'best_epoch': ckpt.get('best_epoch'),
                         'minutes': float(row['train_minutes']), 'seed': int(row['seed']),
                         'precision': row.get('precision') or checkpoint_precision(ckpt),
                         'batch_size': cfg.get('batch_size'), 'crop_size': cfg.get('crop_size'),
                         'lr': cfg.get('lr'), 'protocol': training_protocol(cfg),
                         'weights': 'final weight average' if ckpt.get('weights') == 'ema'
                                    else 'best validation MAE'},
            'test': {'split': 'test', **{k: float(row[k]) for k in ('mae', 'rmse', 'nae', 'f1_4', 'f1_8')}},
            'localization': {'threshold': threshold, 'chosen_on': 'validation F1 at 8 px',
                             'val_f1_8': val_f1.get(threshold)},
            'input': dict(INPUT_NORMALIZATION)}


# %%
#| export
def write_model(src:str|Path, # a checkpoint written by `fit` (full or slim)
                dst:str|Path, # the model file to write
                card:dict # its card (`results_card`)
               ) -> Path:
    "A slim model file: the weights, what rebuilds the network, the card, its threshold, the run's precision."
    ckpt = load_checkpoint(src)
    slim = {k: ckpt[k] for k in MODEL_KEYS if k in ckpt and k != 'card'}
    slim['precision'] = checkpoint_precision(ckpt)
    slim['loc_threshold'] = float(card['localization']['threshold'])
    slim['card'] = card
    return save_checkpoint(slim, dst)


# %% [markdown]
# A run made here: a checkpoint, its threshold file and a results table with its row. The card takes the test
# numbers from the row, the threshold and its validation F1 from the file, and the protocol from the config;
# the model file keeps only the model keys, whatever else the checkpoint held.

# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d); run = d / 'runs' / 'a'
    save_checkpoint({'model': {'w': torch.ones(3)}, 'model_name': 'mcnn', 'stride': 4, 'precision': 'fp32',
                     'loss_name': 'gl', 'dataset': 'synthetic', 'best_epoch': 1, 'optimizer': {},
                     'config': {**_plateau, 'seed': 2}}, run / 'best.pt')
    (run / 'loc_threshold.json').write_text(json.dumps({'threshold': 0.02,
                                                        'val_f1_8': {'0.02': 0.7, '0.05': 0.6}}))
    (d / 'results.csv').write_text('seed,epochs,train_minutes,mae,rmse,nae,f1_4,f1_8,checkpoint\n'
                                   '2,12,3.5,1.25,2.5,0.1,0.3,0.5,runs/a/best.pt\n')
    card = results_card(d / 'results.csv', 'runs/a/best.pt', 'toy', d)
    test_eq(card['test'], {'split': 'test', 'mae': 1.25, 'rmse': 2.5, 'nae': 0.1, 'f1_4': 0.3, 'f1_8': 0.5})
    test_eq(card['localization'], {'threshold': 0.02, 'chosen_on': 'validation F1 at 8 px', 'val_f1_8': 0.7})
    test_eq({k: card['training'][k] for k in ('epochs', 'minutes', 'seed', 'precision', 'weights')},
            {'epochs': 12, 'minutes': 3.5, 'seed': 2, 'precision': 'fp32', 'weights': 'best validation MAE'})
    test_eq(card['training']['protocol'], training_protocol(_plateau))
    model = load_checkpoint(write_model(run / 'best.pt', d / 'toy.pt', card))
    test_eq(sorted(model), ['card', 'loc_threshold', 'model', 'model_name', 'precision', 'stride'])
    test_eq((model['loc_threshold'], model['card']), (0.02, card))
    test_fail(lambda: results_card(d / 'results.csv', 'runs/b/best.pt', 'toy', d), contains='found 0')


# %% [markdown]
# ## `uotcrowd models`
#
# `models_cmd` is `uotcrowd models`: one line per named model with the main numbers of its card, or the full
# cards as JSON.

# %%
#| export
def _fmt(v, spec='') -> str: return '-' if v is None else format(v, spec)


# %%
#| export
def models_cmd(folder:str|None=None, # folder of named models (default: `$UOTCROWD_MODELS`, else `models/`)
               json_cards:bool=False, # print the full cards as JSON instead of the table
               quiet:bool=False # print nothing, only return the cards
              ) -> dict:
    "List the named models with their cards; returns `{name: card}`."
    d = models_dir(folder)
    cards = {n: model_card(load_checkpoint(d / f'{n}.pt')) for n in model_names(folder)}
    if quiet: return cards
    if json_cards: print(json.dumps(cards, indent=1)); return cards
    lines = [f"{'name':<16} {'model':<7} {'loss':<13} {'dataset':<15} {'MAE':>7} {'RMSE':>7} {'F1@8':>6} "
             f"{'thresh':>6} {'epochs':>6} {'minutes':>7}"]
    for n, c in cards.items():
        t, tr = c.get('test') or {}, c.get('training') or {}
        lines.append(f"{n:<16} {_fmt(c['architecture']['model']):<7} {_fmt(c['loss']['name']):<13} "
                     f"{_fmt(c.get('dataset')):<15} {_fmt(t.get('mae'), '.2f'):>7} "
                     f"{_fmt(t.get('rmse'), '.2f'):>7} {_fmt(t.get('f1_8'), '.3f'):>6} "
                     f"{_fmt(c['localization']['threshold'], 'g'):>6} {_fmt(tr.get('epochs')):>6} "
                     f"{_fmt(tr.get('minutes'), '.1f'):>7}")
    try: where = min(os.path.relpath(d), str(d), key=len)   # the shorter of the relative and absolute paths
    except ValueError: where = str(d)                       # another drive (Windows)
    lines.append(f"{len(cards)} model(s) in {where}; `--checkpoint NAME` or Counter(NAME) uses one")
    print('\n'.join(lines))
    return cards


# %%
cards = models_cmd()
test_eq(cards['shb-mcnn-gl'], load_checkpoint(root / 'models/shb-mcnn-gl.pt')['card'])
with tempfile.TemporaryDirectory() as d:
    test_eq(models_cmd(d, quiet=True), {})

# %% [markdown]
# ## Publishing the committed models (developers)
#
# The committed models are written by `publish_model` from the experiments' results in a checkout of the
# repository (`nbs/experiments/results/`), so a model file and the table it comes from cannot disagree; users
# never need it. The repository holds two ShanghaiTech B models, both trained with the generalized loss, the
# transport solved to 10⁻³ marginal error (`mode='converged'`):
#
# - `shb-effnet-gl`, the default of `Counter` (`uotcrowd.counter.DEFAULT_MODEL`): EfficientNet-Lite0 from its
#   ImageNet weights, the [fixed-protocol study](experiments/shb_study.ipynb)'s run at the learning rate
#   chosen on the shared validation photos (1e-4 against 3e-4: mean of the last three validations 14.3 against
#   16.0), seed 0 (fixed before any run); its weights are the final weight average of a 40-epoch cosine
#   schedule;
# - `shb-mcnn-gl`, MCNN from scratch: seed 0 of the [runs to
#   convergence](experiments/shb_mcnn_convergence.ipynb) (224 epochs, bf16), its best-validation checkpoint
#   (validation MAE 15.9 on that run's 40 photos).

# %%
#| export
PUBLISHED = {'shb-effnet-gl': ('nbs/experiments/results/shb_study.csv', 'nbs/experiments/results/shb_study/'
                               'effnet-lite0/gl-converged_lr1e-4_s0_c512/final.pt'),
             'shb-mcnn-gl': ('nbs/experiments/results/shb_mcnn.csv',
                             'nbs/experiments/results/shb_mcnn/plateau5/gl-converged_s0/best.pt')
            }   # name: (results table, checkpoint), relative to the repository


# %%
#| export
def publish_model(name:str, # a key of `PUBLISHED`
                  root:str|Path, # the repository checkout
                  folder:str|Path|None=None # where to write `NAME.pt` (default: `root/models`)
                 ) -> Path:
    "Developers: write the committed model `name` from the experiment run that `PUBLISHED[name]` names."
    results_csv, checkpoint = PUBLISHED[name]
    root = Path(root)
    card = results_card(root / results_csv, checkpoint, name, root)
    return write_model(root / checkpoint, Path(folder or root / 'models') / f'{name}.pt', card)


# %%
#| notest
for name in PUBLISHED: publish_model(name, root)


# %% [markdown]
# Each committed file must be what `publish_model` writes today: the run's weights, the card of its results
# row and the threshold of its threshold file, and no path into the experiments in the card. That only says
# where the card comes from; that its test numbers are what the weights do is checked by evaluating every
# committed model again on its test split (the 316 ShanghaiTech B photos, a few minutes):
# `test_published_model_card_is_what_the_model_does` in `tests/test_counter.py` (marker `dataset`, run by CI).

# %%
def _strings(x):
    "Every string in a nested card (keys and values)."
    if isinstance(x, dict): return [s for k, v in x.items() for s in [str(k), *_strings(v)]]
    if isinstance(x, (list, tuple)): return [s for v in x for s in _strings(v)]
    return [x] if isinstance(x, str) else []

for name, (results_csv, checkpoint) in PUBLISHED.items():
    committed, src = load_checkpoint(root / f'models/{name}.pt'), load_checkpoint(root / checkpoint)
    test_eq(sorted(committed), sorted(MODEL_KEYS))
    test_eq(sorted(committed['model']), sorted(src['model']))
    for k, v in src['model'].items(): assert torch.equal(committed['model'][k], v), k
    card = committed['card']
    test_eq(card, results_card(root / results_csv, checkpoint, name, root))
    threshold_file = (root / checkpoint).with_name('loc_threshold.json')
    test_eq(committed['loc_threshold'], json.loads(threshold_file.read_text())['threshold'])
    test_eq((card['loss']['name'], card['dataset'], committed['precision']), ('gl', 'shanghaitech-b', 'bf16'))
    assert not [s for s in _strings(card) if 'experiments' in s or s.endswith(('.csv', '.pt', '.json'))], card
    weight_bytes = sum(v.numel() * v.element_size() for v in committed['model'].values())
    assert (root / f'models/{name}.pt').stat().st_size < 1.2 * weight_bytes
test_eq(model_card(src)['test'], None); test_eq(model_card(src)['training']['epochs'], src['epoch'] + 1)
card

# %%
#| hide
import nbdev; nbdev.nbdev_export()
