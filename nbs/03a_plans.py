# %% [markdown]
# # Transport plans
#
# > The plan rebuilt from the solver's potentials (Eq. 5), differentiable in the density as the paper prescribes (Sec. 3.3), the primal objective of Eq. 1 and the plan's statistics without storing it; checked against POT, the first-order conditions and finite differences.

# %%
#| default_exp plans

# %%
#| export
from __future__ import annotations
import math
from dataclasses import dataclass
import torch
from uotcrowd.kernels import (LN2, BLOCK, log_weights, work_dtype, no_autocast, per_image, softmin, damping,
                              reference_weights, Problem, setup_problem, masked_cost, block_col_sums,
                              block_row_dots)
from uotcrowd.sinkhorn import Potentials, uot_potentials

# %%
#| hide
import numpy as np
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.sinkhorn import max_diameter

# %% [markdown]
# The solver (`uotcrowd.sinkhorn`) returns the dual potentials $(f, g)$ of a batch of problems; everything a
# loss or a check needs of the primal side is built from them here.

# %% [markdown]
# ## Plans, and the gradient of the paper
#
# The plan is rebuilt from the potentials: $\log P_{ij}=\log\mu_i+\log\nu_j+(f_i+g_j-C_{ij})/\varepsilon$ (Eq.
# 5).
#
# **Gradient (Sec. 3.3).** The paper holds $\boldsymbol v^*$ fixed and treats $\boldsymbol u^*(\boldsymbol a)$
# as a function of the density:
# $\mathbf P(\boldsymbol a)=\mathrm{diag}(\boldsymbol u^*(\boldsymbol a))\mathbf K \mathrm{diag}(\boldsymbol
# v^*)$.
# So we So we iterate without autograd and take *one* differentiable $u$-half-step (Eq. 6),
# $f_i(\boldsymbol a)=\lambda_a\big(\varepsilon\log\frac{a_i}{\mu_i} +\mathrm{softmin}_\varepsilon(\mathbf
# C,\log\nu+g^*/\varepsilon)_i\big)$.
# Then $P_{ij}(\boldsymbol a)=r_i(\boldsymbol a)\,E_{ij}$ with a row factor
# $r_i=\mu_i\,(a_i/\mu_i)^{\lambda_a}$ and a constant
# $E_{ij}=\nu_j\exp\big((g^*_j-C_{ij})/\varepsilon-\lambda_a S_i\big)$, $S_i=-\mathrm{softmin}_i/\varepsilon$:
#
# * product reference ($\mu=a$): $r_i=a_i$. The $u$-step does not depend on $\boldsymbol a$ at all, the plan
#   is linear in the density, and the paper's gradient coincides with the official code's;
# * uniform reference ($\mu=1$, Eq. 6 literally): $r_i=a_i^{\lambda_a}$.
#
# `grad='official'`: potentials detached, the gradient flows only through the density factor of the plan,
# $P_{ij}=a_i\cdot\big(P^*_{ij}/a^*_i\big)$, as the official code builds `PI = exp((F+G-C)/eps) * A * b`.
# `grad='none'` returns a detached plan. Memory does not grow with the iterations: the autograd graph holds
# one row factor and one constant `(B, n, m)` factor. (The gradient with respect to the cost is not
# propagated.) Since the constant factor can in degenerate cases (zero density under the uniform reference)
# have a large exponent, its exponent is clamped at 40 (this only happens where the density vanishes on a
# whole neighbourhood of a head: the true derivative of the plan is then infinite, since the KL solve makes
# $P\propto\sqrt{a}$ there; the clamp keeps values and gradients finite in float32 even after summing over
# thousands of entries); it is also clamped at $-80$ (entries below $e^{-80}\approx 2\cdot 10^{-35}$ are
# negligible, and CPU `exp` is much faster above the underflow range); padded entries are set to exactly 0.
# With `grad='paper'` the plan is the one after the extra $u$-half-step,
# $\mathrm{diag}(\boldsymbol u(\boldsymbol a; v^*))\mathbf K\mathrm{diag}(v^*)$; at a fixed point this is the
# plan of $(f^*, g^*)$, after the official 12-pair schedule it is one half-step further.

# %%
#| export
def plan_row_factor(a:torch.Tensor, # `(B, n)` masses (may require grad)
                    mask_a:torch.Tensor|None, # `(B, n)` bool, real sources
                    eps:float, tau_a:float|None, # temperature and row KL penalty of the solve
                    grad:str, # 'paper', 'official' or 'none'
                    reference:str # 'product' or 'uniform'
                   ) -> torch.Tensor: # `(B, n)`
    "The row factor $r$ of $P_{ij}=r_iE_{ij}$: $a$, or $a^{\\lambda_a}$ (paper's gradient, uniform ref.)."
    masses = a.clamp_min(0) if mask_a is None else a.clamp_min(0) * mask_a
    r = (masses + 1e-30) ** damping(eps, tau_a) if grad == 'paper' and reference == 'uniform' else masses
    return r.detach() if grad == 'none' else r


# %%
a_ = torch.tensor([[0.25, -1., 4.]], requires_grad=True)
test_eq(plan_row_factor(a_, None, 0.1, 0.5, 'official', 'uniform').detach(), torch.tensor([[0.25, 0., 4.]]))
r_ = plan_row_factor(a_, None, 0.5, 0.5, 'paper', 'uniform').detach()
test_close(r_, torch.tensor([[0.5, 1e-15, 2.]]), eps=1e-6)
r_ = plan_row_factor(a_, torch.tensor([[True, True, False]]), 0.1, 0.5, 'paper', 'product').detach()
test_eq(r_[0, 2].item(), 0.)
assert plan_row_factor(a_, None, 0.1, 0.5, 'official', 'product').requires_grad
assert not plan_row_factor(a_, None, 0.1, 0.5, 'none', 'product').requires_grad


