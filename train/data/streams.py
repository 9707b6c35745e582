"""What the trainer, catdog-evaluate and catdog-predict read: training batches per rank, and every eval sample once.

``TrainStream`` gives each rank the same number of batches per epoch, seekable to any batch (resume) and
independent of the number of workers; ``eval_loader`` / ``EvalSet`` read every sample of a split exactly once
across ranks. The order comes from train/data/order.py, the batches from train/data/loader.py.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_prep.info import DatasetInfo
from train.config import DataConfig
from train.data.loader import Batches, Plan, make_dataloader, split_layout, stats_of
from train.data.order import Schedule
from train.data.reader import ShardIndex
from train.data.remote import index_split, split_bytes
from train.data.shard_cache import ShardCache
from train.data.transforms import BatchColour, EpochCrops, batch_mix, eval_resize, normalise

log = logging.getLogger(__name__)


class TrainStream:
    """Training batches for one rank: same batch count on every rank, seekable, worker-independent.

    ``batches_per_epoch = ceil(N / B)`` with B = batch_size * world_size. The last global batch is padded by
    wrapping around to the start of the epoch order, i.e. it repeats a few samples, so that every rank (and
    every worker) yields exactly the same number of full batches. One DataLoader with persistent workers serves
    every epoch: ``loader(epoch, start_batch)`` tells the workers which pass comes next.
    """

    def __init__(
        self,
        cfg: DataConfig,
        info: DatasetInfo,
        *,
        split: str,
        batch_size: int,
        image_size: int,
        rank: int,
        world_size: int,
        seed: int,
        pin_memory: bool = False,
        crop_sizes: tuple[int, ...] = (),
    ):
        """``crop_sizes``: the training crop size of each epoch (progressive resizing); empty = ``image_size``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"per-device batch_size={batch_size} must be >= 1")
        self.cfg = cfg
        self.info = info
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.pin_memory = pin_memory
        self.paths, self.shard_lengths, self.offsets = split_layout(info, split)
        self.schedule = Schedule(
            tuple(self.shard_lengths), seed, cfg.shuffle, cfg.shuffle_buffer, batch_size, rank, world_size
        )
        self.num_samples = self.schedule.num_samples
        if self.num_samples == 0:
            raise ValueError(f"split {split!r} in {info.root} has no samples; nothing to train on")
        self.global_batch = self.schedule.global_batch
        self.batches_per_epoch = self.schedule.batches_per_epoch
        self.crops = EpochCrops(cfg, tuple(crop_sizes) or (image_size,))
        self.normalise = normalise(cfg)
        self.colour = BatchColour(cfg)
        self.mix = batch_mix(cfg, info.num_classes)
        self._counters: Counter = Counter()
        self._corrupt: Counter = Counter()
        self._loaders: dict[bool, tuple[list[ShardIndex], Plan, DataLoader]] = {}
        self.cache = shard_cache(cfg, info, [split, cfg.val_split], warn=rank == 0)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global sample order (flat ids), the same on every rank."""
        return self.schedule.order(epoch)

    def rank_batch(self, order: np.ndarray, t: int) -> list[tuple[int, int]]:
        """This rank's slice of global batch t as (position in the epoch, flat sample id)."""
        return self.schedule.rank_batch(order, t)

    def loader(self, epoch: int, start_batch: int = 0, *, with_keys: bool = False) -> Batches:
        """Batches start_batch..batches_per_epoch-1 of ``epoch``; resume seeks, nothing skipped is read."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} outside [0, {self.batches_per_epoch}]")
        # Cached per (path, size, mtime): a stat per local shard; once per process for a remote one.
        indices = index_split(self.info, self.split, self.cache)
        cached = self._loaders.get(with_keys)
        if cached is None or any(a is not b for a, b in zip(cached[0], indices, strict=True)):
            # First pass, or a shard changed on disk (or is unreadable): workers must not keep a stale index.
            plan = Plan(
                indices=indices,
                offsets=self.offsets,
                num_classes=self.info.num_classes,
                transform=self.crops(0),
                crops=self.crops,
                normalise=self.normalise,
                mix=self.mix,
                colour=self.colour,
                on_error=self.cfg.on_error,
                replace_corrupt=True,
                with_keys=with_keys,
                schedule=self.schedule,
                shard_names=[p.name for p in self.paths],
                cache=self.cache,
                prefetch=self.cfg.prefetch_shards,
            )
            cached = (
                indices,
                plan,
                make_dataloader(plan, self.cfg.workers(), persistent=True, pin_memory=self.pin_memory),
            )
            self._loaders[with_keys] = cached
        _, plan, loader = cached
        plan.pass_args.copy_(torch.tensor([epoch, start_batch]))
        return Batches(loader, plan.num_batches(), self._counters, self._corrupt, with_keys, plan.buffers)

    def stats(self) -> dict:
        """Counts over every loader() so far: JPEGs decoded, batches and samples yielded, corrupt samples
        skipped (``corrupt_skipped``, and per shard in ``corrupt_by_shard``)."""
        return stats_of(self._counters, self._corrupt)


def eval_batches(num_samples: int, *, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Sample positions of this rank's eval batches: batch k = positions [k*b, (k+1)*b), rank k % world_size.

    Each position lands on exactly one rank; ranks may get one batch more than others, and the last batch
    may be short.
    """
    num = math.ceil(num_samples / batch_size)
    return [list(range(k * batch_size, min((k + 1) * batch_size, num_samples))) for k in range(rank, num, world_size)]


