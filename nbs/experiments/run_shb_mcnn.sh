#!/usr/bin/env bash
# Loss comparison on ShanghaiTech part B: MCNN from scratch, CPU, one torch thread.
# Trains the four losses one after the other with the same seed, crops, schedule and validation hold-out,
# evaluates each best-by-validation checkpoint on the 316 test images and appends a row to the results CSV;
# then picks the localization threshold on the validation images (loc_threshold.json in the run folder).
# With STAGE=loc it instead evaluates the test split again at each run's chosen threshold (results/shb_mcnn_loc.csv).
# Safe to re-run: finished runs are skipped, an interrupted run resumes from its last.pt.
# Usage (from the repo root):  nohup bash nbs/experiments/run_shb_mcnn.sh [SEED ...] > shb_mcnn.log 2>&1 &
#                             STAGE=loc bash nbs/experiments/run_shb_mcnn.sh [SEED ...]
set -euo pipefail
cd "$(dirname "$0")/../.."                     # repo root
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
DATA=../shared/datasets/ShanghaiTech
RES=nbs/experiments/results
OUT=$RES/shb_mcnn
CSV=$RES/shb_mcnn.csv
LOC_CSV=$RES/shb_mcnn_loc.csv
LOSSES=${LOSSES:-"gl l2 bl dmcount"}
EPOCHS=${EPOCHS:-5}
VAL_EPOCH=${VAL_EPOCH:-3}
CROP=${CROP:-256}
BATCH=${BATCH:-4}
LR=${LR:-1e-3}
SEEDS=${*:-0}
STAGE=${STAGE:-train}
mkdir -p "$OUT"
[ -f "$CSV" ] || echo "loss,seed,epochs,train_minutes,mae,rmse,nae,f1_4,f1_8,checkpoint" > "$CSV"
[ -f "$LOC_CSV" ] || echo "loss,seed,loc_threshold,val_f1_8,precision_4,recall_4,f1_4,precision_8,recall_8,f1_8" > "$LOC_CSV"

for seed in $SEEDS; do
  for loss in $LOSSES; do
    run=$OUT/${loss}_s${seed}
    if [ "$STAGE" = loc ]; then :
    elif grep -q "^${loss},${seed}," "$CSV"; then echo "$(date -u +%T) ${loss} seed ${seed}: trained and evaluated, skipped"
    else
      mkdir -p "$run"
      resume=()
      if [ -f "$run/last.pt" ]; then resume=(--resume "$run/last.pt"); fi
      done_epochs=$(python -c "import sys,torch; c=torch.load(sys.argv[1],weights_only=True) if len(sys.argv)>1 else {}; print(int(c.get('epoch',0)))" ${resume[1]:-})
      if [ "$done_epochs" -lt "$EPOCHS" ]; then
        echo "$(date -u +%T) ${loss} seed ${seed}: training from epoch ${done_epochs}"
        t0=$(date +%s)
        # `uotcrowd train` with one change the CLI has no flag for: MCNN's output made non-negative by abs()
        # instead of ReLU (with ReLU every loss drives all outputs negative within ~10 Adam steps and MCNN stops
        # learning); the checkpoint records model_kwargs, so `uotcrowd eval/predict` rebuild the same model.
        python - "$DATA" "$loss" "$seed" "$run" "$CROP" "$BATCH" "$LR" "$EPOCHS" "$VAL_EPOCH" ${resume[1]:-} <<'PY'
import sys
from pathlib import Path
from uotcrowd.cli import make_datasets
from uotcrowd.models import get_model
from uotcrowd.losses import get_loss
from uotcrowd.train import TrainConfig, fit
data, loss, seed, run, crop, batch, lr, epochs, val_epoch = sys.argv[1:10]
resume = sys.argv[10] if len(sys.argv) > 10 else None
model_kwargs = {'out_act': 'abs'}
model = get_model('mcnn', **model_kwargs)
train_ds, val_ds, _ = make_datasets('shanghaitech-b', data, int(crop), model.stride, 0.1, int(seed))
cfg = TrainConfig(out_dir=run, max_epoch=int(epochs), batch_size=int(batch), crop_size=int(crop), lr=float(lr),
                  val_epoch=int(val_epoch), seed=int(seed), device='cpu', resume=resume, model='mcnn',
                  model_kwargs=model_kwargs, loss=loss, dataset='shanghaitech-b', data_dir=str(Path(data).resolve()),
                  data_kwargs={'val_fraction': 0.1})
