"""Training on images: the run of the scratch CNN and of fine-tuned or frozen InceptionV3 without cached features.

``train_images`` is the loop over epochs: each trains (train/loop/epoch.py), validates and picks the best checkpoint
(train/run/selection.py), checkpoints and writes the outputs; a stop signal ends it at a step boundary with a
checkpoint there. Its sibling for a frozen backbone is train/run/features.py; train/run/main.py chooses.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from data_prep.cpus import auto_num_workers
from data_prep.info import DatasetInfo
from train.config import Config, ConfigError
from train.formats.rundir import EMA_WEIGHTS, TrainerState, step_dir_name
from train.loop.ema import WeightEMA
from train.loop.epoch import EpochTotals, StepInfo, batch_reseeder, train_one_epoch
from train.models.registry import build_model
from train.run.distributed import StopFlag, convert_sync_batchnorm
from train.run.selection import epoch_row, record_validation
from train.run.session import Run, data_streams, finish, new_run, step_recipe
from train.run.setup import bare_module, check_aux_head, make_optimizer, model_fingerprint
from train.run.start import resume, start_trackers

log = logging.getLogger("catdog")


def build(cfg: Config, acc: Accelerator, info: DatasetInfo, stop: StopFlag | None) -> Run:
    """Data, model, optimizer and schedule for this process."""
    world = acc.num_processes
    # Same seed on every rank for identical initial weights (DDP would broadcast rank 0's anyway) ...
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, info.num_classes)
    shapes = model_fingerprint(model)
    # ... then a different stream per rank, so dropout (and anything else random in the model) differs across
    # ranks as it would in one big batch. The data order comes from (seed, epoch, position), not from this RNG;
    # deterministic mode reseeds per batch from (seed, rank, epoch, batch) anyway.
    set_seed(cfg.train.seed, device_specific=True)
    check_aux_head(cfg.model, world)
    if cfg.model.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, acc.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    model, optimizer = acc.prepare(model, optimizer)
    # The average of the unwrapped module's tensors (the same objects DDP and the optimizer update in place).
    ema = (
        WeightEMA(bare_module(model), decay=cfg.train.ema_decay, warmup=cfg.train.ema_warmup) if cfg.train.ema else None
    )
    if cfg.train.compile:
        model = torch.compile(model)
    if stop is not None:
        stop.setup()
    stream, val = data_streams(cfg, acc, info)
    accum = cfg.train.grad_accum
    steps_per_epoch = stream.batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} x grad_accum={accum}: one optimizer step needs more samples "
            f"than split {cfg.data.train_split!r} has ({stream.num_samples}); lower train.batch_size"
        )
    return new_run(
        cfg,
        acc,
        info,
        model,
        optimizer,
        (stream, val),
        shapes=shapes,
        steps_per_epoch=steps_per_epoch,
        stop=stop,
        ema=ema,
    )


def _done(run: Run, state: TrainerState) -> bool:
    max_steps = run.cfg.train.max_steps
    return state.epoch >= run.cfg.train.epochs or state.stopped_early or bool(max_steps and state.step >= max_steps)


def _log_layout(run: Run) -> None:
    cfg, acc = run.cfg, run.acc
    if cfg.data.num_workers == -1:
        log.info("%s", auto_num_workers()[1])
    log.info(
        "%s on %d process(es) (%s, %s, %d thread(s)/rank, device %s): %d train samples, %d steps/epoch of %d images "
        "(%d per device x %d accumulation), %d epochs",
        cfg.model.name,
        acc.num_processes,
        acc.distributed_type.value,
        "fp32" if acc.mixed_precision == "no" else acc.mixed_precision,  # the words of train.mixed_precision
        torch.get_num_threads(),
        acc.device,
        run.stream.num_samples,
        run.steps_per_epoch,
        cfg.train.batch_size,
        run.stream.batch_size,
        cfg.train.grad_accum,
        cfg.train.epochs,
    )
    if cfg.data.augment.size_start:
        sizes = run.stream.crops.sizes
        log.info(
            "progressive resizing: training crops %s px (epochs 1-%d) -> %d px (from epoch %d); validation at %d px",
            sizes[0],
            sizes.count(sizes[0]),
            sizes[-1],
            sizes.index(sizes[-1]) + 1,
            cfg.model.input_size(),
        )
    if run.ema is not None:
        log.info(
            "weight EMA on: decay %s%s; validation, early stopping, the best checkpoint and the test split use %s",
            cfg.train.ema_decay,
            " with warm-up" if cfg.train.ema_warmup else "",
            EMA_WEIGHTS,
        )


def train_epoch(run: Run, state: TrainerState) -> bool:
    """Train the rest of epoch ``state.epoch``; at its end evaluate, checkpoint and write outputs.

    Returns True when a stop signal ended it early (a checkpoint at that step is saved).
    """
    cfg, acc = run.cfg, run.acc
    epoch, start = state.epoch, state.batch_in_epoch
    totals = EpochTotals(*state.totals) if acc.is_main_process else EpochTotals()
    # stats() counts over this process's lifetime; the part of a resumed epoch before the kill is in state.
    run.corrupt_base = run.stream.stats()["corrupt_skipped"]
    run.corrupt_before = state.corrupt_in_epoch

    def on_step(s: StepInfo) -> None:
        if run.ema is not None:  # after each optimizer step, before a checkpoint of this step saves it
            run.ema.update(bare_module(run.model))
        if acc.is_main_process and cfg.train.log_every and s.step % cfg.train.log_every == 0:
            logged = {"train/loss_step": float(s.loss), "train/lr": s.lr, "train/images_per_s": s.images_per_s}
            acc.log(logged, step=s.step)
        every = cfg.train.checkpoint_every
        if every and s.step % every == 0 and s.batch_in_epoch < run.micro_per_epoch:  # epoch ends save their own
            run.save(state, s.step, s.batch_in_epoch, s.totals)

    result = train_one_epoch(
        run.model,
        run.stream.loader(epoch, start_batch=start),
        run.optimizer,
        acc,
        lr_fn=run.lr,
        step=state.step,
        start_batch=start,
        num_batches=run.micro_per_epoch,
        totals=totals,
        recipe=step_recipe(cfg),
        reseed=batch_reseeder(cfg.train.seed, acc.process_index, epoch) if cfg.train.deterministic else None,
        on_step=on_step,
        should_stop=run.stop.agreed if run.stop is not None else None,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
    )
    if result["stopped"] and result["batch_in_epoch"] < run.micro_per_epoch:
        if (state.step, state.batch_in_epoch) != (result["step"], result["batch_in_epoch"]):  # on_step saved it
            run.save(state, result["step"], result["batch_in_epoch"], result["totals"])
        if not result["signalled"]:
            log.info("stopped at train.max_steps=%d (mid-epoch %d)", cfg.train.max_steps, epoch)
        return result["signalled"]
    end_epoch(run, state, result)
    return False


def end_epoch(run: Run, state: TrainerState, result: dict) -> None:
    """Epoch metrics, validation, best checkpoint and early stopping, the epoch-end checkpoint, outputs."""
    cfg, acc = run.cfg, run.acc
    epoch = state.epoch
    row = epoch_row(
        epoch,
        result["step"],
        run.lr(max(result["step"] - 1, 0)),
        result["totals"].reduced(acc),
        result["images"] / max(result["seconds"], 1e-9),
        run.corrupt_in_epoch(),
    )
    if row["data/corrupt_skipped"] and acc.is_main_process:
        log.warning(
            "epoch %d: skipped %d corrupt training sample(s) on all ranks (data.on_error=skip; each is named "
            "in a warning above, from its rank); the batches were refilled from valid samples",
            epoch + 1,
            row["data/corrupt_skipped"],
        )
    if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.train.epochs:
        metrics = run.score_split(cfg.data.val_split)
        record_validation(cfg, state, row, metrics, step_dir_name(result["step"]))
    run.close_epoch(state, row)
    state.epoch = epoch + 1
    run.save(state, result["step"], 0, None)
    run.write_outputs(state, row["step"])


def train_images(cfg: Config, acc: Accelerator, info: DatasetInfo, stop: StopFlag | None, checkpoint) -> dict:
    """The whole image run from ``checkpoint`` (the one rank 0 picked, or None): epochs until done, then
    ``finish``; or, when a stop signal ends it, ``{"interrupted": True, ...}`` with a checkpoint at that step."""
    run = build(cfg, acc, info, stop)
    state = resume(run, checkpoint)
    start_trackers(run, state)
    _log_layout(run)
    interrupted = False
    if run.stop is not None:
        run.stop.start_polling()  # from here a signal stops the loop at a step boundary, with a checkpoint
    while not _done(run, state):
        interrupted = train_epoch(run, state)
        if interrupted:
            break
        if run.stop is not None and run.stop.agreed(state.step):  # signalled during the evaluation
            interrupted = not _done(run, state)
            break
    if interrupted:
        log.info(
            "stopped by signal %s at step %d (epoch %d, batch %d): checkpoint saved, a restart resumes there",
            run.stop.signum if run.stop else "?",
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )
        return {"interrupted": True, "steps": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}
    if run.stop is not None:
        # finish() does not poll: a signal from here on (or one after the loop's last poll) requeues at once, and
        # the requeued job, finding training done, redoes finish() (it is idempotent).
        run.stop.stop_polling()
    return finish(run, state)
