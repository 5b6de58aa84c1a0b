# %% [markdown]
# # Data
#
# > Crowd-counting datasets in their official layouts (ShanghaiTech, UCF-QNRF, JHU-Crowd++, NWPU-Crowd), a `SyntheticCrowd` of procedurally drawn crowds, `collate` and `build_datasets`, on the images, points and transforms of `uotcrowd.images`.

# %%
#| default_exp data

# %%
#| export
from __future__ import annotations
import copy, json, re
from pathlib import Path
from typing import Callable, Literal, Sequence
import numpy as np
import torch
from torch.utils.data import Dataset
from uotcrowd.core import check_choice
from uotcrowd.synthetic import render_crowd
from uotcrowd.images import (DatasetError, warn_data, as_points, clean_points, OutOfBounds, load_resized, to_uint8_tensor,
                             scale_heads, TrainTransform, EvalTransform)

# %%
#| hide
import tempfile, warnings
from PIL import Image
from fastcore.test import test_eq, test_close, test_fail, test_is
from uotcrowd.images import DatasetWarning, denormalize
from uotcrowd.core import literal_values
import matplotlib.pyplot as plt
from matplotlib_inline.backend_inline import set_matplotlib_formats

# %%
#| hide
import shutil
set_matplotlib_formats('jpeg')   # photos and noise textures: JPEG figures are ~10x smaller than PNG
# committed copies of the shared fixtures (ShanghaiTech A and B, the formats)
fixtures = Path('../tests/fixtures')

# %% [markdown]
# Every dataset yields `(image, points, meta)`:
#
# - `image`: float `(3, H, W)`, ImageNet-normalized (grayscale images are repeated to three channels);
# - `points`: float `(N, 2)` head positions `(x, y)` in pixels of `image` ($N$ may be 0). Pixel $(i, j)$
#   covers $[j, j+1)\times[i, i+1)$, so its centre is $(j+\tfrac12, i+\tfrac12)$, the convention of
#   `pixel_centres`;
# - `meta`: a dict with at least `name`, `path` and `count` (the number of points returned, $-1$ for
#   unlabelled images such as NWPU-Crowd's test split), plus `height`/`width` of the image before padding,
#   `image_count` (the heads of the whole image), `scale` (the resize factors) and dataset-specific fields.
#   Per-head attributes (JHU/NWPU head-box sizes, boxes, occlusion, blur) live in `meta['heads']`, a dict of
#   tensors with one row per point that follow the points through every crop, flip and resize.

# %% [markdown]
# ## The dataset base class
#
# `CrowdDataset` holds a list of records (one per image) and reads annotations lazily. Subclasses list the
# records from the official layout and implement `read_annotation`. `subset(indices, transform)` gives a view
# with other images and another transform; `build_datasets` uses it to hold out a validation set from a
# training split.

# %%
#| export
def _seed_from(*ints) -> int:
    return int(np.random.SeedSequence([int(i) % 2**63 for i in ints]).generate_state(1, np.uint64)[0] >> 1)


# %%
test_eq(_seed_from(0, 1, 2), _seed_from(0, 1, 2))
assert len({_seed_from(0, e, i) for e in range(3) for i in range(3)}) == 9
assert 0 <= _seed_from(-5, 2**70) < 2**63


