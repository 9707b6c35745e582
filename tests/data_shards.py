"""Small real shards for the data tests: real photos resized to 64 px, written with webdataset.TarWriter.

Shared by tests/test_data.py and tests/test_data_dist.py (and its rank script), so the layout is defined once.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from data_prep.info import INFO_NAME, SPLITS, SplitInfo

CLASSES = ("cat", "dog")
# Odd numbers of uneven shards, including a 1-sample shard: the shapes that break naive DDP splits.
SHARD_LENGTHS = {"train": [7, 3, 11, 5, 1], "val": [5, 2, 4]}


def tiny_jpegs(real_data: Path, count: int, size: int = 64) -> list[tuple[bytes, int, str]]:
    """(JPEG bytes, class index, source name) for ``count`` real photos, alternating cat/dog."""
    out = []
    for i in range(count):
        cls = i % 2
        src = real_data / "train" / CLASSES[cls] / f"{CLASSES[cls]}.{i // 2}.jpg"
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((size * 2, size))  # short side ~size, aspect kept (crops must handle non-square)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), cls, src.name))
    return out


def write_shards(
    root: Path, photos: list[tuple[bytes, int, str]], lengths: dict[str, list[int]] = SHARD_LENGTHS
) -> dict:
    """Write ``{split}-{i:06d}.tar`` shards plus _info.json under root; returns {split: [keys in order]}."""
    root.mkdir(parents=True, exist_ok=True)
    it = iter(photos)
    splits, keys = {}, {}
    for split in SPLITS:
        names, split_keys = [], []
        for i, n in enumerate(lengths.get(split, [])):
            name = f"{split}-{i:06d}.tar"
            with wds.TarWriter(str(root / name)) as sink:
                for j in range(n):
                    jpg, cls, src = next(it)
                    key = f"{split}_{i:02d}_{j:03d}"
                    sink.write(
                        {
                            "__key__": key,
                            "jpg": jpg,
                            "cls": str(cls).encode(),
                            "json": json.dumps({"src": src}).encode(),
                        }
                    )
                    split_keys.append(key)
            names.append(name)
        splits[split] = SplitInfo(split, sum(lengths.get(split, [])), tuple(names), tuple(lengths.get(split, [])))
        keys[split] = split_keys
    info = {"name": "catdog-test", "classes": list(CLASSES), "splits": {k: v.to_json() for k, v in splits.items()}}
    (root / INFO_NAME).write_text(json.dumps(info))
    return keys


def rewrite_member(shard: Path, key: str, ext: str, data: bytes | None) -> None:
    """Replace (or with data=None drop) one member of a shard, keeping every other member as it was."""
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as sink:
        for s in samples:
            if s["__key__"] == key:
                if data is None:
                    s.pop(ext)
                else:
                    s[ext] = data
            sink.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
