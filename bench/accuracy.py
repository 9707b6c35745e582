"""Long benchmark: the scratch CNN (configs/cnn.yaml) on cats_and_dogs_filtered, time to 80% / 85% val accuracy;
or, with --ablation, one short training per variant (fp32 vs bf16, EMA on/off, each augmentation) and a table.

    .venv/bin/python bench/accuracy.py --shards SHARDS [--epochs 40] [--procs 1|2] [key=value ...]
    .venv/bin/python bench/accuracy.py --shards SHARDS --ablation [--variants base,bf16,ema] [--seeds 2]
        [--epochs 24] [key=value ...]

SHARDS is a catdog-prep folder of the 3,000 photos (e.g. ``catdog-prep PHOTOS /tmp/cd --image-size
192``). Runs the real trainer (``python -m train`` or ``accelerate launch`` with --procs 2) into a fresh run dir,
then prints the per-epoch curve (wall time, train loss, val loss, val accuracy), the time to each threshold, and
last the ratio of the 15-minute target to the time to 85% (>= 1 means the target is met; no 85%: ratio 0).

--ablation runs every variant in VARIANTS (or those --variants names) with the same config, overrides and schedule,
each into its own run dir, --seeds times (train.seed = 0, 1, ...), one after another, and prints one table row per
variant: median training images/s, best and final val accuracy (mean over seeds, and the spread), time to 80 %.
Differences smaller than the spread between seeds are noise. Run it on a quiet machine: the timings (and, through
the time-based columns, the comparison) mean nothing while other jobs share the cores. --smoke shrinks everything
(64 px, width 8, 1 epoch) to check the script itself in seconds, on small shards; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 15 * 60

# name -> overrides on top of the config: one change each against `base` (the config as it is; configs/cnn.yaml
# ships with EMA, TrivialAugment and pool_before_norm on, so those variants switch them off or swap them).
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "fp32": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "no_ema": ["train.ema=false"],
    "no_trivialaugment": ["data.augment.policy=none"],
    "randaugment": ["data.augment.policy=rand"],
    "erasing": ["data.augment.erasing=0.25"],
    "mixup": ["data.augment.mixup_alpha=0.2"],
    "cutmix": ["data.augment.cutmix_alpha=1.0"],
    "no_jitter": ["data.augment.color_jitter=0"],
    "norm_before_pool": ["model.pool_before_norm=false"],
}
SMOKE = [
    "model.image_size=64",
    "model.width=8",
    "model.depth=3",
    "train.batch_size=8",
    "eval.batch_size=16",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "track.backends=[csv]",
]


def train_once(args, run_dir: Path, overrides: list[str], *, quiet: bool = False) -> tuple[list[dict], float]:
    """One real training run into ``run_dir``; returns (metrics.jsonl rows, wall seconds)."""
    train_args = ["-m", "train", "--config", args.config, f"data.dir={args.shards}", f"run.dir={run_dir}"]
    train_args += ["train.checkpoint_every=0", f"train.epochs={args.epochs}", *overrides]
    bin_dir = Path(sys.executable).parent
    if args.procs > 1:
        cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(args.procs)]
        cmd += ["--main_process_port", "29731", *train_args]
    else:
        cmd = [sys.executable, *train_args]
    env = dict(os.environ, WANDB_MODE="offline")
    out = subprocess.DEVNULL if quiet else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE if quiet else None, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-3000:]
        raise SystemExit(f"training failed (exit {proc.returncode}) in {run_dir}: {' '.join(overrides)}\n{tail}")
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, wall


def first_reaching(rows: list[dict], threshold: float) -> dict | None:
    return next((r for r in rows if r.get("val/accuracy", 0) >= threshold), None)


def single(args, run_dir: Path) -> int:
    rows, wall = train_once(args, run_dir, args.overrides)
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
        hit = first_reaching(rows, thr)
        reached[thr] = hit["time_s"] if hit else None
        where = f"{hit['time_s']:.0f} s (epoch {hit['epoch']})" if hit else "not reached"
        print(f"time to {thr:.0%} val accuracy: {where}")
    print(f"best val accuracy: {max(r.get('val/accuracy', 0) for r in rows):.4f}")
    t85 = reached[0.85]
    print(f"ratio target/time-to-85% (15 min target, >= 1 meets it): {TARGET_S / t85 if t85 else 0.0:.2f}")
    return 0


def summarise(runs: list[tuple[list[dict], float]]) -> dict:
    """One variant's row from its runs (one per seed)."""
    best = [max(r.get("val/accuracy", 0.0) for r in rows) for rows, _ in runs]
    final = [rows[-1].get("val/accuracy", 0.0) for rows, _ in runs]
    t80 = [hit["time_s"] if (hit := first_reaching(rows, 0.80)) else None for rows, _ in runs]
    return {
        "images_per_s": statistics.median(r["train/images_per_s"] for rows, _ in runs for r in rows),
        "train_s": statistics.mean(rows[-1]["time_s"] for rows, _ in runs),
        "best": statistics.mean(best),
        "best_spread": max(best) - min(best),
        "final": statistics.mean(final),
        "final_loss": statistics.mean(rows[-1].get("val/loss", float("nan")) for rows, _ in runs),
        "t80": statistics.mean(t80) if all(t is not None for t in t80) else None,
        "seeds": len(runs),
    }


def ablation(args, run_dir: Path) -> int:
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    common = [*(SMOKE if args.smoke else []), *args.overrides]
    results: dict[str, dict] = {}
    for name in names:
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            rows, wall = train_once(
                args, run_dir / f"{name}-seed{seed}", [*common, *VARIANTS[name], f"train.seed={seed}"], quiet=True
            )
            runs.append((rows, wall))
            print(f"{name} seed {seed}: best val accuracy {max(r.get('val/accuracy', 0) for r in rows):.4f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        results[name] = summarise(runs) | {"overrides": VARIANTS[name]}
    (run_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    print(f"\nablation: {args.epochs} epochs, {args.seeds} seed(s) each, config {args.config}, overrides {common}")
    print(
        "| variant | overrides | train img/s | train s | best val acc (spread) | final val acc | final val loss | 80 % at |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t80 = f"{r['t80']:.0f} s" if r["t80"] is not None else "—"
        print(
            f"| {name} | {' '.join(r['overrides']) or '(config)'} | {r['images_per_s']:.0f} | {r['train_s']:.0f} | "
            f"{r['best']:.4f} ({r['best_spread']:.4f}) | {r['final']:.4f} | {r['final_loss']:.4f} | {t80} |"
        )
    print(f"results: {run_dir / 'ablation.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cnn.yaml"))
    ap.add_argument("--procs", type=int, default=1, help="CPU ranks (2 = accelerate launch --multi_gpu over gloo)")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--epochs", type=int, default=0, help="default: 40 (single run), 24 (--ablation), 1 (--smoke)")
    ap.add_argument("--ablation", action="store_true", help="one run per variant, then a table")
    ap.add_argument("--variants", default="", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=1, help="runs per variant (train.seed=0..N-1)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 epoch: checks the script, numbers mean nothing")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (1 if args.smoke else 24 if args.ablation else 40)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="catdog-acc-"))
    return ablation(args, run_dir) if args.ablation else single(args, run_dir)


if __name__ == "__main__":
    sys.exit(main())
