"""Long benchmark: the scratch CNN (configs/cnn.yaml) on cats_and_dogs_filtered, time to 80% / 85% val accuracy.

    .venv/bin/python bench/accuracy.py --shards SHARDS [--epochs 40] [--procs 1|2] [key=value ...]

SHARDS is a catdog-prep folder of the 3,000 photos (e.g. ``catdog-prep ../shared/data/catsdogs /tmp/cd --image-size
144``). Runs the real trainer (``python -m train`` or ``accelerate launch`` with --procs 2) into a fresh run dir,
then prints the per-epoch curve (wall time, train loss, val loss, val accuracy), the time to each threshold, and
last the ratio of the 15-minute target to the time to 85% (>= 1 means the target is met; no 85%: ratio 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 15 * 60


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cnn.yaml"))
    ap.add_argument("--procs", type=int, default=1, help="CPU ranks (2 = accelerate launch --multi_gpu over gloo)")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--epochs", type=int, default=40, help="longer than cnn.yaml's demo schedule (24)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="catdog-acc-"))
    train_args = ["-m", "train", "--config", args.config, f"data.dir={args.shards}", f"run.dir={run_dir}"]
    train_args += ["train.checkpoint_every=0", f"train.epochs={args.epochs}", *args.overrides]
    bin_dir = Path(sys.executable).parent
    if args.procs > 1:
        cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(args.procs)]
        cmd += ["--main_process_port", "29731", *train_args]
    else:
        cmd = [sys.executable, *train_args]
    env = dict(os.environ, WANDB_MODE="offline")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"\nrun dir {run_dir}; {len(rows)} epochs, {wall:.0f} s wall (process start to exit)")
    print(f"{'epoch':>5} {'time_s':>7} {'train_loss':>10} {'train_acc':>9} {'val_loss':>8} {'val_acc':>7} {'img/s':>6}")
    for r in rows:
        print(
            f"{r['epoch']:>5} {r['time_s']:>7.0f} {r['train/loss']:>10.4f} {r['train/accuracy']:>9.4f} "
            f"{r.get('val/loss', float('nan')):>8.4f} {r.get('val/accuracy', float('nan')):>7.4f} "
            f"{r['train/images_per_s']:>6.0f}"
        )
    reached = {}
    for thr in (0.80, 0.85):
        hit = next((r for r in rows if r.get("val/accuracy", 0) >= thr), None)
        reached[thr] = hit["time_s"] if hit else None
        where = f"{hit['time_s']:.0f} s (epoch {hit['epoch']})" if hit else "not reached"
        print(f"time to {thr:.0%} val accuracy: {where}")
    print(f"best val accuracy: {max(r.get('val/accuracy', 0) for r in rows):.4f}")
    t85 = reached[0.85]
    print(f"ratio target/time-to-85% (15 min target, >= 1 meets it): {TARGET_S / t85 if t85 else 0.0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