def _eval_plan(
    cfg: DataConfig, info: DatasetInfo, *, split: str, batch_size: int, image_size: int, rank: int, world_size: int,
    with_keys: bool,
) -> Plan:  # fmt: skip
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    paths, _, offsets = split_layout(info, split)
    positions = eval_batches(int(offsets[-1]), batch_size=batch_size, rank=rank, world_size=world_size)
    cache = shard_cache(cfg, info, [split])
    return Plan(
        indices=index_split(info, split, cache),
        offsets=offsets,
        num_classes=info.num_classes,
        batches=[[(p, p) for p in batch] for batch in positions],
        transform=eval_resize(cfg, image_size),
        normalise=normalise(cfg),
        on_error=cfg.on_error,
        replace_corrupt=False,
        with_keys=with_keys,
        shard_names=[p.name for p in paths],
        cache=cache,
        prefetch=cfg.prefetch_shards,
    )


def shard_cache(cfg: DataConfig, info: DatasetInfo, splits: list[str], *, warn: bool = False) -> ShardCache | None:
    """The node's shard cache when the shards are at a URL (None for local shards). ``warn``: say once when the
    shards of ``splits`` do not fit in it (every epoch then downloads again what does not fit)."""
    if not info.is_remote:
        return None
    cache = ShardCache.create(cfg.cache_dir, cfg.cache_bytes())
    need = split_bytes(info, splits)
    if warn and need is not None and need > cache.limit:
        log.warning(
            "the shards of %s (%s) do not fit in the shard cache (data.cache_size: %s at %s): every epoch downloads "
            "again about %s; raise data.cache_size or point data.cache_dir at a larger disk",
            "+".join(dict.fromkeys(splits)), _size(need), _size(cache.limit), cache.root, _size(need - cache.limit),
        )  # fmt: skip
    return cache


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def eval_loader(
    cfg: DataConfig,
    info: DatasetInfo,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    rank: int,
    world_size: int,
    with_keys: bool = False,
    pin_memory: bool = False,
) -> Batches:
    """Every sample of ``split`` exactly once across ranks, in file order, no padding, no augmentation.

    Ranks may get different numbers of batches (one more at most; none when the split is empty), so callers
    must not run per-batch collectives during evaluation: update metrics locally and sync once at the end.
    A corrupt sample is dropped (and counted) rather than replaced, so it is never counted twice.
    One pass, fresh workers; ``EvalSet`` keeps its workers for repeated evaluations.
    """
    plan = _eval_plan(
        cfg, info, split=split, batch_size=batch_size, image_size=image_size, rank=rank, world_size=world_size,
        with_keys=with_keys,
    )  # fmt: skip
    loader = make_dataloader(plan, cfg.workers(), persistent=False, pin_memory=pin_memory)
    return Batches(loader, len(plan.batches), Counter(), Counter(), with_keys, plan.buffers)


class EvalSet:
    """``eval_loader``'s batches for a split evaluated again and again (validation after every epoch), from one
    DataLoader whose workers persist between evaluations."""

    def __init__(self, cfg: DataConfig, info: DatasetInfo, *, pin_memory: bool = False, **plan_args):
        self.cfg, self.info, self.pin_memory, self.plan_args = cfg, info, pin_memory, plan_args
        self._cached: tuple[list[ShardIndex], Plan, DataLoader] | None = None

    def loader(self) -> Batches:
        cache = self._cached[1].cache if self._cached is not None else shard_cache(self.cfg, self.info, [])
        indices = index_split(self.info, self.plan_args["split"], cache)
        if self._cached is None or any(a is not b for a, b in zip(self._cached[0], indices, strict=True)):
            plan = _eval_plan(self.cfg, self.info, with_keys=False, **self.plan_args)
            loader = make_dataloader(plan, self.cfg.workers(), persistent=True, pin_memory=self.pin_memory)
            self._cached = (plan.indices, plan, loader)
        _, plan, loader = self._cached
        return Batches(loader, len(plan.batches), Counter(), Counter(), False, plan.buffers)
