"""Local launch: build and run the `accelerate launch` command for this machine's GPUs (or CPU ranks)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from train.config import ConfigError, load_config

NO_GPU_NOTE = "no GPU visible: 1 CPU process; use --cpu-ranks N for N gloo ranks"


def visible_gpus() -> int:
    """GPUs this process may use (honours CUDA_VISIBLE_DEVICES)."""
    import torch  # late: `catdog-launch status/summarize` should not pay for importing torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_ids_for(n: int, visible: str | None) -> str:
    """The ``--gpu_ids`` value for the first ``n`` of the GPUs this process sees.

    accelerate writes ``--gpu_ids`` verbatim into the ranks' CUDA_VISIBLE_DEVICES (accelerate/utils/launch.py,
    ``prepare_multi_gpu_env``/``prepare_simple_launcher_cmd_env``), replacing the user's: ids are physical, not
    indices into the visible set. So with CUDA_VISIBLE_DEVICES=4,5,6,7 the first two GPUs are "4,5", not "0,1".
    Entries are passed through as written (UUIDs like GPU-xxxx and MIG-xxxx work the same way).
    """
    if visible is None:  # unset: CUDA numbers every GPU of the machine, so indices are physical ids
        return ",".join(str(i) for i in range(n))
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if len(entries) < n:
        raise ConfigError(f"--gpus {n}: CUDA_VISIBLE_DEVICES={visible!r} names only {len(entries)} GPU(s)")
    return ",".join(entries[:n])


def _accelerate_bin() -> str:
    """The `accelerate` next to this Python (the project's venv), else the one on PATH."""
    here = Path(sys.executable).parent / "accelerate"
    return str(here) if here.exists() else "accelerate"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    gpus: int | None = None,
    cpu_ranks: int | None = None,
    available_gpus: int,
    port: int,
    visible_devices: str | None = None,
) -> list[str]:
    """The `accelerate launch ... -m train --config ...` argv.

    gpus=None uses every visible GPU; without GPUs, one CPU process unless cpu_ranks asks for N gloo ranks.
    `accelerate launch --cpu` starts a single process whatever --num_processes says, so several CPU ranks go
    through the multi-GPU launcher (torchrun underneath) with train.cpu=true, which makes the trainer's
    Accelerator(cpu=True) pick the MULTI_CPU/gloo path. ``visible_devices`` is the caller's CUDA_VISIBLE_DEVICES
    (None when unset): a subset of GPUs is named by its physical ids (see ``gpu_ids_for``).
    """
    cfg = load_config(config, overrides)  # fail here, not in N ranks, on a bad config or override
    if gpus is not None and cpu_ranks is not None:
        raise ConfigError("--gpus and --cpu-ranks are exclusive: pick GPUs or CPU ranks")
    if gpus is not None and gpus < 1 or cpu_ranks is not None and cpu_ranks < 1:
        raise ConfigError("--gpus / --cpu-ranks must be >= 1")
    if gpus is not None and cfg.train.cpu:
        raise ConfigError(f"--gpus {gpus} with train.cpu=true in {config}: drop one (CPU ranks: --cpu-ranks N)")
    if gpus is not None and gpus > available_gpus:
        raise ConfigError(
            f"--gpus {gpus}: only {available_gpus} GPU(s) visible here"
            + ("; use --cpu-ranks N to train on CPU" if available_gpus == 0 else "")
        )
    on_cpu = cpu_ranks is not None or available_gpus == 0 or cfg.train.cpu
    n = (cpu_ranks or 1) if on_cpu else (gpus or available_gpus)
    cmd = [_accelerate_bin(), "launch", "--num_machines", "1"]
    # The trainer passes its precision to Accelerator() itself (which wins over this flag); `auto` is resolved
    # there, per device, so the launcher only needs a valid value to not warn about a missing one.
    precision = "no" if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    cmd += ["--mixed_precision", precision, "--dynamo_backend", "no"]
    if n > 1:
        cmd += ["--multi_gpu", "--num_processes", str(n), "--main_process_port", str(port)]
    else:
        cmd += ["--num_processes", "1"] + (["--cpu"] if on_cpu else [])
    if not on_cpu and n < available_gpus:
        cmd += ["--gpu_ids", gpu_ids_for(n, visible_devices)]
    cmd += ["-m", "train", "--config", str(config), *overrides]
    if on_cpu and not cfg.train.cpu:
        cmd.append("train.cpu=true")
    return cmd


def run_local(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    gpus: int | None = None,
    cpu_ranks: int | None = None,
    port: int | None = None,
    dry_run: bool = False,
) -> int:
    """Print the command, then (unless dry_run) run it in the foreground and return its exit code."""
    available = 0 if cpu_ranks else visible_gpus()
    cmd = accelerate_command(
        config,
        overrides,
        gpus=gpus,
        cpu_ranks=cpu_ranks,
        available_gpus=available,
        port=port or free_port(),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    if available == 0 and cpu_ranks is None:
        # One process, not gloo ranks: its torch threads already use every core, and N ranks would split those
        # cores N ways and add an all-reduce per step. Say so: users coming from multi-GPU expect ranks.
        print(NO_GPU_NOTE, file=sys.stderr, flush=True)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    return subprocess.run(cmd).returncode
