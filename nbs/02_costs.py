# %% [markdown]
# # Transport costs
#
# > Cost matrices $C_{ij}=c(\boldsymbol{x}_i,\boldsymbol{y}_j)$ between the pixel centres of a stride-$s$ density map and head annotations, batched `(B, n, m)`: the one place where a distance or a cost is computed.

# %%
#| default_exp costs

# %%
#| export
from __future__ import annotations
import math
from functools import partial
from typing import Callable, Literal
import torch
from uotcrowd.core import pixel_centres, check_choice

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail, test_is
from uotcrowd.core import literal_values
import numpy as np


# %% [markdown]
# ## Pairwise distances
#
# All costs are functions of the Euclidean distance $L_{ij}=\|\boldsymbol{x}_i-\boldsymbol{y}_j\|_2$ between
# pixel centres $\boldsymbol{x}_i$ and head points $\boldsymbol{y}_j$, both divided by `scale` (512 by
# default, the official crop size) so that $\varepsilon$ and $\tau$ mean the same thing at any crop size.
#
# `torch.cdist` builds the matrix in one call. By default it switches to a matrix-product formula
# ($\|x\|^2+\|y\|^2-2x^\top y$) for large inputs, which in float32 turns an exact zero distance into
# $\approx 10^{-4}$; a cost that must vanish at distance zero needs the direct formula, so we ask for it. For
# planar points without autograd we write the direct formula out ($\sqrt{\Delta x^2+\Delta y^2}$ in place,
# 2–3× faster on the CPU than `cdist`'s general-$p$ kernel).

# %%
#| export
def _needs_grad(*ts) -> bool: return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# %%
leaf = torch.zeros(2, requires_grad=True)
test_eq((_needs_grad(torch.zeros(2)), _needs_grad(torch.zeros(2), leaf)), (False, True))
with torch.no_grad(): test_eq(_needs_grad(leaf), False)


# %%
#| export
def pairwise_distances(x:torch.Tensor, # `(B, n, 2)` or `(n, 2)` first point set
                       y:torch.Tensor, # `(B, m, 2)` or `(m, 2)` second point set
                      ) -> torch.Tensor: # `(B, n, m)` (or `(n, m)`) Euclidean distances
    "Euclidean distances between all pairs of `x` and `y`, exact at zero (no matrix-product shortcut)."
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        return x.new_zeros(*x.shape[:-1], y.shape[-2])
    if x.shape[-1] != 2 or _needs_grad(x, y):        # cdist's backward is defined at zero distance
        return torch.cdist(x, y, compute_mode='donot_use_mm_for_euclid_dist')
    dx, dy = x[..., :, None, 0] - y[..., None, :, 0], x[..., :, None, 1] - y[..., None, :, 1]
    return dx.square_().addcmul_(dy, dy).sqrt_()


# %%
x = torch.rand(3, 7, 2)
y = torch.rand(3, 5, 2)
naive = ((x[:, :, None] - y[:, None]) ** 2).sum(-1).sqrt()
test_close(pairwise_distances(x, y), naive, eps=1e-6)
test_eq(pairwise_distances(x, x).diagonal(dim1=1, dim2=2), torch.zeros(3, 7))  # exactly zero on the diagonal
test_eq(pairwise_distances(x, torch.zeros(3, 0, 2)).shape, (3, 7, 0))


# %% [markdown]
# Squared distances are the cost under which the L2 and Bayesian losses are half-iterations of the generalized
# loss (see [the theory](03b_theory.ipynb)), and DM-Count's transport cost. Squaring the exact distance keeps
# them exactly zero on the diagonal too.

# %%
#| export
def sq_distances(x:torch.Tensor, # `(B, n, 2)` or `(n, 2)` first point set
                 y:torch.Tensor, # `(B, m, 2)` or `(m, 2)` second point set
                ) -> torch.Tensor: # `(B, n, m)` (or `(n, m)`) squared Euclidean distances
    "Squared Euclidean distances $\\|x_i-y_j\\|^2$ between all pairs, exact at zero."
    return pairwise_distances(x, y).square()


