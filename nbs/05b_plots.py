# %% [markdown]
# # Plots
#
# > Every figure of the package: points and matches over an image, a prediction with its density map, examples of a model, training curves, and counts over time.

# %%
#| default_exp plots

# %%
#| export
from __future__ import annotations
from pathlib import Path
from typing import Sequence
import numpy as np
import torch
import matplotlib
from matplotlib.figure import Figure
from matplotlib.backends.backend_agg import FigureCanvasAgg
from uotcrowd.core import to_numpy
from uotcrowd.images import denormalize, IMAGENET_MEAN, IMAGENET_STD

# %%
#| hide
import tempfile
import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_close


# %% [markdown]
# The figures of training, evaluation, prediction and the counter are all drawn here. This notebook comes
# right after the data (it needs only `denormalize` and the ImageNet statistics), so every later module can
# import its figures from it. A figure function draws what it is given; computing what to draw (running a
# model, localizing heads, matching them to annotations) is the caller's work.
#
# The functions that return a `Figure` draw it on an Agg canvas of its own, so they work on headless machines
# and leave the global matplotlib backend alone; with `path` they also write it as a PNG. `plot_points` and
# `plot_matches` draw on the axes they are given, or on a new pyplot figure in a notebook.

# %% [markdown]
# ## Points over an image
#
# `plot_points` draws predicted points (red crosses) and, if given, ground-truth points (hollow green circles)
# over an image. `image` may be an `(H, W, 3)` array or PIL image, or a `(3, H, W)` tensor; tensors with
# values outside $[0, 1]$ are taken to be ImageNet-normalized (as the datasets yield them) and de-normalized
# for display.

# %%
#| export
def _as_display_image(image) -> np.ndarray:
    "An array for `imshow`: a `(3, H, W)` tensor outside [0, 1] is de-normalized (ImageNet statistics)."
    if isinstance(image, torch.Tensor):
        img = image.detach().cpu().float()
        if img.dim() == 3 and img.shape[0] in (1, 3):
            std, mean = torch.tensor(IMAGENET_STD)[:, None, None], torch.tensor(IMAGENET_MEAN)[:, None, None]
            if img.min() < 0 or img.max() > 1: img = img * std + mean
            img = img.permute(1, 2, 0)
        return img.clamp(0, 1).squeeze(-1).numpy()
    return np.asarray(image)


# %%
#| export
def plot_points(image, # `(H, W, 3)` array / PIL image, or `(3, H, W)` tensor (normalized or in [0, 1])
                pred_points=None, # `(K, 2)` predicted `(x, y)` points
                gt_points=None, # `(N, 2)` ground-truth `(x, y)` points
                ax=None, # matplotlib axes to draw on (a new figure if None)
                pred_color:str='red', gt_color:str='lime', # marker colours
                size:float=30, # marker size (points²)
                title:str|None=None, # axes title (default: the counts)
                legend:bool=True):
    "Show `image` with predicted points (crosses) and ground-truth points (circles); returns the axes."
    import matplotlib.pyplot as plt
    if ax is None: _, ax = plt.subplots(figsize=(6, 4.5))
    ax.imshow(_as_display_image(image))
    parts = []
    gt_style = dict(facecolors='none', edgecolors=gt_color, marker='o', linewidths=1.2)
    pred_style = dict(c=pred_color, marker='+', linewidths=1.2)
    for pts, kw, name in [(gt_points, gt_style, 'ground truth'), (pred_points, pred_style, 'predicted')]:
        if pts is None: continue
        pts = to_numpy(pts).reshape(-1, 2)
        ax.scatter(pts[:, 0], pts[:, 1], s=size, label=f'{name} ({len(pts)})', **kw)
        parts.append(f'{name}: {len(pts)}')
    ax.set_title(', '.join(parts) if title is None else title)
    if legend and parts: ax.legend(loc='upper right', fontsize=8)
    ax.set_axis_off()
    return ax


# %%
ax = plot_points(torch.randn(3, 32, 48), torch.tensor([[4., 4.], [20., 12.]]), torch.tensor([[5., 5.]]))
test_eq(len(ax.collections), 2); test_eq(ax.get_title(), 'ground truth: 1, predicted: 2')
test_eq(ax.collections[1].get_offsets().tolist(), [[4., 4.], [20., 12.]])
test_eq(_as_display_image(torch.zeros(3, 4, 5)).shape, (4, 5, 3))
_rgb = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))   # normalized, then shown as it was
_normalized = (_rgb - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
test_close(_as_display_image(_normalized), _rgb.permute(1, 2, 0).numpy(), eps=1e-6)
plt.close('all')


# %% [markdown]
# ## Matches
#
# `plot_matches` draws the located points over the image as a matching sorted them: matched predictions (true
# positives) in green, the other predictions (false positives) as red crosses, and the heads no prediction
# matched (false negatives) as hollow yellow circles. The matching is `uotcrowd.metrics.match_points(pred, gt,
# sigma, return_matches=True)`, whose last value is the `(T, 2)` array of matched (prediction, head) indices
# that `pairs` takes; the caller's `title` can say how good the matching is (precision, recall, F1).

# %%
#| export
def _image_array(image) -> np.ndarray:
    "An `(H, W, 3)` or `(H, W)` float array in [0, 1] for `imshow` from a CHW tensor or HWC array."
    a = to_numpy(image, np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3): a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1: a = a[..., 0]
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1: a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)  # normalized, or 0..255
    return a


