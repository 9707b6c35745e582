"""The catdog-prep pipeline: scan -> hash -> plan -> encode in a process pool -> shards -> _info.json.

Workers only decode/resize/encode; the parent writes every byte of output in plan order, which is
why the result does not depend on ``workers``. Work is streamed through a bounded window of tasks,
so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_write_json
from data_prep.cpus import usable_cpus
from data_prep.encode import EncodeOptions, encode_batch
from data_prep.errors import PrepError
from data_prep.info import INFO_NAME, SPLITS, splits_json
from data_prep.outdir import check_out, ensure_indexes, locked, run_fingerprint, upgrade_splits
from data_prep.plan import Plan, hash_file, make_plan
from data_prep.pool import Pool, WorkerDied
from data_prep.progress import progress as progress_display
from data_prep.scan import LAYOUTS, PRESPLIT_LAYOUTS, Scan, ScanError, scan
from data_prep.shards import (
    PROGRESS_NAME,
    Progress,
    ShardRecord,
    ShardWriter,
    remove_outputs,
    remove_temp_files,
    write_skipped,
)
from data_prep.storage import is_url
from data_prep.storage.urls import redact
from data_prep.tarformat import index_path
from data_prep.upload import Uploader, default_stage, destination
from data_prep.version import catdog_version

HASH_BATCH = 64  # files per hashing task
# Images per encoding task: large while much work remains (each task costs ~0.5 ms of pickling and
# wake-ups in the parent, which shares the cores with the workers), shrinking towards the end so no
# worker idles long on the last tasks (guided self-scheduling).
ENCODE_BATCH_MAX = 32
WINDOW_PER_WORKER = 4  # tasks in flight per worker: slack for one slow image, memory bounded (~128 images)


@dataclass(frozen=True)
class PrepArgs:
    src: Path
    out: Path | str  # a folder, or s3://bucket/prefix (data_prep/upload.py)
    image_size: int = 320
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shard_max_count: int = 1000
    shard_max_size: int = 256_000_000
    workers: int = field(default_factory=usable_cpus)
    quality: int = 90
    seed: int = 0
    max_pixels: int = 100_000_000
    min_size: int = 32
    max_aspect: float = 3.0
    layout: str = "auto"
    force: bool = False
    progress: bool = True
    stage: Path | None = None  # OUT at a URL: the local folder shards wait in for upload (None: a temp folder)

    def output_args(self) -> dict:
        """The arguments that decide the output bytes (workers/force/progress do not), as stored in _info.json."""
        return {
            "src": str(Path(self.src).resolve()),
            "image_size": self.image_size,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "shard_max_count": self.shard_max_count,
            "shard_max_size": self.shard_max_size,
            "quality": self.quality,
            "seed": self.seed,
            "max_pixels": self.max_pixels,
            "min_size": self.min_size,
            "max_aspect": self.max_aspect,
            "layout": self.layout,
        }

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(self.image_size, self.quality, self.max_pixels, self.min_size, self.max_aspect)

    def validate(self) -> None:
        checks = [
            (self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
            (1 <= self.quality <= 100, f"--quality must be in 1..100, got {self.quality}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (0 <= self.test_fraction < 1, f"--test-fraction must be in [0, 1), got {self.test_fraction}"),
            (
                self.val_fraction + self.test_fraction < 1,
                f"--val-fraction + --test-fraction must be < 1, got {self.val_fraction + self.test_fraction}",
            ),
            (self.shard_max_count >= 0, f"--shard-max-count must be >= 0, got {self.shard_max_count}"),
            (self.shard_max_size >= 0, f"--shard-max-size must be >= 0, got {self.shard_max_size}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.max_pixels >= 1, f"--max-pixels must be >= 1, got {self.max_pixels}"),
            (self.min_size >= 1, f"--min-size must be >= 1, got {self.min_size}"),
            (self.max_aspect >= 1, f"--max-aspect must be >= 1, got {self.max_aspect}"),
            (self.layout in LAYOUTS, f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PrepError(msg)


def _ordered_map(
    pool: Pool | None, fn: Callable, tasks: Iterable, window: int, images: Callable[[tuple], list[str]]
) -> Iterator:
    """(task, fn(task)) over tasks in order, with at most ``window`` tasks in flight (pool=None: in this process).

    ``images(task)`` names a task's images for the error raised when a worker process dies.
    """
    if pool is None:
        for task in tasks:
            yield task, fn(task)
        return
    try:
        yield from pool.imap_ordered(fn, tasks, window)
    except WorkerDied as e:
        names = [name for task in e.tasks for name in images(task)]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3:,} more" if len(names) > 3 else "")
        raise PrepError(
            f"a worker process died (killed, e.g. by the out-of-memory killer) while processing {shown or 'images'}; "
            "the shards written so far are kept: rerun the same command to resume, with fewer --workers or a "
            "lower --max-pixels if memory ran out"
        ) from None


def _batches(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _guided_batches(seq: list, workers: int, largest: int) -> Iterator[list]:
    """Batches of ceil(remaining / (4 * workers)) items, at most ``largest``: big first, single items at the end."""
    i = 0
    while i < len(seq):
        n = min(largest, max(1, -(-(len(seq) - i) // (4 * workers))))
        yield seq[i : i + n]
        i += n


def _hash_batch(task: tuple[str, list[str]]) -> list:
    src, rels = task
    return [hash_file(os.path.join(src, r)) for r in rels]


def run(a: PrepArgs, log: Callable[[str], None] = print) -> dict:
    """Prepare shards from a.src into a.out; returns the summary (also printed through ``log``)."""
    a.validate()
    t0 = time.perf_counter()
    if is_url(a.src):
        raise PrepError(f"SRC {redact(str(a.src))}: the photos must be in a local folder (OUT may be s3://)")
    sink = None
    if is_url(a.out):  # shards staged in a local folder, uploaded as they are finished
        dest = destination(str(a.out))
        sink = Uploader(dest, Path(a.stage) if a.stage else default_stage(dest))
        out = sink.stage
    else:
        out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise PrepError(f"OUT {out} is a file, not a folder: pass a folder path for the shards")
    try:
        found, how = scan(a.src, a.layout, exclude=out if out.exists() else None)
    except ScanError as e:
        raise PrepError(str(e)) from None
    log(f"layout: {how}")
    log(f"found {len(found.candidates):,} image files in {len(found.classes)} classes: {', '.join(found.classes)}")
    if found.layout in PRESPLIT_LAYOUTS:
        log("splits: kept as the folders give them (--val-fraction/--test-fraction do not apply)")
    else:
        log(f"splits: {a.val_fraction:.0%} val and {a.test_fraction:.0%} test of each class, by a seeded content hash")
    args = a.output_args()
    if sink is not None and sink.check(args, found.fingerprint, a.force) == "done":
        n = sink.info["counts"]["written"]
        log(f"{sink.dest} is already complete ({n:,} samples, same arguments and inputs): nothing to do")
        return {"status": "up_to_date", "counts": sink.info["counts"], "out": str(sink.dest)}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepError(
            f"cannot create OUT {out} ({e.strerror}: {e.filename}): pass a folder path where you may create folders"
        ) from None
    with locked(out):
        if sink is not None:
            sink.adopt_progress()
        if check_out(out, args, found.fingerprint, a.force) == "done":
            info = json.loads((out / INFO_NAME).read_text())
            remove_temp_files(out)
            (out / PROGRESS_NAME).unlink(missing_ok=True)
            n = info["counts"]["written"]
            added = ensure_indexes(out, info["shards"])
            if added:  # shards from a catdog-prep without indexes, or an index deleted since
                log(f"wrote the member index of {added} shard(s) that had none (or a stale one)")
            if upgrade_splits(out, info):
                log(
                    f"{out} is already complete ({n:,} samples); updated the split list in {INFO_NAME} to this "
                    "version's (val also listed as 'validation', empty splits left out), shards unchanged"
                )
            else:
                log(f"{out} is already complete ({n:,} samples, same arguments and inputs): nothing to do")
            return {"status": "up_to_date", "counts": info["counts"], "out": str(out)}
        remove_temp_files(out)
        # Workers are forked here, before any thread exists (tqdm starts one): forking a threaded process is unsafe.
        with Pool(a.workers) if a.workers > 1 else nullcontext() as pool:
            if sink is None:
                return _prepare(a, found, out, args, pool, t0, log, None)
            sink.start()  # a thread: after the pool's workers are forked
            try:
                return _prepare(a, found, out, args, pool, t0, log, sink)
            finally:
                sink.close()


def _prepare(
    a: PrepArgs, found: Scan, out: Path, args: dict, pool, t0: float, log: Callable[[str], None], sink: Uploader | None
) -> dict:
    src = Path(a.src)
    window = WINDOW_PER_WORKER * a.workers
    rels = [c.rel for c in found.candidates if c.problem is None]
    hashes: dict = {}
    with progress_display(total=len(rels), desc="hash", unit="img", disable=not a.progress) as bar:
        tasks = ((str(src), batch) for batch in _batches(rels, HASH_BATCH))
        for (_, batch), results in _ordered_map(pool, _hash_batch, tasks, window, lambda t: t[1]):
            hashes.update(zip(batch, results, strict=True))
            bar.update(len(results))
    plan = make_plan(
        found.candidates,
        hashes,
        found.classes,
        seed=a.seed,
        val_fraction=a.val_fraction,
        test_fraction=a.test_fraction,
    )
    fingerprint = run_fingerprint(args, found.fingerprint)
    if not plan.items:
        write_skipped(out, sorted([*plan.skipped, *plan.duplicates], key=lambda r: r["path"]))
        raise PrepError(
            f"no usable image under {src}: all {len(found.candidates):,} were skipped (see {out}/skipped.jsonl)"
        )

    progress = Progress.load(out)
    if (
        progress is not None
        and progress.fingerprint == fingerprint
        and progress.plan_digest == plan.digest
        and progress.verified(out, sink.in_store if sink else None)
    ):
        log(f"resuming: {len(progress.shards)} shards ({progress.next_index:,} images) already written")
        if sink is not None:  # those staged but not uploaded yet (the uploader skips those in the store)
            for record in progress.shards:
                sink.add(record, None)
            sink.add(None, progress)
    else:
        if progress is not None:
            log("an unfinished run's shards do not match these inputs (changed or damaged): starting over")
        remove_outputs(out)
        progress = Progress(fingerprint, plan.digest, 0, [], [])
        progress.save(out)
    encode_skips: list[dict] = list(progress.skipped)

    def on_close(record: ShardRecord, next_index: int) -> None:
        progress.shards.append(asdict(record))
        progress.next_index = next_index
        progress.skipped = [s for s in encode_skips if s["index"] < next_index]
        progress.save(out)
        if sink is not None:
            sink.add(asdict(record), progress)

    next_number = Counter(s["split"] for s in progress.shards)
    writer = ShardWriter(out, a.shard_max_count, a.shard_max_size, next_number, on_close)
    todo = list(plan.items[progress.next_index :])
    opts = a.encode_options()
    t_encode = time.perf_counter()
    tasks = ((str(src), batch, opts) for batch in _guided_batches(todo, a.workers, ENCODE_BATCH_MAX))
    try:
        with progress_display(
            total=len(plan.items),
            initial=progress.next_index,
            desc="encode",
            unit="img",
            disable=not a.progress,
            leave=True,
        ) as bar:
            for (_, items, _), encoded in _ordered_map(
                pool, encode_batch, tasks, window, lambda t: [it.rel for it in t[1]]
            ):
                blob, offset = memoryview(encoded.blob), 0
                for item, size, skip in zip(items, encoded.sizes, encoded.skips, strict=True):
                    if skip is not None:
                        encode_skips.append(
                            {"path": item.rel, "reason": skip[0], "detail": skip[1], "index": item.index}
                        )
                    else:
                        writer.add(item.split, blob[offset : offset + size], item.index)
                        offset += size
                bar.update(len(items))
        writer.close(len(plan.items))
    finally:
        writer.abandon()
    encode_seconds = time.perf_counter() - t_encode
    return _finish(a, found, plan, progress, encode_skips, out, args, t0, len(todo), encode_seconds, log, sink)


def _finish(
    a: PrepArgs,
    found: Scan,
    plan: Plan,
    progress: Progress,
    encode_skips: list[dict],
    out: Path,
    args: dict,
    t0: float,
    n_encoded: int,
    encode_seconds: float,
    log: Callable[[str], None],
    sink: Uploader | None = None,
) -> dict:
    """Write skipped.jsonl, then _info.json last; the progress file goes once _info.json is in place."""
    shards = progress.shards
    kept = {s["file"] for s in shards}
    remove_outputs(out, keep=kept | {index_path(out / f).name for f in kept} | {PROGRESS_NAME})
    # A resumed run's earlier shards: index deleted meanwhile? (Uploaded shards have left the staging folder.)
    ensure_indexes(out, {s["file"]: s for s in shards if sink is None or (out / s["file"]).is_file()})
    skipped_idx = {s["index"] for s in encode_skips}
    skipped = sorted(
        [*plan.skipped, *({k: v for k, v in s.items() if k != "index"} for s in encode_skips)],
        key=lambda r: r["path"],
    )
    write_skipped(out, sorted([*skipped, *plan.duplicates], key=lambda r: r["path"]))
    per_split = {split: {c: 0 for c in found.classes} for split in SPLITS}
    for it in plan.items:
        if it.index not in skipped_idx:
            per_split[it.split][it.class_name] += 1
    written = sum(s["count"] for s in shards)
    if written == 0:
        raise PrepError(f"no usable image under {a.src}: every file was skipped (see {out}/skipped.jsonl)")
    usable = [c for c in found.classes if any(per_split[split][c] for split in SPLITS)]
    if len(usable) < 2:
        raise PrepError(
            f"only class {usable[0]!r} has usable images under {a.src}; a classifier needs at least 2 "
            f"(see {out}/skipped.jsonl)"
        )
    counts = {
        "found": len(found.candidates),
        "written": written,
        "duplicates": len(plan.duplicates),
        "leakage": sum(d["leakage"] for d in plan.duplicates),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "ignored_non_images": found.ignored,
        "per_split": per_split,
    }
    assert counts["found"] == written + counts["duplicates"] + counts["skipped"], counts
    info = {
        "name": Path(args["src"]).name,
        "tool": "catdog-prep",
        "version": catdog_version(),
        "classes": list(found.classes),
        "layout": found.layout,
        "splits": splits_json(shards),
        "args": args,
        "counts": counts,
        "source": {"path": args["src"], "fingerprint": found.fingerprint},
        "shards": {s["file"]: {"bytes": s["bytes"], "sha256": s["sha256"]} for s in shards},
    }
    if sink is None:
        atomic_write_json(out / INFO_NAME, info)
        (out / PROGRESS_NAME).unlink(missing_ok=True)
    else:
        sink.finish(info)  # the last uploads, then _info.json
    seconds = time.perf_counter() - t0
    summary = {
        "status": "written",
        "counts": counts,
        "out": str(out if sink is None else sink.dest),
        "seconds": seconds,
        "encode_images_per_s": n_encoded / encode_seconds if encode_seconds > 0 else 0.0,
        "images_per_s": len(plan.items) / seconds,
        "bytes": sum(s["bytes"] for s in shards),
        "shards": len(shards),
        "workers": a.workers,
    }
    log(format_summary(summary, found.classes))
    return summary


def format_summary(summary: dict, classes: tuple[str, ...]) -> str:
    """The end-of-run table: samples per split and class, skips by reason, throughput, size."""
    c = summary["counts"]
    width = max(8, *(len(k) for k in classes))
    lines = ["", f"{'split':<6} {'class':<{width}} {'samples':>8}"]
    for split in SPLITS:
        for cls in classes:
            lines.append(f"{split:<6} {cls:<{width}} {c['per_split'][split][cls]:>8,}")
        lines.append(f"{split:<6} {'(all)':<{width}} {sum(c['per_split'][split].values()):>8,}")
    lines.append(
        f"found {c['found']:,} = written {c['written']:,} + duplicates {c['duplicates']:,} "
        f"(leakage across splits: {c['leakage']:,}) + skipped {c['skipped']:,}"
    )
    for reason, n in c["skipped_by_reason"].items():
        lines.append(f"  skipped {reason}: {n:,}")
    if c["ignored_non_images"]:
        lines.append(f"  ignored (no image extension or hidden): {c['ignored_non_images']:,}")
    lines.append(
        f"{summary['images_per_s']:,.0f} images/s overall ({summary['seconds']:.1f} s, {summary['workers']} workers; "
        f"encoding {summary['encode_images_per_s']:,.0f} images/s)"
    )
    lines.append(f"wrote {summary['bytes'] / 1e6:,.1f} MB in {summary['shards']} shards to {summary['out']}")
    return "\n".join(lines)
