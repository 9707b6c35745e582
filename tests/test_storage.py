"""The storage layer without a server: which strings are URLs, how they parse, and the local-path backend."""

from __future__ import annotations

import os

import pytest

from data_prep import storage
from data_prep.storage import Location, StorageError


@pytest.mark.parametrize(
    ("path", "scheme", "unsupported"),
    [
        ("s3://bucket/shards", "s3", None),
        ("S3://bucket/shards", "s3", None),
        ("https://host/data", "https", None),
        ("http://host:8080/data", "http", None),
        ("foo://bucket/x", "foo", "foo"),
        ("gs://bucket/x", "gs", "gs"),
        ("file:///tmp/x", "file", "file"),
        ("shards/cd", None, None),
        ("/abs/shards", None, None),
        ("s3:bucket", None, None),  # no "//": an (odd) relative path, as the filesystem would take it
        ("C:\\data\\shards", None, None),
        ("./s3://x", None, None),  # not at the start: a path
    ],
)
def test_which_strings_are_urls(path, scheme, unsupported):
    assert storage.url_scheme(path) == scheme
    assert storage.is_url(path) == (scheme is not None)
    assert storage.unsupported_scheme(path) == unsupported


def test_unsupported_scheme_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (
        lambda: storage.write_bytes("foo://bucket/x/_info.json", b"{}"),
        lambda: storage.read_bytes("foo://bucket/x/_info.json"),
        lambda: storage.list_dir("foo://bucket/x"),
    ):
        with pytest.raises(StorageError) as e:
            call()
        assert e.value.kind == storage.UNSUPPORTED
        assert str(e.value).startswith("foo://bucket/x") and "\n" not in str(e.value)
        assert "s3://" in str(e.value)  # says what would work
    assert list(tmp_path.iterdir()) == []  # no folder named "foo:"


def test_location_parse_and_join():
    loc = Location.parse("s3://bucket/data/shards/")
    assert (loc.scheme, loc.root, loc.key) == ("s3", "bucket", "data/shards/")
    child = loc.join("train-000000.tar")
    assert str(child) == "s3://bucket/data/shards/train-000000.tar"
    assert child.name == "train-000000.tar"
    assert str(Location.parse("s3://bucket").join("_info.json")) == "s3://bucket/_info.json"
    local = Location.parse("out/shards")
    assert local.is_local and str(local.join("_info.json")) == os.path.join("out", "shards", "_info.json")
    assert Location.parse(local) is local


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("s3:///key", "no bucket"),
        ("https:///x", "no host"),
        ("s3://bucket/x?versionId=1", "no ?query"),
        ("s3://AKIAEXAMPLEKEY:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@bucket/x", "credentials do not go"),
    ],
)
def test_bad_urls_are_named_without_credentials(url, says):
    with pytest.raises(StorageError) as e:
        storage.read_bytes(url)
    msg = str(e.value)
    assert says in msg and "\n" not in msg
    assert "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY" not in msg and "AKIAEXAMPLEKEY" not in msg


def test_web_urls_hide_their_password():
    loc = Location.parse("https://reader:hunter2secret@example.org/shards/_info.json")
    assert str(loc) == "https://example.org/shards/_info.json"


def test_web_urls_are_read_only_and_unlistable():
    for call in (
        lambda: storage.write_bytes("https://example.org/shards/_info.json", b"{}"),
        lambda: storage.upload(__file__, "https://example.org/shards/x"),
        lambda: storage.remove("https://example.org/shards/x"),
        lambda: storage.list_dir("https://example.org/shards"),
    ):
        with pytest.raises(StorageError) as e:
            call()
        assert e.value.kind == storage.UNSUPPORTED
        assert str(e.value).startswith("https://example.org/shards")


def test_local_paths_behave_like_objects(tmp_path):
    folder = tmp_path / "shards"
    data = bytes(range(256)) * 40
    storage.write_bytes(folder / "a.bin", data)  # creates the folder, as an upload to a new prefix would
    storage.write_bytes(str(folder / "b.bin"), b"x")
    (folder / "sub").mkdir()
    assert storage.read_bytes(folder / "a.bin") == data
    assert storage.read_range(folder / "a.bin", 100, 50) == data[100:150]
    assert storage.read_range(folder / "a.bin", len(data) - 3, 50) == data[-3:]  # short at the end, as pread
    assert storage.read_range(folder / "a.bin", len(data) + 10, 5) == b""
    assert storage.stat(folder / "a.bin").size == len(data)
    assert storage.list_dir(folder) == {"a.bin": len(data), "b.bin": 1}  # files only
    assert storage.list_dir(tmp_path / "nothing-here") == {}
    assert storage.exists(folder / "b.bin") and not storage.exists(folder / "c.bin")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    storage.download(folder / "a.bin", tmp_path / "copy" / "a.bin")
    storage.upload(tmp_path / "copy" / "a.bin", tmp_path / "up" / "a.bin")
    assert (tmp_path / "up" / "a.bin").read_bytes() == data
    storage.remove(folder / "b.bin")
    storage.remove(folder / "b.bin")  # already gone: fine
    assert storage.list_dir(folder) == {"a.bin": len(data)}


def test_missing_local_file_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "shards" / "_info.json"
    for call in (lambda: storage.read_bytes(missing), lambda: storage.stat(missing)):
        with pytest.raises(StorageError) as e:
            call()
        assert e.value.kind == storage.NOT_FOUND
        assert str(e.value).startswith(str(missing)) and "\n" not in str(e.value)
