# %% [markdown]
# # ShanghaiTech B to convergence
#
# > Whether bfloat16 training changes the result, which learning rate the runs to convergence use (chosen on the validation images), and the study itself: GL, GL with the transport solved, L2 and BL, three seeds each.

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
#
# The study itself (section "The study" below) runs `PROTOCOL=plateau5`, the protocol chosen here.

# %%
import csv
from pathlib import Path
import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_close

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
# **Decision.** Both pilots validate best around epoch 52 (27.5 at $10^{-3}$, 28.4 at $10^{-4}$: single lucky
# validations), but the mean of five consecutive validations, which is what the patience rule of the study
# compares, is lower at $10^{-4}$ (best 37.6 against 42.2) and its curve is calmer. The study uses $10^{-4}$ with
# `--val-window 5` for every loss (`PROTOCOL=plateau5` in the runner; patience 40 and learning-rate patience 20
# epochs, validation every 2 epochs, bf16). The validation MAE of 40 images jumps by 10-40 from one validation to
# the next even at $10^{-5}$, so one lucky validation can end a run under a raw patience rule (`--val-window 1`).
# The $10^{-3}$ pilot ran its course (92 epochs, stopped by the patience rule) and its validation-chosen checkpoint
# was then evaluated once on the test split like every study run: MAE 38.0, RMSE 67.9 (20-epoch runs: 51-57).
# The $10^{-4}$ pilot was stopped after 62 epochs once the choice was made.
#
# ## Where the error comes from: dense images are under-counted
#
# Per test image, the $10^{-3}$ pilot's predicted count against the annotated one (left) and the error by
# crowdedness (right). The model counts sparse scenes well and falls short on dense ones; the training crops
# (256 px, a twelfth of an image, 5.5 heads on average) rarely contain a dense region. The run's final weights
# over-count 30 random training crops slightly (6.4 predicted for 5.5 annotated) and predict only 51 % of the
# annotated count on 15 full training images (1131 for 2234). The network is local (its receptive field is about
# 70 px) and gives the same density on a crop as on the full image up to border effects (checked on three
# windows), so the shortfall is in what it learned for dense heads, not in the evaluation.

# %%
def per_image_of(checkpoint):
    "Per-photo test errors of an evaluated run, from the `eval-test` folder beside its `checkpoint` (relative to the repo)."
    return pd.read_csv(ROOT / Path(checkpoint).parent / 'eval-test' / 'per_image.csv')

pi = per_image_of('nbs/experiments/results/shb_mcnn/plateau/gl_s0/best.pt')
fig, (a0, a1) = plt.subplots(1, 2, figsize=(8, 3.2))
a0.scatter(pi.gt_count, pi.pred_count, s=6, alpha=0.6); lim = max(pi.gt_count.max(), pi.pred_count.max())
a0.plot([0, lim], [0, lim], 'k--', lw=1); a0.set(xlabel='annotated count', ylabel='predicted count', title='GL pilot, test images')
def quartile_errors(per_image, labels=None):
    "Mean signed count error (predicted - annotated) per quarter of the photos in `per_image`, by annotated count."
    quarter = pd.qcut(per_image.gt_count, 4, labels=labels)
    return (per_image.pred_count - per_image.gt_count).groupby(quarter, observed=True).mean()
err = quartile_errors(pi)
a1.bar([f"{int(b.left)}-{int(b.right)}" for b in err.index], err.values); a1.axhline(0, color='k', lw=0.8)
a1.set(xlabel='annotated count (quartiles)', ylabel='mean (predicted - annotated)')
fig.tight_layout(); plt.show()
print('mean signed error by quartile of the annotated count:', {f'{b.left:.0f}-{b.right:.0f}': round(v, 1) for b, v in err.items()})

# %% [markdown]
# Is the shortfall the loss's own? Fitting a density map directly to a set of heads (no network: 64×64 map of a
# 256-px crop, stride 4, Adam on a softplus-parametrized map, 400 steps) shows what GL's minimizer counts for
# crowds of growing density. It counts within 5 % at every density, in both solver modes (slightly over on sparse
# heads, slightly under on very dense ones): the loss does not ask for the under-count of the trained models, which
# comes from what MCNN learns from crops that rarely hold a dense crowd.

