"""``catdog-evaluate MODEL DATA [--split test] [--out DIR]``: score a trained model on any labelled set.

DATA is a catdog-prep shard folder (one split of it) or a labelled photo folder in any layout catdog-prep accepts
(class-per-folder, pre-split train/val/test, Kaggle ``cat.1.jpg``). The class names must be the model's.
Photos are fed exactly as validation fed their shard copies (train/inference.py), and the scalar metrics are the
trainer's own (``train.engine._metric_collection``), so on the photos behind a run's val shards this reproduces
the run's val metrics.

Runs on several processes (``accelerate launch --multi_gpu --num_processes N -m train.evaluation ...``): rank r
takes eval batches r, r+N, ... (``train.data.eval_batches``), so each sample is read by exactly one rank; the
per-sample results are gathered once at the end, checked for exactly-once, and scored on the main process.

Writes to --out: metrics.json (accuracy, precision, recall, F1, ROC-AUC, loss, per class, expected calibration
error, confusion matrix), predictions.csv, skipped.jsonl, confusion_matrix.png, roc.png, pr.png,
reliability.png, and the most confident mistakes as mistakes.png (contact sheet) and mistakes.html.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import html
import io
import json
import sys
from pathlib import Path

CALIBRATION_BINS = 15


class EvalError(ValueError):
    """DATA cannot be evaluated with this model; one line naming what and what to do."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="catdog-evaluate", description="Score a trained catdog model on labelled data.")
    p.add_argument("model", help="bundle folder (run.dir/model), run dir, or exported .onnx / .pt file")
    p.add_argument("data", help="catdog-prep shard folder, or a labelled photo folder (any catdog-prep layout)")
    p.add_argument("--split", default="test", help="split of a shard folder or pre-split photo folder (default test)")
    p.add_argument("--out", default="outputs/evaluate", help="folder for metrics, plots and the gallery")
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
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto (default): the run's training precision where this device has it natively (bf16 models are "
        "scored in bf16 as the trainer's validation did), else fp32",
    )
    p.add_argument("--layout", default="auto", help="photo folder layout, as catdog-prep --layout (default auto)")
    p.add_argument("--mistakes", type=int, default=16, help="most confident mistakes in the gallery (default 16)")
    p.add_argument("--checkpoint", default="best", help="for a run dir without a bundle: best | last | PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0) or args.mistakes < 0:
        print("catdog-evaluate: --batch-size must be >= 1, --workers and --mistakes >= 0", file=sys.stderr)
        return 2
    from data_prep.info import InfoError
    from data_prep.scan import ScanError
    from train.bundle import BundleError

    try:
        result = evaluate_cli(args)
    except (BundleError, InfoError, ScanError, EvalError) as e:
        print(f"catdog-evaluate: {e}", file=sys.stderr)
        return 2
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
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from train.bundle import BundleError
    from train.cpu_memory import keep_freed_memory
    from train.distributed import wait_for_everyone
    from train.inference import default_decode_workers, load_classifier, resolve_device, runs_on_gpu
    from train.trainer import cpu_threads

    resolve_device(args.device)  # a clear error for cuda without a GPU, or a GPU index this machine lacks
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu)
    if acc.device.type == "cpu":
        # N ranks each using every core would oversubscribe the CPU: the trainer's split (OMP_NUM_THREADS wins).
        torch.set_num_threads(cpu_threads())
        keep_freed_memory()  # large activations (InceptionV3) reuse the heap: train/cpu_memory.py
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
            args.workers = default_decode_workers(runs_on_gpu(clf))
        source = _data_source(args, clf)
        records, mistakes, skipped = source(acc.process_index, acc.num_processes)
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
    """A function (rank, world) -> (records, top mistakes, skipped) for DATA; checks classes first."""
    from data_prep.info import INFO_NAME, load_info
    from data_prep.scan import PRESPLIT_LAYOUTS, scan

    data = Path(args.data)
    model_classes = list(clf.classes)
    if (data / INFO_NAME).is_file():
        info = load_info(data)
        _check_classes(list(info.classes), model_classes, f"{data / INFO_NAME}")
        split = info.split(args.split)
        if split.num_samples == 0:
            with_samples = [s for s, v in info.splits.items() if v.num_samples]
            raise EvalError(f"split {args.split!r} of {data} has no samples; pass --split one of {with_samples}")
        return lambda rank, world: _run_shards(args, clf, info, rank, world)
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
    from train.inference import Entry

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
    return lambda rank, world: _run_photos(args, clf, entries, rank, world)


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
    from train.inference import denormalise

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


