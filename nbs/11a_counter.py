# %% [markdown]
# # Counter
#
# > Count people in your own photos and videos: `Counter` (a path, PIL image or array → count, density map, located heads), named models with cards, tiled inference for large photos in bounded memory, and counts per video frame.

# %%
#| default_exp counter

# %%
#| export
from __future__ import annotations
import csv, json, math, os, subprocess, sys, textwrap
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Literal, Sequence
import numpy as np
import torch
from torch import nn
from PIL import Image, ImageDraw, ImageFont
from uotcrowd.core import get_device, reuse_host_memory, HostMemory, check_choice
from uotcrowd.data import load_image, normalize, list_images, IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD
from uotcrowd.train import (models_dir, model_names, resolve_checkpoint, MODELS_ENV, load_model, load_checkpoint,
                            save_checkpoint, write_csv, checkpoint_precision, checkpoint_loc_threshold,
                            resolve_precision, autocast, memory_format, Precision)
from uotcrowd.localize import localize
from uotcrowd.deploy import load_onnx

# %%
#| hide
import contextlib, io, tempfile, warnings
import matplotlib
from IPython.display import Image as Picture
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.models import get_model

# %% [markdown]
# A trained counter is used in three ways: from Python (`Counter`), from the command line (`uotcrowd predict`,
# `uotcrowd models`) and from a local web page (`uotcrowd serve`, in `uotcrowd.serve`). This notebook builds the
# Python side that the other two call; [Count people in your photos](count_your_photos.ipynb) walks through all
# three on a real photo.
#
# ```python
# from uotcrowd.counter import Counter
# counter = Counter('shb-mcnn-gl')          # a named model, or the path of any checkpoint written by `fit`
# result = counter('photo.jpg')             # a path, a PIL image or an (H, W, 3) uint8 array
# result.count, result.points, result.density
# ```

# %%
#| hide
root = Path('..')
fixtures = root / 'tests' / 'fixtures'   # committed copies of the shared fixtures
shb_image = fixtures / 'ShanghaiTech/part_B/train_data/images/IMG_9.jpg'   # 1024×768, 167 annotated heads
torch.manual_seed(0)
mcnn_random = get_model('mcnn').eval()                    # random weights: tiling and batching are checked on them
def as_jpeg(im): buf = io.BytesIO(); im.save(buf, 'JPEG', quality=85); return Picture(data=buf.getvalue(), format='jpeg')


# %% [markdown]
# ## Named models and their cards
#
# A model that is shared carries a **card**: what network it is, which loss and data set trained it, for how long,
# how well it did on the test split (MAE, RMSE, localization F1), the localization threshold chosen on the
# validation images, and how its input is normalized. Model files are slim: weights, what is needed to rebuild the
# network, and the card; no optimizer state or training history.
#
# Models committed in the repository live in its `models/` folder, one `NAME.pt` each; `Counter(NAME)` and
# `--checkpoint NAME` find them there. The folder is found beside the package (an install from a checkout:
# `pip install -e .`), or where the environment variable `UOTCROWD_MODELS` points.

