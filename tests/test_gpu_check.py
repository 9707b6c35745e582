"""The GPU check (scripts/gpu_check.sh) without a GPU: the training loop's sync-debug hook, the command runner, the
step runner's timeouts, the venv of the GPU image's packages, and (slow) the whole dry run from a fresh copy.

torch.cuda.set_sync_debug_mode needs a GPU: the hook's mode switching is checked with a recording stand-in for it
(named so below); everything else runs for real."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import tomllib
import torch

from train.loop.sync_probe import SyncProbe

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sync_probe_errors_inside_each_step_after_the_first_and_times_the_loader():
    fake_gpu_sync_modes = []  # stands in for torch.cuda.set_sync_debug_mode (no GPU here)
    probe = SyncProbe(torch.device("cpu"), set_mode=fake_gpu_sync_modes.append)

    def loader():
        for i in range(3):
            time.sleep(0.3 if i == 0 else 0.1)
            yield i

    during = [(b, fake_gpu_sync_modes[-1]) for b in probe.wrap(loader())]
    assert during == [(0, "default"), (1, "error"), (2, "error")]
    assert fake_gpu_sync_modes[-1] == "default"  # the loader's end is waited for outside the error mode
    assert probe.batches == 3
    assert probe.first_wait >= 0.25 and 0.18 <= probe.wait < probe.first_wait + 1.0


LOOP = """
import time, torch
from accelerate import Accelerator
from torch import nn
from train.loop.epoch import EpochTotals, StepRecipe, train_one_epoch
acc = Accelerator(cpu=True)
model, opt = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), None
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = acc.prepare(model, opt)
def batches():
    for _ in range(4):
        time.sleep(0.1)
        yield torch.randn(4, 3, 2, 2), torch.randint(0, 2, (4,))
out = train_one_epoch(model, batches(), opt, acc, lr_fn=lambda s: 0.1, step=0, start_batch=0, num_batches=4,
                      totals=EpochTotals(), recipe=StepRecipe(log_every=0), desc="epoch 1/1")
