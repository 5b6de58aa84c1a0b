# %% [markdown]
# # Reference losses
#
# > The problems the loss benchmark solves, the generalized loss summed from geomloss's and POT's potentials, the diagnostics of `GeneralizedLoss`'s own solve, and the official trainer's recipe written as the trainer writes it.

# %%
#| default_exp references

# %%
#| export
from __future__ import annotations
import contextlib, warnings
from typing import Callable, Literal, Sequence
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from uotcrowd.core import check_choice
from uotcrowd.costs import coordinate_cost
from uotcrowd.sinkhorn import uot_marginal_error
from uotcrowd.losses import GeneralizedLoss, GradRecipe, Divergence

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.core import pixel_centres
from uotcrowd.costs import cost_matrix
from uotcrowd.losses import divergence

# %% [markdown]
# The [loss benchmark](10d_loss_bench.ipynb) times `GeneralizedLoss` against what people run instead: the
# official trainer's per-image recipe on top of geomloss, and POT's unbalanced Sinkhorn. This notebook builds
# those references, and the problems they all solve, and checks that they compute what the benchmark says they
# compute.

# %% [markdown]
# ## Problems to solve
#
# `make_problem` draws $B$ images with $m$ heads each, uniformly in a crop of `size·stride` pixels, and a
# density map that looks like a half-trained network's: each head's unit mass blurred with a Gaussian of one
# map pixel, 10 % of the mass spread uniformly, and the total off by up to ±10 %. All methods see the same
# tensors.

# %%
#| export
def make_problem(batch_size:int=8, # images B
                 n_points:int=500, # heads per image
                 size:int=64, # density map side h = w
                 stride:int=8, # input pixels per map pixel (crop = size*stride)
                 seed:int=0, # random seed
                 device:torch.device=torch.device('cpu'),
                ) -> tuple[torch.Tensor, list[torch.Tensor]]: # density `(B, 1, h, w)`, `(m, 2)` points
    "A reproducible batch of random head positions and a plausible predicted density map."
    g = torch.Generator(device='cpu').manual_seed(seed)
    crop = size * stride
    points = [crop * torch.rand(n_points, 2, generator=g) for _ in range(batch_size)]
    r = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-0.5 * r**2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :])[None, None]
    maps = []
    for p in points:
        ij = (p / stride).long().clamp(0, size - 1)
        hist = torch.zeros(size * size)
        hist.index_add_(0, ij[:, 1] * size + ij[:, 0], torch.ones(len(p)))
        blurred = F.conv2d(hist.view(1, 1, size, size), kernel, padding=3)[0]
        blurred = 0.9 * blurred * (n_points / blurred.sum().clamp_min(1e-12)) + 0.1 * n_points / size**2
        scale = 1 + 0.2 * (torch.rand(1, generator=g).item() - 0.5)
        maps.append(blurred * scale)
    density = torch.stack(maps).to(device)
    return density, [p.to(device) for p in points]


# %%
density, points = make_problem(3, 40, size=16, seed=1)
test_eq(density.shape, (3, 1, 16, 16))
test_eq([p.shape for p in points], [(40, 2)] * 3)
assert (density > 0).all() and all((p >= 0).all() and (p < 128).all() for p in points)
assert ((density.sum((1, 2, 3)) / 40 - 1).abs() <= 0.1 + 1e-5).all()
d2, p2 = make_problem(3, 40, size=16, seed=1)
test_eq(d2, density)
test_eq(p2[2], points[2])

# %% [markdown]
# ## Costs on coordinates, and the marginal error
#
# geomloss takes the cost as a function of two batched point clouds: `uotcrowd.costs.coordinate_cost` builds
# one from the same functions as `cost_matrix` (coordinates already divided by `scale`; the perspective factor
# uses the heights $y/H$ with $H$ the crop height), so the references solve exactly the problem
# `GeneralizedLoss` solves.
#
# The **marginal error** of a pair of potentials $(f,g)$ (geomloss's convention:
# $P_{ij}=a_ib_j\exp((f_i+g_j-C_{ij})/\varepsilon)$) is measured the same way for every method: at the optimum
# of the KL-penalized problem $\mathbf P\mathbf 1=\boldsymbol a\,e^{-f/\tau}$ and
# $\mathbf P^\top\mathbf 1=\boldsymbol b\,e^{-g/\tau}$, so we report the larger of the two relative $\ell_1$
# violations, maximized over the batch: `uotcrowd.sinkhorn.uot_marginal_error`, computed in float64 from the
# potentials alone, the same function for every method whatever the solver's own bookkeeping.

