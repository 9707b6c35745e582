"""The member index catdog-prep writes beside each shard: written, used by the reader, ignored when it does not match.

Real shards from real photos (catdog-prep), real files; the reads are counted by wrapping os.pread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prep_helpers import make_tree

import train.data.reader as data_mod
from data_prep.atomic import atomic_write_bytes
from data_prep.info import load_info
from data_prep.prepare import PrepArgs, run
from data_prep.shards import is_prep_output
from data_prep.tarformat import (
    END,
    PROBES,
    index_path,
    read_index,
    scan_members,
    tar_member,
    tarfile_members,
)
from train.data.reader import index_shard


@pytest.fixture(scope="module")
def prepped(real_data: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("index")
    src = make_tree(real_data, tmp / "src", 12, short_side=48)
    out = tmp / "out"
    run(PrepArgs(src=src, out=out, image_size=32, shard_max_count=5, workers=1, progress=False), log=lambda _: None)
    return out


def shards_of(out: Path) -> list[Path]:
    info = load_info(out)
    return [p for split in ("train", "val", "test") for p in info.shard_paths(split)]


def scanned(path: Path) -> list[tuple[str, int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan_members(fd, path.stat().st_size)
    finally:
        os.close(fd)


def counted_index(monkeypatch, path: Path):
    """index_shard(path) from a cold cache, and how many preads it made."""
    data_mod._INDEX_CACHE.clear()
    calls = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append(off) or real(fd, n, off))
    try:
        return index_shard(path), len(calls)
    finally:
        monkeypatch.setattr(os, "pread", real)


def copy_out(out: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in out.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_prep_writes_an_index_per_shard_that_equals_a_scan(prepped: Path):
    shards = shards_of(prepped)
    assert len(shards) >= 4
    info = json.loads((prepped / "_info.json").read_text())
    for shard in shards:
        idx = index_path(shard)
        assert idx.name == shard.name.removesuffix(".tar") + ".idx.json" and is_prep_output(idx.name)
        raw = json.loads(idx.read_text())
        assert raw["tar_bytes"] == shard.stat().st_size and raw["tar_sha256"] == info["shards"][shard.name]["sha256"]
        members = [tuple(m) for m in raw["members"]]
        assert members == scanned(shard) == tarfile_members(shard)  # same names, offsets and sizes as tarfile
        split = info["splits"][shard.name.split("-")[0]]
        assert len(members) == 3 * split["shard_lengths"][split["filenames"].index(shard.name)]  # jpg, cls, json


def test_the_reader_uses_the_index_and_reads_a_few_headers(monkeypatch, prepped: Path):
    for shard in shards_of(prepped):
        by_index, reads = counted_index(monkeypatch, shard)
        assert by_index.source == "index" and not by_index.error
        assert reads <= PROBES  # header probes only, instead of one per member
        index_path(shard).rename(shard.with_suffix(".moved"))
        try:
            by_scan, scan_reads = counted_index(monkeypatch, shard)
        finally:
            shard.with_suffix(".moved").rename(index_path(shard))
        assert by_scan.source == "scan" and scan_reads == 3 * len(by_scan.keys) + 1  # every header + the end block
        assert (by_index.keys, by_index.members) == (by_scan.keys, by_scan.members)


def test_a_stale_index_is_ignored_and_the_shard_scanned(prepped: Path, tmp_path: Path):
    out = copy_out(prepped, tmp_path / "copy")
    first, second, third = shards_of(out)[:3]
    # 1. the shard was replaced by other bytes of another size: the size check catches it
    first.write_bytes(second.read_bytes())
    # 2. same size, other member names (a shard rebuilt in place by other means): the header probes catch it
    data = third.read_bytes()
    renamed = b"".join(tar_member("x" + name[1:], data[o : o + size]) for name, o, size in scanned(third)) + END
    assert len(renamed) == third.stat().st_size
    atomic_write_bytes(third, renamed)
    data_mod._INDEX_CACHE.clear()
    for shard, expect in ((first, scanned(second)), (third, scanned(third))):
        fd = os.open(shard, os.O_RDONLY)
        assert read_index(shard, fd, shard.stat().st_size) is None
        os.close(fd)
        got = index_shard(shard)
        assert got.source == "scan" and not got.error
        assert list(got.keys) == list(dict.fromkeys(n.split(".")[0] for n, _, _ in expect))
    # 3. a truncated shard keeps its index file, but is read by the scan, which finds only what is left
    whole = len(scanned(second))
    second.write_bytes(second.read_bytes()[:-2000])
    cut = index_shard(second)
    assert cut.source == "scan" and sum(len(m) for m in cut.members.values()) < whole


def test_rerun_over_finished_output_restores_a_missing_index(prepped: Path, tmp_path: Path):
    out = copy_out(prepped, tmp_path / "copy")
    shard = shards_of(out)[1]
    before = index_path(shard).read_bytes()
    index_path(shard).unlink()  # e.g. shards from a catdog-prep that wrote none, or a deleted index
    src = Path(json.loads((out / "_info.json").read_text())["args"]["src"])
    lines = []
    summary = run(
        PrepArgs(src=src, out=out, image_size=32, shard_max_count=5, workers=1, progress=False), log=lines.append
    )
    assert summary["status"] == "up_to_date"
    assert "wrote the member index of 1 shard(s) that had none (or a stale one)" in lines
    assert index_path(shard).read_bytes() == before  # the same bytes the writer produced


def test_member_names_that_are_not_utf8_are_indexed(tmp_path: Path):
    """tarfile hands a latin-1 GNU long name over with lone surrogates; the numpy key table must take it back."""
    import io
    import tarfile

    path = tmp_path / "latin1.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for ext, data in (("jpg", b"\xff\xd8"), ("cls", b"1")):
            info = tarfile.TarInfo("caf\xe9_" + "x" * 120 + f".{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data_mod._INDEX_CACHE.clear()
    index = index_shard(path)
    assert not index.error and index.num_samples == 1 and index.key(0).startswith("caf\udce9_")
    assert index.span("cls", 0)[1] == 1 and index.span("json", 0) is None
