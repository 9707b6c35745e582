"""Training-step throughput: our loop (Accelerator + train_one_epoch) vs a bare PyTorch loop, same process.

    .venv/bin/python bench/step.py [--config configs/cnn.yaml] [--steps 8] [--reps 5] [key=value ...]

Same model (built from the config), batch, precision and in-memory data for both, so the difference is the
trainer's overhead (accumulate context, DDP-free prepare, progress bar, metric sums, lr setting). Runs the two
loops alternately ``--reps`` times (order swapped each time, so machine drift hits both), prints the median
images/s of each and, last, the ratio ours / bare (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.config_io import load_config  # noqa: E402
from train.hardware.precision import choose_precision  # noqa: E402
from train.loop.epoch import EpochTotals, StepRecipe, train_one_epoch  # noqa: E402
from train.models.registry import build_model  # noqa: E402


def bare_loop(model, opt, batches, lr: float, autocast_dtype) -> float:
    """The reference: what one would write by hand. Returns seconds."""
    model.train()
    t0 = time.perf_counter()
    for x, y in batches:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the loop reads the loss too (logging): the same host sync as ours
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "cnn.yaml"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["data.dir=unused", *args.overrides])
    if args.threads:
        torch.set_num_threads(args.threads)
    precision, _ = choose_precision(cfg.train.mixed_precision, "cpu")  # "auto" -> what the trainer would pick
    precision = precision if precision != "fp16" else "no"
    acc = Accelerator(cpu=True, mixed_precision=precision)
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    size, batch = cfg.model.input_size(), cfg.train.batch_size
    print(
        f"model {cfg.model.name} width {cfg.model.width} depth {cfg.model.depth} @ {size}px, batch {batch}, "
        f"precision {precision}, channels_last {cfg.train.channels_last}, {torch.get_num_threads()} threads, "
        f"{args.steps} steps x {args.reps} reps"
    )

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 2, (batch,), generator=g))]
    batches = batches * args.steps  # in memory, identical for both loops

    torch.manual_seed(0)
    bare = build_model(cfg.model, 2)
    ours = build_model(cfg.model, 2)
    ours.load_state_dict(bare.state_dict())
    cl = cfg.train.channels_last  # as the trainer does: model and inputs in NHWC (1.45x the fp32 step on AVX2 here)
    if cl:
        bare, ours = bare.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=cfg.optim.lr)
    ours_model, ours_opt = acc.prepare(ours, torch.optim.AdamW(ours.parameters(), lr=cfg.optim.lr))

    def run_ours() -> float:
        t0 = time.perf_counter()
        train_one_epoch(
            ours_model,
            batches,
            ours_opt,
            acc,
            lr_fn=lambda step: cfg.optim.lr,
            step=0,
            start_batch=0,
            num_batches=len(batches),
            totals=EpochTotals(),
            recipe=StepRecipe(channels_last=cl),
        )
        return time.perf_counter() - t0

    def run_bare() -> float:
        return bare_loop(bare, bare_opt, batches, cfg.optim.lr, autocast_dtype)

    run_bare(), run_ours()  # warm-up: allocator, oneDNN kernel selection
    ours_ips, bare_ips = [], []
    for rep in range(args.reps):
        order = (run_bare, run_ours) if rep % 2 == 0 else (run_ours, run_bare)
        for fn in order:
            ips = len(batches) * batch / fn()
            (bare_ips if fn is run_bare else ours_ips).append(ips)
    print()  # end the progress bar's line
    print(f"bare PyTorch loop : median {statistics.median(bare_ips):7.1f} img/s  {[round(v, 1) for v in bare_ips]}")
    print(f"catdog trainer    : median {statistics.median(ours_ips):7.1f} img/s  {[round(v, 1) for v in ours_ips]}")
    print(f"ratio trainer/bare (target >= 0.95): {statistics.median(ours_ips) / statistics.median(bare_ips):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
