# %% [markdown]
# # Theory
#
# > The generalized loss (Eq. 1), the generalized Sinkhorn iterations, and why the L2 and Bayesian losses are half-iteration (suboptimal) approximations of its transport plan.

# %%
#| default_exp theory

# %%
#| export
from __future__ import annotations
import math
import torch
from uotcrowd.costs import sq_distances, bl_background_cost, BackgroundForm

# %%
#| hide
import numpy as np
import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.core import pixel_centres
from uotcrowd.plans import uot_plan, uot_value

# %%
#| hide

torch.set_printoptions(precision=4, sci_mode=False)


# %% [markdown]
# ## The loss and its transport plan
#
# A predicted density map is a set of weighted pixels $\mathcal A=\{(a_i,\boldsymbol x_i)\}_{i=1}^n$, the
# annotations a set of weighted points $\mathcal B=\{(b_j,\boldsymbol y_j)\}_{j=1}^m$ with $b_j=1$. The
# generalized loss is an entropic *unbalanced* optimal transport cost (Eq. 1):
# $$\mathcal L^\tau_{\mathbf C}(\mathcal A,\mathcal B)=\min_{\mathbf P\in\mathbb R_+^{n\times m}}
#   \langle\mathbf C,\mathbf P\rangle-\varepsilon H(\mathbf P)+\tau D_1(\mathbf P\mathbf 1_m|\boldsymbol a)
#   +\tau D_2(\mathbf P^\top\mathbf 1_n|\boldsymbol b),$$
# with $H(\mathbf P)=-\sum_{ij}P_{ij}\log P_{ij}$, $D_1$ the squared L2 distance (Eq. 2) and $D_2$ the L1
# distance (Eq. 3). The row sums $\hat{\boldsymbol a}=\mathbf P\mathbf 1_m$ form the "ground-truth" density
# map that the loss builds from the annotations; the column sums
# $\hat{\boldsymbol b}=\mathbf P^\top\mathbf 1_n$ reconstruct the annotations.
#
# `uot_objective` evaluates the bracket of Eq. 1 for a given plan, so we can compare plans by the value they
# give. Throughout this notebook the cost is the squared Euclidean distance
# $C_{ij}=\|\boldsymbol x_i-\boldsymbol y_j\|^2$ (`uotcrowd.costs.sq_distances`), the cost under which Sec. 4
# of the paper relates the loss to L2 and BL.

# %%
#| export
def entropy(plan:torch.Tensor # non-negative transport plan
           ) -> torch.Tensor:
    "The entropy $H(P)=-\\sum P\\log P$ of the paper, with $0\\log 0=0$."
    return -torch.special.xlogy(plan, plan).sum()


# %%
test_close(entropy(torch.full((2, 2), 0.25)), math.log(4))
test_eq(entropy(torch.tensor([[1., 0.]])), 0.)   # 0 log 0 = 0


# %%
#| export
def uot_objective(plan:torch.Tensor, # `(n, m)` transport plan
                  cost:torch.Tensor, # `(n, m)` cost matrix
                  a:torch.Tensor, # `(n,)` predicted density
                  b:torch.Tensor, # `(m,)` annotation weights (ones)
                  eps:float, # entropic regularization $\varepsilon$
                  tau:float=1., # marginal weight $\tau$
                  return_terms:bool=False # also return the four terms
                 ):
    "The bracket of Eq. 1 with $D_1$ the squared L2 (Eq. 2) and $D_2$ the L1 distance (Eq. 3)."
    terms = dict(transport=(cost*plan).sum(), entropy=-eps*entropy(plan),
                 pixel=tau*(plan.sum(1) - a).square().sum(), point=tau*(plan.sum(0) - b).abs().sum())
    total = sum(terms.values())
    return (total, terms) if return_terms else total


# %%
x_ = torch.tensor([[0., 0.], [1., 0.]])
y_ = torch.tensor([[0., 1.]])
test_close(sq_distances(x_, y_), torch.tensor([[1.], [2.]]))
# a plan that reproduces both marginals exactly leaves only transport and entropy
P_ = torch.tensor([[0.25], [0.75]])
C_ = sq_distances(x_, y_)
val, terms = uot_objective(P_, C_, P_.sum(1), torch.ones(1), eps=0.1, return_terms=True)
test_close(terms['pixel'], 0.)
test_close(terms['point'], 0.)
test_close(val, 0.25*1 + 0.75*2 + 0.1*(0.25*math.log(0.25) + 0.75*math.log(0.75)))
test_eq(entropy(torch.zeros(2, 2)), 0.)


