"""One typed config tree for training: defaults <- YAML <- ``key.sub=value`` overrides.

The dataclasses below are the schema. OmegaConf's structured configs give us type checking and
"unknown key" errors at load time, naming the key, instead of a typo surfacing deep in the loop.
Derived quantities (per-device batch, accumulation, ...) are methods here, computed in one place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.atomic import atomic_write_text

# The names in train.models.MODELS. Kept here (tests/test_models.py checks they agree) so a bad model.name fails
# when the config loads, before `catdog-launch` starts ranks, without importing torch.
MODEL_NAMES = ("scratch_cnn", "inception_v3")
# The scalars train.engine.evaluate() reports per split; train.early_stop_metric must name one of them.
VAL_METRICS = ("loss", "accuracy", "precision", "recall", "f1", "auroc")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key or file and what to do."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")


@dataclass
class AugmentConfig:
    """Training-time augmentation (eval uses resize + centre crop only)."""

    scale_min: float = 0.35  # RandomResizedCrop lower area bound
    scale_max: float = 1.0
    hflip: float = 0.5  # probability of a horizontal flip
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 turns it off


@dataclass
class DataConfig:
    """Where the shards are and how they are read."""

    dir: str = MISSING  # folder written by catdog-prep (holds _info.json and the tars)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    num_workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples in the (seeded) shuffle buffer
    shuffle: bool = True  # shuffle shards and samples for training each epoch
    on_error: str = "skip"  # skip | raise: what a corrupt sample does
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"data.on_error={self.on_error!r}: use 'skip' or 'raise'")


@dataclass
class ModelConfig:
    """Which network from the registry in train/models.py, and its options."""

    name: str = "scratch_cnn"  # scratch_cnn | inception_v3
    image_size: int = 0  # input size; 0 = the model's default (scratch_cnn 160, inception_v3 299)
    # scratch_cnn
    width: int = 32  # channels of the first block; doubles each block
    depth: int = 4  # conv blocks, each followed by 2x2 max-pool
    convs_per_block: int = 1  # conv-norm-ReLU layers per block (compute grows ~linearly with it)
    dropout: float = 0.3  # before the classifier
    norm: str = "batch"  # batch | group | none
    # inception_v3
    # none | imagenet (torchvision download) | tf_inception_v3 (offline: Google's TF ImageNet graph, see
    # train/pretrained.py) | path to a torchvision-layout state_dict file
    weights: str = "none"
    # InceptionV3's auxiliary head (on Mixed_6e). tf_inception_v3 has no weights for it: when on, it trains from
    # scratch (torchvision's init); it never affects the main head's logits or a frozen backbone's features.
    aux_logits: bool = True
    freeze_backbone: bool = False  # feature extraction: only the new head trains
    trainable_blocks: int = -1  # fine-tune only the last N blocks (+ head); -1 = all
    aux_loss_weight: float = 0.4  # InceptionV3 auxiliary logits weight in training

    def __post_init__(self) -> None:
        _choice("model.name", self.name, MODEL_NAMES)
        _choice("model.norm", self.norm, ("batch", "group", "none"))
        if not -1 <= self.trainable_blocks <= 16:  # InceptionV3 has 16 trunk blocks (train/models.py)
            raise ConfigError(f"model.trainable_blocks={self.trainable_blocks}: use -1 (all) or 0..16")
        if self.depth < 1 or self.width < 1:
            raise ConfigError(f"model.depth={self.depth}, model.width={self.width}: both must be >= 1")

    def input_size(self) -> int:
        if self.image_size > 0:
            return self.image_size
        return 299 if self.name == "inception_v3" else 160


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # peak learning rate for the global batch
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    label_smoothing: float = 0.0
    clip_grad_norm: float = 0.0  # 0 = off
    # Fine-tuning: layers that came with pretrained weights learn at lr x this; new heads at lr (1 = same LR)
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd"))
        if not 0 < self.backbone_lr_scale <= 10:
            raise ConfigError(
                f"optim.backbone_lr_scale={self.backbone_lr_scale}: use a factor in (0, 10], e.g. 0.1; "
                "to keep the backbone fixed set model.freeze_backbone=true"
            )


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # global batch (all ranks, one optimizer step)
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "no"  # no | bf16 | fp16
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms + seeded data order/augmentation
    cpu: bool = False  # force CPU even when GPUs are visible
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = epoch ends only
    keep_checkpoints: int = 2  # newest K kept (the best is kept as well)
    resume: str = "auto"  # auto | none | path to a checkpoint dir
    early_stop_patience: int = 0  # epochs (not evaluations) without improvement before stopping; 0 = off
    early_stop_metric: str = "val/accuracy"  # val/<one of VAL_METRICS>; a NaN value counts as no improvement
    early_stop_mode: str = "max"  # max | min
    max_steps: int = 0  # stop after this many optimizer steps (tests, smoke runs); 0 = no limit
    log_every: int = 10  # steps between tracker logs
    # Frozen backbone only: compute its features for each split once (eval transform: no augmentation), cache
    # them, and train only the head on them (train/features.py). Minutes instead of hours on a CPU.
    precompute_features: bool = False

    def __post_init__(self) -> None:
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _choice("train.early_stop_mode", self.early_stop_mode, ("max", "min"))
        _choice("train.early_stop_metric", self.early_stop_metric, tuple(f"val/{m}" for m in VAL_METRICS))
        if self.grad_accum < 1 or self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("train.batch_size, train.grad_accum and train.epochs must be >= 1")

    def per_device_batch(self, world_size: int) -> int:
        """Micro-batch each rank feeds per forward pass."""
        denom = world_size * self.grad_accum
        if self.batch_size % denom:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by world_size*grad_accum={denom}; "
                "pick a batch size that is a multiple of it"
            )
        return self.batch_size // denom


@dataclass
class EvalConfig:
    batch_size: int = 128  # global eval batch
    every_epochs: int = 1
    test_at_end: bool = True  # evaluate the best checkpoint on the test split when it has samples


@dataclass
class WandbConfig:
    project: str = "catdog"
    entity: str = ""
    mode: str = "offline"  # offline | online | disabled; WANDB_MODE in the environment wins
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choice("track.wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class TrackConfig:
    backends: list[str] = field(default_factory=lambda: ["csv"])  # any of wandb, tensorboard, csv
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        bad = [b for b in self.backends if b not in ("wandb", "tensorboard", "csv")]
        if bad:
            raise ConfigError(f"track.backends has unknown {bad}: choose from wandb, tensorboard, csv")


@dataclass
class RunConfig:
    dir: str = "runs/default"  # everything the run writes goes here; reusing it resumes
    name: str = ""  # display name for trackers; default: the run dir's name


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.train.precompute_features and not (self.model.name == "inception_v3" and self.model.freeze_backbone):
            raise ConfigError(
                "train.precompute_features=true needs a frozen backbone: set model.name=inception_v3 and "
                "model.freeze_backbone=true (or train.precompute_features=false)"
            )


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML from configs/ (e.g. configs/cnn.yaml)")
    try:
        # OmegaConf parses with yaml's SafeLoader: no Python objects are ever constructed from YAML.
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends; we want the file named
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data:, model:, ...)")
    # `defaults: [other.yaml]` lets one YAML build on another (paths relative to the including file).
    bases = node.pop("defaults", [])
    merged = OmegaConf.create()
    for base in bases or []:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / str(base)).resolve()))
    return OmegaConf.merge(merged, node)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults <- YAML file <- dotted overrides (``train.epochs=3``) into a validated Config."""
    schema = OmegaConf.structured(Config)
    where = "defaults"
    try:
        if path is not None:
            where = str(path)
            schema = OmegaConf.merge(schema, _read_yaml(Path(path)))
        for item in overrides:
            where = f"override {item!r}"
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([item]))
        where = f"config ({path or 'defaults'} + overrides)"
        missing = sorted(OmegaConf.missing_keys(schema))
        if missing:
            raise ConfigError(
                f"{where}: required key(s) {missing} not set; add them to the YAML or pass e.g. data.dir=PATH"
            )
        cfg = OmegaConf.to_object(schema)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"{where}: bad config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from e
    except (ValueError, TypeError) as e:  # raised by __post_init__ validation
        raise ConfigError(f"{where}: {e}") from e
    assert isinstance(cfg, Config)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain-dict view (for trackers and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file, fsync, rename)."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
