"""The real command line: layouts it detects and prints, and one clear error line for each bad invocation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prep_helpers import as_unprivileged, make_tree, read_shards, run_cli, small_jpeg

from data_prep.__main__ import parse_size
from data_prep.errors import PrepError
from data_prep.info import load_info
from data_prep.prepare import PrepArgs, run
from data_prep.scan import scan


def _assert_one_error_line(r, *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("catdog-prep: error:") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def tiny_tree(real_data: Path, tmp_path: Path) -> Path:
    return make_tree(real_data, tmp_path / "src", 3, short_side=48)


def test_missing_src(tmp_path: Path):
    _assert_one_error_line(run_cli(tmp_path / "nope", tmp_path / "out"), "does not exist")


def test_src_without_images(tmp_path: Path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "notes.txt").write_text("hi")
    _assert_one_error_line(run_cli(tmp_path / "src", tmp_path / "out"), "no images")


def test_single_class(real_data: Path, tmp_path: Path, tiny_tree: Path):
    for p in (tiny_tree / "dog").iterdir():
        p.unlink()
    (tiny_tree / "dog").rmdir()
    _assert_one_error_line(run_cli(tiny_tree, tmp_path / "out"), "only class 'cat'", "at least 2 classes")


def test_out_is_a_file(tmp_path: Path, tiny_tree: Path):
    (tmp_path / "out").write_text("I am a file")
    _assert_one_error_line(run_cli(tiny_tree, tmp_path / "out"), "is a file")


def test_out_that_cannot_be_created_or_written(tmp_path: Path, tiny_tree: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where OUT's parent folder should be")
    r = run_cli(tiny_tree, blocker / "out")
    _assert_one_error_line(r, f"cannot create OUT {blocker / 'out'}", "Not a directory")
    assert r.returncode == 2

    locked = tmp_path / "locked"
    (locked / "existing").mkdir(parents=True)
    (locked / "sealed").mkdir()
    for path, mode in ((locked / "existing", 0o555), (locked / "sealed", 0o000), (locked, 0o555)):
        path.chmod(mode)
    try:
        prefix = as_unprivileged()
        cases = {
            "new": ("cannot create OUT", "Permission denied"),  # the parent is read-only
            "existing": ("cannot write to OUT", "Permission denied"),
            "sealed": ("cannot open OUT", "Permission denied"),
        }
        for name, needles in cases.items():
            r = run_cli(tiny_tree, locked / name, prefix=prefix)
            _assert_one_error_line(r, str(locked / name), *needles)
            assert r.returncode == 2
    finally:
        for path in (locked, locked / "existing", locked / "sealed"):
            path.chmod(0o755)
    assert not list((locked / "existing").iterdir())  # the write check left nothing behind


def test_info_json_that_is_not_an_object_is_a_clear_error(tmp_path: Path, tiny_tree: Path):
    out = tmp_path / "out"
    out.mkdir()
    kw = dict(src=tiny_tree, out=out, image_size=32, workers=1, progress=False)
    for text in ("[1, 2]\n", '{"args": {}, "source": "elsewhere", "shards": [], "counts": {}}\n'):
        (out / "_info.json").write_text(text)
        with pytest.raises(PrepError) as e:
            run(PrepArgs(**kw), log=lambda _: None)
        assert str(out / "_info.json") in str(e.value) and "--force" in str(e.value)
    assert run(PrepArgs(force=True, **kw), log=lambda _: None)["status"] == "written"
    assert load_info(out).split("train").num_samples > 0


def test_no_usable_image(tmp_path: Path):
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        (tmp_path / "src" / cls / "a.jpg").write_bytes(b"")
        (tmp_path / "src" / cls / "b.png").write_text(f"not a png, a {cls}")
    r = run_cli(tmp_path / "src", tmp_path / "out")
    _assert_one_error_line(r, "no usable image", "skipped.jsonl")
    assert not (tmp_path / "out" / "_info.json").exists()
    assert len((tmp_path / "out" / "skipped.jsonl").read_text().splitlines()) == 4


def test_bad_option_values(tmp_path: Path, tiny_tree: Path):
    r = run_cli(tiny_tree, tmp_path / "out", "--val-fraction", "0.6", "--test-fraction", "0.5")
    _assert_one_error_line(r, "--val-fraction + --test-fraction must be < 1")
    r = run_cli(tiny_tree, tmp_path / "out", "--shard-max-size", "lots")
    assert r.returncode == 2 and "not a size: 'lots'" in r.stderr


def test_out_made_with_other_arguments_is_refused_unless_force(tmp_path: Path, tiny_tree: Path):
    out = tmp_path / "out"
    assert run_cli(tiny_tree, out, "--image-size", "32").returncode == 0
    r = run_cli(tiny_tree, out, "--image-size", "40")
    _assert_one_error_line(r, "other arguments", "image_size: 32 -> 40", "--force")
    assert json.loads((out / "_info.json").read_text())["args"]["image_size"] == 32  # untouched
    r = run_cli(tiny_tree, out, "--image-size", "40", "--force")
    assert r.returncode == 0, r.stderr
    assert {min(s["json"]["size"]) for s in read_shards(out).values()} == {40}
    r = run_cli(tiny_tree, out, "--image-size", "40", "--workers", "1")  # workers do not change the output
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_out_with_foreign_files_is_refused_unless_force(tmp_path: Path, tiny_tree: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    _assert_one_error_line(run_cli(tiny_tree, out), "not empty", "thesis.tex")
    assert run_cli(tiny_tree, out, "--force").returncode == 0
    assert (out / "thesis.tex").read_text() == "precious"  # --force replaces only catdog-prep's files
    assert (out / "_info.json").is_file()


def test_layouts_are_detected_printed_and_forceable(real_data: Path, tmp_path: Path):
    flat = make_tree(real_data, tmp_path / "flat", 3, layout="flat", short_side=48)
    (flat / "noprefix.jpg").write_bytes((flat / "cat.0.jpg").read_bytes()[:-2] + b"\xff\xd9")
    s, how = scan(flat)
    assert s.layout == "flat" and s.classes == ("cat", "dog") and "Kaggle flat" in how
    assert {c.rel: c.problem[0] for c in s.candidates if c.problem} == {"noprefix.jpg": "no_label"}

    pre = tmp_path / "pre"
    for split in ("train", "validation", "test"):
        for cls in ("cat", "dog"):
            (pre / split / cls).mkdir(parents=True)
            (pre / split / cls / f"{split}.jpg").write_bytes(small_jpeg(next((real_data / "train" / cls).iterdir())))
    s, _ = scan(pre)
    assert s.layout == "presplit" and {c.split for c in s.candidates} == {"train", "val", "test"}

    folders = make_tree(real_data, tmp_path / "folders", 3, short_side=48)
    (folders / "loose.jpg").write_bytes((folders / "cat" / "cat.0.jpg").read_bytes())
    s, _ = scan(folders)
    assert s.layout == "folders" and [c.rel for c in s.candidates if c.problem] == ["loose.jpg"]
    s, how = scan(folders, "flat")  # forced: labels come from the file names instead
    assert s.layout == "flat" and "forced" in how and s.classes == ("cat", "dog")

    r = run_cli(flat, tmp_path / "out", "--image-size", "32")
    assert r.returncode == 0, r.stderr
    assert "layout: detected Kaggle flat" in r.stdout
    assert "skipped no_label: 1" in r.stdout


def test_kaggle_split_folder_of_flat_named_files(real_data: Path, tmp_path: Path):
    src = make_tree(real_data, tmp_path / "kaggle", 4, layout="presplit-flat", short_side=48)
    (src / "test1").mkdir()  # Kaggle's unlabelled test folder: not a split name, its files are skipped
    (src / "test1" / "1.jpg").write_bytes((src / "train" / "cat.1.jpg").read_bytes()[:-2] + b"\xff\xd9")
    s, how = scan(src)
    assert s.layout == "presplit-flat" and s.classes == ("cat", "dog") and "pre-split Kaggle flat" in how
    # Label from the file name's prefix, split from the folder it sits in.
    labelled = [p for p in src.glob("*/*.jpg") if p.parent.name != "test1"]
    expected = {p.relative_to(src).as_posix(): (p.name.split(".")[0], p.parent.name) for p in labelled}
    assert len(expected) == 8 and {split for _, split in expected.values()} == {"train", "val"}
    assert {c.rel: (c.label, c.split) for c in s.candidates if c.problem is None} == expected
    assert {c.rel for c in s.candidates if c.problem} == {"test1/1.jpg"}

    r = run_cli(src, tmp_path / "out", "--image-size", "32")
    assert r.returncode == 0, r.stderr
    assert "layout: detected pre-split Kaggle flat" in r.stdout and "splits: kept as the folders give them" in r.stdout
    samples = read_shards(tmp_path / "out")
    assert {x["json"]["source"]: (x["json"]["class"], x["split"]) for x in samples.values()} == expected
    assert all(x["cls"] == ("cat", "dog").index(x["json"]["class"]) for x in samples.values())

    # Class folders inside split folders stay the plain pre-split layout: a stray flat-named file is not a class.
    pre = make_tree(real_data, tmp_path / "pre", 3, layout="presplit", short_side=48)
    (pre / "train" / "IMG.0001.jpg").write_bytes((pre / "train" / "cat" / "cat.1.jpg").read_bytes())
    s, _ = scan(pre)
    assert s.layout == "presplit" and s.classes == ("cat", "dog")
    assert {c.rel: c.problem[0] for c in s.candidates if c.problem} == {"train/IMG.0001.jpg": "no_label"}


def test_shard_size_and_count_limits(tiny_tree: Path, tmp_path: Path):
    assert (parse_size("256MB"), parse_size("1GiB"), parse_size("20kb"), parse_size("0")) == (256e6, 2**30, 20e3, 0)
    kw = dict(src=tiny_tree, image_size=48, workers=1, progress=False, val_fraction=0, test_fraction=0)
    run(
        PrepArgs(out=tmp_path / "by_size", shard_max_size=parse_size("10KB"), shard_max_count=0, **kw),
        log=lambda _: None,
    )
    shards = sorted((tmp_path / "by_size").glob("train-*.tar"))
    assert len(shards) >= 2 and all(p.stat().st_size <= 10_000 for p in shards)
    run(PrepArgs(out=tmp_path / "by_count", shard_max_count=4, **kw), log=lambda _: None)
    assert load_info(tmp_path / "by_count").split("train").shard_lengths == (4, 2)


def test_only_one_class_left_after_skipping(tmp_path: Path, tiny_tree: Path):
    for p in (tiny_tree / "dog").iterdir():
        p.write_bytes(p.read_bytes()[:100])  # every dog photo truncated
    r = run_cli(tiny_tree, tmp_path / "out")
    _assert_one_error_line(r, "only class 'cat' has usable images", "skipped.jsonl")
    assert not (tmp_path / "out" / "_info.json").exists()