# %%
#| export
class CrowdDataset(Dataset):
    "Base class: records -> `(image, points, meta)` with short-side resizing, point checks and a transform."
    name = 'crowd'
    def __init__(self,
                 records:Sequence[dict], # one dict per image: at least `image` (Path) and `id` (str)
                 transform:Callable|None=None, # `TrainTransform`, `EvalTransform` (default: `EvalTransform(1)`)
                 short_side:tuple[int, int]|None=None, # resize so the shorter side lies in this range
                 cache_dir:str|Path|None=None, # cache for resized images
                 out_of_bounds:OutOfBounds='clip', # what to do with points outside the image: 'clip', 'drop', 'raise'
                 aug_seed:int|None=None # seed augmentations from (aug_seed, epoch, index) instead of torch's global RNG
                ):
        self.records, self.transform = list(records), transform if transform is not None else EvalTransform(1)
        self.short_side, self.cache_dir, self.out_of_bounds = short_side, cache_dir, out_of_bounds
        self.aug_seed, self.epoch = aug_seed, 0

    def __len__(self): return len(self.records)
    def __repr__(self): return f"{type(self).__name__}({len(self)} images, {self.transform})"

    def read_annotation(self, record:dict) -> tuple[np.ndarray|None, dict, dict]:
        "Return `(points (N, 2) or None if unlabelled, per-head arrays, extra meta)` for one record."
        raise NotImplementedError

    def set_epoch(self, epoch:int):
        "Select the augmentation stream of `epoch` (with `aug_seed`; call it before creating the iterator)."
        self.epoch = int(epoch)

    def subset(self, indices:Sequence[int], transform:Callable|None=None) -> 'CrowdDataset':
        "A copy restricted to `indices` (positions in this dataset), optionally with another transform."
        out = copy.copy(self)
        out.records = [self.records[int(i)] for i in indices]
        if transform is not None: out.transform = transform
        return out

    def load(self, index:int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        "The raw sample: `uint8` image `(3, H, W)` after resizing, float32 points `(N, 2)` and meta."
        rec = self.records[index]
        path = Path(rec['image'])
        points, heads, extra = self.read_annotation(rec)
        pil, (w0, h0) = load_resized(path, self.short_side, self.cache_dir)
        w1, h1 = pil.size
        fx, fy = w1 / w0, h1 / h0
        labelled = points is not None
        if labelled:
            points, keep = clean_points(points, w0, h0, rec.get('ann', path), self.out_of_bounds)
            heads = {k: v[keep] for k, v in heads.items()}
            points = points * np.array([fx, fy])
            points[:, 0] = points[:, 0].clip(0, w1 - 1e-3)
            points[:, 1] = points[:, 1].clip(0, h1 - 1e-3)
        else: points = np.zeros((0, 2))
        heads = scale_heads({k: torch.as_tensor(v, dtype=torch.float32) for k, v in heads.items()}, fx, fy)
        meta = {'name': rec['id'], 'path': str(path), 'count': len(points) if labelled else -1,
                'image_count': len(points) if labelled else -1, 'labelled': labelled,
                'orig_size': (h0, w0), 'scale': (fy, fx), **extra}
        if heads: meta['heads'] = heads
        return to_uint8_tensor(pil), torch.as_tensor(points, dtype=torch.float32), meta

    def __getitem__(self, index:int):
        if index < 0: index += len(self)
        if not 0 <= index < len(self): raise IndexError(f"index {index} out of range for {len(self)} images")
        image, points, meta = self.load(index)
        gen = None
        if self.aug_seed is not None:
            gen = torch.Generator().manual_seed(_seed_from(self.aug_seed, self.epoch, index))
        return self.transform(image, points, meta, gen)


# %%
class PointsInRecords(CrowdDataset):
    "Records that carry their points, for the checks."
    def read_annotation(self, record): return record['points'], {}, {}

_d = Path(tempfile.mkdtemp())
Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(_d / 'a.png')
recs = [{'image': _d / 'a.png', 'id': 'a', 'points': np.array([[5., 5.], [29.9, 19.9], [32., 5.]])}]
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    image, points, meta = PointsInRecords(recs, transform=EvalTransform(8))[0]
test_eq((image.shape, meta['count'], meta['height'], meta['width'], meta['name']),
        ((3, 24, 32), 3, 20, 30, 'a'))
test_eq(len(w), 1)   # the point beyond the border is clipped with a warning
test_close(points[2, 0].item(), 30 - 1e-3, eps=1e-5)
ds = PointsInRecords(recs, transform=TrainTransform(8), aug_seed=0)
with warnings.catch_warnings():            # the point beyond the border warns at every read, as above
    warnings.simplefilter('ignore', DatasetWarning)
    test_eq(ds[0][0], ds[0][0])            # seeded augmentations: the same crop for the same epoch
    crops = set()
    for e in range(4):
        ds.set_epoch(e)
        crops.add(ds[0][2]['crop'])
assert len(crops) > 1                      # and other crops in other epochs
test_eq((len(ds.subset([0, 0])), ds.subset([0], EvalTransform(4)).transform.stride), (2, 4))
test_fail(lambda: ds[1], contains='index 1 out of range for 1 images')


# %%
#| export
def _find_root(root, marker:Callable[[Path], bool], below:Sequence[str], what:str, layout:str) -> Path:
    "`root` itself or one of the folders `below` it for which `marker` holds; else a `DatasetError`."
    if root is None: raise DatasetError(f"{what}: no data folder given; expected layout:\n{layout}")
    root = Path(root).expanduser()
    if not root.is_dir(): raise DatasetError(f"{what}: data folder {root} does not exist; expected "
                                             f"layout:\n{layout}")
    for cand in [root, *[root / b for b in below]]:
        if cand.is_dir() and marker(cand): return cand
    raise DatasetError(f"{what}: {root} does not have the expected layout:\n{layout}")


# %%
_r = Path(tempfile.mkdtemp())
(_r / 'inner' / 'part_A').mkdir(parents=True)
has_a = lambda p: (p / 'part_A').is_dir()
test_eq(_find_root(_r, has_a, ['inner'], 'X', 'LAYOUT'), _r / 'inner')
test_fail(lambda: _find_root(_r, has_a, [], 'X', 'LAYOUT'),
          contains='does not have the expected layout:\nLAYOUT')
test_fail(lambda: _find_root(None, has_a, [], 'X', 'LAYOUT'), contains='X: no data folder given')


# %%
#| export
def _loadmat(path:Path) -> dict:
    import scipy.io
    if not path.is_file(): raise DatasetError(f"{path}: annotation file not found")
    try: return scipy.io.loadmat(str(path))
    except Exception as e:
        raise DatasetError(f"{path}: cannot read .mat file ({type(e).__name__}: {e})") from e


# %%
test_fail(lambda: _loadmat(_r / 'GT_IMG_1.mat'), contains='GT_IMG_1.mat: annotation file not found')
(_r / 'bad.mat').write_bytes(b'not a mat file')
test_fail(lambda: _loadmat(_r / 'bad.mat'), contains='bad.mat: cannot read .mat file')


# %%
#| export
def _natural_key(p:Path):
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', p.name)]


# %%
test_eq([p.name for p in sorted([Path('IMG_10.jpg'), Path('IMG_9.jpg')], key=_natural_key)],
        ['IMG_9.jpg', 'IMG_10.jpg'])


# %% [markdown]
# ## ShanghaiTech
#
# `part_X/{train,test}_data/images/IMG_N.jpg` with `ground-truth/GT_IMG_N.mat`, points in
# `image_info[0,0][0,0][0]`. `root` is the folder holding `part_A`/`part_B` (or one with a `ShanghaiTech/`
# folder inside). Part A images keep their size by default (`short_side=None`).

# %%
#| export
SHANGHAITECH_LAYOUT = """  ROOT/part_A/train_data/images/IMG_1.jpg
  ROOT/part_A/train_data/ground-truth/GT_IMG_1.mat   (image_info[0,0][0,0][0]: N×2 x, y)
  ROOT/part_A/test_data/...   and the same for part_B  (ROOT may also contain ShanghaiTech/part_A ...)"""
ShanghaiTechPart = Literal['A', 'B']
TrainTest = Literal['train', 'test']        # the splits of ShanghaiTech and UCF-QNRF
TrainValTest = Literal['train', 'val', 'test']   # the splits of JHU-Crowd++ and NWPU-Crowd


# %%
#| export
class ShanghaiTech(CrowdDataset):
    "ShanghaiTech part A or B, train or test split, in the official layout."
    def __init__(self, root:str|Path, # folder containing part_A/part_B (or ShanghaiTech/part_A ...)
                 part:ShanghaiTechPart='A', # 'A' or 'B' (any case, 'part_A' too)
                 split:TrainTest='train', # 'train' or 'test'
                 **kwargs # `CrowdDataset` options: transform, short_side, cache_dir, out_of_bounds, aug_seed
                ):
        part = str(part).upper().replace('PART_', '')
        check_choice(part, ShanghaiTechPart, 'ShanghaiTech part', DatasetError)
        check_choice(split, TrainTest, 'ShanghaiTech split', DatasetError)
        self.part, self.split = part, split
        self.name = f'shanghaitech-{part.lower()}'
        sub = f'part_{part}'
        base = _find_root(root, lambda p: (p / sub).is_dir(), ['ShanghaiTech', 'shanghaitech'],
                          f'ShanghaiTech part {part}', SHANGHAITECH_LAYOUT)
        folder = base / sub / f'{split}_data'
        images = sorted((folder / 'images').glob('*.jpg'), key=_natural_key)
        if not images: raise DatasetError(f"ShanghaiTech: no images in {folder / 'images'}; expected "
                                          f"layout:\n{SHANGHAITECH_LAYOUT}")
        records = []
        for im in images:
            ann = folder / 'ground-truth' / f'GT_{im.stem}.mat'
            if not ann.is_file(): raise DatasetError(f"{im}: its annotation {ann} is missing")
            records.append({'image': im, 'ann': ann, 'id': f'{sub}/{split}/{im.stem}'})
        super().__init__(records, **kwargs)

    def read_annotation(self, record):
        path = record['ann']
        mat = _loadmat(path)
        try: loc = mat['image_info'][0, 0][0, 0][0]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: expected image_info[0,0][0,0][0] to hold the N×2 (x, y) points "
                               f"({type(e).__name__}: {e})") from e
        return as_points(loc, path), {}, {'part': self.part, 'split': self.split}


