"""What runs inside each task of a catdog SLURM job (the submitit callable), before and around the trainer.

The callable follows MAE/DINOv2: `SlurmTrainer.__call__` exports the torch.distributed variables from SLURM's,
chooses the address and interface the ranks reach each other by (launch/network.py), and calls
`train.run.main.main`; `checkpoint()` (rank 0, on USR2 before a time limit or a preemption) returns a new submission
of itself, submitit requeues the job, and the trainer's auto-resume continues from the newest checkpoint in the same
run dir, with the W&B run id kept in run.dir/wandb_run_id. A rank or node that dies makes the others' collectives
fail within train.dist_timeout_s; they then say which ranks are gone, in one line, and end the job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import zlib
from datetime import timedelta

import submitit

from train.config import Config
from train.config_io import load_config

from .network import NetworkError, plan

# How long the ranks left after a failed collective wait for each other to say they are alive: a tenth of the
# collective timeout, within these bounds. They fail within seconds of each other (the first to time out closes its
# connections, which fails the others' collectives at once).
ROLL_CALL_S = (10.0, 60.0)


class SlurmTrainer:
    """The submitit callable: runs in every task of the job; rank 0's checkpoint() requeues it.

    It carries the path of the resolved config YAML, not a Config object: each start (and each requeue, maybe
    after a code update) reads it through the trainer's own loader, so new fields get their defaults and a
    removed one fails naming the key, instead of an unpickled dataclass missing attributes mid-run.
    """

    def __init__(self, config_path: str | os.PathLike, use_gpus: bool, resume: str = "") -> None:
        self.config_path = str(config_path)
        self.use_gpus = use_gpus
        self.resume = resume  # "" = as the config says

    def config(self) -> Config:
        return load_config(self.config_path, [f"train.resume={self.resume}"] if self.resume else [])

    def __call__(self) -> dict:
        job = submitit.JobEnvironment()
        export_distributed_env(job.job_id)
        try:
            print(set_network(job), file=sys.stderr, flush=True)
        except NetworkError as e:
            print(f"catdog-launch: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        from train.run.distributed import StopFlag  # late: keeps submission light
        from train.run.main import main

        # USR2 (SLURM's warning before a time limit, or a preemption) must not requeue mid-step with the work
        # since the last checkpoint lost, which is what submitit's own handler would do. During the training loop
        # ours only sets a flag: every rank stops at the same step boundary, they save one checkpoint together,
        # and then we hand over to submitit's handler, which calls checkpoint() below and requeues the job (on
        # rank 0; on the others it returns). Outside the loop the signal goes to submitit's handler at once
        # (train/run/distributed.py StopFlag). The signal is submitit's (SUBMITIT_PREEMPT_SIGNAL, default USR2): the
        # one its sbatch script asked SLURM for.
        cfg = self.config()
        stop = StopFlag(timeout_s=cfg.train.dist_timeout_s)
        stop.install(preempt_signal(job))
        try:
            result = main(cfg, stop=stop)
        except Exception as e:
            if job.num_tasks > 1 and is_peer_loss(e):
                stop_for_lost_ranks(job, cfg.train.dist_timeout_s, e)  # does not return
            raise
        if result.get("interrupted"):
            # Each rank's own log says where it stopped: every rank of every node at the same step.
            print(
                f"rank {job.global_rank} on {this_node(job)}: stopped at step {result['steps']} "
                f"(epoch {result['epoch']}, batch {result['batch_in_epoch']}); the requeued job resumes there",
                file=sys.stderr,
                flush=True,
            )
            stop.hand_over()  # on rank 0: requeues and exits; it does not return
        return result

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # The trainer has saved a checkpoint at the step where the signal stopped it. The requeued job must resume
        # from the newest checkpoint, whatever train.resume said at submission.
        return submitit.helpers.DelayedSubmission(SlurmTrainer(self.config_path, self.use_gpus, resume="auto"))


def preempt_signal(job: submitit.JobEnvironment) -> int:
    """The signal SLURM sends before the time limit or a preemption: the one submitit's sbatch script asked for
    (``SUBMITIT_PREEMPT_SIGNAL``, default USR2) and its own handler is installed on."""
    usr_sig = getattr(job, "_usr_sig", None)  # submitit's own reader of that variable (private, so guarded)
    return usr_sig() if callable(usr_sig) else signal.SIGUSR2


def export_distributed_env(job_id: str) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT for
    torch.distributed, from SLURM's variables; the trainer's Accelerator() then joins that process group.

    CUDA_VISIBLE_DEVICES is left as SLURM set it: every task of a node sees the job's GPUs there and rank i trains
    on cuda:<local rank i> (train/hardware/gpus.py). submitit's default would narrow each task to the GPU numbered
    like its local rank, so every rank sees one GPU (cuda:0) while Accelerate gives DDP device_ids=[local rank]:
    rank 1 would ask for device 1 in a one-device world and crash at the first step.
    overwrite: values inherited from the submitting shell (sbatch exports its environment) are wrong here.
    """
    os.environ["MASTER_PORT"] = str(master_port(job_id, os.environ.get("SLURM_RESTART_COUNT", "0")))
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def master_port(job_id: str, restart_count: str) -> int:
    """The rendezvous port all tasks of one (re)start of a job agree on without talking to each other.

    Below Linux's ephemeral range (32768-60999), where bind(0) and outgoing connections take their ports:
    submitit's default (20000-60000, from the job id alone) collided with those on a busy node, and a job's
    rank 0 then died with EADDRINUSE. The restart count gives a requeued job a new port in case a process of
    the previous start still holds the old one.
    """
    return 20000 + zlib.crc32(f"{job_id}.{restart_count}".encode()) % 12000


