"""The loop: ``train_one_epoch`` and ``evaluate`` are plain functions that take objects and return metric dicts.

Neither knows how many processes there are beyond what ``accelerator`` says: gradients are synchronised by
the DDP wrapper, and every cross-rank reduction happens once per epoch (never per eval batch, because ranks
may hold different numbers of eval batches).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
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
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassROC,
)
from tqdm.auto import tqdm

# ROC/AUROC are computed on a fixed grid of thresholds: their state is then a fixed-size count tensor
# (summed across ranks) instead of every prediction, so a rank with few or no eval batches syncs cleanly
# and memory does not grow with the split. 1001 thresholds move the AUROC by well under 1e-3.
ROC_THRESHOLDS = 1001

# CATDOG_SYNC_DEBUG=1 (scripts/gpu_check.sh): on a GPU, a call inside the training step that makes the host wait for
# the GPU raises from the second micro-batch on, and each epoch prints how long the loop waited for the loader.
SYNC_DEBUG = os.environ.get("CATDOG_SYNC_DEBUG", "0") not in ("", "0")


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then cosine decay to ``base_lr * min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def classification_loss(
    outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor, *, label_smoothing: float, aux_weight: float
) -> tuple[Tensor, Tensor]:
    """Cross-entropy on the logits (+ ``aux_weight`` x the auxiliary head's, InceptionV3 in training).

    ``targets`` are class ids, or class probabilities (MixUp/CutMix): ``F.cross_entropy`` takes both.

    Returns (loss, main logits). Computed in float32 whatever the autocast dtype of the logits.
    """
    aux = None
    if isinstance(outputs, tuple):
        outputs, aux = outputs
    loss = F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)
    if aux is not None and aux_weight:
        loss = loss + aux_weight * F.cross_entropy(aux.float(), targets, label_smoothing=label_smoothing)
    return loss, outputs


@dataclass
class EpochTotals:
    """Running sums of one training epoch on this rank (loss x samples, correct, samples).

    Kept across a mid-epoch resume (the checkpoint stores the all-reduced sums), so the epoch's train
    metrics cover the whole epoch, not only the part after the restart. The per-batch sums accumulate in a
    tensor on the training device (``add``), so the loop never waits for the GPU to read them; they reach the
    host only when ``reduced`` is called (checkpoints, epoch end).
    """

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    _pending: Tensor | None = field(default=None, repr=False, compare=False)  # [loss_sum, correct] on device

    def add(self, loss: Tensor, logits: Tensor, targets: Tensor) -> None:
        """Fold one micro-batch in without a host sync (``targets`` may be soft labels: argmax is the class)."""
        hard = targets if targets.ndim == 1 else targets.argmax(1)
        batch = torch.stack([loss.detach().double() * len(hard), (logits.detach().argmax(1) == hard).sum().double()])
        self._pending = batch if self._pending is None else self._pending + batch
        self.seen += len(hard)

    def reduced(self, accelerator: Accelerator) -> EpochTotals:
        """Sum over ranks: one collective, every rank must call it."""
        t = torch.tensor([self.loss_sum, self.correct, self.seen], dtype=torch.float64, device=accelerator.device)
        if self._pending is not None:
            t[:2] += self._pending.to(accelerator.device)
        t = accelerator.reduce(t, reduction="sum")
        return EpochTotals(*t.tolist())


class SyncProbe:
    """``CATDOG_SYNC_DEBUG``: torch.cuda's sync debug mode "error" around each step body from the second micro-batch
    on (the first one initialises lazily), "default" while the loop waits for the loader, whose wait it times."""

    def __init__(self, device: torch.device, set_mode: Callable[[int | str], None] | None = None):
        self.cuda = device.type == "cuda"
        self.set_mode = set_mode or (torch.cuda.set_sync_debug_mode if self.cuda else lambda mode: None)
        self.batches = 0
        self.first_wait = self.wait = 0.0
        self.t0 = time.perf_counter()

    def wrap(self, batches: Iterable):
        it = iter(batches)
        while True:
            self.set_mode("default")
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            if self.batches:
                self.wait += time.perf_counter() - t
                self.set_mode("error")
            else:
                self.first_wait, self.t0 = time.perf_counter() - t, time.perf_counter()
            self.batches += 1
            yield item

    def report(self, accelerator: Accelerator, desc: str) -> None:
        if self.cuda:
            torch.cuda.synchronize(accelerator.device)  # the steps still queued count as loop time
        loop = time.perf_counter() - self.t0
        mode = f"{max(self.batches - 1, 0)} checked in sync debug mode 'error'" if self.cuda else "no CUDA: not checked"
        accelerator.print(
            f"sync-debug: {desc}: {self.batches} micro-batches, {mode}; loader wait {self.wait:.3f} s of {loop:.3f} s "
            f"after the first batch ({100 * self.wait / max(loop, 1e-9):.1f} %); first batch {self.first_wait:.3f} s",
            flush=True,
        )


@dataclass
class StepInfo:
    """What ``on_step`` gets after each optimizer step."""

    step: int  # optimizer steps done in the whole run
    batch_in_epoch: int  # micro-batches of this epoch consumed so far (the resume position)
    loss: Tensor  # this rank's loss of the last micro-batch, still on the device: float() it only to log it
    lr: float
    images_per_s: float  # all ranks together, since the epoch (or resume) started
    totals: EpochTotals


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    *,
    lr_fn: Callable[[int], float],
    step: int,
    start_batch: int,
    num_batches: int,
    totals: EpochTotals,
    max_steps: int = 0,
    clip_grad_norm: float = 0.0,
    label_smoothing: float = 0.0,
    aux_weight: float = 0.0,
    channels_last: bool = False,
    reseed: Callable[[int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    log_every: int = 10,
    desc: str = "train",
) -> dict:
    """Train on micro-batches ``start_batch..num_batches-1`` of one epoch (``batches`` yields exactly those).

    Gradient accumulation goes through ``accelerator.accumulate``: the optimizer steps every
    ``gradient_accumulation_steps`` micro-batches. Stops early once ``max_steps`` optimizer steps are done, or
    when ``should_stop(step)`` says so after an optimizer step (a preemption signal: every rank must get the
    same answer, see train/preemption.py). ``reseed(batch_index)`` (deterministic mode) seeds the model's RNG
    (dropout) per micro-batch, so the stream of random numbers is a function of the data position and a
    resumed run draws the same ones.

    Nothing here reads a device value per step: loss and accuracy sums stay on the device (``EpochTotals``),
    and the progress bar shows the loss every ``log_every`` optimizer steps (one host sync each time).
    Returns ``{"step", "batch_in_epoch", "totals", "stopped", "signalled", "seconds", "images"}``.
    """
    model.train()
    world = accelerator.num_processes
    accum = accelerator.gradient_accumulation_steps
    bar = tqdm(
        total=num_batches // accum,
        initial=start_batch // accum,
        desc=desc,
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
        leave=False,
    )
    batch_index = start_batch
    images = 0
    stopped = signalled = False
    t0 = time.perf_counter()
    probe = SyncProbe(accelerator.device) if SYNC_DEBUG else None
    try:
        for x, y in probe.wrap(batches) if probe is not None else batches:
            if batch_index >= num_batches:  # micro-batches that do not fill a whole accumulation group
                break
            x = x.to(accelerator.device, non_blocking=True)
            y = y.to(accelerator.device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if reseed is not None:
                reseed(batch_index)
            with accelerator.accumulate(model):
                loss, logits = classification_loss(model(x), y, label_smoothing=label_smoothing, aux_weight=aux_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if clip_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
                    lr = lr_fn(step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)  # pretrained layers: optim.backbone_lr_scale
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_index += 1
            images += len(y) * world
            totals.add(loss, logits, y)
            if accelerator.sync_gradients:
                step += 1
                ips = images / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                if bar.disable is False and log_every and step % log_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", refresh=False)
                if on_step is not None:
                    on_step(StepInfo(step, batch_index, loss.detach(), lr, ips, totals))
                if max_steps and step >= max_steps:
                    stopped = True
                    break
                if should_stop is not None and should_stop(step):
                    stopped = signalled = True
                    break
    finally:
        # Also on an error (a DataError from the loader): clears the bar so the error starts its own line.
        if probe is not None:
            probe.set_mode("default")  # also on an error: the mode never outlives the loop
        bar.close()
    if probe is not None:
        probe.report(accelerator, desc)
    return {
        "step": step,
        "batch_in_epoch": batch_index,
        "totals": totals,
        "stopped": stopped,
        "signalled": signalled,
        "seconds": time.perf_counter() - t0,
        "images": images,
    }


def _metric_collection(num_classes: int) -> tuple[MetricCollection, nn.Module]:
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
def evaluate(
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
    scalars, roc = _metric_collection(num_classes)
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


def scalar_metrics(metrics: dict) -> dict:
    """The JSON/tracker-friendly part of a metrics dict (drops curves and matrices)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
