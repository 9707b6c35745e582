"""Early stopping on the chosen validation metric, and the best checkpoint kept beside the newest."""

from __future__ import annotations

import json

import pytest
from train_helpers import TINY, make_shards, run_train


@pytest.mark.slow
def test_early_stop_when_metric_stalls(tmp_path, real_data):
    shards = make_shards(real_data, tmp_path / "shards")
    run_dir = tmp_path / "run"
    # lr=0 and no running statistics (GroupNorm): the model never changes, so val/loss never improves after
    # epoch 1 -> the run stops after 1 + patience epochs.
    run_train(
        [
            f"data.dir={shards}",
            f"run.dir={run_dir}",
            *TINY,
            "optim.lr=0",
            "model.norm=group",
            "train.epochs=6",
            "train.early_stop_metric=val/loss",
            "train.early_stop_mode=min",
            "train.early_stop_patience=2",
            "train.keep_checkpoints=1",
        ]
    )
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["stopped_early"] is True and final["epochs_completed"] == 3
    assert final["best_epoch"] == 1 and final["best_checkpoint"] == "step_00000005"
    assert final["test/checkpoint"] == "step_00000005"  # the test split is scored on the best weights
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000005", "step_00000015"]
    assert "early stop: val/loss did not improve for 2 epochs" in (run_dir / "train.log").read_text()
