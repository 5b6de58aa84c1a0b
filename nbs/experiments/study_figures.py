"""Statistical figures of the ShanghaiTech B studies, drawn with seaborn: the runs of each arm seed by seed, and
the paired differences between arms (the same seed: the same initialization, hold-out and data order).

Used by `shb_mcnn.ipynb` and `shb_study.ipynb` (beside this file); checked in `tests/test_study_figures.py`.
seaborn and pandas come with the `studies` extra (`pip install -e ".[studies]"`; `dev` has them too).
"""
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import seaborn as sns
from scipy import stats


def t_interval(values, level:float=0.95) -> tuple[float, float]:
    "Mean ± Student's t quantile times the standard error of `values`; the mean itself for fewer than two."
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    mean = float(v.mean()) if len(v) else float('nan')
    if len(v) < 2: return mean, mean
    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return mean - half, mean + half


def seed_differences(table:pd.DataFrame, # one row per run: an arm column, a seed column and the metric
                     reference:str, # the arm every other arm is compared with
                     metric:str='mae', arm:str='arm', seed:str='seed'
                    ) -> pd.DataFrame: # columns `arm`, `seed`, `difference` (arm − reference), seeds both ran
    "Each arm's `metric` minus the reference arm's, seed by seed, over the seeds both arms ran."
    wide = table.pivot_table(index=seed, columns=arm, values=metric)
    if reference not in wide: return pd.DataFrame(columns=[arm, seed, 'difference'])
    diff = wide.drop(columns=reference).sub(wide[reference], axis=0)
    long = diff.reset_index().melt(id_vars=seed, var_name=arm, value_name='difference').dropna()
    return long[[arm, seed, 'difference']].sort_values([arm, seed]).reset_index(drop=True)


def plot_seeds(table:pd.DataFrame, # one row per run
               x:str, # the column of the arms (one column of points each)
               y:str='mae', # the metric
               order=None, # arms in this order (default: as they come)
               seed:str='seed', # one colour per seed
               ax=None):
    "Each run as a point coloured by its seed, and per arm the mean over seeds with its 95 % t-interval."
    if ax is None: _, ax = plt.subplots(figsize=(7, 3.2))
    sns.stripplot(data=table, x=x, y=y, hue=seed, order=order, palette='deep', size=6, jitter=0.08, ax=ax)
    sns.pointplot(data=table, x=x, y=y, order=order, estimator='mean', errorbar=t_interval, color='k',
                  markers='D', markersize=5, linestyle='none', capsize=0.15, err_kws=dict(linewidth=1), ax=ax)
    ax.legend(title=seed, fontsize=7, title_fontsize=7, loc='best')
    ax.grid(axis='y', alpha=0.3)
    return ax


def plot_differences(diffs:pd.DataFrame, # from `seed_differences`: arm, seed, difference
                     reference:str, # the arm subtracted, for the axis label
                     replicates:pd.DataFrame|None=None, # optional bootstrap replicates: arm, seed, difference
                     arm:str='arm', seed:str='seed', metric:str='MAE', ax=None):
    """Per arm, each seed's difference to the reference and their mean with its 95 % t-interval; with
    `replicates`, each seed's point carries the 2.5-97.5 % range of its bootstrap replicates."""
    if ax is None: _, ax = plt.subplots(figsize=(7, 0.6 + 0.55 * max(diffs[arm].nunique(), 1)))
    order = sorted(diffs[arm].unique())
    if replicates is not None:
        sns.pointplot(data=replicates, x='difference', y=arm, hue=seed, order=order, estimator='mean',
                      errorbar=('pi', 95), dodge=0.4, linestyle='none', palette='deep', markersize=4,
                      err_kws=dict(linewidth=1.2), ax=ax)
    else:
        sns.stripplot(data=diffs, x='difference', y=arm, hue=seed, order=order, palette='deep', size=6,
                      jitter=0, ax=ax)
    sns.pointplot(data=diffs, x='difference', y=arm, order=order, estimator='mean', errorbar=t_interval,
                  color='k', markers='D', markersize=5, linestyle='none', capsize=0.2,
                  err_kws=dict(linewidth=1), ax=ax)
    ax.axvline(0, color='grey', ls='--', lw=1)
    ax.set(xlabel=f'{metric} of the arm − {metric} of {reference} (same seed; < 0: the arm is better)',
           ylabel='')
    ax.legend(title=seed, fontsize=7, title_fontsize=7, loc='best')
    return ax
