# %% [markdown]
# # Images and transforms
#
# > Image files read to RGB with errors that name the file, ImageNet normalization, head points checked against the image, short-side resizing with a disk cache, and the training/evaluation transforms of `(image, points, meta)` samples.

# %%
#| default_exp images

# %%
#| export
from __future__ import annotations
import hashlib, os, tempfile, warnings
from pathlib import Path
from typing import Callable, Literal, Sequence
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from uotcrowd.core import check_choice

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail, test_is

# %%
#| hide
# committed copies of the shared fixtures (ShanghaiTech A and B, the formats)
fixtures = Path('../tests/fixtures')


# %% [markdown]
# The datasets of [Data](05c_data.ipynb) and the prediction commands read photos and head annotations with these
# functions. A sample is `(image, points, meta)` (described in [Data](05c_data.ipynb)); the transforms at the end
# turn a raw one into the network's input.

# %% [markdown]
# ## Errors
#
# Real datasets contain broken files. Every problem found while reading one raises a `DatasetError` (a
# `ValueError`) or emits a `DatasetWarning`, and both name the offending file, never a bare traceback from
# inside PIL or SciPy.

# %%
#| export
class DatasetError(ValueError):
    "A dataset file or folder is missing or malformed; the message names it."


# %%
assert issubclass(DatasetError, ValueError)
test_eq(str(DatasetError('a.mat: broken')), 'a.mat: broken')


# %%
#| export
class DatasetWarning(UserWarning):
    "A recoverable problem in a dataset file (points outside the image, NaN coordinates, count mismatches)."


# %%
assert issubclass(DatasetWarning, UserWarning)


# %%
#| export
def warn_data(path, msg): # the file (or name) and what is wrong with it
    "Warn with a `DatasetWarning` naming the file."
    warnings.warn(f"{path}: {msg}", DatasetWarning, stacklevel=3)


# %%
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    warn_data('a.mat', '3 points outside the image')
test_eq((w[0].category, str(w[0].message)), (DatasetWarning, 'a.mat: 3 points outside the image'))


# %% [markdown]
# ## Images
#
# `load_image` decodes any PIL-readable file to RGB `uint8`, raising `DatasetError` for a missing, corrupt or
# truncated file. The network sees ImageNet-normalized images, $\hat x_c = (x_c/255 - \mu_c)/\sigma_c$;
# `denormalize` inverts that for plotting and returns an `(H, W, 3)` array in $[0, 1]$.

# %%
#| export
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def open_image(path:str|Path # image file
              ) -> Image.Image:
    "Open `path` lazily (header only) with PIL; raise `DatasetError` when it is missing or not an image."
    path = Path(path)
    if not path.is_file(): raise DatasetError(f"{path}: image file not found")
    try: return Image.open(path)
    except Exception as e: raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


# %%
with tempfile.TemporaryDirectory() as d:
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(Path(d) / 'a.png')
    with open_image(Path(d) / 'a.png') as im: test_eq(im.size, (6, 4))
    (Path(d) / 'b.png').write_bytes(b'not an image')
    test_fail(lambda: open_image(Path(d) / 'b.png'), contains='b.png: cannot read image')
    test_fail(lambda: open_image(Path(d) / 'c.png'), contains='c.png: image file not found')


# %%
#| export
def load_image(path:str|Path # image file (any mode: L, RGB, RGBA, P, CMYK)
              ) -> Image.Image: # decoded RGB image
    "Decode `path` fully to an RGB PIL image; corrupt or truncated files raise `DatasetError`."
    im = open_image(path)
    try:
        im.load()
        return im.convert('RGB')
    except Exception as e:
        raise DatasetError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from e


