"""train/data/ under a real 2-process gloo run (torchrun): no hang, exact-once eval, world-size equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from data_shards import SHARD_LENGTHS, tiny_jpegs, write_shards

from data_prep.info import load_info
from train.config import DataConfig
from train.data.streams import TrainStream

RANK_SCRIPT = Path(__file__).with_name("data_rank.py")


@pytest.mark.slow
def test_two_ranks_two_workers_over_gloo(tmp_path, real_data, port):
    root = tmp_path / "shards"
    keys = write_shards(root, tiny_jpegs(real_data, sum(sum(v) for v in SHARD_LENGTHS.values())))
    out = tmp_path / "seen.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(RANK_SCRIPT),
        str(root),
        str(out),
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A rank short of batches would block in all_reduce forever: the timeout turns that hang into a failure.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())

    # 27 train samples, global batch 6: 5 batches per epoch on both ranks, 2 epochs.
    assert r0["batches_per_epoch"] == r1["batches_per_epoch"] == 5
    assert len(r0["train"]) == len(r1["train"]) == 10

    # Each global step holds the samples one rank with batch 6 would see (same seed, same epoch).
    single = TrainStream(
        DataConfig(dir=str(root), num_workers=0, shuffle_buffer=8),
        load_info(root),
        split="train",
        batch_size=6,
        image_size=32,
        rank=0,
        world_size=1,
        seed=1,
    )
    expected = [ks for epoch in range(2) for _, _, ks in single.loader(epoch, with_keys=True)]
    assert [a + b for a, b in zip(r0["train"], r1["train"], strict=True)] == expected
    assert set(k for ks in expected[:5] for k in ks) == set(keys["train"])  # an epoch covers every sample

    # Evaluation: every val key exactly once across the two ranks (11 samples: ranks hold 3 and 3 batches).
    assert Counter(r0["eval"] + r1["eval"]) == Counter(keys["val"])
    assert r0["eval"] and r1["eval"]
