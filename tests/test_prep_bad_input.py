"""Bad input never stops a run: each kind is skipped with its reason and the summary reconciles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from prep_helpers import as_unprivileged, make_tree, read_shards, real_photos, run_cli, skipped_by_path, small_jpeg

from data_prep.prepare import PrepArgs, run


def test_every_kind_of_bad_file_is_skipped_with_its_reason(real_data: Path, tmp_path: Path):
    src = make_tree(real_data, tmp_path / "src", 6)  # 6 cats + 6 dogs, all good
    cat, dog = src / "cat", src / "dog"
    photo = real_photos(real_data, "train", "cat", 20)[-1]
    (cat / "empty.jpg").write_bytes(b"")
    original = photo.read_bytes()
    (cat / "truncated.jpg").write_bytes(original[: len(original) // 3])
    (dog / "notes.jpg").write_text("these are my notes, not a photo\n")
    (cat / "folder.jpg").mkdir()
    (cat / "folder.jpg" / "inside.jpg").write_bytes(small_jpeg(photo))  # a good photo inside it still counts
    os.mkfifo(dog / "pipe.jpg")  # opening it would block forever: must not hang the run
    (cat / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    Image.new("1", (12_000, 12_000)).save(dog / "bomb.png")  # 144 Mpx, a few KB on disk
    Image.open(photo).resize((20, 15)).save(cat / "tiny.jpg")
    (dog / "copy-of-cat.jpg").write_bytes((cat / "cat.0.jpg").read_bytes())
    locked = cat / "locked.jpg"
    locked.write_bytes(small_jpeg(real_photos(real_data, "train", "cat", 21)[-1]))
    locked.chmod(0)
    (src / "README.txt").write_text("not an image extension: ignored\n")

    out = tmp_path / "out"
    r = run_cli(src, out, "--image-size", "64", "--workers", "2", prefix=as_unprivileged())
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr

    skipped = skipped_by_path(out)
    reasons = {path: rec["reason"] for path, rec in skipped.items()}
    assert reasons == {
        "cat/empty.jpg": "empty",
        "cat/truncated.jpg": "truncated",
        "dog/notes.jpg": "not_an_image",
        "cat/folder.jpg": "not_a_file",
        "dog/pipe.jpg": "not_a_file",
        "cat/dangling.jpg": "broken_symlink",
        "dog/bomb.png": "too_large",
        "cat/tiny.jpg": "too_small",
        "dog/copy-of-cat.jpg": "duplicate",
        "cat/locked.jpg": "unreadable",
    }
    assert skipped["dog/copy-of-cat.jpg"]["duplicate_of"] == "cat/cat.0.jpg"
    assert "Permission denied" in skipped["cat/locked.jpg"]["detail"]
    assert "--max-pixels" in skipped["dog/bomb.png"]["detail"]

    info = json.loads((out / "_info.json").read_text())
    c = info["counts"]
    assert (c["found"], c["written"], c["duplicates"], c["skipped"]) == (23, 13, 1, 9)
    assert c["found"] == c["written"] + c["duplicates"] + c["skipped"]
    assert c["skipped_by_reason"]["not_a_file"] == 2 and c["ignored_non_images"] == 1
    sources = {s["json"]["source"] for s in read_shards(out).values()}
    assert len(sources) == 13 and "cat/folder.jpg/inside.jpg" in sources
    assert "found 23 = written 13 + duplicates 1" in r.stdout and "skipped truncated: 1" in r.stdout


def test_duplicate_across_given_splits_is_leakage_kept_in_eval_split(real_data: Path, tmp_path: Path):
    src = make_tree(real_data, tmp_path / "src", 8, layout="presplit")
    leaked = src / "train" / "dog" / "dog.1.jpg"
    (src / "val" / "dog" / "leaked.jpg").write_bytes(leaked.read_bytes())
    (src / "train" / "dog" / "again.jpg").write_bytes(leaked.read_bytes())  # plain duplicate too
    out = tmp_path / "out"
    summary = run(PrepArgs(src=src, out=out, image_size=48, workers=1, progress=False), log=lambda _: None)
    skipped = skipped_by_path(out)
    assert skipped["train/dog/dog.1.jpg"]["leakage"] is True
    assert skipped["train/dog/dog.1.jpg"]["duplicate_of"] == "val/dog/leaked.jpg"
    assert skipped["train/dog/again.jpg"]["duplicate_of"] == "val/dog/leaked.jpg"
    assert summary["counts"]["duplicates"] == 2 and summary["counts"]["leakage"] == 2
    by_source = {s["json"]["source"]: s["split"] for s in read_shards(out).values()}
    assert by_source["val/dog/leaked.jpg"] == "val"
    assert "train/dog/dog.1.jpg" not in by_source and "train/dog/again.jpg" not in by_source


def test_root_without_setpriv_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no setpriv to be found
    if os.geteuid() != 0:
        monkeypatch.setattr(os, "geteuid", lambda: 0)  # stands in for root, which this user cannot be
    outcomes = []
    for ci in ("1", ""):
        monkeypatch.setenv("CATDOG_REQUIRE_REAL_DATA", ci)
        with pytest.raises(BaseException, match="without setpriv") as e:  # a skip or a failure, caught here
            as_unprivileged()
        outcomes.append(e.type)
    assert outcomes == [pytest.fail.Exception, pytest.skip.Exception]
