"""uotcrowd.metrics against NWPU-Crowd's official localization evaluation and an independent matching solver.

Reference numbers: the official `eval/eval.py` + `eval/utils.py` of gjy3035/NWPU-Crowd-Sample-Code-for-Localization
(commit acf4456) were run unchanged except for three lines (image list = `nwpu_loc/ids.txt`, the fixture file
paths, no per-image print; `cv2`, imported but unused, replaced by an empty module) on each of the four fixture
prediction files; the figures it printed, and its summed TP/FP/FN and per-level TP/FN, are copied below as literals.
No code of the official evaluation is part of this repository.
"""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from uotcrowd.metrics import (count_metrics, localization_prf, match_points, nwpu_localization, qnrf_localization,
                              read_nwpu_gt, read_nwpu_pred, write_nwpu_predictions)

# name -> (AP_s, AR_s, F1_s, AR_level_s, AP_l, AR_l, F1_l, AR_level_l, MAE, MSE, NAE) as printed by the official eval
OFFICIAL = {
    'fasterRCNN_val_0.8_0.3': (
        0.8529411764705882, 0.014463840399002495, 0.028445316331535065,
        [0., 0., 0.00106448, 0.06679389, 0.56862745, 0.81818182],
        0.9558823529411765, 0.016209476309226933, 0.03187837175085826,
        [0., 0., 0.00136861, 0.07061069, 0.68627451, 0.89090909],
        375.6190476190476, 1312.0953072235627, 0.5198215192266575),
    'Raz_loc_val_0.5': (
        0.4028559935639582, 0.2497506234413965, 0.30834359605911327,
        [0.11320755, 0.2260184, 0.22445255, 0.64122137, 0.25490196, 0.],
        0.5434432823813354, 0.3369077306733167, 0.4159482758620689,
        [0.11320755, 0.2890933, 0.31858273, 0.69274809, 0.31372549, 0.03636364],
        219.52380952380952, 807.8868379031452, 6.503842430842531),
    'TinyFaces_loc_0.8_0.3': (
        0.4567596566523605, 0.5307980049875312, 0.49100346020761243,
        [0.03773585, 0.22733246, 0.53664842, 0.89312977, 0.88235294, 0.72727273],
        0.5445278969957081, 0.6327930174563591, 0.585351787773933,
        [0.05660377, 0.282523, 0.65054745, 0.92175573, 0.92156863, 0.89090909],
        121.42857142857143, 225.1323420314625, 0.8634116188321448),
    'VGG+GPR_val_k15': (
        0.2305382027871216, 0.23927680798004988, 0.23482623592755753,
        [0.01886792, 0.14454665, 0.23631387, 0.45229008, 0.15686275, 0.16363636],
        0.34754925516578566, 0.3607231920199501, 0.3540137053352912,
        [0.01886792, 0.21550591, 0.36998175, 0.51145038, 0.21568627, 0.29090909],
        76.85714285714286, 146.67424222859762, 15.563423255376028),
}
# name -> (tp_s, fp_s, fn_s, tp per level s, fn per level s, tp_l, fp_l, fn_l, tp per level l, fn per level l)
OFFICIAL_SUMS = {
    'fasterRCNN_val_0.8_0.3': (116, 20, 7904, [0, 0, 7, 35, 29, 45], [53, 761, 6569, 489, 22, 10],
                               130, 6, 7890, [0, 0, 9, 37, 35, 49], [53, 761, 6567, 487, 16, 6]),
    'Raz_loc_val_0.5': (2003, 2969, 6017, [6, 172, 1476, 336, 13, 0], [47, 589, 5100, 188, 38, 55],
                        2702, 2270, 5318, [6, 220, 2095, 363, 16, 2], [47, 541, 4481, 161, 35, 53]),
    'TinyFaces_loc_0.8_0.3': (4257, 5063, 3763, [2, 173, 3529, 468, 45, 40], [51, 588, 3047, 56, 6, 15],
                              5075, 4245, 2945, [3, 215, 4278, 483, 47, 49], [50, 546, 2298, 41, 4, 6]),
    'VGG+GPR_val_k15': (1919, 6405, 6101, [1, 110, 1554, 237, 8, 9], [52, 651, 5022, 287, 43, 46],
                        2893, 5431, 5127, [1, 164, 2433, 268, 11, 16], [52, 597, 4143, 256, 40, 39]),
}


