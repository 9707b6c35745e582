"""``main(cfg)``: build everything, resume if run.dir has a checkpoint, train, evaluate, write the run dir.

Works the same under ``accelerate launch``, ``torchrun``, SLURM (after submitit's
``TorchDistributedEnvironment().export()`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and a
plain ``python -m train`` (one process): Accelerate reads the process layout from the environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file

from data_prep.atomic import atomic_write_json, atomic_write_text
from data_prep.info import INFO_NAME, DatasetInfo, InfoError, load_info
from data_prep.prepare import default_workers  # cores this process may use (affinity-aware)
from train import checkpoint as ckpt
from train import plots, tracking
from train.config import Config, ConfigError, save_config
from train.data import TrainStream, eval_loader
from train.engine import EpochTotals, StepInfo, evaluate, lr_at, scalar_metrics, train_one_epoch
from train.models import build_model, new_parameter_prefixes

log = logging.getLogger("catdog")


def local_world_size() -> int:
    """Ranks on this node: torchrun/accelerate launch and submitit's export() set LOCAL_WORLD_SIZE."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cpu_threads() -> int:
    """Intra-op threads per rank on CPU: an explicit OMP_NUM_THREADS wins, else this node's cores / local ranks.

    N ranks each using every core oversubscribe the CPU and run several times slower than N x 1/N.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, default_workers() // local_world_size())


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    """Main process: INFO to stderr and run.dir/train.log. Other ranks: warnings and errors only."""
    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if is_main:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        log.addHandler(file)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    # The data module's warnings (corrupt samples) and the trackers' notes go to train.log too.
    for name in ("train.data", "train.tracking"):
        logging.getLogger(name).handlers = log.handlers[:]
        logging.getLogger(name).setLevel(log.level)


def make_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    fp16_on_cpu = cpu and precision == "fp16"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="no" if fp16_on_cpu else precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=tracking.log_with(cfg, run_dir) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )
    if fp16_on_cpu and accelerator.is_main_process:  # once per run, not once per rank
        # Accelerate does not autocast to fp16 on CPU; say so instead of silently training in fp32.
        warnings.warn(
            "train.mixed_precision=fp16 is not applied on CPU (Accelerate only autocasts fp16 on GPUs): "
            "training in fp32. Use train.mixed_precision=bf16 for reduced precision on CPU.",
            stacklevel=2,
        )
    return accelerator


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD+momentum; no weight decay on biases and normalisation weights (1-d tensors). Pretrained layers
    get ``lr_scale = optim.backbone_lr_scale`` (engine.train_one_epoch multiplies the scheduled LR by it)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    new = new_parameter_prefixes(cfg.model)
    groups = []
    for is_new in (True, False):
        scale = 1.0 if is_new else cfg.optim.backbone_lr_scale
        params = [p for n, p in named if (new is None or n.startswith(new)) == is_new]
        groups += [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.optim.weight_decay, "lr_scale": scale},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale},
        ]
    groups = [g | {"lr": cfg.optim.lr * g["lr_scale"]} for g in groups if g["params"]]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def _resume_path(cfg: Config, ckpt_root: Path) -> Path | None:
    mode = cfg.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        return ckpt.latest_checkpoint(ckpt_root)
    path = Path(mode)
    if not (path / ckpt.STATE_NAME).is_file():
        raise ConfigError(f"train.resume={mode!r} is not a complete checkpoint folder (no {ckpt.STATE_NAME})")
    return path


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of parameter/buffer names, shapes and trainability: what the saved weights and optimizer state fit."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{name in trainable};".encode())
    return h.hexdigest()[:16]


def check_train_split(info: DatasetInfo, split: str) -> None:
    """A missing or empty train split is bad input, named with the file to fix, not a traceback from the loader."""
    if info.split(split).num_samples == 0:  # split() raises InfoError naming _info.json when it is absent
        raise InfoError(
            f"{info.root / INFO_NAME}: split {split!r} has no samples, so there is nothing to train on; point "
            "data.dir at shards with training samples (catdog-prep) or set data.train_split"
        )


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


class Run:
    """The state of one training run in this process: objects plus the run-dir writers (main process only)."""

    def __init__(self, cfg: Config, accelerator: Accelerator, info: DatasetInfo):
        self.cfg = cfg
        self.acc = accelerator
        self.info = info
        self.dir = Path(cfg.run.dir)
        self.ckpt_root = self.dir / "checkpoints"
        self.image_size = cfg.model.input_size()

    def eval_split(self, model: torch.nn.Module, split: str) -> dict:
        unwrapped = self.acc.unwrap_model(model)
        _broadcast_buffers(self.acc, unwrapped)
        world = self.acc.num_processes
        batches = eval_loader(
            self.cfg.data,
            self.info,
            split=split,
            batch_size=max(1, self.cfg.eval.batch_size // world),
            image_size=self.image_size,
            rank=self.acc.process_index,
            world_size=world,
        )
        return evaluate(
            unwrapped,
            batches,
            self.acc,
            num_classes=self.info.num_classes,
            prefix="test" if split == self.cfg.data.test_split else "val",
            channels_last=self.cfg.train.channels_last,
        )

    def write_outputs(self, state: ckpt.TrainerState, step: int) -> None:
        """metrics.jsonl (rewritten from the checkpointed history, so a resume never duplicates an epoch) and
        plots; plots also go to W&B. Main process only."""
        if not self.acc.is_main_process:
            return
        atomic_write_text(self.dir / "metrics.jsonl", "".join(_jsonl(h) for h in state.history))
        made = plots.write_plots(self.dir / "plots", state.history, state.last_eval, self.info.classes)
        tracking.log_plots(self.acc, made, step)


def _jsonl(row: dict) -> str:
    return json.dumps(row, sort_keys=True) + "\n"


def main(cfg: Config) -> dict:
    """Train (resuming from run.dir when it holds a checkpoint) and return the final metrics."""
    info = load_info(cfg.data.dir)
    check_train_split(info, cfg.data.train_split)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.deterministic:
        # cuBLAS needs this set before CUDA initialises to have deterministic GEMMs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    accelerator = make_accelerator(cfg, run_dir)
    is_main = accelerator.is_main_process
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    _setup_logging(run_dir, is_main)
    if is_main and cfg.train.mixed_precision == "fp16" and accelerator.mixed_precision == "no":
        log.warning("train.mixed_precision=fp16 is not applied on CPU: training in fp32 (bf16 works on CPU)")
    metric = cfg.train.early_stop_metric  # validated against train.config.VAL_METRICS when the config loaded
    world = accelerator.num_processes
    per_device = cfg.train.per_device_batch(world)
    run = Run(cfg, accelerator, info)
    if is_main:
        ckpt.remove_partial(run.ckpt_root)
    accelerator.wait_for_everyone()
    # Branch point (issue 8): a frozen backbone trains its head on features computed once (train/features.py).
    if cfg.train.precompute_features:
        from train.features import train_on_features

        return train_on_features(cfg, accelerator, run)

    # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway), and the
    # data order comes from (seed, epoch, position), not from this RNG.
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, info.num_classes)
    shapes = model_fingerprint(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        model = torch.compile(model)

    stream = TrainStream(
        cfg.data,
        info,
        split=cfg.data.train_split,
        batch_size=per_device,
        image_size=run.image_size,
        rank=accelerator.process_index,
        world_size=world,
        seed=cfg.train.seed,
    )
    accum = cfg.train.grad_accum
    steps_per_epoch = stream.batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} x grad_accum={accum}: one optimizer step needs more samples "
            f"than split {cfg.data.train_split!r} has ({stream.num_samples}); lower train.batch_size"
        )
    micro_per_epoch = steps_per_epoch * accum
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)

    def lr_fn(step: int) -> float:
        return lr_at(
            step,
            base_lr=cfg.optim.lr,
            total_steps=total_steps,
            warmup_steps=warmup,
            min_lr_ratio=cfg.optim.min_lr_ratio,
        )

    fingerprint = {
        "model": cfg.model.name,
        "model_shapes": shapes,
        "optimizer": cfg.optim.name,
        "batch_size": cfg.train.batch_size,
        "grad_accum": accum,
        "train_samples": stream.num_samples,
        "seed": cfg.train.seed,
        "world_size": world,
    }
    state = ckpt.TrainerState(fingerprint=fingerprint)
    resume = _resume_path(cfg, run.ckpt_root)
    if resume is not None:
        # Read the JSON state first: a checkpoint from another config is refused before any tensor is loaded.
        ckpt.check_resumable(resume, ckpt.TrainerState.from_json(resume / ckpt.STATE_NAME), fingerprint)
        state = ckpt.load_checkpoint(accelerator, resume)
        log.info("resumed from %s: epoch %d, batch %d, step %d", resume, state.epoch, state.batch_in_epoch, state.step)
        if state.fingerprint.get("world_size", world) != world:
            log.warning(
                "resuming a run saved on %d process(es) on %d: the data position carries over (it counts global "
                "batches), the per-rank random number streams do not",
                state.fingerprint["world_size"],
                world,
            )
        state.fingerprint = fingerprint
    if is_main:
        save_config(cfg, run_dir / "config.yaml")  # only once the checkpoint (if any) was accepted for it
        # Rows the killed session logged after its last checkpoint are re-logged by this one: drop them first.
        tracking.truncate_csv(run_dir / tracking.CSV_NAME, state.step)
        state.wandb_run_id = tracking.wandb_run_id(run_dir, state.wandb_run_id) if "wandb" in cfg.track.backends else ""
    tracking.init_trackers(accelerator, cfg, run_dir, state.wandb_run_id)
    log.info(
        "%s on %d process(es) (%s, %s, %d thread(s)/rank): %d train samples, %d steps/epoch of %d images "
        "(%d per device x %d accumulation), %d epochs",
        cfg.model.name,
        world,
        accelerator.distributed_type.value,
        accelerator.mixed_precision,
        torch.get_num_threads(),
        stream.num_samples,
        steps_per_epoch,
        cfg.train.batch_size,
        per_device,
        accum,
        cfg.train.epochs,
    )

    def reseed(batch_index: int) -> None:
        seq = np.random.SeedSequence([cfg.train.seed, accelerator.process_index, epoch, batch_index])
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0]))

    def on_step(info_: StepInfo) -> None:
        if is_main and cfg.train.log_every and info_.step % cfg.train.log_every == 0:
            accelerator.log(
                {"train/loss_step": info_.loss, "train/lr": info_.lr, "train/images_per_s": info_.images_per_s},
                step=info_.step,
            )
        if cfg.train.checkpoint_every and info_.step % cfg.train.checkpoint_every == 0:
            if info_.batch_in_epoch < micro_per_epoch:  # the epoch end saves its own, with the epoch's metrics
                save(info_.step, info_.batch_in_epoch, info_.totals)

    def corrupt_in_epoch() -> int:
        """Corrupt samples skipped so far this epoch, all ranks (and sessions) together. A collective."""
        local = torch.tensor([stream.stats()["corrupt_skipped"] - corrupt_base], device=accelerator.device)
        return int(accelerator.reduce(local, reduction="sum").item()) + corrupt_before_resume

    def save(step: int, batch_in_epoch: int, totals: EpochTotals) -> Path:
        state.step, state.epoch, state.batch_in_epoch = step, epoch, batch_in_epoch
        state.totals = list(asdict(totals.reduced(accelerator)).values()) if batch_in_epoch else [0.0, 0.0, 0.0]
        state.corrupt_in_epoch = corrupt_in_epoch() if batch_in_epoch else 0
        state.train_seconds = train_seconds + (time.perf_counter() - session_start)
        path = ckpt.save_checkpoint(accelerator, run.ckpt_root, state)
        if is_main:
            ckpt.prune_checkpoints(run.ckpt_root, cfg.train.keep_checkpoints, state.best_checkpoint)
        log.info("checkpoint %s", path)
        return path

    train_seconds = state.train_seconds
    session_start = time.perf_counter()
    mode_max = cfg.train.early_stop_mode == "max"
    epoch = state.epoch
    stopped = state.stopped_early or (cfg.train.max_steps and state.step >= cfg.train.max_steps)
    while epoch < cfg.train.epochs and not stopped:
        start = state.batch_in_epoch
        totals = EpochTotals(*state.totals) if is_main else EpochTotals()
        # stats() counts over this process's lifetime; the part of a resumed epoch before the kill is in state.
        corrupt_base = stream.stats()["corrupt_skipped"]
        corrupt_before_resume = state.corrupt_in_epoch
        result = train_one_epoch(
            model,
            stream.loader(epoch, start_batch=start),
            optimizer,
            accelerator,
            lr_fn=lr_fn,
            step=state.step,
            start_batch=start,
            num_batches=micro_per_epoch,
            totals=totals,
            max_steps=cfg.train.max_steps,
            clip_grad_norm=cfg.optim.clip_grad_norm,
            label_smoothing=cfg.optim.label_smoothing,
            aux_weight=cfg.model.aux_loss_weight if cfg.model.name == "inception_v3" else 0.0,
            channels_last=cfg.train.channels_last,
            reseed=reseed if cfg.train.deterministic else None,
            on_step=on_step,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        )
        if result["stopped"] and result["batch_in_epoch"] < micro_per_epoch:
            save(result["step"], result["batch_in_epoch"], result["totals"])
            log.info("stopped at train.max_steps=%d (mid-epoch %d)", cfg.train.max_steps, epoch)
            stopped = True
            break
        t = result["totals"].reduced(accelerator)
        row = {
            "epoch": epoch + 1,
            "step": result["step"],
            "lr": lr_fn(max(result["step"] - 1, 0)),
            "train/loss": t.loss_sum / max(t.seen, 1),
            "train/accuracy": t.correct / max(t.seen, 1),
            "train/images_per_s": result["images"] / max(result["seconds"], 1e-9),
            "data/corrupt_skipped": corrupt_in_epoch(),
        }
        if row["data/corrupt_skipped"] and is_main:
            log.warning(
                "epoch %d: skipped %d corrupt training sample(s) on all ranks (data.on_error=skip; each is named "
                "in a warning above, from its rank); the batches were refilled from valid samples",
                epoch + 1,
                row["data/corrupt_skipped"],
            )
        step_dir = ckpt.step_dir_name(result["step"])
        if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.train.epochs:
            metrics = run.eval_split(model, cfg.data.val_split)
            row.update(scalar_metrics(metrics))
            state.last_eval = {
                "split": cfg.data.val_split,
                "epoch": epoch + 1,
                "auroc": metrics["val/auroc"],
                "confusion_matrix": metrics["val/confusion_matrix"],
                "roc": metrics["val/roc"],
            }
            value = row[metric]
            if math.isnan(value):
                # Undefined (e.g. AUROC on a one-class val split): no improvement, but never no best checkpoint,
                # so the test split is still scored and the best weights still kept.
                log.warning("epoch %d: %s is NaN; counted as no improvement", epoch + 1, metric)
                improved = False
                if not state.best_checkpoint:
                    state.best_epoch, state.best_checkpoint = epoch + 1, step_dir
            else:
                improved = state.best_metric is None or (
                    value > state.best_metric if mode_max else value < state.best_metric
                )
            if improved:
                state.best_metric, state.best_epoch, state.best_checkpoint = value, epoch + 1, step_dir
            # Epochs, not evaluations: with eval.every_epochs=k each evaluation without improvement adds k.
            state.epochs_since_best = epoch + 1 - state.best_epoch
            patience = cfg.train.early_stop_patience
            if patience and state.epochs_since_best >= patience:
                state.stopped_early = stopped = True
                log.info(
                    "early stop: %s did not improve for %d epochs (patience %d)",
                    metric,
                    state.epochs_since_best,
                    patience,
                )
        row["time_s"] = train_seconds + (time.perf_counter() - session_start)  # wall clock since the run began
        state.history.append(row)
        log.info("epoch %d: %s", epoch + 1, _fmt({k: v for k, v in row.items() if k != "epoch"}))
        if is_main:
            accelerator.log(
                {k: v for k, v in row.items() if k not in ("epoch", "step")} | {"epoch": epoch + 1}, step=row["step"]
            )
        epoch += 1
        save(result["step"], 0, EpochTotals())
        run.write_outputs(state, row["step"])
        if cfg.train.max_steps and result["step"] >= cfg.train.max_steps:
            stopped = True

    final = finish(run, model, state)
    accelerator.end_training()
    return final


def finish(run: Run, model: torch.nn.Module, state: ckpt.TrainerState) -> dict:
    """final_metrics.json (+ the test split on the best checkpoint), plots, metrics.jsonl. Idempotent."""
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
    best = run.ckpt_root / state.best_checkpoint if state.best_checkpoint else None
    if cfg.eval.test_at_end and test is not None and test.num_samples > 0 and best is not None and best.is_dir():
        # Evaluate the best weights, not the last ones: that is the model early stopping selected.
        acc.unwrap_model(model).load_state_dict(load_file(str(best / "model.safetensors"), device="cpu"))
        metrics = run.eval_split(model, cfg.data.test_split)
        final.update(scalar_metrics(metrics))
        final["test/confusion_matrix"] = metrics["test/confusion_matrix"]
        final["test/checkpoint"] = state.best_checkpoint
    if acc.is_main_process:
        run.write_outputs(state, state.step)
        atomic_write_json(run.dir / "final_metrics.json", final)
        acc.log({f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))}, step=state.step)
        log.info("final: %s", _fmt({k: v for k, v in final.items() if isinstance(v, (int, float))}))
        log.info("run dir: %s (plots in %s)", run.dir, run.dir / "plots")
    acc.wait_for_everyone()
    return final
