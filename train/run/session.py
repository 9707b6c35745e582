"""A training run in this process (``Run``): the built objects, the derived schedule, and what writes the run dir.

Both kinds of run use it: image training (train/run/images.py) and a head on cached features
(train/run/features.py). ``finish`` ends either one the same way: the test split scored with the best weights,
final_metrics.json, the plots, the model bundle.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file

from data_prep.atomic import atomic_write_json, atomic_write_text
from data_prep.info import DatasetInfo
from train import plots
from train.config import Config
from train.data.streams import EvalSet, TrainStream, eval_loader
from train.formats.bundle import write_run_bundle
from train.formats.rundir import (
    CHECKPOINTS_DIR,
    EMA_WEIGHTS,
    FINAL_NAME,
    METRICS_NAME,
    MODEL_WEIGHTS,
    PLOTS_DIR,
    TrainerState,
    prune_checkpoints,
    validated_weights,
)
from train.hardware.gpus import wait_for_everyone
from train.loop.ema import WeightEMA
from train.loop.epoch import EpochTotals, StepRecipe, lr_at
from train.loop.scoring import score
from train.metrics import scalar_metrics
from train.run import checkpoint as ckpt
from train.run import tracking
from train.run.distributed import StopFlag
from train.run.setup import bare_module

log = logging.getLogger("catdog")


def _broadcast_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics before evaluating (the checkpoint saves rank 0's).

    DDP syncs buffers at the start of each training forward, so after the last step each rank has updated its
    own copy once more. One broadcast per buffer per evaluation; never per eval batch.
    """
    if accelerator.num_processes > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf.data, src=0)


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


@dataclass
class Run:
    """One training run in this process: the built objects, the derived schedule, and the run-dir writers."""

    cfg: Config
    acc: Accelerator
    info: DatasetInfo
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: TrainStream
    val: EvalSet
    fingerprint: dict
    stop: StopFlag | None
    ema: WeightEMA | None
    steps_per_epoch: int
    seconds_before: float = 0.0  # training time of earlier sessions (from the checkpoint)
    session_start: float = field(default_factory=time.perf_counter)
    corrupt_base: int = 0  # the stream's corrupt count when this epoch (or its resumed part) started
    corrupt_before: int = 0  # corrupt samples of this epoch counted by an earlier session
    plotted_at: float = -math.inf  # perf_counter() of the last plots written (track.plot_every_s)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.run.dir)

    @property
    def ckpt_root(self) -> Path:
        return self.dir / CHECKPOINTS_DIR

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    @property
    def warmup_steps(self) -> int:
        return round(self.cfg.optim.warmup_epochs * self.steps_per_epoch)

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.cfg.train.grad_accum

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(
            step,
            base_lr=o.lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=o.min_lr_ratio,
        )

    def train_seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.session_start)

    @property
    def weights_file(self) -> str:
        """The checkpoint file holding the weights that validation scores (train/formats/rundir.py)."""
        return EMA_WEIGHTS if self.ema is not None else MODEL_WEIGHTS

    def eval_model(self) -> torch.nn.Module:
        """What validation and the test scoring evaluate: the EMA weights when train.ema is on, else the model's."""
        return self.ema.module if self.ema is not None else bare_module(self.model)

    def score_split(self, split: str) -> dict:
        """Metrics of ``split``, each sample once across ranks. The validation split's loader keeps its workers."""
        unwrapped = self.eval_model()
        _broadcast_buffers(self.acc, unwrapped)
        if split == self.cfg.data.val_split:
            batches = self.val.loader()
        else:  # the test split: scored once, at the end
            batches = eval_loader(
                self.cfg.data,
                self.info,
                split=split,
                pin_memory=self.acc.device.type == "cuda",
                **eval_args(self.cfg, self.acc),
            )
        return score(
            unwrapped,
            batches,
            self.acc,
            num_classes=self.info.num_classes,
            prefix="test" if split == self.cfg.data.test_split else "val",
            channels_last=self.cfg.train.channels_last,
        )

    def corrupt_in_epoch(self) -> int:
        """Corrupt samples skipped so far this epoch, all ranks (and sessions) together. A collective."""
        local = torch.tensor([self.stream.stats()["corrupt_skipped"] - self.corrupt_base], device=self.acc.device)
        return int(self.acc.reduce(local, reduction="sum").item()) + self.corrupt_before

    def save(self, state: TrainerState, step: int, batch_in_epoch: int, totals: EpochTotals | None) -> Path:
        """Checkpoint at ``step`` (mid-epoch when batch_in_epoch > 0), then prune. Every rank must call it."""
        state.step, state.batch_in_epoch = step, batch_in_epoch
        if batch_in_epoch and totals is not None:
            t = totals.reduced(self.acc)
            state.totals, state.corrupt_in_epoch = [t.loss_sum, t.correct, t.seen], self.corrupt_in_epoch()
        else:
            state.totals, state.corrupt_in_epoch = [0.0, 0.0, 0.0], 0
        state.train_seconds = self.train_seconds()
        state.eval_weights = self.weights_file
        extra = {EMA_WEIGHTS: self.ema.state()} if self.ema is not None and self.acc.is_main_process else None
        path = ckpt.save_checkpoint(self.acc, self.ckpt_root, state, extra)
        if self.acc.is_main_process:
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints, state.best_checkpoint)
        log.info("checkpoint %s", path)
        return path

    def close_epoch(self, state: TrainerState, row: dict) -> None:
        """Append a finished epoch's ``row`` to the history, log it, send it to the trackers."""
        state.train_seconds = row["time_s"] = self.train_seconds()  # wall clock since the run began
        state.history.append(row)
        log.info("epoch %d: %s", row["epoch"], _fmt({k: v for k, v in row.items() if k != "epoch"}))
        if self.acc.is_main_process:
            logged = {k: v for k, v in row.items() if k not in ("epoch", "step")} | {"epoch": row["epoch"]}
            self.acc.log(logged, step=row["step"])

    def write_outputs(self, state: TrainerState, step: int, *, final: bool = False) -> None:
        """metrics.jsonl (rewritten from the checkpointed history, so a resume never duplicates an epoch) and
        plots; plots also go to W&B. Main process only. Plots at most every ``track.plot_every_s`` seconds during
        training (rendering them took 0.3-0.8 s, up to ~6 % of a short epoch on 2 CPU cores) and always at the end."""
        if not self.acc.is_main_process:
            return
        atomic_write_text(self.dir / METRICS_NAME, "".join(_jsonl(h) for h in state.history))
        now = time.perf_counter()
        if final or now - self.plotted_at >= self.cfg.track.plot_every_s:
            made = plots.write_plots(self.dir / PLOTS_DIR, state.history, state.last_eval, self.info.classes)
            tracking.log_plots(self.acc, made, step)
            self.plotted_at = now


