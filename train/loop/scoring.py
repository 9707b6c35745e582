"""Scoring a model on a split during training: loss, accuracy, precision, recall, F1, ROC-AUC, confusion matrix, ROC.

Every cross-rank reduction happens once per split (never per batch: ranks may hold different numbers of eval batches).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from train.metrics import metric_collection


@contextmanager
def _counting_metrics():
    """Metric updates with torch's deterministic-algorithms switch off (train.deterministic turns it on).

    With it on, torchmetrics replaces ``bincount`` by a dense comparison table (torchmetrics/utilities/data.py):
    for the 1,001-threshold ROC that is 4 x 1,001 x (batch x 1,001) integers, ~4 GB for a 128-image eval batch.
    Unweighted ``bincount`` is deterministic anyway (torch's docs list only the weighted CUDA one), and these
    updates only count: the metrics are the same, the training path keeps the switch.
    """
    if not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    accelerator: Accelerator,
    *,
    num_classes: int,
    prefix: str = "val",
    channels_last: bool = False,
) -> dict:
    """Loss, accuracy, precision, recall, F1, ROC-AUC (NaN when a class has no samples), confusion matrix and
    ROC curve over ``batches``.

    ``model`` should be the unwrapped module: the DDP wrapper may broadcast buffers in forward, a
    collective that would hang when ranks hold different numbers of eval batches. Metrics update locally
    and sync once in ``compute()``; loss sum and count are all-reduced once. Every rank must call this.
    Returns scalars under ``{prefix}/...`` plus ``{prefix}/confusion_matrix`` (list of rows, true x pred) and
    ``{prefix}/roc`` (``{"fpr": [...], "tpr": [...]}``; per class for more than two classes).
    """
    model.eval()
    device = accelerator.device
    scalars, roc = metric_collection(num_classes)
    confusion = MulticlassConfusionMatrix(num_classes)
    scalars, roc, confusion = scalars.to(device), roc.to(device), confusion.to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        count += len(y)
        probs = logits.softmax(1)
        scores = probs[:, 1] if num_classes == 2 else probs
        with _counting_metrics():
            scalars.update(scores, y)
            roc.update(scores, y)
            confusion.update(logits.argmax(1), y)
    totals = accelerator.reduce(torch.stack([loss_sum, count]), reduction="sum")
    n = int(totals[1].item())
    out: dict = {f"{prefix}/loss": float(totals[0] / max(n, 1)), f"{prefix}/samples": n}
    out.update({f"{prefix}/{k}": float(v) for k, v in scalars.compute().items()})
    fpr, tpr, _ = roc.compute()
    if num_classes == 2:
        out[f"{prefix}/roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    else:
        out[f"{prefix}/roc"] = {"fpr": [f.tolist() for f in fpr], "tpr": [t.tolist() for t in tpr]}
    matrix = confusion.compute().cpu().numpy().astype(np.int64)
    out[f"{prefix}/confusion_matrix"] = matrix.tolist()
    if (matrix.sum(1) == 0).any():
        # ROC-AUC is undefined when a class has no samples; the binned torchmetrics version returns 0 (or a
        # mean over the present classes) instead, which would read as a real score.
        out[f"{prefix}/auroc"] = float("nan")
    return out
