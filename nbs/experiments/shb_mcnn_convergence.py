# %% [markdown]
# # ShanghaiTech B to convergence: precision check and learning-rate pilots
#
# > Before the long part B runs: whether bfloat16 training changes the result, and which learning rate the runs to convergence use, chosen on the validation images.

# %% [markdown]
# The [20-epoch study](shb_mcnn.ipynb) left every loss far from convergence. The runs to convergence train MCNN
# with the same data, crops, seeds and validation hold-out until the validation MAE stops improving: the learning
# rate is divided by 10 after `--lr-patience` epochs without a better validation MAE, and the run stops after
# `--patience` such epochs (or at the epoch cap). Two things are settled first, both on data other than the test
# split's choices:
#
# 1. **bfloat16.** `--precision bf16` (autocast + channels_last; the loss stays in float32) makes an MCNN step
#    about 2.7× faster on this CPU. The long runs use it if GL seed 0 trained for the same 20 epochs in bf16 lands
#    within the seed-to-seed spread of the float32 runs.
# 2. **The learning rate**, one schedule for all losses, from the validation curves of GL seed 0.
#
# Every run is `nbs/experiments/run_shb_mcnn.sh` (`PROTOCOL=plateau`, resumable from the committed `last.pt`; the
# runs here are its pilots), run from a frozen clone of the repository, one torch thread each:
#
# ```sh
# PROTOCOL=plateau PRECISION=bf16 LOSSES=gl bash nbs/experiments/run_shb_mcnn.sh 0                     # lr 1e-3
# PROTOCOL=plateau PRECISION=bf16 LR=1e-4 TAG=_lr1e-4 LOSSES=gl bash nbs/experiments/run_shb_mcnn.sh 0  # lr 1e-4
# ```

# %%
import csv
from pathlib import Path
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt

# %%
ROOT = Path('../..')
RESULTS = ROOT / 'nbs' / 'experiments' / 'results'

# %% [markdown]
# ## bfloat16 against float32
#
# The same run (GL, seed 0, 20 epochs, validation every 4) in both precisions, beside the seed-to-seed difference
# of each loss in float32 (seeds 0 and 1):

# %%
res = pd.read_csv(RESULTS / 'shb_mcnn.csv')
e20 = res[res.protocol == 'e20']
pair = e20[(e20.loss == 'gl') & (e20.seed == 0)].set_index('precision')[['mae', 'rmse', 'nae', 'f1_8']]
display_pair = pair.copy(); display_pair.loc['bf16 - fp32'] = pair.loc['bf16'] - pair.loc['fp32']
fp32 = e20[e20.precision == 'fp32']
spread = {l: float(g.mae.max() - g.mae.min()) for l, g in fp32.groupby('loss') if g.seed.nunique() > 1}
print(display_pair.round(3).to_string())
print('seed-to-seed |MAE(seed 0) - MAE(seed 1)| in fp32:', {l: round(v, 1) for l, v in spread.items()},
      f'mean {np.mean(list(spread.values())):.1f}')


# %% [markdown]
# The validation curves of the two runs, and of GL seed 1 in float32 for scale:

# %%
def val_curve(run):
    rows = [r for r in csv.DictReader(open(RESULTS / 'shb_mcnn' / run / 'log.csv')) if r['val_mae']]
    return [int(r['epoch']) + 1 for r in rows], [float(r['val_mae']) for r in rows]

fig, ax = plt.subplots(figsize=(6, 3))
for run, label in [('gl_s0', 'GL seed 0, fp32'), ('gl_s0_bf16', 'GL seed 0, bf16'), ('gl_s1', 'GL seed 1, fp32')]:
    ax.plot(*val_curve(run), marker='o', label=label)
ax.set(xlabel='epoch', ylabel='validation MAE (40 images)'); ax.legend(); ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **Decision.** bf16 lands 6.3 MAE above fp32 on the test split; the float32 runs of GL differ by 6.1 from seed 0
# to seed 1, those of the three losses by 11.3 on average. Against GL's own spread the difference is at the edge,
# against the pooled spread it is well inside; and the validation curves of the two precisions stay within the
# jumps of a single run (epoch 12: 58.4 and 58.0), while seed 1 wanders 25-45 away. The runs to convergence use
# bf16, which makes them about 2.4× cheaper; with three seeds per loss the spread will be measured properly, and if
# bf16 then turns out to matter, the float32 20-epoch rows remain as the reference.

# %% [markdown]
# ## Learning rate: validation curves of GL seed 0
#
# Two pilots of the run to convergence (bf16, patience 40, learning-rate patience 20, validation every 2 epochs),
# starting at $10^{-3}$ (the 20-epoch study's rate) and $10^{-4}$ (the paper's for MCNN). Runs still in progress
# show the epochs done so far (their `last.pt` is committed and they resume from it):

# %%
pilots = {'lr 1e-3': 'plateau/gl_s0', 'lr 1e-4': 'plateau/gl_s0_lr1e-4'}
fig, ax = plt.subplots(figsize=(7, 3.2))
for label, run in pilots.items():
    if not (RESULTS / 'shb_mcnn' / run / 'log.csv').exists(): continue
    ep, mae = val_curve(run)
    ax.plot(ep, mae, marker='.', alpha=0.5, label=f'{label} (each validation)')
    k = 5
    if len(mae) >= k: ax.plot(ep[k - 1:], np.convolve(mae, np.ones(k) / k, 'valid'), lw=2, label=f'{label} (mean of {k})')
    lrs = [(int(r['epoch']) + 1, float(r['lr'])) for r in csv.DictReader(open(RESULTS / 'shb_mcnn' / run / 'log.csv'))]
    for (e0, l0), (e1, l1) in zip(lrs, lrs[1:]):
        if l1 < l0: ax.axvline(e1, color=ax.lines[-1].get_color(), ls=':', lw=1)
    print(f"{label}: {len(lrs)} epochs, best validation MAE {min(mae):.1f} at epoch {ep[int(np.argmin(mae))]}, "
          f"mean of the last 5 validations {np.mean(mae[-5:]):.1f}, learning rate now {lrs[-1][1]:g}")
ax.set(xlabel='epoch', ylabel='validation MAE', ylim=(0, None)); ax.legend(fontsize=8); ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# **What the curves say so far.** The validation MAE of 40 images jumps by 10-40 from one validation to the next at
# a learning rate of $10^{-3}$, so one lucky validation can end a run with a raw patience rule (`--val-window 1`);
# `--val-window 5` (patience counted on the mean of the last five validations) is the rule the runs to convergence
# use. The learning rate is chosen when both pilots have run past their first decay.
