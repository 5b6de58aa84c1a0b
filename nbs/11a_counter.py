# %% [markdown]
# # Counter
#
# > Count people in your own photos: `Counter` (a path, PIL image or array → count, density map, located heads), with a named model or any checkpoint, tiled inference for large photos in bounded memory, and pictures of a result.

# %%
#| default_exp counter

# %%
#| export
from __future__ import annotations
import math, multiprocessing, time, traceback, warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal
import numpy as np
import torch
from fastcore.basics import patch
from torch import nn
from PIL import Image, ImageDraw, ImageFont
from uotcrowd.core import get_device, check_choice
from uotcrowd.images import load_image, normalize
from uotcrowd.plots import colour_table
from uotcrowd.models import get_model
from uotcrowd.checkpoints import (resolve_checkpoint, load_model, load_checkpoint, model_card,
                                  checkpoint_precision, checkpoint_loc_threshold)
from uotcrowd.precision import resolve_precision, autocast, memory_format, is_native, Precision
from uotcrowd.localize import localize
from uotcrowd.deploy import load_onnx
from uotcrowd.measure import peak_memory, status_bytes

# %%
#| hide
import io, json, tempfile
import matplotlib
from IPython.display import Image as Picture
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# A trained counter is used in three ways: from Python (`Counter`), from the command line (`uotcrowd predict`,
# in `uotcrowd.predict`) and from a local web page (`uotcrowd serve`, in `uotcrowd.serve`). This notebook
# builds the Python side that the other two call; videos are counted frame by frame in `uotcrowd.video`, and
# [Count people in your photos](count_your_photos.ipynb) walks through all of it on a real photo.
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
committed = load_checkpoint(root / 'models/shb-mcnn-gl.pt')      # a committed model, with its card
torch.manual_seed(0)
mcnn_random = get_model('mcnn').eval()        # random weights: tiling and batching are checked on them
def as_jpeg(im):
    buf = io.BytesIO(); im.save(buf, 'JPEG', quality=85)
    return Picture(data=buf.getvalue(), format='jpeg')


# %% [markdown]
# ## Which model
#
# `Counter(NAME)` counts with a named model: one of the models committed in the repository's `models/` folder,
# each with a card that says what it is and how well it did (`uotcrowd.checkpoints`; `uotcrowd models` lists
# them). Any checkpoint written by `fit`, an ONNX export or a density network works too. Without one,
# `Counter` counts with the default model.

# %%
#| export
DEFAULT_MODEL = 'shb-effnet-gl'  # what `Counter()`, `uotcrowd predict` and `uotcrowd serve` count with


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
    if isinstance(image, torch.Tensor):
        raise TypeError("pass images as a path, a PIL image or an (H, W, 3) uint8 numpy array, not a tensor")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0..255), got {arr.dtype}; for floats in [0, 1] pass "
                        f"(array * 255).round().astype(np.uint8)")
    if arr.ndim == 2: arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), "
                         f"got shape {tuple(np.asarray(image).shape)}")
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
# A 4000×3000 photo through VGG19 needs a few GB for each 64-channel activation of its first block;
# whole-image inference does not fit a laptop, or a GPU at 4K. `tiled_density` splits the image into tiles
# whose **cores** cover it without overlap and whose inputs add `overlap` pixels of context on every side
# (clipped at the image border). Each tile's density is computed on its input and only the core's part is
# kept. Tile sides and offsets are multiples of the model's stride and size multiple (16 for VGG19: four 2×2
# pools), so each kept density pixel sees the same pixels, pooled the same way, as in the whole-image map, and
# the stitched map **equals** the whole-image map wherever the network's receptive field around a core pixel
# stays inside its tile's input. MCNN's receptive field is about 70 px wide, so with 128 px of overlap its
# stitched map is exact; VGG19's is about 280 px, so a little of the zero padding at a tile's border reaches
# the edge of the core (`tests/test_counter.py` bounds the effect on the count). Memory is that of one tile,
# whatever the photo's size.

# %%
#| export
DEFAULT_TILE = 1024          # tile side (core) when tiling is automatic

# %%
#| export
DEFAULT_OVERLAP = 128        # context pixels read around each core

