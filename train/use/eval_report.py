"""What catdog-evaluate writes: the metrics of every gathered sample, the files and plots, the gallery of mistakes.

The scalar metrics are the trainer's own (``train.metrics.metric_collection``, the same torchmetrics objects), plus
loss, per-class metrics, expected calibration error, ROC and precision-recall curves and a reliability diagram.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
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

from data_prep.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from train import plots
from train.metrics import ROC_THRESHOLDS, metric_collection


class EvalError(ValueError):
    """DATA cannot be evaluated with this model; one line naming what and what to do."""


CALIBRATION_BINS = 15


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


def compute_metrics(logits, labels, classes: list[str]) -> dict:
    """The trainer's scalars (same torchmetrics objects) + loss, per-class metrics, calibration error, confusion
    matrix, ROC and precision-recall curves."""

    n, c = logits.shape
    probs = logits.softmax(1)
    scores = probs[:, 1] if c == 2 else probs
    scalars, roc = metric_collection(c)
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
    plots.pr_curve(metrics["pr"], classes, out / "pr.png", title)
    plots.reliability_diagram(metrics["reliability"], metrics["calibration_error"], out / "reliability.png", title)
    top = sorted(mistakes, key=lambda m: (-m[0], str(m[1])))[: args.mistakes]  # gather_object concatenated the ranks
    _gallery(top, classes, Path(args.data), out)
    return result


def _gallery(top: list, classes: list[str], data: Path, out: Path) -> None:
    """mistakes.png (contact sheet) + mistakes.html (+ mistakes/NN.png): the crops the model saw, most confident
    mistakes first, with true label, prediction and its probability."""

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
    fig, axes = plots.plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, _, true, pred, conf, image) in zip(axes.flat, cells, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"true {true}\npred {pred} {conf:.2f}", fontsize=8)
    if not cells:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    plots.save_figure(fig, out / "mistakes.png")
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
