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
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    extract_model_from_parallel,
    gather_object,
    set_seed,
)
from safetensors.torch import load_file

from data_prep.atomic import atomic_write_json, atomic_write_text
from data_prep.info import INFO_NAME, DatasetInfo, InfoError, load_info
from data_prep.prepare import default_workers  # cores this process may use (affinity-aware)
from train import checkpoint as ckpt
from train import plots, tracking
from train.bundle import write_run_bundle
from train.config import Config, ConfigError, ModelConfig, auto_num_workers, local_world_size, save_config
from train.cpu_memory import keep_freed_memory
from train.data import EvalSet, TrainStream, eval_loader
from train.distributed import (
    CudaPlan,
    StopFlag,
    apply_cuda_plan,
    convert_sync_batchnorm,
    cuda_device_plan,
    wait_for_everyone,
)
from train.ema import EMA_NAME, WeightEMA
from train.engine import EpochTotals, StepInfo, evaluate, lr_at, scalar_metrics, train_one_epoch
from train.models import build_model, new_parameter_prefixes
from train.precision import auto_reason, choose_precision, cuda_has_bf16, native_bf16

log = logging.getLogger("catdog")


def cpu_threads() -> int:
    """Intra-op threads per rank on CPU: an explicit OMP_NUM_THREADS wins, else this node's cores / local ranks.

    N ranks each using every core oversubscribe the CPU and run several times slower than N x 1/N.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        # OpenMP also takes a per-nesting-level list ("4,2"): its first level is this process's team.
        return max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
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


def check_device(device: torch.device, plan: CudaPlan, current: int) -> None:
    """The device Accelerate picked must be the plan's. One process (no LOCAL_RANK) gets an index-less
    ``cuda``, i.e. the current device."""
    index = device.index if device.index is not None else current
    if device.type != "cuda" or index != plan.device_index:
        raise RuntimeError(f"Accelerate picked {device}, the device plan says {plan.describe()}")


def make_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    """The Accelerator for this process, on the right device, with the backend settings the config asks for."""
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    if cfg.train.deterministic:
        # cuBLAS needs this set before CUDA initialises to have deterministic GEMMs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    plan = None if cpu else cuda_device_plan(os.environ, torch.cuda.device_count())
    if plan is not None:
        apply_cuda_plan(plan)
        # Autotuned conv algorithms and TF32 tensor cores: free speed on GPUs, off when results must repeat.
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    # The plan's GPU, not the current one: on a node with mixed GPUs each rank asks about its own.
    this_gpu = None if plan is None else (lambda: cuda_has_bf16(torch.device("cuda", plan.device_index)))
    precision, _ = choose_precision(cfg.train.mixed_precision, "cpu" if cpu else "cuda", cuda_bf16=this_gpu)
    fp16_on_cpu = cpu and precision == "fp16"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="no" if fp16_on_cpu else precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=tracking.log_with(cfg, run_dir) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
    )
    if plan is not None:
        check_device(accelerator.device, plan, torch.cuda.current_device())
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads())
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
    total_steps: int
    warmup_steps: int
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
        return self.dir / "checkpoints"

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
        """The checkpoint file holding the weights that validation scores (see train/checkpoint.py)."""
        return EMA_NAME if self.ema is not None else "model.safetensors"

    def eval_model(self) -> torch.nn.Module:
        """What validation and the test scoring evaluate: the EMA weights when train.ema is on, else the model's."""
        return self.ema.module if self.ema is not None else bare_module(self.model)

    def eval_split(self, split: str) -> dict:
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
        return evaluate(
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

    def save(self, state: ckpt.TrainerState, step: int, batch_in_epoch: int, totals: EpochTotals | None) -> Path:
        """Checkpoint at ``step`` (mid-epoch when batch_in_epoch > 0), then prune. Every rank must call it."""
        state.step, state.batch_in_epoch = step, batch_in_epoch
        if batch_in_epoch and totals is not None:
            t = totals.reduced(self.acc)
            state.totals, state.corrupt_in_epoch = [t.loss_sum, t.correct, t.seen], self.corrupt_in_epoch()
        else:
            state.totals, state.corrupt_in_epoch = [0.0, 0.0, 0.0], 0
        state.train_seconds = self.train_seconds()
        state.eval_weights = self.weights_file
        extra = {EMA_NAME: self.ema.state()} if self.ema is not None and self.acc.is_main_process else None
        path = ckpt.save_checkpoint(self.acc, self.ckpt_root, state, extra)
        if self.acc.is_main_process:
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints, state.best_checkpoint)
        log.info("checkpoint %s", path)
        return path

    def write_outputs(self, state: ckpt.TrainerState, step: int, *, final: bool = False) -> None:
        """metrics.jsonl (rewritten from the checkpointed history, so a resume never duplicates an epoch) and
        plots; plots also go to W&B. Main process only. Plots at most every ``track.plot_every_s`` seconds during
        training (rendering them took 0.3-0.8 s, up to ~6 % of a short epoch on 2 CPU cores) and always at the end."""
        if not self.acc.is_main_process:
            return
        atomic_write_text(self.dir / "metrics.jsonl", "".join(_jsonl(h) for h in state.history))
        now = time.perf_counter()
        if final or now - self.plotted_at >= self.cfg.track.plot_every_s:
            made = plots.write_plots(self.dir / "plots", state.history, state.last_eval, self.info.classes)
            tracking.log_plots(self.acc, made, step)
            self.plotted_at = now


