"""What every launch checks before it starts anything: the trainer's own data checks, run once here, on this host."""

from __future__ import annotations

from data_prep.info import check_reachable, check_train_split
from train.config import Config


def check_data(cfg: Config) -> None:
    """Raise InfoError (one line naming the file or URL and what to do) unless ``cfg.data.dir`` holds catdog-prep
    shards with a non-empty train split and the val split the config names, the first shard of each readable: what
    each rank would find at start-up, after accelerate, torchrun or SLURM had started it (at a URL: the store as this
    host sees it, at submission rather than in the job an hour later)."""
    info = check_reachable(cfg.data.dir, [cfg.data.train_split, cfg.data.val_split])
    check_train_split(info, cfg.data.train_split)