# %%
test_close(sq_distances(x, y), naive ** 2, eps=1e-6)
test_eq(sq_distances(x[0], x[0]).diagonal(), torch.zeros(7))


# %% [markdown]
# ## The four costs
#
# With $L$ the scaled distance:
#
# | name | cost | remark |
# |---|---|---|
# | `dist` | $L$ | geomloss `p=1` |
# | `sqdist` | $L^2$ | the cost under which L2 and BL are half-iterations (Sec. 4) |
# | `exp` | $e^{L/\eta}-1$ | fixed $\eta$ (official code: 0.6) |
# | `perspective` | $e^{L/\eta(\boldsymbol{x},\boldsymbol{y})}-1$ | Eq. 4, $\eta$ from the mean normalized height |
#
# The paper writes the exponential costs as $e^{L/\eta}$ (Eq. 4). The official code subtracts 1, so that every
# cost is zero at distance zero, and so do we (`shift=True`). This is not cosmetic: with a cost $\ge 1$
# everywhere, moving a unit of mass costs more than the unbalanced penalty of leaving it untransported, and
# the loss then prefers a uniform density over the exact one (shown in `04_losses`, where a density with one
# person on each head's pixel must score lower than a uniform or a doubled one).
#
# **Perspective factor.** The paper maps the average normalized height
# $\tfrac12(h_{\boldsymbol{x}_i}+h_{\boldsymbol{y}_j})\in[0,1]$ linearly to $\eta\in[0.6, 0.8]$; the official
# code maps it to $[0.5, 0.7]$ (`s*0.2+0.5`). We default to the paper's range and make it configurable
# (`eta_range=(0.5, 0.7)` reproduces the official code). The normalized height of a point is $y$ (in input
# pixels) divided by the image height, which is `h*stride` for a density map of `h` rows unless given
# explicitly. Rows near the top of the image (far from the camera, small $h$) get a small $\eta$, hence a
# steeper cost that keeps the density of distant, tightly packed people compact.

# %%
#| export
def dist_cost(d:torch.Tensor, **kwargs) -> torch.Tensor:
    "Cost $L$: the (scaled) Euclidean distance itself."
    return d


# %%
d = torch.tensor([[[0., 0.3, 1.2]]])
test_eq(dist_cost(d), d)


# %%
#| export
def sqdist_cost(d:torch.Tensor, **kwargs) -> torch.Tensor:
    "Cost $L^2$: the squared (scaled) Euclidean distance."
    return d * d


# %%
test_close(sqdist_cost(d), d ** 2)

# %% [markdown]
# The exponential costs subtract 1 in place where they can: torch's CPU `expm1` is not vectorized, 5× slower
# than `exp`, so `exp` then `- 1` it is, on a copy only where autograd needs the exponential.

# %%
#| export
def _shifted(c:torch.Tensor, shift:bool) -> torch.Tensor:
    "`c - 1` if `shift`, in place unless autograd needs `c`."
    return (c - 1 if c.requires_grad else c.sub_(1)) if shift else c


# %%
c = torch.tensor([1., 3.])
test_is(_shifted(c, True), c)   # in place
test_eq(c, torch.tensor([0., 2.]))
test_eq(_shifted(c, False), torch.tensor([0., 2.]))
leaf = torch.ones(2, requires_grad=True)
# a copy: the leaf keeps its values
test_eq((_shifted(leaf, True).tolist(), leaf.tolist()), ([0., 0.], [1., 1.]))


# %%
#| export
def exp_cost(d:torch.Tensor, # scaled distances
             eta:float=0.6, # length scale of the exponential
             shift:bool=True, # subtract 1 so the cost is 0 at distance 0 (official code)
             **kwargs) -> torch.Tensor:
    "Cost $e^{L/\\eta}-1$ (or $e^{L/\\eta}$ with `shift=False`)."
    return _shifted((d / eta).exp_(), shift)


