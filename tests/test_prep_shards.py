"""The hand-built tar headers are exactly what tarfile writes, so every tar reader accepts the shards."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_prep.tarformat import tar_member, ustar_header


@pytest.mark.parametrize(
    "name,size", [("a.jpg", 0), ("train_cat_0123456789abcdef.json", 12_345), ("x" * 100, 2**33 - 1)]
)
def test_header_equals_tarfile(name: str, size: int):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_members_read_back_with_tarfile():
    blob = tar_member("k_1.jpg", b"\xff\xd8jpeg") + tar_member("k_1.cls", b"1") + b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        got = {m.name: (tar.extractfile(m).read(), m.mode, m.mtime, m.uid) for m in tar.getmembers()}
    assert got == {"k_1.jpg": (b"\xff\xd8jpeg", 0o644, 0, 0), "k_1.cls": (b"1", 0o644, 0, 0)}


def test_member_name_over_100_bytes_is_refused():
    with pytest.raises(ValueError, match="longer than 100"):
        tar_member("k" * 97 + ".json", b"{}")
