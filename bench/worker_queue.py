"""The DataLoader result queue that a killed worker cannot block (train/data/workers.py) vs multiprocessing's own.

Two measurements, each side alternating with the other (and which goes first) so that load from other processes
hits both alike; medians are printed, the ratios (ours / multiprocessing's) last:

1. the queue alone: a process puts ``--messages`` batch-like messages (index, (images, labels, keys, report)) -- the
   tensors travel in shared memory, as a DataLoader worker's do -- and this process gets them: time per message;
2. a DataLoader with 2 workers whose batches cost nothing to build (a ready tensor of --batch x 3 x --size x
   --size float32, moved to shared memory as a worker's batch is): time per batch, the transport alone.

Each reports wall-clock time and the CPU time of the reading process (what the queue changes); on a shared machine
the wall-clock figures swing with the other tenants' load, the CPU times far less. multiprocessing's queue runs twice
per pass ("again"): the ratio of its two runs shows how much of a difference the noise alone makes.

    .venv/bin/python bench/worker_queue.py [--passes 7] [--messages 2000] [--batches 400]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

from train.data.workers import loader_context


def _message(i: int, batch: int) -> tuple:
    keys = [f"train_{i:05d}_{j:03d}" for j in range(batch)]
    return i, (torch.zeros(2, 2), torch.zeros(batch, dtype=torch.int64), keys, {"decoded": batch, "errors": []})


def _producer(q, n: int, batch: int, done) -> None:
    for i in range(n):
        q.put(_message(i, batch))
    done.wait(600)  # alive until the consumer has fetched every tensor from it, as a DataLoader worker is


def queue_pass(ctx, n: int, batch: int) -> tuple[float, float]:
    """(wall, this thread's CPU) seconds per message through ctx's Queue, the producer in another process."""
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_producer, args=(q, n, batch, done))
    p.start()
    q.get(timeout=60)  # the producer is running: time the steady state
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(n - 1):
        q.get(timeout=60)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    done.set()
    p.join()
    return wall / (n - 1), cpu / (n - 1)


class _Ready(Dataset):
    def __init__(self, n: int, batch: int, size: int):
        self.n = n
        self.x = torch.randn(batch, 3, size, size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x.clone()  # a fresh batch each time, as a worker builds one


def loader_pass(ctx, n: int, batch: int, size: int) -> tuple[float, float]:
    """(wall, this process's CPU) seconds per batch through a 2-worker DataLoader using ctx, after the first."""
    loader = DataLoader(_Ready(n, batch, size), batch_size=None, num_workers=2, multiprocessing_context=ctx)
    it = iter(loader)
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    count = sum(1 for _ in it)
    return (time.perf_counter() - t0) / count, (time.process_time() - c0) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=160)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sides = {
        "ours": loader_context(),
        "multiprocessing": multiprocessing.get_context(),
        "again": multiprocessing.get_context(),
    }
    queue_s: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    batch_s: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    order = list(sides.items())
    for i in range(args.passes):
        for name, ctx in order[i % 3 :] + order[: i % 3]:  # each side goes first in turn
            queue_s[name].append(queue_pass(ctx, args.messages, args.batch))
            batch_s[name].append(loader_pass(ctx, args.batches, args.batch, args.size))
    q = {k: [statistics.median(r[j] for r in v) for j in (0, 1)] for k, v in queue_s.items()}
    b = {k: [statistics.median(r[j] for r in v) for j in (0, 1)] for k, v in batch_s.items()}
    for name in sides:
        print(
            f"{name:>16}: queue alone {q[name][0] * 1e6:7.1f} us/message ({q[name][1] * 1e6:6.1f} us CPU); "
            f"DataLoader {b[name][0] * 1e3:6.2f} ms/batch ({b[name][1] * 1e6:6.1f} us CPU in this process)"
        )
    print(f"medians of {args.passes} passes; batches of {args.batch} x 3 x {args.size}^2 float32, 2 workers")
    for name in ("again", "ours"):
        print(
            f"ratio {name}/multiprocessing: queue {q[name][0] / q['multiprocessing'][0]:.3f} wall, "
            f"{q[name][1] / q['multiprocessing'][1]:.3f} CPU; DataLoader {b[name][0] / b['multiprocessing'][0]:.3f} "
            f"wall, {b[name][1] / b['multiprocessing'][1]:.3f} CPU"
        )


if __name__ == "__main__":
    main()
