"""What every launch checks before it starts anything: the trainer's own data checks, run once here."""

from __future__ import annotations

from data_prep.info import load_info
from train.config import Config
from train.run.setup import check_train_split


def check_data(cfg: Config) -> None:
    """Raise InfoError (one line naming the file and what to do) unless ``cfg.data.dir`` holds catdog-prep shards with
    a non-empty train split and the val split the config names: what each rank would check at start-up, after
    accelerate, torchrun or SLURM had started it."""
    info = load_info(cfg.data.dir)
    check_train_split(info, cfg.data.train_split)
    info.split(cfg.data.val_split)