# %%
#| export
MODEL_KEYS = ('model', 'model_name', 'model_kwargs', 'stride', 'precision', 'loc_threshold', 'card', 'torch_version')
INPUT_NORMALIZATION = {'channels': 'RGB', 'scale': 1 / 255, 'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD)}


# %% [markdown]
# A card is built from the records a training run leaves, never typed by hand: the test metrics from the results
# table of an experiment (one row per run: `loss, seed, epochs, train_minutes, mae, rmse, nae, f1_4, f1_8,
# checkpoint, precision, protocol`) and the threshold from the `loc_threshold.json` written beside the checkpoint
# when it was chosen on the validation images. A checkpoint without a card still has one: `model_card` derives
# what its training record says and leaves the test metrics unknown.

# %%
#| export
def results_card(results_csv:str|Path, # an experiment's results table (one row per run, with a `checkpoint` column)
                 checkpoint:str, # the run's checkpoint as written in that table (relative to `root`)
                 name:str, # short name of the model
                 root:str|Path='.' # the folder the table's paths are relative to (the repository)
                ) -> dict:
    "The card of the run whose `checkpoint` is in `results_csv`: test metrics from its row, threshold from its `loc_threshold.json`."
    root, results_csv = Path(root), Path(results_csv)
    with open(results_csv, newline='') as f: rows = [r for r in csv.DictReader(f) if r.get('checkpoint') == str(checkpoint)]
    if len(rows) != 1: raise ValueError(f"{results_csv}: expected one row with checkpoint {checkpoint}, found {len(rows)}")
    row = rows[0]
    ckpt = load_checkpoint(root / checkpoint)
    loc_file = (root / checkpoint).parent / 'loc_threshold.json'
    if not loc_file.is_file(): raise FileNotFoundError(f"{loc_file} is missing: the validation-chosen threshold is part of the card")
    loc = json.loads(loc_file.read_text())
    threshold = float(loc['threshold'])
    val_f1 = {float(k): v for k, v in loc.get('val_f1_8', {}).items()}
    cfg = ckpt.get('config', {})
    try: rel_csv = results_csv.resolve().relative_to(root.resolve()).as_posix()
    except ValueError: rel_csv = results_csv.name
    return {'name': name,
            'architecture': {'model': ckpt.get('model_name') or cfg.get('model'), 'kwargs': dict(ckpt.get('model_kwargs', {})),
                             'stride': ckpt.get('stride'), 'weights': int(sum(v.numel() for v in ckpt['model'].values()))},
            'loss': {'name': ckpt.get('loss_name') or cfg.get('loss'), 'kwargs': dict(ckpt.get('loss_kwargs', {}))},
            'dataset': ckpt.get('dataset') or cfg.get('dataset'),
            'training': {'epochs': int(row['epochs']), 'best_epoch': ckpt.get('best_epoch'), 'minutes': float(row['train_minutes']),
                         'seed': int(row['seed']), 'precision': row.get('precision') or checkpoint_precision(ckpt),
                         'batch_size': cfg.get('batch_size'), 'crop_size': cfg.get('crop_size'), 'lr': cfg.get('lr'),
                         'protocol': row.get('protocol'),
                         'weights': 'final weight average' if ckpt.get('weights') == 'ema' else 'best validation MAE'},
            'test': {'split': 'test', **{k: float(row[k]) for k in ('mae', 'rmse', 'nae', 'f1_4', 'f1_8')}},
            'localization': {'threshold': threshold, 'chosen_on': 'validation F1 at 8 px', 'val_f1_8': val_f1.get(threshold)},
            'input': dict(INPUT_NORMALIZATION),
            'source': {'results': rel_csv, 'checkpoint': str(checkpoint)}}

def model_card(ckpt:dict # a checkpoint dict (`load_checkpoint`)
              ) -> dict:
    "The card stored in `ckpt`, or the one its training record gives (test metrics unknown)."
    if 'card' in ckpt: return ckpt['card']
    cfg = ckpt.get('config', {})
    secs = ckpt.get('train_time_s')
    return {'name': None,
            'architecture': {'model': ckpt.get('model_name') or cfg.get('model'), 'kwargs': dict(ckpt.get('model_kwargs', {})),
                             'stride': ckpt.get('stride'), 'weights': int(sum(v.numel() for v in ckpt['model'].values()))},
            'loss': {'name': ckpt.get('loss_name') or cfg.get('loss'), 'kwargs': dict(ckpt.get('loss_kwargs', {}))},
            'dataset': ckpt.get('dataset') or cfg.get('dataset'),
            'training': {'epochs': ckpt.get('epoch', -1) + 1 if 'epoch' in ckpt else cfg.get('max_epoch'),
                         'best_epoch': ckpt.get('best_epoch'), 'minutes': None if secs is None else round(secs / 60, 1),
                         'seed': cfg.get('seed'), 'precision': checkpoint_precision(ckpt)},
            'test': None,
            'localization': {'threshold': checkpoint_loc_threshold(ckpt),
                             'chosen_on': 'validation F1 at 8 px' if 'loc_threshold' in ckpt else 'library default'},
            'input': dict(INPUT_NORMALIZATION)}

def write_model(src:str|Path, # a checkpoint written by `fit` (full or slim)
                dst:str|Path, # the model file to write
                card:dict # its card (`results_card`)
               ) -> Path:
    "A slim model file: the weights, what rebuilds the network, the card, and the card's threshold and the run's precision."
    ckpt = load_checkpoint(src)
    slim = {k: ckpt[k] for k in MODEL_KEYS if k in ckpt and k != 'card'}
    slim['precision'] = checkpoint_precision(ckpt)
    slim['loc_threshold'] = float(card['localization']['threshold'])
    slim['card'] = card
    return save_checkpoint(slim, dst)


# %% [markdown]
# The committed models are written by `publish_model` from the experiments' results, so a model file and the
# table it comes from cannot disagree. The repository holds two ShanghaiTech B models, both trained with the
# generalized loss, the transport solved to 10⁻³ marginal error (`mode='converged'`):
#
# - `shb-effnet-gl`, the default (`DEFAULT_MODEL`): EfficientNet-Lite0 from its ImageNet weights, the
#   [fixed-protocol study](experiments/shb_study.ipynb)'s run at the learning rate chosen on the shared validation
#   photos (1e-4 against 3e-4: mean of the last three validations 14.3 against 16.0), seed 0 (fixed before any run);
#   its weights are the final weight average of a 40-epoch cosine schedule;
# - `shb-mcnn-gl`, MCNN from scratch: seed 0 of the [runs to convergence](experiments/shb_mcnn_convergence.ipynb)
#   (224 epochs, bf16), its best-validation checkpoint (validation MAE 15.9 on that run's 40 photos).

# %%
#| export
PUBLISHED = {'shb-effnet-gl': ('nbs/experiments/results/shb_study.csv', 'nbs/experiments/results/shb_study/effnet-lite0/gl-converged_lr1e-4_s0/final.pt'),
             'shb-mcnn-gl': ('nbs/experiments/results/shb_mcnn.csv', 'nbs/experiments/results/shb_mcnn/plateau5/gl-converged_s0/best.pt')}
DEFAULT_MODEL = 'shb-effnet-gl'  # what `Counter()`, `uotcrowd predict` and `uotcrowd serve` count with unless told otherwise

def publish_model(name:str, # a key of `PUBLISHED`
                  root:str|Path, # the repository checkout
                  folder:str|Path|None=None # where to write `NAME.pt` (default: `root/models`)
                 ) -> Path:
    "Write the committed model `name` from the experiment run `PUBLISHED[name]` names, with its card."
    results_csv, checkpoint = PUBLISHED[name]
    root = Path(root)
    card = results_card(root / results_csv, checkpoint, name, root)
    return write_model(root / checkpoint, Path(folder or root / 'models') / f'{name}.pt', card)


# %%
#| notest
for name in PUBLISHED: publish_model(name, root)

# %% [markdown]
# The committed file must be what `publish_model` writes today: same weights, same card, and the threshold of the
# threshold file. That only says where the card comes from; that its test numbers are what the weights do is checked
# by evaluating every committed model again on its test split (the 316 ShanghaiTech B photos, a few minutes):
# `test_published_model_card_is_what_the_model_does` in `tests/test_counter.py` (marker `dataset`, run by CI).

# %%
committed = load_checkpoint(root / 'models/shb-mcnn-gl.pt')
src = load_checkpoint(root / PUBLISHED['shb-mcnn-gl'][1])
test_eq(sorted(committed), ['card', 'loc_threshold', 'model', 'model_kwargs', 'model_name', 'precision', 'stride', 'torch_version'])
for k, v in src['model'].items(): assert torch.equal(committed['model'][k], v), k
card = committed['card']
test_eq(card, results_card(root / PUBLISHED['shb-mcnn-gl'][0], PUBLISHED['shb-mcnn-gl'][1], 'shb-mcnn-gl', root))
test_eq(committed['loc_threshold'], json.loads((root / PUBLISHED['shb-mcnn-gl'][1]).with_name('loc_threshold.json').read_text())['threshold'])
test_eq((card['architecture']['model'], card['loss']['name'], card['dataset'], committed['precision']), ('mcnn', 'gl', 'shanghaitech-b', src['config']['precision']))
assert (root / 'models/shb-mcnn-gl.pt').stat().st_size < 1.2 * sum(v.numel() * v.element_size() for v in committed['model'].values())
test_eq(model_card(src)['test'], None); test_eq(model_card(src)['training']['epochs'], src['epoch'] + 1)
card['test']


# %% [markdown]
# `models_cmd` is `uotcrowd models`: one line per named model with the main numbers of its card, or the full
# cards as JSON.

# %%
#| export
def _fmt(v, spec='') -> str: return '-' if v is None else format(v, spec)

def models_cmd(folder:str|None=None, # folder of named models (default: the checkout's `models/`, or `$UOTCROWD_MODELS`)
               json_cards:bool=False, # print the full cards as JSON instead of the table
               quiet:bool=False # print nothing, only return the cards
              ) -> dict:
    "List the named models with their cards; returns `{name: card}`."
    d = models_dir(folder)
    cards = {n: model_card(load_checkpoint(d / f'{n}.pt')) for n in model_names(folder)}
    if quiet: return cards
    if json_cards: print(json.dumps(cards, indent=1)); return cards
    head = f"{'name':<16} {'model':<7} {'loss':<13} {'dataset':<15} {'MAE':>7} {'RMSE':>7} {'F1@8':>6} {'thresh':>6} {'epochs':>6} {'minutes':>7}"
    lines = [head]
    for n, c in cards.items():
        t, tr = c.get('test') or {}, c.get('training') or {}
        lines.append(f"{n:<16} {_fmt(c['architecture']['model']):<7} {_fmt(c['loss']['name']):<13} {_fmt(c.get('dataset')):<15} "
                     f"{_fmt(t.get('mae'), '.2f'):>7} {_fmt(t.get('rmse'), '.2f'):>7} {_fmt(t.get('f1_8'), '.3f'):>6} "
                     f"{_fmt(c['localization']['threshold'], 'g'):>6} {_fmt(tr.get('epochs')):>6} {_fmt(tr.get('minutes'), '.1f'):>7}")
    try: where = min(os.path.relpath(d), str(d), key=len)      # the shorter of the relative and absolute paths
    except ValueError: where = str(d)                          # another drive (Windows)
    print('\n'.join(lines) + f"\n{len(cards)} model(s) in {where}; `--checkpoint NAME` or Counter(NAME) uses one")
    return cards


# %%
cards = models_cmd()
test_eq(cards['shb-mcnn-gl'], committed['card'])
with tempfile.TemporaryDirectory() as d:
    test_eq(models_cmd(d, quiet=True), {})


# %% [markdown]
# ## Reading images
#
# `Counter` takes a file path, a PIL image (any mode) or a `uint8` array, `(H, W)` grey or `(H, W, 3|4)`
# colour; everything becomes an `(H, W, 3)` uint8 RGB array. Wrong inputs are refused with what was expected.

# %%
#| export
def as_rgb(image # a path, a PIL image, or a `(H, W)` / `(H, W, 3)` / `(H, W, 4)` uint8 array
          ) -> np.ndarray: # `(H, W, 3)` uint8
    "An image as an `(H, W, 3)` uint8 RGB array; errors name the file or say what was expected."
    if isinstance(image, (str, Path)): image = load_image(image)
    if isinstance(image, Image.Image): return np.array(image.convert('RGB'))   # a writable copy
    if isinstance(image, torch.Tensor): raise TypeError("pass images as a path, a PIL image or an (H, W, 3) uint8 numpy array, not a tensor")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0..255), got {arr.dtype}; for floats in [0, 1] pass (array * 255).round().astype(np.uint8)")
    if arr.ndim == 2: arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got shape {tuple(np.asarray(image).shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0: raise ValueError(f"the image is empty (shape {arr.shape})")
    if arr.shape[-1] == 1: arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


# %%
rgb = as_rgb(shb_image)
test_eq((rgb.shape, rgb.dtype), ((768, 1024, 3), np.uint8))
test_eq(as_rgb(Image.fromarray(rgb).convert('L')).shape, (768, 1024, 3))
test_eq(as_rgb(np.dstack([rgb, np.zeros_like(rgb[..., :1])])), rgb)
test_fail(lambda: as_rgb(rgb / 255.), contains='must be uint8')
test_fail(lambda: as_rgb(rgb[None]), contains='got shape (1, 768, 1024, 3)')
test_fail(lambda: as_rgb('/nonexistent/photo.jpg'), contains='photo.jpg')

# %% [markdown]
# ## Large images: tiles with overlap
#
# A 4000×3000 photo through VGG19 needs a few GB for each 64-channel activation of its first block; whole-image
# inference does not fit a laptop, or a GPU at 4K. `tiled_density` splits the image into tiles whose **cores**
# cover it without overlap and whose inputs add `overlap` pixels of context on every side (clipped at the image
# border). Each tile's density is computed on its input and only the core's part is kept. Tile sides and offsets
# are multiples of the model's stride and size multiple (16 for VGG19: four 2×2 pools), so each kept density pixel
# sees the same pixels, pooled the same way, as in the whole-image map, and the stitched map **equals** the
# whole-image map wherever the network's receptive field around a core pixel stays inside its tile's input.
# MCNN's receptive field is about 70 px wide, so with 128 px of overlap its stitched map is exact; VGG19's is about
# 280 px, so a little of the zero padding at a tile's border reaches the edge of the core (`tests/test_counter.py`
# bounds the effect on the count). Memory is that of one tile, whatever the photo's size.

# %%
#| export
DEFAULT_TILE = 1024          # tile side (core) when tiling is automatic
DEFAULT_OVERLAP = 128        # context pixels read around each core
TILE_ABOVE = 2_500_000       # images with more pixels than this are tiled when `tile=None`

def tile_spans(length:int, # image side in pixels
               tile:int, # core length
               overlap:int # context read on each side of a core
              ) -> list[tuple[int, int, int, int]]: # `(start, end, core_start, core_end)` per tile
    "Tiles along one side: cores `[k*tile, (k+1)*tile)` clipped to `length`, inputs widened by `overlap` on both sides."
    return [(max(0, c0 - overlap), min(length, c0 + tile + overlap), c0, min(length, c0 + tile)) for c0 in range(0, length, tile)]

def tiled_density(forward:Callable[[torch.Tensor], torch.Tensor], # `(1, 3, h, w)` uint8 tile → `(1, 1, ceil(h/s), ceil(w/s))` density
                  image:torch.Tensor, # `(3, H, W)` uint8 image
                  stride:int, # input pixels per density pixel
                  tile:int, # core side, a multiple of `stride` and of the network's size multiple
                  overlap:int # context pixels, a multiple of the same
                 ) -> tuple[torch.Tensor, int]: # stitched `(1, 1, ceil(H/s), ceil(W/s))` float32 density on the CPU, tiles
    "Density of a large image computed tile by tile: each tile's core is cut from its density and placed in the map."
    if tile % stride or overlap % stride or tile <= 0 or overlap < 0:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be non-negative multiples of the stride {stride}")
    H, W = image.shape[-2:]
    out = torch.zeros(1, 1, math.ceil(H / stride), math.ceil(W / stride))
    n = 0
    for y0, y1, cy0, cy1 in tile_spans(H, tile, overlap):
        for x0, x1, cx0, cx1 in tile_spans(W, tile, overlap):
            d = forward(image[None, :, y0:y1, x0:x1]).float().cpu()
            r0, r1, c0, c1 = cy0 // stride, math.ceil(cy1 / stride), cx0 // stride, math.ceil(cx1 / stride)
            out[..., r0:r1, c0:c1] = d[..., r0 - y0 // stride:r1 - y0 // stride, c0 - x0 // stride:c1 - x0 // stride]
            n += 1
    return out, n


# %%
test_eq(tile_spans(1000, 400, 64), [(0, 464, 0, 400), (336, 864, 400, 800), (736, 1000, 800, 1000)])
test_eq(tile_spans(300, 400, 64), [(0, 300, 0, 300)])
# cores tile the side exactly once
for L, t in [(1000, 400), (17, 8), (4000, 1024)]:
    sp = tile_spans(L, t, 32); test_eq(sum(c1 - c0 for _, _, c0, c1 in sp), L)
# a pixel-wise "network" (stride 1, no context) is stitched exactly, whatever the tiling
img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
dens, n = tiled_density(lambda x: x.float().mean(1, keepdim=True), img, 1, 8, 0)
test_eq(n, 5 * 7); test_eq(dens[0, 0], img.float().mean(0))
test_fail(lambda: tiled_density(lambda x: x, img, 4, 10, 8), contains='multiples of the stride 4')


# %% [markdown]
# Localization needs bounded memory too: on a 4000×3000 photo, `localize` works on the 12-megapixel upsampled map
# with several full-size temporaries (about 0.4 GB per 3 megapixels). `localize_in_bands` localizes the stitched map
# in bands of rows, each read with `margin` density rows of context and keeping the points whose row falls in the
# band. A point depends on the density rows next to its own (bilinear upsampling, then a 3×3 neighbourhood), so with a
# margin of two rows the points are those of the whole map; only a plateau of exactly equal values straddling a band
# border could be split.

# %%
#| export
def localize_in_bands(density:torch.Tensor, # `(1, 1, h, w)` density map
                      stride:int, # input pixels per density pixel
                      threshold:float, # as in `localize`
                      rows:int=128, # density rows per band
                      margin:int=2 # density rows of context read on each side of a band
                     ) -> tuple[torch.Tensor, torch.Tensor]: # `(K, 2)` points `(x, y)` in input pixels, `(K,)` scores
    "`localize` of one large density map band by band, in row-major order like `localize`."
    h = density.shape[-2]
    pts, scs = [], []
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a0, a1 = max(0, r0 - margin), min(h, r1 + margin)
        (p,), (sc,) = localize(density[..., a0:a1, :], stride=stride, threshold=threshold, return_scores=True)
        p = p.clone(); p[:, 1] += a0 * stride
        keep = (p[:, 1] >= r0 * stride) & (p[:, 1] < r1 * stride)
        pts.append(p[keep]); scs.append(sc[keep])
    return torch.cat(pts), torch.cat(scs)


# %%
g = torch.Generator().manual_seed(0)
dens = torch.rand(1, 1, 101, 67, generator=g) ** 4          # continuous values: no exact ties
(ref_p,), (ref_s,) = localize(dens, stride=8, threshold=0.05, return_scores=True)
for rows in (1, 7, 50, 200):
    p, sc = localize_in_bands(dens, 8, 0.05, rows=rows)
    test_eq(p, ref_p); test_eq(sc, ref_s)


# %% [markdown]
# ## `Counter`
#
# `Counter` loads the model once and keeps its settings: the precision it was trained in (`bf16`/`fp16` run under
# autocast with channels-last tensors, the density is summed in float32), the localization threshold chosen on
# validation, and the tiling. Calling it on one image returns a `CountResult`; on a list, a list, with images of the
# same size stacked into batches of `batch_size`. `count` is the sum of the density map; `points` are the local
# maxima of the upsampled map above the threshold (`uotcrowd.localize`), in input pixels, and `scores` the
# density at each.

# %%
#| export
@dataclass(repr=False)
class CountResult:
    "What `Counter` finds in one image."
    count:float # people: the sum of the density map
    density:np.ndarray # `(h, w)` float32 people per density pixel; pixel (i, j) covers input pixels stride·(i, j) onwards
    points:np.ndarray # `(N, 2)` float32 located heads, `(x, y)` in input pixels
    scores:np.ndarray # `(N,)` float32 density at each located head (the peak height)
    height:int # input image height in pixels
    width:int # input image width in pixels
    stride:int # input pixels per density pixel
    tiles:int = 1 # tiles the image was split into (1: the whole image at once)
    source:str|None = None # the file the image was read from, if any

    @property
    def size(self) -> tuple[int, int]: return (self.width, self.height)

    def __repr__(self):
        src = f', {self.source}' if self.source else ''
        tiles = f', {self.tiles} tiles' if self.tiles > 1 else ''
        return f"CountResult(count={self.count:.1f}, {len(self.points)} points, {self.width}×{self.height} image{tiles}{src})"

    def to_dict(self, points:bool=True # include the points and their scores
               ) -> dict:
        "JSON-ready summary (no density map)."
        d = {'source': self.source, 'count': round(self.count, 4), 'n_points': int(len(self.points)),
             'width': self.width, 'height': self.height, 'tiles': self.tiles}
        if points: d |= {'points': np.round(self.points, 2).tolist(), 'scores': np.round(self.scores, 5).tolist()}
        return d


# %%
#| export
class Counter:
    "Count people in images with one trained model, loaded once: `Counter(checkpoint)(image)`."
    def __init__(self, checkpoint:str|Path|nn.Module=DEFAULT_MODEL, # a checkpoint file, a named model (`models_cmd`), an ONNX export (`.onnx`), or a density network
                 device:str|torch.device='auto', # where the model runs ('auto': CUDA, then MPS, then CPU)
                 precision:Precision|None=None, # 'fp32', 'bf16', 'fp16' or 'auto'; default: the checkpoint's
                 loc_threshold:float|None=None, # localization threshold; default: the checkpoint's (chosen on validation)
                 tile:int|None=None, # tile side in pixels; None: tile images above `tile_above` pixels; 0: never tile
                 overlap:int=DEFAULT_OVERLAP, # context pixels read around each tile (rounded up to the model's size multiple)
                 tile_above:int=TILE_ABOVE, # pixel count above which `tile=None` tiles (with `DEFAULT_TILE`-pixel tiles)
                 batch_size:int=4, # same-size images counted together
                 models:str|Path|None=None # folder of named models (default: `models_dir()`)
                ):
        self.device = get_device(device)
        if isinstance(checkpoint, nn.Module):
            self.path, ckpt = None, {}
            self.model = checkpoint.to(self.device).eval()
        else:
            self.path = resolve_checkpoint(checkpoint, models)
            if self.path.suffix == '.onnx': (self.model, ckpt), self.device = load_onnx(self.path), torch.device('cpu')  # onnxruntime, float32
            else: self.model, ckpt = load_model(self.path, self.device)
        if not hasattr(self.model, 'stride'): raise ValueError(f"{checkpoint}: the model has no `stride` attribute (input pixels per density pixel)")
        self.card = model_card(ckpt) if ckpt else None
        self.name = (self.card or {}).get('name') or (self.path.stem if self.path else type(self.model).__name__)
        self.stride = int(self.model.stride)
        self.multiple = math.lcm(self.stride, int(getattr(self.model, 'multiple', self.stride)))
        self.precision = resolve_precision(precision or (checkpoint_precision(ckpt) if ckpt else 'fp32'), self.device)
        self.loc_threshold = float(checkpoint_loc_threshold(ckpt) if loc_threshold is None else loc_threshold)
        self.tile, self.tile_above, self.batch_size = tile, int(tile_above), max(1, int(batch_size))
        self.overlap = self._round(max(0, int(overlap)))

    def _round(self, n:int) -> int: return -(-n // self.multiple) * self.multiple

    def __repr__(self):
        return (f"Counter({self.name}: {type(self.model).__name__}, stride {self.stride}, {self.device}, {self.precision}, "
                f"threshold {self.loc_threshold:g})")

    def tile_for(self, height:int, width:int, tile:int|None=None) -> int:
        "Tile side used for an image of this size (0: the whole image at once)."
        tile = self.tile if tile is None else tile
        if tile is None: tile = DEFAULT_TILE if height * width > self.tile_above else 0
        if not tile or (tile >= height and tile >= width): return 0
        return self._round(int(tile))

    def density(self, images:torch.Tensor # `(B, 3, H, W)` uint8 images (any device)
               ) -> torch.Tensor: # `(B, 1, ceil(H/s), ceil(W/s))` float32 density on the model's device
        "The model's density maps for a batch of whole images, in the counter's precision."
        x = normalize(images.to(self.device)).contiguous(memory_format=memory_format(self.precision))
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model(x).float()

    def _results(self, density:torch.Tensor, sizes, sources, tiles, band_rows:int=0) -> list[CountResult]:
        if band_rows: pts, scs = [[x] for x in localize_in_bands(density, self.stride, self.loc_threshold, band_rows)]
        else: pts, scs = localize(density, stride=self.stride, threshold=self.loc_threshold, return_scores=True)
        dens = density[:, 0].cpu().numpy()
        return [CountResult(count=float(density[b].sum()), density=dens[b], points=pts[b].cpu().numpy().astype(np.float32),
                            scores=scs[b].cpu().numpy().astype(np.float32), height=h, width=w, stride=self.stride,
                            tiles=tiles, source=src) for b, ((h, w), src) in enumerate(zip(sizes, sources))]

    def __call__(self, images, # one image (path, PIL image, uint8 array) or a list of them
                 tile:int|None=None # tile side for this call (default: the counter's `tile`); 0: never tile
                ) -> CountResult|list[CountResult]:
        "Count the people in one image, or in each image of a list."
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        arrays = [as_rgb(im) for im in items]
        sources = [str(im) if isinstance(im, (str, Path)) else None for im in items]
        out:list[CountResult|None] = [None] * len(items)
        groups:dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays): groups.setdefault(a.shape[:2], []).append(i)
        for (h, w), idx in groups.items():
            t = self.tile_for(h, w, tile)
            if t:
                for i in idx:
                    u8 = torch.from_numpy(arrays[i]).permute(2, 0, 1)
                    dens, n = tiled_density(self.density, u8, self.stride, t, self.overlap)
                    out[i] = self._results(dens, [(h, w)], [sources[i]], n, band_rows=t // self.stride)[0]
                continue
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                u8 = torch.from_numpy(np.stack([arrays[i] for i in chunk])).permute(0, 3, 1, 2)
                for i, r in zip(chunk, self._results(self.density(u8), [(h, w)] * len(chunk), [sources[i] for i in chunk], 1)):
                    out[i] = r
        return out[0] if single else out


# %% [markdown]
# On random MCNN weights, a counter's result is the model's own density and `localize`'s points; a batch of
# images gives what each gives alone; the tiled map equals the whole-image map (MCNN's receptive field fits in the
# overlap), at tiles that split the image in 4×3.

# %%
counter = Counter(mcnn_random, device='cpu')
small = rgb[:240, :320]
r = counter(small)
with torch.no_grad(): ref = mcnn_random(normalize(torch.from_numpy(small).permute(2, 0, 1))[None])
test_close(r.count, float(ref.sum()), eps=1e-4 * float(ref.sum()))
test_eq(r.density.shape, (60, 80)); test_eq((r.height, r.width, r.size, r.tiles), (240, 320, (320, 240), 1))
ref_pts, ref_sc = localize(ref, 4, threshold=counter.loc_threshold, return_scores=True)
test_close(r.points, ref_pts[0].numpy(), eps=1e-4); test_close(r.scores, ref_sc[0].numpy(), eps=1e-5)
assert len(r.points) > 0
test_eq(counter.loc_threshold, 0.05); test_eq(counter.precision, 'fp32')
# batches: a list with two sizes gives each image's own result, in order
imgs = [small, rgb[:160, :200], small[::-1].copy(), Image.fromarray(small)]
rs = counter(imgs)
test_eq([x.size for x in rs], [(320, 240), (200, 160), (320, 240), (320, 240)])
for im, x in zip(imgs, rs): test_close(x.count, counter(im).count, eps=1e-4 * x.count)
test_close(rs[0].density, rs[3].density, eps=1e-6)
# tiles: 256-px cores (4×3 tiles) give the whole-image map
whole, tiled = counter(rgb, tile=0), counter(rgb, tile=256)
test_eq((whole.tiles, tiled.tiles), (1, 12))
test_close(tiled.density, whole.density, eps=1e-4)
test_close(tiled.count, whole.count, eps=1e-5 * whole.count)
test_eq(len(tiled.points), len(whole.points)); test_close(tiled.points, whole.points, eps=1e-3)   # located in bands
test_eq(counter.tile_for(3000, 4000), 1024); test_eq(counter.tile_for(768, 1024), 0); test_eq(counter.tile_for(768, 1024, 250), 252)   # MCNN: multiples of 4
whole

# %% [markdown]
# With the committed model on the real part B image: the stitched count equals the whole-image count, and the
# model's threshold and precision come from its file.

# %%
shb = Counter('shb-mcnn-gl', device='cpu')
test_eq((shb.name, shb.loc_threshold, shb.precision, shb.stride), ('shb-mcnn-gl', committed['loc_threshold'], committed['precision'], 4))
r_whole, r_tiled = shb(shb_image, tile=0), shb(shb_image, tile=256)
test_close(r_tiled.count, r_whole.count, eps=1e-5 * r_whole.count)   # bf16 rounds each tile: measured 2.3e-6
test_eq(r_whole.source, str(shb_image))
print(shb, r_whole, f'tiled: {r_tiled.count:.2f}', sep='\n')
assert 100 < r_whole.count < 250, r_whole.count      # 167 annotated heads; the model's test MAE is 30

# %% [markdown]
# An ONNX export (`uotcrowd export`, [ONNX export](10a_deploy.ipynb)) is counted the same way, by onnxruntime on
# the CPU in float32, with the card and threshold of the model it came from; tiles and batches work as for PyTorch.

# %%
from uotcrowd.deploy import export

# %%
with tempfile.TemporaryDirectory() as d:
    onnx_counter = Counter(export('shb-mcnn-gl', out=f'{d}/shb.onnx', quiet=True))
    fp32 = Counter('shb-mcnn-gl', device='cpu', precision='fp32')
    test_eq((onnx_counter.name, onnx_counter.card, onnx_counter.loc_threshold, onnx_counter.precision, str(onnx_counter.device)),
            ('shb-mcnn-gl', committed['card'], committed['loc_threshold'], 'fp32', 'cpu'))
    for t in (0, 256):
        r_onnx, r_fp32 = onnx_counter(shb_image, tile=t), fp32(shb_image, tile=t)
        test_close(r_onnx.count, r_fp32.count, eps=1e-4 * r_fp32.count); test_eq(len(r_onnx.points), len(r_fp32.points))
    print(onnx_counter, r_onnx, sep='\n')


# %% [markdown]
# ## Pictures of a result
#
# `render_result` draws a result on its image with PIL alone (no figure): the density map as a heat-map overlay
# (at full opacity `alpha` from half the density's maximum up, fading with its square root to the plain photo where
# the density is zero),
# the located heads as dots, or both, optionally with the count written in a corner; the web page and annotated
# videos use it.

# %%
#| export
def _font(size:int):
    try: return ImageFont.load_default(size=size)
    except TypeError: return ImageFont.load_default()   # Pillow < 10.1: one fixed size

Shown = Literal['density', 'points', 'both']   # what `render_result` draws over the image

def render_result(image, # the image the result was computed on (path, PIL image or uint8 array)
                  result:CountResult, # what `Counter` found in it
                  show:Shown='both', # 'density' (heat-map overlay), 'points' (located heads) or 'both'
                  max_side:int|None=1280, # downscale so that the longer side is at most this many pixels
                  label:bool=False, # write the count in the top-left corner
                  alpha:float=0.7, # opacity of the heat map from half its maximum up (it fades as √density to 0)
                  cmap:str='jet' # matplotlib colour map of the heat map
                 ) -> Image.Image:
    "The image with the density overlaid and/or the located heads marked, as a PIL RGB image."
    check_choice(show, Shown, 'show')
    im = Image.fromarray(as_rgb(image))
    if im.size != result.size: raise ValueError(f"the image is {im.size[0]}×{im.size[1]} but the result is for {result.width}×{result.height}")
    scale = min(1.0, max_side / max(im.size)) if max_side else 1.0
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if scale < 1: im = im.resize(size, Image.Resampling.LANCZOS)
    if show in ('density', 'both'):
        import matplotlib
        d = result.density.astype(np.float32)
        # the map's pixel (i, j) covers input pixels [s·j, s·(j+1)); the last row/column may stick out of the image
        cover = (result.density.shape[1] * result.stride * scale, result.density.shape[0] * result.stride * scale)
        heat = Image.fromarray(d).resize((max(1, round(cover[0])), max(1, round(cover[1]))), Image.Resampling.BILINEAR).crop((0, 0) + size)
        h = np.asarray(heat, dtype=np.float32)
        h = h / h.max() if h.max() > 0 else h
        lut = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
        colour = lut[np.clip(h * 255, 0, 255).astype(np.uint8)]
        a = (alpha * np.sqrt(np.clip(2 * h, 0, 1)))[..., None]   # full opacity from half the maximum, the photo itself at 0
        im = Image.fromarray((np.asarray(im, np.float32) * (1 - a) + colour * a).round().astype(np.uint8))
    if show in ('points', 'both') and len(result.points):
        draw = ImageDraw.Draw(im)
        r = max(2.5, max(size) / 200)
        for x, y in result.points * scale:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 30, 30), outline=(255, 255, 255), width=max(1, round(r / 3)))
    if label:
        draw = ImageDraw.Draw(im)
        fs = max(12, round(max(size) / 30))
        text = f"{result.count:.0f} people"
        box = draw.textbbox((0, 0), text, font=_font(fs))
        draw.rectangle((0, 0, box[2] + fs, box[3] + fs // 2 + 2), fill=(0, 0, 0))
        draw.text((fs // 2, fs // 4), text, fill=(255, 255, 255), font=_font(fs))
    return im


# %%
res = counter(small)
pic = render_result(small, res, show='points', max_side=None)
test_eq(pic.size, (320, 240))
arr = np.asarray(pic)
x, y = res.points[0].round().astype(int)
test_eq(tuple(arr[y, x]), (255, 30, 30))                           # a dot at each located head
zero = CountResult(0., np.zeros((60, 80), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32), 240, 320, 4)
test_eq(np.asarray(render_result(small, zero, max_side=None)), small)     # no density: the photo itself
one = CountResult(1., np.zeros((60, 80), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32), 240, 320, 4)
one.density[30, 40] = 1.                                                  # one density pixel: the heat map's maximum there
top = (np.array(matplotlib.colormaps['jet'](1.)[:3]) * 255).astype(np.uint8)
test_close(np.asarray(render_result(small, one, max_side=None), np.float32)[122, 162], small[122, 162] * 0.3 + top * 0.7, eps=1)
test_eq(render_result(small, res, max_side=160).size, (160, 120))
test_eq(np.asarray(render_result(small, res, label=True, max_side=None))[1, 1], (0, 0, 0))   # the count's box
test_fail(lambda: render_result(rgb, res), contains='1024×768 but the result is for 320×240')
as_jpeg(render_result(shb_image, r_whole, max_side=640, label=True))

# %% [markdown]
# ## Peak memory of a large photo
#
# `measure_peak_memory` counts one random photo with a random-weight network on the CPU in a fresh Python process
# and reports that process's peak resident memory (`getrusage`'s `ru_maxrss`, the operating system's own high-water
# mark, so nothing is sampled or missed), with the memory it held before counting (the interpreter, torch, the
# model and the photo). Memory does not depend on the machine's load; time does.

# %%
#| export
_MEMORY_SCRIPT = textwrap.dedent('''
    import json, sys, time, warnings
    import numpy as np, torch
    a = json.loads(sys.argv[1])
    torch.set_num_threads(a['threads']); torch.manual_seed(a['seed'])
    from uotcrowd.models import get_model
    from uotcrowd.counter import Counter
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); model = get_model(a['model'], out_act='abs')
    photo = np.random.default_rng(a['seed']).integers(0, 256, (a['height'], a['width'], 3), dtype=np.uint8)
    counter = Counter(model, device='cpu', precision=a['precision'], tile=a['tile'])
    # the high-water mark is reset before counting (`uotcrowd.measure.peak_memory`): the process's lifetime maximum
    # (`ru_maxrss`) would include the parent's size, which Linux carries over a fork and exec
    from uotcrowd.measure import peak_memory, _status_bytes
    before, res = _status_bytes('VmRSS'), {}
    t = time.perf_counter(); extra = peak_memory(lambda: res.update(r=counter(photo)), method='rss'); secs = time.perf_counter() - t
    r = res['r']
    print(json.dumps({'peak_mb': (before + extra) / 2**20, 'before_mb': before / 2**20, 'count': r.count, 'tiles': r.tiles, 'seconds': secs}))
''')

def measure_peak_memory(model:str='vgg19', # 'vgg19', 'csrnet' or 'mcnn' (random weights: nothing is downloaded)
                        height:int=3000, width:int=4000, # photo size
                        tile:int|None=None, # as in `Counter`: None automatic, 0 whole image, N tile side
                        precision:str='fp32', # as in `Counter`
                        threads:int=1, # torch CPU threads
                        seed:int=0 # weights and photo
                       ) -> dict: # `peak_mb`, `before_mb`, `count`, `tiles`, `seconds` and the arguments
    "Peak resident memory (MB) of counting one random photo on the CPU, measured in a fresh process."
    args = dict(model=model, height=height, width=width, tile=tile, precision=precision, threads=threads, seed=seed)
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    p = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, json.dumps(args)], capture_output=True, text=True, env=env)
    if p.returncode: raise RuntimeError(f"the memory measurement failed ({args}):\n{p.stderr[-2000:]}")
    return {**args, **json.loads(p.stdout.strip().splitlines()[-1])}


# %% [markdown]
# The 4000×3000 measurement through VGG19 is the `#| slow` cell below (a few minutes on one CPU thread); it writes
# `bench_results/tiling_memory_cpu.json`, which is committed, and the cell after it shows the committed numbers.
# The target is a peak under 4 GB with tiles; `test_automatic_tiling_keeps_a_12_megapixel_photo_under_4_gb` in
# `tests/test_counter.py` (marker `slow`, which the suite and CI run) measures it again on every run.

# %%
#| slow
_rows = [measure_peak_memory('vgg19', 3000, 4000, tile=t) for t in (None, 0)]
Path('bench_results').mkdir(exist_ok=True)
Path('bench_results/tiling_memory_cpu.json').write_text(json.dumps(_rows, indent=1))

# %%
_rows = json.loads(Path('bench_results/tiling_memory_cpu.json').read_text())
for _r in _rows:
    print(f"{_r['model']} {_r['width']}×{_r['height']}, {'whole image' if _r['tiles'] == 1 else str(_r['tiles']) + ' tiles'}: "
          f"peak {_r['peak_mb'] / 1024:.2f} GB ({_r['before_mb'] / 1024:.2f} GB before counting), count {_r['count']:.1f}, {_r['seconds']:.0f} s")
_tiled = next(r for r in _rows if r['tiles'] > 1)
assert _tiled['peak_mb'] < 4096 and _tiled['tile'] is None, _tiled     # automatic tiling keeps the 4000×3000 photo under 4 GB

# %% [markdown]
# ## Video
#
# `predict_video` counts every `every`-th frame of a video and writes the counts per frame (`NAME_counts.csv`:
# frame, time in seconds, count, located heads), a plot of the count over time (`NAME_counts.png`) and, with
# `annotate=True`, a video of the counted frames with their density, heads and count (`NAME_annotated.mp4`, H.264).
# Videos are decoded with PyAV, whose wheels ship their own FFmpeg: `pip install "uotcrowd[video]"`.

# %%
#| export
VIDEO_EXTS = ('.mp4', '.m4v', '.mov', '.avi', '.mkv', '.webm', '.mpg', '.mpeg', '.wmv', '.flv', '.ts')

def is_video(path:str|Path # a file name
            ) -> bool:
    "Whether `path` has a video file extension (`VIDEO_EXTS`)."
    return Path(path).suffix.lower() in VIDEO_EXTS

def _av():
    try: import av
    except ImportError as e:
        raise ImportError("reading videos needs PyAV, which ships its own FFmpeg: pip install 'uotcrowd[video]' (or: pip install av)") from e
    return av

def _open_video(path:Path):
    av = _av()
    if not path.is_file(): raise FileNotFoundError(f"video {path} does not exist")
    try: container = av.open(str(path))
    except av.error.FFmpegError as e: raise ValueError(f"{path}: not a readable video ({e})") from e
    if not container.streams.video:
        container.close(); raise ValueError(f"{path}: the file has no video stream")
    return av, container

def video_fps(path:str|Path # video file
             ) -> float|None:
    "Frames per second of the first video stream (None when the file does not say)."
    _, c = _open_video(Path(path))
    with c:
        s = c.streams.video[0]
        rate = s.average_rate or s.guessed_rate
        return float(rate) if rate else None

def read_video(path:str|Path, # video file
               every:int=1, # keep every N-th frame
               max_frames:int|None=None # stop after this many kept frames
              ):
    "Yield `(frame index, time in seconds, (H, W, 3) uint8 RGB frame)` for every `every`-th frame; errors name the file."
    path = Path(path)
    if every < 1: raise ValueError(f"every must be at least 1, got {every}")
    av, container = _open_video(path)
    with container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        kept, i = 0, -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i % every: continue
                t = float(frame.time) if frame.time is not None else (i / float(rate) if rate else float(i))
                yield i, t, frame.to_ndarray(format='rgb24')
                kept += 1
                if max_frames is not None and kept >= max_frames: return
        except av.error.FFmpegError as e: raise ValueError(f"{path}: decoding failed after frame {i}: {e}") from e
    if kept == 0: raise ValueError(f"{path}: no frame could be decoded")

class VideoWriter:
    "Write RGB frames to an H.264 (or MPEG-4) video with PyAV; odd sides are cropped by one pixel (4:2:0 needs even sides)."
    def __init__(self, path:str|Path, # output file (`.mp4`)
                 fps:float # frames per second
                ):
        self.av, self.path, self.fps = _av(), Path(path), Fraction(fps).limit_denominator(1001)
        self.container, self.stream = None, None

    def write(self, frame:np.ndarray # `(H, W, 3)` uint8 RGB
             ):
        if self.stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = self.av.open(str(self.path), 'w')
            codecs = self.av.codecs_available
            self.stream = self.container.add_stream('libx264' if 'libx264' in codecs else 'mpeg4', rate=self.fps)
            self.stream.height, self.stream.width = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
            self.stream.pix_fmt = 'yuv420p'
        h, w = self.stream.height, self.stream.width
        vf = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format='rgb24')
        for packet in self.stream.encode(vf): self.container.mux(packet)

    def close(self):
        if self.stream is not None:
            for packet in self.stream.encode(): self.container.mux(packet)
            self.container.close()
            self.stream = None

    def __enter__(self): return self
    def __exit__(self, *exc): self.close()

def plot_counts(rows:Sequence[dict], # `{'time_s', 'count', ...}` per counted frame
                path:str|Path|None=None, # write a PNG here
                title:str='', # figure title
                dpi:int=100):
    "The count over time; returns the matplotlib figure."
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(7, 3)); FigureCanvasAgg(fig)
    ax = fig.subplots()
    t, c = [r['time_s'] for r in rows], [r['count'] for r in rows]
    ax.plot(t, c, marker='.' if len(rows) <= 60 else None, lw=1.2)
    ax.set_xlabel('time (s)'); ax.set_ylabel('count'); ax.set_ylim(bottom=0); ax.grid(alpha=0.3)
    if title: ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=dpi)
    return fig


# %%
#| export
def predict_video(video:str, # video file (whatever FFmpeg reads: mp4, mov, avi, mkv, webm, ...)
                  checkpoint:str, # checkpoint file or named model (a `Counter` is also accepted)
                  out:str='predict_out', # output folder
                  every:int=1, # count every N-th frame
                  annotate:bool=False, # also write NAME_annotated.mp4: the counted frames with density, heads and count
                  max_frames:int|None=None, # stop after this many counted frames
                  device:str='auto', # 'auto', 'cpu', 'cuda', 'mps'
                  precision:Precision|None=None, # default: the checkpoint's
                  loc_threshold:float|None=None, # default: the checkpoint's
                  tile:int|None=None, # tile side for large frames (None automatic, 0 never)
                  batch_size:int=4, # frames counted together
                  quiet:bool=False # no progress output
                 ) -> dict: # `rows` (one dict per counted frame) and the paths written: `csv`, `plot`, `video`
    "Count people in the frames of a video: counts per frame to CSV, a plot of the count over time, optionally an annotated video."
    counter = checkpoint if isinstance(checkpoint, Counter) else Counter(checkpoint, device=device, precision=precision,
                                                                       loc_threshold=loc_threshold, tile=tile, batch_size=batch_size)
    video, out = Path(video), Path(out)
    fps = video_fps(video)                # also checks that the file is a readable video
    out.mkdir(parents=True, exist_ok=True)
    writer = VideoWriter(out / f'{video.stem}_annotated.mp4', (fps or 25.0) / every) if annotate else None
    rows, frames = [], []
    def flush():
        for (i, t, rgb), r in zip(frames, counter([f[2] for f in frames])):
            rows.append({'frame': i, 'time_s': round(t, 4), 'count': round(r.count, 4), 'n_points': len(r.points)})
            if writer is not None: writer.write(np.asarray(render_result(rgb, r, label=True)))
            if not quiet: print(f"{video.name} frame {i} ({t:.2f} s): count {r.count:.1f}", flush=True)
        frames.clear()
    try:
        for item in read_video(video, every, max_frames):
            frames.append(item)
            if len(frames) == counter.batch_size: flush()
        flush()
    finally:
        if writer is not None: writer.close()
    csv_path = write_csv(rows, out / f'{video.stem}_counts.csv', ['frame', 'time_s', 'count', 'n_points'])
    plot_path = out / f'{video.stem}_counts.png'
    plot_counts(rows, plot_path, title=f'{video.name}: count per frame ({counter.name})')
    res = {'rows': rows, 'csv': csv_path, 'plot': plot_path, 'video': writer.path if writer else None}
    if not quiet: print(f"wrote {csv_path}, {plot_path}" + (f", {writer.path}" if writer else ''))
    return res


# %% [markdown]
# A test video made here: 12 frames at 10 frames per second, frame $k$ showing $(k \bmod 4) + 1$ white 16×16
# squares on black, counted by a network that returns each 4×4 cell's brightness divided by a square's area, so
# the count of a frame is its number of squares. With `every=3` the frames 0, 3, 6, 9 are counted: 1, 4, 3, 2.

# %%
#| export
class SquareCounter(nn.Module):
    "Counts white 16×16 squares: each 4×4 cell's brightness (0..1, mean over RGB) × 16 / 256 (a test network, stride 4)."
    stride = 4
    def forward(self, x):
        rgb = x * torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
        return torch.nn.functional.avg_pool2d(rgb.mean(1, keepdim=True), 4) * 16 / 256

def square_frames(n:int=12, # frames
                  height:int=96, width:int=128 # frame size
                 ) -> list[np.ndarray]:
    "Frame k: (k mod 4) + 1 white 16×16 squares on black, 32 px apart."
    frames = []
    for k in range(n):
        f = np.zeros((height, width, 3), np.uint8)
        for j in range(k % 4 + 1): f[16 + 32 * (j // 3):32 + 32 * (j // 3), 16 + 32 * (j % 3):32 + 32 * (j % 3)] = 255
        frames.append(f)
    return frames


# %%
import av   # PyAV: the `video` extra, and the `dev` extra the tests run with (a missing one fails here)

# %%
sq = Counter(SquareCounter(), device='cpu')
test_eq([round(sq(f).count, 4) for f in square_frames(4)], [1, 2, 3, 4])
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    with VideoWriter(d / 'squares.mp4', 10) as vw:
        for f in square_frames(): vw.write(f)
    test_close(video_fps(d / 'squares.mp4'), 10.)
    res = predict_video(str(d / 'squares.mp4'), sq, out=str(d / 'out'), every=3, annotate=True, quiet=True)
    test_eq([r['frame'] for r in res['rows']], [0, 3, 6, 9])
    test_close([r['time_s'] for r in res['rows']], [0, 0.3, 0.6, 0.9], eps=1e-6)
    test_close([r['count'] for r in res['rows']], [1, 4, 3, 2], eps=0.03)   # lossy H.264 at its default quality
    test_eq([r['n_points'] for r in res['rows']], [1, 4, 3, 2])
    with open(res['csv']) as f: test_eq([int(r['n_points']) for r in csv.DictReader(f)], [1, 4, 3, 2])
    test_eq(Image.open(res['plot']).size, (700, 300))
    back = list(read_video(res['video']))
    test_eq((len(back), back[0][2].shape), (4, (96, 128, 3)))
    test_close(video_fps(res['video']), 10 / 3, eps=1e-3)
    test_eq(len(list(read_video(d / 'squares.mp4', every=5, max_frames=2))), 2)
    (d / 'notes.mp4').write_text('not a video')
    test_fail(lambda: list(read_video(d / 'notes.mp4')), contains='notes.mp4: not a readable video')
    test_fail(lambda: list(read_video(d / 'missing.mp4')), contains='missing.mp4 does not exist')
    test_fail(lambda: predict_video(str(d / 'notes.mp4'), sq, out=str(d / 'out2'), quiet=True), contains='notes.mp4: not a readable video')
    assert not (d / 'out2').exists()
test_eq((is_video('clip.MP4'), is_video('photo.jpg')), (True, False))


# %% [markdown]
# ## `predict`: photos, folders and videos
#
# `predict` is `uotcrowd predict`: it counts image files, folders of them and videos with one `Counter`, so named
# models, tiling of large photos and videos all work from the command line. For images it writes `predictions.csv`,
# `points.json`, a `NAME_pred.png` per image (`uotcrowd.plots.plot_prediction`), and the NWPU-Crowd submission files
# with `nwpu`; a file that cannot be read is reported and skipped, and the error at the end names it. For each
# video it writes what `predict_video` writes.

# %%
#| export
def predict(checkpoint:str, # checkpoint file or named model (`uotcrowd models`)
            inputs:Sequence[str], # image or video files, or folders of them
            out:str, # output folder
            loc_threshold:float|None=None, # density threshold of the localization (default: the checkpoint's, chosen on validation, else 0.05)
            tile:int|None=None, # tile side in pixels for large images (default: tiles above 2.5 megapixels; 0: never)
            every:int=1, # videos: count every N-th frame
            annotate:bool=False, # videos: also write NAME_annotated.mp4 with the density, heads and count of each counted frame
            nwpu:bool=False, # also write the NWPU-Crowd counting and localization submission files
            no_plots:bool=False, # skip the PNGs
            dpi:int=80, # resolution of the PNGs
            precision:Precision|None=None, # 'auto', 'fp32', 'bf16' or 'fp16' (default: the precision the checkpoint was trained in)
            device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
            host_memory:HostMemory='reuse', # 'reuse': freed host memory stays for the next image (glibc); 'release'
            quiet:bool=False # no per-file lines
           ) -> list[dict]: # one dict per image (name, path, count, n_points, points, tiles, error) and per video (name, path, frames, csv)
    "Count the people in images and videos; writes `predictions.csv`, `points.json` and a PNG per image, counts per frame per video."
    from uotcrowd.plots import plot_prediction
    from uotcrowd.metrics import write_nwpu_predictions
    with reuse_host_memory(host_memory):
        counter = checkpoint if isinstance(checkpoint, Counter) else Counter(checkpoint, device=device, precision=precision,
                                                                           loc_threshold=loc_threshold, tile=tile)
        files = list_images(inputs, IMAGE_EXTS + VIDEO_EXTS, 'image or video')  # folders: their images and videos
        out = Path(out); out.mkdir(parents=True, exist_ok=True)
        images, videos = [f for f in files if not is_video(f)], [f for f in files if is_video(f)]
        stems = [f.stem for f in images]
        if len(set(stems)) < len(stems): stems = [f"{f.parent.name}_{f.stem}" for f in images]
        results, failed = [], []
        for f, stem in zip(images, stems):
            try: rgb = as_rgb(f)
            except (ValueError, OSError) as e:  # a corrupt file is reported, the others are still counted
                print(f"uotcrowd predict: skipped {e}", file=sys.stderr, flush=True)
                failed.append(str(f))
                results.append({'name': stem, 'path': str(f), 'count': None, 'n_points': None, 'points': [], 'error': str(e)})
                continue
            r = counter(rgb)
            results.append({'name': stem, 'path': str(f), 'count': r.count, 'n_points': len(r.points), 'tiles': r.tiles,
                            'points': np.round(r.points.astype(np.float64), 2).tolist()})
            if not no_plots:
                plot_prediction(normalize(torch.from_numpy(rgb).permute(2, 0, 1)), torch.from_numpy(r.density), torch.from_numpy(r.points),
                                title=f'{f.name}: {r.count:.1f} people', path=out / f'{stem}_pred.png', dpi=dpi)
            if not quiet: print(f"{f}: count {r.count:.1f}, {len(r.points)} points" + (f" ({r.tiles} tiles)" if r.tiles > 1 else ''), flush=True)
        written = []
        if images:
            write_csv(results, out / 'predictions.csv', ['name', 'path', 'count', 'n_points', 'tiles', 'error'])
            good = [r for r in results if r['count'] is not None]
            (out / 'points.json').write_text(json.dumps({r['name']: {'count': r['count'], 'points': r['points']} for r in good}))
            written += [out / 'predictions.csv', out / 'points.json']
            if nwpu and good:
                ids = [int(r['name']) if str(r['name']).isdigit() else k + 1 for k, r in enumerate(good)]
                (out / 'nwpu_count.txt').write_text(''.join(f"{i} {r['count']:.4f}\n" for i, r in zip(ids, good)))
                written += [out / 'nwpu_count.txt', write_nwpu_predictions(out / 'nwpu_loc.txt', {i: np.asarray(r['points'], np.float64).reshape(-1, 2)
                                                                                                  for i, r in zip(ids, good)})]
        for v in videos:
            res = predict_video(str(v), counter, out=str(out), every=every, annotate=annotate, quiet=True)
            results.append({'name': v.stem, 'path': str(v), 'frames': len(res['rows']), 'csv': str(res['csv'])})
            written += [res['csv'], res['plot']] + ([res['video']] if res['video'] else [])
            if not quiet: print(f"{v}: {len(res['rows'])} frames counted, mean count {np.mean([r['count'] for r in res['rows']]):.1f}", flush=True)
        if not quiet:
            n_png = 0 if no_plots else len(images) - len(failed)
            print(f"wrote {', '.join(map(str, written))}" + (f" and {n_png} PNGs (*_pred.png) in {out}" if n_png else ''))
        if failed: raise ValueError(f"{len(failed)} of {len(files)} files could not be read ({', '.join(failed)}); "
                                    f"the others are in {out}")
    return results


# %% [markdown]
# Square frames saved as photos, one of them 1200×1600 (tiled automatically above `tile_above`, here lowered), a
# video of them, and a corrupt file, all in one folder: each photo's count is its number of squares, the video gets
# its counts per frame, and the corrupt file is named at the end.

# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d); (d / 'in').mkdir()
    frames = square_frames(4)
    for k, f in enumerate(frames): Image.fromarray(f).save(d / 'in' / f'{k + 1:04d}.png')
    big = np.zeros((1200, 1600, 3), np.uint8); big[:96, :128] = frames[3]; big[-96:, -128:] = frames[1]    # 4 + 2 squares
    Image.fromarray(big).save(d / 'in' / 'big.png')
    with VideoWriter(d / 'in' / 'clip.mp4', 10) as vw:
        for f in square_frames(8): vw.write(f)
    (d / 'in' / 'broken.jpg').write_bytes(b'not a photo')
    sq = Counter(SquareCounter(), device='cpu', tile_above=1_000_000)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        test_fail(lambda: predict(sq, [str(d / 'in')], str(d / 'out'), nwpu=True, quiet=True), contains='1 of 7 files could not be read')
    assert 'broken.jpg' in err.getvalue()
    with open(d / 'out' / 'predictions.csv') as fh: rows = {r['name']: r for r in csv.DictReader(fh)}
    test_eq({k: (round(float(r['count']), 3), r['n_points'], r['tiles']) for k, r in rows.items() if r['count']},
            {'0001': (1, '1', '1'), '0002': (2, '2', '1'), '0003': (3, '3', '1'), '0004': (4, '4', '1'), 'big': (6, '6', '4')})
    test_eq(sorted(p.name for p in (d / 'out').glob('*_pred.png')), ['0001_pred.png', '0002_pred.png', '0003_pred.png', '0004_pred.png', 'big_pred.png'])
    test_eq((d / 'out' / 'nwpu_count.txt').read_text().splitlines()[:2], ['1 1.0000', '2 2.0000'])
    with open(d / 'out' / 'clip_counts.csv') as fh: test_close([float(r['count']) for r in csv.DictReader(fh)], [1, 2, 3, 4] * 2, eps=0.03)
    test_fail(lambda: predict(sq, [str(d / 'missing.jpg')], str(d / 'out2')), contains='missing.jpg is neither')

# %%
#| hide
import nbdev; nbdev.nbdev_export()