# %%
img = _image_array(torch.randn(3, 8, 9))  # a normalized CHW tensor becomes HWC in [0, 1]
test_eq(img.shape, (8, 9, 3)); test_close(img.min(), 0.); test_close(img.max(), 1.)
test_eq(_image_array(np.full((4, 5, 3), 0.5)).max(), 0.5)  # already in [0, 1]: unchanged


# %%
#| export
def plot_matches(image, # `(3, H, W)` tensor or `(H, W[, 3])` array (rescaled to [0, 1] when outside it)
                 pred, # `(K, 2)` predicted `(x, y)`
                 gt, # `(N, 2)` ground-truth `(x, y)`
                 pairs, # `(T, 2)` matched (prediction index, head index) pairs, e.g. from `match_points`
                 title:str|None=None, # axes title, e.g. the precision, recall and F1 of the matching
                 ax=None, # matplotlib axes (a new figure if None)
                 markersize:float=4., # marker size
                ):
    "Predictions and heads over `image`, coloured TP (green), FP (red ×) and FN (yellow ○); returns the axes."
    import matplotlib.pyplot as plt
    if ax is None: _, ax = plt.subplots(figsize=(5, 4), dpi=72)
    pred, gt = to_numpy(pred).reshape(-1, 2), to_numpy(gt).reshape(-1, 2)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    is_tp = np.zeros(len(pred), bool); is_tp[pairs[:, 0]] = True
    found = np.zeros(len(gt), bool); found[pairs[:, 1]] = True
    ax.imshow(_image_array(image), cmap='gray')
    ax.plot(*pred[is_tp].T, 'o', color='lime', ms=markersize, ls='none', label=f'TP {is_tp.sum()}')
    ax.plot(*pred[~is_tp].T, 'x', color='red', ms=markersize + 1, ls='none', label=f'FP {(~is_tp).sum()}')
    ax.plot(*gt[~found].T, 'o', mfc='none', mec='yellow', ms=markersize + 2, ls='none',
            label=f'FN {(~found).sum()}')
    if title: ax.set_title(title, fontsize=9)
    ax.legend(loc='lower right', fontsize=7, framealpha=0.7)
    ax.set_axis_off()
    return ax


# %% [markdown]
# A synthetic example: 25 heads on a grid, predictions 2 px to the right of the first 20 of them (each
# matched to its head) and 4 spurious points: 20 true positives, 4 false positives, 5 missed heads, so
# precision 20/24, recall 20/25 and F1 40/49.

# %%
heads = np.stack(np.meshgrid(np.arange(20, 120, 20), np.arange(20, 120, 20)), -1).reshape(-1, 2).astype(float)
spurious = np.array([[10., 125.], [125., 10.], [70., 5.], [5., 70.]])
guess = np.concatenate([heads[:20] + [2., 0.], spurious])
yy, xx = np.mgrid[0:130, 0:130]
backdrop = np.exp(-((xx[..., None] - heads[:, 0])**2 + (yy[..., None] - heads[:, 1])**2) / 40).sum(-1)
ax = plot_matches(backdrop, guess, heads, [(k, k) for k in range(20)],
                  title=f'P {20 / 24:.2f}  R {20 / 25:.2f}  F1 {40 / 49:.2f}')
test_eq([l.get_label() for l in ax.lines], ['TP 20', 'FP 4', 'FN 5'])
test_eq(ax.lines[1].get_xydata(), spurious); test_eq(ax.lines[2].get_xydata(), heads[20:])
test_eq(ax.get_title(), 'P 0.83  R 0.80  F1 0.82')


# %% [markdown]
# ## A prediction over its image
#
# `plot_prediction` shows one image with its density map overlaid (left) and with the located points (right):
# what `uotcrowd predict` writes for each image.

