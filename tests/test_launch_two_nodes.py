"""Jobs across two nodes of a REAL SLURM cluster (CATDOG_SLURM_NODES=2 bash tests/slurm/cluster.sh start).

Each node is a slurmd in a network namespace of its own (its own eth0 on a bridge, its own hostname, its own
/etc/hosts in which, as on Debian, its name resolves to 127.0.1.1): the ranks of node 1 and node 2 can only reach
each other across that network, never over loopback. No variable is set for the network: launch/network.py must
find MASTER_ADDR and the interface by itself. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import ROOT, cli, last_logged_step, make_shards, queued, require_cluster, sacct
from train_helpers import final_weights, run_env_ranks

from launch.local import free_port
from launch.slurm import job_config, launch
from launch.slurm_config import load_slurm_config
from launch.slurm_follow import job_states

NODES = ("catdog-n1", "catdog-n2")  # as tests/slurm/cluster.sh names them
CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
DEBUG_CPU = ROOT / "configs" / "debug_cpu.yaml"
CPU_CLUSTER = ROOT / "configs" / "slurm" / "cpu_local.yaml"
JOB_TIMEOUT_S = 300  # a 2-node job of 4 ranks on a busy 2-core box: imports dominate
# debug_cpu (2 epochs of 2 steps on 32 photos), deterministic: the same result whatever the topology.
COMMON = ["train.deterministic=true"]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes() -> None:
    require_cluster(2)
    names = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30).stdout
    if not set(NODES) <= set(names.split()):
        msg = f"the nodes {NODES} of tests/slurm/cluster.sh are not in this cluster (sinfo: {names.split()})"
        if os.environ.get("CATDOG_REQUIRE_SLURM"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(two_nodes):
    before = set(queued())
    yield
    leftover = sorted(set(queued()) - before)
    if leftover:
        subprocess.run(["scancel", *leftover], timeout=30)


@pytest.fixture(scope="module")
def shards(real_data: Path, tmp_path_factory) -> Path:
    return make_shards(real_data, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single_node(shards: Path, tmp_path_factory):
    """The same config trained on this machine alone, by `world` plain rank processes (what a one-node SLURM
    task runs), once per world size."""
    runs: dict[int, Path] = {}

    def run(world: int) -> Path:
        if world not in runs:
            out = tmp_path_factory.mktemp(f"single{world}") / "run"
            overrides = ["--config", str(DEBUG_CPU), *COMMON, f"data.dir={shards}", f"run.dir={out}"]
            run_env_ranks(overrides, world=world, port=free_port(), timeout=JOB_TIMEOUT_S)
            runs[world] = out
        return runs[world]

    return run


def epochs(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "epoch" in r]


def assert_same_training(run: Path, reference: Path) -> None:
    """Same per-epoch metrics and the same final weights (to float tolerance) as the reference run."""
    got, want = epochs(run), epochs(reference)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        keys = {k for k in w if k.startswith(("train/loss", "train/accuracy", "val/")) or k in ("step", "lr")}
        assert keys and keys <= g.keys()
        for k in sorted(keys):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (g["epoch"], k)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def rank_log(run: Path, job_id: str, rank: int) -> str:
    return (run / "slurm" / f"{job_id}_{rank}_log.err").read_text(errors="replace")


@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_two_node_job_trains_across_the_nodes_as_one_node_does(
    two_nodes, shards: Path, single_node, tmp_path: Path, tasks_per_node: int
):
    run = tmp_path / "run"
    world = 2 * tasks_per_node
    res = cli(
        "slurm", "--config", str(DEBUG_CPU), "--nodes", "2", "--tasks-per-node", str(tasks_per_node),
        "--cpus-per-task", "1", "--time", "15", "--wait", *COMMON, f"data.dir={shards}", f"run.dir={run}",
        timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", res.stdout)[1]
    assert "final state: run COMPLETED" in res.stdout
    assert f"{world} process(es) (MULTI_CPU" in res.stdout
    # SLURM ran the ranks on both nodes, as one step.
    steps = _steps(job_id)
    assert [f"{job_id}.0", str(world), "catdog-n[1-2]"] in steps, steps
    # No network variable was set: each rank chose the master's address and the interface that routes to it. Its
    # name is loopback on its own node, so node 1 found its address through node 2.
    master = socket.gethostbyname(NODES[0])  # the host's /etc/hosts: the bridge address
    for rank in range(world):
        node = NODES[rank // tasks_per_node]
        log = rank_log(run, job_id, rank)
        assert f"rank {rank} on {node}: network: MASTER_ADDR={master} (" in log, log[-3000:]
        assert "GLOO_SOCKET_IFNAME=eth0 (routes to the master" in log
    # One run dir, written by the ranks of both nodes (each saves its own random state in each checkpoint).
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [f"random_states_{r}.pkl" for r in range(world)]
    assert json.loads((run / "final_metrics.json").read_text())["epochs_completed"] == 2
    assert_same_training(run, single_node(world))


def _steps(job_id: str) -> list[list[str]]:
    res = subprocess.run(
        ["sacct", "-n", "-P", "-o", "JobID,NTasks,NodeList", "-j", job_id], capture_output=True, text=True, timeout=60
    )
    return [line.split("|") for line in res.stdout.splitlines()]


def task_pid(job_id: str, rank: int, deadline: float) -> int:
    """The PID of a rank's task process (the one slurmstepd started), found through its environment."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = set((proc / "environ").read_bytes().split(b"\0"))
                parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                parent_comm = Path(f"/proc/{parent}/comm").read_text().strip()
            except OSError:  # exited meanwhile
                continue
            if want <= env and parent_comm == "slurmstepd":
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no task process of rank {rank} of job {job_id} before the deadline")


