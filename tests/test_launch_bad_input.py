"""`catdog-launch` on wrong input: one line and exit 2, before anything starts; a dry run writes nothing; a failure
the trainer explained is not followed by accelerate's traceback."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import require_cluster, tiny_config
from train_helpers import ROOT, env, make_shards

from launch.__main__ import main
from launch.relay import FailureRelay


@pytest.fixture
def train_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text(f"data:\n  dir: {tmp_path / 'no_shards'}\ntrain:\n  batch_size: 16\n")
    return p


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("catdog-launch: error: "), err
    return err


def test_local_checks_the_data_folder_before_starting_accelerate(capsys, train_yaml: Path, tmp_path: Path):
    assert main(["local", "--config", str(train_yaml), "--cpu-ranks", "2"]) == 2
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'no_shards' / '_info.json'} not found: point data.dir at a folder written by" in one_line(err)
    assert out == ""  # the accelerate command is printed as it starts: it never did


def test_summarize_and_status_on_a_missing_folder(capsys, tmp_path: Path):
    missing, a_file = tmp_path / "nonexistent", tmp_path / "notes.txt"
    a_file.write_text("x")
    for argv, line in [
        (["summarize", str(missing)], f"{missing} is not a folder: pass the run.dir a sweep was launched with"),
        (["summarize", str(a_file)], f"{a_file} is not a folder"),
        (["status", str(missing)], f"run dir {missing} does not exist: pass a catdog-train run.dir"),
        (["status", str(a_file)], f"run dir {a_file} is not a folder"),
    ]:
        assert main(argv) == 2, argv
        assert line in one_line(capsys.readouterr().err)


def test_summarize_names_a_broken_final_metrics_file(capsys, tmp_path: Path):
    run = tmp_path / "sweep" / "00-a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run: {dir: x}\n")
    (run / "final_metrics.json").write_text('{"val/accuracy": 0.9')  # a run killed while writing (not atomic)
    assert main(["summarize", str(tmp_path / "sweep")]) == 2
    assert f"{run / 'final_metrics.json'} is not valid JSON" in one_line(capsys.readouterr().err)


def test_dry_runs_write_nothing(capsys, monkeypatch, train_yaml: Path, tmp_path: Path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(work)
    assert main(["local", "--config", str(train_yaml), "--dry-run", "run.dir=runs/a"]) == 0
    cmd = capsys.readouterr().out.split()
    config_file = Path(cmd[cmd.index("--config_file") + 1])
    assert config_file.is_file() and not config_file.is_relative_to(home)  # the printed command runs as it is
    assert main(["slurm", "--config", str(train_yaml), "--dry-run", "--cpus-per-task", "2", "run.dir=runs/b"]) == 0
    assert "#SBATCH" in capsys.readouterr().out
    assert sorted(p for p in tmp_path.rglob("*") if p not in (home, work, train_yaml)) == []


@pytest.mark.slurm
def test_slurm_dry_run_with_a_partition_the_cluster_lacks(capsys, train_yaml: Path, tmp_path: Path):
    require_cluster(1)  # reads sinfo only
    argv = ["slurm", "--config", str(train_yaml), "--dry-run", f"run.dir={tmp_path / 'run'}"]
    assert main([*argv, "--partition", "nosuch"]) == 2
    assert "partition 'nosuch' does not exist on this cluster; partitions: " in one_line(capsys.readouterr().err)
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout.split()
    assert main([*argv, "--partition", partition[0].rstrip("*")]) == 0
    assert "not checked" not in capsys.readouterr().out
    # A real submission checks the data folder with the same function as `local`, before sbatch is called.
    assert main(argv[:3] + argv[4:]) == 2
    assert "no_shards/_info.json not found: point data.dir at" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ failures the trainer explained

# What accelerate 1.x prints after a rank's one-line error (one process: its own traceback, with the rank's stderr
# repeated as the cause; several: torchrun's log lines and ChildFailedError's report), as seen on this machine.
ONE_PROCESS = b"""catdog-train: train.resume='/x' is not a complete checkpoint folder (no trainer_state.json)
RuntimeError: catdog-train: train.resume='/x' is not a complete checkpoint folder (no trainer_state.json)


