"""The output folder OUT: one writer at a time, what it holds (finished, resumable, someone else's), and
bringing a finished one written by an older catdog-prep up to date without touching its shards."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_prep.atomic import atomic_write_json, tmp_path_for
from data_prep.errors import PrepError
from data_prep.info import INFO_NAME, SPLITS, splits_json
from data_prep.shards import Progress, is_prep_output, remove_outputs
from data_prep.tarformat import ensure_index


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Exclusive lock on OUT for the run (released by the kernel even on kill -9)."""
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise PrepError(f"cannot open OUT {out} ({e.strerror}): pass a folder you may read and write") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepError(f"another catdog-prep is writing to {out}; wait for it or use another OUT") from None
        yield
    finally:
        os.close(fd)


def _require_writable(out: Path) -> None:
    """Fail now with one clear line, not with a PermissionError traceback at the first shard."""
    probe = tmp_path_for(out / "write-check")  # a temp-file name, so a later run removes it if we are killed here
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        probe.unlink()
    except OSError as e:
        raise PrepError(
            f"cannot write to OUT {out} ({e.strerror}): pass a folder you may write to, or fix its permissions"
        ) from None


def _read_info(path: Path) -> dict | None:
    """OUT's _info.json as a dict, or None when it is not one catdog-prep could have written."""
    try:
        return parse_info(path.read_bytes())
    except OSError:
        return None


def parse_info(data: bytes) -> dict | None:
    """_info.json's bytes as a dict, or None when they are not an _info.json catdog-prep could have written."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(k), dict) for k in ("args", "source", "shards", "counts")
    ):
        return None
    return raw


def check_out(out: Path, args: dict, source_fp: str, force: bool) -> str:
    """What OUT holds: 'done' (same args and inputs, finished), 'ours' (resumable or empty).

    Refuses output of other runs or other tools (unless ``force``) and an OUT that cannot be written.
    """
    sizes = {}
    for name in os.listdir(out):
        path = out / name
        sizes[name] = path.stat().st_size if path.is_file() else -1
    info_path = out / INFO_NAME
    raw = _read_info(info_path) if info_path.is_file() else None
    verdict = judge_out(str(out), sizes, raw, Progress.load(out), args, source_fp, force)
    if verdict == "done":
        return verdict
    _require_writable(out)
    if force:
        remove_outputs(out)
    return verdict


def judge_out(
    out: str, sizes: dict[str, int], raw: dict | None, progress: Progress | None, args: dict, source_fp: str,
    force: bool,
) -> str:  # fmt: skip
    """What OUT (a folder or an s3:// prefix) holds, from its file names and sizes (-1: not a file), its parsed
    _info.json and progress: 'done' or 'ours'; PrepError, unless ``force``, for another run's or tool's output."""
    info_name = f"{out.rstrip('/')}/{INFO_NAME}"
    if INFO_NAME in sizes and raw is None and not force:
        raise PrepError(
            f"{info_name} is not an {INFO_NAME} written by catdog-prep (not a JSON object with args, source, "
            "shards and counts); use a new OUT or pass --force to rebuild it"
        )
    if raw is not None:
        same_args = raw["args"] == args
        same_src = raw["source"].get("fingerprint") == source_fp
        intact = all(isinstance(s, dict) and sizes.get(f) == s.get("bytes") for f, s in raw["shards"].items())
        if same_args and same_src and intact and not force:
            return "done"
        if not force:
            if not same_args:
                old = raw["args"]
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in args.items() if old.get(k) != v)
                why = f"with other arguments ({diff or 'argument names this version does not use'})"
            elif not same_src:
                why = "from different files (SRC changed since)"
            else:
                why = "and its shards are missing or damaged"
            raise PrepError(f"{out} was written by catdog-prep {why}; use a new OUT or pass --force to rebuild it")
    if progress is not None and progress.fingerprint != run_fingerprint(args, source_fp) and not force:
        raise PrepError(
            f"{out} holds an unfinished catdog-prep run with other arguments or inputs; rerun that command to "
            "resume it, use a new OUT, or pass --force to start over"
        )
    foreign = sorted(n for n in sizes if not is_prep_output(n))
    if foreign and not force:
        raise PrepError(
            f"{out} is not empty and was not written by catdog-prep (it holds {foreign[0]!r}); use an empty "
            "folder or pass --force (only catdog-prep's own files are replaced)"
        )
    return "ours"


def ensure_indexes(out: Path, shards: dict[str, dict]) -> int:
    """Give every shard a valid member index (data_prep/tarformat.py); returns how many had to be written."""
    return sum(ensure_index(out / name, s["sha256"]) for name, s in shards.items())


def upgrade_splits(out: Path, info: dict) -> bool:
    """Rewrite the ``splits`` of an _info.json written before val was also listed as ``validation`` and empty
    splits were left out (see data_prep/info.py); the shards stay as they are. True when it changed."""
    try:
        shards = [
            {"split": split, "file": f, "count": n}
            for split in SPLITS
            if split in info["splits"]
            for f, n in zip(info["splits"][split]["filenames"], info["splits"][split]["shard_lengths"], strict=True)
        ]
    except (KeyError, TypeError, ValueError):
        return False  # not a split list this tool wrote: left for load_info to report
    splits = splits_json(shards)
    if splits == info["splits"]:
        return False
    atomic_write_json(out / INFO_NAME, {**info, "splits": splits})
    return True


def run_fingerprint(args: dict, source_fp: str) -> str:
    """What an unfinished run's progress file is keyed by: a rerun resumes only with the same arguments and inputs."""
    return hashlib.sha256(json.dumps({"args": args, "source": source_fp}, sort_keys=True).encode()).hexdigest()
