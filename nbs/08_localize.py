# %% [markdown]
# # Localization
#
# > From a density map to head positions: upsample to the image size, keep the 3×3 local maxima above a threshold (Sec. 3.4), with one point per plateau.

# %%
#| default_exp localize

# %%
#| export
from __future__ import annotations
import numpy as np
import torch
import torch.nn.functional as F
from typing import Literal
from uotcrowd.core import check_density, check_choice

# %%
#| hide
import os, math, time
from collections import deque
from pathlib import Path
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.core import pixel_centres


# %% [markdown]
# Because the generalized loss pushes the predicted density toward the annotations, its maps are compact
# enough to read head positions off them directly. The paper does it with simple post-processing (Sec. 3.4):
# the stride-8 density map $a$ is upsampled to the image size, a pixel is a candidate if it is the maximum of
# the $3\times3$ window centred on it, and candidates with density above $0.05$ are the predicted locations.
#
# Three details the paper leaves open are fixed here:
#
# * **What upsampling does to values.** We *interpolate* the density values (no division by $s^2$), so the
#   threshold $0.05$ applies to the per-map-pixel density $a$ as predicted, whatever the stride. The default
#   is bilinear interpolation with `align_corners=False`, which samples map pixel $(i,j)$ exactly at image
#   position $(s(j+\frac12), s(i+\frac12))$: the convention of `uotcrowd.core.pixel_centres` and of the
#   losses. The map is zero-padded by one pixel before interpolating, so beyond the outer pixel centres values
#   fall toward zero (the image holds no density outside itself) instead of being clamped flat.
# * **Plateaus.** Ties are unavoidable: bilinear upsampling by an even factor gives the two image pixels
#   around each cell centre the same weight, so an isolated peak becomes a $2\times2$ plateau, and nearest
#   upsampling turns every map pixel into an $s\times s$ plateau. A plain "equal to the 3×3 maximum" test
#   would report every pixel of a plateau. We detect **regional maxima**: connected sets of equal values
#   (8-connectivity) with no strictly higher neighbour, and return **one point per plateau, at its centroid**.
#   An isolated peak at map pixel $(i,j)$ then localizes at exactly $(s(j+\frac12), s(i+\frac12))$ for any
#   interpolation mode.
# * **Coordinates.** Pixel $(v, u)$ of the upsampled map covers input pixel $(v, u)$, whose centre is at
#   $(u+\frac12, v+\frac12)$ in the `(x, y)` convention of the annotations.
#
# A consequence worth knowing: bilinear interpolation cannot create a maximum between sample points, so with
# `mode='bilinear'` (the paper's setting) predicted points lie within half a pixel of the stride-$s$ grid of
# cell centres (or midway between equal neighbours). `mode='bicubic'` can place a peak between cell centres
# (sub-cell positions for smooth bumps); `mode='nearest'` gives the same points as bilinear for isolated
# peaks.

# %% [markdown]
# ## Upsampling the density map

# %%
#| export
UpsampleMode = Literal['bilinear', 'bicubic', 'nearest']   # how a density map is interpolated to image pixels


# %%
#| export
def upsample_density(density:torch.Tensor, # `(B, 1, h, w)` density maps
                     stride:int=8, # input pixels per density pixel
                     mode:UpsampleMode='bilinear' # 'bilinear', 'bicubic' (both align_corners=False, zero outside) or 'nearest'
                    ) -> torch.Tensor: # `(B, 1, h*stride, w*stride)` interpolated density values
    "Interpolate a density map to image resolution; values are interpolated, not divided by `stride**2`."
    check_density(density)
    if int(stride) != stride or stride < 1: raise ValueError(f"stride must be a positive integer, got {stride}")
    check_choice(mode, UpsampleMode, 'mode')
    s = int(stride)
    if s == 1: return density
    h, w = density.shape[-2:]
    if mode == 'nearest': return F.interpolate(density, size=(h * s, w * s), mode='nearest')
    padded = F.pad(density, (1, 1, 1, 1))
    up = F.interpolate(padded, size=((h + 2) * s, (w + 2) * s), mode=mode, align_corners=False)
    return up[..., s:-s, s:-s]


# %% [markdown]
# For an odd stride the cell centres fall on image pixel $s j + \lfloor s/2\rfloor$, which reproduces the map
# values exactly; with $s=8$ they lie between pixels $8j+3$ and $8j+4$. A constant map stays constant up to
# the outer cell centres and then falls linearly to zero at half a cell beyond the image edge. Away from the
# border, bilinear upsampling agrees with `torch`'s own unpadded upsampling.

