"""A DataLoader worker killed at the worst instant -- part-way through sending a batch -- in every pool we run: the
process says so in one line and exits 1, within a bound, and no other process (rank) is left waiting.

The kill: tests/worker_kill/sitecustomize.py (on PYTHONPATH) makes one worker write its batch message's length and
half the message, then SIGKILL itself -- what the out-of-memory killer leaves when it strikes between two writes.
The unit tests below put a half-written message in a real pipe the same way and check the queue the loaders use.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing import resource_sharer
from pathlib import Path

import pytest
import torch
from kill_helpers import (
    ENDS_WITHIN_S,
    TIMEOUT_S,
    assert_ended_promptly,
    assert_one_line,
    hook_module,
    kill_env,
    killed,
    run_killed,
)
from prep_helpers import make_tree
from torch.utils.data import DataLoader, Dataset
from train_helpers import BIN, ROOT, TINY, make_shards, run_train, train_cmd

from train.data.workers import WorkerDied, guarded, loader_context, quiet_worker, worker_died

# ------------------------------------------------------------------------------------------- the queue, in-process


def _put_then_block(q, payload: bytes) -> None:
    q.put(payload)  # more than a pipe holds: the queue's feeder thread blocks part-way through writing it
    time.sleep(60)


def _half_written_queue() -> tuple[multiprocessing.queues.Queue, int]:
    """A loader queue whose pipe holds the start of a 4 MB message whose writer was SIGKILLed; the writer's pid."""
    q = loader_context().Queue()
    writer = loader_context().Process(target=_put_then_block, args=(q, b"x" * (4 << 20)), daemon=True)
    writer.start()
    deadline = time.monotonic() + 60
    while _bytes_waiting(q) <= 4:  # the length prefix and part of the message: no pipe holds all 4 MB
        assert time.monotonic() < deadline, "the writer sent nothing within 60 s"
        time.sleep(0.01)
    writer.kill()
    writer.join()
    return q, writer.pid


def _bytes_waiting(q) -> int:
    import termios

    buf = fcntl.ioctl(q._reader.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def _echo(q_in, q_out) -> None:
    while (item := q_in.get()) is not None:
        q_out.put(item)


def test_the_loader_queue_carries_messages_of_every_size_in_order():
    ctx = loader_context()
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_echo, args=(q_in, q_out), daemon=True)
    child.start()
    # Empty, small, past 16 KiB (sent in two writes), several pipe-fulls, a tensor (shared memory), many at once.
    items = [b"", "small", b"y" * 20_000, os.urandom(3 << 20), torch.arange(10_000), *range(200)]
    for item in items:
        q_in.put(item)
    got = [q_out.get(timeout=60) for _ in items]
    q_in.put(None)
    child.join(60)
    assert got[:3] == items[:3] and got[3] == items[3] and torch.equal(got[4], items[4]) and got[5:] == items[5:]
    with pytest.raises(queue.Empty):
        q_out.get(timeout=0.1)
    assert q_out.empty()


def test_the_loader_queue_reads_multiprocessings_framing_of_huge_messages_too():
    # Messages over 2 GiB carry -1 and an 8-byte length; written here by hand, small, to check the reading.
    q = loader_context().Queue()
    body = pickle.dumps({"batch": list(range(100))})
    for _ in range(2):
        q._sem.acquire()  # as put() does for each message
    os.write(q._writer.fileno(), struct.pack("!i", -1) + struct.pack("!Q", len(body)) + body)
    os.write(q._writer.fileno(), struct.pack("!i", len(body)) + body)
    assert q.get(timeout=10) == q.get(timeout=10) == {"batch": list(range(100))}


def test_a_half_written_message_makes_get_time_out_instead_of_waiting_forever():
    q, _ = _half_written_queue()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)  # multiprocessing's own Queue waits here forever for the other 4 MB
    assert time.monotonic() - t0 < 30
    assert q.empty()  # no message can be taken (multiprocessing's Queue says otherwise: bytes are waiting)
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_a_reader_thread_stops_when_asked_despite_a_half_written_message():
    # torch's pin-memory thread (a model on a GPU) reads the workers' results like this, and the loader's shutdown
    # joins it: with multiprocessing's Queue the join waits forever behind the half-written message.
    q, _ = _half_written_queue()
    done = threading.Event()

    def pin_memory_loop() -> None:  # torch.utils.data._utils.pin_memory._pin_memory_loop's reading
        while not done.is_set():
            try:
                q.get(timeout=0.5)
            except queue.Empty:
                continue

    reader = threading.Thread(target=pin_memory_loop, daemon=True)
    reader.start()
    time.sleep(1)
    done.set()
    reader.join(30)
    assert not reader.is_alive()


# --------------------------------------------------------------------------------------- a real DataLoader, in-process