# %%
#| export
TILE_ABOVE = 2_500_000       # images with more pixels than this are tiled when `tile=None`


# %%
#| export
def tile_spans(length:int, # image side in pixels
               tile:int, # core length
               overlap:int # context read on each side of a core
              ) -> list[tuple[int, int, int, int]]: # `(start, end, core_start, core_end)` per tile
    "Tiles along one side: cores `[k*tile, (k+1)*tile)` clipped to `length`, inputs widened by `overlap`."
    return [(max(0, c0 - overlap), min(length, c0 + tile + overlap), c0, min(length, c0 + tile))
            for c0 in range(0, length, tile)]


# %%
#| export
def tiled_density(forward:Callable[[torch.Tensor], torch.Tensor], # `(1, 3, h, w)` uint8 tile → its density
                  image:torch.Tensor, # `(3, H, W)` uint8 image
                  stride:int, # input pixels per density pixel
                  tile:int, # core side, a multiple of `stride` and of the network's size multiple
                  overlap:int # context pixels, a multiple of the same
                 ) -> tuple[torch.Tensor, int]: # stitched `(1, 1, ⌈H/s⌉, ⌈W/s⌉)` float32 CPU density, tiles
    "Density of a large image tile by tile: each tile's core is cut from its density and placed in the map."
    if tile % stride or overlap % stride or tile <= 0 or overlap < 0:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be non-negative multiples of the stride "
                         f"{stride}")
    H, W = image.shape[-2:]
    out = torch.zeros(1, 1, math.ceil(H / stride), math.ceil(W / stride))
    n = 0
    for y0, y1, cy0, cy1 in tile_spans(H, tile, overlap):
        for x0, x1, cx0, cx1 in tile_spans(W, tile, overlap):
            d = forward(image[None, :, y0:y1, x0:x1]).float().cpu()
            r0, r1, c0, c1 = cy0 // stride, math.ceil(cy1 / stride), cx0 // stride, math.ceil(cx1 / stride)
            dy, dx = y0 // stride, x0 // stride    # the tile's offset in density pixels
            out[..., r0:r1, c0:c1] = d[..., r0 - dy:r1 - dy, c0 - dx:c1 - dx]
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
# Localization needs bounded memory too: on a 4000×3000 photo, `localize` works on the 12-megapixel upsampled
# map with several full-size temporaries (about 0.4 GB per 3 megapixels). `localize_in_bands` localizes the
# stitched map in bands of rows, each read with `margin` density rows of context and keeping the points whose
# row falls in the band. A point depends on the density rows next to its own (bilinear upsampling, then a 3×3
# neighbourhood), so with a margin of two rows the points are those of the whole map; only a plateau of
# exactly equal values straddling a band border could be split.

# %%
#| export
def localize_in_bands(density:torch.Tensor, # `(1, 1, h, w)` density map
                      stride:int, # input pixels per density pixel
                      threshold:float, # as in `localize`
                      rows:int=128, # density rows per band
                      margin:int=2 # density rows of context read on each side of a band
                     ) -> tuple[torch.Tensor, torch.Tensor]: # `(K, 2)` points `(x, y)`, `(K,)` scores
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
# ## The precision a model counts in
#
# A model trained in bf16 counts in bf16 where the device computes it in hardware; elsewhere (most laptop CPUs, which
# emulate it several times slower than float32) it counts in float32, which gives the same count to bf16's rounding.

# %%
#| export
def default_precision(trained_in:str, # the checkpoint's precision: 'fp32', 'bf16' or 'fp16'
                      device:str|torch.device # where the model runs
                     ) -> str:
    "The checkpoint's precision where `device` runs it natively (`is_native`), float32 elsewhere."
    return trained_in if is_native(trained_in, device) else 'fp32'

# %%
test_eq(default_precision('fp32', 'cpu'), 'fp32')
test_eq(default_precision('bf16', 'mps'), 'fp32')    # MPS computes fp16, not bf16
test_eq(default_precision('fp16', 'mps'), 'fp16')
test_eq(default_precision('bf16', 'cpu'), 'bf16' if is_native('bf16', 'cpu') else 'fp32')