def _run_shards(args, clf, info, rank: int, world: int):
    """The trainer's own eval reader over one split: every sample once across ranks, corrupt ones dropped."""
    from train.data import eval_loader
    from train.inference import runs_on_gpu

    cfg = clf.data_config(dir=str(info.root), num_workers=args.workers, on_error="skip")
    batches = eval_loader(
        cfg, info, split=args.split, batch_size=args.batch_size, image_size=clf.image_size, rank=rank,
        world_size=world, with_keys=True, pin_memory=runs_on_gpu(clf),
    )  # fmt: skip
    records, heap = [], []
    for x, y, keys in batches:
        names = [f"{args.split}/{key}" for key in keys]
        _consume(clf, x, y, names, names, records, heap, args.mistakes)
    stats = batches.stats()
    skipped = [{"path": shard, "reason": "corrupt", "samples": n} for shard, n in stats["corrupt_by_shard"].items()]
    return records, heap, skipped


def _merge_corrupt(skipped: list[dict]) -> list[dict]:
    """One row per shard with its corrupt-sample count summed over ranks (each rank counts the samples of its own
    batches, so a shard's may be split across ranks); every other skip row is one input and stays as it is."""
    per_shard: dict[str, int] = {}
    rows = []
    for s in skipped:
        if "samples" in s:
            per_shard[s["path"]] = per_shard.get(s["path"], 0) + s["samples"]
        else:
            rows.append(s)
    shards = [
        {"path": path, "reason": "corrupt", "samples": n, "detail": f"{n} corrupt sample(s) skipped"}
        for path, n in sorted(per_shard.items())
    ]
    return shards + rows


def _run_photos(args, clf, entries, rank: int, world: int):
    """Labelled photos: eval batch k (of the readable entries, in scan order) goes to rank k % world."""
    import torch

    from train.data import eval_batches
    from train.inference import image_loader

    todo = [i for i, e in enumerate(entries) if e.problem is None]
    skipped = []
    if rank == 0:
        skipped = [{"path": e.name, "reason": e.problem[0], "detail": e.problem[1]} for e in entries if e.problem]
    positions = eval_batches(len(todo), batch_size=args.batch_size, rank=rank, world_size=world)
    batches = [[todo[p] for p in batch] for batch in positions]
    records, heap = [], []
    if batches:
        for x, ok, skips in image_loader(clf, entries, batches, workers=args.workers):
            skipped += [{"path": entries[i].name, "reason": r, "detail": d} for i, r, d in skips]
            if x is None:
                continue
            y = torch.tensor([entries[i].label for i in ok])
            _consume(clf, x, y, ok, [entries[i].name for i in ok], records, heap, args.mistakes)
    return records, heap, skipped