# %%
with tempfile.TemporaryDirectory() as d:
    Image.fromarray(np.full((4, 6), 9, np.uint8), mode='L').save(Path(d) / 'grey.png')
    im = load_image(Path(d) / 'grey.png')
    test_eq((im.mode, im.size, im.getpixel((0, 0))), ('RGB', (6, 4), (9, 9, 9)))
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(Path(d) / 'cut.jpg')
    whole = (Path(d) / 'cut.jpg').read_bytes()
    (Path(d) / 'cut.jpg').write_bytes(whole[:len(whole) // 2])   # the second half of the file lost
    test_fail(lambda: load_image(Path(d) / 'cut.jpg'), contains='cut.jpg: corrupt or truncated')


# %%
#| export
def to_uint8_tensor(image:Image.Image|np.ndarray # PIL image or `(H, W)`/`(H, W, C)` uint8 array
                   ) -> torch.Tensor: # `(3, H, W)` uint8
    "Convert an image to a `(3, H, W)` uint8 tensor (grayscale repeated, alpha dropped)."
    arr = np.asarray(image)
    if arr.ndim == 2: arr = arr[..., None]
    if arr.shape[-1] == 1: arr = np.repeat(arr, 3, axis=-1)
    return torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1).contiguous()


# %%
rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
test_eq(to_uint8_tensor(rgba), torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))   # alpha dropped
test_eq(to_uint8_tensor(np.full((2, 3), 7, np.uint8)).unique().tolist(), [7])        # grey repeated


# %%
#| export
def normalize(image:torch.Tensor # `(3, H, W)` or `(B, 3, H, W)` uint8 (0..255) or float in [0, 1]
             ) -> torch.Tensor: # ImageNet-normalized float32
    "Scale to [0, 1] (if uint8) and normalize with the ImageNet mean and standard deviation."
    x = image.float() / 255. if image.dtype == torch.uint8 else image.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# %%
# floats are taken as [0, 1]
test_close(normalize(torch.ones(2, 3, 1, 1)).flatten(1)[0].numpy(),
           [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], eps=1e-5)
test_eq(normalize(torch.zeros(3, 2, 2, dtype=torch.uint8)).dtype, torch.float32)


# %%
#| export
def denormalize(image:torch.Tensor # normalized `(3, H, W)` or `(B, 3, H, W)` tensor
               ) -> np.ndarray: # `(H, W, 3)` or `(B, H, W, 3)` float array in [0, 1], ready for `plt.imshow`
    "Undo `normalize` and return channels-last numpy image(s) clipped to [0, 1] for plotting."
    x = image.detach().float().cpu()
    x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return x.clamp(0, 1).movedim(-3, -1).numpy()


# %%
u8 = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
test_close(denormalize(normalize(u8)), u8.permute(1, 2, 0).float().numpy() / 255, eps=1e-6)
test_eq(denormalize(normalize(u8)[None]).shape, (1, 5, 7, 3))
test_close(normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8)).flatten().numpy(),
           [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], eps=1e-5)
test_eq(to_uint8_tensor(np.zeros((4, 6), np.uint8)).shape, (3, 4, 6))
test_fail(lambda: load_image('/nonexistent/IMG_0.jpg'), contains='IMG_0.jpg')

# %% [markdown]
# Image files outside a dataset (what `uotcrowd predict` counts) are read the same way: `read_image` returns
# the normalized tensor a dataset would, and `list_images` expands folders into their image files.

# %%
#| export
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')

def list_images(inputs:Sequence[str|Path], # image files or folders
                exts:Sequence[str]=IMAGE_EXTS, # file endings a folder is searched for
                kind:str='image' # what the files are, for the messages
               ) -> list[Path]:
    "Image files named by `inputs` (folders are searched, non-recursively, for common image extensions)."
    files = []
    for item in map(Path, inputs):
        if item.is_dir(): files += sorted(p for p in item.iterdir() if p.suffix.lower() in exts)
        elif item.is_file(): files.append(item)
        else: raise FileNotFoundError(f"{item} is neither an {kind} file nor a folder")
    if not files: raise FileNotFoundError(f"no {kind} files ({', '.join(exts)}) in "
                                          f"{', '.join(map(str, inputs))}")
    return files


# %%
with tempfile.TemporaryDirectory() as d:
    for n in ('x.tif', 'y.txt'): (Path(d) / n).write_bytes(b'')
    # files are taken as given
    test_eq([p.name for p in list_images([d, Path(d) / 'y.txt'])], ['x.tif', 'y.txt'])
    (Path(d) / 'empty').mkdir()
    test_fail(lambda: list_images([Path(d) / 'empty'], kind='video'), contains='no video files')


