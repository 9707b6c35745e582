"""Typed SLURM settings: defaults <- configs/slurm/*.yaml <- command-line flags.

Same rules as train/config.py: unknown keys and wrong types fail at load time naming the key, and the
values are checked here, before anything reaches sbatch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.config import ConfigError
from train.config_io import strings_as_written

_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_MEM = re.compile(r"^(?P<n>\d+)(?P<u>[KMGT]?)B?$", re.IGNORECASE)


@dataclass
class SlurmConfig:
    """Resources and requeue policy of one SLURM job (or of each element of a sweep's job array)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0 = a CPU-only job: its ranks train on CPU over gloo
    tasks_per_node: int = 0  # ranks per node; 0 = one per GPU (1 when gpus_per_node is 0)
    # CPUs per rank (the rank + its data-loader workers); 0 = auto: on a GPU job the node's CPUs divided by its
    # GPUs (from sinfo; launch/slurm.py resolve_cpus_per_task), on a CPU-only job 1.
    cpus_per_task: int = 0
    mem: str = ""  # per node, SLURM syntax (64G, 500M); "" = the partition's default
    time: str = "4:00:00"  # wall-clock limit: MM, HH:MM:SS, D-HH:MM, ...
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""  # nodes to avoid, SLURM node-list syntax
    job_name: str = "catdog"
    array_parallelism: int = 256  # sweep points running at once
    # Preemption / time limit: SLURM sends USR2 this many seconds before the kill; submitit then calls
    # the callable's checkpoint() and requeues the job (submitit's slurm_signal_delay_s).
    signal_delay_s: int = 120
    # Requeues after a time-out before giving up (submitit's slurm_max_num_timeout). Preemptions don't count.
    max_num_timeout: int = 3
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, conda activate)

    def __post_init__(self) -> None:
        for name in ("nodes", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ConfigError(f"slurm.{name}={getattr(self, name)} must be >= 1")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s", "max_num_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"slurm.{name}={getattr(self, name)} must be >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(
                f"slurm.tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: the launcher "
                "runs one task (rank) per GPU; leave tasks_per_node at 0"
            )
        if self.signal_delay_s >= self.time_minutes() * 60:
            raise ConfigError(
                f"slurm.signal_delay_s={self.signal_delay_s} is not shorter than slurm.time={self.time!r}: "
                "the requeue signal would come before the job starts training"
            )
        self.mem_mb()

    def ntasks_per_node(self) -> int:
        """Ranks per node: one per GPU, or tasks_per_node CPU ranks on a CPU-only job."""
        if self.gpus_per_node:
            return self.gpus_per_node
        return self.tasks_per_node or 1

    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node()

    def time_minutes(self) -> int:
        """The time limit in whole minutes (submitit's unit), rounded up."""
        return parse_time_minutes(self.time)

    def mem_mb(self) -> int | None:
        """Requested memory per node in MB, or None for the partition default."""
        if not self.mem:
            return None
        m = _MEM.match(self.mem.strip())
        if not m:
            raise ConfigError(f"slurm.mem={self.mem!r} is not a SLURM memory size (e.g. 64G, 500M)")
        scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[m["u"].upper()]
        return math.ceil(int(m["n"]) * scale)


def parse_time_minutes(text: str) -> int:
    """SLURM time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> minutes, rounded up."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ConfigError(f"slurm.time={text!r} is not a SLURM time (e.g. 30, 4:00:00, 1-12:00:00)")
    d, a, b, c = (int(m[k]) if m[k] is not None else None for k in ("d", "a", "b", "c"))
    if d is None:
        # MM | MM:SS | HH:MM:SS
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:
        # D-HH | D-HH:MM | D-HH:MM:SS
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ConfigError(f"slurm.time={text!r} must be positive")
    return math.ceil(seconds / 60)


def load_slurm_config(path: str | os.PathLike | None = None, values: Mapping[str, Any] | None = None) -> SlurmConfig:
    """Merge defaults <- YAML file <- explicit values (command-line flags that were given)."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"SLURM config file {path} does not exist; see configs/slurm/ for examples")
    node = OmegaConf.structured(SlurmConfig)
    where = "defaults"
    try:
        if path is not None:
            where = str(path)
            loaded = OmegaConf.load(path)
            if isinstance(loaded, DictConfig):
                strings_as_written(loaded, Path(path), SlurmConfig)  # time: 4:00:00 is not 14400 minutes
            node = OmegaConf.merge(node, loaded)
        if values:
            where = "command line"
            node = OmegaConf.merge(node, OmegaConf.create(dict(values)))
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: bad SLURM setting {key!r}: {first_line}") from e
    except (ValueError, TypeError) as e:  # __post_init__ checks (ConfigError is a ValueError), YAML errors
        raise ConfigError(f"{where}: {e}") from e
    assert isinstance(cfg, SlurmConfig)
    return cfg
