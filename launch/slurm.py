"""SLURM launch through submitit: one task per GPU (or CPU rank), the trainer's own `main(cfg)` in each.

This side runs where the user submits: the sbatch script's resources, the checks made before submitting (sinfo),
and the submission itself. What runs inside each task of the job is launch/slurm_job.py (`SlurmTrainer`); the
job's states and `--wait` are launch/slurm_follow.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import submitit
from submitit.core.utils import FailedJobError

from data_prep.atomic import atomic_write_json
from data_prep.storage import is_url
from train.config import Config, ConfigError
from train.config_io import load_config, save_config
from train.formats.rundir import pin_resume, start_over

from .preflight import check_data
from .slurm_config import SlurmConfig
from .slurm_follow import FINAL_STATES, Submitted, job_states
from .slurm_job import SlurmTrainer

JOB_RECORD = "slurm_job.json"  # in each run dir: which SLURM job writes it, and where its logs are
SUBMITTED_CONFIG = "submitted_config.yaml"  # in each run dir: the resolved config the job (re)loads at each start


class _OfflineSlurmExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor without its "is srun installed?" check, so --dry-run works off-cluster."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def make_executor(slurm: SlurmConfig, folder: Path, *, offline: bool = False) -> submitit.SlurmExecutor:
    """A submitit executor whose sbatch script asks for `slurm`'s resources, logging into `folder`."""
    if not slurm.cpus_per_task:
        raise ValueError("make_executor needs a resolved cpus_per_task: call resolve_cpus_per_task first")
    cls = _OfflineSlurmExecutor if offline else submitit.SlurmExecutor
    ex = cls(folder=folder, max_num_timeout=slurm.max_num_timeout)
    params: dict = {
        "job_name": slurm.job_name,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.ntasks_per_node(),
        "cpus_per_task": slurm.cpus_per_task,
        "time": slurm.time_minutes(),  # minutes: submitit also uses it to tell a time-out from a preemption
        "signal_delay_s": slurm.signal_delay_s,
        "array_parallelism": slurm.array_parallelism,
        # torch would start one thread per core of the node in every rank; give each rank its own CPUs.
        "setup": ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", *slurm.setup],
        # A rank that dies takes the job down: otherwise the others wait in a collective until the time limit.
        # srun does not inherit sbatch's --cpus-per-task on Slurm 22.05-23.02 (its man page: set it again): without
        # this each rank is bound to one CPU there, and its DataLoader workers starve the GPU.
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={slurm.cpus_per_task}"],
        # requeue on node failure too (the trainer resumes), and allow `scontrol requeue` where JobRequeue=0.
        "additional_parameters": {"requeue": True},
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    for name in ("partition", "account", "qos", "constraint", "exclude", "mem"):
        if getattr(slurm, name):
            params[name] = getattr(slurm, name)
    ex.update_parameters(**params)
    return ex


def sbatch_script(ex: submitit.SlurmExecutor, array_size: int | None = None) -> str:
    """The exact sbatch script submitit writes for this executor (a job array when array_size is given)."""
    if array_size is None:
        return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")
    # What SlurmExecutor._internal_process_submissions does for an array: a copy with map_count set.
    array_ex = _OfflineSlurmExecutor(ex.folder, ex.max_num_timeout)
    array_ex.update_parameters(**ex.parameters)
    array_ex.parameters["map_count"] = array_size
    return array_ex._make_submission_file_text(array_ex._submitit_command_str, "dry-run")


# ----------------------------------------------------------------------------------------- checks


@dataclass
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


def _run(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as e:
        raise ConfigError(
            f"{cmd[0]} not found: this machine is not a SLURM login node. Use --dry-run to see the job, "
            "or `catdog-launch local` to train here"
        ) from e
    if out.returncode:
        raise ConfigError(f"`{' '.join(cmd)}` failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _gpus_of(gres: str) -> int:
    # sinfo %G: "(null)", "gpu:4", "gpu:a100:8(S:0-1)", "gpu:a100:4,gpu:v100:2"
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_nodes(text: str) -> list[Node]:
    """Nodes from `sinfo -h -N -o %N|%c|%m|%G` output (a node in several partitions is listed once)."""
    nodes = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, mem, gres = line.split("|")
        nodes[name] = Node(name, int(cpus), int(mem.rstrip("+")), _gpus_of(gres))
    return list(nodes.values())


def partition_nodes(partition: str) -> tuple[str, list[Node]]:
    """(partition name, its nodes) from sinfo; '' means the cluster's default partition."""
    # -a: hidden partitions and those of other groups too (sbatch decides who may use them, not this check).
    names = [p.strip() for p in _run(["sinfo", "-a", "-h", "-o", "%P"]).split()]
    default = next((p.rstrip("*") for p in names if p.endswith("*")), "")
    known = [p.rstrip("*") for p in names]
    part = partition or default
    if not part:
        raise ConfigError(f"no --partition given and the cluster has no default; partitions: {', '.join(known)}")
    unknown = [p for p in part.split(",") if p not in known]  # sbatch takes a list: the first that can run it
    if unknown:
        raise UnknownPartition(
            f"partition {unknown[0]!r} does not exist on this cluster; partitions: {', '.join(known)}"
        )
    return part, parse_nodes(_run(["sinfo", "-h", "-N", "-p", part, "-o", "%N|%c|%m|%G"]))


class UnknownPartition(ConfigError):
    """sinfo does not list the partition asked for: wrong input, for a dry run as for a submission."""


# What a dry run assumes when sinfo cannot tell: a common GPU node (8 GPUs, 64-128 cores) gives 8-16 CPUs per GPU.
ASSUMED_CPUS_PER_GPU = 8


def resolve_cpus_per_task(slurm: SlurmConfig, nodes: list[Node] | None, unknown: str = "") -> tuple[SlurmConfig, str]:
    """``slurm`` with cpus_per_task=0 (auto) replaced, and one line saying where the value came from.

    GPU jobs: the CPUs that come with each GPU, cpus // gpus of the partition's nodes that have the GPUs asked for
    (the smallest, so any of them can hold the job) -- one CPU per task starved the data workers of every GPU
    rank. CPU-only jobs: 1 (its ranks are the work; ask for more with --cpus-per-task). An explicit value is kept.
    ``nodes`` None means sinfo could not say (``unknown`` tells why): the job then assumes ASSUMED_CPUS_PER_GPU.
    """
    if slurm.cpus_per_task:
        return slurm, f"--cpus-per-task {slurm.cpus_per_task} (as given)"
    if not slurm.gpus_per_node:
        return replace(slurm, cpus_per_task=1), "--cpus-per-task 1 (CPU-only job; pass --cpus-per-task to change)"
    gpu_nodes = [n for n in (nodes or []) if n.gpus >= slurm.gpus_per_node]
    if gpu_nodes:
        small = min(gpu_nodes, key=lambda n: n.cpus // n.gpus)
        cpus = max(1, small.cpus // small.gpus)
        why = f"{small.cpus} CPUs / {small.gpus} GPUs on {small.name}, from sinfo"
    else:
        cpus = ASSUMED_CPUS_PER_GPU
        if nodes is not None:
            unknown = f"no node of the partition has {slurm.gpus_per_node} GPUs"
        why = f"ASSUMED, {unknown or 'sinfo unavailable'}; pass --cpus-per-task to set it"
    return replace(slurm, cpus_per_task=cpus), f"--cpus-per-task {cpus} (auto: {why})"


def check_resources(slurm: SlurmConfig, found: tuple[str, list[Node]] | None = None) -> str:
    """Fail before submitting when no node of the partition can hold one node's share of the job.

    ``found``: partition_nodes' answer when the caller already asked sinfo.
    """
    part, nodes = found or partition_nodes(slurm.partition)
    slurm, _ = resolve_cpus_per_task(slurm, nodes)
    if not nodes:  # sinfo lists partitions whose nodes were all removed (retired or moved hardware)
        raise ConfigError(
            f"partition {part!r} has no nodes (`sinfo -N -p {part}` lists none); pick another with --partition"
        )
    need_cpus = slurm.ntasks_per_node() * slurm.cpus_per_task
    need_mem = slurm.mem_mb()
    fits = [
        n
        for n in nodes
        if n.gpus >= slurm.gpus_per_node and n.cpus >= need_cpus and (need_mem is None or n.mem_mb >= need_mem)
    ]
    if len(fits) >= slurm.nodes:
        return part
    most_gpus, most_cpus, most_mem = (max(getattr(n, k) for n in nodes) for k in ("gpus", "cpus", "mem_mb"))
    if slurm.gpus_per_node > most_gpus:
        why = f"--gpus-per-node {slurm.gpus_per_node}, but its nodes have at most {most_gpus} GPU(s)"
    elif need_cpus > most_cpus:
        why = (
            f"{slurm.ntasks_per_node()} task(s) x --cpus-per-task {slurm.cpus_per_task} = {need_cpus} CPUs per node, "
            f"but its nodes have at most {most_cpus}"
        )
    elif need_mem is not None and need_mem > most_mem:
        why = f"--mem {slurm.mem}, but its nodes have at most {most_mem} MB"
    else:
        most = max(nodes, key=lambda n: (n.gpus, n.cpus, n.mem_mb))
        why = f"--nodes {slurm.nodes}, but only {len(fits)} of its nodes can hold a node's share (e.g. {most.name})"
    raise ConfigError(f"partition {part!r} cannot run this job: {why}")


# ----------------------------------------------------------------------------------------- submit


def job_config(config: str | os.PathLike, overrides: Sequence[str], slurm: SlurmConfig) -> Config:
    """The trainer config for a SLURM job: validated here, with absolute paths (jobs may start elsewhere)."""
    cfg = load_config(config, overrides)
    data_dir = cfg.data.dir if is_url(cfg.data.dir) else Path(cfg.data.dir).resolve()
    extra = [f"run.dir={Path(cfg.run.dir).resolve()}", f"data.dir={data_dir}"]
    if not slurm.gpus_per_node:
        extra.append("train.cpu=true")  # a CPU-only job: Accelerator(cpu=True) makes its ranks gloo ranks
    cfg = load_config(config, [*overrides, *extra])
    cfg.train.per_device_batch(slurm.world_size())  # batch must split over the ranks: say so now
    return cfg


def read_job_record(run_dir: Path) -> dict | None:
    """run_dir/slurm_job.json as `submit` wrote it, or None when no SLURM job was launched into run_dir."""
    path = run_dir / JOB_RECORD
    if not path.is_file():
        return None
    fix = (
        "catdog-launch slurm writes it at submission; restore it, or delete it if no SLURM job writes this run dir "
        "any more (`squeue --me` lists yours)"
    )
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(record, dict):
        raise ConfigError(f"{path} holds a {type(record).__name__}, not a JSON object; {fix}")
    bad = [k for k in ("job_id", "stdout", "stderr") if not isinstance(record.get(k), str) or not record[k]]
    if bad:
        raise ConfigError(f"{path} has no valid {', '.join(bad)} (non-empty strings); {fix}")
    return record


def _check_not_running(run_dir: Path) -> None:
    record = read_job_record(run_dir)
    if record is None:
        return
    job_id = record["job_id"]
    state = job_states([job_id]).get(job_id, "UNKNOWN")
    if state not in FINAL_STATES and state != "UNKNOWN":
        raise ConfigError(
            f"SLURM job {job_id} is still {state} in {run_dir}; two jobs must not write one run dir. "
            f"Wait for it, `scancel {job_id}`, or pick another run.dir"
        )


def submit(points: Sequence[tuple[str, Config]], slurm: SlurmConfig, folder: Path) -> list[Submitted]:
    """Submit one job, or a job array with one element per (name, config); record each in its run dir."""
    ex = make_executor(slurm, folder)
    callables = []
    for _, cfg in points:
        path = Path(cfg.run.dir) / SUBMITTED_CONFIG
        save_config(cfg, path)
        callables.append(SlurmTrainer(path, use_gpus=slurm.gpus_per_node > 0))
    if len(callables) == 1:
        jobs = [ex.submit(callables[0])]
    else:
        with ex.batch():
            jobs = [ex.submit(c) for c in callables]
    out = []
    for (name, cfg), job in zip(points, jobs, strict=True):
        s = Submitted(name, Path(cfg.run.dir), job)
        atomic_write_json(
            s.run_dir / JOB_RECORD,
            {
                "job_id": job.job_id,
                "submitit_folder": str(folder),
                "stdout": str(s.stdout),
                "stderr": str(s.stderr),
                "tasks": slurm.world_size(),
                "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv,
            },
        )
        out.append(s)
    return out


def launch(
    points: Sequence[tuple[str, Config]],
    slurm: SlurmConfig,
    folder: Path,
    *,
    dry_run: bool = False,
    out: TextIO | None = None,
) -> list[Submitted]:
    """Check, then print the sbatch script (dry run) or submit and print job ids, logs and run dirs."""
    out = out or sys.stdout
    if dry_run:
        # sinfo checks the partition and sizes --cpus-per-task here; off-cluster (no sinfo, or no controller to ask)
        # the dry run says what it did not check or assumed instead of failing. A partition the cluster does not
        # have is an error. The real submission checks everything.
        nodes, unknown = None, ""
        if slurm.partition or (not slurm.cpus_per_task and slurm.gpus_per_node):
            try:
                nodes = partition_nodes(slurm.partition)[1]
            except UnknownPartition:
                raise
            except ConfigError as e:
                unknown = f"sinfo could not tell: {e}"
        slurm, cpus_note = resolve_cpus_per_task(slurm, nodes, unknown)
        ex = make_executor(slurm, folder, offline=True)
        print(sbatch_script(ex, len(points) if len(points) > 1 else None), file=out)
        if slurm.partition and nodes is None:
            print(f"# partition {slurm.partition!r} not checked ({unknown})", file=out)
        print(f"# {cpus_note}", file=out)
        for i, (name, cfg) in enumerate(points):
            print(f"# {f'array element {i}: {name}, ' if len(points) > 1 else ''}run dir {cfg.run.dir}", file=out)
        return []
    for first in {cfg.data.dir: cfg for _, cfg in points}.values():  # each data.dir once (a sweep shares one)
        check_data(first)
    found = partition_nodes(slurm.partition)
    check_resources(slurm, found)
    slurm, cpus_note = resolve_cpus_per_task(slurm, found[1])
    print(cpus_note, file=out)
    for _, cfg in points:
        _check_not_running(Path(cfg.run.dir))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _, cfg in points:
        if cfg.train.resume == "none":
            # Start over now, at submission, and let the job resume: a requeue (preemption, node failure) of a job
            # submitted with resume=none would otherwise move its own progress aside and start over again.
            moved = start_over(Path(cfg.run.dir), stamp)
            cfg.train.resume = "auto"
            if moved:
                print(f"train.resume=none: moved the previous checkpoints and tracker state to {moved}", file=out)
        elif cfg.train.resume != "auto":
            # Likewise a checkpoint path: copied into the run dir now, and the job resumes the newest checkpoint
            # there, so a requeue continues from its own progress instead of going back to the path.
            copy = pin_resume(cfg.train.resume, Path(cfg.run.dir))
            print(f"train.resume={cfg.train.resume}: the job resumes from {copy}", file=out)
            cfg.train.resume = "auto"
    try:
        submitted = submit(points, slurm, folder)
    except FailedJobError as e:
        # submitit has already printed sbatch's own message; keep it as SLURM wrote it.
        raise SubmitError(f"sbatch refused the job: {e}") from e
    for s in submitted:
        print(f"submitted job {s.job.job_id}  run dir {s.run_dir}", file=out)
        print(f"  log    {s.stdout}\n  errors {s.stderr}", file=out)
        print(f"  follow: catdog-launch status {s.run_dir}", file=out)
    return submitted


class SubmitError(RuntimeError):
    """sbatch rejected the submission; the message is SLURM's."""
