"""Batches built in DataLoader workers from a plan of (position, sample) slots, handed over in reused shared memory.

Within a rank, DataLoader worker w builds the batches t with ``(t - start_batch) % W == w``: torch's DataLoader
collects batches from its workers round-robin, so they arrive in order. Every rank and worker therefore yields a
number of batches computed from metadata (no DDP hang at an epoch end, whatever the number of shards vs ranks x
workers), and a resume at batch k computes where batch k lives and seeks there.

Workers hand batches over in shared-memory buffers they reuse (train/data/batch_buffers.py), released only when the
main process has seen the consumer drop the batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.info import DatasetInfo
from data_prep.storage import Location
from train.data.batch_buffers import BatchBuffers
from train.data.order import Schedule, augment_seed
from train.data.reader import Corrupt, DataError, ShardIndex, ShardReader
from train.data.shard_cache import Prefetcher, ShardCache
from train.data.transforms import BatchColour, EpochCrops
from train.data.workers import guarded, loader_context, quiet_worker

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What one rank reads. Eval: ``batches`` (each a list of (position, flat sample id)). Training:
    ``schedule``, and the (epoch, start batch) of the current pass in ``pass_args``, a shared-memory tensor the
    main process sets before each pass -- persistent workers read it when the pass starts."""

    indices: list[ShardIndex]
    offsets: np.ndarray  # flat id -> shard via searchsorted
    num_classes: int
    transform: Callable[[Tensor], Tensor]  # per image, uint8 -> uint8 (augment or resize + crop)
    normalise: Callable[[Tensor], Tensor]  # per stacked batch, uint8 -> normalised float32
    on_error: str
    replace_corrupt: bool  # training: refill from the batch (constant size); eval: drop (exact-once metrics)
    with_keys: bool
    batches: list[list[tuple[int, int]]] = field(default_factory=list)  # eval
    schedule: Schedule | None = None  # training
    pass_args: Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64).share_memory_())
    shard_names: list[str] = field(default_factory=list)
    mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None  # training: MixUp/CutMix per batch
    colour: BatchColour | None = None  # training: colour jitter + normalisation per batch (replaces `normalise`)
    buffers: BatchBuffers | None = None  # set with the DataLoader when it has workers: reusable shared memory
    crops: EpochCrops | None = None  # training: each epoch's per-image transform (progressive resizing)
    cache: ShardCache | None = None  # shards at a URL: the node's shard cache (train/data/shard_cache.py)
    prefetch: int = 0  # shards each worker downloads ahead of the one it reads

    def rows(self) -> int:
        """Samples in a full batch."""
        if self.schedule is None:
            return max((len(b) for b in self.batches), default=0)
        return self.schedule.batch_size

    def num_batches(self) -> int:
        if self.schedule is None:
            return len(self.batches)
        return self.schedule.batches_per_epoch - int(self.pass_args[1])


class _Pass:
    """One pass over a plan, as one worker sees it: which batches, the augmentation seed, the epoch order."""

    def __init__(self, plan: Plan, worker: int, num_workers: int):
        sched = plan.schedule
        self.transform = plan.transform
        if sched is None:
            self.batches = plan.batches[worker::num_workers]
            self.aug_seed: tuple[int, int] | None = None  # eval: deterministic
            self.order: np.ndarray | None = None
            return
        epoch, start = (int(v) for v in plan.pass_args.tolist())
        self.order = sched.order(epoch)
        if plan.crops is not None:
            self.transform = plan.crops(epoch)
        # Worker w of W builds batches t with (t - start) % W == w; the DataLoader interleaves them back in order.
        self.batches = [
            sched.rank_batch(self.order, t) for t in range(start + worker, sched.batches_per_epoch, num_workers)
        ]
        self.aug_seed = (sched.seed, epoch)


