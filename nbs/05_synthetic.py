# %% [markdown]
# # Synthetic crowds
#
# > `render_crowd`: procedurally drawn crowd images with exact head positions, the data of the demo, the tests and the ablations.

# %%
#| default_exp synthetic

# %%
#| export
from __future__ import annotations
import numpy as np
import torch
import torch.nn.functional as F

# %%
#| hide
from fastcore.test import test_eq

# %% [markdown]
# The embedded data of the demo and the tests: procedurally drawn crowds with known head positions, cheap
# enough to generate on the fly and easy enough for a small network to learn to count in minutes on a CPU, yet
# with the traits that make real crowd counting hard:
#
# - **perspective**: the head radius grows linearly from the top to the bottom of the image, and the head
#   density on the image plane is proportional to $1/r(y)^2$ (a uniform crowd on a ground plane), so heads are
#   smaller and denser towards the top;
# - **clusters and empty regions**: most heads come from a few Gaussian groups, the rest are scattered; one or
#   two elliptical regions stay empty; heads keep a minimal distance (they overlap only partly);
# - **appearance**: a person is a coloured shoulder ellipse, a dark round head (hair) and usually a lighter
#   face; people are drawn back to front, so nearer ones occlude farther ones;
# - **background**: a smooth colour field with mid-frequency texture and pixel noise, plus distractors that
#   share one trait with heads but not all: dark squares and poles, light disks, coloured rectangles.
#
# `render_crowd` draws one image from a NumPy generator; the dataset built on it, `SyntheticCrowd`, is in
# [data](05c_data.ipynb).

# %%
#| export
def _smooth_field(rng, h, w, cells, channels) -> np.ndarray:
    "Bicubically upsampled random grid: a smooth `(h, w, channels)` field in about [-1, 1]."
    grid = torch.from_numpy(rng.uniform(-1, 1, (1, channels, cells, cells)).astype(np.float32))
    return F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False)[0].permute(1, 2, 0).numpy()


# %%
field = _smooth_field(np.random.default_rng(0), 64, 48, 3, 2)
test_eq((field.shape, field.dtype), ((64, 48, 2), np.float32))
assert np.abs(field).max() < 1.5 and field.std() > 0.1
# smooth: steps between neighbouring rows 0.1 at most (white noise of that range: about 2)
assert np.abs(np.diff(field, axis=0)).max() < 0.2

# %% [markdown]
# Heads, faces and shoulders are anti-aliased ellipses: coverage 1 inside, 0 outside, and a one-pixel ramp
# across the outline (0.5 on it).

# %%
#| export
def _ellipse_alpha(dx, dy, ax, ay):
    "Anti-aliased coverage of an axis-aligned ellipse, semi-axes `ax`, `ay`, at offsets `dx`, `dy`."
    d = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
    return np.clip((1 - d) * np.minimum(ax, ay) + 0.5, 0, 1)


# %%
test_eq(_ellipse_alpha(np.array([0., 4., 8.]), np.zeros(3), 4., 2.), [1., 0.5, 0.])
test_eq(_ellipse_alpha(0., 2., 4., 2.), 0.5)

# %% [markdown]
# Head centres: heights drawn with density $\propto 1/r(y)^2$, most heads from a few Gaussian groups, one or
# two empty ellipses, and a greedy rejection that keeps neighbouring heads at least 1.1 radii apart.

