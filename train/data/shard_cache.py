"""Shards at a URL, read from whole copies in a cache on the node: content-addressed, size-bounded, least recently
used first out, shared by every rank and DataLoader worker of the node.

Why whole shards rather than one ranged GET per member (measured here against a real S3 server, on loopback): a
ranged GET per sample capped a worker at ~140-280 samples/s, below the ~650/s it decodes and resizes, while a
whole-shard download costs ~0.06 ms per sample. The reader then preads members from the local copy, exactly as from
a local shard, so a run reads the same bytes in the same order wherever the shards live.

Layout under the cache folder::

    shards/<sha256>.tar        a verified copy (size and sha256 as _info.json records them), renamed into place whole
    shards/<sha256>.idx.json   the shard's member index (catdog-prep's sidecar), kept so a warm start reads nothing
    tmp/                       downloads in progress (a killed one is deleted by the next process to fetch that shard)
    locks/<sha256>.get         held (exclusive) while one process downloads the shard: the others wait, then use it
    locks/<sha256>.use         held (shared) while a process fetches or opens the copy: eviction skips it then

Shards without a recorded sha256 (written by other tools) are keyed by URL, ETag and size instead, and checked by
size only. A download whose sha256 differs from _info.json's is never stored: the shard counts as corrupt
(``ShardMismatch``), as a damaged local shard does. Locks are flock()s, released by the kernel when a holder dies,
so a killed process never leaves another waiting. A copy evicted while a reader has it open stays readable (POSIX),
and its space returns when the reader closes it: the bound can be exceeded by such copies (each DataLoader worker
keeps up to 32 shards open).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from data_prep import storage
from data_prep.atomic import atomic_write_bytes
from data_prep.storage import Location
from train.config import ConfigError

log = logging.getLogger(__name__)

AUTO_FRACTION = 0.8  # data.cache_size=auto: this share of the space free for the cache at start-up


@dataclass(frozen=True)
class RemoteShard:
    """One shard object: its URL, size and (when recorded) sha256, which names its copy in the cache."""

    url: Location
    size: int
    sha256: str | None = None
    etag: str = ""

    @property
    def key(self) -> str:
        if self.sha256:
            return self.sha256
        return "etag-" + hashlib.sha256(f"{self.url}\n{self.etag}\n{self.size}".encode()).hexdigest()[:40]


class ShardMismatch(OSError):
    """The object is not the shard _info.json describes (replaced, damaged or gone): never cached, and every sample
    of the shard counts as corrupt. An OSError, as an unreadable local shard's errors are."""