# %%
d = torch.rand(2, 1, 5, 6)
up = upsample_density(d, 8)
test_eq(up.shape, (2, 1, 40, 48))
flat = upsample_density(torch.full((1, 1, 4, 4), 0.2), 8)[0, 0]
test_close(flat[4:-4, 4:-4], torch.full((24, 24), 0.2), eps=1e-6)    # constant between the outer cell centres
# then falling linearly toward zero outside
test_close(flat[0, 16], 0.2 * 4.5 / 8, eps=1e-6)
test_close(upsample_density(d, 3)[..., 1::3, 1::3], d, eps=1e-6)
ref = F.interpolate(d, scale_factor=8, mode='bilinear', align_corners=False)
test_close(up[..., 4:-4, 4:-4], ref[..., 4:-4, 4:-4], eps=1e-6)
test_eq(upsample_density(d, 4, mode='nearest')[..., ::4, ::4], d)
test_fail(lambda: upsample_density(d, 8, mode='area'), contains='mode')


# %% [markdown]
# ## Regional maxima, one point per plateau
#
# The naive definition, written for clarity: flood-fill each connected set of equal values above the threshold
# and keep it if no member has a strictly larger 8-neighbour. It loops over pixels, so it only serves as a
# reference.

# %%
def regional_maxima_naive(img:np.ndarray, threshold:float) -> list[tuple[float, float, float]]:
    "Reference: `(x, y, value)` of the centroid of each plateau that is a regional maximum above `threshold`."
    H, W = img.shape
    seen, out = np.zeros((H, W), bool), []
    nbrs = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for i in range(H):
        for j in range(W):
            if seen[i, j] or not img[i, j] > threshold: continue
            comp, queue, is_max = [], deque([(i, j)]), True
            seen[i, j] = True
            while queue:
                y, x = queue.popleft()
                comp.append((y, x))
                for dy, dx in nbrs:
                    v, u = y + dy, x + dx
                    if not (0 <= v < H and 0 <= u < W): continue
                    if img[v, u] > img[y, x]: is_max = False
                    elif img[v, u] == img[y, x] and not seen[v, u]:
                        seen[v, u] = True
                        queue.append((v, u))
            if is_max:
                ys, xs = zip(*comp)
                out.append((np.mean(xs) + 0.5, np.mean(ys) + 0.5, float(img[i, j])))
    return out


# %% [markdown]
# The batched version works on whole tensors. Each pixel above the threshold starts with its own flat index as
# a label; repeatedly, it takes the smallest label among its 8 neighbours of *equal value*, followed by a
# pointer-jumping step (`label = label[label]`) that makes long plateaus converge in a few rounds. At the
# fixed point each plateau carries the index of its first pixel. A plateau is dropped if any member has a
# strictly higher neighbour (one 3×3 max-pool), and surviving plateaus give the centroid of their members
# (`index_add_`). The only Python loop is over propagation rounds (one round when there are no ties), never
# over pixels.

# %%
#| export
_NBRS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

def regional_maxima(values:torch.Tensor, # `(B, H, W)` map
                    threshold:float=0.05 # keep maxima whose value is strictly above this
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: # image index `(K,)`, `(x, y)` `(K, 2)`, value `(K,)`
    "Plateau-aware 3×3 regional maxima of a batch of maps: one centroid `(x+0.5, y+0.5)` per maximal plateau."
    B, H, W = values.shape
    dev, n = values.device, B * H * W
    mask = values > threshold
    empty = (torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, 2, device=dev), values.new_zeros(0))
    if n == 0 or not bool(mask.any()): return empty
    padded = F.pad(values, (1, 1, 1, 1), value=float('-inf'))
    shifted = lambda t, dy, dx: t[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
    has_higher = F.max_pool2d(values[:, None], 3, 1, 1)[:, 0] > values
    equal = [mask & (shifted(padded, dy, dx) == values) for dy, dx in _NBRS]
    idx = torch.arange(n, device=dev).view(B, H, W)
    label = idx
    if any(bool(e.any()) for e in equal):   # propagate the smallest index through plateaus
        big = torch.full((), n, device=dev, dtype=torch.long)
        while True:
            pl = F.pad(label, (1, 1, 1, 1), value=n)
            new = label
            for (dy, dx), e in zip(_NBRS, equal):
                new = torch.minimum(new, torch.where(e, shifted(pl, dy, dx), big))
            flat = new.reshape(-1)
            flat = flat[flat]
            flat = flat[flat]  # pointer jumping
            new = flat.view(B, H, W)
            if torch.equal(new, label): break
            label = new
    lab, hh = label[mask], has_higher[mask]
    bad = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, lab, hh.long())
    ys, xs = (idx[mask] % (H * W)).div(W, rounding_mode='floor'), idx[mask] % W
    sums = torch.zeros(n, 3, dtype=torch.long, device=dev).index_add_(
        0, lab, torch.stack([xs, ys, torch.ones_like(xs)], -1))
    roots = idx[mask][(lab == idx[mask]) & (bad[lab] == 0)]
    dt = values.dtype if values.is_floating_point() else torch.float32
    # integer sums: exact centroids for any plateau size
    xy = (sums[roots, :2] / sums[roots, 2:]).to(dt) + 0.5
    return roots.div(H * W, rounding_mode='floor'), xy, values.reshape(-1)[roots]


