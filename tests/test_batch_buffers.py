"""train/data/batch_buffers.py: workers reuse shared-memory batch buffers, and reuse never overwrites a batch the
consumer still holds (real DataLoader worker processes over small real shards, and the protocol in-process)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from data_shards import SHARD_LENGTHS, tiny_jpegs, write_shards

from data_prep.info import load_info
from train.config import DataConfig
from train.data.batch_buffers import BUDGET_BYTES, PER_WORKER, BatchBuffers, shm_budget
from train.data.streams import EvalSet, TrainStream, eval_loader

SIZE = 32
BATCH = 2  # 27 training samples: 14 batches, 7 per worker of 2 -- more than a worker's PER_WORKER buffers


@pytest.fixture(scope="module")
def root(tmp_path_factory, real_data):
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, tiny_jpegs(real_data, sum(sum(v) for v in SHARD_LENGTHS.values())))
    return out


def stream(root, workers: int) -> TrainStream:
    cfg = DataConfig(dir=str(root), num_workers=workers, shuffle_buffer=8)
    return TrainStream(
        cfg, load_info(root), split="train", batch_size=BATCH, image_size=SIZE, rank=0, world_size=1, seed=0
    )


def buffers_of(s: TrainStream) -> BatchBuffers:
    return s._loaders[False][1].buffers


def placed_per_worker(b: BatchBuffers) -> list[int]:
    """Batches each worker wrote into a reused buffer so far (its last sequence number)."""
    return [int(v) for v in b.state[:, :, 0].max(dim=1).values]


def test_kept_batches_are_never_overwritten(root):
    """``list(loader)`` keeps every batch: past its buffers a worker falls back to fresh memory, and every kept
    batch still equals what inline loading gives, epoch after epoch."""
    s = stream(root, workers=2)
    for epoch in range(2):
        kept = list(s.loader(epoch))
        inline = list(stream(root, workers=0).loader(epoch))
        assert len(kept) == len(inline) == 14
        for (x, y), (xi, yi) in zip(kept, inline, strict=True):
            assert torch.equal(x, xi) and torch.equal(y, yi)
        if epoch == 0:
            # Each worker filled exactly its PER_WORKER buffers: the 2 other batches it built went the usual way.
            assert placed_per_worker(buffers_of(s)) == [PER_WORKER, PER_WORKER]
        del kept


def test_a_training_loop_reuses_the_buffers_and_frees_them_all(root):
    """Dropping each batch before the next (what a training loop does): every batch of 3 epochs, one of them cut
    short, goes through the workers' few buffers, each batch is right, and none stays marked in use."""
    s = stream(root, workers=2)
    seen = 0
    for epoch, cut in ((0, None), (1, 3), (2, None)):
        inline = list(stream(root, workers=0).loader(epoch))
        for i, (x, y) in enumerate(s.loader(epoch)):
            assert torch.equal(x, inline[i][0]) and torch.equal(y, inline[i][1])
            seen += 1
            if i + 1 == cut:
                break  # the rest of the pass is drained and dropped when the next pass starts
        del x, y
    b = buffers_of(s)
    assert len(b._buffers) == 0  # the main process never allocates any: they live in the workers
    assert sum(placed_per_worker(b)) >= seen  # every yielded batch came through a reused buffer
    b.release_dead()
    written, released = b.state[:, :, 0], b.state[:, :, 1]
    assert written.max() > PER_WORKER and torch.equal(written, released)


def test_validation_set_reuses_buffers_across_evaluations(root):
    info = load_info(root)
    cfg = DataConfig(dir=str(root), num_workers=2)
    ev = EvalSet(cfg, info, split="val", batch_size=3, image_size=SIZE, rank=0, world_size=1)
    first = [(x.clone(), y.clone()) for x, y in ev.loader()]  # 11 samples: batches of 3, 3, 3 and a short 2
    assert [len(y) for _, y in first] == [3, 3, 3, 2]
    for _ in range(3):
        again = [(x.clone(), y.clone()) for x, y in ev.loader()]
        assert all(torch.equal(a, b) and torch.equal(u, v) for (a, u), (b, v) in zip(first, again, strict=True))
    assert sum(placed_per_worker(ev._cached[1].buffers)) == 4 * 4


def test_one_pass_loaders_are_right_when_iterated_again(root):
    """A non-persistent loader forks new workers for every pass (they use torch's own shared memory): three plain
    passes over the same eval loader each give what inline loading gives."""
    info = load_info(root)
    args = dict(split="val", batch_size=3, image_size=SIZE, rank=0, world_size=1)
    inline = [(x, y) for x, y in eval_loader(DataConfig(dir=str(root), num_workers=0), info, **args)]
    batches = eval_loader(DataConfig(dir=str(root), num_workers=2), info, **args)
    for _ in range(3):
        n = 0
        for (x, y), (xi, yi) in zip(batches, inline, strict=True):
            assert torch.equal(x, xi) and torch.equal(y, yi)
            n += 1
        assert n == len(inline) == 4


