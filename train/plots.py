"""PNG plots: a run's curves (train vs val), confusion matrix and ROC curve (run.dir/plots/), and catdog-evaluate's
precision-recall and reliability diagrams. One drawing of each, used by the trainer, catdog-evaluate and -report."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from data_prep.atomic import atomic_write_bytes  # noqa: E402


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: Path) -> Path:
    """Write the figure to ``path`` as PNG, atomically; closes it."""
    atomic_write_bytes(path, figure_png(fig))
    return path


def _curve(history: Sequence[dict], metric: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for split in ("train", "val"):
        pts = [(h["epoch"], h[f"{split}/{metric}"]) for h in history if f"{split}/{metric}" in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=f"{split} {metric}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def draw_confusion(ax, cm: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> None:
    """A confusion matrix (rows true, columns predicted) with its counts, on ``ax``."""
    ax.imshow(cm, cmap="Blues")
    peak = max(max(row) for row in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)


def confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    draw_confusion(ax, cm, classes, title)
    return save_figure(fig, path)


def roc_curve(roc: dict, auroc: float, classes: Sequence[str], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    if roc["fpr"] and isinstance(roc["fpr"][0], list):  # one curve per class (one-vs-rest)
        for name, fpr, tpr in zip(classes, roc["fpr"], roc["tpr"], strict=True):
            ax.plot(fpr, tpr, label=name)
        ax.legend()
    else:
        ax.plot(roc["fpr"], roc["tpr"], label=f"AUC {auroc:.3f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    return save_figure(fig, path)


def pr_curve(pr: dict, classes: Sequence[str], path: Path, title: str) -> Path:
    """Precision-recall curve(s): the positive class's for two classes, one per class otherwise."""
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
    return save_figure(fig, path)


def reliability_diagram(rel: dict, ece: float, path: Path, title: str) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration (``rel["bins"]``: low, high, count,
    accuracy of equal-width bins)."""
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    bins = [b for b in rel["bins"] if b["count"]]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    ax.bar(
        [b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", alpha=0.7, label="accuracy"
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfect calibration")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {ece:.3f}")
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def write_plots(out: Path, history: Sequence[dict], last_eval: dict, classes: Sequence[str]) -> dict[str, Path]:
    """All plots for the run so far; returns {name: path}."""
    plots = {}
    if history:
        plots["loss"] = _curve(history, "loss", "loss", out / "loss.png")
        plots["accuracy"] = _curve(history, "accuracy", "accuracy", out / "accuracy.png")
    if last_eval.get("confusion_matrix"):
        title = f"{last_eval['split']} (epoch {last_eval['epoch']})"
        plots["confusion_matrix"] = confusion_matrix(
            last_eval["confusion_matrix"], classes, out / "confusion_matrix.png", title
        )
        plots["roc"] = roc_curve(
            last_eval["roc"], last_eval.get("auroc", float("nan")), classes, out / "roc.png", title
        )
    return plots
