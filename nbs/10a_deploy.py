# %% [markdown]
# # ONNX export
#
# > `uotcrowd export`: a trained density network as an ONNX graph that takes images of any size, with its model card in the metadata, and `OnnxDensity` to run it with onnxruntime.

# %%
#| default_exp deploy

# %%
#| export
from __future__ import annotations
import copy, inspect, json, warnings
from pathlib import Path
from typing import Literal
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from uotcrowd import __version__
from uotcrowd.core import check_choice
from uotcrowd.images import normalize, IMAGENET_MEAN, IMAGENET_STD
from uotcrowd.models import _OUT_ACTS
from uotcrowd.checkpoints import (resolve_checkpoint, load_model, checkpoint_precision,
                                  checkpoint_loc_threshold)

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.models import get_model

# %% [markdown]
# People who deploy a counter often run it outside Python's PyTorch: in a C++ or C# service, on a phone, in a
# browser. ONNX is the common format; onnxruntime runs it on most platforms. The `onnx` extra
# (`pip install -e ".[onnx]"`, also in `dev`) installs `onnx` (to write the file) and `onnxruntime` (to run it).
#
# ```sh
# uotcrowd export --checkpoint shb-mcnn-gl --format onnx              # writes shb-mcnn-gl.onnx
# uotcrowd predict --checkpoint shb-mcnn-gl.onnx photo.jpg --out counts   # counted by onnxruntime
# uotcrowd serve --checkpoint shb-mcnn-gl.onnx
# ```
#
# The graph has one input, `image`: a float32 batch `(B, 3, H, W)` of RGB images scaled to [0, 1] and normalized
# with the ImageNet mean and standard deviation (the card's `input` entry says so), any `B`, `H` and `W`; and one
# output, `density`: `(B, 1, ceil(H/s), ceil(W/s))` people per density pixel, `s` the model's stride. The count is
# the sum of the map. The file's metadata (`metadata_props`, shown by Netron or `onnx.load(path).metadata_props`)
# holds, JSON-encoded under keys `uotcrowd.*`: the stride and size multiple, the input normalization, the
# localization threshold chosen on validation, the precision the model was trained in (the graph computes in
# float32) and the full model card.

# %% [markdown]
# ## A forward pass that traces with any image size
#
# A `DensityModel` pads its input to a multiple of its size multiple, runs `density_head`, crops the map to
# `ceil(H/stride)` rows and makes it non-negative. `forward` computes the padding in Python integers, which a trace
# records as constants. `TraceableDensity` is the same forward written as arithmetic on the input's shape, which
# the exporter's trace keeps: the exported graph pads and crops each input by its own size. In eager mode it equals
# the model's forward.
#
# The exporter is torch's TorchScript-based one (`dynamo=False`): the `torch.export` one needs several minutes for
# EfficientNet-Lite0 on a 2-core CPU (its TensorFlow-style padding gives many symbolic shapes) and specializes the
# padding on the example's size. Within the backbone, the TensorFlow-style padding of a stride-2 convolution
# depends only on whether its input side is even, which the padding to a multiple of 32 fixes for every size; so
# a trace at one size holds for all. `export_onnx` checks this: the graph is run by onnxruntime on two sizes other
# than the example's and compared with PyTorch.