def test_protocol_in_one_process():
    """The bookkeeping alone: a buffer comes back only once the storage the consumer got is gone, a short batch
    takes a full-size buffer (a full batch fits it later), the budget caps the count, and a batch of another shape
    is never squeezed in. One process plays both sides, so the main process's own mapping of a buffer is stood in
    for by a copy."""
    b = BatchBuffers(num_workers=1, per_worker=2, budget_bytes=10**9)
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    v1, w1 = b.place(0, x, 1, 4)
    m1 = v1.clone()  # what the main process receives
    b.hold(w1, m1)
    v2, w2 = b.place(0, x[:3] + 1, 1, 4)  # a short batch: its buffer holds 4 rows all the same
    b.hold(w2, v2.clone())  # dropped at once: released at the next hold/release_dead
    assert (w1[1], w2[1]) == (0, 1) and torch.equal(v1, x) and torch.equal(v2, x[:3] + 1) and len(v2) == 3
    assert b.place(0, x + 2, 1, 4)[1] is None  # both buffers held (w2 not yet seen dead): the batch goes as it is
    b.release_dead()
    full, w3 = b.place(0, x + 3, 1, 4)
    assert w3 == (0, 1, 3) and torch.equal(full, x + 3)  # the short batch's buffer takes a full one
    view = m1[1:]  # a view keeps the storage alive
    del m1
    b.release_dead()
    assert b.place(0, x, 1, 4)[1] is None
    del view
    b.release_dead()
    short, w4 = b.place(0, x[:3] * 10, 1, 4)  # buffer 0 is free again; a short batch uses its first rows
    assert w4 == (0, 0, 4) and short.shape == (3, 6) and torch.equal(short, x[:3] * 10)
    assert b.place(0, torch.zeros(4, 7), 1, 4)[1] is None  # other shape: no buffer fits, none left to allocate
    small = BatchBuffers(num_workers=2, per_worker=5, budget_bytes=3 * x.nbytes)
    assert small.place(0, x, 1, 4)[1] is not None and small.place(0, x, 1, 4)[1] is None  # 2 x 1 buffer fit


def test_a_new_batch_shape_takes_over_free_buffers_of_the_old_one():
    """Progressive resizing changes the crop size between epochs: free buffers of the old shape make room for the new
    one; a buffer the consumer still holds is never taken."""
    b = BatchBuffers(num_workers=1, per_worker=2, budget_bytes=10**9)
    small = torch.ones(4, 6)
    v1, w1 = b.place(0, small, 1, 4)
    m1 = v1.clone()  # held by the consumer
    b.hold(w1, m1)
    v2, w2 = b.place(0, small * 2, 1, 4)
    b.hold(w2, v2.clone())  # dropped at once
    b.release_dead()
    big = torch.full((4, 8), 3.0)
    v3, w3 = b.place(0, big, 2, 4)
    assert w3 == (0, 1, 3) and torch.equal(v3, big)  # the free small buffer gave way
    assert b.place(0, big + 1, 2, 4)[1] is None  # the held one did not
    del m1
    b.release_dead()
    v4, w4 = b.place(0, big + 2, 2, 4)
    assert w4 == (0, 0, 4) and torch.equal(v4, big + 2)
    assert [tuple(t.shape) for t in b._buffers] == [(4, 8), (4, 8)]


def test_a_resized_training_stream_keeps_reusing_buffers(root):
    """Epochs at two crop sizes (progressive resizing) through the same persistent workers: every batch is right and
    the second size's batches go through reused buffers too."""
    cfg = DataConfig(dir=str(root), num_workers=2, shuffle_buffer=8)
    info = load_info(root)
    args = {"split": "train", "batch_size": BATCH, "image_size": SIZE, "rank": 0, "world_size": 1, "seed": 0}
    s = TrainStream(cfg, info, crop_sizes=(16, SIZE), **args)
    before = 0
    for epoch, size in ((0, 16), (1, SIZE)):
        inline = list(TrainStream(replace(cfg, num_workers=0), info, crop_sizes=(16, SIZE), **args).loader(epoch))
        for i, (x, y) in enumerate(s.loader(epoch)):
            assert x.shape[-1] == size and torch.equal(x, inline[i][0]) and torch.equal(y, inline[i][1])
        del x, y
        placed = sum(placed_per_worker(buffers_of(s)))
        assert placed - before == len(inline)  # each batch of this epoch came through a reused buffer
        before = placed


def test_small_shared_memory_gets_small_budgets():
    """A roomy node gets the full budget; Docker's default 64 MB /dev/shm leaves a 7 MB batch (the demo's 64 x 3 x
    96 x 96 float32) on torch's own path; 8 ranks on one node share what their node has."""
    gib = 2**30
    assert shm_budget(total=24 * gib, free=24 * gib, local_ranks=1) == BUDGET_BYTES
    docker = shm_budget(total=64 * 2**20, free=64 * 2**20, local_ranks=1)
    assert docker == 4 * 2**20
    batch = torch.empty(64, 3, 96, 96)
    assert BatchBuffers(1, budget_bytes=docker).place(0, batch, 1, 64)[1] is None
    assert BatchBuffers(1, budget_bytes=BUDGET_BYTES).place(0, batch, 1, 64)[1] is not None
    assert shm_budget(total=64 * gib, free=64 * gib, local_ranks=8) == 512 * 2**20  # 8 ranks x 2 loaders = 1/8
    assert shm_budget(total=16 * gib, free=16 * gib, local_ranks=8) == 128 * 2**20
    assert shm_budget(total=24 * gib, free=gib, local_ranks=1) == gib // 4  # mostly used already: a quarter of free