# %% [markdown]
# ## `Counter`
#
# `Counter` loads the model once and keeps its settings: the precision it was trained in where the device runs it
# natively (`default_precision`; `bf16`/`fp16` run under autocast with channels-last tensors, the density is
# summed in float32), the localization threshold chosen on validation, and the tiling. Calling it on one image returns a `CountResult`; on a list, a list,
# with images of the same size stacked into batches of `batch_size`. `count` is the sum of the density map;
# `points` are the local maxima of the upsampled map above the threshold (`uotcrowd.localize`), in input
# pixels, and `scores` the density at each.

# %%
#| export
@dataclass(repr=False)
class CountResult:
    "What `Counter` finds in one image."
    count:float # people: the sum of the density map
    density:np.ndarray # `(h, w)` float32 people per density pixel; (i, j) covers input pixels from stride·(i, j)
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
        return (f"CountResult(count={self.count:.1f}, {len(self.points)} points, {self.width}×{self.height} "
                f"image{tiles}{src})")

    def to_dict(self, points:bool=True # include the points and their scores
               ) -> dict:
        "JSON-ready summary (no density map)."
        d = {'source': self.source, 'count': round(self.count, 4), 'n_points': int(len(self.points)),
             'width': self.width, 'height': self.height, 'tiles': self.tiles}
        if points:
            d |= {'points': np.round(self.points, 2).tolist(), 'scores': np.round(self.scores, 5).tolist()}
        return d


