# %% [markdown]
# # Evaluation
#
# > `evaluate`: count metrics and localization precision, recall and F1 of a model on a dataset; `evaluate_checkpoint`: the same from a checkpoint file, as `uotcrowd eval` runs it.

# %%
#| default_exp evaluate

# %%
#| export
from __future__ import annotations
import json, sys
from pathlib import Path
from typing import Literal, Sequence
import torch
from torch import nn
from torch.utils.data import Dataset
from uotcrowd.core import get_device, reuse_host_memory, check_choice, HostMemory
from uotcrowd.data import build_datasets, synthetic_kwargs, DatasetName
from uotcrowd.checkpoints import load_model, checkpoint_precision, checkpoint_loc_threshold
from uotcrowd.train import validate, write_csv
from uotcrowd.precision import resolve_precision, Precision
from uotcrowd.localize import localize
from uotcrowd.metrics import localization_prf

# %%
#| hide
import contextlib, io, math, tempfile
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# ## Counting and localization
#
# `evaluate` is training's `validate` (count MAE, RMSE and NAE over full images, one image at a time, in the
# given precision, sharded across DDP ranks) plus, with `thresholds`, localization: each density map is turned
# into points (`uotcrowd.localize.localize` with density threshold `loc_threshold`) and matched to the
# annotations within each distance in pixels (`uotcrowd.metrics.localization_prf`), giving micro-averaged
# precision, recall and F1 per distance. Images whose count is unknown get predictions but no metrics. The
# per-image rows (name, counts, error and, with localization, the number of located points) are under
# `'per_image'` and, with `csv_path`, written as a CSV file.

# %%
#| export
@torch.no_grad()
def evaluate(model:nn.Module, # density model (its `stride` attribute is used for localization)
             ds:Dataset, # dataset of full `(image, points, meta)` items
             device:str|torch.device|None=None, # default: the model's device
             thresholds:Sequence[float]|None=None, # localization distances in px, e.g. (4, 8); None: counts only
             loc_threshold:float=0.05, # density threshold of `localize`
             csv_path:str|Path|None=None, # write the per-image CSV here
             precision:Precision='fp32', # one of `uotcrowd.precision.PRECISIONS` ('auto': bf16 where native)
             quiet:bool=True, # no progress bar
             rank:int=0, world:int=1, # shard the images across DDP ranks; results are gathered on every rank
            ) -> dict:
    "Count metrics (MAE, RMSE, NAE) over full images, optionally localization P/R/F1; rows under `'per_image'`."
    stride = getattr(model, 'stride', 8)
    def locate(row, density, points):
        row['pred_points'] = localize(density, stride=stride, threshold=loc_threshold)[0].cpu()
        known = row['gt_count'] is not None and len(points) == row['gt_count']
        row['gt_points'] = points.reshape(-1, 2).float().cpu() if known else None
    out = validate(model, ds, device, precision, quiet, rank, world, each=locate if thresholds else None)
    rows = out.pop('per_image')
    if thresholds:
        pairs = [(r['pred_points'], r.pop('gt_points')) for r in rows]
        pairs = [(p, g) for p, g in pairs if g is not None]
        for r in rows: r['pred_points'] = len(r['pred_points'])
        for t in thresholds if pairs else ():
            prf = localization_prf([p for p, _ in pairs], [g for _, g in pairs], t)
            for k in ('precision', 'recall', 'f1'): out[f'{k}@{t:g}'] = float(prf[k])
    out['per_image'] = rows
    if csv_path is not None and rank == 0:
        write_csv(rows, csv_path,
                  ['name', 'gt_count', 'pred_count', 'abs_err'] + (['pred_points'] if thresholds else []))
    return out

# %% [markdown]
# A check with known answers: a stride-1 "model" that returns the first image channel divided by 4, on images
# whose only bright pixels (value 4) are the annotated heads, plus one unannotated bright pixel in the first
# image. Every head is located on its pixel centre, so at 4 px there are 3 true positives, 1 false positive
# and no miss: precision 3/4, recall 1, F1 6/7; the counts are 3 for 2 and 1 for 1, MAE 1/2.

# %%
class Spots(Dataset):
    "Two 16×16 images: bright pixels at the heads (and one without a head in the first image)."
    def __init__(self):
        self.items = []
        for heads, extra in [([(3, 4), (12, 10)], [(8, 13)]), ([(5, 5)], [])]:
            img = torch.zeros(3, 16, 16)
            for x, y in heads + extra: img[:, y, x] = 4.
            pts = torch.tensor([[x + .5, y + .5] for x, y in heads])
            self.items.append((img, pts, {'name': f'spots{len(self.items)}', 'count': len(heads)}))
    def __len__(self): return len(self.items)
    def __getitem__(self, i): return self.items[i]

