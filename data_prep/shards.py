"""Write samples into WebDataset tar shards, atomically and resumably.

Shard bytes are deterministic: members carry a fixed mtime/uid/gid/mode and are written by hand
(data_prep/tarformat.py: header + data + padding, two zero blocks at the end) so no clock, user or tarfile
record padding leaks into the output. Each shard gets a member index beside it (``train-000000.idx.json``),
written before the shard is renamed into place, so the trainer need not scan the tar's headers. A shard is a hidden temp file until it is complete, then renamed; after each
rename the progress file records how far the plan got, so a kill -9 loses at most one shard of work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.atomic import atomic_write_json, atomic_write_text, tmp_path_for
from data_prep.info import INFO_NAME
from data_prep.tarformat import END, Member, members_in, tar_member, write_index

SKIPPED_NAME = "skipped.jsonl"
PROGRESS_NAME = ".catdog-prep-progress.json"
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
INDEX_RE = re.compile(r"^(train|val|test)-\d{6}\.idx\.json$")  # data_prep/tarformat.py: a shard's member index
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def is_prep_output(name: str) -> bool:
    """True for every file name catdog-prep writes into OUT (shards, metadata, progress, temp files)."""
    return bool(SHARD_RE.match(name) or INDEX_RE.match(name) or _TEMP_RE.match(name)) or name in (
        INFO_NAME,
        SKIPPED_NAME,
        PROGRESS_NAME,
    )


@dataclass(frozen=True)
class ShardRecord:
    file: str
    split: str
    count: int
    bytes: int
    sha256: str


class ShardWriter:
    """Append samples split by split; a shard closes at ``max_count`` samples or ``max_bytes`` (0 = no limit).

    ``on_close(record, next_index)`` runs after each rename with the plan index of the first sample not
    in any closed shard, so the caller can persist progress.
    """

    def __init__(
        self,
        out: Path,
        max_count: int,
        max_bytes: int,
        next_number: dict[str, int],
        on_close: Callable[[ShardRecord, int], None],
    ):
        self.out = out
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.next_number = dict(next_number)
        self.on_close = on_close
        self._split: str | None = None
        self._file = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._count = 0
        self._bytes = 0
        self._members: list[Member] = []

    def add(self, split: str, sample: bytes, index: int) -> None:
        """Write one sample's members (already tar-encoded); ``index`` is its position in the plan."""
        if self._file is not None and (
            split != self._split
            or (self.max_count and self._count >= self.max_count)
            or (self.max_bytes and self._bytes + len(sample) + len(END) > self.max_bytes)
        ):
            self.close(index)
        if self._file is None:
            self._split = split
            self._tmp = tmp_path_for(self.out / shard_name(split, self.next_number.get(split, 0)))
            self._file = open(self._tmp, "wb")
            self._hash = hashlib.sha256()
            self._count = self._bytes = 0
            self._members = []
        self._members += members_in(sample, self._bytes)
        self._file.write(sample)
        self._hash.update(sample)
        self._count += 1
        self._bytes += len(sample)

    def close(self, next_index: int) -> None:
        """Complete the open shard (if any): end blocks, fsync, its index, rename, then report it.

        The index goes first: a shard under its final name always has its index (a kill between the two leaves an
        index whose shard is still a temp file; the resumed run rewrites both, byte for byte).
        """
        if self._file is None:
            return
        self._file.write(END)
        self._hash.update(END)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        number = self.next_number.get(self._split, 0)
        name = shard_name(self._split, number)
        record = ShardRecord(name, self._split, self._count, self._bytes + len(END), self._hash.hexdigest())
        write_index(self.out / name, record.bytes, record.sha256, self._members)
        os.replace(self._tmp, self.out / name)
        self._tmp = None
        self.next_number[self._split] = number + 1
        self._file = None
        self.on_close(record, next_index)

    def abandon(self) -> None:
        """Drop the open temp shard (used when the run fails or is interrupted before finishing).

        Keyed on the temp path, not the file object: an interruption between creating the file and
        keeping its handle must not leave the file behind.
        """
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def sample_bytes(key: str, jpg: bytes, cls: bytes, meta: bytes) -> bytes:
    return tar_member(f"{key}.jpg", jpg) + tar_member(f"{key}.cls", cls) + tar_member(f"{key}.json", meta)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Progress:
    """How far an unfinished run got: shards closed so far and the plan index after them."""

    fingerprint: str
    plan_digest: str
    next_index: int = 0
    shards: list[dict] | None = None
    skipped: list[dict] | None = None  # encode-time skips with plan index < next_index

    def save(self, out: Path) -> None:
        atomic_write_json(out / PROGRESS_NAME, asdict(self))

    @classmethod
    def load(cls, out: Path) -> Progress | None:
        try:
            raw = json.loads((out / PROGRESS_NAME).read_text())
            return cls(**raw)
        except (OSError, ValueError, TypeError):
            return None

    def verified(self, out: Path, elsewhere: Callable[[dict], bool] | None = None) -> bool:
        """True when every recorded shard is on disk with the recorded size and sha256, or (``elsewhere``, given
        a shard's record) already where it is going (uploaded)."""
        for s in self.shards or []:
            path = out / s["file"]
            if path.is_file() and path.stat().st_size == s["bytes"] and file_sha256(path) == s["sha256"]:
                continue
            if elsewhere is None or not elsewhere(s):
                return False
        return True


def remove_temp_files(out: Path) -> int:
    """Delete temp files left by a killed run; returns how many."""
    n = 0
    for p in out.iterdir():
        if _TEMP_RE.match(p.name) and p.is_file():
            p.unlink()
            n += 1
    return n


def remove_outputs(out: Path, keep: set[str] = frozenset()) -> None:
    """Delete catdog-prep's own files from OUT (never anything else), except those named in ``keep``."""
    for p in out.iterdir():
        if is_prep_output(p.name) and p.name not in keep and p.is_file():
            p.unlink()


def write_skipped(out: Path, records: list[dict]) -> None:
    atomic_write_text(out / SKIPPED_NAME, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