The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/venv/bin/accelerate", line 6, in <module>
    sys.exit(main())
subprocess.CalledProcessError: Command '['/venv/bin/python', '-m', 'train']' returned non-zero exit status 2.
"""
TWO_RANKS = b"""catdog-train: cannot resume from runs/a/checkpoints/step_00000012: it was saved under a different config
catdog-train: cannot resume from runs/a/checkpoints/step_00000012: it was saved under a different config
W1207 03:43:45.478000 29172 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 29228 closing signal SIGTERM
E1207 03:43:45.542000 29172 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 29229) of binary: /venv/bin/python
Traceback (most recent call last):
  File "/venv/bin/accelerate", line 6, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
  exitcode  : 1 (pid: 29228)
"""


def relayed(chunks: list[bytes], returncode: int) -> tuple[bytes, int]:
    out = io.BytesIO()
    relay = FailureRelay(out)
    for chunk in chunks:
        relay.feed(chunk)
    code = relay.finish(returncode)
    return out.getvalue(), code


def test_the_relay_keeps_the_trainers_line_and_its_exit_code(tmp_path: Path):
    log = b"2026-12-07 03:43:43 INFO start\r epoch 1/2:  50%|#####     | 3/6\r epoch 1/2: 67%\r      \r"
    for stream, code in [(ONE_PROCESS, 2), (TWO_RANKS, 1)]:
        # cut anywhere: chunks of a pipe end where they end
        for cut in (1, 7, 64, len(stream)):
            pieces = [log] + [stream[i : i + cut] for i in range(0, len(stream), cut)]
            out, rc = relayed(pieces, 1)
            trainer = stream.splitlines()[0]
            assert out == log + trainer + b"\n" and rc == code, (cut, out)


def test_the_relay_passes_on_everything_else_untouched():
    bug = (
        b"step 3\nTraceback (most recent call last):\n  File 'x.py'\nValueError: a bug\n"
        + ONE_PROCESS.split(b"\n", 1)[1]
    )
    assert relayed([bug[:20], bug[20:]], 1) == (bug, 1)  # no trainer line: a bug keeps every traceback
    fine = b"catdog-trainer here\nprogress 10%\rprogress 20%"
    assert relayed([fine[:9], fine[9:]], 0) == (fine, 0)
    # A trainer line on a successful exit (not one of its errors): nothing is dropped either.
    ok = b"catdog-train: note\nmore\n"
    assert relayed([ok], 0) == (ok, 0)


def test_the_relay_shows_each_ranks_other_explanation_once():
    stream = (
        b"catdog-train: rank 0 says A\ncatdog-train: rank 0 says A\ncatdog-train: rank 1 says B\nfailed (exitcode: 2)"
    )
    assert relayed([stream], 1) == (b"catdog-train: rank 0 says A\ncatdog-train: rank 1 says B\n", 2)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_failure_the_trainer_explained_is_one_line(real_data: Path, tmp_path: Path, port: int, ranks: int):
    # Past the launcher's checks (the shards are real), the trainer itself refuses the resume path on every rank.
    cfg = tiny_config(tmp_path / "tiny.yaml", make_shards(real_data, tmp_path / "shards"), backends="[csv]")
    cmd = [sys.executable, "-m", "launch", "local", "--config", str(cfg), "--cpu-ranks", str(ranks)]
    cmd += ["--port", str(port), f"run.dir={tmp_path / 'run'}", f"train.resume={tmp_path / 'nowhere'}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    line = f"catdog-train: train.resume='{tmp_path / 'nowhere'}' is not a complete checkpoint folder"
    assert res.stderr.count(line) == 1, res.stderr[-3000:]
    for noise in ("Traceback", "CalledProcessError", "ChildFailedError", "torch/distributed/elastic"):
        assert noise not in res.stderr, res.stderr[-3000:]
    assert " launch --config_file " in res.stdout  # accelerate did start: the trainer found the problem
