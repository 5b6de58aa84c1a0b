# %% [markdown]
# # Baseline losses
#
# > The pixel-wise L2 loss with Gaussian density maps, the Bayesian loss (BL, BL+) and DM-Count, all with the `forward(density, points)` contract of the generalized loss.

# %%
#| default_exp baselines

# %%
#| export
from __future__ import annotations
import math
import torch
import torch.nn as nn
from uotcrowd.core import pixel_centres, check_points, check_density, check_choice
from uotcrowd.costs import pairwise_distances, sq_distances, cost_matrix, bl_background_cost, BackgroundForm
from uotcrowd.sinkhorn import plain_sinkhorn
from uotcrowd.plans import uot_plan

# %%
#| hide
import numpy as np
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# All three losses take `density` `(B, 1, h, w)` (per-pixel counts of a stride-$s$ map) and `points`, a list
# of `(N_b, 2)` tensors of `(x, y)` in input pixels, and return a scalar **mean over the batch** of a
# per-image loss. Distances are measured in input pixels between annotations and the pixel centres
# $(s(j+\frac12), s(i+\frac12))$ of `uotcrowd.core.pixel_centres`, by the functions of `uotcrowd.costs` (exact
# at zero), and DM-Count's transport plan comes from the package's solver, `uotcrowd.sinkhorn`.
#
# The [theory notebook](03b_theory.ipynb) shows that the targets of the first two are the marginals of the two
# half-iteration transport plans of the generalized loss under the squared-distance cost, with
# $\varepsilon=2\sigma^2$: the L2 target is the pixel marginal of $\tilde{\mathbf P}$ (one v-update), BL's
# expected counts are the point marginal of $\hat{\mathbf P}$ (one u-update). In the generalized loss,
# coordinates are divided by `scale` (default 512), so a Gaussian of $\sigma$ pixels corresponds to
# $\varepsilon=2\sigma^2/\text{scale}^2$ ($\sigma=8$ px: $\varepsilon\approx4.9\cdot10^{-4}$). We check both
# correspondences numerically at the end.

# %% [markdown]
# ## Gaussian density maps integrated over cells
#
# The classic ground truth places a normalized Gaussian $\mathcal N(\boldsymbol y_j,\sigma_j^2\mathbf I)$ at
# each head. A density pixel of stride $s$ stands for the cell $[sj, s(j+1))\times[si, s(i+1))$, so its target
# is the *integral* of the Gaussians over the cell. The Gaussian is separable, so the integral is a product of
# two one-dimensional masses computed exactly with the CDF $\Phi$:
# $$D_{ij}=\sum_k\Big[\Phi\big(\tfrac{s(i+1)-y_{k}}{\sigma_k}\big)-\Phi\big(\tfrac{si-y_{k}}{\sigma_k}\big)\Big]
#   \Big[\Phi\big(\tfrac{s(j+1)-x_{k}}{\sigma_k}\big)-\Phi\big(\tfrac{sj-x_{k}}{\sigma_k}\big)\Big],$$
# an $(N\times h)^\top(N\times w)$ matrix product: no full-resolution map is rendered. Each head contributes
# exactly the part of its Gaussian that falls inside the image, so the map sums to the count up to the mass
# lost across the border.
#
# **Bandwidth.** `sigma=8` input pixels by default: the same $\sigma$ as BL, so that the L2 and Bayesian
# baselines are the two half-iteration plans of one and the same $\varepsilon=2\sigma^2$. With `adaptive=True`
# each head gets the geometry-adaptive bandwidth of MCNN, $\sigma_k=\beta\,\bar d_k$ with $\bar d_k$ the mean
# distance to its $k=3$ nearest neighbours and $\beta=0.3$ (fewer neighbours when the image has fewer heads,
# the fixed `sigma` for a lone head, and never below `min_sigma`=1 px, which also guards duplicate
# annotations).

# %%
#| export
def _cell_masses(centre:torch.Tensor, # `(N,)` coordinates along one axis
                 sigma:torch.Tensor, # `(N,)` bandwidths
                 n_cells:int, # number of cells along the axis
                 stride:int # cell size in input pixels
                ) -> torch.Tensor: # `(N, n_cells)` mass of each 1-D Gaussian in each cell
    edges = torch.arange(n_cells + 1, device=centre.device, dtype=centre.dtype)*stride
    cdf = 0.5*torch.special.erfc(-(edges[None] - centre[:, None])/(sigma[:, None]*math.sqrt(2)))
    return (cdf[:, 1:] - cdf[:, :-1]).clamp_min(0)


# %%
Phi = lambda z: 0.5*(1 + math.erf(z/math.sqrt(2)))
masses = _cell_masses(torch.tensor([10.]), torch.tensor([2.]), 3, 8)
test_close(masses[0], torch.tensor([Phi(-1) - Phi(-5), Phi(3) - Phi(-1), Phi(7) - Phi(3)]), eps=1e-7)
test_close(masses.sum(), 1., eps=1e-6)   # the Gaussian lies inside the 24 px