print(f"training mcnn (out_act=abs) with the {loss} loss: {len(train_ds)} training and {len(val_ds)} validation "
      f"images, lr {cfg.lr:g}, crop {crop}, batch {batch}, {epochs} epochs, output in {run}", flush=True)
res = fit(model, get_loss(loss, stride=model.stride), train_ds, val_ds, cfg)
print(f"done: best validation MAE {res['best_mae']:.3f} at epoch {res['best_epoch'] + 1}", flush=True)
PY
        echo $(( $(date +%s) - t0 )) >> "$run/wall_s.txt"   # one line per (possibly resumed) training segment
      fi
      echo "$(date -u +%T) ${loss} seed ${seed}: evaluating $run/best.pt on the test split"
      t0=$(date +%s)
      uotcrowd eval --checkpoint "$run/best.pt" --dataset shanghaitech-b --data-dir "$DATA" --quiet --out "$run/eval-test"
      echo $(( $(date +%s) - t0 )) > "$run/eval_s.txt"
      python - "$run" "$loss" "$seed" "$CSV" <<'PY'
import json, sys, torch
from pathlib import Path
run, loss, seed, csv = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
m = json.loads((run / 'eval-test' / 'metrics.json').read_text())
ckpt = torch.load(run / 'last.pt', weights_only=True)
minutes = sum(float(s) for s in (run / 'wall_s.txt').read_text().split()) / 60
row = [loss, seed, ckpt['epoch'], f'{minutes:.1f}', f"{m['mae']:.3f}", f"{m['rmse']:.3f}", f"{m['nae']:.4f}",
       f"{m['f1@4']:.4f}", f"{m['f1@8']:.4f}", str(run / 'best.pt')]
with open(csv, 'a') as f: f.write(','.join(map(str, row)) + '\n')
print('row:', ','.join(map(str, row)))
PY
    fi
    # localization threshold chosen on the validation images (F1 at 8 px), then the test split at that threshold
    if [ "$STAGE" != loc ]; then
      if [ ! -f "$run/loc_threshold.json" ]; then
        echo "$(date -u +%T) ${loss} seed ${seed}: choosing the localization threshold on the validation images"
        python - "$run" "$DATA" "$seed" <<'PY'
import json, sys, torch
from pathlib import Path
from uotcrowd.cli import make_datasets
from uotcrowd.train import load_model
from uotcrowd.localize import localize
from uotcrowd.metrics import localization_prf
run, data, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model, _ = load_model(run / 'best.pt')
_, val_ds, _ = make_datasets('shanghaitech-b', data, 256, model.stride, 0.1, seed)
grid = [0.002, 0.005, 0.01, 0.02, 0.05]
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
PY
      fi
      continue
    fi
    if grep -q "^${loss},${seed}," "$LOC_CSV"; then continue; fi
    if [ ! -f "$run/loc_threshold.json" ]; then echo "${loss} seed ${seed}: no loc_threshold.json yet, skipped"; continue; fi
    thr=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['threshold'])" "$run/loc_threshold.json")
    echo "$(date -u +%T) ${loss} seed ${seed}: localization threshold ${thr} (validation); evaluating the test split with it"
    uotcrowd eval --checkpoint "$run/best.pt" --dataset shanghaitech-b --data-dir "$DATA" --quiet --loc-threshold "$thr" \
      --out "$run/eval-test-loc"
    python - "$run" "$loss" "$seed" "$LOC_CSV" <<'PY'
import json, sys
from pathlib import Path
run, loss, seed, csv = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
m = json.loads((run / 'eval-test-loc' / 'metrics.json').read_text())
sel = json.loads((run / 'loc_threshold.json').read_text())
row = [loss, seed, sel['threshold'], f"{sel['val_f1_8'][str(sel['threshold'])]:.4f}"] + \
      [f"{m[f'{k}@{t}']:.4f}" for t in (4, 8) for k in ('precision', 'recall', 'f1')]
with open(csv, 'a') as f: f.write(','.join(map(str, row)) + '\n')
print('localization row:', ','.join(map(str, row)))
PY
  done
done
echo "$(date -u +%T) all done"