# %%
#| export
class TraceableDensity(nn.Module):
    """`model`'s forward (pad to the size multiple, density head, crop, non-negative) as arithmetic on the
    input's shape, which a trace keeps."""
    def __init__(self, model:nn.Module # a `DensityModel`: `stride`, `multiple`, `density_head`, `out_act`
                ):
        super().__init__()
        missing = [a for a in ('stride', 'multiple', 'density_head', 'out_act') if not hasattr(model, a)]
        if missing:
            raise ValueError(f"{type(model).__name__} is not a DensityModel (no {', '.join(missing)})")
        self.model = model

    def forward(self, image:torch.Tensor # normalized `(B, 3, H, W)`
               ) -> torch.Tensor: # `(B, 1, ceil(H/stride), ceil(W/stride))`
        H, W = image.shape[-2:]                 # tensors while tracing, integers otherwise
        m, s = self.model.multiple, self.model.stride
        x = F.pad(image, (0, (m - W % m) % m, 0, (m - H % m) % m))
        out = self.model.density_head(x)
        return _OUT_ACTS[self.model.out_act](out[..., :(H + s - 1) // s, :(W + s - 1) // s])


# %%
torch.manual_seed(0)
mcnn = get_model('mcnn').eval()
for size in ((96, 128), (97, 131), (33, 50)):
    x = torch.randn(2, 3, *size)
    with torch.no_grad(): test_eq(TraceableDensity(mcnn)(x), mcnn(x))
# a convolution has a stride, nothing else
test_fail(lambda: TraceableDensity(nn.Conv2d(3, 1, 3)),
          contains='Conv2d is not a DensityModel (no multiple, density_head, out_act)')

# %% [markdown]
# ## Writing the file
#
# `export_onnx` writes any `DensityModel`: it traces a copy of the model on the CPU in evaluation mode (the
# model passed in is left as it was) with an example whose sides are not multiples of the stride, marks the batch,
# height and width dynamic, adds the metadata, checks the graph with `onnx.checker`, and compares onnxruntime's
# density with PyTorch's (`compare_onnx`) on two other sizes, refusing (and removing) a file whose maps differ by
# more than `rtol` of the map's maximum; the comparison is kept in the metadata (`uotcrowd.check`).

# %%
#| export
INPUT_SPEC = {'name': 'image', 'shape': ['batch', 3, 'height', 'width'], 'dtype': 'float32',
              'channels': 'RGB', 'scale': 1 / 255, 'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD)}

# %%
#| export
CHECK_SIZES = ((240, 320), (301, 457))    # (H, W) of the comparison with PyTorch: neither is the example's


# %%
#| export
def _onnx_modules():
    try:
        import onnx, onnxruntime
        return onnx, onnxruntime
    except ImportError as e:
        raise ImportError(f"ONNX export and inference need the onnx extra: pip install -e \".[onnx]\" "
                          f"(or uotcrowd[onnx]); {e}") from None


# %%
test_eq([m.__name__ for m in _onnx_modules()], ['onnx', 'onnxruntime'])


# %% [markdown]
# `compare_onnx` runs the file with `OnnxDensity` (below) and PyTorch on the same random photos; it and
# `export_onnx` are tested once `OnnxDensity` is defined.

# %%
#| export
def compare_onnx(model:nn.Module, # the PyTorch density network
                 path:str|Path, # its ONNX export
                 sizes=CHECK_SIZES, # (H, W) of the random photos compared
                 seed:int=0
                 # per size: `size`, `max_rel_diff` (max |difference| / max |PyTorch|), `count_torch`,
                 # `count_onnx`
                ) -> list[dict]:
    "onnxruntime's density against PyTorch's (float32, CPU) on random photos of each size."
    ort_model = OnnxDensity(path)
    model = copy.deepcopy(model).cpu().float().eval()
    g, rows = torch.Generator().manual_seed(seed), []
    for h, w in sizes:
        x = normalize(torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g))
        with torch.no_grad(): ref = model(x)
        got = ort_model(x)
        if got.shape != ref.shape:
            raise ValueError(f"{path}: the ONNX density of a {w}×{h} image is {tuple(got.shape)}, "
                             f"PyTorch's {tuple(ref.shape)}")
        rows.append({'size': [h, w],
                     'max_rel_diff': float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)),
                     'count_torch': float(ref.sum()), 'count_onnx': float(got.sum())})
    return rows


# %%
#| export
def export_onnx(model:nn.Module, # a `DensityModel` (any device, any mode)
                path:str|Path, # the `.onnx` file to write
                # more metadata, each value JSON-encoded under `uotcrowd.KEY` (e.g. `card`)
                metadata:dict|None=None,
                opset:int=17, # ONNX opset
                # (H, W) of the traced example (not multiples of the stride)
                example_size:tuple[int, int]=(100, 132),
                # largest accepted difference from PyTorch, relative to the density map's maximum
                rtol:float=1e-4
               ) -> Path:
    """Write `model` as ONNX (normalized `image` of any batch and size → `density`) with its metadata; checked
    against PyTorch."""
    onnx, _ = _onnx_modules()
    net = TraceableDensity(copy.deepcopy(model).cpu().float().eval())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, *example_size, generator=torch.Generator().manual_seed(0))
    kw = {'dynamo': False} if 'dynamo' in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():
        # tracer warnings about the shape arithmetic (kept dynamic) and the exporter's deprecation note
        warnings.simplefilter('ignore')
        torch.onnx.export(net, (example,), str(path), input_names=['image'], output_names=['density'],
                          opset_version=opset,
                          dynamic_axes={'image': {0: 'batch', 2: 'height', 3: 'width'},
                                        'density': {0: 'batch', 2: 'density_height', 3: 'density_width'}},
                          do_constant_folding=True, **kw)
    proto = onnx.load(str(path))
    props = {'stride': int(net.model.stride), 'multiple': int(net.model.multiple), 'input': INPUT_SPEC,
             'uotcrowd_version': __version__, 'torch_version': torch.__version__, **(metadata or {})}
    onnx.helper.set_model_props(proto, {f'uotcrowd.{k}': json.dumps(v) for k, v in props.items()})
    proto.doc_string = (f"uotcrowd density network {type(net.model).__name__} (stride {net.model.stride}): "
                        f"image -> density; count = sum")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    rows = compare_onnx(net.model, path)
    worst = max(rows, key=lambda r: r['max_rel_diff'])
    if not worst['max_rel_diff'] <= rtol:
        path.unlink()
        raise ValueError(f"the ONNX export of {type(net.model).__name__} differs from PyTorch by "
                         f"{worst['max_rel_diff']:.1e} of the map's maximum on a "
                         f"{worst['size'][1]}×{worst['size'][0]} image (more than {rtol:g}); "
                         f"nothing was written")
    props['check'] = rows                      # the comparison travels with the file
    onnx.helper.set_model_props(proto, {f'uotcrowd.{k}': json.dumps(v) for k, v in props.items()})
    onnx.save(proto, str(path))
    return path


