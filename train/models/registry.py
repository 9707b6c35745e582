"""Model registry: ``MODELS[name](cfg, num_classes) -> nn.Module``.

Models know nothing about training or processes. Every model returns logits in eval mode; in training mode
InceptionV3 returns ``(logits, aux_logits)`` so the loss can weight the auxiliary head (train/loop/epoch.py).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from train.config import ModelConfig
from train.models import pretrained
from train.models.cnn import scratch_cnn
from train.models.inception import NEW_HEADS, inception_v3


def new_parameter_prefixes(cfg: ModelConfig) -> tuple[str, ...] | None:
    """Name prefixes of the parameters the weights did not provide (they learn at the full optim.lr; the rest at
    lr x optim.backbone_lr_scale). None: nothing is pretrained."""
    if cfg.name != "inception_v3" or cfg.weights == "none":
        return None
    if cfg.weights in pretrained.WEIGHTS:  # no aux weights in these files: the whole aux head is new
        return ("net.fc.", "net.AuxLogits.")
    return tuple(f"net.{h}." for h in NEW_HEADS)


MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "scratch_cnn": scratch_cnn,
    "inception_v3": inception_v3,
}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Look ``cfg.name`` up in MODELS (ModelConfig checked it against train.config.MODEL_NAMES at load)."""
    return MODELS[cfg.name](cfg, num_classes)
