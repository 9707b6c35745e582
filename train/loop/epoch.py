"""One training epoch: ``train_one_epoch`` is a plain function that takes objects and returns a metric dict.

It knows no more about processes than ``accelerator`` says: gradients are synchronised by the DDP wrapper, and the
epoch's sums stay on the device until ``EpochTotals.reduced`` (one collective) or ``resolved`` (this rank's) reads them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from data_prep.progress import progress
from train.loop import sync_probe


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


def batch_reseeder(*prefix: int) -> Callable[[int], None]:
    """``reseed(batch_index)`` for ``train_one_epoch``: seeds torch's RNG (dropout) from ``(*prefix, batch_index)``,
    so the random numbers of a micro-batch are a function of its place in the run, not of what ran before it."""

    def reseed(batch_index: int) -> None:
        seq = np.random.SeedSequence([*prefix, batch_index])
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0]))

    return reseed


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

    def _sums(self, device: torch.device) -> Tensor:
        t = torch.tensor([self.loss_sum, self.correct, self.seen], dtype=torch.float64, device=device)
        if self._pending is not None:
            t[:2] += self._pending.to(device)
        return t

    def resolved(self) -> EpochTotals:
        """This rank's sums read back to the host (one sync): where every rank trained on the same data, as the
        head of a cached-feature run does, there is nothing to sum over ranks."""
        return EpochTotals(*self._sums(torch.device("cpu")).tolist())

    def reduced(self, accelerator: Accelerator) -> EpochTotals:
        """Sum over ranks: one collective, every rank must call it."""
        return EpochTotals(*accelerator.reduce(self._sums(accelerator.device), reduction="sum").tolist())

    @property
    def loss(self) -> float:
        """Mean loss per sample (of resolved or reduced totals)."""
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


@dataclass
class StepInfo:
    """What ``on_step`` gets after each optimizer step."""

    step: int  # optimizer steps done in the whole run
    batch_in_epoch: int  # micro-batches of this epoch consumed so far (the resume position)
    loss: Tensor  # this rank's loss of the last micro-batch, still on the device: float() it only to log it
    lr: float
    images_per_s: float  # all ranks together, since the epoch (or resume) started
    totals: EpochTotals


@dataclass(frozen=True)
class StepRecipe:
    """How every optimizer step of a run computes (from the config: train/run/session.py ``step_recipe``)."""

    label_smoothing: float = 0.0
    aux_weight: float = 0.0  # InceptionV3's auxiliary logits in the loss; 0 = ignored
    clip_grad_norm: float = 0.0  # 0 = off
    channels_last: bool = False
    max_steps: int = 0  # stop once this many optimizer steps are done in the whole run; 0 = no limit
    log_every: int = 10  # optimizer steps between host reads of the loss for the progress bar; 0 = never


def _micro_step(model, x, y, optimizer, accelerator, recipe: StepRecipe, lr_fn, step: int) -> tuple:
    """Forward and backward of one micro-batch; at the end of an accumulation group, clip, set the LR, step.
    Returns (loss, logits, lr or None when the optimizer did not step)."""
    lr = None
    with accelerator.accumulate(model):
        loss, logits = classification_loss(
            model(x), y, label_smoothing=recipe.label_smoothing, aux_weight=recipe.aux_weight
        )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if recipe.clip_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            lr = lr_fn(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # pretrained layers: optim.backbone_lr_scale
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, logits, lr


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
    recipe: StepRecipe = StepRecipe(),
    reseed: Callable[[int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    desc: str = "train",
) -> dict:
    """Train on micro-batches ``start_batch..num_batches-1`` of one epoch (``batches`` yields exactly those).

    Gradient accumulation goes through ``accelerator.accumulate``: the optimizer steps every
    ``gradient_accumulation_steps`` micro-batches. Stops early once ``recipe.max_steps`` optimizer steps are done,
    or when ``should_stop(step)`` says so after an optimizer step (a preemption signal: every rank must get the same
    answer, see train/run/distributed.py). ``reseed(batch_index)`` (deterministic mode) seeds the model's RNG
    (dropout) per micro-batch, so the stream of random numbers is a function of the data position and a resumed run
    draws the same ones.

    Nothing here reads a device value per step: loss and accuracy sums stay on the device (``EpochTotals``),
    and the progress display shows the loss every ``recipe.log_every`` optimizer steps (one host sync each time).
    Returns ``{"step", "batch_in_epoch", "totals", "stopped", "signalled", "seconds", "images"}``.
    """
    model.train()
    world = accelerator.num_processes
    accum = accelerator.gradient_accumulation_steps
    show = accelerator.is_main_process
    # A bar on a terminal, a plain line every 30 s in a log (SLURM), nothing with --no-progress (data_prep/progress.py).
    bar = progress(total=num_batches // accum, initial=start_batch // accum, desc=desc, unit="step", disable=not show)
    batch_index, images = start_batch, 0
    stopped = signalled = False
    t0 = time.perf_counter()
    probe = sync_probe.SyncProbe(accelerator.device) if sync_probe.ENABLED else None
    try:
        for x, y in probe.wrap(batches) if probe is not None else batches:
            if batch_index >= num_batches:  # micro-batches that do not fill a whole accumulation group
                break
            x = x.to(accelerator.device, non_blocking=True)
            y = y.to(accelerator.device, non_blocking=True)
            if recipe.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if reseed is not None:
                reseed(batch_index)
            loss, logits, lr = _micro_step(model, x, y, optimizer, accelerator, recipe, lr_fn, step)
            batch_index += 1
            images += len(y) * world
            totals.add(loss, logits, y)
            if lr is None:
                continue
            step += 1
            ips = images / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            if show and recipe.log_every and step % recipe.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", refresh=False)
            if on_step is not None:
                on_step(StepInfo(step, batch_index, loss.detach(), lr, ips, totals))
            if recipe.max_steps and step >= recipe.max_steps:
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
    seconds = time.perf_counter() - t0
    return {
        "step": step,
        "batch_in_epoch": batch_index,
        "totals": totals,
        "stopped": stopped,
        "signalled": signalled,
        "seconds": seconds,
        "images": images,
    }