# %%
#| export
def adaptive_sigma(points:torch.Tensor, # `(N, 2)` annotations in input pixels
                   k:int=3, # number of nearest neighbours
                   beta:float=0.3, # bandwidth per unit of mean neighbour distance
                   sigma:float=8., # bandwidth of a head without neighbours
                   min_sigma:float=1. # lower bound on the bandwidth
                  ) -> torch.Tensor: # `(N,)` bandwidths in input pixels
    "Geometry-adaptive bandwidths of MCNN: `beta` times the mean distance to the `k` nearest other heads."
    n = len(points)
    if n < 2: return torch.full((n,), float(sigma), device=points.device, dtype=points.dtype)
    dist = pairwise_distances(points, points)
    knn = dist.topk(min(k, n - 1) + 1, dim=1, largest=False).values[:, 1:]  # drop the head itself
    return (beta*knn.mean(1)).clamp_min(min_sigma)


# %%
# adaptive bandwidths against a plain loop over heads
ptsa = torch.tensor([[0., 0.], [3., 4.], [6., 8.], [0., 10.], [20., 0.]])
ref = []
for i in range(5):
    d = sorted(math.dist(ptsa[i].tolist(), ptsa[j].tolist()) for j in range(5) if j != i)
    ref.append(max(0.3*sum(d[:3])/3, 1.))
test_close(adaptive_sigma(ptsa), torch.tensor(ref))
test_close(adaptive_sigma(ptsa[:2]), torch.tensor([1.5, 1.5]))     # one neighbour: 0.3 * 5
test_eq(adaptive_sigma(ptsa[:1], sigma=7.).tolist(), [7.])
test_eq(adaptive_sigma(torch.zeros(2, 2)).tolist(), [1., 1.])      # duplicates: clamped to min_sigma


# %%
#| export
def density_map(points:torch.Tensor, # `(N, 2)` annotations `(x, y)` in input pixels
                h:int, # rows of the density map
                w:int, # columns of the density map
                stride:int=8, # input pixels per density pixel
                sigma:float|torch.Tensor=8., # bandwidth in input pixels: a float or one per head `(N,)`
               ) -> torch.Tensor: # `(h, w)` ground-truth counts per cell
    "Sum of normalized Gaussians at `points`, integrated exactly over each `stride`×`stride` cell."
    points = check_points([points])[0]
    sigma = torch.as_tensor(sigma, device=points.device, dtype=points.dtype).expand(len(points))
    if len(points) == 0: return points.new_zeros(h, w)
    if (sigma <= 0).any(): raise ValueError("sigma must be positive")
    mass_y = _cell_masses(points[:, 1], sigma, h, stride)
    mass_x = _cell_masses(points[:, 0], sigma, w, stride)
    return mass_y.T @ mass_x


# %% [markdown]
# The integral is checked against an independent computation: the Gaussians evaluated on a fine grid of
# sub-pixel samples (midpoint rule, 16×16 samples per input pixel) and summed per cell. A head far from the
# border contributes exactly 1.

# %%
def density_by_sampling(points, h, w, stride, sigma, sub=16):
    "Reference: per-pixel Gaussian sum on a fine grid, summed over each cell (midpoint rule)."
    fine = pixel_centres(h*stride*sub, w*stride*sub, stride=1, dtype=torch.float64)/sub
    out = torch.zeros(h*stride*sub*w*stride*sub, dtype=torch.float64)
    for p, s in zip(points.double(), torch.as_tensor(sigma, dtype=torch.float64).expand(len(points))):
        out += torch.exp(-((fine - p)**2).sum(1)/(2*s*s))/(2*math.pi*s*s)/sub**2
    return out.reshape(h, stride*sub, w, stride*sub).sum((1, 3))

pts = torch.tensor([[20.3, 13.7], [12.0, 30.5], [41.2, 36.0]], dtype=torch.float64)
dm = density_map(pts, 6, 7, stride=8, sigma=3.)
test_eq(dm.shape, (6, 7))
test_close(dm, density_by_sampling(pts, 6, 7, 8, 3.), eps=1e-4)   # midpoint-rule error ~ 2e-5
test_close(dm.sum(), 3., eps=1e-4)                 # all heads at least 4 sigma inside the 56x48 image
test_close(density_map(pts, 12, 14, stride=4, sigma=torch.tensor([2., 3., 4.])),
           density_by_sampling(pts, 12, 14, 4, torch.tensor([2., 3., 4.])), eps=1e-4)
# a head on the border keeps only the part of its Gaussian inside the image
test_close(density_map(torch.tensor([[0., 20.]]), 5, 5, stride=8, sigma=4.).sum(), 0.5, eps=1e-6)
test_eq(density_map(torch.zeros(0, 2), 3, 4).shape, (3, 4))
test_eq(density_map(torch.zeros(0, 2), 3, 4).sum(), 0.)
test_fail(lambda: density_map(pts, 6, 7, sigma=0.), contains='positive')

# %% [markdown]
# ## L2 loss
#
# The pixel-wise loss of Eq. 11: $\sum_i(a_i-\tilde a_i)^2$ over the pixels of each image, averaged over the
# batch (the sum, not the mean over pixels, so its scale does not depend on the map size and matches Eq. 11
# with $\tau=1$).