def default_dir() -> Path:
    """$CATDOG_SHARD_CACHE, else <temp dir>/catdog-shards-<uid> (node-local on most clusters)."""
    env = os.environ.get("CATDOG_SHARD_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"catdog-shards-{os.getuid()}"


def _flock(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ShardCache:
    """A cache folder and its size bound; small and picklable, so DataLoader workers get it with their plan. All
    state is in the folder, so the ranks and workers of a node share it."""

    def __init__(self, root: Path, limit: int):
        self.root = Path(root)
        self.limit = limit

    @classmethod
    def create(cls, cache_dir: str = "", size: int | None = None) -> ShardCache:
        """The cache at ``cache_dir`` ("" = default_dir()), bounded to ``size`` bytes (None = auto); ConfigError
        naming data.cache_dir when the folder cannot be made."""
        chosen = cache_dir or os.environ.get("CATDOG_SHARD_CACHE")
        root = Path(chosen).expanduser() if chosen else default_dir()
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = root.stat()
            if not chosen and (st.st_uid != os.getuid() or st.st_mode & 0o022):
                # In the shared temp folder: someone else's folder could hand us copies we would trust unchecked.
                raise ConfigError(
                    f"data.cache_dir: {root} is not yours alone (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}); "
                    "set data.cache_dir (or CATDOG_SHARD_CACHE) to a folder of your own"
                )
            for sub in ("shards", "tmp", "locks"):
                (root / sub).mkdir(exist_ok=True)
            probe = root / "tmp" / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"data.cache_dir={root}: cannot use it as the shard cache ({e.strerror or e}); set data.cache_dir to "
                "a folder you can write, on a node-local disk"
            ) from None
        cache = cls(root, 0)
        if size is None:
            size = int(AUTO_FRACTION * (shutil.disk_usage(root).free + cache.used()))
        cache.limit = size
        return cache

    def used(self) -> int:
        """Bytes held: the copies and the downloads in progress (member indexes, ~1 % of a shard, not counted)."""
        total = 0
        for sub in ("shards", "tmp"):
            with os.scandir(self.root / sub) as it:
                for e in it:
                    if sub == "tmp" or e.name.endswith(".tar"):
                        try:
                            total += e.stat().st_size
                        except FileNotFoundError:  # evicted or renamed meanwhile
                            pass
        return total

    def path(self, shard: RemoteShard) -> Path:
        return self.root / "shards" / f"{shard.key}.tar"

    # ------------------------------------------------------------------------------------------- reading

    def open(self, shard: RemoteShard) -> int:
        """A read-only fd of the shard's verified copy (the caller closes it). Downloads it first when the node has
        no copy: one process per node downloads, the others wait for it. Raises ShardMismatch, or StorageError (one
        line) when the object cannot be had. A copy evicted while open stays readable until closed (POSIX)."""
        with self.held(shard):
            fd = self._open_copy(shard)
            if fd is None:
                self._download(shard)
                fd = self._open_copy(shard)
                if fd is None:  # not while we hold it: eviction skips held copies
                    raise ShardMismatch(f"{shard.url}: its copy in {self.root} vanished; check data.cache_dir")
        return fd

    def fetch(self, shard: RemoteShard) -> None:
        """Make sure the node has a copy (prefetching)."""
        os.close(self.open(shard))

    @contextmanager
    def held(self, shard: RemoteShard) -> Iterator[Path]:
        """The copy's path, kept from eviction inside the ``with`` (it may not exist yet: ``open`` fetches it)."""
        hold = _flock(self.root / "locks" / f"{shard.key}.use", fcntl.LOCK_SH)
        try:
            yield self.path(shard)
        finally:
            os.close(hold)

    def _open_copy(self, shard: RemoteShard) -> int | None:
        final = self.path(shard)
        try:
            fd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size != shard.size:  # not ours to trust (a truncated disk): fetch it again
            os.close(fd)
            final.unlink(missing_ok=True)
            return None
        try:
            os.utime(final)  # least recently used goes first: a read counts as a use
        except OSError:
            pass
        return fd

    def _download(self, shard: RemoteShard) -> None:
        get = _flock(self.root / "locks" / f"{shard.key}.get", fcntl.LOCK_EX)
        try:
            if self.path(shard).is_file():  # another process downloaded it while we waited
                return
            # Holding the lock proves nobody writes this shard's temp files: any left are from a killed download.
            for p in (self.root / "tmp").glob(f"*{shard.key}*"):
                p.unlink(missing_ok=True)
            self._make_room(shard.size)
            part = self.root / "tmp" / f"{shard.key}.{os.getpid()}.{threading.get_ident()}"
            try:
                storage.download(shard.url, part)  # retried and resumed on transient faults; atomic
                _verify(part, shard)
                os.replace(part, self.path(shard))
            finally:
                part.unlink(missing_ok=True)
        finally:
            os.close(get)

    def _make_room(self, incoming: int) -> None:
        """Delete least recently used copies nobody holds until ``incoming`` more bytes fit in the bound."""
        evict = _flock(self.root / "locks" / ".evict", fcntl.LOCK_EX)
        try:
            used = self.used()
            if used + incoming <= self.limit:
                return
            copies = []
            with os.scandir(self.root / "shards") as it:
                for e in it:
                    if e.name.endswith(".tar"):
                        try:
                            st = e.stat()
                        except FileNotFoundError:
                            continue
                        copies.append((st.st_mtime_ns, st.st_size, e.name))
            for _, size, name in sorted(copies):
                if used + incoming <= self.limit:
                    return
                if self._evict(name.removesuffix(".tar")):
                    used -= size
            if used + incoming > self.limit:
                log.warning(
                    "shard cache %s: %.1f MB in use by shards being read, over data.cache_size (%.1f MB); raise it",
                    self.root, (used + incoming) / 1e6, self.limit / 1e6,
                )  # fmt: skip
        finally:
            os.close(evict)

    def _evict(self, key: str) -> bool:
        try:
            use = os.open(self.root / "locks" / f"{key}.use", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(use)
            return False  # being read (or downloaded) somewhere on the node
        try:
            (self.root / "shards" / f"{key}.tar").unlink(missing_ok=True)
            return True
        finally:
            os.close(use)

    # ------------------------------------------------------------------------------------------- indexes

    def index_path(self, shard: RemoteShard) -> Path:
        return self.root / "shards" / f"{shard.key}.idx.json"

    def read_index(self, shard: RemoteShard) -> bytes | None:
        try:
            return self.index_path(shard).read_bytes()
        except OSError:
            return None

    def keep_index(self, shard: RemoteShard, data: bytes) -> None:
        try:
            atomic_write_bytes(self.index_path(shard), data)
        except OSError:  # a full disk: the next start reads the index from the store again
            pass


def _verify(part: Path, shard: RemoteShard) -> None:
    size = part.stat().st_size
    if size != shard.size:
        raise ShardMismatch(
            f"{shard.url}: {size:,} bytes where _info.json records {shard.size:,} (the object was replaced or "
            "damaged): rerun catdog-prep"
        )
    if shard.sha256:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != shard.sha256:
            raise ShardMismatch(
                f"{shard.url}: its sha256 differs from _info.json's (the object was replaced or damaged): rerun "
                "catdog-prep"
            )


class Prefetcher:
    """Downloads, in a thread, the shards a reader will open next: ``ahead`` shards past the one it last opened,
    in the order it will first open them. Failures are left for the reader to meet and report."""

    def __init__(self, cache: ShardCache, shards: Sequence[tuple[int, RemoteShard]], ahead: int):
        self.cache = cache
        self.order = list(shards)
        self.position = {number: i for i, (number, _) in enumerate(self.order)}
        self.ahead = ahead
        self.reached = -1
        self.stopped = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="catdog-prefetch", daemon=True)
        self.thread.start()

    def opened(self, number: int) -> None:
        """The reader opened shard ``number``."""
        i = self.position.get(number)
        if i is not None and i > self.reached:
            with self.cond:
                self.reached = i
                self.cond.notify()

    def stop(self, wait: bool = False) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if wait:
            self.thread.join()

    def _run(self) -> None:
        for i, (_, shard) in enumerate(self.order):
            with self.cond:
                while not self.stopped and i > self.reached + self.ahead:
                    self.cond.wait()
                if self.stopped:
                    return
            try:
                self.cache.fetch(shard)
            except Exception:  # noqa: BLE001 - the reader opens it itself and reports what is wrong
                pass
