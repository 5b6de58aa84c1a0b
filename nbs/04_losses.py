# %% [markdown]
# # Losses
#
# > The generalized loss of the paper (`GeneralizedLoss`, Eq. 1): its terms from the batched solver's plan, the paper's gradient, and the official trainer's objective as a preset.

# %%
#| default_exp losses

# %%
#| export
from __future__ import annotations
import math
from dataclasses import dataclass
from typing import Literal
import torch
from fastcore.basics import patch
from torch import nn
from uotcrowd.core import check_points, pad_points, check_density, check_choice, literal_values
from uotcrowd.costs import COSTS, CostName, pixel_positions, points_cost
from uotcrowd.kernels import no_autocast
from uotcrowd.sinkhorn import uot_potentials, max_diameter, Potentials
from uotcrowd.plans import plan_stats, generalized_kl

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.core import pixel_centres
from uotcrowd.costs import cost_matrix
from uotcrowd.plans import uot_plan, uot_value
import time

# %% [markdown]
# ## The generalized loss
#
# For a predicted density $\boldsymbol a$ (the `(h, w)` map flattened row-major) and head points
# $\boldsymbol b=\mathbf 1_m$, the loss (Eq. 1) is
# $$\mathcal L(\boldsymbol a,\boldsymbol b)=\langle\mathbf C,\mathbf P\rangle-\varepsilon H(\mathbf P)+\tau D_1(\mathbf P\mathbf 1_m|\boldsymbol a)+\tau D_2(\mathbf P^\top\mathbf 1_n|\boldsymbol b),$$
# with $H(\mathbf P)=-\sum P_{ij}\log P_{ij}$, $D_1$ the squared L2 norm (Eq. 2, pixel-wise) and $D_2$ the L1
# norm (Eq. 3, point-wise) by default, each selectable among `'l2'`, `'l1'` and `'kl'` for the paper's
# ablation. The plan $\mathbf P$ is the solution of the same problem with both divergences replaced by KL
# (Sec. 3.3), computed by `uotcrowd.sinkhorn`; the gradient is the paper's (iterations without autograd,
# $\boldsymbol v^*$ fixed, $\boldsymbol u^*(\boldsymbol a)$ differentiable).
#
# Because the plan factors as $P_{ij}=r_i(\boldsymbol a)E_{ij}$ with only the row factor $r$ depending on
# $\boldsymbol a$ (`uotcrowd.plans.plan_factors`), every term is a function of $r$ and a few row/column
# statistics of the constant $\mathbf E$: $\mathbf P\mathbf 1=r\odot\mathbf E\mathbf 1$,
# $\mathbf P^\top\mathbf 1=\mathbf E^\top r$,
# $\langle\mathbf C,\mathbf P\rangle=\sum_i r_i\sum_j C_{ij}E_{ij}$,
# $\sum P\log P=\sum_i r_i\log r_i\,(\mathbf E\mathbf 1)_i+\sum_i r_i\sum_j E_{ij}\log E_{ij}$.
# `uotcrowd.plans.plan_stats` computes these reductions in one pass over the cost without storing
# $\mathbf E$ (its backward recomputes it block by block), so the autograd graph holds nothing bigger than the
# cost, whatever the number of Sinkhorn iterations.
#
# ### Where the paper and the official code differ, and what we chose
#
# | | paper | official code | default here |
# |---|---|---|---|
# | $\varepsilon$ | 0.005 (text) | `blur=0.01`, $p=1$ ⇒ 0.01 | **0.01**: the published numbers come from the code, and the geomloss-equality test needs it |
# | $\eta$ range of the perspective cost | [0.6, 0.8] | `0.2*h+0.5` ⇒ [0.5, 0.7], $h$ = mean of $y$/crop size | **[0.6, 0.8]**, $h=y/$(map height × stride); `eta_range=(0.5, 0.7)`, `image_height=` crop give the code's |
# | cost | $e^{L/\eta}$ (Eq. 4) | $e^{L/\eta}-1$ | **shifted** ($-1$): unshifted, the loss prefers a uniform density (test below) |
# | weight of $D_1,D_2$ | $\tau$ (the same as in the KL used to solve) | `tau=0.1` on the terms, `reach=0.5` to solve | **`tau=0.1`** on the terms, **`tau_solve=0.5`** for the KL solve |
# | entropy term | $-\varepsilon H(\mathbf P)$ (a sum) | `blur * mean(P log P)` (a mean over $n m$ entries, summed over the batch; negligible) | **the paper's sum**; `entropy='mean'` gives the code's |
# | transport term | $\langle\mathbf C,\mathbf P\rangle$ | geomloss's dual value (gradient $\varphi(\boldsymbol f)$, see below) | **$\langle\mathbf C,\mathbf P\rangle$** (the paper's); `transport='dual'` gives the code's |
# | pixel term target | $\mathbf P\mathbf 1$ (a function of $\boldsymbol a$) | `P.sum(2).detach()` | `grad='paper'` differentiates it; `grad='official'` detaches it |
# | entropic reference | $\mathbf 1$ (Eq. 5-6) | $\boldsymbol a\otimes\boldsymbol b$ (geomloss) | **$\boldsymbol a\otimes\boldsymbol b$** (`reference='product'`), so plans equal the official ones; `'uniform'` gives Eq. 6 literally |
# | solver | Eq. 6 to convergence | 12 annealed symmetric geomloss steps | **`mode='official'`** (speed; the code's numbers); `mode='converged'` iterates to `tol` |
# | image with no points | (undefined) | $|\sum\boldsymbol a|/B$ in each of transport, pixel and point: $1.2\,|\sum\boldsymbol a|/B$ in the total | **the pixel term alone**, $\tau D_1(\mathbf 0|\boldsymbol a)$; `empty='official'` gives the code's |
# | pixel positions | - | $8j+8$ (the trainer's grid, $s(j+1)$) | cell centres $s(j+\frac12)$; `grid_offset=1.0` gives the code's |
#
# With the product reference the $u$-half-step does not depend on $\boldsymbol a$, so the plan is linear in
# the density and the paper's gradient of the plan equals the official one; the two `grad` settings then
# differ only in the pixel term.
#
# `GeneralizedLoss.official()` (registry name `'gl-official'`) sets every column to the official code's, so
# that it reproduces the objective the published models were trained with, value and gradient (section *The
# official objective* below, where the paper's, the official and the converged objectives are compared).

# %%
#| export
Term = Literal['transport', 'entropy', 'pixel', 'point']   # the terms of Eq. 1
Divergence = Literal['l2', 'l1', 'kl']   # D1 and D2: squared L2, L1 or generalized KL
TERMS, DIVERGENCES = literal_values(Term), literal_values(Divergence)


# %%
#| export
def divergence(p:torch.Tensor, # `(B, k)` reconstructed marginal
               q:torch.Tensor, # `(B, k)` reference marginal
               kind:Divergence='l2', # 'l2' (squared L2), 'l1' or 'kl' (generalized KL)
               mask:torch.Tensor|None=None # `(B, k)` bool, entries that count
              ) -> torch.Tensor: # `(B,)`
    "Per-image divergence $D(p|q)$ summed over entries."
    if check_choice(kind, Divergence, 'kind') == 'l2': d = (p - q) ** 2
    elif kind == 'l1': d = (p - q).abs()
    else:
        tiny = 1e-20      # keeps the gradient finite where p = 0
        d = generalized_kl(p + tiny, q + tiny)
    if mask is not None: d = d * mask
    return d.sum(-1)