# %%
#| export
def density_maps(points:list, # B tensors `(N_b, 2)` in input pixels
                 h:int, w:int, # size of the density maps
                 stride:int=8, # input pixels per density pixel
                 sigma:float=8., # fixed bandwidth in input pixels
                 adaptive:bool=False, # use MCNN's geometry-adaptive bandwidths
                 k:int=3, beta:float=0.3, min_sigma:float=1., # adaptive-bandwidth parameters
                 device=None, dtype=torch.float32
                ) -> torch.Tensor: # `(B, 1, h, w)`
    "Ground-truth density maps for a batch of point sets."
    maps = []
    for p in check_points(points):
        p = p.to(device=device, dtype=torch.float64)
        s = adaptive_sigma(p, k, beta, sigma, min_sigma) if adaptive else sigma
        maps.append(density_map(p, h, w, stride, s))
    return torch.stack(maps)[:, None].to(dtype) if maps else torch.zeros(0, 1, h, w, device=device,
                                                                         dtype=dtype)


# %%
pts_m = [torch.tensor([[20., 20.], [40., 44.]]), torch.zeros(0, 2)]
maps = density_maps(pts_m, 8, 8, sigma=4.)
test_eq((maps.shape, maps.dtype), ((2, 1, 8, 8), torch.float32))
test_close(maps[0, 0], density_map(pts_m[0], 8, 8, 8, 4.).float())
test_close(density_maps(pts_m[:1], 8, 8, adaptive=True)[0, 0],
           density_map(pts_m[0], 8, 8, 8, adaptive_sigma(pts_m[0])).float())
test_eq(density_maps([], 3, 4).shape, (0, 1, 3, 4))


# %%
#| export
class L2DensityLoss(nn.Module):
    "Pixel-wise squared error to Gaussian density maps, summed over pixels and averaged over the batch."
    def __init__(self,
                 sigma:float=8., # Gaussian bandwidth in input pixels (the fallback one when `adaptive`)
                 stride:int=8, # input pixels per density pixel
                 adaptive:bool=False, # geometry-adaptive bandwidths (MCNN: beta * mean distance to k neighbours)
                 k:int=3, # neighbours for the adaptive bandwidth
                 beta:float=0.3, # adaptive bandwidth per unit of neighbour distance
                 min_sigma:float=1. # lower bound on adaptive bandwidths
                ):
        super().__init__()
        self.sigma, self.stride, self.adaptive = sigma, stride, adaptive
        self.k, self.beta, self.min_sigma = k, beta, min_sigma

    def target(self, points, h:int, w:int, device=None, dtype=torch.float32) -> torch.Tensor:
        "The `(B, 1, h, w)` ground-truth density maps."
        return density_maps(points, h, w, self.stride, self.sigma, self.adaptive, self.k, self.beta,
                            self.min_sigma, device=device, dtype=dtype)

    def forward(self, density:torch.Tensor, points:list) -> torch.Tensor:
        density = check_density(density)
        B, _, h, w = density.shape
        points = check_points(points, B)
        target = self.target(points, h, w, density.device, density.dtype)
        return (density - target).square().sum((1, 2, 3)).mean()


# %%
l2 = L2DensityLoss(sigma=4.)
pts_b = [torch.tensor([[20., 20.], [40., 44.]]), torch.zeros(0, 2)]
dens = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
target = l2.target(pts_b, 8, 8)
test_close(l2(dens, pts_b), ((dens - target)**2).sum((1, 2, 3)).mean())
test_close(l2(target, pts_b), 0.)
test_close(target[0].sum(), 2., eps=1e-5)
test_eq(target[1].sum(), 0.)
test_close(L2DensityLoss(adaptive=True).target([pts_b[0]], 8, 8)[0, 0],
           density_map(pts_b[0], 8, 8, 8, adaptive_sigma(pts_b[0])), eps=1e-6)
test_fail(lambda: l2(dens, pts_b[:1]), contains='batch of 2')


# %% [markdown]
# ## Bayesian loss
#
# BL [29] computes, for every pixel $i$, the posterior probability that its density belongs to head $j$ under
# Gaussian likelihoods $\mathcal N(\boldsymbol x_i;\boldsymbol y_j,\sigma^2\mathbf I)$ (σ = 8 px) and equal
# priors, $p(j|i)=\mathrm{softmax}_j\big(-\|\boldsymbol x_i-\boldsymbol y_j\|^2/2\sigma^2\big)$, the expected
# count of head $j$, $E_j=\sum_i p(j|i)\,a_i$, and the loss $\sum_j|1-E_j|$ (summed over heads, averaged over
# the batch, as in BL's code).
#
# **Background (BL+).** With `background=True` every pixel also has a background "point" at distance
# $d-r_i$, $r_i$ the distance to its nearest head (Eq. 15 of the GL paper, BL's definition), whose expected
# count $E_0=\sum_i p(0|i)\,a_i$ should be 0; the loss becomes $\sum_j|1-E_j|+|E_0|$. $d$ is `d` (0.15, BL's
# `background_ratio`) times `bg_size`, BL's image size. BL uses the shorter side of the original image (512 px
# or more on its datasets); we default to 512 px, $d=76.8$ px, whatever the crop (`bg_size=None` takes the
# shorter side of the input, $\min(h,w)\cdot s$). $d$ must stay well above $\sigma$: at $r=0$ the background
# point is at distance $d$, and with $d\lesssim 2\sigma$ it is about as likely as the head itself, so no
# density map can give each head an expected count of 1 and the background 0 (on a 64-px input with
# `bg_size=None`, $d=9.6$ px, training a free map on BL+ leaves $E_0\approx2.3$ for 4 heads). `bg_form='code'`
# replaces the squared background distance $(d-r)^2$ by the official BL code's $d^2/r^2$; BL's public training
# script pairs that form with `background_ratio` 1.0 (so `BayesianLoss(background=True, bg_form='code', d=1.)`
# reproduces it for 512-px images), which puts the head/background boundary at $r=\sqrt{d}\approx 23$ px,
# where the paper form with $d=76.8$ px puts it at $r=d/2\approx 38$ px.
#
# **Empty images.** With no heads every pixel is background and the loss is $|\sum_i a_i|$ (as in BL's code).

