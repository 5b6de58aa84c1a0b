#!/usr/bin/env bash
# GPU check, for a machine with CUDA: the test suite's CUDA tests (the solver and the losses on CUDA against the CPU,
# autocast in float16/bfloat16, batches with images without heads, a VGG19 step under AMP), the loss at training sizes
# against the official trainer's recipe (`uotcrowd.loss_bench.loss_sizes`, to nbs/bench_results/loss_sizes_cuda.md and .json),
# then `uotcrowd bench --device cuda`, whose tables are written to nbs/bench_results/bench_cuda.md (and .json). About 5 minutes on one GPU;
# each part has a time limit so the whole stays under 9 minutes. Without CUDA it stops at once with exit status 2.
#
#   tools/gpu_check.sh            (from anywhere in the checkout; PYTHON=... selects the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); nothing was run." >&2
    exit 2
fi
"$PY" -c 'import torch; print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

echo "gpu_check: CUDA tests (pytest -k cuda)"
timeout 180 "$PY" -m pytest -n 0 -p no:cacheprovider -q -rs -k cuda tests/

echo "gpu_check: the loss at training sizes (B=8, 32x32/200 and 64x64/500) against the official trainer's recipe on CUDA"
timeout 60 "$PY" -c "from uotcrowd.loss_bench import loss_sizes; loss_sizes('nbs/bench_results', device='cuda', threads=(None,), stem='loss_sizes_cuda')"
echo "gpu_check: wrote nbs/bench_results/loss_sizes_cuda.md and loss_sizes_cuda.json"

echo "gpu_check: uotcrowd bench --device cuda"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
timeout 270 "$PY" -m uotcrowd bench --device cuda --out "$out"
mkdir -p nbs/bench_results
cp "$out/bench.md" nbs/bench_results/bench_cuda.md
cp "$out/bench.json" nbs/bench_results/bench_cuda.json
echo "gpu_check: wrote nbs/bench_results/bench_cuda.md and bench_cuda.json"