# %%
pts = torch.tensor([[[10., 500.], [300., 20.], [77., 77.]]])
grid = pixel_centres(8, 8, stride=64)[None]
for name in ('perspective', 'exp', 'dist'):
    test_close(coordinate_cost(name)(grid / 512, pts / 512), cost_matrix(8, 8, pts, cost=name, stride=64),
               eps=1e-5)

# %% [markdown]
# A check on a problem solved to convergence by plain (float64) Sinkhorn iterations in their textbook form:
# the error is tiny after many iterations and large after one.

# %%
def _plain_uot(a, b, C, eps, tau, iters):
    K = torch.exp(-C / eps) * a[:, :, None] * b[:, None, :]
    u, v = torch.ones_like(a), torch.ones_like(b)
    lam = tau / (tau + eps)
    for _ in range(iters):
        u = (a / torch.einsum('bij,bj->bi', K, v)) ** lam
        v = (b / torch.einsum('bij,bi->bj', K, u)) ** lam
    return eps * u.log(), eps * v.log()
g0 = torch.Generator().manual_seed(0)
a0 = torch.rand(2, 30, generator=g0, dtype=torch.float64) + .1
b0 = torch.ones(2, 7, dtype=torch.float64)
C0 = torch.rand(2, 30, 7, generator=g0, dtype=torch.float64)
assert uot_marginal_error(a0, b0, C0, *_plain_uot(a0, b0, C0, 0.1, 0.5, 500), 0.1, 0.5).max() < 1e-10
assert uot_marginal_error(a0, b0, C0, *_plain_uot(a0, b0, C0, 0.1, 0.5, 1), 0.1, 0.5).max() > 1e-3

# %% [markdown]
# ## Reference solvers: geomloss and POT
#
# **geomloss** (the official GL code's solver): `SamplesLoss('sinkhorn', p=1, blur=ε, reach=τ, scaling=0.5,
# debias=False, backend='tensorized', cost=...)` with `potentials=True` returns the dual potentials $(F, G)$
# of one image; the official recipe then rebuilds the plan $P=e^{(F\oplus G-C)/\varepsilon}\,a\,b^\top$. Its
# ε-scaling runs from the diameter of the two point clouds down to ε: one initial soft-min pair, one symmetric
# pair per temperature and a final extrapolation. With `stats={}`, `geomloss_potentials` counts the pairs
# geomloss actually runs: its tensorized backend computes each soft-min with one `logsumexp`, two per pair
# (debias=False), which a `torch.overrides.TorchFunctionMode` (`_CountCalls`) counts without touching
# geomloss's internals.
#
# **POT**: `ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=ε, reg_m=τ, reg_type='kl')` on torch tensors (POT's
# torch backend), which solves the same problem (entropy relative to $a\otimes b$). Plain `sinkhorn_knopp`
# underflows ($e^{-C/\varepsilon}$ with $C/\varepsilon$ up to ~900), so we use the log-stabilized variant
# (`method='sinkhorn_stabilized'`) with a fixed number of iterations (`stopThr=0`), in float64 (in float32 it
# returns NaN after a few iterations on these problems: its `1e-16` guards vanish); its log-potentials give
# $f=\varepsilon\log u$, $g=\varepsilon\log v$ in the same convention.
#
# Both run per image in a Python loop, without autograd through the iterations (that would cost memory
# proportional to the iterations); the loss and its gradient are then assembled from the potentials exactly as
# `GeneralizedLoss` assembles them (see the next section).

# %%
#| export
class _CountCalls(TorchFunctionMode):
    "Counts the calls of the torch function named `name` made inside the block."
    def __init__(self, name:str):
        super().__init__()
        self.name, self.calls = name, 0
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__name__', None) == self.name: self.calls += 1
        return func(*args, **(kwargs or {}))


# %%
with _CountCalls('logsumexp') as counted:
    x_ = torch.rand(3, 4)
    torch.logsumexp(x_, 0)
    x_.logsumexp(1)
    x_.exp()