def check_same_data(acc: Accelerator, info: DatasetInfo) -> None:
    """Every rank must read the same shard index: each derives its batches per epoch and the epoch order from its
    own ``_info.json``, and a rank on a node with a stale copy (datasets copied to node-local disks) would run a
    different number of steps and hang the others in a collective. One gather of a digest at start-up."""
    if acc.num_processes == 1:
        return
    splits = {name: s.to_json() for name, s in info.splits.items()}
    digest = hashlib.sha256(json.dumps([info.classes, splits], sort_keys=True).encode()).hexdigest()[:16]
    seen = gather_object([(digest, acc.process_index, socket.gethostname())])
    if len({d for d, _, _ in seen}) > 1:
        first = seen[0][0]
        odd = [f"rank {r} on {host}" for d, r, host in seen if d != first]
        raise ConfigError(
            f"data.dir={info.root}: the ranks read different shard indexes ({INFO_NAME}): {', '.join(odd)} "
            f"differ(s) from rank 0 on {seen[0][2]}. Give every node the same copy of the shards"
        )


def check_aux_head(model: ModelConfig, world: int) -> None:
    """InceptionV3's auxiliary head with ``aux_loss_weight=0``: nothing trains it, and DDP (without
    find_unused_parameters, which costs a graph walk every step) fails on its gradient-less parameters at the second
    step with an error that does not name the setting. Refused on several processes, a warning on one. (Checked
    here, not when a config loads: bundles and run dirs from before still load.)"""
    if not (model.name == "inception_v3" and model.aux_logits and model.aux_loss_weight == 0):
        return
    fix = "set model.aux_logits=false, or model.aux_loss_weight > 0"
    if world > 1:
        raise ConfigError(
            f"model.aux_logits=true with model.aux_loss_weight=0 on {world} processes: DDP fails on the auxiliary "
            f"head's parameters, which nothing trains; {fix}"
        )
    log.warning("model.aux_logits=true with model.aux_loss_weight=0: nothing trains the auxiliary head; %s", fix)


