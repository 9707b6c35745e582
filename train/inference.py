"""What predict and evaluate share: load a model from any form, find input images, feed them exactly as validation did.

A photo reaches the model through the same code as its shard copy did during training's validation:

1. catdog-prep's own decode/normalise step (``data_prep.encode.encode_image``: EXIF orientation, colour modes,
   alpha on white, 16-bit scaling, aspect crop, short side to the bundle's ``prep.image_size``, JPEG at
   ``prep.quality``), with its skip reasons for bad files;
2. the decoder the shard reader uses (``train.data.decode_rgb``);
3. the eval transform (``train.transforms.eval_resize`` per image, ``normalise`` per batch).

So ``catdog-evaluate`` on a folder of raw photos reproduces the trainer's validation metrics on the shards
catdog-prep made from them. ``catdog-predict`` does the same with ``--decode exact``; its default (``fast``) runs
step 1 straight to the eval resize size instead of the shards' (``Classifier.prep``). Inference never imports the
training loop, the optimiser or the checkpoint code.
"""

from __future__ import annotations

import glob
import json
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data_prep.encode import EncodeOptions, Skip, encode_image
from data_prep.info import INFO_NAME
from data_prep.scan import kind_problem, walk_images
from train.bundle import META_NAME, Bundle, BundleError, bundle_from_run, load_bundle, read_meta
from train.data import decode_rgb
from train.precision import native_bf16
from train.transforms import eval_resize, normalise

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
ONNX_META_KEY = "catdog.model.json"  # model.json embedded in an exported ONNX file's metadata_props
TS_META_NAME = "model.json"  # ... and in a TorchScript archive's extra files


# ---------------------------------------------------------------------------------------------------------------
# Models: a bundle, a run dir, or an exported file -> one callable from normalised batch to logits


class Classifier:
    """Normalised float32 NCHW batch -> float32 logits on the CPU, for any backend. ``meta`` is model.json."""

    kind = ""

    def __init__(self, meta: dict, source: str):
        self.meta = meta
        self.source = source

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    @property
    def image_size(self) -> int:
        return int(self.meta["input"]["image_size"])

    def prep(self, decode: str = "exact") -> EncodeOptions:
        """catdog-prep's options for this model. ``decode="fast"``: catdog-prep's same code, but straight to the eval
        resize size instead of the shards' size, so libjpeg can decode big JPEGs at 1/2, 1/4 or 1/8 scale (``draft``)
        and the resize and JPEG round trip work on fewer pixels. The pixels then differ slightly from validation's."""
        prep = Bundle(self.meta, {}).prep()
        resize = int(self.meta["input"]["resize"])
        if decode == "fast" and resize < prep.image_size:
            return replace(prep, image_size=resize)
        return prep

    def data_config(self, **kw):
        return Bundle(self.meta, {}).data_config(**kw)

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} {self.meta['model']['name']} from {self.source}"


PRECISIONS = ("auto", "fp32", "bf16")
# --workers of catdog-evaluate (and of catdog-predict with an ONNX model) on CPU when not given: the processes only
# decode there, the model runs in the main process. On the 2-core development machines decoding a photo and the demo
# model's forward cost about the same per photo, and 1 or 3 workers measured no faster than 2.
CPU_DECODE_WORKERS = 2
MAX_WORKERS = 16  # the most worker processes any default picks (as the trainer's data.num_workers=auto)


def runs_on_gpu(clf: Classifier) -> bool:
    """Whether ``clf`` computes on a GPU (a CUDA torch device, or onnxruntime's CUDA provider)."""
    session = getattr(clf, "session", None)
    if session is not None:
        return session.get_providers()[0] != "CPUExecutionProvider"
    return clf.device.type != "cpu"


def default_decode_workers(on_gpu: bool, env=None, affinity: int | None = None, *, scores: bool = False) -> int:
    """Worker processes per rank when --workers is not given. ``scores`` (catdog-predict with a torch model on CPU,
    see ``scores_in_workers``): each worker decodes and scores whole batches, so one per CPU (at most 16). On a GPU
    the model leaves the CPUs to decoding, the bottleneck there: every CPU of this rank but one, as the trainer's
    data.num_workers=auto (at most 16). Else on CPU the model in the main process needs the cores too:
    ``CPU_DECODE_WORKERS``, with the rest as torch threads."""
    if scores:
        from data_prep.prepare import default_workers

        return min(affinity if affinity is not None else default_workers(), MAX_WORKERS)
    if not on_gpu:
        return CPU_DECODE_WORKERS
    from train.config import auto_num_workers

    return auto_num_workers(env, affinity)[0]