# %%
#| export
def read_image(path:str|Path # image file
              ) -> torch.Tensor: # ImageNet-normalized `(3, H, W)` float32
    "An image file as the datasets return their images; a corrupt file raises `DatasetError` naming it."
    return normalize(to_uint8_tensor(load_image(path)))


# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    for n in ('b.png', 'a.JPG', 'notes.txt'): (d / n).write_bytes(b'')
    test_eq([p.name for p in list_images([d])], ['a.JPG', 'b.png'])
    test_fail(lambda: list_images([d / 'missing.png']), contains='neither an image file nor a folder')
    Image.fromarray(np.full((5, 7, 3), 255, np.uint8)).save(d / 'white.png')
    x = read_image(d / 'white.png')
    test_eq(x.shape, (3, 5, 7))
    test_close(x[:, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    test_fail(lambda: read_image(d / 'b.png'), contains='b.png')


# %% [markdown]
# ## Points
#
# Annotations are checked when read: NaN or infinite coordinates are dropped, and points outside the image
# $[0, W]\times[0, H]$ are clipped to it (`out_of_bounds='clip'`), dropped (`'drop'`) or refused (`'raise'`);
# every case warns naming the file. Points within one pixel outside the border (1-based MATLAB annotations)
# are clipped silently. Clipped points land just inside the last pixel, so every point belongs to a pixel.

# %%
#| export
def as_points(array, # anything `np.asarray` accepts: `(N, >=2)`, or empty
              path:str|Path='<array>' # file the array came from, for messages
             ) -> np.ndarray: # `(N, 2)` float64 `(x, y)`
    "Turn an annotation array into `(N, 2)` float64 `(x, y)` points, raising `DatasetError` naming `path`."
    try: arr = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: point coordinates are not numeric ({e})") from e
    if arr.size == 0: return np.zeros((0, 2))
    if arr.ndim == 1 and arr.shape[0] == 2: arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DatasetError(f"{path}: expected an N×2 array of (x, y) points, got shape {arr.shape}")
    return arr[:, :2].copy()


# %%
test_eq(as_points([[1, 2, 9], [3, 4, 9]]).tolist(), [[1., 2.], [3., 4.]])   # extra columns dropped
test_eq(as_points([5, 6]).tolist(), [[5., 6.]])
test_fail(lambda: as_points([['a', 'b']], 'p.mat'), contains='p.mat: point coordinates are not numeric')


# %%
#| export
OutOfBounds = Literal['clip', 'drop', 'raise']   # what becomes of points outside the image


# %%
#| export
def clean_points(points:np.ndarray, # `(N, 2)` `(x, y)`
                 width:int, # image width W
                 height:int, # image height H
                 path:str|Path='<array>', # file, for warnings and errors
                 out_of_bounds:OutOfBounds='clip', # 'clip', 'drop' or 'raise' points outside the image
                 tolerance:float=1.0 # points this close outside the border are clipped without a warning
                ) -> tuple[np.ndarray, np.ndarray]: # cleaned points and the boolean mask of kept input rows
    "Drop NaN points and clip/drop points outside `[0, W]×[0, H]`, warning with the file name."
    check_choice(out_of_bounds, OutOfBounds, 'out_of_bounds')
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    keep = np.isfinite(points).all(1)
    if not keep.all(): warn_data(path, f"dropped {int((~keep).sum())} point(s) with NaN or infinite coordinates")
    x, y = points[:, 0], points[:, 1]
    with np.errstate(invalid='ignore'):
        far = keep & ((x < -tolerance) | (x > width + tolerance)
                      | (y < -tolerance) | (y > height + tolerance))
    if far.any():
        msg = f"{int(far.sum())} point(s) outside the {width}×{height} image"
        if out_of_bounds == 'raise': raise DatasetError(f"{path}: {msg}")
        if out_of_bounds == 'drop':
            keep &= ~far
            warn_data(path, msg + ' dropped')
        else: warn_data(path, msg + ' clipped to the border')
    points = points[keep]
    eps = 1e-3
    points = (np.stack([points[:, 0].clip(0, width - eps), points[:, 1].clip(0, height - eps)], 1)
              if len(points) else np.zeros((0, 2)))
    return points, keep


# %%
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    p, keep = clean_points(np.array([[1., 2.], [np.nan, 3.], [50., 5.], [10.4, 8.]]), 10, 8, path='x.mat')
test_eq(keep.tolist(), [True, False, True, True])
test_close(p, [[1, 2], [10 - 1e-3, 5], [10 - 1e-3, 8 - 1e-3]])
test_eq(len(w), 2)
assert all('x.mat' in str(m.message) for m in w)
with warnings.catch_warnings(record=True):
    warnings.simplefilter('always')
    dropped = clean_points(np.array([[50., 5.], [1., 1.]]), 10, 8, out_of_bounds='drop')[0]
    test_eq(dropped.tolist(), [[1., 1.]])
test_fail(lambda: clean_points(np.array([[50., 5.]]), 10, 8, path='y.mat', out_of_bounds='raise'),
          contains='y.mat')
test_eq(as_points([]).shape, (0, 2))
test_fail(lambda: as_points(np.zeros((3, 1)), 'z.mat'), contains='z.mat')


# %% [markdown]
# ## Resizing to a short-side range
#
# UCF-QNRF, JHU-Crowd++ and NWPU-Crowd hold images up to 9000 px wide. Like the Bayesian-loss, DM-Count and GL
# code, we resize each image once so that its shorter side lies in $[s_{\min}, s_{\max}]$ (default 512..2048):
# a factor $f = s_{\min}/\min(H, W)$ when the image is smaller, $s_{\max}/\min(H,W)$ when larger, else none.
# Points are scaled per axis by the realized ratios $W'/W$ and $H'/H$ (the sizes are rounded to integers).
# With `cache_dir` the resized image is written there once as a quality-95 JPEG, keyed by the file path, its
# modification time and size, and the settings, so editing or replacing a source file invalidates its entry.

# %%
#| export
def short_side_size(width:int, height:int, # original size
                    short_side:tuple[int, int]|None=(512, 2048) # allowed range of the shorter side, None: keep
                   ) -> tuple[int, int]: # new `(width, height)`
    "The size after scaling so that the shorter side lies in `short_side` (aspect ratio kept)."
    if short_side is None: return width, height
    lo, hi = short_side
    s = min(width, height)
    f = lo / s if s < lo else hi / s if s > hi else 1.
    if f == 1.: return width, height
    return max(1, round(width * f)), max(1, round(height * f))


# %%
test_eq(short_side_size(300, 400, (512, 2048)), (512, 683))
test_eq(short_side_size(3000, 2000, (512, 1000)), (1500, 1000))


# %%
#| export
_CACHE_VERSION = 1

def _cache_key(path:Path, short_side) -> str:
    st = path.stat()
    text = (f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{tuple(short_side) if short_side else None}"
            f"|v{_CACHE_VERSION}")
    return hashlib.sha1(text.encode()).hexdigest()


# %%
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'a.jpg'
    f.write_bytes(b'abc')
    key = _cache_key(f, (512, 2048))
    test_eq((len(key), key == _cache_key(f, (512, 2048)), key == _cache_key(f, (256, 2048))),
            (40, True, False))
    f.write_bytes(b'abcd')
    assert _cache_key(f, (512, 2048)) != key   # another size: another key


# %%
#| export
def _atomic_write(target:Path, write:Callable[[Path], None]):
    "Write via a temporary file in the same folder and rename, so parallel workers never read half a file."
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=target.suffix + '.tmp')
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp): os.remove(tmp)


