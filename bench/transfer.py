"""Transfer learning on the real photos: the InceptionV3 feature-extraction run end to end, and the backbone's speed.

    .venv/bin/python bench/transfer.py [--photos DIR] [--work DIR] [--shard-size 342] [key=value ...]

1. catdog-prep the photos into WORK/shards (once; timed apart, it is not part of the transfer run).
2. The feature-extraction run exactly as a user runs it: ``python -m train --config configs/inception_v3.yaml``
   (tf_inception_v3 weights, frozen backbone, ``train.precompute_features=true``) with an EMPTY feature cache, so the
   time covers InceptionV3 features for train + val, the head's training and its evaluation. Wall time is process
   start to exit. Then the same run again: the features now come from the cache.
3. The backbone's forward pass on a batch of real val photos: fp32 vs bf16 autocast, channels_last off and on
   (median of --reps timed passes after one warm-up), images/s side by side.

Last lines: the targets (whole transfer run <= 5 min, val accuracy >= 99 %) as ratios, >= 1 meets them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_S = 5 * 60
TARGET_ACC = 0.99


def _prep(photos: Path, shards: Path, size: int) -> float:
    if (shards / "_info.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "catdog-prep"), str(photos), str(shards), "--image-size", str(size)],
        check=True,
    )
    return time.perf_counter() - t0


def _transfer_run(shards: Path, run_dir: Path, xdg: Path, overrides: list[str]) -> tuple[float, dict]:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "inception_v3.yaml")]
    cmd += [f"data.dir={shards}", f"run.dir={run_dir}", "track.backends=[csv]", *overrides]
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg), WANDB_MODE="offline")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0, json.loads((run_dir / "final_metrics.json").read_text())


def _forward_speeds(shards: Path, batch: int, reps: int) -> dict[tuple[bool, bool], float]:
    import torch

    from data_prep.cpus import usable_cpus
    from data_prep.info import load_info
    from train.config_io import load_config
    from train.data.streams import eval_loader
    from train.hardware.precision import native_bf16
    from train.models.registry import build_model

    torch.set_num_threads(usable_cpus())
    cfg = load_config(ROOT / "configs" / "inception_v3.yaml", [f"data.dir={shards}"])
    loader = eval_loader(
        cfg.data,
        load_info(shards),
        split="val",
        batch_size=batch,
        image_size=cfg.model.input_size(),
        rank=0,
        world_size=1,
    )
    x, _ = next(iter(loader))
    model = build_model(cfg.model, 2).eval()
    out = {}
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        for bf16 in (False, True):
            if bf16 and not native_bf16("cpu"):
                out[(channels_last, bf16)] = float("nan")
                continue
            times = []
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for i in range(reps + 1):
                    t0 = time.perf_counter()
                    model.features(xx)
                    if i:  # the first pass builds oneDNN kernels
                        times.append(time.perf_counter() - t0)
            out[(channels_last, bf16)] = len(x) / statistics.median(times)
            print(
                f"forward channels_last={channels_last} bf16={bf16}: {out[(channels_last, bf16)]:.1f} img/s", flush=True
            )
    return out


def _finetune_speed(shards: Path, batch: int, reps: int) -> dict[bool, float]:
    """Images/s of one full fine-tuning step (forward, backward, SGD; all layers train) at 299 px, fp32 vs bf16."""
    import torch
    from accelerate import Accelerator

    from data_prep.cpus import usable_cpus
    from data_prep.info import load_info
    from train.config_io import load_config
    from train.data.streams import eval_loader
    from train.loop.epoch import EpochTotals, StepRecipe, train_one_epoch
    from train.models.registry import build_model
    from train.run.setup import make_optimizer

    torch.set_num_threads(usable_cpus())
    cfg = load_config(ROOT / "configs" / "inception_v3_finetune.yaml", [f"data.dir={shards}"])
    loader = eval_loader(
        cfg.data,
        load_info(shards),
        split="train",
        batch_size=batch,
        image_size=cfg.model.input_size(),
        rank=0,
        world_size=1,
    )
    x, y = next(iter(loader))
    out = {}
    acc = Accelerator(cpu=True)  # one per process; bf16 comes from the autocast below, as Accelerate's would
    for bf16 in (False, True):
        model = build_model(cfg.model, 2).to(memory_format=torch.channels_last)
        opt = make_optimizer(cfg, model)
        model, opt = acc.prepare(model, opt)
        batches = [(x.contiguous(memory_format=torch.channels_last), y)] * (reps + 1)
        times = []
        for i, b in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                r = train_one_epoch(
                    model,
                    [b],
                    opt,
                    acc,
                    lr_fn=lambda s: 1e-3,
                    step=i,
                    start_batch=0,
                    num_batches=1,
                    totals=EpochTotals(),
                    recipe=StepRecipe(channels_last=True),
                )
            if i:
                times.append(r["seconds"])
        out[bf16] = len(x) / statistics.median(times)
        print(f"fine-tuning step {'bf16' if bf16 else 'fp32'}: {out[bf16]:.1f} img/s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", help="photos by split and class (default: CATDOG_REAL_DATA or make demo's download)")
    ap.add_argument("--work", default="/tmp/catdog-bench-transfer")
    ap.add_argument("--shard-size", type=int, default=342, help="short side of the shards (299 / 0.875 = 342)")
    ap.add_argument("--batch", type=int, default=32, help="forward-pass benchmark batch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-forward", action="store_true", help="skip the forward-pass and fine-tuning speeds")
    ap.add_argument("--skip-transfer", action="store_true", help="only the speeds (shards must exist)")
    ap.add_argument("overrides", nargs="*", help="extra trainer overrides for the transfer run")
    args = ap.parse_args()
    from data_prep.fetch import photos_by_split
    from train.models import pretrained

    args.photos = args.photos or str(photos_by_split())

    work = Path(args.work)
    shards = work / f"shards{args.shard_size}"
    prep_s = _prep(Path(args.photos), shards, args.shard_size)
    # A private cache: the real converted weights linked in, an empty feature cache.
    xdg = work / "xdg"
    if not args.skip_transfer:
        shutil.rmtree(xdg, ignore_errors=True)
        (xdg / "catdog").mkdir(parents=True)
        (xdg / "catdog" / "weights").symlink_to(pretrained.weights_dir())
        cold_s, cold = _transfer_run(shards, work / "run", xdg, args.overrides)
        warm_s, warm = _transfer_run(shards, work / "run_cached", xdg, args.overrides)
    speeds = {} if args.skip_forward else _forward_speeds(shards, args.batch, args.reps)
    tune = {} if args.skip_forward else _finetune_speed(shards, 16, args.reps)

    prepared = f"prepared in {prep_s:.0f} s" if prep_s else "reused"
    print(f"\nshards: {shards} ({prepared}); load average {os.getloadavg()} (the machine is shared)")
    if not args.skip_transfer:
        print(
            f"{'transfer run (configs/inception_v3.yaml)':<44} {'wall_s':>7} {'features_s':>10} {'val_acc':>8} {'best':>7}"
        )
        for name, wall, m in (
            ("cold: features extracted + cached", cold_s, cold),
            ("warm: features from the cache", warm_s, warm),
        ):
            print(
                f"{name:<44} {wall:>7.1f} {m['features/extract_seconds']:>10.1f} {m['val/accuracy']:>8.4f} "
                f"{m['best/val/accuracy']:>7.4f}"
            )
    if speeds:
        print(f"\nbackbone forward, batch {args.batch} real val photos at 299 px (img/s, median of {args.reps}):")
        print(f"{'':<22} {'fp32':>8} {'bf16':>8} {'bf16/fp32':>10}")
        for cl in (False, True):
            fp32, bf16 = speeds[(cl, False)], speeds[(cl, True)]
            print(f"{'channels_last ' + ('on' if cl else 'off'):<22} {fp32:>8.1f} {bf16:>8.1f} {bf16 / fp32:>10.2f}")
        print(
            f"channels_last on/off: fp32 {speeds[(True, False)] / speeds[(False, False)]:.2f}, bf16 "
            f"{speeds[(True, True)] / speeds[(False, True)]:.2f}"
        )
    if tune:
        print(
            "\nfull fine-tuning step (all layers, SGD, batch 16, 299 px, channels_last), img/s; epoch of 2,000 photos:"
        )
        for bf16, ips in tune.items():
            print(
                f"{'bf16' if bf16 else 'fp32':<6} {ips:>6.1f} img/s  ->  {2000 / ips / 60:.1f} min/epoch (compute only)"
            )
    if not args.skip_transfer:
        print(f"ratio target/wall (5 min, >= 1 meets it): {TARGET_S / cold_s:.2f}")
        print(f"ratio val_acc/target (99 %, >= 1 meets it): {cold['val/accuracy'] / TARGET_ACC:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