# %%
#| export
def plot_prediction(image:torch.Tensor, # normalized `(3, H, W)` image
                    density:torch.Tensor, # `(1, 1, h, w)` or `(h, w)` density
                    points:torch.Tensor|None=None, # `(K, 2)` located points
                    gt_points:torch.Tensor|None=None, # `(N, 2)` annotations, if known
                    title:str='', # figure title
                    path:str|Path|None=None, # write a PNG here
                    dpi:int=80 # resolution
                   ) -> Figure:
    "Image with the density heat-map overlaid (left) and with the located points (right); returns the figure."
    rgb = denormalize(image); H, W = rgb.shape[:2]
    dens = density.detach().float().cpu().reshape(density.shape[-2:]).numpy()
    fig = Figure(figsize=(8, 4 * H / max(W, 1) + 0.5)); FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(rgb); ax1.imshow(dens, cmap='jet', alpha=0.5, extent=(0, W, H, 0), interpolation='bilinear')
    ax1.set_title(f'density map, count {dens.sum():.1f}', fontsize=9)
    plot_points(rgb, pred_points=points, gt_points=gt_points, ax=ax2, size=12,
                title=f'{0 if points is None else len(points)} located points', legend=gt_points is not None)
    ax2.title.set_fontsize(9)
    for ax in (ax1, ax2): ax.set_xlim(0, W); ax.set_ylim(H, 0); ax.axis('off')
    if title: fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=dpi)
    return fig


# %%
_img = torch.zeros(3, 32, 48); _dens = torch.zeros(1, 1, 4, 6); _dens[0, 0, 1, 2] = 2.5
with tempfile.TemporaryDirectory() as d:
    fig = plot_prediction(_img, _dens, torch.tensor([[20., 12.]]), title='one', path=Path(d) / 'p.png')
    assert (Path(d) / 'p.png').stat().st_size > 0
test_eq([ax.get_title() for ax in fig.axes], ['density map, count 2.5', '1 located points'])


# %% [markdown]
# ## Colours of a density map
#
# Pictures drawn without a figure (`uotcrowd.counter.render_result`: a heat map blended into a photo with PIL)
# take their colours from a matplotlib colour map, as a table of 256 RGB colours from its low end to its high
# end.

# %%
#| export
def colour_table(cmap:str='jet' # a matplotlib colour map
                ) -> np.ndarray: # `(256, 3)` uint8 RGB, from the map's low end to its high end
    "The colours of a matplotlib colour map as a lookup table for images."
    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


# %%
grey = colour_table('gray')
test_eq((grey.shape, grey.dtype), ((256, 3), np.uint8))
test_eq(grey[[0, 255]].tolist(), [[0, 0, 0], [255, 255, 255]])
test_eq(colour_table('jet')[-1].tolist(), [127, 0, 0])    # jet ends in dark red: (0.5, 0, 0)


# %% [markdown]
# ## Examples of a model
#
# `plot_examples` shows a model's predictions on a few images, a row each: the image with its annotated
# (green) and located (red) heads, and the density map with its count (the `examples.png` of `uotcrowd demo`,
# whose predictions `uotcrowd.commands.example_predictions` computes).

# %%
#| export
def plot_examples(examples:Sequence[dict], # per image: `name`, `image`, `gt_points`, `density`, `points`
                  path:str|Path|None=None, # write a PNG here
                  dpi:int=70 # resolution
                 ) -> Figure:
    "A row per image: the image with annotated and located heads, and the predicted density map."
    fig = Figure(figsize=(6, 3 * len(examples))); FigureCanvasAgg(fig)
    axes = fig.subplots(len(examples), 2, squeeze=False)
    for row, ex in zip(axes, examples):
        gt, pts = to_numpy(ex['gt_points']).reshape(-1, 2), to_numpy(ex['points']).reshape(-1, 2)
        density = to_numpy(ex['density'], np.float32)
        density = density.reshape(density.shape[-2:])
        row[0].imshow(denormalize(ex['image']))
        if len(gt): row[0].scatter(*gt.T, s=16, facecolors='none', edgecolors='lime', linewidths=1)
        if len(pts): row[0].scatter(*pts.T, s=5, c='red')
        row[0].set_title(f"{ex['name']}: {len(gt)} annotated (green), {len(pts)} located (red)", fontsize=7)
        row[1].imshow(density, cmap='jet')
        row[1].set_title(f"density: count {density.sum():.1f}", fontsize=7)
        for ax in row: ax.axis('off')
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=dpi)
    return fig


# %%
_dens = torch.zeros(1, 1, 4, 4); _dens[0, 0, 1, 1] = 1.5
_ex = [{'name': 'im0', 'image': torch.zeros(3, 16, 16), 'gt_points': torch.tensor([[4., 4.]]),
        'density': _dens, 'points': torch.tensor([[5., 5.], [9., 9.]])},
       {'name': 'im1', 'image': torch.zeros(3, 16, 16), 'gt_points': torch.zeros(0, 2),
        'density': _dens[0, 0] * 2, 'points': torch.zeros(0, 2)}]