# %%
sha = ShanghaiTech(fixtures/'ShanghaiTech', part='B', split='train')
test_eq(len(sha), 2)
counts = {Path(sha[i][2]['path']).name: sha[i][2]['count'] for i in range(len(sha))}
test_eq(counts, {'IMG_9.jpg': 167, 'IMG_10.jpg': 229})
image, points, meta = sha[0]
test_eq(image.shape, (3, 768, 1024))
test_eq(points.shape, (167, 2))
assert image.dtype == torch.float32
test_fail(lambda: ShanghaiTech(fixtures/'formats', 'A'), contains='expected layout')
test_fail(lambda: ShanghaiTech(fixtures/'ShanghaiTech', 'C'),
          contains="ShanghaiTech part must be one of A, B, got 'C'")

# %% [markdown]
# ## UCF-QNRF
#
# `Train|Test/img_XXXX.jpg` with `img_XXXX_ann.mat` holding `annPoints` (N×2 `x, y`). `root` is the folder
# holding `Train`/`Test` or its parent containing `UCF-QNRF_ECCV18`. Resized to a 512..2048 short side by
# default.

# %%
#| export
QNRF_LAYOUT = """  ROOT/Train/img_0001.jpg, ROOT/Train/img_0001_ann.mat (annPoints: N×2 x, y), ROOT/Test/...
  (ROOT may also contain UCF-QNRF_ECCV18/Train ...)"""

class UCFQNRF(CrowdDataset):
    "UCF-QNRF (ECCV 2018), train or test split, in the official layout."
    name = 'qnrf'
    def __init__(self, root:str|Path, # folder holding Train/Test, or its parent holding UCF-QNRF_ECCV18
                 split:TrainTest='train', # 'train' or 'test'
                 short_side:tuple[int, int]|None=(512, 2048), # shorter-side range
                 **kwargs):
        check_choice(split, TrainTest, 'UCF-QNRF split', DatasetError)
        self.split = split
        base = _find_root(root, lambda p: (p / 'Train').is_dir() or (p / 'Test').is_dir(),
                          ['UCF-QNRF_ECCV18', 'UCF-QNRF'], 'UCF-QNRF', QNRF_LAYOUT)
        folder = base / split.capitalize()
        images = sorted(folder.glob('*.jpg'), key=_natural_key)
        if not images: raise DatasetError(f"UCF-QNRF: no images in {folder}; expected layout:\n{QNRF_LAYOUT}")
        records = []
        for im in images:
            ann = im.with_name(im.stem + '_ann.mat')
            if not ann.is_file(): raise DatasetError(f"{im}: its annotation {ann} is missing")
            records.append({'image': im, 'ann': ann, 'id': f'{split}/{im.stem}'})
        super().__init__(records, short_side=short_side, **kwargs)

    def read_annotation(self, record):
        path = record['ann']
        mat = _loadmat(path)
        if 'annPoints' not in mat:
            found = sorted(k for k in mat if not k.startswith('__'))
            raise DatasetError(f"{path}: no 'annPoints' variable (found {found})")
        return as_points(mat['annPoints'], path), {}, {'split': self.split}


# %%
import scipy.io