# %%
p, q = torch.tensor([[1., 2., 0.]]), torch.tensor([[0.5, 2., 1.]])
test_close(divergence(p, q, 'l2'), torch.tensor([1.25]))
test_close(divergence(p, q, 'l1'), torch.tensor([1.5]))
test_close(divergence(p, q, 'kl'), torch.tensor([math.log(2) - 0.5 + 1.]), eps=1e-6)
test_close(divergence(p, q, 'l1', mask=torch.tensor([[True, True, False]])), torch.tensor([0.5]))
test_fail(lambda: divergence(p, q, 'tv'), contains="kind must be one of l2, l1, kl, got 'tv'")


# %% [markdown]
# ### The transport value of geomloss, from our potentials
#
# The official trainer does not use $\langle\mathbf C,\mathbf P\rangle$ as its transport term but geomloss's
# *value* of the unbalanced entropic problem (`debias=False`), a dual formula in the potentials
# $(\boldsymbol f,\boldsymbol g)$ of the last (extrapolation) step: with $\rho$ = `tau_solve` (geomloss's
# `reach**p`),
# $$\mathrm{OT}_{\varepsilon,\rho}(\boldsymbol a,\boldsymbol b)\approx\langle\boldsymbol a,\varphi(\boldsymbol f)\rangle+\langle\boldsymbol b,\varphi(\boldsymbol g)\rangle,
#   \qquad\varphi(x)=\big(\rho+\tfrac\varepsilon2\big)\big(1-e^{-x/\rho}\big).$$
# geomloss differentiates it with the potentials held at their last update (the last extrapolation is computed
# from detached log-weights), so its gradient with respect to the density is exactly $\varphi(\boldsymbol f)$:
# the value is linear in $\boldsymbol a$ once the potentials are fixed, which is how we compute it. One
# deviation: where the density vanishes around a head, $f\to-\infty$ and geomloss returns NaN
# ($0\cdot(-\infty)$, the whole official loss then is NaN); we clamp the exponent $-f/\rho$ at 40, as
# `plan_factors` clamps the plan's, so values and gradients stay finite.
#
# **Check (closed form).** At the fixed point $\mathbf P\mathbf 1=\boldsymbol a e^{-\boldsymbol f/\rho}$ and
# $\mathbf P^\top\mathbf 1=\boldsymbol b e^{-\boldsymbol g/\rho}$, and the true dual objective
# $\rho\langle\boldsymbol a,1-e^{-f/\rho}\rangle+\rho\langle\boldsymbol b,1-e^{-g/\rho}\rangle-\varepsilon\langle\boldsymbol a\otimes\boldsymbol b,e^{(f\oplus g-C)/\varepsilon}-1\rangle$
# equals the primal optimum (`uot_value`). Substituting
# $\sum\mathbf P=\tfrac12(\langle\boldsymbol a,e^{-f/\rho}\rangle+\langle\boldsymbol b,e^{-g/\rho}\rangle)$
# gives
# $\langle\boldsymbol a,\varphi(f)\rangle+\langle\boldsymbol b,\varphi(g)\rangle=\mathrm{primal}+\tfrac\varepsilon2(m_a+m_b)-\varepsilon m_am_b$
# with $m_a=\sum\boldsymbol a$, $m_b=\sum\boldsymbol b$; we check that identity on converged float64
# potentials. The check against geomloss itself (value and gradient) is in `tests/test_official_loss.py`.

# %%
#| export
def unbalanced_dual_value(a:torch.Tensor, # `(B, n)` source masses (may require grad)
                          b:torch.Tensor, # `(B, m)` target masses, 0 on padding
                          f:torch.Tensor, # `(B, n)` potential of the sources (held fixed)
                          g:torch.Tensor, # `(B, m)` potential of the targets (held fixed)
                          eps:float, # entropic temperature
                          tau:float # strength ρ of the KL marginal penalties (geomloss `reach**p`)
                         ) -> torch.Tensor: # `(B,)`
    "geomloss's `debias=False` unbalanced value $\\langle a,\\varphi(f)\\rangle+\\langle b,\\varphi(g)\\rangle$."
    # see the note above
    phi = lambda x: (tau + eps / 2) * -torch.expm1((-x.detach().to(a.dtype) / tau).clamp(max=40.))
    # padded g may be huge
    bg = torch.where(b > 0, b.to(a.dtype) * phi(g), torch.zeros_like(g, dtype=a.dtype))
    return (a * phi(f)).sum(-1) + bg.sum(-1)


# %%
g_ = torch.Generator().manual_seed(11)
a_ = torch.rand(2, 30, generator=g_, dtype=torch.float64) * 0.2
b_ = torch.ones(2, 5, dtype=torch.float64)
C_ = torch.rand(2, 30, 5, generator=g_, dtype=torch.float64)
pot_ = uot_potentials(a_, b_, C_, 0.05, 0.5, mode='converged', tol=1e-13, max_iter=100000)
primal = uot_value(a_, b_, C_, 0.05, 0.5, potentials=pot_, grad='none')
ma, mb = a_.sum(1), b_.sum(1)
test_close(unbalanced_dual_value(a_, b_, pot_.f, pot_.g, 0.05, 0.5),
           primal + 0.05 / 2 * (ma + mb) - 0.05 * ma * mb, eps=1e-10)
aa = a_.clone().requires_grad_()     # gradient: phi(f), the potentials held fixed
unbalanced_dual_value(aa, b_, pot_.f, pot_.g, 0.05, 0.5).sum().backward()
test_close(aa.grad, (0.5 + 0.025) * (1 - torch.exp(-pot_.f / 0.5)), eps=1e-12)


# %%
#| export
@dataclass
class Transport:
    "The generalized loss's problems of a batch: masses, positions, cost and, once solved, potentials."
    a: torch.Tensor # `(B, n)` density (differentiable)
    b: torch.Tensor # `(B, m)` 1 per real head, 0 on padding
    C: torch.Tensor # `(B, n, m)` cost
    mask: torch.Tensor # `(B, m)` bool, real heads
    x: torch.Tensor # `(n, 2)` pixel positions in input pixels
    y: torch.Tensor # `(B, m, 2)` padded head positions in input pixels
    image_height: float # perspective heights are y / image_height
    pot: Potentials|None = None # potentials, set by `GeneralizedLoss.solve`


# %%
t_ = Transport(torch.ones(1, 4), torch.ones(1, 2), torch.zeros(1, 4, 2), torch.ones(1, 2, dtype=torch.bool),
               torch.zeros(4, 2), torch.zeros(1, 2, 2), 16.)
test_eq((t_.pot, t_.image_height), (None, 16.))

# %% [markdown]
# ## The loss module
#
# `GeneralizedLoss` holds the settings of the table above; its methods, each with its check below it, build
# the batch's transport problems (`problem`), solve them (`solve`), form the terms from the solved problems
# (`terms_from`) and average them over the batch (`forward`). The values its string settings allow are
# declared once, as `Literal` aliases on its signature:

# %%
#| export
SolverMode = Literal['official', 'converged']   # the annealed schedule of the official code, or run to tolerance
GradRecipe = Literal['paper', 'official']       # the paper's gradient or the official code's
Reference = Literal['product', 'uniform']       # entropic reference of the solve
TransportTerm = Literal['primal', 'dual']       # <C,P> (Eq. 1) or geomloss's dual value
EntropyForm = Literal['sum', 'mean']            # the entropy term summed (Eq. 1) or averaged (official)
EmptyImage = Literal['pixel', 'official']       # the loss of an image without heads


