"""engine (schedule, score's metrics), checkpoint (atomic layout, pruning, weights_only loading, resume checks)
and the CSV tracker, in-process."""

from __future__ import annotations

import csv
import math
import os
import random
import re

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from torch import nn

from data_prep.cpus import threads_per_rank
from train.config import VAL_METRICS, ConfigError
from train.config_io import load_config
from train.formats.rundir import (
    STATE_NAME,
    TrainerState,
    complete_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    remove_partial,
)
from train.loop.epoch import lr_at
from train.loop.scoring import score
from train.run.checkpoint import CheckpointError, check_resumable, load_checkpoint, save_checkpoint
from train.run.setup import make_accelerator
from train.run.tracking import CsvTracker, truncate_csv


def test_lr_warmup_then_cosine_to_floor():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.01)
    lrs = [lr_at(s, **kw) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # non-increasing after warmup
    assert lrs[60] == pytest.approx(0.505) and lrs[110] == pytest.approx(0.01)


class FixedLogits(nn.Module):
    """Returns the logits stored for each input id: score() is then checked against hand counts."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]


def test_evaluate_matches_hand_computed_metrics():
    torch.manual_seed(0)
    n = 37
    labels = torch.randint(0, 2, (n,))
    logits = torch.randn(n, 2) + 1.5 * nn.functional.one_hot(labels, 2)  # mostly right, some wrong
    ids = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    batches = [(ids[i : i + 8], labels[i : i + 8]) for i in range(0, n, 8)]  # uneven last batch
    acc = Accelerator(cpu=True)
    out = score(FixedLogits(logits), batches, acc, num_classes=2)
    pred = logits.argmax(1)
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    tn = n - tp - fp - fn
    assert out["val/samples"] == n
    assert out["val/accuracy"] == pytest.approx((tp + tn) / n)
    assert out["val/precision"] == pytest.approx(tp / (tp + fp))
    assert out["val/recall"] == pytest.approx(tp / (tp + fn))
    assert out["val/f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert out["val/confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert out["val/loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    # Exact AUROC by pair counting; the 1001-threshold grid stays within 1e-2.
    p1 = logits.softmax(1)[:, 1]
    pos, neg = p1[labels == 1], p1[labels == 0]
    exact = float((pos[:, None] > neg[None, :]).float().mean())
    assert out["val/auroc"] == pytest.approx(exact, abs=1e-2)
    roc = out["val/roc"]
    assert min(roc["fpr"]) == 0.0 and max(roc["fpr"]) == 1.0 and max(roc["tpr"]) == 1.0
    # train.early_stop_metric is validated against VAL_METRICS at config load: it must be what score reports.
    assert {k for k, v in out.items() if isinstance(v, float)} == {f"val/{m}" for m in VAL_METRICS}


def test_evaluate_in_deterministic_mode_gives_the_same_metrics_and_keeps_the_switch(monkeypatch):
    """train.deterministic=true: torchmetrics would replace bincount by a dense table (~4 GB for a 128-image batch
    of the 1,001-threshold ROC; a 32-image batch took 7.5 s here). Metric updates count with the switch off."""
    import importlib

    curves = importlib.import_module("torchmetrics.functional.classification.precision_recall_curve")

    seen = []
    counting = curves._bincount
    monkeypatch.setattr(
        curves,
        "_bincount",
        lambda *a, **k: seen.append(torch.are_deterministic_algorithms_enabled()) or counting(*a, **k),
    )
    torch.manual_seed(1)
    labels = torch.randint(0, 2, (40,))
    logits = torch.randn(40, 2)
    ids = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 3, 2, 2)
    batches = [(ids[i : i + 20], labels[i : i + 20]) for i in (0, 20)]
    acc = Accelerator(cpu=True)
    plain = score(FixedLogits(logits), batches, acc, num_classes=2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        strict = score(FixedLogits(logits), batches, acc, num_classes=2)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert strict == plain
    assert seen and not any(seen)  # the ROC/AUROC counts took torch's bincount, not the dense fallback


def test_evaluate_auroc_is_nan_when_val_has_one_class():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    ids = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    out = score(FixedLogits(logits), [(ids, torch.zeros(3, dtype=torch.long))], Accelerator(cpu=True), num_classes=2)
    assert math.isnan(out["val/auroc"])  # undefined, not the 0.0 the binned metric would report
    assert out["val/accuracy"] == pytest.approx(2 / 3) and out["val/confusion_matrix"] == [[2, 1], [0, 0]]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x)


def _trained_accelerator():
    acc = Accelerator(cpu=True)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return acc, model, opt


def test_checkpoint_round_trip_restores_weights_optimizer_rng_and_state(tmp_path):
    acc, model, opt = _trained_accelerator()
    state = TrainerState(epoch=2, batch_in_epoch=7, step=19, best_metric=0.8, wandb_run_id="abc123")
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = save_checkpoint(acc, tmp_path, state)
    assert path.name == "step_00000019" and (path / STATE_NAME).is_file()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt_step = opt.state_dict()["state"][0]["step"].clone()

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    restored = load_checkpoint(acc, path)
    assert restored == state
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved_weights[k])
    assert torch.equal(opt.state_dict()["state"][0]["step"], saved_opt_step)
    # The RNG file loads under weights_only (Accelerate swallows a failure here, so check it directly) ...
    assert set(accelerate_load(path / "random_states_0.pkl")) >= {"random_state", "torch_manual_seed"}
    # ... and the streams continue exactly where they were at save time.
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class WritesMarker:
    """Unpickling this calls open(marker, "w"): a harmless stand-in for the code a poisoned checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_load_checkpoint_refuses_pickled_code(tmp_path, name):
    acc, model, _ = _trained_accelerator()
    path = save_checkpoint(acc, tmp_path / "checkpoints", TrainerState(step=3))
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": WritesMarker(marker)}, path / name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{name}.*weights_only=True"):
        load_checkpoint(acc, path)
    assert not marker.exists()
    for k, v in model.state_dict().items():  # refused before anything was loaded
        assert torch.equal(v, moved[k])
    # The payload is live: an unsafe load runs it. So the refusal above is what kept the marker away.
    torch.load(path / name, weights_only=False)["payload"].close()
    assert marker.exists()