def start_job(overrides: list[str], run: Path, shards: Path):
    slurm = load_slurm_config(CPU_CLUSTER, {"nodes": 2, "tasks_per_node": 1})
    cfg = job_config(DEBUG_CPU, [*overrides, f"data.dir={shards}", f"run.dir={run}"], slurm)
    (submitted,) = launch([("run", cfg)], slurm, run / "slurm", out=sys.stderr)
    return submitted.job


def wait_for_step(job, run: Path, step: int, deadline: float) -> None:
    polls = 0
    while last_logged_step(run) < step:
        assert time.time() < deadline, "training did not start before the deadline"
        polls += 1
        if polls % 20 == 0:  # sacct every second, the log every 50 ms
            assert job_states([job.job_id])[job.job_id] not in ("FAILED", "COMPLETED", "CANCELLED")
        time.sleep(0.05)


def test_preempting_a_two_node_job_stops_every_rank_at_one_step_and_resumes_there(
    two_nodes, shards: Path, tmp_path: Path
):
    run = tmp_path / "run"
    # 6 epochs of 16 steps, no periodic checkpoint: only the signal can make a mid-epoch one.
    overrides = [
        "train.epochs=6", "train.batch_size=2", "train.max_steps=0", "train.checkpoint_every=0",
        "eval.every_epochs=6", "model.image_size=48", "track.backends=[csv,wandb]",
    ]  # fmt: skip
    job = start_job(overrides, run, shards)
    deadline = time.time() + JOB_TIMEOUT_S
    pid = task_pid(job.job_id, 1, deadline)  # found before training starts: the signal comes early in the loop
    wait_for_step(job, run, 2, deadline)
    first_id = (run / "wandb_run_id").read_text().strip()
    # The signal reaches rank 1 on node 2 only (SLURM signals nodes at different moments; this is the extreme):
    # rank 0 on node 1 must stop at the same step through the ranks' vote, and it is rank 0 that requeues.
    os.kill(pid, signal.SIGUSR2)

    while job_states([job.job_id])[job.job_id] != "COMPLETED":
        assert time.time() < deadline + JOB_TIMEOUT_S, "requeued job did not finish"
        assert job_states([job.job_id])[job.job_id] not in ("FAILED", "CANCELLED", "TIMEOUT")
        time.sleep(1)

    history = [state for (state,) in sacct(job.job_id, "State", "--duplicates")]
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    pattern = r"rank (\d) on (\S+): stopped at step (\d+) \(epoch (\d+), batch (\d+)\)"
    stops = [re.findall(pattern, rank_log(run, job.job_id, r)) for r in (0, 1)]
    assert [len(s) for s in stops] == [1, 1], stops  # each rank stopped once
    (r0, node0, *where), (r1, node1, *where1) = stops[0][0], stops[1][0]
    assert (r0, node0, r1, node1) == ("0", NODES[0], "1", NODES[1])
    assert where == where1  # both nodes' ranks stopped at the same step (and epoch, batch)
    step = int(where[0])
    log = (run / "train.log").read_text()
    resumed = re.search(r"resumed from \S+/step_(\d+): epoch (\d+), batch (\d+), step (\d+)", log)
    assert resumed and step >= 2, log[-3000:]
    assert [int(resumed[i]) for i in (1, 2, 3, 4)] == [step, int(where[1]), int(where[2]), step]
    # Exact-once: every step's loss logged once, none skipped.
    csv_steps = [
        int(line.split(",")[0])
        for line in (run / "metrics.csv").read_text().splitlines()[1:]
        if ",train/loss_step," in line
    ]
    assert csv_steps == list(range(1, 97))
    assert (run / "wandb_run_id").read_text().strip() == first_id
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(first_id) for p in wandb_runs)  # one W&B run, resumed
    assert json.loads((run / "final_metrics.json").read_text())["epochs_completed"] == 6


