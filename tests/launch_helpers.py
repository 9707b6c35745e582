"""Small real inputs for the launch tests: shards from a few dozen real photos, a tiny training config; the real
SLURM cluster's CLI (tests/slurm/cluster.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_shards(real_data: Path, dest: Path) -> Path:
    """16+16 train and 6+6 val real photos, sharded at 64 px by catdog-prep into dest/shards."""
    src = dest / "photos"
    for split, first, n in (("train", 0, 16), ("val", 2000, 6)):
        for cls in ("cat", "dog"):
            (src / split / cls).mkdir(parents=True)
            for i in range(first, first + n):
                shutil.copy(real_data / split / cls / f"{cls}.{i}.jpg", src / split / cls)
    out = dest / "shards"
    cmd = [sys.executable, "-m", "data_prep", str(src), str(out), "--image-size", "64", "--no-progress"]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    return out


def tiny_config(path: Path, shards: Path, backends: str = "[csv, wandb]") -> Path:
    """A tiny CNN at 32 px, 2 epochs of 4 steps; no data workers (the machine has 2 CPUs in all)."""
    path.write_text(
        f"""
data: {{dir: {shards}, num_workers: 0, shuffle_buffer: 16}}
model: {{name: scratch_cnn, image_size: 32, width: 8, depth: 2}}
train: {{epochs: 2, batch_size: 8, log_every: 1, mixed_precision: 'no'}}
eval: {{batch_size: 16}}
track: {{backends: {backends}}}
"""
    )
    return path


def require_cluster(nodes: int = 1) -> None:
    """Skip (or, with CATDOG_REQUIRE_SLURM set, fail) unless ``nodes`` SLURM nodes here accept jobs."""
    reason = ""
    if shutil.which("sinfo") is None:
        reason = "SLURM is not installed"
    else:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
        usable = re.findall(r"^(\S+) (?:idle|mix|alloc|completing)", res.stdout, re.M)
        if res.returncode or len(set(usable)) < nodes:
            reason = f"fewer than {nodes} usable SLURM node(s) (sinfo: {res.stdout.strip() or res.stderr.strip()})"
    if reason:
        start = (
            "sudo CATDOG_SLURM_NODES=2 bash tests/slurm/cluster.sh start"
            if nodes > 1
            else "sudo bash tests/slurm/cluster.sh start"
        )
        msg = f"{reason}; start the test cluster with `{start}` (or `make test`)"
        if os.environ.get("CATDOG_REQUIRE_SLURM"):
            pytest.fail(msg)
        pytest.skip(msg)


def queued() -> list[str]:
    """Ids of the jobs SLURM has queued or running."""
    if shutil.which("squeue") is None:
        return []
    return subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=30).stdout.split()


def cli(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m launch ARGV` (catdog-launch), from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "launch", *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def sacct(job_id: str, fields: str, *extra: str) -> list[list[str]]:
    res = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", fields, "-j", job_id, *extra], capture_output=True, text=True, timeout=60
    )
    return [line.split("|") for line in res.stdout.splitlines()]


def last_logged_step(run: Path) -> int:
    """The newest optimizer step in run/metrics.csv (0 before the first)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return 0
    steps = [int(r.split(",")[0]) for r in path.read_text().splitlines()[1:] if ",train/loss_step," in r]
    return max(steps, default=0)
