"""Training-loader throughput from shards in object storage vs the same shards on local disk, in one run.

    .venv/bin/python bench/stream.py [--src ../shared/data/catsdogs] [--workers 2] [--passes 3]

catdog-prep writes the photos' shards into a temp folder; a SeaweedFS S3 server on 127.0.0.1 (tests/s3_server.py)
gets a copy, unless ``AWS_ENDPOINT_URL`` and ``--url s3://bucket/prefix`` name a store holding them already. Then
one training epoch (``TrainStream``, the trainer's loader: --workers DataLoader workers, random-resized-crop
augmentation at --image-size, batches of --batch-size; nothing trains) is timed from ``loader()`` to its last batch,
worker start-up and member indexes included, three ways in turn, --passes times:

- local: the shards on local disk (in the page cache after the first pass);
- s3 cold: from the store into an empty shard cache (every shard downloaded, verified, then read);
- s3 warm: from the store with the cache the cold pass filled (what every epoch after the first costs).

In-process index memos are cleared before each epoch, so each is timed as a new run would start. Also measured: the
cache fill alone (every shard fetched into an empty cache, one at a time: MB/s). Medians over the passes; the ratios
warm / local and cold / local last.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from s3_server import SeaweedFS  # noqa: E402

import train.data.reader as reader  # noqa: E402
import train.data.remote as remote  # noqa: E402
from data_prep import storage  # noqa: E402
from data_prep.info import load_info  # noqa: E402
from data_prep.prepare import PrepArgs, run  # noqa: E402
from train.config import DataConfig  # noqa: E402
from train.data.shard_cache import ShardCache  # noqa: E402
from train.data.streams import TrainStream  # noqa: E402


def epoch(data: str, cache: Path, args) -> tuple[float, int]:
    """Seconds and images of one fresh training epoch (new loader, new workers)."""
    remote._MEMO.clear()
    reader._INDEX_CACHE.clear()
    cfg = DataConfig(dir=data, num_workers=args.workers, cache_dir=str(cache), prefetch_shards=args.prefetch)
    t0 = time.perf_counter()
    ts = TrainStream(
        cfg, load_info(data), split="train", batch_size=args.batch_size, image_size=args.image_size, rank=0,
        world_size=1, seed=0,
    )  # fmt: skip
    n = sum(len(y) for _, y in ts.loader(0))
    return time.perf_counter() - t0, n


def cache_fill(url: str, cache: Path) -> tuple[float, int]:
    """Seconds and bytes to fetch every train shard into an empty cache, one after the other."""
    shutil.rmtree(cache, ignore_errors=True)
    remote._MEMO.clear()
    info = load_info(url)
    c = ShardCache.create(str(cache))
    shards = [remote.remote_shard(p, info.raw["shards"].get(p.name)) for p in info.shard_paths("train")]
    t0 = time.perf_counter()
    for s in shards:
        c.fetch(s)
    return time.perf_counter() - t0, sum(s.size for s in shards)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(url: str, local: Path, tmp: Path, args) -> None:
    info = load_info(local)
    train = info.split("train")
    mb = sum(info.raw["shards"][f]["bytes"] for f in train.filenames) / 1e6
    print(
        f"{train.num_samples} train samples in {len(train.filenames)} shards ({mb:.1f} MB); batch {args.batch_size}, "
        f"{args.workers} workers, prefetch {args.prefetch}, {args.image_size} px; {os.cpu_count()} CPUs: {cpu_name()}"
    )
    rates: dict[str, list[float]] = {"local": [], "s3 cold": [], "s3 warm": []}
    warm_cache = tmp / "cache-warm"
    for p in range(args.passes):
        cold_cache = tmp / f"cache-cold-{p}"
        for name, data, cache in (
            ("local", str(local), tmp / "unused"),
            ("s3 cold", url, cold_cache),
            ("s3 warm", url, warm_cache),
        ):
            if name == "s3 warm" and not warm_cache.exists():
                shutil.copytree(cold_cache, warm_cache)  # the cache a cold epoch left
            dt, n = epoch(data, cache, args)
            rates[name].append(n / dt)
            print(f"pass {p} {name:8s} {n} images in {dt:6.2f} s = {n / dt:7.1f} img/s")
        shutil.rmtree(cold_cache, ignore_errors=True)
    fills = [cache_fill(url, tmp / "cache-fill") for _ in range(args.passes)]
    fill = statistics.median(b / s for s, b in fills) / 1e6
    print(f"cache fill, one shard after another into an empty cache: median {fill:.0f} MB/s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, value in med.items():
        print(f"median {name}: {value:.1f} img/s")
    print(f"ratio s3 cold / local: {med['s3 cold'] / med['local']:.2f}x")
    print(f"ratio s3 warm / local: {med['s3 warm'] / med['local']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "catsdogs")
    ap.add_argument("--url", help="s3://bucket/prefix already holding the shards (with AWS_ENDPOINT_URL etc. set)")
    ap.add_argument("--shard-size", type=int, default=320, help="short side of the images in the shards")
    ap.add_argument("--shard-max-count", type=int, default=250, help="samples per shard")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=2, help="data.prefetch_shards")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="catdog-bench-stream-") as tmp:
        tmp = Path(tmp)
        local = tmp / "shards"
        t0 = time.perf_counter()
        prep = PrepArgs(
            src=args.src, out=local, image_size=args.shard_size, shard_max_count=args.shard_max_count,
            progress=False,
        )  # fmt: skip
        run(prep, log=lambda _: None)
        print(f"shards: catdog-prep, {time.perf_counter() - t0:.0f} s")
        if args.url:
            measure(args.url, local, tmp, args)
            return
        with SeaweedFS(tmp / "s3") as server:
            os.environ.update(server.env())
            url = server.url("bench")
            for p in sorted(local.iterdir()):
                storage.upload(p, f"{url}/{p.name}")
            print(f"S3 server: SeaweedFS on {server.endpoint} (loopback)")
            measure(url, local, tmp, args)


if __name__ == "__main__":
    main()