def step_recipe(cfg: Config) -> StepRecipe:
    """How every optimizer step of this run computes (train/loop/epoch.py)."""
    return StepRecipe(
        label_smoothing=cfg.optim.label_smoothing,
        aux_weight=cfg.model.aux_loss_weight if cfg.model.name == "inception_v3" else 0.0,
        clip_grad_norm=cfg.optim.clip_grad_norm,
        channels_last=cfg.train.channels_last,
        max_steps=cfg.train.max_steps,
        log_every=cfg.train.log_every,
    )


def eval_args(cfg: Config, acc: Accelerator) -> dict:
    """This rank's share of an evaluation: its batch size and place among the ranks (train.data.streams)."""
    world = acc.num_processes
    return {
        "batch_size": max(1, cfg.eval.batch_size // world),
        "image_size": cfg.model.input_size(),
        "rank": acc.process_index,
        "world_size": world,
    }


def _jsonl(row: dict) -> str:
    return json.dumps(row, sort_keys=True) + "\n"


def new_run(
    cfg: Config,
    acc: Accelerator,
    info: DatasetInfo,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    streams: tuple[TrainStream, EvalSet],
    *,
    shapes: str,
    steps_per_epoch: int,
    stop: StopFlag | None = None,
    ema: WeightEMA | None = None,
) -> Run:
    """A ``Run`` over prepared ``model``/``optimizer``; ``shapes`` is ``model_fingerprint`` of the bare model."""
    stream, val = streams
    fingerprint = run_fingerprint(cfg, shapes, stream.num_samples, acc.num_processes)
    return Run(cfg, acc, info, model, optimizer, stream, val, fingerprint, stop, ema, steps_per_epoch)


def data_streams(cfg: Config, acc: Accelerator, info: DatasetInfo) -> tuple[TrainStream, EvalSet]:
    """This rank's training stream and validation set (page-locked batches when training on a GPU)."""
    on_gpu = acc.device.type == "cuda"
    stream = TrainStream(
        cfg.data,
        info,
        split=cfg.data.train_split,
        batch_size=cfg.train.per_device_batch(acc.num_processes),
        image_size=cfg.model.input_size(),
        rank=acc.process_index,
        world_size=acc.num_processes,
        seed=cfg.train.seed,
        pin_memory=on_gpu,
        crop_sizes=cfg.data.augment.crop_sizes(cfg.train.epochs, cfg.model.input_size()),
    )
    return stream, EvalSet(cfg.data, info, pin_memory=on_gpu, split=cfg.data.val_split, **eval_args(cfg, acc))


def run_fingerprint(cfg: Config, shapes: str, train_samples: int, world: int) -> dict:
    """What a checkpoint's weights and data position depend on (checked on resume: train.run.checkpoint.RESUME_KEYS)."""
    return {
        "model": cfg.model.name,
        "model_shapes": shapes,
        "optimizer": cfg.optim.name,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "train_samples": train_samples,
        "seed": cfg.train.seed,
        "world_size": world,
    }


def finish(run: Run, state: TrainerState) -> dict:
    """final_metrics.json (+ the test split on the best checkpoint), plots, metrics.jsonl, the model bundle, and
    W&B's summary and artifacts. Idempotent (W&B gets one more model version each time)."""
    cfg, acc = run.cfg, run.acc
    final: dict = {
        "epochs_completed": len(state.history),
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 3),
        "best_epoch": state.best_epoch,
        "best_checkpoint": state.best_checkpoint,
        f"best/{cfg.train.early_stop_metric}": state.best_metric,
    }
    if state.history:
        final.update({k: v for k, v in state.history[-1].items() if k not in ("epoch", "step")})
    # The whole run's count (each metrics.jsonl row holds its epoch's).
    final["data/corrupt_skipped"] = sum(h.get("data/corrupt_skipped", 0) for h in state.history)
    test = run.info.splits.get(cfg.data.test_split)
    # Rank 0 looks for the best checkpoint and tells the others: the test evaluation holds collectives, so
    # every rank must make the same choice even when their views of a shared filesystem differ.
    best = run.ckpt_root / state.best_checkpoint if state.best_checkpoint else None
    found = [best is not None and best.is_dir()] if acc.is_main_process else [False]
    if acc.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    if cfg.eval.test_at_end and test is not None and test.num_samples > 0 and found[0]:
        # Evaluate the best weights, not the last ones: that is the model early stopping selected. The file is the
        # one its validation scored (ema.safetensors with train.ema); both files have the model's keys.
        weights = validated_weights(best)
        run.eval_model().load_state_dict(load_file(str(weights), device="cpu"))
        metrics = run.score_split(cfg.data.test_split)
        final.update(scalar_metrics(metrics))
        final["test/confusion_matrix"] = metrics["test/confusion_matrix"]
        final["test/checkpoint"] = state.best_checkpoint
        final["test/weights"] = weights.name
    if acc.is_main_process:
        run.write_outputs(state, state.step, final=True)
        atomic_write_json(run.dir / FINAL_NAME, final)
        bundle = None
        if found[0]:
            # The self-contained model bundle (run.dir/model/: weights + model.json) of the best weights.
            bundle = write_run_bundle(run.dir, cfg, run.info, asdict(state), best, final)
        # W&B commits this step's row now: committed at the end instead, it would overwrite the summary below with the
        # last epoch's values where a key means the epoch there and the run here (data/corrupt_skipped).
        scalars = {f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))}
        acc.log(scalars, step=state.step, log_kwargs={"wandb": {"commit": True}})
        # W&B: the summary, the shards used (lineage) and the bundle as a model artifact (a warning if it fails).
        tracking.log_run_end(acc, cfg, run.info, final, bundle)
        log.info("final: %s", _fmt({k: v for k, v in final.items() if isinstance(v, (int, float))}))
        log.info("run dir: %s (plots in %s)", run.dir, run.dir / "plots")
    wait_for_everyone(acc)
    return final