# %%
#| export
def bl_posteriors(points:torch.Tensor, # `(N, 2)` annotations in input pixels, N >= 1
                  h:int, w:int, # size of the density map
                  stride:int=8, # input pixels per density pixel
                  sigma:float=8., # likelihood bandwidth in input pixels
                  background:bool=False, # add BL+'s background point (last row)
                  d:float=76.8, # background distance in input pixels
                  form:BackgroundForm='paper' # 'paper': squared background distance (d - r)^2; 'code': d^2 / r^2
                 ) -> torch.Tensor: # `(N (+1), h*w)` posterior of each head (and background) per pixel
    "BL's posterior $p(j|i)$ of each head given each pixel (columns sum to 1)."
    centres = pixel_centres(h, w, stride, device=points.device, dtype=points.dtype)
    sqd = sq_distances(points, centres)                              # (N, h*w)
    logits = -sqd/(2*sigma**2)
    if background:
        bg = bl_background_cost(sqd.min(0).values, d, form)
        logits = torch.cat([logits, -bg[None]/(2*sigma**2)], 0)
    return torch.softmax(logits, dim=0)


# %%
p_ = torch.tensor([[4., 4.], [20., 12.]])
post_ = bl_posteriors(p_, 2, 3, stride=8, sigma=8.)
test_eq(post_.shape, (2, 6))
test_close(post_.sum(0), torch.ones(6))
# the pixel (0, 0), centred at (4, 4), is on the first head: a softmax of -r^2 / 2 sigma^2 over the two heads
test_close(post_[:, 0], torch.softmax(-torch.tensor([0., 16.**2 + 8.**2])/128, 0))
test_eq(bl_posteriors(p_, 2, 3, background=True).shape, (3, 6))


# %%
#| export
class BayesianLoss(nn.Module):
    "Bayesian loss (BL) and, with `background=True`, BL+ (Ma et al., ICCV 2019)."
    def __init__(self,
                 sigma:float=8., # Gaussian likelihood bandwidth in input pixels
                 stride:int=8, # input pixels per density pixel
                 background:bool=False, # BL+: add the background point and its zero target
                 d:float=0.15, # background distance as a fraction of `bg_size`
                 bg_size:float|None=512., # BL's image size in pixels (`None`: shorter side of the input)
                 bg_form:BackgroundForm='paper' # 'paper' (Eq. 15) or 'code' (official BL code)
                ):
        super().__init__()
        check_choice(bg_form, BackgroundForm, 'bg_form')
        self.sigma, self.stride, self.background, self.d, self.bg_size, self.bg_form = sigma, stride, background, d, bg_size, bg_form

    def expected_counts(self, density:torch.Tensor, points:list) -> list:
        "Expected count of each head (and last, with BL+, of the background) per image; `None` if empty."
        density = check_density(density)
        B, _, h, w = density.shape
        size = self.bg_size if self.bg_size is not None else min(h, w)*self.stride
        out = []
        for a, p in zip(density[:, 0].flatten(1), check_points(points, B)):
            if len(p) == 0:
                out.append(None)
                continue
            post = bl_posteriors(p.to(a.device, a.dtype), h, w, self.stride, self.sigma, self.background,
                                 self.d*size, self.bg_form)
            out.append(post @ a)
        return out

    def forward(self, density:torch.Tensor, points:list) -> torch.Tensor:
        losses = []
        for a, e in zip(density[:, 0].flatten(1), self.expected_counts(density, points)):
            if e is None:
                losses.append(a.sum().abs())
                continue
            target = torch.ones_like(e)
            if self.background: target[-1] = 0
            losses.append((target - e).abs().sum())
        return torch.stack(losses).mean()


# %% [markdown]
# Expected counts against a naive double loop over pixels and heads, written from the definition:

# %%
def bl_naive(a, pts, h, w, stride, sigma, bg_d=None):
    E = [0.]*(len(pts) + (bg_d is not None))
    for i in range(h):
        for j in range(w):
            x = (stride*(j + .5), stride*(i + .5))
            lik = [math.exp(-((x[0]-p[0])**2 + (x[1]-p[1])**2)/(2*sigma**2)) for p in pts.tolist()]
            if bg_d is not None:
                r = min(math.dist(x, p) for p in pts.tolist())
                lik.append(math.exp(-(bg_d - r)**2/(2*sigma**2)))
            for k in range(len(lik)): E[k] += lik[k]/sum(lik)*a[i, j].item()
    return torch.tensor(E, dtype=torch.float64)

