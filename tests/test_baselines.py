"""Tests of `uotcrowd.baselines` that do not fit its notebook: import isolation, dtypes, and short optimizations."""
import subprocess
import sys
from statistics import NormalDist

import pytest
import torch

from uotcrowd.baselines import BayesianLoss, DMCountLoss, L2DensityLoss, density_map


def test_baselines_build_on_costs_and_solver_only():
    "`uotcrowd.baselines` uses the package's costs and solver, and neither the generalized loss nor any later module."
    code = ("import sys, uotcrowd.baselines; "
            "assert {'uotcrowd.costs', 'uotcrowd.kernels', 'uotcrowd.sinkhorn', 'uotcrowd.plans'} <= set(sys.modules); "
            "bad = [m for m in ('uotcrowd.losses', 'uotcrowd.registry', 'uotcrowd.data', 'uotcrowd.train') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, '-c', code], check=True)


# BL+ on a 64-px image needs BL's crop size for d (0.15 * 512 px): with d = 0.15 * 64 < 2 sigma the background
# point is as likely as the head even on the head, and the loss cannot reach its targets.
LOSSES = [L2DensityLoss(), L2DensityLoss(adaptive=True), BayesianLoss(), BayesianLoss(background=True, bg_size=512),
          DMCountLoss()]


@pytest.mark.parametrize('loss', LOSSES, ids=lambda l: type(l).__name__)
def test_dtype_follows_density(loss):
    pts = [torch.tensor([[10., 12.], [40., 33.]]), torch.zeros(0, 2)]
    for dtype in (torch.float32, torch.float64):
        density = torch.rand(2, 1, 6, 6, dtype=dtype, generator=torch.Generator().manual_seed(0))
        assert loss(density, pts).dtype == dtype


@pytest.mark.parametrize('loss', LOSSES, ids=lambda l: type(l).__name__)
def test_minimizing_the_loss_recovers_the_count(loss):
    "A free density map trained on one loss ends with (about) the annotated count, and the loss decreases."
    torch.manual_seed(0)
    pts = [torch.tensor([[12., 12.], [44., 20.], [30., 50.], [50., 52.]])]
    logit = torch.full((1, 1, 8, 8), -3., requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.05)
    first = None
    for _ in range(300):
        opt.zero_grad()
        value = loss(torch.nn.functional.softplus(logit), pts)
        first = value.item() if first is None else first
        value.backward(); opt.step()
    count = torch.nn.functional.softplus(logit).sum().item()
    # the L2 targets lose the mass of the Gaussians that falls outside the image
    expected = loss.target(pts, 8, 8).sum().item() if isinstance(loss, L2DensityLoss) else 4.
    assert value.item() < first
    assert abs(count - expected) < 0.1, (count, expected)


DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.mark.parametrize('device', DEVICES)
def test_density_map_is_device_and_dtype_preserving(device):
    "On the points' device and in their dtype, each cell holds the Gaussian mass over its stride x stride square."
    pts, sigmas, stride, h, w = [(10., 12.), (29., 3.), (37.5, 20.)], [4., 2.5, 6.], 8, 3, 5
    expected = torch.zeros(h, w, dtype=torch.float64)   # Gaussian CDF differences from the standard library
    for (x, y), s in zip(pts, sigmas):
        nd = NormalDist(0., s)
        for i in range(h):
            for j in range(w):
                expected[i, j] += ((nd.cdf((i + 1) * stride - y) - nd.cdf(i * stride - y))
                                   * (nd.cdf((j + 1) * stride - x) - nd.cdf(j * stride - x)))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        points = torch.tensor(pts, dtype=dtype, device=device)
        d = density_map(points, h, w, stride=stride, sigma=torch.tensor(sigmas, dtype=dtype, device=device))
        assert d.dtype == dtype and d.device == points.device and d.shape == (h, w)
        assert torch.allclose(d.cpu().double(), expected, rtol=0, atol=tol), (d, expected)