def bare_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP and torch.compile wrappers. Not ``acc.unwrap_model(model)``: by default that returns
    the compile wrapper (whose state-dict keys have an ``_orig_mod.`` prefix: loading the best weights for the
    final test scoring failed) after re-pointing its ``_orig_mod`` from DDP to the bare module
    (accelerate/utils/other.py), so the training model lost DDP's ``no_sync`` (gradient accumulation then
    all-reduced every micro-batch)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def eval_args(cfg: Config, acc: Accelerator) -> dict:
    world = acc.num_processes
    return {
        "batch_size": max(1, cfg.eval.batch_size // world),
        "image_size": cfg.model.input_size(),
        "rank": acc.process_index,
        "world_size": world,
    }


def _jsonl(row: dict) -> str:
    return json.dumps(row, sort_keys=True) + "\n"


def main(cfg: Config, stop: StopFlag | None = None) -> dict:
    """Train (resuming from run.dir when it holds a checkpoint) and return the final metrics.

    ``stop`` (SLURM jobs): when its signal arrives during the training loop, every rank stops at the same step
    boundary, a checkpoint is saved there, and main returns ``{"interrupted": True, ...}`` without scoring the test
    split; the launcher then requeues the job, which resumes from that step. Before and after the loop (start-up,
    feature extraction, the final scoring) the signal requeues at once (``StopFlag``).
    """
    info = load_info(cfg.data.dir)  # bad data is refused before anything is written
    check_train_split(info, cfg.data.train_split)
    # A val split absent from _info.json (other tools' shards may name it only "validation") fails now, not after
    # the first epoch; an empty one is evaluated as empty, as before.
    info.split(cfg.data.val_split)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(cfg, run_dir)
    check_same_data(acc, info)
    # Before the loaders fork their workers, so they inherit it (train/cpu_memory.py: ~10 % a step on CPU).
    alloc_note = keep_freed_memory() if acc.device.type == "cpu" else None
    start_note = decide_start(cfg, acc)  # before logging opens run.dir/train.log: a start-over moves files
    _setup_logging(run_dir, acc.is_main_process)
    if alloc_note and acc.is_main_process:
        log.info("CPU memory: %s", alloc_note)
    if acc.is_main_process and cfg.train.mixed_precision == "fp16" and acc.mixed_precision == "no":
        log.warning("train.mixed_precision=fp16 is not applied on CPU: training in fp32 (bf16 works on CPU)")
    if (
        acc.is_main_process  # once per run, not once per rank (like the fp16 warning)
        and acc.mixed_precision == "bf16"
        and cfg.train.mixed_precision == "bf16"
        and not native_bf16(acc.device)
    ):
        # Honoured as configured (a user may want bf16 numerics), but it costs.
        log.warning(
            "train.mixed_precision=bf16 on %s: %s. Use train.mixed_precision=auto for fp32 here and bf16 where the "
            "hardware has it natively.",
            acc.device,
            auto_reason("no", acc.device.type),
        )
    if cfg.train.mixed_precision == "auto":
        # The reason for the choice make_accelerator made, not a second look at the hardware.
        log.info(
            "train.mixed_precision=auto: %s (%s)",
            acc.mixed_precision,
            auto_reason(acc.mixed_precision, acc.device.type),
        )
    if start_note.moved:
        log.info("train.resume=none: moved the previous start's checkpoints and tracker state to %s", start_note.moved)
    if cfg.train.precompute_features:
        # A frozen backbone trains its head on features computed once (train/features.py): same run dir outputs.
        from train.features import train_on_features

        return train_on_features(cfg, acc, info, start_note.checkpoint)
    run = build(cfg, acc, info, stop)
    state = resume(run, start_note.checkpoint)
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
        acc.end_training()
        return {"interrupted": True, "steps": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}
    if run.stop is not None:
        # finish() does not poll: a signal from here on (or one after the loop's last poll) requeues at once, and
        # the requeued job, finding training done, redoes finish() (it is idempotent).
        run.stop.stop_polling()
    final = finish(run, state)
    acc.end_training()
    return final


@dataclass
class StartNote:
    checkpoint: Path | None  # what to resume from, as rank 0 decided
    moved: Path | None  # where train.resume=none moved a previous start's state


def decide_start(cfg: Config, acc: Accelerator) -> StartNote:
    """Rank 0 decides what this start resumes from and tells the others (one broadcast).

    Ranks must not each list checkpoints/ on their own: on NFS or Lustre with attribute caching, right after a
    requeue, they can see different folders and then load different states or wait in different collectives.
    An error on rank 0 (a bad train.resume path) is broadcast too, so every rank raises it instead of hanging.
    """
    note: list = [None]
    if acc.is_main_process:
        try:
            note[0] = _start_on_main(cfg)
        except Exception as e:  # noqa: BLE001 - any error must reach every rank, or they wait in the broadcast
            note[0] = e
    if acc.num_processes > 1:
        broadcast_object_list(note, from_process=0)
    if isinstance(note[0], Exception):
        raise note[0]
    return note[0]


def _start_on_main(cfg: Config) -> StartNote:
    run_dir = Path(cfg.run.dir)
    root = run_dir / "checkpoints"
    ckpt.remove_partial(root)
    mode = cfg.train.resume
    if mode == "none":
        return StartNote(None, ckpt.start_over(run_dir, time.strftime("%Y%m%d-%H%M%S")))
    if mode == "auto":
        return StartNote(ckpt.latest_checkpoint(root), None)
    path = Path(mode).expanduser()
    if not (path / ckpt.STATE_NAME).is_file():
        raise ConfigError(f"train.resume={mode!r} is not a complete checkpoint folder (no {ckpt.STATE_NAME})")
    return StartNote(ckpt.adopt(path, root), None)


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
    fingerprint = run_fingerprint(cfg, shapes, stream.num_samples, world)
    return Run(
        cfg=cfg,
        acc=acc,
        info=info,
        model=model,
        optimizer=optimizer,
        stream=stream,
        val=val,
        fingerprint=fingerprint,
        stop=stop,
        ema=ema,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * cfg.train.epochs,
        warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
    )


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
    )
    return stream, EvalSet(cfg.data, info, pin_memory=on_gpu, split=cfg.data.val_split, **eval_args(cfg, acc))


