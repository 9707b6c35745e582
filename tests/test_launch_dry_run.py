"""`catdog-launch slurm --dry-run`: the sbatch script submitit would submit, SLURM settings, sweep files.

No cluster needed: the script comes from submitit's own SlurmExecutor, minus its srun check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.__main__ import main
from launch.slurm import ASSUMED_CPUS_PER_GPU, job_config, parse_nodes, resolve_cpus_per_task
from launch.slurm_config import SlurmConfig, load_slurm_config, parse_time_minutes
from launch.slurm_job import SlurmTrainer, master_port
from launch.sweep import load_sweep
from train.config import ConfigError
from train.config_io import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def train_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text("data:\n  dir: shards\ntrain:\n  batch_size: 16\n")
    return p


def sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE):
        flags[m[1]] = m[2] if m[2] is not None else ""
    return flags


def dry_run(capsys, *argv: str) -> str:
    assert main(["slurm", "--dry-run", *argv]) == 0
    return capsys.readouterr().out


def test_gpu_job_resources_signal_and_environment(capsys, monkeypatch, train_yaml: Path, tmp_path: Path):
    run = tmp_path / "runs" / "gpu"
    with monkeypatch.context() as off_cluster:  # no sinfo: the partition `gpu` cannot be checked, and is not
        off_cluster.setenv("PATH", str(tmp_path))
        out = dry_run(
            capsys,
            "--config", str(train_yaml),
            "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem", "64G",
            "--time", "1-00:00:00", "--partition", "gpu", "--account", "vision", "--qos", "high",
            "--constraint", "a100", "--exclude", "node[1-2]", "--signal-delay-s", "150",
            f"run.dir={run}", "optim.lr=0.002",
        )  # fmt: skip
    assert "# partition 'gpu' not checked (sinfo could not tell: sinfo not found" in out
    flags = sbatch_flags(out)
    # one task per GPU, on every node
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "4" and flags["gpus-per-node"] == "4"
    assert flags["cpus-per-task"] == "8" and flags["mem"] == "64G"
    assert flags["time"] == "1440"  # minutes: 1 day
    assert flags["partition"] == "gpu" and flags["account"] == "vision" and flags["qos"] == "high"
    assert flags["constraint"] == "a100" and flags["exclude"] == "'node[1-2]'"
    # preemption: USR2 150 s before the kill, and the job may be requeued
    assert flags["signal"] == "USR2@150" and "requeue" in flags
    # logs inside the run dir, appended across requeues
    assert flags["output"] == f"{run}/slurm/%j_0_log.out" and flags["open-mode"] == "append"
    # environment and command: threads per rank, submitit's runner from this very Python
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in out
    assert "export SUBMITIT_EXECUTOR=slurm" in out
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert f"{sys.executable} -u -m submitit.core._submit {run}/slurm" in srun
    assert f"{run}/slurm/%j_%t_log.out" in srun  # every rank logs to its own file
    assert "--kill-on-bad-exit=1" in srun  # a dead rank ends the job instead of leaving the others hanging
    assert "--cpus-per-task=8" in srun  # srun of Slurm 22.05-23.02 does not inherit sbatch's: each rank 1 CPU
    assert subprocess.run(["bash", "-n"], input=out, text=True, timeout=30).returncode == 0


def test_cpu_job_has_no_gpu_request_and_yaml_then_flags(capsys, train_yaml: Path, tmp_path: Path):
    yaml = tmp_path / "s.yaml"
    yaml.write_text("tasks_per_node: 2\ntime: '30'\nqos: low\nsetup: ['module load cuda']\n")
    out = dry_run(capsys, "--config", str(train_yaml), "--slurm-config", str(yaml), "--qos", "normal")
    flags = sbatch_flags(out)
    assert "gpus-per-node" not in flags and flags["ntasks-per-node"] == "2"
    assert flags["time"] == "30" and flags["qos"] == "normal"  # the flag wins over the YAML
    assert flags["signal"] == "USR2@120"  # default signal delay
    assert "module load cuda" in out.split("# command")[0]  # user setup runs before srun


# `sinfo -h -N -o %N|%c|%m|%G` as a cluster with two kinds of 4-GPU node and a CPU node prints it.
SINFO = "gpu1|64|512000|gpu:a100:4(S:0-1)\ngpu2|48|512000+|gpu:4\ncpu1|128|256000|(null)\ngpu1|64|512000|gpu:a100:4\n"


def test_gpu_jobs_get_the_cpus_that_come_with_their_gpus():
    nodes = parse_nodes(SINFO)
    assert [(n.name, n.cpus, n.gpus) for n in nodes] == [("gpu1", 64, 4), ("gpu2", 48, 4), ("cpu1", 128, 0)]
    slurm, note = resolve_cpus_per_task(load_slurm_config(None, {"gpus_per_node": 4}), nodes)
    assert slurm.cpus_per_task == 12  # the smaller share (48 / 4 on gpu2), so either kind of node can hold it
    assert note == "--cpus-per-task 12 (auto: 48 CPUs / 4 GPUs on gpu2, from sinfo)"
    two, _ = resolve_cpus_per_task(load_slurm_config(None, {"gpus_per_node": 2}), nodes)
    assert two.cpus_per_task == 12  # per GPU, whatever share of the node the job takes
    kept, note = resolve_cpus_per_task(load_slurm_config(None, {"gpus_per_node": 4, "cpus_per_task": 6}), nodes)
    assert kept.cpus_per_task == 6 and note == "--cpus-per-task 6 (as given)"
    cpu_job, note = resolve_cpus_per_task(load_slurm_config(None, {"tasks_per_node": 2}), nodes)
    assert cpu_job.cpus_per_task == 1 and "CPU-only job" in note
    eight, note = resolve_cpus_per_task(load_slurm_config(None, {"gpus_per_node": 8}), nodes)
    assert eight.cpus_per_task == ASSUMED_CPUS_PER_GPU and "ASSUMED, no node of the partition has 8 GPUs" in note


def test_dry_run_without_sinfo_says_what_it_assumed(capsys, monkeypatch, train_yaml: Path, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo: off-cluster
    out = dry_run(capsys, "--config", str(train_yaml), "--gpus-per-node", "4")
    assert sbatch_flags(out)["cpus-per-task"] == str(ASSUMED_CPUS_PER_GPU)
    note = next(line for line in out.splitlines() if line.startswith("# --cpus-per-task"))
    assert "ASSUMED, sinfo could not tell: sinfo not found" in note and "pass --cpus-per-task to set it" in note
    out = dry_run(capsys, "--config", str(train_yaml), "--gpus-per-node", "4", "--cpus-per-task", "3")
    assert sbatch_flags(out)["cpus-per-task"] == "3" and "# --cpus-per-task 3 (as given)" in out
    assert sbatch_flags(dry_run(capsys, "--config", str(train_yaml)))["cpus-per-task"] == "1"  # CPU-only job


def test_sweep_dry_run_is_one_array(capsys, train_yaml: Path, tmp_path: Path):
    sweep = tmp_path / "sweeps" / "sweep.yaml"
    sweep.parent.mkdir()
    # The sweep names its training config (relative to the sweep file), so --config can be left out.
    sweep.write_text("config: ../train.yaml\ngrid:\n  optim.lr: [0.001, 0.003]\n  train.seed: [0, 1]\n")
    root = tmp_path / "sweep-runs"
    out = dry_run(capsys, "--sweep", str(sweep), "--array-parallelism", "3", f"run.dir={root}")
    flags = sbatch_flags(out)
    assert flags["array"] == "0-3%3"
    assert flags["output"] == f"{root}/slurm/%A_%a_0_log.out"
    for i, name in enumerate(
        ["optim.lr=0.001,train.seed=0", "optim.lr=0.001,train.seed=1", "optim.lr=0.003,train.seed=0"]
    ):
        assert f"array element {i}: {i:02d}-{name}, run dir {root}/{i:02d}-{name}" in out
    assert not root.exists()  # a dry run writes nothing


def test_bad_settings_fail_before_anything(capsys, train_yaml: Path, tmp_path: Path):
    cases = [
        (["--config", str(tmp_path / "nope.yaml")], "nope.yaml does not exist"),
        (["--config", str(train_yaml), "optim.lrr=1"], "optim.lrr"),
        (["--config", str(train_yaml), "--gpus-per-node", "4", "--tasks-per-node", "2"], "one task (rank) per GPU"),
        (["--config", str(train_yaml), "--time", "forever"], "slurm.time='forever'"),
        (["--config", str(train_yaml), "--time", "2"], "signal_delay_s=120 is not shorter than slurm.time='2'"),
        (["--config", str(train_yaml), "--tasks-per-node", "3"], "batch_size=16 is not divisible"),
        (["--config", str(train_yaml), "--slurm-config", str(tmp_path / "x.yaml")], "x.yaml does not exist"),
    ]
    for argv, message in cases:
        assert main(["slurm", "--dry-run", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_time_formats():
    assert [parse_time_minutes(t) for t in ["90", "90:30", "2:00:00", "1-0", "1-2:30", "0:0:1"]] == [
        90, 91, 120, 1440, 1590, 1
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="not a SLURM time"):
        parse_time_minutes("2h")


def test_unquoted_yaml_values_of_string_fields_are_read_as_written(tmp_path: Path):
    # YAML 1.1 reads an unquoted 4:00:00 as the base-60 integer 14400: taken as minutes, that asked SLURM for ten
    # days. `no` would be the boolean False. String fields keep the text as the file has it.
    f = tmp_path / "res.yaml"
    f.write_text("time: 4:00:00\nqos: no\npartition: gpu\nnodes: 2\n")
    slurm = load_slurm_config(f)
    assert (slurm.time, slurm.time_minutes(), slurm.qos, slurm.nodes) == ("4:00:00", 240, "no", 2)
    f.write_text("time: 1:30\nsignal_delay_s: 30\n")  # SLURM's MM:SS: 90 seconds, not 90 minutes
    assert load_slurm_config(f).time_minutes() == 2
    f.write_text("time: '12:00:00'\n")
    assert load_slurm_config(f).time_minutes() == 720
    # A sweep's `no` for a string field is the word too (the override would have been `=False`).
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  train.mixed_precision: [no, bf16]\n  train.epochs: [3]\n")
    points = [p.overrides for p in load_sweep(sweep).points]
    assert points == [["train.mixed_precision=no", "train.epochs=3"], ["train.mixed_precision=bf16", "train.epochs=3"]]
    assert load_config(None, [*points[0], "data.dir=x"]).train.mixed_precision == "no"
    sweep.write_text("points:\n  - {run.name: 1e3, optim.lr: 1e-3}\n  - {run.name: 4:00:00, optim.lr: 0.1}\n")
    assert [p.overrides for p in load_sweep(sweep).points] == [
        ["run.name=1e3", "optim.lr=0.001"],  # a string field as written; a float field as YAML reads it
        ["run.name=4:00:00", "optim.lr=0.1"],
    ]
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("data: {dir: x}\nrun: {name: 1e3}\ntrain: {mixed_precision: no}\n")
    cfg = load_config(train_yaml)
    assert (cfg.run.name, cfg.train.mixed_precision) == ("1e3", "no")


def test_shipped_slurm_configs_and_sweeps_load():
    configs = sorted((ROOT / "configs" / "slurm").glob("*.yaml"))
    sweeps = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert configs and sweeps
    for path in configs:
        assert isinstance(load_slurm_config(path), SlurmConfig)
    for path in sweeps:
        sweep = load_sweep(path)
        assert len(sweep.points) >= 2 and all(p.overrides for p in sweep.points)
        for point in sweep.points:  # every point is a valid config (keys and types) for the config it names
            load_config(sweep.config or ROOT / "configs" / "cnn.yaml", [*point.overrides, "data.dir=x"])


def test_sweep_file_errors(tmp_path: Path):
    cases = {
        "grid:\n  optim.lr: 0.1\n": "needs a non-empty list",
        "grid: {}\npoints: []\n": "exactly one of",
        "config: x.yaml\n": "exactly one of",
        "grid: {a: [1]}\nseed: 1\n": "may only hold",
        "points:\n  - {run.dir: x}\n": "must not set run.dir",
        "points:\n  - {optim.lr: 0.1}\n  - {optim.lr: 0.1}\n": "identical",
    }
    for text, message in cases.items():
        p = tmp_path / "s.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_sweep(p)
    p.write_text("points:\n  - {optim.lr: 0.1, model.name: scratch_cnn}\n  - {optim.lr: 0.2}\n")
    assert [q.overrides for q in load_sweep(p).points] == [["optim.lr=0.1", "model.name=scratch_cnn"], ["optim.lr=0.2"]]


def test_the_requeued_callable_resumes_automatically(tmp_path: Path):
    # checkpoint() hands submitit a fresh callable that resumes from the newest checkpoint, whatever the
    # submission said (train.resume=none would otherwise restart from scratch after every preemption).
    yaml = tmp_path / "train.yaml"
    yaml.write_text("data:\n  dir: shards\ntrain:\n  resume: none\n")
    cfg = job_config(yaml, [f"run.dir={tmp_path / 'run'}"], load_slurm_config(None, {"tasks_per_node": 2}))
    assert cfg.train.cpu and cfg.data.dir == str(Path.cwd() / "shards")  # CPU job; paths made absolute
    save_config(cfg, tmp_path / "submitted.yaml")
    job = SlurmTrainer(tmp_path / "submitted.yaml", use_gpus=False)
    assert job.config() == cfg  # the job reloads exactly what was validated at submission
    delayed = job.checkpoint()
    assert isinstance(delayed.function, SlurmTrainer) and delayed.function.config().train.resume == "auto"
    assert job.config().train.resume == "none"


def test_a_checkpoint_path_is_copied_at_submission_so_a_requeue_continues_its_own_progress(tmp_path: Path):
    """train.resume=PATH: SLURM reruns a requeued job as submitted; with the path it would go back to that
    checkpoint and drop what it trained since. launch() copies it into the run dir and submits resume=auto."""
    from train.formats.rundir import STATE_NAME, pin_resume

    def checkpoint(folder: Path, best: str = "") -> Path:
        folder.mkdir(parents=True)
        (folder / STATE_NAME).write_text(json.dumps({"best_checkpoint": best}))
        (folder / "model.safetensors").write_bytes(b"weights")
        return folder

    other = tmp_path / "a" / "checkpoints"
    checkpoint(other / "step_00000004")
    src = checkpoint(other / "step_00000010", best="step_00000004")
    run = tmp_path / "b"
    copy = pin_resume(str(src), run)
    assert copy == run / "checkpoints" / "step_00000010" and (copy / "model.safetensors").read_bytes() == b"weights"
    assert (run / "checkpoints" / "step_00000004").is_dir()  # the best one too (early stopping refers to it)
    assert pin_resume(str(src), run) == copy  # submitting again is fine
    checkpoint(run / "checkpoints" / "step_00000020")  # the job trained on, then the user resubmits the path
    with pytest.raises(ConfigError, match="already holds a newer checkpoint .step_00000020.*new run.dir"):
        pin_resume(str(src), run)
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        pin_resume(str(tmp_path / "nothing"), run)
    renamed = checkpoint(tmp_path / "mine")
    with pytest.raises(ConfigError, match="step_NNNNNNNN"):
        pin_resume(str(renamed), tmp_path / "c")


def test_job_config_rejects_a_batch_that_does_not_split(train_yaml: Path):
    with pytest.raises(ConfigError, match="not divisible"):
        job_config(train_yaml, ["train.batch_size=9"], load_slurm_config(None, {"tasks_per_node": 2}))


def test_master_port_is_shared_by_the_tasks_and_fresh_after_a_requeue():
    ports = {master_port(str(job), str(restart)) for job in range(200) for restart in range(3)}
    assert all(20000 <= p < 32768 for p in ports)  # never in the ephemeral range bind(0) hands out
    assert len(ports) > 500  # job ids and restarts spread over the range
    assert master_port("123_4", "1") == master_port("123_4", "1") != master_port("123_4", "0")


def test_slurm_tests_skip_here_but_fail_in_ci_without_a_cluster(tmp_path: Path):
    # A user's machine without SLURM skips the SLURM tests, saying why; CI (CATDOG_REQUIRE_SLURM=1) fails them.
    env = {k: v for k, v in os.environ.items() if k != "CATDOG_REQUIRE_SLURM"}
    env["PATH"] = str(tmp_path)  # no sinfo here
    test = f"{ROOT / 'tests' / 'test_launch_slurm.py'}::test_bad_settings_fail_before_submitting"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test]
    skipped = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    assert "SLURM is not installed; start the test cluster with" in skipped.stdout
    failed = subprocess.run(cmd, env={**env, "CATDOG_REQUIRE_SLURM": "1"}, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "SLURM is not installed" in failed.stdout, failed.stdout[-2000:]


def test_status_names_a_malformed_job_record(capsys, tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    record = run / "slurm_job.json"
    cases = {
        '{"job_id": "12", "stdout": ': "is not valid JSON",
        '["12"]': "holds a list, not a JSON object",
        '{"job_id": 12, "stdout": "a.out", "stderr": "a.err"}': "has no valid job_id",
        '{"job_id": "12"}': "has no valid stdout, stderr",
    }
    for text, reason in cases.items():
        record.write_text(text)
        assert main(["status", str(run)]) == 2, text
        err = capsys.readouterr().err
        assert f"{record} {reason}" in err and "delete it if no SLURM job writes this run dir" in err, err
        assert "Traceback" not in err