def resolve_precision(requested: str, meta: dict, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for a PyTorch model. ``auto``: bf16 when the run validated in bf16 and ``device`` computes
    bf16 natively, else fp32 -- so evaluate reproduces the trainer's numbers on the same kind of machine, and predict
    gets the ~1.4x of native bf16 without changing what the model was scored in. What the run validated in is
    model.json's ``training.precision`` (auto resolved by the trainer); bundles older than that field only have the
    configured ``training.mixed_precision``, where ``auto`` counts as bf16 (what it picks on bf16 hardware). fp16
    runs (GPU) are predicted in fp32."""
    if requested not in PRECISIONS:
        raise BundleError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    training = meta.get("training", {})
    ran = str(training.get("precision") or training.get("mixed_precision", "no"))
    return "bf16" if ran in ("bf16", "auto") and native_bf16(device) else "fp32"


class TorchClassifier(Classifier):
    """A bundle's model (or a TorchScript module) on a torch device, optionally channels_last / bf16 autocast."""

    def __init__(
        self,
        meta: dict,
        source: str,
        model: torch.nn.Module,
        *,
        device: str,
        precision: str,
        kind: str,
        fuse: bool = False,
    ):
        super().__init__(meta, source)
        self.kind = kind
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is not None:
                # The current device too: whatever is made on plain "cuda" (autocast's bf16 check, library scratch
                # buffers) must not land on GPU 0 when the user picked another.
                torch.cuda.set_device(self.device)
            # TF32 as the run's validation had it (the trainer sets both; torch's defaults differ: matmuls off,
            # convolutions on), so fp32 scores on Ampere+ GPUs are the validation's, not a rounding away. Process-wide
            # flags: the CLIs run one model per process.
            tf32 = bool(meta.get("training", {}).get("tf32", True))
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        self.channels_last = bool(meta["input"].get("channels_last")) or self.device.type == "cpu"
        self.model = model.to(self.device).eval()
        self.precision = resolve_precision(precision, meta, self.device)
        if fuse and kind == "pytorch":
            self.model = fuse_conv_bn(self.model)
        if self.channels_last and kind == "pytorch":
            # oneDNN's convolutions are faster in NHWC on CPUs; the results are the same to float rounding.
            self.model = self.model.to(memory_format=torch.channels_last)

    def describe(self) -> str:
        return f"{super().describe()}, {self.precision}"

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(x)
        return out.float().cpu()


def fuse_conv_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold eval-mode BatchNorm into the preceding convolution (torch.fx): one pass over the activations less per
    layer, 1.27x faster for the demo CNN on CPU (measured); logits move by ~1e-6. Models fx cannot trace stay as
    they are."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 -- a model torch.fx cannot trace simply runs unfused
        return model


class OnnxClassifier(Classifier):
    """An exported ONNX file run with onnxruntime."""

    kind = "onnx"

    def __init__(self, meta: dict, source: str, session):
        super().__init__(meta, source)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def describe(self) -> str:
        return f"{super().describe()}, fp32"  # as exported

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.float().contiguous().numpy()})[0])


