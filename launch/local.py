"""Local launch: build and run the `accelerate launch` command for this machine's GPUs (or CPU ranks), alone or as one
of several machines (each runs the same command with its own --machine-rank)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from data_prep.progress import ENV, progress_mode
from train.config import Config, ConfigError
from train.config_io import load_config

from .network import plan
from .preflight import check_data
from .relay import FailureRelay

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


def launch_config_file(multi: bool) -> Path:
    """catdog's own accelerate config for a local launch (one or several processes), shipped with the package.

    What `accelerate launch` would otherwise read from the user's ~/.cache/huggingface/accelerate/default_config.yaml
    and apply to every launch but --cpu: its gpu_ids (replacing CUDA_VISIBLE_DEVICES), its distributed_type (a
    MULTI_GPU default turns a 1-GPU run into a failing multi-GPU one; DEEPSPEED/FSDP are other launchers). catdog's
    launches are plain DDP, so they name their own config; the command line's flags fill in the rest. A file in the
    package, not one written at launch: a --dry-run writes nothing, and the command it prints runs as it is.
    """
    return Path(__file__).resolve().parent / ("accelerate_multi.yaml" if multi else "accelerate_single.yaml")


def _ranks(train_cpu: bool, gpus: int | None, cpu_ranks: int | None, available_gpus: int) -> tuple[bool, int]:
    """(on CPU, number of processes) of a local launch."""
    on_cpu = cpu_ranks is not None or available_gpus == 0 or train_cpu
    return on_cpu, (cpu_ranks or 1) if on_cpu else (gpus or available_gpus)


def accelerate_command(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    gpus: int | None = None,
    cpu_ranks: int | None = None,
    available_gpus: int,
    port: int,
    visible_devices: str | None = None,
    cfg: Config | None = None,
    machines: int = 1,
    machine_rank: int = 0,
    main_ip: str = "",
) -> list[str]:
    """The `accelerate launch ... -m train --config ...` argv.

    gpus=None uses every visible GPU; without GPUs, one CPU process unless cpu_ranks asks for N gloo ranks.
    `accelerate launch --cpu` starts a single process whatever --num_processes says, so several CPU ranks go
    through the multi-GPU launcher (torchrun underneath) with train.cpu=true, which makes the trainer's
    Accelerator(cpu=True) pick the MULTI_CPU/gloo path. ``visible_devices`` is the caller's CUDA_VISIBLE_DEVICES
    (None when unset): a subset of GPUs is named by its physical ids (see ``gpu_ids_for``). ``cfg``: the config and
    overrides already loaded by the caller. ``machines`` > 1: this machine is ``machine_rank`` of them, each starting
    the same number of ranks; ``main_ip`` is the address of machine rank 0, where ``port`` is the rendezvous.
    """
    if cfg is None:
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
    check_machines(machines, machine_rank)
    if machines > 1 and not main_ip:
        raise ConfigError(f"--num-machines {machines}: pass --main-process-ip, the address of machine rank 0")
    on_cpu, n = _ranks(cfg.train.cpu, gpus, cpu_ranks, available_gpus)
    total = n * machines
    cmd = [_accelerate_bin(), "launch", "--config_file", str(launch_config_file(total > 1))]
    cmd += ["--num_machines", str(machines)]
    # The trainer passes its precision to Accelerator() itself (which wins over this flag); `auto` is resolved
    # there, per device, so the launcher only needs a valid value to not warn about a missing one.
    precision = "no" if cfg.train.mixed_precision in ("auto", "fp32") else cfg.train.mixed_precision
    cmd += ["--mixed_precision", precision, "--dynamo_backend", "no"]
    if total > 1:
        # --num_processes counts the ranks of all machines; accelerate starts total / machines here.
        cmd += ["--multi_gpu", "--num_processes", str(total), "--main_process_port", str(port)]
        if machines > 1:
            # --same_network: torchrun gets the main machine's address and port as they are (static rendezvous).
            cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_ip, "--same_network"]
    else:
        cmd += ["--num_processes", "1"] + (["--cpu"] if on_cpu else [])
    if not on_cpu and n < available_gpus:
        cmd += ["--gpu_ids", gpu_ids_for(n, visible_devices)]
    cmd += ["-m", "train", "--config", str(config), *overrides]
    if on_cpu and not cfg.train.cpu:
        cmd.append("train.cpu=true")
    return cmd


def check_machines(machines: int, machine_rank: int) -> None:
    if machines < 1 or not 0 <= machine_rank < machines:
        raise ConfigError(
            f"--machine-rank {machine_rank} with --num-machines {machines}: use 0 .. {max(machines - 1, 0)}"
        )


def run_local(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    gpus: int | None = None,
    cpu_ranks: int | None = None,
    port: int | None = None,
    dry_run: bool = False,
    machines: int = 1,
    machine_rank: int = 0,
    main_address: str = "",
    no_progress: bool = False,
) -> int:
    """Print the command, then (unless dry_run) check the data folder, run the command in the foreground and return
    its exit code (the trainer's, when it explained a failure: launch/relay.py). A dry run writes nothing.

    Several machines (``machines`` > 1): ``main_address`` (a name or an address of machine rank 0) is given to torch
    as the address every machine uses, and GLOO/NCCL_SOCKET_IFNAME, unless set, name the interface that routes to it
    (launch/network.py); ``port`` must be given, the same on every machine.
    """
    available = 0 if cpu_ranks else visible_gpus()
    cfg = load_config(config, overrides)  # fail here, not in N ranks, on a bad config or override
    if not dry_run:
        check_data(cfg)  # a wrong data.dir too: one line here, not one per rank after accelerate started them
    env = dict(os.environ)
    main_ip = ""
    check_machines(machines, machine_rank)
    if machines > 1:
        if not port:
            raise ConfigError(f"--num-machines {machines}: pass --port, the same free port on every machine")
        if not main_address:
            raise ConfigError(f"--num-machines {machines}: pass --main-process-ip, the address of machine rank 0")
        net = plan(main_address, is_master=machine_rank == 0, nodes=machines)
        print(f"machine {machine_rank} of {machines}: " + net.apply(env), file=sys.stderr, flush=True)
        main_ip = net.master_addr
    cmd = accelerate_command(
        config,
        overrides,
        gpus=gpus,
        cpu_ranks=cpu_ranks,
        available_gpus=available,
        port=port or free_port(),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        cfg=cfg,
        machines=machines,
        machine_rank=machine_rank,
        main_ip=main_ip,
    )
    if available == 0 and cpu_ranks is None:
        # One process, not gloo ranks: its torch threads already use every core, and N ranks would split those
        # cores N ways and add an all-reduce per step. Say so: users coming from multi-GPU expect ranks.
        print(NO_GPU_NOTE, file=sys.stderr, flush=True)
    on_cpu, n = _ranks(cfg.train.cpu, gpus, cpu_ranks, available)
    if on_cpu and not env.get("OMP_NUM_THREADS"):
        # torchrun sets OMP_NUM_THREADS=1 for several processes, and accelerate --cpu the machine's physical core
        # count (ignoring taskset/cgroup limits); the trainer would take either as the user's choice. Each CPU
        # rank gets its share of the CPUs this process may use (what data_prep.cpus.threads_per_rank would pick).
        from data_prep.cpus import usable_cpus

        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // n))
    shown = [f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"] if on_cpu else []
    print(shlex.join([*shown, *cmd]), flush=True)
    if dry_run:
        return 0
    # The ranks' stderr reaches the terminal through this process (launch/relay.py), so they cannot see whether it
    # is one: tell them what progress display to use, and how wide the terminal is.
    env[ENV] = "off" if no_progress else progress_mode()
    env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    return run_forwarding_signals(cmd, env, relay=FailureRelay(sys.stderr.buffer))


def run_forwarding_signals(cmd: Sequence[str], env: dict, relay: FailureRelay | None = None) -> int:
    """Run ``cmd`` to the end, passing the terminal's and `kill`'s signals on to it; its exit code (128 + N when a
    signal N ended it, as a shell reports). ``relay``: the command's stderr goes through it (launch/relay.py), and
    the exit code is the one it reports.

    `accelerate launch` hosts torchrun's agent, which stops its ranks gracefully on SIGINT/SIGTERM (the signal to
    every rank, SIGKILL 30 s later); a one-process launch runs the trainer as its plain child. subprocess.run would
    SIGKILL accelerate 0.25 s after a Ctrl-C, and torchrun starts the ranks in sessions of their own, so they went
    on training as orphans holding their GPUs; a `kill` of this process never reached them. So the command runs in
    a session of its own, and each signal goes to its whole process group (accelerate and a one-process trainer;
    torchrun's ranks hear it from the agent) -- once, whether it came from the terminal or from `kill`. Ctrl-Z
    stops that group (SIGSTOP: an orphaned group discards SIGTSTP) and `fg`/`bg` continue it: a one-process
    trainer with it, but not torchrun's ranks, which run in sessions of their own and train on while the launch
    is stopped (as under a plain `accelerate launch`). A signal ignored when this started (nohup, a script's
    background job) stays ignored for the command too.
    """
    import signal

    child: list[subprocess.Popen] = []
    pending: list[int] = []  # signals that came while the child was still starting

    def to_group(signum: int) -> None:
        try:
            os.killpg(child[0].pid, signum)
        except ProcessLookupError:  # it has exited (reaped between two signals)
            pass

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        if child:
            to_group(signum)
        else:
            pending.append(signum)

    def stop(signum, frame):  # noqa: ARG001
        if child:
            to_group(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # this process stops here until the shell continues it
        signal.signal(signal.SIGTSTP, stop)
        if child:
            to_group(signal.SIGCONT)

    handlers = {signal.SIGINT: forward, signal.SIGTERM: forward, signal.SIGHUP: forward, signal.SIGQUIT: forward}
    handlers[signal.SIGTSTP] = stop
    # Installed before the child starts: a Ctrl-C in between must not orphan it.
    previous = {s: signal.signal(s, h) for s, h in handlers.items() if signal.getsignal(s) is not signal.SIG_IGN}
    reader = None
    try:
        child.append(subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE if relay else None))
        if relay is not None:
            reader = threading.Thread(target=_pump, args=(child[0].stderr, relay), daemon=True)
            reader.start()
        for signum in pending:
            to_group(signum)
        rc = child[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    rc = 128 - rc if rc < 0 else rc
    if reader is None:
        return rc
    reader.join(timeout=10)  # a rank that outlived the launcher may hold the pipe: do not wait for it forever
    return relay.finish(rc)


def _pump(stream, relay: FailureRelay) -> None:
    while chunk := stream.read1(65536):
        relay.feed(chunk)