# %%
#| export
class GeneralizedLoss(nn.Module):
    "The generalized UOT loss of Wan, Liu & Chan (CVPR 2021), Eq. 1, batched; `forward(density, points)`."
    def __init__(self,
                 cost:CostName='perspective', # transport cost: 'perspective', 'exp', 'dist' or 'sqdist' (`uotcrowd.costs`)
                 eps:float=0.01, # entropic regularization ε (official blur 0.01; the paper's text says 0.005)
                 tau:float=0.1, # weight of the pixel and point terms D1, D2 in the loss
                 tau_solve:float=0.5, # strength of the KL marginal penalties used to solve for the plan (geomloss reach)
                 scale:float=512., # coordinates are divided by this before computing costs
                 stride:int=8, # input pixels per density pixel
                 d_pixel:Divergence='l2', # D1: 'l2' (squared, Eq. 2), 'l1' or 'kl'
                 d_point:Divergence='l1', # D2: 'l1' (Eq. 3), 'l2' or 'kl'
                 terms:tuple=TERMS, # which terms enter the total (Table 2 ablation)
                 mode:SolverMode='official', # solver: 'official' (12 annealed pairs) or 'converged'
                 grad:GradRecipe='paper', # 'paper' (v* fixed, u*(a)) or 'official' (density factor only, P1 detached in D1)
                 reference:Reference='product', # entropic reference of the solve: 'product' (geomloss) or 'uniform' (Eq. 6)
                 eta:float=0.6, # length scale of the 'exp' cost
                 eta_range:tuple=(0.6, 0.8), # perspective factor at the top / bottom of the image (official: (0.5, 0.7))
                 image_height:float|None=None, # image height for the perspective cost (default h*stride)
                 scaling:float=0.5, # ε-scaling ratio
                 tol:float=1e-3, # converged mode: relative marginal error
                 max_iter:int=1000, # converged mode: iteration cap
                 report_error:bool=False, # record the marginal error of each solve in `last_solve` (2 extra soft-mins)
                 shift:bool=True, # exponential costs as exp(.)-1 (zero at distance 0), as the official code
                 transport:TransportTerm='primal', # transport term: 'primal' <C,P> (Eq. 1) or 'dual' (geomloss's value, official)
                 entropy:EntropyForm='sum', # 'sum' eps*sum P log P (Eq. 1) or 'mean' (official: eps*mean P log P, summed over the batch)
                 empty:EmptyImage='pixel', # image without points: 'pixel' (tau*D1(0|a)) or 'official' (|sum a| in transport, pixel and point)
                 grid_offset:float=0.5, # pixel (i, j) sits at stride*(j+offset, i+offset): 0.5 centres, 1.0 official (8j+8)
                ):
        super().__init__()
        check_choice(cost, COSTS, 'cost')
        check_choice(d_pixel, Divergence, 'd_pixel')
        check_choice(d_point, Divergence, 'd_point')
        for t in terms: check_choice(t, Term, 'terms')
        if not terms: raise ValueError(f"terms is empty; choose one or more among {', '.join(TERMS)}")
        check_choice(reference, Reference, 'reference')
        check_choice(mode, SolverMode, 'mode')
        check_choice(grad, GradRecipe, 'grad')
        check_choice(transport, TransportTerm, 'transport')
        if transport == 'dual' and reference != 'product':
            raise ValueError("transport='dual' is geomloss's value, defined for reference='product'")
        check_choice(entropy, EntropyForm, 'entropy')
        check_choice(empty, EmptyImage, 'empty')
        self.cost, self.eps, self.tau, self.tau_solve, self.scale, self.stride = cost, eps, tau, tau_solve, scale, stride
        self.d_pixel, self.d_point, self.terms, self.mode, self.grad, self.reference = d_pixel, d_point, tuple(terms), mode, grad, reference
        self.eta, self.eta_range, self.image_height = eta, eta_range, image_height
        self.scaling, self.tol, self.max_iter, self.report_error, self.shift = scaling, tol, max_iter, report_error, shift
        self.transport, self.entropy, self.empty, self.grid_offset = transport, entropy, empty, grid_offset
        self.last_solve = {}

    def extra_repr(self):
        return (f"cost={self.cost!r}, eps={self.eps}, tau={self.tau}, tau_solve={self.tau_solve}, "
                f"scale={self.scale}, stride={self.stride}, d_pixel={self.d_pixel!r}, "
                f"d_point={self.d_point!r}, mode={self.mode!r}, grad={self.grad!r}, "
                f"transport={self.transport!r}, entropy={self.entropy!r}, empty={self.empty!r}, "
                f"grid_offset={self.grid_offset}")


# %%
L_ = GeneralizedLoss(eps=0.02, terms=['transport', 'pixel'])
test_eq((L_.eps, L_.terms, L_.tau_solve, L_.mode, L_.last_solve),
        (0.02, ('transport', 'pixel'), 0.5, 'official', {}))
assert repr(L_).startswith("GeneralizedLoss(cost='perspective', eps=0.02, tau=0.1, tau_solve=0.5, scale=512.0")
test_fail(lambda: GeneralizedLoss(cost='manhattan'),
          contains="cost must be one of dist, sqdist, exp, perspective, got 'manhattan'")

# %% [markdown]
# `GeneralizedLoss.official(**overrides)` sets every column of the table to the official code's (the section
# *The official objective* below checks it against the trainer's formulas).

# %%
#| export
@patch(cls_method=True)
def official(cls:GeneralizedLoss, **overrides):
    "The objective the published models were trained with (the official trainer's), any argument overridden."
    kw = dict(cost='perspective', eps=0.01, tau=0.1, tau_solve=0.5, scale=512., stride=8, d_pixel='l2',
              d_point='l1', mode='official', grad='official', reference='product', eta_range=(0.5, 0.7),
              shift=True, scaling=0.5, transport='dual', entropy='mean', empty='official', grid_offset=1.0)
    kw.update(overrides)
    kw.setdefault('image_height', kw['scale'])     # the official heights are y / crop size
    return cls(**kw)


# %%
L_ = GeneralizedLoss.official(scale=128.)
test_eq((L_.transport, L_.entropy, L_.empty, L_.grid_offset, L_.eta_range, L_.image_height, L_.grad),
        ('dual', 'mean', 'official', 1.0, (0.5, 0.7), 128., 'official'))
test_eq(GeneralizedLoss.official(image_height=300.).image_height, 300.)

# %% [markdown]
# `problem` places density pixel $(i, j)$ at $(s(j+o), s(i+o))$ with $o$ = `grid_offset`
# (`uotcrowd.costs.pixel_positions`): by default at its cell centre, $o=\frac12$; the official trainer builds
# its grid as `(arange + 0.5) * stride + stride / 2`, i.e. at $s(j+1)$, $8j+8$ at stride 8
# (`grid_offset=1.0`). On the cell centres its cost is `cost_matrix`, bit for bit.

# %%
#| export
@patch
def problem(self:GeneralizedLoss, density:torch.Tensor, # `(B, 1, h, w)` predicted density
            points # list of B `(N_b, 2)` head positions in input pixels
           ) -> Transport:
    "The batch as transport problems: masses, pixel and head positions, cost (not yet solved)."
    density = check_density(density)
    if not torch.isfinite(density).all():
        raise ValueError("density contains NaN or infinite values; check the model output (learning rate, "
                         "AMP overflow)")
    B, _, h, w = density.shape
    points = check_points(points, batch_size=B)
    dt = torch.float64 if density.dtype == torch.float64 else torch.float32
    coords, mask = pad_points(points, device=density.device, dtype=dt)
    a = density.reshape(B, h * w).to(dt)
    grid = pixel_positions(h, w, self.stride, self.grid_offset, device=density.device, dtype=dt)
    H = float(self.image_height) if self.image_height is not None else float(h * self.stride)
    C = points_cost(grid.expand(B, -1, -1), coords, self.cost, self.scale, H, self.eta, self.eta_range,
                    self.shift)
    return Transport(a, mask.to(dt), C, mask, grid, coords, H)


