"""`catdog-launch` (or `python -m launch`): local | slurm | status | summarize.

catdog-launch local --config configs/cnn.yaml [--gpus N | --cpu-ranks N] [--out RUN_DIR] [--dry-run] key=value ...
                    [--num-machines M --machine-rank R --main-process-ip HOST --port P] [--no-progress]
catdog-launch slurm --config configs/cnn.yaml --nodes 2 --gpus-per-node 4 [--slurm-config F] [--sweep S]
                    [--out RUN_DIR] [--dry-run] [--wait] [--no-progress] key=value ...
catdog-launch status RUN_DIR
catdog-launch summarize RUNS_DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from data_prep.cli import Parser, add_no_progress, add_out
from data_prep.info import InfoError
from data_prep.progress import ENV
from train.config import ConfigError
from train.config_io import load_config, with_out

from .network import NetworkError
from .slurm import SubmitError
from .slurm_follow import JobLostError

# SLURM flags -> SlurmConfig fields; a flag left out keeps the value from --slurm-config (or the default).
_SLURM_FLAGS = {
    "nodes": (int, "nodes (default 1)"),
    "gpus_per_node": (int, "GPUs per node; one task (rank) per GPU. 0 = CPU ranks (default)"),
    "tasks_per_node": (int, "CPU ranks per node when --gpus-per-node is 0 (default 1)"),
    "cpus_per_task": (
        int,
        "CPUs per rank: the rank + its data workers (default: GPU jobs the node's CPUs / its GPUs, from sinfo; "
        "CPU jobs 1)",
    ),
    "mem": (str, "memory per node, e.g. 64G (default: the partition's)"),
    "time": (str, "time limit, e.g. 4:00:00 or 1-00:00:00 (default 4:00:00)"),
    "partition": (str, "partition (default: the cluster's default)"),
    "account": (str, "account to charge"),
    "qos": (str, "quality of service"),
    "constraint": (str, "node features, e.g. a100"),
    "exclude": (str, "nodes to avoid, e.g. node[1-3]"),
    "job_name": (str, "job name (default catdog)"),
    "array_parallelism": (int, "sweep points running at once (default 256)"),
    "signal_delay_s": (int, "USR2 this many seconds before the time limit -> checkpoint + requeue (default 120)"),
    "max_num_timeout": (int, "requeues after a time limit before giving up (default 3)"),
}


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="catdog-launch", description="Launch catdog training locally or on SLURM.")
    sub = p.add_subparsers(dest="command", required=True)

    loc = sub.add_parser("local", help="run `accelerate launch` on this machine")
    loc.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    loc.add_argument("--gpus", type=int, help="GPUs to use (default: all visible)")
    loc.add_argument(
        "--cpu-ranks",
        type=int,
        metavar="N",
        help="train on CPU with N ranks over gloo. Default with no GPU visible: 1 CPU process (no gloo), whose "
        "torch threads use every core",
    )
    loc.add_argument(
        "--port",
        "--main-process-port",
        dest="port",
        type=int,
        help="rendezvous port for several ranks (default: a free one); with several machines the main machine's, "
        "the same on every machine (required)",
    )
    loc.add_argument(
        "--num-machines",
        type=int,
        default=1,
        metavar="M",
        help="machines taking part; each runs this same command with its own --machine-rank (default 1)",
    )
    loc.add_argument("--machine-rank", type=int, default=0, metavar="R", help="this machine's rank, 0 .. M-1")
    loc.add_argument(
        "--main-process-ip",
        default="",
        metavar="HOST",
        help="name or address of machine rank 0 (several machines); the ranks' network interface is the one that "
        "routes to it unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set",
    )
    loc.add_argument("--dry-run", action="store_true", help="print the command without running it (writes nothing)")
    add_out(loc, "the run directory (the same as run.dir=DIR)", metavar="DIR")
    add_no_progress(loc)
    loc.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")

    slu = sub.add_parser("slurm", help="submit to SLURM through submitit (one task per GPU)")
    slu.add_argument("--config", help="training YAML (configs/*.yaml); optional with a --sweep that names one")
    slu.add_argument("--slurm-config", help="SLURM settings YAML (configs/slurm/*.yaml); flags override it")
    slu.add_argument("--sweep", help="sweep YAML (sweeps/*.yaml): one job-array element per point")
    for name, (typ, text) in _SLURM_FLAGS.items():
        slu.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)
    slu.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script submitit would submit (writes nothing; checks the partition where sinfo runs)",
    )
    add_out(slu, "the run directory (the same as run.dir=DIR); a sweep's points go under it", metavar="DIR")
    add_no_progress(slu)
    slu.add_argument(
        "--wait",
        action="store_true",
        help="follow the job(s), streaming rank 0's log, until done; exit 1 unless all COMPLETED, or if SLURM "
        "reports no state for a job for 60 s (sacct and squeue both do not know it)",
    )
    slu.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-3")

    st = sub.add_parser("status", help="state, logs and newest metrics of a run dir (or a sweep)")
    st.add_argument("run_dir")

    sm = sub.add_parser("summarize", help="final metrics of every point of a sweep, side by side")
    sm.add_argument("runs_dir")
    return p


def _local(args: argparse.Namespace) -> int:
    from .local import run_local

    return run_local(
        args.config,
        with_out(args.overrides, args.out),
        gpus=args.gpus,
        cpu_ranks=args.cpu_ranks,
        port=args.port,
        dry_run=args.dry_run,
        machines=args.num_machines,
        machine_rank=args.machine_rank,
        main_address=args.main_process_ip,
        no_progress=args.no_progress,
    )


def _slurm(args: argparse.Namespace) -> int:
    from .slurm import job_config, launch
    from .slurm_config import load_slurm_config
    from .slurm_follow import follow
    from .sweep import load_sweep, summarize, write_table

    given = {k: getattr(args, k) for k in _SLURM_FLAGS if getattr(args, k) is not None}
    slurm = load_slurm_config(args.slurm_config, given)
    args.overrides = with_out(args.overrides, args.out)
    if args.no_progress:  # the job's log gets no progress lines (by default: one every 30 s)
        slurm = replace(slurm, setup=[*slurm.setup, f"export {ENV}=off"])
    if args.sweep:
        sweep = load_sweep(args.sweep)
        args.config = args.config or sweep.config
        if args.config is None:
            raise ConfigError(f"pass --config: {args.sweep} names no `config:`")
        root = Path(load_config(args.config, args.overrides).run.dir).resolve()
        points = []
        for p in sweep.points:
            try:
                cfg = job_config(args.config, [*args.overrides, *p.overrides, f"run.dir={root / p.name}"], slurm)
            except ConfigError as e:
                raise ConfigError(f"{args.sweep}, point {p.name}: {e}") from e
            points.append((p.name, cfg))
        folder = root / "slurm"
    else:
        if args.config is None:
            raise ConfigError("pass --config (a training YAML from configs/)")
        cfg = job_config(args.config, args.overrides, slurm)
        points = [(Path(cfg.run.dir).name, cfg)]
        folder = Path(cfg.run.dir) / "slurm"

    submitted = launch(points, slurm, folder, dry_run=args.dry_run)
    if args.sweep and submitted:
        rows = [
            {"point": s.name, "job_id": s.job.job_id, "run_dir": str(s.run_dir), "overrides": " ".join(p.overrides)}
            for s, p in zip(submitted, sweep.points, strict=True)
        ]
        print(f"sweep table {write_table(root, rows)}; results: catdog-launch summarize {root}")
    if not (args.wait and submitted):
        return 0
    states = follow(submitted)
    print("final state: " + ", ".join(f"{s.name} {states[s.job.job_id]}" for s in submitted))
    if args.sweep:
        summarize(root, sys.stdout, states=states)
    return 0 if all(st == "COMPLETED" for st in states.values()) else 1


def _status(args: argparse.Namespace) -> int:
    from .status import show_status

    show_status(args.run_dir, sys.stdout)
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from .sweep import summarize

    return 0 if summarize(args.runs_dir, sys.stdout) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may sit between options (`--nodes 2 optim.lr=3e-3 --wait`): whatever the first pass leaves over
    # must be key=value.
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    handler = {"local": _local, "slurm": _slurm, "status": _status, "summarize": _summarize}[args.command]
    try:
        return handler(args)
    except (ConfigError, NetworkError, InfoError) as e:
        print(f"catdog-launch: error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:  # sbatch's own message was printed above it
        print(f"catdog-launch: {e}", file=sys.stderr)
        return 1
    except JobLostError as e:  # --wait stopped following; the job itself may still run
        print(f"catdog-launch: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