def test_a_node_that_stops_answering_ends_the_job_within_the_timeout_naming_it(two_nodes, shards: Path, tmp_path):
    run = tmp_path / "run"
    timeout_s = 30
    overrides = [
        f"train.dist_timeout_s={timeout_s}", "train.epochs=1000", "train.batch_size=2", "train.max_steps=0",
        "eval.every_epochs=1000",
    ]  # fmt: skip
    job = start_job(overrides, run, shards)  # a 30-minute time limit
    deadline = time.time() + JOB_TIMEOUT_S
    pid = task_pid(job.job_id, 1, deadline)
    wait_for_step(job, run, 3, deadline)
    # Rank 1's task on node 2 stops answering mid-epoch, as a node that died does to its peers (no reset, no
    # exit code for srun to act on): only the collective timeout can end the job now.
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while job_states([job.job_id])[job.job_id] in ("RUNNING", "COMPLETING", "PENDING"):
            assert time.monotonic() - stopped_at < timeout_s + 150, "the job is still allocated"
            time.sleep(1)
        took = time.monotonic() - stopped_at
    finally:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    assert job_states([job.job_id])[job.job_id] == "FAILED"
    # timeout + the survivors' roll call (10 s here) + srun's kill of the step, with room for a slow machine
    assert timeout_s <= took < timeout_s + 120, took
    lines = [line for line in rank_log(run, job.job_id, 0).splitlines() if line.startswith("catdog: lost")]
    assert len(lines) == 1, rank_log(run, job.job_id, 0)[-3000:]
    assert lines[0].startswith(f"catdog: lost rank 1 on {NODES[1]} (1 of 2 ranks; no answer within ")
    assert f"train.dist_timeout_s={timeout_s} s" in lines[0]


def test_local_launch_on_two_machines(two_nodes, shards: Path, single_node, tmp_path: Path):
    # `catdog-launch local` run on each of two machines (the two nodes' namespaces, without SLURM), the same
    # command but for --machine-rank; the main machine is named, and its name is loopback on itself.
    run = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one-node reference's ranks
    procs = []
    for rank, node in enumerate(NODES):
        cmd = [
            "bash", str(CLUSTER_SH), "exec", node, "--", sys.executable, "-m", "launch", "local",
            "--config", str(DEBUG_CPU), "--cpu-ranks", "1", "--num-machines", "2", "--machine-rank", str(rank),
            "--main-process-ip", NODES[0], "--port", str(port), *COMMON, f"data.dir={shards}", f"run.dir={run}",
        ]  # fmt: skip
        out = tmp_path / f"machine{rank}.log"
        with open(out, "w") as f:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), out))
    try:
        for p, _ in procs:
            p.wait(timeout=JOB_TIMEOUT_S)
    finally:
        # TERM, which catdog-launch local passes on to accelerate and the ranks; a KILL would orphan them.
        for p, _ in procs:
            if p.poll() is None:
                p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    logs = [out.read_text() for _, out in procs]
    assert [p.returncode for p, _ in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    master = socket.gethostbyname(NODES[0])
    for rank, log in enumerate(logs):
        assert f"machine {rank} of 2: network: MASTER_ADDR={master} (" in log, log[-2000:]
        assert "GLOO_SOCKET_IFNAME=eth0 (routes to the master" in log
        assert f"--machine_rank {rank} --main_process_ip {master}" in log
    assert "2 process(es) (MULTI_CPU" in (run / "train.log").read_text()
    assert_same_training(run, single_node(2))