# %% [markdown]
# ## The generalized Sinkhorn iterations
#
# Replacing $D_1, D_2$ by KL divergences makes the minimizer of Eq. 1 have the scaling form (Eq. 5)
# $\mathbf P=\operatorname{diag}(\mathbf u)\,\mathbf K\operatorname{diag}(\mathbf v)$ with the Gibbs kernel
# $\mathbf K=e^{-\mathbf C/\varepsilon}$, and $\mathbf u,\mathbf v$ are found by the generalized Sinkhorn
# iterations (Eq. 6)
# $$\mathbf u\leftarrow\Big(\frac{\boldsymbol a}{\mathbf K\mathbf v}\Big)^{\frac{\tau}{\tau+\varepsilon}},\qquad
#   \mathbf v\leftarrow\Big(\frac{\boldsymbol b}{\mathbf K^\top\mathbf u}\Big)^{\frac{\tau}{\tau+\varepsilon}}.$$
# Precisely, this fixed point minimizes
# $\langle\mathbf C,\mathbf P\rangle+\varepsilon\,\mathrm{KL}(\mathbf P|\mathbf 1)+\tau\,\mathrm{KL}(\mathbf
# P\mathbf 1|\boldsymbol a)
#  +\tau\,\mathrm{KL}(\mathbf P^\top\mathbf 1|\boldsymbol b)$ with $\mathrm{KL}(p|q)=\sum p\log\frac pq-p+q$
# (`uotcrowd.plans.uot_value` with `reference='uniform'`). With $\tau\to\infty$ the exponent is 1 and we
# recover the balanced Sinkhorn of Eq. 9.
#
# The textbook version below multiplies kernels; it is a teaching cell, not part of the library. For small
# $\varepsilon$ the entries of $\mathbf K$ underflow to 0 and $\boldsymbol a/\mathbf K\mathbf v$ becomes
# $0/0$. The library's solver `uotcrowd.sinkhorn` keeps $\log\mathbf u,\log\mathbf v$ (as potentials
# $\varepsilon\log\mathbf u$, $\varepsilon\log\mathbf v$) and uses log-sum-exp:
# $\log\mathbf u\leftarrow\frac{\tau}{\tau+\varepsilon}\big(\log\boldsymbol a-\mathrm{LSE}_j(-C_{ij}/\varepsilon+\log v_j)\big)$.
# Every plan of this notebook comes from it: `eq6_plan` iterates Eq. 6 with the entropy of Eq. 5-6
# (`reference='uniform'`) until the marginal error is below $10^{-12}$.

# %%
def gibbs_kernel(cost:torch.Tensor, # cost matrix
                 eps:float # entropic regularization
                ) -> torch.Tensor:
    "The Gibbs kernel $K=\\exp(-C/\\varepsilon)$ (Eq. 5); underflows to 0 for $C\\gg\\varepsilon$."
    return torch.exp(-cost/eps)