# %%
#| export
class Counter:
    "Count people in images with one trained model, loaded once: `Counter(checkpoint)(image)`."
    def __init__(self, checkpoint:str|Path|nn.Module=DEFAULT_MODEL, # checkpoint, named model, `.onnx` or network
                 device:str|torch.device='auto', # where the model runs ('auto': CUDA, then MPS, then CPU)
                 precision:Precision|None=None, # 'fp32', 'bf16', 'fp16' or 'auto'; default: `default_precision`
                 loc_threshold:float|None=None, # localization threshold; default: the checkpoint's (validation)
                 tile:int|None=None, # tile side in pixels; None: tile images above `tile_above` pixels; 0: never
                 overlap:int=DEFAULT_OVERLAP, # context pixels around each tile (rounded up to the size multiple)
                 tile_above:int=TILE_ABOVE, # pixel count above which `tile=None` tiles (`DEFAULT_TILE` sides)
                 batch_size:int=4, # same-size images counted together
                 models:str|Path|None=None # folder of named models (default: `models_dir()`)
                ):
        self.device = get_device(device)
        if isinstance(checkpoint, nn.Module):
            self.path, ckpt = None, {}
            self.model = checkpoint.to(self.device).eval()
        else:
            self.path = resolve_checkpoint(checkpoint, models)
            if self.path.suffix == '.onnx':   # onnxruntime, float32, on the CPU
                (self.model, ckpt), self.device = load_onnx(self.path), torch.device('cpu')
            else: self.model, ckpt = load_model(self.path, self.device)
        if not hasattr(self.model, 'stride'):
            raise ValueError(f"{checkpoint}: the model has no `stride` attribute "
                             f"(input pixels per density pixel)")
        self.card = model_card(ckpt) if ckpt else None
        self.name = (self.card or {}).get('name') or (self.path.stem if self.path else type(self.model).__name__)
        self.stride = int(self.model.stride)
        self.multiple = math.lcm(self.stride, int(getattr(self.model, 'multiple', self.stride)))
        trained_in = checkpoint_precision(ckpt) if ckpt else 'fp32'
        self.precision = resolve_precision(precision or default_precision(trained_in, self.device), self.device)
        self.loc_threshold = float(checkpoint_loc_threshold(ckpt) if loc_threshold is None else loc_threshold)
        self.tile, self.tile_above, self.batch_size = tile, int(tile_above), max(1, int(batch_size))
        self.overlap = self._round(max(0, int(overlap)))

    def _round(self, n:int) -> int: return -(-n // self.multiple) * self.multiple


# %% [markdown]
# A counter keeps the model's stride and size multiple and the settings it counts with. A network passed as
# such has no file and no card: the default threshold and float32, and the overlap rounded up to the multiple.

# %%
counter = Counter(mcnn_random, device='cpu')
test_eq((counter.name, counter.path, counter.card, counter.stride, counter.multiple), ('MCNN', None, None, 4, 4))
test_eq((counter.loc_threshold, counter.precision, counter.overlap, counter.batch_size), (0.05, 'fp32', 128, 4))
test_eq((counter._round(250), counter._round(252)), (252, 252))
other = Counter(mcnn_random, device='cpu', overlap=130, batch_size=0, loc_threshold=0.2, tile=500)
test_eq((other.overlap, other.batch_size, other.loc_threshold, other.tile), (132, 1, 0.2, 500))
test_fail(lambda: Counter(nn.Sequential(nn.Conv2d(3, 1, 1)), device='cpu'), contains='has no `stride` attribute')


# %%
#| export
@patch
def __repr__(self:Counter):
    return (f"Counter({self.name}: {type(self.model).__name__}, stride {self.stride}, {self.device}, "
            f"{self.precision}, threshold {self.loc_threshold:g})")


# %%
test_eq(repr(counter), 'Counter(MCNN: MCNN, stride 4, cpu, fp32, threshold 0.05)')


# %%
#| export
@patch
def tile_for(self:Counter, height:int, width:int, tile:int|None=None) -> int:
    "Tile side used for an image of this size (0: the whole image at once)."
    tile = self.tile if tile is None else tile
    if tile is None: tile = DEFAULT_TILE if height * width > self.tile_above else 0
    if not tile or (tile >= height and tile >= width): return 0
    return self._round(int(tile))


# %%
test_eq(counter.tile_for(3000, 4000), 1024)        # more than `TILE_ABOVE` pixels: `DEFAULT_TILE`
test_eq(counter.tile_for(768, 1024), 0)
test_eq(counter.tile_for(768, 1024, 250), 252)     # MCNN: multiples of 4
test_eq(counter.tile_for(768, 1024, 1024), 0)      # a tile that holds the whole image: no tiling
test_eq(other.tile_for(768, 1024), 500)            # the counter's own `tile`


# %%
#| export
@patch
def density(self:Counter, images:torch.Tensor # `(B, 3, H, W)` uint8 images (any device)
           ) -> torch.Tensor: # `(B, 1, ceil(H/s), ceil(W/s))` float32 density on the model's device
    "The model's density maps for a batch of whole images, in the counter's precision."
    x = normalize(images.to(self.device)).contiguous(memory_format=memory_format(self.precision))
    with torch.inference_mode(), autocast(self.device, self.precision):
        return self.model(x).float()


# %%
small = rgb[:240, :320]
small_u8 = torch.from_numpy(small).permute(2, 0, 1)
with torch.no_grad(): ref = mcnn_random(normalize(small_u8)[None])
d_ = counter.density(small_u8[None])
test_eq((d_.shape, d_.dtype), ((1, 1, 60, 80), torch.float32))
test_close(d_, ref, eps=1e-6)


# %%
#| export
@patch
def _results(self:Counter, density:torch.Tensor, sizes, sources, tiles,
             band_rows:int=0) -> list[CountResult]:
    if band_rows:
        pts, scs = [[x] for x in localize_in_bands(density, self.stride, self.loc_threshold, band_rows)]
    else: pts, scs = localize(density, stride=self.stride, threshold=self.loc_threshold, return_scores=True)
    dens = density[:, 0].cpu().numpy()
    return [CountResult(count=float(density[b].sum()), density=dens[b],
                        points=pts[b].cpu().numpy().astype(np.float32),
                        scores=scs[b].cpu().numpy().astype(np.float32), height=h, width=w,
                        stride=self.stride, tiles=tiles, source=src)
            for b, ((h, w), src) in enumerate(zip(sizes, sources))]


# %%
ref_pts, ref_sc = localize(ref, 4, threshold=counter.loc_threshold, return_scores=True)
res = counter._results(ref, [(240, 320)], ['small.jpg'], 1)[0]
test_close(res.count, float(ref.sum()), eps=1e-6 * float(ref.sum()))
test_close(res.points, ref_pts[0].numpy(), eps=1e-6); test_close(res.scores, ref_sc[0].numpy(), eps=1e-6)
test_eq((res.source, res.size, res.stride, res.tiles), ('small.jpg', (320, 240), 4, 1))
test_eq(res.density.shape, (60, 80))


# %%
#| export
@patch
def __call__(self:Counter, images, # one image (path, PIL image, uint8 array) or a list of them
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
            found = self._results(self.density(u8), [(h, w)] * len(chunk), [sources[i] for i in chunk], 1)
            for i, r in zip(chunk, found): out[i] = r
    return out[0] if single else out


# %% [markdown]
# On random MCNN weights, a counter's result is the model's own density and `localize`'s points; a batch of
# images gives what each gives alone; the tiled map equals the whole-image map (MCNN's receptive field fits in
# the overlap), at tiles that split the image in 4×3.

# %%
r = counter(small)
test_close(r.count, float(ref.sum()), eps=1e-4 * float(ref.sum()))
test_eq(r.density.shape, (60, 80)); test_eq((r.height, r.width, r.size, r.tiles), (240, 320, (320, 240), 1))
test_close(r.points, ref_pts[0].numpy(), eps=1e-4); test_close(r.scores, ref_sc[0].numpy(), eps=1e-5)
assert len(r.points) > 0
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
test_eq(len(tiled.points), len(whole.points)); test_close(tiled.points, whole.points, eps=1e-3)   # in bands
whole

# %% [markdown]
# With the committed model on the real part B image: the stitched count equals the whole-image count, and the
# model's threshold and precision come from its file.

# %%
shb = Counter('shb-mcnn-gl', device='cpu')
test_eq((shb.name, shb.loc_threshold, shb.precision, shb.stride),
        ('shb-mcnn-gl', committed['loc_threshold'], default_precision(committed['precision'], 'cpu'), 4))
test_eq(Counter('shb-mcnn-gl', device='cpu', precision=committed['precision']).precision, committed['precision'])
r_whole, r_tiled = shb(shb_image, tile=0), shb(shb_image, tile=256)
test_close(r_tiled.count, r_whole.count, eps=1e-5 * r_whole.count)   # bf16 rounds each tile: measured 2.3e-6
test_eq(r_whole.source, str(shb_image))
print(shb, r_whole, f'tiled: {r_tiled.count:.2f}', sep='\n')
assert 100 < r_whole.count < 250, r_whole.count      # 167 annotated heads; the model's test MAE is 30

# %% [markdown]
# An ONNX export (`uotcrowd export`, [ONNX export](10a_deploy.ipynb)) is counted the same way, by onnxruntime
# on the CPU in float32, with the card and threshold of the model it came from; tiles and batches work as for
# PyTorch.

# %%
from uotcrowd.deploy import export

# %%
with tempfile.TemporaryDirectory() as d:
    onnx_counter = Counter(export('shb-mcnn-gl', out=f'{d}/shb.onnx', quiet=True))
    fp32 = Counter('shb-mcnn-gl', device='cpu', precision='fp32')
    test_eq((onnx_counter.name, onnx_counter.card, onnx_counter.loc_threshold, onnx_counter.precision,
             str(onnx_counter.device)),
            ('shb-mcnn-gl', committed['card'], committed['loc_threshold'], 'fp32', 'cpu'))
    for t in (0, 256):
        r_onnx, r_fp32 = onnx_counter(shb_image, tile=t), fp32(shb_image, tile=t)
        test_close(r_onnx.count, r_fp32.count, eps=1e-4 * r_fp32.count)
        test_eq(len(r_onnx.points), len(r_fp32.points))
    print(onnx_counter, r_onnx, sep='\n')


# %% [markdown]
# ## Pictures of a result
#
# `render_result` draws a result on its image with PIL alone (no figure): the density map as a heat-map
# overlay (at full opacity `alpha` from half the density's maximum up, fading with its square root to the
# plain photo where the density is zero), the located heads as dots, or both, optionally with the count
# written in a corner; the web page and annotated videos use it.

# %%
#| export
def _font(size:int):
    try: return ImageFont.load_default(size=size)
    except TypeError: return ImageFont.load_default()   # Pillow < 10.1: one fixed size


# %%
#| export
Shown = Literal['density', 'points', 'both']   # what `render_result` draws over the image


# %%
#| export
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
    if im.size != result.size:
        raise ValueError(f"the image is {im.size[0]}×{im.size[1]} but the result is for "
                         f"{result.width}×{result.height}")
    scale = min(1.0, max_side / max(im.size)) if max_side else 1.0
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if scale < 1: im = im.resize(size, Image.Resampling.LANCZOS)
    if show in ('density', 'both'):
        d = result.density.astype(np.float32)
        # the map's pixel (i, j) covers input pixels [s·j, s·(j+1)); the last row and column may stick out
        cover = tuple(max(1, round(n * result.stride * scale)) for n in (d.shape[1], d.shape[0]))
        heat = Image.fromarray(d).resize(cover, Image.Resampling.BILINEAR).crop((0, 0) + size)
        h = np.asarray(heat, dtype=np.float32)
        h = h / h.max() if h.max() > 0 else h
        colour = colour_table(cmap)[np.clip(h * 255, 0, 255).astype(np.uint8)]
        a = (alpha * np.sqrt(np.clip(2 * h, 0, 1)))[..., None]   # full opacity from half the maximum, none at 0
        im = Image.fromarray((np.asarray(im, np.float32) * (1 - a) + colour * a).round().astype(np.uint8))
    if show in ('points', 'both') and len(result.points):
        draw = ImageDraw.Draw(im)
        r = max(2.5, max(size) / 200)
        for x, y in result.points * scale:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 30, 30), outline=(255, 255, 255),
                         width=max(1, round(r / 3)))
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
no_points = np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
zero = CountResult(0., np.zeros((60, 80), np.float32), *no_points, 240, 320, 4)
test_eq(np.asarray(render_result(small, zero, max_side=None)), small)     # no density: the photo itself
one = CountResult(1., np.zeros((60, 80), np.float32), *no_points, 240, 320, 4)
one.density[30, 40] = 1.                                # one density pixel: the heat map's maximum there
top = (np.array(matplotlib.colormaps['jet'](1.)[:3]) * 255).astype(np.uint8)
test_close(np.asarray(render_result(small, one, max_side=None), np.float32)[122, 162],
           small[122, 162] * 0.3 + top * 0.7, eps=1)
