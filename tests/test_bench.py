"""The benchmark (`uotcrowd.bench`): a quick run writes complete JSON and Markdown whose numbers are consistent with
each other; the targets follow from the stored rows; an absent optional package gives a skipped row of the same
shape; the geomloss reference equals the generalized loss in official mode. No timing is asserted (the machine is
shared)."""
import math, sys

import json
import pytest
import torch

from uotcrowd.bench import run_bench
from uotcrowd.costs import coordinate_cost
from uotcrowd.loss_bench import METHODS, CASE_KEYS
from uotcrowd.references import (reference_loss, make_problem, gl_diagnostics, geomloss_potentials,
                                 official_recipe_loss, RECIPE_KWARGS)
from uotcrowd.sinkhorn import uot_marginal_error
from uotcrowd.losses import GeneralizedLoss

# The targets of the benchmark, written out from its documentation: name -> (op, goal)
GOALS = {'speed-up of official over the geomloss loop': ('>=', 5.),
         'relative loss difference official vs geomloss': ('<=', 1e-4),
         'speed-up of official over POT': ('>=', 10.),
         'peak memory official / geomloss loop': ('<=', 1.),
         'peak memory official / per-image loop': ('<=', 1.),
         'marginal error of converged': ('<=', 1e-3),
         'time converged / geomloss loop': ('<=', 1.),
         'official time / (iterations x exp floor)': ('<=', 3.),
         'converged time / (iterations x exp floor)': ('<=', 3.),
         'loss share of a VGG19 training step': ('<=', 0.15)}
IDENTITY = ('method', 'batch_size', 'n_points', 'size', 'stride', 'skipped')


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('bench')
    return out, run_bench(out, device='cpu', quick=True, verbose=False)


def expected_target_values(saved:dict) -> dict:
    "Each target's value recomputed from the stored rows of the target case (None where a number is missing)."
    tc = saved['config']['target_case']
    rows = {c['method']: c for c in saved['cases']
            if (c['batch_size'], c['n_points']) == (tc['batch_size'], tc['n_points']) and c['skipped'] is None}
    def v(method, key): return rows[method][key] if method in rows else None
    def div(x, y): return None if x is None or y is None else x / y
    off, geo = v('gl_official', 'loss'), v('geomloss', 'loss')
    return {'speed-up of official over the geomloss loop': div(v('geomloss', 'time_s'), v('gl_official', 'time_s')),
            'relative loss difference official vs geomloss': None if off is None or geo is None else abs(off - geo) / abs(geo),
            'speed-up of official over POT': div(v('pot', 'time_s'), v('gl_official', 'time_s')),
            'peak memory official / geomloss loop': div(v('gl_official', 'peak_mem_mib'), v('geomloss', 'peak_mem_mib')),
            'peak memory official / per-image loop': div(v('gl_official', 'peak_mem_mib'), v('loop_official', 'peak_mem_mib')),
            'marginal error of converged': v('gl_converged', 'marginal_error'),
            'time converged / geomloss loop': div(v('gl_converged', 'time_s'), v('geomloss', 'time_s')),
            'official time / (iterations x exp floor)': v('gl_official', 'time_over_floor'),
            'converged time / (iterations x exp floor)': v('gl_converged', 'time_over_floor'),
            'loss share of a VGG19 training step': (saved.get('vgg19') or {}).get('share')}


def check_targets(saved:dict):
    "Stored targets: the documented goals, values recomputed from the rows, `met` the comparison of the two."
    want = expected_target_values(saved)
    assert {t['name'] for t in saved['targets']} == set(GOALS) and len(saved['targets']) == len(GOALS)
    for t in saved['targets']:
        op, goal = GOALS[t['name']]
        assert (t['op'], t['target']) == (op, goal), t
        if want[t['name']] is None:
            assert t['value'] is None and t['met'] is None, t; continue
        assert t['value'] == pytest.approx(want[t['name']], rel=1e-9), t
        assert t['met'] is (t['value'] >= goal if op == '>=' else t['value'] <= goal), t


