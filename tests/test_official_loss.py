"""`GeneralizedLoss.official()` against the official trainer's formulas evaluated with geomloss, image by image."""
import csv, math

import pytest
import torch

from uotcrowd.cli import main
from uotcrowd.losses import GeneralizedLoss, unbalanced_dual_value
from uotcrowd.registry import get_loss
from uotcrowd.checkpoints import load_checkpoint

EPS, REACH, TAU = 0.01, 0.5, 0.1


def official_cost(x, y):
    "The trainer's perspective cost on coordinates divided by the crop size: exp(d / (0.5 + 0.2 * mean height)) - 1."
    d = ((x[:, :, None] - y[:, None]) ** 2).sum(-1).sqrt()
    return torch.exp(d / ((x[:, :, None, 1] + y[:, None, :, 1]) / 2 * 0.2 + 0.5)) - 1


def trainer_grid(h, w, stride, offset, dtype):
    "Pixel positions `(x, y)` in input pixels, row-major: stride * (j + offset) (the trainer's grid is offset 1)."
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype) * stride + stride * offset,
                            torch.arange(w, dtype=dtype) * stride + stride * offset, indexing='ij')
    return torch.stack([xs.flatten(), ys.flatten()], -1)


def official_objective(density, points, crop, stride=8, offset=1.0):
    "The official trainer's loss written out per image with geomloss; returns `(total, terms)` as the trainer sums them."
    import geomloss  # a dev dependency: a missing one fails the test
    B, _, h, w = density.shape
    X = trainer_grid(h, w, stride, offset, density.dtype)[None] / crop
    kw = dict(blur=EPS, scaling=0.5, reach=REACH, p=1, debias=False, backend='tensorized', cost=official_cost)
    value, potentials = geomloss.SamplesLoss('sinkhorn', **kw), geomloss.SamplesLoss('sinkhorn', potentials=True, **kw)
    emd = pixel = point = entropy = 0.
    for k in range(B):
        A = density[k].reshape(1, -1)
        if len(points[k]) == 0:
            emd, pixel, point = emd + A.sum().abs() / B, pixel + A.sum().abs() / B, point + A.sum().abs() / B
            continue
        Y = points[k].to(density.dtype)[None] / crop
        ones = torch.ones(1, len(points[k]), dtype=density.dtype)
        F, G = potentials(A.detach(), X, ones, Y)
        C = official_cost(X, Y)
        P = torch.exp((F[:, :, None] + G[:, None, :] - C).detach() / EPS) * A[:, :, None]
        entropy = entropy + ((1e-20 + P) * torch.log(1e-20 + P)).mean()
        emd = emd + value(A, X, ones, Y).sum() / B
        point = point + (P.sum(1) - 1).abs().sum() / B
        pixel = pixel + ((P.sum(2).detach() - A) ** 2).sum() / B
    total = emd + TAU * (pixel + point) + EPS * entropy
    num = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)
    return total, dict(transport=num(emd), pixel=TAU * num(pixel), point=TAU * num(point), entropy=EPS * num(entropy))


