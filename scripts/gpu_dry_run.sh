#!/usr/bin/env bash
# The GPU check's dry run on a machine without a GPU (`make gpu-dry-run`): scripts/gpu_prepare.sh, then a venv holding
# only the GPU image's packages (scripts/gpu_dry_venv.py links them from .venv), then scripts/gpu_check.sh with that
# venv's Python and DEVICE=cpu, installing the prepared wheels the way the GPU machine will. Every step must pass or
# say "skipped: no CUDA"; the report lands in outputs/gpu_dry_run/report. Arguments go to scripts/gpu_prepare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=outputs/gpu_dry_run
start=$(date +%s)
bash scripts/gpu_prepare.sh "$@"
echo "== a venv with only the GPU image's packages: $DRY/venv"
.venv/bin/python scripts/gpu_dry_venv.py "$DRY/venv"
echo "== scripts/gpu_check.sh, DEVICE=cpu"
rm -rf "$DRY/report"
status=0
PY="$PWD/$DRY/venv/bin/python" DEVICE=cpu OUT="$DRY/report" bash scripts/gpu_check.sh || status=$?
echo "gpu dry run: exit $status after $(($(date +%s) - start)) s; report in $DRY/report/gpu_check.txt"
exit $status
