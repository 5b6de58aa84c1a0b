"""Checks of uotcrowd.kernels / uotcrowd.sinkhorn / uotcrowd.plans / uotcrowd.losses that do not fit a notebook: import
isolation, no global state, the official recipe on geomloss (a dev dependency) and autocast (the CUDA check needs a
GPU)."""
import math, subprocess, sys
import pytest
import torch


def test_sinkhorn_knows_nothing_of_images_or_losses():
    "`costs`, `kernels`, `sinkhorn` and `plans` import neither the losses nor the data/model modules (one-way flow)."
    code = ("import sys, uotcrowd.kernels, uotcrowd.sinkhorn, uotcrowd.plans, uotcrowd.costs; "
            "bad = [m for m in ('uotcrowd.losses', 'uotcrowd.data', 'uotcrowd.models', 'uotcrowd.train') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_solver_leaves_global_state_alone():
    "The solver does not change torch's thread count, grad mode or autocast state."
    from uotcrowd.sinkhorn import uot_potentials
    from uotcrowd.plans import uot_plan
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    a = torch.rand(2, 30) * 0.1
    C = torch.rand(2, 30, 4)
    uot_potentials(a, torch.ones(2, 4), C, 0.05, 0.5, mode='converged')
    P = uot_plan(a.requires_grad_(), torch.ones(2, 4), C, 0.05, 0.5)
    assert P.requires_grad
    assert torch.get_num_threads() == threads and torch.is_grad_enabled() == grad


def test_float32_matches_float64():
    "The float32 solve agrees with the float64 one (the stabilised soft-min loses no accuracy)."
    from uotcrowd.plans import uot_plan
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 200, generator=g, dtype=torch.float64) * 0.05
    C = torch.exp(torch.rand(3, 200, 12, generator=g, dtype=torch.float64) / 0.6) - 1
    b = torch.ones(3, 12, dtype=torch.float64)
    for mode in ('official', 'converged'):
        P64 = uot_plan(a, b, C, 0.01, 0.5, mode=mode, grad='none')
        P32 = uot_plan(a.float(), b.float(), C.float(), 0.01, 0.5, mode=mode, grad='none')
        assert P32.dtype == torch.float32
        assert (P32.double() - P64).abs().max() <= 1e-4 * P64.abs().max()


def test_official_mode_matches_geomloss():
    "`mode='official'` reproduces the official recipe (geomloss's potentials and the plan rebuilt from them)."
    import geomloss  # noqa: F401  (a dev dependency: a missing one fails the test)
    from geomloss import SamplesLoss
    from uotcrowd.sinkhorn import uot_potentials, max_diameter
    from uotcrowd.plans import uot_plan
    g = torch.Generator().manual_seed(4)
    side, crop = 16, 128.
    ys, xs = torch.meshgrid(torch.arange(side) * 8 + 4., torch.arange(side) * 8 + 4., indexing='ij')
    X = (torch.stack([xs.flatten(), ys.flatten()], -1) / crop)[None]                # (1, 256, 2)
    Y = torch.rand(1, 12, 2, generator=g)
    A = torch.rand(1, side * side, generator=g) * 0.1
    def per_cost(x, y):   # official form with eta in [0.5, 0.7]; heights normalized by the crop
        d = torch.cdist(x, y, compute_mode='donot_use_mm_for_euclid_dist')
        s = (x[:, :, None, 1] + y[:, None, :, 1]) / 2 * 0.2 + 0.5
        return torch.exp(d / s) - 1
    crit = SamplesLoss(blur=0.01, scaling=0.5, debias=False, backend='tensorized', cost=per_cost, reach=0.5, p=1,
                       potentials=True)
    Fg, Gg = crit(A, X, torch.ones(1, 12), Y)
    C = per_cost(X, Y)
    P_geo = torch.exp((Fg[:, :, None] + Gg[:, None, :] - C) / 0.01) * A[:, :, None]
    pot = uot_potentials(A, torch.ones(1, 12), C, 0.01, 0.5, mode='official', diameter=max_diameter(X, Y))
    assert pot.iterations == 12
    assert torch.allclose(pot.f, Fg, rtol=0, atol=1e-4 * Fg.abs().max().item())
    assert torch.allclose(pot.g, Gg, rtol=0, atol=1e-4 * Gg.abs().max().item())
    P = uot_plan(A, torch.ones(1, 12), C, 0.01, 0.5, potentials=pot, grad='none')
    assert torch.allclose(P, P_geo, rtol=0, atol=1e-4 * P_geo.max().item())