# %%
q = UCFQNRF(fixtures/'formats/UCF-QNRF', 'train')
test_eq([q[i][2]['count'] for i in range(2)], [7, 12])
raw = scipy.io.loadmat(str(fixtures/'formats/UCF-QNRF/UCF-QNRF_ECCV18/Train/img_0002_ann.mat'))['annPoints']
image, points, meta = q[1]                   # 256×192 -> shorter side 192 scaled up to 512
test_eq(image.shape[-2:], (512, 683))
test_close(points.numpy(), raw * np.array([683 / 256, 512 / 192]), eps=1e-3)
test_eq(len(UCFQNRF(fixtures/'formats/UCF-QNRF/UCF-QNRF_ECCV18', 'test', short_side=None)), 2)

# %% [markdown]
# ## JHU-Crowd++
#
# `split/images/*.jpg`, `split/gt/*.txt` with one `x y w h o b` line per head (position, head-box width and
# height, occlusion level, blur flag) and `split/image_labels.txt` (`name,count,scene,weather,distractor`). An
# empty gt file is an image with no people. Sizes, occlusion and blur go to `meta['heads']`; the image labels
# to `meta`.

# %%
#| export
JHU_LAYOUT = """  ROOT/{train,val,test}/images/0001.jpg, ROOT/{train,val,test}/gt/0001.txt ("x y w h o b" per head),
  ROOT/{train,val,test}/image_labels.txt   (ROOT may also contain jhu_crowd_v2.0/train ...)"""

def _read_table(path:Path, min_cols:int, sep=None) -> list[list[str]]:
    try: text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip(): continue
        cols = [c.strip() for c in line.split(sep)] if sep else line.split()
        if len(cols) < min_cols: raise DatasetError(f"{path}, line {n}: expected at least {min_cols} fields, "
                                                    f"got {line!r}")
        rows.append(cols)
    return rows


# %%
_t = Path(tempfile.mkdtemp()) / 't.txt'
_t.write_text('1 2 3\n\n4 5 6\n')
test_eq(_read_table(_t, 3), [['1', '2', '3'], ['4', '5', '6']])
_t.write_text('a, b\nc\n')
test_fail(lambda: _read_table(_t, 2, sep=','), contains="t.txt, line 2: expected at least 2 fields, got 'c'")


# %%
#| export
def _floats(rows, path:Path) -> np.ndarray:
    try: return np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as e: raise DatasetError(f"{path}: non-numeric value ({e})") from e


# %%
test_eq(_floats([['1', '2.5']], _t).tolist(), [[1., 2.5]])
test_fail(lambda: _floats([['1', 'x']], _t), contains='t.txt: non-numeric value')


# %%
#| export
class JHUCrowd(CrowdDataset):
    "JHU-Crowd++ (v2.0), train/val/test split, in the official layout."
    name = 'jhu'
    def __init__(self, root:str|Path, # folder holding train/val/test, or its parent holding jhu_crowd_v2.0
                 split:TrainValTest='train', # 'train', 'val' or 'test'
                 short_side:tuple[int, int]|None=(512, 2048), **kwargs):
        check_choice(split, TrainValTest, 'JHU-Crowd split', DatasetError)
        self.split = split
        base = _find_root(root, lambda p: any((p / s / 'images').is_dir() for s in ('train', 'val', 'test')),
                          ['jhu_crowd_v2.0', 'jhu_crowd'], 'JHU-Crowd++', JHU_LAYOUT)
        folder = base / split
        images = sorted((folder / 'images').glob('*.jpg'), key=_natural_key)
        if not images: raise DatasetError(f"JHU-Crowd++: no images in {folder / 'images'}; expected "
                                          f"layout:\n{JHU_LAYOUT}")
        labels = {}
        if (folder / 'image_labels.txt').is_file():
            for r in _read_table(folder / 'image_labels.txt', 2, sep=','):
                labels[r[0]] = r
        records = []
        for im in images:
            ann = folder / 'gt' / f'{im.stem}.txt'
            if not ann.is_file(): raise DatasetError(f"{im}: its annotation {ann} is missing")
            records.append({'image': im, 'ann': ann, 'id': f'{split}/{im.stem}',
                            'labels': labels.get(im.stem)})
        super().__init__(records, short_side=short_side, **kwargs)

    def read_annotation(self, record):
        path = record['ann']
        rows = _read_table(path, 2)
        arr = _floats(rows, path) if rows else np.zeros((0, 6))
        if arr.shape[1] < 6: arr = np.concatenate([arr, np.full((len(arr), 6 - arr.shape[1]), np.nan)], 1)
        extra = {'split': self.split}
        lab = record.get('labels')
        if lab is not None:
            keys = ['count', 'scene', 'weather', 'distractor']
            extra['labels'] = dict(zip(keys, lab[1:]))
            try:
                if int(float(lab[1])) != len(arr):
                    warn_data(path, f"{len(arr)} heads but image_labels.txt says {lab[1]}")
            except ValueError: warn_data(path, f"image_labels.txt count {lab[1]!r} is not a number")
        heads = {'sizes': arr[:, 2:4], 'occlusion': arr[:, 4], 'blur': arr[:, 5]}
        return arr[:, :2], heads, extra


# %%
j = JHUCrowd(fixtures/'formats/JHU-Crowd', 'val', short_side=None)
image, points, meta = j[0]
raw = np.loadtxt(fixtures/'formats/JHU-Crowd/jhu_crowd_v2.0/val/gt/0001.txt')
test_eq(meta['count'], 5)
test_close(points.numpy(), raw[:, :2])
test_close(meta['heads']['sizes'].numpy(), raw[:, 2:4])
test_eq(j[1][2]['count'], 0)
test_eq(j[1][1].shape, (0, 2))
test_eq(meta['labels']['scene'], 'stadium')