def compute_metrics(logits, labels, classes: list[str]) -> dict:
    """The trainer's scalars (same torchmetrics objects) + loss, per-class metrics, calibration error, confusion
    matrix, ROC and precision-recall curves."""
    import torch
    import torch.nn.functional as F
    from torchmetrics.classification import (
        BinaryPrecisionRecallCurve,
        MulticlassAUROC,
        MulticlassCalibrationError,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassPrecisionRecallCurve,
        MulticlassRecall,
    )

    from train.engine import ROC_THRESHOLDS, _metric_collection

    n, c = logits.shape
    probs = logits.softmax(1)
    scores = probs[:, 1] if c == 2 else probs
    scalars, roc = _metric_collection(c)
    # Every sample is already here (gathered once): no metric may try to sync across ranks, which only the main
    # process reaches.
    local = {"sync_on_compute": False}
    for m in (*scalars.values(), roc):
        m.sync_on_compute = m._to_sync = False  # _to_sync: what compute() reads (torchmetrics 1.x)
    scalars.update(scores, labels)
    roc.update(scores, labels)
    out: dict = {"samples": n, "loss": float(F.cross_entropy(logits, labels, reduction="none").double().mean())}
    out.update({k: float(v) for k, v in scalars.compute().items()})
    confusion = MulticlassConfusionMatrix(c, **local)
    confusion.update(probs.argmax(1), labels)
    matrix = confusion.compute()
    out["confusion_matrix"] = matrix.tolist()
    missing_class = bool((matrix.sum(1) == 0).any())
    if missing_class:  # as the trainer: ROC-AUC is undefined when a class has no samples
        out["auroc"] = float("nan")
    ece = MulticlassCalibrationError(c, n_bins=CALIBRATION_BINS, norm="l1", **local)
    out["calibration_error"] = float(ece(probs, labels))
    per = {
        "precision": MulticlassPrecision(c, average=None, **local)(probs, labels),
        "recall": MulticlassRecall(c, average=None, **local)(probs, labels),
        "f1": MulticlassF1Score(c, average=None, **local)(probs, labels),
        "auroc": MulticlassAUROC(c, average=None, thresholds=ROC_THRESHOLDS, **local)(probs, labels),
    }
    support = torch.bincount(labels, minlength=c)
    out["per_class"] = {
        name: {
            **{k: float(v[i]) if support[i] else float("nan") for k, v in per.items()},
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    fpr, tpr, _ = roc.compute()
    if c == 2:
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        precision, recall, _ = BinaryPrecisionRecallCurve(thresholds=ROC_THRESHOLDS, **local)(scores, labels)
        out["pr"] = {"precision": precision.tolist(), "recall": recall.tolist()}
    else:
        out["roc"] = {"fpr": [f.tolist() for f in fpr], "tpr": [t.tolist() for t in tpr]}
        precision, recall, _ = MulticlassPrecisionRecallCurve(c, thresholds=ROC_THRESHOLDS, **local)(probs, labels)
        out["pr"] = {"precision": [p.tolist() for p in precision], "recall": [r.tolist() for r in recall]}
    out["reliability"] = _reliability(probs, labels)
    return out


def _reliability(probs, labels) -> dict:
    """Per confidence bin (top-label confidence, CALIBRATION_BINS equal-width bins): count, accuracy, confidence."""
    import torch

    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1)
    bins = torch.bucketize(conf, edges[1:-1], right=False)
    correct = (pred == labels).float()
    rows = []
    for b in range(CALIBRATION_BINS):
        m = bins == b
        k = int(m.sum())
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": k,
                "accuracy": float(correct[m].mean()) if k else None,
                "confidence": float(conf[m].mean()) if k else None,
            }
        )
    return {"bins": rows}


