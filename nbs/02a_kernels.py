# %% [markdown]
# # Soft-min kernels
#
# > The batch of unbalanced OT problems of Eq. 1 in the solver's form, and its soft-min passes (the soft C-transform of Eq. 6): exact with row maxima subtracted, or one exponential per cost entry on the whole batch or on cache-sized blocks, checked image by image with an exact fallback.

# %%
#| default_exp kernels

# %%
#| export
from __future__ import annotations
import math, contextlib, functools
from dataclasses import dataclass
import torch
from fastcore.basics import patch

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from unittest.mock import patch as mock_patch

# %% [markdown]
# ## The problem and its dual
#
# For masses $\boldsymbol a\in\mathbb R^n_+$ (the density), $\boldsymbol b\in\mathbb R^m_+$ (one per head) and
# a cost $\mathbf C\in\mathbb R^{n\times m}$ we solve, for every image of a batch,
# $$\min_{\mathbf P\ge 0}\ \langle\mathbf C,\mathbf P\rangle
#   +\varepsilon\,\mathrm{KL}(\mathbf P\,|\,\boldsymbol\mu\otimes\boldsymbol\nu)
#   +\tau_a\,\mathrm{KL}(\mathbf P\mathbf 1\,|\,\boldsymbol a)
#   +\tau_b\,\mathrm{KL}(\mathbf P^\top\mathbf 1\,|\,\boldsymbol b),$$
# with $\mathrm{KL}(p|q)=\sum p\log\frac pq-p+q$. This is Eq. 1 with $D_1,D_2$ replaced by KL "for solving"
# (Sec. 3.3). The entropic reference $\boldsymbol\mu\otimes\boldsymbol\nu$ is either
#
# * `reference='product'`: $\boldsymbol\mu=\boldsymbol a,\ \boldsymbol\nu=\boldsymbol b$, the convention of
#   geomloss (hence of the official GL code) and of POT's default `reg_type='kl'`;
# * `reference='uniform'`: $\boldsymbol\mu=\mathbf 1,\ \boldsymbol\nu=\mathbf 1$, i.e.
#   $-\varepsilon H(\mathbf P)$ up to the linear term $\varepsilon\sum P_{ij}$, the form of Eq. 1/5/6 and of
#   POT's `reg_type='entropy'`.
#
# The two are the same problem with different costs:
# $\varepsilon\mathrm{KL}(\mathbf P|\boldsymbol a\otimes\boldsymbol b) =\varepsilon\mathrm{KL}(\mathbf
# P|\mathbf 1) -\varepsilon\sum_{ij}P_{ij}(\log a_i+\log b_j)+\text{const}$,
# i.e. the product reference is the uniform one with cost $C_{ij}-\varepsilon\log a_i-\varepsilon\log b_j$.
#
# The optimal plan has the form (Eq. 5) $P_{ij}=\mu_i\nu_j\exp\big((f_i+g_j-C_{ij})/\varepsilon\big)$, i.e.
# $u_i=\mu_i e^{f_i/\varepsilon}$, $v_j=\nu_j e^{g_j/\varepsilon}$, $\mathbf K=e^{-\mathbf C/\varepsilon}$.
# Its first-order conditions are $\mathbf P\mathbf 1=\boldsymbol a\,e^{-\boldsymbol f/\tau_a}$ and
# $\mathbf P^\top\mathbf 1=\boldsymbol b\,e^{-\boldsymbol g/\tau_b}$. Solving the first for $f$ with $g$ fixed
# gives the generalized Sinkhorn update (Eq. 6) in log-sum-exp form:
# $$f_i=\lambda_a\Big(\varepsilon\log\frac{a_i}{\mu_i}
#   -\varepsilon\,\mathrm{LSE}_j\big[\log\nu_j+(g_j-C_{ij})/\varepsilon\big]\Big),
#   \qquad \lambda_a=\frac{\tau_a}{\tau_a+\varepsilon},$$
# which for the uniform reference is exactly
# $u=(\boldsymbol a/\mathbf K\boldsymbol v)^{\tau/(\tau+\varepsilon)}$ (Eq. 6), and for the product reference
# is geomloss's `dampening * softmin`. The $g$ update is symmetric.
#
# The solver ([Unbalanced Sinkhorn](03_sinkhorn.ipynb)) is organized as geomloss organizes its
# `sinkhorn_loop`: one loop (the ε-scaling, then over-relaxed alternating pairs) that takes its soft-min
# kernels from a *strategy* chosen once per problem. This notebook holds the problem in the form the passes
# read, and the strategies, which differ only in how they pass over the cost: `ExactKernels` (each row's
# maximum subtracted, the reference), `DenseKernels` (one exponential per cost entry on the whole batch:
# accelerators and problems that fit in cache) and `BlockedKernels` (the same on cache-sized blocks: the CPU).

# %% [markdown]
# ## Log weights and working precision
#
# Zero or padded masses get the log-weight $-10^5$ (as geomloss does) instead of $-\infty$: every exponential
# of it underflows to exactly 0 and no `inf - inf` can appear. Computations run in float32 (float64 inputs
# stay float64, for tests); half-precision inputs under autocast are promoted, and autocast is switched off
# inside the solver.

# %%
#| export
NEG = -1e5  # log-weight of a zero or padded mass


# %%
test_eq((math.exp(NEG), NEG / 1e5), (0., -1.))                     # underflows to exactly 0, finite


# %%
#| export
def log_weights(w:torch.Tensor, # `(B, k)` non-negative weights
                mask:torch.Tensor|None=None # `(B, k)` bool, True for real entries
               ) -> torch.Tensor:
    "`log(w)`, with `NEG` where `w <= 0` or the entry is padding."
    logs = torch.log(w.clamp_min(0)).clamp_min(NEG)
    keep = w > 0
    if mask is not None: keep = keep & mask
    return torch.where(keep, logs, torch.full_like(logs, NEG))


# %%
test_eq(log_weights(torch.tensor([[1., 0., 2.]])), torch.tensor([[0., NEG, math.log(2.)]]))
test_eq(log_weights(torch.tensor([[1., 1.]]), torch.tensor([[True, False]])), torch.tensor([[0., NEG]]))


# %%
#| export
def work_dtype(*ts) -> torch.dtype:
    "float64 if any input is float64, float32 otherwise (half precision is promoted)."
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


# %%
test_eq(work_dtype(torch.zeros(1, dtype=torch.float16)), torch.float32)
test_eq(work_dtype(torch.zeros(1), None, torch.zeros(1, dtype=torch.float64)), torch.float64)


# %%
#| export
def no_autocast(device:torch.device):
    "A context that disables autocast on `device` (a no-op where autocast does not exist)."
    try: return torch.autocast(device_type=device.type, enabled=False)
    except Exception: return contextlib.nullcontext()


# %%
with torch.autocast('cpu', dtype=torch.bfloat16):
    with no_autocast(torch.device('cpu')):
        test_eq((torch.ones(2, 2) @ torch.ones(2, 2)).dtype, torch.float32)


# %% [markdown]
# ## One value per image
#
# Each image of a batch anneals from its own diameter, so inside the solver a temperature is a `(B,)` tensor;
# so is the over-relaxation ω of the converged mode.

# %%
#| export
def per_image(value, # a float, or a tensor with one value per image (or one for all)
              batch_size:int, # B
              like:torch.Tensor # a tensor of the dtype and device wanted
             ) -> torch.Tensor: # `(B,)`
    "A per-image parameter (a temperature ε, an over-relaxation ω) as a `(B,)` tensor."
    if isinstance(value, torch.Tensor): return value.to(like).reshape(-1).expand(batch_size)
    return torch.full((batch_size,), float(value), dtype=like.dtype, device=like.device)


# %%
test_eq(per_image(0.5, 3, torch.zeros(1, dtype=torch.float64)), torch.full((3,), 0.5, dtype=torch.float64))
test_eq(per_image(torch.tensor([1., 2.]), 2, torch.zeros(1)), torch.tensor([1., 2.]))
test_eq(per_image(torch.tensor(3.), 2, torch.zeros(1)), torch.tensor([3., 3.]))