# %% [markdown]
# ## NWPU-Crowd
#
# `images/XXXX.jpg`, `jsons/XXXX.json` (`points`, `boxes` as `x1, y1, x2, y2`, `human_num`) and split lists
# `train.txt`/`val.txt`/`test.txt` with `id luminance level` per line. The test split has no labels: it loads
# with no points and `count = -1`, for prediction. Boxes, their sizes $(w, h)$, the luminance class and the
# scene level go to `meta`; the localization metric derives per-head radii from the sizes (`head_sigmas`):
# $\sigma_s = \min(w, h)/2$ and $\sigma_l = \sqrt{w^2+h^2}/2$.

# %%
#| export
NWPU_LAYOUT = """  ROOT/images/0001.jpg, ROOT/jsons/0001.json ({"points": [[x, y], ...], "boxes": [[x1, y1, x2, y2], ...], "human_num": N}),
  ROOT/train.txt, ROOT/val.txt, ROOT/test.txt ("id luminance level" per line)   (ROOT may also contain NWPU-Crowd/...)"""

def head_sigmas(sizes:torch.Tensor # `(N, 2)` head-box `(w, h)`
               ) -> tuple[torch.Tensor, torch.Tensor]: # `(sigma_s, sigma_l)`, each `(N,)`
    "NWPU-Crowd's per-head matching radii: $\\sigma_s = \\min(w,h)/2$ and $\\sigma_l = \\sqrt{w^2+h^2}/2$."
    sizes = torch.as_tensor(sizes, dtype=torch.float32).reshape(-1, 2)
    return sizes.min(1).values / 2, sizes.norm(dim=1) / 2


# %%
s_small, s_large = head_sigmas(torch.tensor([[6., 8.], [2., 2.]]))
test_close(s_small, torch.tensor([3., 1.]))
test_close(s_large, torch.tensor([5., 2 ** 0.5]))


# %%
#| export
class NWPUCrowd(CrowdDataset):
    "NWPU-Crowd, train/val/test split (test: unlabelled), in the official layout."
    name = 'nwpu'
    def __init__(self, root:str|Path, # folder holding images/, jsons/ and the split lists (or NWPU-Crowd/ inside)
                 split:TrainValTest='train', # 'train', 'val' or 'test'
                 short_side:tuple[int, int]|None=(512, 2048), **kwargs):
        check_choice(split, TrainValTest, 'NWPU-Crowd split', DatasetError)
        self.split = split
        base = _find_root(root, lambda p: (p / f'{split}.txt').is_file() and any(p.glob('images*')),
                          ['NWPU-Crowd', 'NWPU_Crowd', 'nwpu'], 'NWPU-Crowd', NWPU_LAYOUT)
        folders = [base / 'images', *sorted(base.glob('images_part*'))]
        records = []
        for r in _read_table(base / f'{split}.txt', 1):
            iid = r[0]
            im = next((f / f'{iid}.jpg' for f in folders if (f / f'{iid}.jpg').is_file()), None)
            if im is None: raise DatasetError(f"{base / f'{split}.txt'}: image {iid}.jpg not found in "
                                              f"{base / 'images'}")
            try: lum, level = (int(r[1]) if len(r) > 1 else -1), (int(r[2]) if len(r) > 2 else -1)
            except ValueError: raise DatasetError(f"{base / f'{split}.txt'}: malformed line {' '.join(r)!r} "
                                                  "(expected 'id luminance level')") from None
            ann = base / 'jsons' / f'{iid}.json'
            if split != 'test' and not ann.is_file():
                raise DatasetError(f"{im}: its annotation {ann} is missing")
            records.append({'image': im, 'ann': ann if ann.is_file() else None, 'id': iid, 'luminance': lum,
                            'level': level})
        if not records: raise DatasetError(f"NWPU-Crowd: {base / f'{split}.txt'} lists no images")
        super().__init__(records, short_side=short_side, **kwargs)

    def read_annotation(self, record):
        extra = {'split': self.split, 'luminance': record['luminance'], 'level': record['level']}
        path = record['ann']
        if path is None: return None, {}, extra
        try: d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{path}: cannot parse JSON ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict) or 'points' not in d: raise DatasetError(f"{path}: no 'points' list")
        points = as_points(d['points'], path)
        heads = {}
        boxes = d.get('boxes')
        if boxes is not None and len(boxes) == len(points):
            try: b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            except (TypeError, ValueError) as e: raise DatasetError(f"{path}: malformed 'boxes' ({e})") from e
            heads = {'boxes': b, 'sizes': np.abs(b[:, 2:] - b[:, :2])}
        elif boxes is not None: warn_data(path, f"{len(boxes)} boxes for {len(points)} points; boxes ignored")
        if 'human_num' in d and d['human_num'] != len(points):
            warn_data(path, f"human_num={d['human_num']} but {len(points)} points")
        return points, heads, extra


# %%
nw = NWPUCrowd(fixtures/'formats/NWPU-Crowd', 'train', short_side=None)
test_eq([nw[i][2]['count'] for i in range(2)], [9, 4])
d = json.loads((fixtures/'formats/NWPU-Crowd/jsons/0001.json').read_text())
image, points, meta = nw[0]
test_close(points.numpy(), np.array(d['points']), eps=1e-4)
test_close(meta['heads']['boxes'].numpy(), np.array(d['boxes']), eps=1e-4)
s_s, s_l = head_sigmas(meta['heads']['sizes'])
b = np.array(d['boxes'])
w_, h_ = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
test_close(s_s.numpy(), np.minimum(w_, h_) / 2, eps=1e-4)
test_close(s_l.numpy(), np.hypot(w_, h_) / 2, eps=1e-4)
test_eq((meta['luminance'], meta['level']), (0, 1))
t = NWPUCrowd(fixtures/'formats/NWPU-Crowd', 'test', short_side=None)
test_eq((len(t), t[0][2]['count'], t[0][1].shape), (1, -1, (0, 2)))