# %%
with tempfile.TemporaryDirectory() as d:
    target = Path(d) / 'sub' / 'out.txt'
    _atomic_write(target, lambda p: p.write_text('done'))
    test_eq((target.read_text(), sorted(os.listdir(target.parent))), ('done', ['out.txt']))
    def broken(p):
        p.write_text('half')
        raise OSError('disk full')
    test_fail(lambda: _atomic_write(target, broken), contains='disk full')
    # no half file left
    test_eq((target.read_text(), sorted(os.listdir(target.parent))), ('done', ['out.txt']))


# %%
#| export
def load_resized(path:str|Path, # image file
                 short_side:tuple[int, int]|None=(512, 2048), # shorter-side range, None: original size
                 cache_dir:str|Path|None=None # folder for resized copies (created if needed); None: no cache
                ) -> tuple[Image.Image, tuple[int, int]]: # RGB image and the original `(width, height)`
    "Load an image resized to the short-side range, reading/writing the resized copy in `cache_dir`."
    path = Path(path)
    with open_image(path) as im: size = im.size
    new = short_side_size(*size, short_side)
    if new == size: return load_image(path), size
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / (_cache_key(path, short_side) + '.jpg')
        if cached.is_file():
            try:
                im = load_image(cached)
                if im.size == new: return im, size
            except DatasetError: pass   # a broken cache entry is rebuilt below
    im = load_image(path).resize(new, Image.BICUBIC)
    # return the cached copy itself, so the first and later epochs see the same pixels
    if cached is not None:
        _atomic_write(cached, lambda p: im.save(p, format='JPEG', quality=95))
        im = load_image(cached)
    return im, size