class _BatchDataset(IterableDataset):
    """Worker w of W yields its share of the pass's batches; the DataLoader interleaves them back into order."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __iter__(self) -> Iterator[tuple]:
        wi = get_worker_info()
        w, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        this = _Pass(self.plan, w, nw)
        prefetcher = self._prefetcher(this)
        reader = ShardReader(self.plan.indices, self.plan.num_classes, self.plan.cache, prefetcher)
        buffers = self.plan.buffers
        pass_no = int(buffers.pass_no) if buffers is not None else 0  # read once the pass has begun
        rows = self.plan.rows()
        try:
            for batch in this.batches:
                x, y, keys, report = self._build(reader, batch, this)
                if x is not None and buffers is not None:
                    x, report["buffer"] = buffers.place(w, x, pass_no, rows)
                yield x, y, keys, report
        finally:
            reader.close()
            if prefetcher is not None and wi is None:
                # Reading in this process (no workers): no download thread may outlive the pass, as a fork of a
                # process with a thread inside the storage client could inherit a held lock.
                prefetcher.stop(wait=True)

    def _prefetcher(self, this: _Pass) -> Prefetcher | None:
        """Downloads of the remote shards this worker reads, in the order it first reads them, ahead of it."""
        p = self.plan
        if p.cache is None or p.prefetch <= 0 or not this.batches:
            return None
        flats = np.fromiter((flat for batch in this.batches for _, flat in batch), dtype=np.int64)
        shards = np.searchsorted(p.offsets, flats, side="right") - 1
        _, first = np.unique(shards, return_index=True)
        order = [int(s) for s in shards[np.sort(first)]]
        todo = [(s, p.indices[s].remote) for s in order if p.indices[s].remote is not None and not p.indices[s].error]
        return Prefetcher(p.cache, todo, p.prefetch) if todo else None

    def _locate(self, flat: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.plan.offsets, flat, side="right")) - 1
        return shard, flat - int(self.plan.offsets[shard])

    def _build(self, reader: ShardReader, batch: list[tuple[int, int]], this: _Pass) -> tuple:
        p = self.plan
        decoded_before = reader.decoded
        loaded: list[tuple[Tensor, int, str] | None] = []
        errors: list[tuple[str, str, str]] = []
        for _, flat in batch:
            shard, member = self._locate(flat)
            try:
                image, label = reader.load(shard, member)
                loaded.append((image, label, reader.key(shard, member)))
            except Corrupt as e:
                name = p.shard_names[shard]
                if p.on_error == "raise":
                    raise DataError(
                        f"corrupt sample in shard {p.indices[shard].path}, key {e.key!r}: {e.reason}. "
                        "Rerun catdog-prep, or set data.on_error=skip to skip and count such samples."
                    ) from None
                errors.append((name, e.key, e.reason))
                loaded.append(None)
        slots = list(zip((pos for pos, _ in batch), loaded, strict=True))
        if p.replace_corrupt:
            slots = self._refill(reader, slots, this.order)
        else:
            slots = [(pos, s) for pos, s in slots if s is not None]
        report = {"decoded": reader.decoded - decoded_before, "errors": errors}
        if not slots:  # eval batch whose every sample was corrupt
            return None, None, [], report
        # Seeded from (seed, epoch, position) inside a forked RNG: the result does not depend on which worker
        # runs it, and the caller's torch RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            images, colour = [], []
            jitter = p.colour is not None and p.colour.strength > 0 and this.aug_seed is not None
            for pos, (image, _, _) in slots:
                if this.aug_seed is not None:
                    # The CPU generator only: torch.manual_seed also queues seeds for every lazy accelerator
                    # backend, recording a stack trace each time (~0.5 ms per image on this machine).
                    torch.default_generator.manual_seed(augment_seed(*this.aug_seed, pos))
                images.append(this.transform(image))
                if jitter:  # this image's colour jitter, drawn from its own seed, applied below per batch
                    colour.append(p.colour.draw())
            batch = torch.stack(images)
            if p.colour is not None:
                x = p.colour(batch, torch.stack(colour) if jitter else None)
            else:
                x = p.normalise(batch)
            y = torch.tensor([label for _, (_, label, _) in slots], dtype=torch.int64)
            if p.mix is not None and this.aug_seed is not None:
                # Seeded by the batch's first position (salted apart from that sample's own seed): the batch
                # holds the same samples in any worker or after a resume, so the mix is the same too.
                torch.default_generator.manual_seed(augment_seed(*this.aug_seed, slots[0][0], 1))
                x, y = p.mix(x, y)
        keys = [key for _, (_, _, key) in slots] if p.with_keys else None
        return x, y, keys, report

    def _refill(self, reader: ShardReader, slots: list, order: np.ndarray | None) -> list:
        """Replace each corrupt slot with the next valid sample of the batch, keeping the batch size constant."""
        valid = [i for i, (_, s) in enumerate(slots) if s is not None]
        if not valid:
            assert order is not None  # training passes carry their epoch order
            valid_sample = self._first_valid_after(reader, order, slots[-1][0] + 1)
            return [(pos, valid_sample) for pos, _ in slots]
        out = []
        for i, (pos, s) in enumerate(slots):
            if s is None:
                j = next((v for v in valid if v > i), valid[0])
                s = slots[j][1]
            out.append((pos, s))
        return out

    def _first_valid_after(self, reader: ShardReader, order: np.ndarray, position: int) -> tuple[Tensor, int, str]:
        """Every sample of this batch is corrupt: borrow the next valid one in the epoch order (deterministic)."""
        for k in range(len(order)):
            shard, member = self._locate(int(order[(position + k) % len(order)]))
            try:
                image, label = reader.load(shard, member)
                return image, label, reader.key(shard, member)
            except Corrupt:
                continue
        raise DataError(f"no readable sample in shards {self.plan.shard_names}; rerun catdog-prep")


class Batches:
    """An iterable over (images, labels[, keys]) batches with a known length; one pass per ``iter()``. Labels are
    int64 class ids, or (N, classes) float probabilities for training with MixUp/CutMix (data.augment).

    Not a DataLoader on purpose: do not hand it to ``accelerator.prepare`` (which would shard or dispatch it
    again); move each batch to the device yourself.
    """

    def __init__(
        self,
        loader: DataLoader,
        num_batches: int,
        counters: Counter,
        corrupt: Counter,
        with_keys: bool,
        buffers: BatchBuffers | None = None,
    ):
        self._loader = loader
        self._buffers = buffers
        self._num_batches = num_batches
        self._counters = counters
        self._corrupt = corrupt
        self._with_keys = with_keys

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[tuple]:
        buffers = self._buffers
        if buffers is not None:
            buffers.begin_pass()
        # A persistent loader drains (and drops) what its last pass left in flight here. A worker's death is
        # WorkerDied (train/data/workers.py).
        batches = guarded(self._loader)
        if buffers is not None:
            buffers.reclaim_dropped()
        for x, y, keys, report in batches:
            self._counters["decoded"] += report["decoded"]
            for shard, key, reason in report["errors"]:
                self._counters["corrupt_skipped"] += 1
                self._corrupt[shard] += 1
                log.warning("skipped corrupt sample %s in shard %s: %s", key, shard, reason)
            if x is None:
                continue
            self._counters["batches"] += 1
            self._counters["samples"] += len(y)
            if buffers is not None:
                buffers.hold(report.get("buffer"), x)
            yield (x, y, keys) if self._with_keys else (x, y)

    def stats(self) -> dict:
        """Counts so far (for eval: this loader's pass); see TrainStream.stats."""
        return stats_of(self._counters, self._corrupt)


def stats_of(counters: Counter, corrupt: Counter) -> dict:
    return {
        **{k: counters[k] for k in ("decoded", "batches", "samples", "corrupt_skipped")},
        "corrupt_by_shard": dict(corrupt),
    }


def make_dataloader(plan: Plan, num_workers: int, *, persistent: bool, pin_memory: bool) -> DataLoader:
    """A DataLoader over ``plan``: persistent workers for loaders that serve many passes (training epochs, the
    validation split at every evaluation), so each pass does not pay for forking workers and pickling the
    shard indices to them again."""
    most = plan.schedule.batches_per_epoch if plan.schedule is not None else len(plan.batches)
    workers = min(num_workers, most)  # a worker with no batch would only cost a fork
    # Persistent workers write batches into shared memory they reuse instead of a fresh segment per batch (see
    # train/data/batch_buffers.py); inline loading (no workers) shares nothing, and one-pass loaders gain little.
    plan.buffers = BatchBuffers(workers) if workers > 0 and persistent else None
    return DataLoader(
        _BatchDataset(plan),
        batch_size=None,  # batches are built in the workers
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        # Page-locked batches make the host-to-GPU copy asynchronous (the loop copies with non_blocking=True). Only
        # for a model on a GPU: the pin thread would start CUDA (a context on GPU 0) in a CPU run on a GPU node.
        pin_memory=pin_memory,
        # 2 batches ahead per worker: enough to hide decode jitter; each is a float32 batch in /dev/shm, and
        # with many auto workers (and the validation loader's, which persist) more would pin gigabytes per rank.
        prefetch_factor=2 if workers else None,
        # The DataLoader draws a base seed from its generator on every iter(); with the default (global) one,
        # each epoch or resume would shift the training RNG stream. Our augmentation seeds itself per sample.
        generator=torch.Generator(),
        # Its queues never wait on a message a killed worker left half-written (train/data/workers.py).
        multiprocessing_context=loader_context() if workers else None,
        worker_init_fn=quiet_worker,
    )


def split_layout(info: DatasetInfo, split: str) -> tuple[list[Path | Location], list[int], np.ndarray]:
    s = info.split(split)
    paths = info.shard_paths(split)
    offsets = np.concatenate([[0], np.cumsum(s.shard_lengths)]).astype(np.int64)
    return paths, list(s.shard_lengths), offsets
