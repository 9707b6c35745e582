"""One rank of tests/test_data_dist.py (started by torchrun, gloo on CPU): train with a collective per batch,
then evaluate, and write what every rank saw to a JSON file (rank 0)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from data_prep.info import load_info
from train.config import DataConfig
from train.data.streams import TrainStream, eval_loader


def main(root: str, out: str, per_device_batch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(dir=root, num_workers=2, shuffle_buffer=8)
    info = load_info(root)
    stream = TrainStream(
        cfg, info, split="train", batch_size=per_device_batch, image_size=32, rank=rank, world_size=world, seed=1
    )
    train_keys = []
    for epoch in range(2):
        for _, y, keys in stream.loader(epoch, with_keys=True):
            n = torch.tensor([len(y)])
            dist.all_reduce(n)  # as DDP's gradient all-reduce: a rank with fewer batches would hang here
            assert n.item() == per_device_batch * world
            train_keys.append(keys)
    # No collective inside the eval loop: ranks may hold different numbers of batches.
    eval_keys = [
        k
        for _, _, ks in eval_loader(
            cfg, info, split="val", batch_size=2, image_size=32, rank=rank, world_size=world, with_keys=True
        )
        for k in ks
    ]
    seen = [None] * world
    dist.all_gather_object(
        seen, {"train": train_keys, "eval": eval_keys, "batches_per_epoch": stream.batches_per_epoch}
    )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
