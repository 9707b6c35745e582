"""2 ranks x batch b and 1 rank x batch 2b give the same weights after k steps (real gloo ranks).

The 2 ranks are started the way a SLURM task starts them (RANK/WORLD_SIZE/MASTER_* in the environment, no
launcher), so this also covers main() outside `accelerate launch` (tests/test_train_run.py covers that path)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY, make_shards, run_env_ranks, run_train


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_double_batch(tmp_path, real_data, port):
    shards = make_shards(real_data, tmp_path / "shards")
    # GroupNorm (no running statistics that differ per rank) and no dropout; augmentation stays on: it is
    # seeded per sample position, so both layouts see identical images.
    common = [
        f"data.dir={shards}",
        *TINY,
        "model.norm=group",
        "model.dropout=0",
        "train.batch_size=8",
        "train.epochs=2",
        "train.max_steps=7",  # crosses the epoch boundary (5 steps per epoch)
        "train.deterministic=true",
        "eval.every_epochs=10",
    ]
    run_train([*common, f"run.dir={tmp_path / 'one'}"])
    run_env_ranks([*common, f"run.dir={tmp_path / 'two'}"], world=2, port=port)
    assert "2 process(es) (MULTI_CPU" in (tmp_path / "two" / "train.log").read_text()
    for step in ("step_00000005", "step_00000007"):  # the epoch-end checkpoint and the final one
        one = load_file(str(tmp_path / "one" / "checkpoints" / step / "model.safetensors"))
        two = load_file(str(tmp_path / "two" / "checkpoints" / step / "model.safetensors"))
        assert one.keys() == two.keys() and len(one) > 0
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{step} {k}")
    # Training moved the weights between the two checkpoints: the comparison is not between two idle copies.
    at5 = load_file(str(tmp_path / "one" / "checkpoints" / "step_00000005" / "model.safetensors"))
    assert not torch.equal(at5["head.weight"], one["head.weight"])


@pytest.mark.slow
def test_sync_bn_two_ranks_equal_one_rank_with_double_batch(tmp_path, real_data, port):
    """BatchNorm: with model.sync_bn each rank normalises over the global batch, so 2 ranks x b train exactly as
    1 rank x 2b (weights and running statistics). Without it each rank normalises over its own b: they differ."""
    shards = make_shards(real_data, tmp_path / "shards")
    common = [
        f"data.dir={shards}",
        *TINY,
        "model.norm=batch",
        "model.dropout=0",
        "train.batch_size=8",
        "train.epochs=1",
        "train.max_steps=4",
        "train.deterministic=true",
        "eval.every_epochs=10",
        "eval.test_at_end=false",
    ]
    run_train([*common, f"run.dir={tmp_path / 'one'}"])
    run_env_ranks([*common, "model.sync_bn=true", f"run.dir={tmp_path / 'sync'}"], world=2, port=port)
    run_env_ranks([*common, f"run.dir={tmp_path / 'local'}"], world=2, port=port + 1)
    step = "step_00000004"
    one, sync, local = (
        load_file(str(tmp_path / name / "checkpoints" / step / "model.safetensors"))
        for name in ("one", "sync", "local")
    )
    assert one.keys() == sync.keys() and any("running_mean" in k for k in one)
    for k in one:
        torch.testing.assert_close(sync[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.allclose(local[k].float(), one[k].float(), rtol=1e-4, atol=1e-5) for k in one)