# %% [markdown]
# The fast version agrees with the naive one on random maps with many ties (small integers: plateaus,
# shoulders, touching maxima, maxima at the border), and, without ties, with SciPy's maximum filter.

# %%
from scipy import ndimage

# %%
g = torch.Generator().manual_seed(0)
for trial in range(40):
    img = torch.randint(0, 4, (1, 9, 11), generator=g).float()
    b, xy, val = regional_maxima(img, threshold=0.5)
    ref = sorted(regional_maxima_naive(img[0].numpy(), 0.5))
    got = sorted(zip(xy[:, 0].tolist(), xy[:, 1].tolist(), val.tolist()))
    test_eq(len(got), len(ref))
    test_close(np.array(got).reshape(-1, 3), np.array(ref).reshape(-1, 3), eps=1e-5)
img = torch.rand(3, 20, 30, generator=g)
b, xy, val = regional_maxima(img, 0.3)
peaks = ((ndimage.maximum_filter(img.numpy(), size=(1, 3, 3), mode='constant', cval=-np.inf) == img.numpy())
         & (img.numpy() > 0.3))
bb, yy, xx = np.nonzero(peaks)
test_eq(b.tolist(), bb.tolist())
test_eq(xy.tolist(), np.stack([xx + .5, yy + .5], 1).tolist())


# %% [markdown]
# ## `localize`
#
# `localize` upsamples, finds the regional maxima above `threshold` and splits them per image. Points are
# `(x, y)` in input-image pixels, in row-major order of their plateau's first pixel; `return_scores=True` also
# returns the density value at each point. It runs without autograd on the density's own device.

# %%
#| export
@torch.no_grad()
def localize(density:torch.Tensor, # `(B, 1, h, w)` predicted density maps
             stride:int=8, # input pixels per density pixel
             threshold:float=0.05, # keep local maxima whose (interpolated) density is above this
             return_scores:bool=False, # also return the density value at each point
             mode:UpsampleMode='bilinear' # upsampling: 'bilinear' (paper), 'bicubic' or 'nearest'
            ): # list of B `(K_b, 2)` `(x, y)` tensors; with scores, `(points, scores)`
    "Head positions from density maps (Sec. 3.4): upsample ×`stride`, 3×3 regional maxima above `threshold`."
    check_density(density)
    B = density.shape[0]
    up = upsample_density(density.detach().float(), stride, mode)[:, 0]
    b, xy, val = regional_maxima(up, threshold)
    counts = torch.bincount(b, minlength=B).tolist()
    points, scores = list(xy.split(counts)), list(val.split(counts))
    return (points, scores) if return_scores else points


# %% [markdown]
# **An isolated peak localizes at its cell centre** $(s(j+\frac12), s(i+\frac12))$, exactly, for even and odd
# strides, every mode, and at the borders and corners of the map.

# %%
h, w = 6, 7
for s in (8, 4, 3, 1):
    for mode in ('bilinear', 'bicubic', 'nearest'):
        for i, j in [(2, 3), (0, 0), (5, 6), (0, 4)]:
            d = torch.zeros(1, 1, h, w)
            d[0, 0, i, j] = 0.7
            pts, sc = localize(d, s, return_scores=True, mode=mode)
            test_eq(pts[0].tolist(), [[s * (j + .5), s * (i + .5)]])
            assert sc[0].item() > 0.05
