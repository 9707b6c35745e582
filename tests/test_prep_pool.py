"""catdog-prep's worker pool: results in order whatever order workers finish in, big messages both ways, a task's
exception raised in the parent, and a dead worker reported (never waited for) with the tasks it held."""

from __future__ import annotations

import os
import signal
import time

import pytest

from data_prep.pool import DEPTH, Pool, WorkerDied


def _slow_echo(task: tuple[int, float]) -> tuple[int, int]:
    n, delay = task
    time.sleep(delay)
    return n, os.getpid()


def _big(task: bytes) -> bytes:
    return task[::-1] * 20  # a result many times the size of a pipe's buffer


def _fail_on_three(n: int) -> int:
    if n == 3:
        raise ValueError(f"bad task {n}")
    return n


def _die_on_five(n: int) -> int:
    if n == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.01)
    return n


def test_results_come_in_task_order_from_every_worker():
    # Later tasks finish first (shorter sleeps), so results arrive out of order and must be put back in order.
    tasks = [(n, 0.02 * ((n * 7) % 5)) for n in range(30)]
    with Pool(3) as pool:
        out = list(pool.imap_ordered(_slow_echo, tasks, window=12))
    assert [t for t, _ in out] == tasks
    assert [r[0] for _, r in out] == list(range(30))
    assert len({r[1] for _, r in out}) == 3  # every worker took part
    assert os.getpid() not in {r[1] for _, r in out}


def test_messages_larger_than_a_pipe_go_both_ways():
    task = os.urandom(300_000)  # a task bigger than a pipe holds: sent only to an idle worker
    with Pool(2) as pool:
        out = list(pool.imap_ordered(_big, [task] * 5, window=8))
    assert len(out) == 5 and all(r == task[::-1] * 20 for _, r in out)


def test_a_task_exception_is_raised_in_the_parent_at_its_turn():
    seen = []
    with Pool(2) as pool, pytest.raises(ValueError, match="bad task 3"):
        for _, r in pool.imap_ordered(_fail_on_three, range(10), window=4):
            seen.append(r)
    assert seen == [0, 1, 2]


def test_a_worker_that_dies_is_reported_with_its_tasks_and_nothing_is_left_running():
    t0 = time.monotonic()
    with pytest.raises(WorkerDied) as e:
        with Pool(2) as pool:
            pids = [w.proc.pid for w in pool._workers]
            list(pool.imap_ordered(_die_on_five, range(40), window=8))
    assert time.monotonic() - t0 < 30  # seen at once; the bound only guards against waiting forever
    assert 5 in e.value.tasks and len(e.value.tasks) <= DEPTH
    for pid in pids:  # the other worker was stopped too, and both were reaped
        assert not os.path.exists(f"/proc/{pid}")