# %%
pts_ = [torch.tensor([[4., 4.], [20., 12.]]), torch.tensor([[12., 4.], [0., 0.]])]
for name in COSTS:
    t_ = GeneralizedLoss(cost=name, scale=16.).problem(torch.rand(2, 1, 2, 3), pts_)
    test_eq(t_.C, cost_matrix(2, 3, torch.stack(pts_), cost=name, stride=8, scale=16.))
    test_eq(t_.pot, None)
t_ = GeneralizedLoss.official(scale=16.).problem(torch.rand(2, 1, 2, 3), pts_)
test_eq((t_.x[0].tolist(), t_.image_height), ([8., 8.], 16.))

# %% [markdown]
# `solve` fills in the potentials, without autograd through the iterations; in the official mode the
# annealing starts at the largest distance between real points of each image (geomloss's diameter).

# %%
#| export
@patch
def solve(self:GeneralizedLoss, density:torch.Tensor, points) -> Transport:
    "`problem` with its potentials filled in (no autograd through the iterations)."
    t = self.problem(density, points)
    x = t.x.expand(len(t.a), -1, -1)
    diam = max_diameter(x / self.scale, t.y / self.scale, mask_y=t.mask) if self.mode == 'official' else None
    t.pot = uot_potentials(t.a.detach(), t.b, t.C, self.eps, self.tau_solve, self.tau_solve, mask_b=t.mask,
                           mode=self.mode, reference=self.reference, diameter=diam, scaling=self.scaling,
                           tol=self.tol, max_iter=self.max_iter, compute_error=self.report_error)
    self.last_solve = dict(iterations=t.pot.iterations, marginal_error=t.pot.marginal_error)
    return t


# %%
dens_ = torch.rand(2, 1, 2, 3)
L_ = GeneralizedLoss.official(scale=16.)
t_ = L_.solve(dens_, pts_)
test_eq((t_.x[0].tolist(), t_.image_height, t_.pot.f.shape), ([8., 8.], 16., (2, 6)))
grid_ = pixel_positions(2, 3, 8, 1.0)[None] / 16.
for k in range(2):   # the same potentials, image by image
    pk = uot_potentials(dens_[k].reshape(1, -1), torch.ones(1, 2), t_.C[k:k + 1], 0.01, 0.5,
                        diameter=max_diameter(grid_, pts_[k][None] / 16.))
    test_close(t_.pot.f[k], pk.f[0], eps=1e-5)
test_eq(set(L_.last_solve), {'iterations', 'marginal_error'})

# %% [markdown]
# `terms_from` forms the four terms of every image from its solved problem, through the row factor and the
# row and column statistics of `plan_stats` (the plan itself is never stored); checked here against the terms
# written out from the full plan of `uot_plan`.

# %%
#| export
@patch
def terms_from(self:GeneralizedLoss, t:Transport, # a solved batch (`solve`)
               all_terms:bool=True # every term; False: only those of `terms` (the others may be 0)
              ) -> dict:
    "Per-image `(B,)` loss terms from the solved problem; differentiable in `t.a`."
    a, b, C, mask, pot = t.a, t.b, t.C, t.mask, t.pot
    entropy = all_terms or 'entropy' in self.terms                    # else its reduction is skipped
    # the plan is never stored
    st = plan_stats(a, b, C, pot, self.tau_solve, mask_b=mask, grad=self.grad, entropy=entropy)
    r, e, ce, elog = st.r, st.rows, st.cost, st.xlogx  # r; E 1; sum_j C_ij E_ij; sum_j E_ij log E_ij
    P1 = r * e
    Pt1 = st.cols                                      # r^T E, differentiable through r
    tiny = 1e-20
    # sum P log P, 0 log 0 = 0
    plogp = ((e * r * torch.log(r.clamp_min(tiny)) + r * elog).sum(1) if entropy
             else torch.zeros_like(e[:, 0]))
    # official: eps * mean over the n*m entries, added per image without the 1/B
    if self.entropy == 'mean':
        m = (mask.sum(1) if mask is not None else torch.full_like(plogp, b.shape[1])).clamp_min(1)
        # x B: the batch mean of these is the official sum
        plogp = plogp / (a.shape[1] * m) * a.shape[0]
    out = dict(transport=(r * ce).sum(1) if self.transport == 'primal' else
                         unbalanced_dual_value(a, b if mask is None else b * mask, pot.f, pot.g, self.eps,
                                               self.tau_solve),
               entropy=self.eps * plogp,
               pixel=self.tau * divergence(P1.detach() if self.grad == 'official' else P1, a, self.d_pixel),
               point=self.tau * divergence(Pt1, b, self.d_point, mask=mask))
    # |sum a| added to transport, pixel and point (before tau)
    if self.empty == 'official' and mask is not None:
        has, mass = mask.any(1), a.sum(1).abs()
        for name, wgt in (('transport', 1.), ('pixel', self.tau), ('point', self.tau), ('entropy', 0.)):
            out[name] = torch.where(has, out[name], wgt * mass)
    out['total'] = sum(out[t] for t in self.terms)
    return out


# %%
L_ = GeneralizedLoss(scale=16., grad='official')
t_ = L_.solve(dens_, pts_)
terms_ = L_.terms_from(t_)
P_ = uot_plan(t_.a, t_.b, t_.C, 0.01, 0.5, mask_b=t_.mask, potentials=t_.pot, grad='official')
test_close(terms_['transport'], (t_.C * P_).sum((1, 2)), eps=1e-5)
test_close(terms_['entropy'], 0.01 * torch.xlogy(P_, P_).sum((1, 2)), eps=1e-5)
test_close(terms_['pixel'], 0.1 * ((P_.sum(2) - t_.a) ** 2).sum(1), eps=1e-5)
test_close(terms_['point'], 0.1 * (P_.sum(1) - 1).abs().sum(1), eps=1e-5)
test_close(terms_['total'], sum(terms_[k] for k in TERMS), eps=1e-6)
test_eq(terms_['total'].shape, (2,))

# %% [markdown]
# `forward` solves and forms the terms outside autocast (the solver needs float32 at least) and returns their
# batch mean.

# %%
#| export
@patch
def forward(self:GeneralizedLoss, density:torch.Tensor, # `(B, 1, h, w)` predicted density (per-pixel counts)
            points, # list of B `(N_b, 2)` tensors of `(x, y)` head positions in input pixels
            return_terms:bool=False # also return a dict of the batch-mean terms
           ):
    "Batch mean of Eq. 1 (and, with `return_terms`, the dict transport/entropy/pixel/point/total)."
    with no_autocast(density.device):
        t = self.terms_from(self.solve(density, points), all_terms=return_terms)
    loss = t['total'].mean()
    if return_terms: return loss, {k: v.mean() for k, v in t.items()}
    return loss


# %% [markdown]
# ### The terms, checked against a direct computation from the plan

