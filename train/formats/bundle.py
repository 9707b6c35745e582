"""The model bundle: a trained model as ``model.safetensors`` + ``model.json``, usable without shards or a run dir.

This module owns the format. The trainer writes ``run.dir/model/`` from the best checkpoint at the end of a run
(``write_run_bundle``), ``catdog-export`` writes it on demand; predict, evaluate and the exported files only read it.

``model.json`` (format_version 1) holds what timm's ``pretrained_cfg`` / Hugging Face's ``config.json`` hold::

    format, format_version, catdog_version, created
    model     {"name", "config": train.config.ModelConfig fields, "num_classes"}
    classes   class names in index order (logit i is classes[i])
    input     {"image_size", "resize", "crop", "mean", "std", "channels_last", "interpolation"}: the eval
              transform (train.transforms.eval_transform): short side -> resize, centre crop, /255, mean/std
    prep      catdog-prep's decode/resize/encode (data_prep.encode.EncodeOptions: image_size, quality, max_pixels,
              min_size, max_aspect) from the shards' _info.json "args": evaluate (and predict --decode exact) run
              every photo through it before the eval transform, so a raw photo reaches the model exactly as its
              shard copy did in validation; predict's default decode runs it with image_size = input.resize. "source" says whether the values came from _info.json or are defaults (shards that
              record no catdog-prep arguments).
    data      the shards it was trained on: dir, name, sha256 of _info.json, per-shard sha256s, samples per split
    training  checkpoint folder, step, epoch, early-stop metric and its best value
    metrics   the best epoch's val/* scalars (and test/* when the run scored its test split)
    weights_sha256  of model.safetensors, checked on load

Weights load with safetensors (tensors only, never pickled code). Pretrained weights named in the config
(``model.weights``) are never fetched again: the bundle's weights replace them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from data_prep import storage
from data_prep.atomic import atomic_write_json, publish_dir
from data_prep.encode import EncodeOptions
from data_prep.info import INFO_NAME, DatasetInfo, InfoError, load_info
from data_prep.shards import file_sha256
from data_prep.version import catdog_version
from train.config import Config, ConfigError, DataConfig, ModelConfig
from train.config_io import load_config
from train.data.transforms import EVAL_CROP_FRACTION
from train.formats.rundir import (
    BUNDLE_DIR,
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    FINAL_NAME,
    MODEL_WEIGHTS,
    STATE_NAME,
    RunDirError,
    complete_checkpoints,
    read_state,
    step_of,
    validated_weights,
)
from train.models.registry import build_model

BUNDLE_FORMAT = "catdog-bundle"
FORMAT_VERSION = 1
WEIGHTS_NAME = MODEL_WEIGHTS  # the bundle's weights file has the name a checkpoint's has
META_NAME = "model.json"
PREP_KEYS = tuple(f.name for f in fields(EncodeOptions))


class BundleError(ValueError):
    """A bundle (or the run/checkpoint it is made from) cannot be used; the message names the file and what to do."""


def eval_resize_size(image_size: int) -> int:
    """The short side eval resizes to before the centre crop (train.transforms.eval_resize computes the same)."""
    return int(image_size / EVAL_CROP_FRACTION)


def prep_options(info: DatasetInfo) -> tuple[dict, str]:
    """catdog-prep's encode options as recorded in ``_info.json`` (its "args"), and where they came from."""
    args = info.raw.get("args")
    if isinstance(args, dict) and all(k in args for k in PREP_KEYS):
        return {k: args[k] for k in PREP_KEYS}, f"{INFO_NAME} args"
    # Shards written by another tool: the closest catdog-prep can get is resizing to the eval resize size with its
    # defaults, so the eval resize is (nearly) a no-op. Said in model.json so nobody mistakes it for the real thing.
    return asdict(EncodeOptions()), "defaults (the shards record no catdog-prep arguments)"


class ModelCard:
    """What model.json says about a model (no weights): its classes, its input, how its photos were prepared.
    Every form of a trained model carries one: a bundle, and the exported TorchScript and ONNX files."""

    def __init__(self, meta: dict):
        self.meta = meta

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    @property
    def image_size(self) -> int:
        return int(self.meta["input"]["image_size"])

    def model_config(self) -> ModelConfig:
        known = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in self.meta["model"]["config"].items() if k in known})

    def data_config(self, **kw) -> DataConfig:
        """A DataConfig carrying the bundle's mean/std (what train.transforms needs) plus ``kw``."""
        inp = self.meta["input"]
        return DataConfig(**{"dir": "", "mean": tuple(inp["mean"]), "std": tuple(inp["std"]), **kw})

    def prep(self) -> EncodeOptions:
        """catdog-prep's options the model's shards were made with."""
        return EncodeOptions(**{k: self.meta["prep"][k] for k in PREP_KEYS})