class FirstChannel(nn.Module):
    stride = 1
    def forward(self, x): return x[:, :1] / 4

with tempfile.TemporaryDirectory() as d:
    res = evaluate(FirstChannel(), Spots(), 'cpu', thresholds=(4, 8), loc_threshold=0.5,
                   csv_path=Path(d) / 'rows.csv')
    test_eq(Path(d, 'rows.csv').read_text().splitlines(), ['name,gt_count,pred_count,abs_err,pred_points',
                                                          'spots0,2,3.0,1.0,3', 'spots1,1,1.0,0.0,1'])
test_close(res['mae'], 0.5)
test_eq(res['n'], 2)
for t in (4, 8): test_close((res[f'precision@{t}'], res[f'recall@{t}'], res[f'f1@{t}']), (3 / 4, 1., 6 / 7))
test_eq(list(res)[-1], 'per_image')
test_eq(set(evaluate(FirstChannel(), Spots(), 'cpu')), {'n', 'mae', 'rmse', 'nae', 'per_image'})

# %% [markdown]
# ## A checkpoint on a dataset split
#
# `evaluate_checkpoint` rebuilds the model from a checkpoint written by training and evaluates it on the test
# split (or `split='val'`: the validation images held out of the training split with the seed of the run). The
# dataset, its folder and options default to those the model was trained on, the precision to the one it was
# trained in, and the localization threshold to the one stored in the checkpoint (chosen on validation
# images), else 0.05. It writes `metrics.json` and `per_image.csv` to `out` (default:
# `CHECKPOINT_DIR/eval-SPLIT`), never over earlier results unless `overwrite`, and prints the metrics
# (`format_metrics`).

# %%
#| export
def format_metrics(m:dict # metrics of `evaluate`, with `dataset`, `split` and `precision` when known
                  ) -> str:
    "One line per metric group, e.g. `MAE 1.23  RMSE 2.34  NAE 0.05` and `F1@4px 0.61 (P 0.6, R 0.62)`."
    lines = [f"{m.get('dataset', '')} {m.get('split', '')} ({m.get('n', '?')} images"
             f"{', ' + m['precision'] if m.get('precision') else ''}):".strip()]
    if 'mae' in m: lines.append(f"  MAE {m['mae']:.3f}  RMSE {m['rmse']:.3f}  NAE {m['nae']:.4f}")
    else: lines.append('  no ground-truth counts: predictions only')
    for k in sorted((k for k in m if k.startswith('f1@')), key=lambda k: float(k[3:])):
        t = k[3:]
        lines.append(f"  F1@{t}px {m[k]:.3f}  "
                     f"(precision {m['precision@' + t]:.3f}, recall {m['recall@' + t]:.3f})")
    return '\n'.join(lines)


# %%
m = {'dataset': 'synthetic', 'split': 'test', 'n': 4, 'mae': 1.5, 'rmse': 2., 'nae': 0.1,
     'f1@8': 0.5, 'precision@8': 0.4, 'recall@8': 2/3, 'f1@4': 0.25, 'precision@4': 0.2, 'recall@4': 1/3}
lines = format_metrics(m).split('\n')
test_eq(lines[1], '  MAE 1.500  RMSE 2.000  NAE 0.1000')
assert lines[2].startswith('  F1@4px 0.250') and lines[3].startswith('  F1@8px 0.500')  # sorted numerically

# %% [markdown]
# `evaluate_checkpoint` reads the run's settings from the checkpoint and evaluates it; its check, on the
# checkpoint of a short run, follows below.

# %%
#| export
EvalSplit = Literal['test', 'val']   # the test split, or the validation images held out of training