@pytest.fixture(scope='module')
def nwpu(fixtures_dir):
    return fixtures_dir / 'nwpu_loc'


def test_fixture_files_parse(nwpu):
    raw = (nwpu / 'val_gt_loc_subset.txt').read_bytes()
    assert raw.count(b'\r\n') == 21 and raw.count(b'\n') == 21  # CRLF on every line, as shipped
    gt = read_nwpu_gt(nwpu / 'val_gt_loc_subset.txt')
    ids = [int(x) for x in (nwpu / 'ids.txt').read_text().split()]
    assert list(gt) == ids and len(ids) == 21
    assert sum(len(g['points']) for g in gt.values()) == 8020
    assert [i for i, g in gt.items() if len(g['points']) == 0] == [3143, 3150, 3155, 3346]
    for name in OFFICIAL:
        path = nwpu / f'{name}_subset.txt'
        pred = read_nwpu_pred(path)
        assert list(pred) == ids
        # every line's `num` agrees with the parsed points (the reader checks it too)
        for line in path.read_text().splitlines():
            toks = line.split()
            assert pred[int(toks[0])].shape == (int(toks[1]), 2)
    # VGG+GPR's lines all end in a space before the newline; the parse above read them all the same
    assert all(line.endswith(' ') for line in (nwpu / 'VGG+GPR_val_k15_subset.txt').read_text().splitlines())


@pytest.mark.parametrize('name', list(OFFICIAL))
def test_nwpu_equals_official(nwpu, name):
    ap_s, ar_s, f1_s, arc_s, ap_l, ar_l, f1_l, arc_l, mae, mse, nae = OFFICIAL[name]
    tp_s, fp_s, fn_s, tpc_s, fnc_s, tp_l, fp_l, fn_l, tpc_l, fnc_l = OFFICIAL_SUMS[name]
    pred, gt = nwpu / f'{name}_subset.txt', nwpu / 'val_gt_loc_subset.txt'
    for matching in ('scipy', 'kuhn'):
        r = nwpu_localization(pred, gt, matching=matching)
        assert (r['tp_s'], r['fp_s'], r['fn_s'], r['tp_l'], r['fp_l'], r['fn_l']) == (tp_s, fp_s, fn_s, tp_l, fp_l, fn_l)
        for key, want in [('ap_s', ap_s), ('ar_s', ar_s), ('f1_s', f1_s), ('ap_l', ap_l), ('ar_l', ar_l),
                          ('f1_l', f1_l), ('mae', mae), ('mse', mse), ('nae', nae)]:
            assert r[key] == pytest.approx(want, rel=1e-12, abs=1e-15), (matching, key)
        # per-level recall of any maximum matching: its levels' TP sum to TP
        assert sum(r['ar_level_s'][c] * (tpc_s[c] + fnc_s[c]) for c in range(6)) == pytest.approx(tp_s)
    # the official order (Kuhn) gives the official matched heads, hence its per-level AR, exactly
    r = nwpu_localization(pred, gt, matching='kuhn')
    np.testing.assert_allclose(r['ar_level_s'], np.array(tpc_s) / (np.array(tpc_s) + np.array(fnc_s)), rtol=1e-12)
    np.testing.assert_allclose(r['ar_level_l'], np.array(tpc_l) / (np.array(tpc_l) + np.array(fnc_l)), rtol=1e-12)
    np.testing.assert_allclose(r['ar_level_s'], arc_s, atol=5e-9)  # the official printout has 8 decimals
    np.testing.assert_allclose(r['ar_level_l'], arc_l, atol=5e-9)
    assert r['ar_level_avg_l'] == pytest.approx(np.mean(np.array(tpc_l) / (np.array(tpc_l) + np.array(fnc_l))))


