# %% [markdown]
# # Plots
#
# > Figures shared by the notebooks and the command line: a prediction over its image (density overlay and located heads) and a grid of example predictions.

# %%
#| default_exp plots

# %%
#| export
from __future__ import annotations
from pathlib import Path
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from matplotlib.figure import Figure
from matplotlib.backends.backend_agg import FigureCanvasAgg
from uotcrowd.data import denormalize
from uotcrowd.localize import localize, plot_points

# %%
#| hide
import tempfile
from fastcore.test import test_eq

# %% [markdown]
# Each figure is drawn on an Agg canvas of its own, so it works on headless machines and leaves the global matplotlib
# backend alone; with `path` it is also written as a PNG.
#
# `plot_prediction` shows one image with its density map overlaid (left) and with the located points (right): what
# `uotcrowd predict` writes for each image.

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
# `plot_examples` shows a model on `k` images of a dataset, evenly spaced: the image with its annotated (green) and
# located (red) heads, and the density map with its count (the `examples.png` of `uotcrowd demo`).

# %%
#| export
@torch.no_grad()
def plot_examples(model:nn.Module, # density model with a `stride` attribute
                  ds:Dataset, # full-image `(image, points, meta)` items
                  k:int=3, # number of images (rows)
                  path:str|Path|None=None, # write a PNG here
                  dpi:int=70 # resolution
                 ) -> Figure:
    "A row per image: the image with annotated and located heads, and the predicted density map."
    device = next(model.parameters()).device
    fig = Figure(figsize=(6, 3 * k)); FigureCanvasAgg(fig)
    axes = fig.subplots(k, 2, squeeze=False)
    for row, i in zip(axes, np.linspace(0, len(ds) - 1, k).astype(int)):
        image, gt, meta = ds[int(i)]
        density = model(image.unsqueeze(0).to(device)).float()
        pts = localize(density, stride=model.stride)[0].cpu()
        row[0].imshow(denormalize(image))
        if len(gt): row[0].scatter(*gt.T.numpy(), s=16, facecolors='none', edgecolors='lime', linewidths=1)
        if len(pts): row[0].scatter(*pts.T.numpy(), s=5, c='red')
        row[0].set_title(f"{meta['name']}: {len(gt)} annotated (green), {len(pts)} located (red)", fontsize=7)
        row[1].imshow(density[0, 0].cpu().numpy(), cmap='jet')
        row[1].set_title(f"density: count {density.sum():.1f}", fontsize=7)
        for ax in row: ax.axis('off')
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=dpi)
    return fig

# %%
class _Ones(nn.Module):
    stride = 4
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.ones(()))
    def forward(self, x): return self.w * torch.full((x.shape[0], 1, x.shape[2] // 4, x.shape[3] // 4), 0.01)
_ds = [(torch.zeros(3, 16, 16), torch.tensor([[4., 4.]]), {'name': f'im{i}'}) for i in range(5)]
fig = plot_examples(_Ones(), _ds, k=2)
test_eq([ax.get_title() for ax in fig.axes], ['im0: 1 annotated (green), 0 located (red)', 'density: count 0.2',
                                             'im4: 1 annotated (green), 0 located (red)', 'density: count 0.2'])

# %%
#| hide
import nbdev; nbdev.nbdev_export()
