"""Following submitted SLURM jobs: their states (sacct, then squeue) and `--wait`'s log streaming."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import submitit

# Job states after which SLURM will not run the job again (REQUEUED/PENDING/RUNNING are not final).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@dataclass
class Submitted:
    """One submitted run: its job, run dir and rank-0 logs."""

    name: str
    run_dir: Path
    job: submitit.Job
    stdout: Path = field(init=False)
    stderr: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stdout = self.job.paths.stdout
        self.stderr = self.job.paths.stderr


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Current state of each job (sacct, then squeue for jobs the accounting DB does not know yet)."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    try:
        res = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        for line in res.stdout.splitlines():
            jid, _, state = line.partition("|")
            if state.strip():  # else squeue may know it
                states[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
        for jid in set(job_ids) - set(states):
            res = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True, timeout=60)
            states[jid] = res.stdout.strip() or "UNKNOWN"
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {j: "UNKNOWN" for j in job_ids}
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


class JobLostError(RuntimeError):
    """--wait gave up: neither sacct nor squeue has reported a job's state for a while."""


def follow(
    submitted: Sequence[Submitted],
    *,
    poll_s: float = 2.0,
    unknown_limit_s: float = 60.0,
    unknown_polls: int = 3,
    out: TextIO | None = None,
) -> dict[str, str]:
    """Stream the rank-0 logs of these jobs until every job is in a final state; return the states.

    UNKNOWN (sacct down or purged, and squeue past MinJobAge or unreachable) is not final, and may not last:
    a job only counts as lost after unknown_polls consecutive UNKNOWN polls spanning unknown_limit_s.
    Then JobLostError, instead of polling forever.
    """
    out = out or sys.stdout
    offsets: dict[Path, int] = {}
    prefix = len(submitted) > 1

    def pump() -> None:
        for s in submitted:
            for path in (s.stdout, s.stderr):
                if not path.exists():
                    continue
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    data = f.read()
                    offsets[path] = f.tell()
                if data:
                    text = data.decode("utf-8", "replace")
                    if prefix:
                        text = "".join(f"[{s.name}] {line}" for line in text.splitlines(keepends=True))
                    out.write(text)
                    out.flush()

    ids = [s.job.job_id for s in submitted]
    unknown: dict[str, tuple[float, int]] = {}  # job id -> (first of its consecutive UNKNOWN polls, their count)
    while True:
        pump()
        states = job_states(ids)
        now = time.monotonic()
        for jid, state in states.items():
            if state == "UNKNOWN":
                first, n = unknown.get(jid, (now, 0))
                unknown[jid] = (first, n + 1)
            else:
                unknown.pop(jid, None)
        lost = [s for s in submitted if _lost(unknown.get(s.job.job_id), now, unknown_limit_s, unknown_polls)]
        if lost:
            pump()
            raise JobLostError(
                "\n".join(
                    f"SLURM has reported no state for job {s.job.job_id} ({s.name}) for "
                    f"{now - unknown[s.job.job_id][0]:.0f} s: neither sacct nor squeue knows it. It may still be "
                    f"running: check `squeue -j {s.job.job_id}`, `sacct -j {s.job.job_id}` (sacct needs slurmdbd up) "
                    f"and `catdog-launch status {s.run_dir}`"
                    for s in lost
                )
            )
        if all(st in FINAL_STATES for st in states.values()):
            time.sleep(1)  # slurmstepd may flush the last lines after the state changes
            pump()
            return states
        time.sleep(poll_s)


def _lost(streak: tuple[float, int] | None, now: float, limit_s: float, polls: int) -> bool:
    return streak is not None and streak[1] >= polls and now - streak[0] >= limit_s
