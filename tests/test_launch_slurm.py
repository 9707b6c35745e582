"""Against a REAL SLURM (tests/slurm/cluster.sh, one node or more): single-node training jobs, a sweep array, a
requeue. Jobs spanning two nodes: tests/test_launch_two_nodes.py.

Each node has 2 CPUs: a 2-task job takes one node. Every wait is bounded, so a stuck job fails the test.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from launch_helpers import cli as launch_cli
from launch_helpers import last_logged_step, make_shards, queued, require_cluster, sacct, tiny_config

from launch.slurm import check_resources, job_config, launch, partition_nodes
from launch.slurm_config import load_slurm_config
from launch.slurm_follow import JobLostError, Submitted, follow, job_states
from train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CPU_CLUSTER = ROOT / "configs" / "slurm" / "cpu_local.yaml"  # 2 CPU ranks, partition debug
JOB_TIMEOUT_S = 240  # one tiny training job: ~15 s of imports + a few seconds of training, on a busy box

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip (or, with CATDOG_REQUIRE_SLURM set, fail) unless a SLURM node here accepts jobs."""
    require_cluster(1)


@pytest.fixture(scope="session")
def shards(real_data: Path, tmp_path_factory) -> Path:
    return make_shards(real_data, tmp_path_factory.mktemp("data"))


@pytest.fixture
def train_yaml(shards: Path, tmp_path: Path) -> Path:
    return tiny_config(tmp_path / "tiny.yaml", shards)  # W&B offline: the run id is real


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(slurm_cluster):
    """A test that fails mid-job must not leave its job holding the node's 2 CPUs for the next tests."""
    before = set(queued())
    yield
    leftover = sorted(set(queued()) - before)
    if leftover:
        subprocess.run(["scancel", *leftover], timeout=30)


