"""Feature extraction the fast way (``train.precompute_features=true``): the frozen backbone runs once per image,
the head trains on cached features — the linear-probe pattern of DINOv2's evaluation.

A frozen backbone with no augmentation maps each image to the same 2,048 numbers every epoch, so recomputing them
is pure waste (an InceptionV3 forward at 299 px is ~99.9 % of a frozen run's compute). Here:

1. Each split's features are computed without autograd (``torch.inference_mode``), in bf16 where the CPU or GPU
   has it natively (``train.mixed_precision=auto`` or ``bf16``; never emulated) and channels_last, with the eval
   transform (resize + centre crop).
   Ranks split the images and gather the result; rows are sorted by sample key, so the cache does not depend on
   the number of ranks.
2. They are cached in ``~/.cache/catdog/features/<key>.safetensors``; the key hashes everything the numbers depend
   on: the shards' sha256s (from ``_info.json``, else hashed here), the split, the weights (pinned sha256 or file
   hash), the image size, mean/std, the precision and this module's version. Change any of them: recomputed.
3. The head (the model's own dropout + fc, so its parameters ARE the model's) trains on them with the trainer's
   own ``train_one_epoch``/``evaluate``, loss, optimizer and LR schedule. The run dir gets what an image run
   writes: metrics.jsonl, plots, final_metrics.json, and checkpoints of the whole model (frozen backbone + trained
   head), so evaluation, prediction and resume read them as any other run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from data_prep.atomic import atomic_write_json
from data_prep.fetch import cache_dir
from data_prep.info import DatasetInfo
from train import checkpoint as ckpt
from train import pretrained
from train.config import Config, ConfigError
from train.data import eval_loader
from train.distributed import wait_for_everyone
from train.engine import EpochTotals, evaluate, lr_at, scalar_metrics, train_one_epoch
from train.models import INCEPTION_BLOCKS, build_model
from train.precision import native_bf16
from train.transforms import EVAL_CROP_FRACTION

log = logging.getLogger("catdog")

FEATURES_VERSION = "1"  # bump when what is cached changes meaning
# Inception3's forward up to the pooled features, in order (torchvision's _forward without aux, dropout, fc).
_TRUNK = (*INCEPTION_BLOCKS[:3], "maxpool1", *INCEPTION_BLOCKS[3:5], "maxpool2", *INCEPTION_BLOCKS[5:], "avgpool")


def backbone_features(model: nn.Module, x: Tensor) -> Tensor:
    """The frozen trunk's pooled features (N, 2048) of a FrozenAwareInception for a normalised batch."""
    net = model.net
    x = net._transform_input(x)
    for name in _TRUNK:
        x = getattr(net, name)(x)
    return torch.flatten(x, 1)


class Head(nn.Module):
    """The model's own dropout + fc: training this trains the model's head (shared parameters)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.dropout = model.net.dropout
        self.fc = model.net.fc

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.dropout(features))


@torch.inference_mode()
def extract(
    model: nn.Module,
    batches,
    *,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    desc: str = "features",
    show: bool = False,
) -> tuple[Tensor, Tensor, list[str]]:
    """(features float32, labels, keys) for every batch of ``(images, labels, keys)``; no autograd anywhere."""
    model.eval()
    feats, labels, keys = [], [], []
    for x, y, k in tqdm(batches, desc=desc, disable=not show, dynamic_ncols=True, leave=False):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats.append(backbone_features(model, x).float().cpu())
        labels.append(y)
        keys += list(k)
    if not feats:
        return torch.zeros(0, 2048), torch.zeros(0, dtype=torch.int64), []
    return torch.cat(feats), torch.cat(labels), keys


def _file_sha256(path: Path) -> str:
    return pretrained.sha256_file(path)


def weights_identity(cfg: Config) -> str:
    """What the backbone's numbers come from, for the cache key."""
    w = cfg.model.weights
    if w in pretrained.WEIGHTS:
        return f"{w}:{pretrained.WEIGHTS[w].sha256}:{pretrained.CONVERTER_VERSION}"
    if w == "imagenet":
        from torchvision.models import Inception_V3_Weights

        return Inception_V3_Weights.IMAGENET1K_V1.url
    if w == "none":
        return f"random-init:seed={cfg.train.seed}"
    return f"file:{_file_sha256(Path(w).expanduser())}"


