"""`catdog-launch status RUN_DIR`: the SLURM job's state, its logs and the newest metrics of the run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, TextIO

from train.config import ConfigError

from .slurm import read_job_record
from .slurm_follow import job_states
from .sweep import TABLE, read_table, summarize


def latest_metrics(run_dir: Path) -> tuple[dict[str, Any], int]:
    """The newest value of every key in metrics.jsonl, and how many records it holds."""
    latest: dict[str, Any] = {}
    n = 0
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return latest, 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the trainer may be writing this very line
            continue
        if isinstance(record, dict):
            latest.update(record)
            n += 1
    return latest, n


def requeue_count(job_id: str) -> int:
    """How often SLURM requeued the job (preemptions and time limits handed to checkpoint())."""
    try:
        res = subprocess.run(
            ["sacct", "--duplicates", "-X", "-n", "-P", "-o", "State", "-j", job_id],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("REQUEUED") for line in res.stdout.splitlines())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def show_status(run_dir: str | Path, out: TextIO) -> None:
    """Print the job state, log paths and newest metrics of a run dir (or a table for a sweep's root)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise ConfigError(f"run dir {run_dir} {what}: pass a catdog-train run.dir or the run.dir of a sweep")
    if (run_dir / TABLE).is_file():
        rows = read_table(run_dir)
        summarize(run_dir, out, states=job_states([r["job_id"] for r in rows if r["job_id"]]))
        return
    out.write(f"run dir  {run_dir.resolve()}\n")
    record = read_job_record(run_dir)
    if record is not None:
        job_id = record["job_id"]
        state = job_states([job_id])[job_id]
        requeues = requeue_count(job_id)
        out.write(f"job      {job_id}  {state}" + (f"  (requeued {requeues}x)" if requeues else "") + "\n")
        out.write(f"log      {record['stdout']}\nerrors   {record['stderr']}\n")
    else:
        out.write("job      none recorded (not launched through SLURM)\n")
    latest, n = latest_metrics(run_dir)
    if n:
        out.write(f"metrics  {n} records in metrics.jsonl; newest value of each:\n")
        for k in sorted(latest):
            out.write(f"  {k:<28} {_fmt(latest[k])}\n")
    else:
        out.write("metrics  none yet\n")
    final = run_dir / "final_metrics.json"
    if final.is_file():
        out.write(f"finished: {final}\n")