def set_network(job: submitit.JobEnvironment) -> str:
    """MASTER_ADDR as an address every node uses, GLOO/NCCL_SOCKET_IFNAME (unless set) as the interface that routes
    to it (launch/network.py); the line to log."""
    hosts = job.hostnames
    here = this_node(job)
    p = plan(hosts[0], is_master=here == hosts[0], peers=hosts, nodes=job.num_nodes)
    return f"rank {job.global_rank} on {here}: " + p.apply(os.environ)


def this_node(job: submitit.JobEnvironment) -> str:
    """This task's node, as SLURM names it in the job's node list (the hostname may differ)."""
    return os.environ.get("SLURMD_NODENAME") or job.hostname


# --------------------------------------------------------------------------------------------- a rank is lost


def is_peer_loss(e: BaseException) -> bool:
    """The error of a collective whose peers stopped answering (gloo/NCCL timeouts, connections closed). Not one
    of the start-up: before the process group exists nobody was lost, the ranks never met."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return False
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection closed by peer"))


def host_of(job: submitit.JobEnvironment, rank: int) -> str:
    """The node a rank runs on: srun's default block distribution, with the same number of tasks on every node
    (how catdog-launch submits)."""
    return job.hostnames[rank // max(1, job.num_tasks // job.num_nodes)]


def roll_call(job: submitit.JobEnvironment, wait_s: float) -> tuple[int, list[int]] | None:
    """After a failed collective, every rank still alive checks in through the job's rendezvous store (served by
    rank 0's process) and waits up to ``wait_s`` for the others: (ranks that answered, the ranks that did not, as
    rank 0 lists them; the other ranks leave that list empty). None: rank 0's store does not answer."""
    import torch.distributed as dist

    rank, world = job.global_rank, job.num_tasks
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=wait_s),
            wait_for_workers=False,
        )
        store.set(f"catdog/alive/{rank}", "1")
        here = store.add("catdog/alive", 1)
        deadline = time.monotonic() + wait_s
        while here < world and time.monotonic() < deadline:
            time.sleep(0.2)
            here = store.add("catdog/alive", 0)
        if here >= world or rank != 0:
            return here, []
        return here, [r for r in range(world) if not store.check([f"catdog/alive/{r}"])]
    except (RuntimeError, OSError):  # the store's errors are RuntimeErrors (DistStoreError, DistNetworkError)
        return None


def stop_for_lost_ranks(job: submitit.JobEnvironment, timeout_s: float, error: BaseException) -> None:
    """One line naming the ranks (and nodes) that are gone, then exit 1: srun (--kill-on-bad-exit) ends the job
    instead of leaving it allocated until its time limit. Returns when every rank answers the roll call: the
    collective failed for another reason, and the caller re-raises its error."""
    world = job.num_tasks
    answer = roll_call(job, min(max(timeout_s / 10, ROLL_CALL_S[0]), ROLL_CALL_S[1]))
    why = f"no answer within train.dist_timeout_s={timeout_s:g} s or connection lost: its process or node died or hangs"
    if answer is None:
        line = (
            f"lost rank 0 on {host_of(job, 0)} (the master) of {world} ranks: its rendezvous store at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} does not answer ({why})"
        )
    elif answer[0] >= world:
        return
    elif answer[1]:
        where = ", ".join(f"rank {r} on {host_of(job, r)}" for r in answer[1])
        line = f"lost {where} ({len(answer[1])} of {world} ranks; {why})"
    else:
        line = f"lost {world - answer[0]} of {world} ranks ({why}); rank 0's log names them"
    print(  # on a line of its own: a progress bar may hold the current one
        f"\ncatdog: {line}. Stopping this job; resubmitting it with the same run.dir resumes from its last checkpoint. "
        f"(rank {job.global_rank}: {str(error).splitlines()[0][:200]})",
        file=sys.stderr,
        flush=True,
    )
    logging.shutdown()  # flush the trainer's log file
    # Not sys.exit: interpreter shutdown would tear down the process group, which may wait on the lost peers.
    os._exit(1)
