"""Image transforms (torchvision.transforms.v2): random crops and flips for training, resize + centre crop for eval.

Both pipelines accept a uint8 CHW tensor (what ``train.data.decode_rgb`` gives the shard reader) or a PIL
image (what ``ImageFolder`` gives the loader benchmark's baseline), and return a normalised float32 CHW tensor.
The transforms draw their randomness from torch's global RNG; train/data.py seeds it per sample so augmentation
is a pure function of (seed, epoch, sample position). The loader applies the uint8 part per image and
``normalise`` once per stacked batch (one vectorised op instead of two per image, and uint8 until the end).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from train.config import DataConfig

# Eval resizes the short side to image_size / 0.875 before the centre crop: the ImageNet convention
# (256 -> 224) that torchvision and timm use, so pretrained InceptionV3 weights see familiar framing.
EVAL_CROP_FRACTION = 0.875


def train_augment(cfg: DataConfig, image_size: int) -> v2.Compose:
    """The random part of training, per image: RandomResizedCrop + horizontal flip, then (each optional)
    TrivialAugmentWide or RandAugment, colour jitter, RandomErasing.

    Output has the input's type (uint8 tensor or PIL image); ``normalise`` turns either into a float tensor.
    """
    aug = cfg.augment
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(image_size, scale=(aug.scale_min, aug.scale_max), antialias=True),
        v2.RandomHorizontalFlip(aug.hflip),
    ]
    if aug.policy == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif aug.policy == "rand":
        steps.append(v2.RandAugment(num_ops=aug.rand_num_ops, magnitude=aug.rand_magnitude))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if aug.erasing > 0:
        # Filled with the mean colour, i.e. zero after normalisation (torchvision's reference erases the
        # normalised tensor with 0); here on uint8, before the batch is normalised.
        steps.append(v2.RandomErasing(aug.erasing, value=[round(255 * m) for m in cfg.mean]))
    return v2.Compose(steps)


def batch_mix(cfg: DataConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on a normalised batch (images, int64 labels) -> (images, class probabilities), or None.

    Both on: ``RandomChoice`` picks one per batch. Pairs are formed within the batch (torchvision rolls it by one),
    so with mixing on, 2 ranks x batch b no longer train exactly like 1 rank x batch 2b.
    """
    aug = cfg.augment
    mixers: list[v2.Transform] = []
    if aug.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    if aug.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def eval_resize(cfg: DataConfig, image_size: int) -> v2.Compose:
    """The geometric part of eval: resize the short side to image_size / 0.875, then centre crop."""
    return v2.Compose([v2.Resize(int(image_size / EVAL_CROP_FRACTION), antialias=True), v2.CenterCrop(image_size)])


def normalise(cfg: DataConfig) -> v2.Compose:
    """PIL image, uint8 CHW image or NCHW batch -> float32 scaled to [0, 1], standardised with cfg.mean / cfg.std.

    ToImage sits here, not in the per-image steps, so the loader pays it once per batch.
    """
    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(cfg.mean), std=list(cfg.std))]
    )


def train_transform(cfg: DataConfig, image_size: int) -> v2.Compose:
    """Per-image training pipeline: train_augment then normalise."""
    return v2.Compose([train_augment(cfg, image_size), normalise(cfg)])


def eval_transform(cfg: DataConfig, image_size: int) -> v2.Compose:
    """Per-image eval pipeline (deterministic): eval_resize then normalise."""
    return v2.Compose([eval_resize(cfg, image_size), normalise(cfg)])
