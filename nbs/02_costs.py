# %% [markdown]
# # Transport costs
#
# > Cost matrices $C_{ij}=c(\boldsymbol{x}_i,\boldsymbol{y}_j)$ between the pixel centres of a stride-$s$ density map and head annotations, batched `(B, n, m)`.

# %%
#| default_exp costs

# %%
#| export
from __future__ import annotations
import math
import torch
from uotcrowd.core import pixel_centres

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import numpy as np

# %% [markdown]
# ## Pairwise distances
#
# All costs are functions of the Euclidean distance $L_{ij}=\|\boldsymbol{x}_i-\boldsymbol{y}_j\|_2$ between
# pixel centres $\boldsymbol{x}_i$ and head points $\boldsymbol{y}_j$, both divided by `scale` (512 by default, the
# official crop size) so that $\varepsilon$ and $\tau$ mean the same thing at any crop size.
#
# `torch.cdist` builds the matrix in one call. By default it switches to a matrix-product formula
# ($\|x\|^2+\|y\|^2-2x^\top y$) for large inputs, which in float32 turns an exact zero distance into
# $\approx 10^{-4}$; a cost that must vanish at distance zero needs the direct formula, so we ask for it.

# %%
#| export
def pairwise_distances(x:torch.Tensor, # `(B, n, 2)` or `(n, 2)` first point set
                       y:torch.Tensor, # `(B, m, 2)` or `(m, 2)` second point set
                      ) -> torch.Tensor: # `(B, n, m)` (or `(n, m)`) Euclidean distances
    "Euclidean distances between all pairs of `x` and `y`, exact at zero (no matrix-product shortcut)."
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        return x.new_zeros(*x.shape[:-1], y.shape[-2])
    return torch.cdist(x, y, compute_mode='donot_use_mm_for_euclid_dist')

# %%
x = torch.rand(3, 7, 2); y = torch.rand(3, 5, 2)
naive = ((x[:, :, None] - y[:, None]) ** 2).sum(-1).sqrt()
test_close(pairwise_distances(x, y), naive, eps=1e-6)
test_eq(pairwise_distances(x, x).diagonal(dim1=1, dim2=2), torch.zeros(3, 7))  # exactly zero on the diagonal
test_eq(pairwise_distances(x, torch.zeros(3, 0, 2)).shape, (3, 7, 0))

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
# The paper writes the exponential costs as $e^{L/\eta}$ (Eq. 4). The official code subtracts 1, so that every cost
# is zero at distance zero, and so do we (`shift=True`). This is not cosmetic: with a cost $\ge 1$ everywhere, moving a
# unit of mass costs more than the unbalanced penalty of leaving it untransported, and the loss then prefers a
# uniform density over the exact one (shown in `04_losses`, where a density with one person on each head's pixel
# must score lower than a uniform or a doubled one).
#
# **Perspective factor.** The paper maps the average normalized height
# $\tfrac12(h_{\boldsymbol{x}_i}+h_{\boldsymbol{y}_j})\in[0,1]$ linearly to $\eta\in[0.6, 0.8]$; the official code maps it to $[0.5, 0.7]$ (`s*0.2+0.5`).
# We default to the paper's range and make it configurable (`eta_range=(0.5, 0.7)` reproduces the official code).
# The normalized height of a point is $y$ (in input pixels) divided by the image height, which is `h*stride` for a
# density map of `h` rows unless given explicitly. Rows near the top of the image (far from the camera, small $h$)
# get a small $\eta$, hence a steeper cost that keeps the density of distant, tightly packed people compact.

# %%
#| export
def dist_cost(d:torch.Tensor, **kwargs) -> torch.Tensor:
    "Cost $L$: the (scaled) Euclidean distance itself."
    return d

def sqdist_cost(d:torch.Tensor, **kwargs) -> torch.Tensor:
    "Cost $L^2$: the squared (scaled) Euclidean distance."
    return d * d

def exp_cost(d:torch.Tensor, # scaled distances
             eta:float=0.6, # length scale of the exponential
             shift:bool=True, # subtract 1 so the cost is 0 at distance 0 (official code)
             **kwargs) -> torch.Tensor:
    "Cost $e^{L/\\eta}-1$ (or $e^{L/\\eta}$ with `shift=False`)."
    c = (d / eta).exp_()
    return c.sub_(1) if shift else c

def perspective_eta(height_x:torch.Tensor, # `(B, n)` normalized heights of the pixels, in [0, 1]
                    height_y:torch.Tensor, # `(B, m)` normalized heights of the points, in [0, 1]
                    eta_range:tuple=(0.6, 0.8) # `eta` at height 0 and at height 1
                   ) -> torch.Tensor: # `(B, n, m)`
    "Perspective factor $\\eta(x,y)$: the mean normalized height mapped linearly onto `eta_range`."
    lo, hi = eta_range
    k = 0.5 * (hi - lo)       # lo + (hi - lo) * (hx + hy) / 2, with a single (B, n, m) allocation
    return torch.add((lo + k * height_x).unsqueeze(-1), (k * height_y).unsqueeze(-2))