# %% [markdown]
# ## SyntheticCrowd
#
# The synthetic crowds of `uotcrowd.synthetic.render_crowd` as a dataset.
# Each image depends only on `(seed, split, index)` (NumPy's `SeedSequence`), so any subset is reproducible in
# any order and in any worker. Images are cached in memory after the first draw. Counts are drawn as
# $N = \lfloor N_{\max}\,u^{1.5}\rceil$ with $u \sim U(0, 1)$, plus 8 % empty images; when the scene is too
# crowded to place all heads at the minimal distance, fewer are drawn and the points say how many.

# %%
#| export
_SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}

class SyntheticCrowd(CrowdDataset):
    "Procedural crowd images with known head centres, deterministic per `(seed, split, index)`."
    name = 'synthetic'
    def __init__(self, n:int=200, # number of images
                 size:int|tuple[int, int]=128, # image side, or `(height, width)`
                 seed:int=0, # base seed
                 max_count:int=150, # largest number of heads drawn
                 min_count:int=0, # smallest number of heads in a non-empty image
                 empty_fraction:float=0.08, # share of images with nobody
                 split:str|int='train', # stream name ('train', 'val', 'test' or an int): disjoint images per split
                 transform:Callable|None=None, # transform (default: `EvalTransform(1)`)
                 cache:bool=True, # keep drawn images in memory
                 **kwargs # other `CrowdDataset` options (aug_seed)
                ):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.seed, self.max_count = seed, max_count
        self.min_count, self.empty_fraction = min_count, empty_fraction
        self.split = split
        self._stream = _SPLIT_CODES.get(split, split) if isinstance(split, str) else int(split)
        if not isinstance(self._stream, int): raise ValueError("split must be 'train', 'val', 'test' or an "
                                                               f"int, got {split!r}")
        self.cache, self._memory = cache, {}
        super().__init__([{'index': i, 'id': f'synthetic-{split}-{i:05d}'} for i in range(n)],
                         transform=transform, **kwargs)

    def generate(self, index:int) -> tuple[np.ndarray, np.ndarray]:
        "Draw image `index`: `(H, W, 3)` uint8 and `(N, 2)` points, from its own random stream."
        rng = np.random.default_rng([self.seed, self._stream, index])
        if rng.uniform() < self.empty_fraction: count = 0
        else: count = int(round(self.min_count + (self.max_count - self.min_count) * rng.uniform() ** 1.5))
        return render_crowd(rng, *self.size, count=count)

    def load(self, index:int):
        i = self.records[index]['index']
        if i in self._memory: image, points = self._memory[i]
        else:
            image, points = self.generate(i)
            if self.cache: self._memory[i] = (image, points)
        meta = {'name': self.records[index]['id'], 'path': f'synthetic://seed={self.seed}/{self.split}/{i}',
                'count': len(points), 'image_count': len(points), 'labelled': True, 'orig_size': self.size,
                'scale': (1., 1.)}
        return to_uint8_tensor(image), torch.as_tensor(points, dtype=torch.float32), meta

    def subset(self, indices, transform=None):
        out = super().subset(indices, transform)
        out._memory = self._memory  # share the drawn images
        return out


# %%
syn = SyntheticCrowd(8, size=96, seed=1)
a, pa, ma = syn[3]
b, pb, mb = SyntheticCrowd(8, size=96, seed=1)[3]
test_eq(a, b)
test_eq(pa, pb)
test_eq(a.shape, (3, 96, 96))
test_eq(ma['count'], len(pa))
# splits are disjoint streams
assert not torch.equal(SyntheticCrowd(8, size=96, seed=1, split='val')[3][0], a)
assert not torch.equal(SyntheticCrowd(8, size=96, seed=2)[3][0], a)
test_eq(SyntheticCrowd(4, size=(64, 80), max_count=0)[0][1].shape, (0, 2))
test_eq(SyntheticCrowd(4, size=(64, 80))[0][0].shape, (3, 64, 80))

# %% [markdown]
# Drawing is fast: a few milliseconds per 128×128 image.

# %%
import time

# %%
t0 = time.perf_counter()
ds = SyntheticCrowd(200, size=128, seed=0, cache=False)
counts = np.array([len(ds.generate(i)[1]) for i in range(len(ds))])
elapsed = time.perf_counter() - t0
print(f"200 images of 128×128 in {elapsed:.2f} s; counts: min {counts.min()}, median {np.median(counts):.0f}, "
      f"mean {counts.mean():.1f}, max {counts.max()}, empty {(counts == 0).sum()}")
# the time is printed, not asserted: it depends on the machine's load
assert counts.max() > 80 and (counts == 0).any()

# %% [markdown]
# Eight synthetic images with their head points (red):

# %%
fig, axs = plt.subplots(2, 4, figsize=(8, 4.3), dpi=72)
for ax, i in zip(axs.flat, range(8)):
    image, points, meta = SyntheticCrowd(8, size=128, seed=0)[i]
    ax.imshow(denormalize(image))
    ax.scatter(points[:, 0], points[:, 1], s=2, c='r')
    ax.set_title(f"N = {meta['count']}", fontsize=9)
    ax.axis('off')
plt.tight_layout()
plt.show()


# %% [markdown]
# ## Collating batches
#
# Images of a batch share one size (crops, or images of one size); points and metas stay lists because each
# image has its own number of heads.

# %%
#| export
def collate(batch:Sequence[tuple[torch.Tensor, torch.Tensor, dict]] # `(image, points, meta)` samples
           ) -> tuple[torch.Tensor, list[torch.Tensor], list[dict]]: # images `(B, 3, H, W)`, points list, metas list
    "Stack the images of a batch; keep points and metas as lists."
    images, points, metas = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch images of different sizes {sorted(shapes)}: use batch_size=1 for "
                         "full-image evaluation, or crops")
    return torch.stack(images), list(points), list(metas)