g = torch.Generator().manual_seed(1)
a64 = torch.rand(1, 1, 6, 5, generator=g, dtype=torch.float64)
p64 = torch.tensor([[10., 12.], [25., 30.], [33., 8.]], dtype=torch.float64)
test_close(BayesianLoss().expected_counts(a64, [p64])[0], bl_naive(a64[0, 0], p64, 6, 5, 8, 8.), eps=1e-6)
blp = BayesianLoss(background=True, bg_size=None)                    # d = 0.15 * min(6, 5) * 8 = 6 px
test_close(blp.expected_counts(a64, [p64])[0], bl_naive(a64[0, 0], p64, 6, 5, 8, 8., bg_d=6.), eps=1e-6)
E = BayesianLoss().expected_counts(a64, [p64])[0]
test_close(BayesianLoss()(a64, [p64]), (1 - E).abs().sum())
test_close(E.sum(), a64.sum())                                       # posteriors sum to 1 per pixel
Eb = blp.expected_counts(a64, [p64])[0]
test_close(blp(a64, [p64]), (1 - Eb[:-1]).abs().sum() + Eb[-1].abs())
test_close(BayesianLoss()(a64, [torch.zeros(0, 2)]), a64.sum())
# official-code background form: d^2 / r^2
post = bl_posteriors(p64, 6, 5, background=True, d=6., form='code')
r2 = torch.cdist(p64, pixel_centres(6, 5, dtype=torch.float64)).square().min(0).values
lik = torch.cat([torch.exp(-torch.cdist(p64, pixel_centres(6, 5, dtype=torch.float64)).square()/128),
                 torch.exp(-(36/(r2 + 1e-5))/128)[None]])
test_close(post, lik/lik.sum(0), eps=1e-10)
test_fail(lambda: BayesianLoss(bg_form='other'), contains="bg_form must be one of paper, code, got 'other'")


# %% [markdown]
# ## DM-Count
#
# DM-Count [44] normalizes the prediction, $\hat{\boldsymbol a}=\boldsymbol a/(\sum\boldsymbol a+10^{-6})$,
# and the annotations, $\hat{\boldsymbol b}=\mathbf 1/N$, and sums three terms:
#
# * **counting loss** $|\sum_i a_i-N|$;
# * **OT loss** (weight 0.1): the balanced entropic OT between $\hat{\boldsymbol a}$ on the pixel centres and
#   $\hat{\boldsymbol b}$ on the heads, squared Euclidean cost in input pixels, regularization `reg`=10 (px²),
#   100 Sinkhorn iterations (DM-Count's defaults: `reg=10`, `num_of_iter_in_ot=100`, `norm_cood=0`);
# * **TV loss** (weight 0.01): $N\,\|\hat{\boldsymbol a}-\hat{\boldsymbol b}_{\text{dot}}\|_1$ with
#   $\hat{\boldsymbol b}_{\text{dot}}$ the normalized dot map (heads counted per cell). That is $2N$ times the
#   total variation distance $\frac12\|\cdot\|_1$ of the DM-Count paper; the factor $N$ and the missing
#   $\frac12$ follow DM-Count's training code.
#
# **The OT gradient.** DM-Count does not differentiate through Sinkhorn. With
# $\mathbf P=\mathrm{diag}(\mathbf u)\mathbf K\mathrm{diag}(\mathbf v)$ the dual potential of the density side
# is $\boldsymbol\beta=\varepsilon\log\mathbf v$, the gradient of the entropic OT cost w.r.t.
# $\hat{\boldsymbol a}$ (up to a constant, which the normalization removes). By the chain rule through
# $\hat a_i=a_i/S$, $S=\sum a$:
# $$\frac{\partial\,\mathrm{OT}}{\partial a_i}=\frac{\beta_i}{S}-\frac{\langle\boldsymbol a,\boldsymbol\beta\rangle}{S^2}
#   =\frac{1}{S}\big(\beta_i-\langle\hat{\boldsymbol a},\boldsymbol\beta\rangle\big),$$
# the potential *centred* under $\hat{\boldsymbol a}$ and divided by the count (DM-Count adds $10^{-8}$ to
# $S^2$). We implement it with the surrogate trick: `value + (a*g).sum() - (a*g).sum().detach()` with `g`
# detached has the value of the OT cost and the gradient `g`. The value we report is the transport cost
# $\langle\mathbf C,\mathbf P\rangle$ of the Sinkhorn plan, in px² (DM-Count logs it as `wd`; the surrogate
# value it adds to its loss is 0 by construction).
#
# **Solver.** `uotcrowd.sinkhorn.plain_sinkhorn` in its balanced form (`tau=None`) with the entropy of Eq.
# 5-6, `reg` in squared units of `coord_scale`-divided pixels: exactly `n_iter` pairs of updates in DM-Count's
# order, density side first, from DM-Count's start $\mathbf u=\mathbf 1/N$, so the potentials are DM-Count's.
# The solver's log-sum-exp clamps exponents at −80 after subtracting the maximum (each clamped term is then
# counted as $e^{-80}$ instead of less: a relative change below $10^{-30}$), because torch's CPU `exp` is many
# times slower on arguments that underflow, and at `reg`=10 px² almost all do. DM-Count's own solver
# multiplies kernels $e^{-C/10}$ in float32, which underflow beyond ≈30 px from every head; it then floors
# $\mathbf K^\top\mathbf u$ at $10^{-16}$, which caps the potential of far pixels, where the log domain keeps
# the exact values. Masses are floored at $10^{-16}$ inside the logarithm, as DM-Count floors $\mathbf v$.
# DM-Count sums its OT term over the batch and averages the others; here every term is averaged over the batch
# (multiply `w_ot` by the batch size to match).