# %%
from uotcrowd.losses import GeneralizedLoss
def fitted_count(points, mode, steps=400, size=64, stride=4):
    "Sum of the density map that minimizes GL for `points` (found by Adam from a near-empty map)."
    gl, raw = GeneralizedLoss(stride=stride, mode=mode, scale=512.), torch.full((1, 1, size, size), -6.0, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.05)
    for _ in range(steps):
        opt.zero_grad(); gl(torch.nn.functional.softplus(raw), [points]).backward(); opt.step()
    return float(torch.nn.functional.softplus(raw.detach()).sum())
gen = torch.Generator().manual_seed(0)
rows = []
for n, box in [(10, 200), (50, 64), (100, 32), (200, 24)]:
    pts = 128 - box / 2 + box * torch.rand(n, 2, generator=gen)
    rows.append({'heads': n, 'box (px)': box, **{f'{m}: count / heads': fitted_count(pts, m) / n for m in ('official', 'converged')}})
print(pd.DataFrame(rows).round(3).to_string(index=False))

# %% [markdown]
# ## The study: four losses, three seeds
#
# Each run: `PROTOCOL=plateau5 PRECISION=bf16 LOSSES="..." bash nbs/experiments/run_shb_mcnn.sh 0 1 2`, two chains
# side by side on two cores (`gl l2` and `gl-converged bl`), each run resumable from its committed `last.pt`. A
# run's row enters `results/shb_mcnn.csv` (protocol `plateau5`) when it has stopped and its validation-chosen
# checkpoint has been evaluated on the test split. DM-Count ran after the four arms, on seeds 0 and 1, as
# `LOSSES=dmcount-norm ... 0 1`: with its coordinates in pixels (its default) its optimal-transport gradient is about ten
# times its count signal and the 20-epoch run over-counted 3.5-fold, while its normalized coordinates
# (`--norm-cood`, here `dmcount-norm`) trained stably. Progress of every run so far:

# %%
STUDY = RESULTS / 'shb_mcnn' / 'plateau5'
study = res[res.protocol == 'plateau5']
def progress(run_dir):
    rows = list(csv.DictReader(open(run_dir / 'log.csv')))
    val = [float(r['val_mae']) for r in rows if r['val_mae']]
    win = np.convolve(val, np.ones(5) / 5, 'valid') if len(val) >= 5 else np.array([])
    done = study[study.checkpoint == str(Path('nbs/experiments/results/shb_mcnn/plateau5') / run_dir.name / 'best.pt')]
    return dict(run=run_dir.name, epochs=len(rows), lr=f"{float(rows[-1]['lr']):g}", best_val=min(val, default=np.nan),
                best_val_window5=float(win.min()) if len(win) else np.nan, test_mae=float(done.mae.iloc[0]) if len(done) else np.nan)
runs = sorted(d for d in STUDY.glob('*_s*') if (d / 'log.csv').exists()) if STUDY.exists() else []
print(pd.DataFrame([progress(d) for d in runs]).round(2).to_string(index=False) if runs else 'no runs yet')

# %% [markdown]
# Validation curves, one panel per seed (each seed holds out its own 40 validation images, so the levels differ
# between panels): the mean of five validations, the quantity the patience rule compares; dotted lines mark the
# learning-rate decays, a line's end the epoch its run stopped (or has reached so far):