test_eq(counted.calls, 2)


# %%
#| export
def geomloss_potentials(a:torch.Tensor, # `(1, n)` masses
                        x:torch.Tensor, # `(1, n, 2)` scaled pixel coordinates
                        b:torch.Tensor, # `(1, m)` masses
                        y:torch.Tensor, # `(1, m, 2)` scaled point coordinates
                        cost:Callable, # batched cost function of `(x, y)`
                        blur:float=0.01, # ε for p=1
                        reach:float=0.5, # τ for p=1
                        scaling:float=0.5, # ε-scaling ratio
                        stats:dict|None=None, # if a dict: `iterations` (soft-min pairs geomloss ran) is set
                       ) -> tuple[torch.Tensor, torch.Tensor]: # detached `(1, n)`, `(1, m)` potentials
    "Dual potentials of one unbalanced problem from geomloss's `SamplesLoss` (official GL settings)."
    from geomloss import SamplesLoss
    solver = SamplesLoss('sinkhorn', p=1, blur=blur, reach=reach, scaling=scaling, debias=False,
                         backend='tensorized', potentials=True, cost=cost)
    counter = _CountCalls('logsumexp')
    with torch.no_grad(), (counter if stats is not None else contextlib.nullcontext()):
        f, g = solver(a.detach(), x, b, y)
    if stats is not None: stats['iterations'] = counter.calls // 2
    return f.reshape(a.shape), g.reshape(b.shape)

# %% [markdown]
# geomloss's potentials are checked against its annealing schedule written out, in
# `test_geomloss_potentials_match_plain_sinkhorn` (`tests/test_bench.py`): geomloss's annealing stops after
# its schedule, so its potentials are not the fixed point (3e-2 away) but those of the schedule (ε from the
# diameter down to the blur, averaged symmetric updates, a final extrapolation), matched to float32 precision;
# at ε = 0.01 it runs 12 pairs. Here, the pairs of a blur as large as the diameter: an initial pair, one at
# the diameter, one at the blur and the extrapolation.

# %%
g0 = torch.Generator().manual_seed(1)
x1, y1 = torch.rand(1, 40, 2, generator=g0), torch.rand(1, 6, 2, generator=g0)
a1, b1 = torch.rand(1, 40, generator=g0) * 0.3, torch.ones(1, 6)
C1 = coordinate_cost('exp')(x1, y1)
stats = {}
f1, g1 = geomloss_potentials(a1, x1, b1, y1, coordinate_cost('exp'), blur=2., reach=0.5, stats=stats)
test_eq((f1.shape, g1.shape, stats['iterations']), ((1, 40), (1, 6), 4))


# %%
#| export
def pot_potentials(a:torch.Tensor, # `(n,)` masses
                   b:torch.Tensor, # `(m,)` masses
                   C:torch.Tensor, # `(n, m)` cost
                   eps:float=0.01, # temperature (POT's `reg`)
                   tau:float=0.5, # marginal penalty (POT's `reg_m`)
                   n_iter:int=100, # iterations (fixed: `stopThr=0`)
                   method:str='sinkhorn_stabilized', # POT method
                  ) -> tuple[torch.Tensor, torch.Tensor]: # `(n,)`, `(m,)` potentials
    "Dual potentials of one unbalanced problem from POT's unbalanced Sinkhorn on the torch backend."
    import ot
    dt = a.dtype
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _, log = ot.unbalanced.sinkhorn_unbalanced(a.detach().double(), b.double(), C.detach().double(),
                                                   reg=eps, reg_m=tau, method=method, reg_type='kl',
                                                   numItermax=n_iter, stopThr=0., log=True)
    return (eps * log['logu']).to(dt), (eps * log['logv']).to(dt)

# %% [markdown]
# POT (a `dev` dependency) agrees with plain Sinkhorn on a small problem solved to convergence:

