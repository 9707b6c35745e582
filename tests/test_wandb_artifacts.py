"""W&B as its users expect, read back from the offline run's own records (tests/wandb_records.py): the model bundle
as a ``model`` artifact with aliases best and latest, the shards' _info.json as a ``dataset`` artifact the run used,
the final metrics in the run summary; a rerun of the same run.dir adds a version to the same artifact; a failed
artifact is a warning, not a failed run. (The image run's side is in test_train_run.py's two-rank test.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_shards import tiny_jpegs, write_shards
from test_features import BASE, SIZE, cache  # noqa: F401 - cache is a fixture (the offline InceptionV3 weights)
from train_helpers import TINY, make_shards, run_train
from wandb_records import check_run_end, sessions

LENGTHS = {"train": [16, 16], "val": [16], "test": [8]}


def wandb_dirs(tmp_path: Path) -> dict:
    """W&B's staging and cache folders inside the test's tmp_path (offline, a logged model is copied there)."""
    return {"WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}


def test_a_cached_feature_run_logs_model_data_and_summary_and_more_epochs_add_a_model_version(
    real_data,
    cache,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    shards = tmp_path / "shards"
    write_shards(shards, tiny_jpegs(real_data, sum(sum(v) for v in LENGTHS.values()), size=SIZE), LENGTHS)
    run_dir = tmp_path / "run"
    args = [*BASE, f"data.dir={shards}", f"run.dir={run_dir}", "train.batch_size=16", "track.backends=[csv,wandb]"]
    env = {"XDG_CACHE_HOME": str(cache), **wandb_dirs(tmp_path)}

    run_train([*args, "train.epochs=2"], **env)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    [first] = sessions(run_dir)
    assert first.run_id == run_id
    model, dataset = check_run_end(first, run_dir, shards)
    assert json.loads(model.metadata)["model"] == "inception_v3"
    assert "test/accuracy" in first.summary()  # the test split, scored at the end, is in the summary too

    # Train one epoch more in the same run.dir: the same W&B run, a new version of the same model artifact (the
    # bundle now rewritten), the same data.
    run_train([*args, "train.epochs=3"], **env)
    assert "resumed from" in (run_dir / "train.log").read_text()
    first_again, second = sessions(run_dir)
    assert first_again.folder == first.folder and second.run_id == run_id
    model2, dataset2 = check_run_end(second, run_dir, shards)
    assert model2.name == model.name == f"model-{run_id}"
    assert (dataset2.name, dataset2.digest) == (dataset.name, dataset.digest)  # one dataset version for both
    assert json.loads((run_dir / "final_metrics.json").read_text())["epochs_completed"] == 3


def test_an_artifact_that_cannot_be_logged_is_a_warning_and_the_run_still_succeeds(real_data, tmp_path):
    """W&B cannot stage artifact files (WANDB_DATA_DIR is not a writable folder, as on a read-only home): both
    artifacts fail, each with one warning naming it; the run ends normally, the summary is still logged."""
    shards = make_shards(real_data, tmp_path / "shards")
    run_dir = tmp_path / "run"
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    overrides = [f"data.dir={shards}", f"run.dir={run_dir}", *TINY, "train.epochs=1", "track.backends=[csv,wandb]"]
    proc = run_train(overrides, **{**wandb_dirs(tmp_path), "WANDB_DATA_DIR": str(not_a_dir)})

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    log = (run_dir / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "W&B: could not log" in line]
    assert len(warnings) == 2, warnings
    assert f"the model artifact model-{run_id}" in warnings[1] and "WANDB_DATA_DIR" in warnings[1]
    assert f"the dataset artifact of {shards}" in warnings[0]
    assert "Traceback" not in proc.stderr and (run_dir / "model" / "model.safetensors").is_file()
    [session] = sessions(run_dir)
    assert session.artifacts == []
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert session.summary()["best/val/accuracy"] == pytest.approx(final["best/val/accuracy"])