# %%
imgs, pts, metas = collate([syn[0], syn[1]])
test_eq(imgs.shape, (2, 3, 96, 96))
test_eq(len(pts), 2)
test_eq(pts[1], syn[1][1])
test_fail(lambda: collate([syn[0], SyntheticCrowd(1, size=64)[0]]), contains='batch_size=1')

# %% [markdown]
# ## Building the train / validation / test sets
#
# `build_datasets(name, ...)` returns `(train, val, test)` for `shanghaitech-a`, `shanghaitech-b`, `qnrf`,
# `jhu`, `nwpu` and `synthetic`. The training set augments (random crop and flip); validation and test give
# full images padded to a multiple of `stride`. Datasets without a validation split (ShanghaiTech, UCF-QNRF)
# hold out a fixed, seeded `val_fraction` of the training images, so the test split is never used to choose a
# model. Default crops: 256 (ShanghaiTech A), 512 (B, UCF-QNRF, JHU, NWPU), 128 for synthetic images (at most
# the image size). Extra keywords: `short_side`, `cache_dir`, `out_of_bounds`, `flip`, `aug_seed`, and for
# `synthetic` `n_train` (200), `n_val` (50), `n_test` (50), `size` (128), `max_count` (150).

# %%
#| export
DEFAULT_CROP = {'shanghaitech-a': 256, 'shanghaitech-b': 512, 'qnrf': 512, 'jhu': 512, 'nwpu': 512,
                'synthetic': 128}
DATASET_NAMES = tuple(DEFAULT_CROP)
DatasetName = Literal['shanghaitech-a', 'shanghaitech-b', 'qnrf', 'jhu', 'nwpu', 'synthetic']   # `DATASET_NAMES`
DATASET_LAYOUTS = {'shanghaitech-a': SHANGHAITECH_LAYOUT, 'shanghaitech-b': SHANGHAITECH_LAYOUT,
                   'qnrf': QNRF_LAYOUT, 'jhu': JHU_LAYOUT, 'nwpu': NWPU_LAYOUT}


# %%
#| export
def check_data_dir(dataset:DatasetName, # one of `DATASET_NAMES`
                   data_dir:str|Path|None # the dataset's folder
                  ) -> Path|None:
    "`data_dir` as a `Path` once it exists (synthetic data needs none); the error shows the expected layout."
    if dataset == 'synthetic': return Path(data_dir) if data_dir else None
    if not data_dir or not Path(data_dir).expanduser().is_dir():
        what = 'no --data-dir given' if not data_dir else f"data folder {str(data_dir)!r} does not exist"
        raise DatasetError(f"{what} for dataset {dataset!r}; expected layout:\n{DATASET_LAYOUTS[dataset]}")
    return Path(data_dir).expanduser()


# %%
test_fail(lambda: check_data_dir('qnrf', '/nonexistent/qnrf'), contains='ROOT/Train/img_0001_ann.mat')
test_fail(lambda: check_data_dir('shanghaitech-a', None), contains='no --data-dir')
test_eq(check_data_dir('synthetic', None), None)
test_eq(check_data_dir('jhu', str(fixtures)), fixtures)
test_eq(set(DATASET_LAYOUTS) | {'synthetic'}, set(DATASET_NAMES))
test_eq(literal_values(DatasetName), DATASET_NAMES)   # the hint and the registry name the same datasets


