"""A peer reads our output: timm's WebDataset reader over shards that catdog-prep wrote from real photos.

timm (a dev dependency) reads ``_info.json`` itself (``timm/data/readers/reader_wds.py``): these tests fail if a
change to the shards or to ``_info.json`` breaks it, or if a new timm stops reading what we write.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import timm.data as timm_data  # a dev dependency (make setup installs it): missing = these tests fail, never skip
from PIL import Image
from prep_helpers import make_tree
from train_helpers import TINY, run_train

from data_prep.info import INFO_NAME, load_info
from data_prep.prepare import PrepArgs, run

SIZE = 64
# timm's default evaluation split name (create_dataset's default; train.py's --val-split default is the same).
TIMM_EVAL_SPLIT = inspect.signature(timm_data.create_dataset).parameters["split"].default


def _pixels(jpg: bytes | Image.Image) -> str:
    """Hash of the decoded RGB pixels: the same image whoever decoded it."""
    im = jpg if isinstance(jpg, Image.Image) else Image.open(io.BytesIO(jpg))
    return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def _expected(out: Path, split: str, src: Path) -> list[tuple[str, int]]:
    """(pixels, label) of every sample of ``split`` in file order, read with plain tarfile; the label is the
    class folder the photo came from in SRC (not the shard's .cls)."""
    raw = json.loads((out / INFO_NAME).read_text())
    classes = raw["classes"]
    samples: list[tuple[str, int]] = []
    for name in raw["splits"][split]["filenames"]:
        with tarfile.open(out / name) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for s in members.values():
            source = json.loads(s["json"])["source"]
            assert (src / source).is_file(), source
            samples.append((_pixels(s["jpg"]), classes.index(source.split("/")[0])))
    return samples


@pytest.fixture(scope="module")
def prepared(real_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    """16 cats + 16 dogs, a quarter each to val and test, at most 5 samples per shard (several shards per split)."""
    tmp = tmp_path_factory.mktemp("timm")
    src = make_tree(real_data, tmp / "src", 16, short_side=96)
    out = tmp / "catsdogs"
    fractions = dict(val_fraction=0.25, test_fraction=0.25)
    args = PrepArgs(src=src, out=out, image_size=SIZE, shard_max_count=5, workers=1, progress=False, **fractions)
    run(args, log=lambda _: None)
    return src, out


def test_info_lists_val_under_both_names_and_round_trips(prepared):
    _, out = prepared
    raw = json.loads((out / INFO_NAME).read_text())
    assert TIMM_EVAL_SPLIT in raw["splits"]  # timm's default evaluation split, whatever timm calls it
    assert sorted(raw["splits"]) == ["test", "train", "val", "validation"]
    assert {**raw["splits"]["validation"], "name": "val"} == raw["splits"]["val"]
    info = load_info(out)
    per_split = raw["counts"]["per_split"]
    for split in ("train", "val", "test"):
        assert info.split(split).num_samples == sum(per_split[split].values()) > 0
        assert len(info.split(split).filenames) >= 2
    assert info.split("validation").filenames == info.split("val").filenames
    assert sum(raw["splits"][s]["num_samples"] for s in ("train", "val", "test")) == raw["counts"]["written"] == 32


@pytest.mark.parametrize("split", [None, "val", "test"], ids=["timm-default", "val", "test"])
def test_timm_evaluation_reads_every_sample_in_order_with_its_label(prepared, split):
    src, out = prepared
    kw = {} if split is None else {"split": split}
    ds = timm_data.create_dataset("wds/catsdogs", root=str(out), **kw)
    name = split or TIMM_EVAL_SPLIT
    expected = _expected(out, name, src)
    assert len(ds) == len(expected) == load_info(out).split(name).num_samples
    got = [(_pixels(img), target) for img, target in ds]
    assert got == expected
    assert Counter(label for _, label in got) == {0: 4, 1: 4}  # stratified: a quarter of each class


def test_timm_training_split_and_loader_as_its_train_py_builds_them(prepared):
    src, out = prepared
    # train.py: create_dataset(..., split=--train-split, is_training=True, batch_size=...): shuffled shards/samples.
    train = timm_data.create_dataset("wds/catsdogs", root=str(out), split="train", is_training=True, batch_size=1)
    got = Counter((_pixels(img), target) for img, target in train)
    expected = _expected(out, "train", src)
    assert got == Counter(expected) and sum(got.values()) == 16
    # ... and the evaluation loader (train.py's --val-split default) through timm's transforms and collate.
    ds = timm_data.create_dataset("wds/catsdogs", root=str(out), split=TIMM_EVAL_SPLIT, batch_size=4)
    loader = timm_data.create_loader(
        ds, input_size=(3, SIZE, SIZE), batch_size=4, is_training=False, use_prefetcher=False, num_workers=0
    )
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(8 / 4)
    assert all(x.shape[1:] == (3, SIZE, SIZE) for x, _ in batches)
    assert [int(t) for _, y in batches for t in y] == [label for _, label in _expected(out, TIMM_EVAL_SPLIT, src)]


def test_empty_split_is_left_out_and_the_trainer_skips_test_scoring(real_data: Path, tmp_path: Path):
    src = make_tree(real_data, tmp_path / "src", 12, short_side=96)
    out = tmp_path / "shards"
    run(PrepArgs(src=src, out=out, image_size=SIZE, test_fraction=0, workers=1, progress=False), log=lambda _: None)
    raw = json.loads((out / INFO_NAME).read_text())
    assert "test" not in raw["splits"] and sum(raw["counts"]["per_split"]["test"].values()) == 0
    # timm says which splits there are, instead of failing inside webdataset on an empty shard list.
    with pytest.raises(RuntimeError, match="split test not found"):
        timm_data.create_dataset("wds/catsdogs", root=str(out), split="test")
    assert load_info(out).split("test").num_samples == 0  # to catdog: an empty split, as in older shards

    run_dir = tmp_path / "run"
    run_train([f"data.dir={out}", f"run.dir={run_dir}", *TINY, "train.epochs=1"])
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["val/samples"] == raw["splits"]["val"]["num_samples"] > 0
    assert not [k for k in final if k.startswith("test/")]  # no test split: scoring skipped, not failed


def test_rerun_over_older_output_updates_only_the_split_list(real_data: Path, tmp_path: Path):
    src = make_tree(real_data, tmp_path / "src", 12, short_side=96)
    out = tmp_path / "shards"
    args = PrepArgs(src=src, out=out, image_size=SIZE, test_fraction=0, workers=1, progress=False)
    run(args, log=lambda _: None)
    current = json.loads((out / INFO_NAME).read_text())
    # The _info.json of an earlier catdog-prep: no "validation", the empty test split listed.
    old = {**current, "splits": {k: v for k, v in current["splits"].items() if k != "validation"}}
    old["splits"]["test"] = {"name": "test", "num_samples": 0, "filenames": [], "shard_lengths": []}
    (out / INFO_NAME).write_text(json.dumps(old))
    assert load_info(out).split("test").num_samples == 0  # catdog reads the old format as it always did
    shards = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}

    logs: list[str] = []
    assert run(args, log=logs.append)["status"] == "up_to_date"
    assert json.loads((out / INFO_NAME).read_text()) == current
    assert any("updated the split list" in line for line in logs), logs
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")} == shards
    assert len(timm_data.create_dataset("wds/catsdogs", root=str(out))) == current["splits"]["val"]["num_samples"]

    before = (out / INFO_NAME).stat().st_mtime_ns
    logs.clear()
    run(args, log=logs.append)  # now current: nothing to do, nothing written
    assert any("nothing to do" in line for line in logs) and (out / INFO_NAME).stat().st_mtime_ns == before
