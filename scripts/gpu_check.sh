#!/usr/bin/env bash
# GPU check: bench/gpu.py on this machine's CUDA GPU(s) -- the scratch CNN and InceptionV3 at 299 px, bf16 and fp16,
# channels_last, eager and torch.compile, images/s and peak memory, plus a 2-rank DDP row with 2+ GPUs.
# Finishes within 5 minutes (rows past bench/gpu.py's --budget-s are skipped and say so; `timeout` is the backstop).
# Then scripts/gpu_pipeline_check.sh (~2 minutes more): prep -> 2 training epochs -> evaluate -> predict on the GPU
# through the real data path; skipped when ../shared/data/catsdogs (or $CATDOG_PHOTOS) is not there.
# Writes outputs/gpu_check.txt (the table) and outputs/gpu_check.json. Extra arguments go to bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p outputs
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not available"; } \
    | tee outputs/gpu_check.txt
timeout 300 "$PY" bench/gpu.py --json outputs/gpu_check.json "$@" | tee -a outputs/gpu_check.txt
PHOTOS=${CATDOG_PHOTOS:-../shared/data/catsdogs}
if [ -d "$PHOTOS" ]; then
    timeout 300 scripts/gpu_pipeline_check.sh "$PHOTOS" | tee -a outputs/gpu_check.txt
else
    echo "pipeline check skipped: no photos at $PHOTOS (set CATDOG_PHOTOS)" | tee -a outputs/gpu_check.txt
fi
