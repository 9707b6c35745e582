"""GPU check: training-step throughput and peak memory of catdog's two models, in bf16 and fp16, eager and compiled.

    .venv/bin/python bench/gpu.py                                  # one CUDA GPU: the full check (< 5 min on an H100)
    .venv/bin/python bench/gpu.py --device cpu --steps 2          # tiny mode: a smoke test that runs anywhere

For each of the scratch CNN (configs/cnn.yaml's model settings) and InceptionV3 at 299 px (configs/inception_v3.yaml,
random init, every layer training, auxiliary loss on): ``--steps`` optimizer steps (AdamW) with autocast in bf16
and in fp16 (fp16 with a GradScaler), channels_last, with and without ``torch.compile``. On CUDA, TF32 matmuls and
cudnn.benchmark are on (what the trainer enables there).

The batches are SYNTHETIC: one fixed random batch already on the device, so the numbers are the training step alone
(forward, backward, optimizer), not the data pipeline. The loss is never read inside the timed loop (no host
sync per step); the clock stops after a device synchronize. Images/s = steps x batch / time; peak memory is
torch.cuda.max_memory_allocated over the row (warm-up and compilation included). The compile column's "warm-up s"
is the time of the warm-up steps, i.e. mostly compilation.

With 2 or more GPUs (or ``--ranks 2`` on any device) it also runs the CNN in bf16 on 2 ranks under DDP through
torchrun (NCCL on CUDA, gloo on CPU), each rank with the same per-rank batch, and reports the global images/s.
Rows that would start after ``--budget-s`` (210 s: a compiled InceptionV3 row may take ~90 s) are skipped and say
so, so the whole check stays under 5 minutes; the JSON is rewritten after every row.

Tiny mode (``--device cpu``): batches of 4 (CNN) and 2 (InceptionV3, still 299 px: its auxiliary head needs it),
bf16 only and no compilation unless asked (CPU fp16 autocast is emulated and slow; inductor's C++ compile takes
minutes) -- it checks that every path runs, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.config import ModelConfig  # noqa: E402
from train.config_io import load_config  # noqa: E402
from train.models.registry import build_model  # noqa: E402

NUM_CLASSES = 2
AUX_WEIGHT = 0.4  # InceptionV3's auxiliary logits, as the trainer weights them (model.aux_loss_weight)


@dataclass
class Row:
    model: str
    size: int
    batch: int
    precision: str
    compiled: bool
    ranks: int = 1
    images_per_s: float = 0.0
    step_ms: float = 0.0
    warmup_s: float = 0.0
    peak_gib: float | None = None
    note: str = ""


def model_config(name: str) -> ModelConfig:
    """The model settings the shipped configs train with (InceptionV3: random init, all layers training)."""
    if name == "cnn":
        return load_config(ROOT / "configs" / "cnn.yaml", ["data.dir=unused"]).model
    overrides = ["data.dir=unused", "model.weights=none", "model.freeze_backbone=false", "model.trainable_blocks=-1"]
    overrides.append("train.precompute_features=false")  # a trained backbone, not cached features
    return load_config(ROOT / "configs" / "inception_v3.yaml", overrides).model


def loss_of(out, y: torch.Tensor) -> torch.Tensor:
    if isinstance(out, tuple):  # InceptionV3 in training: (logits, aux_logits)
        return F.cross_entropy(out[0].float(), y) + AUX_WEIGHT * F.cross_entropy(out[1].float(), y)
    return F.cross_entropy(out.float(), y)


def make_step(model, opt, scaler, device: torch.device, dtype: torch.dtype):
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype):
            out = model(x)
        loss = loss_of(out, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(row: Row, device: torch.device, steps: int, warmup: int, ddp: bool = False) -> Row:
    """Train ``steps`` steps after ``warmup`` ones on one synthetic batch; fill in the row's figures."""
    torch.manual_seed(0)
    cfg = model_config(row.model)
    model = build_model(cfg, NUM_CLASSES).to(device).to(memory_format=torch.channels_last)
    model.train()
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    dtype = torch.bfloat16 if row.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if row.precision == "fp16" else None
    net = torch.compile(model) if row.compiled else model
    x = torch.randn(row.batch, 3, row.size, row.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (row.batch,), device=device)
    step = make_step(net, opt, scaler, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x, y)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(device)
    seconds = time.perf_counter() - t1
    row.warmup_s = t1 - t0
    row.step_ms = 1000 * seconds / steps
    row.images_per_s = steps * row.batch * row.ranks / seconds
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    del net, model, opt, step, x, y
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: argparse.Namespace, ranks: int, timeout: float) -> Row:
    """The CNN in bf16 on ``ranks`` DDP ranks, started by torchrun; rank 0 reports its row as one JSON line."""
    batch = args.cnn_batch
    row = Row("cnn", model_config("cnn").input_size(), batch, "bf16", False, ranks=ranks)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(Path(__file__).resolve()), "--worker", "--device", args.device,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--cnn-batch", str(batch),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        row.note = f"timed out after {timeout:.0f} s"
        return row
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("{")), None)
    if res.returncode or line is None:
        row.note = f"torchrun failed (exit {res.returncode}): {(res.stderr.strip().splitlines() or ['?'])[-1]}"
        return row
    return Row(**json.loads(line))


