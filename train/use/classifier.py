"""A trained model in any of its forms -> one callable from a normalised batch to logits.

MODEL as catdog-predict / -evaluate take it: a bundle folder (train/formats/bundle.py), a run dir (its bundle, else a
checkpoint rebuilt into one), or an exported ``.onnx`` / TorchScript file carrying its model.json. ``Classifier`` holds
model.json, so callers feed every form the same way (train/use/inputs.py). Inference never imports the training loop,
the optimiser or the checkpoint code.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor
from torch.fx.experimental.optimization import fuse

from data_prep.encode import EncodeOptions
from train.config import PRECISIONS
from train.formats.bundle import META_NAME, BundleError, ModelCard, bundle_from_run, load_bundle, read_meta
from train.formats.rundir import BUNDLE_DIR, CONFIG_NAME
from train.hardware.precision import native_bf16

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")


ONNX_META_KEY = "catdog.model.json"  # model.json embedded in an exported ONNX file's metadata_props


TS_META_NAME = "model.json"  # ... and in a TorchScript archive's extra files


class Classifier(ModelCard):
    """Normalised float32 NCHW batch -> float32 logits on the CPU, for any backend. ``meta`` is model.json."""

    kind = ""

    def __init__(self, meta: dict, source: str):
        super().__init__(meta)
        self.source = source

    def prep(self, decode: str = "exact") -> EncodeOptions:
        """catdog-prep's options for this model. ``decode="fast"``: catdog-prep's same code, but straight to the eval
        resize size instead of the shards' size, so libjpeg can decode big JPEGs at 1/2, 1/4 or 1/8 scale (``draft``)
        and the resize and JPEG round trip work on fewer pixels. The pixels then differ slightly from validation's."""
        prep = super().prep()
        resize = int(self.meta["input"]["resize"])
        if decode == "fast" and resize < prep.image_size:
            return replace(prep, image_size=resize)
        return prep

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} {self.meta['model']['name']} from {self.source}"


def runs_on_gpu(clf: Classifier) -> bool:
    """Whether ``clf`` computes on a GPU (a CUDA torch device, or onnxruntime's CUDA provider)."""
    session = getattr(clf, "session", None)
    if session is not None:
        return session.get_providers()[0] != "CPUExecutionProvider"
    device = getattr(clf, "device", None)  # a bare Classifier (catdog-export's check batch) computes nothing
    return device is not None and device.type != "cpu"


def resolve_precision(requested: str, meta: dict, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` (GPUs only) for a PyTorch model. ``auto``: bf16 when the run validated in bf16
    and ``device`` computes bf16 natively, else fp32 -- so evaluate reproduces the trainer's numbers on the same kind of machine, and predict
    gets the ~1.4x of native bf16 without changing what the model was scored in. What the run validated in is
    model.json's ``training.precision`` (auto resolved by the trainer); bundles older than that field only have the
    configured ``training.mixed_precision``, where ``auto`` counts as bf16 (what it picks on bf16 hardware). fp16
    runs (GPU) are predicted in fp32."""
    if requested not in PRECISIONS:
        raise BundleError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "fp16" and torch.device(device).type != "cuda":
        raise BundleError(
            f"--precision fp16 is for GPUs, and this model would run on {torch.device(device).type}: use bf16 or fp32"
        )
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
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32"):
            out = self.model(x)
        return out.float().cpu()


def fuse_conv_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold eval-mode BatchNorm into the preceding convolution (torch.fx): one pass over the activations less per
    layer, 1.27x faster for the demo CNN on CPU (measured); logits move by ~1e-6. Models fx cannot trace stay as
    they are."""
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
        elif (path / CONFIG_NAME).is_file():
            run_bundle = path / BUNDLE_DIR
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
        if precision in ("bf16", "fp16"):
            raise BundleError(
                f"--precision {precision} applies to PyTorch and TorchScript models; {path} runs as exported (fp32)"
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
