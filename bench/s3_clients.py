"""S3 client libraries side by side against a real S3 server: which one should read catdog's shards?

    .venv/bin/python bench/s3_clients.py [--reps 15] [--clients catdog,obstore,boto3,s3fs]

Starts a SeaweedFS server on 127.0.0.1 (tests/s3_server.py) unless ``AWS_ENDPOINT_URL`` and ``--bucket`` name one,
uploads test objects, then measures for each client library installed:

- whole-object GET of 1, 4 and 10 MB objects (MB/s): downloading a shard into a node-local cache;
- ranged GET of 20, 50 and 100 KB spans at random offsets of a 10 MB object (ms per read, one at a time, as a
  DataLoader worker reads the members of a sample): reading single members by the shard's member index;
- PUT of a 4 MB object (MB/s): catdog-prep uploading a finished shard;
- the cost of a fresh client in a process forked from a parent that has used its own (ms until the child's first
  small GET returns, client construction included): every DataLoader worker makes its own client.

``catdog`` is our path (data_prep.storage: boto3, one client per process, the boto3 Session kept across fork), which
also downloads the 10 MB object to a file as the shard cache would. obstore and s3fs are optional (not dependencies
of catdog; ``pip install obstore s3fs`` to compare): missing ones are skipped. Plus a local baseline: the same ranged
reads by ``os.pread`` from a file in the page cache (what the reader does with shards on local disk today). Medians
over ``--reps``. Last lines: each library's median relative to the first in ``--clients`` (the pick), per
measurement: > 1 means the pick is faster.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from s3_server import SeaweedFS  # noqa: E402

from data_prep import storage  # noqa: E402

MB = 1 << 20
WHOLE_SIZES = (1 * MB, 4 * MB, 10 * MB)
RANGE_SIZES = (20_000, 50_000, 100_000)
PUT_SIZE = 4 * MB
FORK_TIMEOUT_S = 30.0  # a child whose first GET has not returned by then is stuck (a runtime that did not survive fork)


# ----------------------------------------------------------------------------------------------- the clients
# Each adapter: make() builds a client from the AWS_* variables; get/get_range/put use it.


class Boto3:
    name = "boto3"

    def make(self, bucket: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.c = boto3.session.Session().client("s3", config=Config(retries={"mode": "standard"}))

    def get(self, key: str) -> bytes:
        return self.c.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        r = self.c.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        return r["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.c.put_object(Bucket=self.bucket, Key=key, Body=data)


class S3fs:
    name = "s3fs"

    def make(self, bucket: str) -> None:
        import s3fs

        self.bucket = bucket
        # endpoint and keys from the AWS_* variables through aiobotocore; no instance cache (a fresh client)
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, default_block_size=MB)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.bucket}/{key}")

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.fs.cat_file(f"{self.bucket}/{key}", start=start, end=start + length)

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.bucket}/{key}", data)


class Obstore:
    name = "obstore"

    def make(self, bucket: str) -> None:
        import obstore
        from obstore.store import S3Store

        self.ob = obstore
        http = os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://")
        self.store = S3Store(bucket, client_options={"allow_http": http})  # endpoint and keys from AWS_*

    def get(self, key: str) -> bytes:
        return bytes(self.ob.get(self.store, key).bytes())

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return bytes(self.ob.get_range(self.store, key, start=start, length=length))

    def put(self, key: str, data: bytes) -> None:
        self.ob.put(self.store, key, data)


class Catdog:
    """Our path: data_prep.storage (boto3 underneath, its Session kept across fork, a client per process)."""

    name = "catdog"

    def make(self, bucket: str) -> None:
        from data_prep.storage import s3

        self.bucket = bucket
        s3.client()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def get(self, key: str) -> bytes:
        return storage.read_bytes(self.url(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return storage.read_range(self.url(key), start, length)

    def put(self, key: str, data: bytes) -> None:
        storage.write_bytes(self.url(key), data)  # sha256 computed and stored with it: part of our cost


CLIENTS = {c.name: c for c in (Catdog, Obstore, Boto3, S3fs)}


# ----------------------------------------------------------------------------------------------- measuring


def _timed(fn: Callable[[], object], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _fork_child(name: str, bucket: str, q: mp.Queue) -> None:
    t0 = time.perf_counter()
    client = CLIENTS[name]()
    client.make(bucket)
    made = time.perf_counter()
    client.get_range("obj-1MB", 0, 1000)
    q.put((made - t0, time.perf_counter() - t0))


def fork_cost(name: str, bucket: str, reps: int) -> tuple[float, float]:
    """Median (construction, construction + first ranged GET) in a forked child, after the parent used a client;
    NaN when the child hangs (killed after FORK_TIMEOUT_S)."""
    ctx = mp.get_context("fork")
    parent = CLIENTS[name]()
    parent.make(bucket)
    parent.get_range("obj-1MB", 0, 1000)  # the parent's client (and its library's runtime) is live when we fork
    made, first = [], []
    for _ in range(reps):
        q = ctx.Queue()
        p = ctx.Process(target=_fork_child, args=(name, bucket, q))
        p.start()
        try:
            a, b = q.get(timeout=FORK_TIMEOUT_S)
        except queue.Empty:
            p.kill()
            p.join()
            return math.nan, math.nan
        p.join()
        made.append(a)
        first.append(b)
    return statistics.median(made), statistics.median(first)


def measure(name: str, bucket: str, reps: int, rng: random.Random) -> dict[str, float]:
    client = CLIENTS[name]()
    client.make(bucket)
    client.get_range("obj-1MB", 0, 1000)  # warm the connection
    res: dict[str, float] = {}
    for size in WHOLE_SIZES:
        key = f"obj-{size // MB}MB"
        assert len(client.get(key)) == size
        res[f"GET {size // MB} MB (MB/s)"] = size / MB / statistics.median(_timed(lambda k=key: client.get(k), reps))
    big = f"obj-{WHOLE_SIZES[-1] // MB}MB"
    for size in RANGE_SIZES:
        offsets = [rng.randrange(0, WHOLE_SIZES[-1] - size) for _ in range(reps * 4)]
        it = iter(offsets)
        times = _timed(lambda s=size, it=it: client.get_range(big, next(it), s), reps * 4)
        assert len(client.get_range(big, offsets[0], size)) == size
        res[f"range {size // 1000} KB (ms)"] = 1000 * statistics.median(times)
    data = os.urandom(PUT_SIZE)
    res[f"PUT {PUT_SIZE // MB} MB (MB/s)"] = (
        PUT_SIZE / MB / statistics.median(_timed(lambda: client.put(f"put-{name}", data), reps))
    )
    made, first = fork_cost(name, bucket, max(3, reps // 3))
    res["fork: new client (ms)"] = 1000 * made
    res["fork: client + 1st GET (ms)"] = 1000 * first
    if name == "catdog":  # a whole shard into a node-local cache (temp file, fsync, rename)
        with tempfile.TemporaryDirectory(prefix="s3bench-dl-") as d:
            dest = Path(d) / "shard.tar"
            url = f"s3://{bucket}/obj-{WHOLE_SIZES[-1] // MB}MB"
            times = _timed(lambda: storage.download(url, dest), reps)
        res[f"download {WHOLE_SIZES[-1] // MB} MB to disk (MB/s)"] = WHOLE_SIZES[-1] / MB / statistics.median(times)
    return res


def local_ranges(path: Path, reps: int, rng: random.Random) -> dict[str, float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        res = {}
        size_all = os.fstat(fd).st_size
        for size in RANGE_SIZES:
            times = _timed(lambda s=size: os.pread(fd, s, rng.randrange(0, size_all - s)), reps * 4)
            res[f"range {size // 1000} KB (ms)"] = 1000 * statistics.median(times)
        return res
    finally:
        os.close(fd)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cell(v: float | None) -> str:
    if v is None:
        return f"{'':>14}"
    return f"{'hangs':>14}" if math.isnan(v) else f"{v:14.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--clients", default="catdog,obstore,boto3,s3fs", help="comma-separated; the first is the pick")
    ap.add_argument("--bucket", help="use this bucket of the server in AWS_ENDPOINT_URL instead of starting one")
    args = ap.parse_args()
    names = [n for n in args.clients.split(",") if n]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        server = None
        if args.bucket:
            bucket = args.bucket
        else:
            server = SeaweedFS(Path(tmp) / "s3").start()
            os.environ.update(server.env())
            bucket = server.bucket
        try:
            blobs = {size: os.urandom(size) for size in WHOLE_SIZES}
            seed = CLIENTS[names[0]]()
            seed.make(bucket)
            for size, blob in blobs.items():
                seed.put(f"obj-{size // MB}MB", blob)
            local = Path(tmp) / "local.bin"
            local.write_bytes(blobs[WHOLE_SIZES[-1]])
            results = {"local pread": local_ranges(local, args.reps, rng)}
            for name in names:
                try:
                    results[name] = measure(name, bucket, args.reps, rng)
                except ImportError as e:
                    print(f"{name}: not installed ({e}); skipped")
        finally:
            if server is not None:
                server.stop()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"CPU: {_cpu()}, {os.cpu_count()} cores, load average {load}; server: SeaweedFS on 127.0.0.1 (same machine)")
    rows = list(dict.fromkeys(row for n, r in results.items() if n != "local pread" for row in r))
    cols = list(results)
    print(f"{'median of ' + str(args.reps):32}" + "".join(f"{c:>14}" for c in cols))
    for row in rows:
        print(f"{row:32}" + "".join(_cell(results[c].get(row)) for c in cols))
    print(f"(hangs: the forked child's first GET had not returned after {FORK_TIMEOUT_S:.0f} s)")
    pick = names[0]
    if pick in results:
        print(f"ratios: how much faster {pick} is than each other library (> 1: {pick} faster)")
        for other in (n for n in names[1:] if n in results):
            parts = []
            for row in (r for r in rows if r in results[pick] and r in results[other]):
                a, b = results[pick][row], results[other][row]
                parts.append(f"{row.split(' (')[0]} {a / b if row.endswith('(MB/s)') else b / a:.2f}x")
            print(f"  {pick} vs {other}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