# %% [markdown]
# ## The soft-min (the soft C-transform)
#
# The core operation is
# $\mathrm{softmin}_\varepsilon(\mathbf C,\boldsymbol h)_i
# =-\varepsilon\log\sum_j\exp(h_j-C_{ij}/\varepsilon)$,
# batched over images. The naive version is `-(eps * torch.logsumexp(h[:, None] - C / eps, -1))`. `softmin`
# subtracts each row's maximum and clamps the exponent at $-80$ ($e^{-80}\approx 2\cdot10^{-35}$, negligible
# next to the maximum term 1, so float32 values are unchanged): on the CPU `exp` of arguments below about
# $-87$ takes torch's underflow path, 22-70× slower (DESIGN.md, "Facts"), and with $\varepsilon=0.01$ most of
# the log-kernel lies there. It works in one buffer, in place. It is the *exact* soft-min: the reference of
# the faster passes below, their fallback for an image they cannot trust, and the soft-min of the plans that
# are stored (`uotcrowd.plans.plan_factors`).

# %%
#| export
def softmin(eps, # temperature: a float or a `(B,)` tensor
            C:torch.Tensor, # `(B, n, m)` cost
            h:torch.Tensor # `(B, m)` log-weights plus potentials/ε
           ) -> torch.Tensor: # `(B, n)`
    "Soft C-transform $-\\varepsilon\\,\\mathrm{LSE}_j(h_j - C_{ij}/\\varepsilon)$, row maxima subtracted."
    B, n, m = C.shape
    eps = per_image(eps, B, C)[:, None]
    if m == 0: return C.new_full((B, n), -NEG) * eps
    exponents = torch.addcmul(h[:, None, :], C, (-1 / eps)[:, :, None])        # h_j - C_ij / ε
    top = exponents.amax(2, keepdim=True)
    exponents.sub_(top).clamp_(min=-80.).exp_()                                  # no underflow path
    return -eps * (top[:, :, 0] + exponents.sum(2).log())


# %%
g = torch.Generator().manual_seed(0)
C = torch.rand(3, 300, 40, generator=g)
h = torch.randn(3, 40, generator=g)
naive = -(0.01 * torch.logsumexp(h[:, None].double() - C.double() / 0.01, -1))
test_close(softmin(0.01, C, h), naive.float(), eps=1e-5)
e3 = torch.tensor([0.01, 0.1, 1.])
lse3 = -(e3[:, None] * torch.logsumexp(h[:, None] - C / e3[:, None, None], -1))
test_close(softmin(e3, C, h), lse3, eps=1e-5)
test_eq(softmin(0.1, torch.zeros(2, 4, 0), torch.zeros(2, 0)), torch.full((2, 4), 1e4))


# %% [markdown]
# ## The half-step (Eq. 6) and its over-relaxation
#
# With the soft-min of the other side, the update of Eq. 6 is
# $f=\lambda_a\big(\varepsilon\log(a/\mu)+\mathrm{softmin}_\varepsilon(\mathbf C,\log\nu+g/\varepsilon)\big)$
# with the damping $\lambda_a=\tau_a/(\tau_a+\varepsilon)$ (1 for a balanced side). The converged mode
# over-relaxes it, $f\leftarrow f+\omega(\hat f-f)$; ω = 1 is the plain half-step (exactly: `torch.lerp`
# returns its end at weight 1).

# %%
#| export
def damping(eps, # temperature(s)
            tau:float|None # KL penalty of the side (None or inf: balanced)
           ):
    "$\\lambda=\\tau/(\\tau+\\varepsilon)=1/(1+\\varepsilon/\\tau)$, the exponent of Eq. 6."
    if tau is None or math.isinf(tau): return torch.ones_like(eps) if isinstance(eps, torch.Tensor) else 1.
    return 1. / (1. + eps / tau)


# %%
test_close(damping(0.01, 0.5), 0.5 / 0.51)
test_eq(damping(torch.tensor([0.1, 0.2]), None), torch.ones(2))
test_eq(damping(0.1, math.inf), 1.)


# %% [markdown]
# For the uniform reference and a balanced problem the half-step is $\log u=\log a-\log\mathbf Kv$ in
# potentials $\varepsilon\log u$; given in a pass's form ($f$ and $\log R$ with
# $\mathrm{softmin}=f-\varepsilon\log R$) it is the same.

# %%
#| export
def half_step(softmin:torch.Tensor, # `(B, k)` soft-min of the other side (`softmin`); f with `log_sums`
              eps:torch.Tensor, # `(B, 1)` temperatures
              lam:torch.Tensor, # `(B, 1)` dampings (`damping`)
              log_ratio:torch.Tensor, # `(B, k)` $\log(a/\mu)$ (or $\log(b/\nu)$): 0 for the product ref.
              log_sums:torch.Tensor|None=None # `(B, k)` log R of a soft-min written $f-\varepsilon\log R$
             ) -> torch.Tensor:
    "Eq. 6 in the log domain: $f=\\lambda(\\varepsilon\\log(a/\\mu)+\\mathrm{softmin})$."
    total = eps * log_ratio + softmin
    return lam * (total if log_sums is None else total - eps * log_sums)