# %%
test_close(exp_cost(d, eta=0.6), torch.tensor([[[0., math.exp(0.5) - 1, math.exp(2) - 1]]]))
test_eq(exp_cost(torch.zeros(1)), torch.zeros(1))
test_eq(exp_cost(torch.zeros(1), shift=False), torch.ones(1))


# %%
#| export
def perspective_eta(height_x:torch.Tensor, # `(B, n)` normalized heights of the pixels, in [0, 1]
                    height_y:torch.Tensor, # `(B, m)` normalized heights of the points, in [0, 1]
                    eta_range:tuple=(0.6, 0.8) # `eta` at height 0 and at height 1
                   ) -> torch.Tensor: # `(B, n, m)`
    "Perspective factor $\\eta(x,y)$: the mean normalized height mapped linearly onto `eta_range`."
    lo, hi = eta_range
    k = 0.5 * (hi - lo)       # lo + (hi - lo) * (hx + hy) / 2, with a single (B, n, m) allocation
    return torch.add((lo + k * height_x).unsqueeze(-1), (k * height_y).unsqueeze(-2))


# %%
eta = perspective_eta(torch.tensor([[0., 1.]]), torch.tensor([[0., 1.]]))
test_close(eta, torch.tensor([[[0.6, 0.7], [0.7, 0.8]]]))
test_close(perspective_eta(torch.tensor([[0.5]]), torch.tensor([[0.5]]), (0.5, 0.7)), torch.tensor([[[0.6]]]))


# %%
#| export
def perspective_cost(d:torch.Tensor, # `(B, n, m)` scaled distances
                     height_x:torch.Tensor, # `(B, n)` normalized heights of the pixels
                     height_y:torch.Tensor, # `(B, m)` normalized heights of the points
                     eta_range:tuple=(0.6, 0.8), # `eta` at the top and at the bottom of the image
                     shift:bool=True, # subtract 1 so the cost is 0 at distance 0
                     **kwargs) -> torch.Tensor:
    "Perspective-guided cost $e^{L/\\eta(x,y)}-1$ (Eq. 4, shifted as in the official code)."
    return _shifted(torch.div(d, perspective_eta(height_x, height_y, eta_range)).exp_(), shift)


# %%
# heights 0 and 1 of two pixels against one head at height 0.5: eta 0.65 and 0.75
Lp = torch.tensor([[[0.3], [0.3]]])
test_close(perspective_cost(Lp, torch.tensor([[0., 1.]]), torch.tensor([[0.5]])),
           torch.tensor([[[math.exp(0.3 / 0.65) - 1], [math.exp(0.3 / 0.75) - 1]]]))


# %%
#| export
COSTS = dict(dist=dist_cost, sqdist=sqdist_cost, exp=exp_cost, perspective=perspective_cost)
CostName = Literal['dist', 'sqdist', 'exp', 'perspective']   # the names of `COSTS`

# %%
test_eq(sorted(COSTS), ['dist', 'exp', 'perspective', 'sqdist'])
test_eq(literal_values(CostName), tuple(COSTS))   # the hint and the registry name the same costs


# %% [markdown]
# ## Costs between two point sets
#
# `points_cost` is the cost between any two batched point sets given in input pixels: coordinates are divided
# by `scale`, heights by `image_height`. The density map's pixels are one such set: `pixel_positions` places
# pixel $(i, j)$ at $(s(j+o), s(i+o))$, at the cell centre for $o=\frac12$ (`uotcrowd.core.pixel_centres`) or,
# with $o=1$, at $8j+8$ as the official trainer's grid does (the lower-right corner of the cell). The cost
# comes out in the dtype of the points (float64 inputs give a float64 cost). On the CPU the matrix is built by
# blocks of rows, all images at once: each block's temporaries (distances, perspective factors) stay in cache,
# and only the result goes to memory (B=8, 4096 pixels, 500 heads: 160 ms as one tensor, 75 ms by blocks, one
# thread).

