#!/usr/bin/env bash
# The GPU check in one command, for a machine whose python3 has PyTorch with CUDA but not catdog and no network:
# installs the wheels scripts/gpu_prepare.sh put in .gpu/wheels (pip --no-index, into a temporary folder), puts them
# and the repository on PYTHONPATH and runs scripts/gpu_check.py (every step with its own timeout, ~7 minutes in all
# on one GPU). The report goes to $OUT when set, else outputs/gpu_check: gpu_check.txt, gpu_check.json, gpu_check.log.
# PY picks the Python (default python3); DEVICE=cpu runs the same steps on CPU; arguments go to scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=$(mktemp -d "${TMPDIR:-/tmp}/catdog-gpu-site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
shopt -s nullglob
wheels=(.gpu/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "${wheels[@]}"
    echo "installed ${#wheels[@]} wheels from .gpu/wheels into $SITE"
else
    echo "no .gpu/wheels: using $PY's own packages (scripts/gpu_prepare.sh makes the wheels)"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Not exec: the trap removes the temporary folder afterwards.
status=0
"$PY" scripts/gpu_check.py "$@" || status=$?
exit $status
