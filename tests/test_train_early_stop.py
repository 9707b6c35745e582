"""Early stopping on the chosen validation metric, and the best checkpoint kept beside the newest."""

from __future__ import annotations

import json
import math

import pytest
from data_shards import tiny_jpegs, write_shards
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


@pytest.mark.slow
def test_patience_counts_epochs_and_a_nan_metric_keeps_a_best_checkpoint(tmp_path, real_data):
    photos = tiny_jpegs(real_data, 28)  # alternating cat, dog
    cats = photos[16::2][:4]
    write_shards(tmp_path / "shards", photos[:16] + cats + photos[24:28], {"train": [16], "val": [4], "test": [4]})
    run_dir = tmp_path / "run"
    # A cats-only val split: val/auroc is undefined (NaN) at every evaluation, i.e. never improves.
    # 2 steps per epoch, evaluated every 2 epochs: at epochs 2, 4, 6. Patience 3 epochs -> stop after epoch 6
    # (4 epochs since the first evaluation), not after 3 evaluations (epoch 8).
    run_train(
        [
            f"data.dir={tmp_path / 'shards'}",
            f"run.dir={run_dir}",
            *TINY,
            "train.epochs=8",
            "eval.every_epochs=2",
            "train.early_stop_metric=val/auroc",
            "train.early_stop_patience=3",
            "train.keep_checkpoints=1",
        ]
    )
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["stopped_early"] is True and final["epochs_completed"] == 6
    assert final["best/val/auroc"] is None and math.isnan(final["val/auroc"])
    # The first evaluated epoch stands in as the best: kept, and the test split is scored on it.
    assert final["best_epoch"] == 2 and final["best_checkpoint"] == "step_00000004"
    assert final["test/checkpoint"] == "step_00000004" and final["test/samples"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004", "step_00000012"]
    log = (run_dir / "train.log").read_text()
    assert log.count("val/auroc is NaN; counted as no improvement") == 3
    assert "early stop: val/auroc did not improve for 4 epochs (patience 3)" in log
