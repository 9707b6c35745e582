"""Small real inputs for the launch tests: shards from a few dozen real photos, a tiny training config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


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
