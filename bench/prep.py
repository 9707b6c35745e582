"""Benchmark catdog-prep against a naive single-process Pillow loop and the single-core encode floor.

    .venv/bin/python bench/prep.py [--data PHOTOS] [--limit 600] [--repeats 7]

In one run over the same images (page cache warmed first), it measures
  1. catdog-prep end to end (scan, hash, plan, encode in --workers processes, shards, _info.json);
  2. the naive loop: one process, Image.open -> convert("RGB") -> resize -> save JPEG -> tarfile;
  3. the floor: one core doing only decode+resize+encode of in-memory bytes (data_prep.encode).
It prints the median images/s of each over --repeats runs, then the ratios against the issue's
targets last: prep >= 1.8x naive, and prep >= 0.8 x cores x floor.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.cpus import usable_cpus  # noqa: E402
from data_prep.encode import EncodeOptions, encode_image  # noqa: E402
from data_prep.fetch import photos_by_split  # noqa: E402
from data_prep.prepare import PrepArgs, run  # noqa: E402
from data_prep.scan import IMAGE_EXTENSIONS  # noqa: E402


def list_images(data: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if limit:
        # Every k-th file, so a subset still covers all splits and classes.
        files = files[:: max(1, len(files) // limit)][:limit]
    return files


def mirror(files: list[Path], data: Path, dest: Path) -> Path:
    """A SRC tree of symlinks to exactly these files, keeping their split/class folders."""
    for f in files:
        link = dest / f.relative_to(data)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    return dest


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (catdog-prep's pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(images/s wall clock, CPU ms per image) of fn, which returns the number of images it did."""
    t, c = time.perf_counter(), cpu_seconds()
    n = fn()
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    return n / wall, 1000 * cpu / n


def bench_prep(src: Path, workers: int, size: int, quality: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        args = PrepArgs(
            src=src, out=Path(tmp) / "out", image_size=size, quality=quality, workers=workers, progress=False
        )
        return timed(lambda: run(args, log=lambda _: None)["counts"]["written"])


def naive_loop(files: list[Path], size: int, quality: int, tar_path: Path) -> int:
    """What one would write first: a plain loop, one process, Pillow defaults."""
    with tarfile.open(tar_path, "w") as tar:
        for i, f in enumerate(files):
            im = Image.open(f).convert("RGB")
            s = size / min(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return len(files)


def bench_naive(files: list[Path], size: int, quality: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-naive-") as tmp:
        return timed(lambda: naive_loop(files, size, quality, Path(tmp) / "naive.tar"))


def bench_floor(blobs: list[bytes], opts: EncodeOptions) -> tuple[float, float]:
    """One core, bytes already in memory: decode + resize + encode only."""
    return timed(lambda: sum(1 for b in blobs if encode_image(b, opts)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="photos (default: CATDOG_REAL_DATA or make demo's download)")
    p.add_argument("--limit", type=int, default=0, help="use only this many images (spread over the folders)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--workers", type=int, default=usable_cpus())
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--quality", type=int, default=90)
    a = p.parse_args()
    a.data = a.data or photos_by_split()

    files = list_images(a.data, a.limit or None)
    blobs = [f.read_bytes() for f in files]  # also warms the page cache for all three measurements
    opts = EncodeOptions(image_size=a.image_size, quality=a.quality)
    cores = usable_cpus()
    print(f"{len(files):,} images from {a.data}; {cores} cores, catdog-prep --workers {a.workers}; {a.repeats} repeats")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on the machine skew every figure)")
    results: dict[str, list[tuple[float, float]]] = {"catdog-prep": [], "naive loop": [], "floor (1 core)": []}
    with tempfile.TemporaryDirectory(prefix="bench-src-") as tmp:
        src = mirror(files, a.data, Path(tmp)) if a.limit else a.data
        runs = {
            "catdog-prep": lambda: bench_prep(src, a.workers, a.image_size, a.quality),
            "naive loop": lambda: bench_naive(files, a.image_size, a.quality),
            "floor (1 core)": lambda: bench_floor(blobs, opts),
        }
        for r in range(a.repeats):
            # Interleave the three so load from other processes hits them alike, in a seeded random order
            # per repeat: on these VMs the host's load comes and goes in cycles of tens of seconds, and a
            # fixed order can keep landing one of the three in the slow half of the cycle.
            for name in random.Random(r).sample(list(runs), len(runs)):
                results[name].append(runs[name]())
            print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[-1][0]:,.0f}/s" for k, v in results.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    med = {k: statistics.median(x[0] for x in v) for k, v in results.items()}
    cpu = {k: statistics.median(x[1] for x in v) for k, v in results.items()}
    for k in results:
        print(f"{k:<16} {med[k]:>8,.0f} images/s  {cpu[k]:6.2f} CPU ms/image (medians)")
    # CPU per image is less skewed by other load: it says what the wall-clock ratio is on a quiet machine.
    print(f"CPU per image, catdog-prep / naive loop = {cpu['catdog-prep'] / cpu['naive loop']:.2f}")
    # This VM's speed drifts by +-15 % over minutes: the ratio within each repeat (runs seconds apart)
    # shows how far one measurement can be trusted; the headline figures below are ratios of medians.
    paired = [p[0] / n[0] for p, n in zip(results["catdog-prep"], results["naive loop"], strict=True)]
    paired_floor = [
        p[0] / (cores * f[0]) for p, f in zip(results["catdog-prep"], results["floor (1 core)"], strict=True)
    ]
    print(
        f"per-repeat ratios: vs naive {', '.join(f'{x:.2f}' for x in paired)} (median {statistics.median(paired):.2f}); "
        f"vs {cores} x floor {', '.join(f'{x:.2f}' for x in paired_floor)} (median {statistics.median(paired_floor):.2f})"
    )
    print(f"catdog-prep / naive loop       = {med['catdog-prep'] / med['naive loop']:.2f}x  (target >= 1.8 on 2 cores)")
    print(
        f"catdog-prep / ({cores} x floor)     = {med['catdog-prep'] / (cores * med['floor (1 core)']):.2f}   "
        "(target >= 0.8)"
    )


if __name__ == "__main__":
    main()
