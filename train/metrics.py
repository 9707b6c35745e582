"""The classification metrics training and catdog-evaluate both report: one definition, torchmetrics underneath."""

from __future__ import annotations

from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinaryROC,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassROC,
)

# ROC/AUROC are computed on a fixed grid of thresholds: their state is then a fixed-size count tensor
# (summed across ranks) instead of every prediction, so a rank with few or no eval batches syncs cleanly
# and memory does not grow with the split. 1001 thresholds move the AUROC by well under 1e-3.
ROC_THRESHOLDS = 1001


def metric_collection(num_classes: int) -> tuple[MetricCollection, nn.Module]:
    """Scalar metrics + the ROC curve. Binary problems report the positive class (index 1)."""
    if num_classes == 2:
        scalars = MetricCollection(
            {
                "accuracy": BinaryAccuracy(),
                "precision": BinaryPrecision(),
                "recall": BinaryRecall(),
                "f1": BinaryF1Score(),
                "auroc": BinaryAUROC(thresholds=ROC_THRESHOLDS),
            }
        )
        return scalars, BinaryROC(thresholds=ROC_THRESHOLDS)
    scalars = MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, thresholds=ROC_THRESHOLDS),
        }
    )
    return scalars, MulticlassROC(num_classes, thresholds=ROC_THRESHOLDS)


def scalar_metrics(metrics: dict) -> dict:
    """The JSON/tracker-friendly part of a metrics dict (drops curves and matrices)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
