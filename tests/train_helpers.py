"""Shared by the trainer tests: small real shards and a bounded `python -m train` / `accelerate launch` runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from data_shards import tiny_jpegs, write_shards
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Train 40 / val 11 / test 5 real photos in uneven shards (odd counts: uneven eval batches across ranks).
LENGTHS = {"train": [16, 8, 16], "val": [6, 5], "test": [5]}

# Tiny and fast: 64 px, width 8, three blocks. Every test adds what it checks on top.
TINY = [
    "model.image_size=64",
    "model.width=8",
    "model.depth=3",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "train.batch_size=8",
    "eval.batch_size=8",
    "track.backends=[csv]",
    "train.mixed_precision=no",  # fp32: the equality checks across layouts are not about bf16 rounding
]


def make_shards(real_data: Path, root: Path) -> Path:
    write_shards(root, tiny_jpegs(real_data, sum(sum(v) for v in LENGTHS.values())), LENGTHS)
    return root


def env(**extra: str) -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out.pop("WANDB_API_KEY", None)
    out.update(extra)
    return out


def train_cmd(overrides: list[str], *, procs: int = 1, port: int = 0) -> list[str]:
    """`python -m train ...`, or `accelerate launch --multi_gpu --num_processes N` (gloo ranks on CPU)."""
    if procs == 1:
        return [sys.executable, "-m", "train", *overrides]
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(procs)]
    return [*launch, "--main_process_port", str(port), "-m", "train", *overrides]


def run_train(overrides: list[str], *, procs: int = 1, port: int = 0, timeout: int = 240, **extra_env: str):
    """Run to completion; a hang becomes a TimeoutExpired failure instead of a stuck CI job."""
    proc = subprocess.run(
        train_cmd(overrides, procs=procs, port=port),
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_train_failing(overrides: list[str], *, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python -m train` on bad input: it must exit non-zero with one `catdog-train: ...` line, no traceback."""
    proc = subprocess.run(train_cmd(overrides), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, f"expected a failure\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("catdog-train:")]) == 1, proc.stderr
    return proc


def final_weights(run_dir: Path) -> dict:
    """The model weights of the newest checkpoint (what a later resume or evaluation would load)."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts, f"no checkpoint in {run_dir}"
    return load_file(str(ckpts[-1] / "model.safetensors"))


def run_env_ranks(
    overrides: list[str], *, world: int, port: int, timeout: int = 240, rank_envs: list[dict] | None = None
) -> list[str]:
    """Start `world` plain `python -m train` processes with the variables submitit's
    TorchDistributedEnvironment().export() sets (no launcher): what a SLURM task runs. ``rank_envs``: extra
    variables per rank (ranks that see different things). Returns each rank's output."""
    procs = []
    for rank in range(world):
        rank_env = env(
            **(rank_envs[rank] if rank_envs else {}),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                train_cmd(overrides),
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exit {p.returncode}\n{out[-6000:]}"
    return outputs