class Bundle(ModelCard):
    """A loaded bundle: its metadata and weights. ``build()`` gives the model in eval mode."""

    def __init__(self, meta: dict, weights: dict[str, torch.Tensor], root: Path | None = None):
        super().__init__(meta)
        self.weights = weights
        self.root = root  # where it was loaded from; None for one built in memory from a checkpoint

    def build(self) -> nn.Module:
        """The architecture from the registry with the bundle's weights (strict), in eval mode, on the CPU."""
        cfg = self.model_config()
        # Never fetch pretrained weights again (offline machines): the bundle's weights replace them.
        model = build_model(replace(cfg, weights="none"), len(self.classes))
        if cfg.name == "inception_v3":
            # train/models/ turns on torchvision's transform_input only for pretrained weights; it is a flag,
            # not a tensor, so the weights file does not carry it.
            model.net.transform_input = cfg.weights != "none"
        missing, unexpected = model.load_state_dict(self.weights, strict=False)
        if missing or unexpected:
            where = self.root / WEIGHTS_NAME if self.root else "the checkpoint's model.safetensors"
            raise BundleError(
                f"{where} does not fit {cfg.name} as {META_NAME} describes it: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}; re-export the bundle with catdog-export"
            )
        return model.eval()


def make_meta(cfg: Config, info: DatasetInfo, state: dict, checkpoint: Path, metrics: dict) -> dict:
    """model.json's content (without weights_sha256) for the weights in ``checkpoint``; ``state`` is the run's
    trainer_state.json content (train.formats.rundir.TrainerState as a dict)."""
    image_size = cfg.model.input_size()
    prep, prep_source = prep_options(info)
    info_path = info.root / INFO_NAME
    shards = info.raw.get("shards") if isinstance(info.raw.get("shards"), dict) else {}
    return {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "catdog_version": catdog_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": cfg.model.name, "config": asdict(cfg.model), "num_classes": info.num_classes},
        "classes": list(info.classes),
        "input": {
            "image_size": image_size,
            "resize": eval_resize_size(image_size),
            "crop": image_size,
            "interpolation": "bilinear, antialias (torchvision.transforms.v2.Resize)",
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "channels_last": cfg.train.channels_last,
        },
        "prep": {**prep, "source": prep_source},
        "data": {
            "dir": str(info.root) if info.is_remote else str(Path(info.root).resolve()),
            "name": info.raw.get("name", ""),
            "info_sha256": _info_sha256(info_path),
            "shards_sha256": {name: s.get("sha256", "") for name, s in shards.items()},
            "num_samples": {name: s.num_samples for name, s in info.splits.items()},
        },
        "training": {
            "checkpoint": checkpoint.name,
            "step": step_of(checkpoint.name),
            "epoch": state.get("best_epoch") if checkpoint.name == state.get("best_checkpoint") else None,
            "early_stop_metric": cfg.train.early_stop_metric,
            "best_metric": state.get("best_metric"),
            "mixed_precision": cfg.train.mixed_precision,
            # What validation computed in (auto resolved), for predict/evaluate's --precision auto; "" if unknown.
            "precision": state.get("precision", ""),
            # CUDA: the run's TF32 setting, so catdog-evaluate on a GPU computes as its validation did.
            "tf32": cfg.train.tf32,
        },
        "metrics": metrics,
    }


def _info_sha256(where: Path | storage.Location) -> str:
    """sha256 of the shards' _info.json (a local file or an object); "" when it cannot be read now."""
    if isinstance(where, Path):
        return file_sha256(where) if where.is_file() else ""
    try:
        return hashlib.sha256(storage.read_bytes(where)).hexdigest()
    except storage.StorageError:
        return ""


def checkpoint_metrics(state: dict, checkpoint: Path, final: dict | None = None) -> dict:
    """The scalar metrics of the epoch that ended at ``checkpoint`` (plus the run's test/* when ``final`` has them
    for this checkpoint)."""
    step = step_of(checkpoint.name)
    row = next((h for h in state.get("history", []) if h.get("step") == step), {})
    out = {k: v for k, v in row.items() if k.startswith(("val/", "train/")) and isinstance(v, (int, float))}
    if final and final.get("test/checkpoint") == checkpoint.name:
        out.update({k: v for k, v in final.items() if k.startswith("test/") and isinstance(v, (int, float))})
    return out


