"""`python -m train` on bad data: one line naming what to fix and a non-zero exit, not a traceback."""

from __future__ import annotations

import json
import subprocess

from data_shards import rewrite_member, tiny_jpegs, write_shards
from train_helpers import ROOT, TINY, env, make_shards, run_train, run_train_failing, train_cmd


def test_empty_train_split_is_one_clear_line(tmp_path, real_data):
    shards = tmp_path / "shards"
    write_shards(shards, tiny_jpegs(real_data, 3), {"train": [], "val": [3]})
    run_dir = tmp_path / "run"
    proc = run_train_failing([f"data.dir={shards}", f"run.dir={run_dir}", *TINY])
    assert proc.returncode == 2
    assert f"catdog-train: {shards / '_info.json'}: split 'train' has no samples" in proc.stderr
    assert not run_dir.exists()  # refused before anything was written


def test_corrupt_sample_with_on_error_raise_names_shard_and_key(tmp_path, real_data):
    shards = make_shards(real_data, tmp_path / "shards")
    rewrite_member(shards / "train-000000.tar", "train_00_003", "jpg", b"\xff\xd8 not a jpeg")
    # One loader worker: the error is raised in the worker and re-raised wrapped in its traceback.
    args = [f"data.dir={shards}", f"run.dir={tmp_path / 'run'}", *TINY, "data.num_workers=1", "data.on_error=raise"]
    proc = run_train_failing([*args, "data.shuffle=false"])
    assert proc.returncode == 1
    assert f"catdog-train: corrupt sample in shard {shards / 'train-000000.tar'}, key 'train_00_003'" in proc.stderr


def test_missing_val_split_fails_before_training(tmp_path, real_data):
    # Shards from another tool that name the evaluation split only "validation" (timm's name): data.val_split=val
    # must fail at start with the splits there are, not after an epoch of training.
    shards = make_shards(real_data, tmp_path / "shards")
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["validation"] = {**info["splits"].pop("val"), "name": "validation"}
    (shards / "_info.json").write_text(json.dumps(info))
    run_dir = tmp_path / "run"
    proc = run_train_failing([f"data.dir={shards}", f"run.dir={run_dir}", *TINY])
    assert proc.returncode == 2
    assert f"{shards / '_info.json'} has no split 'val'; it has ['test', 'train', 'validation']" in proc.stderr
    assert not run_dir.exists()
    # ... and naming it works.
    run_train([f"data.dir={shards}", f"run.dir={run_dir}", *TINY, "data.val_split=validation", "train.epochs=1"])
    assert json.loads((run_dir / "final_metrics.json").read_text())["val/samples"] == 11


def test_ranks_reading_different_shard_indexes_stop_with_one_line(tmp_path, real_data, port):
    """Datasets copied to node-local disks: a node with a stale copy has other shard lengths, so its rank would
    run another number of steps and hang the rest in a collective. Two real gloo ranks, data.dir from each rank's
    environment (as a per-node path would be), stop at start-up instead."""
    same = make_shards(real_data, tmp_path / "a")
    stale = tmp_path / "b"
    write_shards(stale, tiny_jpegs(real_data, 12), {"train": [4, 4], "val": [4]})
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            train_cmd(["data.dir=${oc.env:CATDOG_TEST_SHARDS}", f"run.dir={run}", *TINY, "train.cpu=true"]),
            cwd=ROOT,
            env=env(
                CATDOG_TEST_SHARDS=str(shards),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),  # fmt: skip
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, shards in enumerate((same, stale))
    ]
    try:
        errors = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
        line = next(x for x in err.splitlines() if x.startswith("catdog-train:"))
        assert "the ranks read different shard indexes (_info.json): rank 1 on" in line, line