class _Sleepy(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.5 if i == 0 else 0.05)  # the main thread is past iter() when the first batch comes
        return torch.full((64, 64), float(i))


def _spend_sigchld(within_s: float) -> bool:
    """Catch torch's SIGCHLD error and carry on, as a careless handler would; whether one came."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except RuntimeError:
            return True
    return False


def test_a_worker_death_whose_signal_was_spent_elsewhere_is_still_seen(tmp_path):
    # torch learns of a worker's death from SIGCHLD: its handler raises in the main thread wherever that is. Code
    # that catches and carries on (logging's error handler does) spends it; the loader then reads the half-written
    # message, and only its 5-s liveness check, which needs a read that times out, can tell.
    hook = hook_module()
    hook.install(str(tmp_path / "claim"), at=1)
    try:
        loader = DataLoader(_Sleepy(), batch_size=None, num_workers=2, multiprocessing_context=loader_context("fork"))
        batches = guarded(loader)
        assert _spend_sigchld(60), "no SIGCHLD error within 60 s"
        t0 = time.monotonic()
        with pytest.raises(WorkerDied) as e:
            list(batches)  # multiprocessing's own Queue waits here forever
    finally:
        hook.uninstall()
    assert time.monotonic() - t0 < ENDS_WITHIN_S
    pid, _ = killed(tmp_path / "claim")
    assert (e.value.pid, e.value.exitcode) == (pid, -signal.SIGKILL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pin_memory needs a GPU")
@pytest.mark.timeout(300)
def test_with_pin_memory_a_worker_killed_mid_send_ends_the_loader_and_its_shutdown(tmp_path):
    # The pin-memory thread reads the workers' results; the loader's shutdown joins it. Behind a half-written
    # message, multiprocessing's Queue kept that thread, and so the shutdown, waiting forever.
    hook = hook_module()
    hook.install(str(tmp_path / "claim"), at=1)
    try:
        loader = DataLoader(
            _Sleepy(), batch_size=None, num_workers=2, pin_memory=True, multiprocessing_context=loader_context("fork")
        )
        it = iter(loader)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            list(it)
        it._shutdown_workers()  # what dropping the iterator does
    finally:
        hook.uninstall()
    assert time.monotonic() - t0 < ENDS_WITHIN_S
    assert not it._pin_memory_thread.is_alive()
    killed(tmp_path / "claim")


def _share_a_descriptor(conn, quiet: bool) -> None:
    if quiet:
        quiet_worker(0)
    r, _ = os.pipe()
    shared = resource_sharer.DupFd(r)  # what torch does with a batch's shared memory: serve it on request
    conn.send(shared._id[0])  # the address its thread listens on
    conn.recv()


def test_a_fetch_the_main_process_abandons_leaves_no_traceback_in_a_worker(capfd):
    # The main process drops a half-done fetch of a batch when another worker's death interrupts it, or when it
    # exits: the worker's serving thread then meets a reset connection.
    ctx = multiprocessing.get_context("fork")
    for quiet in (False, True):
        mine, theirs = ctx.Pipe()
        worker = ctx.Process(target=_share_a_descriptor, args=(theirs, quiet))
        worker.start()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(mine.recv())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        time.sleep(0.5)
        mine.send(None)
        worker.join(30)
        err = capfd.readouterr().err
        assert ("Traceback" in err) != quiet, err  # multiprocessing's own thread prints one; quiet_worker not


def test_torchs_own_messages_read_as_worker_deaths():
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    try:
        try:
            raise killed
        except RuntimeError as e:
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly") from e
    except RuntimeError as outer:
        death = worker_died(outer)
    assert (death.pid, death.exitcode) == (4242, -signal.SIGKILL)
    assert "SIGKILL" in str(death) and "out-of-memory" in str(death)
    bus = worker_died(RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible ..."))
    assert bus.exitcode == -signal.SIGBUS and "/dev/shm" in str(bus)
    assert worker_died(RuntimeError("DataLoader worker (pid(s) 7, 8) exited unexpectedly")).exitcode is None
    assert worker_died(RuntimeError("CUDA out of memory")) is None


# ------------------------------------------------------------------------------------------------ the tools, killed


@pytest.fixture(scope="module")
def shards(real_data, tmp_path_factory) -> Path:
    return make_shards(real_data, tmp_path_factory.mktemp("shards"))


WORKERS = ["data.num_workers=2", "train.cpu=true"]


@pytest.mark.slow
def test_training_worker_killed_mid_send_stops_the_run_with_one_line_and_a_rerun_resumes(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, *WORKERS, f"data.dir={shards}", f"run.dir={run_dir}", "train.epochs=2"]
    claim = tmp_path / "claim"
    # 5 batches an epoch, 2 persistent workers: worker 0 sends batches 0, 2, 4, then 0 and 2 of epoch 2 (the 5th).
    proc = run_killed(train_cmd(args), claim, kill_env(claim, at=5, dataset="train"))
    pid, kind = killed(claim)
    assert kind == "train"
    advice = (f"resume from the last checkpoint in {run_dir}", "data.num_workers (was 2)")
    assert_one_line(proc.stderr, proc.returncode, "catdog-train", pid, *advice)
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000005"]  # epoch 1's end
    rerun = run_train(args)
    assert "resum" in rerun.stderr.lower()
    assert (run_dir / "final_metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["train", "eval"])
def test_a_ranks_worker_killed_mid_send_stops_that_rank_in_one_line_and_the_other_follows(
    loader, shards, tmp_path, port
):
    # Plain processes with the variables a SLURM task gets (no launcher to end the others): rank 1's worker dies in
    # the training loader (rank 0 then waits in DDP's gradient all-reduce) or in the validation loader (rank 0 then
    # waits in the metrics' all-reduce). Rank 0 must end too, through gloo's closed connection.
    args = [*TINY, *WORKERS, f"data.dir={shards}", f"run.dir={tmp_path / 'run'}", "train.epochs=2"]
    claim = tmp_path / "claim"
    procs = []
    for rank in range(2):
        rank_env = kill_env(
            claim, at=2, rank=1, dataset=loader, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                train_cmd(args), cwd=ROOT, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert_ended_promptly(claim)
    pid, kind = killed(claim)
    assert kind == loader
    advice = ("resume from the last checkpoint", "data.num_workers (was 2)")
    assert_one_line(errors[1], procs[1].returncode, "catdog-train", pid, *advice)
    assert procs[0].returncode != 0, errors[0][-4000:]  # it stopped (gloo: "Connection closed by peer")


@pytest.fixture(scope="module")
def model_and_photos(shards, real_data, tmp_path_factory) -> dict:
    """A tiny trained bundle, and labelled photos (pre-split) at their original size."""
    root = tmp_path_factory.mktemp("use")
    run_train([*TINY, f"data.dir={shards}", f"run.dir={root / 'run'}", "train.epochs=1"])
    src = make_tree(real_data, root / "src", 24, layout="presplit", short_side=None)
    return {"bundle": root / "run" / "model", "src": src}


def tool_cmd(name: str, *args) -> list[str]:
    return [sys.executable, "-m", f"train.use.{name}", *map(str, args)]


TOOL_ADVICE = ("nothing was written", "--workers (were 2)", "--batch-size (was 4)")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["photos", "shards"])
def test_predict_worker_killed_mid_send_is_one_line(source, model_and_photos, shards, tmp_path):
    # Photos: the workers decode and score whole batches (a PyTorch model on CPU). Shards: the trainer's eval loader
    # decodes, the model runs in this process.
    data = model_and_photos["src"] / "train" if source == "photos" else shards
    out = tmp_path / "rows.csv"
    cmd = tool_cmd("predict", model_and_photos["bundle"], data, "-o", out, "--workers", "2", "--batch-size", "4")
    claim = tmp_path / "claim"
    proc = run_killed([*cmd, "--no-progress"], claim, kill_env(claim))
    assert_one_line(proc.stderr, proc.returncode, "catdog-predict", killed(claim)[0], *TOOL_ADVICE)
    assert not out.exists()


@pytest.mark.slow
def test_evaluate_worker_killed_mid_send_is_one_line(model_and_photos, tmp_path):
    # Labelled photos: the workers decode, the model runs in this process.
    out = tmp_path / "eval"
    src = model_and_photos["src"]
    cmd = tool_cmd(
        "evaluate", model_and_photos["bundle"], src, "--split", "train", "--workers", "2", "--batch-size", "4"
    )
    claim = tmp_path / "claim"
    proc = run_killed([*cmd, "--out", out], claim, kill_env(claim))
    assert_one_line(proc.stderr, proc.returncode, "catdog-evaluate", killed(claim)[0], *TOOL_ADVICE)
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_two_rank_evaluate_worker_killed_mid_send_stops_both_ranks(model_and_photos, shards, tmp_path, port):
    # Rank 1's worker dies; rank 0 finishes its share and waits in the gather of every rank's results.
    launch = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
    ]
    args = [model_and_photos["bundle"], shards, "--split", "train", "--workers", "2", "--batch-size", "4"]
    out = tmp_path / "eval"
    claim = tmp_path / "claim"
    cmd = [*launch, "-m", "train.use.evaluate", *map(str, args), "--out", str(out)]
    proc = run_killed(cmd, claim, kill_env(claim, rank=1))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("catdog-evaluate:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert f"worker process (pid {killed(claim)[0]}) was killed (SIGKILL" in lines[0], lines[0]
    assert not (out / "metrics.json").exists()
