"""Reusable shared-memory buffers for the batches DataLoader workers hand to the main process.

A tensor a worker yields travels to the main process through shared memory: torch moves its storage into a
fresh ``/dev/shm`` segment (allocate, then copy), and the main process maps that segment. On the 2-core VMs we
measured, touching the fresh pages of a 19.7 MB float32 batch (64 x 3 x 160 x 160) costs ~24 ms per batch in
the worker alone, ~10 % of the time it takes to build the batch. ``BatchBuffers`` lets each worker write its
batches into a few segments it allocated once and reuses: torch sends an already-shared storage by handle,
nothing is copied or faulted again (bench/loader.py: ~15-20 % more loader throughput at those sizes).

Reuse must never overwrite a batch the consumer still reads, whatever the consumer does with it (a training
loop drops each batch before asking for the next; ``list(loader)`` keeps them all). So a buffer is only reused
once the main process has seen the batch's storage die:

* the worker writes into a free buffer, marks it ``written[w, s] = seq`` and ``pass[w, s]`` (the pass number it
  read when its pass began) in shared state, and says ``(w, s, seq)`` beside the batch;
* the main process keeps a weak reference to each batch storage it yields; when it is gone (the consumer and
  every view of it dropped it) it sets ``released[w, s] = seq``;
* a buffer is free when ``released == written``. None free and the worker's share of the budget spent: the
  batch goes the usual way (torch's own fresh segment), so retaining batches costs speed, never correctness.

Batches the main process never yields (a pass cut short: the DataLoader drains and drops the rest when the next
pass starts) are reclaimed at the start of the next pass: every buffer written in an earlier pass that the main
process does not hold. The main process bumps the pass number before the DataLoader's iter() (which drains the
old pass, then tells the persistent workers to start the new one), and a worker reads it when its pass begins,
so a buffer of the new pass is never taken for an old one. Only persistent loaders (training, validation) use
buffers: a loader that forks new workers on every iter() could have two generations of workers on one state.

The guarantee covers the main process: a consumer that sends a batch on to another process and then drops it
must copy it first (as it would for any batch it hands to another process that outlives it).

With ``pin_memory`` the pin thread copies each batch out of shared memory at once; the main process then
tracks the pinned copy, which only releases the buffer later than necessary.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from data_prep.cpus import local_world_size

# Buffers per worker: the DataLoader's prefetch (2 batches dispatched ahead), the one being built, the one the
# consumer uses and the one its loop variable still holds when it asks for the next.
PER_WORKER = 5
# Shared memory all of one loader's buffers may hold (they live as long as its workers; the validation loader's
# persist through training): past it a worker keeps fewer buffers, at worst none (torch's default path).
BUDGET_BYTES = 512 * 2**20


def default_budget() -> int:
    """``shm_budget`` for this node's /dev/shm and ``LOCAL_WORLD_SIZE`` ranks."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (not Linux): torch shares memory its own way there
        return BUDGET_BYTES
    return shm_budget(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, local_world_size())