# %%
fg_ref = _plain_uot(a1.double(), b1.double(), C1.double(), 0.2, 0.5, 2000)
f_pot, g_pot = pot_potentials(a1[0], b1[0], C1[0], eps=0.2, tau=0.5, n_iter=2000)
test_close(f_pot.double(), fg_ref[0][0], eps=1e-4)
test_close(g_pot.double(), fg_ref[1][0], eps=1e-4)
err_pot = float(uot_marginal_error(a1.double(), b1, C1, f_pot[None], g_pot[None], 0.2, 0.5))
assert err_pot < 1e-5, err_pot
f2, g2 = pot_potentials(a1[0], b1[0], C1[0], eps=0.2, tau=0.5, n_iter=2)          # far from converged
assert float(uot_marginal_error(a1.double(), b1, C1, f2[None], g2[None], 0.2, 0.5)) > 1e-3

# %% [markdown]
# ## The loss from the references' potentials
#
# `reference_terms` builds the plan of one image from detached potentials $(f, g)$ in geomloss's convention,
# $P_{ij}=a_i b_j\exp((f_i+g_j-C_{ij})/\varepsilon)$, so that it is linear in the density $a$, and sums
# $\langle C,P\rangle$, $-\varepsilon H(P)=\varepsilon\sum_{ij}P_{ij}\log P_{ij}$ (with $\log P_{ij}$ written
# out from the potentials), $\tau D_1(P\mathbf 1|a)$ and $\tau D_2(P^\top\mathbf 1|b)$; `reference_loss` sums
# the terms of any `GeneralizedLoss` from geomloss's or POT's potentials, image by image, written out here
# independently of `GeneralizedLoss.terms_from`.
#
# Because geomloss and POT only replace the solver, their losses are comparable to `GeneralizedLoss`'s to the
# accuracy of their potentials: geomloss's must equal the official mode's to $10^{-4}$ (same schedule), POT's
# approaches the converged mode's as its iterations grow.
#
# `GeneralizedLoss`'s default gradient (`grad='paper'`) rebuilds the plan from $g^*$ and one more
# $u$-half-step, while the official code uses $P=e^{(F\oplus G-C)/\varepsilon}ab^\top$ directly and detaches
# $P\mathbf 1$ in the pixel term (`grad='official'`). After the short official schedule the two plans differ a
# lot: on `make_problem(8, 500)` the loss is 3.49 with the first and 2.37 with the second (2.02 and 2.00 in
# converged mode). So `reference_loss(..., grad=...)` can follow either; by default it follows the loss it is
# given.
#
# `_setup_image` places the pixels, the masses and the cost of one image from the loss's settings itself,
# rather than through `GeneralizedLoss.problem`, so that a mistake there shows up as a difference from the
# references.

# %%
#| export
def _setup_image(gl:GeneralizedLoss, # the loss whose problem is set up (grid, scale, cost)
                 density:torch.Tensor, # `(1, 1, h, w)`
                 pts:torch.Tensor, # `(m, 2)` heads in input pixels
                 cost_fn:Callable|None=None # cost on scaled coordinates; None: `gl`'s (`coordinate_cost`)
                ) -> tuple: # scaled `x (1,n,2)`, `y (1,m,2)`, masses `a (1,n)`, `b (1,m)`, cost, cost function
    "Scaled grid, masses, cost function and cost of one image for the reference solvers."
    _, _, h, w = density.shape
    dt = torch.float64 if density.dtype == torch.float64 else torch.float32
    rows, cols = (torch.arange(k, dtype=dt, device=density.device) for k in (h, w))
    ys, xs = torch.meshgrid(rows, cols, indexing='ij')
    grid = gl.stride * (torch.stack([xs.flatten(), ys.flatten()], -1) + gl.grid_offset)   # (s(j+o), s(i+o))
    H = float(gl.image_height) if gl.image_height is not None else float(h * gl.stride)
    cfn = cost_fn or coordinate_cost(gl.cost, gl.scale, H, gl.eta, gl.eta_range, gl.shift)
    x, y = grid[None] / gl.scale, pts.to(dt)[None] / gl.scale
    a, b = density.reshape(1, h * w).to(dt), torch.ones(1, len(pts), dtype=dt, device=density.device)
    return x, y, a, b, cfn(x, y), cfn


# %%
dens_1, pts_1 = make_problem(1, 5, size=6, stride=4, seed=2)
gl_1 = GeneralizedLoss(scale=24., stride=4)
x_, y_, a_, b_, C_, _ = _setup_image(gl_1, dens_1, pts_1[0])
test_close(x_[0] * 24., pixel_centres(6, 6, stride=4))            # pixel centres, row-major
test_eq(a_[0], dens_1.flatten())
test_eq(b_, torch.ones(1, 5))
test_close(C_, cost_matrix(6, 6, pts_1[0][None], stride=4, scale=24.), eps=1e-5)