# %%
if runs:
    seeds = sorted({int(d.name.rsplit('_s', 1)[1]) for d in runs})
    colors = {loss: f"C{i}" for i, loss in enumerate(['gl', 'gl-converged', 'l2', 'bl', 'dmcount-norm'])}
    fig, axes = plt.subplots(1, len(seeds), figsize=(3.4 * len(seeds), 3), sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for d in [d for d in runs if d.name.endswith(f'_s{seed}')]:
            loss = d.name.rsplit('_s', 1)[0]; log = list(csv.DictReader(open(d / 'log.csv')))
            ep = [int(r['epoch']) + 1 for r in log if r['val_mae']]; v = [float(r['val_mae']) for r in log if r['val_mae']]
            if len(v) >= 5: ax.plot(ep[4:], np.convolve(v, np.ones(5) / 5, 'valid'), color=colors.get(loss, 'k'), label=loss)
            lrs = [float(r['lr']) for r in log]
            for e, (l0, l1) in enumerate(zip(lrs, lrs[1:]), 2):
                if l1 < l0: ax.axvline(e, color=colors.get(loss, 'k'), ls=':', lw=1)
        ax.set(title=f'seed {seed}', xlabel='epoch'); ax.grid(alpha=0.3)
    top = max(l.get_ydata().max() for ax in axes[0] for l in ax.lines if len(l.get_ydata()) > 2)
    axes[0, 0].set_ylim(0, 1.05 * top); axes[0, 0].set_ylabel('validation MAE (mean of 5)'); axes[0, 0].legend(fontsize=7)
    fig.tight_layout(); plt.show()

# %% [markdown]
# Test results of the finished runs: mean ± standard deviation over seeds per loss, then every pair of losses
# compared seed by seed over the seeds both have finished (a negative difference: the first counts better), with a
# 95 % t-interval when there are at least two pairs and the number of seeds on which the first is the better one.

# %%
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78}
def paired_difference(by, first, second):
    "Test-MAE difference `first - second` over the seeds both finished: mean, 95 % t-interval (or None), wins, seeds."
    d = (by[first] - by[second]).dropna()
    h = T975[len(d) - 1] * d.std() / np.sqrt(len(d)) if len(d) >= 2 else None
    return d.mean(), None if h is None else (d.mean() - h, d.mean() + h), int((d < 0).sum()), len(d)

if len(study):
    summary = study.groupby('loss').agg(seeds=('seed', 'nunique'), mae=('mae', 'mean'), mae_sd=('mae', 'std'),
                                        rmse=('rmse', 'mean'), f1_8=('f1_8', 'mean'), epochs=('epochs', 'mean'))
    summary = summary.sort_values(['seeds', 'mae'], ascending=[False, True])  # means over fewer seeds come last
    print(summary.round(2).to_string())
    by = study.pivot_table(index='seed', columns='loss', values='mae')
    order = list(summary.index)
    for i, first in enumerate(order):
        for second in order[i + 1:]:
            mean, ci, wins, n = paired_difference(by, first, second)
            if n == 0: continue
            interval = f"95 % interval {ci[0]:+.1f} to {ci[1]:+.1f}" if ci else "no interval from one seed"
            print(f"{first} - {second}: {mean:+.1f} ({interval}; {first} lower on {wins} of {n} seeds)")
else: print('no finished runs yet')


# %% [markdown]
# All three seeds have finished for the four arms. Test MAE, seeds
# 0 / 1 / 2: GL with the transport solved 26.2 / 25.0 / 45.1, GL with the official recipe 29.5 / 31.1 / 47.9, L2
# 35.4 / 41.0 / 39.9, BL 39.2 / 31.8 / 72.5 (MCNN's own paper: 26.4). Seeds 0 and 1 put both GL arms first; seed 2 puts
# L2 first. On seed 2 the first learning rate gave validation MAEs that swung by tens of people from one validation
# to the next (GL with the transport solved: 77, 88, 89, 97, 91, 77, 93, 94, 41, 82, 87), and the patience rule
# spent its 20 epochs inside that swing: both GL runs had their learning rate cut tenfold after epoch 22 and never
# recovered, the solved run keeps as its validation-chosen checkpoint the lucky epoch 18 (41.4 between 94 and 82),
# and BL was stopped at epoch 42. L2's start was calmer on the same seed (49 to 65) and it trained 74 epochs before
# its first decay. The rule that ends the runs is therefore part of what the seeds measure: on this budget it
# sometimes ends a run before it has learnt, and a warm-up before it starts counting is the change the curves above
# suggest (`TrainConfig.plateau_start`, `PLATEAU_START` in the runner; it would need every arm re-run). The target (GL ≤ 35) is met on seeds 0 and 1 by both GL arms and missed
# on seed 2 by both; over the three seeds the solved transport averages 32.1 and the official recipe 36.2. The 40
# validation images change with the seed, so the arms are compared seed by seed.

