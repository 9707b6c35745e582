"""kill -9 mid-epoch, restart with the same run.dir: the run resumes by itself and ends with the same weights
(raw and EMA) as an uninterrupted run (train.deterministic)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, TINY, env, final_weights, make_shards, run_train, run_train_failing, train_cmd

from train.formats.rundir import EMA_WEIGHTS, STATE_NAME, latest_checkpoint


@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_gives_same_weights(tmp_path, real_data):
    shards = make_shards(real_data, tmp_path / "shards")
    # Dropout and augmentation on (TrivialAugment, random erasing, MixUp/CutMix per batch): the resumed run must
    # redraw exactly the same random numbers. Weight EMA on: the averaged weights (what validation scores) must
    # resume exactly too. Progressive resizing on: epoch 1 crops at 32 px, epoch 2 at 64 px.
    common = [
        f"data.dir={shards}",
        *TINY,
        "model.dropout=0.3",
        "train.batch_size=4",
        "train.epochs=2",
        "train.deterministic=true",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=1",
        "train.log_every=1",
        "track.backends=[csv,tensorboard]",
        "train.ema=true",
        "train.ema_decay=0.9",
        "data.augment.policy=trivial",
        "data.augment.erasing=0.25",
        "data.augment.mixup_alpha=0.4",
        "data.augment.cutmix_alpha=1.0",
        "data.augment.size_start=32",
        "data.augment.size_ramp=[0,0.5]",
    ]
    straight = tmp_path / "straight"
    run_train([*common, f"run.dir={straight}"])

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd([*common, f"run.dir={killed}"]),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # 10 steps per epoch, a checkpoint every 3: kill as soon as the first (mid-epoch) one is complete.
        deadline = time.monotonic() + 180
        while not (killed / "checkpoints" / "step_00000003" / STATE_NAME).exists():
            assert proc.poll() is None, "training exited before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_metrics.json").exists(), "killed too late: the run had finished"

    run_train([*common, f"run.dir={killed}"])
    m = re.search(r"resumed from \S+: epoch (\d+), batch (\d+), step (\d+)", (killed / "train.log").read_text())
    assert m, "the restart did not resume"
    epoch, batch, step = map(int, m.groups())
    assert step >= 3 and step < 20 and (epoch, batch) != (0, 0)
    assert (
        "progressive resizing: training crops 32 px (epochs 1-1) -> 64 px (from epoch 2)"
        in (killed / "train.log").read_text()
    )

    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ema_a, ema_b = (load_file(str(latest_checkpoint(r / "checkpoints") / EMA_WEIGHTS)) for r in (straight, killed))
    assert ema_a.keys() == a.keys() and any(not torch.equal(ema_a[k], a[k]) for k in a)
    for k in ema_a:
        torch.testing.assert_close(ema_b[k], ema_a[k], rtol=1e-5, atol=1e-6, msg=f"EMA {k}")
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2]  # no epoch counted twice
    # metrics.csv: the steps the killed session logged after its checkpoint were dropped, then logged again once.
    csv_rows = [line.split(",")[:2] for line in (killed / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(s) for s, name in csv_rows if name == "train/loss_step"] == list(range(1, 21))
    assert [int(s) for s, name in csv_rows if name == "val/accuracy"] == [10, 20]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for k in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), k
    # TensorBoard as TensorBoard reads it: the resumed session purged what the killed one logged after the
    # checkpoint (purge_step), so each step has one point, and it is this session's (equal to the straight run's).
    tb_a, tb_b = (tensorboard_scalars(run / "tensorboard", "train/loss_step") for run in (straight, killed))
    assert [s for s, _ in tb_b] == list(range(1, 21))
    assert [v for _, v in tb_b] == pytest.approx([v for _, v in tb_a], rel=1e-4, abs=1e-5)


def tensorboard_scalars(logdir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in logdir.iterdir() if p.is_dir()]  # one TensorBoard run (the project name)
    acc = EventAccumulator(str(run), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_resume_under_a_changed_config_is_refused(tmp_path, real_data):
    shards = make_shards(real_data, tmp_path / "shards")
    run_dir = tmp_path / "run"
    common = [f"data.dir={shards}", f"run.dir={run_dir}", *TINY, "train.max_steps=2", "eval.test_at_end=false"]
    run_train(common)
    saved = json.loads((run_dir / "checkpoints" / "step_00000002" / STATE_NAME).read_text())["fingerprint"]
    assert saved["batch_size"] == 8 and saved["grad_accum"] == 1 and saved["model"] == "scratch_cnn"

    where = f"cannot resume from {run_dir / 'checkpoints' / 'step_00000002'}"
    # A different global batch: batch 2 of the old layout is another set of samples now.
    proc = run_train_failing([*common, "train.batch_size=4"])
    assert proc.returncode == 2 and where in proc.stderr
    assert "train.batch_size: checkpoint 8, now 4" in proc.stderr and "train.resume=none" in proc.stderr
    # Another model shape: the weights do not fit.
    proc = run_train_failing([*common, "model.width=16"])
    assert proc.returncode == 2 and where in proc.stderr and "model.* (parameter names/shapes" in proc.stderr
    # Nothing was overwritten: config.yaml is still the config the checkpoint belongs to, and it resumes.
    assert "batch_size: 8" in (run_dir / "config.yaml").read_text()
    run_train([*common, "train.max_steps=3"])
    assert "resumed from" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_resume_none_starts_over_and_resume_path_adopts_another_runs_checkpoint(tmp_path, real_data):
    shards = make_shards(real_data, tmp_path / "shards")
    common = [f"data.dir={shards}", *TINY, "train.epochs=2", "track.backends=[csv,wandb]"]
    first = tmp_path / "first"
    run_train([*common, f"run.dir={first}"])  # 5 steps per epoch: checkpoints step_5, step_10
    old_id = (first / "wandb_run_id").read_text().strip()
    old_ckpts = sorted(p.name for p in (first / "checkpoints").iterdir())
    assert old_ckpts[-1] == "step_00000010"

    # train.resume=none in the same run dir, for 1 epoch: a new run whose checkpoints are not pruned in favour of
    # the old run's higher steps, with a new W&B run; the old state moved aside, nothing deleted.
    run_train([*common, f"run.dir={first}", "train.resume=none", "train.epochs=1"])
    (previous,) = (first / "previous").iterdir()
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == old_ckpts
    assert (previous / "wandb_run_id").read_text().strip() == old_id
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["step_00000005"]
    assert (first / "wandb_run_id").read_text().strip() != old_id
    assert (
        f"moved the previous start's checkpoints and tracker state to {previous}" in (first / "train.log").read_text()
    )
    assert json.loads((first / "final_metrics.json").read_text())["epochs_completed"] == 1
    # A later auto-resume (a requeue) continues the NEW run, not the old one.
    run_train([*common, f"run.dir={first}", "train.epochs=2"])
    log = (first / "train.log").read_text()
    assert re.search(r"resumed from \S+/first/checkpoints/step_00000005: epoch 1, batch 0, step 5", log), log[-2000:]

    # train.resume=<another run's checkpoint>: copied into this run dir with that run's best, so the final test
    # scoring finds the best checkpoint here and a later auto-resume finds the start.
    other = tmp_path / "other"
    source = previous / "checkpoints" / "step_00000010"
    run_train([*common, f"run.dir={other}", f"train.resume={source}", "train.epochs=3"])
    assert (other / "checkpoints" / "step_00000010" / STATE_NAME).is_file()
    final = json.loads((other / "final_metrics.json").read_text())
    assert final["epochs_completed"] == 3 and final["test/checkpoint"] == final["best_checkpoint"]
    assert (other / "checkpoints" / final["best_checkpoint"]).is_dir() and final["test/samples"] == 5
