"""PNG plots for run.dir/plots/: loss and accuracy curves (train vs val), confusion matrix, ROC curve."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from data_prep.atomic import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
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
    return _save(fig, path)


def confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
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
    return _save(fig, path)


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
    return _save(fig, path)


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
