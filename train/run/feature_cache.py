"""The feature cache of a frozen backbone: each split's pooled features computed once, then read from disk.

1. Each split's features are computed without autograd (``torch.inference_mode``), in bf16 where the CPU or GPU
   has it natively (``train.mixed_precision=auto`` or ``bf16``; never emulated) and channels_last, with the eval
   transform (resize + centre crop). Ranks split the images and gather the result; rows are sorted by sample key,
   so the cache does not depend on the number of ranks.
2. They are cached in ``~/.cache/catdog/features/<key>.safetensors``; the key hashes everything the numbers depend
   on: the shards' sha256s (from ``_info.json``, else ``shard_identity``: a remote shard is never downloaded just
   to hash it), the split, the weights (pinned sha256 or file hash), the image size, mean/std, the precision and
   this module's version. Change any of them: recomputed. Shards are named by file name and sha256, not by
   location: the same shards on a local disk or at a URL share their cached features.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.models import Inception_V3_Weights

from data_prep import storage
from data_prep.fetch import cache_dir
from data_prep.info import DatasetInfo, InfoError
from data_prep.progress import progress
from data_prep.shards import file_sha256
from train.config import Config
from train.data.streams import eval_loader
from train.data.transforms import EVAL_CROP_FRACTION
from train.hardware.gpus import wait_for_everyone
from train.hardware.precision import native_bf16
from train.models import pretrained
from train.models.inception import FEATURE_DIM, folded_for_inference
from train.run.session import eval_args

FEATURES_VERSION = "2"  # bump when what is cached changes meaning (2: computed with BatchNorm folded into the convs)


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
    """(features float32, labels, keys) for every batch of ``(images, labels, keys)``; no autograd anywhere.
    ``model`` is a FrozenAwareInception (train/models/inception.py), whose ``features`` end at the pooled layer; a
    copy with its BatchNorm folded into the convs computes them (``folded_for_inference``)."""
    model = folded_for_inference(model)
    feats, labels, keys = [], [], []
    for x, y, k in progress(batches, desc=desc, unit="batch", disable=not show):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats.append(model.features(x).float().cpu())
        labels.append(y)
        keys += list(k)
    if not feats:
        return torch.zeros(0, FEATURE_DIM), torch.zeros(0, dtype=torch.int64), []
    return torch.cat(feats), torch.cat(labels), keys


def weights_identity(cfg: Config) -> str:
    """What the backbone's numbers come from, for the cache key."""
    w = cfg.model.weights
    if w in pretrained.WEIGHTS:
        return f"{w}:{pretrained.WEIGHTS[w].sha256}:{pretrained.CONVERTER_VERSION}"
    if w == "imagenet":
        return Inception_V3_Weights.IMAGENET1K_V1.url
    if w == "none":
        return f"random-init:seed={cfg.train.seed}"
    return f"file:{file_sha256(Path(w).expanduser())}"


def cache_key(cfg: Config, info: DatasetInfo, split: str, bf16: bool) -> tuple[str, dict]:
    """(hex key, the inputs it hashes) for one split's features."""
    recorded = info.raw.get("shards", {})
    shards = [[p.name, recorded.get(p.name, {}).get("sha256") or shard_identity(p)] for p in info.shard_paths(split)]
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


def shard_identity(p: Path | storage.Location) -> str:
    """A shard's content identity when _info.json records no sha256: the file's hash; for an object in storage
    the sha256 catdog stored with it, else its ETag and size (never downloaded only to hash it)."""
    if isinstance(p, Path):
        return file_sha256(p)
    try:
        st = storage.stat(p)
    except storage.StorageError as e:
        raise InfoError(str(e)) from None
    return st.sha256 or f"etag:{st.etag}:{st.size}"


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
    pin = acc.device.type == "cuda"
    batches = eval_loader(cfg.data, info, split=split, with_keys=True, pin_memory=pin, **eval_args(cfg, acc))
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