test_eq(localize(d, 8)[0].tolist(), pixel_centres(h, w, 8)[d.flatten().argmax()][None].tolist())


# %% [markdown]
# **Gaussian bumps.** A density made of isolated Gaussian bumps ($\sigma$ = 1 map pixel, each summing to one
# head) centred on cell centres localizes at those centres within a pixel (the neighbouring bumps' tails break
# the exact tie of the $2\times2$ peak, so the maximum is one of the four pixels around the centre: at most
# $\sqrt{1/2}$ px off). With bumps centred anywhere, bilinear points are the nearest cell centre (error at
# most $s/2$ per axis), and bicubic interpolation recovers the sub-cell position to about a pixel.

# %%
def gaussian_density(points, h, w, stride=8, sigma=1.0):
    "Unit-mass Gaussians (std `sigma` map pixels) summed at the centres of an `h`×`w` stride-`stride` map."
    c = pixel_centres(h, w, stride)
    d2 = ((c[:, None] - points[None]) ** 2).sum(-1) / stride ** 2
    k = torch.exp(-d2 / (2 * sigma ** 2))
    return (k / k.sum(0, keepdim=True)).sum(1).view(1, 1, h, w)

def nearest_error(pred, gt):
    "Largest distance from a ground-truth point to its nearest prediction, and the count difference."
    return torch.cdist(gt, pred).min(1).values.max().item(), len(pred) - len(gt)

# cell centres of a 16×18 map
centred = torch.tensor([[3, 3], [12, 4], [5, 10], [14, 13]]).float().mul(8).add(4)
pts = localize(gaussian_density(centred, 16, 18), 8)[0]
test_eq(len(pts), 4)
assert nearest_error(pts, centred)[0] <= math.sqrt(0.5)

anywhere = torch.tensor([[27.3, 30.8], [101.1, 35.6], [45.9, 86.2], [117.4, 110.5]])
d = gaussian_density(anywhere, 16, 18)
err, dn = nearest_error(localize(d, 8)[0], anywhere)
test_eq(dn, 0)
assert err <= 4 * math.sqrt(2)
err_cubic, dn = nearest_error(localize(d, 8, mode='bicubic')[0], anywhere)
test_eq(dn, 0)
assert err_cubic < 1.5
err, err_cubic

# %% [markdown]
# **What the 3×3 window sees.** With `mode='nearest'` every map pixel is an $s\times s$ plateau, so the points
# are exactly the map pixels larger than all 8 neighbours, at their cell centres (checked against SciPy's
# maximum filter). Bilinear interpolation is different near a map pixel: the image-resolution 3×3 window
# reaches only $1/s$ of a cell, where a diagonal neighbour enters with weight $\approx 1/s^2$, so a map pixel
# that beats its four direct neighbours is usually a peak even when a diagonal neighbour is larger. On noisy
# maps bilinear therefore reports more peaks than nearest, close to the count of map pixels that beat their 4
# direct neighbours (cross footprint). Trained GL maps are compact, so the difference matters little in
# practice. A constant map is a single plateau with one point at the image centre.

# %%
d = torch.rand(2, 1, 20, 30, generator=g)
box, cross = np.ones((1, 1, 3, 3), bool), np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)[None, None]
peaks8 = ndimage.maximum_filter(d.numpy(), footprint=box, mode='constant', cval=0) == d.numpy()
peaks4 = ndimage.maximum_filter(d.numpy(), footprint=cross, mode='constant', cval=0) == d.numpy()
near, bil = localize(d, 8, threshold=0., mode='nearest'), localize(d, 8, threshold=0.)
for k in range(2):
    test_eq(near[k].tolist(), pixel_centres(20, 30, 8)[torch.from_numpy(peaks8[k, 0]).flatten()].tolist())
    assert abs(len(bil[k]) - peaks4[k].sum()) <= 0.1 * peaks4[k].sum() and len(bil[k]) > 1.3 * peaks8[k].sum()
test_eq(localize(torch.full((1, 1, 96, 128), 0.1), 8)[0].tolist(), [[512., 384.]])
[(len(near[k]), len(bil[k]), int(peaks8[k].sum()), int(peaks4[k].sum())) for k in range(2)]

# %% [markdown]
# **Threshold, empty maps, batches, plateaus.**