def test_resume_is_refused_under_a_different_config(tmp_path):
    saved = TrainerState(fingerprint={"model": "scratch_cnn", "batch_size": 8, "grad_accum": 1, "world_size": 2})
    check_resumable(tmp_path, saved, {"model": "scratch_cnn", "batch_size": 8, "grad_accum": 1, "world_size": 1})
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(tmp_path))}.*train\.batch_size: checkpoint 8, now 4.*train\.resume=none"
    ):
        check_resumable(tmp_path, saved, {"model": "scratch_cnn", "batch_size": 4, "grad_accum": 1, "world_size": 2})
    # A checkpoint from before fingerprints were recorded resumes as it did.
    check_resumable(tmp_path, TrainerState(), {"model": "inception_v3", "batch_size": 4})


def test_fp16_resume_of_a_checkpoint_without_a_loss_scaler_is_refused_clearly(tmp_path):
    """MOCKED GPU: fp16 (a GradScaler) exists only on CUDA. A bf16 checkpoint has no scaler.pt, and Accelerate
    would fail on it after loading the weights; the error says which precision to resume with."""
    from types import SimpleNamespace

    path = tmp_path / "step_00000008"
    path.mkdir()
    (path / "trainer_state.json").write_text('{"step": 8, "precision": "bf16"}')
    fp16_gpu = SimpleNamespace(scaler=object(), process_index=0)
    with pytest.raises(ConfigError, match="with train.mixed_precision=fp16: it was trained in bf16.*=bf16"):
        load_checkpoint(fp16_gpu, path)


def test_csv_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    tracker = CsvTracker(path)
    tracker.start()
    for step in range(1, 7):
        tracker.log({"train/loss_step": 1.0 / step}, step=step)
    tracker.log({"final/val/accuracy": 0.5}, step=6)
    tracker.finish()
    with open(path, "a") as f:
        f.write("7,train/lo")  # a row cut short by kill -9
    truncate_csv(path, 3)  # the resumed checkpoint is at step 3
    tracker = CsvTracker(path)
    tracker.start()
    tracker.log({"train/loss_step": 0.2}, step=4)
    tracker.finish()
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "name", "value"]
    assert [(r[0], r[1]) for r in rows[1:]] == [(str(s), "train/loss_step") for s in (1, 2, 3, 4)]


def test_partial_checkpoints_are_ignored_and_removed(tmp_path):
    acc, _, _ = _trained_accelerator()
    save_checkpoint(acc, tmp_path, TrainerState(step=4))
    (tmp_path / ".tmp-step_00000008").mkdir()  # a save killed before its rename
    (tmp_path / "step_00000009").mkdir()  # no trainer_state.json: never trusted
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    remove_partial(tmp_path)
    assert not (tmp_path / ".tmp-step_00000008").exists()


def test_prune_keeps_newest_k_and_best(tmp_path):
    acc, _, _ = _trained_accelerator()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(acc, tmp_path, TrainerState(step=step))
    deleted = prune_checkpoints(tmp_path, keep=2, best="step_00000002")
    assert sorted(p.name for p in deleted) == ["step_00000001", "step_00000003"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # Saving the same step again (epoch end == periodic save) replaces the folder.
    save_checkpoint(acc, tmp_path, TrainerState(step=5, epoch=1))
    assert TrainerState.from_json(tmp_path / "step_00000005" / STATE_NAME).epoch == 1


def test_fp16_on_cpu_warns_and_trains_in_fp32(tmp_path):
    cfg = load_config(None, ["data.dir=x", "train.mixed_precision=fp16", "train.cpu=true", "track.backends=[]"])
    with pytest.warns(UserWarning, match="fp16 is not applied on CPU"):
        acc = make_accelerator(cfg, tmp_path)
    assert acc.mixed_precision == "no"


def test_cpu_threads_split_cores_between_local_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank() == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit choice wins
    assert threads_per_rank() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # OpenMP's per-nesting-level list: the first level is ours
    assert threads_per_rank() == 3
