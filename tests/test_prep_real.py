"""catdog-prep over all 3,000 real photos: original split kept, labels right, readable by webdataset and tarfile."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import webdataset as wds
from prep_helpers import read_shards

from data_prep.info import load_info
from data_prep.prepare import PrepArgs, run


def test_all_real_photos_land_in_shards_with_their_split_and_label(real_data: Path, tmp_path: Path):
    out = tmp_path / "shards"
    logs: list[str] = []
    summary = run(PrepArgs(src=real_data, out=out, workers=2, image_size=160, progress=False), log=logs.append)
    assert any("pre-split" in line for line in logs)  # the detected layout is printed

    info = load_info(out)
    assert info.classes == ("cat", "dog")
    assert info.split("train").num_samples == 2000
    assert info.split("val").num_samples == 1000
    assert info.split("test").num_samples == 0 and info.split("test").filenames == ()
    assert info.raw["counts"]["written"] == 3000 == summary["counts"]["found"]

    samples = read_shards(out)
    assert len(samples) == 3000
    # _info.json shard lengths match what is really in each tar.
    per_shard = Counter(s["shard"] for s in samples.values())
    for split in ("train", "val"):
        si = info.split(split)
        assert [per_shard[f] for f in si.filenames] == list(si.shard_lengths)
    sources = set()
    for key, s in samples.items():
        split_dir, cls_dir, _ = s["json"]["source"].split("/")
        assert s["split"] == split_dir  # the given split is kept (no re-splitting of pre-split data)
        assert info.classes[s["cls"]] == cls_dir == s["json"]["class"]
        assert key.startswith(f"{split_dir}_{cls_dir}_")
        assert min(s["json"]["size"]) == 160
        sources.add(s["json"]["source"])
    expected = {p.relative_to(real_data).as_posix() for p in real_data.rglob("*.jpg")}
    assert sources == expected

    # The same shards through webdataset, the way the trainer reads them.
    ds = wds.WebDataset([str(p) for p in info.shard_paths("val")], shardshuffle=False).decode("pil")
    n, labels = 0, Counter()
    for sample in ds:
        assert sample["jpg"].mode == "RGB" and min(sample["jpg"].size) == 160
        labels[int(sample["cls"])] += 1
        n += 1
    assert n == 1000 and labels == {0: 500, 1: 500}

    # A rerun over the finished output does nothing and says so.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs.clear()
    again = run(PrepArgs(src=real_data, out=out, workers=1, image_size=160, progress=False), log=logs.append)
    assert again["status"] == "up_to_date"
    assert any("nothing to do" in line for line in logs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert json.loads((out / "_info.json").read_text())["args"]["image_size"] == 160
