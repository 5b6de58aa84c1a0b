# %% [markdown]
# # Loss registry
#
# > `get_loss(name)`: every loss of the package by name, with the hyper-parameters the command line exposes for each.

# %%
#| default_exp registry

# %%
#| export
from __future__ import annotations
from typing import Literal
from torch import nn
from uotcrowd.core import check_choice
from uotcrowd.losses import GeneralizedLoss
from uotcrowd.baselines import L2DensityLoss, BayesianLoss, DMCountLoss

# %%
#| hide
import inspect
import torch
from fastcore.test import test_eq, test_fail
from uotcrowd.core import literal_values

# %% [markdown]
# `get_loss(name, **kwargs)` builds a loss by name: `'gl'` (`GeneralizedLoss`, Eq. 1), `'gl-official'`
# (`GeneralizedLoss.official`, the official trainer's objective), `'l2'`, `'bl'`, `'dmcount'` (the
# [baselines](04a_baselines.ipynb)). Every loss accepts `stride=` and returns the batch mean of
# `loss(density, points)`. Training records the name and the keyword arguments in its checkpoints, so a run
# can be rebuilt from them.
#
# `LOSS_ARGS` names, for each loss, the keyword arguments that `uotcrowd train` offers as flags (`--eps`,
# `--sigma`, ...); their types, defaults and help come from the loss's own signature.

# %%
#| export
LOSSES = {'gl': GeneralizedLoss, 'gl-official': GeneralizedLoss.official, 'l2': L2DensityLoss, 'bl': BayesianLoss,
          'dmcount': DMCountLoss}
LOSS_NAMES = tuple(LOSSES)
LossName = Literal['gl', 'gl-official', 'l2', 'bl', 'dmcount']   # the names of `LOSSES`
LOSS_ARGS = {'gl': ('eps', 'tau', 'cost', 'mode', 'tol'), 'gl-official': ('eps', 'tau', 'cost'), 'l2': ('sigma',),
             'bl': ('sigma',), 'dmcount': ('coord_scale',)}


# %%
test_eq(LOSS_NAMES, ('gl', 'gl-official', 'l2', 'bl', 'dmcount'))
test_eq(set(LOSS_ARGS), set(LOSS_NAMES))
test_eq(literal_values(LossName), LOSS_NAMES)   # the hint and the registry name the same losses

# %% [markdown]
# ## Building a loss by name

# %%
#| export
def get_loss(name:LossName, # one of `LOSS_NAMES` (any case)
             **kwargs # passed to the loss constructor (e.g. `stride=8`, `eps=0.01`)
            ) -> nn.Module:
    "Build a loss by name."
    return LOSSES[check_choice(str(name).lower(), LOSSES, 'loss')](**kwargs)


# %%
test_eq(type(get_loss('gl', stride=4, eps=0.02)), GeneralizedLoss)
test_eq(get_loss('GL', stride=4).stride, 4)
test_fail(lambda: get_loss('mse'), contains="loss must be one of gl, gl-official, l2, bl, dmcount, got 'mse'")
Lo = get_loss('gl-official', stride=4, eps=0.02)     # the preset, with the overrides applied
test_eq((type(Lo), Lo.stride, Lo.eps, Lo.transport, Lo.grid_offset), (GeneralizedLoss, 4, 0.02, 'dual', 1.0))
for nm in ['l2', 'bl', 'dmcount']:
    lf = get_loss(nm, stride=8)
    v = lf(torch.rand(2, 1, 8, 8), [torch.rand(3, 2) * 64, torch.zeros(0, 2)])
    assert v.dim() == 0 and torch.isfinite(v)

# %% [markdown]
# ## The class behind a name
#
# The command line reads a loss's flags from its constructor's signature: `loss_class` gives the class, also
# for the official preset, a class method of `GeneralizedLoss`.

# %%
#| export
def loss_class(name:LossName # one of `LOSS_NAMES`
              ) -> type:
    "The class of a loss (`GeneralizedLoss` for its official preset), whose constructor documents its arguments."
    return GeneralizedLoss if name == 'gl-official' else LOSSES[name]


# %%
test_eq(loss_class('gl-official'), GeneralizedLoss)
test_eq(loss_class('bl'), BayesianLoss)
for nm, args in LOSS_ARGS.items():      # every flag is a keyword of the loss it belongs to
    assert set(args) <= set(inspect.signature(loss_class(nm)).parameters), nm

# %%
#| hide
import nbdev
nbdev.nbdev_export()
