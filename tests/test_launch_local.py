"""`catdog-launch local`: the accelerate command it builds (GPU counts are parameters: no GPU exists here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import make_shards, tiny_config

from launch.__main__ import main
from launch.local import NO_GPU_NOTE, accelerate_command, gpu_ids_for
from train.config import ConfigError
from train.hardware.precision import cpu_has_bf16


@pytest.fixture
def train_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text("data:\n  dir: shards\ntrain:\n  mixed_precision: bf16\n")
    return p


def after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_all_visible_gpus_by_default(train_yaml: Path):
    # available_gpus stands in for torch.cuda.device_count() on a 4-GPU box (this machine has none).
    cmd = accelerate_command(train_yaml, ["optim.lr=0.01"], available_gpus=4, port=29555)
    assert cmd[1] == "launch" and "--multi_gpu" in cmd and after(cmd, "--num_processes") == "4"
    assert after(cmd, "--main_process_port") == "29555" and after(cmd, "--mixed_precision") == "bf16"
    assert "--gpu_ids" not in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("-m") :] == ["-m", "train", "--config", str(train_yaml), "optim.lr=0.01"]


def test_fewer_gpus_than_visible_and_single_gpu(train_yaml: Path):
    cmd = accelerate_command(train_yaml, gpus=2, available_gpus=4, port=1)
    assert after(cmd, "--num_processes") == "2" and after(cmd, "--gpu_ids") == "0,1"
    one = accelerate_command(train_yaml, available_gpus=1, port=1)
    assert "--multi_gpu" not in one and "--cpu" not in one and after(one, "--num_processes") == "1"


def test_a_gpu_subset_is_named_by_the_users_visible_ids(train_yaml: Path):
    # accelerate copies --gpu_ids verbatim into the ranks' CUDA_VISIBLE_DEVICES: with 4,5,6,7 visible, "0,1"
    # would be someone else's GPUs. available_gpus=4 mocks the device count of a GPU box.
    cmd = accelerate_command(train_yaml, gpus=2, available_gpus=4, port=1, visible_devices="4,5,6,7")
    assert after(cmd, "--gpu_ids") == "4,5"
    one = accelerate_command(train_yaml, gpus=1, available_gpus=4, port=1, visible_devices="GPU-aa, GPU-bb")
    assert after(one, "--gpu_ids") == "GPU-aa" and "--multi_gpu" not in one
    every = accelerate_command(train_yaml, gpus=4, available_gpus=4, port=1, visible_devices="4,5,6,7")
    assert "--gpu_ids" not in every  # all of them: the inherited CUDA_VISIBLE_DEVICES already says which
    assert gpu_ids_for(3, None) == "0,1,2"  # unset: CUDA's indices are the physical ids
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='4' names only 1 GPU"):
        gpu_ids_for(2, "4")


def test_dry_run_reads_cuda_visible_devices(capsys, monkeypatch, train_yaml: Path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr("launch.local.visible_gpus", lambda: 4)  # mock: this machine has no GPU to count
    assert main(["local", "--config", str(train_yaml), "--gpus", "2", "--dry-run"]) == 0
    assert after(capsys.readouterr().out.split(), "--gpu_ids") == "4,5"


def test_accelerate_gives_the_ranks_the_physical_ids(train_yaml: Path, tmp_path: Path, port: int):
    # The real `accelerate launch` our command runs, with the trainer swapped for a probe that records the
    # CUDA_VISIBLE_DEVICES each rank gets (no GPU here, so no CUDA call is made; the GPU count is a parameter).
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK']).write_text(os.environ['CUDA_VISIBLE_DEVICES'])\n"
    )
    cmd = accelerate_command(train_yaml, gpus=2, available_gpus=4, port=port, visible_devices="4,5,6,7")
    cmd = cmd[: cmd.index("-m")] + [str(probe)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["4,5", "4,5"]


def test_cpu_ranks_go_through_the_multi_process_launcher(train_yaml: Path):
    # `accelerate launch --cpu --num_processes 2` would start ONE process; 2 CPU ranks need the torchrun path
    # plus train.cpu=true (Accelerator(cpu=True) -> MULTI_CPU over gloo).
    cmd = accelerate_command(train_yaml, cpu_ranks=2, available_gpus=0, port=1)
    assert "--multi_gpu" in cmd and after(cmd, "--num_processes") == "2" and cmd[-1] == "train.cpu=true"
    single = accelerate_command(train_yaml, available_gpus=0, port=1)
    assert "--cpu" in single and after(single, "--num_processes") == "1" and single[-1] == "train.cpu=true"


def test_bad_requests_fail_before_launch(train_yaml: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="only 0 GPU"):
        accelerate_command(train_yaml, gpus=1, available_gpus=0, port=1)
    with pytest.raises(ConfigError, match="exclusive"):
        accelerate_command(train_yaml, gpus=1, cpu_ranks=2, available_gpus=1, port=1)
    with pytest.raises(ConfigError, match="with train.cpu=true"):
        accelerate_command(train_yaml, ["train.cpu=true"], gpus=2, available_gpus=4, port=1)
    with pytest.raises(ConfigError, match="optim.nope"):
        accelerate_command(train_yaml, ["optim.nope=1"], available_gpus=1, port=1)
    assert main(["local", "--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2


def test_dry_run_prints_the_command(capsys, train_yaml: Path):
    assert main(["local", "--config", str(train_yaml), "--cpu-ranks", "2", "--dry-run", "train.epochs=1"]) == 0
    printed = capsys.readouterr()
    line = printed.out.strip()
    assert "launch" in line and "--num_processes 2" in line and line.endswith("train.epochs=1 train.cpu=true")
    assert NO_GPU_NOTE not in printed.err  # ranks were asked for: nothing to explain


def test_no_gpu_means_one_cpu_process_and_says_so(capsys, monkeypatch, train_yaml: Path):
    # This machine has no GPU; hiding the devices makes that true on a GPU box too.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["local", "--config", str(train_yaml), "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert printed.err.strip() == "no GPU visible: 1 CPU process; use --cpu-ranks N for N gloo ranks"
    cmd = printed.out.split()
    assert after(cmd, "--num_processes") == "1" and "--cpu" in cmd and "--multi_gpu" not in cmd
    with pytest.raises(SystemExit) as e:
        main(["local", "--help"])
    assert e.value.code == 0
    helptext = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert "--cpu-ranks N train on CPU with N ranks over gloo. Default with no GPU visible: 1 CPU process" in helptext


@pytest.mark.slow
def test_real_run_with_two_cpu_ranks(real_data: Path, tmp_path: Path, port: int):
    cfg = tiny_config(tmp_path / "tiny.yaml", make_shards(real_data, tmp_path), backends="[csv]")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "local", "--config", str(cfg), "--cpu-ranks", "2", "--port", str(port)]
    # bf16 typed explicitly: honoured on both ranks, and where this CPU would emulate it, warned once (not per rank).
    # The user's own accelerate default config, as `accelerate config` writes it on a 1-GPU box: accelerate would
    # apply it to every launch but --cpu (gpu_ids "0" made a 2-process run fail, "Less than two GPU ids").
    hf = tmp_path / "hf" / "accelerate"
    hf.mkdir(parents=True)
    (hf / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\ngpu_ids: '0'\nnum_processes: 1\n"
    )
    res = subprocess.run(
        [*cmd, f"run.dir={run}", "train.mixed_precision=bf16"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf")},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    printed = res.stdout.splitlines()[0]  # the command comes first, before the trainer's output
    assert printed.startswith("OMP_NUM_THREADS=")  # each CPU rank's share of the cores (torchrun would say 1)
    assert " launch " in printed and "--num_processes 2" in printed and "--mixed_precision bf16" in printed
    assert printed.endswith(f"run.dir={run} train.mixed_precision=bf16 train.cpu=true")
    warned = res.stderr.count("WARNING train.mixed_precision=bf16 on cpu")  # cpu or cpu:0 as Accelerate names it
    assert warned == (0 if cpu_has_bf16() else 1), res.stderr[-3000:]
    assert "on 2 process(es) (MULTI_CPU" in (run / "train.log").read_text()  # two gloo ranks, not one
    assert json.loads((run / "final_metrics.json").read_text())["epochs_completed"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 1])
def test_ctrl_c_stops_the_ranks_too(real_data: Path, tmp_path: Path, port: int, ranks: int):
    """SIGINT to catdog-launch reaches the ranks: through accelerate's torchrun agent (2 ranks), or the one-process
    trainer that accelerate runs as its child. Before, subprocess.run killed accelerate 0.25 s after it and the
    ranks (in sessions of their own) went on training as orphans."""
    cfg = tiny_config(tmp_path / "tiny.yaml", make_shards(real_data, tmp_path), backends="[csv]")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "local", "--config", str(cfg), "--port", str(port)]
    if ranks > 1:
        cmd += ["--cpu-ranks", str(ranks)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU anywhere: one CPU process when ranks == 1
    launcher = subprocess.Popen(
        [*cmd, f"run.dir={run}", "train.epochs=100000"],  # never ends by itself
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        # As from an interactive terminal: a shell starts background jobs (CI may run this suite as one) with
        # SIGINT ignored, and catdog-launch rightly keeps an ignored signal ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 240
        while not (run / "metrics.csv").is_file() or len((run / "metrics.csv").read_text().splitlines()) < 3:
            assert time.time() < deadline and launcher.poll() is None, "training did not start"
            time.sleep(0.5)
        assert len(_ranks_of(run)) == ranks
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=120) != 0  # stopped, not finished (a signal's exit is 128 + N, as shells say)
        deadline = time.time() + 60
        while _ranks_of(run) and time.time() < deadline:
            time.sleep(0.5)
        assert _ranks_of(run) == []  # no rank left behind
    finally:
        launcher.kill()
        for pid in _ranks_of(run):
            os.kill(pid, signal.SIGKILL)


def _ranks_of(run: Path) -> list[int]:
    """PIDs of the `python -m train ... run.dir=<run>` processes (the ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in argv and b"launch" not in argv and f"run.dir={run}".encode() in argv:  # not accelerate
            pids.append(int(proc.name))
    return pids