# %%
d = torch.zeros(1, 1, 8, 8)
d[0, 0, 2, 2] = 0.06
d[0, 0, 5, 5] = 0.04
pts, sc = localize(d, 8, threshold=0.05, return_scores=True)
test_eq(pts[0].tolist(), [[20., 20.]])
assert (sc[0] > 0.05).all()
test_eq(len(localize(d, 8, threshold=0.03)[0]), 2)
test_eq(len(localize(d, 8, threshold=0.07)[0]), 0)

empty = localize(torch.zeros(2, 1, 8, 8), 8, return_scores=True)
test_eq([p.shape for p in empty[0]], [(0, 2), (0, 2)])
test_eq([s.shape for s in empty[1]], [(0,), (0,)])
test_eq(localize(torch.zeros(0, 1, 4, 4), 8), [])

batch = torch.cat([gaussian_density(anywhere, 16, 18), torch.zeros(1, 1, 16, 18),
                   gaussian_density(centred, 16, 18)])
together = localize(batch, 8, return_scores=True)
for k in range(3):
    alone = localize(batch[k:k + 1], 8, return_scores=True)
    test_eq(together[0][k], alone[0][0])
    test_eq(together[1][k], alone[1][0])

plateau = torch.zeros(1, 1, 8, 8)
plateau[0, 0, 2:4, 4:6] = 0.3  # four equal map pixels: one head, one point
test_eq(localize(plateau, 8)[0].tolist(), [[40., 24.]])
test_eq(localize(plateau, 8, mode='nearest')[0].tolist(), [[40., 24.]])
shoulder = plateau.clone()
shoulder[0, 0, 2, 3] = 0.5  # a flat shoulder beside a higher peak is no peak
test_eq(localize(shoulder, 1)[0].tolist(), [[3.5, 2.5]])
pts = localize(shoulder, 8)[0]
test_eq(len(pts), 1)
assert (pts - torch.tensor([28., 20.])).norm() <= math.sqrt(0.5)
test_fail(lambda: localize(torch.zeros(8, 8), 8), contains='(B, 1, h, w)')

# %% [markdown]
# It runs on the density's device and ignores autograd; a 1024×768 image (a 128×96 map with 300 heads) takes a
# fraction of a second on one CPU thread.

# %%
heads = torch.rand(300, 2, generator=g) * torch.tensor([1024., 768.])
d = gaussian_density(heads, 96, 128).requires_grad_()
t0 = time.perf_counter()
pts = localize(d, 8)[0]
dt = time.perf_counter() - t0
assert pts.device == d.device and not pts.requires_grad and 0 < len(pts) <= 300
print(f'{len(pts)} points from 300 heads in {1e3 * dt:.0f} ms')

# %% [markdown]
# ## Example: a ShanghaiTech image
#
# No trained model exists in this notebook, so we build a density map the way a good network would predict
# one: the ground-truth heads of a ShanghaiTech Part B image rendered as unit-mass Gaussians ($\sigma$ = 1 map
# pixel) on the stride-8 grid. `localize` recovers most heads; heads closer than about two map pixels merge
# into one peak, which is the resolution limit of a stride-8 map. A trained model's map and its points are
# shown on the home page and by `uotcrowd demo`.
# The points are drawn by `uotcrowd.plots.plot_points` (red crosses over hollow green circles).

# %%
import matplotlib.pyplot as plt
from uotcrowd.plots import plot_points

# %%
from PIL import Image
from scipy.io import loadmat

# %%
#| notest
root = Path('../../shared/fixtures/ShanghaiTech/part_B/train_data')
img_path, gt_path = root/'images/IMG_9.jpg', root/'ground-truth/GT_IMG_9.mat'
if img_path.exists() and gt_path.exists():
    image = Image.open(img_path).convert('RGB')
    gt = torch.tensor(loadmat(gt_path)['image_info'][0, 0][0, 0][0], dtype=torch.float32)
    W, H = image.size
    density = gaussian_density(gt, math.ceil(H / 8), math.ceil(W / 8))
    pred = localize(density, 8)[0]
    fig, axs = plt.subplots(1, 2, figsize=(11, 4.2), dpi=50)
    axs[0].imshow(upsample_density(density, 8)[0, 0, :H, :W], cmap='magma')
    axs[0].set_title(f'density (sum {density.sum():.1f}), upsampled ×8'); axs[0].set_axis_off()
    plot_points(image, pred, gt, ax=axs[1], size=18)
    plt.tight_layout(); plt.show()
else: print(f'fixture {img_path} not found; figure skipped')

# %%
#| hide
import nbdev
nbdev.nbdev_export()