def random_batch(B, side, m, crop, dtype, empty=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(B, 1, side, side, generator=g, dtype=dtype) * 2 * m / side ** 2
    points = [torch.zeros(0, 2, dtype=dtype) if k in empty else torch.rand(m, 2, generator=g, dtype=dtype) * crop
              for k in range(B)]
    return density, points


def compare(loss, density, points, crop, offset=1.0, device='cpu'):
    "Value and gradient of `loss` (on `device`) and of the geomloss restatement (CPU); returns the errors."
    ref_in = density.clone().requires_grad_()
    ref, ref_terms = official_objective(ref_in, points, crop, offset=offset)
    ref.backward()
    ours_in = density.to(device).requires_grad_()
    val, terms = loss(ours_in, [p.to(device) for p in points], return_terms=True)
    val.backward()
    for name, v in ref_terms.items():
        assert abs(terms[name].item() - v) <= 1e-5 * abs(v) + 1e-9, (name, terms[name].item(), v)
    grad = ours_in.grad.cpu()
    return abs(val.item() - ref.item()) / abs(ref.item()), (grad - ref_in.grad).abs().max().item(), ref_in.grad.abs().max().item()


@pytest.mark.parametrize('offset', [1.0, 0.5])
def test_official_value_and_gradient_float64(offset):
    "A batch with an empty image: value and gradient equal the trainer's to float64 precision, on either grid."
    density, points = random_batch(3, 16, 40, 128., torch.float64, empty=(1,))
    rel, gerr, gmax = compare(GeneralizedLoss.official(scale=128., grid_offset=offset), density, points, 128., offset)
    assert rel <= 1e-10 and gerr <= 1e-10 * gmax, (rel, gerr, gmax)


@pytest.mark.parametrize('empty', [(), (1,)])
def test_official_value_and_gradient_float32(empty):
    "At the training setting (512 crops, 64x64 maps, 300 heads) in float32: value within 1e-5, gradient within 1e-4."
    density, points = random_batch(2 + len(empty), 64, 300, 512., torch.float32, empty=empty)
    rel, gerr, gmax = compare(get_loss('gl-official'), density, points, 512.)
    assert rel <= 1e-5 and gerr <= 1e-4 * gmax, (rel, gerr, gmax)


def test_official_value_of_the_measured_batch():
    "The B=2, 64x64, 300-point batch: the trainer's formulas give 21.9647 (transport 16.748)."
    density, points = random_batch(2, 64, 300, 512., torch.float32)
    val, terms = get_loss('gl-official')(density, points, return_terms=True)
    ref, ref_terms = official_objective(density, points, 512.)
    assert abs(val.item() - ref.item()) <= 1e-5 * ref.item()
    assert abs(ref.item() - 21.9647) < 1e-3 and abs(ref_terms['transport'] - 16.748) < 1e-3


def test_dual_value_and_its_gradient_are_geomlosss():
    "`unbalanced_dual_value` at geomloss's potentials is geomloss's value; its gradient phi(f) is geomloss's autograd one."
    import geomloss  # a dev dependency: a missing one fails the test
    g = torch.Generator().manual_seed(3)
    X = torch.rand(1, 50, 2, generator=g, dtype=torch.float64)
    Y = torch.rand(1, 7, 2, generator=g, dtype=torch.float64)
    A = (torch.rand(1, 50, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    ones = torch.ones(1, 7, dtype=torch.float64)
    kw = dict(blur=EPS, scaling=0.5, reach=REACH, p=1, debias=False, backend='tensorized', cost=official_cost)
    ref = geomloss.SamplesLoss('sinkhorn', **kw)(A, X, ones, Y)
    ref.sum().backward()
    F, G = geomloss.SamplesLoss('sinkhorn', potentials=True, **kw)(A.detach(), X, ones, Y)
    a = A.detach().clone().requires_grad_()
    ours = unbalanced_dual_value(a, ones, F, G, EPS, REACH)
    ours.sum().backward()
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    assert torch.allclose(a.grad, A.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(A.grad, (REACH + EPS / 2) * (1 - torch.exp(-F / REACH)), rtol=1e-12, atol=1e-15)


def test_empty_batch_and_zero_density_are_finite():
    "Only empty images: 1.2 |sum a| / B in the total (closed form); a zero density: finite value and gradient."
    d = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_()
    loss = GeneralizedLoss.official(scale=64.)
    val = loss(d, [torch.zeros(0, 2), torch.zeros(0, 2)])
    val.backward()
    assert torch.allclose(val, 1.2 * d.detach().sum() / 2, rtol=1e-6)
    assert torch.allclose(d.grad, torch.full_like(d, 0.6))
    z = torch.zeros(2, 1, 8, 8, requires_grad=True)
    vz = loss(z, [torch.rand(3, 2) * 64, torch.zeros(0, 2)])
    vz.backward()
    assert torch.isfinite(vz) and torch.isfinite(z.grad).all()
    # image 0: nothing transported, so the dual value is (rho + eps/2) per head and the point term tau per head
    assert torch.allclose(vz, torch.tensor((REACH + EPS / 2 + TAU) * 3 / 2), rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_official_on_cuda(dtype):
    "On CUDA, one batched solve: the same value (1e-5) and gradient (1e-4) as the trainer's formulas on the CPU."
    density, points = random_batch(3, 64, 300, 512., dtype, empty=(2,))
    rel, gerr, gmax = compare(get_loss('gl-official'), density, points, 512., device='cuda')
    assert rel <= 1e-5 and gerr <= 1e-4 * gmax, (rel, gerr, gmax)


def test_train_with_the_official_objective(tmp_path):
    "`uotcrowd train --loss gl-official` trains (2 steps of MCNN on tiny synthetic crowds) and records the loss name."
    out = tmp_path / 'run'
    code = main(['train', '--dataset', 'synthetic', '--synthetic-n', '8', '--synthetic-size', '48', '--crop-size', '32',
                 '--model', 'mcnn', '--loss', 'gl-official', '--batch-size', '4', '--max-epoch', '1', '--max-steps', '2',
                 '--val-epoch', '1', '--device', 'cpu', '--out', str(out), '--quiet'])
    assert code == 0
    ckpt = load_checkpoint(out / 'last.pt')
    assert ckpt['loss_name'] == 'gl-official' and ckpt['loss_kwargs'] == {'scale': 32.}  # coordinates / crop size
    rows = list(csv.DictReader(open(out / 'log.csv')))
    assert len(rows) == 1 and math.isfinite(float(rows[0]['train_loss']))