def cache_key(cfg: Config, info: DatasetInfo, split: str, bf16: bool) -> tuple[str, dict]:
    """(hex key, the inputs it hashes) for one split's features."""
    recorded = info.raw.get("shards", {})
    shards = [[p.name, recorded.get(p.name, {}).get("sha256") or _file_sha256(p)] for p in info.shard_paths(split)]
    inputs = {
        "version": FEATURES_VERSION,
        "split": split,
        "shards": shards,
        "classes": list(info.classes),
        "model": cfg.model.name,
        "weights": weights_identity(cfg),
        "image_size": cfg.model.input_size(),
        "eval_crop_fraction": EVAL_CROP_FRACTION,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "precision": "bf16" if bf16 else "fp32",
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


def features_dir() -> Path:
    return cache_dir() / "features"


def _gather(acc: Accelerator, feats: Tensor, labels: Tensor, keys: list[str]) -> tuple[Tensor, Tensor, list[str]]:
    """Every rank's rows on every rank, sorted by key (the same order whatever the number of ranks)."""
    if acc.num_processes > 1:
        parts: list = [None] * acc.num_processes
        torch.distributed.all_gather_object(parts, (feats, labels, keys))
        feats = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        keys = [k for p in parts for k in p[2]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return feats[order], labels[order], [keys[i] for i in order]


def _on_every_rank(acc: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (a collective: every rank must call it)."""
    return all(gather_object([bool(flag)])) if acc.num_processes > 1 else flag


def split_features(cfg: Config, info: DatasetInfo, model: nn.Module, acc: Accelerator, split: str) -> dict:
    """``{"features", "labels", "cached", "seconds"}`` for ``split``: from the cache, else extracted and cached."""
    t0 = time.perf_counter()
    # The precision make_accelerator resolved (auto -> bf16 only where native); never emulated here: slower.
    # Every rank must make the same two choices (extract or read the cache; bf16 or not): a rank that read the
    # cache would go on to the next collective while the others wait in this split's gather. Ranks can see
    # different things: a node-local cache folder, NFS attribute caching, a node of another GPU type.
    bf16 = _on_every_rank(acc, acc.mixed_precision == "bf16" and native_bf16(acc.device))
    key, inputs = cache_key(cfg, info, split, bf16)
    path = features_dir() / f"{key}.safetensors"
    if _on_every_rank(acc, path.is_file()):
        with safe_open(str(path), framework="pt") as f:
            out = {"features": f.get_tensor("features"), "labels": f.get_tensor("labels")}
        return out | {"cached": True, "seconds": time.perf_counter() - t0, "bf16": bf16, "path": path}
    world = acc.num_processes
    batches = eval_loader(
        cfg.data,
        info,
        split=split,
        batch_size=max(1, cfg.eval.batch_size // world),
        image_size=cfg.model.input_size(),
        rank=acc.process_index,
        world_size=world,
        with_keys=True,
        pin_memory=acc.device.type == "cuda",
    )
    feats, labels, keys = extract(model, batches, device=acc.device, bf16=bf16, channels_last=cfg.train.channels_last)
    feats, labels, keys = _gather(acc, feats, labels, keys)
    if acc.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
        os.close(fd)
        try:
            meta = {"inputs": json.dumps(inputs, sort_keys=True), "keys": json.dumps(keys)}
            save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, tmp, metadata=meta)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # a kill never leaves a half-written cache entry under the real name
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    wait_for_everyone(acc)
    seconds = time.perf_counter() - t0
    return {"features": feats, "labels": labels, "cached": False, "seconds": seconds, "bf16": bf16, "path": path}


def _epoch_batches(feats: Tensor, labels: Tensor, batch_size: int, seed: int, epoch: int) -> list:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [(feats[i], labels[i]) for i in torch.randperm(len(labels), generator=g).split(batch_size)]


def _save_best_and_last(acc: Accelerator, run, head: Head, state: ckpt.TrainerState, best: dict | None) -> None:
    """Checkpoint the whole model once at the end, not per epoch: a head epoch takes milliseconds, writing the
    87 MB model about a second. The best epoch's head gets its own checkpoint (what finish() and early stopping
    select, as in an image run), the last state the resumable one. A run killed before this restarts the head from
    scratch, which with the features cached costs seconds."""
    if best is not None and best["step"] != state.step:
        last_head = {k: v.clone() for k, v in head.state_dict().items()}
        head.load_state_dict(best["head"])
        at_best = ckpt.TrainerState(**{**asdict(state), "step": best["step"], "epoch": state.best_epoch})
        at_best.history = state.history[: state.best_epoch]
        at_best.best_checkpoint = ckpt.step_dir_name(best["step"])
        ckpt.save_checkpoint(acc, run.ckpt_root, at_best)
        head.load_state_dict(last_head)
    if best is not None:  # else a resumed session did not improve on the best it resumed with
        state.best_checkpoint = ckpt.step_dir_name(best["step"])
    ckpt.save_checkpoint(acc, run.ckpt_root, state)
    if acc.is_main_process:
        ckpt.prune_checkpoints(run.ckpt_root, max(run.cfg.train.keep_checkpoints, 1), state.best_checkpoint)
    run.write_outputs(state, state.step)


def train_on_features(cfg: Config, acc: Accelerator, info: DatasetInfo, resume: Path | None) -> dict:
    """The whole run of a frozen backbone on cached features; writes the run dir like ``trainer.main`` does.
    ``resume``: the checkpoint rank 0 picked for this start (trainer.decide_start), or None."""
    from train.trainer import (
        Run,
        data_streams,
        finish,
        make_optimizer,
        model_fingerprint,
        run_fingerprint,
        start_trackers,
    )
    from train.trainer import resume as resume_state  # the trainer imports this module lazily, so this is no cycle

    is_main, world = acc.is_main_process, acc.num_processes
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, info.num_classes).to(acc.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    shapes = model_fingerprint(model)
    t0 = time.perf_counter()
    train = split_features(cfg, info, model, acc, cfg.data.train_split)
    val = split_features(cfg, info, model, acc, cfg.data.val_split)
    extract_seconds = time.perf_counter() - t0
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
    head = Head(model)
    # Built over the model (not the head) so parameter names, hence LR groups, match an image run's.
    optimizer = make_optimizer(cfg, model)
    model, optimizer = acc.prepare(model, optimizer)  # checkpoints save the whole model + the head's optimizer

    batch = cfg.train.batch_size
    steps_per_epoch = math.ceil(n / batch)
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

    fingerprint = run_fingerprint(cfg, shapes, info.split(cfg.data.train_split).num_samples, world)
    # The trainer's Run over the whole model: finish() scores the test split on images with it, checkpoints and
    # outputs go where an image run puts them.
    stream, val_set = data_streams(cfg, acc, info)
    run = Run(
        cfg=cfg,
        acc=acc,
        info=info,
        model=model,
        optimizer=optimizer,
        stream=stream,
        val=val_set,
        fingerprint=fingerprint,
        stop=None,
        ema=None,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup,
    )
    state = resume_state(run, resume)
    start_trackers(run, state)
    if not state.history:  # the extraction is part of this run's time (a cache hit makes it ~0)
        state.train_seconds = extract_seconds
    metric, mode_max = cfg.train.early_stop_metric, cfg.train.early_stop_mode == "max"
    session_start = time.perf_counter()
    seconds_before = state.train_seconds
    # A 2,048 x classes linear layer is far too small for intra-op threads: on CPU they only add barrier waits
    # (measured on 2 busy cores: 0.08-0.13 s per head epoch on 1 thread, 0.7-2.5 s on 2).
    threads = torch.get_num_threads()
    if acc.device.type == "cpu":
        torch.set_num_threads(1)
    epoch = start_epoch = state.epoch
    best = None  # {"step", "head"}: the best epoch's head weights, kept in memory (a few KB)
    while epoch < cfg.train.epochs and not state.stopped_early:
        batches = _epoch_batches(train["features"], train["labels"], batch, cfg.train.seed, epoch)
        result = train_one_epoch(
            head,
            batches,
            optimizer,
            acc,
            lr_fn=lr_fn,
            step=state.step,
            start_batch=0,
            num_batches=len(batches),
            totals=EpochTotals(),
            max_steps=cfg.train.max_steps,
            clip_grad_norm=cfg.optim.clip_grad_norm,
            label_smoothing=cfg.optim.label_smoothing,
            desc=f"head epoch {epoch + 1}/{cfg.train.epochs}",
        )
        t = result["totals"]  # every rank trained on all features: no reduction needed
        # Ranks split only the evaluation (evaluate() sums over ranks): each takes every world-th batch.
        eb = cfg.eval.batch_size
        val_batches = list(zip(val["features"].split(eb), val["labels"].split(eb), strict=True))
        metrics = evaluate(head, val_batches[acc.process_index :: world], acc, num_classes=info.num_classes)
        row = {
            "epoch": epoch + 1,
            "step": result["step"],
            "lr": lr_fn(max(result["step"] - 1, 0)),
            "train/loss": t.loss_sum / max(t.seen, 1),
            "train/accuracy": t.correct / max(t.seen, 1),
            "train/images_per_s": result["images"] / world / max(result["seconds"], 1e-9),
            "data/corrupt_skipped": 0,
            **scalar_metrics(metrics),
        }
        state.last_eval = {
            "split": cfg.data.val_split,
            "epoch": epoch + 1,
            "auroc": metrics["val/auroc"],
            "confusion_matrix": metrics["val/confusion_matrix"],
            "roc": metrics["val/roc"],
        }
        value = row[metric]
        better = not math.isnan(value) and (
            state.best_metric is None or (value > state.best_metric if mode_max else value < state.best_metric)
        )
        if better or not (best or state.best_checkpoint):
            state.best_metric = value if better else state.best_metric
            state.best_epoch = epoch + 1
            best = {"step": result["step"], "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
        state.epochs_since_best = epoch + 1 - state.best_epoch
        patience = cfg.train.early_stop_patience
        state.stopped_early = bool(patience and state.epochs_since_best >= patience)
        state.train_seconds = seconds_before + (time.perf_counter() - session_start)
        row["time_s"] = state.train_seconds
        state.history.append(row)
        if is_main:
            acc.log(
                {k: v for k, v in row.items() if k not in ("epoch", "step")} | {"epoch": epoch + 1}, step=row["step"]
            )
        log.info("epoch %d: val/accuracy=%.4f train/loss=%.4f", epoch + 1, row["val/accuracy"], row["train/loss"])
        epoch += 1
        state.step, state.epoch, state.batch_in_epoch = result["step"], epoch, 0
        if result["stopped"]:
            break
    torch.set_num_threads(threads)  # finish() may score the test split on images
    if state.epoch > start_epoch:
        _save_best_and_last(acc, run, head, state, best)
    final = finish(run, state)
    if is_main:
        extra = {
            "features/extract_seconds": round(extract_seconds, 3),
            "features/cached": bool(train["cached"] and val["cached"]),
            "features/bf16": bool(train["bf16"]),
        }
        final.update(extra)
        atomic_write_json(run.dir / "final_metrics.json", final)
    acc.end_training()
    return final