def shm_budget(total: int, free: int, local_ranks: int) -> int:
    """BUDGET_BYTES, or less where /dev/shm is small: the buffers of every rank on the node (a training and a
    validation loader each) take at most an eighth of it, and a quarter of what is free now. A container's small
    /dev/shm (Docker's default is 64 MB) is then left to torch's own batches, which need it only while in flight."""
    return min(BUDGET_BYTES, total // (16 * local_ranks), free // 4)


_WRITTEN, _RELEASED, _PASS = range(3)


class BatchBuffers:
    """Per-loader state shared by the main process and its workers; see the module docstring."""

    def __init__(self, num_workers: int, per_worker: int = PER_WORKER, budget_bytes: int | None = None):
        self.per_worker = per_worker
        self.budget_bytes = default_budget() if budget_bytes is None else budget_bytes
        self.num_workers = num_workers
        self.state = torch.zeros(num_workers, per_worker, 3, dtype=torch.int64).share_memory_()
        self.pass_no = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._buffers: list[Tensor | None] = []  # worker side: this worker's buffers (None: a slot given up)
        self._seq = 0  # worker side: batches placed so far
        self._held: dict[tuple[int, int], tuple[int, StorageWeakRef]] = {}  # main side: yielded, maybe alive

    def __getstate__(self) -> dict:
        # Workers get the shared state only: buffers are per worker, the weak references per main process.
        return {**self.__dict__, "_buffers": [], "_seq": 0, "_held": {}}

    # --- worker side ---------------------------------------------------------------------------------------------

    def place(self, worker: int, x: Tensor, pass_no: int, rows: int) -> tuple[Tensor, tuple[int, int, int] | None]:
        """Copy batch ``x`` (of pass ``pass_no``, as the worker read it when the pass began) into a free buffer of
        this worker: (the buffer's view, (worker, slot, seq)), or (x, None) when no buffer fits or is free.
        Buffers hold ``rows`` (a full batch), so a short last batch does not take one a full batch cannot use."""
        state = self.state[worker]
        free = [s for s in range(len(self._buffers)) if int(state[s, _WRITTEN]) == int(state[s, _RELEASED])]
        slot = next((s for s in free if self._buffers[s] is not None and _fits(self._buffers[s], x)), None)
        if slot is None:
            if len(x) == 0 or len(x) > rows:
                return x, None
            # A free buffer of another image shape (last epoch's crop size under progressive resizing) will not fit
            # again: it makes room for one of this shape.
            for s in free:
                if self._buffers[s] is not None and self._buffers[s].shape[1:] != x.shape[1:]:
                    self._buffers[s] = None
            nbytes = x.nbytes // len(x) * rows
            affordable = self.budget_bytes // max(1, self.num_workers * nbytes)
            if sum(b is not None for b in self._buffers) >= min(self.per_worker, affordable):
                return x, None
            try:
                buf = torch.empty((rows, *x.shape[1:]), dtype=x.dtype).share_memory_()
            except (RuntimeError, OSError):  # out of shared memory: this batch goes torch's way
                return x, None
            slot = next((s for s in free if self._buffers[s] is None), len(self._buffers))
            if slot == len(self._buffers):
                self._buffers.append(buf)
            else:
                self._buffers[slot] = buf
        self._seq += 1
        view = self._buffers[slot][: len(x)]
        view.copy_(x)
        state[slot, _PASS] = pass_no
        state[slot, _WRITTEN] = self._seq
        return view, (worker, slot, self._seq)

    # --- main process side -----------------------------------------------------------------------------------------

    def begin_pass(self) -> None:
        """Before the DataLoader's iter(): workers start the new pass after it (on the resume message iter()
        sends them) and tag its batches with the new number."""
        self.release_dead()
        self.pass_no += 1

    def reclaim_dropped(self) -> None:
        """After the DataLoader's iter() (which drained the previous pass): free what an earlier pass wrote
        and the consumer was never given."""
        current = int(self.pass_no)
        for w in range(self.num_workers):
            for s in range(self.per_worker):
                row = self.state[w, s]
                if row[_WRITTEN] != row[_RELEASED] and row[_PASS] < current and (w, s) not in self._held:
                    row[_RELEASED] = row[_WRITTEN]

    def hold(self, where: tuple[int, int, int] | None, x: Tensor) -> None:
        """The consumer is about to get ``x`` (from buffer ``where``): release the buffer when x's storage dies."""
        self.release_dead()
        if where is not None:
            w, s, seq = where
            self._held[(w, s)] = (seq, StorageWeakRef(x.untyped_storage()))

    def release_dead(self) -> None:
        for (w, s), (seq, ref) in list(self._held.items()):
            if ref.expired():
                self.state[w, s, _RELEASED] = seq
                del self._held[(w, s)]


def _fits(buf: Tensor, x: Tensor) -> bool:
    return buf.dtype == x.dtype and buf.shape[1:] == x.shape[1:] and len(x) <= len(buf)