# %%
#| export
def dmcount_ot(mu:torch.Tensor, # `(n,)` density-side weights (sum 1)
               nu:torch.Tensor, # `(m,)` point-side weights (sum 1)
               cost:torch.Tensor, # `(n, m)` cost
               reg:float, # entropic regularization, in units of `cost`
               n_iter:int=100, # Sinkhorn iterations (pairs of updates)
               floor:float=1e-16 # masses are floored at this value
              ) -> tuple: # `(beta (n,), alpha (m,), plan (n, m))`, plan = exp((beta_i + alpha_j - C_ij)/reg)
    "DM-Count's balanced entropic OT, solved by `uotcrowd.sinkhorn`: the two potentials and the plan."
    mu, nu = mu.clamp_min(floor), nu.clamp_min(floor)
    start = torch.full_like(nu, -reg*math.log(len(nu)))                 # u = 1/m, as DM-Count starts
    pot = plain_sinkhorn(mu, nu, cost, reg, n_iter, g=start)
    return pot.f[0], pot.g[0], uot_plan(mu, nu, cost, reg, None, grad='none', potentials=pot)


# %% [markdown]
# The solver against POT: with enough iterations the transport cost equals `ot.sinkhorn2` (which returns
# $\langle\mathbf C,\mathbf P\rangle$), and as the regularization goes to 0 it approaches the exact OT cost
# `ot.emd2`.

# %%
import ot

# %%
g = torch.Generator().manual_seed(2)
xs, ys = torch.rand(25, 2, generator=g, dtype=torch.float64), torch.rand(4, 2, generator=g,
                                                                         dtype=torch.float64)
mu = torch.rand(25, generator=g, dtype=torch.float64)
mu /= mu.sum()
nu = torch.full((4,), 0.25, dtype=torch.float64)
C = torch.cdist(xs, ys).square()
for reg in [0.5, 0.1, 0.02]:
    beta, alpha, P = dmcount_ot(mu, nu, C, reg, n_iter=3000)
    test_close(P.sum(0), nu, eps=1e-10)
    test_close(P.sum(1), mu, eps=1e-8)
    ref = ot.sinkhorn2(mu.numpy(), nu.numpy(), C.numpy(), reg, method='sinkhorn_log', numItermax=20000,
                       stopThr=1e-13)
    test_close((C*P).sum().item(), float(ref), eps=1e-8)
    # the potentials are POT's log-scalings times reg (POT starts from u = 1; potentials agree up to a shift)
    _, log = ot.sinkhorn(mu.numpy(), nu.numpy(), C.numpy(), reg, method='sinkhorn_log', numItermax=20000,
                         stopThr=1e-13, log=True)
    shift = (beta - reg*torch.from_numpy(log['log_u'])).mean()
    test_close(beta - shift, reg*torch.from_numpy(log['log_u']), eps=1e-6)
# DM-Count's order and start, written with kernels (no underflow at this reg): v = b/K^T u, u = a/K v from
# u = 1/m; the potentials agree after any number of iterations, converged or not
K = torch.exp(-C/0.2)
u = torch.full((4,), 0.25, dtype=torch.float64)
for _ in range(7):
    v = mu/(K@u)
    u = nu/(K.T@v)
beta, alpha, P = dmcount_ot(mu, nu, C, 0.2, n_iter=7)
test_close(beta, 0.2*v.log(), eps=1e-10)
test_close(alpha, 0.2*u.log(), eps=1e-10)
test_close(P, v[:, None]*K*u[None], eps=1e-12)
emd = ot.emd2(mu.numpy(), nu.numpy(), C.numpy())
gaps = [(C*dmcount_ot(mu, nu, C, reg, n_iter=20000)[2]).sum().item() - emd for reg in [0.1, 0.01, 0.001]]
print('OT_reg - emd for reg = 0.1, 0.01, 0.001:', np.round(gaps, 6))
assert gaps[0] > gaps[1] > gaps[2] >= -1e-9 and gaps[2] < 1e-3

# %%
#| export
def dot_map(points:torch.Tensor, # `(N, 2)` in input pixels
            h:int, w:int, stride:int=8) -> torch.Tensor:
    "Number of heads per cell of a stride-`stride` map (heads outside go to the nearest border cell)."
    m = points.new_zeros(h*w)
    if len(points) == 0: return m.reshape(h, w)
    j = (points[:, 0]/stride).floor().long().clamp(0, w - 1)
    i = (points[:, 1]/stride).floor().long().clamp(0, h - 1)
    return m.index_add_(0, i*w + j, torch.ones_like(points[:, 0])).reshape(h, w)


