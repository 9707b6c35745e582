"""Training a frozen backbone's head on cached features (``train.precompute_features=true``): the linear-probe
pattern of DINOv2's evaluation, the sibling of train/run/images.py.

A frozen backbone with no augmentation maps each image to the same 2,048 numbers every epoch, so recomputing them
is pure waste (an InceptionV3 forward at 299 px is ~99.9 % of a frozen run's compute). The features come from the
cache (train/run/feature_cache.py); the head (the model's own dropout + fc, so its parameters ARE the model's) trains
on them with the same ``train_one_epoch``, loss, optimizer, LR schedule and best-checkpoint rule as an image run. The
run dir gets what an image run writes: metrics.jsonl, plots, final_metrics.json, and checkpoints of the whole model
(frozen backbone + trained head), so evaluation, prediction and resume read them as any other run's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn

from data_prep.atomic import atomic_write_json
from data_prep.info import DatasetInfo
from train.config import Config, ConfigError
from train.formats.rundir import FINAL_NAME, TrainerState, prune_checkpoints, step_dir_name
from train.loop.epoch import EpochTotals, batch_reseeder, train_one_epoch
from train.loop.scoring import score
from train.models.registry import build_model
from train.run import checkpoint as ckpt
from train.run.feature_cache import split_features
from train.run.selection import epoch_row, record_validation
from train.run.session import Run, data_streams, finish, new_run, step_recipe
from train.run.setup import make_optimizer, model_fingerprint
from train.run.start import resume, start_trackers

log = logging.getLogger("catdog")


def epoch_batches(feats: Tensor, labels: Tensor, batch_size: int, seed: int, epoch: int) -> list:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [(feats[i], labels[i]) for i in torch.randperm(len(labels), generator=g).split(batch_size)]


def _build(cfg: Config, acc: Accelerator, info: DatasetInfo) -> tuple[Run, nn.Module, dict, dict]:
    """The model with its frozen backbone, both splits' features, and the image run's ``Run`` over the whole model
    (finish() scores the test split on images with it; checkpoints and outputs go where an image run puts them).
    Returns (run, head, train features, val features)."""
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, info.num_classes).to(acc.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    shapes = model_fingerprint(model)
    t0 = time.perf_counter()
    train = split_features(cfg, info, model, acc, cfg.data.train_split)
    val = split_features(cfg, info, model, acc, cfg.data.val_split)
    train["extract_seconds"] = time.perf_counter() - t0
    n = len(train["labels"])
    if n == 0:
        raise ConfigError(f"split {cfg.data.train_split!r} of {info.root} has no readable samples to train on")
    log.info(
        "features: train %d x %d (%s, %.1f s), val %d (%s, %.1f s); %s, channels_last %s",
        n,
        train["features"].shape[1],
        "cached" if train["cached"] else "extracted",
        train["seconds"],
        len(val["labels"]),
        "cached" if val["cached"] else "extracted",
        val["seconds"],
        "bf16" if train["bf16"] else "fp32",
        "on" if cfg.train.channels_last else "off",
    )
    head = model.head()
    # Built over the model (not the head) so parameter names, hence LR groups, match an image run's.
    optimizer = make_optimizer(cfg, model)
    model, optimizer = acc.prepare(model, optimizer)  # checkpoints save the whole model + the head's optimizer
    streams = data_streams(cfg, acc, info)
    run = new_run(
        cfg, acc, info, model, optimizer, streams, shapes=shapes, steps_per_epoch=math.ceil(n / cfg.train.batch_size)
    )
    return run, head, train, val


def _head_epoch(run: Run, head: nn.Module, state: TrainerState, train: dict, val: dict) -> tuple[dict, bool]:
    """Train the head for epoch ``state.epoch`` and validate it; returns (train_one_epoch's result, whether this
    epoch's weights are now the best)."""
    cfg, acc, world = run.cfg, run.acc, run.acc.num_processes
    epoch = state.epoch
    batches = epoch_batches(train["features"], train["labels"], cfg.train.batch_size, cfg.train.seed, epoch)
    result = train_one_epoch(
        head,
        batches,
        run.optimizer,
        acc,
        lr_fn=run.lr,
        step=state.step,
        start_batch=0,
        num_batches=len(batches),
        totals=EpochTotals(),
        # The features are the frozen trunk's (no aux head, no image layout), already on the host.
        recipe=replace(step_recipe(cfg), aux_weight=0.0, channels_last=False),
        # The head's dropout drawn from (seed, epoch, batch): the same on every rank (each trains the whole head)
        # and in a resumed run as in an uninterrupted one.
        reseed=batch_reseeder(cfg.train.seed, epoch),
        desc=f"head epoch {epoch + 1}/{cfg.train.epochs}",
    )
    # Every rank trained on all features: its own sums are the epoch's, with nothing to reduce.
    images_per_s = result["images"] / world / max(result["seconds"], 1e-9)
    row = epoch_row(
        epoch, result["step"], run.lr(max(result["step"] - 1, 0)), result["totals"].resolved(), images_per_s, 0
    )
    # Ranks split only the evaluation (score() sums over ranks): each takes every world-th batch.
    eb = cfg.eval.batch_size
    val_batches = list(zip(val["features"].split(eb), val["labels"].split(eb), strict=True))
    metrics = score(head, val_batches[acc.process_index :: world], acc, num_classes=run.info.num_classes)
    best = record_validation(cfg, state, row, metrics, step_dir_name(result["step"]))
    run.close_epoch(state, row)
    return result, best


def _save_best_and_last(run: Run, head: nn.Module, state: TrainerState, best: dict | None) -> None:
    """Checkpoint the whole model once at the end, not per epoch: a head epoch takes milliseconds, writing the
    87 MB model about a second. The best epoch's head gets its own checkpoint (what finish() and early stopping
    select, as in an image run), the last state the resumable one. A run killed before this restarts the head from
    scratch, which with the features cached costs seconds."""
    acc = run.acc
    if best is not None and best["step"] != state.step:
        last_head = {k: v.clone() for k, v in head.state_dict().items()}
        head.load_state_dict(best["head"])
        at_best = TrainerState(**{**asdict(state), "step": best["step"], "epoch": state.best_epoch})
        at_best.history = state.history[: state.best_epoch]
        ckpt.save_checkpoint(acc, run.ckpt_root, at_best)
        head.load_state_dict(last_head)
    ckpt.save_checkpoint(acc, run.ckpt_root, state)
    if acc.is_main_process:
        prune_checkpoints(run.ckpt_root, max(run.cfg.train.keep_checkpoints, 1), state.best_checkpoint)
    run.write_outputs(state, state.step)


def train_features(cfg: Config, acc: Accelerator, info: DatasetInfo, checkpoint: Path | None) -> dict:
    """The whole run of a frozen backbone on cached features; writes the run dir as an image run does.
    ``checkpoint``: the one rank 0 picked for this start (train.run.start.decide_start), or None."""
    run, head, train, val = _build(cfg, acc, info)
    state = resume(run, checkpoint)
    start_trackers(run, state)
    if not state.history:  # the extraction is part of this run's time (a cache hit makes it ~0)
        run.seconds_before = train["extract_seconds"]
    # A 2,048 x classes linear layer is far too small for intra-op threads: on CPU they only add barrier waits
    # (measured on 2 busy cores: 0.08-0.13 s per head epoch on 1 thread, 0.7-2.5 s on 2).
    threads = torch.get_num_threads()
    if acc.device.type == "cpu":
        torch.set_num_threads(1)
    start_epoch = state.epoch
    best = None  # {"step", "head"}: the best epoch's head weights, kept in memory (a few KB)
    while state.epoch < cfg.train.epochs and not state.stopped_early:
        result, is_best = _head_epoch(run, head, state, train, val)
        if is_best:
            best = {"step": result["step"], "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
        state.step, state.epoch, state.batch_in_epoch = result["step"], state.epoch + 1, 0
        if result["stopped"]:
            break
    torch.set_num_threads(threads)  # finish() may score the test split on images
    if state.epoch > start_epoch:
        _save_best_and_last(run, head, state, best)
    final = finish(run, state)
    if acc.is_main_process:
        final.update(
            {
                "features/extract_seconds": round(train["extract_seconds"], 3),
                "features/cached": bool(train["cached"] and val["cached"]),
                "features/bf16": bool(train["bf16"]),
            }
        )
        atomic_write_json(run.dir / FINAL_NAME, final)
    return final
