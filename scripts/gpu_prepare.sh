#!/usr/bin/env bash
# Prepares the GPU check for a GPU machine with no network: its PyTorch image's python3 (3.12) has torch,
# torchvision, accelerate, torchmetrics, safetensors, onnx, onnxruntime, timm, ... but not the pure-Python packages
# below, and it cannot install from an index. This downloads their wheels into .gpu/wheels and copies a small photo
# set into .gpu/photos (both git-ignored); scripts/gpu_check.sh installs the wheels with --no-index and trains on
# the photos. Prints the size of what travels and the command to run there.
# Usage: scripts/gpu_prepare.sh [PHOTOS]  (default: the test suite's photos, $CATDOG_REAL_DATA or make demo's
# verified download, tests/real_photos.py: train/ and val/ with one folder per class). TRAIN_PER_CLASS / VAL_PER_CLASS pick how many photos per class (default 300 / 100).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
PHOTOS=${1:-}
if [ -z "$PHOTOS" ]; then
    PHOTOS=$("$PY" tests/real_photos.py) || exit 2
fi
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-300}
VAL_PER_CLASS=${VAL_PER_CLASS:-100}
LIMIT_MIB=64

# What catdog imports that the image lacks. Their own needs (PyYAML, numpy, cloudpickle, typing_extensions) are
# in the image already, so --no-deps: a second numpy or PyYAML would shadow the image's. wandb is not carried: the
# check logs to CSV, and catdog imports wandb only when a run asks for it. boto3 (with botocore, s3transfer,
# jmespath): data_prep/storage reads s3:// shards with it; the check imports every module, and ~14 MiB fit.
PACKAGES=(omegaconf webdataset braceexpand submitit boto3 botocore s3transfer jmespath)

if [ ! -d "$PHOTOS/train" ] || [ ! -d "$PHOTOS/val" ]; then
    echo "gpu_prepare.sh: $PHOTOS has no train/ and val/ folders: pass a photo folder laid out as train/CLASS/*.jpg" \
        "and val/CLASS/*.jpg (e.g. cats_and_dogs_filtered)" >&2
    exit 2
fi

# The versions the project's tests run with (.venv), else the newest.
specs=()
for name in "${PACKAGES[@]}"; do
    v=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
    specs+=("$name${v:+==$v}")
done

echo "== wheels for Python 3.12 (manylinux x86_64): ${specs[*]} -> $KIT/wheels"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/catdog-gpu-prepare.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp/wheels" "${specs[@]}"

echo "== photos: $TRAIN_PER_CLASS per class from $PHOTOS/train, $VAL_PER_CLASS per class from $PHOTOS/val -> $KIT/photos"
for split in train val; do
    n=$TRAIN_PER_CLASS
    [ "$split" = val ] && n=$VAL_PER_CLASS
    for cls in "$PHOTOS/$split"/*/; do
        cls=$(basename "$cls")
        mkdir -p "$tmp/photos/$split/$cls"
        mapfile -t files < <(find "$PHOTOS/$split/$cls" -maxdepth 1 -type f -iname '*.jp*g' | sort)
        if [ ${#files[@]} -gt 0 ]; then
            cp -t "$tmp/photos/$split/$cls" "${files[@]:0:$n}"
        fi
    done
done

# Replace the kit only once both parts are complete: an interrupted run leaves the previous kit (or none).
rm -rf "$KIT.new"
mkdir -p "$KIT.new"
mv "$tmp/wheels" "$tmp/photos" "$KIT.new/"
rm -rf "$KIT"
mv "$KIT.new" "$KIT"

kit_kib=$(du -sk "$KIT" | cut -f1)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # What travels with the repository: tracked files and the untracked ones git does not ignore.
    repo_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -n 1 \
        | cut -f1 || true)
else
    repo_kib=$(du -sk --exclude=.git --exclude=.venv --exclude=outputs --exclude="$KIT" . | cut -f1)
fi
total_mib=$(((kit_kib + repo_kib + 1023) / 1024))
echo "   $(find "$KIT/wheels" -name '*.whl' | wc -l) wheels, $(find "$KIT/photos" -type f | wc -l) photos;" \
    "$((kit_kib / 1024)) MiB + the repository's tracked files $((repo_kib / 1024)) MiB = ~$total_mib MiB" \
    "of the $LIMIT_MIB MiB a call may carry"
if [ "$total_mib" -ge "$LIMIT_MIB" ]; then
    echo "gpu_prepare.sh: ~$total_mib MiB would not fit in $LIMIT_MIB MiB: lower TRAIN_PER_CLASS / VAL_PER_CLASS" >&2
    exit 1
fi
cat <<EOF

On the GPU machine, from the repository root, with .gpu carried along (carry: [".gpu"]), one command:
    bash scripts/gpu_check.sh
It installs .gpu/wheels with pip --no-index into a temporary folder, runs every check (~7 minutes on one GPU) and
writes its report to \$OUT (else outputs/gpu_check): gpu_check.txt, gpu_check.json, gpu_check.log.
EOF