test_eq(render_result(small, res, max_side=160).size, (160, 120))
test_eq(np.asarray(render_result(small, res, label=True, max_side=None))[1, 1], (0, 0, 0))   # the count's box
test_fail(lambda: render_result(rgb, res), contains='1024×768 but the result is for 320×240')
as_jpeg(render_result(shb_image, r_whole, max_side=640, label=True))


# %% [markdown]
# ## Peak memory of a large photo
#
# `measure_peak_memory` counts one random photo with a random-weight network on the CPU in a fresh Python
# process (started with `multiprocessing`'s `spawn`, so it shares nothing with the caller) and reports that
# process's peak resident memory, with the memory it held before counting (the interpreter, torch, the model
# and the photo). The peak is the kernel's own high-water mark, reset just before counting
# (`uotcrowd.measure.peak_memory`), so nothing is sampled or missed. Memory does not depend on the machine's
# load; time does.

# %%
#| export
def _count_random_photo(args:dict, # the arguments of `measure_peak_memory`
                        results # the sending end of a pipe: one dict goes through it
                       ):
    "In a fresh process: count one random photo with a random-weight network, measuring its peak memory."
    try:
        torch.set_num_threads(args['threads']); torch.manual_seed(args['seed'])
        with warnings.catch_warnings():
            warnings.simplefilter('ignore'); model = get_model(args['model'], out_act='abs')
        shape = (args['height'], args['width'], 3)
        photo = np.random.default_rng(args['seed']).integers(0, 256, shape, dtype=np.uint8)
        counter = Counter(model, device='cpu', precision=args['precision'], tile=args['tile'])
        # the high-water mark is reset before counting: the process's lifetime maximum (`ru_maxrss`) would
        # include the parent's size, which Linux carries over the fork and exec that start it
        before, found = status_bytes('VmRSS'), {}
        start = time.perf_counter()
        extra = peak_memory(lambda: found.update(result=counter(photo)), method='rss')
        seconds = time.perf_counter() - start
        results.send({'peak_mb': (before + extra) / 2**20, 'before_mb': before / 2**20,
                      'count': found['result'].count, 'tiles': found['result'].tiles, 'seconds': seconds})
    except BaseException: results.send({'error': traceback.format_exc()})
    finally: results.close()


