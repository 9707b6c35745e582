"""bench/accuracy.py --ablation in its seconds-long smoke mode: every variant trains for real and lands in the table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_helpers import ROOT, env, make_shards


@pytest.mark.slow
def test_ablation_smoke_prints_a_row_per_variant(tmp_path, real_data):
    shards = make_shards(real_data, tmp_path / "shards")
    out = tmp_path / "ablation"
    cmd = [sys.executable, "bench/accuracy.py", "--shards", str(shards), "--run-dir", str(out), "--ablation"]
    cmd += ["--smoke", "--variants", "fp32,no_ema,mixup", "train.mixed_precision=no"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant |") and [r.split(" | ")[0] for r in rows[1:]] == [
        "| fp32",
        "| no_ema",
        "| mixup",
    ]
    results = json.loads((out / "ablation.json").read_text())
    assert list(results) == ["fp32", "no_ema", "mixup"]
    for name, r in results.items():
        assert 0.0 <= r["best"] <= 1.0 and r["images_per_s"] > 0 and r["seeds"] == 1, name
    # Each variant really ran with its change: the saved configs differ exactly there.
    assert "ema: false" in (out / "no_ema-seed0" / "config.yaml").read_text()
    assert "mixup_alpha: 0.2" in (out / "mixup-seed0" / "config.yaml").read_text()
    assert "ema: true" in (out / "fp32-seed0" / "config.yaml").read_text()  # the shipped recipe's EMA


def test_unknown_variant_is_refused_by_name(tmp_path):
    cmd = [sys.executable, "bench/accuracy.py", "--shards", str(tmp_path), "--ablation", "--variants", "fp32,nope"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown ['nope']" in proc.stderr