fig = plot_examples(_ex)
test_eq([ax.get_title() for ax in fig.axes],
        ['im0: 1 annotated (green), 2 located (red)', 'density: count 1.5',
         'im1: 0 annotated (green), 0 located (red)', 'density: count 3.0'])
test_eq(len(fig.axes[0].collections), 2); test_eq(len(fig.axes[2].collections), 0)


# %% [markdown]
# ## Training curves
#
# `plot_curves` is the `curves.png` that training rewrites after every epoch (`uotcrowd.train.fit`): the
# training loss, and the training and validation MAE against the epoch (with a weight average, the raw
# weights' validation MAE too when it was logged).

# %%
#| export
def plot_curves(history:Sequence[dict], # rows of `log.csv`
                path:str|Path|None=None, # write a PNG here
                dpi:int=80 # resolution of the PNG
               ) -> Figure:
    "Training loss and train/validation MAE against the epoch; returns the matplotlib `Figure`."
    fig = Figure(figsize=(8, 3)); FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [h['epoch'] + 1 for h in history]
    ax1.plot(ep, [h['train_loss'] for h in history], marker='.', color='C0')
    ax1.set(xlabel='epoch', ylabel='training loss', title='loss')
    ax2.plot(ep, [h['train_mae'] for h in history], marker='.', color='C0', label='train (crops)')
    val = [(h['epoch'] + 1, h['val_mae']) for h in history if h.get('val_mae') is not None]
    if val: ax2.plot(*zip(*val), marker='o', color='C3', label='validation')
    raw = [(h['epoch'] + 1, h['val_mae_raw']) for h in history if h.get('val_mae_raw') not in (None, '')]
    if raw: ax2.plot(*zip(*raw), marker='.', color='C1', alpha=0.6, label='validation (raw weights)')
    ax2.set(xlabel='epoch', ylabel='MAE', title='count MAE'); ax2.legend()
    for ax in (ax1, ax2): ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=dpi)
    return fig


# %% [markdown]
# Three epochs, validated after the first and the third, the raw weights only after the third:

# %%
_hist = [{'epoch': 0, 'train_loss': 3., 'train_mae': 9., 'val_mae': 8., 'val_mae_raw': ''},
         {'epoch': 1, 'train_loss': 2., 'train_mae': 7., 'val_mae': None},
         {'epoch': 2, 'train_loss': 1., 'train_mae': 5., 'val_mae': 4., 'val_mae_raw': 4.5}]
fig = plot_curves(_hist)
loss_ax, mae_ax = fig.axes
test_eq(loss_ax.lines[0].get_xydata().tolist(), [[1, 3], [2, 2], [3, 1]])
test_eq([l.get_label() for l in mae_ax.lines], ['train (crops)', 'validation', 'validation (raw weights)'])
test_eq(mae_ax.lines[1].get_xydata().tolist(), [[1, 8], [3, 4]])
test_eq(mae_ax.lines[2].get_xydata().tolist(), [[3, 4.5]])


# %% [markdown]
# ## Counts over time
#
# `plot_counts` is the `NAME_counts.png` of a counted video (`uotcrowd.video.predict_video`): the count of
# each counted frame against its time, from zero up, with a dot per frame when there are at most 60.

# %%
#| export
def plot_counts(rows:Sequence[dict], # `{'time_s', 'count', ...}` per counted frame
                path:str|Path|None=None, # write a PNG here
                title:str='', # figure title
                dpi:int=100 # resolution of the PNG
               ) -> Figure:
    "The count over time; returns the matplotlib figure."
    fig = Figure(figsize=(7, 3)); FigureCanvasAgg(fig)
    ax = fig.subplots()
    t, c = [r['time_s'] for r in rows], [r['count'] for r in rows]
    ax.plot(t, c, marker='.' if len(rows) <= 60 else None, lw=1.2)
    ax.set_xlabel('time (s)'); ax.set_ylabel('count'); ax.set_ylim(bottom=0); ax.grid(alpha=0.3)
    if title: ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=dpi)
    return fig


# %%
from PIL import Image

# %%
with tempfile.TemporaryDirectory() as d:
    fig = plot_counts([{'time_s': 0.5 * k, 'count': 10. + k} for k in range(4)], Path(d) / 'c.png', 'clip')
    test_eq(Image.open(Path(d) / 'c.png').size, (700, 300))          # 7×3 inches at 100 dpi
(ax,) = fig.axes
test_eq(ax.lines[0].get_xydata().tolist(), [[0, 10], [0.5, 11], [1, 12], [1.5, 13]])
test_eq((ax.get_ylim()[0], ax.get_title(), ax.lines[0].get_marker()), (0, 'clip', '.'))
test_eq(plot_counts([{'time_s': k, 'count': 1.} for k in range(61)]).axes[0].lines[0].get_marker(), 'None')

# %%
#| hide
import nbdev; nbdev.nbdev_export()