def worker(args: argparse.Namespace) -> int:
    """One DDP rank (under torchrun): same per-rank batch on every rank, global images/s from rank 0."""
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        row = Row("cnn", model_config("cnn").input_size(), args.cnn_batch, "bf16", False, ranks=world)
        row = run_row(row, device, args.steps, args.warmup, ddp=True)
        peaks = [None] * world
        dist.all_gather_object(peaks, row.peak_gib)
        if dist.get_rank() == 0:
            row.peak_gib = max(peaks) if row.peak_gib is not None else None
            row.note = f"DDP, {args.cnn_batch} per rank, peak = the largest rank's"
            print(json.dumps(row.__dict__), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def table(rows: list[Row]) -> str:
    head = f"{'model':<12} {'px':>4} {'batch':>5} {'ranks':>5} {'prec':<5} {'compile':<7} "
    head += f"{'img/s':>9} {'ms/step':>8} {'warm-up s':>9} {'peak GiB':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = "scratch_cnn" if r.model == "cnn" else "inception_v3"
        peak = f"{r.peak_gib:8.2f}" if r.peak_gib is not None else f"{'-':>8}"
        speed = (
            f"{r.images_per_s:9,.0f} {r.step_ms:8.1f} {r.warmup_s:9.1f}"
            if r.images_per_s
            else f"{'-':>9} {'-':>8} {'-':>9}"
        )
        lines.append(
            f"{name:<12} {r.size:>4} {r.batch:>5} {r.ranks:>5} {r.precision:<5} {'yes' if r.compiled else 'no':<7} "
            f"{speed} {peak}  {r.note}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=200, help="timed steps per row (default 200)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 10, 1 with --steps < 10)")
    ap.add_argument("--models", default="cnn,inception", help="comma list of cnn, inception")
    ap.add_argument("--precisions", help="comma list of bf16, fp16 (default: both on CUDA, bf16 on CPU)")
    ap.add_argument("--compile", help="comma list of off, on = torch.compile (default: both on CUDA, off on CPU)")
    ap.add_argument("--cnn-batch", type=int, default=0, help="default: 256 on CUDA, 4 on CPU")
    ap.add_argument("--inception-batch", type=int, default=0, help="default: 64 on CUDA, 2 on CPU")
    ap.add_argument("--ranks", type=int, default=-1, help="DDP ranks for the 2-rank row; -1 = 2 if >= 2 GPUs, else 0")
    ap.add_argument("--budget-s", type=float, default=210, help="start no row after this many seconds (default 210)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = args.warmup or (10 if args.steps >= 10 else 1)
    args.cnn_batch = args.cnn_batch or (256 if cuda else 4)
    args.inception_batch = args.inception_batch or (64 if cuda else 2)  # BatchNorm in training needs 2
    args.precisions = args.precisions or ("bf16,fp16" if cuda else "bf16")
    args.compile = args.compile or ("off,on" if cuda else "off")
    bad = [m for m in args.models.split(",") if m not in ("cnn", "inception")]
    bad += [p for p in args.precisions.split(",") if p not in ("bf16", "fp16")]
    bad += [c for c in args.compile.split(",") if c not in ("off", "on")]
    if bad:
        ap.error(f"unknown value(s) {', '.join(bad)} in --models/--precisions/--compile")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA GPU visible; run with --device cpu for the tiny mode", file=sys.stderr)
        return 2
    start = time.perf_counter()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        name = f"{torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} visible, CUDA {torch.version.cuda}"
    else:
        name = f"CPU, {torch.get_num_threads()} threads (tiny mode: a smoke test, not a benchmark)"
    print(f"device: {name}; torch {torch.__version__}")
    print(
        f"synthetic batches (one fixed random batch on the device): training step only, not the data pipeline; "
        f"channels_last, AdamW; {args.steps} timed steps after {args.warmup} warm-up"
        + ("; TF32 + cudnn.benchmark on" if device.type == "cuda" else ""),
        flush=True,
    )
    sizes = {"cnn": model_config("cnn").input_size(), "inception": model_config("inception").input_size()}
    batches = {"cnn": args.cnn_batch, "inception": args.inception_batch}
    ranks = args.ranks if args.ranks >= 0 else (2 if device.type == "cuda" and torch.cuda.device_count() >= 2 else 0)
    single = [
        Row(m, sizes[m], batches[m], p, c == "on")
        for c in args.compile.split(",")
        for m in args.models.split(",")
        for p in args.precisions.split(",")
    ]
    # Eager rows, then the 2-rank row, then the compiled ones: compilation is what may run past the budget.
    plan = [r for r in single if not r.compiled] + (["ranks"] if ranks >= 2 else []) + [r for r in single if r.compiled]
    if ranks < 2:
        print("2-rank row: skipped (fewer than 2 GPUs; --ranks 2 forces it)")
    rows: list[Row] = []
    for item in plan:
        if time.perf_counter() - start > args.budget_s:
            row = item if isinstance(item, Row) else Row("cnn", sizes["cnn"], args.cnn_batch, "bf16", False, ranks)
            row.note = f"skipped: past the {args.budget_s:.0f} s budget"
        elif isinstance(item, Row):
            row = item
            try:
                run_row(row, device, args.steps, args.warmup)
            except Exception as e:  # one failing combination (e.g. a compiler error) must not hide the others
                row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        else:
            row = run_ranks(args, ranks, timeout=max(args.budget_s - (time.perf_counter() - start), 60))
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        if args.json:  # after every row: a run stopped by an outer timeout keeps what it measured
            Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    print()
    print(table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
