"""Running a command in which one DataLoader worker is killed part-way through sending a batch
(tests/worker_kill/sitecustomize.py), and checking that the command ended promptly with one clear line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from pathlib import Path

from train_helpers import ROOT, env

HOOK = ROOT / "tests" / "worker_kill"
# Generous bounds for 2 slow cores under load; the commands end 1-6 s after the kill here.
ENDS_WITHIN_S = 90
TIMEOUT_S = 300


def hook_module():
    """The hook as a module of this process (``install``/``uninstall``), for in-process tests."""
    spec = importlib.util.spec_from_file_location("worker_kill_hook", HOOK / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kill_env(claim: Path, *, at: int = 2, rank: int = 0, dataset: str = "any", **extra: str) -> dict:
    """The environment of a command whose (rank ``rank``'s) worker is killed while sending its ``at``-th batch."""
    path = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH")) if p)
    return env(
        PYTHONPATH=path,
        CATDOG_TEST_KILL_WORKER=str(claim),
        CATDOG_TEST_KILL_AT=str(at),
        CATDOG_TEST_KILL_RANK=str(rank),
        CATDOG_TEST_KILL_DATASET=dataset,
        **extra,
    )


def killed(claim: Path) -> tuple[int, str]:
    """(pid, "train" | "eval") of the worker the hook killed; fails when none was."""
    assert claim.exists(), "no worker was killed"
    pid, _, kind = claim.read_text().split()
    return int(pid), kind


def assert_ended_promptly(claim: Path) -> None:
    assert claim.exists(), "no worker was killed"
    assert time.time() - claim.stat().st_mtime < ENDS_WITHIN_S, "ended long after its worker was killed"


def run_killed(cmd: list[str], claim: Path, environ: dict) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``environ`` (``kill_env``): it must end within ENDS_WITHIN_S of the kill."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert claim.exists(), f"no worker was killed (exit {proc.returncode})\n{err[-4000:]}"
    assert_ended_promptly(claim)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_one_line(stderr: str, returncode: int, prog: str, pid: int, *advice: str) -> str:
    """Exit 1, no traceback, and one ``prog: ...`` line naming the killed worker and saying what to do."""
    assert returncode == 1, f"exit {returncode}\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]
    assert len(lines) == 1, stderr[-4000:]
    assert f"worker process (pid {pid}) was killed (SIGKILL" in lines[0], lines[0]
    for text in advice:
        assert text in lines[0], lines[0]
    return lines[0]