# %%
g = torch.Generator().manual_seed(0)
dens = torch.rand(2, 1, 8, 8, generator=g) * 0.1
pts = [torch.rand(5, 2, generator=g) * 64, torch.rand(3, 2, generator=g) * 64]
gl = GeneralizedLoss(scale=64.)
loss, T = gl(dens, pts, return_terms=True)
test_eq(set(T), {'transport', 'entropy', 'pixel', 'point', 'total'})
test_close(T['total'], T['transport'] + T['entropy'] + T['pixel'] + T['point'], eps=1e-6)
test_close(loss, T['total'])
for k in range(2):   # one image at a time, terms written out from the plan
    C = cost_matrix(8, 8, pts[k][None], stride=8, scale=64.)
    a = dens[k].reshape(1, -1)
    gridk = pixel_centres(8, 8, 8)[None] / 64.
    pot = uot_potentials(a, torch.ones(1, len(pts[k])), C, 0.01, 0.5,
                         diameter=max_diameter(gridk, pts[k][None] / 64.))
    P = uot_plan(a, torch.ones(1, len(pts[k])), C, 0.01, 0.5, potentials=pot)[0]
    ref = ((C[0] * P).sum() + 0.01 * torch.xlogy(P, P).sum() + 0.1 * ((P.sum(1) - a[0]) ** 2).sum()
           + 0.1 * (P.sum(0) - 1).abs().sum())
    one = gl(dens[k:k+1], pts[k:k+1])
    test_close(one, ref, eps=1e-5)
# the batch loss is the mean of the per-image losses
test_close(loss, (gl(dens[:1], pts[:1]) + gl(dens[1:], pts[1:])) / 2, eps=1e-6)

# %% [markdown]
# ### Term ablation and divergences
#
# `terms` switches terms off (Table 2); `d_pixel`/`d_point` choose the divergences.

# %%
for terms in [('transport',), ('transport', 'pixel'), ('pixel', 'point'), ('transport', 'entropy', 'point')]:
    l, Tt = GeneralizedLoss(scale=64., terms=terms)(dens, pts, return_terms=True)
    test_close(l, sum(T[t] for t in terms), eps=1e-6)
    # without the terms: unused ones skipped
    test_close(GeneralizedLoss(scale=64., terms=terms)(dens, pts), l, eps=1e-6)
for dp in DIVERGENCES:
    for dq in DIVERGENCES:
        l, Tt = GeneralizedLoss(scale=64., d_pixel=dp, d_point=dq)(dens, pts, return_terms=True)
        test_close(Tt['transport'], T['transport'], eps=1e-6)          # the plan does not depend on D1, D2
        assert torch.isfinite(l)
test_fail(lambda: GeneralizedLoss(terms=('transport', 'count')),
          contains="terms must be one of transport, entropy,")
test_fail(lambda: GeneralizedLoss(mode='fast'),
          contains="mode must be one of official, converged, got 'fast'")
test_fail(lambda: GeneralizedLoss(d_pixel='tv'), contains="d_pixel")
test_fail(lambda: GeneralizedLoss(terms=()), contains="choose one or more")

# %% [markdown]
# ### The exact density wins (why the exponential costs are shifted)
#
# One person on each head's pixel must score lower than the same count spread uniformly, and lower than twice
# the right density. With the unshifted cost $e^{L/\eta}\ge1$, every unit of transported mass costs at least
# 1, more than the unbalanced penalty for leaving it, and the uniform map wins instead.