# %% [markdown]
# DM-Count, in the one setting that trained (normalized coordinates, `dmcount-norm`), ran on seeds 0 and 1: test MAE
# 30.4 and 31.5 (RMSE 55.3 and 55.4) after 246 and 218 epochs. Its validation-chosen checkpoints are epoch 198
# (validation MAE 20.7; on the same images the solved GL 15.9, the official recipe 18.7) and epoch 158 (41.3; 30.2 and
# 40.7). Seed 0 still improved its mean of five validations by hundredths at epoch 206, after three tenfold decays;
# seed 1 last improved it at epoch 178, after two. On both
# seeds it sits level with GL's official recipe (0.9 and 0.4 above it, neither difference separated by the test
# photos) and behind the solved transport by 4.3 (interval over test photos 2.5 to 6.0) and 6.5 (4.2 to 8.8); it
# counts better than L2 by 4.9 and 9.5, and than BL by 8.7 on seed 0, level with it on seed 1 (−0.2, −2.3 to 1.8).
# Its count bias over the quarters of the test photos sorted by annotated count, seed 0 / seed 1: +8.9, +2.2, −8.5,
# −58.7 / +14.0, +7.9, −4.5, −57.4 (solved GL: +2.2, −0.7, −10.5, −48.3 / +5.2, +3.7, −10.7, −37.0): the densest
# quarter loses 10 to 20 more people than with the solved transport. Its localization is the weakest on seed 1 and level with BL's on seed 0 (F1 at
# 8 px 0.23 / 0.22; solved GL 0.45 / 0.44, official recipe 0.36 / 0.36, L2 0.41 / 0.39, BL 0.22 / 0.38): its maps
# spread the mass over the crowd instead of forming one peak per head (the more crowded photo in the density-map
# figure below: 507 located peaks for 195 heads, count 223).

# %% [markdown]
# The seeds measure how much training varies; the 316 test photos add a second uncertainty, how much a difference
# between two trained models depends on which photos were tested. Resampling the test photos (paired: both models
# on the same resample) gives that interval for each seed separately:

# %%
def image_bootstrap(first, second, n_boot=2000, seed=0):
    "Paired bootstrap over test photos of MAE(first) - MAE(second): the difference and its 95 % percentile interval."
    d = (first.set_index('name').abs_err - second.set_index('name').abs_err).to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    lo, hi = np.percentile(d[idx].mean(1), [2.5, 97.5])
    return d.mean(), lo, hi

pairs = [('gl-converged', 'gl'), ('gl', 'l2'), ('l2', 'bl'), ('gl-converged', 'l2'), ('gl-converged', 'dmcount-norm'),
         ('gl', 'dmcount-norm'), ('dmcount-norm', 'l2')]
boot = []
for seed, rows in study.groupby('seed'):
    rows = rows.drop_duplicates('loss').set_index('loss')
    for first, second in pairs:
        if first in rows.index and second in rows.index:
            a, b = rows.loc[first], rows.loc[second]
            pa, pb = per_image_of(a.checkpoint), per_image_of(b.checkpoint)
            test_eq(sorted(pa.name), sorted(pb.name))
            diff, lo, hi = image_bootstrap(pa, pb)
            test_close(diff, a.mae - b.mae, eps=1e-2)  # the per-photo errors give back the rows' MAE
            boot.append(dict(seed=seed, pair=f"{first} - {second}", mae_diff=diff, low=lo, high=hi))
print(pd.DataFrame(boot).round(1).to_string(index=False) if boot else 'no pairs yet')

