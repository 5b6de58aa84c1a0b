"""Checks of uotcrowd.sinkhorn / uotcrowd.losses that do not fit a notebook: import isolation, no global state."""
import subprocess, sys
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
