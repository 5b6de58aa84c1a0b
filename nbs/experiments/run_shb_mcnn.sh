#!/usr/bin/env bash
# Loss comparison on ShanghaiTech part B: MCNN from scratch, CPU, one torch thread.
# Trains the four losses one after the other with the same seed, crops, schedule and validation hold-out,
# evaluates each best-by-validation checkpoint on the 316 test images and appends a row to the results CSV.
# Safe to re-run: finished runs are skipped, an interrupted run resumes from its last.pt.
# Usage (from the repo root):  nohup bash nbs/experiments/run_shb_mcnn.sh [SEED ...] > shb_mcnn.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."                     # repo root
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
DATA=../shared/datasets/ShanghaiTech
RES=nbs/experiments/results
OUT=$RES/shb_mcnn
CSV=$RES/shb_mcnn.csv
LOSSES=${LOSSES:-"gl l2 bl dmcount"}
EPOCHS=${EPOCHS:-5}
VAL_EPOCH=${VAL_EPOCH:-3}
CROP=${CROP:-256}
BATCH=${BATCH:-4}
LR=${LR:-1e-3}
SEEDS=${*:-0}
mkdir -p "$OUT"
[ -f "$CSV" ] || echo "loss,seed,epochs,train_minutes,mae,rmse,nae,f1_4,f1_8,checkpoint" > "$CSV"

for seed in $SEEDS; do
  for loss in $LOSSES; do
    run=$OUT/${loss}_s${seed}
    if grep -q "^${loss},${seed}," "$CSV"; then echo "$(date -u +%T) ${loss} seed ${seed}: done, skipped"; continue; fi
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
  done
done
echo "$(date -u +%T) all done"
