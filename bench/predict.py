"""catdog-predict throughput vs a naive loop, same photos, same model, same machine, one run; the ratio last.

- ours: what catdog-predict runs after loading the model (``train.predict.predict``) with its CPU defaults: batches of
  32, one worker process per CPU that decodes a batch and scores it (``train.use.inputs.scored_batches``), BatchNorm
  folded into the convolutions, channels_last; with each decode (``fast``, the default: catdog-prep's decode straight
  to the model's size, JPEG ``draft()`` for big photos; ``exact``: the pixels validation saw) and precision (fp32;
  bf16 where the CPU runs it natively, which ``--precision auto``, the default, picks for a bf16-trained model such
  as the demo's);
- naive: for each photo, ``Image.open`` + ``convert("RGB")``, the eval transform (train.transforms), the model
  on that one image; timed with torch's default thread count (every core) and with 1 thread, and the faster of the
  two is the baseline (2 threads win on a quiet 2-core machine, 1 on a busy one).

Passes alternate (ours variants, naive, ours variants, ...) so load from other processes hits both alike; medians are
printed.

    .venv/bin/python bench/predict.py [--src PHOTOS/val] [--n 1000] [--model BUNDLE] [--repeats 3]

Without --model, the scratch CNN of configs/cnn.yaml and configs/demo.yaml (the same model, fed from 192-px catdog-prep shards) is built with
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

from data_prep.cpus import decode_workers, usable_cpus
from data_prep.fetch import photos_by_split
from data_prep.info import DatasetInfo
from data_prep.prepare import PrepArgs
from train.config_io import load_config
from train.data.transforms import eval_transform
from train.formats.bundle import load_bundle, make_meta, write_bundle
from train.hardware.memory import keep_freed_memory
from train.hardware.precision import cpu_has_bf16
from train.models.registry import build_model
from train.use.classifier import TorchClassifier, resolve_precision
from train.use.inputs import expand_inputs, scores_in_workers
from train.use.predict import CPU_BATCH, predict

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


def naive(model, transform, paths: list[Path]) -> int:
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
    ap.add_argument(
        "--src", help="photos to classify (default: the val photos of CATDOG_REAL_DATA or make demo's download)"
    )
    ap.add_argument("--n", type=int, default=1000, help="photos per pass")
    ap.add_argument("--model", help="bundle folder (default: the demo architecture, random weights)")
    ap.add_argument(
        "--batch-size", type=int, default=CPU_BATCH, help=f"ours (default {CPU_BATCH}: catdog-predict's on CPU)"
    )
    ap.add_argument("--workers", type=int, help="ours (default: catdog-predict's on CPU, one per CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.src = args.src or str(photos_by_split() / "val")
    default_threads = torch.get_num_threads()  # what a script that sets nothing gets: every core
    # As catdog-predict does on CPU before its workers fork (train/hardware/memory.py): the batch's activations stay in
    # the heap instead of being mapped and faulted in again per batch. Process-wide, so the naive loop has it too.
    keep_freed_memory()
    bf16 = cpu_has_bf16()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(args.model or demo_bundle(Path(tmp)))
        clfs = {
            p: TorchClassifier(
                bundle.meta, "bench", bundle.build(), device="cpu", precision=p, kind="pytorch", fuse=True
            )
            for p in ("fp32", "bf16")[: 1 + bf16]
        }
        clf0 = clfs["fp32"]
        naive_model = bundle.build().eval()  # as loaded: not fused, not channels_last
        transform = eval_transform(bundle.data_config(), bundle.image_size)
        workers = decode_workers(False, scores=scores_in_workers(clf0)) if args.workers is None else args.workers
        # catdog-predict's threads for its own process (its workers run one each)
        ours_threads = max(1, usable_cpus() - workers)
        # Every decode x precision; catdog-predict's default is fast decode at --precision auto (bf16 where the CPU
        # has it natively and the model trained in bf16, as the demo's did).
        variants = [(d, p) for d in ("fast", "exact") for p in clfs]
        default = f"ours fast {resolve_precision('auto', bundle.meta, 'cpu')}"
        paths = sorted(Path(args.src).rglob("*.jpg"))[: args.n]
        entries, _ = expand_inputs([str(p) for p in paths])
        print(
            f"{len(paths)} photos from {args.src}; model {bundle.meta['model']['name']} at {bundle.image_size} px "
            f"(prep {bundle.meta['prep']['image_size']} px) on {usable_cpus()} cores; ours: batch "
            f"{args.batch_size}, {workers} worker processes "
            f"({'decoding and scoring' if scores_in_workers(clf0) else 'decoding'}); naive: {default_threads} and 1 "
            "torch thread(s)"
        )
        naive_threads = {f"naive fp32 {default_threads}t": default_threads, "naive fp32 1t": 1}
        rates: dict[str, list[float]] = {
            **{f"ours {d} {p}": [] for d, p in variants},
            **{k: [] for k in naive_threads},
        }
        for r in range(args.repeats):
            torch.set_num_threads(ours_threads)
            for decode, precision in variants:
                opts = Namespace(
                    batch_size=args.batch_size, workers=workers, tta="none", no_progress=True, decode=decode
                )
                rows, seconds = predict(clfs[precision], entries, [], opts)
                assert sum(row[1] is not None for row in rows) == len(paths)
                rates[f"ours {decode} {precision}"].append(len(paths) / seconds)
            for name, threads in naive_threads.items():
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                assert naive(naive_model, transform, paths) == len(paths)
                rates[name].append(len(paths) / (time.perf_counter() - t0))
            print(f"repeat {r}: " + "  ".join(f"{k} {v[-1]:6.1f}" for k, v in rates.items()) + " (img/s)")
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in med.items():
            print(f"median {k}: {v:.1f} img/s")
        if not bf16:
            print("bf16: not supported by this CPU (no AVX512-BF16/AMX), not measured")
        naive_name = max(naive_threads, key=lambda k: med[k])
        base = med[naive_name]
        print(f"baseline: {naive_name} (the faster naive loop)")
        for k, v in med.items():
            if k.startswith("ours") and k != default:
                print(f"ratio {k} / naive: {v / base:.2f}x")
        print(f"ratio {default} (catdog-predict's default) / naive: {med[default] / base:.2f}x")


if __name__ == "__main__":
    main()
