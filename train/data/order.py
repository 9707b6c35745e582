"""The epoch order, from ``_info.json`` alone: identical on every rank and worker, whatever their number.

1. the shard list is shuffled with a generator seeded by (seed, epoch);
2. a shuffle buffer of ``data.shuffle_buffer`` samples is simulated on sample indices (shard, member) -- the
   shard lengths suffice, nothing is read -- which gives the global sample order of the epoch;
3. global batch t is ``order[t*B:(t+1)*B]`` with B = per-device batch * world size, and rank r takes the slice
   ``[r*b:(r+1)*b]`` of it. So one rank with batch 2b sees exactly the samples two ranks with batch b see.

Augmentation is seeded per sample position (``augment_seed``), so it depends neither on workers nor on a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's shard permutation: seeded by (seed, epoch), the same on every rank and worker."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


def epoch_order(shard_lengths: Sequence[int], *, seed: int, epoch: int, shuffle: bool, buffer: int) -> np.ndarray:
    """Global sample order of one epoch as flat sample ids (offset of the shard + member index).

    Simulates what a WebDataset pipeline with a shard shuffle and a ``shuffle(buffer)`` stage would produce,
    on indices instead of samples: the buffer keeps reads local to a few shards at a time (page cache and
    open-file friendly) while still mixing across shard boundaries.
    """
    offsets = np.concatenate([[0], np.cumsum(shard_lengths)]).astype(np.int64)
    stream = np.concatenate(
        [
            np.arange(offsets[s], offsets[s + 1])
            for s in shard_order(len(shard_lengths), seed=seed, epoch=epoch, shuffle=shuffle)
        ]
        or [np.zeros(0, dtype=np.int64)]
    )
    if not shuffle or buffer <= 1:
        return stream
    # One uniform draw per emitted sample, consumed in order: the simulation is a pure function of (seed, epoch).
    draws = np.random.default_rng([seed, epoch, 1]).random(len(stream))
    out = np.empty_like(stream)
    buf: list[int] = []

    def emit(n: int) -> None:  # swap a random buffer entry to the end and pop it, as webdataset's shuffle does
        k = int(draws[n] * len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        out[n] = buf.pop()

    n_out = 0
    for sid in stream.tolist():
        buf.append(sid)
        if len(buf) >= buffer:
            emit(n_out)
            n_out += 1
    while buf:
        emit(n_out)
        n_out += 1
    return out


def augment_seed(seed: int, epoch: int, position: int, *salt: int) -> int:
    """Seed of one sample's augmentation: a pure function of (seed, epoch, position in the epoch). A ``salt``
    gives an independent stream for the same position (the batch-level MixUp/CutMix draw)."""
    return int(np.random.SeedSequence([seed, epoch, position, *salt]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Schedule:
    """The training epoch order of one rank as a function of (epoch, start batch): small and picklable, so
    persistent DataLoader workers compute each pass's batches themselves instead of receiving them."""

    shard_lengths: tuple[int, ...]
    seed: int
    shuffle: bool
    buffer: int
    batch_size: int  # per device
    rank: int
    world_size: int

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.shard_lengths, seed=self.seed, epoch=epoch, shuffle=self.shuffle, buffer=self.buffer)

    def rank_batch(self, order: np.ndarray, t: int) -> list[tuple[int, int]]:
        """This rank's slice of global batch t as (position in the epoch, flat sample id)."""
        start = t * self.global_batch + self.rank * self.batch_size
        return [(p, int(order[p % self.num_samples])) for p in range(start, start + self.batch_size)]
