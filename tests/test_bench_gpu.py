"""bench/gpu.py in its tiny CPU mode: every path runs (no GPU here; the figures are meaningless on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def bench(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[str, list[dict]]:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "1", "--json", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout, json.loads(out.read_text())


def test_tiny_mode_trains_and_prints_its_table(tmp_path: Path):
    printed, rows = bench(tmp_path, "--models", "cnn", "--precisions", "bf16,fp16")
    assert "synthetic batches (one fixed random batch on the device)" in printed
    table = printed.split("\n\n")[-1].splitlines()
    assert table[0].split()[:6] == ["model", "px", "batch", "ranks", "prec", "compile"]
    body = [line.split() for line in table[2:4]]
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in body] == [("scratch_cnn", "96", "4", "bf16", "no")] + [
        ("scratch_cnn", "96", "4", "fp16", "no")
    ]
    assert [(r["precision"], r["note"]) for r in rows] == [("bf16", ""), ("fp16", "")]
    assert all(r["images_per_s"] > 0 and r["step_ms"] > 0 for r in rows)
    assert "2-rank row: skipped" in printed


@pytest.mark.slow
def test_tiny_mode_inception_at_299_and_two_ddp_ranks(tmp_path: Path):
    _, rows = bench(tmp_path, "--models", "inception", "--ranks", "2")
    inception, ddp = rows
    assert (inception["model"], inception["size"], inception["note"]) == ("inception", 299, "")
    assert inception["images_per_s"] > 0
    assert ddp["ranks"] == 2 and ddp["images_per_s"] > 0 and ddp["note"].startswith("DDP"), ddp


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the CUDA run would start")
def test_without_a_gpu_it_says_to_use_the_tiny_mode():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "no CUDA GPU visible; run with --device cpu" in res.stderr