def write_bundle(out: Path, meta: dict, weights: dict[str, torch.Tensor]) -> Path:
    """Write ``out/model.safetensors`` + ``out/model.json`` atomically: into a hidden temp folder, then renamed.

    An existing bundle at ``out`` is replaced; a kill leaves the old bundle or the new one, never a mix.
    """
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_NAME))
        atomic_write_json(tmp / META_NAME, {**meta, "weights_sha256": file_sha256(tmp / WEIGHTS_NAME)})
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_run_bundle(
    run_dir: Path, cfg: Config, info: DatasetInfo, state: dict, checkpoint: Path, final: dict | None = None
) -> Path:
    """``run_dir/model/`` from ``checkpoint``'s weights: what the trainer calls at the end of a run (``state`` is
    ``asdict(TrainerState)``)."""
    weights = _load_weights(_validated_weights(checkpoint))
    meta = make_meta(cfg, info, state, checkpoint, checkpoint_metrics(state, checkpoint, final))
    return write_bundle(Path(run_dir) / BUNDLE_DIR, meta, weights)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BundleError(f"{path} not found: the bundle or checkpoint is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path} is not a readable safetensors file ({e}); re-export it") from e


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle folder (``model.json`` + ``model.safetensors``); needs neither the shards nor the run dir."""
    root = Path(path)
    meta_path = root / META_NAME
    if not meta_path.is_file():
        raise BundleError(f"{meta_path} not found: pass a bundle folder (run.dir/model) written by catdog-export")
    meta = read_meta(meta_path.read_text(), str(meta_path))
    weights_path = root / WEIGHTS_NAME
    if weights_path.is_file() and meta.get("weights_sha256") and file_sha256(weights_path) != meta["weights_sha256"]:
        raise BundleError(
            f"{weights_path} does not match the sha256 in {meta_path}: the weights were changed or are corrupt; "
            "re-export the bundle with catdog-export"
        )
    return Bundle(meta, _load_weights(weights_path), root)


def read_meta(text: str, where: str) -> dict:
    """Parse and check model.json text (also embedded in exported TorchScript/ONNX files)."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise BundleError(f"{where} is not valid JSON ({e}); re-export the bundle") from e
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f'{where} is not a catdog model.json (no "format": "{BUNDLE_FORMAT}")')
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{where} has format_version {meta.get('format_version')!r}; this catdog reads {FORMAT_VERSION}: "
            "use the catdog version that wrote it or re-export"
        )
    missing = [k for k in ("model", "classes", "input", "prep") if k not in meta]
    if missing:
        raise BundleError(f"{where} lacks {missing}; re-export the bundle")
    inp = meta["input"]
    if eval_resize_size(int(inp["image_size"])) != int(inp["resize"]):
        # The eval transform is code (train/data/transforms.py); refuse to feed the model differently from validation.
        raise BundleError(
            f"{where}: input.resize={inp['resize']} but this catdog's eval transform resizes image_size "
            f"{inp['image_size']} to {eval_resize_size(int(inp['image_size']))}; use the catdog version that wrote it"
        )
    return meta


# ---------------------------------------------------------------------------------------------------------------
# From a run dir (catdog-export, and predict/evaluate given a run dir)


def _validated_weights(checkpoint: Path) -> Path:
    """The weights file a checkpoint was validated with (train/formats/rundir.py): that is the model whose metrics
    the bundle records, so it is the one a bundle carries."""
    try:
        return validated_weights(checkpoint)
    except RunDirError as e:
        raise BundleError(str(e)) from e


def _read_state(path: Path) -> dict:
    try:
        return read_state(path)
    except RunDirError as e:
        raise BundleError(str(e)) from e


def pick_checkpoint(run_dir: Path, which: str = "best") -> tuple[Path, dict]:
    """(checkpoint folder, the newest trainer state) for ``which`` = best | last | a checkpoint folder path."""
    root = run_dir / CHECKPOINTS_DIR
    found = complete_checkpoints(root)
    if which not in ("best", "last"):
        path = Path(which)
        if not (path / STATE_NAME).is_file() or not (path / MODEL_WEIGHTS).is_file():
            raise BundleError(f"--checkpoint {which}: not a checkpoint folder (needs {STATE_NAME} and {MODEL_WEIGHTS})")
        latest = found[-1] if found else path
        return path, _read_state(latest / STATE_NAME)
    if not found:
        raise BundleError(f"{root}: no complete checkpoint; is {run_dir} a catdog-train run.dir that has run?")
    state = _read_state(found[-1] / STATE_NAME)
    if which == "last":
        return found[-1], state
    best = state.get("best_checkpoint") or ""
    if not best or not (root / best).is_dir():
        raise BundleError(
            f"{run_dir}: the best checkpoint {best or '(none evaluated yet)'} is not in {root}; use --checkpoint last"
        )
    return root / best, state


def bundle_from_run(run_dir: Path, which: str = "best") -> Bundle:
    """An in-memory bundle of a run's checkpoint. Needs the run's config.yaml and its shards' _info.json."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise BundleError(f"{config_path} not found: pass a catdog-train run.dir or a bundle folder")
    try:
        cfg = load_config(config_path)
        info = load_info(cfg.data.dir)
    except (ConfigError, InfoError) as e:
        raise BundleError(f"cannot rebuild the bundle from {run_dir} ({e}); use its {BUNDLE_DIR}/ folder") from e
    checkpoint, state = pick_checkpoint(run_dir, which)
    final_path = run_dir / FINAL_NAME
    final = json.loads(final_path.read_text()) if final_path.is_file() else None
    meta = make_meta(cfg, info, state, checkpoint, checkpoint_metrics(state, checkpoint, final))
    return Bundle(meta, _load_weights(_validated_weights(checkpoint)), None)