# %%
test_eq(short_side_size(1024, 768, (512, 2048)), (1024, 768))
test_eq(short_side_size(400, 300, (512, 2048)), (683, 512))
test_eq(short_side_size(6000, 4000, (512, 2048)), (3072, 2048))
test_eq(short_side_size(400, 300, None), (400, 300))
_img = fixtures/'formats/UCF-QNRF/UCF-QNRF_ECCV18/Train/img_0001.jpg'
with tempfile.TemporaryDirectory() as d:
    a, size = load_resized(_img, (96, 128), cache_dir=d)
    test_eq((size, a.size), ((256, 192), (171, 128)))   # shorter side 192 -> 128
    test_eq(len(os.listdir(d)), 1)
    b, _ = load_resized(_img, (96, 128), cache_dir=d)     # second call reads the cache
    test_eq(np.asarray(b), np.asarray(load_image(next(Path(d).iterdir()))))   # the cached copy
    test_eq(np.asarray(a), np.asarray(b))                                       # first and later calls agree
    load_resized(_img, (64, 100), cache_dir=d)
    test_eq(len(os.listdir(d)), 2)  # other settings: other key


# %% [markdown]
# ## Transforms
#
# A transform maps a raw sample — `uint8` image `(3, H, W)`, float points `(N, 2)` and `meta` — to the
# network's input. `TrainTransform` takes a random `crop_size` window (uniform over valid positions; images
# smaller than the crop are padded bottom/right), keeps exactly the points inside the window
# $[l, l+w)\times[t, t+h)$ shifted by $(-l, -t)$, and with probability ½ mirrors the crop horizontally. A
# point at $x$ in a pixel grid of width $W$ moves to $W - x$ (pixel $j$ becomes pixel $W-1-j$, and its centre
# $j+\tfrac12$ becomes $W-(j+\tfrac12)$). With a `scale_range` $(s_{\min}, s_{\max})$ the crop is also
# rescaled: a factor $f$ drawn uniformly from the range, a window of
# $\mathrm{round}(h/f)\times\mathrm{round}(w/f)$ pixels cut out and resized (bilinear, antialiased) to the
# crop size, its points multiplied per axis by the realized ratios. Heads look $f$ times larger and the count
# of the window is kept: the network sees crowds at other densities than the photos hold (random rescaling, as
# in P2PNet's 0.7..1.3).
# `EvalTransform` keeps the full image and pads it bottom/right to a multiple of the model stride, so points
# do not move. Padding is zero in the normalized image (the ImageNet mean colour).
#
# Randomness comes from torch's RNG: the global generator by default (which `DataLoader` seeds per worker from
# the main process), or a `torch.Generator` the dataset derives from `(aug_seed, epoch, index)` when it has an
# `aug_seed`, so the augmentations of an epoch are identical whatever the number of workers and after a
# resume.

# %%
#| export
def _select_heads(heads:dict, keep:torch.Tensor) -> dict:
    return {k: v[keep] for k, v in heads.items()}