# %%
#| export
def _divergence_written_out(p:torch.Tensor, # reconstructed marginal
                            q:torch.Tensor, # reference marginal
                            kind:Divergence # 'l2' (squared), 'l1' or 'kl' (generalized)
                           ) -> torch.Tensor: # a scalar
    "Sum over entries of $(p-q)^2$, $|p-q|$ or $p\\log(p/q)-p+q$."
    if check_choice(kind, Divergence, 'kind') == 'l2': return ((p - q) ** 2).sum()
    if kind == 'l1': return (p - q).abs().sum()
    return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()) - p + q).sum()


# %%
p_, q_ = torch.tensor([1., 2., 0.5]), torch.tensor([0.5, 2., 1.])
for kind in ('l2', 'l1', 'kl'):
    test_close(_divergence_written_out(p_, q_, kind), divergence(p_[None], q_[None], kind)[0], eps=1e-6)
test_fail(lambda: _divergence_written_out(p_, q_, 'tv'), contains="kind must be one of l2, l1, kl")


# %%
#| export
def reference_terms(a:torch.Tensor, # `(n,)` density of one image (may require grad)
                    b:torch.Tensor, # `(m,)` point masses
                    C:torch.Tensor, # `(n, m)` cost
                    f:torch.Tensor, # `(n,)` potential (detached)
                    g:torch.Tensor, # `(m,)` potential (detached)
                    eps:float, # temperature of the plan
                    tau:float=0.1, # weight of the pixel and point terms
                    tau_solve:float=0.5, # KL penalty the potentials were solved with (the paper's half-step)
                    grad:GradRecipe='paper', # 'paper': one more u-half-step; 'official': P1 detached in D1
                    d_pixel:Divergence='l2', d_point:Divergence='l1', # the divergences D1 and D2
                   ) -> dict: # scalars: transport, entropy, pixel, point
    "The terms of Eq. 1 of one image, from a plan rebuilt from dual potentials (geomloss's convention)."
    f, g, C = f.detach(), g.detach(), C.detach()
    if check_choice(grad, GradRecipe, 'grad') == 'paper':   # f_i = λ softmin_ε(C, log b + g/ε)_i (Eq. 6)
        lam = tau_solve / (tau_solve + eps)
        f = -lam * eps * torch.logsumexp(torch.log(b)[None, :] + (g[None, :] - C) / eps, 1)
    log_k = (f[:, None] + g[None, :] - C) / eps                  # log P_ij - log a_i - log b_j
    P = a[:, None] * b[None, :] * torch.exp(log_k)
    log_p = log_k + a.clamp_min(1e-30).log()[:, None] + torch.log(b)[None, :]
    row, col = P.sum(1), P.sum(0)
    return dict(transport=(C * P).sum(), entropy=eps * (P * log_p).sum(),
                pixel=tau * _divergence_written_out(row.detach() if grad == 'official' else row, a, d_pixel),
                point=tau * _divergence_written_out(col, b, d_point))

# %% [markdown]
# With potentials that are zero and a zero cost, the plan is $a\,b^\top$: its transport is zero, its row sums
# are $a\sum_j b_j$ and its column sums $b\sum_i a_i$.

# %%
a_2, b_2 = torch.tensor([0.2, 0.3]), torch.tensor([1., 1., 1.])
t_ = reference_terms(a_2, b_2, torch.zeros(2, 3), torch.zeros(2), torch.zeros(3), 0.1, grad='official')
test_close([t_['transport'], t_['pixel'], t_['point']],
           [0., 0.1 * ((3 * a_2 - a_2) ** 2).sum(), 0.1 * (0.5 * b_2 - b_2).abs().sum()])
test_fail(lambda: reference_terms(a_2, b_2, torch.zeros(2, 3), torch.zeros(2), torch.zeros(3), 0.1, grad='x'),
          contains='grad must be one of paper, official')

# %%
#| export
ReferenceSolver = Literal['geomloss', 'pot']   # the solvers `reference_loss` takes the potentials from

