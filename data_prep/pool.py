"""The decode/encode worker processes: a pool that a worker dying at any instant cannot hang.

Why not ``concurrent.futures.ProcessPoolExecutor``: all its workers write results into one shared pipe that
its reader reads with blocking calls. A worker killed part-way through writing a multi-MB result (the
out-of-memory killer picks exactly the worker holding a big decoded image) leaves half a message there, and the
reader waits forever for the rest. (``multiprocessing.Pool`` is worse: it replaces a dead worker and the task it
held never completes.)

Here each worker has a pipe of its own in each direction, and the parent never blocks on one:

- Results: the parent reads with non-blocking reads whenever a result pipe is readable and assembles the
  length-prefixed message itself, so a partial message is just bytes in a buffer. Death is seen from the
  worker's process sentinel (which becomes readable when the process ends), waited on beside the result pipes,
  whatever state its pipe is in; the parent then raises ``WorkerDied`` naming the tasks that worker held and
  never reads from that pipe again.
- Tasks are small. At most ``DEPTH`` are assigned to a worker, and one is written only when the pipe has room
  for it (or the worker is idle, reading), so the parent never blocks sending while a worker blocks sending
  its result. Each worker closes its copies of the other workers' pipe ends, so writing to a dead worker
  fails with a broken pipe instead of waiting.
- Closing the pool kills workers still busy (after an error, Ctrl-C or SIGTERM) and waits for them: nothing
  is left reading or writing.

Messages are pickles exchanged only with the pool's own forked workers, never data read from elsewhere.
"""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing
import os
import pickle
import selectors
import signal
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator

DEPTH = 2  # tasks assigned to one worker at a time: the one it works on and the next, so it never waits for us
_HEADER = struct.Struct("<Q")  # length of the pickled message that follows
_RESULT_PIPE_BYTES = 1 << 20  # fewer wake-ups per multi-MB result than Linux's default 64 KiB; may be refused
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class WorkerDied(Exception):
    """A worker process ended while the pool was open; ``tasks`` are the tasks it held, lost with it."""

    def __init__(self, pid: int, exitcode: int | None, tasks: list):
        super().__init__(f"worker process {pid} died (exit code {exitcode}) holding {len(tasks)} task(s)")
        self.tasks = tasks


def _pipe_size(fd: int, want: int | None = None) -> int:
    """Ask for a pipe buffer of ``want`` bytes (Linux); return the size it has (64 KiB where unknown)."""
    try:
        if want is not None:
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, want)
            except OSError:
                pass  # over the per-user pipe memory limit: keep the default
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return 16384  # not Linux: assume little