# %%
dots = dot_map(torch.tensor([[20., 12.], [40., 50.], [41., 52.], [-3., 70.]]), 8, 8)
test_eq((dots[1, 2], dots[6, 5], dots[7, 0], dots.sum()), (1., 2., 1., 4.))   # the last head is clamped in
test_eq(dot_map(torch.zeros(0, 2), 2, 3), torch.zeros(2, 3))


# %%
#| export
class DMCountLoss(nn.Module):
    "DM-Count (Wang et al., NeurIPS 2020): counting loss + `w_ot` * balanced OT loss + `w_tv` * TV loss."
    def __init__(self,
                 stride:int=8, # input pixels per density pixel
                 reg:float=10., # Sinkhorn regularization in (pixels / coord_scale)^2
                 n_iter:int=100, # Sinkhorn iterations
                 w_ot:float=0.1, # weight of the OT loss
                 w_tv:float=0.01, # weight of the TV loss
                 w_count:float=1., # weight of the counting loss
                 coord_scale:float=1. # coordinates are divided by this before the cost (1: pixels, as DM-Count)
                ):
        super().__init__()
        self.stride, self.reg, self.n_iter, self.w_ot, self.w_tv, self.w_count, self.coord_scale = \
            stride, reg, n_iter, w_ot, w_tv, w_count, coord_scale

    def ot_gradient(self, a:torch.Tensor, points:torch.Tensor, h:int, w:int) -> tuple:
        "OT transport cost and DM-Count's gradient `(wd, grad (n,))` of one flat density `a`, no autograd."
        with torch.no_grad():
            a = a.detach().float()
            S = a.sum()
            cost = cost_matrix(h, w, points.to(a.device)[None], 'sqdist', self.stride, self.coord_scale)[0]
            nu = torch.full((len(points),), 1/len(points), device=a.device)
            beta, _, plan = dmcount_ot(a/(S + 1e-6), nu, cost, self.reg, self.n_iter)
            grad = (S*beta - (a*beta).sum())/(S*S + 1e-8)
            return (cost*plan).sum(), grad

    def forward(self, density:torch.Tensor, points:list, return_terms:bool=False):
        density = check_density(density)
        B, _, h, w = density.shape
        points = check_points(points, B)
        terms = {'count': [], 'ot': [], 'tv': []}
        for a, p in zip(density[:, 0].flatten(1), points):
            n, S = len(p), a.sum()
            terms['count'].append((S - n).abs())
            if n == 0:
                terms['ot'].append(0*S)
                terms['tv'].append(0*S)
                continue
            a_hat = a/(S + 1e-6)
            b_hat = dot_map(p.to(a.device, a.dtype), h, w, self.stride).flatten()/n
            terms['tv'].append(n*(a_hat - b_hat).abs().sum())
            wd, grad = self.ot_gradient(a, p, h, w)
            surrogate = (a*grad.to(a.dtype)).sum()
            terms['ot'].append(wd.to(a.dtype) + surrogate - surrogate.detach())
        terms = {k: torch.stack(v).mean() for k, v in terms.items()}
        loss = self.w_count*terms['count'] + self.w_ot*terms['ot'] + self.w_tv*terms['tv']
        return (loss, terms) if return_terms else loss


# %% [markdown]
# The gradient: the surrogate's autograd gradient equals DM-Count's formula, and it is the derivative of the
# entropic OT cost along directions that change $\hat{\boldsymbol a}$ (a finite difference of
# $\mathrm{OT}_\varepsilon(\hat{\boldsymbol a})=\langle\mathbf C,\mathbf P\rangle-\varepsilon H(\mathbf P)$,
# solved to convergence); a uniform rescaling of $\boldsymbol a$ leaves $\hat{\boldsymbol a}$ unchanged and
# gets zero gradient.

# %%
dmc = DMCountLoss(stride=4, reg=20., n_iter=2000, w_count=0., w_tv=0., w_ot=1.)
pts1 = torch.tensor([[3., 5.], [13., 10.], [7., 14.]])
a0 = (torch.rand(1, 1, 4, 4, generator=g) + 0.1).requires_grad_()
dmc(a0, [pts1]).backward()
wd, grad = dmc.ot_gradient(a0.detach().flatten(), pts1, 4, 4)
test_close(a0.grad.flatten(), grad, eps=1e-6)
test_close((a0.grad.flatten()*a0.detach().flatten()).sum(), 0., eps=1e-5)   # scale invariance

def ot_eps(a):
    "Entropic OT cost of the normalized density, solved to convergence in float64."
    c = torch.cdist(pixel_centres(4, 4, 4, dtype=torch.float64), pts1.double()).square()
    mu_ = a.double()/a.double().sum()
    P = dmcount_ot(mu_, torch.full((3,), 1/3, dtype=torch.float64), c, 20., 5000)[2]
    return ((c*P).sum() + 20.*torch.special.xlogy(P, P).sum()).item()
direction = torch.randn(16, generator=g)*0.01
fd = (ot_eps(a0.detach().flatten() + direction) - ot_eps(a0.detach().flatten() - direction))/2
test_close(fd, (grad*direction).sum().item(), eps=2e-3*abs(fd) + 1e-6)