# %%
if boot:
    b = pd.DataFrame(boot); fig, ax = plt.subplots(figsize=(6, 0.35 * len(b) + 0.8))
    ax.errorbar(b.mae_diff, range(len(b)), xerr=[b.mae_diff - b.low, b.high - b.mae_diff], fmt='o', capsize=3)
    ax.set_yticks(range(len(b)), [f"{r.pair}, seed {r.seed}" for r in b.itertuples()], fontsize=8)
    ax.axvline(0, color='k', lw=0.8); ax.invert_yaxis()
    ax.set(xlabel='test MAE difference (95 % interval over test photos)'); fig.tight_layout(); plt.show()

# %% [markdown]
# On the test photos every within-seed difference in the figure but two stays clear of zero, whichever way it points
# (the exceptions: GL's official recipe against DM-Count, −0.9 on seed 0 with an interval of −2.6 to 0.9, and −0.4 on
# seed 1, −2.0 to 1.3):
# solving the transport lowers the test MAE of GL by 3.4 (interval 1.7 to 5.1) on seed 0, by 6.1 (4.3 to 8.0) on
# seed 1 and by 2.8 (0.3 to 5.2) on seed 2. The 316 photos are enough to separate two trained models; what remains
# uncertain is the training run, which is what the seeds (the pairwise table above) measure. One ordering holds on
# every seed: the solved transport before the official recipe (mean −4.1, three wins of three; with three seeds the
# 95 % t-interval, −8.5 to +0.3, still just reaches zero). GL against L2 turns with the seed: the official recipe
# wins by 5.9 and 9.9 on seeds 0 and 1 and loses by 8.0 (4.5 to 11.5) on seed 2, the solved transport wins by 9.2 and
# 16.0 and loses by 5.2 (3.2 to 7.2); BL is last on two seeds of three.

# %% [markdown]
# ## Official recipe or solved transport
#
# The official recipe stops the Sinkhorn loop after 12 soft-min pairs, where about 5 % of the row mass is still
# misplaced; `gl-converged` iterates until the marginal error is below $10^{-3}$ and costs about 10 % more per epoch on
# this CPU (median epoch 33.0 s against 30.2 s for seed 0, each beside another training run: the solver is a small part
# of an MCNN step). Both arms side by side, per seed, with the
# mean error (prediction − annotation) in each quarter of the test photos sorted by their annotated count:

# %%
transport = study[study.loss.isin(['gl', 'gl-converged'])].sort_values(['seed', 'loss'])
if len(transport):
    rows = []
    for r in transport.itertuples():
        best_val = torch.load(ROOT / r.checkpoint, weights_only=True)['best_mae']
        rows.append(dict(loss=r.loss, seed=r.seed, epochs=r.epochs, best_val_mae=best_val, test_mae=r.mae, rmse=r.rmse,
                         f1_8=r.f1_8, **quartile_errors(per_image_of(r.checkpoint), labels=['q1', 'q2', 'q3', 'q4']).to_dict()))
    print(pd.DataFrame(rows).round(2).to_string(index=False))

# %% [markdown]
# On seeds 0 and 1, solving the transport trained the better counter on every measure. Seed 0: validation MAE
# 15.9 against 18.7, test MAE 26.2 against 29.5 (MCNN's own paper: 26.4), localization F1 0.45 against 0.36, and a
# smaller under-count of the densest quarter (−49 against −70). Seed 1: validation MAE 30.2 against 40.7, test MAE
# 25.0 against 31.1, F1 0.44 against 0.36, densest quarter −37 against −59. There the solved arm also trains longer
# before the patience rule stops it (224 and 216 against 140 and 170 epochs): its mean of five validations keeps
# improving by small steps after the learning rate has decayed. Seed 2, where both runs lost their learning rate
# after epoch 22, still gives the solved arm the lower test MAE and RMSE (45.1 against 47.9, 75.2 against 80.5) and
# the smaller under-count of the densest quarter (−103 against −126), but not the better localization (F1 0.26
# against 0.31): its checkpoint is the lucky epoch 18 of the noisy start, which over-counts the sparsest quarter by
# 21. Three seeds agree in the sign of the test-MAE difference.