# %%
#| export
def measure_peak_memory(model:str='vgg19', # 'vgg19', 'csrnet' or 'mcnn' (random weights: nothing is downloaded)
                        height:int=3000, width:int=4000, # photo size
                        tile:int|None=None, # as in `Counter`: None automatic, 0 whole image, N tile side
                        precision:str='fp32', # as in `Counter`
                        threads:int=1, # torch CPU threads
                        seed:int=0 # weights and photo
                       ) -> dict: # `peak_mb`, `before_mb`, `count`, `tiles`, `seconds` and the arguments
    "Peak resident memory (MB) of counting one random photo on the CPU, measured in a fresh process."
    args = dict(model=model, height=height, width=width, tile=tile, precision=precision, threads=threads,
                seed=seed)
    spawn = multiprocessing.get_context('spawn')
    receiver, sender = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_count_random_photo, args=(args, sender))
    process.start(); sender.close()
    try: res = receiver.recv()
    except EOFError: res = None          # the process ended without sending: killed (out of memory?)
    process.join()
    if res is None:
        raise RuntimeError(f"the memory measurement ({args}) ended with exit code {process.exitcode}")
    if 'error' in res: raise RuntimeError(f"the memory measurement failed ({args}):\n{res['error'][-2000:]}")
    return {**args, **res}


