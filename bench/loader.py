"""Training-pipeline throughput: our shard loader vs torchvision ImageFolder + DataLoader, in one run.

Both sides use the same transforms (train/data/transforms.py at --image-size), the same batch size and the same
number of workers; each pass is one full epoch including worker start-up, timed from iter() to the last
batch. Passes alternate (ours, baseline, ours, ...) so load from other processes hits both alike; medians
are printed, the ratio last. On a shared machine the wall-clock ratio swings with the other tenants' load, so the
script also measures CPU time per image of each pipeline in this one process (no workers, ``time.process_time``,
--cpu-batches batches, median of the passes), which other jobs disturb far less.

    .venv/bin/python bench/loader.py [--src PHOTOS] [--shards DIR] [--workers 2]

Shards: --shards DIR if given; otherwise catdog-prep writes them into a temp dir from --src when it is
installed and works; otherwise this script's own writer does (short side --shard-size, JPEG q90, the
catdog-prep defaults), and says so.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from data_prep.fetch import photos_by_split
from data_prep.info import INFO_NAME, SPLITS, load_info
from train.config import DataConfig
from train.data.streams import TrainStream
from train.data.transforms import train_transform

ROOT = Path(__file__).resolve().parents[1]


def write_own_shards(src: Path, out: Path, short_side: int, per_shard: int = 500) -> None:
    """Fallback writer: src/train/<class>/*.jpg -> train-*.tar (resized, q90) + _info.json."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    files = sorted((f, c) for c, name in enumerate(classes) for f in (src / "train" / name).glob("*.jpg"))
    names, lengths = [], []
    for start in range(0, len(files), per_shard):
        name = f"train-{len(names):06d}.tar"
        chunk = files[start : start + per_shard]
        with wds.TarWriter(str(out / name)) as sink:
            for i, (f, c) in enumerate(chunk):
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    scale = short_side / min(im.size)
                    if scale < 1:
                        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{start + i:06d}", "jpg": buf.getvalue(), "cls": str(c).encode()})
        names.append(name)
        lengths.append(len(chunk))
    splits = {s: {"name": s, "num_samples": 0, "filenames": [], "shard_lengths": []} for s in SPLITS}
    splits["train"] = {"name": "train", "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}
    (out / INFO_NAME).write_text(json.dumps({"name": "bench", "classes": classes, "splits": splits}))


def make_shards(src: Path, out: Path, short_side: int) -> str:
    prep = Path(sys.executable).with_name("catdog-prep")
    if prep.exists():
        proc = subprocess.run(
            [
                str(prep),
                str(src),
                str(out),
                "--image-size",
                str(short_side),
                "--val-fraction",
                "0",
                "--test-fraction",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode == 0 and (out / INFO_NAME).is_file():
            return "catdog-prep"
        print(f"catdog-prep failed (rc={proc.returncode}): {proc.stderr.strip()[-300:]}", file=sys.stderr)
        for p in out.iterdir():
            p.unlink()
    write_own_shards(src, out, short_side)
    return "bench/loader.py's own writer (catdog-prep not available)"


def time_epoch(batches) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in batches)
    return time.perf_counter() - t0, n


def cpu_ms_per_image(args, cfg: DataConfig, info) -> dict[str, float]:
    """Median CPU milliseconds per image of each pipeline, run in this process (num_workers=0)."""
    cfg0 = DataConfig(dir=cfg.dir, num_workers=0)
    ours = TrainStream(
        cfg0, info, split="train", batch_size=args.batch_size, image_size=args.image_size, rank=0, world_size=1, seed=0
    )
    folder = ImageFolder(str(args.src / "train"), transform=train_transform(cfg0, args.image_size))
    base = DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=0)
    out: dict[str, list[float]] = {"ours": [], "imagefolder": []}
    for p in range(args.passes):
        for name, batches in (("ours", ours.loader(epoch=p)), ("imagefolder", base)):
            c0, n = time.process_time(), 0
            for i, (_, y) in enumerate(batches):
                n += len(y)
                if i + 1 == args.cpu_batches:
                    break
            out[name].append((time.process_time() - c0) * 1e3 / n)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--src", type=Path, help="photos by split and class (default: CATDOG_REAL_DATA or make demo's download)"
    )
    ap.add_argument("--shards", type=Path, help="existing catdog-prep output (default: write into a temp dir)")
    ap.add_argument("--shard-size", type=int, default=320, help="short side of images in the shards we write")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3, help="epochs timed per side")
    ap.add_argument("--cpu-batches", type=int, default=8, help="batches per side for the CPU-time measurement")
    args = ap.parse_args(argv)
    args.src = args.src or photos_by_split()
    # torchvision 0.29 flags its JPEG decoder as deprecated (moving to TorchCodec); it is still the fastest here.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="catdog-bench-") as tmp:
        shards = args.shards
        if shards is None:
            shards = Path(tmp)
            t0 = time.perf_counter()
            how = make_shards(args.src, shards, args.shard_size)
            print(f"shards: {how}, {time.perf_counter() - t0:.0f} s")
        info = load_info(shards)
        cfg = DataConfig(dir=str(shards), num_workers=args.workers)
        ours = TrainStream(
            cfg,
            info,
            split="train",
            batch_size=args.batch_size,
            image_size=args.image_size,
            rank=0,
            world_size=1,
            seed=0,
        )
        folder = ImageFolder(str(args.src / "train"), transform=train_transform(cfg, args.image_size))
        base = DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        print(
            f"ours: {info.split('train').num_samples} samples in {len(info.split('train').filenames)} shards; "
            f"baseline: ImageFolder {len(folder)} JPEGs; batch {args.batch_size}, {args.workers} workers, "
            f"{args.image_size} px"
        )
        rates = {"ours": [], "imagefolder": []}
        for p in range(args.passes):
            for name, batches in (("ours", ours.loader(epoch=p)), ("imagefolder", base)):
                dt, n = time_epoch(batches)
                rates[name].append(n / dt)
                print(f"pass {p} {name:12s} {n} images in {dt:6.2f} s = {n / dt:7.1f} img/s")
        ours_med, base_med = statistics.median(rates["ours"]), statistics.median(rates["imagefolder"])
        print(f"median ours (shards + TrainStream): {ours_med:.1f} img/s")
        print(f"median baseline (ImageFolder + DataLoader): {base_med:.1f} img/s")
        cpu = cpu_ms_per_image(args, cfg, info)
        print(
            f"CPU time per image, one process: ours {cpu['ours']:.2f} ms, baseline {cpu['imagefolder']:.2f} ms "
            f"= {cpu['imagefolder'] / cpu['ours']:.2f}x"
        )
        print(f"ratio ours / baseline: {ours_med / base_med:.2f}x")


if __name__ == "__main__":
    main()