def run_fingerprint(cfg: Config, shapes: str, train_samples: int, world: int) -> dict:
    """What a checkpoint's weights and data position depend on (checked on resume: train/checkpoint.RESUME_KEYS)."""
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


def resume(run: Run, path: Path | None) -> ckpt.TrainerState:
    """The state to start from: a fresh one, or the checkpoint rank 0 picked (loaded on every rank)."""
    state = ckpt.TrainerState(fingerprint=run.fingerprint)
    if path is not None:
        # Read the JSON state first: a checkpoint from another config is refused before any tensor is loaded.
        ckpt.check_resumable(path, ckpt.TrainerState.from_json(path / ckpt.STATE_NAME), run.fingerprint)
        state = ckpt.load_checkpoint(run.acc, path)
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, state.epoch, state.batch_in_epoch, state.step)
        if run.ema is not None:
            if (path / EMA_NAME).is_file():
                run.ema.load(path / EMA_NAME)
            else:
                log.warning(
                    "train.ema=true but %s has no %s: the average starts from the resumed weights", path, EMA_NAME
                )
        saved_world = state.fingerprint.get("world_size", run.acc.num_processes)
        if saved_world != run.acc.num_processes:
            log.warning(
                "resuming a run saved on %d process(es) on %d: the data position carries over (it counts global "
                "batches), the per-rank random number streams do not",
                saved_world,
                run.acc.num_processes,
            )
        state.fingerprint = run.fingerprint
    state.precision = run.acc.mixed_precision  # train.mixed_precision=auto resolved on this hardware (bundles say it)
    run.seconds_before = state.train_seconds
    run.session_start = time.perf_counter()
    return state


def start_trackers(run: Run, state: ckpt.TrainerState) -> None:
    """config.yaml, the CSV cut back to the checkpoint, the W&B id; then the trackers (every rank calls this)."""
    cfg, acc = run.cfg, run.acc
    if acc.is_main_process:
        save_config(cfg, run.dir / "config.yaml")  # only once the checkpoint (if any) was accepted for it
        # Rows the killed session logged after its last checkpoint are re-logged by this one: drop them first.
        tracking.truncate_csv(run.dir / tracking.CSV_NAME, state.step)
        state.wandb_run_id = tracking.wandb_run_id(run.dir, state.wandb_run_id) if "wandb" in cfg.track.backends else ""
    tracking.init_trackers(acc, cfg, run.dir, state.wandb_run_id, resume_step=state.step)


def _done(run: Run, state: ckpt.TrainerState) -> bool:
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
        acc.mixed_precision,
        torch.get_num_threads(),
        acc.device,
        run.stream.num_samples,
        run.steps_per_epoch,
        cfg.train.batch_size,
        run.stream.batch_size,
        cfg.train.grad_accum,
        cfg.train.epochs,
    )
    if run.ema is not None:
        log.info(
            "weight EMA on: decay %s%s; validation, early stopping, the best checkpoint and the test split use %s",
            cfg.train.ema_decay,
            " with warm-up" if cfg.train.ema_warmup else "",
            EMA_NAME,
        )


def train_epoch(run: Run, state: ckpt.TrainerState) -> bool:
    """Train the rest of epoch ``state.epoch``; at its end evaluate, checkpoint and write outputs.

    Returns True when a stop signal ended it early (a checkpoint at that step is saved).
    """
    cfg, acc = run.cfg, run.acc
    epoch, start = state.epoch, state.batch_in_epoch
    totals = EpochTotals(*state.totals) if acc.is_main_process else EpochTotals()
    # stats() counts over this process's lifetime; the part of a resumed epoch before the kill is in state.
    run.corrupt_base = run.stream.stats()["corrupt_skipped"]
    run.corrupt_before = state.corrupt_in_epoch

    def reseed(batch_index: int) -> None:
        seq = np.random.SeedSequence([cfg.train.seed, acc.process_index, epoch, batch_index])
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0]))

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
        max_steps=cfg.train.max_steps,
        clip_grad_norm=cfg.optim.clip_grad_norm,
        label_smoothing=cfg.optim.label_smoothing,
        aux_weight=cfg.model.aux_loss_weight if cfg.model.name == "inception_v3" else 0.0,
        channels_last=cfg.train.channels_last,
        reseed=reseed if cfg.train.deterministic else None,
        on_step=on_step,
        should_stop=run.stop.agreed if run.stop is not None else None,
        log_every=cfg.train.log_every,
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