def md_cells(md:str, prefix:str) -> list[str]:
    "Cells of the one Markdown table row that starts with `prefix`."
    lines = [l for l in md.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return [c.strip() for c in lines[0].strip().strip('|').split('|')]


def check_markdown(md:str, saved:dict):
    "Every row and target of the JSON appears in the Markdown with its own numbers."
    for c in saved['cases']:
        cells = md_cells(md, f"| {c['method']} | {c['batch_size']} | {c['n_points']} | ")
        if c['skipped']:
            assert cells[3] == f"skipped: {c['skipped']}"; continue
        assert float(cells[3]) == pytest.approx(1e3 * c['time_s'], abs=0.051)
        assert cells[4] == '-' if c['peak_mem_mib'] is None else float(cells[4]) == pytest.approx(c['peak_mem_mib'], abs=0.051)
        assert float(cells[5]) == pytest.approx(c['loss'], rel=1e-4) and int(cells[6]) == c['iterations']
    for t in saved['targets']:
        cells = md_cells(md, f"| {t['name']} |")
        assert cells[2] == f"{t['op']} {t['target']:g}"
        assert cells[3] == {True: 'yes', False: '**no**', None: '-'}[t['met']]


def test_quick_bench_files(quick):
    out, res = quick
    saved = json.loads((out / 'bench.json').read_text())
    assert saved['config']['quick'] is True
    assert {'date', 'machine', 'versions', 'exp_rate', 'config', 'cases', 'targets', 'vgg19'} <= set(saved)
    rate = saved['exp_rate']
    assert rate > 0 and math.isfinite(rate)
    assert [c['method'] for c in saved['cases']] == list(METHODS)
    assert all(tuple(c) == CASE_KEYS for c in saved['cases'])            # uniform rows, skipped or not
    for c in saved['cases']:
        if c['skipped']:
            assert c['skipped'] == f"{'ot' if c['method'] == 'pot' else 'geomloss'} not installed", c
            assert all(c[k] is None for k in CASE_KEYS if k not in IDENTITY), c
            continue
        for k in ('time_s', 'time_min_s', 'peak_mem_mib', 'floor_s', 'time_over_floor', 'loss'):
            if k == 'peak_mem_mib' and c['method'] == 'gl_converged':
                assert c[k] is None; continue   # not measured on the CPU (the profiler would keep every event)
            assert math.isfinite(c[k]) and c[k] > 0, (c['method'], k, c[k])
        assert c['iterations'] >= 1 and 0 <= c['marginal_error'] < 1
        # the numbers of a row are consistent with each other
        B, n, m = c['batch_size'], c['size'] ** 2, c['n_points']
        assert c['time_min_s'] <= c['time_s'] and c['repeats'] >= 1
        assert c['floor_per_iteration_s'] == pytest.approx(2 * B * n * m / rate, rel=1e-9)
        assert c['floor_s'] == pytest.approx(c['exp_entries'] / rate, rel=1e-9)
        assert c['time_over_floor'] == pytest.approx(c['time_s'] / c['floor_s'], rel=1e-9)
        if c['method'] in ('gl_official', 'gl_converged', 'pot'):   # one batched solve, or a fixed count per image
            assert c['exp_entries'] == c['iterations'] * 2 * B * n * m, c
        else:                                                        # per image: at most the largest count each
            assert 0 < c['exp_entries'] <= c['iterations'] * 2 * B * n * m, c
    by = {c['method']: c for c in saved['cases']}
    assert by['gl_official']['iterations'] == 12                      # the official schedule
    assert by['pot']['iterations'] == saved['config']['pot_iters']
    assert by['gl_converged']['marginal_error'] <= 1e-3               # converged means converged
    # the batch and the per-image loop each against geomloss's potentials (another solver) in the same run
    # (measured: 6.4e-8 relative, one float32 rounding of the loss)
    assert by['gl_official']['loss'] == pytest.approx(by['geomloss']['loss'], rel=5e-7)
    assert by['loop_official']['loss'] == pytest.approx(by['geomloss']['loss'], rel=5e-7)
    v = saved['vgg19']
    for k in ('without_loss', 'with_loss', 'loss_in_step'): assert math.isfinite(v[k]) and v[k] > 0
    assert v['share'] == pytest.approx(v['loss_in_step'] / v['with_loss'], rel=1e-9) and 0 < v['share'] < 1
    assert v['share_diff'] == pytest.approx((v['with_loss'] - v['without_loss']) / v['with_loss'], rel=1e-9)
    check_targets(saved)
    md = (out / 'bench.md').read_text()
    header = '| method | B | points | time (ms) | peak mem (MiB) | loss | iterations | marginal error | time / floor |'
    assert header in md and '**Targets**' in md
    check_markdown(md, saved)


def test_bench_without_geomloss(tmp_path, monkeypatch):
    "Where geomloss is absent its rows are skipped, with the keys of the others, and the targets that need it are unknown."
    monkeypatch.setitem(sys.modules, 'geomloss', None)               # `import geomloss` fails, as when not installed
    torch.set_num_threads(1)
    run_bench(tmp_path, device='cpu', quick=True, size=8, methods=('gl_official', 'geomloss'), vgg=False,
              memory=False, verbose=False)
    saved = json.loads((tmp_path / 'bench.json').read_text())
    assert [tuple(c) for c in saved['cases']] == [CASE_KEYS] * 2
    off, geo = saved['cases']
    assert off['skipped'] is None and off['loss'] > 0 and off['peak_mem_mib'] is None
    assert geo['skipped'] == 'geomloss not installed'
    assert all(geo[k] is None for k in CASE_KEYS if k not in IDENTITY)
    check_targets(saved)
    met = {t['name']: t['met'] for t in saved['targets']}
    assert met['speed-up of official over the geomloss loop'] is None and met['relative loss difference official vs geomloss'] is None
    check_markdown((tmp_path / 'bench.md').read_text(), saved)


def geomloss_schedule_potentials(a, x, b, y, cost, blur, reach, scaling=0.5):
    """geomloss's tensorized `sinkhorn_loop` for p = 1, debias=False, written out in float64: ε from the diameter of
    the clouds' bounding box down to the blur (ratio `scaling`), symmetric averaged soft-min updates damped by
    1/(1 + ε/ρ), a final extrapolation; returns the potentials and the number of soft-min pairs."""
    C = cost(x, y).double()[0]
    la, lb = a.double()[0].log(), b.double()[0].log()
    pts = torch.cat([x[0], y[0]]).double()
    diameter = (pts.amax(0) - pts.amin(0)).norm().item()
    eps_list = [diameter] + [math.exp(e) for e in torch.arange(math.log(diameter), math.log(blur), math.log(scaling),
                                                                dtype=torch.float64).tolist()] + [blur]
    lam = lambda eps: 1 / (1 + eps / reach)
    f_of = lambda eps, g: -lam(eps) * eps * torch.logsumexp(lb[None] + (g[None] - C) / eps, 1)       # (n,)
    g_of = lambda eps, f: -lam(eps) * eps * torch.logsumexp(la[:, None] + (f[:, None] - C) / eps, 0)  # (m,)
    zero_f, zero_g = torch.zeros_like(la), torch.zeros_like(lb)
    f, g = f_of(eps_list[0], zero_g), g_of(eps_list[0], zero_f)
    for eps in eps_list:
        ft, gt = f_of(eps, g), g_of(eps, f)
        f, g = (f + ft) / 2, (g + gt) / 2
    f, g = f_of(eps_list[-1], g), g_of(eps_list[-1], f)
    return f[None], g[None], 1 + len(eps_list) + 1


def test_geomloss_potentials_match_plain_sinkhorn():
    "geomloss's potentials are those of its annealing schedule written out, and it runs the official schedule's pairs."
    import geomloss  # noqa: F401  (a dev dependency: a missing one fails the test)
    g0 = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 40, 2, generator=g0), torch.rand(1, 6, 2, generator=g0)
    a, b = torch.rand(1, 40, generator=g0, dtype=torch.float64) * 0.3, torch.ones(1, 6, dtype=torch.float64)
    cost = coordinate_cost('exp')
    C = cost(x, y).double()
    eps, tau = 0.2, 0.5
    K = torch.exp(-C / eps) * a[:, :, None] * b[:, None, :]               # textbook Sinkhorn, product reference
    u, v, lam = torch.ones_like(a), torch.ones_like(b), tau / (tau + eps)
    for _ in range(2000):
        u = (a / torch.einsum('bij,bj->bi', K, v)) ** lam
        v = (b / torch.einsum('bij,bi->bj', K, u)) ** lam
    f_ref, g_ref = eps * u.log(), eps * v.log()
    assert uot_marginal_error(a, b, C, f_ref, g_ref, eps, tau) < 1e-10
    for blur in (0.2, 0.05, 0.01):
        stats = {}
        f, g = geomloss_potentials(a.float(), x, b.float(), y, cost, blur=blur, reach=tau, stats=stats)
        f_s, g_s, pairs = geomloss_schedule_potentials(a, x, b, y, cost, blur, tau)
        assert stats['iterations'] == pairs, (blur, stats, pairs)
        # float32 solve against the float64 schedule: measured at most 6.2e-8 of the largest potential
        scale = max(f_s.abs().max().item(), g_s.abs().max().item())
        assert (f.double() - f_s).abs().max() <= 3e-7 * scale and (g.double() - g_s).abs().max() <= 3e-7 * scale, blur
        if blur == eps:
            # the schedule stops before the fixed point: 3.4e-2 from it, marginal error 0.134, as the schedule's own
            # (measured 4e-7 relative)
            err, err_s = (float(uot_marginal_error(a, b, C, p, q, eps, tau)) for p, q in ((f, g), (f_s, g_s)))
            assert err == pytest.approx(err_s, rel=2e-6) and err > 0.1, (err, err_s)
            assert (f_s - f_ref).abs().max() > 1e-2
    # soft-min pairs: an initial pair, one per temperature from the diameter of the clouds' bounding box down to the
    # blur (ratio `scaling` = 1/2), one at the blur and a final extrapolation
    pts = torch.cat([x[0], y[0]])
    diameter = (pts.amax(0) - pts.amin(0)).norm().item()
    for blur in (0.2, 0.01):
        stats = {}
        geomloss_potentials(a.float(), x, b.float(), y, cost, blur=blur, reach=tau, stats=stats)
        assert stats['iterations'] == 1 + math.ceil(math.log(diameter / blur) / math.log(2)) + 1 + 1 + 1, (blur, stats)
    assert stats['iterations'] == 12                                        # the official schedule at ε = 0.01