# %% [markdown]
# Density maps and located heads of each finished loss (seed 0) on the least and the most crowded of the first ten
# test photos, at each model's validation-chosen threshold (white crosses), beside the annotations (green):

# %%
from uotcrowd.checkpoints import load_model
from uotcrowd.localize import localize
from uotcrowd.data import ShanghaiTech
from uotcrowd.images import EvalTransform, denormalize
DATA = ROOT / '..' / 'shared' / 'datasets' / 'ShanghaiTech'
done0 = study[study.seed == 0].drop_duplicates('loss')
if len(done0):
    test_ds = ShanghaiTech(DATA, 'B', 'test', transform=EvalTransform(4))
    first = [len(test_ds.load(i)[1]) for i in range(10)]
    picks = [int(np.argmin(first)), int(np.argmax(first))]
    fig, axes = plt.subplots(len(picks), len(done0) + 1, figsize=(2.2 * (len(done0) + 1), 1.9 * len(picks)), squeeze=False)
    for row, i in zip(axes, picks):
        image, gt, meta = test_ds[i]
        H, W = meta['height'], meta['width']
        row[0].imshow(denormalize(image)[:H, :W].mean(-1), cmap='gray'); row[0].scatter(*gt.T.numpy(), s=3, c='lime', linewidths=0)
        row[0].set_title(f"{len(gt)} heads", fontsize=8)
        for ax, r in zip(row[1:], done0.itertuples()):
            model, ckpt = load_model(ROOT / r.checkpoint)
            with torch.no_grad(): density = model(image[None])
            pts = localize(density, stride=model.stride, threshold=ckpt.get('loc_threshold', 0.05))[0]
            ax.imshow(density[0, 0].numpy(), cmap='jet', extent=(0, image.shape[-1], image.shape[-2], 0))
            if len(pts): ax.scatter(*pts.T.numpy(), s=2, c='white', marker='x', linewidths=0.4)
            ax.set_title(f"{r.loss}: {float(density.sum()):.0f}, {len(pts)} pts", fontsize=8)
        for ax in row: ax.set_xlim(0, W); ax.set_ylim(H, 0); ax.axis('off')
    fig.tight_layout(); plt.show()

# %% [markdown]
# ## The committed model
#
# `models/shb-mcnn-gl.pt` (the name `shb-mcnn-gl` for `uotcrowd predict`, `Counter` and `uotcrowd serve`) is the
# part B run with the lowest validation MAE so far, written by `uotcrowd.checkpoints.publish_model` with its card: today
# the study's GL-converged seed 0 (validation MAE 15.9 at its best epoch; GL seed 0: 18.7; the pilot at $10^{-3}$:
# 27.5). As more runs finish, the one with the lowest validation MAE takes its place. Its prediction on the first test photo (`../images/shb_mcnn_prediction.png`; the home page shows the default model, `shb-effnet-gl`):

# %%
from uotcrowd.counter import Counter
from uotcrowd.images import read_image
from uotcrowd.plots import plot_prediction
counter = Counter(ROOT / 'models' / 'shb-mcnn-gl.pt', device='cpu')
photo = DATA / 'part_B' / 'test_data' / 'images' / 'IMG_1.jpg'
found = counter(photo)
heads = ShanghaiTech(DATA, 'B', 'test').load(0)[1]
out = ROOT / 'nbs' / 'images' / 'shb_mcnn_prediction.png'
card = torch.load(ROOT / 'models' / 'shb-mcnn-gl.pt', weights_only=True)['card']
plot_prediction(read_image(photo), torch.from_numpy(found.density), torch.from_numpy(found.points), gt_points=heads,
                title=f"ShanghaiTech B IMG_1, shb-mcnn-gl (MCNN + GL, {card['training']['epochs']} epochs on a CPU): "
                      f"{found.count:.0f} people (annotated {len(heads)})", path=out, dpi=55)
print(f"{out.name}: {out.stat().st_size / 1024:.0f} KB; count {found.count:.1f}, {len(found.points)} heads located, {len(heads)} annotated")

# %% [markdown]
# ![](../images/shb_mcnn_prediction.png)