# %%
# pixel centres of a 16x16 map
heads = torch.tensor([[12., 20.], [44., 36.], [100., 84.], [68., 116.], [20., 108.]])
exact = torch.zeros(1, 1, 16, 16)
for x, y in heads: exact[0, 0, int(y // 8), int(x // 8)] = 1.
uniform = torch.full_like(exact, 5. / 256)
for cost in ['perspective', 'exp']:
    for mode in ['official', 'converged']:
        for grad in ['paper', 'official']:
            L = GeneralizedLoss(cost=cost, mode=mode, grad=grad)
            le, lu, ld = L(exact, [heads]), L(uniform, [heads]), L(2 * exact, [heads])
            assert le < lu and le < ld, (cost, mode, le, lu, ld)
L = GeneralizedLoss(cost='perspective')
# every head is covered
test_close(L(exact, [heads], return_terms=True)[1]['point'], torch.tensor(0.), eps=0.05)
for shift in [True, False]:
    print(f"shift={shift}: exact / uniform / doubled =",
          [round(GeneralizedLoss(shift=shift)(dm, [heads]).item(), 4) for dm in (exact, uniform, 2 * exact)])
Lu = GeneralizedLoss(shift=False)
assert Lu(uniform, [heads]) < Lu(exact, [heads])      # unshifted: the uniform map wins

# %% [markdown]
# ### Empty images, zero densities, NaN
#
# An image without points has the pixel term alone,
# $\tau D_1(\mathbf 0|\boldsymbol a)=\tau\|\boldsymbol a\|^2$, with a finite gradient; an all-zero density has
# a finite value and gradient; a NaN density raises.

# %%
d = (torch.rand(3, 1, 8, 8, generator=g) * 0.1).requires_grad_()
pts3 = [torch.rand(4, 2, generator=g) * 64, torch.zeros(0, 2), torch.rand(2, 2, generator=g) * 64]
l, T3 = GeneralizedLoss(scale=64.)(d, pts3, return_terms=True)
l.backward()
assert torch.isfinite(l) and torch.isfinite(d.grad).all()
test_close(GeneralizedLoss(scale=64.)(d[1:2], pts3[1:2]), 0.1 * (d[1] ** 2).sum(), eps=1e-6)
# gradient of the pixel term, batch mean of 3
test_close(d.grad[1], 2 * 0.1 * d[1].detach() / 3, eps=1e-6)
for grad in ['paper', 'official']:
    for mode in ['official', 'converged']:
        z = torch.zeros(2, 1, 8, 8, requires_grad=True)
        lz = GeneralizedLoss(scale=64., grad=grad, mode=mode)(z, [pts3[0], torch.zeros(0, 2)])
        lz.backward()
        assert torch.isfinite(lz) and torch.isfinite(z.grad).all()
        # only the 4 uncovered heads of image 0 count
        test_close(lz, 0.1 * 4 / 2, eps=1e-5)
        # some pixel is pushed up towards the heads
        assert (z.grad[0] <= 0).any()
test_fail(lambda: GeneralizedLoss()(torch.full((1, 1, 4, 4), float('nan')), [torch.zeros(1, 2)]),
          contains='NaN')
test_fail(lambda: GeneralizedLoss()(torch.zeros(2, 1, 4, 4), [torch.zeros(1, 2)]), contains='batch of 2')

# %% [markdown]
# ### Gradient: finite differences with $v^*$ fixed, and the re-solved loss
#
# The paper differentiates
# $\boldsymbol a\mapsto\mathcal L(\mathrm{diag}(\boldsymbol u^*(\boldsymbol a))\mathbf K\mathrm{diag}(\boldsymbol v^*))$.
# We write that function out independently (plain Eq. 6 $u$-step, terms from the full plan) and compare our
# gradient with its central finite differences (float64). The fully re-solved loss is a different function
# (the plan solves a KL problem, not the L2/L1 one), so its finite differences only agree in direction: we
# report the cosine and the norm ratio, and check them against their measured values.

# %%
g = torch.Generator().manual_seed(7)
h = w = 6
d0 = (torch.rand(1, 1, h, w, generator=g, dtype=torch.float64) * 0.2 + 0.02)
pts1 = [torch.rand(4, 2, generator=g, dtype=torch.float64) * 48]
for reference in ['product', 'uniform']:
    L = GeneralizedLoss(scale=48., mode='converged', tol=1e-12, max_iter=100000, reference=reference)
    s = L.solve(d0, pts1)
    a0, C, pot = s.a, s.C, s.pot
    eps, lam = 0.01, 0.5 / 0.51
    # v* = nu e^{g*/eps}, held fixed
    v = (1. if reference == 'uniform' else s.b) * torch.exp(pot.g / eps)
    K = torch.exp(-C / eps)
    def L_fixed(a):
        mu = a if reference == 'product' else torch.ones_like(a)
        u = mu * (a / mu) ** lam / (K @ v[..., None])[..., 0] ** lam
        P = u[:, :, None] * K * v[:, None, :]
        return ((C * P).sum() + eps * torch.xlogy(P, P).sum() + 0.1 * ((P.sum(2) - a) ** 2).sum()
                + 0.1 * (P.sum(1) - 1).abs().sum())
    dd = d0.clone().requires_grad_()
    L(dd, pts1).backward()
    test_close(L_fixed(a0), L(d0, pts1), eps=1e-9)
    step = 1e-6
    basis = torch.eye(h * w, dtype=torch.float64)[:, None]
    fd = torch.stack([(L_fixed(a0 + step * e) - L_fixed(a0 - step * e)) / (2 * step) for e in basis])
    test_close(dd.grad.flatten(), fd, eps=1e-6)
    shifted = lambda e: d0 + step * e.reshape(1, 1, h, w)
    fd_full = torch.stack([(L(shifted(e), pts1) - L(shifted(-e), pts1)) / (2 * step) for e in basis])
    cos = torch.nn.functional.cosine_similarity(dd.grad.flatten(), fd_full, dim=0).item()
    ratio = dd.grad.norm().item() / fd_full.norm().item()
    print(f"{reference}: cosine(paper gradient, FD of the re-solved loss) = {cos:.3f}, "
          f"norm ratio {ratio:.2f}")
    # measured in float64: finite-difference steps of 1e-5 and 1e-6 give the same cosine and ratio to 3e-10
    test_close((cos, ratio),
               {'product': (0.8468694, 1.3006169), 'uniform': (0.8462528, 1.2991626)}[reference], eps=2e-7)

# %% [markdown]
# ### Equality with the official recipe (geomloss)
#
# The official trainer solves with `SamplesLoss(blur=0.01, scaling=0.5, debias=False, backend='tensorized',
# cost=per_cost, reach=0.5, p=1)` on coordinates divided by the crop size, rebuilds the plan from the
# potentials, and forms the terms from it. Our loss with `mode='official'`, `grad='official'`,
# `eta_range=(0.5, 0.7)` and `scale` = the crop size must give the same plan, hence the same terms and
# gradient, to $10^{-4}$ relative (terms written here as in our definition: $\langle C,P\rangle$,
# $\varepsilon\sum P\log P$, $\tau\|P1-a\|^2$, $\tau\|P^\top1-1\|_1$).

# %%
from geomloss import SamplesLoss  # a dev dependency: these checks always run in the test suite

# %%
g = torch.Generator().manual_seed(8)
side, crop = 16, 128.
dens = torch.rand(2, 1, side, side, generator=g) * 0.05
pts2 = [torch.rand(9, 2, generator=g) * crop, torch.rand(4, 2, generator=g) * crop]
def per_cost(x, y):
    dist = torch.cdist(x, y, compute_mode='donot_use_mm_for_euclid_dist')
    return torch.exp(dist / ((x[:, :, None, 1] + y[:, None, :, 1]) / 2 * 0.2 + 0.5)) - 1
crit = SamplesLoss(blur=0.01, scaling=0.5, debias=False, backend='tensorized', cost=per_cost, reach=0.5, p=1,
                   potentials=True)
X = pixel_centres(side, side, 8)[None] / crop
ref_terms, ref_grads = [], []
for k in range(2):
    A = dens[k].reshape(1, -1).clone().requires_grad_()
    Y = pts2[k][None] / crop
    Fg, Gg = crit(A.detach(), X, torch.ones(1, len(pts2[k])), Y)
    C = per_cost(X, Y)
    PI = torch.exp((Fg[:, :, None] + Gg[:, None, :] - C).detach() / 0.01) * A[:, :, None]
    # official form
    t = dict(transport=(C * PI).sum(), entropy=0.01 * ((PI + 1e-20) * torch.log(PI + 1e-20)).sum(),
             pixel=0.1 * ((PI.sum(2).detach() - A) ** 2).sum(), point=0.1 * (PI.sum(1) - 1).abs().sum())
    sum(t.values()).backward()
    ref_terms.append({k_: v.item() for k_, v in t.items()})
    ref_grads.append(A.grad.reshape(side, side))
L = GeneralizedLoss(mode='official', grad='official', eta_range=(0.5, 0.7), scale=crop)
dd = dens.clone().requires_grad_()
loss, T = L(dd, pts2, return_terms=True)
loss.backward()
for name in ['transport', 'entropy', 'pixel', 'point']:
    refv = sum(r[name] for r in ref_terms) / 2
    test_close(T[name].item(), refv, eps=1e-4 * abs(refv) + 1e-7)
gref = torch.stack(ref_grads)[:, None] / 2
test_close(dd.grad, gref, eps=1e-4 * gref.abs().max())
print('geomloss recipe vs ours: max rel. term deviation',
      max(abs(T[n].item() - sum(r[n] for r in ref_terms) / 2) / abs(sum(r[n] for r in ref_terms) / 2)
          for n in ['transport', 'entropy', 'pixel', 'point']))

# %% [markdown]
# ## The official objective: `GeneralizedLoss.official()`
#
# The plan above is the official one, but the official trainer's *loss* is not Eq. 1. Per image it adds, from
# that plan (potentials detached,
# $\mathbf P=e^{(\boldsymbol f\oplus\boldsymbol g-\mathbf C)/\varepsilon}\,\boldsymbol a\,\boldsymbol b^\top$):
#
# * transport: geomloss's *value*
#   $\langle\boldsymbol a,\varphi(\boldsymbol f)\rangle+\langle\boldsymbol b,\varphi(\boldsymbol g)\rangle$
#   (above), whose gradient $\varphi(\boldsymbol f)\ge0$ lowers the density everywhere the potential is
#   positive;
# * pixel $\sum_i((\mathbf P\mathbf 1)_i^{\text{detached}}-a_i)^2$ and point
#   $\sum_j|(\mathbf P^\top\mathbf 1)_j-1|$, weighted by $\tau=0.1$;
# * entropy $\varepsilon\cdot\mathrm{mean}_{ij}(P_{ij}\log P_{ij})$, a mean over the $n m$ entries;
# * for an image without points, $|\sum\boldsymbol a|$ in each of transport, pixel and point, i.e.
#   $1.2\,|\sum\boldsymbol a|$;
#
# and the total is
# $\frac1B\sum_k(\text{transport}_k+\tau(\text{pixel}_k+\text{point}_k))+\varepsilon\sum_k\mathrm{mean}(\mathbf P_k\log\mathbf P_k)$
# (the entropy is not divided by the batch size). Its cost is the perspective one with $\eta\in[0.5,0.7]$,
# heights and coordinates divided by the crop size, and pixels at $8j+8$.
# `GeneralizedLoss.official(**overrides)` sets all of it (`transport='dual'`, `entropy='mean'`,
# `empty='official'`, `grid_offset=1.0`, `eta_range=(0.5, 0.7)`, `image_height=scale`, `mode='official'`,
# `grad='official'`); `get_loss('gl-official')` builds it and `uotcrowd train --loss gl-official` trains with
# it. `grid_offset=0.5` keeps the official formulas on the cell centres. The batch is solved at once;
# `tests/test_official_loss.py` compares value and gradient with the trainer's formulas evaluated with
# geomloss image by image: equal to $10^{-15}$ in float64; in float32 the values agree to rounding and the
# gradients to $2\cdot10^{-6}$ of their largest entry.
#
# Below, the same total written out image by image from the plan of `uot_plan` (a second assembly of the
# terms), on a batch with an empty image.

# %%
g = torch.Generator().manual_seed(12)
side, crop = 16, 128.
dens = (torch.rand(3, 1, side, side, generator=g, dtype=torch.float64) * 0.05)
pts3 = [torch.rand(7, 2, generator=g, dtype=torch.float64) * crop, torch.zeros(0, 2, dtype=torch.float64),
        torch.rand(3, 2, generator=g, dtype=torch.float64) * crop]
L_off = GeneralizedLoss.official(scale=crop)
test_eq((L_off.transport, L_off.entropy, L_off.empty, L_off.grid_offset, L_off.eta_range, L_off.image_height),
        ('dual', 'mean', 'official', 1.0, (0.5, 0.7), crop))
dd = dens.clone().requires_grad_()
loss, T = L_off(dd, pts3, return_terms=True)
loss.backward()
X = pixel_positions(side, side, 8, offset=1.0, dtype=torch.float64)
test_eq(X[:2, 0], torch.tensor([8., 16.], dtype=torch.float64))          # the official grid, 8j + 8
ref, gref = 0., []
for k in range(3):
    A = dens[k].reshape(1, -1).clone().requires_grad_()
    if len(pts3[k]) == 0: lk = 1.2 * A.sum().abs() / 3
    else:
        Ck = points_cost(X[None], pts3[k][None], scale=crop, image_height=crop, eta_range=(0.5, 0.7))
        ones = torch.ones(1, len(pts3[k]), dtype=torch.float64)
        pot = uot_potentials(A.detach(), ones, Ck, 0.01, 0.5,
                             diameter=max_diameter(X[None] / crop, pts3[k][None] / crop))
        P = uot_plan(A, ones, Ck, 0.01, 0.5, potentials=pot, grad='official')[0]
        phi = lambda x: 0.505 * (1 - torch.exp(-x / 0.5))
        lk = ((A[0] * phi(pot.f[0])).sum() + phi(pot.g[0]).sum()
              + 0.1 * (((P.sum(1).detach() - A[0]) ** 2).sum() + (P.sum(0) - 1).abs().sum())) / 3 \
             + 0.01 * torch.xlogy(P, P).mean()
    lk.backward()
    ref = ref + lk.item()
    gref.append(A.grad.reshape(1, side, side))
test_close(loss.item(), ref, eps=1e-10 * abs(ref))
test_close(dd.grad, torch.stack(gref), eps=1e-10)
# empty image: 1.2 sign(sum a) / B
test_close(dd.grad[1], torch.full((1, side, side), 1.2 / 3, dtype=torch.float64), eps=1e-12)
test_fail(lambda: GeneralizedLoss(transport='dual', reference='uniform'), contains="reference='product'")
test_fail(lambda: GeneralizedLoss(entropy='avg'), contains="entropy")

# %% [markdown]
# ### Paper, official and converged objectives side by side
#
# On a random batch (B=2, 64×64 maps of 512×512 crops, 300 points per image), the value of each objective and
# the cosine of its gradient with the official one: our default (Eq. 1, `GeneralizedLoss()`), the official
# trainer's, the converged solve (`mode='converged'`), and two intermediate settings.

# %%
g = torch.Generator().manual_seed(0)
B, side, m = 2, 64, 300
dens = torch.rand(B, 1, side, side, generator=g) * 2 * m / side ** 2
ptsR = [torch.rand(m, 2, generator=g) * 512 for _ in range(B)]
objectives = {'paper (default)': GeneralizedLoss(), 'official': GeneralizedLoss.official(),
              'converged': GeneralizedLoss(mode='converged'),
              "grad='official', eta (0.5, 0.7)": GeneralizedLoss(grad='official', eta_range=(0.5, 0.7)),
              'official on cell centres': GeneralizedLoss.official(grid_offset=0.5)}
vals, grads = {}, {}
for name, L in objectives.items():
    dd = dens.clone().requires_grad_()
    l, T = L(dd, ptsR, return_terms=True)
    l.backward()
    vals[name], grads[name] = {k: v.item() for k, v in T.items()}, dd.grad.flatten()
for name in objectives:
    cos = torch.nn.functional.cosine_similarity(grads[name], grads['official'], dim=0).item()
    ratio = (grads[name].norm() / grads['official'].norm()).item()
    v = vals[name]
    print(f"{name:32s} total {v['total']:8.3f} (transport {v['transport']:7.3f}, pixel {v['pixel']:6.3f}, "
          f"point {v['point']:6.3f}, entropy {v['entropy']:8.5f}); gradient cosine with official {cos:.3f}, "
          f"norm ratio {ratio:.2f}")

# %%
# the official trainer's formulas give 21.9647 (geomloss 0.3.1, float32)
test_close(vals['official']['total'], 21.9647, eps=1e-3)
assert vals['official']['total'] > 1.5 * vals["grad='official', eta (0.5, 0.7)"]['total']

# %% [markdown]
# ### Where each objective moves the density
#
# One image (512×512, 26 heads in perspective rows) and a blurry prediction of the right count, 70 % of it
# around the heads and 30 % spread uniformly; each panel shows $-\partial\mathcal L/\partial\boldsymbol a$
# (red: a gradient step adds density, blue: it removes it). All three pull density onto the crowded upper rows
# and remove the uniform background, most of all around the sparse lower heads, whose point terms are already
# met by the background mass the plan sends them. The official objective removes about twice as much: its
# transport term, geomloss's dual value, has the gradient $\varphi(\boldsymbol f)$, positive wherever the
# potential is, so on top of the pull of the plan it lowers the density almost everywhere, a count penalty
# spread over the map. The paper's and the converged objectives differ little from each other on this image.

# %%
import matplotlib.pyplot as plt

# %%
g = torch.Generator().manual_seed(0)
rows = [(40, 9), (104, 7), (200, 5), (340, 3), (460, 2)]
headsP = torch.cat([torch.stack([torch.linspace(60, 452, k) + torch.rand(k, generator=g) * 20,
                                 torch.full((k,), float(y))], 1) for y, k in rows])
side = 64
exactP = torch.zeros(1, 1, side, side)
for x, y in headsP: exactP[0, 0, int(y // 8), int(x // 8)] += 1.
blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(exactP, (3, 3, 3, 3), mode='replicate'),
                                      7, stride=1)
# 70 % near the heads, 30 % spread uniformly
pred = (0.7 * blur / blur.sum() + 0.3 / side ** 2) * len(headsP)
shown = {'paper (default)': GeneralizedLoss(), 'official': GeneralizedLoss.official(),
         'converged': GeneralizedLoss(mode='converged')}
fig, axes = plt.subplots(1, 3, figsize=(12, 4.3), dpi=60)
pushes = {}
for ax, (name, L) in zip(axes, shown.items()):
    dd = pred.clone().requires_grad_()
    L(dd, [headsP]).backward()
    push = -dd.grad[0, 0]
    pushes[name] = push
    lim = push.abs().max().item()
    im = ax.imshow(push, cmap='RdBu_r', vmin=-lim, vmax=lim, extent=(0, 512, 512, 0))
    ax.scatter(headsP[:, 0], headsP[:, 1], s=10, c='k', marker='+')
    ax.set_title(f'{name}', fontsize=10)
    ax.axis('off')
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.suptitle('−∂L/∂a on one image (red: density added, blue: removed; heads: +)', fontsize=10)
plt.tight_layout()
plt.show()

# %%
on_heads = exactP[0, 0] > 0
stats = {k: dict(background=v[~on_heads].mean().item(), heads=v[on_heads].mean().item(), total=v.sum().item())
         for k, v in pushes.items()}
for k, v in stats.items(): print(f"{k:16s} mean push on the background {v['background']:+.4f}, on the heads "
                                 f"{v['heads']:+.4f}, sum {v['total']:+.1f}")
# every objective moves density onto the heads
for v in stats.values(): assert v['heads'] > 0 > v['background']
assert stats['official']['background'] < 1.5 * stats['paper (default)']['background']


# %% [markdown]
# ## Per-image loop (the official way)
#
# The official trainer solves one image at a time. `loss_per_image` does the same with any loss, so the
# speed-up of the batched solver can be measured (`uotcrowd.bench`); it must give the same value as the
# batched call.

# %%
#| export
def loss_per_image(loss:nn.Module, # a loss with the `loss(density, points)` contract
                   density:torch.Tensor, # `(B, 1, h, w)`
                   points # list of B `(N_b, 2)` tensors
                  ) -> torch.Tensor:
    "Mean over the batch of `loss` evaluated on one image at a time (as the official code does)."
    points = check_points(points, batch_size=len(density))
    return torch.stack([loss(density[k:k + 1], [points[k]]) for k in range(len(density))]).mean()


# %%
test_close(loss_per_image(gl, d.detach()[:, :, :8, :8], pts3),
           GeneralizedLoss(scale=64.)(d.detach(), pts3), eps=1e-6)

# %% [markdown]
# ## What the cost and ε do to the training signal
#
# The paper's Figs. 5-6 show that the exponential and perspective costs give more compact density maps than
# the squared Euclidean one, and that a larger ε gives blurrier maps. The reason is visible in a single
# gradient step. Below, a blurry prediction (a uniform map holding 30 % of the count) meets 26 annotated heads
# laid out with perspective (rows of heads denser towards the top); each panel shows where one step of
# gradient descent on `GeneralizedLoss` *adds* density, $\max(-\partial\mathcal L/\partial a, 0)$, and the
# peaks `localize` finds in it.
#
# - With $e^{L}$ and the perspective cost the loss pulls density into one compact blob per head at the paper's
#   ε, so the peaks are the heads; the perspective cost makes the blobs tighter at the top, where people are
#   small.
# - With $L^2$ at the same ε (coordinates divided by 512, so squared distances are tiny) the pull is one wide
#   blob: the transport cost cannot separate neighbouring heads, which is why the cost must be paired with a
#   much smaller ε (the L2 and BL losses use a fixed Gaussian bandwidth instead, see
#   [the theory](03b_theory.ipynb)).
# - Raising ε to 0.05 blurs every cost.
# - The head in the middle of the lower rows gets no pull: it is the nearest head to a large empty area whose
#   (wrong) density the plan already assigns to it, so its point term is satisfied, and the pixel term pushes
#   that stray density down instead. Transport is global: what a pixel is pulled towards depends on all the
#   heads.

# %%
import matplotlib.pyplot as plt
from uotcrowd.localize import localize

# %%
side, stride = 32, 8
g = torch.Generator().manual_seed(0)
rows = [(20, 9), (52, 7), (100, 5), (170, 3), (230, 2)]   # (y, number of heads): denser far from the camera
heads = torch.cat([torch.stack([torch.linspace(30, 226, k) + torch.rand(k, generator=g) * 10,
                                torch.full((k,), float(y))], 1) for y, k in rows])
costs, epss = ['dist', 'sqdist', 'exp', 'perspective'], [0.005, 0.01, 0.05]
fig, axes = plt.subplots(len(costs), len(epss), figsize=(7.5, 10), dpi=60)
n_peaks = {}
for r, cost in enumerate(costs):
    for c, eps in enumerate(epss):
        density = torch.full((1, 1, side, side), 0.3 * len(heads) / side ** 2, requires_grad=True)
        GeneralizedLoss(cost=cost, eps=eps, stride=stride)(density, [heads]).backward()
        push = (-density.grad).clamp_min(0)                 # where a gradient step adds density
        found = localize(push / push.max(), stride=stride, threshold=0.05)[0]
        n_peaks[cost, eps] = len(found)
        ax = axes[r, c]
        ax.imshow(push[0, 0], cmap='magma', extent=(0, side * stride, side * stride, 0))
        ax.scatter(heads[:, 0], heads[:, 1], s=8, c='cyan', marker='+')
        ax.scatter(found[:, 0], found[:, 1], s=12, facecolors='none', edgecolors='lime')
        ax.set_title(f'{cost}, ε={eps}: {len(found)} peaks', fontsize=9)
        ax.axis('off')
fig.suptitle(f'Where one gradient step adds density ({len(heads)} heads: cyan; peaks: green)', fontsize=10)
plt.tight_layout()
plt.show()

# %%
# the exponential costs separate (almost) every head at the paper's ε; L² at the same ε cannot
assert n_peaks['exp', 0.01] >= 24 and n_peaks['perspective', 0.01] >= 24 and n_peaks['sqdist', 0.01] <= 8

# %% [markdown]
# ## Speed: batched vs per-image loop
#
# At B=8, a 64×64 map (512×512 crops) and 500 points per image, forward and backward. Timings depend on the
# (shared) machine; `uotcrowd.bench` measures them properly.

# %%
#| slow
g = torch.Generator().manual_seed(9)
B, side, m = 8, 64, 500
dens = (torch.rand(B, 1, side, side, generator=g) * 500 / side ** 2)
ptsB = [torch.rand(m, 2, generator=g) * 512 for _ in range(B)]
L = GeneralizedLoss()
def run(fn):
    dd = dens.clone().requires_grad_()
    t0 = time.perf_counter()
    fn(dd).backward()
    return time.perf_counter() - t0
run(lambda dd: L(dd[:1], ptsB[:1]))
t_batch = min(run(lambda dd: L(dd, ptsB)) for _ in range(2))
t_loop = min(run(lambda dd: loss_per_image(L, dd, ptsB)) for _ in range(2))
print(f"ours batched {t_batch:.2f} s, ours per-image loop {t_loop:.2f} s, ratio loop/batched "
      f"{t_loop / t_batch:.2f}")
crit = SamplesLoss(blur=0.01, scaling=0.5, debias=False, backend='tensorized', cost=per_cost, reach=0.5, p=1,
                   potentials=True)
X = pixel_centres(side, side, 8)[None] / 512.
def official(dd):
    tot = 0.
    for k in range(B):
        A = dd[k].reshape(1, -1)
        Y = ptsB[k][None] / 512.
        Fg, Gg = crit(A, X, torch.ones(1, m), Y)
        C = per_cost(X, Y)
        PI = torch.exp((Fg[:, :, None] + Gg[:, None, :] - C).detach() / 0.01) * A[:, :, None]
        tot = tot + (C * PI).sum() + 0.01 * ((PI + 1e-20) * torch.log(PI + 1e-20)).sum() \
              + 0.1 * ((PI.sum(2).detach() - A) ** 2).sum() + 0.1 * (PI.sum(1) - 1).abs().sum()
    return tot / B
t_off = min(run(official) for _ in range(2))
print(f"official geomloss loop {t_off:.2f} s, ratio official/ours batched {t_off / t_batch:.2f}")

# %%
#| hide
import nbdev
nbdev.nbdev_export()