print("steps", out["step"])
"""


def test_the_training_loop_reports_its_loader_wait_with_CATDOG_SYNC_DEBUG_only():
    def run(flag: str) -> str:
        env = {**os.environ, "CATDOG_SYNC_DEBUG": flag}
        res = subprocess.run(
            [sys.executable, "-c", LOOP], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert "steps 4" in res.stdout
        return res.stdout

    line = re.search(r"sync-debug: epoch 1/1: 4 micro-batches, no CUDA: not checked; loader wait ([\d.]+) s", run("1"))
    assert line, "no sync-debug line"
    assert float(line.group(1)) >= 0.25  # 3 batches after the first, each 0.1 s late
    assert "sync-debug" not in run("0")


def test_catdog_cli_runs_every_command_of_pyproject():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cli = [sys.executable, str(SCRIPTS / "catdog_cli.py")]
    listed = subprocess.run([*cli, "--list"], capture_output=True, text=True, cwd="/", timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.splitlines() == [f"{name} = {target}" for name, target in scripts.items()]
    helped = subprocess.run([*cli, "catdog-predict", "--help"], capture_output=True, text=True, cwd="/", timeout=300)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: catdog-predict")
    wrong = subprocess.run([*cli, "catdog-nope"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "got catdog-nope; give one of catdog-prep" in wrong.stderr


def test_a_step_past_its_timeout_is_killed_with_its_children_and_the_check_goes_on(tmp_path: Path):
    gpu_check = load_gpu_check()
    args = Namespace(device="cpu", budget_s=60.0, out=str(tmp_path / "out"), work=str(tmp_path), photos="")
    check = gpu_check.Check(args)
    grandchild = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
    grandchild += "time.sleep(120)']); print('child', p.pid, flush=True); time.sleep(120)"
    t0 = time.monotonic()
    proc = check.run("sleeper", [sys.executable, "-c", grandchild], 3)
    assert proc.rc is None and proc.note == "timed out after 3 s"
    assert time.monotonic() - t0 < 30
    pid = int(re.search(r"child (\d+)", proc.output).group(1))
    for _ in range(50):  # the orphan is reaped by init shortly after the kill
        if not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {pid} outlived the timeout")
    assert check.run("echo", [sys.executable, "-c", "print('next')"], 30).output.strip() == "next"
    check.deadline = time.monotonic()  # the check's budget is spent: later steps are not started
    assert check.run("late", [sys.executable, "-c", "print(1)"], 30).note.startswith("skipped: past the check's")
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "===== sleeper: timed out after 3 s" in log and "===== echo: exit 0" in log


def test_gpu_prepare_names_a_photo_folder_without_splits(tmp_path: Path):
    res = subprocess.run(["bash", str(SCRIPTS / "gpu_prepare.sh"), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"gpu_prepare.sh: {tmp_path} has no train/ and val/ folders: pass a photo folder laid out as "
        "train/CLASS/*.jpg and val/CLASS/*.jpg (e.g. cats_and_dogs_filtered)"
    ]


def test_the_dry_run_venv_holds_the_images_packages_and_not_the_carried_ones(tmp_path: Path):
    target = tmp_path / "venv"
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_dry_venv.py"), str(target)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    python = target / "bin" / "python"

    def imports(name: str) -> bool:
        return subprocess.run([python, "-c", f"import {name}"], capture_output=True, cwd="/").returncode == 0

    assert imports("torch") and imports("accelerate") and imports("yaml")
    assert not any(imports(name) for name in ("omegaconf", "webdataset", "submitit", "wandb", "train"))
    assert (target / "bin" / "accelerate").is_file()  # catdog-launch starts `accelerate` next to its Python


# The whole dry run takes ~4 minutes on 2 cores: on demand (make gpu-dry-run runs the same script), not in every
# `make test`; its parts (the hook, the command runner, the step runner, the image-only venv) are tested above.
@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    not os.environ.get("CATDOG_GPU_DRY_RUN"), reason="the whole GPU dry run: make gpu-dry-run, or CATDOG_GPU_DRY_RUN=1"
)
def test_gpu_dry_run_from_a_fresh_copy_passes_with_cuda_checks_skipped(tmp_path: Path, real_data: Path):
    """`make gpu-dry-run` in a copy of the tracked files (as a fresh clone): wheels from the index, the photo set,
    the image-only venv, then the whole check on CPU."""
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        cwd=ROOT,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes((ROOT / name).read_bytes())
            (repo / name).chmod((ROOT / name).stat().st_mode)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    res = subprocess.run(
        ["bash", "scripts/gpu_dry_run.sh", str(real_data)], capture_output=True, text=True, cwd=repo, timeout=1100
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    carried = re.search(r"= ~(\d+) MiB of the 64 MiB", res.stdout)
    assert carried and int(carried.group(1)) < 64
    report = json.loads((repo / "outputs" / "gpu_dry_run" / "report" / "gpu_check.json").read_text())
    assert report["complete"] and report["counts"]["FAIL"] == 0
    status = {r["check"]: r for r in report["results"]}
    for check in ("environment", "imports", "catdog-prep", "trainer: 2 epochs of configs/cnn.yaml"):
        assert status[check]["status"] == "PASS", status[check]
    assert status["catdog-evaluate on cpu reproduces the trainer's val accuracy"]["status"] == "PASS"
    assert status["torchscript export matches PyTorch on cpu"]["figures"]["photos"] == 200
    assert status["onnx export matches PyTorch on cpu"]["status"] == "PASS"
    for check in (
        "no host sync in the training step",
        "loader keeps the GPU busy",
        "catdog-predict on cuda:0 matches the CPU",
    ):
        assert status[check]["status"] == "SKIP" and status[check]["detail"].startswith("skipped: no CUDA")
    steps = [r for r in report["results"] if r["check"].startswith("train step ")]
    assert len(steps) == 8 and sum(r["status"] == "PASS" for r in steps) == 2  # CPU: bf16 eager of both models
    assert {r["detail"] for r in steps if r["status"] == "SKIP"} == {"skipped: no CUDA"}
    assert sorted(p.name for p in (repo / "outputs" / "gpu_dry_run" / "report").iterdir()) == [
        "gpu_check.json", "gpu_check.log", "gpu_check.txt",
    ]  # fmt: skip