# %% [markdown]
# A spawned process runs the function of the installed module (it imports `uotcrowd.counter`; a function
# defined in a notebook cannot be found there), so the cells below call
# `uotcrowd.counter.measure_peak_memory`. On a 320×240 photo, the count measured in the fresh process is the
# one counted here with the same weights and photo, and the process held some memory before counting (the
# interpreter and torch) and more at its peak.

# %%
import uotcrowd.counter

# %%
small_run = uotcrowd.counter.measure_peak_memory('mcnn', 240, 320, tile=0)
torch.manual_seed(0)
with warnings.catch_warnings():
    warnings.simplefilter('ignore'); _same = get_model('mcnn', out_act='abs')
_photo = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
here = Counter(_same, device='cpu', tile=0)(_photo)
test_close(small_run['count'], here.count, eps=1e-5 * here.count)
assert 50 < small_run['before_mb'] < small_run['peak_mb'], small_run
test_eq((small_run['tiles'], small_run['model'], small_run['height']), (1, 'mcnn', 240))
# the child's error, with its traceback
test_fail(lambda: uotcrowd.counter.measure_peak_memory('no-such-net', 8, 8),
          contains="ValueError: model must be one of vgg19, csrnet, mcnn, effnet-lite0, got 'no-such-net'")

# %% [markdown]
# The 4000×3000 measurement through VGG19 is the `#| slow` cell below (a few minutes on one CPU thread); it
# writes `bench_results/tiling_memory_cpu.json`, which is committed, and the cell after it shows the committed
# numbers. The target is a peak under 4 GB with tiles;
# `test_automatic_tiling_keeps_a_12_megapixel_photo_under_4_gb` in `tests/test_counter.py` (marker `slow`,
# which the suite and CI run) measures it again on every run.

# %%
#| slow
_rows = [uotcrowd.counter.measure_peak_memory('vgg19', 3000, 4000, tile=t) for t in (None, 0)]
Path('bench_results').mkdir(exist_ok=True)
Path('bench_results/tiling_memory_cpu.json').write_text(json.dumps(_rows, indent=1))

# %%
_rows = json.loads(Path('bench_results/tiling_memory_cpu.json').read_text())
for _r in _rows:
    how = 'whole image' if _r['tiles'] == 1 else f"{_r['tiles']} tiles"
    print(f"{_r['model']} {_r['width']}×{_r['height']}, {how}: peak {_r['peak_mb'] / 1024:.2f} GB "
          f"({_r['before_mb'] / 1024:.2f} GB before counting), count {_r['count']:.1f}, {_r['seconds']:.0f} s")
_tiled = next(r for r in _rows if r['tiles'] > 1)
assert _tiled['peak_mb'] < 4096 and _tiled['tile'] is None, _tiled     # automatic tiles: under 4 GB

# %%
#| hide
import nbdev; nbdev.nbdev_export()