def _loss_problem(device):
    g = torch.Generator().manual_seed(2)
    density = (torch.rand(2, 1, 16, 16, generator=g) * 0.2).to(device)
    points = [(torch.rand(k, 2, generator=g) * 128).to(device) for k in (9, 4)]
    return density, points


def test_cpu_autocast_leaves_the_loss_in_float32():
    "Under CPU bfloat16 autocast (which lowers `bmm`) the generalized loss and its gradient equal the float32 ones."
    from uotcrowd.losses import GeneralizedLoss
    density, points = _loss_problem('cpu')
    loss_fn = GeneralizedLoss(scale=128.)
    d1, d2 = density.clone().requires_grad_(), density.clone().requires_grad_()
    ref = loss_fn(d1, points); ref.backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = loss_fn(d2, points)
    low.backward()
    assert low.dtype == torch.float32 and d2.grad.dtype == torch.float32
    assert torch.allclose(low, ref, rtol=1e-6, atol=0) and torch.allclose(d2.grad, d1.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (CPU autocast leaves the solver alone)')
def test_cuda_autocast_keeps_float32():
    "Under CUDA float16 autocast the solver, the plan and the loss give the float32 results (same device, no autocast)."
    from uotcrowd.sinkhorn import uot_potentials
    from uotcrowd.plans import uot_plan
    from uotcrowd.losses import GeneralizedLoss
    g = torch.Generator().manual_seed(5)
    A = (torch.rand(2, 1024, generator=g) * 60 / 1024).cuda()
    C = (torch.exp(torch.rand(2, 1024, 30, generator=g)) - 1).cuda()
    b = torch.ones(2, 30, device='cuda')
    ref = uot_potentials(A, b, C, 0.01, 0.5)
    P_ref = uot_plan(A, b, C, 0.01, 0.5, potentials=ref, grad='none')
    with torch.autocast('cuda', dtype=torch.float16):
        pot = uot_potentials(A, b, C, 0.01, 0.5)
        P = uot_plan(A, b, C, 0.01, 0.5, potentials=pot, grad='none')
    assert pot.f.dtype == torch.float32 and P.dtype == torch.float32
    assert torch.allclose(pot.f, ref.f, rtol=1e-5, atol=1e-6) and torch.allclose(P, P_ref, rtol=1e-5, atol=1e-9)
    cpu = uot_potentials(A.cpu(), b.cpu(), C.cpu(), 0.01, 0.5)                # and the CPU agrees
    assert torch.allclose(pot.f.cpu(), cpu.f, rtol=0, atol=1e-3 * cpu.f.abs().max().item())
    density, points = _loss_problem('cuda')
    loss_fn = GeneralizedLoss(scale=128.)
    d1, d2 = density.clone().requires_grad_(), density.clone().requires_grad_()
    l_ref = loss_fn(d1, points); l_ref.backward()
    with torch.autocast('cuda', dtype=torch.float16):
        low = loss_fn(d2, points)
    low.backward()
    assert low.dtype == torch.float32 and d2.grad.dtype == torch.float32
    assert torch.allclose(low, l_ref, rtol=1e-5, atol=0) and torch.allclose(d2.grad, d1.grad, rtol=1e-4, atol=1e-6)


def _padded_problem(dtype=torch.float32, seed=7):
    "Four images on a 24×24 grid (crop 1): 40, 0, 7 and 25 heads, padded to 40, perspective-like costs."
    g = torch.Generator().manual_seed(seed)
    side = 24
    ys, xs = torch.meshgrid((torch.arange(side) + 0.5) / side, (torch.arange(side) + 0.5) / side, indexing='ij')
    X = torch.stack([xs.flatten(), ys.flatten()], -1).to(dtype)
    counts = (40, 0, 7, 25)
    Y = torch.zeros(4, 40, 2, dtype=dtype); mask = torch.zeros(4, 40, dtype=torch.bool)
    for k, c in enumerate(counts):
        Y[k, :c] = torch.rand(c, 2, generator=g, dtype=dtype); mask[k, :c] = True
    C = torch.exp(torch.cdist(X[None].expand(4, -1, -1), Y) / 0.6) - 1
    a = (torch.rand(4, side * side, generator=g, dtype=dtype) * 0.1)
    a[2, :100] = 0.                                                # pixels without mass
    return a, mask.to(dtype), C, mask, X, Y, counts


def _plain_sinkhorn(a, b, C, eps, tau, iters):
    "Textbook unbalanced Sinkhorn in float64 (product reference: kernel a_i b_j e^{-C/eps}), potentials f = eps log u."
    a, b, C = a.double(), b.double(), C.double()
    K = torch.exp(-C / eps) * a[:, None] * b[None, :]
    u, v, lam = torch.ones_like(a), torch.ones_like(b), tau / (tau + eps)
    for _ in range(iters):
        u = torch.where(a > 0, (a / (K @ v)).clamp_min(1e-300) ** lam, 1.)       # rows without mass: P = 0 anyway
        v = (b / (K.T @ u)).clamp_min(1e-300) ** lam
    return eps * u.log(), eps * v.log()


def test_converged_mode_equals_plain_float64_solver():
    "The over-relaxed converged solve (float32, padded batch, an image without points) gives the plans of textbook Sinkhorn in float64."
    from uotcrowd.sinkhorn import uot_potentials
    from uotcrowd.plans import uot_plan
    a, b, C, mask, _, _, counts = _padded_problem()
    eps, tau = 0.05, 0.5
    pot = uot_potentials(a, b, C, eps, tau, mask_b=mask, mode='converged', tol=1e-5)
    assert (pot.marginal_error < 1e-5).all() and pot.iterations < 200
    P = uot_plan(a, b, C, eps, tau, mask_b=mask, potentials=pot, grad='none')
    for k, c in enumerate(counts):
        if c == 0:
            assert P[k].abs().sum() == 0; continue
        f, g = _plain_sinkhorn(a[k], torch.ones(c), C[k, :, :c], eps, tau, 20000)
        P64 = a[k].double()[:, None] * torch.exp((f[:, None] + g[None, :] - C[k, :, :c].double()) / eps)
        assert torch.allclose(P[k, :, :c].double(), P64, rtol=0, atol=1e-4 * P64.max().item())
        assert P[k, :, c:].abs().sum() == 0


def test_adaptive_over_relaxation_needs_fewer_pairs():
    "From the official start, adaptive over-relaxation reaches 1e-3 in well under half the plain pairs, to the same plan."
    from uotcrowd.sinkhorn import uot_potentials
    from uotcrowd.plans import uot_plan
    a, b, C, mask, _, _, _ = _padded_problem()
    kw = dict(eps=0.01, tau_a=0.5, mask_b=mask, mode='converged', tol=1e-4)
    plain, fast = uot_potentials(a, b, C, omega=1., **kw), uot_potentials(a, b, C, **kw)
    assert (plain.marginal_error < 1e-4).all() and (fast.marginal_error < 1e-4).all()
    assert fast.iterations - 12 < (plain.iterations - 12) / 2, (fast.iterations, plain.iterations)
    P1, P2 = (uot_plan(a, b, C, 0.01, 0.5, mask_b=mask, potentials=p, grad='none') for p in (plain, fast))
    assert torch.allclose(P1, P2, rtol=0, atol=1e-3 * P1.max().item())


def test_whole_tensor_path_equals_row_blocks():
    "`block=None` (the path of GPUs, one tensor for the batch) and CPU row blocks give the same potentials and statistics."
    from uotcrowd.sinkhorn import uot_potentials
    from uotcrowd.plans import plan_stats
    a, b, C, mask, _, _, _ = _padded_problem()
    for mode in ('official', 'converged'):
        p1 = uot_potentials(a, b, C, 0.01, 0.5, mask_b=mask, mode=mode)
        p2 = uot_potentials(a, b, C, 0.01, 0.5, mask_b=mask, mode=mode, block=None)
        assert p1.iterations == p2.iterations
        real = mask.bool()
        assert torch.allclose(p1.f[[0, 2, 3]], p2.f[[0, 2, 3]], rtol=0, atol=1e-5) and torch.allclose(p1.g[real], p2.g[real], rtol=0, atol=1e-5)
    s1, s2 = (plan_stats(a, b, C, p1, 0.5, mask_b=mask, block=bk) for bk in (256, None))
    for name in ('rows', 'cost', 'xlogx', 'cols'):
        x, y = getattr(s1, name), getattr(s2, name)
        assert torch.allclose(x, y, rtol=0, atol=1e-5 * y.abs().max().item()), name


def test_plan_stats_match_the_plan_written_out():
    "The reductions of `plan_stats` (official gradient, product reference) equal those of $P=a_ib_je^{(f_i+g_j-C_{ij})/\\varepsilon}$ in float64, value and gradient."
    from uotcrowd.sinkhorn import uot_potentials
    from uotcrowd.plans import plan_stats
    a, b, C, mask, _, _, _ = _padded_problem()
    pot = uot_potentials(a, b, C, 0.01, 0.5, mask_b=mask)
    a1, a2 = a.double().requires_grad_(), a.clone().requires_grad_()
    logE = (pot.f.double()[:, :, None] + pot.g.double()[:, None, :] - C.double()) / 0.01
    E = torch.where(mask.bool()[:, None, :], logE, -math.inf).exp()           # b = 1 on heads, 0 on padding
    st = plan_stats(a2, b, C, pot, 0.5, mask_b=mask, grad='official')
    cm = C.double() * mask[:, None, :]
    for x, y in ((st.rows, E.sum(2)), (st.cost, (cm * E).sum(2)), (st.xlogx, torch.xlogy(E, E).sum(2)),
                 (st.cols, torch.bmm(a1[:, None], E)[:, 0])):
        assert torch.allclose(x.double(), y.detach(), rtol=0, atol=2e-5 * y.abs().max().item())
    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    (torch.bmm(a1.clamp_min(0)[:, None], E)[:, 0] * w).sum().backward(); (st.cols * w).sum().backward()  # masses clamped at 0
    assert torch.allclose(a2.grad.double(), a1.grad, rtol=0, atol=2e-5 * a1.grad.abs().max().item())


def test_official_batch_matches_geomloss_per_image():
    "A padded batch (different head counts, an image without heads) in official mode gives geomloss's potentials image by image."
    import geomloss  # noqa: F401  (a dev dependency: a missing one fails the test)
    from geomloss import SamplesLoss
    from uotcrowd.sinkhorn import uot_potentials, max_diameter
    a, b, C, mask, X, Y, counts = _padded_problem()
    cost = lambda x, y: torch.exp(torch.cdist(x, y, compute_mode='donot_use_mm_for_euclid_dist') / 0.6) - 1
    crit = SamplesLoss(blur=0.01, scaling=0.5, debias=False, backend='tensorized', cost=cost, reach=0.5, p=1, potentials=True)
    diam = max_diameter(X[None].expand(4, -1, -1), Y, mask_y=mask.bool())
    pot = uot_potentials(a, b, C, 0.01, 0.5, mask_b=mask.bool(), diameter=diam)
    for k, c in enumerate(counts):
        if c == 0: continue
        Fg, Gg = crit(a[k:k + 1], X[None], torch.ones(1, c), Y[k:k + 1, :c])
        assert torch.allclose(pot.f[k], Fg[0], rtol=0, atol=1e-4 * Fg.abs().max().item()), k
        assert torch.allclose(pot.g[k, :c], Gg[0], rtol=0, atol=1e-4 * Gg.abs().max().item()), k


def test_loss_keeps_no_plan_for_backward():
    "The generalized loss saves only vectors for its backward: no `(B, n, m)` plan (the cost is the only such tensor it keeps)."
    from uotcrowd.losses import GeneralizedLoss
    density, points = _loss_problem('cpu')
    biggest = [0]
    def pack(t): biggest[0] = max(biggest[0], t.numel()); return t
    d = density.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = GeneralizedLoss(scale=128.)(d, points)
    loss.backward()
    B, _, h, w = density.shape
    assert 0 < biggest[0] <= B * h * w, biggest[0]                  # vectors of pixels at most; the plan has 9x more


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_solver_matches_cpu():
    "On CUDA (one tensor per batch): official and converged potentials, and the plan statistics with their gradient, equal the CPU's."
    from uotcrowd.sinkhorn import uot_potentials
    from uotcrowd.plans import plan_stats
    a, b, C, mask, _, _, _ = _padded_problem()
    real = mask.bool()
    for mode in ('official', 'converged'):
        pc = uot_potentials(a, b, C, 0.01, 0.5, mask_b=real, mode=mode)
        pg = uot_potentials(a.cuda(), b.cuda(), C.cuda(), 0.01, 0.5, mask_b=real.cuda(), mode=mode)
        assert torch.allclose(pg.f.cpu()[[0, 2, 3]], pc.f[[0, 2, 3]], rtol=0, atol=1e-4 * pc.f.abs().max().item()), mode
        assert torch.allclose(pg.g.cpu()[real], pc.g[real], rtol=0, atol=1e-4 * pc.g[real].abs().max().item()), mode
        if mode == 'converged': assert (pg.marginal_error < 1e-3).all()
    a1, a2 = a.clone().requires_grad_(), a.cuda().requires_grad_()
    s1, s2 = plan_stats(a1, b, C, pc, 0.5, mask_b=real), plan_stats(a2, b.cuda(), C.cuda(), pg, 0.5, mask_b=real.cuda())
    w = torch.randn(4, 40)
    (s1.cols * w).sum().backward(); (s2.cols * w.cuda()).sum().backward()
    assert torch.allclose(a2.grad.cpu(), a1.grad, rtol=0, atol=1e-3 * a1.grad.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_vgg19_amp_step_with_the_loss(dtype):
    "A VGG19 training step under CUDA autocast with the generalized loss: a float32 loss, finite gradients, the weights move."
    from uotcrowd.models import get_model
    from uotcrowd.losses import GeneralizedLoss
    torch.manual_seed(0)
    model = get_model('vgg19', out_act='abs').cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
    images = torch.randn(2, 3, 128, 128, device='cuda')
    points = [torch.rand(30, 2, device='cuda') * 128, torch.zeros(0, 2, device='cuda')]
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast('cuda', dtype=dtype):
        density = model(images)
        loss = GeneralizedLoss(scale=128.)(density, points)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    scaler.scale(loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scaler.step(opt); scaler.update()
    assert any(not torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))


def test_one_loop_with_each_strategy():
    """`sinkhorn_loop` gives the same potentials with the dense, the blocked and the exact soft-min kernels (official
    and converged), and the CPU picks the dense strategy only for one unpadded block."""
    from uotcrowd.kernels import setup_problem, DenseKernels, BlockedKernels, ExactKernels
    from uotcrowd.sinkhorn import sinkhorn_loop, epsilon_schedule, max_diameter
    a, b, C, mask, X, Y, _ = _padded_problem()
    real = mask.bool()
    schedules = [epsilon_schedule(float(d), 0.01) for d in max_diameter(X[None].expand(4, -1, -1), Y, mask_y=real)]
    problem = setup_problem(a, b, C, 0.5, 0.5, mask_b=real)
    assert type(problem.kernels) is BlockedKernels                          # padded: the blocks skip the padding
    assert type(setup_problem(a, b, C, 0.5, 0.5).kernels) is DenseKernels   # 4 x 576 x 40 entries: one block
    for pairs, tol in ((0, None), (300, 1e-4)):
        runs = [sinkhorn_loop(kernels, problem, 0.01, schedules, pairs, tol)
                for kernels in (DenseKernels(problem), BlockedKernels(problem, 512), ExactKernels())]
        (f0, g0, n0, _), others = runs[0], runs[1:]
        for f, g, n, _ in others:
            assert abs(n - n0) <= 2, (n, n0)
            assert torch.allclose(f[[0, 2, 3]], f0[[0, 2, 3]], rtol=0, atol=1e-4)
            assert torch.allclose(g[real], g0[real], rtol=0, atol=1e-4)