def written_out_perspective_cost(scale, image_height, eta_range=(0.6, 0.8)):
    "Eq. 4 shifted, on coordinates divided by `scale`: exp(|x - y| / η) - 1, η linear in the mean height y / H."
    lo, hi = eta_range
    def cost(x, y):
        d = torch.cdist(x, y, compute_mode='donot_use_mm_for_euclid_dist')
        h = (x[:, :, None, 1] + y[:, None, :, 1]) * scale / image_height / 2
        return torch.exp(d / (lo + (hi - lo) * h)) - 1
    return cost


def test_geomloss_reference_equals_official_mode():
    "geomloss's potentials on a problem set up without `GeneralizedLoss.problem` (grid in closed form, cost from cdist) give the official-mode loss."
    import geomloss  # noqa: F401  (a dev dependency: a missing one fails the test)
    torch.manual_seed(0)
    density, points = make_problem(2, 30, size=16, stride=8, seed=5)
    points[1] = points[1][:0]                                               # an image without heads too
    gl = GeneralizedLoss(mode='official', scale=128.)
    cost = written_out_perspective_cost(128., 16 * 8)
    for grad in ('paper', 'official'):    # the paper's gradient (the default), and the official code's
        d1, d2 = density.clone().requires_grad_(), density.clone().requires_grad_()
        ref = reference_loss(gl, d1, points, 'geomloss', grad=grad, cost_fn=cost); ref.backward()
        ours = GeneralizedLoss(mode='official', scale=128., grad=grad)(d2, points); ours.backward()
        # measured: value 3.4e-7 relative, gradient 4.6e-6 of its largest entry
        assert ref.item() == pytest.approx(ours.item(), rel=2e-6), grad
        assert torch.allclose(d1.grad, d2.grad, rtol=0, atol=2e-5 * d2.grad.abs().max().item()), grad
    info = {}
    ref = reference_loss(gl, density, points, 'geomloss', diagnostics=info, cost_fn=cost).item()
    assert gl(density, points).item() == pytest.approx(ref, rel=2e-6)
    pts = torch.cat([torch.cartesian_prod(torch.arange(16.), torch.arange(16.)) * 8 + 4, points[0]]) / 128
    diameter = (pts.amax(0) - pts.amin(0)).norm().item()
    assert info['iterations'] == 1 + math.ceil(math.log2(diameter / gl.eps)) + 3 == 12
    # `gl_diagnostics` (GeneralizedLoss's own solve) against geomloss's: loss, marginal error, pairs, exp count
    diag = gl_diagnostics(gl, density, points)
    assert diag['loss'] == pytest.approx(ref, rel=2e-6)                                     # measured 3.4e-7
    assert diag['marginal_error'] == pytest.approx(info['marginal_error'], rel=2e-6)       # measured 3.4e-7
    assert diag['iterations'] == info['iterations'] and diag['exp_entries'] == 12 * 2 * 2 * 256 * 30


