"""``catdog-evaluate MODEL DATA [--split test] [--out DIR]``: score a trained model on any labelled set.

DATA is a catdog-prep shard folder (one split of it) or a labelled photo folder in any layout catdog-prep accepts
(class-per-folder, pre-split train/val/test, Kaggle ``cat.1.jpg``). The class names must be the model's.
Photos are fed exactly as validation fed their shard copies (train/use/inputs.py), and the scalar metrics are the
trainer's own (``train.metrics.metric_collection``), so on the photos behind a run's val shards this reproduces
the run's val metrics.

Runs on several processes (``accelerate launch --multi_gpu --num_processes N -m train.use.evaluate ...``): rank r
takes eval batches r, r+N, ... (``train.data.streams.eval_batches``), so each sample is read by exactly one rank; the
per-sample results are gathered once at the end, checked for exactly-once, and scored on the main process.

Writes to --out: metrics.json (accuracy, precision, recall, F1, ROC-AUC, loss, per class, expected calibration
error, confusion matrix), predictions.csv, skipped.jsonl, confusion_matrix.png, roc.png, pr.png,
reliability.png, and the most confident mistakes as mistakes.png (contact sheet) and mistakes.html.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from data_prep.cli import Parser, add_no_progress, add_out, say
from data_prep.cpus import decode_workers, threads_per_rank
from data_prep.info import INFO_NAME, InfoError, load_info
from data_prep.progress import disable_progress, progress
from data_prep.scan import PRESPLIT_LAYOUTS, ScanError, scan
from data_prep.storage import is_url
from train.config import PRECISIONS
from train.data.streams import eval_batches, eval_loader
from train.data.workers import guarded, worker_died
from train.formats.bundle import BundleError
from train.hardware.gpus import wait_for_everyone
from train.hardware.memory import keep_freed_memory
from train.use.classifier import load_classifier, resolve_device, runs_on_gpu
from train.use.eval_report import EvalError, write_outputs
from train.use.inputs import Entry, denormalise, image_loader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="catdog-evaluate", description="Score a trained catdog model on labelled data.")
    p.add_argument("model", help="bundle folder (run.dir/model), run dir, or exported .onnx / .pt file")
    p.add_argument("data", help="catdog-prep shard folder, or a labelled photo folder (any catdog-prep layout)")
    p.add_argument("--split", default="test", help="split of a shard folder or pre-split photo folder (default test)")
    add_out(p, "folder for metrics, plots and the gallery (default outputs/evaluate)", default="outputs/evaluate")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per process (default 64)")
    p.add_argument(
        "--workers",
        type=int,
        help="decode processes per process (default: 2 on CPU; on a GPU every CPU of the rank but one, at most 16)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto | cpu | cuda | cuda:N (one process; under accelerate launch each rank takes its own GPU)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default): the run's training precision where this device has it natively (bf16 models are "
        "scored in bf16 as the trainer's validation did), else fp32. fp16: GPUs only (refused on CPU)",
    )
    p.add_argument("--layout", default="auto", help="photo folder layout, as catdog-prep --layout (default auto)")
    p.add_argument("--mistakes", type=int, default=16, help="most confident mistakes in the gallery (default 16)")
    p.add_argument("--checkpoint", default="best", help="for a run dir without a bundle: best | last | PATH")
    add_no_progress(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_progress:
        disable_progress()
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0) or args.mistakes < 0:
        print("catdog-evaluate: --batch-size must be >= 1, --workers and --mistakes >= 0", file=sys.stderr)
        return 2
    try:
        result = evaluate_cli(args)
    except (BundleError, InfoError, ScanError, EvalError) as e:
        say(f"catdog-evaluate: {e}")  # each rank says it; one write each keeps the lines whole
        return 2
    except Exception as e:
        if (death := worker_died(e)) is None:
            raise
        say(
            f"catdog-evaluate: {death}; nothing was written. Try fewer --workers (were {args.workers}) or a smaller "
            f"--batch-size (was {args.batch_size})"
        )
        return 1
    if result is not None:
        m = result
        print(
            f"catdog-evaluate: {m['samples']} samples ({m['skipped']} skipped) of {m['data']} on "
            f"{m['processes']} process(es): accuracy={m['accuracy']:.4f} f1={m['f1']:.4f} auroc={m['auroc']:.4f} "
            f"loss={m['loss']:.4f} ece={m['calibration_error']:.4f}; wrote {args.out}"
        )
    return 0


def evaluate_cli(args: argparse.Namespace) -> dict | None:
    """Run the evaluation on this rank; the main process writes the outputs and returns metrics.json's dict."""
    resolve_device(args.device)  # a clear error for cuda without a GPU, or a GPU index this machine lacks
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu)
    if acc.device.type == "cpu":
        # N ranks each using every core would oversubscribe the CPU: the trainer's split (OMP_NUM_THREADS wins).
        torch.set_num_threads(threads_per_rank())
        keep_freed_memory()  # large activations (InceptionV3) reuse the heap: train/hardware/memory.py
    try:
        device = str(acc.device)
        if args.device.startswith("cuda:"):
            if acc.num_processes > 1:
                raise BundleError(
                    f"--device {args.device} picks one GPU for one process; under accelerate launch each rank "
                    "takes its own: pass --device cuda (or auto)"
                )
            device = args.device
        clf = load_classifier(args.model, device=device, precision=args.precision, checkpoint=args.checkpoint)
        if args.workers is None:
            args.workers = decode_workers(runs_on_gpu(clf))
        source = _data_source(args, clf)
        records, mistakes, skipped = source(acc.process_index, acc.num_processes, not acc.is_main_process)
        # One gather at the end: ranks may hold different numbers of batches, so nothing collective runs per batch.
        records = gather_object(records)
        mistakes = gather_object(mistakes)
        skipped = gather_object(skipped)
        if not acc.is_main_process:
            wait_for_everyone(acc)
            return None
        try:
            return write_outputs(args, clf, records, mistakes, skipped, acc.num_processes)
        finally:
            wait_for_everyone(acc)
    finally:
        # Destroy the process group before the interpreter exits: a gloo group left to interpreter finalisation
        # can abort a rank ("terminate called without an active exception", SIGABRT) after its work is done.
        acc.end_training()


