#!/usr/bin/env bash
# `make demo`: prepare shards -> train the scratch CNN (configs/demo.yaml: cnn.yaml's model on a schedule sized for
# a first run) and InceptionV3 feature extraction (configs/inception_v3.yaml, offline ImageNet weights) -> show
# results and the comparison report -> classify a few photos with catdog-predict. Figures: docs/benchmarks.md.
# Usage: scripts/demo.sh [DATA_DIR] [DEMO_DIR] [key=value ...]. An empty DATA_DIR downloads cats_and_dogs_filtered
# (checksum-verified) into ~/.cache/catdog; offline, that step stops and says to set DATA_DIR. Any key=value after
# them goes to both training runs (e.g. train.mixed_precision=fp32, as on a CPU without native bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-}
DEMO_DIR=${2:-outputs/demo}
shift $(($# < 2 ? $# : 2))
OVERRIDES=("$@")
BIN=.venv/bin
TIMES=()
lap() { TIMES+=("$1 $((SECONDS - LAP)) s"); LAP=$SECONDS; }  # wall time of each step, shown at the end
LAP=$SECONDS

if [ -z "$DATA_DIR" ]; then
    DATA_DIR=$($BIN/python -m data_prep.fetch)
fi
echo "== 1/4 prepare shards from $DATA_DIR -> $DEMO_DIR/shards (192 px) and $DEMO_DIR/shards342 (InceptionV3)"
$BIN/catdog-prep "$DATA_DIR" "$DEMO_DIR/shards" --image-size 192
$BIN/catdog-prep "$DATA_DIR" "$DEMO_DIR/shards342" --image-size 342  # 299 / 0.875: eval's resize, no upsampling
lap "photos and prep"

echo "== 2/4 train the scratch CNN (configs/demo.yaml) -> $DEMO_DIR/run"
$BIN/catdog-launch local --config configs/demo.yaml data.dir="$DEMO_DIR/shards" run.dir="$DEMO_DIR/run" \
    ${OVERRIDES[@]+"${OVERRIDES[@]}"}
lap "scratch CNN"

echo "== 3/4 InceptionV3 feature extraction (configs/inception_v3.yaml) -> $DEMO_DIR/inception_v3"
$BIN/catdog-launch local --config configs/inception_v3.yaml data.dir="$DEMO_DIR/shards342" \
    run.dir="$DEMO_DIR/inception_v3" "track.backends=[csv,tensorboard]" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
lap InceptionV3
$BIN/catdog-report "$DEMO_DIR/run" "$DEMO_DIR/inception_v3" --out "$DEMO_DIR/report"

echo "== 4/4 results (scratch CNN)"
$BIN/python - "$DEMO_DIR/run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
metrics = json.loads((run / "final_metrics.json").read_text())
for k, v in sorted(metrics.items()):
    print(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")
print(f"plots:   {run / 'plots'}")
print(f"metrics: {run / 'metrics.jsonl'}")
PY

echo "== classify a few photos with catdog-predict (the run's model bundle, $DEMO_DIR/run/model)"
# Validation photos (never trained on): val/ here, validation/ in the downloaded copy.
mapfile -t PHOTOS < <(find "$DATA_DIR" -path '*val*' -name '*.jpg' | sort | awk 'NR % 200 == 1' | head -n 6)
$BIN/catdog-predict "$DEMO_DIR/run/model" "${PHOTOS[@]}"
lap "report and predict"
TOTAL=$SECONDS
printf -v STEPS '%s; ' "${TIMES[@]}"
printf '== make demo took %d min %02d s (%s)\n' $((TOTAL / 60)) $((TOTAL % 60)) "${STEPS%; }"
