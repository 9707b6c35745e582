"""What an epoch records, and which checkpoint is the best: one rule for image runs and cached-feature runs alike.

``epoch_row`` is the metrics.jsonl row of a finished epoch (training side); ``record_validation`` adds the validation
scores to it and decides the best checkpoint and early stopping. A NaN metric (AUROC on a val split with one class)
counts as no improvement, yet the first evaluated epoch's checkpoint is kept as the best until a real value beats
it, so the test split is still scored and a bundle still written.
"""

from __future__ import annotations

import logging
import math

from train.config import Config
from train.formats.rundir import TrainerState
from train.loop.epoch import EpochTotals
from train.metrics import scalar_metrics

log = logging.getLogger("catdog")


def epoch_row(epoch: int, step: int, lr: float, totals: EpochTotals, images_per_s: float, corrupt: int) -> dict:
    """The training half of an epoch's metrics.jsonl row (``totals`` summed over ranks already)."""
    return {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        "train/loss": totals.loss,
        "train/accuracy": totals.accuracy,
        "train/images_per_s": images_per_s,
        "data/corrupt_skipped": corrupt,
    }


def record_validation(cfg: Config, state: TrainerState, row: dict, metrics: dict, step_dir: str) -> bool:
    """Add the val ``metrics`` (train.loop.scoring.score's dict) of epoch ``state.epoch`` to ``row``, keep its
    confusion matrix and ROC curve for the plots, and update the best checkpoint and early stopping in ``state``.
    ``step_dir`` is the name of the checkpoint folder that holds this epoch's weights. Returns True when that folder
    is now the best one (the caller keeps those weights)."""
    epoch = state.epoch
    row.update(scalar_metrics(metrics))
    state.last_eval = {
        "split": cfg.data.val_split,
        "epoch": epoch + 1,
        "auroc": metrics["val/auroc"],
        "confusion_matrix": metrics["val/confusion_matrix"],
        "roc": metrics["val/roc"],
    }
    metric = cfg.train.early_stop_metric  # validated against train.config.VAL_METRICS when the config loaded
    value = row[metric]
    improved = False
    if math.isnan(value):
        log.warning("epoch %d: %s is NaN; counted as no improvement", epoch + 1, metric)
        if not state.best_checkpoint:  # never no best checkpoint: the test split is still scored, a bundle written
            state.best_epoch, state.best_checkpoint = epoch + 1, step_dir
    else:
        better = (lambda a, b: a > b) if cfg.train.early_stop_mode == "max" else (lambda a, b: a < b)
        improved = state.best_metric is None or better(value, state.best_metric)
    if improved:
        state.best_metric, state.best_epoch, state.best_checkpoint = value, epoch + 1, step_dir
    # Epochs, not evaluations: with eval.every_epochs=k each evaluation without improvement adds k.
    state.epochs_since_best = epoch + 1 - state.best_epoch
    patience = cfg.train.early_stop_patience
    if patience and state.epochs_since_best >= patience:
        state.stopped_early = True
        log.info(
            "early stop: %s did not improve for %d epochs (patience %d)", metric, state.epochs_since_best, patience
        )
    return state.best_checkpoint == step_dir
