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
EPOCHS=${EPOCHS:-6}
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
      uotcrowd train --dataset shanghaitech-b --data-dir "$DATA" --model mcnn --loss "$loss" \
        --crop-size "$CROP" --batch-size "$BATCH" --lr "$LR" --max-epoch "$EPOCHS" --val-epoch "$VAL_EPOCH" \
        --seed "$seed" --device cpu --out "$run" "${resume[@]}"
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
