"""One typed config tree for training: defaults <- YAML <- ``key.sub=value`` overrides.

The dataclasses below are the schema. OmegaConf's structured configs give us type checking and
"unknown key" errors at load time, naming the key, instead of a typo surfacing deep in the loop.
Derived quantities (per-device batch, accumulation, ...) are methods here, computed in one place.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

from omegaconf import MISSING

from data_prep.cpus import auto_num_workers
from data_prep.sizes import parse_size
from data_prep.storage.urls import BadURL, Location, is_url

# The names in train.models.registry.MODELS. Kept here (tests/test_models.py checks they agree) so a bad model.name fails
# when the config loads, before `catdog-launch` starts ranks, without importing torch.
MODEL_NAMES = ("scratch_cnn", "inception_v3")
# The scalars train.loop.scoring.score() reports per split; train.early_stop_metric must name one of them.
VAL_METRICS = ("loss", "accuracy", "precision", "recall", "f1", "auroc")
# One precision vocabulary for the trainer's train.mixed_precision and the tools' --precision. The trainer also takes
# `no` (Accelerate's word, which older configs and bundles record) for fp32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key or file and what to do."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")


@dataclass
class AugmentConfig:
    """Training-time augmentation (eval uses resize + centre crop only). Every random draw is seeded from
    (train.seed, epoch, sample position), so a resumed run augments exactly as an uninterrupted one."""

    scale_min: float = 0.35  # RandomResizedCrop lower area bound
    scale_max: float = 1.0
    hflip: float = 0.5  # probability of a horizontal flip
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 turns it off
    policy: str = "none"  # none | trivial (TrivialAugmentWide) | rand (RandAugment), per image after crop and flip
    rand_num_ops: int = 2  # RandAugment: operations per image
    rand_magnitude: int = 9  # RandAugment: strength, 0..30
    erasing: float = 0.0  # RandomErasing probability per image (the box is filled with the mean colour); 0 = off
    # Per batch, on the normalised batch: MixUp / CutMix with Beta(alpha, alpha) mixing; 0 = off. Both on: each
    # batch uses one of them, chosen at random. Targets become class probabilities (metrics still use hard labels).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Progressive resizing (as FFCV trains ImageNet): training crops start at size_start px and grow linearly to
    # size_end px (0 = model.image_size) between the two fractions of train.epochs in size_ramp, in steps of 16 px.
    # Early epochs then cost a fraction of the compute; validation and the exported model stay at model.image_size.
    # size_start 0 = off: every epoch crops at model.image_size.
    size_start: int = 0
    size_end: int = 0
    size_ramp: tuple[float, float] = (0.0, 0.75)

    def __post_init__(self) -> None:
        _choice("data.augment.policy", self.policy, ("none", "trivial", "rand"))
        if any(0 != v < 16 for v in (self.size_start, self.size_end)):
            raise ConfigError(
                f"data.augment.size_start={self.size_start}, size_end={self.size_end}: use pixels >= 16, or 0 (off)"
            )
        lo, hi = self.size_ramp
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(
                f"data.augment.size_ramp={list(self.size_ramp)}: use [start, end] with 0 <= start <= end <= 1"
            )
        if not 0.0 <= self.erasing <= 1.0:
            raise ConfigError(f"data.augment.erasing={self.erasing}: a probability in [0, 1]")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.augment.{key}={getattr(self, key)}: use 0 (off) or a positive alpha")
        if not 0 <= self.rand_magnitude <= 30 or self.rand_num_ops < 1:
            raise ConfigError(
                f"data.augment.rand_magnitude={self.rand_magnitude}, rand_num_ops={self.rand_num_ops}: "
                "magnitude must be in 0..30 and num_ops >= 1"
            )

    def crop_sizes(self, epochs: int, image_size: int) -> tuple[int, ...]:
        """The training crop size of each epoch: ``image_size`` throughout, or the progressive-resizing ramp from
        ``size_start`` to ``size_end`` (0: ``image_size``). The sizes in between are multiples of 16 px within the
        two ends; the last epoch always trains at the final size, the one validation and the exported model use."""
        if not self.size_start:
            return (image_size,) * epochs
        start, end = self.size_start, self.size_end or image_size
        lo, hi = self.size_ramp[0] * epochs, self.size_ramp[1] * epochs
        sizes = []
        for epoch in range(epochs):
            if epoch >= hi or epoch == epochs - 1:
                sizes.append(end)
            elif epoch <= lo:
                sizes.append(start)
            else:
                between = int(start + (epoch - lo) / (hi - lo) * (end - start)) // 16 * 16
                sizes.append(min(max(between, min(start, end)), max(start, end)))
        return tuple(sizes)


@dataclass
class DataConfig:
    """Where the shards are and how they are read."""

    # folder written by catdog-prep (holds _info.json and the tars): a path, s3://bucket/prefix (endpoint and
    # credentials from the standard AWS variables and files) or https://host/prefix (read-only); docs/remote-shards.md
    dir: str = MISSING
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # DataLoader worker processes per rank; auto (stored as -1): the CPUs this rank has, minus one for the rank itself
    # (see data_prep.cpus.auto_num_workers: SLURM_CPUS_PER_TASK, the CPU affinity mask, the ranks sharing it), at most 16.
    num_workers: int = -1
    shuffle_buffer: int = 1000  # samples in the (seeded) shuffle buffer
    shuffle: bool = True  # shuffle shards and samples for training each epoch
    on_error: str = "skip"  # skip | raise: what a corrupt sample does
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Shards at a URL are read from whole-shard copies in a cache on each node, shared by its ranks and workers
    # (train/data/shard_cache.py). Folder: "" = $CATDOG_SHARD_CACHE, else <temp dir>/catdog-shards-<uid>; on a cluster
    # point it at node-local scratch (a shared filesystem would need working flock, and defeats the purpose).
    cache_dir: str = ""
    # Bytes the cache may hold, e.g. 200GB; "auto" = 80 % of what its filesystem has free (plus what the cache holds)
    # at start-up. Least recently used shards are deleted to make room. Smaller than the dataset: each epoch
    # downloads again what does not fit.
    cache_size: str = "auto"
    # Shards each DataLoader worker downloads ahead of the one it reads (in the order it will read them); 0 = none.
    prefetch_shards: int = 2

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"data.on_error={self.on_error!r}: use 'skip' or 'raise'")
        if self.num_workers < -1:
            raise ConfigError(f"data.num_workers={self.num_workers}: use auto (or -1), 0 (read in the rank) or N >= 1")
        _check_data_dir(self.dir)
        if self.cache_size != "auto":
            try:
                ok = parse_size(self.cache_size) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"data.cache_size={self.cache_size!r}: use auto or a size such as 200GB or 500MiB")
        if self.prefetch_shards < 0:
            raise ConfigError(f"data.prefetch_shards={self.prefetch_shards}: use 0 (none) or N >= 1")

    def cache_bytes(self) -> int | None:
        """data.cache_size in bytes; None for auto."""
        return None if self.cache_size == "auto" else parse_size(self.cache_size)

    def workers(self) -> int:
        """DataLoader workers per rank: num_workers, or auto_num_workers() when it is -1."""
        return self.num_workers if self.num_workers >= 0 else auto_num_workers()[0]


def _check_data_dir(where: str) -> None:
    """data.dir: a path or a URL storage can open (``foo://x`` is not a folder named ``foo:``)."""
    if is_url(where):
        try:
            Location.parse(where)
        except BadURL as e:
            raise ConfigError(f"data.dir={e}") from None


@dataclass
class ModelConfig:
    """Which network from the registry (train/models/registry.py), and its options."""

    name: str = "scratch_cnn"  # scratch_cnn | inception_v3
    image_size: int = 0  # input size; 0 = the model's default (scratch_cnn 160, inception_v3 299)
    # scratch_cnn
    width: int = 32  # channels of the first block; doubles each block
    depth: int = 4  # conv blocks, each followed by 2x2 max-pool
    convs_per_block: int = 1  # conv-norm-ReLU layers per block (compute grows ~linearly with it)
    dropout: float = 0.3  # before the classifier
    norm: str = "batch"  # batch | group | none
    # Each block's last conv is max-pooled BEFORE its norm and ReLU (conv-pool-norm-ReLU, as fast CIFAR-10 recipes
    # such as airbench do): ReLU commutes with max-pool, so only the norm sees different values, and the norm and
    # ReLU work on a quarter of the pixels. Measured on 2 CPU cores (bf16): BatchNorm was ~30 % of a training step.
    # (GroupNorm normalises each sample over its own pixels, so for it the pooled order is a different function.)
    pool_before_norm: bool = False
    # inception_v3
    # none | imagenet (torchvision download) | tf_inception_v3 (offline: Google's TF ImageNet graph, see
    # train/models/pretrained.py) | path to a torchvision-layout state_dict file
    weights: str = "none"
    # InceptionV3's auxiliary head (on Mixed_6e). tf_inception_v3 has no weights for it: when on, it trains from
    # scratch (torchvision's init); it never affects the main head's logits or a frozen backbone's features.
    aux_logits: bool = True
    freeze_backbone: bool = False  # feature extraction: only the new head trains
    trainable_blocks: int = -1  # fine-tune only the last N blocks (+ head); -1 = all
    aux_loss_weight: float = 0.4  # InceptionV3 auxiliary logits weight in training
    # BatchNorm statistics over the global batch instead of each rank's slice (SyncBatchNorm). Worth it when the
    # per-device batch is small (under ~16-32 images); costs one all-reduce per BatchNorm layer per step.
    sync_bn: bool = False

    def __post_init__(self) -> None:
        _choice("model.name", self.name, MODEL_NAMES)
        _choice("model.norm", self.norm, ("batch", "group", "none"))
        if not -1 <= self.trainable_blocks <= 16:  # InceptionV3 has 16 trunk blocks (train/models/inception.py)
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
    # auto: bf16 where the hardware computes it natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX),
    # fp32 elsewhere; the log says which and why. fp16 autocasts on GPUs only (on CPU: fp32, with a warning).
    mixed_precision: str = "auto"  # auto | fp32 | bf16 | fp16 (no = fp32)
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
    log_every: int = 10  # steps between tracker logs (and host reads of the loss for the progress bar)
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest conv algorithms (off when deterministic)
    tf32: bool = True  # CUDA (Ampere+): TF32 tensor cores for fp32 matmuls and convolutions
    # Weight EMA (train/loop/ema.py): validation, early stopping, the best checkpoint and the test scoring use the
    # average, updated after every optimizer step. Decay per step; the warm-up ramps it up from 0 (timm-style).
    ema: bool = False
    ema_decay: float = 0.998
    ema_warmup: bool = True
    # Frozen backbone only: compute its features for each split once (eval transform: no augmentation), cache
    # them, and train only the head on them (train/run/features.py). Minutes instead of hours on a CPU.
    precompute_features: bool = False
    # Seconds a collective (an all-reduce, a barrier) and the start-up rendezvous wait for the other ranks before
    # failing: a rank or node that died or hangs then ends the job instead of holding it until its time limit.
    # Longer than the slowest thing one rank does while the others wait (writing a checkpoint to a slow disk).
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.mixed_precision not in (*PRECISIONS, "no"):
            raise ConfigError(
                f"train.mixed_precision={self.mixed_precision!r}: choose one of {', '.join(PRECISIONS)} (no = fp32)"
            )
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"train.dist_timeout_s={self.dist_timeout_s}: use a number of seconds > 0, e.g. 600")
        _choice("train.early_stop_mode", self.early_stop_mode, ("max", "min"))
        _choice("train.early_stop_metric", self.early_stop_metric, tuple(f"val/{m}" for m in VAL_METRICS))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay}: use a value in [0, 1), e.g. 0.998")
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
    # auto: online where a W&B API key is set up (WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc), else offline
    # (a run dir's wandb/ folder, for `wandb sync` later). offline | online | disabled as W&B means them.
    # WANDB_MODE in the environment wins over all of these.
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)
    # On a resume, rewind the W&B run to the checkpoint's step (W&B's run rewind, `resume_from`), so the steps
    # the interrupted session logged after its last checkpoint are replaced, as in the CSV and TensorBoard.
    # Run rewind is a W&B preview feature that an account may not have; off, W&B keeps the first values
    # logged for those steps and ignores the re-logged ones.
    rewind: bool = False

    def __post_init__(self) -> None:
        _choice("track.wandb.mode", self.mode, ("auto", "offline", "online", "disabled"))

    def resolved_mode(self, env: Mapping[str, str] | None = None) -> str:
        """The mode W&B runs in here: WANDB_MODE, else ``mode`` with ``auto`` decided by whether a key is set up."""
        env = os.environ if env is None else env
        if env.get("WANDB_MODE"):
            return env["WANDB_MODE"]
        if self.mode != "auto":
            return self.mode
        return "online" if wandb_key_set_up(env) else "offline"


