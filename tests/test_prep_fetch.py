"""data_prep.fetch: the content checksum of the real photos, a tampered copy, a local 'download', offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from data_prep import fetch


def test_real_photos_match_the_published_checksum(real_data: Path):
    digest, n = fetch.content_checksum(real_data)
    assert (digest, n) == (fetch.CONTENT_SHA256, fetch.NUM_FILES)
    fetch.verify(real_data)


def test_tampered_or_incomplete_copy_fails(real_data: Path, tmp_path: Path):
    copy = Path(shutil.copytree(real_data, tmp_path / "copy"))
    victim = copy / "train" / "cat" / "cat.0.jpg"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with pytest.raises(fetch.FetchError, match="do not match"):
        fetch.verify(copy)
    victim.unlink()
    with pytest.raises(fetch.FetchError, match="2999 files"):
        fetch.verify(copy)


@pytest.mark.slow
def test_fetch_downloads_extracts_and_verifies(real_data: Path, tmp_path: Path):
    # A file:// URL stands in for the web server (no network here); the rest is the real code path.
    archive = tmp_path / "served.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(real_data.rglob("*.jpg")):
            rel = p.relative_to(real_data)
            z.write(p, f"cats_and_dogs_filtered/{rel.parts[0].replace('val', 'validation')}/{'/'.join(rel.parts[1:])}")
    root = tmp_path / "cache"
    got = fetch.fetch(root, url=archive.as_uri())
    assert got == root / "cats_and_dogs_filtered" and (got / "validation" / "dog").is_dir()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp files left
    assert fetch.fetch(root, url="http://127.0.0.1:9/never-used") == got  # cached: no second download


def test_offline_says_to_set_data_dir(tmp_path: Path, port: int):
    with pytest.raises(fetch.FetchError, match="set DATA_DIR"):
        fetch.fetch(tmp_path / "cache", url=f"http://127.0.0.1:{port}/cats_and_dogs_filtered.zip")
    assert not list((tmp_path / "cache").iterdir())  # no partial archive left behind


def test_make_test_finds_the_downloaded_photos_in_the_tests_layout(real_data: Path, tmp_path: Path):
    """`make test` without CATDOG_REAL_DATA uses make demo's verified download (train/cats, validation/cats),
    seen through a view of hard links in the tests' layout (train/cat, val/cat): the same 3,000 photos."""
    download = tmp_path / "xdg" / "catdog" / fetch.NAME
    for ours, theirs in fetch.SPLIT_LAYOUT.items():
        (download / theirs).mkdir(parents=True)
        for photo in (real_data / ours).glob("*.jpg"):
            os.link(photo, download / theirs / photo.name)
    env = {k: v for k, v in os.environ.items() if k != "CATDOG_REAL_DATA"} | {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    script = Path(__file__).with_name("real_photos.py")
    for _ in range(2):  # made once, then found
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        view = Path(out.stdout.strip())
        assert view == tmp_path / "xdg" / "catdog" / fetch.VIEW_NAME
    assert fetch.content_checksum(view) == (fetch.CONTENT_SHA256, fetch.NUM_FILES)
    one = view / "val" / "dog" / "dog.2000.jpg"
    assert one.stat().st_ino == (download / "validation" / "dogs" / "dog.2000.jpg").stat().st_ino  # no second copy
    bad = subprocess.run(
        [sys.executable, str(script)], env=env | {"CATDOG_REAL_DATA": str(tmp_path)}, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "CATDOG_REAL_DATA=" in bad.stderr