# %% [markdown]
# Counting and TV terms against direct formulas, and the default DM-Count settings on a realistic size:

# %%
dm_loss = DMCountLoss()
pts_b = [torch.tensor([[20., 12.], [40., 50.], [41., 52.]]), torch.tensor([[5., 5.]])]
dens = torch.rand(2, 1, 8, 8, generator=g)
val, terms = dm_loss(dens, pts_b, return_terms=True)
test_close(terms['count'], ((dens.sum((1, 2, 3)) - torch.tensor([3., 1.])).abs()).mean())
dot0 = torch.zeros(8, 8)
dot0[1, 2] = 1
dot0[6, 5] = 2
dot1 = torch.zeros(8, 8)
dot1[0, 0] = 1
tv_ref = (3*(dens[0, 0]/(dens[0].sum() + 1e-6) - dot0/3).abs().sum()
          + (dens[1, 0]/(dens[1].sum() + 1e-6) - dot1).abs().sum())/2
test_close(terms['tv'], tv_ref)
test_close(val, terms['count'] + 0.1*terms['ot'] + 0.01*terms['tv'])
assert terms['ot'] > 0

# %% [markdown]
# ## Degenerate inputs and batching
#
# Every loss has a finite value and gradient for images without heads and for all-zero predictions, and a
# batch gives the mean of the per-image losses.

# %%
losses = {'l2': L2DensityLoss(), 'l2-adaptive': L2DensityLoss(adaptive=True), 'bl': BayesianLoss(),
          'bl+': BayesianLoss(background=True), 'bl+code': BayesianLoss(background=True, bg_form='code'),
          'dmcount': DMCountLoss()}
pts_b = [torch.tensor([[20., 12.], [40., 50.], [41., 52.]]), torch.zeros(0, 2), torch.tensor([[60., 5.]])]
for name, loss in losses.items():
    for init in [torch.rand(3, 1, 8, 8, generator=g), torch.zeros(3, 1, 8, 8)]:
        dens = init.clone().requires_grad_()
        val = loss(dens, pts_b)
        val.backward()
        assert torch.isfinite(val) and torch.isfinite(dens.grad).all(), name
        per_image = torch.stack([loss(dens[k:k+1], pts_b[k:k+1]) for k in range(3)]).mean()
        test_close(val, per_image, eps=1e-6*max(1., abs(per_image.item())))   # float32 sums in another order
    dens = torch.zeros(1, 1, 8, 8, requires_grad=True)
    val = loss(dens, [torch.zeros(0, 2)])
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(dens.grad).all(), name
    test_close(val, 0.)

# %% [markdown]
# ## The baselines as half-iteration plans of the generalized loss
#
# Finally we check the claims of Sec. 4 on the losses themselves, using the half-iteration plans of the
# [theory notebook](03b_theory.ipynb) with the squared-distance cost and $\varepsilon=2\sigma^2$ (pixel units
# here):
#
# * the L2 target on a fine stride-1 grid equals the pixel marginal $\tilde{\mathbf P}\mathbf 1$ for heads
#   away from the border. The two differ only by discretization: $\tilde{\mathbf P}$ samples the Gaussian at
#   pixel centres and normalizes over the grid, the L2 target averages it over each pixel (a box of variance
#   $\frac1{12}$ per axis), which lowers the peak by a factor $\approx 1-\frac{1}{12\sigma^2}$: a difference
#   of at most $\frac{1}{12\sigma^2}$ of the peak, 0.5 % at σ = 4 px, 0.13 % at σ = 8 px;
# * BL's expected counts equal the point marginal $\hat{\mathbf P}^\top\mathbf 1$ exactly, at any stride.

# %%
from uotcrowd.theory import gaussian_density_from_plan, bl_expected_counts_from_plan

# %%
sigma = 4.
h = w = 48  # heads at least 4 sigma from the border
pts_f = torch.tensor([[18.3, 17.8], [30.5, 31.2], [31.1, 17.6]], dtype=torch.float64)
target = density_map(pts_f, h, w, stride=1, sigma=sigma).flatten()
ptilde = gaussian_density_from_plan(pts_f, pixel_centres(h, w, stride=1, dtype=torch.float64), eps=2*sigma**2)
rel = ((target - ptilde).abs().max()/target.max()).item()
print(f'max |L2 target - P~ 1| / max = {rel:.2e}')
assert rel < 1/(12*sigma**2)
test_close(target.sum(), ptilde.sum(), eps=1e-4)
dens = torch.rand(1, 1, 10, 10, generator=g, dtype=torch.float64)
pts_s = torch.tensor([[14., 30.], [50., 51.], [70., 12.]], dtype=torch.float64)
E = BayesianLoss(sigma=8.).expected_counts(dens, [pts_s])[0]
phat = bl_expected_counts_from_plan(dens.flatten(), pts_s, pixel_centres(10, 10, 8, dtype=torch.float64),
                                    eps=2*8.**2)
test_close(E, phat, eps=1e-6)
print('max |BL expected count - P^T 1| =', f'{(E - phat).abs().max().item():.1e}')

# %%
#| hide
import nbdev
nbdev.nbdev_export()
