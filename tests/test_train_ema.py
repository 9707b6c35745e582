"""Weight EMA (train.ema): the update rule, its checkpoint file, and a real run whose validation and test scoring
use the averaged weights."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn
from train_helpers import TINY, make_shards, run_train

from data_prep.info import load_info
from train.config_io import load_config
from train.data.streams import eval_loader
from train.formats.rundir import EMA_WEIGHTS, STATE_NAME, validated_weights
from train.loop.ema import WeightEMA, ema_decay_at
from train.loop.scoring import score
from train.models.registry import build_model


def test_decay_ramp_and_update_rule_match_the_formulas():
    assert ema_decay_at(0, 0.99, True) == 0.0 and ema_decay_at(0, 0.99, False) == 0.0  # first update copies
    assert ema_decay_at(1, 0.99, True) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay_at(10**6, 0.99, True) == 0.99 and ema_decay_at(5, 0.99, False) == 0.99
    ramp = [ema_decay_at(t, 0.999, True) for t in range(1, 2000)]
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    ema = WeightEMA(model, decay=0.9, warmup=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(4):
        model.train()
        model(torch.randn(4, 3, 8, 8)).sum().backward()  # also moves the BatchNorm running statistics
        opt.step()
        opt.zero_grad()
        ema.update(model)
        d = 0.0 if t == 0 else 0.9
        for k, v in model.state_dict().items():
            expected[k] = v.clone() if not v.is_floating_point() else d * expected[k] + (1 - d) * v
    assert ema.updates == 4
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, msg=k)  # parameters AND buffers averaged; the counter copied
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_state_round_trips_with_the_update_count(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.99, warmup=True)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
    tensors, meta = ema.state()
    assert set(tensors) == set(model.state_dict())  # the model's keys: a plain model loads it
    save_file(tensors, str(tmp_path / EMA_WEIGHTS), metadata=meta)
    other = WeightEMA(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), decay=0.99, warmup=True)
    other.load(tmp_path / EMA_WEIGHTS)
    assert other.updates == 3
    for k, v in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v), k


def _score(weights: dict, cfg, shards, split: str) -> dict:
    """Evaluate ``weights`` on ``split`` in this process, as the trainer does (one rank)."""
    info = load_info(shards)
    model = build_model(cfg.model, info.num_classes)
    model.load_state_dict(weights)
    batches = eval_loader(
        cfg.data, info, split=split, batch_size=cfg.eval.batch_size, image_size=cfg.model.input_size(), rank=0,
        world_size=1,
    )  # fmt: skip
    return score(model, batches, Accelerator(cpu=True), num_classes=info.num_classes, prefix=split)


@pytest.mark.slow
def test_run_with_ema_validates_and_tests_the_averaged_weights(tmp_path, real_data):
    shards = make_shards(real_data, tmp_path / "shards")
    run_dir = tmp_path / "run"
    overrides = [f"data.dir={shards}", f"run.dir={run_dir}", *TINY, "train.epochs=2", "train.ema=true"]
    overrides += ["train.ema_decay=0.9", "train.keep_checkpoints=1"]
    run_train(overrides)
    cfg = load_config(None, overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    last = run_dir / "checkpoints" / "step_00000010"
    state = json.loads((last / STATE_NAME).read_text())
    assert state["eval_weights"] == EMA_WEIGHTS and validated_weights(last) == last / EMA_WEIGHTS

    ema, raw = load_file(str(last / EMA_WEIGHTS)), load_file(str(last / "model.safetensors"))
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    # Validation after the last epoch scored the EMA weights, not the raw ones.
    by_ema, by_raw = _score(ema, cfg, shards, "val"), _score(raw, cfg, shards, "val")
    assert rows[-1]["val/loss"] == pytest.approx(by_ema["val/loss"], rel=1e-5)
    assert by_raw["val/loss"] != pytest.approx(by_ema["val/loss"], rel=1e-3)
    # The test split was scored on the best checkpoint's EMA weights.
    best = run_dir / "checkpoints" / final["best_checkpoint"]
    assert final["test/weights"] == EMA_WEIGHTS
    by_best = _score(load_file(str(best / EMA_WEIGHTS)), cfg, shards, "test")
    assert final["test/loss"] == pytest.approx(by_best["test/loss"], rel=1e-5)
    # The bundle the run wrote (run.dir/model/) carries the weights that were validated: the best's EMA weights.
    bundled = load_file(str(run_dir / "model" / "model.safetensors"))
    best_ema = load_file(str(best / EMA_WEIGHTS))
    assert bundled.keys() == best_ema.keys() and all(torch.equal(bundled[k], best_ema[k]) for k in bundled)