def perspective_cost(d:torch.Tensor, # `(B, n, m)` scaled distances
                     height_x:torch.Tensor, # `(B, n)` normalized heights of the pixels
                     height_y:torch.Tensor, # `(B, m)` normalized heights of the points
                     eta_range:tuple=(0.6, 0.8), # `eta` at the top and at the bottom of the image
                     shift:bool=True, # subtract 1 so the cost is 0 at distance 0
                     **kwargs) -> torch.Tensor:
    "Perspective-guided cost $e^{L/\\eta(x,y)}-1$ (Eq. 4, shifted as in the official code)."
    c = perspective_eta(height_x, height_y, eta_range)
    c = (d / c).exp_()
    return c.sub_(1) if shift else c

COSTS = dict(dist=dist_cost, sqdist=sqdist_cost, exp=exp_cost, perspective=perspective_cost)

# %%
d = torch.tensor([[[0., 0.3, 1.2]]])
test_eq(dist_cost(d), d); test_close(sqdist_cost(d), d ** 2)
test_close(exp_cost(d, eta=0.6), torch.tensor([[[0., math.exp(0.5) - 1, math.exp(2) - 1]]]))
test_eq(exp_cost(torch.zeros(1)), torch.zeros(1)); test_eq(exp_cost(torch.zeros(1), shift=False), torch.ones(1))
eta = perspective_eta(torch.tensor([[0., 1.]]), torch.tensor([[0., 1.]]))
test_close(eta, torch.tensor([[[0.6, 0.7], [0.7, 0.8]]]))
test_close(perspective_eta(torch.tensor([[0.5]]), torch.tensor([[0.5]]), (0.5, 0.7)), torch.tensor([[[0.6]]]))

# %% [markdown]
# ## Cost matrices between a density map and its annotations
#
# `cost_matrix` takes the size `(h, w)` of the density map and the padded `(B, M, 2)` point coordinates in input
# pixels, places the pixel centres at $(s(j+\frac12), s(i+\frac12))$ (`uotcrowd.core.pixel_centres`; the official code
# is 4 px off in one place, we use the cell centre everywhere) and returns the `(B, h*w, M)` cost. Padded points get
# finite costs; the solver masks them.

# %%
#| export
def cost_matrix(h:int, # rows of the density map
                w:int, # columns of the density map
                points:torch.Tensor, # `(B, M, 2)` padded `(x, y)` head positions in input pixels
                cost:str='perspective', # 'dist', 'sqdist', 'exp' or 'perspective'
                stride:int=8, # input pixels per density pixel
                scale:float=512., # coordinates are divided by this before computing costs
                image_height:float|None=None, # height used to normalize y for `perspective` (default `h*stride`)
                eta:float=0.6, # length scale of the `exp` cost
                eta_range:tuple=(0.6, 0.8), # perspective factor at the top and bottom of the image
                shift:bool=True, # exponential costs are `exp(.)-1`, zero at distance 0
               ) -> torch.Tensor: # `(B, h*w, M)` float32 costs
    "Transport cost between the pixel centres of an `h`×`w` stride-`stride` map and `points`."
    if cost not in COSTS: raise ValueError(f"unknown cost {cost!r}; choose one of {sorted(COSTS)}")
    if points.dim() == 2: points = points.unsqueeze(0)
    points = points.float()
    B = points.shape[0]
    grid = pixel_centres(h, w, stride=stride, device=points.device)  # (n, 2) input pixels
    d = pairwise_distances((grid / scale).unsqueeze(0).expand(B, -1, -1), points / scale)
    if cost == 'perspective':
        H = float(image_height) if image_height is not None else float(h * stride)
        hx = (grid[:, 1] / H).unsqueeze(0).expand(B, -1)
        hy = points[..., 1] / H
        return perspective_cost(d, hx, hy, eta_range=eta_range, shift=shift)
    return COSTS[cost](d, eta=eta, shift=shift)

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
    test_eq(C[0, 0, 0].item(), 0.); test_eq(C[0, 5, 1].item(), 0.)   # heads on pixel centres: zero cost
test_fail(lambda: cost_matrix(2, 2, pts, cost='nope'), contains="'perspective'")
test_eq(cost_matrix(4, 4, torch.zeros(2, 0, 2)).shape, (2, 16, 0))

# %% [markdown]
# The perspective cost is steeper near the top of the image (far from the camera) than near the bottom, for the
# same displacement; with `image_height` given explicitly the normalization follows it.

# %%
top = cost_matrix(8, 8, torch.tensor([[[4., 4.]]]), stride=8, scale=64.)[0, 1, 0]          # 8 px right of a head at the top
bottom = cost_matrix(8, 8, torch.tensor([[[4., 60.]]]), stride=8, scale=64.)[0, 7 * 8 + 1, 0]  # same at the bottom
assert top > bottom > 0
Cexp = cost_matrix(8, 8, torch.tensor([[[4., 60.]]]), stride=8, scale=64., image_height=1e9)  # eta -> 0.6 everywhere
test_close(Cexp, cost_matrix(8, 8, torch.tensor([[[4., 60.]]]), cost='exp', stride=8, scale=64.), eps=1e-5)

# %%
#| hide
import nbdev; nbdev.nbdev_export()