# %%
#| export
def synthetic_kwargs(n:int|None=None, # training images (validation and test get a quarter each, at least 2)
                     size:int|None=None # image side in pixels
                    ) -> dict:
    "`build_datasets` arguments for `n` synthetic training images of side `size` (unset: the defaults)."
    kw = {} if n is None else dict(n_train=n, n_val=max(n // 4, 2), n_test=max(n // 4, 2))
    return kw if size is None else {**kw, 'size': size}


# %%
test_eq(synthetic_kwargs(16, 48), dict(n_train=16, n_val=4, n_test=4, size=48))
test_eq(synthetic_kwargs(), {})
test_eq(synthetic_kwargs(4), dict(n_train=4, n_val=2, n_test=2))


# %%
#| export
def holdout_split(n:int, # number of training images
                  val_fraction:float=0.1, # share held out for validation
                  seed:int=0 # seed of the permutation
                 ) -> tuple[list[int], list[int]]: # sorted train and validation indices
    "A fixed, seeded split of `range(n)` into train and validation indices (one of each at least, n >= 2)."
    if not 0 <= val_fraction < 1: raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2: n_val = min(max(n_val, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


# %%
tr_i, va_i = holdout_split(10, 0.3, seed=1)
test_eq((len(tr_i), len(va_i), sorted(tr_i + va_i)), (7, 3, list(range(10))))
test_eq(holdout_split(10, 0.3, seed=1), (tr_i, va_i))
test_eq([len(s) for s in holdout_split(2, 0.1)], [1, 1])   # at least one image on each side
test_eq(holdout_split(5, 0.), ([0, 1, 2, 3, 4], []))
test_fail(lambda: holdout_split(5, 1.), contains='val_fraction')


# %%
#| export
def build_datasets(name:DatasetName, # one of `DATASET_NAMES` (or an alias: 'sha', 'ucf-qnrf', ...)
                   root:str|Path|None=None, # data folder (not needed for 'synthetic')
                   crop_size:int|None=None, # training crop (default per dataset, `DEFAULT_CROP`)
                   stride:int=8, # evaluation images are padded to a multiple of this
                   val_fraction:float=0.1, # held-out share of train where the dataset has no val split
                   seed:int=0, # seed of the hold-out split (and of the synthetic images)
                   val_seed:int|None=None, # seed of the hold-out split alone, so runs of any `seed` validate on the same images (default: `seed`)
                   **kwargs # short_side, cache_dir, out_of_bounds, flip, scale_range, aug_seed; synthetic: n_train, n_val, n_test, size, max_count
                  ) -> tuple[CrowdDataset, CrowdDataset, CrowdDataset]:
    "Build `(train, val, test)` datasets: augmented crops for training, padded full images for evaluation."
    key = str(name).lower().replace('_', '-')
    key = {'sha': 'shanghaitech-a', 'shb': 'shanghaitech-b', 'ucf-qnrf': 'qnrf', 'jhu-crowd': 'jhu',
           'nwpu-crowd': 'nwpu'}.get(key, key)
    check_choice(key, DEFAULT_CROP, 'dataset', DatasetError)
    root = check_data_dir(key, root)
    flip, aug_seed = kwargs.pop('flip', True), kwargs.pop('aug_seed', None)
    scale_range = kwargs.pop('scale_range', None)
    eval_tf = EvalTransform(stride)
    if key == 'synthetic':
        n_train, n_val, n_test = kwargs.pop('n_train', 200), kwargs.pop('n_val', 50), kwargs.pop('n_test', 50)
        size = kwargs.pop('size', 128)
        crop = crop_size or min(DEFAULT_CROP[key], *((size,) if isinstance(size, int) else size))
        common = dict(size=size, seed=seed, **kwargs)
        return (SyntheticCrowd(n_train, split='train', transform=TrainTransform(crop, flip, scale_range),
                               aug_seed=aug_seed, **common),
                SyntheticCrowd(n_val, split='val', transform=eval_tf, **common),
                SyntheticCrowd(n_test, split='test', transform=eval_tf, **common))
    crop = crop_size or DEFAULT_CROP[key]
    if crop % stride: warn_data(name, f"crop size {crop} is not a multiple of the stride {stride}")
    train_tf = TrainTransform(crop, flip, scale_range)
    if key.startswith('shanghaitech') or key == 'qnrf':
        if key == 'qnrf': make = lambda split, **kw: UCFQNRF(root, split, **kw)
        else: make = lambda split, **kw: ShanghaiTech(root, key[-1].upper(), split, **kw)
        full = make('train', **kwargs)
        tr, va = holdout_split(len(full), val_fraction, seed if val_seed is None else val_seed)
        train, val = full.subset(tr, train_tf), full.subset(va, eval_tf)
        test = make('test', transform=eval_tf, **kwargs)
    else:
        cls = JHUCrowd if key == 'jhu' else NWPUCrowd
        train = cls(root, 'train', transform=train_tf, **kwargs)
        val, test = (cls(root, 'val', transform=eval_tf, **kwargs),
                     cls(root, 'test', transform=eval_tf, **kwargs))
    train.aug_seed = aug_seed
    return train, val, test


# %%
tr, va, te = build_datasets('synthetic', n_train=6, n_val=3, n_test=3, size=96)
test_eq((len(tr), len(va), len(te)), (6, 3, 3))
test_eq(tr[0][0].shape, (3, 96, 96))
test_eq(va[0][0].shape, (3, 96, 96))
tr, va, te = build_datasets('shanghaitech-a', fixtures/'ShanghaiTech', stride=8)
test_eq((len(tr), len(va), len(te)), (2, 1, 3))
test_eq(tr[0][0].shape, (3, 256, 256))
image, points, meta = te[1]                       # test IMG_4: 500×334 -> padded to 504×336
test_eq((image.shape, meta['count'], meta['width'], meta['height']), ((3, 336, 504), 170, 500, 334))
assert not {va[0][2]['path']} & {te[i][2]['path'] for i in range(len(te))}
test_fail(lambda: build_datasets('mall'),
          contains='shanghaitech-a, shanghaitech-b, qnrf, jhu, nwpu, synthetic')
# `val_seed` fixes the hold-out: runs with any seed validate on the same photo; without it the seed draws
# the photo
# two training photos (and the same two as a test split)
_shb = Path(tempfile.mkdtemp()) / 'ShanghaiTech' / 'part_B'
_src = Path('../tests/fixtures/ShanghaiTech/part_B/train_data')
for _split in ('train_data', 'test_data'): shutil.copytree(_src, _shb / _split)
held_out = lambda **kw: build_datasets('shanghaitech-b', _shb.parent, val_fraction=0.5, **kw)[1][0][2]['name']
test_eq({held_out(seed=s, val_seed=0) for s in range(6)}, {held_out(seed=0)})
test_eq(len({held_out(seed=s) for s in range(6)}), 2)
test_fail(lambda: build_datasets('qnrf'), contains='expected layout')
tr, va, te = build_datasets('nwpu', fixtures/'formats/NWPU-Crowd', crop_size=64)
test_eq((len(tr), len(va), len(te)), (2, 2, 1))
test_eq(tr[0][0].shape, (3, 64, 64))
test_eq(va[0][0].shape, (3, 512, 688))            # 200×150 -> 683×512, padded to a multiple of 8

# %% [markdown]
# One real image: ShanghaiTech part A test `IMG_1` (172 annotated heads).

# %%
image, points, meta = ShanghaiTech(fixtures/'ShanghaiTech', 'A', 'test')[0]
test_eq(meta['count'], 172)
fig, ax = plt.subplots(figsize=(6, 4.2), dpi=60)
ax.imshow(denormalize(image))
ax.scatter(points[:, 0], points[:, 1], s=4, c='r')
ax.set_title(f"{meta['name']}: {meta['count']} heads", fontsize=10)
ax.axis('off')
plt.tight_layout()
plt.show()

# %%
#| hide
import nbdev
nbdev.nbdev_export()
