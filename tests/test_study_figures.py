"""The seaborn figures of the ShanghaiTech B studies (`nbs/experiments/study_figures.py`): intervals, paired
differences on the committed results, and what the figures draw."""
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import stats

EXPERIMENTS = Path(__file__).resolve().parents[1] / 'nbs' / 'experiments'
sys.path.insert(0, str(EXPERIMENTS))
import study_figures as sf  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def made_up_runs():
    "Three arms: x and y on seeds 0-2, z on seeds 0 and 2 only."
    return pd.DataFrame(dict(arm=['x'] * 3 + ['y'] * 3 + ['z'] * 2, seed=[0, 1, 2, 0, 1, 2, 0, 2],
                             mae=[10., 12., 11., 9., 10., 10.5, 14., 13.]))


def whisker(ax, position, vertical=True):
    "The (low, high) extent of the error bar drawn at `position` on the category axis."
    ends = []
    for line in ax.lines:
        xy = line.get_xydata()
        if len(xy) < 4: continue
        cat, val = (xy[:, 0], xy[:, 1]) if vertical else (xy[:, 1], xy[:, 0])
        at = ~np.isnan(cat) & (np.abs(cat - position) < 1e-9)
        if at.sum() >= 2: ends.append((np.nanmin(val[at]), np.nanmax(val[at])))
    assert len(ends) == 1, ends
    return ends[0]


def test_t_interval_is_scipys():
    v = np.random.default_rng(0).normal(3., 2., 7)
    want = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    np.testing.assert_allclose(sf.t_interval(v), want, rtol=1e-12)
    np.testing.assert_allclose(sf.t_interval(v, 0.9),
                               stats.t.interval(0.9, 6, loc=v.mean(), scale=stats.sem(v)))
    assert sf.t_interval([4.]) == (4., 4.)
    assert sf.t_interval([4., np.nan, 6.])[0] < 5. < sf.t_interval([4., np.nan, 6.])[1]   # NaN ignored


def test_seed_differences_by_hand():
    d = sf.seed_differences(made_up_runs(), 'y')
    assert d.to_dict('list') == dict(arm=['x', 'x', 'x', 'z', 'z'], seed=[0, 1, 2, 0, 2],
                                     difference=[1., 2., .5, 5., 2.5])
    assert sf.seed_differences(made_up_runs(), 'w').empty   # no such reference arm


def test_seed_differences_on_the_committed_mcnn_study():
    "MAE of each loss minus GL's, seed by seed, as a plain loop over the rows of results/shb_mcnn.csv has it."
    res = pd.read_csv(EXPERIMENTS / 'results' / 'shb_mcnn.csv')
    res = res[(res.protocol == 'e20') & (res.precision == 'fp32')]
    got = {(r.arm, r.seed): r.difference for r in sf.seed_differences(res, 'gl', arm='loss')
           .rename(columns={'loss': 'arm'}).itertuples()}
    gl = {r.seed: r.mae for r in res.itertuples() if r.loss == 'gl'}
    want = {(r.loss, r.seed): r.mae - gl[r.seed] for r in res.itertuples() if r.loss != 'gl' and r.seed in gl}
    assert got.keys() == want.keys() and len(want) >= 5
    assert all(abs(got[k] - want[k]) < 1e-12 for k in want)


def test_plot_seeds_draws_each_run_and_the_mean_with_its_interval():
    runs = made_up_runs()
    ax = sf.plot_seeds(runs, x='arm', y='mae', order=['x', 'y', 'z'])
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(points) == len(runs) and sorted(points[:, 1]) == sorted(runs.mae)
    means = next(line for line in ax.lines if line.get_marker() == 'D').get_xydata()
    np.testing.assert_allclose(means[:, 1], runs.groupby('arm').mae.mean().loc[['x', 'y', 'z']])
    np.testing.assert_allclose(whisker(ax, 0), sf.t_interval([10., 12., 11.]))
    np.testing.assert_allclose(whisker(ax, 2), sf.t_interval([14., 13.]))


def test_plot_differences_with_bootstrap_replicates():
    "The seeds' points carry the 2.5-97.5 % range of their replicates, the mean of the seeds its t-interval."
    diffs = sf.seed_differences(made_up_runs()[lambda t: t.arm != 'z'], 'y')
    rng = np.random.default_rng(1)
    reps = pd.concat([pd.DataFrame(dict(arm='x', seed=s, difference=d + rng.normal(0, 0.2, 500)))
                      for s, d in zip(diffs.seed, diffs.difference)])
    ax = sf.plot_differences(diffs, 'y', replicates=reps)
    mean = next(line for line in ax.lines if line.get_marker() == 'D').get_xydata()
    np.testing.assert_allclose(mean[0], [diffs.difference.mean(), 0.])
    ranges = sorted(tuple(line.get_xdata()[[0, -1]]) for line in ax.lines
                    if line.get_marker() != 'D' and len(line.get_xdata()) == 2
                    and np.ptp(line.get_ydata()) == 0)
    want = sorted(tuple(np.percentile(reps[reps.seed == s].difference, [2.5, 97.5])) for s in diffs.seed)
    np.testing.assert_allclose(ranges, want)
    assert ax.get_xlabel().startswith('MAE of the arm − MAE of y')
