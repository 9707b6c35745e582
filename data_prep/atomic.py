"""Atomic file writes: write a temp file beside the target, fsync, rename.

A crash or kill -9 leaves either the old file or the new one, never half of one; temp files start
with '.' and end in '.tmp-<pid>' so later runs can recognise and delete them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def tmp_path_for(path: Path) -> Path:
    """The temp name a write of ``path`` uses (hidden, per-process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error, Ctrl-C or SIGTERM mid-write: leave no temp file behind (kill -9 still can)
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def publish_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``, replacing a folder already there, by renames only: a reader
    sees the old folder or the new one, never a mix. A kill between the two renames leaves the old one as a hidden
    ``.tmp-old-<name>`` folder, which the writers' clean-up of ``.tmp-*`` names removes."""
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
