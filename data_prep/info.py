"""The ``_info.json`` that describes a folder of shards; shared by data_prep (writer) and train (reader).

Format (the one timm's WebDataset reader reads, plus our own fields)::

    {"name": "catdog", "tool": "catdog-prep", "version": "0.1.0", "classes": ["cat", "dog"],
     "splits": {"train": {"name": "train", "num_samples": 1800,
                          "filenames": ["train-000000.tar", ...], "shard_lengths": [1000, 800]},
                "val": {"name": "val", ...}, "validation": {"name": "validation", <the same shards as val>},
                "test": {...}},
     "args": {...}, "counts": {...}}

``val`` is also listed as ``validation`` (the same shards): timm looks its default evaluation split,
``validation``, up in ``splits`` by exact name, while catdog's trainer (``data.val_split``) and older shards use
``val``. So summing ``num_samples`` over ``splits`` counts the val shards twice; ``counts.per_split`` has each
split once. A split with no samples is left out of ``splits``: timm fails on an empty one (IndexError from
webdataset for evaluation, "num_samples not specified" for training). ``load_info`` gives catdog-prep's missing
splits back as empty ones, so the trainer sees every name in ``SPLITS`` exactly as with older shards, which list
empty splits with ``num_samples: 0``.
Inside a shard each sample is ``<key>.jpg`` (RGB JPEG), ``<key>.cls`` (class index as ASCII) and
``<key>.json`` (class name, source path, original size, sha256 of the source). Keys use only
``[A-Za-z0-9_-]`` -- no dots, because WebDataset splits a member name at its first dot.

A shard folder is a local path or a URL (``s3://bucket/prefix``, ``https://host/prefix``): ``DatasetInfo.root`` is
then a ``storage.Location``, which joins names with ``/`` as a ``Path`` does (``Path("s3://b/x")`` would collapse
the ``//``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep import storage
from data_prep.storage import BadURL, Location, StorageError

INFO_NAME = "_info.json"
SPLITS = ("train", "val", "test")
# Extra names under which a split is listed in _info.json: timm's default evaluation split is "validation"
# (timm.data.create_dataset's split default and train.py's --val-split), matched exactly, with no synonyms.
SPLIT_ALIASES = {"val": ("validation",)}


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
    root: Path | Location  # a local folder, or the URL of one in object storage (see shard_root)
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    raw: dict  # the whole JSON, for fields this dataclass does not model (args, counts, version)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def distinct_splits(self) -> dict[str, SplitInfo]:
        """``splits`` without the SPLIT_ALIASES entries (the same shards under a second name): each sample once."""
        aliases = {alias for name, names in SPLIT_ALIASES.items() if name in self.splits for alias in names}
        return {name: s for name, s in self.splits.items() if name not in aliases}

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise InfoError(f"{self.root / INFO_NAME} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, Location)

    def shard_paths(self, name: str) -> list[Path | Location]:
        return [self.root / f for f in self.split(name).filenames]


def splits_json(shards: list[dict]) -> dict[str, dict]:
    """The ``splits`` of _info.json from the written shards (dicts with ``split``, ``file``, ``count``), in order.

    Splits with no samples are left out, and each split is also listed under its SPLIT_ALIASES (see the module
    docstring for why).
    """
    out: dict[str, dict] = {}
    for split in SPLITS:
        mine = [s for s in shards if s["split"] == split]
        if not mine:
            continue
        for name in (split, *SPLIT_ALIASES.get(split, ())):
            out[name] = SplitInfo(
                name=name,
                num_samples=sum(s["count"] for s in mine),
                filenames=tuple(s["file"] for s in mine),
                shard_lengths=tuple(s["count"] for s in mine),
            ).to_json()
    return out


def shard_root(root: str | os.PathLike | Location) -> Path | Location:
    """A shard folder as given: a ``Path``, or a ``Location`` for a URL (InfoError, one line, for a URL that
    storage cannot open, e.g. ``foo://x``: never a local folder named ``foo:``)."""
    if isinstance(root, Location):
        return root.path if root.is_local else root
    if storage.is_url(root):
        try:
            return Location.parse(root)
        except BadURL as e:
            raise InfoError(str(e)) from None
    return Path(root)


def _read_text(path: Path | Location) -> str:
    if isinstance(path, Path):
        if not path.is_file():
            raise InfoError(
                f"{path} not found: point data.dir at a folder written by catdog-prep (or rerun catdog-prep)"
            )
        return path.read_text()
    try:
        return storage.read_bytes(path).decode()
    except StorageError as e:
        if e.kind == storage.NOT_FOUND:
            raise InfoError(
                f"{e} (a shard folder holds the {INFO_NAME} catdog-prep writes, and uploads last: without it the "
                "folder is not one, or its upload has not finished)"
            ) from None
        raise InfoError(str(e)) from None
    except UnicodeDecodeError as e:
        raise InfoError(f"{path} is not a valid catdog _info.json ({e}); rerun catdog-prep") from None


def load_info(root: str | os.PathLike | Location) -> DatasetInfo:
    """Read and validate ``root/_info.json`` (``root`` a folder or a URL); errors name the file and what to do."""
    root = shard_root(root)
    path = root / INFO_NAME
    text = _read_text(path)
    try:
        raw = json.loads(text)
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
        if raw.get("tool") == "catdog-prep":
            # catdog-prep leaves empty splits out (see above); to the trainer they are empty, as they always were:
            # no training samples is the trainer's own clear error, and an empty test split is skipped.
            for name in SPLITS:
                splits.setdefault(name, SplitInfo(name, 0, (), ()))
    except InfoError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InfoError(f"{path} is not a valid catdog _info.json ({type(e).__name__}: {e}); rerun catdog-prep") from e
    return DatasetInfo(root=root, classes=classes, splits=splits, raw=raw)


def check_reachable(root: str | os.PathLike | Location, splits: list[str]) -> DatasetInfo:
    """Before a job is submitted: ``root``'s _info.json reads, names ``splits``, and the first shard of each is there
    (one HEAD each at a URL: a key allowed to read _info.json but not the shards fails now, not in the job).
    InfoError, one line naming the URL and what to fix, otherwise."""
    info = load_info(root)
    for split in dict.fromkeys(splits):
        names = info.split(split).filenames
        if names:
            try:
                storage.stat(info.root / names[0])
            except StorageError as e:
                raise InfoError(str(e)) from None
    return info


def check_train_split(info: DatasetInfo, split: str) -> None:
    """A missing or empty train split is bad input, named with the file to fix, not a traceback from the loader."""
    if info.split(split).num_samples == 0:  # split() raises InfoError naming _info.json when it is absent
        raise InfoError(
            f"{info.root / INFO_NAME}: split {split!r} has no samples, so there is nothing to train on; point "
            "data.dir at shards with training samples (catdog-prep) or set data.train_split"
        )
