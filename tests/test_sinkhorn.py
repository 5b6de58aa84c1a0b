"""Checks of uotcrowd.sinkhorn / uotcrowd.losses that do not fit a notebook: import isolation, no global state, the
official recipe on geomloss (an optional package: skipped where absent) and autocast (the CUDA check needs a GPU)."""
import subprocess, sys
import pytest
import torch


def test_sinkhorn_knows_nothing_of_images_or_losses():
    "`costs` and `sinkhorn` import neither the losses nor the data/model modules (one-way data flow)."
    code = ("import sys, uotcrowd.sinkhorn, uotcrowd.costs; "
            "bad = [m for m in ('uotcrowd.losses', 'uotcrowd.data', 'uotcrowd.models', 'uotcrowd.train') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_solver_leaves_global_state_alone():
    "The solver does not change torch's thread count, grad mode or autocast state."
    from uotcrowd.sinkhorn import uot_potentials, uot_plan
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    a = torch.rand(2, 30) * 0.1
    C = torch.rand(2, 30, 4)
    uot_potentials(a, torch.ones(2, 4), C, 0.05, 0.5, mode='converged')
    P = uot_plan(a.requires_grad_(), torch.ones(2, 4), C, 0.05, 0.5)
    assert P.requires_grad
    assert torch.get_num_threads() == threads and torch.is_grad_enabled() == grad


def test_float32_matches_float64():
    "The float32 solve agrees with the float64 one (the stabilised soft-min loses no accuracy)."
    from uotcrowd.sinkhorn import uot_plan
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
    pytest.importorskip('geomloss')
    from geomloss import SamplesLoss
    from uotcrowd.sinkhorn import uot_potentials, uot_plan, max_diameter
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
    from uotcrowd.sinkhorn import uot_potentials, uot_plan
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
