#!/usr/bin/env bash
# The real pipeline on this machine's GPU, end to end (~2 minutes on one GPU with a few CPUs): catdog-prep ->
# 2 epochs of configs/cnn.yaml through the shard loader (pinned batches, workers reusing shared-memory buffers,
# non_blocking copies, auto precision) -> catdog-evaluate of the run's bundle on the val split on the GPU, which
# must reproduce the trainer's best validation accuracy -> catdog-predict on a few photos on the GPU.
# bench/gpu.py (scripts/gpu_check.sh) times the model on synthetic batches; this checks the paths the CPU test
# suite cannot reach (pin_memory is off without CUDA). Exits non-zero on any failure or disagreement.
# Usage: scripts/gpu_pipeline_check.sh [PHOTOS] [OUT]; DEVICE=cpu runs the same steps on CPU (a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
PHOTOS=${1:-../shared/data/catsdogs}
OUT=${2:-outputs/gpu_pipeline_check}
DEVICE=${DEVICE:-cuda}
BIN=.venv/bin
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== prep: $PHOTOS -> $OUT/shards (192 px)"
$BIN/catdog-prep "$PHOTOS" "$OUT/shards" --image-size 192 --no-progress 2>&1 | tail -n 3

echo "== train: configs/cnn.yaml, 2 epochs -> $OUT/run"
start=$(date +%s)
$BIN/catdog-launch local --config configs/cnn.yaml data.dir="$OUT/shards" run.dir="$OUT/run" train.epochs=2 \
    "track.backends=[csv]" > "$OUT/train.log" 2>&1 || { tail -n 40 "$OUT/train.log"; exit 1; }
tr '\r' '\n' < "$OUT/train.log" | grep -E "INFO (train.mixed_precision|.* on [0-9]+ process|final:)" | cut -c1-400 || true
echo "   $(($(date +%s) - start)) s including start-up"

echo "== evaluate: the run's bundle on the val split, --device $DEVICE"
$BIN/catdog-evaluate "$OUT/run/model" "$OUT/shards" --split val --device "$DEVICE" --out "$OUT/eval" \
    > "$OUT/eval.log" 2>&1 || { tail -n 40 "$OUT/eval.log"; exit 1; }
$BIN/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
trained = json.loads((out / "run" / "final_metrics.json").read_text())["best/val/accuracy"]
scored = json.loads((out / "eval" / "metrics.json").read_text())
acc = scored["accuracy"]
print(f"   trainer's best val accuracy {trained:.4f}; catdog-evaluate {acc:.4f} ({scored['model']})")
# The same photos, weights and precision: equal on CPU (the test suite checks 1e-6); a GPU's convolution
# algorithms may round differently, so allow one borderline photo in a thousand to flip.
if abs(acc - trained) > 0.0015:
    sys.exit(f"FAIL: catdog-evaluate on {sys.argv[1]}/shards val gives {acc:.4f}, the trainer {trained:.4f}")
PY

echo "== predict: 6 val photos, --device $DEVICE"
mapfile -t SOME < <(find "$PHOTOS" -path '*val*' -name '*.jpg' | sort | awk 'NR % 150 == 1' | head -n 6)
$BIN/catdog-predict "$OUT/run/model" "${SOME[@]}" --device "$DEVICE" --no-progress
echo "== pipeline check passed"