# %%
#| export
def evaluate_checkpoint(checkpoint:str, # checkpoint written by `uotcrowd train` (best.pt)
                        dataset:DatasetName|None=None, # dataset name (default: the one recorded in the checkpoint)
                        data_dir:str|None=None, # dataset root folder (not needed for synthetic)
                        synthetic_n:int|None=None, # synthetic: number of training images (validation and test get a quarter each)
                        synthetic_size:int|None=None, # synthetic: image side in pixels
                        split:EvalSplit='test', # which split to evaluate: 'test' or 'val'
                        out:str|None=None, # output folder (default: CHECKPOINT_DIR/eval-SPLIT)
                        overwrite:bool=False, # replace the results already in the output folder
                        thresholds:Sequence[float]=(4., 8.), # localization distances in px (none: skip)
                        loc_threshold:float|None=None, # density threshold of the localization (default: the checkpoint's, chosen on validation, else 0.05)
                        precision:Precision|None=None, # 'auto', 'fp32', 'bf16' or 'fp16' (default: the precision the checkpoint was trained in)
                        device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
                        host_memory:HostMemory='reuse', # 'reuse': freed host memory stays for the next image (glibc); 'release'
                        quiet:bool=False, # no progress bars
                       ) -> dict: # the metrics, without the per-image rows
    "Evaluate a checkpoint on a split of its dataset; writes `metrics.json` and `per_image.csv`."
    check_choice(split, EvalSplit, 'split')
    device = get_device(device)
    model, ckpt = load_model(checkpoint, device)
    cfg = ckpt.get('config', {})
    dataset = dataset or cfg.get('dataset')
    if dataset is None: raise ValueError("the checkpoint does not record its dataset; pass --dataset")
    same = dataset == cfg.get('dataset')
    data_dir = data_dir or (cfg.get('data_dir') if same else None)
    data_kw = {**(cfg.get('data_kwargs', {}) if same else {}),
               **synthetic_kwargs(synthetic_n, synthetic_size)}
    val_fraction = data_kw.pop('val_fraction', 0.1)
    _, val_ds, test_ds = build_datasets(dataset, data_dir, cfg.get('crop_size', 512), int(model.stride),
                                        val_fraction, cfg.get('seed', 0), **data_kw)
    out = Path(out or Path(checkpoint).parent / f'eval-{split}')
    kept = [f for f in ('metrics.json', 'per_image.csv') if (out / f).exists()]
    if kept and not overwrite:
        raise FileExistsError(f"{out} already holds {' and '.join(kept)}: choose another --out, or pass "
                              "--overwrite to replace them")
    precision = resolve_precision(precision or checkpoint_precision(ckpt), device)
    loc_threshold = checkpoint_loc_threshold(ckpt) if loc_threshold is None else loc_threshold
    with reuse_host_memory(host_memory):
        res = evaluate(model, test_ds if split == 'test' else val_ds, device,
                       thresholds=tuple(thresholds) or None, loc_threshold=loc_threshold, precision=precision,
                       csv_path=out / 'per_image.csv', quiet=quiet or not sys.stderr.isatty())
    metrics = {k: v for k, v in res.items() if k != 'per_image'}
    metrics.update(checkpoint=str(checkpoint), dataset=dataset, split=split, model=ckpt.get('model_name'),
                   precision=precision, loc_threshold=loc_threshold)
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    print(format_metrics(metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'per_image.csv'}")
    return metrics

# %% [markdown]
# A checkpoint of a short run on synthetic crowds, evaluated from the file alone:

# %%
from uotcrowd.core import seed_everything
from uotcrowd.models import get_model
from uotcrowd.registry import get_loss
from uotcrowd.config import TrainConfig
from uotcrowd.train import fit

# %%
tmp = Path(tempfile.mkdtemp())
data_kw = synthetic_kwargs(16, 48)
train_ds, val_ds, _ = build_datasets('synthetic', crop_size=32, stride=4, **data_kw)
seed_everything(0)
net = get_model('mcnn')
cfg = TrainConfig(out_dir=tmp / 'run', max_epoch=1, batch_size=4, crop_size=32, lr=1e-3, quiet=True,
                  precision='fp32', model='mcnn', loss='gl', dataset='synthetic', data_kwargs=data_kw)
fit(net, get_loss('gl', stride=4), train_ds, val_ds, cfg)
with contextlib.redirect_stdout(io.StringIO()) as printed:
    metrics = evaluate_checkpoint(tmp / 'run' / 'best.pt', quiet=True)
test_eq((metrics['n'], metrics['split'], metrics['precision'], metrics['loc_threshold']),
        (4, 'test', 'fp32', 0.05))
assert printed.getvalue().startswith('synthetic test (4 images, fp32):') and {'f1@4', 'f1@8'} <= set(metrics)
test_fail(lambda: evaluate_checkpoint(tmp / 'run' / 'best.pt', quiet=True), contains='--overwrite')
with contextlib.redirect_stdout(io.StringIO()):        # the run's own validation images, counts only
    val = evaluate_checkpoint(tmp / 'run' / 'best.pt', split='val', thresholds=(), quiet=True)
test_close(val['mae'], torch.load(tmp / 'run' / 'best.pt', weights_only=True)['best_mae'], eps=1e-5)

# %%
#| hide
import nbdev
nbdev.nbdev_export()