# %%
heads = {'boxes': torch.tensor([[0., 0, 2, 2], [4, 4, 6, 8]]), 'sizes': torch.tensor([[2., 2], [2, 4]])}
test_eq(_select_heads(heads, torch.tensor([False, True]))['sizes'].tolist(), [[2., 4.]])


# %%
#| export
def _shift_heads(heads:dict, dx:float, dy:float) -> dict:
    out = dict(heads)
    if 'boxes' in out: out['boxes'] = out['boxes'] + torch.tensor([dx, dy, dx, dy], dtype=out['boxes'].dtype)
    return out


# %%
test_eq(_shift_heads(heads, -1., 2.)['boxes'].tolist(), [[-1., 2, 1, 4], [3, 6, 5, 10]])
test_eq(_shift_heads(heads, -1., 2.)['sizes'], heads['sizes'])   # sizes do not move


# %%
#| export
def _flip_heads(heads:dict, width:float) -> dict:
    out = dict(heads)
    if 'boxes' in out:
        b = out['boxes']
        out['boxes'] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)
    return out


# %%
test_eq(_flip_heads(heads, 10.)['boxes'].tolist(), [[8., 0, 10, 2], [4, 4, 6, 8]])


# %%
#| export
def scale_heads(heads:dict, fx:float, fy:float) -> dict:
    "Head boxes and sizes of `heads` scaled by `fx` horizontally and `fy` vertically (points are scaled elsewhere)."
    out = dict(heads)
    if 'boxes' in out: out['boxes'] = out['boxes'] * torch.tensor([fx, fy, fx, fy], dtype=out['boxes'].dtype)
    if 'sizes' in out: out['sizes'] = out['sizes'] * torch.tensor([fx, fy], dtype=out['sizes'].dtype)
    return out


# %%
scaled = scale_heads(heads, 2., 0.5)
test_eq((scaled['boxes'][1].tolist(), scaled['sizes'][1].tolist()), ([8., 2, 12, 4], [4., 2.]))


# %%
#| export
def pad_to(image:torch.Tensor, # `(C, H, W)`
           height:int, width:int # target size (>= current)
          ) -> torch.Tensor:
    "Zero-pad `image` at the bottom and right to `height`×`width` (points do not move)."
    dh, dw = height - image.shape[-2], width - image.shape[-1]
    if dh < 0 or dw < 0: raise ValueError(f"cannot pad {tuple(image.shape[-2:])} to smaller {(height, width)}")
    return F.pad(image, (0, dw, 0, dh)) if dh or dw else image


# %%
x = torch.ones(3, 2, 3)
test_eq(pad_to(x, 4, 5)[:, :2, :3], x)
test_eq(pad_to(x, 4, 5).sum(), x.sum())
test_is(pad_to(x, 2, 3), x)
test_fail(lambda: pad_to(x, 1, 5), contains='to smaller (1, 5)')


# %%
#| export
def crop_sample(image:torch.Tensor, # `(C, H, W)`
                points:torch.Tensor, # `(N, 2)` `(x, y)`
                meta:dict, # sample meta (its `heads` follow the points)
                top:int, left:int, height:int, width:int # the window
               ):
    "Cut the window out of the image (clipped to the image) and keep/shift the points inside it."
    img = image[:, top:top + height, left:left + width]
    x, y = points[:, 0], points[:, 1]
    keep = (x >= left) & (x < left + width) & (y >= top) & (y < top + height)
    meta = dict(meta)
    if 'heads' in meta: meta['heads'] = _shift_heads(_select_heads(meta['heads'], keep), -left, -top)
    return img, points[keep] - torch.tensor([left, top], dtype=points.dtype), meta


# %%
img = torch.arange(3 * 6 * 10, dtype=torch.uint8).view(3, 6, 10)
pts = torch.tensor([[0.5, 0.5], [3.2, 2.0], [9.9, 5.9], [4.0, 4.0]])
meta = {'count': 4,
        'heads': {'boxes': torch.tensor([[0., 0, 1, 1], [3, 1, 4, 3], [9, 5, 10, 6], [3, 3, 5, 5]])}}
