"""Image transforms (torchvision.transforms.v2): random crops and flips for training, resize + centre crop for eval.

Both pipelines accept a uint8 CHW tensor (what ``train.data.reader.decode_rgb`` gives the shard reader) or a PIL
image (what ``ImageFolder`` gives the loader benchmark's baseline), and return a normalised float32 CHW tensor.
The transforms draw their randomness from torch's global RNG; the shard loader seeds it per sample so augmentation
is a pure function of (seed, epoch, sample position). The shard loader applies the geometric uint8 part per
image (``train_augment(..., jitter=False)``), then colour jitter and normalisation once per stacked batch
(``BatchColour``: one affine map per image, uint8 until then), then MixUp/CutMix (``batch_mix``). The per-image
pipelines (``train_transform``, ``eval_transform``) remain for PIL images and as the reference.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from train.config import DataConfig

# Eval resizes the short side to image_size / 0.875 before the centre crop: the ImageNet convention
# (256 -> 224) that torchvision and timm use, so pretrained InceptionV3 weights see familiar framing.
EVAL_CROP_FRACTION = 0.875


def train_augment(cfg: DataConfig, image_size: int, *, jitter: bool = True) -> v2.Compose:
    """The random part of training, per image: RandomResizedCrop + horizontal flip, then (each optional)
    TrivialAugmentWide or RandAugment, colour jitter, RandomErasing.

    Output has the input's type (uint8 tensor or PIL image); ``normalise`` turns either into a float tensor.
    ``jitter=False`` leaves colour jitter out: the shard loader applies it per batch (``BatchColour``).
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
    if jitter and aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if aug.erasing > 0:
        # Filled with the mean colour, i.e. zero after normalisation (torchvision's reference erases the
        # normalised tensor with 0); here on uint8, before the batch is normalised.
        steps.append(v2.RandomErasing(aug.erasing, value=[round(255 * m) for m in cfg.mean]))
    return v2.Compose(steps)


class EpochCrops:
    """``train_augment`` at each epoch's crop size (progressive resizing, ``AugmentConfig.crop_sizes``).

    Picklable for DataLoader workers; each size's pipeline is built once per process. A crop's area, ratio and position
    are drawn independently of its output size, so a sample's crop covers the same part of the image whatever the
    epoch's size (other augmentations, e.g. TrivialAugment's translations, may draw differently per size).
    """

    def __init__(self, cfg: DataConfig, sizes: tuple[int, ...]):
        if not sizes:
            raise ValueError("EpochCrops needs one crop size per epoch")
        self.cfg, self.sizes = cfg, tuple(sizes)
        self._built: dict[int, v2.Compose] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_built": {}}

    def size(self, epoch: int) -> int:
        """The crop size of ``epoch`` (the last size past the schedule's end)."""
        return self.sizes[min(epoch, len(self.sizes) - 1)]

    def __call__(self, epoch: int) -> v2.Compose:
        size = self.size(epoch)
        if size not in self._built:
            self._built[size] = train_augment(self.cfg, size, jitter=False)
        return self._built[size]


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


# torchvision's grayscale weights (v2.functional.rgb_to_grayscale), which its contrast and saturation use.
GRAY = (0.2989, 0.587, 0.114)


class BatchColour:
    """Colour jitter with per-image factors and normalisation of a whole uint8 batch, as ONE affine map per image.

    Brightness, contrast and saturation (torchvision's definitions: ``v2.functional.adjust_*``) are each linear
    in the pixel values, and so is normalisation, so their composition is a 3x3 matrix plus an offset per image:
    one batched matmul over the batch, instead of torchvision's ColorJitter per image (~0.6 ms of a 160 px image's
    ~2.5 ms in the loader on this machine, each op converting uint8 -> float -> uint8 again) plus a separate
    normalisation pass. ``draw()`` takes each image's three factors from torch's RNG, as ColorJitter does (the
    loader calls it per sample, seeded by the sample's position). One difference from ColorJitter: values are
    clamped to [0, 1] once, after the three ops, not after each (they agree wherever no intermediate value leaves
    [0, 1]; tests/test_augment.py checks that against torchvision's functions). Without the intermediate clamps the
    three ops commute (the grey weights sum to 0.9999), so ColorJitter's random op order would change nothing and
    is not drawn.
    """

    def __init__(self, cfg: DataConfig):
        self.strength = cfg.augment.color_jitter
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)
        self.std = torch.tensor(cfg.std, dtype=torch.float32)
        self.gray = torch.tensor(GRAY, dtype=torch.float32)

    def draw(self) -> torch.Tensor:
        """One image's brightness, contrast and saturation factors, uniform in [1 - strength, 1 + strength]."""
        j = self.strength
        return torch.empty(3).uniform_(max(0.0, 1 - j), 1 + j)

    def __call__(self, batch: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N, 3, H, W) [+ (N, 3) drawn factors] -> normalised float32 (N, 3, H, W)."""
        n, c, h, w = batch.shape
        flat = batch.reshape(n, c, h * w).float()
        a = torch.eye(3).expand(n, 3, 3).clone()  # the colour map on [0, 1] values: v' = a v + o
        o = torch.zeros(n, 3)
        if params is not None:
            # Per-channel means of the [0, 1] image, for contrast (the mean grey level of the image it sees).
            mu = flat.mean(-1) / 255.0
            eye, ones_gray = torch.eye(3), torch.ones(3, 1) * self.gray[None, :]
            for op in range(
                3
            ):  # 0 brightness: f v; 1 contrast: f v + (1 - f) mean grey; 2 saturation: f v + (1 - f) grey(v)
                f = params[:, op]
                m = f[:, None, None] * eye + (1 - f)[:, None, None] * ones_gray * (op == 2)
                grey = ((a @ mu[:, :, None])[:, :, 0] + o) @ self.gray  # mean grey level after the ops so far
                off = ((1 - f) * grey * (op == 1))[:, None].expand(n, 3)
                a, o = m @ a, (m @ o[:, :, None])[:, :, 0] + off
        # Fold in the uint8 scale and the normalisation: out = (a (x / 255) + o - mean) / std.
        a = a / (255.0 * self.std[None, :, None])
        o = (o - self.mean) / self.std
        out = torch.baddbmm(o[:, :, None], a, flat)
        if params is not None:
            # [0, 1] before normalisation. Per channel with scalar bounds: ~8x faster than broadcast tensor bounds.
            for ch, (m, sd) in enumerate(zip(self.mean.tolist(), self.std.tolist(), strict=True)):
                out[:, ch].clamp_(-m / sd, (1 - m) / sd)
        return out.view(n, c, h, w)


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
