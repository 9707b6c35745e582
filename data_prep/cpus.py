"""How many CPUs a process may use and how it shares them: the one place catdog decides worker and thread counts.

Everything starts from the process's CPU affinity mask (``os.sched_getaffinity``: it honours taskset, cgroups and
SLURM's binding, unlike ``os.cpu_count``), then divides it among the ranks that share it. catdog-prep, the trainer,
catdog-predict/-evaluate and ``catdog-launch local`` all ask here. Torch-free, so launchers and catdog-prep stay light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Beyond this, more worker processes mostly add memory (each holds prefetched batches), not speed.
MAX_WORKERS = 16
# Decode workers beside a model that runs in the main process on CPU (catdog-evaluate; catdog-predict with an ONNX
# model): on 2 cores decoding a photo and the demo model's forward cost about the same, and 1 or 3 workers measured
# no faster than 2.
CPU_DECODE_WORKERS = 2


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Ranks on this node: accelerate launch, torchrun and submitit's export() set LOCAL_WORLD_SIZE; 1 if unset."""
    env = os.environ if env is None else env
    return max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))


def rank_cpus(env: Mapping[str, str] | None = None, affinity: int | None = None) -> tuple[int, str]:
    """(CPUs this rank may use, how that was found) from the environment the launchers set.

    ``affinity`` is the size of this process's CPU mask. Ranks started as SLURM tasks (``catdog-launch slurm``:
    SLURM_NTASKS == WORLD_SIZE) each own SLURM_CPUS_PER_TASK CPUs; a SLURM task that is not bound still sees the
    whole allocation in its mask, hence the min. Ranks started by accelerate/torchrun (one process tree, no binding)
    share the mask, and the CPUs of a SLURM task when they run inside one: divide by LOCAL_WORLD_SIZE.
    """
    env = os.environ if env is None else env
    if affinity is None:
        affinity = usable_cpus()
    world = int(env.get("WORLD_SIZE", "1"))
    local = local_world_size(env)
    slurm_cpus = env.get("SLURM_CPUS_PER_TASK")
    if slurm_cpus:
        cpus, why = min(int(slurm_cpus), affinity), f"SLURM_CPUS_PER_TASK={slurm_cpus}, affinity mask {affinity}"
        if int(env.get("SLURM_NTASKS", "1")) != world and local > 1:  # several ranks inside one SLURM task
            return max(1, cpus // local), f"{why}, shared by {local} local ranks"
        return max(1, cpus), why
    if local > 1:
        return max(1, affinity // local), f"affinity mask {affinity} CPUs shared by {local} local ranks"
    return max(1, affinity), f"affinity mask {affinity} CPUs"


def auto_num_workers(env: Mapping[str, str] | None = None, affinity: int | None = None) -> tuple[int, str]:
    """(data.num_workers=auto resolved for this rank, a one-line reason for the log).

    One CPU stays with the rank (forward/backward launch, collation of the workers' batches); one CPU means no
    worker processes (samples are read in the rank).
    """
    cpus, why = rank_cpus(env, affinity)
    n = min(cpus - 1, MAX_WORKERS)
    return n, f"data.num_workers=auto -> {n} per rank ({cpus} CPU(s) for this rank: {why})"


def threads_per_rank(env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads per rank on CPU: an explicit OMP_NUM_THREADS wins, else this node's usable CPUs / local ranks.

    N ranks each using every core oversubscribe the CPU and run several times slower than N x 1/N.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        # OpenMP also takes a per-nesting-level list ("4,2"): its first level is this process's team.
        return max(1, int(env["OMP_NUM_THREADS"].split(",")[0]))
    return max(1, usable_cpus() // local_world_size(env))


def threads_beside(workers: int) -> int:
    """Threads for a process whose ``workers`` worker processes take cores too (at least 1): model threads plus
    workers beyond the cores make OpenMP's barriers spin against each other (measured on 2 busy cores: 270 ms
    instead of 10 ms per single-image forward)."""
    return max(1, usable_cpus() - workers)


def decode_workers(
    on_gpu: bool, env: Mapping[str, str] | None = None, affinity: int | None = None, *, scores: bool = False
) -> int:
    """Worker processes per rank for catdog-predict / -evaluate when --workers is not given.

    ``scores`` (catdog-predict with a torch model on CPU): each worker decodes and scores whole batches, so one per
    CPU (at most ``MAX_WORKERS``). On a GPU the model leaves the CPUs to decoding, the bottleneck there: every CPU of
    this rank but one, as the trainer's data.num_workers=auto. Else on CPU the model in the main process needs the
    cores too: ``CPU_DECODE_WORKERS``, with the rest as torch threads.
    """
    if scores:
        return min(affinity if affinity is not None else usable_cpus(), MAX_WORKERS)
    if not on_gpu:
        return CPU_DECODE_WORKERS
    return auto_num_workers(env, affinity)[0]