c_img, c_pts, c_meta = crop_sample(img, pts, meta, top=1, left=3, height=4, width=5)
test_eq(c_img, img[:, 1:5, 3:8])
# (3.2, 2) and (4, 4) are inside, shifted by (-3, -1)
test_close(c_pts.numpy(), [[0.2, 1.0], [1.0, 3.0]])
test_eq(c_meta['heads']['boxes'].tolist(), [[0., 0, 1, 2], [0, 2, 2, 4]])
test_eq(meta['heads']['boxes'].shape, (4, 4))   # the input meta is left as it was


# %%
#| export
def hflip_sample(image:torch.Tensor, points:torch.Tensor, meta:dict):
    "Mirror image, points (`x -> W - x`) and head boxes horizontally."
    width = image.shape[-1]
    points = torch.stack([width - points[:, 0], points[:, 1]], 1) if len(points) else points
    meta = dict(meta)
    if 'heads' in meta: meta['heads'] = _flip_heads(meta['heads'], width)
    return image.flip(-1), points, meta


# %%
f_img, f_pts, f_meta = hflip_sample(c_img, c_pts, c_meta)
test_eq(f_img[..., 0], c_img[..., -1])
test_close(f_pts.numpy(), [[4.8, 1.0], [4.0, 3.0]])  # x -> 5 - x
test_eq(f_meta['heads']['boxes'].tolist(), [[4., 0, 5, 2], [3, 2, 5, 4]])
test_eq(hflip_sample(c_img, torch.zeros(0, 2), {})[1].shape, (0, 2))


# %%
#| export
def _finish_meta(meta:dict, points:torch.Tensor) -> dict:
    if meta.get('count', -1) >= 0: meta['count'] = len(points)
    return meta


# %%
test_eq(_finish_meta({'count': 4}, torch.zeros(2, 2)), {'count': 2})
test_eq(_finish_meta({'count': -1}, torch.zeros(0, 2)), {'count': -1})   # unlabelled stays unlabelled


# %%
#| export
def resize_sample(image:torch.Tensor, # `(3, H, W)` uint8
                  points:torch.Tensor, # `(N, 2)` `(x, y)`
                  meta:dict, # sample meta (its `heads` follow the points)
                  height:int, width:int # new size
                 ):
    "Resize image (bilinear, antialiased; float in [0, 1]) and scale points and heads by the realized ratios."
    H, W = image.shape[-2:]
    fy, fx = height / H, width / W
    out = F.interpolate(image[None].float() / 255, size=(height, width), mode='bilinear', align_corners=False,
                        antialias=True)[0].clamp_(0, 1)
    meta = dict(meta)
    if 'heads' in meta: meta['heads'] = scale_heads(meta['heads'], fx, fy)
    return out, points * torch.tensor([fx, fy], dtype=points.dtype), meta


# %%
r_img, r_pts, r_meta = resize_sample(img, pts, meta, 3, 20)       # height ×0.5, width ×2
test_eq(r_img.shape, (3, 3, 20))
test_close(r_pts.numpy(), (pts * torch.tensor([2., 0.5])).numpy())
test_eq(r_meta['heads']['boxes'][1].tolist(), [6., 0.5, 8., 1.5])
assert r_img.dtype == torch.float32 and 0 <= r_img.min() and r_img.max() <= 1


