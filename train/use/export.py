"""``catdog-export RUN_DIR [--checkpoint best|last|PATH] [--format bundle|torchscript|onnx]``: a usable model file.

- ``bundle`` (default): ``RUN_DIR/model/`` (model.safetensors + model.json, train/formats/bundle.py) from the chosen
  checkpoint; the trainer writes the best one at the end of every run, this rewrites it on demand.
- ``torchscript`` / ``onnx``: ``model.pt`` / ``model.onnx`` beside the bundle folder, with model.json embedded
  (TorchScript extra file / ONNX metadata_props ``catdog.model.json``), so catdog-predict needs nothing else.
  Input: normalised float32 NCHW ``images`` with a dynamic batch axis; output: ``logits``.

An exported file is checked before it is renamed into place: its logits on real photos (the bundle's validation
shards, or ``--check-images``) must match the PyTorch model's within 1e-4 (fp32), at batch size N and 1;
ONNX files are run with onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import torch

from data_prep.cli import Parser, add_no_progress, add_out
from data_prep.info import InfoError, load_info
from train.data.streams import eval_loader
from train.formats.bundle import META_NAME, BundleError, bundle_from_run, load_bundle, write_bundle
from train.formats.rundir import BUNDLE_DIR
from train.use.classifier import ONNX_META_KEY, TS_META_NAME, Classifier, load_classifier, onnxruntime_module
from train.use.inputs import chunk, expand_inputs, image_loader

MAX_ABS_DIFF = 1e-4  # on fp32 logits
CHECK_IMAGES = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="catdog-export", description="Write a trained model as a bundle, TorchScript or ONNX.")
    p.add_argument("source", metavar="RUN_DIR", help="a catdog-train run.dir (or a bundle folder)")
    p.add_argument("--checkpoint", default="best", help="best (default) | last | path to a checkpoint folder")
    p.add_argument("--format", choices=("bundle", "torchscript", "onnx"), default="bundle")
    add_out(p, "output path (default: RUN_DIR/model, RUN_DIR/model.pt, RUN_DIR/model.onnx)")
    p.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help=f"photos to check the export on (default: {CHECK_IMAGES} samples of the bundle's validation shards)",
    )
    add_no_progress(p, "accepted as by every catdog command; an export shows no progress (it takes seconds)")
    return p.parse_args(argv)


def _fail(msg: str, code: int = 2) -> int:
    print(f"catdog-export: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    src = Path(args.source)
    is_bundle = (src / META_NAME).is_file()
    try:
        if is_bundle:
            if args.checkpoint != "best":
                return _fail(f"--checkpoint applies to a run dir; {src} is a bundle folder")
            bundle = load_bundle(src)
        else:
            bundle = bundle_from_run(src, args.checkpoint)
        base = src.parent if is_bundle else src
        if args.format == "bundle":
            if is_bundle and not args.out:
                return _fail(f"{src} is already a bundle; pass --out to copy it, or --format torchscript|onnx")
            out = write_bundle(Path(args.out or base / BUNDLE_DIR), bundle.meta, bundle.weights)
            m = bundle.meta["metrics"]
            summary = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if k.startswith("val/") and isinstance(v, float))
            print(f"catdog-export: wrote {out} ({bundle.meta['training']['checkpoint']}; {summary})")
            return 0
        out = Path(args.out or base / ("model.pt" if args.format == "torchscript" else "model.onnx"))
        x = check_batch(bundle, args.check_images)
        report = export_file(bundle, args.format, out, x)
    except BundleError as e:
        return _fail(str(e))
    print(f"catdog-export: wrote {out}; {report}")
    return 0


def check_batch(bundle, paths: list[str] | None):
    """Normalised photos to compare the export against: ``paths``, else the bundle's validation shards."""

    clf = Classifier(bundle.meta, "check")
    if paths:
        entries, _ = expand_inputs(paths)
        entries = [e for e in entries if e.problem is None][: CHECK_IMAGES * 4]
        xs = [
            x
            for x, _, _ in image_loader(clf, entries, chunk(range(len(entries)), CHECK_IMAGES), workers=0)
            if x is not None
        ]
        if not xs:
            raise BundleError(f"--check-images {' '.join(paths)}: no readable photo to check the export on")
        return torch.cat(xs)[:CHECK_IMAGES]
    data_dir = bundle.meta["data"]["dir"]
    try:
        info = load_info(data_dir)
    except InfoError as e:
        raise BundleError(f"no photos to check the export on ({e}); pass --check-images DIR") from e
    split = max(info.splits, key=lambda s: (s == "val", info.splits[s].num_samples))
    cfg = clf.data_config(dir=data_dir, num_workers=0)
    batches = eval_loader(
        cfg, info, split=split, batch_size=CHECK_IMAGES, image_size=clf.image_size, rank=0, world_size=1
    )
    return next(iter(batches))[0]


def export_file(bundle, fmt: str, out: Path, x) -> str:
    """Write ``out`` (via a temp name), check it against the PyTorch model on ``x``, rename; returns a report line."""

    model = bundle.build()
    meta_text = json.dumps(bundle.meta, sort_keys=True)
    with torch.inference_mode():
        reference = model(x).float()
        reference_1 = model(x[:1]).float()
    tmp = out.with_name(f".tmp-{out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "torchscript":
            with torch.no_grad(), warnings.catch_warnings():
                # torch 2.14 marks TorchScript deprecated (FutureWarning); it still works and is what the issue asks
                # for (C++/libtorch deployment). ONNX is the forward-looking format.
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(model, x[:2], check_trace=False)
                torch.jit.save(traced, str(tmp.with_suffix(".pt")), _extra_files={TS_META_NAME: meta_text})
            tmp = tmp.with_suffix(".pt")
            engine = f"torch.jit.load (torch {torch.__version__})"
        else:
            tmp = tmp.with_suffix(".onnx")
            engine = _export_onnx(model, x, tmp, meta_text)
        clf = load_classifier(tmp, device="cpu", precision="fp32")  # the reference above is fp32
        got, got_1 = clf(x), clf(x[:1])
        diff = max(float((got - reference).abs().max()), float((got_1 - reference_1).abs().max()))
        if not diff <= MAX_ABS_DIFF:
            raise BundleError(
                f"the exported {fmt} model's logits differ from the PyTorch model's by {diff:.3g} (> {MAX_ABS_DIFF}) "
                f"on {len(x)} real photos; nothing written to {out}"
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return (
        f"checked with {engine} on {len(x)} real photos at batch sizes {len(x)} and 1: "
        f"max |logit difference| {diff:.2e} <= {MAX_ABS_DIFF:g} vs the PyTorch model"
    )


def _export_onnx(model, x, path: Path, meta_text: str) -> str:
    """torch.onnx.export (the dynamo exporter, which needs onnxscript) with a dynamic batch axis; model.json goes
    into the file's metadata_props. Returns the engine that will check it."""

    ort = onnxruntime_module()
    try:
        import onnx
    except ImportError as e:
        raise BundleError(f"onnx is not installed ({e}): pip install 'catdog[onnx]'") from e
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress to stdout; keep the command's output to its own one-line report.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            dynamo=True,
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, meta_text
    onnx.save(proto, str(path))
    return f"onnxruntime {ort.__version__}"


if __name__ == "__main__":
    sys.exit(main())