def reference_loss(gl:GeneralizedLoss, # a loss (reference='product') that defines the problem and the terms
                   density:torch.Tensor, # `(B, 1, h, w)`
                   points:Sequence[torch.Tensor], # B tensors `(m_b, 2)`
                   solver:ReferenceSolver='geomloss', # 'geomloss' or 'pot'
                   pot_iters:int=100, # POT iterations
                   diagnostics:dict|None=None, # if a dict: gets iterations, marginal_error, exp_entries
                   grad:GradRecipe|None=None, # plan and gradient: 'paper' or 'official'; None: that of `gl`
                   cost_fn:Callable|None=None, # cost `(1, n, 2), (1, m, 2) -> (1, n, m)`; None: `gl`'s
                  ) -> torch.Tensor:
    "Batch mean of the generalized loss with the plan of each image from geomloss or POT (per-image loop)."
    if gl.reference != 'product':
        raise ValueError("the reference solvers use the product reference (geomloss, POT 'kl')")
    check_choice(solver, ReferenceSolver, 'solver')
    grad = grad or gl.grad
    losses, its, errs, entries = [], [], [], 0
    for k in range(len(density)):
        if len(points[k]) == 0:          # nothing to transport: P = 0, only the pixel term D1(0|a) is left
            a = density[k].reshape(-1)
            zero = torch.zeros_like(a)
            terms = dict(transport=zero.sum(), entropy=zero.sum(), point=zero.sum(),
                         pixel=gl.tau * _divergence_written_out(zero, a, gl.d_pixel))
            losses.append(sum(terms[t] for t in gl.terms))
            continue
        grid, y, a, b, C, cfn = _setup_image(gl, density[k:k + 1], points[k], cost_fn)
        if solver == 'geomloss':
            stats = {} if diagnostics is not None else None
            f, g = geomloss_potentials(a, grid, b, y, cfn, blur=gl.eps, reach=gl.tau_solve,
                                       scaling=gl.scaling, stats=stats)
            n_it = stats['iterations'] if stats is not None else 0
        else:
            f, g = pot_potentials(a[0], b[0], C[0], gl.eps, gl.tau_solve, n_iter=pot_iters)
            f, g, n_it = f[None].to(C.dtype), g[None].to(C.dtype), pot_iters
        terms = reference_terms(a[0], b[0], C[0], f[0], g[0], gl.eps, gl.tau, gl.tau_solve, grad, gl.d_pixel,
                                gl.d_point)
        losses.append(sum(terms[t] for t in gl.terms))
        if diagnostics is not None:
            its.append(n_it)
            entries += n_it * 2 * C.shape[1] * C.shape[2]
            errs.append(float(uot_marginal_error(a.double(), b, C, f, g, gl.eps, gl.tau_solve)))
    if diagnostics is not None:
        diagnostics.update(iterations=max(its, default=0), marginal_error=max(errs, default=0.),
                           exp_entries=entries)
    return torch.stack(losses).mean()

# %% [markdown]
# POT run to convergence gives `GeneralizedLoss(mode='converged')`, value and gradient, for both gradient
# recipes (so `reference_terms` and the loss's own terms agree), and an image without points costs only its
# pixel term $\tau\|a\|_2^2$. The check that the geomloss reference equals `GeneralizedLoss(mode='official')`
# (value and gradient, both recipes, the cost written out there with `torch.cdist`) is
# `test_geomloss_reference_equals_official_mode` in `tests/test_bench.py`.

# %%
dens_s, pts_s = make_problem(2, 12, size=12, seed=3)
gl_s = GeneralizedLoss(scale=96.)
diag = {}
for grad in ('paper', 'official'):
    dd1, dd2 = dens_s.clone().requires_grad_(), dens_s.clone().requires_grad_()
    l_pot = reference_loss(gl_s, dd1, pts_s, 'pot', pot_iters=3000, diagnostics=diag, grad=grad)
    l_pot.backward()
    l_conv = GeneralizedLoss(scale=96., mode='converged', tol=1e-6, grad=grad)(dd2, pts_s)
    l_conv.backward()
    test_close(l_pot.item(), l_conv.item(), eps=3e-6 * abs(l_conv.item()))               # measured 5e-7
    test_close(dd1.grad, dd2.grad, eps=5e-5 * dd2.grad.abs().max().item())               # measured 1.2e-5
    assert diag['marginal_error'] < 1e-5 and diag['iterations'] == 3000, diag
