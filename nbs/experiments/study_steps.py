"""Steps of the ShanghaiTech B studies after training, shared by their runners (`run_shb_*.sh`).

    python nbs/experiments/study_steps.py threshold RUN CHECKPOINT DATA VAL_SEED VAL_FRACTION
        choose the localization threshold on the validation images (F1 at 8 px) -> RUN/loc_threshold.json
    python nbs/experiments/study_steps.py row RUN CHECKPOINT CSV LOC_CSV ARM SEED PRECISION PROTOCOL [EXTRA...]
        append the test metrics of RUN/eval-test to CSV (and the localization ones to LOC_CSV)
"""
import json, sys
from pathlib import Path

import torch


def threshold(run, checkpoint, data, val_seed, val_fraction):
    from uotcrowd.data import build_datasets
    from uotcrowd.checkpoints import load_model
    from uotcrowd.localize import localize
    from uotcrowd.metrics import localization_prf
    run = Path(run)
    model, _ = load_model(checkpoint)
    _, val_ds, _ = build_datasets('shanghaitech-b', data, 256, model.stride, float(val_fraction), int(val_seed))
    grid = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    preds, gts = {t: [] for t in grid}, []
    with torch.no_grad():
        for i in range(len(val_ds)):
            image, points, _ = val_ds[i]
            density = model(image[None])
            for t in grid: preds[t].append(localize(density, stride=model.stride, threshold=t)[0])
            gts.append(points)
    f1 = {t: localization_prf(preds[t], gts, 8.)['f1'] for t in grid}
    best = max(grid, key=lambda t: (round(f1[t], 6), t))
    (run / 'loc_threshold.json').write_text(json.dumps({'threshold': best, 'val_f1_8': f1}, indent=2))
    print('threshold', best, 'validation F1@8px', f1)


def row(run, checkpoint, csv, loc_csv, arm, seed, precision, protocol, *extra):
    run = Path(run)
    m = json.loads((run / 'eval-test' / 'metrics.json').read_text())
    sel = json.loads((run / 'loc_threshold.json').read_text())
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    minutes = ckpt['train_time_s'] / 60     # training time summed over resumed segments
    out = [arm, seed, ckpt['epoch'], f'{minutes:.1f}', f"{m['mae']:.3f}", f"{m['rmse']:.3f}", f"{m['nae']:.4f}",
           f"{m['f1@4']:.4f}", f"{m['f1@8']:.4f}", str(checkpoint), precision, protocol, *extra]
    loc = [arm, seed, sel['threshold'], f"{sel['val_f1_8'][str(sel['threshold'])]:.4f}"] + \
          [f"{m[f'{k}@{t}']:.4f}" for t in (4, 8) for k in ('precision', 'recall', 'f1')] + [str(checkpoint)]
    with open(loc_csv, 'a') as f: f.write(','.join(map(str, loc)) + '\n')
    with open(csv, 'a') as f: f.write(','.join(map(str, out)) + '\n')
    print('row:', ','.join(map(str, out)))


if __name__ == '__main__':
    {'threshold': threshold, 'row': row}[sys.argv[1]](*sys.argv[2:])
