"""Byte-identical output: for any --workers, after kill -9 + rerun, and wherever/however the files are listed."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prep_helpers import ROOT, make_tree, read_shards, run_cli, tree_bytes

from data_prep.prepare import ENCODE_BATCH_MAX, PrepArgs, _guided_batches, run


@pytest.mark.slow
def test_output_identical_for_1_2_and_3_workers(real_data: Path, tmp_path: Path):
    src = make_tree(real_data, tmp_path / "src", 40)
    (src / "dog" / "dup.jpg").write_bytes((src / "cat" / "cat.0.jpg").read_bytes())  # a duplicate and a bad file
    (src / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    common = dict(src=src, image_size=64, shard_max_count=7, progress=False)
    one = run(PrepArgs(out=tmp_path / "w1", workers=1, **common), log=lambda _: None)
    two = run(PrepArgs(out=tmp_path / "w2", workers=2, **common), log=lambda _: None)
    three = run(PrepArgs(out=tmp_path / "w3", workers=3, **common), log=lambda _: None)  # other task sizes
    assert one["counts"] == two["counts"] == three["counts"]
    assert one["counts"]["written"] == 80 and one["counts"]["duplicates"] == 1 and one["counts"]["skipped"] == 1
    a, b, c = tree_bytes(tmp_path / "w1"), tree_bytes(tmp_path / "w2"), tree_bytes(tmp_path / "w3")
    assert sorted(a) == sorted(b) and len([n for n in a if n.endswith(".tar")]) >= 3
    assert a == b == c


@pytest.mark.parametrize("n, workers", [(0, 2), (1, 2), (80, 2), (3000, 2), (1000, 7)])
def test_encode_tasks_cover_every_item_once_in_order_and_shrink_to_one(n: int, workers: int):
    items = list(range(n))
    batches = list(_guided_batches(items, workers, ENCODE_BATCH_MAX))
    assert [x for b in batches for x in b] == items
    sizes = [len(b) for b in batches]
    assert sizes == sorted(sizes, reverse=True) and all(1 <= s <= ENCODE_BATCH_MAX for s in sizes)
    if n >= 4 * workers:
        assert sizes[-1] == 1  # the last task is one image: no worker waits long at the end
    if n >= 3000:
        assert len(batches) < n / 16  # few tasks: per-task overhead stays small


def test_split_and_order_do_not_depend_on_location_or_listing(real_data: Path, tmp_path: Path):
    # The same photos in two places, created in opposite orders (so directory listing order differs).
    src1 = make_tree(real_data, tmp_path / "a" / "src", 15)
    src2 = tmp_path / "elsewhere" / "photos"
    for p in sorted(src1.rglob("*.jpg"), reverse=True):
        target = src2 / p.relative_to(src1)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    kw = dict(image_size=48, progress=False, workers=1)
    run(PrepArgs(src=src1, out=tmp_path / "o1", **kw), log=lambda _: None)
    run(PrepArgs(src=src2, out=tmp_path / "o2", **kw), log=lambda _: None)
    shards1 = {k: v for k, v in tree_bytes(tmp_path / "o1").items() if k.endswith(".tar")}
    shards2 = {k: v for k, v in tree_bytes(tmp_path / "o2").items() if k.endswith(".tar")}
    assert shards1 == shards2 and shards1

    # Stratified: 10% val and 10% test of each class (15 -> round(1.5) = 2 each), the rest train.
    samples = read_shards(tmp_path / "o1")
    for cls in (0, 1):
        per_split = {
            sp: sum(1 for s in samples.values() if s["cls"] == cls and s["split"] == sp)
            for sp in ("train", "val", "test")
        }
        assert per_split == {"train": 11, "val": 2, "test": 2}

    # Another seed gives another split.
    run(PrepArgs(src=src1, out=tmp_path / "o3", seed=1, **kw), log=lambda _: None)
    val0 = {s["json"]["source"] for s in samples.values() if s["split"] == "val"}
    val1 = {s["json"]["source"] for s in read_shards(tmp_path / "o3").values() if s["split"] == "val"}
    assert val0 != val1


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_uninterrupted(real_data: Path, tmp_path: Path):
    # Original-size photos and tiny shards, so the run takes a few seconds and closes many shards.
    src = make_tree(real_data, tmp_path / "src", 120, short_side=None)
    args = ["--image-size", "224", "--shard-max-count", "10", "--workers", "2"]
    ref = tmp_path / "ref"
    r = run_cli(src, ref, *args)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", str(src), str(out), *args, "--no-progress"]
    for shards_before_kill in (2, 9):  # the second kill lands during the resumed run
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while len(list(out.glob("*.tar"))) < shards_before_kill:  # some shards finished, more to go
            assert proc.poll() is None, "finished before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 60 s"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: parent and pool workers
        proc.wait(timeout=30)
        assert not (out / "_info.json").exists()  # nothing a reader would trust as finished

    r = run_cli(src, out, *args)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert tree_bytes(out) == tree_bytes(ref)  # no temp or progress files left, every byte equal


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (its pool workers), read from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


_MID_RUN_ARGS = ["--image-size", "224", "--shard-max-count", "10", "--workers", "2"]
# Upscaled to 480 px at quality 100 (~150 KB a photo): an early task's result is MBs, more than a pipe holds.
_BIG_RESULT_ARGS = ["--image-size", "480", "--quality", "100", "--shard-max-count", "10", "--workers", "2"]


def _start_mid_run(
    real_data: Path, tmp_path: Path, args: list[str] = _MID_RUN_ARGS, **popen
) -> tuple[Path, Path, Path, subprocess.Popen]:
    """An uninterrupted reference run, then the same run started and caught once its first shard is written.

    Returns (src, ref, out, proc); the caller interrupts proc.
    """
    src = make_tree(real_data, tmp_path / "src", 60, short_side=None)
    ref = tmp_path / "ref"
    assert run_cli(src, ref, *args).returncode == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", str(src), str(out), *args, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")):  # encoding is under way: some shards done, more to go
        finished = proc.poll() is not None
        if finished or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("finished before it could be interrupted" if finished else "no shard within 60 s")
        time.sleep(0.002)
    return src, ref, out, proc


def _assert_left_nothing_trusted_and_rerun_resumes(
    src: Path, ref: Path, out: Path, args: list[str] = _MID_RUN_ARGS
) -> None:
    assert not (out / "_info.json").exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # no half-written shard left
    r = run_cli(src, out, *args)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert tree_bytes(out) == tree_bytes(ref)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # nothing left of it: it ended as it should
        os.killpg(pgid, signal.SIGKILL)


def _assert_worker_died_error(proc: subprocess.Popen, stderr: str) -> None:
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "worker process died" in lines[0] and "rerun" in lines[0], stderr


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_cleanly_then_rerun_resumes(real_data: Path, tmp_path: Path):
    # What SLURM preemption, scancel or a time limit does: SIGTERM to every process of the job.
    src, ref, out, proc = _start_mid_run(real_data, tmp_path, start_new_session=True)
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "terminated (SIGTERM)" in lines[0] and "rerun" in lines[0], stderr
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers):  # stopped, not left running on their queue
        assert time.monotonic() < deadline, "pool workers still alive after the parent exited"
        time.sleep(0.05)
    _assert_left_nothing_trusted_and_rerun_resumes(src, ref, out)


@pytest.mark.slow
def test_worker_killed_mid_run_fails_promptly_then_rerun_completes(real_data: Path, tmp_path: Path):
    # What the out-of-memory killer does to a worker decoding a huge image: SIGKILL to that worker alone,
    # here at whatever instant the first shard appears (the test below pins the worst instant down).
    src, ref, out, proc = _start_mid_run(real_data, tmp_path, start_new_session=True)
    try:
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)  # a lost task used to make the run wait forever
    finally:
        _kill_group(proc.pid)  # the parent and any worker, should it hang
    _assert_worker_died_error(proc, stderr)
    _assert_left_nothing_trusted_and_rerun_resumes(src, ref, out)


_WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}


def _sending_part_of_a_message(pid: int) -> bool:
    """True while ``pid`` sleeps in write(2) on a pipe with more than a length prefix to go: mid-message.

    /proc/PID/syscall reads "number fd buffer count ..." for a process blocked in a system call.
    """
    try:
        nr, fd, _, count = Path(f"/proc/{pid}/syscall").read_text().split()[:4]
        return (
            int(nr) == _WRITE_SYSCALL[platform.machine()]
            and int(count, 16) > 16
            and os.readlink(f"/proc/{pid}/fd/{int(fd, 16)}").startswith("pipe:")
        )
    except PermissionError:
        pytest.fail(f"may not read /proc/{pid}/syscall (ptrace restricted): this test cannot see the worker's state")
    except (OSError, ValueError):  # running, exited, or not in a system call
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in _WRITE_SYSCALL, reason="reads Linux's /proc/PID/syscall"
)
def test_worker_killed_while_sending_a_large_result_fails_promptly_then_rerun_completes(
    real_data: Path, tmp_path: Path
):
    # The worst instant: a worker killed part-way through sending a multi-MB result. A reader waiting for the
    # rest of that message waits forever. Pausing the parent makes every worker that finishes a task block
    # in write(2) with part of its result sent; the test kills one there, then lets the parent go on.
    src, ref, out, proc = _start_mid_run(real_data, tmp_path, _BIG_RESULT_ARGS, start_new_session=True)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while not (victims := [w for w in _children(proc.pid) if _sending_part_of_a_message(w)]):
            assert time.monotonic() < deadline, "no worker blocked sending a result within 60 s"
            time.sleep(0.01)
        os.kill(victims[0], signal.SIGKILL)
        while _sending_part_of_a_message(victims[0]):  # gone (a zombie until the parent reaps it)
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=30)  # on a shared result pipe this waits forever
    finally:
        _kill_group(proc.pid)
    _assert_worker_died_error(proc, stderr)
    _assert_left_nothing_trusted_and_rerun_resumes(src, ref, out, _BIG_RESULT_ARGS)