# %%
#| export
def _place_heads(rng, h, w, count, radius_at, min_gap=1.1):
    "Up to `count` head centres with perspective density, clusters, empty regions and a minimal spacing."
    if count == 0: return np.zeros((0, 2))
    ys_grid = np.linspace(0, h, 257)
    pdf = 1 / radius_at(ys_grid) ** 2
    cdf = np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2)])
    cdf /= cdf[-1]
    def sample_y(n): return np.interp(rng.uniform(0, 1, n), cdf, ys_grid)
    n_cand = 5 * count + 40
    n_clusters = int(rng.integers(1, 5))
    centres = np.stack([rng.uniform(0, w, n_clusters), sample_y(n_clusters)], 1)
    spread = (rng.uniform(2.5, 7, n_clusters) * radius_at(centres[:, 1]) * np.sqrt(max(count, 1) / n_clusters)
              / 2)
    from_cluster = rng.uniform(0, 1, n_cand) < rng.uniform(0.4, 0.85)
    which = rng.integers(0, n_clusters, n_cand)
    cand = np.stack([rng.uniform(0, w, n_cand), sample_y(n_cand)], 1)
    cand[from_cluster] = (centres[which[from_cluster]]
                          + rng.normal(0, 1, (int(from_cluster.sum()), 2)) * spread[which[from_cluster], None])
    inside = (cand[:, 0] >= 0.5) & (cand[:, 0] < w - 0.5) & (cand[:, 1] >= 0.5) & (cand[:, 1] < h - 0.5)
    for _ in range(int(rng.integers(0, 3))):            # empty regions
        ex, ey = rng.uniform(0, w), rng.uniform(0, h)
        ax, ay = rng.uniform(0.1, 0.25) * w, rng.uniform(0.08, 0.2) * h
        inside &= ((cand[:, 0] - ex) / ax) ** 2 + ((cand[:, 1] - ey) / ay) ** 2 > 1
    cand = cand[inside]
    r = radius_at(cand[:, 1])
    chosen = np.zeros((count, 2))
    rad = np.zeros(count)
    k = 0
    for p, rp in zip(cand, r):                          # greedy rejection: heads overlap at most partly
        if k and (((chosen[:k] - p) ** 2).sum(1) < (min_gap * np.maximum(rad[:k], rp)) ** 2).any(): continue
        chosen[k], rad[k] = p, rp
        k += 1
        if k == count: break
    return chosen[:k]


# %%
radius = lambda y: 2 + 4 * np.clip(y / 96, 0, 1)
heads = _place_heads(np.random.default_rng(1), 96, 128, 60, radius)
assert 30 < len(heads) <= 60
assert ((heads >= 0.5) & (heads < [127.5, 95.5])).all()
gaps = np.sqrt(((heads[:, None] - heads[None]) ** 2).sum(-1)) + np.eye(len(heads)) * 1e9
rads = radius(heads[:, 1])
assert (gaps >= 1.1 * np.maximum(rads[:, None], rads[None]) - 1e-9).all()   # the minimal spacing holds
assert (heads[:, 1] < 48).mean() > 0.5      # denser towards the top, where heads are small
test_eq(_place_heads(np.random.default_rng(1), 96, 128, 0, radius).shape, (0, 2))

# %% [markdown]
# ## Drawing one image