# %%
a_, K_ = torch.rand(1, 5, dtype=torch.float64), torch.rand(1, 5, 3, dtype=torch.float64)
v_ = torch.rand(1, 3, dtype=torch.float64)
eps_, ones_ = torch.full((1, 1), 0.1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
sm_ = -0.1 * torch.log((K_ * v_[:, None]).sum(2))                      # softmin with C = -ε log K, h = log v
u_ = torch.exp(half_step(sm_, eps_, ones_, torch.log(a_)) / 0.1)
test_close(u_, a_ / (K_ @ v_[..., None])[..., 0], eps=1e-12)
x_ = torch.randn(1, 5, dtype=torch.float64)
sums_ = (K_ * v_[:, None]).sum(2)
test_close(half_step(x_, eps_, ones_, torch.log(a_), torch.log(sums_) + x_ / 0.1),
           half_step(sm_, eps_, ones_, torch.log(a_)), eps=1e-12)


# %% [markdown]
# Over-relaxed, ω = 1 returns the half-step exactly and ω = 2 reflects the current potential about it:

# %%
#| export
def relaxed_step(x:torch.Tensor, # `(B, k)` current potential
                 softmin:torch.Tensor, eps:torch.Tensor, # as for `half_step`
                 lam:torch.Tensor, log_ratio:torch.Tensor, # as for `half_step`
                 omega:torch.Tensor, # `(B, 1)` over-relaxation ω
                 log_sums:torch.Tensor|None=None # as for `half_step`
                ) -> torch.Tensor:
    "The over-relaxed half-step $x+\\omega(\\hat x-x)$, $\\hat x$ from `half_step`."
    return torch.lerp(x, half_step(softmin, eps, lam, log_ratio, log_sums), omega)


# %%
test_eq(relaxed_step(x_, sm_, eps_, ones_, torch.log(a_), ones_), half_step(sm_, eps_, ones_, torch.log(a_)))
reflected_ = 2 * 0.1 * torch.log(u_) - x_
test_close(relaxed_step(x_, sm_, eps_, ones_, torch.log(a_), 2 * ones_), reflected_, eps=1e-12)


# %% [markdown]
# ## The entropic reference
#
# `reference_weights` is the one place where the reference of Eq. 1 is spelled out: the masses $(\mu,\nu)$, 0
# on padding. The solver keeps their logs and, for the half-step, the log ratios $\log(a/\mu)$, $\log(b/\nu)$.

# %%
#| export
def reference_weights(a:torch.Tensor, # `(B, n)` source masses
                      b:torch.Tensor, # `(B, m)` target masses
                      mask_a:torch.Tensor|None=None, # `(B, n)` bool, real sources
                      mask_b:torch.Tensor|None=None, # `(B, m)` bool, real targets
                      reference:str='product' # 'product' ($\mu=a$, $\nu=b$) or 'uniform' ($\mu=\nu=1$)
                     ) -> tuple[torch.Tensor, torch.Tensor]: # `(mu, nu)`
    "The masses $(\\mu, \\nu)$ of the entropic reference $\\mu\\otimes\\nu$ of Eq. 1, 0 on padding."
    if reference == 'product':
        return (a if mask_a is None else a * mask_a), (b if mask_b is None else b * mask_b)
    if reference == 'uniform':
        return (torch.ones_like(a) if mask_a is None else mask_a.to(a.dtype),
                torch.ones_like(b) if mask_b is None else mask_b.to(b.dtype))
    raise ValueError(f"reference must be 'product' or 'uniform', got {reference!r}")


# %%
a_, b_, mb_ = torch.tensor([[0.5, 2.]]), torch.tensor([[1., 3.]]), torch.tensor([[True, False]])
test_eq(reference_weights(a_, b_, mask_b=mb_), (a_, torch.tensor([[1., 0.]])))
uniform_ = reference_weights(a_, b_, mask_b=mb_, reference='uniform')
test_eq(uniform_, (torch.ones(1, 2), torch.tensor([[1., 0.]])))
test_fail(lambda: reference_weights(a_, b_, reference='kl'), contains="'product' or 'uniform'")

# %% [markdown]
# ## The problem
#
# `Problem` holds a batch in the form the passes read: the cost (its padded source rows set to 0), the log
# reference weights $\log\mu,\log\nu$, the log ratios of the half-step, $\tau_a,\tau_b$, the padded columns,
# and the pass strategy (`kernels`, chosen on first use by `choose_kernels` from the device and the size: see
# below). Padded columns are not overwritten in the cost: the passes skip them or weight them out.

# %%
#| export
LOG2E, LN2 = 1 / math.log(2), math.log(2)  # the passes keep exponents in base 2 (CPU `exp2` beats `exp`)

# %%
test_close(2 ** LOG2E, math.e, eps=1e-12)
test_close(LOG2E * LN2, 1., eps=1e-15)

# %%
#| export
BLOCK = 2 ** 20  # cost entries per block of a CPU pass (4 MiB in float32); a problem this small is one block

# %%
test_eq(BLOCK * 4, 4 * 2 ** 20)                                      # 4 MiB of float32


# %%
#| export
@dataclass
class Problem:
    "A batch of problems of Eq. 1 (KL penalties) in the solver's working precision, as its passes read it."
    cost: torch.Tensor  # (B, n, m) C, rows of padded sources set to 0
    log_mu: torch.Tensor  # (B, n) log μ (NEG on zero or padded masses)
    log_nu: torch.Tensor  # (B, m) log ν
    log_a_ratio: torch.Tensor  # (B, n) log(a/μ) of the half-step (Eq. 6): 0 for the product reference
    log_b_ratio: torch.Tensor  # (B, m) log(b/ν)
    tau_a: float|None  # KL penalty on the rows (None: balanced)
    tau_b: float|None  # KL penalty on the columns
    padded: torch.Tensor  # (B, m) bool, padded columns
    block: int|None = BLOCK  # CPU: cost entries per block of a pass; None: the whole batch at once
    def __post_init__(self):
        self.mu = self.log_mu.exp()  # (B, n) μ: 0 for zero or padded masses
        self.log2_nu = self.log_nu * LOG2E  # (B, m) log ν in base 2, for the passes' exponents
        self.no_points = ~(~self.padded).any(1, keepdim=True)  # (B, 1) bool, images without a real column
        self.any_padding = bool(self.padded.any()) or bool(self.no_points.any())  # else no padded soft-min
    @functools.cached_property
    def kernels(self): return choose_kernels(self, self.block)  # the pass strategy, chosen on first use


# %%
log_mu_, padded_ = torch.log(torch.tensor([[0.5, 2.]])), torch.tensor([[False, True]])
zeros_ = torch.zeros(1, 2)
pr0_ = Problem(torch.rand(1, 2, 2), log_mu_, zeros_, zeros_, zeros_, 0.5, 0.5, padded_)
test_close(pr0_.mu, torch.tensor([[0.5, 2.]]))
test_eq((pr0_.log2_nu, pr0_.no_points, pr0_.any_padding), (torch.zeros(1, 2), torch.tensor([[False]]), True))


# %% [markdown]
# `setup_problem` builds it from the masses of a call (the reference from `reference_weights`):

# %%
#| export
def setup_problem(a:torch.Tensor, # `(B, n)` source masses
                  b:torch.Tensor, # `(B, m)` target masses
                  C:torch.Tensor, # `(B, n, m)` cost
                  tau_a:float|None, tau_b:float|None, # KL penalties (None: balanced)
                  mask_a:torch.Tensor|None=None, mask_b:torch.Tensor|None=None, # bool masks of real entries
                  reference:str='product', # entropic reference (`reference_weights`)
                  block:int|None=BLOCK # CPU: cost entries per block of a pass; None: the whole batch at once
                 ) -> Problem:
    "The `Problem` of `a`, `b`, `C` in the working precision (`work_dtype`); padded sources: zero cost rows."
    dtype = work_dtype(a, b, C)
    a, b, C = a.to(dtype), b.to(dtype), C.detach().to(dtype)
    B, n, m = C.shape
    if a.shape != (B, n) or b.shape != (B, m):
        raise ValueError(f"shapes do not match: a {tuple(a.shape)}, b {tuple(b.shape)}, C {tuple(C.shape)}")
    if mask_a is not None and not bool(mask_a.all()): C = C.masked_fill(~mask_a[:, :, None], 0.)
    mu, nu = reference_weights(a, b, mask_a, mask_b, reference)
    log_mu, log_nu = log_weights(mu, mask_a), log_weights(nu, mask_b)
    if reference == 'uniform': log_a_ratio, log_b_ratio = log_weights(a, mask_a), log_weights(b, mask_b)
    else: log_a_ratio, log_b_ratio = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    no_padding = torch.zeros(B, m, dtype=torch.bool, device=C.device)
    padded = no_padding if mask_b is None else ~mask_b.to(torch.bool)
    return Problem(C, log_mu, log_nu, log_a_ratio, log_b_ratio, tau_a, tau_b, padded, block)


# %%
a_, mb_ = torch.tensor([[0.5, 0., 2.]]), torch.tensor([[True, True, False, False]])
pr_ = setup_problem(a_, mb_.float(), torch.rand(1, 3, 4), 0.5, 0.3, mask_b=mb_)
test_eq(pr_.mu, torch.tensor([[0.5, 0., 2.]]))
test_eq(pr_.log_a_ratio, torch.zeros(1, 3))
test_eq((pr_.no_points, pr_.any_padding), (torch.tensor([[False]]), True))
pu_ = setup_problem(a_, mb_.float(), torch.rand(1, 3, 4), None, None, mask_b=mb_, reference='uniform')
test_eq(pu_.mu, torch.ones(1, 3))
test_eq(pu_.log_nu, torch.tensor([[0., 0., NEG, NEG]]))
test_eq(pu_.log_a_ratio, log_weights(a_))
mask_a_ = torch.tensor([[True, True, False]])
pa_ = setup_problem(a_, torch.ones(1, 4), torch.rand(1, 3, 4), 0.5, 0.5, mask_a=mask_a_)
test_eq(pa_.cost[0, 2], torch.zeros(4))
test_fail(lambda: setup_problem(a_, torch.ones(1, 2), torch.rand(1, 3, 4), 0.5, 0.5),
          contains='shapes do not match')


# %% [markdown]
# An image on its own, for the exact soft-mins of an image that a fast pass does not trust, and the cost with
# its padded columns set to 0, which the exact soft-mins read:

# %%
#| export
@patch
def image(self:Problem, b:int) -> Problem:
    "Image `b` alone, as a batch of one."
    one = slice(b, b + 1)
    return Problem(self.cost[one], self.log_mu[one], self.log_nu[one], self.log_a_ratio[one],
                   self.log_b_ratio[one], self.tau_a, self.tau_b, self.padded[one], self.block)


# %%
mb2_ = torch.tensor([[True] * 4, [True, False, False, False]])
pb2_ = setup_problem(torch.rand(2, 3), mb2_.float(), torch.rand(2, 3, 4) + 1, 0.5, 0.5, mask_b=mb2_)
one_ = pb2_.image(1)
test_eq(one_.cost, pb2_.cost[1:])
test_eq((one_.padded, one_.any_padding, one_.tau_a), (~mb2_[1:], True, 0.5))


# %%
#| export
def masked_cost(problem:Problem) -> torch.Tensor:
    "The cost with its padded columns set to 0 (a copy only where there is padding)."
    padded = problem.padded
    return problem.cost.masked_fill(padded[:, None, :], 0.) if bool(padded.any()) else problem.cost


# %%
test_eq(masked_cost(one_)[0, :, 1:], torch.zeros(3, 3))
p0_ = pb2_.image(0)
assert masked_cost(p0_) is p0_.cost                                 # no padding: no copy


# %% [markdown]
# ## The exact kernels
#
# A strategy supplies the loop (`sinkhorn_loop`) with two kernels: `softmins`, both soft-mins of a symmetric (Jacobi) step from
# the same pair $(f, g)$, and `gauss_seidel`, the kernel of an over-relaxed alternating pair: the row soft-min
# at $(f, g)$, the new $f$, and the column soft-mins at the old $f$ (for the marginal error of the incoming
# pair) and at the new one. `ExactKernels` computes them with `softmin` on the whole tensor (padded columns
# read as zero cost with weight $\nu_j=0$): the reference the fast strategies are tested against, and their
# fallback for one image. Its test compares it with the log-sum-exps written out in float64, on a padded batch
# with an image without points (whose row soft-min is that of a zero cost,
# $-\varepsilon\,\mathrm{LSE}_j(\log\nu_j+g_j/\varepsilon)$, since all its $\nu_j$ are 0).

# %%
#| export
class ExactKernels:
    "The soft-min kernels with `softmin` (row maxima subtracted): the reference, and the fallback."
    def softmins(self, problem:Problem, f, g, eps) -> tuple[torch.Tensor, torch.Tensor]:
        "Both soft-mins of a symmetric step: over the columns at `g` `(B, n)`, over the rows at `f` `(B, m)`."
        cost, eps_col = masked_cost(problem), eps[:, None]
        return (softmin(eps, cost, problem.log_nu + g / eps_col),
                softmin(eps, cost.transpose(1, 2), problem.log_mu + f / eps_col))
    def gauss_seidel(self, problem:Problem, f, g, eps, lam, omega, active=None) -> tuple:
        "`(row soft-min, column soft-min at f, new f, column soft-min at the new f)`; `lam`: `(B,)` dampings."
        cost, eps_col = masked_cost(problem), eps[:, None]
        row = softmin(eps, cost, problem.log_nu + g / eps_col)
        f_new = relaxed_step(f, row, eps_col, lam[:, None], problem.log_a_ratio, omega[:, None])
        transposed = cost.transpose(1, 2)
        return (row, softmin(eps, transposed, problem.log_mu + f / eps_col), f_new,
                softmin(eps, transposed, problem.log_mu + f_new / eps_col))


# %%
def lse_softmins(problem, f, g, eps):
    "Both soft-mins in float64 with `torch.logsumexp`, padded columns at zero cost."
    e = eps.double()[:, None, None]
    cost = problem.cost.double().masked_fill(problem.padded[:, None, :], 0.)
    h_rows = (problem.log_nu.double() + g.double() / e[:, 0])[:, None, :] - cost / e
    h_cols = (problem.log_mu.double() + f.double() / e[:, 0])[:, :, None] - cost / e
    return -e[:, 0] * torch.logsumexp(h_rows, 2), -e[:, 0] * torch.logsumexp(h_cols, 1)

g = torch.Generator().manual_seed(0)
A_ = torch.rand(3, 50, generator=g) * 0.1
mb_ = torch.tensor([[1] * 7 + [0] * 2, [0] * 9, [1] * 4 + [0] * 5]).bool()
C_ = torch.rand(3, 50, 9, generator=g)
f_, g_ = torch.randn(3, 50, generator=g) * 0.05, torch.randn(3, 9, generator=g) * 0.05
eps3_ = torch.tensor([0.05, 0.1, 0.02])
pb_ = setup_problem(A_, mb_.float(), C_, 0.5, 0.3, mask_b=mb_)
row_, col_ = ExactKernels().softmins(pb_, f_, g_, eps3_)
for x, y in zip((row_, col_), lse_softmins(pb_, f_, g_, eps3_)): test_close(x, y.float(), eps=1e-5)
om_ = torch.tensor([1.7, 1., 1.3])
lam3_ = damping(eps3_, 0.5)
r2_, c0_, fn_, c2_ = ExactKernels().gauss_seidel(pb_, f_, g_, eps3_, lam3_, om_)
test_eq((r2_, c0_), (row_, col_))
test_close(fn_, torch.lerp(f_, damping(eps3_[:, None], 0.5) * row_, om_[:, None]), eps=1e-6)
test_close(c2_, lse_softmins(pb_, fn_, g_, eps3_)[1].float(), eps=1e-5)


# %% [markdown]
# ## One exponential per cost entry
#
# `softmin` subtracts each row's maximum before exponentiating: two soft-mins, two passes over every cost
# entry, each of about six elementwise operations. A pass can do with one exponential per entry for *both*
# directions when the current potentials serve as the stabilizer (the "absorption" of Schmitzer's stabilized
# scaling algorithm): with $X_{ij}=(f_i+g_j-C_{ij})/\varepsilon+\log\nu_j$ and $K_{ij}=e^{X_{ij}}$ (the plan
# of Eq. 5 without $\mu_i$),
# $$\mathrm{softmin}_\varepsilon(\mathbf C,\log\nu+g/\varepsilon)_i
#   =f_i-\varepsilon\log\textstyle\sum_jK_{ij},\qquad
#   \mathrm{softmin}_\varepsilon(\mathbf C^\top,\log\mu+f/\varepsilon)_j=g_j+\varepsilon\log\nu_j
#   -\varepsilon\log\sum_i\mu_iK_{ij},$$
# so one block of $K$ gives its row sums and its contribution to the column sums (no transposed copy of the
# cost). Near the fixed point the row sums are $\approx e^{-f_i/\tau}$ and stay far from float32's limits. The
# exponential is `exp2` on base-2 exponents (the factor $\log_2 e$ folds into $1/\varepsilon$): torch's CPU
# `exp2` runs about 3× faster than its `exp` (3.3 against 1.2 G/s in cache measured here, one thread, same
# accuracy: 1 ulp), and 2.2× slower on arguments below its underflow threshold, so the exponent is clamped at
# $-120$ from below. Then the result of every image is checked: an image whose row or column sums are not
# finite or fall below $2^{24}\times$ the most the clamped entries can add (their error would then exceed one
# float32 rounding) is recomputed by `ExactKernels`.

# %%
#| export
def exponent_floor(dtype:torch.dtype) -> tuple[float, float]:
    "Floor of the base-2 exponents, and the trust factor: a sum of `k` terms >= `k * trust` is not spoiled."
    return (-1000., 2. ** -947) if dtype == torch.float64 else (-120., 2. ** -96)


# %%
floor_, trust_ = exponent_floor(torch.float32)
test_eq(torch.exp2(torch.tensor(floor_)) > 0, True)                      # a normal float32, no underflow path
test_eq(trust_ / 2. ** floor_, 2. ** 24)                                # 2^24 times what a clamped entry adds
test_eq(exponent_floor(torch.float64)[1] / 2. ** exponent_floor(torch.float64)[0], 2. ** 53)

# %% [markdown]
# With two threads each elementwise operation on a block is split between them by rows; a matrix-vector
# product over the whole block (the column sums) would then read half of the block from the other core's
# cache. On this machine that made a 1024×200 block's `exp2` + column sum take 270 µs with two threads against
# 90 µs with one. `block_col_sums` and `block_row_dots` therefore reduce `ROW_CHUNKS` row chunks separately
# (one `bmm` over the chunks, then a sum of 8 partial rows): 17 µs. `block_col_sums` takes several row
# weightings at once, so that two column sums of a block cost one read of it.

# %%
#| export
ROW_CHUNKS = 8  # row chunks of a block that its matrix products reduce separately (a multiple of the threads)

# %%
test_eq(ROW_CHUNKS % 2, 0)                                           # a multiple of two threads


# %%
#| export
def row_chunks(K:torch.Tensor # `(b, r, c)` block
              ) -> int:
    "`ROW_CHUNKS` on the CPU where it divides the rows, else 1."
    return ROW_CHUNKS if K.device.type == 'cpu' and K.shape[1] % ROW_CHUNKS == 0 else 1


# %%
test_eq((row_chunks(torch.zeros(2, 16, 3)), row_chunks(torch.zeros(2, 15, 3))), (8, 1))


# %%
#| export
def chunk_rows(weights:torch.Tensor, # `(b, k, r)`: `k` row weightings per image
               chunks:int # row chunks (`row_chunks`)
              ) -> torch.Tensor: # `(b·chunks, k, r/chunks)`
    "Row weightings as the left factors of a block's matrix product by row chunks."
    b, k, r = weights.shape
    return weights.reshape(b, k, chunks, r // chunks).transpose(1, 2).reshape(b * chunks, k, r // chunks)


# %%
w_ = torch.arange(16.).reshape(1, 2, 8)                                 # two weightings of 8 rows
test_eq(chunk_rows(w_, 4)[1], torch.tensor([[2., 3.], [10., 11.]]))     # chunk 1: rows 2-3 of both


# %%
#| export
def block_col_sums(weights:torch.Tensor, # `(b, k, r)`: `k` row weightings per image
                   K:torch.Tensor # `(b, r, c)` block (contiguous)
                  ) -> torch.Tensor: # `(b, k, c)`
    "$w^\\top K$ per image for `k` weightings in one read of `K`, reduced by row chunks (`row_chunks`)."
    (b, r, c), chunks = K.shape, row_chunks(K)
    products = torch.bmm(chunk_rows(weights, chunks), K.view(b * chunks, r // chunks, c))
    return products.view(b, chunks, weights.shape[1], c).sum(1)


# %%
K_, w_ = torch.rand(3, 16, 5, dtype=torch.float64), torch.rand(3, 2, 16, dtype=torch.float64)
test_close(block_col_sums(w_, K_), w_ @ K_, eps=1e-12)
test_close(block_col_sums(w_[:, :, :15], K_[:, :15].contiguous()), w_[:, :, :15] @ K_[:, :15], eps=1e-12)
test_eq(block_col_sums(w_, K_[:, :, :0]).shape, (3, 2, 0))              # no columns


# %%
#| export
def block_row_dots(K:torch.Tensor, # `(b, r, c)` block (contiguous)
                   v:torch.Tensor # `(b, c)` column weights
                  ) -> torch.Tensor: # `(b, r)`
    "$Kv$ per image, by the row chunks of `block_col_sums`."
    b, r, c = K.shape
    chunks = row_chunks(K)
    columns = v.reshape(b, 1, c, 1).expand(b, chunks, c, 1).reshape(b * chunks, c, 1)
    return torch.bmm(K.view(b * chunks, r // chunks, c), columns).view(b, r)


# %%
v_ = torch.rand(3, 5, dtype=torch.float64)
test_close(block_row_dots(K_, v_), (K_ @ v_[..., None])[..., 0], eps=1e-12)


# %% [markdown]
# ## The dense strategy
#
# A strategy cuts the cost into `Block`s, the parts one pass handles at once.

# %%
#| export
@dataclass
class Block:
    "Rows `rows` of the images `images` over their first `columns` columns: what a pass handles at once."
    images: slice
    rows: slice
    columns: int
    cost: torch.Tensor  # (b, r, columns) view of the cost
    padded: torch.Tensor|None  # (b, 1, columns) bool, the padded columns among these (None: there are none)
    first: bool = True  # the first row block of its images: their column sums start here


# %%
cost_ = torch.rand(3, 50, 9)
block_ = Block(slice(1, 3), slice(0, 16), 4, cost_[1:3, :16, :4], None, first=True)
test_eq(block_.cost.shape, (2, 16, 4))
assert block_.cost.data_ptr() == cost_[1, 0, 0].data_ptr()             # a view: the cost is not copied


# %% [markdown]
# A pass writes its exponents, its row and column sums and (for an alternating pair) the new potential of the
# rows. `PassBuffers` makes these tensors once per problem, and each block's views of them (`block_views`), so
# that a pass allocates nothing and indexes nothing: per block it runs its few operations on views made
# beforehand.

# %%
#| export
class PassBuffers:
    "The tensors the passes of a strategy write, made once per problem."
    def __init__(self, problem:Problem, blocks:list[Block]):
        B, n, m = problem.cost.shape
        new = problem.cost.new_empty
        self.neg_scale = new(B, 1, 1)                            # -1/ε in base 2
        self.row_part, self.col_part = new(B, n, 1), new(B, 1, m)   # f_i/ε and g_j/ε + log ν_j in base 2
        self.f, self.f_new, self.weights = new(B, n), new(B, n), new(B, n)   # the rows of an alternating pair
        self.eps, self.lam, self.omega = new(B, 1), new(B, 1), new(B, 1)    # per image
        self.row_sums = problem.cost.new_zeros(B, n)
        self.col_sums = problem.cost.new_zeros(B, 2, m)           # weighted by the new rows' weights; by μ
        self.work = new(max(bl.cost.numel() for bl in blocks))   # a block's exponents, then its kernel
        self.kept = None                                          # a copy of the exponents, made on first use


# %%
pd_ = setup_problem(A_, mb_.float(), C_, 0.5, 0.3, mask_b=mb_, block=None)
whole_ = Block(slice(0, 3), slice(0, 50), 9, pd_.cost, pd_.padded[:, None, :])
buffers_ = PassBuffers(pd_, [whole_])
test_eq((buffers_.work.numel(), buffers_.col_sums.shape, buffers_.kept), (3 * 50 * 9, (3, 2, 9), None))


# %% [markdown]
# The row chunks of `block_col_sums` are a layout of the row weights, made once for the weights that do not
# change ($\mu$) and filled in place for those that do:
#
# The views share the buffers' memory (what a pass writes through them lands in the buffers), and the row
# weights by chunks hold μ in both layouts:

# %%
#| export
@patch
def block_views(self:PassBuffers, problem:Problem, block:Block) -> dict:
    "The views of `block` into the buffers, and its row weights by chunks (`chunk_rows`)."
    images, rows, columns = block.images, block.rows, block.columns
    b, r = block.cost.shape[:2]
    chunks = row_chunks(block.cost)
    work = self.work[:block.cost.numel()].view(block.cost.shape)
    mu = problem.mu[images, rows]
    pair = chunk_rows(torch.stack([torch.zeros_like(mu), mu], 1), chunks)   # [new weights; μ], by chunks
    partial = block.cost.new_empty(b * chunks * 2 * columns)                  # the products, by chunks
    return dict(work=work, chunks=work.view(b * chunks, r // chunks, columns), mu=mu,
                mu_chunks=chunk_rows(mu[:, None], chunks).contiguous(), pair=pair,
                pair_weights=pair.view(b, chunks, 2, r // chunks)[:, :, 0],
                mu_products=partial[:b * chunks * columns].view(b * chunks, 1, columns),
                pair_products=partial.view(b * chunks, 2, columns),
                row_part=self.row_part[images, rows], col_part=self.col_part[images, :, :columns],
                neg_scale=self.neg_scale[images], row_sums=self.row_sums[images, rows],
                col_sums=self.col_sums[images, :, :columns], mu_col_sums=self.col_sums[images, 1:, :columns],
                f=self.f[images, rows], f_new=self.f_new[images, rows], weights=self.weights[images, rows],
                eps=self.eps[images], lam=self.lam[images], omega=self.omega[images],
                log_a_ratio=problem.log_a_ratio[images, rows])


# %%
views_ = buffers_.block_views(pd_, whole_)
views_['row_sums'].fill_(2.)
test_eq(buffers_.row_sums, torch.full((3, 50), 2.))
test_eq(views_['pair'][:, 1], views_['mu_chunks'][:, 0])
test_eq(views_['mu_chunks'].reshape(3, 50), pd_.mu)                     # 50 rows: one chunk
views_['pair_weights'].fill_(3.)
test_eq(views_['pair'][:, 0], torch.full((3, 50), 3.))


# %%
#| export
@patch
def kept_view(self:PassBuffers, work:torch.Tensor) -> torch.Tensor:
    "A view shaped as the block view `work` of a second buffer, for a copy of the exponents."
    if self.kept is None: self.kept = torch.empty_like(self.work)
    return self.kept[:work.numel()].view(work.shape)


# %%
kept_ = buffers_.kept_view(views_['work'])
test_eq((kept_.shape, buffers_.kept.numel()), ((3, 50, 9), 3 * 50 * 9))
assert kept_.data_ptr() != views_['work'].data_ptr()


# %% [markdown]
# `DenseKernels` makes the whole batch one block: on accelerators, and on the CPU where the whole cost fits in
# cache. Its methods, below, are those of every fast strategy; `BlockedKernels` only cuts the cost
# differently. It keeps what the checks of its passes compare with (the floors of the row sums and of the
# column sums weighted by $\mu$), computed once.

# %%
#| export
class DenseKernels:
    "The soft-min kernels with one exponential per cost entry, on the whole batch at once."
    def __init__(self, problem:Problem):
        self.blocks, columns = self.partition(problem)
        self.floor, self.trust = exponent_floor(problem.cost.dtype)
        self.row_floor = problem.cost.new_tensor(columns)[:, None] * self.trust   # (B, 1) least trusted rows
        self.mu_floor = problem.mu.sum(1, keepdim=True) * self.trust            # (B, 1) columns, weights μ
        self.buffers = PassBuffers(problem, self.blocks)
        self.parts = [(bl, self.buffers.block_views(problem, bl)) for bl in self.blocks]   # blocks, views
    def partition(self, problem:Problem) -> tuple[list[Block], list[int]]:
        "The blocks, and per image the number of columns they visit: one block, every column."
        B, n, m = problem.cost.shape
        padded = problem.padded[:, None, :] if bool(problem.padded.any()) else None
        return [Block(slice(0, B), slice(0, n), m, problem.cost, padded)], [m] * B
    def active_parts(self, active:torch.Tensor|None) -> list[tuple[Block, dict]]:
        "The blocks (with their views) a pass computes when only the images `active` need it: all of them."
        return self.parts


# %%
dense_ = DenseKernels(pd_)
test_eq(len(dense_.blocks), 1)
test_eq((dense_.blocks[0].columns, dense_.blocks[0].padded.shape), (9, (3, 1, 9)))
test_eq(dense_.row_floor[:, 0], torch.full((3,), 9 * dense_.trust))
test_eq(dense_.active_parts(torch.tensor([False, False, True])), dense_.parts)   # the whole batch, always


# %% [markdown]
# `exponentials` yields the kernel of each block, $K=2^{\max(X,\text{floor})}$ with the base-2 exponent
# $X_{ij}=\big((f_i+g_j-C_{ij})/\varepsilon+\log\nu_j\big)\log_2e$, in the block's view of the work buffer;
# with `keep` also a copy of $X$ (for the entropy of a plan).

# %%
#| export
@patch
def exponentials(self:DenseKernels, problem:Problem, f, g, eps, # the pair and its `(B,)` temperatures
                 keep:bool=False, # also yield a copy of the exponents
                 active:torch.Tensor|None=None): # `(B,)` bool, the images that need the pass (None: all)
    "Yield `(block, views, K, X)`: $K=2^{\\max(X,\\text{floor})}$, its exponents `X` if `keep` (else None)."
    buffers = self.buffers
    scale = (LOG2E / eps)[:, None]                                        # 1/ε in base 2
    torch.neg(scale, out=buffers.neg_scale[:, :, 0])
    torch.mul(f, scale, out=buffers.row_part[:, :, 0])                  # f_i/ε
    torch.mul(g, scale, out=buffers.col_part[:, 0]).add_(problem.log2_nu)   # g_j/ε + log ν_j
    for block, views in self.active_parts(active):
        X = torch.addcmul(views['col_part'], block.cost, views['neg_scale'], out=views['work'])
        X.add_(views['row_part'])
        kept = buffers.kept_view(X).copy_(X) if keep else None
        yield block, views, X.clamp_min_(self.floor).exp2_(), kept


# %%
for block_, views_, K_, X_ in dense_.exponentials(pd_, f_, g_, eps3_, keep=True):
    X64_ = (f_[:, :, None] + g_[:, None, :] - C_) / eps3_[:, None, None] + pd_.log_nu[:, None, :]
    real_ = ~pd_.padded[:, None, :].expand_as(X_)
    test_close(X_[real_], X64_[real_] * LOG2E, eps=1e-4)
    test_eq(K_, torch.exp2(X_.clamp_min(-120.)))


# %% [markdown]
# The soft-mins from the sums of a pass, and the check of the sums; columns beyond an image's real points have
# zero cost, so their soft-min is one number per image (`zero_cost_softmin`), and so is the row soft-min of an
# image without points. A block's column sums start at its images' first row block and accumulate over the
# others.

# %%
#| export
def softmin_from_sums(potential:torch.Tensor, # `(B, k)` f (rows) or g (columns) of the pass
                      log_sums:torch.Tensor, # `(B, k)` log of the row sums of K, or column sums of μ_i K_ij
                      eps:torch.Tensor, # `(B, 1)` temperatures
                      log_nu:torch.Tensor|None=None # `(B, m)` for the columns: log ν
                     ) -> torch.Tensor:
    "A soft-min from a pass's sums: $f_i-\\varepsilon\\log R_i$, $g_j+\\varepsilon(\\log\\nu_j-\\log S_j)$."
    if log_nu is None: return potential - eps * log_sums
    return potential + eps * (log_nu - log_sums)


# %%
x_, sums_ = torch.tensor([[1., 2.]]), torch.tensor([[math.e, 1.]])
test_close(softmin_from_sums(x_, sums_.log(), torch.tensor([[0.5]])), torch.tensor([[0.5, 2.]]))
test_close(softmin_from_sums(x_, sums_.log(), torch.tensor([[0.5]]), torch.tensor([[1., 0.]])),
           torch.tensor([[1., 2.]]))


# %%
#| export
def zero_cost_softmin(eps:torch.Tensor, # `(B,)` temperatures
                      h:torch.Tensor # `(B, k)` log-weights plus potentials/ε
                     ) -> torch.Tensor: # `(B, 1)`
    "The soft-min over a zero cost, $-\\varepsilon\\,\\mathrm{LSE}_jh_j$ (padded entries)."
    return softmin(eps, h.new_zeros(len(h), 1, h.shape[1]), h)


# %%
test_close(zero_cost_softmin(torch.tensor([0.1]), torch.tensor([[0., math.log(3.)]])),
           -0.1 * math.log(4.) * torch.ones(1, 1))                     # LSE(0, log 3) = log 4


# %%
#| export
def add_col_sums(col_sums:torch.Tensor, # `(b, k, c)` view of the column sums of a block's images
                 products:torch.Tensor, # `(b·chunks, k, c)` the block's products by row chunks
                 block:Block):
    "Add a block's share to the column sums of its images (the first row block writes them)."
    b = block.cost.shape[0]
    share = products.view(b, len(products) // b, *products.shape[1:]).sum(1)
    if block.first: col_sums.copy_(share)
    else: col_sums.add_(share)


# %%
sums2_, products_ = torch.zeros(2, 1, 3), torch.ones(2 * 4, 1, 3)
block2_ = Block(slice(0, 2), slice(0, 8), 3, torch.zeros(2, 8, 3), None)
add_col_sums(sums2_, products_, block2_)
add_col_sums(sums2_, products_, Block(slice(0, 2), slice(8, 16), 3, torch.zeros(2, 8, 3), None, first=False))
test_eq(sums2_, torch.full((2, 1, 3), 8.))                              # 4 chunks, then 4 more


# %%
#| export
def sum_extremes(sums:torch.Tensor, # `(B, k)` non-negative sums of a pass
                 padded:torch.Tensor|None=None # `(B, k)` bool, entries that do not count
                ) -> tuple[torch.Tensor, torch.Tensor]: # `(B, 1)` least and largest
    "Per image, the least and largest of its sums that count (`inf` and 0 where none does); NaN propagates."
    if sums.shape[1] == 0: return sums.new_full((len(sums), 1), math.inf), sums.new_zeros(len(sums), 1)
    if padded is None: return torch.aminmax(sums, dim=1, keepdim=True)
    return (sums.masked_fill(padded, math.inf).amin(1, keepdim=True),
            sums.masked_fill(padded, 0.).amax(1, keepdim=True))

# %%
_s = torch.tensor([[3., 1., 2.], [5., math.nan, 4.]])
test_eq(sum_extremes(_s)[0][0], torch.tensor([1.]))
assert sum_extremes(_s)[0][1].isnan().all() and sum_extremes(_s)[1][1].isnan().all()
test_eq(sum_extremes(_s, torch.tensor([[True, False, False], [False, True, False]])),
        (torch.tensor([[1.], [4.]]), torch.tensor([[2.], [5.]])))
test_eq(sum_extremes(torch.ones(2, 0)), (torch.full((2, 1), math.inf), torch.zeros(2, 1)))

# %%
#| export
@patch
def trusted(self:DenseKernels, problem:Problem,
            row_sums:torch.Tensor, # `(B, n)` row sums of K
            col_sums:torch.Tensor, # `(B, m)` column sums of w_i K_ij
            col_floor # `(B, 1)` least trusted column sums: `trust` × the sum of the weights w
           ) -> torch.Tensor: # `(B,)` bool
    "Per image: its sums finite and above what the clamped entries can add (`exponent_floor`), or no points."
    row_low, row_high = sum_extremes(row_sums)                  # a NaN propagates: an image with one is not trusted
    col_low, col_high = sum_extremes(col_sums, problem.padded if problem.any_padding else None)
    ok = (row_low >= self.row_floor) & (col_low >= col_floor) & (col_low > 0)
    return (ok & (torch.maximum(row_high, col_high) < math.inf))[:, 0] | problem.no_points[:, 0]


# %%
rs_, cs_ = torch.ones(3, 50), torch.ones(3, 9)
test_eq(dense_.trusted(pd_, rs_, cs_, dense_.mu_floor), torch.ones(3, dtype=torch.bool))
rs_[0, 3], cs_[2, 6] = 1e-38, 0.                        # image 2: a padded column does not count
test_eq(dense_.trusted(pd_, rs_, cs_, dense_.mu_floor), torch.tensor([False, True, True]))
cs_[2, 1] = math.inf
test_eq(dense_.trusted(pd_, rs_, cs_, dense_.mu_floor), torch.tensor([False, True, False]))
cs_[2, 1] = 1.
test_eq(dense_.trusted(pd_, rs_, cs_, dense_.mu_floor), torch.tensor([False, True, True]))
rs_[2, 7] = math.nan                                   # a NaN sum: not trusted (image 1 has no points: trusted)
test_eq(dense_.trusted(pd_, rs_, cs_, dense_.mu_floor), torch.tensor([False, True, False]))


# %% [markdown]
# The symmetric step in one pass: each block writes its row sums and adds its share of the column sums
# weighted by $\mu$; images the check does not trust fall back to `ExactKernels`. The test compares it with
# `ExactKernels` on the padded batch above (an image without points), on the whole tensor; where the
# potentials are far from stabilizing (zero potentials at a small ε: every entry of $K$ underflows), the
# images fall back to `ExactKernels` and still agree. `with_fallbacks` counts the images that fell back.

# %%
#| export
@patch
def softmins(self:DenseKernels, problem:Problem, f, g, eps) -> tuple[torch.Tensor, torch.Tensor]:
    "Both soft-mins of a symmetric step: over the columns at `g` `(B, n)`, over the rows at `f` `(B, m)`."
    buffers = self.buffers
    for block, views, K, _ in self.exponentials(problem, f, g, eps):
        torch.sum(K, 2, out=views['row_sums'])
        torch.bmm(views['mu_chunks'], views['chunks'], out=views['mu_products'])
        add_col_sums(views['mu_col_sums'], views['mu_products'], block)
    row_sums, col_sums, eps_col = buffers.row_sums, buffers.col_sums[:, 1], eps[:, None]
    row = softmin_from_sums(f, row_sums.log(), eps_col)
    col = softmin_from_sums(g, col_sums.log(), eps_col, problem.log_nu)
    if problem.any_padding:
        row = torch.where(problem.no_points, zero_cost_softmin(eps, problem.log_nu + g / eps_col), row)
        col = torch.where(problem.padded, zero_cost_softmin(eps, problem.log_mu + f / eps_col), col)
    for b in (~self.trusted(problem, row_sums, col_sums, self.mu_floor)).nonzero()[:, 0].tolist():
        one = slice(b, b + 1)
        exact_row, exact_col = ExactKernels().softmins(problem.image(b), f[one], g[one], eps[one])
        row[b], col[b] = exact_row[0], exact_col[0]
    return row, col


# %%
def with_fallbacks(fn, method='softmins'):
    "Run `fn()` and count the images whose kernel `method` fell back to `ExactKernels` (batches of one)."
    calls, exact = [], getattr(ExactKernels, method)
    def counting(self, problem, f, *args):
        calls.append(len(calls))
        return exact(self, problem, f, *args)
    with mock_patch.object(ExactKernels, method, counting): out = fn()
    return out, len(calls)

for f0, g0, ee, fallbacks in [(f_, g_, eps3_, 0), (0 * f_, 0 * g_, torch.full((3,), 1e-3), 2)]:
    (row, col), calls = with_fallbacks(lambda: dense_.softmins(pd_, f0, g0, ee))
    test_eq(calls, fallbacks)                        # image 1 has no points: nothing to fall back
    exact_row, exact_col = ExactKernels().softmins(pd_, f0, g0, ee)
    test_close(row, exact_row, eps=1e-5)
    test_close(col, exact_col, eps=1e-5)


# %% [markdown]
# The alternating pair in one pass: a block of rows gives its row sums, hence the new $f$ of those rows
# (over-relaxed), and then, weighted by $\mu_ie^{(f^{new}_i-f_i)/\varepsilon}$, its share of the column sums
# for the column soft-min at the new $f$; weighted by $\mu_i$ (in the same matrix product), its share of the
# column soft-min at the old $f$, which the marginal error of the incoming pair needs.

# %%
#| export
@patch
def gauss_seidel(self:DenseKernels, problem:Problem, f, g, eps, # the pair and its `(B,)` temperatures
                 lam:torch.Tensor, # `(B,)` dampings of the rows (`damping`)
                 omega:torch.Tensor, # `(B,)` over-relaxation
                 active:torch.Tensor|None=None # `(B,)` bool, the images that need the pair (None: all)
                ) -> tuple:
    "`(row soft-min, column soft-min at f, new f, column soft-min at the new f)` of an over-relaxed pair."
    buffers = self.buffers
    buffers.f.copy_(f)
    for per_image, value in ((buffers.eps, eps), (buffers.lam, lam), (buffers.omega, omega)):
        per_image.copy_(value[:, None])
    for block, views, K, _ in self.exponentials(problem, f, g, eps, active=active):
        log_sums = torch.sum(K, 2, out=views['row_sums']).log()
        f_rows, eps_rows = views['f'], views['eps']
        f_block = relaxed_step(f_rows, f_rows, eps_rows, views['lam'], views['log_a_ratio'], views['omega'],
                               log_sums)                                 # Eq. 6 with softmin = f - ε log R
        views['f_new'].copy_(f_block)
        weights = torch.mul(views['mu'], torch.exp((f_block - f_rows) / eps_rows), out=views['weights'])
        views['pair_weights'].copy_(weights.view(views['pair_weights'].shape))   # the rows at the new f
        torch.bmm(views['pair'], views['chunks'], out=views['pair_products'])      # both column sums at once
        add_col_sums(views['col_sums'], views['pair_products'], block)
    eps_col, row_sums = eps[:, None], buffers.row_sums
    row = softmin_from_sums(f, row_sums.log(), eps_col)
    col = softmin_from_sums(g, buffers.col_sums[:, 0].log(), eps_col, problem.log_nu)
    col_at_f = softmin_from_sums(g, buffers.col_sums[:, 1].log(), eps_col, problem.log_nu)
    f_new = buffers.f_new.clone()
    if problem.any_padding:                                   # zero-cost padded entries: their own soft-mins
        padded_row = zero_cost_softmin(eps, problem.log_nu + g / eps_col)
        row = torch.where(problem.no_points, padded_row, row)
        f_padded = relaxed_step(f, padded_row, eps_col, lam[:, None], problem.log_a_ratio, omega[:, None])
        f_new = torch.where(problem.no_points, f_padded, f_new)
        col_at_f = torch.where(problem.padded, zero_cost_softmin(eps, problem.log_mu + f / eps_col), col_at_f)
        col = torch.where(problem.padded, zero_cost_softmin(eps, problem.log_mu + f_new / eps_col), col)
    weights_floor = buffers.weights.sum(1, keepdim=True) * self.trust
    ok = self.trusted(problem, row_sums, buffers.col_sums[:, 0], weights_floor)
    ok &= self.trusted(problem, row_sums, buffers.col_sums[:, 1], self.mu_floor)
    if active is not None: ok |= ~active
    for b in (~ok).nonzero()[:, 0].tolist():
        one = slice(b, b + 1)
        exact = ExactKernels().gauss_seidel(problem.image(b), f[one], g[one], eps[one], lam[one], omega[one])
        row[b], col_at_f[b], f_new[b], col[b] = (x[0] for x in exact)
    return row, col_at_f, f_new, col


# %%
for f0, g0, ee, fallbacks in [(f_, g_, eps3_, 0), (0 * f_, 0 * g_, torch.full((3,), 1e-3), 2)]:
    lam_ = damping(ee, 0.5)
    fast, calls = with_fallbacks(lambda: dense_.gauss_seidel(pd_, f0, g0, ee, lam_, om_), 'gauss_seidel')
    test_eq(calls, fallbacks)
    exact = ExactKernels().gauss_seidel(pd_, f0, g0, ee, lam_, om_)
    for x, y in zip(fast, exact): test_close(x, y, eps=1e-4 * y.abs().max())


# %% [markdown]
# ## The blocked strategy
#
# On the CPU a pass over a large cost is faster in blocks of about `block` cost entries (4 MiB of float32),
# whose exponents stay in cache from one elementwise operation to the next: each image only over its real
# columns when its padded points come last (as `pad_points` puts them). Consecutive images with the same
# number of columns share a block, so small images do not pay one set of operations each; an image larger than
# a block is cut into row blocks (whole row chunks). Measured before this strategy was split off (B=8,
# official mode, forward and backward): 2^19 / 2^20 / 2^21 entries gave 43 / 46 / 52 ms at 32×32 with 200
# points with one thread, 28 / 25 / 33 ms with two; 365 / 347 / 373 and 227 / 194 / 218 ms at 64×64 with 500
# points. A pass of the converged mode skips the blocks whose images have all converged.
#
# Images without padding share blocks (two in a block of 900 entries, then the third alone; a block of 100
# entries cuts each image into rows). On every layout, with padding (the padded entries hold NaN where they
# are never read), an image without points, padding that is not at the end, tiny blocks, the fast kernels
# agree with the exact ones, and fall back only where every entry of $K$ underflows.

# %%
#| export
class BlockedKernels(DenseKernels):
    "The soft-min kernels of `DenseKernels` on cache-sized blocks of the cost (the CPU, large costs)."
    def __init__(self, problem:Problem, block:int=BLOCK):
        self.block = block  # cost entries per block
        super().__init__(problem)
    def partition(self, problem:Problem) -> tuple[list[Block], list[int]]:
        "Runs of images with the same leading real columns, `block` entries at most; large images by rows."
        B, n, m = problem.cost.shape
        real = (~problem.padded).sum(1)
        leading = ((torch.arange(m, device=real.device) < real[:, None]) == ~problem.padded).all(1)
        columns = [k if first else m for k, first in zip(real.tolist(), leading.tolist())]
        runs = []                                           # [first image, end, columns, rows per block]
        for b, visited in enumerate(columns):
            if visited == 0: continue
            fits = (b + 1 - runs[-1][0]) * n * visited <= self.block if runs else False
            if runs and runs[-1][1] == b and runs[-1][2] == visited and fits:
                runs[-1][1] = b + 1
                continue
            rows = max(1, self.block // visited)
            if rows > ROW_CHUNKS: rows -= rows % ROW_CHUNKS                # whole row chunks (`row_chunks`)
            runs.append([b, b + 1, visited, min(rows, n)])
        blocks = []
        for first, end, visited, rows in runs:
            padded = problem.padded[first:end, None, :visited]
            for r0 in range(0, n, rows):
                cost = problem.cost[first:end, r0:r0 + rows, :visited]
                blocks.append(Block(slice(first, end), slice(r0, min(n, r0 + rows)), visited, cost,
                                    padded if bool(padded.any()) else None, r0 == 0))
        return blocks, columns
    def active_parts(self, active:torch.Tensor|None) -> list[tuple[Block, dict]]:
        "The blocks (with their views) with at least one image in `active` (None: all)."
        if active is None: return self.parts
        flags = active.tolist()
        return [(bl, views) for bl, views in self.parts if any(flags[bl.images])]


# %%
full_, Cr_ = torch.ones_like(mb_), torch.rand(3, 50, 9, generator=g)
pf_ = setup_problem(A_, full_.float(), Cr_, 0.5, 0.3, mask_b=full_)
test_eq([(bl.images.start, bl.images.stop) for bl in BlockedKernels(pf_, 900).blocks], [(0, 2), (2, 3)])
rows_ = [(bl.images.start, bl.rows.start, bl.first) for bl in BlockedKernels(pf_, 100).blocks]
test_eq(rows_[:3], [(0, 0, True), (0, 8, False), (0, 16, False)])
C_nan = C_.masked_fill(~mb_[:, None, :], math.nan)                     # never read where it is skipped
perm = [8, 0, 1, 2, 3, 4, 5, 6, 7]                                     # padding first: visited, finite
layouts = [(mb_, C_nan, g_, 64), (mb_, C_nan, g_, 1000), (mb_[:, perm], C_[:, :, perm], g_[:, perm], 100),
           (full_, Cr_, g_, 900), (full_, Cr_, g_, 100)]
for mask, cost, gm, block in layouts:
    pr = setup_problem(A_, mask.float(), cost, 0.5, 0.3, mask_b=mask)
    kernels = BlockedKernels(pr, block)
    underflow = (0 * f_, 0 * gm, torch.full((3,), 1e-3), int(mask.any(1).sum()))
    for f0, g0, ee, fallbacks in [(f_, gm, eps3_, 0), underflow]:
        (row, col), calls = with_fallbacks(lambda: kernels.softmins(pr, f0, g0, ee))
        test_eq(calls, fallbacks)
        for x, y in zip((row, col), ExactKernels().softmins(pr, f0, g0, ee)): test_close(x, y, eps=1e-5)
        lam_ = damping(ee, 0.5)
        fast, calls = with_fallbacks(lambda: kernels.gauss_seidel(pr, f0, g0, ee, lam_, om_), 'gauss_seidel')
        test_eq(calls, fallbacks)
        for x, y in zip(fast, ExactKernels().gauss_seidel(pr, f0, g0, ee, lam_, om_)):
            test_close(x, y, eps=1e-4 * y.abs().max())
skipped_ = BlockedKernels(pf_, 900)
test_eq(len(skipped_.active_parts(torch.tensor([False, False, True]))), 1)   # converged images are skipped


# %% [markdown]
# ## Choosing the strategy
#
# Once per problem, from the device, the size and the padding: the blocks only pay on the CPU, where the cost
# does not fit in one block, or where skipping the padded columns of some images saves passes over them. (A
# cost of two blocks in one, B=8 with 32×32 maps and 200 points, made the plan's statistics 10-40 % slower
# here.)

# %%
#| export
def choose_kernels(problem:Problem,
                   block:int|None=BLOCK # CPU: cost entries per block; None: the whole batch at once
                  ) -> DenseKernels:
    "`DenseKernels` on accelerators, for `block=None` and for one unpadded block, else `BlockedKernels`."
    cost = problem.cost
    small = block is None or cost.numel() <= block and not bool(problem.padded.any())
    if cost.device.type != 'cpu' or small: return DenseKernels(problem)
    return BlockedKernels(problem, block)


# %%
test_eq(type(choose_kernels(pf_)), DenseKernels)
test_eq(type(choose_kernels(setup_problem(A_, mb_.float(), C_, 0.5, 0.3, mask_b=mb_))), BlockedKernels)
test_eq(type(choose_kernels(pf_, 100)), BlockedKernels)                # more than one block
test_eq(type(setup_problem(A_, mb_.float(), C_, 0.5, 0.3, mask_b=mb_, block=None).kernels), DenseKernels)


# %%
#| hide
import nbdev
nbdev.nbdev_export()