# %%
#| export
def plan_problem(a, b, C, # the masses (`a` may require grad) and the cost
                 pot:Potentials, tau_a, mask_a, mask_b, # as for `plan_factors`
                 grad:str, block=BLOCK):
    "Check `grad`; `a` in the working precision and the `Problem` a plan is rebuilt from."
    if grad not in ('paper', 'official', 'none'):
        raise ValueError(f"grad must be 'paper', 'official' or 'none', got {grad!r}")
    a = a.to(work_dtype(a, b, C))
    with torch.no_grad(), no_autocast(C.device):
        return a, setup_problem(a.detach(), b.detach(), C, tau_a, tau_a, mask_a, mask_b, pot.reference, block)


# %%
no_pot_ = Potentials(None, None, 0.1)
test_fail(lambda: plan_problem(a_, torch.ones(1, 2), torch.rand(1, 3, 2), no_pot_, 0.5, None,
                               None, 'exact'), contains="'paper', 'official' or 'none'")


# %% [markdown]
# The factors of the plan of converged potentials are Eq. 5 written out:

# %%
#| export
def plan_factors(a:torch.Tensor, # `(B, n)` masses (may require grad)
                 b:torch.Tensor, # `(B, m)`
                 C:torch.Tensor, # `(B, n, m)`
                 pot:Potentials, # from `uot_potentials` on the same problem
                 tau_a:float|None=0.5, # row KL penalty used to solve
                 mask_a=None, mask_b=None,
                 grad:str='paper' # 'paper' (v* fixed, u*(a)), 'official' (density factor only) or 'none'
                ) -> tuple[torch.Tensor, torch.Tensor]: # row factor `r` `(B, n)` and constant `E` `(B, n, m)`
    "Factor the plan as `P = r[..., None] * E` where only `r` depends (differentiably) on `a`."
    a, problem = plan_problem(a, b, C, pot, tau_a, mask_a, mask_b, grad)
    eps, dtype = pot.eps, problem.cost.dtype
    with torch.no_grad(), no_autocast(C.device):
        cost = masked_cost(problem)
        f, g = pot.f.to(dtype), pot.g.to(dtype)
        if grad == 'paper': log_row = damping(eps, tau_a) * softmin(eps, cost, problem.log_nu + g / eps) / eps
        else: log_row = problem.log_mu + f / eps - log_weights(a.detach(), mask_a)
        log_E = torch.mul(cost, -1. / eps)                                # one (B, n, m) buffer, in place
        log_E.add_((problem.log_nu + g / eps)[:, None, :]).add_(log_row[:, :, None])
        E = log_E.clamp_(min=-80., max=40.).exp_()                        # no underflow path; see `softmin`
        if mask_b is not None: E.masked_fill_(~mask_b[:, None, :], 0.)
        if mask_a is not None: E.masked_fill_(~mask_a[:, :, None], 0.)
    with no_autocast(C.device): r = plan_row_factor(a, mask_a, eps, tau_a, grad, pot.reference)
    return r, E