# %%
#| export
class TrainTransform:
    "Random crop (padded when the image is smaller), optionally rescaled, random h-flip, ImageNet normalization."
    def __init__(self,
                 crop_size:int|tuple[int, int]=256, # crop side, or `(height, width)`
                 flip:bool=True, # random horizontal flip with probability 1/2
                 scale_range:tuple[float, float]|None=None # rescale each crop by a factor drawn uniformly from it
                ):
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.flip = flip
        if scale_range is not None:
            scale_range = tuple(float(f) for f in scale_range)
            if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
                raise ValueError(f"scale_range must be two factors 0 < low <= high, got {scale_range}")
        self.scale_range = scale_range
    def __call__(self, image, points, meta, generator:torch.Generator|None=None):
        ch, cw = self.crop
        wh, ww = ch, cw   # the window cut out of the image
        if self.scale_range is not None:
            lo, hi = self.scale_range
            factor = lo + (hi - lo) * float(torch.rand(1, generator=generator))
            wh, ww = max(1, round(ch / factor)), max(1, round(cw / factor))
        H, W = image.shape[-2:]
        top = int(torch.randint(0, H - wh + 1, (1,), generator=generator)) if H > wh else 0
        left = int(torch.randint(0, W - ww + 1, (1,), generator=generator)) if W > ww else 0
        image, points, meta = crop_sample(image, points, meta, top, left, wh, ww)
        meta['crop'] = (top, left, wh, ww)
        if (wh, ww) != (ch, cw):   # the clipped window scaled by crop/window, padded to the crop below
            h, w = image.shape[-2:]
            image, points, meta = resize_sample(image, points, meta, max(1, round(h * ch / wh)),
                                                max(1, round(w * cw / ww)))
        image = pad_to(normalize(image), ch, cw)
        flipped = self.flip and bool(torch.rand(1, generator=generator) < 0.5)
        if flipped: image, points, meta = hflip_sample(image, points, meta)
        meta['flipped'] = flipped
        meta['height'], meta['width'] = ch, cw
        return image, points, _finish_meta(meta, points)
    def __repr__(self):
        return f"TrainTransform(crop_size={self.crop}, flip={self.flip}, scale_range={self.scale_range})"


# %%
# a crop larger than the image pads bottom/right; same generator seed, same crop
t_img, t_pts, t_meta = TrainTransform(12, flip=False)(img, pts, meta)
test_eq(t_img.shape, (3, 12, 12))
test_eq(t_pts, pts)
test_eq(t_meta['count'], 4)
a = TrainTransform(4)(img, pts, meta, torch.Generator().manual_seed(1))
b = TrainTransform(4)(img, pts, meta, torch.Generator().manual_seed(1))
test_eq(a[0], b[0])
test_eq(a[1], b[1])

# %% [markdown]
# Rescaling by exactly 2 cuts a 2×2 window and doubles it: the points move to $2(x - l, y - t)$, the window's
# heads are kept, and a constant image stays constant.

# %%
flat = torch.full((3, 6, 10), 200, dtype=torch.uint8)
s_img, s_pts, s_meta = TrainTransform(4, flip=False, scale_range=(2, 2))(flat, pts, meta,
                                                                         torch.Generator().manual_seed(3))
top, left, wh, ww = s_meta['crop']
test_eq((wh, ww, s_img.shape), (2, 2, (3, 4, 4)))
inside = (pts[:, 0] >= left) & (pts[:, 0] < left + 2) & (pts[:, 1] >= top) & (pts[:, 1] < top + 2)
test_close(s_pts.numpy(), (2 * (pts[inside] - torch.tensor([left, top]))).numpy().reshape(-1, 2))
test_eq(s_meta['count'], int(inside.sum()))
test_close(s_img, normalize(flat)[:, :4, :4], eps=1e-5)
test_fail(lambda: TrainTransform(4, scale_range=(1.2, 0.8)), contains='scale_range')


# %%
#| export
class EvalTransform:
    "Full image, normalized and zero-padded bottom/right to a multiple of `stride` (points unchanged)."
    def __init__(self, stride:int=8): self.stride = int(stride)
    def __call__(self, image, points, meta, generator=None):
        H, W = image.shape[-2:]
        s = self.stride
        image = pad_to(normalize(image), -(-H // s) * s, -(-W // s) * s)
        meta = dict(meta)
        meta['height'], meta['width'] = H, W
        return image, points, _finish_meta(meta, points)
    def __repr__(self): return f"EvalTransform(stride={self.stride})"


# %%
# eval: pad to a multiple of 8, points unchanged
e_img, e_pts, e_meta = EvalTransform(8)(img, pts, meta)
test_eq(e_img.shape, (3, 8, 16))
test_eq(e_img[:, 6:].abs().sum(), 0)
test_eq(e_pts, pts)
test_eq(e_meta['width'], 10)
test_eq(repr(EvalTransform(4)), 'EvalTransform(stride=4)')


# %%
#| hide
import nbdev
nbdev.nbdev_export()
