#!/usr/bin/env bash
# ShanghaiTech part B study under the fixed protocol: every run the same schedule, the same validation photos, and the
# final weight average scored. CPU, one torch thread per run; resumable (a run continues from its last.pt).
#   MODEL=effnet-lite0 ARM=gl-converged LR=1e-4 bash nbs/experiments/run_shb_study.sh 0 1 2
# Protocol "cosine-ema": EPOCHS epochs (default 40), WARMUP epochs of linear warm-up, then cosine decay to lr/100;
# an exponential moving average of the weights (decay 0.998 per step); validation every 2 epochs on a fixed hold-out
# of 60 training photos (val fraction 0.15, val seed 0: the same photos for every seed and arm), of the average and of
# the raw weights (learning curves only: no validation decides anything); the average after the last epoch is the
# result: slimmed to final.pt, its localization threshold chosen on the hold-out, evaluated once on the 316 test photos.
# Arms: gl-converged (transport solved to 1e-3), gl (official 12 soft-min pairs), l2, bl, dmcount-norm.
# Rows: results/shb_study.csv (+ _loc.csv). Run folders: results/shb_study/MODEL/ARM_lrLR_sSEED (+ _eEPOCHS unless 40,
# + _cCROP unless 256, + _scLOW-HIGH with SCALE="LOW HIGH").
set -euo pipefail
cd "$(dirname "$0")/../.."                     # repo root: the package of this checkout (python -m)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # every step (study_steps.py too) imports this checkout's package
DATA=../shared/datasets/ShanghaiTech
RES=nbs/experiments/results
MODEL=${MODEL:-effnet-lite0}
ARM=${ARM:-gl-converged}
LR=${LR:-1e-4}
BACKBONE_LR_SCALE=${BACKBONE_LR_SCALE:-0.3}
EPOCHS=${EPOCHS:-40}
WARMUP=${WARMUP:-2}
EMA=${EMA:-0.998}
CROP=${CROP:-256}
BATCH=${BATCH:-4}
PRECISION=${PRECISION:-bf16}
VAL_FRACTION=0.15
VAL_SEED=0
PROTOCOL=cosine-ema-e${EPOCHS}
SCALE=${SCALE:-}                               # e.g. "0.7 1.3": rescale each training crop by a factor in this range
RUN_SUFFIX=""; [ "$EPOCHS" = 40 ] || RUN_SUFFIX=_e${EPOCHS}   # the study's 40 epochs unnamed; other lengths named
[ "$CROP" = 256 ] || { RUN_SUFFIX=${RUN_SUFFIX}_c${CROP}; PROTOCOL=${PROTOCOL}-c${CROP}; }   # likewise the crop
scale_args=()
if [ -n "$SCALE" ]; then scale_args=(--scale-range $SCALE); RUN_SUFFIX=${RUN_SUFFIX}_sc${SCALE// /-}; PROTOCOL=${PROTOCOL}-sc${SCALE// /-}; fi
CSV=$RES/shb_study.csv
LOC_CSV=$RES/shb_study_loc.csv
SEEDS=${*:-0}
[ -f "$CSV" ] || echo "arm,seed,epochs,train_minutes,mae,rmse,nae,f1_4,f1_8,checkpoint,precision,protocol,model,lr" > "$CSV"
[ -f "$LOC_CSV" ] || echo "arm,seed,loc_threshold,val_f1_8,precision_4,recall_4,f1_4,precision_8,recall_8,f1_8,checkpoint" > "$LOC_CSV"
case "$ARM" in
  dmcount-norm) loss_args=(--loss dmcount --coord-scale $((CROP / 2)));;
  gl-converged) loss_args=(--loss gl --mode converged --tol 1e-3);;
  *) loss_args=(--loss "$ARM");;
esac
for seed in $SEEDS; do
  run=$RES/shb_study/$MODEL/${ARM}_lr${LR}_s${seed}${RUN_SUFFIX}
  if grep -q ",${run}/final.pt," "$CSV"; then echo "$(date -u +%T) ${run}: done, skipped"; continue; fi
  mkdir -p "$run"
  resume=(); [ -f "$run/last.pt" ] && resume=(--resume "$run/last.pt")
  if [ ! -f "$run/trained" ]; then
    echo "$(date -u +%T) ${run}: training"
    t0=$(date +%s)
    python -m uotcrowd train --dataset shanghaitech-b --data-dir "$DATA" --model "$MODEL" "${loss_args[@]}" \
      --crop-size "$CROP" --batch-size "$BATCH" --lr "$LR" --backbone-lr-scale "$BACKBONE_LR_SCALE" \
      --schedule cosine --warmup-epochs "$WARMUP" --ema-decay "$EMA" --val-raw --max-epoch "$EPOCHS" --val-epoch 2 \
      --val-fraction "$VAL_FRACTION" --val-seed "$VAL_SEED" --seed "$seed" --device cpu --precision "$PRECISION" \
      --out "$run" "${scale_args[@]}" "${resume[@]}"
    echo $(( $(date +%s) - t0 )) >> "$run/wall_s.txt"   # one line per (possibly resumed) training segment
    touch "$run/trained"
  fi
  # the result: the weight average after the last epoch (load_model reads it from last.pt), slimmed once with its
  # threshold into final.pt (weights, config, names, threshold)
  [ -f "$run/loc_threshold.json" ] || python nbs/experiments/study_steps.py threshold "$run" "$run/last.pt" "$DATA" "$VAL_SEED" "$VAL_FRACTION"
  python -c "import json,sys; from uotcrowd.checkpoints import slim_checkpoint as s; s(sys.argv[1], sys.argv[2], loc_threshold=json.load(open(sys.argv[3]))['threshold'])" \
    "$run/last.pt" "$run/final.pt" "$run/loc_threshold.json"
  echo "$(date -u +%T) ${run}: evaluating final.pt once on the test split"
  python -m uotcrowd eval --checkpoint "$run/final.pt" --dataset shanghaitech-b --data-dir "$DATA" --quiet --out "$run/eval-test" --overwrite
  python nbs/experiments/study_steps.py row "$run" "$run/final.pt" "$CSV" "$LOC_CSV" "$ARM" "$seed" "$PRECISION" "$PROTOCOL" "$MODEL" "$LR"
done
echo "$(date -u +%T) all done"