def test_pot_reference_converges_to_converged_mode():
    import ot  # noqa: F401  (a dev dependency: a missing one fails the test)
    density, points = make_problem(1, 15, size=10, stride=8, seed=6)
    info = {}
    pot = reference_loss(GeneralizedLoss(scale=80.), density, points, 'pot', pot_iters=2000, diagnostics=info)
    conv = GeneralizedLoss(scale=80., mode='converged', tol=1e-6)(density, points)
    assert info['marginal_error'] < 1e-5
    assert pot.item() == pytest.approx(conv.item(), rel=1e-6)             # measured 3.4e-7


def test_official_recipe_is_the_trainers():
    "The bench's geomloss baseline equals the official trainer's lines written out literally (value and gradient), and GL's official mode."
    import geomloss
    crop, stride = 256., 8
    density, points = make_problem(3, 40, size=32, stride=stride, seed=7)

    def trainer_cost(X, Y):                       # the trainer's cost: exp(d / 0.6) - 1
        return torch.exp(((X[:, :, None] - Y[:, None]) ** 2).sum(-1).sqrt() / 0.6) - 1
    uot = geomloss.SamplesLoss('sinkhorn', p=1, blur=0.01, reach=0.5, scaling=0.5, debias=False, backend='tensorized',
                               potentials=True, cost=trainer_cost)
    dens_ref = density.clone().requires_grad_()
    ys, xs = torch.meshgrid(torch.arange(32.) * stride + stride / 2 + stride / 2,   # (j + 0.5) * 8 + 4, as the trainer
                            torch.arange(32.) * stride + stride / 2 + stride / 2, indexing='ij')
    X = torch.stack([xs.flatten(), ys.flatten()], -1)[None] / crop
    ref = 0.
    for k in range(3):
        A = dens_ref[k].reshape(1, -1, 1)
        Y = points[k].view(1, -1, 2) / crop
        Bw = torch.ones(1, len(points[k]), 1)
        F, G = uot(A.view(1, -1).detach(), X, Bw.view(1, -1), Y)
        C = trainer_cost(X, Y)
        PI = torch.exp((F.view(1, -1, 1) + G.view(1, 1, -1) - C).detach() / 0.01) * A * Bw.permute(0, 2, 1)
        emd = (C * PI).sum()
        point = (PI.sum(1).view(-1) - 1).abs().sum()
        pixel = ((PI.sum(2).detach().view(-1) - A.view(-1)) ** 2).sum()
        ref = ref + emd + 0.1 * (pixel + point)
    ref = ref / 3
    ref.backward()

    dens_ours = density.clone().requires_grad_()
    ours = official_recipe_loss(dens_ours, points, crop, stride)
    ours.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(dens_ours.grad, dens_ref.grad, rtol=0, atol=1e-5 * dens_ref.grad.abs().max().item())
    dens_gl = density.clone().requires_grad_()
    gl = GeneralizedLoss(mode='official', scale=crop, stride=stride, **RECIPE_KWARGS)(dens_gl, points)
    gl.backward()
    assert gl.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(dens_gl.grad, dens_ref.grad, rtol=0, atol=1e-5 * dens_ref.grad.abs().max().item())
