"""End to end: a real 2-rank run (accelerate launch, gloo on CPU) over real shards writes every artefact."""

from __future__ import annotations

import json
import os
import platform

import pytest
import yaml
from data_shards import rewrite_member
from train_helpers import TINY, make_shards, run_train
from wandb_records import check_run_end, sessions

from train.hardware.memory import user_choice

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like a W&B key; must never land on disk


@pytest.mark.slow
def test_two_rank_run_writes_every_artefact_and_rerun_resumes(tmp_path, real_data, port):
    shards = make_shards(real_data, tmp_path / "shards")
    # Every JPEG of the 8-sample train shard is corrupt: each epoch both ranks meet some of them (shuffled).
    for j in range(8):
        rewrite_member(shards / "train-000001.tar", f"train_01_{j:03d}", "jpg", b"\xff\xd8 not a jpeg")
    run_dir = tmp_path / "run"
    overrides = [
        f"data.dir={shards}",
        f"run.dir={run_dir}",
        *TINY,
        "train.epochs=3",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=1",
        "train.log_every=1",
        "data.num_workers=1",
        "track.backends=[wandb,tensorboard,csv]",
        "train.mixed_precision=fp16",  # not applied on CPU (fp32 either way): warned once, not once per rank
        "track.plot_every_s=3600",  # plots after the first epoch and at the end only (not after epoch 2 or 3)
    ]
    wandb_dirs = {"WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    proc = run_train(overrides, procs=2, port=port, WANDB_API_KEY=FAKE_KEY, **wandb_dirs)

    # config.yaml is the resolved config and loads back.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["dir"] == str(shards) and saved["train"]["epochs"] == 3

    # metrics.jsonl: one line per epoch, sane values; 40 train samples / global batch 8 = 5 steps per epoch.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [5, 10, 15]
    for r in rows:
        assert r["val/samples"] == 11  # every val sample exactly once across the two ranks
        for k in ("val/accuracy", "val/precision", "val/recall", "val/f1", "val/auroc", "train/accuracy"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert 0.0 < r["val/loss"] < 5.0 and 0.0 < r["train/loss"] < 5.0 and r["train/images_per_s"] > 0
        assert r["data/corrupt_skipped"] == 8  # each corrupt sample met once per epoch, summed over both ranks
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["data/corrupt_skipped"] == 24
    assert final["epochs_completed"] == 3 and final["steps"] == 15
    assert final["test/samples"] == 5 and sum(map(sum, final["test/confusion_matrix"])) == 5
    assert final["val/accuracy"] == rows[-1]["val/accuracy"]
    best = max(rows, key=lambda r: r["val/accuracy"])
    assert final["best/val/accuracy"] == best["val/accuracy"] and final["best_epoch"] == best["epoch"]

    # Checkpoints: newest 1 plus the best, each complete; no temp folders left.
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == sorted({"step_00000015", final["best_checkpoint"]})
    for c in ckpts:
        names = {p.name for p in (run_dir / "checkpoints" / c).iterdir()}
        assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= names
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= names  # one RNG file per rank

    for plot in ("loss", "accuracy", "confusion_matrix", "roc"):
        png = run_dir / "plots" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    log = (run_dir / "train.log").read_text()
    assert "2 process(es) (MULTI_CPU" in log and "epoch 3:" in log and "final:" in log
    assert log.count("INFO epoch 1:") == 1  # only rank 0 logs
    assert log.count("CPU memory: ") == 1  # train/hardware/memory.py, said once
    if not user_choice(os.environ) and platform.libc_ver()[0] == "glibc":
        assert "CPU memory: glibc malloc keeps freed memory" in log
    assert "epoch 1: skipped 8 corrupt training sample(s) on all ranks" in log
    # Rank 0 met only some of them itself (train.log holds its per-sample warnings): the 8 is a sum over ranks.
    assert 0 < log.count("skipped corrupt sample") < 24
    assert proc.stderr.count("Accelerate only autocasts fp16 on GPUs") == 1
    assert proc.stderr.count("fp16 is not applied on CPU: training in fp32") == 1

    csv_rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_rows[0] == "step,name,value" and any(r.startswith("15,val/accuracy,") for r in csv_rows)
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))

    # W&B (offline, for real): one run with our persisted id; metrics, lr, images/s, config and plots recorded.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    wandb_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(wandb_runs) == 1, list((run_dir / "wandb").iterdir())
    record = (wandb_runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"val/accuracy", b"val/auroc", b"train/lr", b"train/images_per_s", b"train/loss", b"model.width"):
        assert key in record, key
    images = sorted(p.name for p in (wandb_runs[0] / "files" / "media" / "images" / "plots").iterdir())
    assert {"loss", "accuracy", "roc", "confusion"} <= {name.split("_")[0] for name in images}
    # track.plot_every_s=3600: the first epoch's plots (step 5) and the final ones (step 15), not epoch 2's (10).
    assert sorted(int(name.split("_")[1]) for name in images if name.startswith("loss_")) == [5, 15], images
    # The end of the run, from rank 0 only: the model bundle as artifact model-<id> (best, latest), the shards'
    # _info.json as a dataset the run used, the final metrics in the summary (tests/wandb_records.py).
    [first] = sessions(run_dir)
    model, dataset = check_run_end(first, run_dir, shards)

    # The API key reaches no file in the run dir (W&B's own logs included) and no console output.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in proc.stdout + proc.stderr

    # Same run.dir again: it resumes from the last checkpoint, trains nothing more, continues the same W&B run.
    run_train(overrides, procs=2, port=port, **wandb_dirs)
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "step 15" in log
    assert json.loads((run_dir / "final_metrics.json").read_text())["data/corrupt_skipped"] == 24
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    # wandb writes one offline folder per session; both carry the same run id (resume="allow").
    both = sessions(run_dir)
    assert len(both) == 2 and [s.run_id for s in both] == [run_id, run_id]
    assert all(s.folder.name.endswith(f"-{run_id}") for s in both)
    # The requeued session ends the run again: one more version of the same model artifact, the same data.
    model2, dataset2 = check_run_end(both[1], run_dir, shards)
    assert model2.name == model.name == f"model-{run_id}"
    assert (dataset2.name, dataset2.digest) == (dataset.name, dataset.digest)