def test_nwpu_parsed_dicts_and_roundtrip(nwpu, tmp_path):
    gt = read_nwpu_gt(nwpu / 'val_gt_loc_subset.txt')
    pred = read_nwpu_pred(nwpu / 'TinyFaces_loc_0.8_0.3_subset.txt')
    from_files = nwpu_localization(nwpu / 'TinyFaces_loc_0.8_0.3_subset.txt', str(nwpu / 'val_gt_loc_subset.txt'))
    tensors = {i: torch.as_tensor(p, dtype=torch.float32) for i, p in pred.items()}
    assert nwpu_localization(tensors, gt) == from_files
    out = write_nwpu_predictions(tmp_path / 'p.txt', tensors)
    assert nwpu_localization(out, gt) == from_files
    # scene levels from counts: a split list built from the fixture's counts groups the images
    from uotcrowd.metrics import nwpu_scene_level
    lst = {i: (i % 3, nwpu_scene_level(len(g['points']))) for i, g in gt.items()}
    r = nwpu_localization(pred, gt, split_list=lst)
    assert sorted(r['scene_level']) == [0, 1, 2, 3, 4]
    assert sum(v['tp_l'] for v in r['scene_level'].values()) == r['tp_l']
    assert sum(v['n'] for v in r['luminance'].values()) == 21
    assert r['scene_level'][4]['n'] == 1  # 3146, 5951 heads
    (tmp_path / 'val.txt').write_text(''.join(f'{i} {lum} {lvl}\n' for i, (lum, lvl) in lst.items()))
    again = nwpu_localization(pred, gt, split_list=tmp_path / 'val.txt')
    assert np.isnan(r['scene_level'][0]['nae'])  # level 0 holds only empty images: NAE undefined
    for kind in ('scene_level', 'luminance'):
        assert {k: {n: x for n, x in v.items() if n != 'nae'} for k, v in again[kind].items()} == \
               {k: {n: x for n, x in v.items() if n != 'nae'} for k, v in r[kind].items()}


def _brute_tp(pred, gt, sigma):
    if len(pred) == 0 or len(gt) == 0: return 0
    d = np.sqrt(((pred[:, None] - gt[None]) ** 2).sum(-1))
    cost = np.where(d <= np.broadcast_to(sigma, (len(gt),))[None], 0., 1.)
    r, c = linear_sum_assignment(cost)
    return int((cost[r, c] == 0).sum())


@pytest.mark.parametrize('seed', range(4))
def test_matching_is_maximum(seed):
    "Both matchers give the assignment-based maximum on random clustered cases with integer coordinates."
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n_c = rng.integers(1, 5)
        centres = rng.uniform(0, 60, (n_c, 2))
        K, N = rng.integers(0, 40, size=2)
        pred = np.rint(centres[rng.integers(0, n_c, K)] + rng.normal(0, 4, (K, 2)))
        gt = np.rint(centres[rng.integers(0, n_c, N)] + rng.normal(0, 4, (N, 2)))
        sigma = np.rint(rng.uniform(1, 8, N))
        want = _brute_tp(pred, gt, sigma)
        for matching in ('scipy', 'kuhn'):
            assert match_points(torch.as_tensor(pred), gt, sigma, matching=matching) == (want, K - want, N - want)
        # the warm-started matcher of qnrf_localization, thresholds in any order
        q = qnrf_localization([pred], [gt], thresholds=[6., 2., 4., 9.])
        assert q['curves']['tp'].tolist() == [_brute_tp(pred, gt, t) for t in (6., 2., 4., 9.)]


