"""The ``_info.json`` that describes a folder of shards; shared by data_prep (writer) and train (reader).

Format (the one timm's WebDataset reader reads, plus our own fields)::

    {"name": "catdog", "version": "0.1.0", "classes": ["cat", "dog"],
     "splits": {"train": {"name": "train", "num_samples": 1800,
                          "filenames": ["train-000000.tar", ...], "shard_lengths": [1000, 800]},
                "val": {...}, "test": {...}},
     "args": {...}, "counts": {...}}

Every split named in ``SPLITS`` is present; an empty split has ``num_samples: 0`` and no filenames.
Inside a shard each sample is ``<key>.jpg`` (RGB JPEG), ``<key>.cls`` (class index as ASCII) and
``<key>.json`` (class name, source path, original size, sha256 of the source). Keys use only
``[A-Za-z0-9_-]`` -- no dots, because WebDataset splits a member name at its first dot.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

INFO_NAME = "_info.json"
SPLITS = ("train", "val", "test")


class InfoError(ValueError):
    """_info.json is missing or malformed; the message names the file and what to do."""


@dataclass(frozen=True)
class SplitInfo:
    name: str
    num_samples: int
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "filenames": list(self.filenames),
            "shard_lengths": list(self.shard_lengths),
        }


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    raw: dict  # the whole JSON, for fields this dataclass does not model (args, counts, version)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise InfoError(f"{self.root / INFO_NAME} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_paths(self, name: str) -> list[Path]:
        return [self.root / f for f in self.split(name).filenames]


def load_info(root: str | os.PathLike) -> DatasetInfo:
    """Read and validate ``root/_info.json``; errors name the file and what to do."""
    root = Path(root)
    path = root / INFO_NAME
    if not path.is_file():
        raise InfoError(f"{path} not found: point data.dir at a folder written by catdog-prep (or rerun catdog-prep)")
    try:
        raw = json.loads(path.read_text())
        classes = tuple(str(c) for c in raw["classes"])
        splits = {}
        for name, s in raw["splits"].items():
            si = SplitInfo(
                name=str(s.get("name", name)),
                num_samples=int(s["num_samples"]),
                filenames=tuple(s["filenames"]),
                shard_lengths=tuple(int(n) for n in s["shard_lengths"]),
            )
            if len(si.filenames) != len(si.shard_lengths) or sum(si.shard_lengths) != si.num_samples:
                raise InfoError(f"{path}: split {name!r} filenames/shard_lengths/num_samples disagree")
            splits[name] = si
    except InfoError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InfoError(f"{path} is not a valid catdog _info.json ({type(e).__name__}: {e}); rerun catdog-prep") from e
    return DatasetInfo(root=root, classes=classes, splits=splits, raw=raw)
