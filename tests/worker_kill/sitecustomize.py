"""Test-only: a DataLoader worker that dies part-way through sending a batch (the worst instant for its reader).

With this folder on PYTHONPATH and CATDOG_TEST_KILL_WORKER set to a file path, every Python process installs the hook
at start-up (forked DataLoader workers inherit it). In a DataLoader worker, the Nth message carrying a tensor (a
batch) that the worker writes to its result pipe (CATDOG_TEST_KILL_AT, default 2) is cut off: the length prefix and
half the message are written, and the worker SIGKILLs itself -- the state the out-of-memory killer leaves when it
strikes a worker between two writes of its result. Only on rank CATDOG_TEST_KILL_RANK (default 0, compared with
RANK), only in workers of a CATDOG_TEST_KILL_DATASET loader ("train": a training plan; "eval": any other; default
"any"), and once per test across every process: the worker that creates the claim file (the path) does it, and
writes "<pid> <dataset class> <train|eval>" there.
"""

from __future__ import annotations

import os
import signal
import stat
import struct
import sys
from multiprocessing import connection

_ORIGINAL = connection.Connection._send_bytes
_settings: dict = {}
_sent = 0


def install(claim: str, at: int = 2, rank: str = "0", dataset: str = "any") -> None:
    _settings.update(claim=claim, at=at, rank=rank, dataset=dataset)
    connection.Connection._send_bytes = _send_bytes


def uninstall() -> None:
    connection.Connection._send_bytes = _ORIGINAL
    _settings.clear()


def _worker_dataset():
    worker = sys.modules.get("torch.utils.data._utils.worker")
    info = getattr(worker, "_worker_info", None) if worker is not None else None
    return None if info is None else info.dataset


def _is_training(dataset) -> bool:
    plan = getattr(dataset, "plan", None)
    return plan is not None and plan.schedule is not None


def _claim(dataset) -> bool:
    try:
        fd = os.open(_settings["claim"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    kind = "train" if _is_training(dataset) else "eval"
    os.write(fd, f"{os.getpid()} {type(dataset).__name__} {kind}".encode())
    os.close(fd)
    return True


def _send_bytes(self, buf) -> None:
    global _sent
    dataset = _worker_dataset()
    if (
        dataset is not None
        and os.environ.get("RANK", "0") == _settings["rank"]
        and stat.S_ISFIFO(os.fstat(self.fileno()).st_mode)  # the result queue's pipe, not a socket
        and b"rebuild_storage" in bytes(buf)  # a message that carries a tensor: a batch
        and (_settings["dataset"] == "any" or _is_training(dataset) == (_settings["dataset"] == "train"))
    ):
        _sent += 1
        if _sent == _settings["at"] and _claim(dataset):
            data = bytes(buf)
            self._send(struct.pack("!i", len(data)) + data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    _ORIGINAL(self, buf)


if os.environ.get("CATDOG_TEST_KILL_WORKER"):
    install(
        os.environ["CATDOG_TEST_KILL_WORKER"],
        int(os.environ.get("CATDOG_TEST_KILL_AT", "2")),
        os.environ.get("CATDOG_TEST_KILL_RANK", "0"),
        os.environ.get("CATDOG_TEST_KILL_DATASET", "any"),
    )