# %% [markdown]
# ## Running it
#
# `OnnxDensity` is an exported network behind the interface of the PyTorch one: a module that maps a normalized
# batch to its density, with `stride` and `multiple` from the metadata, so `Counter` uses it unchanged (tiles,
# batches, localization). It runs on the CPU with onnxruntime (`threads` intra-op threads; by default as many as
# torch uses); a batch on another device is copied to the CPU and its density copied back. `load_onnx` is what
# `Counter` calls for a `.onnx` file: the network, and a checkpoint-like dict with the card, the localization
# threshold and float32 as the precision.

# %%
#| export
def _decode(props:dict[str, str]) -> dict:
    "The `uotcrowd.*` metadata of an ONNX file, decoded from JSON."
    return {k[len('uotcrowd.'):]: json.loads(v) for k, v in props.items() if k.startswith('uotcrowd.')}


# %%
test_eq(_decode({'uotcrowd.stride': '4', 'uotcrowd.card': '{"name": "a"}', 'producer': 'x'}),
        {'stride': 4, 'card': {'name': 'a'}})


# %%
#| export
class OnnxDensity(nn.Module):
    """An exported density network run by onnxruntime on the CPU, called like the PyTorch one: normalized
    `(B, 3, H, W)` → density."""
    def __init__(self, path:str|Path, # a file written by `export_onnx`
                 threads:int|None=None # intra-op threads (default: `torch.get_num_threads()`)
                ):
        super().__init__()
        _, ort = _onnx_modules()
        self.path = Path(path)
        if not self.path.is_file(): raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads or torch.get_num_threads()), 1
        try: self.session = ort.InferenceSession(str(self.path), opts, providers=['CPUExecutionProvider'])
        except Exception as e: raise ValueError(f"{self.path} is not a readable ONNX model: {e}") from None
        self.metadata = _decode(self.session.get_modelmeta().custom_metadata_map)
        if 'stride' not in self.metadata:
            raise ValueError(f"{self.path} was not written by uotcrowd's export "
                             f"(no uotcrowd.stride metadata)")
        self.stride, self.multiple = int(self.metadata['stride']), int(self.metadata['multiple'])

    def forward(self, x:torch.Tensor # normalized `(B, 3, H, W)`
               ) -> torch.Tensor: # `(B, 1, ceil(H/stride), ceil(W/stride))` float32, on `x`'s device
        out = self.session.run(['density'], {'image': x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str: return f"{self.path.name}, stride {self.stride}"


# %% [markdown]
# A file that is missing or not an ONNX model is refused with its name:

# %%
_d = Path(tempfile.mkdtemp())
(_d / 'notes.onnx').write_text('not a model')
test_fail(lambda: OnnxDensity(_d / 'notes.onnx'), contains='notes.onnx is not a readable ONNX model')
test_fail(lambda: OnnxDensity(_d / 'missing.onnx'), contains='missing.onnx does not exist')


# %%
#| export
def load_onnx(path:str|Path, # a file written by `export_onnx`
              threads:int|None=None # onnxruntime intra-op threads
             ) -> tuple[OnnxDensity, dict]:
    """The network of an ONNX export and a checkpoint-like dict (`card`, `loc_threshold`, `precision`='fp32')
    for `Counter`."""
    model = OnnxDensity(path, threads)
    m = model.metadata
    info = {'card': m.get('card'), 'precision': 'fp32', 'model_name': m.get('model_name'),
            'stride': model.stride}
    if m.get('loc_threshold') is not None: info['loc_threshold'] = float(m['loc_threshold'])
    return model, info


# %% [markdown]
# Random MCNN weights, exported and run: the graph's input and output are dynamic, the metadata is there, and the
# density equals PyTorch's at sizes the trace never saw, for batches of one and three.

# %%
path = export_onnx(mcnn, _d / 'mcnn.onnx', metadata={'card': {'name': 'test'}, 'loc_threshold': 0.07})
ort_mcnn = OnnxDensity(path)
test_eq((ort_mcnn.stride, ort_mcnn.multiple, ort_mcnn.metadata['card'], ort_mcnn.metadata['input']['mean']),
        (4, 4, {'name': 'test'}, list(IMAGENET_MEAN)))
test_eq([i.shape for i in ort_mcnn.session.get_inputs()], [['batch', 3, 'height', 'width']])
for B, h, w in ((1, 64, 64), (3, 77, 203), (1, 430, 251)):
    x = torch.randn(B, 3, h, w)
    with torch.no_grad(): ref = mcnn(x)
    got = ort_mcnn(x)
    test_eq(got.shape, (B, 1, -(-h // 4), -(-w // 4)))
    test_close(got, ref, eps=1e-4 * float(ref.abs().max()))

# %% [markdown]
# The comparison `export_onnx` made is in the file, and `compare_onnx` repeats it:

# %%
rows = compare_onnx(mcnn, path)
test_eq([r['size'] for r in rows], [list(s) for s in CHECK_SIZES])
assert all(r['max_rel_diff'] < 1e-5 for r in rows), rows
test_eq([r['size'] for r in ort_mcnn.metadata['check']], [list(s) for s in CHECK_SIZES])

# %% [markdown]
# `load_onnx` gives `Counter` the card and the threshold:

# %%
net, info = load_onnx(path)
test_eq((info['card'], info['loc_threshold'], info['precision']), ({'name': 'test'}, 0.07, 'fp32'))


# %% [markdown]
# ## `uotcrowd export`
#
# `export` is the command: it loads a checkpoint or named model, writes `NAME.onnx` (or `--out`) with the model
# card, the threshold and the training precision in the metadata, and reports how close onnxruntime's density is to
# PyTorch's. It never overwrites a file unless told (`--force`).

# %%
#| export
ExportFormat = Literal['onnx']   # the formats `export` writes


# %%
#| export
def export(checkpoint:str, # checkpoint file or named model (`uotcrowd models`)
           format:ExportFormat='onnx', # what to write (ONNX)
           out:str|None=None, # the file to write (default: NAME.onnx in the current folder)
           opset:int=17, # ONNX opset
           force:bool=False, # overwrite an existing file
           quiet:bool=False # print nothing
          ) -> Path: # the file written
    ("Export a trained model for deployment: an ONNX graph for any image size, its card in the metadata, "
     "checked against PyTorch.")
    check_choice(format, ExportFormat, 'format')
    src = resolve_checkpoint(checkpoint)
    model, ckpt = load_model(src, 'cpu')
    card = ckpt.get('card')
    name = (card or {}).get('name') or src.stem
    dst = Path(out or f'{name}.onnx')
    if dst.exists() and not force: raise FileExistsError(f"{dst} exists: pass --force to overwrite it")
    metadata = {'name': name, 'model_name': ckpt.get('model_name') or ckpt.get('config', {}).get('model'),
                'model_kwargs': dict(ckpt.get('model_kwargs', {})),
                'trained_precision': checkpoint_precision(ckpt),
                'loc_threshold': checkpoint_loc_threshold(ckpt), 'card': card, 'source': src.name}
    export_onnx(model, dst, metadata, opset)
    if not quiet:
        rows = OnnxDensity(dst).metadata['check']
        worst = max(r['max_rel_diff'] for r in rows)
        print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MB): {name}, {metadata['model_name']}, "
              f"stride {model.stride}, any image size; "
              f"onnxruntime's density equals PyTorch's (float32) within {worst:.1e} of the map's maximum on "
              + ' and '.join(f"{w}×{h}" for h, w in (r['size'] for r in rows)) + ' images')
    return dst


# %% [markdown]
# The committed model, exported: its card is in the file.

# %%
with tempfile.TemporaryDirectory() as d:
    path = export('shb-mcnn-gl', out=str(Path(d) / 'shb.onnx'), quiet=True)
    meta = OnnxDensity(path).metadata
    ck = load_model(resolve_checkpoint('shb-mcnn-gl'))[1]
    test_eq((meta['card'], meta['loc_threshold'], meta['trained_precision'], meta['model_name']),
            (ck['card'], ck['loc_threshold'], ck['precision'], 'mcnn'))
    test_fail(lambda: export('shb-mcnn-gl', out=str(path)), contains='exists: pass --force')
    test_fail(lambda: export('shb-mcnn-gl', format='tflite'),
              contains="format must be one of onnx, got 'tflite'")

# %%
#| hide
import nbdev
nbdev.nbdev_export()