def cli(*argv: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return launch_cli(*argv, timeout=timeout)


@pytest.mark.slow
def test_two_task_training_job(slurm_cluster, train_yaml: Path, tmp_path: Path):
    run = tmp_path / "run"
    # A run dir used before, submitted with train.resume=none: the old state is moved aside at submission (not by
    # the job, whose requeue would then start over again), and the job itself resumes (auto) what it starts.
    (run / "checkpoints" / "step_00000099").mkdir(parents=True)
    (run / "checkpoints" / "step_00000099" / "trainer_state.json").write_text("{}")
    (run / "wandb_run_id").write_text("0ldrun\n")
    args = ["slurm", "--config", str(train_yaml), "--slurm-config", str(CPU_CLUSTER), f"run.dir={run}"]
    dry = cli(*args, "--dry-run", "train.resume=none", timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert (run / "checkpoints" / "step_00000099").is_dir()  # a dry run moves nothing

    res = cli(*args, "--wait", "train.resume=none")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (previous,) = (run / "previous").iterdir()
    assert f"train.resume=none: moved the previous checkpoints and tracker state to {previous}" in res.stdout
    assert (previous / "checkpoints" / "step_00000099").is_dir() and "resume: auto" in (
        run / "submitted_config.yaml"
    ).read_text()
    assert "step_00000099" not in {p.name for p in (run / "checkpoints").iterdir()}
    assert (run / "wandb_run_id").read_text().strip() != "0ldrun"
    job_id = re.search(r"submitted job (\d+)", res.stdout)[1]
    assert f"run dir {run}" in res.stdout and f"{run}/slurm/{job_id}_0_log.out" in res.stdout
    assert "final state: run COMPLETED" in res.stdout
    assert "2 process(es) (MULTI_CPU" in res.stdout  # --wait streamed rank 0's log, which saw 2 gloo ranks

    # The script SLURM ran is the one --dry-run printed (same submitit machinery, job id aside).
    submitted = (run / "slurm" / f"{job_id}_submission.sh").read_text()
    assert submitted.strip() == dry.stdout.split("\n# --cpus-per-task")[0].strip()
    assert "# --cpus-per-task 1 (as given)" in dry.stdout  # the resource file's value, said as such
    # SLURM ran 2 tasks of 1 CPU each, one log per rank.
    steps = subprocess.run(
        ["sacct", "-n", "-P", "-o", "JobID,NTasks,AllocCPUS,State", "-j", job_id],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert f"{job_id}.0|2|2|COMPLETED" in steps  # the srun step: 2 tasks on 2 CPUs
    assert (run / "slurm" / f"{job_id}_1_log.err").is_file()

    # The trainer's run dir, written by the job.
    for name in ("config.yaml", "metrics.jsonl", "train.log", "wandb_run_id", "slurm_job.json"):
        assert (run / name).is_file(), name
    assert any((run / "checkpoints").iterdir())
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["epochs_completed"] == 2 and 0.0 <= final["val/accuracy"] <= 1.0
    assert json.loads((run / "slurm_job.json").read_text())["job_id"] == job_id

    status = cli("status", str(run), timeout=60)
    assert status.returncode == 0 and f"job      {job_id}  COMPLETED" in status.stdout
    assert re.search(r"val/accuracy\s+[0-9.]+", status.stdout)


@pytest.mark.slow
def test_a_job_submitted_with_a_checkpoint_path_resumes_its_copy_with_resume_auto(
    slurm_cluster, train_yaml: Path, tmp_path: Path
):
    # Submitted as train.resume=PATH, a job that SLURM requeued by itself (node failure) would go back to PATH
    # and drop what it trained since: the checkpoint is copied into the run dir at submission, and the job runs
    # with resume=auto, so its requeues continue from its own newest checkpoint.
    first = tmp_path / "first"
    cmd = [sys.executable, "-m", "train", "--config", str(train_yaml), f"run.dir={first}", "train.epochs=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    src = sorted((first / "checkpoints").glob("step_*"))[-1]
    run = tmp_path / "run"
    args = ["--config", str(train_yaml), "--slurm-config", str(CPU_CLUSTER), f"run.dir={run}", f"train.resume={src}"]
    res = cli("slurm", *args, "--wait")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    copy = run / "checkpoints" / src.name
    assert f"train.resume={src}: the job resumes from {copy}" in res.stdout
    assert "resume: auto" in (run / "submitted_config.yaml").read_text()
    assert re.search(rf"resumed from {re.escape(str(copy))}: epoch 1, batch 0", (run / "train.log").read_text())
    assert json.loads((run / "final_metrics.json").read_text())["epochs_completed"] == 2
    assert src.is_dir()  # the other run's checkpoint is copied, never moved


@pytest.mark.slow
def test_sweep_of_two_points_is_one_array(slurm_cluster, train_yaml: Path, tmp_path: Path):
    sweep = tmp_path / "lr.yaml"
    sweep.write_text("grid:\n  optim.lr: [0.001, 0.01]\n")
    root = tmp_path / "sweep"
    # One CPU rank per point: both array elements fit on the 2-CPU node at once.
    res = cli(
        "slurm", "--config", str(train_yaml), "--slurm-config", str(CPU_CLUSTER), "--tasks-per-node", "1",
        "--sweep", str(sweep), "--wait", f"run.dir={root}", "train.epochs=1",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (root / "sweep.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["point", "job_id", "run_dir", "overrides"]
    rows = [line.split("\t") for line in table[1:]]
    assert [r[0] for r in rows] == ["00-optim.lr=0.001", "01-optim.lr=0.01"]
    array_id = rows[0][1].split("_")[0]
    assert [r[1] for r in rows] == [f"{array_id}_0", f"{array_id}_1"]  # one array, two elements
    for _, _, run_dir, overrides in rows:
        cfg = (Path(run_dir) / "config.yaml").read_text()
        assert re.search(rf"lr: {overrides.split('=')[1]}\b", cfg), cfg  # each point trained with its own lr
        assert (Path(run_dir) / "final_metrics.json").is_file()

    summary = cli("summarize", str(root), timeout=60)
    assert summary.returncode == 0, summary.stderr
    lines = {line.split()[0]: line.split()[1:] for line in summary.stdout.splitlines()}
    assert lines["point"] == ["00-optim.lr=0.001", "01-optim.lr=0.01"]
    finals = [json.loads((Path(r[2]) / "final_metrics.json").read_text()) for r in rows]
    assert lines["val/accuracy"] == [f"{f['val/accuracy']:.4f}" for f in finals]
    status = cli("status", str(root), timeout=60)  # a sweep's root: the same table, with SLURM's states
    assert status.returncode == 0 and status.stdout.splitlines()[2].split() == ["state", "COMPLETED", "COMPLETED"]


@pytest.mark.slow
def test_signal_mid_epoch_saves_at_that_step_requeues_and_resumes_there(
    slurm_cluster, train_yaml: Path, tmp_path: Path
):
    run = tmp_path / "run"
    slurm = load_slurm_config(CPU_CLUSTER)
    # 4 epochs of 16 steps (32 samples, 2 ranks x 1), no periodic checkpoint: only the signal can make a
    # mid-epoch one. Without the stop-at-step-boundary path, the requeue would restart from step 0 or an epoch end.
    overrides = [f"run.dir={run}", "train.epochs=4", "train.batch_size=2", "eval.every_epochs=4", "model.image_size=48"]
    cfg = job_config(train_yaml, overrides, slurm)
    (job,) = [s.job for s in launch([("run", cfg)], slurm, run / "slurm", out=sys.stderr)]
    deadline = time.time() + JOB_TIMEOUT_S
    while last_logged_step(run) < 2:
        assert time.time() < deadline, "training did not start before the deadline"
        assert job_states([job.job_id])[job.job_id] not in ("FAILED", "COMPLETED", "CANCELLED")
        time.sleep(0.1)
    first_id = (run / "wandb_run_id").read_text().strip()
    job._interrupt(timeout=True)  # USR2 to every task, as SLURM sends it signal_delay_s before the time limit

    # While it waits to be requeued, the run dir is still taken: a second job must not write into it.
    again = cli("slurm", "--config", str(train_yaml), "--slurm-config", str(CPU_CLUSTER), f"run.dir={run}", timeout=60)
    assert again.returncode == 2 and f"SLURM job {job.job_id} is still" in again.stderr, again.stderr

    while job_states([job.job_id])[job.job_id] != "COMPLETED":
        assert time.time() < deadline + JOB_TIMEOUT_S, "requeued job did not finish"
        assert job_states([job.job_id])[job.job_id] not in ("FAILED", "CANCELLED", "TIMEOUT")
        time.sleep(1)

    history = [state for (state,) in sacct(job.job_id, "State", "--duplicates")]
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    log = (run / "train.log").read_text()
    stopped = re.search(r"stopped by signal 12 at step (\d+) \(epoch (\d+), batch (\d+)\)", log)
    resumed = re.search(r"resumed from \S+/step_(\d+): epoch (\d+), batch (\d+), step (\d+)", log)
    assert stopped and resumed, log[-3000:]
    step, epoch, batch = map(int, stopped.groups())
    # The requeued job starts exactly where the signal stopped the first: the same step, epoch and batch.
    assert step >= 2 and (int(resumed[1]), int(resumed[4])) == (step, step)
    assert (int(resumed[2]), int(resumed[3])) == (epoch, batch) and batch == (step % 16)
    # No step was trained twice or skipped: each step's loss logged once (the CSV drops nothing here: the
    # checkpoint is at the very step where the first job stopped logging).
    csv_steps = [
        int(line.split(",")[0])
        for line in (run / "metrics.csv").read_text().splitlines()[1:]
        if ",train/loss_step," in line
    ]
    assert csv_steps == list(range(1, 65))
    assert (run / "wandb_run_id").read_text().strip() == first_id
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(first_id) for p in wandb_runs)  # one W&B run, resumed
    assert json.loads((run / "final_metrics.json").read_text())["epochs_completed"] == 4
    assert isinstance(job.results()[0], dict)  # the requeued callable returned the trainer's final metrics
    status = cli("status", str(run), timeout=60)
    assert f"job      {job.job_id}  COMPLETED  (requeued 1x)" in status.stdout, status.stdout


@pytest.mark.slow
def test_bad_settings_fail_before_submitting(slurm_cluster, train_yaml: Path, tmp_path: Path):
    before = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=30).stdout
    base = ["slurm", "--config", str(train_yaml), f"run.dir={tmp_path / 'run'}"]
    cpus = int(
        subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=30).stdout.split()[0]
    )
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30).stdout
    n_nodes = len(set(nodes.split()))
    cases = [
        (["--partition", "nosuch"], "partition 'nosuch' does not exist on this cluster; partitions: debug"),
        (["--gpus-per-node", "1"], "--gpus-per-node 1, but its nodes have at most 0 GPU(s)"),
        (["--cpus-per-task", str(cpus + 1)], f"= {cpus + 1} CPUs per node, but its nodes have at most {cpus}"),
        (["--mem", "100T"], "--mem 100T, but its nodes have at most"),
        (
            ["--nodes", str(n_nodes + 1), f"train.batch_size={8 * (n_nodes + 1)}"],  # a batch the ranks can split
            f"--nodes {n_nodes + 1}, but only {n_nodes} of its nodes",
        ),
        (["data.dir=/nonexistent"], "/nonexistent/_info.json not found: point data.dir at a folder written by"),
    ]
    for extra, message in cases:
        res = cli(*base, *extra, timeout=60)
        assert res.returncode == 2 and message in res.stderr, (extra, res.stderr)
    assert not (tmp_path / "run").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=30).stdout
    assert after == before  # nothing was submitted

    # What only SLURM knows is SLURM's to say: its own message, unchanged.
    res = cli(*base, "--constraint", "nosuchfeature", timeout=60)
    assert res.returncode == 1 and "Batch job submission failed: Invalid feature specification" in res.stderr


def test_gpu_dry_run_says_what_cpus_per_task_it_assumed_from_the_real_sinfo(train_yaml: Path, tmp_path: Path):
    # The test node has no GPU: sinfo cannot give a CPUs-per-GPU share, so the dry run says what it assumed.
    res = cli("slurm", "--config", str(train_yaml), "--gpus-per-node", "4", "--dry-run", f"run.dir={tmp_path / 'r'}")
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --cpus-per-task=8" in res.stdout
    assert "# --cpus-per-task 8 (auto: ASSUMED, no node of the partition has 4 GPUs" in res.stdout, res.stdout[-800:]


def _scratch_partition(name: str, *settings: str):
    """Create partition ``name`` on the real cluster for one test (skip, or fail in CI, without admin rights)."""
    delete = ["scontrol", "delete", f"PartitionName={name}"]
    subprocess.run(delete, capture_output=True, timeout=30)  # left over from an interrupted run, if any
    res = subprocess.run(
        ["scontrol", "create", f"PartitionName={name}", "State=UP", *settings],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode:
        msg = f"cannot create partition {name} (needs SLURM admin rights): {res.stderr.strip()}"
        if os.environ.get("CATDOG_REQUIRE_SLURM"):
            pytest.fail(msg)
        pytest.skip(msg)
    yield name
    subprocess.run(delete, capture_output=True, timeout=30)


@pytest.fixture
def empty_partition(slurm_cluster):
    """A partition with no nodes on the real cluster, as sites keep for retired or moved hardware."""
    yield from _scratch_partition("catdog_empty")


@pytest.fixture
def hidden_partition(slurm_cluster):
    """A Hidden partition (sinfo lists it only with -a, except to root; sbatch takes it), as sites keep for
    special queues."""
    yield from _scratch_partition("catdog_hidden", "Nodes=ALL", "Hidden=YES")


def test_hidden_partitions_and_partition_lists_pass_the_preflight_check(hidden_partition: str):
    # The check lists partitions with `sinfo -a`. (This test runs as root, who sees hidden partitions anyway.)
    part, nodes = partition_nodes(hidden_partition)
    node_names = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30).stdout
    assert part == hidden_partition and [n.name for n in nodes] == sorted(set(node_names.split()))
    part, nodes = partition_nodes(f"debug,{hidden_partition}")  # sbatch's list: the first that can run the job
    assert part == f"debug,{hidden_partition}" and len(nodes) == len(set(node_names.split()))  # in both: once each
    with pytest.raises(ConfigError, match="partition 'nope' does not exist on this cluster"):
        partition_nodes("debug,nope")


def test_a_partition_without_nodes_is_a_clear_preflight_error(empty_partition: str):
    with pytest.raises(
        ConfigError, match=f"partition '{empty_partition}' has no nodes .*pick another with --partition"
    ):
        check_resources(load_slurm_config(None, {"partition": empty_partition}))


def test_a_malformed_job_record_fails_before_submitting(train_yaml: Path, tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "slurm_job.json").write_text('{"job_id": ')  # hand-edited or truncated by a full disk
    slurm = load_slurm_config(CPU_CLUSTER)
    cfg = job_config(train_yaml, [f"run.dir={run}"], slurm)
    before = queued()
    with pytest.raises(ConfigError, match=re.escape(f"{run / 'slurm_job.json'} is not valid JSON")):
        launch([("run", cfg)], slurm, run / "slurm", out=io.StringIO())
    assert queued() == before and not (run / "slurm").exists()  # nothing submitted


def test_wait_gives_up_on_a_job_slurm_does_not_know(tmp_path: Path):
    # A valid job id this cluster never handed out: the real sacct and squeue both report nothing, as for a job
    # purged from squeue while slurmdbd is down. --wait must stop, not poll forever.
    ghost = "67000000"
    assert job_states([ghost]) == {ghost: "UNKNOWN"}
    lost = Submitted("ghost", tmp_path / "run", submitit.SlurmJob(tmp_path / "slurm", ghost))
    start = time.monotonic()
    with pytest.raises(JobLostError) as e:
        follow([lost], poll_s=0.1, unknown_limit_s=1.0, out=io.StringIO())
    assert 1.0 <= time.monotonic() - start < 30
    msg = str(e.value)
    assert f"no state for job {ghost} (ghost)" in msg and f"squeue -j {ghost}" in msg and f"sacct -j {ghost}" in msg
    assert f"catdog-launch status {tmp_path / 'run'}" in msg

    # A job SLURM does know is followed to its end under the same tight bound: PENDING and RUNNING are not UNKNOWN.
    res = subprocess.run(
        ["sbatch", "--parsable", "--time=1", "-o", str(tmp_path / "sleep.out"), "--wrap", "sleep 2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    known = Submitted("sleep", tmp_path, submitit.SlurmJob(tmp_path / "slurm", job_id))
    assert follow([known], poll_s=0.1, unknown_limit_s=1.0, out=io.StringIO()) == {job_id: "COMPLETED"}