def uot_sinkhorn_naive(a, b, cost, eps:float, tau:float=1., n_iter:int=1000) -> torch.Tensor:
    "Generalized Sinkhorn (Eq. 6) with kernel products: the textbook form, unstable for small `eps`."
    K, lam = gibbs_kernel(cost, eps), tau/(tau + eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(n_iter):
        u = (a/(K@v))**lam
        v = (b/(K.T@u))**lam
    return u[:, None]*K*v[None]

def eq6_plan(a, b, cost, eps:float, tau:float|None=1., max_iter:int=20000) -> torch.Tensor:
    "The plan of Eq. 5-6 for one image by `uotcrowd.plans` (`tau=None`: balanced), iterated to convergence."
    return uot_plan(a, b, cost, eps, tau, grad='none', reference='uniform', mode='converged', tol=1e-12,
                    max_iter=max_iter)

def kl_objective(plan, cost, a, b, eps:float, tau:float=1.) -> torch.Tensor:
    "The objective the generalized Sinkhorn minimizes: Eq. 1 with KL in place of $D_1$, $D_2$ and $H$."
    return uot_value(a[None], b[None], cost[None], eps, tau, plan=plan[None], reference='uniform')[0]


# %% [markdown]
# The textbook form and the library agree when the kernel does not underflow, and both agree with POT's
# `sinkhorn_unbalanced` (with `reg_type='entropy'`, the plain entropy of Eq. 5-6). At fixed point the plan
# satisfies the optimality condition of the KL problem,
# $\mathbf P\mathbf 1=\boldsymbol a^{\lambda}(\mathbf K\mathbf v)^{1-\lambda}$.

# %%
import ot, warnings

# %%
g_ = torch.Generator().manual_seed(0)
xs_, ys_ = torch.rand(30, 2, generator=g_, dtype=torch.float64), torch.rand(4, 2, generator=g_,
                                                                            dtype=torch.float64)
a_, b_ = torch.rand(30, generator=g_, dtype=torch.float64)*0.2, torch.ones(4, dtype=torch.float64)
C_ = sq_distances(xs_, ys_)
P_log = eq6_plan(a_, b_, C_, eps=0.05, tau=1.)
test_close(uot_sinkhorn_naive(a_, b_, C_, eps=0.05, tau=1., n_iter=2000), P_log, eps=1e-10)
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    P_pot = ot.unbalanced.sinkhorn_unbalanced(a_.numpy(), b_.numpy(), C_.numpy(), 0.05, 1.,
                                              reg_type='entropy', numItermax=5000, stopThr=1e-14)
test_close(P_log, torch.from_numpy(P_pot), eps=1e-9)
# balanced limit: both marginals exact
P_bal = eq6_plan(a_/a_.sum(), b_/4, C_, eps=0.05, tau=None)
test_close(P_bal.sum(0), b_/4, eps=1e-8)
test_close(P_bal.sum(1), a_/a_.sum(), eps=1e-8)
# at small eps the naive kernel underflows and returns NaN; the log-domain library does not
with np.errstate(all='ignore'):
    assert torch.isnan(uot_sinkhorn_naive(a_, b_, C_*1000, eps=0.05, n_iter=5)).any()
assert torch.isfinite(eq6_plan(a_, b_, C_*1000, eps=0.05, max_iter=5)).all()


# %% [markdown]
# ## Half-iteration plans
#
# The balanced Sinkhorn iterations of Eq. 9 start from a uniform scaling and alternate
# $\mathbf u=\boldsymbol a/\mathbf K\mathbf v$ and $\mathbf v=\boldsymbol b/\mathbf K^\top\mathbf u$. Stopping
# after *one half iteration* gives two closed-form plans (Eq. 10):
#
# * **u-update from $\mathbf v=\mathbf 1$** ($\hat{\mathbf P}$, the Bayesian loss):
#   $\hat P_{ij}=\frac{a_i}{\sum_{j'}K_{ij'}}K_{ij}=\hat\pi_{ij}\,a_i$, where $\hat\pi_{ij}$ is a softmax
#   *over the annotations*; its rows reproduce $\boldsymbol a$ exactly,
#   $\hat{\mathbf P}\mathbf 1_m=\boldsymbol a$.
# * **v-update from $\mathbf u=\mathbf 1$** ($\tilde{\mathbf P}$, the L2 loss):
#   $\tilde P_{ij}=K_{ij}\frac{b_j}{\sum_{i'}K_{i'j}}=\tilde\pi_{ij}$ (with $b_j=1$), a softmax *over the
#   pixels*; its columns reproduce $\boldsymbol b$ exactly, $\tilde{\mathbf P}^\top\mathbf 1_n=\boldsymbol b$.
#
# Both softmaxes are computed stably as `torch.softmax(-C/eps, dim)`; the naive kernel-ratio version
# underflows to $0/0$ for pixels far from every annotation when $\varepsilon$ is small.

# %%
#| export
def plan_u_update(cost:torch.Tensor, # `(n, m)` cost between pixels and annotations
                  a:torch.Tensor, # `(n,)` predicted density
                  eps:float # entropic regularization
                 ) -> torch.Tensor: # `(n, m)` plan $\hat P$
    "$\\hat P=\\mathrm{diag}(a/Kv)Kdiag(v)$ with $v=1$: one u-update (Eq. 10), the Bayesian-loss plan."
    return torch.softmax(-cost/eps, dim=1)*a[:, None]


# %%
K_ = gibbs_kernel(C_, 0.05)
test_close(plan_u_update(C_, a_, 0.05), a_[:, None]*K_/K_.sum(1, keepdim=True), eps=1e-12)
test_close(plan_u_update(C_, a_, 0.05).sum(1), a_)          # rows reproduce a: D1 = 0
# the half plans are exactly one step of the balanced iterations (Eq. 9) from a uniform start
test_close(plan_u_update(C_, a_, 0.05), (a_/(K_@torch.ones(4, dtype=torch.float64)))[:, None]*K_, eps=1e-12)
# small eps: the naive ratio is 0/0, the softmax is exact
with np.errstate(all='ignore'):
    K_small = gibbs_kernel(C_.float(), 1e-4)
    assert torch.isnan(K_small/K_small.sum(1, keepdim=True)).any()
assert torch.isfinite(plan_u_update(C_.float(), a_.float(), 1e-4)).all()


# %%
#| export
def plan_v_update(cost:torch.Tensor, # `(n, m)` cost between pixels and annotations
                  eps:float, # entropic regularization
                  b:torch.Tensor|None=None # `(m,)` annotation weights (default ones)
                 ) -> torch.Tensor: # `(n, m)` plan $\tilde P$
    "$\\tilde P=\\mathrm{diag}(u)K\\mathrm{diag}(b/K^\\top u)$, $u=1$: one v-update (Eq. 10), the L2-loss plan."
    P = torch.softmax(-cost/eps, dim=0)
    return P if b is None else P*b[None]


# %%
test_close(plan_v_update(C_, 0.05), K_/K_.sum(0, keepdim=True), eps=1e-12)
test_close(plan_v_update(C_, 0.05).sum(0), torch.ones(4, dtype=torch.float64))  # columns reproduce b: D2 = 0
b2_ = torch.tensor([1., 2., 1., 1.], dtype=torch.float64)
test_close(plan_v_update(C_, 0.05, b2_).sum(0), b2_)


# %% [markdown]
# ## $\tilde{\mathbf P}$ builds a Gaussian density map: the L2 loss
#
# With $C_{ij}=\|\boldsymbol x_i-\boldsymbol y_j\|^2$ the kernel is an unnormalized isotropic Gaussian,
# $K_{ij}=\exp\!\big(-\|\boldsymbol x_i-\boldsymbol y_j\|^2/(2\cdot\tfrac{\varepsilon}{2})\big)$, of variance
# $\sigma^2=\varepsilon/2$. The pixel marginal of $\tilde{\mathbf P}$ is therefore (Eq. 12)
# $$\tilde a_i=\sum_{j=1}^m\frac{\mathcal N(\boldsymbol x_i;\boldsymbol y_j,\tfrac\varepsilon2\mathbf I)}
#   {\sum_{i'}\mathcal N(\boldsymbol x_{i'};\boldsymbol y_j,\tfrac\varepsilon2\mathbf I)},$$
# the classic ground-truth density map: one Gaussian per head, each normalized to sum to 1 over the image.
# Substituting $\tilde{\mathbf P}$ into Eq. 1, transport and entropy do not depend on $\boldsymbol a$,
# $D_2=0$, and with $\tau=1$ only $\|\tilde{\boldsymbol a}-\boldsymbol a\|^2$ is left: the pixel-wise L2 loss
# (Eq. 11).
#
# We check this against an independently written density map: SciPy's Gaussian pdf, normalized over the grid.
# The loss itself is `L2DensityLoss` in [baselines](04a_baselines.ipynb), whose targets integrate the same
# Gaussians over each cell and are checked there against this marginal.

# %%
#| export
def gaussian_density_from_plan(points:torch.Tensor, # `(m, 2)` annotations
                               centres:torch.Tensor, # `(n, 2)` pixel centres, same units
                               eps:float # entropic regularization, in squared units of the coordinates
                              ) -> torch.Tensor: # `(n,)` density $\tilde P1$
    "Pixel marginal of $\\tilde P$ for the squared distance: Gaussians of variance $\\varepsilon/2$, summing to 1."
    if len(points) == 0: return centres.new_zeros(len(centres))
    return plan_v_update(sq_distances(centres, points), eps).sum(1)


# %%
from scipy.stats import multivariate_normal

# %%
h_ = w_ = 24
eps_ = 2*2.0**2  # sigma = 2 pixels
centres_ = pixel_centres(h_, w_, stride=1, dtype=torch.float64)
pts_ = torch.tensor([[6.2, 7.9], [15.5, 12.3], [17.0, 18.4]], dtype=torch.float64)
ref = np.zeros(h_*w_)
for p in pts_.numpy():
    pdf = multivariate_normal(mean=p, cov=eps_/2*np.eye(2)).pdf(centres_.numpy())
    ref += pdf/pdf.sum()
test_close(gaussian_density_from_plan(pts_, centres_, eps_), torch.from_numpy(ref), eps=1e-12)
test_close(gaussian_density_from_plan(pts_, centres_, eps_).sum(), 3.)


# %% [markdown]
# ## $\hat{\mathbf P}$ is the Bayesian posterior: the Bayesian loss
#
# For $\hat{\mathbf P}$, $\hat\pi_{ij}=K_{ij}/\sum_{j'}K_{ij'}$ is the posterior probability that pixel $i$
# belongs to head $j$ under Gaussian likelihoods
# $\mathcal N(\boldsymbol x_i;\boldsymbol y_j,\sigma^2\mathbf I)$ with $\sigma^2=\varepsilon/2$ and equal
# priors, exactly BL's posterior. The point marginal $[\hat{\mathbf P}^\top\mathbf 1]_j=\sum_i\hat\pi_{ij}a_i$
# is BL's *expected count* of head $j$. Since $\hat{\mathbf P}\mathbf 1=\boldsymbol a$, $D_1=0$; dropping the
# entropy (small $\varepsilon$), with $\tau=1$ (Eq. 13-14):
# $$\hat{\mathcal L}=\sum_i\omega_i a_i+\sum_j\Big|1-\sum_i\hat\pi_{ij}a_i\Big|,\qquad
#   \omega_i=\sum_j C_{ij}\hat\pi_{ij}.$$
# The second term is the Bayesian loss; the first is a *background* term that charges every unit of density
# the posterior-averaged squared distance to the annotations.
#
# We check the expected counts against a plain double loop over pixels and heads. The loss itself is
# `BayesianLoss` in [baselines](04a_baselines.ipynb), whose expected counts are checked there against this
# marginal.

# %%
#| export
def bl_expected_counts_from_plan(density:torch.Tensor, # `(n,)` predicted density
                                 points:torch.Tensor, # `(m, 2)` annotations
                                 centres:torch.Tensor, # `(n, 2)` pixel centres, same units
                                 eps:float # entropic regularization ($2\sigma^2$)
                                ) -> torch.Tensor: # `(m,)` expected counts $\hat P^\top 1$
    "Point marginal of $\\hat P$ for the squared distance: the Bayesian-loss expected count per annotation."
    return plan_u_update(sq_distances(centres, points), density, eps).sum(0)


# %%
dens_ = torch.rand(h_*w_, generator=g_, dtype=torch.float64)*0.01
sigma2 = eps_/2
expected = []
for j in range(len(pts_)):
    total = 0.
    for i in range(h_*w_):
        lik = [math.exp(-((centres_[i] - pts_[k])**2).sum().item()/(2*sigma2)) for k in range(len(pts_))]
        total += lik[j]/sum(lik)*dens_[i].item()
    expected.append(total)
test_close(bl_expected_counts_from_plan(dens_, pts_, centres_, eps_),
           torch.tensor(expected, dtype=torch.float64), eps=1e-12)
# the posterior over heads sums to 1 at every pixel, so the expected counts sum to the predicted count
test_close(bl_expected_counts_from_plan(dens_, pts_, centres_, eps_).sum(), dens_.sum())


# %% [markdown]
# ## Background weights: $\omega$ (Eq. 14) and BL's $\bar\omega$ (Eq. 15)
#
# BL+ handles background with a dummy "background point" per pixel at distance
# $d-\|\boldsymbol x_i-\boldsymbol y_{\eta(i)}\|$ from it, $\eta(i)$ the nearest annotation; its posterior is
# (Eq. 15)
# $$\bar\omega_i=\frac{\bar k_i}{\bar k_i+\sum_j K_{ij}},\qquad
#   \bar k_i=\exp\!\big(-(d-\|\boldsymbol x_i-\boldsymbol y_{\eta(i)}\|)^2/\varepsilon\big),$$
# and the background loss is $\sum_i\bar\omega_i a_i$, the same form as the first term of Eq. 14 with other
# weights. The official BL code uses a different background distance,
# $d^2/\|\boldsymbol x_i-\boldsymbol y_{\eta(i)}\|^2$ in place of $(d-\|\cdot\|)^2$ (`form='code'`); both are
# offered. Stable versions work with logits and `softmax`.

# %%
#| export
def bl_omega(centres:torch.Tensor, # `(n, 2)` pixel centres
             points:torch.Tensor, # `(m, 2)` annotations
             eps:float # entropic regularization ($2\sigma^2$)
            ) -> torch.Tensor: # `(n,)` weights $\omega_i=\sum_j C_{ij}\hat\pi_{ij}$
    "Background weight of the approximate UOT loss (Eq. 14): posterior mean squared distance to the annotations."
    cost = sq_distances(centres, points)
    return (torch.softmax(-cost/eps, dim=1)*cost).sum(1)


# %%
C2_ = sq_distances(centres_, pts_)
test_close(bl_omega(centres_, pts_, eps_), (plan_u_update(C2_, torch.ones(h_*w_, dtype=torch.float64), eps_)
                                            *C2_).sum(1))


# %%
#| export
def bl_background_logit(centres:torch.Tensor, # `(n, 2)` pixel centres
                        points:torch.Tensor, # `(m, 2)` annotations (m >= 1)
                        eps:float, # entropic regularization ($2\sigma^2$)
                        d:float, # background distance, same units as the coordinates
                        form:BackgroundForm='paper' # 'paper': $(d-r)^2$ (Eq. 15); 'code': $d^2/r^2$ (official BL code)
                       ) -> torch.Tensor: # `(n,)` log-likelihood $\log\bar k_i$
    "Log-likelihood of BL's background point for each pixel, from the distance $r$ to the nearest annotation."
    return -bl_background_cost(sq_distances(centres, points).min(1).values, d, form)/eps


# %%
d_ = 8.
r_ = C2_.min(1).values.sqrt()
test_close(bl_background_logit(centres_, pts_, eps_, d_), -(d_ - r_)**2/eps_, eps=1e-10)
test_close(bl_background_logit(centres_, pts_, eps_, d_, form='code'), -d_**2/(r_**2 + 1e-5)/eps_, eps=1e-6)


# %%
#| export
def bl_omega_bar(centres, points, eps:float, d:float, form:BackgroundForm='paper') -> torch.Tensor:
    "BL's background weight $\\bar\\omega_i=\\bar k_i/(\\bar k_i+\\sum_j K_{ij})$ (Eq. 15), by a softmax."
    logits = torch.cat([-sq_distances(centres, points)/eps,
                        bl_background_logit(centres, points, eps, d, form)[:, None]], 1)
    return torch.softmax(logits, dim=1)[:, -1]


# %%
d_ = 8.
K_ = gibbs_kernel(sq_distances(centres_, pts_), eps_)
r_ = sq_distances(centres_, pts_).min(1).values.sqrt()
kbar = torch.exp(-(d_ - r_)**2/eps_)
test_close(bl_omega_bar(centres_, pts_, eps_, d_), kbar/(kbar + K_.sum(1)), eps=1e-12)
# the rewritten form of Eq. 15: exp(2d r/eps - d^2/eps) * K_{i,eta(i)} / (kbar + sum_j K_ij)
pibar = K_.max(1).values/(kbar + K_.sum(1))
test_close(bl_omega_bar(centres_, pts_, eps_, d_), torch.exp(2*d_*r_/eps_ - d_**2/eps_)*pibar, eps=1e-12)
kcode = torch.exp(-(d_**2/(r_**2 + 1e-5))/eps_)
test_close(bl_omega_bar(centres_, pts_, eps_, d_, form='code'), kcode/(kcode + K_.sum(1)), eps=1e-12)
test_fail(lambda: bl_background_logit(centres_, pts_, eps_, d_, form='x'),
          contains="form must be one of paper, code, got 'x'")


# %% [markdown]
# ## A toy scene: the optimal plan against the two half-iteration plans
#
# As in Fig. 2 of the paper: a 9×9 density map with two annotations. The prediction puts 0.8 and 1.1 people
# around the two heads plus a false positive of 0.15 in a corner. Coordinates are divided by the image size,
# so the map covers $[0,1]^2$, and $\varepsilon=2/9^2$, a Gaussian of $\sigma=1$ pixel; $\tau=1$ as in Sec. 4.
#
# We compare four plans: $\hat{\mathbf P}$ (BL), $\tilde{\mathbf P}$ (L2), the generalized-Sinkhorn plan (Eq.
# 6, KL marginals, what the paper computes) and the minimizer of Eq. 1 itself with the L2/L1 divergences of
# Eq. 2-3. That minimizer has the scaling form $P_{ij}=\exp((\alpha_i+\beta_j-C_{ij})/\varepsilon)$
# (stationarity of Eq. 1 in $P_{ij}$), so we minimize over the $n+m$ potentials with L-BFGS, smoothing $|x|$
# as $\sqrt{x^2+\delta^2}$ and letting $\delta\to 0$.

# %%
def toy_scene():
    "The Fig. 2 toy: 9x9 pixel centres in [0,1]^2, two annotations, a predicted density, a false positive."
    x = pixel_centres(9, 9, stride=1, dtype=torch.float64)/9
    y = torch.tensor([[2.5, 3.5], [6.5, 5.5]], dtype=torch.float64)/9
    def blob(c, s):
        g = torch.exp(-((x - c)**2).sum(1)/(2*s*s))
        return g/g.sum()
    corner = torch.tensor([8.5, 0.5], dtype=torch.float64)/9
    a = 0.8*blob(y[0], 1.2/9) + 1.1*blob(y[1], 1.0/9) + 0.15*blob(corner, 0.8/9)
    return x, y, a, torch.ones(2, dtype=torch.float64)

def minimize_eq1(a, b, cost, eps, tau=1., init=None):
    "Minimizer of Eq. 1 (L2 pixel, L1 point terms) over plans exp((alpha_i + beta_j - C_ij)/eps), by L-BFGS."
    alpha = torch.zeros(len(a), dtype=cost.dtype) if init is None else init[0].clone()
    beta = torch.zeros(len(b), dtype=cost.dtype) if init is None else init[1].clone()
    alpha.requires_grad_()
    beta.requires_grad_()
    plan = lambda: torch.exp((alpha[:, None] + beta[None] - cost)/eps)
    for delta in [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]:
        opt = torch.optim.LBFGS([alpha, beta], max_iter=3000, line_search_fn='strong_wolfe',
                                tolerance_grad=1e-14, tolerance_change=1e-16, history_size=50)
        def closure():
            opt.zero_grad()
            P = plan()
            val = ((cost*P).sum() - eps*entropy(P) + tau*(P.sum(1) - a).square().sum()
                   + tau*torch.sqrt((P.sum(0) - b).square() + delta**2).sum())
            val.backward()
            return val
        opt.step(closure)
    return plan().detach()

x, y, a, b = toy_scene()
cost, eps, tau = sq_distances(x, y), 2/81, 1.
plans = {'UOT, Eq. 6 (KL)': eq6_plan(a, b, cost, eps, tau)}
plans['UOT, Eq. 1 (L2/L1) minimizer'] = minimize_eq1(a, b, cost, eps, tau)
plans['Phat (u-update): BL'] = plan_u_update(cost, a, eps)
plans['Ptilde (v-update): L2'] = plan_v_update(cost, eps)
eq1 = {k: uot_objective(P, cost, a, b, eps, tau).item() for k, P in plans.items()}
eqkl = {k: kl_objective(P, cost, a, b, eps, tau).item() for k, P in plans.items()}
print(f"{'plan':32s} {'Eq.1 (L2/L1)':>13s} {'Eq.1 (KL)':>10s}  P^T 1")
for k, P in plans.items(): print(f"{k:32s} {eq1[k]:13.5f} {eqkl[k]:10.5f}  {P.sum(0).numpy().round(4)}")

# %% [markdown]
# Each objective is minimized by its own optimal plan, and both half-iteration plans are strictly worse:
# with the paper's divergences (L2 pixel-wise, L1 point-wise) the minimizer of Eq. 1 is below both
# $\tilde{\mathbf P}$ and $\hat{\mathbf P}$; with KL divergences the generalized-Sinkhorn plan is below both.
# So the L2 and Bayesian losses, which *fix* the plan to $\tilde{\mathbf P}$ or $\hat{\mathbf P}$, evaluate
# Eq. 1 at a suboptimal plan (Sec. 4). Note that the KL-optimal plan is not optimal for the L2/L1 objective
# (its Eq. 1 value is above $\tilde{\mathbf P}$'s here): replacing $D_1, D_2$ by KL to get Sinkhorn iterations
# (footnote 1) changes which plan is optimal.

# %%
assert eq1['UOT, Eq. 1 (L2/L1) minimizer'] < eq1['Ptilde (v-update): L2'] < eq1['Phat (u-update): BL']
assert eqkl['UOT, Eq. 6 (KL)'] < min(eqkl['Ptilde (v-update): L2'], eqkl['Phat (u-update): BL'])
# no small perturbation of the minimizers improves their objective
Pm, Pk = plans['UOT, Eq. 1 (L2/L1) minimizer'], plans['UOT, Eq. 6 (KL)']
for s in range(5):
    noise = torch.exp(1e-3*torch.randn(Pm.shape, generator=torch.Generator().manual_seed(s),
                                       dtype=torch.float64))
    assert uot_objective(Pm*noise, cost, a, b, eps, tau) > eq1['UOT, Eq. 1 (L2/L1) minimizer'] - 1e-9
    assert kl_objective(Pk*noise, cost, a, b, eps, tau) > eqkl['UOT, Eq. 6 (KL)'] - 1e-12
# the minimizer of Eq. 1 reconstructs every annotation exactly (the L1 term is sparse)
test_close(Pm.sum(0), b, eps=1e-5)


# %% [markdown]
# The transport plans, drawn like Fig. 2: left, the prediction $\boldsymbol a$ with one arrow per pixel and
# annotation (length $\propto P_{ij}$, pointing at the annotation it is assigned to); then the constructed
# density $\mathbf P\mathbf 1$ and the two columns of $\mathbf P$ reshaped to maps. The minimizer of Eq. 1
# leaves the corner false positive untransported (paying the pixel term is cheaper than moving it), and the KL
# plan moves only part of it; the density they assign to each head stays near it. $\hat{\mathbf P}$ must
# transport *all* predicted density, so the false positive is assigned to the nearest head;
# $\tilde{\mathbf P}$ ignores the prediction and assigns a fixed Gaussian to each head.

# %%
def show_plans(plans, x, y, a, size=9):
    fig, axs = plt.subplots(len(plans), 4, figsize=(9, 2.3*len(plans)), dpi=70)
    X = x.numpy()*size - 0.5
    Y = y.numpy()*size - 0.5
    for r, (name, P) in enumerate(plans.items()):
        ax = axs[r, 0]
        ax.imshow(a.reshape(size, size), cmap='viridis')
        for j in range(P.shape[1]):
            d = Y[j] - X
            n = np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
            ax.quiver(X[:, 0], X[:, 1], *(d/n*P[:, j:j+1].numpy()*8).T, angles='xy', scale_units='xy',
                      scale=1, color=['w', 'r'][j], width=0.006)
        ax.set_ylabel(name.replace('Phat', r'$\hat P$').replace('Ptilde', r'$\tilde P$'), fontsize=8)
        maps = [P.sum(1), P[:, 0], P[:, 1]]
        for c, m in enumerate(maps, 1):
            axs[r, c].imshow(m.reshape(size, size), cmap='viridis', vmin=0, vmax=float(a.max()))
        for ax in axs[r]:
            ax.scatter(Y[:, 0], Y[:, 1], marker='x', c='orange', s=25)
            ax.set_xticks([])
            ax.set_yticks([])
    for c, t in enumerate(['a and plan arrows', 'P 1 (constructed density)', 'column for b0',
                           'column for b1']):
        axs[0, c].set_title(t, fontsize=9)
    fig.tight_layout()
    return fig

show_plans(plans, x, y, a)

# %% [markdown]
# ## Background weight maps (Fig. 3)
#
# On a 48×48 image with a few annotations (coordinates in pixels, $\sigma=4$ px so $\varepsilon=2\sigma^2=32$
# px², and BL's $d=0.15\cdot 48$ px), the weight $\omega$ of Eq. 14 grows smoothly with the posterior-averaged
# squared distance to all annotations, while BL's $\bar\omega$ (Eq. 15) depends only on the nearest annotation
# and saturates at 1 in flat regions far from the heads. Both are small on heads and large on background.

# %%
hh = 48
cc = pixel_centres(hh, hh, stride=1, dtype=torch.float64)
pp = torch.tensor([[10., 12.], [14., 15.], [30., 10.], [36., 34.], [12., 38.], [25., 26.]],
                  dtype=torch.float64)
omega = bl_omega(cc, pp, 32.)
omega_bar = bl_omega_bar(cc, pp, 32., d=0.15*hh)
omega_code = bl_omega_bar(cc, pp, 32., d=0.15*hh, form='code')
fig, axs = plt.subplots(1, 3, figsize=(10, 3.2), dpi=70)
for ax, m, t in zip(axs, [omega, omega_bar, omega_code],
                    ['ω (Eq. 14, approximate UOT)', 'ω̄ (Eq. 15, BL paper)', 'ω̄ (official BL code form)']):
    im = ax.imshow(m.reshape(hh, hh), cmap='magma')
    ax.scatter(pp[:, 0] - 0.5, pp[:, 1] - 0.5, c='c', marker='x', s=20)
    ax.set_title(t, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.tight_layout()

# %%
# both weights are smallest at the heads and large far from them; omega_bar lies in [0, 1]
on_head = sq_distances(cc, pp).min(1).values < 1.
far = sq_distances(cc, pp).min(1).values > 15.**2
assert omega[on_head].max() < omega[far].min() and omega_bar[on_head].max() < omega_bar[far].min()
assert omega_bar.min() >= 0 and omega_bar.max() <= 1
# Eq. 14's weight grows without bound (like the squared distance), BL's saturates at 1
test_close(omega_bar[far].max(), 1., eps=1e-3)
assert omega[far].max() > 100

# %%
#| hide
import nbdev
nbdev.nbdev_export()