# %%
g_ = torch.Generator().manual_seed(5)
a_, b_ = torch.rand(2, 12, generator=g_, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
C_ = torch.rand(2, 12, 3, generator=g_, dtype=torch.float64)
pot_ = uot_potentials(a_, b_, C_, 0.1, 0.5, mode='converged', tol=1e-12, max_iter=10000)
eq5_ = a_[:, :, None] * b_[:, None] * torch.exp((pot_.f[:, :, None] + pot_.g[:, None] - C_) / 0.1)
r_, E_ = plan_factors(a_, b_, C_, pot_, 0.5, grad='official')
test_close(r_[:, :, None] * E_, eq5_, eps=1e-12)
test_eq(r_, a_)


# %% [markdown]
# `uot_plan` multiplies them; a row of the plan with the paper's gradient at a fixed point sums to the
# first-order condition $a_ie^{-f_i/\tau_a}$.

# %%
#| export
def uot_plan(a:torch.Tensor, # `(B, n)` source masses (may require grad)
             b:torch.Tensor, # `(B, m)` target masses
             C:torch.Tensor, # `(B, n, m)` cost
             eps:float=0.01, # entropic temperature
             tau_a:float|None=0.5, # row KL penalty
             tau_b:float|None=None, # column KL penalty (default `tau_a`)
             mask_a=None, mask_b=None, # bool masks of real entries
             grad:str='paper', # 'paper', 'official' or 'none' (see above)
             potentials:Potentials|None=None, # reuse already computed potentials
             **kwargs # passed on to `uot_potentials` (mode, reference, diameter, tol, ...)
            ) -> torch.Tensor: # `(B, n, m)` transport plan
    "Optimal plan of the batched unbalanced OT problem, differentiable in `a` as the paper prescribes."
    squeeze = C.dim() == 2
    if squeeze: a, b, C = a[None], b[None], C[None]
    pot = potentials or uot_potentials(a, b, C, eps, tau_a, tau_b, mask_a, mask_b, **kwargs)
    r, E = plan_factors(a, b, C, pot, tau_a, mask_a, mask_b, grad=grad)
    P = r[:, :, None] * E
    return P[0] if squeeze else P


# %%
P_ = uot_plan(a_, b_, C_, 0.1, 0.5, potentials=pot_, grad='official')
test_close(P_, eq5_, eps=1e-12)
test_close(uot_plan(a_, b_, C_, 0.1, 0.5, potentials=pot_).sum(2), a_ * torch.exp(-pot_.f / 0.5), eps=1e-10)
one_pot_ = Potentials(pot_.f[:1], pot_.g[:1], 0.1)
test_eq(uot_plan(a_[0], b_[0], C_[0], 0.1, 0.5, potentials=one_pot_).shape, (12, 3))


# %% [markdown]
# The primal objective of Eq. 1 (with KL for $D_1$, $D_2$), for checks against other solvers:

# %%
#| export
def generalized_kl(p:torch.Tensor, # non-negative
                   q:torch.Tensor # non-negative reference, same shape as `p`
                  ) -> torch.Tensor: # entry-wise terms: sum them for $KL(p|q)$
    "Entries $p\\log(p/q)-p+q$ of the generalized KL divergence (0·log 0 = 0)."
    return torch.xlogy(p, p) - torch.xlogy(p, q) - p + q


# %%
test_close(generalized_kl(torch.tensor([0., 1., 2.]), torch.ones(3)).sum(), 2 * math.log(2), eps=1e-6)


# %%
#| export
def kl_sum(p:torch.Tensor, q:torch.Tensor) -> torch.Tensor:
    "$\\mathrm{KL}(p|q)$ over the last dim, `q` floored at the dtype's smallest normal number."
    return generalized_kl(p, q.clamp_min(1e-300 if q.dtype == torch.float64 else 1e-38)).sum(-1)


# %%
kl_ = kl_sum(torch.tensor([[1., 0.]]), torch.tensor([[0., 1.]]))      # q = 0 floored at 1e-38
test_close(kl_, torch.tensor([38 * math.log(10)]), eps=1e-3)


# %%
#| export
def uot_value(a:torch.Tensor, b:torch.Tensor, C:torch.Tensor, # as for `uot_plan`
              eps:float=0.01, tau_a:float|None=0.5, tau_b:float|None=None,
              mask_a=None, mask_b=None, plan:torch.Tensor|None=None, reference:str='product',
              **kwargs) -> torch.Tensor: # `(B,)` primal objectives
    "The primal objective of Eq. 1 with KL penalties and $\\varepsilon\\mathrm{KL}(P|\\mu\\otimes\\nu)$."
    tau_b = tau_a if tau_b is None else tau_b
    if plan is None:
        plan = uot_plan(a, b, C, eps, tau_a, tau_b, mask_a, mask_b, reference=reference, **kwargs)
    mu, nu = reference_weights(a, b, mask_a, mask_b, reference)
    a = a if mask_a is None else a * mask_a
    b = b if mask_b is None else b * mask_b
    cost = C if mask_b is None else C.masked_fill(~mask_b[:, None], 0.)
    reference_plan = (mu[:, :, None] * nu[:, None, :]).flatten(1)
    value = (cost * plan).flatten(1).sum(1) + eps * kl_sum(plan.flatten(1), reference_plan)
    if tau_a is not None and not math.isinf(tau_a): value = value + tau_a * kl_sum(plan.sum(2), a)
    if tau_b is not None and not math.isinf(tau_b): value = value + tau_b * kl_sum(plan.sum(1), b)
    return value


# %%
v0_ = uot_value(a_, b_, C_, 0.1, 0.5, plan=uot_plan(a_, b_, C_, 0.1, 0.5, potentials=pot_, grad='none'))
for scale_ in (0.99, 1.01): assert (uot_value(a_, b_, C_, 0.1, 0.5, plan=scale_ * P_) > v0_).all()


# %% [markdown]
# ## The plan's statistics without the plan
#
# A loss rarely needs the plan itself: Eq. 1 needs $\langle\mathbf C,\mathbf P\rangle$, $\sum P\log P$,
# $\mathbf P\mathbf 1$ and $\mathbf P^\top\mathbf 1$. With $P_{ij}=r_iE_{ij}$ (`plan_factors`) all of them
# follow from $r$ and four reductions of $E$: per row $\sum_jE_{ij}$, $\sum_jC_{ij}E_{ij}$ and
# $\sum_jE_{ij}\log E_{ij}$ (constants), and per column $\sum_ir_iE_{ij}=(\mathbf P^\top\mathbf1)_j$,
# differentiable in $r$ with the derivative $E\,\bar{\boldsymbol c}$ for an incoming gradient
# $\bar{\boldsymbol c}$. `plan_stats` computes them in one pass over the cost (the pass of the problem's
# strategy, with $E_{ij}=K_{ij}\,c_i$: the row factor $c_i$ comes from the same block's row sums for
# `grad='paper'`) and the backward recomputes $E$ block by block, so no `(B, n, m)` tensor is stored besides
# the cost, which autograd keeps until the backward. The clamps are those of `plan_factors` (at $e^{40}$
# above; below, entries under $c_i2^{-120}$ are that small number instead of $c_ie^{-80}$: both negligible);
# images whose sums fail the checks of the passes, or are not finite, are computed from `plan_factors`
# instead.

# %%
#| export
@dataclass
class PlanStats:
    "Row factor and reductions of a plan $P_{ij}=r_iE_{ij}$ (`plan_factors`), computed without storing it."
    r: torch.Tensor  # (B, n) row factor, differentiable in `a`
    rows: torch.Tensor  # (B, n) sum_j E_ij
    cost: torch.Tensor  # (B, n) sum_j C_ij E_ij
    xlogx: torch.Tensor|None  # (B, n) sum_j E_ij log E_ij (None when not asked for)
    cols: torch.Tensor  # (B, m) sum_i r_i E_ij (the plan's column sums), differentiable through `r`


# %%
stats_ = PlanStats(*(torch.ones(1, 2) for _ in range(3)), None, torch.ones(1, 3))
test_eq((stats_.xlogx, stats_.cols.shape), (None, (1, 3)))

# %% [markdown]
# On a padded batch in blocks of 64 entries, the blocks of $E$ for the official gradient ($c_i=\mu_i/a_i$) are
# those of the stored plan's factor of `plan_factors`:

# %%
#| export
PLAN_CAP = math.exp(40.)  # largest entry of E: its exponent is clamped at 40, as in `plan_factors`

# %%
assert PLAN_CAP < torch.finfo(torch.float32).max / 1e20                 # a sum of 1e20 of them is finite


# %%
#| export
def plan_blocks(problem:Problem, f, g, eps, # potentials and `(B,)` temperatures
                log_factor:torch.Tensor, # `(B, n)` log c (for `lam`: written here, block by block)
                keep:bool=False, # also yield the exponents (base 2) of K
                lam:float|None=None, # the paper's gradient: c_i = exp(-λ LSE_i - f_i/ε) from the row sums
                row_sums:torch.Tensor|None=None, # `(B, n)`, with `lam`: receives the row sums of K
                mask_a:torch.Tensor|None=None): # `(B, n)` bool, real sources (with `lam`: others get c = 0)
    "Yield `(block, E, X)`: the blocks of $E_{ij}=K_{ij}c_i$, clamped at `PLAN_CAP`, 0 on padded columns."
    for block, _, K, X in problem.kernels.exponentials(problem, f, g, eps, keep):
        images, rows = block.images, block.rows
        if lam is not None:                          # LSE_i = log sum_j K_ij - f_i/ε
            sums, f_eps = K.sum(2), f[images, rows] / eps[images, None]
            row_sums[images, rows] = sums
            log_c = -lam * (sums.log() - f_eps) - f_eps
            if mask_a is not None: log_c = torch.where(mask_a[images, rows], log_c, -1e30)
            log_factor[images, rows] = log_c
        E = K.mul_(log_factor[images, rows, None].exp()).clamp_max_(PLAN_CAP)
        if block.padded is not None: E.masked_fill_(block.padded, 0.)
        yield block, E, X


# %%
g = torch.Generator().manual_seed(1)                                 # the padded batch of the solver's loop check
ticks16 = torch.arange(16.)
grid16 = torch.stack(torch.meshgrid(ticks16, ticks16, indexing='xy'), -1).reshape(1, -1, 2) / 16
pts16 = torch.rand(3, 12, 2, generator=g)
mk16 = torch.tensor([[1] * 12, [0] * 12, [1] * 5 + [0] * 7]).bool()
C16 = torch.exp(torch.cdist(grid16.expand(3, -1, -1), pts16) / 0.6) - 1

# %%
g = torch.Generator().manual_seed(3)
As = torch.rand(3, 256, generator=g) * 0.05
pot16 = uot_potentials(As, mk16.float(), C16, 0.01, 0.5, mask_b=mk16)
pr16 = setup_problem(As, mk16.float(), C16, 0.5, 0.5, mask_b=mk16, block=64)
log_factor16 = pr16.log_mu - log_weights(As)
eps16 = per_image(0.01, 3, C16)
_, E16 = plan_factors(As, mk16.float(), C16, pot16, 0.5, mask_b=mk16, grad='official')
E_blocks = torch.zeros_like(E16)
for block, E, _ in plan_blocks(pr16, pot16.f, pot16.g, eps16, log_factor16):
    E_blocks[block.images, block.rows, :block.columns] = E
test_close(E_blocks, E16, eps=1e-5 * E16.max())


# %% [markdown]
# The column sums are an autograd function of $r$ whose backward recomputes $E$ by the blocks of `plan_blocks`
# (and uses the stored $E$ of the images computed by `plan_factors`):

# %%
#| export
class PlanColumns(torch.autograd.Function):
    "Column sums $\\sum_ir_iE_{ij}$ (computed by `plan_stats`); the backward recomputes $E$ by blocks."
    @staticmethod
    def forward(ctx, r, cols, problem, f, g, eps, log_factor, exact):
        ctx.args = problem, f, g, eps, log_factor, exact
        return cols.clone()
    @staticmethod
    def backward(ctx, grad):
        problem, f, g, eps, log_factor, exact = ctx.args
        out = torch.zeros_like(f)
        with torch.no_grad():
            for block, E, _ in plan_blocks(problem, f, g, eps, log_factor):
                dots = block_row_dots(E, grad[block.images, :block.columns].to(E.dtype))
                out[block.images, block.rows] = dots
            for b, E in exact.items(): out[b] = E[0] @ grad[b].to(E.dtype)
        return out, None, None, None, None, None, None, None


# %%
r16 = As.clone().requires_grad_()
cols16 = torch.bmm(As[:, None], E16)[:, 0]
cols16 = PlanColumns.apply(r16, cols16, pr16, pot16.f, pot16.g, eps16, log_factor16, {})
weights16 = torch.randn(3, 12, generator=g)
(cols16 * weights16).sum().backward()
test_close(r16.grad, (E16 @ weights16[..., None])[..., 0], eps=1e-5 * r16.grad.abs().max())


# %% [markdown]
# `plan_stats` puts the pieces together. Its test compares it with the reductions of the stored plan of
# `plan_factors`, value and gradient, for both references and the three gradient recipes, on a padded batch
# with an image without points, on CPU blocks and on the whole tensor; and the fallback (an image whose row
# sums underflow) gives the same.

# %%
#| export
def plan_stats(a:torch.Tensor, # `(B, n)` masses (may require grad)
               b:torch.Tensor, # `(B, m)`
               C:torch.Tensor, # `(B, n, m)`
               pot:Potentials, # from `uot_potentials` on the same problem
               tau_a:float|None=0.5, # row KL penalty used to solve
               mask_a=None, mask_b=None,
               grad:str='paper', # 'paper', 'official' or 'none', as for `plan_factors`
               block:int|None=BLOCK, # CPU: cost entries per block; None: the whole tensor at once
               entropy:bool=True, # also $(E\log E)\mathbf1$ (False: `xlogx` is None, two passes fewer)
              ) -> PlanStats:
    "$r$, $E\\mathbf1$, $(C\\odot E)\\mathbf1$, $(E\\log E)\\mathbf1$, $r^\\top E$ of the plan, in one pass."
    a, problem = plan_problem(a, b, C, pot, tau_a, mask_a, mask_b, grad, block)
    eps, dtype = pot.eps, problem.cost.dtype
    B, n, m = C.shape
    with no_autocast(C.device): r = plan_row_factor(a, mask_a, eps, tau_a, grad, pot.reference)
    with torch.no_grad(), no_autocast(C.device):
        f, g, eps_t, weights = pot.f.to(dtype), pot.g.to(dtype), per_image(eps, B, problem.cost), r.detach()
        paper = grad == 'paper'
        if paper: log_factor = problem.cost.new_zeros(B, n)
        else: log_factor = problem.log_mu - log_weights(a.detach(), mask_a)
        if mask_a is not None: log_factor = log_factor.masked_fill(~mask_a, -1e30)        # padded rows: E = 0
        row_sums, E_rows, E_cost, E_xlogx, P_cols = (problem.cost.new_zeros(B, k) for k in (n, n, n, n, m))
        lam = damping(eps, tau_a) if paper else None
        for part, E, X in plan_blocks(problem, f, g, eps_t, log_factor, entropy, lam, row_sums, mask_a):
            images, rows, columns = part.images, part.rows, part.columns
            part_cost = part.cost if part.padded is None else part.cost.masked_fill(part.padded, 0.)
            E_rows[images, rows] = E.sum(2)
            E_cost[images, rows] = torch.linalg.vecdot(part_cost, E)
            if entropy:                                                       # log E, as clamped
                log_E = X.mul_(LN2).add_(log_factor[images, rows, None]).clamp_max_(40.)
                E_xlogx[images, rows] = torch.linalg.vecdot(log_E, E)
            P_cols[images, :columns] += block_col_sums(weights[images, None, rows], E)[:, 0]
        ok = torch.isfinite(torch.cat([E_rows, E_cost, E_xlogx, P_cols], 1)).all(1)
        if paper: ok &= problem.kernels.trusted(problem, row_sums, torch.ones_like(P_cols), 0.)
        exact = {}
        for k in (~ok).nonzero()[:, 0].tolist():                              # from the stored plan
            one = slice(k, k + 1)
            masks = (None if mask_a is None else mask_a[one]), (None if mask_b is None else mask_b[one])
            one_pot = Potentials(f[one], g[one], eps, pot.reference)
            _, E = plan_factors(a[one].detach(), b[one], C[one], one_pot, tau_a, *masks, grad)
            exact[k] = E
            E_rows[k], E_cost[k] = E[0].sum(1), (masked_cost(problem.image(k))[0] * E[0]).sum(1)
            E_xlogx[k], P_cols[k] = torch.xlogy(E[0], E[0]).sum(1), weights[k] @ E[0]
    with no_autocast(C.device): P_cols = PlanColumns.apply(r, P_cols, problem, f, g, eps_t, log_factor, exact)
    return PlanStats(r, E_rows, E_cost, E_xlogx if entropy else None, P_cols)


# %%
g = torch.Generator().manual_seed(3)
As = torch.rand(3, 256, generator=g) * 0.05
As[0, :40] = 0.                                                       # zero density on some pixels
Ws = torch.randn(3, 12, generator=g)
for ref, grad, block in [('product', 'paper', BLOCK), ('product', 'official', 64), ('uniform', 'paper', None),
                         ('uniform', 'official', 100), ('product', 'none', BLOCK)]:
    pot = uot_potentials(As, mk16.float(), C16, 0.01, 0.5, mask_b=mk16, reference=ref)
    a1, a2 = As.double().requires_grad_(), As.clone().requires_grad_()    # the stored plan in float64
    pot64 = Potentials(pot.f.double(), pot.g.double(), pot.eps, ref)
    r, E = plan_factors(a1, mk16.double(), C16.double(), pot64, 0.5, mask_b=mk16, grad=grad)
    st = plan_stats(a2, mk16.float(), C16, pot, 0.5, mask_b=mk16, grad=grad, block=block)
    test_close(st.r, r, eps=1e-6)
    test_close(st.rows, E.sum(2), eps=1e-5 * E.sum(2).max())
    stored_cost = (C16.double().masked_fill(~mk16[:, None], 0) * E).sum(2)
    test_close(st.cost, stored_cost, eps=1e-5 * st.cost.abs().max())
    test_close(st.xlogx, torch.xlogy(E, E).sum(2), eps=1e-5 * st.xlogx.abs().max())
    cols = torch.bmm(r[:, None], E)[:, 0]
    test_close(st.cols, cols, eps=1e-5 * cols.abs().max())
    if grad != 'none':
        ((cols * Ws).sum() + (r * E.sum(2)).sum()).backward()
        ((st.cols * Ws).sum() + (st.r * st.rows).sum()).backward()
        test_close(a2.grad, a1.grad.float(), eps=1e-5 * a1.grad.abs().max())
pot = uot_potentials(As, mk16.float(), C16, 0.01, 0.5, mask_b=mk16)
st, st0 = (plan_stats(As, mk16.float(), C16, pot, 0.5, mask_b=mk16, grad='official', entropy=h)
           for h in (True, False))
test_eq(st0.xlogx, None)
test_eq((st0.rows, st0.cost, st0.cols), (st.rows, st.cost, st.cols))   # the rest unchanged
far = Potentials(pot.f + 5., pot.g, 0.01)                 # stabilizer off by 500 eps: every K overflows
a1, a2 = As.clone().requires_grad_(), As.clone().requires_grad_()
r, E = plan_factors(a1, mk16.float(), C16, far, 0.5, mask_b=mk16)
st = plan_stats(a2, mk16.float(), C16, far, 0.5, mask_b=mk16)
test_close(st.cols, torch.bmm(r[:, None], E)[:, 0], eps=1e-5 * st.cols.abs().max())
test_close(st.rows, E.sum(2), eps=1e-5 * E.sum(2).max())
(st.cols * Ws).sum().backward()
(torch.bmm(r[:, None], E)[:, 0] * Ws).sum().backward()
test_close(a2.grad, a1.grad, eps=1e-5 * a1.grad.abs().max())

# %% [markdown]
# ## Checks
#
# ### (a) Against POT
#
# POT's `ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type=...)` minimizes
# $\langle M,\gamma\rangle+\mathrm{reg}\,\Omega(\gamma)+\mathrm{reg}_{m,1}\mathrm{KL}(\gamma\mathbf1|a)
# +\mathrm{reg}_{m,2}\mathrm{KL}(\gamma^\top\mathbf1|b)$
# with $\Omega=\mathrm{KL}(\gamma|ab^\top)$ for `reg_type='kl'` (the default since POT 0.9.5) and
# $\Omega=\sum\gamma\log\gamma-\gamma$ for `reg_type='entropy'`. So the mapping is `reg=eps`,
# `reg_m=(tau_a, tau_b)`, and `reg_type='kl'` ⇔ `reference='product'`, `reg_type='entropy'` ⇔
# `reference='uniform'` (the constant $\sum\gamma$ vs KL's $+\sum 1$ does not change the plan). We solve
# random problems to convergence in float64 and compare plans.

# %%
import ot, warnings

# %%
rng = np.random.default_rng(0)
for trial in range(4):
    n, m = rng.integers(5, 15), rng.integers(2, 7)
    a, b, M = rng.uniform(0, 0.3, n), np.ones(m), rng.uniform(0, 1, (n, m))
    eps, ta, tb = [0.05, 0.1][trial % 2], [0.5, 1.][trial % 2], [0.5, 0.3][trial // 2]
    for ref, rt in [('product', 'kl'), ('uniform', 'entropy')]:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            P_pot = ot.unbalanced.sinkhorn_unbalanced(a, b, M, eps, (ta, tb), reg_type=rt, numItermax=200000,
                                                      stopThr=1e-15)
        T = lambda z: torch.tensor(z)[None]
        P = uot_plan(T(a), T(b), T(M), eps, ta, tb, mode='converged', reference=ref, tol=1e-12,
                     max_iter=100000, grad='none')[0]
        test_close(P.numpy(), P_pot, eps=1e-4 * P_pot.max())
        rel = np.abs(P.numpy() - P_pot).max() / P_pot.max()
print(f"max relative deviation from POT (last problem): {rel:.1e}")

# %% [markdown]
# ### (e) First-order conditions at the fixed point
#
# Independently of the potentials: for every $P_{ij}>0$ the gradient of the primal objective vanishes,
# $C_{ij}+\varepsilon\log\frac{P_{ij}}{\mu_i\nu_j}+\tau_a\log\frac{(\mathbf P\mathbf1)_i}{a_i}
# +\tau_b\log\frac{(\mathbf P^\top\mathbf1)_j}{b_j}=0$,
# and the value is below that of perturbed plans.

# %%
g = torch.Generator().manual_seed(1)
a = torch.rand(2, 30, generator=g, dtype=torch.float64) * 0.2
b = torch.ones(2, 6, dtype=torch.float64)
C = torch.rand(2, 30, 6, generator=g, dtype=torch.float64)
for ref in ['product', 'uniform']:
    pot = uot_potentials(a, b, C, 0.05, 0.5, 0.3, mode='converged', reference=ref, tol=1e-10, max_iter=20000)
    assert pot.marginal_error.max() < 1e-10
    P = uot_plan(a, b, C, 0.05, 0.5, 0.3, potentials=pot, grad='none')
    mu, nu = reference_weights(a, b, reference=ref)
    foc = C + 0.05 * torch.log(P / (mu[:, :, None] * nu[:, None])) \
          + 0.5 * torch.log(P.sum(2) / a)[:, :, None] \
          + 0.3 * torch.log(P.sum(1) / b)[:, None, :]
    test_close(foc, torch.zeros_like(foc), eps=1e-7)
    v0 = uot_value(a, b, C, 0.05, 0.5, 0.3, plan=P, reference=ref)
    for k in range(3):
        Q = P * (1 + 0.01 * torch.randn(P.shape, generator=g, dtype=torch.float64))
        assert (uot_value(a, b, C, 0.05, 0.5, 0.3, plan=Q, reference=ref) > v0).all()

# %% [markdown]
# ### (b) Batches, padding and (c) empty images
#
# A padded batch gives the plans of each image solved alone; extra padding changes nothing; empty images and
# all-zero densities give finite potentials, plans and values.

# %%
g = torch.Generator().manual_seed(2)
n = 40
ms = [5, 0, 3]
a = torch.rand(3, n, generator=g) * 0.2
pts = [torch.rand(k, 2, generator=g) for k in ms]
xs = torch.rand(n, 2, generator=g)
def cost(x, y): return torch.cdist(x, y) if len(y) else x.new_zeros(len(x), 0)
for mode in ['official', 'converged']:
    for pad in [5, 9]:
        Y, mb = torch.zeros(3, pad, 2), torch.zeros(3, pad, dtype=torch.bool)
        for k, p in enumerate(pts):
            Y[k, :len(p)] = p
            mb[k, :len(p)] = True
        Y[~mb] = 7.   # padding far away must not matter
        Cb = torch.cdist(xs[None].expand(3, -1, -1), Y)
        pot = uot_potentials(a, mb.float(), Cb, 0.05, 0.5, mask_b=mb, mode=mode, diameter=1.5)
        Pb = uot_plan(a, mb.float(), Cb, 0.05, 0.5, mask_b=mb, potentials=pot)
        assert torch.isfinite(pot.f).all() and torch.isfinite(Pb).all()
        for k, p in enumerate(pts):
            P1 = uot_plan(a[k:k+1], torch.ones(1, len(p)), cost(xs, p)[None], 0.05, 0.5, mode=mode,
                          diameter=1.5)
            test_close(Pb[k, :, :len(p)], P1[0], eps=1e-5)
            test_eq(Pb[k, :, len(p):].abs().sum(), 0.)
        test_eq(Pb[1].sum(), 0.)
        vals = uot_value(a, mb.float(), Cb, 0.05, 0.5, mask_b=mb, plan=Pb)
        test_close(vals[1], 0.5 * a[1].sum(), eps=1e-5)     # no points: all mass pays tau * sum(a)
# all-zero density, and a batch with no points at all
P0 = uot_plan(torch.zeros(1, n), torch.ones(1, 3), torch.rand(1, n, 3), 0.05, 0.5)
assert torch.isfinite(P0).all() and P0.sum() == 0
test_eq(uot_plan(a, torch.zeros(3, 0), torch.zeros(3, n, 0), 0.05, 0.5).shape, (3, n, 0))

# %% [markdown]
# ### (d) Gradient with $v^*$ fixed
#
# The gradient of any function of the plan is that of
# $\boldsymbol a\mapsto F(\mathrm{diag}(\boldsymbol u^*(\boldsymbol a))\mathbf K \mathrm{diag}(\boldsymbol
# v^*))$.
# We check it against central finite differences of that function written out independently from the
# potentials ($u$-half-step from Eq. 6 in the plain, non-log form), for both references, and against the
# official gradient (only the density factor), which agrees for the product reference.

# %%
g = torch.Generator().manual_seed(3)
a0 = (torch.rand(1, 25, generator=g, dtype=torch.float64) * 0.3 + 0.01)
b, C = torch.ones(1, 4, dtype=torch.float64), torch.rand(1, 25, 4, generator=g, dtype=torch.float64)
W = torch.randn(1, 25, 4, generator=g, dtype=torch.float64)
def F(P): return (W * P).sum() + (P.sum(2) ** 2).sum() + (P.sum(1) - 1).abs().sum()
eps, tau = 0.1, 0.5
for ref in ['product', 'uniform']:
    pot = uot_potentials(a0, b, C, eps, tau, mode='converged', reference=ref, tol=1e-12, max_iter=10000)
    a = a0.clone().requires_grad_()
    F(uot_plan(a, b, C, eps, tau, potentials=pot, grad='paper')).backward()
    K, v = torch.exp(-C / eps), (b if ref == 'product' else 1) * torch.exp(pot.g / eps)    # v* = ν e^{g/ε}
    lam = tau / (tau + eps)
    def P_of(a_):      # u*(a) = mu * (a/mu)^lam / (K v)^lam  (Eq. 6 with the reference weights)
        mu = a_ if ref == 'product' else torch.ones_like(a_)
        u = mu * (a_ / mu) ** lam / (K @ v[..., None])[..., 0] ** lam
        return u[:, :, None] * K * v[:, None, :]
    test_close(P_of(a0), uot_plan(a0, b, C, eps, tau, potentials=pot, grad='none'), eps=1e-10)
    h = 1e-6
    fd = torch.stack([(F(P_of(a0 + h * e)) - F(P_of(a0 - h * e))) / (2 * h)
                      for e in torch.eye(25, dtype=torch.float64)[:, None]])
    test_close(a.grad[0], fd[:, ], eps=1e-6)
    a2 = a0.clone().requires_grad_()
    F(uot_plan(a2, b, C, eps, tau, potentials=pot, grad='official')).backward()
    if ref == 'product': test_close(a2.grad, a.grad, eps=1e-10)
    else: assert not torch.allclose(a2.grad, a.grad)


# %% [markdown]
# ### Memory does not grow with the iterations
#
# The autograd graph of a plan holds the same tensors whether the solver ran 12 or 500 soft-min pairs: we
# count the bytes autograd saves for backward.

# %%
def saved_bytes(**kw):
    total = [0]
    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a_ = (torch.rand(2, 200, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_()
        C_ = torch.rand(2, 200, 20, generator=torch.Generator().manual_seed(1))
        P = uot_plan(a_, torch.ones(2, 20), C_, 0.01, 0.5, **kw)
        P.sum().backward()
    return total[0]
few, many = saved_bytes(mode='official'), saved_bytes(mode='converged', tol=1e-9, max_iter=500)
test_eq(few, many)
assert few <= 2 * 2 * 200 * 20 * 4 + 10_000     # about one (B, n, m) float32 factor

# %% [markdown]
# ### Half precision
#
# The solver promotes half-precision inputs (float16 from a network under autocast, or bfloat16) to float32
# ([its check](03_sinkhorn.ipynb)); the plan is then the float32 plan of the same (rounded) inputs, to 1e-6, and
# the gradient returns in the input's dtype. The problem is that of the solver's check "Official vs converged":

# %%
g = torch.Generator().manual_seed(5)
pts_ = torch.rand(2, 30, 2, generator=g) * 256 / 512
grid = torch.stack(torch.meshgrid(torch.arange(32) * 8 + 4., torch.arange(32) * 8 + 4., indexing='xy'), -1)
grid = grid.reshape(1, -1, 2) / 512
C = torch.exp(torch.cdist(grid.expand(2, -1, -1), pts_) / 0.6) - 1
A = torch.rand(2, 1024, generator=g) * 60 / 1024

# %%
for half in (torch.float16, torch.bfloat16):
    Ah, bh, Ch = A.to(half), torch.ones(2, 30, dtype=half), C.to(half)
    ph = uot_potentials(Ah, bh, Ch, 0.01, 0.5)
    p32 = uot_potentials(Ah.float(), bh.float(), Ch.float(), 0.01, 0.5)
    Ph = uot_plan(Ah.requires_grad_(), bh, Ch, 0.01, 0.5, potentials=ph)
    P32 = uot_plan(Ah.detach().float(), bh.float(), Ch.float(), 0.01, 0.5, potentials=p32)
    test_eq(Ph.dtype, torch.float32)
    test_close(Ph.detach(), P32.detach(), eps=1e-6 * P32.max())
    Ph.sum().backward()
    test_eq(Ah.grad.dtype, half)                            # the gradient returns in the input's dtype

# %% [markdown]
# ## Convergence of the two modes
#
# The marginal error and the primal objective (`uot_value`) against the number of soft-min pairs, on one 64×64
# map of a 512×512 crop with 300 heads (perspective cost, ε = 0.01, τ = 0.5, the product reference, the
# diameter of the point clouds as the loss uses). `official` runs geomloss's fixed annealed schedule, whose
# number of pairs is set by the ε-scaling ratio, one point per ratio (0.5, the default, gives 12 pairs).
# `converged` continues from the official 12 pairs at ε (here with `tol=0`, so that each `max_iter` is run to
# the end), with the adaptive over-relaxation and, for comparison, with plain alternating steps (`omega=1`).
# The objective settles long before the marginal error reaches the 10⁻³ of `converged`; over-relaxation gets
# there in a fraction of the plain iterations.

# %%
import matplotlib.pyplot as plt
from uotcrowd.core import pixel_centres
from uotcrowd.costs import cost_matrix

# %%
g = torch.Generator().manual_seed(0)
pts = torch.rand(1, 300, 2, generator=g) * 512                      # 300 heads on a 512×512 crop
C = cost_matrix(64, 64, pts, stride=8)                              # perspective cost, coordinates / 512
ij = (pts[0] / 8).long()
a = torch.full((1, 64 * 64), 0.1 * 300 / 64 ** 2)                   # 90 % of the count on the heads' pixels
a[0].index_add_(0, ij[:, 1] * 64 + ij[:, 0], torch.full((300,), 0.9))
b, diam = torch.ones(1, 300), max_diameter(pixel_centres(64, 64, 8)[None] / 512, pts / 512)
def run(**kw):
    pot = uot_potentials(a, b, C, 0.01, 0.5, diameter=diam, **kw)
    value = uot_value(a, b, C, 0.01, 0.5, potentials=pot, grad='none').item()
    return pot.iterations, pot.marginal_error.item(), value
pairs = (12, 14, 16, 20, 24, 32, 48, 64, 96, 128)
conv = {name: [run(mode='converged', tol=0., max_iter=k, omega=om) for k in pairs]
        for name, om in (('converged, adaptive ω (tol = 0)', None), ('converged, ω = 1 (tol = 0)', 1.))}
off = {s: run(mode='official', scaling=s) for s in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
best = run(mode='converged', tol=1e-5, max_iter=2000)[2]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=70)
curves = [(k, v, 'o-') for k, v in conv.items()]
curves += [('official (one ε-scaling ratio each)', list(off.values()), 's--')]
for name, rows, style in curves:
    its, err, val = zip(*rows)
    ax1.loglog(its, err, style, ms=4, label=name)
    ax2.loglog(its, [max(abs(v - best) / best, 1e-7) for v in val], style, ms=4, label=name)
ax1.axhline(1e-3, c='gray', lw=0.8, ls=':')
ax1.set(xlabel='soft-min pairs', ylabel='relative marginal error')
ax2.set(xlabel='soft-min pairs', ylabel='relative gap to the converged objective')
ax1.legend(fontsize=8)
for ax in (ax1, ax2): ax.grid(alpha=0.3, which='both')
plt.tight_layout()
plt.show()

# %%
adaptive, plain = conv.values()
test_eq(off[0.5][0], 12)
test_eq(adaptive[0], off[0.5])                                      # both continue from the official pairs
test_eq(plain[0], off[0.5])
first = lambda rows: min(k for k, e, _ in rows if e < 1e-3)          # pairs to reach 1e-3
print(f"pairs to a marginal error below 1e-3: adaptive ω {first(adaptive)}, plain {first(plain)}")
assert first(adaptive) <= 32 and first(plain) >= 2 * first(adaptive) and plain[-1][1] < 1e-3
# plain steps: steadily down once the official pair is left
assert all(e1 > e2 for (_, e1, _), (_, e2, _) in zip(plain[1:], plain[2:]))

# %%
#| hide
import nbdev
nbdev.nbdev_export()
