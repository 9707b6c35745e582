"""Building a training run's parts for this process: logging, the Accelerator, the optimizer, and the start-up checks
that turn a bad setup into one clear error before anything trains."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, extract_model_from_parallel, gather_object

from data_prep.cpus import threads_per_rank
from data_prep.info import INFO_NAME, DatasetInfo
from train.config import Config, ConfigError, ModelConfig
from train.hardware.gpus import CudaPlan, apply_cuda_plan, cuda_device_plan
from train.hardware.precision import choose_precision, cuda_has_bf16
from train.models.registry import new_parameter_prefixes
from train.run import tracking

log = logging.getLogger("catdog")


def setup_logging(run_dir: Path, is_main: bool) -> None:
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
    for name in ("train.data", "train.run.tracking"):
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
        # How long a rank waits in a collective for a peer that may be gone (NCCL's and gloo's defaults differ).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
    )
    if plan is not None:
        check_device(accelerator.device, plan, torch.cuda.current_device())
    if accelerator.device.type == "cpu":
        torch.set_num_threads(threads_per_rank())
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
