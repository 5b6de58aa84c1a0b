"""The benchmark (`uotcrowd.bench`): a quick run writes complete JSON and Markdown; the geomloss reference equals
the generalized loss in official mode. No timing is asserted (the machine is shared)."""
import importlib.util, json, math

import pytest
import torch

from uotcrowd.bench import (METHODS, run_bench, reference_loss, make_problem, gl_diagnostics, evaluate_targets,
                            results_markdown)
from uotcrowd.losses import GeneralizedLoss

CASE_KEYS = {'method', 'batch_size', 'n_points', 'size', 'stride', 'time_s', 'time_min_s', 'repeats', 'peak_mem_mib',
             'loss', 'iterations', 'marginal_error', 'exp_entries', 'floor_per_iteration_s', 'floor_s', 'time_over_floor'}
HAS = {m: importlib.util.find_spec(m) is not None for m in ('geomloss', 'ot')}


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('bench')
    return out, run_bench(out, device='cpu', quick=True, verbose=False)


def test_quick_bench_files(quick):
    out, res = quick
    saved = json.loads((out / 'bench.json').read_text())
    assert saved['config']['quick'] is True
    assert {'date', 'machine', 'versions', 'exp_rate', 'config', 'cases', 'targets', 'vgg19'} <= set(saved)
    assert saved['exp_rate'] > 0 and math.isfinite(saved['exp_rate'])
    assert [c['method'] for c in saved['cases']] == list(METHODS)
    for c in saved['cases']:
        if 'skipped' in c:
            assert c['method'] in ('geomloss', 'pot') and not HAS['geomloss' if c['method'] == 'geomloss' else 'ot']
            continue
        assert CASE_KEYS <= set(c), CASE_KEYS - set(c)
        for k in ('time_s', 'time_min_s', 'peak_mem_mib', 'floor_s', 'time_over_floor', 'loss'):
            if k == 'peak_mem_mib' and c['method'] == 'gl_converged':
                assert c[k] is None; continue   # not measured on the CPU (the profiler would keep every event)
            assert math.isfinite(c[k]) and c[k] > 0, (c['method'], k, c[k])
        assert c['iterations'] >= 1 and 0 <= c['marginal_error'] < 1
    by = {c['method']: c for c in saved['cases']}
    assert by['gl_official']['iterations'] == 12                      # the official schedule
    assert by['gl_converged']['marginal_error'] <= 1e-3               # converged means converged
    assert by['loop_official']['loss'] == pytest.approx(by['gl_official']['loss'], rel=1e-5)
    v = saved['vgg19']
    for k in ('without_loss', 'with_loss', 'loss_in_step'): assert math.isfinite(v[k]) and v[k] > 0
    assert 0 < v['share'] < 1
    names = {t['name'] for t in saved['targets']}
    assert len(names) == 10 and all(t['met'] in (True, False, None) for t in saved['targets'])
    md = (out / 'bench.md').read_text()
    assert md == results_markdown(saved)
    header = '| method | B | points | time (ms) | peak mem (MiB) | loss | iterations | marginal error | time / floor |'
    assert header in md and md.count('\n| gl_') >= 2 and '**Targets**' in md
    rows = [l for l in md.splitlines() if l.startswith('| ') and not l.startswith('| method') and '---' not in l]
    assert all(l.count('|') == header.count('|') for l in rows[:len(METHODS)])
    assert evaluate_targets(saved) == saved['targets']


@pytest.mark.skipif(not HAS['geomloss'], reason='geomloss is not installed (optional extra `bench`)')
def test_geomloss_reference_equals_official_mode():
    torch.manual_seed(0)
    density, points = make_problem(2, 30, size=16, stride=8, seed=5)
    gl = GeneralizedLoss(mode='official', scale=128.)
    for grad in ('paper', 'official'):    # the paper's gradient (the default), and the official code's
        d1, d2 = density.clone().requires_grad_(), density.clone().requires_grad_()
        ref = reference_loss(gl, d1, points, 'geomloss', grad=grad); ref.backward()
        ours = GeneralizedLoss(mode='official', scale=128., grad=grad)(d2, points); ours.backward()
        assert ref.item() == pytest.approx(ours.item(), rel=1e-4)
        assert torch.allclose(d1.grad, d2.grad, rtol=0, atol=1e-4 * d2.grad.abs().max().item())
    ours = gl(density, points)
    assert reference_loss(gl, density, points, 'geomloss').item() == pytest.approx(ours.item(), rel=1e-4)
    diag = gl_diagnostics(gl, density, points)
    assert diag['loss'] == pytest.approx(ours.item(), rel=1e-5) and diag['iterations'] == 12


@pytest.mark.skipif(not HAS['ot'], reason='POT is not installed (optional extra `bench`)')
def test_pot_reference_converges_to_converged_mode():
    density, points = make_problem(1, 15, size=10, stride=8, seed=6)
    info = {}
    pot = reference_loss(GeneralizedLoss(scale=80.), density, points, 'pot', pot_iters=2000, diagnostics=info)
    conv = GeneralizedLoss(scale=80., mode='converged', tol=1e-6)(density, points)
    assert info['marginal_error'] < 1e-5
    assert pot.item() == pytest.approx(conv.item(), rel=1e-3)