test_eq(gl_s.grad, 'paper')                                             # the caller's loss is left alone
l_empty = reference_loss(gl_s, dens_s[1:], [torch.zeros(0, 2)], 'pot').item()
test_close(l_empty, 0.1 * (dens_s[1] ** 2).sum().item(), eps=1e-6)
test_fail(lambda: reference_loss(gl_s, dens_s, pts_s, 'sinkhorn'),
          contains='solver must be one of geomloss, pot')

# %% [markdown]
# ## The diagnostics of `GeneralizedLoss`
#
# The diagnostics of `GeneralizedLoss` come from its own solve: the potentials it returns are checked with
# `uot_marginal_error` (the same function as for the references), and the iteration count is the solver's.
# They are checked against the other side: geomloss's potentials on the problem `reference_loss` sets up
# itself give the same loss, the same marginal error and the same count of soft-min pairs (counted in
# geomloss's own calls), batched or one image at a time. `exp_entries` is the number of `exp` the iterations
# need at least: iterations × $2nm$, summed over solves.

# %%
#| export
def gl_diagnostics(gl:GeneralizedLoss, # the loss evaluated
                   density:torch.Tensor, # `(B, 1, h, w)`
                   points:Sequence[torch.Tensor], # B tensors `(m_b, 2)`
                   per_image:bool=False, # solve one image at a time (the loop method)
                  ) -> dict: # loss, iterations, marginal_error, exp_entries
    "Loss value, iterations, marginal error and exp count of one `GeneralizedLoss` evaluation."
    chunks = ([(density[k:k + 1], list(points[k:k + 1])) for k in range(len(density))] if per_image
              else [(density, list(points))])
    losses, its, errs, entries = [], [], [], 0
    with torch.no_grad():
        for d, p in chunks:
            t = gl.solve(d, p)
            losses.append(gl.terms_from(t)['total'])
            pot, C = t.pot, t.C
            its.append(pot.iterations)
            entries += pot.iterations * 2 * C.shape[0] * C.shape[1] * C.shape[2]
            if C.numel(): errs.append(float(uot_marginal_error(t.a.double(), t.b, C, pot.f, pot.g, gl.eps,
                                                              gl.tau_solve, mask_b=t.mask,
                                                              reference=gl.reference).max()))
    return dict(loss=float(torch.cat(losses).mean()), iterations=max(its),
                marginal_error=max(errs, default=0.), exp_entries=entries)


# %%
dg, dl = gl_diagnostics(gl_s, dens_s, pts_s), gl_diagnostics(gl_s, dens_s, pts_s, per_image=True)
geo = {}
l_geo = reference_loss(gl_s, dens_s, pts_s, 'geomloss', diagnostics=geo).item()
for d in (dg, dl):   # measured: 5e-7 (loss) and 4e-7 (marginal error) relative
    test_close(d['loss'], l_geo, eps=3e-6 * l_geo)
    test_close(d['marginal_error'], geo['marginal_error'], eps=2e-6 * geo['marginal_error'])
    test_eq((d['iterations'], d['exp_entries']), (geo['iterations'], 12 * 2 * 2 * 144 * 12))
test_eq(geo['iterations'], 12)

# %% [markdown]
# ## The official trainer's recipe
#
# The benchmark's geomloss baseline is the loss the official trainer computes, written as it writes it and
# nothing more, so that its time is what someone who replaces the official loss would save: per image, one
# `SamplesLoss('sinkhorn', p=1, blur=0.01, reach=0.5, scaling=0.5, debias=False, backend='tensorized',
# potentials=True, cost=...)` call with the fixed exponential cost $e^{d/0.6}-1$ on coordinates divided by the
# crop size, the pixel grid at $s(j+1), s(i+1)$ (the trainer's), the plan rebuilt from the potentials,
# $P=e^{(F\oplus G-C)/\varepsilon}\,a\,b^\top$ (detached but for the density factor), and
# $\langle C,P\rangle+0.1\,\|P\mathbf 1-a\|_2^2+0.1\,\|P^\top\mathbf 1-b\|_1$ with $P\mathbf 1$ detached in
# the pixel term, averaged over the batch; an image without heads adds $1.2\,|\sum a|$. It is the objective of
# `GeneralizedLoss(**RECIPE_KWARGS)` in official mode, which the benchmark's `gl_*` rows compute
# (`test_official_recipe_is_the_trainers` in `tests/test_bench.py` compares the value and the gradient with a
# literal transcription of the trainer's lines on one batch, and with `GeneralizedLoss`).

