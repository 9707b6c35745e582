"""Helpers shared by the tests/test_prep_*.py files: small trees of real photos, running the CLI, reading shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def real_photos(real_data: Path, split: str, cls: str, n: int) -> list[Path]:
    """The first n real photos of one split/class, in a fixed order."""
    return sorted((real_data / split / cls).glob("*.jpg"), key=lambda p: int(p.stem.split(".")[1]))[:n]


def small_jpeg(src: Path, short_side: int = 96) -> bytes:
    """A real photo re-encoded smaller, so tests decode quickly."""
    with Image.open(src) as im:
        s = short_side / min(im.size)
        im = im.convert("RGB").resize((max(1, round(im.width * s)), max(1, round(im.height * s))))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()


def make_tree(real_data: Path, dest: Path, n: int, *, layout: str = "folders", short_side: int | None = 96) -> Path:
    """n cats and n dogs from the real photos in the given layout (folders | presplit | presplit-flat | flat).

    short_side=None copies the original bytes (slower to process: used where a run must take a while).
    """
    for cls in ("cat", "dog"):
        for p in real_photos(real_data, "train", cls, n):
            data = p.read_bytes() if short_side is None else small_jpeg(p, short_side)
            split = "val" if int(p.stem.split(".")[1]) % 4 == 0 else "train"
            if layout == "folders":
                target = dest / cls / p.name
            elif layout == "presplit":
                target = dest / split / cls / p.name
            elif layout == "presplit-flat":
                target = dest / split / p.name  # Kaggle's train/cat.0.jpg
            else:
                target = dest / p.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return dest


def as_unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions bind (chmod 000 unreadable, chmod 555 unwritable).

    Tests run as root here, and root ignores file modes; dropping the DAC override capabilities
    (setpriv) makes the permission checks apply to root too, without changing user. Without setpriv the
    test cannot check what it is for: that fails in CI (CATDOG_REQUIRE_REAL_DATA set) and skips elsewhere.
    """
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        msg = "running as root without setpriv (util-linux): cannot make a file unreadable or unwritable"
        if os.environ.get("CATDOG_REQUIRE_REAL_DATA"):
            pytest.fail(msg)
        pytest.skip(msg)
    caps = "-dac_override,-dac_read_search"
    return ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}")


def run_cli(*args: str | Path, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The real command line (python -m data_prep), bounded by a timeout so a hang fails the test."""
    cmd = [*prefix, sys.executable, "-m", "data_prep", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_shards(out: Path) -> dict[str, dict]:
    """All samples in OUT by key: {"split", "shard", "jpg", "cls", "json"} read with plain tarfile."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                s = samples.setdefault(key, {"split": shard.name.split("-")[0], "shard": shard.name})
                data = tar.extractfile(m).read()
                s[ext] = json.loads(data) if ext == "json" else int(data) if ext == "cls" else data
    return samples


def skipped_by_path(out: Path) -> dict[str, dict]:
    lines = (out / "skipped.jsonl").read_text().splitlines()
    return {r["path"]: r for r in map(json.loads, lines)}


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file in OUT (hidden ones too) with its bytes: for byte-identity comparisons."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest
