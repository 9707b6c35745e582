"""DataLoader worker processes that die (the out-of-memory killer, most often): never a wait, always one clear error.

torch's DataLoader learns that a worker died in two ways: its SIGCHLD handler raises in the main thread at once
(wherever that thread is; a read it is blocked in is interrupted), and every ``MP_STATUS_CHECK_INTERVAL`` (5 s)
without a result it checks each worker with ``is_alive()``. The second needs the read from the workers' shared result
queue (``multiprocessing.Queue.get(timeout)``) to return within its timeout, and it does not when a worker was killed
part-way through writing its message: ``get`` waits for the pipe to be readable, then reads the whole message with
blocking reads, and the rest never comes (the other workers and the main process hold the pipe's write end, so no
end of file comes either). A reader the SIGCHLD error cannot reach then waits forever:

- the pin-memory thread (``pin_memory=True``: a model on a GPU; signal handlers run in the main thread only), and
  with it the main process, whose loader shutdown joins that thread;
- the main thread, when the SIGCHLD error was spent before the read began (raised inside code that catches and
  carries on, such as logging's error handler).

``loader_context`` gives the DataLoader a multiprocessing context whose queues never block on a partial message: a
read takes whatever bytes the pipe holds, keeps an incomplete message buffered, and returns (queue.Empty) when its
timeout passes, so torch's own checks run. A batch's pixels do not travel through that pipe (torch moves tensors
into shared memory and sends a handle); a worker killed after sending the handle makes the main process's fetch of
it fail instead (connection refused or reset), which ``guarded`` reports as the worker's death too.

``WorkerDied`` is what the tools report, in one line (``worker_died`` finds it in an error, or reads torch's);
``quiet_worker`` keeps the workers that live on from printing tracebacks of fetches the main process abandoned.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.queues
import os
import queue
import re
import signal
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from multiprocessing.reduction import ForkingPickler

# multiprocessing.connection's framing: a signed 4-byte big-endian length; -1 then 8 bytes for messages over 2 GiB.
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_READ_BYTES = 1 << 16  # a pipe's default capacity: one read takes every small message waiting
_MAX_READ_BYTES = 1 << 20  # Linux's largest pipe for an unprivileged process (pipe-max-size)
# How long an error from the loader may wait for a worker it suggests is dying to end (a fetch refused by a worker
# whose sockets closed a moment before the kernel reported its exit).
_DEATH_WAIT_S = 2.0


class WorkerDied(RuntimeError):
    """A DataLoader worker process ended while its loader was in use; ``str()`` says which and how."""

    def __init__(self, pid: int | None, exitcode: int | None):
        self.pid = pid
        self.exitcode = exitcode
        super().__init__(f"a data loading worker process{f' (pid {pid})' if pid else ''} {_how(exitcode)}")


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "ended unexpectedly"
    if exitcode >= 0:
        return f"exited unexpectedly with code {exitcode}"
    sig = -exitcode
    name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
    if sig == signal.SIGKILL:
        return "was killed (SIGKILL: usually the kernel's out-of-memory killer)"
    if sig == signal.SIGBUS:
        return "was killed by SIGBUS (shared memory, /dev/shm, ran out)"
    return f"was killed by {name}"


# torch's messages: "DataLoader worker (pid 12) is killed by signal: Killed." (its SIGCHLD handler), "DataLoader
# worker (pid(s) 12, 13) exited unexpectedly" (its periodic check), "... exited unexpectedly with exit code 1. ...".
_TORCH = re.compile(
    r"DataLoader worker \(pids?\(?s?\)? (?P<pid>\d+)[^)]*\) "
    r"(?:is killed by signal: (?P<signal>[^.]+)|exited unexpectedly(?: with exit code (?P<code>-?\d+))?)"
)


def worker_died(e: BaseException) -> WorkerDied | None:
    """The worker death behind ``e``, or None: a WorkerDied in its chain of causes, or one read from torch's own
    message (its SIGCHLD handler raises wherever the main thread is, not only inside the loader)."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, WorkerDied):
            return err
    for err in chain:  # the first one that names a signal: "exited unexpectedly" is raised from it
        m = _TORCH.search(str(err)) if isinstance(err, RuntimeError) else None
        if m and m["signal"]:
            return WorkerDied(int(m["pid"]), -_signal_number(m["signal"].strip()))
    for err in chain:
        m = _TORCH.search(str(err)) if isinstance(err, RuntimeError) else None
        if m:
            return WorkerDied(int(m["pid"]), int(m["code"]) if m["code"] else None)
    return None


def _signal_number(description: str) -> int:
    """Signal number from strsignal()'s text ("Killed" -> 9), as torch reports it; 0 when unknown."""
    for sig in signal.valid_signals():
        if signal.strsignal(sig) == description:
            return int(sig)
    return 0


def guarded(loader: Iterable) -> Iterator:
    """``iter(loader)`` for a DataLoader (called now: a persistent loader's iter() finishes its previous pass here),
    where an error raised while one of its workers is dead (or dying) becomes ``WorkerDied``."""
    try:
        it = iter(loader)
    except Exception as e:
        dead = _dead_worker(getattr(loader, "_iterator", None), e)  # a persistent loader's iterator, reset in iter()
        if dead is None:
            raise
        raise dead from e
    return _guard(it)


def _guard(it: Iterator) -> Iterator:
    try:
        yield from it
    except Exception as e:
        dead = _dead_worker(it, e)
        if dead is None:
            raise
        raise dead from e


def _dead_worker(it, error: Exception) -> WorkerDied | None:
    # torch keeps its worker processes in the iterator's _workers (private, stable since torch 1.x): without it, only
    # torch's own message can tell.
    workers = [w for w in getattr(it, "_workers", ()) if w.pid is not None]
    if workers:
        # An error a worker raised itself (re-raised here) comes while every worker lives: no wait for those. A
        # torch message about a worker, or a failed fetch of a batch from one (OSError, EOFError), may come a moment
        # before the kernel reports that worker's exit.
        suspect = isinstance(error, (OSError, EOFError)) or worker_died(error) is not None
        ready = multiprocessing.connection.wait([w.sentinel for w in workers], _DEATH_WAIT_S if suspect else 0)
        for w in workers:
            if w.sentinel in ready:
                w.join(_DEATH_WAIT_S)  # its exit status: the sentinel closes just before the kernel reports it
                if w.exitcode != 0:
                    return WorkerDied(w.pid, w.exitcode)
    return worker_died(error)


def quiet_worker(worker_id: int) -> None:  # noqa: ARG001 -- DataLoader's worker_init_fn signature
    """DataLoader ``worker_init_fn``: a fetch of a batch's shared memory that the main process abandons (it stopped
    reading because another worker died, or it is exiting) is not this worker's error. Without this, the thread
    that hands the memory over (multiprocessing's resource sharer) prints the reset connection's traceback."""
    sys.excepthook = _QuietFetches(sys.excepthook)


class _QuietFetches:
    def __init__(self, previous):
        self.previous = previous

    def __call__(self, kind, value, tb) -> None:
        abandoned = issubclass(kind, (ConnectionError, EOFError))
        if abandoned and tb is not None and tb.tb_frame.f_globals.get("__name__") == "multiprocessing.resource_sharer":
            return
        self.previous(kind, value, tb)


class ResultQueue(multiprocessing.queues.Queue):
    """``multiprocessing.Queue`` whose ``get`` returns within its timeout even when a writer died part-way through a
    message: what the pipe holds is read into a buffer, and a message is taken only once it is complete."""

    def _reset(self, after_fork: bool = False) -> None:
        super()._reset(after_fork)
        # Reader side: bytes read from the pipe, of which those before _at were taken already.
        self._inbox = bytearray()
        self._at = 0

    def _frame(self) -> tuple[int, int] | None:
        """(start, end) in the buffer of the first message not taken, once its length prefix is in."""
        at, have = self._at, len(self._inbox)
        if have - at < _SHORT.size:
            return None
        (size,) = _SHORT.unpack_from(self._inbox, at)
        if size != -1:
            return at + _SHORT.size, at + _SHORT.size + size
        if have - at < _SHORT.size + _LONG.size:
            return None
        start = at + _SHORT.size + _LONG.size
        return start, start + _LONG.unpack_from(self._inbox, at + _SHORT.size)[0]

    def _take(self) -> memoryview | bytearray | None:
        """The first complete message not taken yet, or None."""
        frame = self._frame()
        if frame is None or len(self._inbox) < frame[1]:
            return None
        start, end = frame
        if end == len(self._inbox):  # the buffer's last message (the usual case): hand the buffer over
            message = memoryview(self._inbox)[start:]
            self._inbox, self._at = bytearray(), 0
            return message
        self._at = end
        return self._inbox[start:end]

    def _fill(self) -> None:
        """Append what the pipe holds (it is readable: one read does not wait)."""
        if self._at:  # drop what was taken: only the start of one message is left
            del self._inbox[: self._at]
            self._at = 0
        frame = self._frame()
        missing = frame[1] - len(self._inbox) if frame else 0
        chunk = os.read(self._reader.fileno(), min(max(missing, _READ_BYTES), _MAX_READ_BYTES))
        if not chunk:
            raise EOFError("every writer of the queue closed it")
        self._inbox += chunk

    def get(self, block: bool = True, timeout: float | None = None):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._rlock.acquire(block, timeout):
            raise queue.Empty
        try:
            while (message := self._take()) is None:
                left = 0.0 if not block else None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._poll(left):
                    raise queue.Empty
                self._fill()
            self._sem.release()
        finally:
            self._rlock.release()
        return ForkingPickler.loads(message)

    def empty(self) -> bool:
        frame = self._frame()
        return not (frame and len(self._inbox) >= frame[1]) and not self._poll()


class _ResultQueues:
    """Mixed into a start method's context: its queues are ResultQueues."""

    def Queue(self, maxsize: int = 0) -> ResultQueue:  # noqa: N802 -- multiprocessing's name
        return ResultQueue(maxsize, ctx=self.get_context())


_CONTEXTS: dict[str, multiprocessing.context.BaseContext] = {}


def loader_context(method: str | None = None) -> multiprocessing.context.BaseContext | str | None:
    """``multiprocessing_context`` for a DataLoader with workers: the start method ``method`` (None: the default)
    with ResultQueue for its queues. On Windows, ``method`` as it is (its pipes are not file descriptors)."""
    if sys.platform == "win32":
        return method
    name = method or multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if name not in _CONTEXTS:
        base = type(multiprocessing.get_context(name))
        _CONTEXTS[name] = type(f"ResultQueue{base.__name__}", (_ResultQueues, base), {})()
    return _CONTEXTS[name]
