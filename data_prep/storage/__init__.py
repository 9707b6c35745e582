"""The one place that knows URLs: read, list and write objects at a local path, ``s3://bucket/prefix`` (any
S3-compatible store) or ``https://host/prefix`` (read-only), with one set of functions.

    from data_prep import storage
    info = storage.read_bytes("s3://bucket/shards/_info.json")
    head = storage.read_range("s3://bucket/shards/train-000000.tar", 0, 512)
    storage.write_bytes("s3://bucket/shards/_info.json", data)    # atomic: readers see the old or the new object

Errors: every failure the user can fix is a ``StorageError`` whose message is one line -- the URL and what to fix
(a missing object, a denied or unknown key, an unreachable endpoint) -- and never contains a credential. Transient
failures (5xx, throttling, connection reset, timeouts, a store restarting) are retried with backoff for up to
CATDOG_STORAGE_RETRY_S seconds (default 120) before they become one. Endpoint and credentials come from the standard
AWS variables and files (see ``s3.py``). Clients are per process: a forked DataLoader worker makes its own.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_prep.atomic import atomic_write_bytes, tmp_path_for
from data_prep.storage.errors import (
    CONFIG,
    DENIED,
    FAILED,
    NOT_FOUND,
    UNAVAILABLE,
    UNREACHABLE,
    UNSUPPORTED,
    RetryPolicy,
    StorageError,
)
from data_prep.storage.urls import SUPPORTED, BadURL, Location, is_url, unsupported_scheme, url_scheme

__all__ = [
    "CONFIG", "DENIED", "FAILED", "NOT_FOUND", "SUPPORTED", "UNAVAILABLE", "UNREACHABLE", "UNSUPPORTED",
    "BadURL", "Location", "ObjectInfo", "RetryPolicy", "StorageError", "abort_unfinished_uploads", "download",
    "exists", "is_url", "list_dir", "read_bytes", "read_range", "remove", "stat", "unsupported_scheme", "upload",
    "url_scheme", "write_bytes",
]  # fmt: skip

Where = str | os.PathLike | Location


@dataclass(frozen=True)
class ObjectInfo:
    """What ``stat`` knows of an object: its size, the store's ETag, and the sha256 recorded when catdog wrote it
    (None for local files and for objects written by other tools)."""

    size: int
    etag: str = ""
    sha256: str | None = None


def _loc(where: Where) -> Location:
    try:
        return Location.parse(where)
    except BadURL as e:
        raise StorageError(e.url, e.reason, UNSUPPORTED) from None


def _backend(loc: Location):
    """The module serving ``loc``'s scheme. Imported on first use: boto3 costs ~0.3 s to import, which runs on
    local data (every DataLoader start-up, every CLI) should not pay."""
    if loc.scheme == "s3":
        from data_prep.storage import s3

        return s3
    from data_prep.storage import web

    return web


def _read_only(loc: Location) -> None:
    if loc.scheme in ("http", "https"):
        raise StorageError(str(loc), f"{loc.scheme}:// is read-only: write to s3:// or a local path", UNSUPPORTED)


def _local_error(loc: Location, e: OSError) -> StorageError:
    if isinstance(e, FileNotFoundError):
        return StorageError(str(loc), "no such file: check the path", NOT_FOUND)
    if isinstance(e, PermissionError):
        return StorageError(str(loc), "permission denied: check the file's rights", DENIED)
    return StorageError(str(loc), f"{e.strerror or e}", FAILED)


# ----------------------------------------------------------------------------------------------- reading


def read_bytes(where: Where) -> bytes:
    """The whole object (or local file)."""
    loc = _loc(where)
    if loc.is_local:
        try:
            return loc.path.read_bytes()
        except OSError as e:
            raise _local_error(loc, e) from None
    return _backend(loc).get(loc)


def read_range(where: Where, offset: int, size: int) -> bytes:
    """``size`` bytes from ``offset``; fewer at the end of the object and b"" past it, as ``os.pread``."""
    loc = _loc(where)
    if offset < 0 or size < 0:
        raise ValueError(f"read_range({loc}, {offset}, {size}): offset and size must be >= 0")
    if loc.is_local:
        try:
            with open(loc.path, "rb") as f:
                return os.pread(f.fileno(), size, offset)
        except OSError as e:
            raise _local_error(loc, e) from None
    return _backend(loc).get(loc, offset, size)


def stat(where: Where) -> ObjectInfo:
    """Size (and ETag / recorded sha256) of one object; StorageError(NOT_FOUND) when there is none."""
    loc = _loc(where)
    if loc.is_local:
        try:
            st = loc.path.stat()
        except OSError as e:
            raise _local_error(loc, e) from None
        if not loc.path.is_file():
            raise StorageError(str(loc), "is a folder, not a file", FAILED)
        return ObjectInfo(st.st_size)
    return ObjectInfo(**_backend(loc).head(loc))


def exists(where: Where) -> bool:
    """True when the object exists; other failures (denied, unreachable) still raise: they are not an answer."""
    try:
        stat(where)
    except StorageError as e:
        if e.kind == NOT_FOUND:
            return False
        raise
    return True


def list_dir(where: Where) -> dict[str, int]:
    """{name: size} of the objects directly under a folder / prefix (sub-folders left out), sorted by name.

    Not for https:// (a web server cannot be listed: address datasets there through their ``_info.json``).
    """
    loc = _loc(where)
    if loc.is_local:
        try:
            with os.scandir(loc.path) as it:
                found = {e.name: e.stat().st_size for e in it if e.is_file()}
        except FileNotFoundError:
            found = {}
        except OSError as e:
            raise _local_error(loc, e) from None
        return dict(sorted(found.items()))
    if loc.scheme != "s3":
        raise StorageError(
            str(loc), f"{loc.scheme}:// cannot be listed: name the objects (_info.json does)", UNSUPPORTED
        )
    return dict(sorted(_backend(loc).list_dir(loc)))


# ----------------------------------------------------------------------------------------------- writing


def write_bytes(where: Where, data: bytes, *, sha256: str | None = None) -> None:
    """Write a whole object atomically: readers see the previous object (or none) until all of it is there.

    Local: temp file, fsync, rename. S3: one PUT, which the store makes visible only complete; the sha256 (computed
    when not given) is stored with it, so a later run can check an upload without downloading it.
    """
    loc = _loc(where)
    _read_only(loc)
    if loc.is_local:
        try:
            atomic_write_bytes(loc.path, data)
        except OSError as e:
            raise _local_error(loc, e) from None
        return
    _backend(loc).put(loc, data, sha256)


def upload(src: str | os.PathLike, where: Where, *, sha256: str | None = None) -> None:
    """Copy the local file ``src`` to ``where`` atomically (large files in parts, visible only when complete)."""
    loc = _loc(where)
    _read_only(loc)
    src = Path(src)
    if loc.is_local:
        tmp = tmp_path_for(loc.path)
        try:
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _local_error(loc, e) from None
        return
    _backend(loc).put_file(loc, src, sha256)


def download(where: Where, dest: str | os.PathLike) -> int:
    """Copy the object to the local file ``dest`` atomically (temp name beside it, fsync, rename); returns its size.

    A cut transfer resumes where it stopped; ``dest`` never holds part of an object.
    """
    loc = _loc(where)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(dest)
    try:
        if loc.is_local:
            shutil.copyfile(loc.path, tmp)
            size = tmp.stat().st_size
        else:
            size = _backend(loc).get_file(loc, tmp)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _local_error(loc if loc.is_local else Location.parse(dest), e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def abort_unfinished_uploads(where: Where, keep) -> int:
    """Abort unfinished multipart uploads under the s3:// prefix ``where`` of the names ``keep(name)`` accepts; 0
    elsewhere (local writes and single PUTs leave nothing unfinished behind)."""
    loc = _loc(where)
    if loc.scheme != "s3":
        return 0
    return _backend(loc).abort_unfinished(loc, keep)


def remove(where: Where) -> None:
    """Delete one object; no error when it is already gone."""
    loc = _loc(where)
    _read_only(loc)
    if loc.is_local:
        loc.path.unlink(missing_ok=True)
        return
    _backend(loc).delete(loc)
