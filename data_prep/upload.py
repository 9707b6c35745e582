"""catdog-prep to ``s3://bucket/prefix``: the shards are written into a local staging folder exactly as into a local
OUT (same writer, same bytes, same progress file), and each is uploaded as soon as it is finished, while the next
ones are encoded. ``_info.json`` goes last, once every shard, index and skipped.jsonl is in the store, so a reader
never sees a half-written dataset: no _info.json, no dataset.

Uploads are atomic (an object appears only complete). After each shard the progress of the shards uploaded so far
is stored beside them (``.catdog-prep-progress.json``), so a killed prep resumes when rerun -- on this machine from
the staging folder, elsewhere from that object. A shard already in the store with the size and sha256 recorded for
it (the sha256 is stored with every object catdog uploads) is not uploaded again. A staged shard is deleted once
uploaded: the staging folder holds only the shards in flight.
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

from data_prep import storage
from data_prep.errors import PrepError
from data_prep.info import INFO_NAME
from data_prep.outdir import judge_out, parse_info
from data_prep.shards import PROGRESS_NAME, SKIPPED_NAME, Progress, is_prep_output
from data_prep.storage import NOT_FOUND, Location, StorageError
from data_prep.tarformat import index_path

QUEUE = 4  # finished shards waiting for upload at most (staging disk use); encoding waits beyond


def destination(out: str) -> Location:
    """OUT as a URL catdog-prep can write to; PrepError (one line) otherwise."""
    scheme = storage.url_scheme(out)
    if scheme in ("http", "https"):
        raise PrepError(f"OUT {storage.Location.parse(out)}: {scheme}:// is read-only; write to s3:// or a folder")
    try:
        loc = Location.parse(out)
    except storage.BadURL as e:
        reason = e.reason.replace("use s3://, https:// or", "write to s3://bucket/prefix or")
        raise PrepError(f"OUT {e.url}: {reason}") from None
    if not loc.key.strip("/"):
        raise PrepError(f"OUT {loc}: name a prefix inside the bucket, e.g. {loc.scheme}://{loc.root}/catdog-shards")
    return loc


def default_stage(dest: Location) -> Path:
    """Where shards wait for upload: one folder per destination, so a rerun finds what the killed run staged."""
    return Path(tempfile.gettempdir()) / f"catdog-prep-{hashlib.sha256(str(dest).encode()).hexdigest()[:12]}"


def _fail(e: StorageError) -> PrepError:
    return PrepError(str(e))


class Uploader:
    """Uploads finished shards from the staging folder in order, in one thread; ``finish`` publishes the dataset."""

    def __init__(self, dest: Location, stage: Path):
        self.dest = dest
        self.stage = stage
        self.info: dict | None = None  # the destination's finished _info.json, when check() found one
        self._queue: queue.Queue = queue.Queue(QUEUE)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ before the run

    def check(self, args: dict, source_fp: str, force: bool) -> str:
        """What the destination holds: 'done' or 'ours' (``force``: catdog-prep's own objects there deleted, the
        dataset's _info.json first). PrepError, one line, for a denied key, a wrong endpoint, someone else's data."""
        try:
            sizes = storage.list_dir(self.dest)
            raw = parse_info(storage.read_bytes(self.dest / INFO_NAME)) if INFO_NAME in sizes else None
            progress = self._remote_progress() if PROGRESS_NAME in sizes else None
            verdict = judge_out(str(self.dest), sizes, raw, progress, args, source_fp, force)
            if verdict == "done":
                self.info = raw
                return verdict
            try:  # parts of uploads a killed run could not abort: invisible, but billed
                storage.abort_unfinished_uploads(self.dest, is_prep_output)
            except StorageError as e:
                if e.kind != storage.DENIED:  # a key without the right to list them: a bucket lifecycle rule's job
                    raise
            if force:
                for name in sorted(sizes, key=lambda n: n != INFO_NAME):  # _info.json first: no reader trusts the rest
                    if is_prep_output(name):
                        storage.remove(self.dest / name)
        except StorageError as e:
            raise _fail(e) from None
        return verdict

    def _remote_progress(self) -> Progress | None:
        try:
            return Progress(**json.loads(storage.read_bytes(self.dest / PROGRESS_NAME)))
        except (ValueError, TypeError):
            return None

    def adopt_progress(self) -> None:
        """A staging folder without progress (another machine, or cleaned): continue from the uploaded one."""
        if (self.stage / PROGRESS_NAME).is_file():
            return
        try:
            progress = self._remote_progress()
        except StorageError as e:
            if e.kind == NOT_FOUND:
                return
            raise _fail(e) from None
        if progress is not None:
            progress.save(self.stage)

    def in_store(self, record: dict) -> bool:
        """True when the shard is already uploaded: the object's size and stored sha256 are the record's."""
        try:
            st = storage.stat(self.dest / record["file"])
        except StorageError as e:
            if e.kind == NOT_FOUND:
                return False
            raise _fail(e) from None
        return st.size == record["bytes"] and st.sha256 == record["sha256"]

    # ------------------------------------------------------------------------------------ during the run

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="catdog-upload", daemon=True)
        self._thread.start()

    def add(self, record: dict | None, progress: Progress | None) -> None:
        """Queue a finished shard (``record`` as in the progress file) and the progress to store once it is up;
        waits while QUEUE shards wait already. Raises the uploader's error, if it stopped on one."""
        snapshot = json.dumps(asdict(progress), indent=2, sort_keys=True).encode() if progress else None
        while True:
            self._raise_error()
            try:
                self._queue.put((record, snapshot), timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, StorageError):
                raise _fail(self._error)
            raise PrepError(f"uploading to {self.dest} failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._upload(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
                self._error = e
            finally:
                self._queue.task_done()

    def _upload(self, record: dict | None, snapshot: bytes | None) -> None:
        if record is not None:
            tar = self.stage / record["file"]
            idx = index_path(tar)
            if not self.in_store(record):
                if idx.is_file():  # the index first: a shard in the store always has its index beside it
                    storage.upload(idx, self.dest / idx.name)
                storage.upload(tar, self.dest / record["file"], sha256=record["sha256"])
            elif idx.is_file() and not storage.exists(self.dest / idx.name):
                storage.upload(idx, self.dest / idx.name)
            tar.unlink(missing_ok=True)
            idx.unlink(missing_ok=True)
        if snapshot is not None:
            storage.write_bytes(self.dest / PROGRESS_NAME, snapshot)

    def close(self) -> None:
        """Stop the thread after the upload in flight (an error or an interruption: the rerun resumes)."""
        if self._thread is not None and self._thread.is_alive():
            self._error = self._error or PrepError("stopped")
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # it skips what is queued and waits: a daemon thread, gone with the process
                pass

    # ------------------------------------------------------------------------------------ at the end

    def finish(self, info: dict) -> None:
        """Wait for the uploads, then skipped.jsonl, then delete catdog-prep objects of earlier runs that this one
        did not write, then ``_info.json`` (the dataset is complete from here on), then the progress object."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
        self._raise_error()
        keep = {INFO_NAME, SKIPPED_NAME, *info["shards"], *(index_path(Path(f)).name for f in info["shards"])}
        try:
            storage.upload(self.stage / SKIPPED_NAME, self.dest / SKIPPED_NAME)
            for name in storage.list_dir(self.dest):
                if is_prep_output(name) and name not in keep and name != PROGRESS_NAME:
                    storage.remove(self.dest / name)
            storage.write_bytes(self.dest / INFO_NAME, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
            storage.remove(self.dest / PROGRESS_NAME)
        except StorageError as e:
            raise _fail(e) from None
        shutil.rmtree(self.stage, ignore_errors=True)