# %%
#| export
def pixel_positions(h:int, # rows of the density map
                    w:int, # columns of the density map
                    stride:int=8, # input pixels per density pixel
                    offset:float=0.5, # position inside the cell: 0.5 the centre, 1.0 the official grid (8j+8)
                    device=None, dtype=torch.float32
                   ) -> torch.Tensor: # `(h*w, 2)` `(x, y)` positions in input pixels, row-major
    "Input-image positions $(s(j+o), s(i+o))$ of the pixels of an `h`×`w` stride-`s` density map."
    grid = pixel_centres(h, w, stride, device=device, dtype=dtype)
    return grid if offset == 0.5 else grid + stride * (offset - 0.5)


# %%
test_eq(pixel_positions(2, 2, 8, offset=1.0), torch.tensor([[8., 8.], [16., 8.], [8., 16.], [16., 16.]]))
test_eq(pixel_positions(2, 2, 8), pixel_centres(2, 2, 8))


# %%
#| export
COST_BLOCK = 2 ** 18  # cost entries per row block on the CPU: the temporaries of a block stay in cache

def points_cost(x:torch.Tensor, # `(B, n, 2)` first point set (pixels), in input pixels
                y:torch.Tensor, # `(B, m, 2)` second point set (heads), in input pixels
                cost:CostName='perspective', # 'dist', 'sqdist', 'exp' or 'perspective'
                scale:float=512., # coordinates are divided by this
                image_height:float=512., # heights are y / image_height (perspective cost)
                eta:float=0.6, # length scale of the 'exp' cost
                eta_range:tuple=(0.6, 0.8), # perspective factor at height 0 and 1
                shift:bool=True, # exponential costs as exp(.)-1
                block:int|None=COST_BLOCK # CPU without autograd: entries per row block; None: all rows at once
               ) -> torch.Tensor: # `(B, n, m)` in the dtype of the inputs
    "The transport cost `cost` between every pair of `x` and `y`."
    check_choice(cost, COSTS, 'cost')
    xs, ys = x / scale, y / scale
    def rows_cost(rows=slice(None)):
        d = pairwise_distances(xs[..., rows, :], ys)
        if cost == 'perspective':
            return perspective_cost(d, x[..., rows, 1] / image_height, y[..., 1] / image_height,
                                    eta_range=eta_range, shift=shift)
        return COSTS[cost](d, eta=eta, shift=shift)
    n, m = x.shape[-2], y.shape[-2]
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    per_row = m * math.prod(batch)
    if block is None or x.device.type != 'cpu' or _needs_grad(x, y) or n * per_row <= block:
        return rows_cost()
    out = xs.new_empty(*batch, n, m, dtype=torch.result_type(xs, ys))
    step = max(1, block // per_row)
    for r0 in range(0, n, step): out[..., r0:r0 + step, :] = rows_cost(slice(r0, r0 + step))
    return out


# %%
xy = torch.tensor([[[8., 8.]]], dtype=torch.float64)
head = torch.tensor([[[20., 12.]]], dtype=torch.float64)
C8 = points_cost(xy, head, scale=16., image_height=16., eta_range=(0.5, 0.7))
test_eq(C8.dtype, torch.float64)
# the official formula, written out for the pixel (8, 8) and the head (20, 12)
test_close(C8.item(), math.exp(math.hypot(12, 4) / 16 / (0.5 + 0.2 * (8 + 12) / 2 / 16)) - 1, eps=1e-12)
test_fail(lambda: points_cost(xy, head, cost='nope'),
          contains="cost must be one of dist, sqdist, exp, perspective")
# row blocks (a block smaller than one row too) = all rows at once = cdist
g = torch.Generator().manual_seed(0)
px, hd = 512 * torch.rand(3, 50, 2, generator=g), 512 * torch.rand(3, 7, 2, generator=g)
for c in COSTS:
    whole = points_cost(px, hd, c, block=None)
    for blk in (5, 64, 1000): test_close(points_cost(px, hd, c, block=blk), whole, eps=1e-6)
    L = torch.cdist(px / 512, hd / 512)
    test_close(whole, COSTS[c](L, eta=0.6) if c != 'perspective' else
               perspective_cost(L, px[..., 1] / 512, hd[..., 1] / 512), eps=1e-5)
# unbatched
test_close(points_cost(px[0], hd[0], block=16), points_cost(px[:1], hd[:1], block=None)[0], eps=1e-6)
pg = px.clone().requires_grad_()          # autograd: the cdist path, whose gradient is finite at distance 0
points_cost(pg, px.detach()).sum().backward()
assert torch.isfinite(pg.grad).all()


# %% [markdown]
# ## Cost matrices between a density map and its annotations
#
# `cost_matrix` takes the size `(h, w)` of the density map and the padded `(B, M, 2)` point coordinates in
# input pixels, places the pixel centres at $(s(j+\frac12), s(i+\frac12))$ (the official code is 4 px off in
# one place, we use the cell centre everywhere) and returns the `(B, h*w, M)` float32 cost. Padded points get
# finite costs; the solver masks them.

# %%
#| export
def cost_matrix(h:int, # rows of the density map
                w:int, # columns of the density map
                points:torch.Tensor, # `(B, M, 2)` padded `(x, y)` head positions in input pixels
                cost:CostName='perspective', # 'dist', 'sqdist', 'exp' or 'perspective'
                stride:int=8, # input pixels per density pixel
                scale:float=512., # coordinates are divided by this before computing costs
                image_height:float|None=None, # height used to normalize y for `perspective` (default `h*stride`)
                eta:float=0.6, # length scale of the `exp` cost
                eta_range:tuple=(0.6, 0.8), # perspective factor at the top and bottom of the image
                shift:bool=True, # exponential costs are `exp(.)-1`, zero at distance 0
               ) -> torch.Tensor: # `(B, h*w, M)` float32 costs
    "Transport cost between the pixel centres of an `h`×`w` stride-`stride` map and `points`."
    if points.dim() == 2: points = points.unsqueeze(0)
    points = points.float()
    grid = pixel_centres(h, w, stride=stride, device=points.device)  # (n, 2) input pixels
    H = float(image_height) if image_height is not None else float(h * stride)
    return points_cost(grid.expand(points.shape[0], -1, -1), points, cost, scale, H, eta, eta_range, shift)


# %% [markdown]
# Checks against a direct loop over pixels and points, and the zero at distance zero:

# %%
pts = torch.tensor([[[4., 4.], [20., 12.]], [[12., 4.], [0., 0.]]])   # second image: one real point + padding
h, w, s = 2, 3, 8
for name in COSTS:
    C = cost_matrix(h, w, pts, cost=name, stride=s, scale=16.)
    test_eq(C.shape, (2, 6, 2))
    ref = torch.zeros(2, 6, 2)
    for b in range(2):
        for i in range(h):
            for j in range(w):
                px, py = s * (j + .5), s * (i + .5)
                for k in range(2):
                    qx, qy = pts[b, k].tolist()
                    L = math.hypot(px - qx, py - qy) / 16.
                    eta_p = 0.6 + 0.2 * 0.5 * (py / (h * s) + qy / (h * s))
                    ref[b, i * w + j, k] = dict(dist=L, sqdist=L * L, exp=math.exp(L / .6) - 1,
                                                perspective=math.exp(L / eta_p) - 1)[name]
    test_close(C, ref, eps=1e-5)
    test_eq(C[0, 0, 0].item(), 0.)
    test_eq(C[0, 5, 1].item(), 0.)  # heads on pixel centres: zero cost
test_fail(lambda: cost_matrix(2, 2, pts, cost='nope'), contains="got 'nope'")
test_eq(cost_matrix(4, 4, torch.zeros(2, 0, 2)).shape, (2, 16, 0))

# %% [markdown]
# The perspective cost is steeper near the top of the image (far from the camera) than near the bottom, for
# the same displacement; with `image_height` given explicitly the normalization follows it.

# %%
# 8 px right of a head at the top
top = cost_matrix(8, 8, torch.tensor([[[4., 4.]]]), stride=8, scale=64.)[0, 1, 0]
# same at the bottom
bottom = cost_matrix(8, 8, torch.tensor([[[4., 60.]]]), stride=8, scale=64.)[0, 7 * 8 + 1, 0]
assert top > bottom > 0
# eta -> 0.6 everywhere
Cexp = cost_matrix(8, 8, torch.tensor([[[4., 60.]]]), stride=8, scale=64., image_height=1e9)
test_close(Cexp, cost_matrix(8, 8, torch.tensor([[[4., 60.]]]), cost='exp', stride=8, scale=64.), eps=1e-5)


# %% [markdown]
# ## The Bayesian loss's background point
#
# BL+ gives each pixel a background "point" whose squared distance depends on the distance $r$ from the pixel
# to its nearest annotation: $(d-r)^2$ in the BL paper (Eq. 15 of the GL paper, `form='paper'`), $d^2/r^2$ in
# the official BL code (`form='code'`, with $10^{-5}$ added to $r^2$). Both the theory notebook and
# `BayesianLoss` use this one function.

# %%
#| export
BackgroundForm = Literal['paper', 'code']   # BL's background distance: the paper's (Eq. 15) or the official code's


# %%
#| export
def bl_background_cost(r2:torch.Tensor, # squared distance $r^2$ from each pixel to its nearest annotation
                       d:float, # background distance, in the units of $r$
                       form:BackgroundForm='paper' # 'paper': $(d-r)^2$ (Eq. 15); 'code': $d^2/r^2$ (official BL code)
                      ) -> torch.Tensor: # same shape as `r2`
    "Squared distance of BL's background point for each pixel."
    if check_choice(form, BackgroundForm, 'form') == 'paper': return (d - r2.sqrt()).square()
    return d * d / (r2 + 1e-5)


# %%
r2 = torch.tensor([0., 4., 100.])
test_close(bl_background_cost(r2, 6.), torch.tensor([36., 16., 16.]))
test_close(bl_background_cost(r2, 6., 'code'), torch.tensor([36 / 1e-5, 9., 0.36]), eps=1e-4)
test_fail(lambda: bl_background_cost(r2, 6., 'x'), contains="form must be one of paper, code, got 'x'")


# %% [markdown]
# ## A cost function for geomloss
#
# geomloss takes the cost as a function of two batched point clouds. `coordinate_cost` builds one from
# `points_cost` for coordinates already divided by `scale` (the perspective heights are $y/H$ with $H$ the
# image height in input pixels), so that a reference solver solves exactly the problem `GeneralizedLoss`
# solves.

# %%
#| export
def coordinate_cost(cost:CostName='perspective', # 'dist', 'sqdist', 'exp' or 'perspective'
                    scale:float=512., # coordinates were divided by this
                    image_height:float=512., # image height in input pixels (perspective heights are y/H)
                    eta:float=0.6, # length scale of the `exp` cost
                    eta_range:tuple=(0.6, 0.8), # perspective factor at the top and the bottom
                    shift:bool=True, # exponential costs minus 1
                   ) -> Callable: # `cost(x (B,n,2), y (B,m,2)) -> (B,n,m)` on scaled coordinates
    "A geomloss-style batched cost function on scaled coordinates, matching `cost_matrix`."
    check_choice(cost, COSTS, 'cost')
    return partial(points_cost, cost=cost, scale=1., image_height=image_height / scale, eta=eta,
                   eta_range=eta_range, shift=shift)


# %%
pts = torch.tensor([[[10., 500.], [300., 20.], [77., 77.]]])
grid = pixel_centres(8, 8, stride=64)[None]
for name in COSTS:
    test_close(coordinate_cost(name)(grid / 512, pts / 512),
               cost_matrix(8, 8, pts, cost=name, stride=64), eps=1e-5)
cfn = coordinate_cost('perspective')
test_close(cfn(grid / 512, pts / 512), cfn(pts / 512, grid / 512).transpose(1, 2), eps=1e-6)   # symmetric

# %%
#| hide
import nbdev
nbdev.nbdev_export()
