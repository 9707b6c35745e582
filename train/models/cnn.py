"""The scratch CNN: conv-norm-ReLU blocks, global average pool, dropout, a linear head."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import ModelConfig


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # GroupNorm has no running statistics, so N ranks x batch b computes exactly what 1 rank x N*b does.
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


class ScratchCNN(nn.Module):
    """conv-norm-ReLU blocks (``convs`` convs each, 2x2 max-pool after; or, with ``pool_before_norm``, the block's last
    conv pooled before its norm and ReLU), global average pool, dropout, linear head."""

    def __init__(
        self,
        num_classes: int,
        *,
        width: int = 32,
        depth: int = 4,
        convs: int = 1,
        dropout: float = 0.3,
        norm: str = "batch",
        pool_before_norm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i in range(depth):
            out_ch = width * 2**i
            for j in range(convs):
                layers.append(nn.Conv2d(in_ch if j == 0 else out_ch, out_ch, 3, padding=1, bias=norm == "none"))
                if pool_before_norm and j == convs - 1:
                    layers.append(nn.MaxPool2d(2))
                layers += [_norm(norm, out_ch), nn.ReLU(inplace=True)]
            if not pool_before_norm:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))


def scratch_cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return ScratchCNN(
        num_classes,
        width=cfg.width,
        depth=cfg.depth,
        convs=cfg.convs_per_block,
        dropout=cfg.dropout,
        norm=cfg.norm,
        pool_before_norm=cfg.pool_before_norm,
    )
