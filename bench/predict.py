"""catdog-predict throughput vs a naive loop, same photos, same model, same machine, one run; the ratio last.

- ours: what catdog-predict runs after loading the model (``train.predict.predict``): batches, decode worker
  processes, catdog-prep's decode and the eval transform, BatchNorm folded into the convolutions,
  channels_last on CPU; with each decode (``exact``, the default: the pixels validation saw; ``fast``: JPEG
  ``draft()`` straight to the model's size) and precision (fp32; bf16 where the CPU runs it natively, which
  ``--precision auto``, the default, picks for a bf16-trained model such as the demo's);
- naive: for each photo, ``Image.open`` + ``convert("RGB")``, the eval transform (train.transforms), the model
  on that one image.

Passes alternate (ours variants, naive, ours variants, ...) so load from other processes hits both alike; medians are printed.

    .venv/bin/python bench/predict.py [--src ../shared/data/catsdogs/val] [--n 400] [--model BUNDLE] [--repeats 3]

Without --model, the `make demo` model (configs/cnn.yaml, fed from 192-px catdog-prep shards) is built with
seeded random weights: speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
from PIL import Image

from data_prep.info import DatasetInfo
from data_prep.prepare import PrepArgs, default_workers
from train.bundle import load_bundle, make_meta, write_bundle
from train.config import load_config
from train.inference import CPU_DECODE_WORKERS, TorchClassifier, expand_inputs, resolve_precision
from train.models import build_model
from train.precision import cpu_has_bf16
from train.predict import CPU_BATCH, predict
from train.transforms import eval_transform

ROOT = Path(__file__).resolve().parents[1]


def demo_bundle(out: Path) -> Path:
    """A bundle of the demo's architecture with seeded random weights, prepared like the demo's shards."""
    cfg = load_config(ROOT / "configs" / "cnn.yaml", ["data.dir=unused"])
    prep = PrepArgs(src=Path("."), out=Path("."), image_size=192).output_args()
    info = DatasetInfo(root=out, classes=("cat", "dog"), splits={}, raw={"args": prep})
    torch.manual_seed(0)
    model = build_model(cfg.model, 2)
    meta = make_meta(cfg, info, {}, Path("random-init"), {})
    return write_bundle(out / "model", meta, model.state_dict())


def naive(bundle, paths: list[Path]) -> int:
    model = bundle.build()
    transform = eval_transform(bundle.data_config(), bundle.image_size)
    n = 0
    with torch.inference_mode():
        for p in paths:
            with Image.open(p) as im:
                x = transform(im.convert("RGB"))
            model(x[None]).softmax(1)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "catsdogs" / "val"))
    ap.add_argument("--n", type=int, default=400, help="photos per pass")
    ap.add_argument("--model", help="bundle folder (default: the demo architecture, random weights)")
    ap.add_argument(
        "--batch-size", type=int, default=CPU_BATCH, help=f"ours (default {CPU_BATCH}: catdog-predict's on CPU)"
    )
    ap.add_argument("--workers", type=int, default=CPU_DECODE_WORKERS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both sides (default: what catdog-predict picks, cores - workers, at least 1)",
    )
    args = ap.parse_args()
    # Both sides get the same thread count. catdog-predict's own choice; the naive loop gets the same, which on
    # a busy 2-core machine is also its best (2 threads made its single-image forwards 25x slower here).
    torch.set_num_threads(args.threads or max(1, default_workers() - args.workers))
    bf16 = cpu_has_bf16()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(args.model or demo_bundle(Path(tmp)))
        clfs = {
            p: TorchClassifier(
                bundle.meta, "bench", bundle.build(), device="cpu", precision=p, kind="pytorch", fuse=True
            )
            for p in ("fp32", "bf16")[: 1 + bf16]
        }
        # Every decode x precision; catdog-predict's default is exact decode at --precision auto (bf16 where the
        # CPU has it natively and the model trained in bf16, as the demo's did), its fastest --decode fast.
        variants = [(d, p) for d in ("exact", "fast") for p in clfs]
        default = f"ours exact {resolve_precision('auto', bundle.meta, 'cpu')}"
        paths = sorted(Path(args.src).rglob("*.jpg"))[: args.n]
        entries, _ = expand_inputs([str(p) for p in paths])
        print(
            f"{len(paths)} photos from {args.src}; model {bundle.meta['model']['name']} at {bundle.image_size} px "
            f"(prep {bundle.meta['prep']['image_size']} px); {torch.get_num_threads()} torch thread(s) on "
            f"{default_workers()} cores; ours: batch {args.batch_size}, {args.workers} decode workers"
        )
        rates: dict[str, list[float]] = {**{f"ours {d} {p}": [] for d, p in variants}, "naive fp32": []}
        for r in range(args.repeats):
            for decode, precision in variants:
                opts = Namespace(
                    batch_size=args.batch_size, workers=args.workers, tta="none", no_progress=True, decode=decode
                )
                rows, seconds = predict(clfs[precision], entries, [], opts)
                assert sum(row[1] is not None for row in rows) == len(paths)
                rates[f"ours {decode} {precision}"].append(len(paths) / seconds)
            t0 = time.perf_counter()
            naive(bundle, paths)
            rates["naive fp32"].append(len(paths) / (time.perf_counter() - t0))
            print(f"repeat {r}: " + "  ".join(f"{k} {v[-1]:6.1f}" for k, v in rates.items()) + " (img/s)")
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in med.items():
            print(f"median {k}: {v:.1f} img/s")
        if not bf16:
            print("bf16: not supported by this CPU (no AVX512-BF16/AMX), not measured")
        base = med.pop("naive fp32")
        for k, v in med.items():
            if k != default:
                print(f"ratio {k} / naive: {v / base:.2f}x")
        print(f"ratio {default} (catdog-predict's default) / naive: {med[default] / base:.2f}x")


if __name__ == "__main__":
    main()