def _read_exactly(fd: int, n: int) -> bytearray | None:
    """n bytes from a blocking fd; None at end of file before the first byte."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            if got == 0:
                return None
            raise EOFError("pipe closed part-way through a message")
        got += k
    return buf


def _write_all(fd: int, data: bytes) -> None:
    os.write(fd, _HEADER.pack(len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _serve(task_r: int, result_w: int, others: list[int], parent: int) -> None:
    """A worker's life: run each task it is sent and send back (ok, result or exception), until end of file.

    Ctrl-C and SIGTERM are the parent's to handle: SLURM and ``kill -- -PGID`` signal the whole process group,
    and a worker dying of it would look like a crash instead of an interruption. A worker dies with its
    parent (kill -9) through PR_SET_PDEATHSIG.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
    for fd in others:  # the parent's ends and other workers' pipes: end of file and broken pipes must reach them
        os.close(fd)
    while (head := _read_exactly(task_r, _HEADER.size)) is not None:
        fn, task = pickle.loads(_read_exactly(task_r, _HEADER.unpack(head)[0]))
        try:
            reply = pickle.dumps((True, fn(task)), pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 -- the parent re-raises it, as a future would
            try:
                reply = pickle.dumps((False, e), pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001 -- an exception that cannot be pickled
                reply = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")), pickle.HIGHEST_PROTOCOL)
        _write_all(result_w, reply)


class _Worker:
    """The parent's view of one worker: its process, pipe ends, assigned tasks and the result being read."""

    def __init__(self, proc: multiprocessing.process.BaseProcess, task_w: int, result_r: int):
        self.proc = proc
        self.task_w = task_w
        self.result_r = result_r
        self.task_room = _pipe_size(task_w)
        self.assigned: deque[tuple[int, object, int]] = deque()  # (sequence number, task, message bytes)
        self.head = bytearray()  # the length prefix read so far
        self.body: bytearray | None = None  # the message being read, once its length is known
        self.got = 0


class Pool:
    """``workers`` forked processes running ``imap_ordered``; use as a context manager (closing kills stragglers).

    Fork all of them at once, before the program starts any thread: forking a threaded process is unsafe.
    """

    def __init__(self, workers: int):
        ctx = multiprocessing.get_context("fork")
        self._workers: list[_Worker] = []
        self._selector = selectors.DefaultSelector()
        self._done: dict[int, tuple[bool, object]] = {}  # (ok, result or exception) by sequence number
        self._seq = 0  # numbers tasks across calls of imap_ordered
        try:
            for _ in range(workers):
                task_r, task_w = os.pipe()
                result_r, result_w = os.pipe()
                _pipe_size(result_w, _RESULT_PIPE_BYTES)
                others = [task_w, result_r, *(fd for w in self._workers for fd in (w.task_w, w.result_r))]
                proc = ctx.Process(target=_serve, args=(task_r, result_w, others, os.getpid()), name="catdog-prep")
                try:
                    proc.start()
                except BaseException:
                    os.close(task_w)
                    os.close(result_r)
                    raise
                finally:
                    os.close(task_r)  # from here on only the worker holds these two ends
                    os.close(result_w)
                w = _Worker(proc, task_w, result_r)
                self._workers.append(w)
                os.set_blocking(result_r, False)
                self._selector.register(result_r, selectors.EVENT_READ, (w, "result"))
                self._selector.register(proc.sentinel, selectors.EVENT_READ, (w, "sentinel"))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker: idle ones see end of file and exit, busy ones are killed; wait for all of them."""
        busy = any(w.assigned for w in self._workers)
        for w in self._workers:
            os.close(w.task_w)
            if busy:
                w.proc.kill()  # an error or interruption: the work in hand is not wanted
        for w in self._workers:
            w.proc.join(5)
            if w.proc.exitcode is None:
                w.proc.kill()
                w.proc.join()
            self._selector.unregister(w.result_r)
            self._selector.unregister(w.proc.sentinel)
            os.close(w.result_r)
            w.proc.close()
        self._workers.clear()
        self._selector.close()

    def imap_ordered(self, fn: Callable, tasks: Iterable, window: int) -> Iterator[tuple[object, object]]:
        """(task, fn(task)) over tasks in order, with at most ``window`` tasks handed out and not yet yielded.

        Raises WorkerDied as soon as a worker ends, and an exception ``fn`` raised in a worker when its turn comes.
        """
        todo = iter(tasks)
        pending: deque[tuple[int, object]] = deque()  # handed out, not yet yielded, in order
        ahead: tuple[object, bytes] | None = None  # the next task and its message, not yet handed out
        while True:
            # Hand out tasks whenever a worker has room, not only when the first result is in: a worker that
            # finished early must not wait for a slower one.
            while len(pending) < window:
                if ahead is None:
                    if (task := next(todo, todo)) is todo:
                        break
                    ahead = task, pickle.dumps((fn, task), pickle.HIGHEST_PROTOCOL)
                w = min(self._workers, key=lambda w: len(w.assigned))
                if not self._has_room(w, len(ahead[1])):
                    break
                self._send(w, self._seq, *ahead)
                pending.append((self._seq, ahead[0]))
                self._seq += 1
                ahead = None
            if not pending:
                return
            first, task = pending[0]
            # Without waiting when the result is in: a worker blocked on a full pipe goes on while we yield.
            self._take_results(None if first not in self._done else 0)
            if first in self._done:
                pending.popleft()
                ok, value = self._done.pop(first)
                if not ok:
                    raise value
                yield task, value

    @staticmethod
    def _has_room(w: _Worker, size: int) -> bool:
        """Whether a task message of ``size`` bytes can go to w without the write waiting on a busy worker.

        The pipe holds at most the tasks w has not finished; an idle worker is reading, so any size goes.
        """
        if not w.assigned:
            return True
        queued = sum(n for *_, n in w.assigned)
        return len(w.assigned) < DEPTH and queued + size + _HEADER.size <= w.task_room // 2

    def _send(self, w: _Worker, seq: int, task: object, data: bytes) -> None:
        """Hand a task to w (``_has_room``, so this does not wait on w; a dead w raises WorkerDied)."""
        w.assigned.append((seq, task, len(data) + _HEADER.size))
        try:
            _write_all(w.task_w, data)
        except BrokenPipeError:
            self._raise_died(w)

    def _take_results(self, timeout: float | None) -> None:
        """Read whatever results have come (waiting up to ``timeout``, None: for one); WorkerDied if a worker ended."""
        for key, _ in self._selector.select(timeout):
            w, what = key.data
            if what == "sentinel" or not self._read(w):
                self._raise_died(w)

    def _read(self, w: _Worker) -> bool:
        """Take what w's result pipe holds without blocking, finishing messages as they complete; False at EOF."""
        while True:
            try:
                if w.body is None:
                    chunk = os.read(w.result_r, _HEADER.size - len(w.head))
                    if not chunk:
                        return False
                    w.head += chunk
                    if len(w.head) == _HEADER.size:
                        w.body, w.got = bytearray(_HEADER.unpack(w.head)[0]), 0
                    continue
                n = os.readv(w.result_r, [memoryview(w.body)[w.got :]])
            except BlockingIOError:
                return True
            if n == 0:
                return False
            w.got += n
            if w.got == len(w.body):
                seq, _, _ = w.assigned.popleft()
                self._done[seq] = pickle.loads(w.body)
                w.head, w.body = bytearray(), None

    def _raise_died(self, w: _Worker) -> None:
        w.proc.join(1)  # the sentinel fired or the pipe closed: the exit code is there or nearly
        raise WorkerDied(w.proc.pid, w.proc.exitcode, [task for _, task, _ in w.assigned])