def wandb_key_set_up(env: Mapping[str, str]) -> bool:
    """Whether W&B would find an API key: WANDB_API_KEY, or the netrc entry `wandb login` writes for its host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(env.get("NETRC") or None).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc (the usual case), or one W&B could not read either
        return False


@dataclass
class TrackConfig:
    backends: list[str] = field(default_factory=lambda: ["csv"])  # any of wandb, tensorboard, csv
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Plots (run.dir/plots and their W&B images) at most this often during training, and always at the end;
    # 0 = after every epoch. Scalars are logged every epoch regardless.
    plot_every_s: float = 60.0

    def __post_init__(self) -> None:
        bad = [b for b in self.backends if b not in ("wandb", "tensorboard", "csv")]
        if bad:
            raise ConfigError(f"track.backends has unknown {bad}: choose from wandb, tensorboard, csv")
        if self.plot_every_s < 0:
            raise ConfigError(f"track.plot_every_s={self.plot_every_s}: use seconds >= 0 (0 = every epoch)")


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
        if self.data.augment.size_start:
            self._check_crop_sizes()
        # The resolved config is saved in run.dir and sent to the trackers: no password may ride in data.dir's URL.
        if is_url(self.data.dir) and "@" in Location.parse(self.data.dir).root:
            raise ConfigError(
                f"data.dir={Location.parse(self.data.dir)}: a user:password in data.dir would be saved in "
                "run.dir/config.yaml and sent to the trackers; serve the shards without one, or from s3:// (credentials "
                "from the AWS variables or a profile)"
            )

    def _check_crop_sizes(self) -> None:
        """Progressive resizing needs image batches and crops the model can take."""
        aug, model = self.data.augment, self.model
        smallest = min(aug.size_start, aug.size_end or model.input_size())
        key = f"data.augment.size_start={aug.size_start}, size_end={aug.size_end}"
        if self.train.precompute_features:
            raise ConfigError(f"{key}: cached features are computed once, unaugmented; set data.augment.size_start=0")
        if model.name == "inception_v3" and model.aux_logits:
            raise ConfigError(f"{key}: InceptionV3's auxiliary head needs 299 px crops; set model.aux_logits=false")
        least = 75 if model.name == "inception_v3" else 2**model.depth  # each scratch block halves the map
        if smallest < least:
            raise ConfigError(f"{key}: {model.name} needs crops of at least {least} px")