def _data_source(args, clf):
    """A function (rank, world, quiet) -> (records, top mistakes, skipped) for DATA; checks classes first. ``quiet``:
    no progress display (every rank but the main one)."""
    data = Path(args.data)
    model_classes = list(clf.classes)
    if is_url(args.data) or (data / INFO_NAME).is_file():  # a URL is a shard folder (photos are local)
        info = load_info(args.data)
        data = info.root
        if info.is_remote:
            args.data = str(data)  # as metrics.json reports it: without a URL's user:password@
        _check_classes(list(info.classes), model_classes, f"{data / INFO_NAME}")
        split = info.split(args.split)
        if split.num_samples == 0:
            with_samples = [s for s, v in info.splits.items() if v.num_samples]
            raise EvalError(f"split {args.split!r} of {data} has no samples; pass --split one of {with_samples}")
        return lambda rank, world, quiet: _run_shards(args, clf, info, rank, world, quiet)
    if not data.exists():
        raise EvalError(f"DATA {data} does not exist: pass a catdog-prep shard folder or a labelled photo folder")
    found, how = scan(data, args.layout)
    candidates = list(found.candidates)
    if found.layout not in PRESPLIT_LAYOUTS:
        args.split = "all"  # no split folders: every labelled photo is evaluated (recorded as such in metrics.json)
    else:
        present = sorted({c.split for c in candidates if c.split})
        candidates = [c for c in candidates if c.split == args.split]
        if not candidates:
            raise EvalError(f"{data} ({how}) has no {args.split!r} split; pass --split one of {present}")
    labels = sorted({c.label for c in candidates if c.problem is None and c.label is not None})
    _check_classes(labels, model_classes, f"{data} ({how})")
    index = {c: i for i, c in enumerate(model_classes)}
    entries = [
        Entry(
            c.rel,
            data / c.rel,
            c.problem or (None if c.label in index else ("no_label", "no class")),
            index.get(c.label, -1),
        )
        for c in candidates
    ]
    return lambda rank, world, quiet: _run_photos(args, clf, entries, rank, world, quiet)


def _check_classes(data_classes: list[str], model_classes: list[str], where: str) -> None:
    if data_classes != model_classes:
        raise EvalError(
            f"the classes of {where}, {data_classes}, do not match the model's, {model_classes}; evaluate on data "
            "labelled with the model's classes"
        )


def _keep_mistake(heap: list, k: int, item: tuple) -> None:
    """Keep the k most confident mistakes: (confidence, id, name, label, prediction, uint8 CHW image)."""
    if k == 0:
        return
    if len(heap) < k:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def _consume(clf, x, y, ids, names, records, heap, k):
    logits = clf(x)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    for j in range(len(ids)):
        records.append((ids[j], names[j], int(y[j]), logits[j].tolist()))
        if int(pred[j]) != int(y[j]):
            image = None
            if k and (len(heap) < k or (float(conf[j]), ids[j]) > heap[0][:2]):
                image = denormalise(x[j : j + 1], clf.meta)[0]
            _keep_mistake(heap, k, (float(conf[j]), ids[j], names[j], int(y[j]), int(pred[j]), image))


def _run_shards(args, clf, info, rank: int, world: int, quiet: bool):
    """The trainer's own eval reader over one split: every sample once across ranks, corrupt ones dropped."""
    cfg = clf.data_config(dir=str(info.root), num_workers=args.workers, on_error="skip")
    batches = eval_loader(
        cfg, info, split=args.split, batch_size=args.batch_size, image_size=clf.image_size, rank=rank,
        world_size=world, with_keys=True, pin_memory=runs_on_gpu(clf),
    )  # fmt: skip
    records, heap = [], []
    for x, y, keys in progress(batches, desc="evaluate", unit="batch", disable=quiet):
        names = [f"{args.split}/{key}" for key in keys]
        _consume(clf, x, y, names, names, records, heap, args.mistakes)
    stats = batches.stats()
    skipped = [{"path": shard, "reason": "corrupt", "samples": n} for shard, n in stats["corrupt_by_shard"].items()]
    return records, heap, skipped


def _run_photos(args, clf, entries, rank: int, world: int, quiet: bool):
    """Labelled photos: eval batch k (of the readable entries, in scan order) goes to rank k % world."""
    todo = [i for i, e in enumerate(entries) if e.problem is None]
    skipped = []
    if rank == 0:
        skipped = [{"path": e.name, "reason": e.problem[0], "detail": e.problem[1]} for e in entries if e.problem]
    positions = eval_batches(len(todo), batch_size=args.batch_size, rank=rank, world_size=world)
    batches = [[todo[p] for p in batch] for batch in positions]
    records, heap = [], []
    if batches:
        loader = guarded(image_loader(clf, entries, batches, workers=args.workers))
        for x, ok, skips in progress(loader, total=len(batches), desc="evaluate", unit="batch", disable=quiet):
            skipped += [{"path": entries[i].name, "reason": r, "detail": d} for i, r, d in skips]
            if x is None:
                continue
            y = torch.tensor([entries[i].label for i in ok])
            _consume(clf, x, y, ok, [entries[i].name for i in ok], records, heap, args.mistakes)
    return records, heap, skipped


if __name__ == "__main__":
    sys.exit(main())