def test_count_and_prf_agree_with_direct_formulas():
    rng = np.random.default_rng(5)
    gt = rng.integers(1, 50, 30); gt[:3] = 0
    pred = gt + rng.normal(0, 5, 30)
    m = count_metrics(torch.as_tensor(pred), gt)
    assert m['mae'] == pytest.approx(np.abs(pred - gt).mean())
    assert m['rmse'] == pytest.approx(math.sqrt(((pred - gt) ** 2).mean()))
    assert m['nae'] == pytest.approx((np.abs(pred - gt)[3:] / gt[3:]).mean())
    pl = [rng.uniform(0, 40, (rng.integers(0, 20), 2)) for _ in range(5)]
    gl = [rng.uniform(0, 40, (rng.integers(0, 20), 2)) for _ in range(5)]
    r = localization_prf(pl, gl, 5.)
    tp = sum(_brute_tp(p, g, 5.) for p, g in zip(pl, gl))
    assert (r['tp'], r['fp'], r['fn']) == (tp, sum(map(len, pl)) - tp, sum(map(len, gl)) - tp)
    q = qnrf_localization(pl, gl, thresholds=[5.])
    assert q['precision'] == pytest.approx(r['precision']) and q['recall'] == pytest.approx(r['recall'])


def _scipy_tp_curve(pred, gt, thresholds):
    """TP per threshold from SciPy alone: the pairs within reach from a k-d tree, then SciPy's maximum matching.

    Hopcroft-Karp (`maximum_bipartite_matching`) where it is quick; the same maximum cardinality as a unit-capacity
    maximum flow source -> heads -> predictions -> sink (`maximum_flow`, Dinic) at every threshold, because SciPy's
    Hopcroft-Karp needs minutes per threshold above about 50 px on the dense image."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching, maximum_flow
    from scipy.spatial import cKDTree
    pred, gt = np.asarray(pred, float), np.asarray(gt, float)
    n, m = len(gt), len(pred)
    near = cKDTree(gt).query_ball_tree(cKDTree(pred), max(thresholds))
    rows = np.repeat(np.arange(n), [len(x) for x in near]); cols = np.concatenate([np.asarray(x, int) for x in near])
    d = np.sqrt(((gt[rows] - pred[cols]) ** 2).sum(1))
    hk, flow = {}, {}
    for t in thresholds:
        k = d <= t
        if t <= 45:
            A = csr_matrix((np.ones(k.sum()), (rows[k], cols[k])), shape=(n, m))
            hk[t] = int((maximum_bipartite_matching(A, perm_type='column') >= 0).sum())
        src, sink = 0, n + m + 1
        r = np.concatenate([np.zeros(n, int), 1 + rows[k], 1 + n + np.arange(m)])
        c = np.concatenate([1 + np.arange(n), 1 + n + cols[k], np.full(m, sink)])
        G = csr_matrix((np.ones(len(r), np.int32), (r, c)), shape=(sink + 1, sink + 1))
        flow[t] = int(maximum_flow(G, src, sink, method='dinic').flow_value)
    return hk, flow


def test_qnrf_dense_image(nwpu):
    "A 5951-head image with 5490 predictions: every threshold's TP (1..100 px) equals SciPy's maximum matching."
    gt = read_nwpu_gt(nwpu / 'val_gt_loc_subset.txt')[3146]['points']
    pred = read_nwpu_pred(nwpu / 'TinyFaces_loc_0.8_0.3_subset.txt')[3146]
    q = qnrf_localization([pred], [gt])
    tp = q['curves']['tp']
    hk, flow = _scipy_tp_curve(pred, gt, list(range(1, 101)))
    assert len(hk) == 45 and all(hk[t] == flow[t] for t in hk)      # SciPy's two algorithms agree with each other
    assert tp.tolist() == [flow[t] for t in range(1, 101)]
    assert tp[99] == 5315
    assert q['precision'] == pytest.approx(np.mean(tp / len(pred))) and q['recall'] == pytest.approx(np.mean(tp / len(gt)))
