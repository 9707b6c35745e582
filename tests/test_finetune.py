"""Fine-tuning from tf_inception_v3: the pretrained trunk learns at optim.lr x optim.backbone_lr_scale, new heads at lr."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from train.config import ConfigError
from train.config_io import load_config
from train.loop.epoch import EpochTotals, train_one_epoch
from train.models import pretrained
from train.models.registry import build_model
from train.run.setup import make_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def weights() -> None:
    try:
        pretrained.ensure_converted("tf_inception_v3")
    except pretrained.PretrainedError as e:
        pytest.skip(f"tf_inception_v3 weights unavailable: {e}")


def _groups_by_param(optimizer, model) -> dict[str, float]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}


def test_backbone_learns_at_a_lower_rate_than_the_new_heads(weights):
    cfg = load_config(CONFIGS / "inception_v3_finetune.yaml", ["data.dir=x", "model.aux_logits=true"])
    assert cfg.optim.backbone_lr_scale == 0.1 and not cfg.model.freeze_backbone
    model = build_model(cfg.model, 2)
    opt = make_optimizer(cfg, model)
    scales = _groups_by_param(opt, model)
    assert set(scales) == {n for n, p in model.named_parameters() if p.requires_grad}  # each param in one group
    for name, scale in scales.items():
        # tf_inception_v3 has no aux weights: the aux head is new and learns at the full rate, like fc.
        expected = 1.0 if name.startswith(("net.fc.", "net.AuxLogits.")) else 0.1
        assert scale == expected, name

    # One real step (small input keeps it fast): the scheduled LR reaches each group times its scale.
    cfg.model.aux_logits = False
    model = build_model(cfg.model, 2)
    opt = make_optimizer(cfg, model)
    before = model.net.Mixed_7c.branch1x1.conv.weight.detach().clone()
    acc = Accelerator(cpu=True)
    batches = [(torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 0, 1]))]
    train_one_epoch(
        model, batches, opt, acc, lr_fn=lambda s: 0.05, step=0, start_batch=0, num_batches=1, totals=EpochTotals()
    )
    lrs = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
    assert lrs == {1.0: 0.05, 0.1: pytest.approx(0.005)}
    assert not torch.equal(before, model.net.Mixed_7c.branch1x1.conv.weight)  # the trunk does train


def test_scratch_models_have_one_rate_and_bad_scales_are_named():
    cfg = load_config(None, ["data.dir=x", "optim.backbone_lr_scale=0.1", "model.width=4", "model.depth=2"])
    opt = make_optimizer(cfg, build_model(cfg.model, 2))
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0}  # nothing pretrained: no "backbone"
    with pytest.raises(ConfigError, match=r"optim.backbone_lr_scale=0\.0"):
        load_config(None, ["data.dir=x", "optim.backbone_lr_scale=0"])