# %%
#| export
RECIPE_KWARGS = dict(cost='exp', eta=0.6, grad='official', terms=('transport', 'pixel', 'point'),
                     grid_offset=1.0, empty='official')   # the `GeneralizedLoss` of `official_recipe_loss`

def official_recipe_loss(density:torch.Tensor, # `(B, 1, h, w)` predicted density
                         points:Sequence[torch.Tensor], # B tensors `(m_b, 2)`: heads in input pixels
                         crop:float=512., # crop side: coordinates are divided by it
                         stride:int=8, # input pixels per map pixel
                         diagnostics:dict|None=None, # if a dict: gets iterations, marginal_error, exp_entries
                        ) -> torch.Tensor:
    "The official trainer's loss: geomloss's potentials per image, the plan, transport + pixel L2 + point L1."
    from geomloss import SamplesLoss
    cost = coordinate_cost('exp', eta=0.6)                     # exp(d / 0.6) - 1 on coordinates / crop
    solver = SamplesLoss('sinkhorn', p=1, blur=0.01, reach=0.5, scaling=0.5, debias=False,
                         backend='tensorized', potentials=True, cost=cost)
    B, _, h, w = density.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=density.device) * stride + stride,
                            torch.arange(w, device=density.device) * stride + stride, indexing='ij')
    X = torch.stack([xs.flatten(), ys.flatten()], -1)[None].to(density.dtype) / crop
    total, its, errs, entries = 0., [], [], 0
    for k in range(B):
        A = density[k].reshape(1, -1)
        if len(points[k]) == 0:
            total = total + 1.2 * A.sum().abs()
            continue
        Y = points[k][None].to(density.dtype) / crop
        b = torch.ones(1, Y.shape[1], dtype=density.dtype, device=density.device)
        counter = _CountCalls('logsumexp')
        with counter if diagnostics is not None else contextlib.nullcontext():
            F_, G_ = solver(A.detach(), X, b, Y)
        C = cost(X, Y)
        P = torch.exp((F_[:, :, None] + G_[:, None, :] - C).detach() / 0.01) * A[:, :, None] * b[:, None, :]
        pixel, point = ((P.sum(2).detach() - A) ** 2).sum(), (P.sum(1) - b).abs().sum()
        total = total + (C * P).sum() + 0.1 * pixel + 0.1 * point
        if diagnostics is not None:
            pairs = counter.calls // 2
            its.append(pairs)
            entries += pairs * 2 * C.shape[1] * C.shape[2]
            f, g = F_.reshape(A.shape), G_.reshape(b.shape)
            errs.append(float(uot_marginal_error(A.detach().double(), b, C, f, g, 0.01, 0.5)))
    if diagnostics is not None:
        diagnostics.update(iterations=max(its, default=0), marginal_error=max(errs, default=0.),
                           exp_entries=entries)
    return total / B

# %% [markdown]
# On a small batch with an image without heads, the recipe's value and gradient are those of `GeneralizedLoss`
# in official mode with `RECIPE_KWARGS`, and its diagnostics count geomloss's 12 pairs.

# %%
dens_r, pts_r = make_problem(3, 20, size=12, seed=4)
pts_r[1] = pts_r[1][:0]
d1, d2 = dens_r.clone().requires_grad_(), dens_r.clone().requires_grad_()
info_r = {}
l_rec = official_recipe_loss(d1, pts_r, crop=96., diagnostics=info_r)
l_rec.backward()
l_gl = GeneralizedLoss(mode='official', scale=96., **RECIPE_KWARGS)(d2, pts_r)
l_gl.backward()
test_close(l_rec.item(), l_gl.item(), eps=1e-5 * abs(l_gl.item()))
test_close(d1.grad, d2.grad, eps=1e-5 * d2.grad.abs().max().item())
test_eq(info_r['iterations'], 12)
assert 0 < info_r['marginal_error'] < 1

# %%
#| hide
import nbdev
nbdev.nbdev_export()