def end_epoch(run: Run, state: ckpt.TrainerState, result: dict) -> None:
    """Epoch metrics, validation, best checkpoint and early stopping, the epoch-end checkpoint, outputs."""
    cfg, acc = run.cfg, run.acc
    epoch = state.epoch
    t = result["totals"].reduced(acc)
    row = {
        "epoch": epoch + 1,
        "step": result["step"],
        "lr": run.lr(max(result["step"] - 1, 0)),
        "train/loss": t.loss_sum / max(t.seen, 1),
        "train/accuracy": t.correct / max(t.seen, 1),
        "train/images_per_s": result["images"] / max(result["seconds"], 1e-9),
        "data/corrupt_skipped": run.corrupt_in_epoch(),
    }
    if row["data/corrupt_skipped"] and acc.is_main_process:
        log.warning(
            "epoch %d: skipped %d corrupt training sample(s) on all ranks (data.on_error=skip; each is named "
            "in a warning above, from its rank); the batches were refilled from valid samples",
            epoch + 1,
            row["data/corrupt_skipped"],
        )
    if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.train.epochs:
        validate(run, state, row, ckpt.step_dir_name(result["step"]))
    row["time_s"] = run.train_seconds()  # wall clock since the run began
    state.history.append(row)
    log.info("epoch %d: %s", epoch + 1, _fmt({k: v for k, v in row.items() if k != "epoch"}))
    if acc.is_main_process:
        acc.log({k: v for k, v in row.items() if k not in ("epoch", "step")} | {"epoch": epoch + 1}, step=row["step"])
    state.epoch = epoch + 1
    run.save(state, result["step"], 0, None)
    run.write_outputs(state, row["step"])


def validate(run: Run, state: ckpt.TrainerState, row: dict, step_dir: str) -> None:
    """Score the validation split into ``row``; track the best checkpoint and early stopping in ``state``."""
    cfg = run.cfg
    epoch = state.epoch
    metrics = run.eval_split(cfg.data.val_split)
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
    if math.isnan(value):
        # Undefined (e.g. AUROC on a one-class val split): no improvement, but never no best checkpoint,
        # so the test split is still scored and the best weights still kept.
        log.warning("epoch %d: %s is NaN; counted as no improvement", epoch + 1, metric)
        improved = False
        if not state.best_checkpoint:
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


def finish(run: Run, state: ckpt.TrainerState) -> dict:
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
    # Rank 0 looks for the best checkpoint and tells the others: the test evaluation holds collectives, so
    # every rank must make the same choice even when their views of a shared filesystem differ.
    best = run.ckpt_root / state.best_checkpoint if state.best_checkpoint else None
    found = [best is not None and best.is_dir()] if acc.is_main_process else [False]
    if acc.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    if cfg.eval.test_at_end and test is not None and test.num_samples > 0 and found[0]:
        # Evaluate the best weights, not the last ones: that is the model early stopping selected. The file is the
        # one its validation scored (ema.safetensors with train.ema); both files have the model's keys.
        weights = ckpt.eval_weights_file(best)
        run.eval_model().load_state_dict(load_file(str(weights), device="cpu"))
        metrics = run.eval_split(cfg.data.test_split)
        final.update(scalar_metrics(metrics))
        final["test/confusion_matrix"] = metrics["test/confusion_matrix"]
        final["test/checkpoint"] = state.best_checkpoint
        final["test/weights"] = weights.name
    if acc.is_main_process:
        run.write_outputs(state, state.step, final=True)
        atomic_write_json(run.dir / "final_metrics.json", final)
        if found[0]:
            # The self-contained model bundle (run.dir/model/: weights + model.json) of the best weights.
            write_run_bundle(run.dir, cfg, run.info, asdict(state), best, final)
        acc.log({f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))}, step=state.step)
        log.info("final: %s", _fmt({k: v for k, v in final.items() if isinstance(v, (int, float))}))
        log.info("run dir: %s (plots in %s)", run.dir, run.dir / "plots")
    wait_for_everyone(acc)
    return final