def resolve_device(device: str) -> str:
    """``--device`` checked here, so a typo or a GPU this machine lacks is one clear line, not a CUDA traceback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise BundleError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise BundleError(f"--device {device!r}: catdog runs on cpu or cuda (auto picks)")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BundleError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BundleError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError as e:
        raise BundleError(
            f"onnxruntime is not installed ({e}): pip install 'catdog[onnx]' (make setup installs it)"
        ) from e
    return onnxruntime


def load_classifier(
    path: str | Path, *, device: str = "auto", precision: str = "auto", checkpoint: str = "best", fuse: bool = False
) -> Classifier:
    """MODEL as catdog-predict/-evaluate take it: a bundle folder, a run dir (its bundle, else its ``checkpoint``),
    or an exported ``.onnx`` / TorchScript (``.pt``/``.ts``) file carrying its model.json. ``fuse``: fold BatchNorm
    into convolutions (predict; evaluate keeps the model exactly as validation ran it). ``precision``: see
    ``resolve_precision`` (PyTorch and TorchScript models; an ONNX model runs as exported, fp32)."""
    path = Path(path)
    device = resolve_device(device)
    if path.is_dir():
        if (path / META_NAME).is_file():
            bundle = load_bundle(path)
        elif (path / "config.yaml").is_file():
            run_bundle = path / "model"
            use_saved = checkpoint == "best" and (run_bundle / META_NAME).is_file()
            bundle = load_bundle(run_bundle) if use_saved else bundle_from_run(path, checkpoint)
        else:
            raise BundleError(f"{path} is neither a bundle folder ({META_NAME}) nor a run dir (config.yaml)")
        return TorchClassifier(
            bundle.meta, str(path), bundle.build(), device=device, precision=precision, kind="pytorch", fuse=fuse
        )
    if not path.is_file():
        raise BundleError(f"MODEL {path} does not exist: pass a bundle folder, a run dir, or an exported file")
    if path.suffix == ".onnx":
        if precision == "bf16":
            raise BundleError(
                f"--precision bf16 applies to PyTorch and TorchScript models; {path} runs as exported (fp32)"
            )
        ort = onnxruntime_module()
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            # The GPU asked for (--device cuda:N, or this rank's under accelerate launch): onnxruntime's CUDA
            # provider would take device 0 otherwise; torch's current device too (the loader's pin thread).
            index = torch.device(device).index
            if index is not None:
                torch.cuda.set_device(index)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index if index is not None else 0}))
        options = ort.SessionOptions()
        # The threads this process may use, which catdog-predict / -evaluate give torch before loading the model
        # (cores minus decode workers, or a rank's share); onnxruntime's default is every core, once per rank.
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {e})") from e
        text = session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        if text is None:
            raise BundleError(f"{path} carries no {ONNX_META_KEY} metadata: export it with catdog-export")
        return OnnxClassifier(read_meta(text, f"{path} ({ONNX_META_KEY})"), str(path), session)
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        extra = {TS_META_NAME: ""}
        try:
            with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript (FutureWarning); it still loads
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except (RuntimeError, ValueError) as e:
            raise BundleError(f"{path} is not a TorchScript archive ({str(e).splitlines()[0]})") from e
        if not extra[TS_META_NAME]:
            raise BundleError(f"{path} carries no {TS_META_NAME}: export it with catdog-export")
        meta = read_meta(extra[TS_META_NAME], f"{path} ({TS_META_NAME})")
        return TorchClassifier(meta, str(path), module, device=device, precision=precision, kind="torchscript")
    raise BundleError(f"MODEL {path}: unknown file type; use a bundle folder, a run dir, .onnx or .pt/.ts")


def probabilities(clf: Classifier, x: Tensor, tta: str = "none") -> Tensor:
    """Softmax over classes; ``tta="flip"`` averages with the horizontally flipped batch's."""
    probs = clf(x).softmax(1)
    if tta == "flip":
        probs = (probs + clf(x.flip(-1)).softmax(1)) / 2
    return probs


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Entry:
    """One input image: what to show for it, where to read it, and a problem known before reading (or None)."""

    name: str
    path: Path | None
    problem: tuple[str, str] | None = None
    label: int = -1  # class index for evaluation; -1 when unlabelled