def write_outputs(args, clf, records, mistakes, skipped, processes: int) -> dict:
    import torch

    from data_prep.atomic import atomic_write_json, atomic_write_text
    from train import plots

    ids = [r[0] for r in records]
    if len(set(ids)) != len(ids):
        raise EvalError(f"internal error: {len(ids) - len(set(ids))} samples were evaluated twice across ranks")
    records.sort(key=lambda r: (str(type(r[0])), r[0]))
    if not records:
        raise EvalError(f"no readable labelled image in {args.data} (split {args.split}); see the skip reasons")
    logits = torch.tensor([r[3] for r in records], dtype=torch.float32)
    labels = torch.tensor([r[2] for r in records], dtype=torch.int64)
    classes = list(clf.classes)
    metrics = compute_metrics(logits, labels, classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = _merge_corrupt(skipped)
    by_reason: dict[str, int] = {}
    for s in skipped:  # samples, not rows: a corrupt-shard row stands for its count; the same for any process count
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + s.get("samples", 1)
    result = {
        "model": clf.describe(),
        "data": str(args.data),
        "split": args.split,
        "processes": processes,
        "skipped": sum(by_reason.values()),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        **{k: v for k, v in metrics.items() if k not in ("roc", "pr", "reliability")},
    }
    atomic_write_json(out / "metrics.json", {**result, "curves": {k: metrics[k] for k in ("roc", "pr", "reliability")}})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "prediction", *(f"p_{c}" for c in classes)])
    probs = logits.softmax(1)
    for (_, name, label, _), p in zip(records, probs.tolist(), strict=True):
        w.writerow([name, classes[label], classes[max(range(len(p)), key=p.__getitem__)], *(f"{q:.6f}" for q in p)])
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    title = Path(args.data).name + ("" if args.split == "all" else f" {args.split}")
    plots.confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png", title)
    plots.roc_curve(metrics["roc"], metrics["auroc"], classes, out / "roc.png", title)
    _pr_plot(metrics["pr"], classes, out / "pr.png", title)
    _reliability_plot(metrics["reliability"], metrics["calibration_error"], out / "reliability.png", title)
    top = sorted(mistakes, key=lambda m: (-m[0], str(m[1])))[: args.mistakes]  # gather_object concatenated the ranks
    _gallery(top, classes, Path(args.data), out)
    return result


def _pr_plot(pr: dict, classes: list[str], path: Path, title: str) -> None:
    from train.plots import _save, plt

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    if pr["precision"] and isinstance(pr["precision"][0], list):
        for name, p, r in zip(classes, pr["precision"], pr["recall"], strict=True):
            ax.plot(r, p, label=name)
    else:
        ax.plot(pr["recall"], pr["precision"], label=f"positive class: {classes[1]}")
    ax.legend(loc="lower left")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    _save(fig, path)


def _reliability_plot(rel: dict, ece: float, path: Path, title: str) -> None:
    from train.plots import _save, plt

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    bins = [b for b in rel["bins"] if b["count"]]
    width = 1 / CALIBRATION_BINS
    ax.bar(
        [b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", alpha=0.7, label="accuracy"
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfect calibration")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {ece:.3f}")
    ax.legend(loc="upper left")
    _save(fig, path)


def _gallery(top: list, classes: list[str], data: Path, out: Path) -> None:
    """mistakes.png (contact sheet) + mistakes.html (+ mistakes/NN.png): the crops the model saw, most confident
    mistakes first, with true label, prediction and its probability."""
    import math

    from PIL import Image

    from data_prep.atomic import atomic_write_bytes, atomic_write_text
    from train.plots import _save, plt

    folder = out / "mistakes"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    cells = []
    for n, (conf, _, name, label, pred, image) in enumerate(top):
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "PNG")
        atomic_write_bytes(folder / f"{n:03d}.png", buf.getvalue())
        cells.append((n, name, classes[label], classes[pred], conf, image))
    cols = 4
    rows = max(1, math.ceil(len(cells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, _, true, pred, conf, image) in zip(axes.flat, cells, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"true {true}\npred {pred} {conf:.2f}", fontsize=8)
    if not cells:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    _save(fig, out / "mistakes.png")
    items = []
    for n, name, true, pred, conf, _ in cells:
        source = data / name
        link = (
            f'<a href="{html.escape(source.resolve().as_uri())}">{html.escape(name)}</a>'
            if source.is_file()
            else html.escape(name)
        )
        items.append(
            f'<figure><img src="mistakes/{n:03d}.png" width="160"><figcaption>{link}<br>true <b>{html.escape(true)}'
            f"</b>, predicted <b>{html.escape(pred)}</b> ({conf:.3f})</figcaption></figure>"
        )
    page = (
        "<!doctype html><meta charset=utf-8><title>catdog: most confident mistakes</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px;width:170px;font-size:12px;"
        "word-break:break-all}</style>"
        f"<h1>Most confident mistakes ({len(cells)})</h1><p>The crops the model saw (eval transform).</p>"
        + ("".join(items) or "<p>No mistakes.</p>")
    )
    atomic_write_text(out / "mistakes.html", page)


if __name__ == "__main__":
    sys.exit(main())
