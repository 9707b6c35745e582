"""``catdog-predict MODEL INPUT...``: classify photos with a trained model; one row per input, bad inputs included.

MODEL is a bundle folder (run.dir/model), a run dir, or an exported .onnx / .pt file. INPUT is image files,
folders (recursive), globs, or shard folders written by catdog-prep. Photos go through catdog-prep's decode and
resize and then the eval transform (train/use/inputs.py): with ``--decode exact`` the model sees them as it saw its
validation shards; the default (``fast``) runs catdog-prep's step straight to the eval resize size.
A bad input (not an image, truncated, empty, unreadable, too large, ...) becomes a row with the reason; it never
stops the run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_text
from data_prep.cli import Parser, add_no_progress, add_out
from data_prep.cpus import CPU_DECODE_WORKERS, decode_workers, threads_beside
from data_prep.info import InfoError, load_info
from data_prep.progress import disable_progress, progress
from train.config import PRECISIONS
from train.data.streams import eval_loader
from train.data.workers import worker_died
from train.formats.bundle import BundleError
from train.hardware.memory import keep_freed_memory
from train.use.classifier import load_classifier, probabilities, resolve_device, runs_on_gpu
from train.use.inputs import chunk, expand_inputs, scored_batches, scores_in_workers, workers_can_score

TABLE_MAX_ROWS = 50  # more rows than this and no --out: they go to predictions.csv instead of the terminal
DEFAULT_OUTPUT = "predictions.csv"
# Default images per forward pass. On CPU a smaller batch keeps the activations nearer the caches while the workers
# share the cores: bench/predict.py on 2 cores (demo model, fp32, 2026-11-29, model in the main process) gave 212.8
# img/s at 32 vs 159.0 at 64; with the model in the workers (2026-12-02, bf16) 16, 32 and 64 were within the noise
# of each other. GPUs want bigger batches; 64 there is unmeasured (no GPU was lent).
CPU_BATCH, GPU_BATCH = 32, 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog="catdog-predict",
        description="Classify photos with a trained catdog model. Few rows print as a table; more go to a file.",
    )
    p.add_argument("model", help="bundle folder (run.dir/model), run dir, or exported .onnx / .pt file")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive), globs, shard folders")
    add_out(p, f"write rows to this .csv or .jsonl (default: a table, or {DEFAULT_OUTPUT})", "--output", metavar="FILE")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"images per forward pass (default {CPU_BATCH} on CPU, {GPU_BATCH} on a GPU)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes (default, with a PyTorch or TorchScript model on CPU under Linux: one per CPU, each "
        "decoding and scoring whole batches; on a GPU: every CPU but one, decoding; otherwise on CPU (ONNX, macOS): 2, "
        "decoding; at most 16; 0 = everything in this process)",
    )
    p.add_argument("--tta", choices=("none", "flip"), default="none", help="flip: average with the mirrored image")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default): bf16 autocast where the device has native bf16 and the model trained in bf16 (as "
        "catdog-evaluate and the trainer's validation), else fp32. fp16: GPUs only (refused on CPU); an ONNX model "
        "runs as exported (fp32)",
    )
    p.add_argument(
        "--decode",
        choices=("fast", "exact"),
        default="fast",
        help="fast (default): catdog-prep's decode straight to the model's input size, with JPEG draft decoding for "
        "big photos, as timm or Hugging Face resize a photo for its model; exact: the pixels validation saw "
        "(catdog-prep at the shards' size, JPEG round trip, eval resize), what catdog-evaluate feeds the model: "
        "~2x the decode work, and the same prediction for ~98.5%% of photos",
    )
    p.add_argument("--checkpoint", default="best", help="for a run dir without a bundle: best | last | PATH")
    add_no_progress(p)
    return p.parse_args(argv)


def _fail(msg: str, code: int) -> int:
    print(f"catdog-predict: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_progress:
        disable_progress()
    if (args.batch_size is not None and args.batch_size < 1) or (args.workers is not None and args.workers < 0):
        return _fail(f"--batch-size must be >= 1 and --workers >= 0 (got {args.batch_size}, {args.workers})", 2)
    if args.out and Path(args.out).suffix not in (".csv", ".jsonl"):
        return _fail(f"--out {args.out}: use a .csv or .jsonl file name", 2)

    try:
        device = resolve_device(args.device)
        if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            # The workers take cores too: model threads + workers > cores makes OpenMP's barriers spin against each
            # other (measured on 2 busy cores: 270 ms instead of 10 ms per single-image forward). Before the model
            # loads: an ONNX session takes its thread count when it is created. Where a torch model scores in the
            # workers (one thread each), this process only collects rows: the threads left over are idle.
            workers = args.workers
            if workers is None:
                scores = Path(args.model).suffix != ".onnx" and workers_can_score(device)
                workers = decode_workers(False, scores=scores)
            torch.set_num_threads(threads_beside(workers))
        clf = load_classifier(
            args.model, device=device, precision=args.precision, checkpoint=args.checkpoint, fuse=True
        )
        entries, shard_dirs = expand_inputs(args.inputs)
    except (BundleError, InfoError) as e:
        return _fail(str(e), 2)
    on_gpu = runs_on_gpu(clf)
    scores = scores_in_workers(clf)
    if args.batch_size is None:
        args.batch_size = GPU_BATCH if on_gpu else CPU_BATCH
    args.workers_given = args.workers is not None
    if args.workers is None:
        args.workers = decode_workers(on_gpu, scores=scores)
    on_cpu = getattr(clf, "device", None) is not None and clf.device.type == "cpu"
    if on_cpu:
        # Before the decode workers fork. InceptionV3's 299 px activations are fresh mmaps per batch otherwise: its
        # CPU forward ran 4.3-4.6 -> 6.2-6.5 img/s with this (train/hardware/memory.py); the demo's CNN in the scoring
        # workers 50 -> 33 ms per 32-photo batch.
        keep_freed_memory()
    if not entries and not shard_dirs:
        return _fail(f"no images found in {' '.join(args.inputs)} (looked for image file extensions)", 2)
    try:
        rows, seconds = predict(clf, entries, shard_dirs, args)
    except (BundleError, InfoError) as e:
        return _fail(str(e), 2)
    except Exception as e:
        # A worker process killed under us (the kernel's OOM killer, most often: each one holds a batch of decoded
        # photos, and with the model on CPU its activations too).
        if (death := worker_died(e)) is None:
            raise
        return _fail(
            f"{death}; nothing was written. Try fewer --workers (were {args.workers}) or a smaller --batch-size "
            f"(was {args.batch_size})",
            1,
        )
    classified = sum(r[1] is not None for r in rows)
    skipped = Counter(r[2][0] for r in rows if r[1] is None)
    if rows and all(r[2] is not None and r[2][0] == "not_found" for r in rows):  # wrong input, not bad photos
        return _fail(f"INPUT {'; '.join(f'{r[0]}: {r[2][1]}' for r in rows[:3])}", 2)
    if classified == 0:
        examples = "; ".join(f"{name}: {skip[0]} ({skip[1]})" for name, _, skip in rows[:3])
        return _fail(f"none of the {len(rows)} inputs could be classified: {examples}", 1)
    where = write_rows(rows, clf.classes, args.out)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    print(
        f"catdog-predict: {len(rows)} inputs = {classified} classified + {sum(skipped.values())} skipped"
        f"{f' ({reasons})' if reasons else ''}; {classified / max(seconds, 1e-9):.1f} images/s "
        f"({clf.describe()}, {args.decode} decode, {_workers_text(args.workers_ran, args.scored)})"
        f"{f'; rows in {where}' if where else ''}",
        file=sys.stderr,
    )
    return 0


def _workers_text(workers: int, scores: bool) -> str:
    if not workers:
        return "no worker processes"
    return f"{workers} worker process{'es' if workers > 1 else ''} {'decoding and scoring' if scores else 'decoding'}"


Row = tuple[str, "list[float] | None", "tuple[str, str] | None"]


def predict(clf, entries, shard_dirs, args) -> tuple[list[Row], float]:
    """(rows in input order, seconds spent) for image entries and shard folders."""
    rows: list[Row | None] = [None] * len(entries)
    # What the summary line reports: the most worker processes a loader started (at most one per batch), and
    # whether they ran the model too.
    args.workers_ran, args.scored = 0, False
    infos = [load_info(d) for d in shard_dirs]
    total = len(entries) + sum(s.num_samples for info in infos for s in info.distinct_splits.values())
    bar = progress(total=total, unit="img", desc="predict")
    t0 = time.perf_counter()
    try:
        todo = [i for i, e in enumerate(entries) if e.problem is None]
        for i, e in enumerate(entries):
            if e.problem is not None:
                rows[i] = (e.name, None, e.problem)
                bar.update(1)
        if todo:
            batches = chunk(todo, args.batch_size)
            args.workers_ran = min(args.workers, len(batches))  # as image_loader starts them
            args.scored = args.workers_ran > 0 and scores_in_workers(clf)
            for probs, ok, skips in scored_batches(
                clf, entries, batches, workers=args.workers, decode=args.decode, tta=args.tta
            ):
                for i, reason, detail in skips:
                    rows[i] = (entries[i].name, None, (reason, detail))
                if probs is not None:
                    for i, p in zip(ok, probs.tolist(), strict=True):
                        rows[i] = (entries[i].name, p, None)
                bar.update(len(ok) + len(skips))
        out: list[Row] = [r for r in rows if r is not None]
        for info in infos:
            out += _predict_shards(clf, info, args, bar)
    finally:
        bar.close()
    return out, time.perf_counter() - t0


def _predict_shards(clf, info, args, bar) -> list[Row]:
    """Every sample of every split in a catdog-prep folder (``info``: its _info.json), read as the trainer's
    evaluation reads them; each split once (not again under its timm alias)."""
    root = info.root
    workers = args.workers
    if scores_in_workers(clf) and not getattr(args, "workers_given", True):
        # The default was one scoring worker per CPU; the trainer's shard loader only decodes and the model runs
        # here, so the split a model in this process gets by default: 2 decode workers, the other cores its threads.
        workers = min(workers, CPU_DECODE_WORKERS)
        if not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(threads_beside(workers))
    cfg = clf.data_config(dir=str(root), num_workers=workers, on_error="skip")
    rows: list[Row] = []
    for split, s in info.distinct_splits.items():
        if s.num_samples == 0:
            continue
        batches = eval_loader(
            cfg, info, split=split, batch_size=args.batch_size, image_size=clf.image_size, rank=0, world_size=1,
            with_keys=True, pin_memory=runs_on_gpu(clf),
        )  # fmt: skip
        args.workers_ran = max(args.workers_ran, min(workers, -(-s.num_samples // args.batch_size)))
        for x, _, keys in batches:
            probs = probabilities(clf, x, args.tta).tolist()
            rows += [(f"{root}/{split}/{key}", p, None) for key, p in zip(keys, probs, strict=True)]
            bar.update(len(keys))
        for shard, n in batches.stats()["corrupt_by_shard"].items():
            rows.append((f"{root}/{shard}", None, ("corrupt", f"{n} corrupt sample(s) in this shard were skipped")))
            bar.update(n)
    return rows


def write_rows(rows: list[Row], classes: tuple[str, ...], output: str | None) -> str:
    """Rows to ``output`` (.csv/.jsonl, atomically), or a table on stdout when few; returns the file written."""
    if output is None and len(rows) <= TABLE_MAX_ROWS:
        print(_table(rows, classes))
        return ""
    path = Path(output or DEFAULT_OUTPUT)
    if path.suffix == ".jsonl":
        atomic_write_text(path, "".join(row_json(n, classes, p, s) + "\n" for n, p, s in rows))
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "prediction", "probability", *(f"p_{c}" for c in classes), "skipped", "detail"])
        for name, probs, skip in rows:
            if probs is None:
                w.writerow([name, "", "", *([""] * len(classes)), *skip])
            else:
                best = max(range(len(classes)), key=lambda i: probs[i])
                w.writerow([name, classes[best], f"{probs[best]:.6f}", *(f"{q:.6f}" for q in probs), "", ""])
        atomic_write_text(path, buf.getvalue())
    return str(path)


def _table(rows: list[Row], classes: tuple[str, ...]) -> str:
    width = min(max(len(r[0]) for r in rows), 70)
    head = f"{'path':<{width}}  {'prediction':<10}  " + "  ".join(f"{c[:8]:>8}" for c in classes)
    lines = [head]
    for name, probs, skip in rows:
        shown = name if len(name) <= width else "..." + name[-(width - 3) :]
        if probs is None:
            lines.append(f"{shown:<{width}}  skipped: {skip[0]} ({skip[1]})")
        else:
            best = max(range(len(classes)), key=lambda i: probs[i])
            lines.append(f"{shown:<{width}}  {classes[best]:<10}  " + "  ".join(f"{q:>8.4f}" for q in probs))
    return "\n".join(lines)


def row_json(name: str, classes: Sequence[str], probs: Sequence[float] | None, skip: tuple[str, str] | None) -> str:
    """One JSONL row: {"path", "prediction", "probability", "probs": {class: p}} or {"path", "skipped", "detail"}."""
    if probs is None:
        return json.dumps({"path": name, "skipped": skip[0], "detail": skip[1]})
    best = max(range(len(classes)), key=lambda i: probs[i])
    return json.dumps(
        {
            "path": name,
            "prediction": classes[best],
            "probability": probs[best],
            "probs": dict(zip(classes, probs, strict=True)),
        }
    )


if __name__ == "__main__":
    sys.exit(main())