def _has_glob(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def expand_inputs(args: Sequence[str]) -> tuple[list[Entry], list[Path]]:
    """Files, folders (recursive, image extensions only), globs -> entries in argument order; shard folders
    (holding _info.json) are returned separately. A path that does not exist becomes an entry with a problem."""
    entries: list[Entry] = []
    shard_dirs: list[Path] = []
    for arg in args:
        p = Path(arg)
        if not p.exists() and not p.is_symlink() and _has_glob(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                entries.append(Entry(arg, None, ("not_found", "the pattern matches no file")))
            sub_entries, sub_shards = expand_inputs(matches)
            entries += sub_entries
            shard_dirs += sub_shards
        elif p.is_dir():
            if (p / INFO_NAME).is_file():
                shard_dirs.append(p)
                continue
            found, _ = walk_images(p)
            entries += [Entry(str(p / rel), p / rel, kind_problem(kind)) for rel, kind, _ in found]
        elif p.is_symlink() and not p.exists():
            entries.append(Entry(arg, p, kind_problem("broken_symlink")))
        elif not p.exists():
            entries.append(Entry(arg, None, ("not_found", "no such file or folder")))
        else:
            entries.append(Entry(arg, p))
    return entries, shard_dirs


def read_image(entry: Entry, prep: EncodeOptions) -> Tensor:
    """uint8 RGB CHW as catdog-prep would have stored and the shard reader decoded it; raises Skip."""
    if entry.problem is not None:
        raise Skip(*entry.problem)
    try:
        st = os.stat(entry.path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever
            raise Skip("not_a_file", "not a regular file (folder, FIFO, socket or device)")
        data = entry.path.read_bytes()
    except OSError as e:
        raise Skip("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    if not data:
        raise Skip("empty", "zero-byte file")
    try:
        jpg, _ = encode_image(data, prep)
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001 -- a decoder bug on one odd file must not stop the run (as in catdog-prep)
        raise Skip("decode_error", f"{type(e).__name__}: {e}") from None
    return decode_rgb(bytearray(jpg))  # writable: torch.frombuffer warns on read-only bytes


class ImageBatches(Dataset):
    """Batch k = entries ``batches[k]``, read, prepared and normalised in a DataLoader worker, and passed through
    ``score`` there when given (``scored_batches``).

    Returns ``(x or None, [entry indices in x], [(entry index, reason, detail), ...])``: a bad file becomes a skip
    record, never an exception, and the batch shrinks instead (each input is counted exactly once).
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        batches: Sequence[Sequence[int]],
        prep: EncodeOptions,
        resize,
        norm,
        score: Callable[[Tensor], Tensor] | None = None,
    ):
        self.entries = entries
        self.batches = batches
        self.prep = prep
        self.resize = resize
        self.norm = norm
        self.score = score

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[Tensor | None, list[int], list[tuple[int, str, str]]]:
        images, ok, skips = [], [], []
        for i in self.batches[k]:
            try:
                images.append(self.resize(read_image(self.entries[i], self.prep)))
                ok.append(i)
            except Skip as e:
                skips.append((i, e.reason, e.detail))
        x = self.norm(torch.stack(images)) if images else None
        if x is not None and self.score is not None:
            x = self.score(x)
        return x, ok, skips


def image_loader(
    clf: Classifier,
    entries: Sequence[Entry],
    batches: Sequence[Sequence[int]],
    *,
    workers: int,
    decode: str = "exact",
    score: Callable[[Tensor], Tensor] | None = None,
) -> DataLoader:
    """Batches of ``entries`` prepared for ``clf``, decoded by ``workers`` processes, in order (``decode``: see
    ``Classifier.prep``); ``score`` applied to each batch in the worker (see ``ImageBatches``)."""
    cfg = clf.data_config()
    dataset = ImageBatches(entries, batches, clf.prep(decode), eval_resize(cfg, clf.image_size), normalise(cfg), score)
    workers = min(workers, len(batches))
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset builds whole batches
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=runs_on_gpu(clf),  # not for a CPU model on a GPU host: pinning starts CUDA on GPU 0
        # Scoring workers get the model by fork, whatever the default start method (see workers_can_score).
        multiprocessing_context="fork" if score is not None and workers else None,
    )


def workers_can_score(device: str | torch.device) -> bool:
    """Whether catdog-predict's worker processes can run a torch model on ``device``: on CPU, on Linux, where they are
    forked with the model (``scored_batches`` asks for fork explicitly: spawn or forkserver, Python 3.14's default,
    would pickle the model into every worker, and a TorchScript module does not pickle). macOS forks unsafely and
    Windows cannot: there the model stays in the main process."""
    import sys

    return torch.device(device).type == "cpu" and sys.platform.startswith("linux")


def scores_in_workers(clf: Classifier) -> bool:
    """Whether catdog-predict's worker processes run the model too: a PyTorch or TorchScript model where
    ``workers_can_score``.

    Each worker then decodes a whole batch and scores it on one torch thread, and only the probabilities travel back:
    every core does complete work, where decode workers beside a model in the main process time-share the cores with
    it and send it float32 batches through shared memory. Measured on 2 cores (AVX512-BF16 AMD, demo model in bf16,
    1,000 val photos, 2 workers either way, 5 interleaved passes): 879 vs 751 img/s median with ``--decode fast``,
    565 vs 509 with ``exact``. Each worker holds one batch's activations: ~0.4 GB for InceptionV3 at 299 px and
    batch 32 in fp32, ~0.2 GB in bf16 (peak RSS over the loaded model, measured)."""
    return isinstance(clf, TorchClassifier) and workers_can_score(clf.device)


def scored_batches(
    clf: Classifier,
    entries: Sequence[Entry],
    batches: Sequence[Sequence[int]],
    *,
    workers: int,
    decode: str = "exact",
    tta: str = "none",
):
    """``(probabilities or None, [entry indices], [(entry index, reason, detail), ...])`` per batch, in order: the
    model run in the worker processes where ``scores_in_workers``, else in this process on batches the workers
    decoded (GPU, ONNX, ``workers=0``)."""
    if workers and scores_in_workers(clf):
        yield from image_loader(
            clf, entries, batches, workers=workers, decode=decode, score=partial(probabilities, clf, tta=tta)
        )
        return
    for x, ok, skips in image_loader(clf, entries, batches, workers=workers, decode=decode):
        yield (None if x is None else probabilities(clf, x, tta)), ok, skips


def chunk(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def denormalise(x: Tensor, meta: dict) -> Tensor:
    """Normalised NCHW float -> uint8 NCHW: the crop the model saw, for galleries."""
    mean = torch.tensor(meta["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["input"]["std"]).view(1, 3, 1, 1)
    return (x.float().cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def row_json(name: str, classes: Sequence[str], probs: Sequence[float] | None, skip: tuple[str, str] | None) -> str:
    """One JSONL row: {"path", "prediction", "probability", "probs": {class: p}} or {"path", "skipped", "detail"}."""
    if probs is None:
        return json.dumps({"path": name, "skipped": skip[0], "detail": skip[1]})
    best = max(range(len(classes)), key=lambda i: probs[i])
    return json.dumps(
        {
            "path": name,
            "prediction": classes[best],
            "probability": probs[best],
            "probs": dict(zip(classes, probs, strict=True)),
        }
    )