# %%
#| export
def render_crowd(rng:np.random.Generator, # random source (one per image)
                 height:int=128, width:int=128, # image size
                 count:int=50, # heads to place (fewer if they do not fit)
                ) -> tuple[np.ndarray, np.ndarray]: # `(H, W, 3)` uint8 image and `(N, 2)` head centres `(x, y)`
    "Draw one synthetic crowd image and return it with the head centres."
    h, w = height, width
    s = np.sqrt(h * w)
    r_top, r_bottom = rng.uniform(0.010, 0.016) * s, rng.uniform(0.032, 0.048) * s
    def radius_at(y): return r_top + (r_bottom - r_top) * np.clip(y / h, 0, 1)
    # background: smooth colour field + texture + vertical gradient
    base = rng.uniform(0.25, 0.75, 3)
    img = (base + 0.18 * _smooth_field(rng, h, w, int(rng.integers(2, 5)), 3)
           + 0.07 * _smooth_field(rng, h, w, max(4, h // 6), 1)
           + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, h, dtype=np.float32)[:, None, None]
           ).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    # distractors: coloured rectangles, dark squares, light disks, dark poles
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        rw, rh = rng.uniform(0.05, 0.3, 2) * s
        m = (xx >= x0) & (xx < x0 + rw) & (yy >= y0) & (yy < y0 + rh)
        img[m] = img[m] * 0.3 + 0.7 * rng.uniform(0.1, 0.9, 3)
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        side = 2 * radius_at(y0) * rng.uniform(0.8, 1.4)
        m = (np.abs(xx - x0) < side / 2) & (np.abs(yy - y0) < side / 2)
        img[m] = rng.uniform(0.02, 0.2)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        rd = radius_at(y0) * rng.uniform(1, 2.5)
        a = _ellipse_alpha(xx - np.float32(x0), yy - np.float32(y0), np.float32(rd),
                           np.float32(rd))[..., None]
        img = img * (1 - a) + a * rng.uniform(0.7, 1.0, 3).astype(np.float32)
    for _ in range(int(rng.integers(0, 3))):
        x0 = rng.uniform(0, w)
        m = (np.abs(xx - x0) < rng.uniform(0.5, 1.5)) & (yy > rng.uniform(0, h))
        img[m] = rng.uniform(0.05, 0.25)
    # people, vectorized per layer on a shared patch grid, composited back to front
    points = _place_heads(rng, h, w, count, radius_at)
    n = len(points)
    if n:
        points = points[np.argsort(points[:, 1])]
        r = (radius_at(points[:, 1]) * rng.uniform(0.85, 1.15, n)).astype(np.float32)
        rm = float(r.max())
        # patch extent
        top, bottom, side = int(np.ceil(1.1 * rm)) + 2, int(np.ceil(3.4 * rm)) + 2, int(np.ceil(1.6 * rm)) + 2
        ox = np.floor(points[:, 0]).astype(int)
        oy = np.floor(points[:, 1]).astype(int)
        fx = (points[:, 0] - ox).astype(np.float32)[:, None, None]
        fy = (points[:, 1] - oy).astype(np.float32)[:, None, None]
        # (n, 1, 2*side) offsets from each head centre
        dx = (np.arange(-side, side, dtype=np.float32) + 0.5)[None, None, :] - fx
        dy = (np.arange(-top, bottom, dtype=np.float32) + 0.5)[None, :, None] - fy  # (n, top+bottom, 1)
        rr = r[:, None, None]
        body = _ellipse_alpha(dx, dy - 2.0 * rr, 1.55 * rr, 1.35 * rr)
        head = _ellipse_alpha(dx, dy, rr, 1.05 * rr)
        has_face = (rng.uniform(0, 1, n) < 0.8)[:, None, None]
        face = _ellipse_alpha(dx, dy - 0.3 * rr, 0.62 * rr, 0.58 * rr) * has_face
        c_body = rng.uniform(0.15, 0.95, (n, 1, 1, 3)).astype(np.float32)
        c_head = (rng.uniform(0.0, 0.18, (n, 1, 1, 1)) * np.array([1.0, 0.9, 0.8])).astype(np.float32)
        c_face = (rng.uniform(0.55, 0.9, (n, 1, 1, 1)) * np.array([1.0, 0.8, 0.65])).astype(np.float32)
        colour = c_body * body[..., None]
        alpha = body
        for a, c in ((head, c_head), (face, c_face)):
            colour = colour * (1 - a[..., None]) + c * a[..., None]
            alpha = alpha * (1 - a) + a
        transparency = (1 - alpha)[..., None]
        P = max(top, bottom, side)
        canvas = np.pad(img, ((P, P), (P, P), (0, 0)))
        for k in range(n):                                               # premultiplied "over", back to front
            y0, x0 = oy[k] + P - top, ox[k] + P - side
            patch = canvas[y0:y0 + top + bottom, x0:x0 + 2 * side]
            patch *= transparency[k]
            patch += colour[k]
        img = canvas[P:P + h, P:P + w]
    img = (img - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.01, 0.035))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), points.astype(np.float64)


# %%
rng = np.random.default_rng(0)
im0, p0 = render_crowd(rng, 96, 128, 40)
test_eq(im0.shape, (96, 128, 3))
assert 0 < len(p0) <= 40
assert (p0[:, 0] >= 0).all() and (p0[:, 0] < 128).all() and (p0[:, 1] >= 0).all() and (p0[:, 1] < 96).all()
test_eq(len(render_crowd(np.random.default_rng(0), 64, 64, 0)[1]), 0)
# every head shows dark hair within 2 px of its centre (nearer people never cover a farther head's centre)
grey = im0.mean(-1)
darkest = np.array([grey[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3].min() for x, y in p0])
assert (darkest < 0.6 * np.median(grey)).mean() > 0.9

# %%
#| hide
import nbdev
nbdev.nbdev_export()
