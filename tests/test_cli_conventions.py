"""The conventions every catdog command shares: --version, --out/-o, --no-progress, one precision vocabulary, wrong
input as one line (exit 2), one-line config errors, and progress that suits where stderr goes."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from train_helpers import ROOT, TINY, env, make_shards

from data_prep.progress import ENV, EVERY_ENV, LineProgress, progress, progress_mode
from data_prep.version import catdog_version
from train.config import PRECISIONS, ConfigError
from train.config_io import load_config, save_config, with_out
from train.hardware.precision import choose_precision

COMMANDS = {
    "catdog-prep",
    "catdog-train",
    "catdog-launch",
    "catdog-predict",
    "catdog-evaluate",
    "catdog-export",
    "catdog-report",
}
# (command, sub-command argv) of every help that has an output or a progress display to control
WITH_OUTPUT = [
    ("catdog-prep", []),
    ("catdog-train", []),
    ("catdog-launch", ["local"]),
    ("catdog-launch", ["slurm"]),
    ("catdog-predict", []),
    ("catdog-evaluate", []),
    ("catdog-export", []),
    ("catdog-report", []),
]


def _entry(name: str):
    """The installed console script's function, as pyproject.toml's [project.scripts] names it."""
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.dist and ep.dist.name == "catdog"}
    return scripts[name].load()


def _exit(capsys, name: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command's function on ``argv``; argparse exits through SystemExit."""
    try:
        code = _entry(name)(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _help(capsys, name: str, sub: list[str]) -> str:
    code, out, _ = _exit(capsys, name, [*sub, "--help"])
    assert code == 0
    return " ".join(out.split())  # argparse wraps to the terminal's width


def test_the_seven_commands_are_installed():
    scripts = {ep.name for ep in entry_points(group="console_scripts") if ep.dist and ep.dist.name == "catdog"}
    assert scripts == COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_version_prints_the_package_version(capsys, name):
    code, out, _ = _exit(capsys, name, ["--version"])
    assert code == 0 and out == f"{name} {catdog_version()}\n"


@pytest.mark.parametrize(("name", "sub"), WITH_OUTPUT)
def test_out_and_no_progress_everywhere(capsys, name, sub):
    text = _help(capsys, name, sub)
    assert re.search(r"--out \w+, -o \w+", text), text
    assert "--no-progress" in text and "--version" in text


def test_old_spellings_stay(capsys):
    assert "--output FILE" in _help(capsys, "catdog-predict", [])  # predict's older --output


@pytest.mark.parametrize("name", ["catdog-predict", "catdog-evaluate"])
def test_the_tools_take_the_trainers_precision_words(capsys, name):
    assert f"--precision {{{','.join(PRECISIONS)}}}" in _help(capsys, name, [])


def test_the_trainer_takes_the_same_precision_words(capsys):
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    assert "train.mixed_precision=auto|fp32|bf16|fp16" in _help(capsys, "catdog-train", [])
    for word in (*PRECISIONS, "no"):  # no: Accelerate's word, which older configs and bundles record
        assert load_config(None, ["data.dir=x", f"train.mixed_precision={word}"]).train.mixed_precision == word
    # fp32 and its alias are Accelerate's "no"; auto is decided by the hardware (tests/test_config.py)
    assert choose_precision("fp32", "cpu") == choose_precision("no", "cpu") == ("no", "as configured")


def test_fp16_is_refused_on_cpu_by_the_tools():
    from train.formats.bundle import BundleError
    from train.use.classifier import resolve_precision

    with pytest.raises(BundleError, match="--precision fp16 is for GPUs, and this model would run on cpu"):
        resolve_precision("fp16", {"training": {"precision": "fp16"}}, "cpu")


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("catdog-prep", ["src", "out", "--no-such-flag"]),
        ("catdog-train", ["--no-such-flag"]),
        ("catdog-launch", ["local", "--config", "x.yaml", "--no-such-flag"]),
        ("catdog-launch", ["lokal"]),
        ("catdog-predict", ["model", "photo.jpg", "--precision", "fp8"]),
        ("catdog-evaluate", ["model", "data", "--no-such-flag"]),
        ("catdog-export", ["run", "--format", "tflite"]),
        ("catdog-report", ["--no-such-flag"]),
    ],
)
def test_a_wrong_argument_is_one_line_and_exit_2(capsys, name, argv):
    code, out, err = _exit(capsys, name, argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(name) and err.endswith("--help)\n"), err


# ------------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["train.epochz=3"], "override 'train.epochz=3': unknown key train.epochz; did you mean train.epochs?"),
        (["traim.epochs=3"], "override 'traim.epochs=3': unknown key traim.epochs; did you mean train.epochs?"),
        (["data.augment.scal_min=0.2"], "did you mean data.augment.scale_min?"),
        (["train.epochs=abc"], "override 'train.epochs=abc': expected an integer"),
        (["data.num_workers=many"], "override 'data.num_workers=many': expected auto or an integer"),
        (["train.cpu=maybe"], "expected true or false"),
        (["data.mean=[1,2]"], "expected 3 numbers"),
        (["track.backends=csv"], "expected a list"),
        (["train=3"], "train is a section"),
    ],
)
def test_config_errors_are_one_line_with_the_nearest_key(overrides, line):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.dir=x", *overrides])
    message = str(e.value)
    assert line in message and "\n" not in message
    assert "full_key" not in message and "reference_type" not in message and "object_type" not in message


def test_config_file_errors_are_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    cases = {
        "train:\n  epocs: 3\n": "c.yaml: unknown key train.epocs; did you mean train.epochs?",
        "trian:\n  epochs: 3\n": "c.yaml: unknown key trian; did you mean train?",
        "train:\n  epochs: [1\n": "c.yaml is not valid YAML: line 3, column 1: did not find expected ',' or ']'",
        "data:\n  mean: [1, 2]\n": "c.yaml: data.mean: expected 3 numbers",
    }
    for text, line in cases.items():
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(f, ["data.dir=x"])
        assert line in str(e.value) and "\n" not in str(e.value), text


def test_a_config_error_through_catdog_train_is_one_line_exit_2(capsys):
    code, _, err = _exit(capsys, "catdog-train", ["data.dir=x", "train.epochz=3"])
    assert code == 2
    assert (
        err
        == "catdog-train: config error: override 'train.epochz=3': unknown key train.epochz; did you mean train.epochs?\n"
    )


def test_num_workers_auto(tmp_path):
    assert load_config(None, ["data.dir=x", "data.num_workers=auto"]).data.num_workers == -1
    assert load_config(None, ["data.dir=x", "data.num_workers=-1"]).data.num_workers == -1  # the older spelling
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  dir: x\n  num_workers: auto\n")
    cfg = load_config(f)
    assert cfg.data.num_workers == -1 and cfg.data.workers() >= 0
    save_config(cfg, tmp_path / "saved.yaml")  # what a run dir records loads again
    assert load_config(tmp_path / "saved.yaml").data.num_workers == -1


def test_out_is_run_dir():
    assert with_out(["data.dir=x"], None) == ["data.dir=x"]
    assert load_config(None, with_out(["data.dir=x"], "runs/a")).run.dir == "runs/a"
    assert with_out(["run.dir=runs/a"], "runs/a") == ["run.dir=runs/a", "run.dir=runs/a"]
    with pytest.raises(ConfigError, match="--out runs/b and run.dir=runs/a name two run directories"):
        with_out(["run.dir=runs/a"], "runs/b")


# ------------------------------------------------------------------------------------------------------ progress


def test_progress_mode_follows_the_terminal_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    primary, secondary = os.openpty()  # a real terminal
    with open(secondary, "w") as tty, open(tmp_path / "log.err", "w") as log:
        assert progress_mode(tty) == "bar"
        assert progress_mode(log) == "lines"  # a SLURM .err file, a CI log
        for mode in ("bar", "lines", "off"):
            monkeypatch.setenv(ENV, mode)
            assert progress_mode(tty) == progress_mode(log) == mode
    os.close(primary)


def test_lines_are_plain_lines(monkeypatch, capsys):
    monkeypatch.setenv(EVERY_ENV, "0")
    out = io.StringIO()
    bar = LineProgress(total=10, desc="epoch 1/2", unit="step", initial=2, file=out)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(loss="0.6931", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("epoch 1/2: 3/10 step (30 %), ") and "elapsed" in lines[0]
    assert lines[-1].startswith("epoch 1/2: 5/10 step (50 %)") and lines[-1].endswith("loss=0.6931")
    # The default interval: nothing within a short loop.
    monkeypatch.delenv(EVERY_ENV)
    quiet = io.StringIO()
    for _ in LineProgress(range(100), desc="x", file=quiet):
        pass
    assert quiet.getvalue() == ""


def test_off_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "off")
    for _ in progress(range(50), total=50, desc="quiet"):
        pass
    monkeypatch.setenv(ENV, "bar")
    for _ in progress(range(50), total=50, desc="other rank", disable=True):
        pass
    assert capsys.readouterr().err == ""


def _run(*argv: str, progress_on: bool = True, code: int = 0) -> str:
    """stderr of a command run with stderr to a pipe (as in a log) and progress lines as often as they come."""
    cmd = [*argv, *([] if progress_on else ["--no-progress"])]
    lines_env = env(**{EVERY_ENV: "0"})
    lines_env.pop(ENV, None)
    res = subprocess.run(cmd, cwd=ROOT, env=lines_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == code, res.stderr[-3000:]
    assert "\r" not in res.stderr
    return res.stderr


@pytest.fixture(scope="module")
def trained(real_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(shards, run dir) of a one-epoch tiny run, trained with stderr to a pipe: plain progress lines, no bars."""
    root = tmp_path_factory.mktemp("trained")
    shards, run = make_shards(real_data, root / "shards"), root / "run"
    err = _run(sys.executable, "-m", "train", f"data.dir={shards}", *TINY, "train.epochs=1", "--out", str(run))
    assert re.search(r"^epoch 1/1: \d+/5 step \(\d+ %\), [\d.]+ step/s, 00:\d\d elapsed", err, re.M), err[-2000:]
    return shards, run


@pytest.mark.slow
def test_progress_in_a_log_and_no_progress(trained, real_data: Path, tmp_path: Path):
    """Training (in the fixture), evaluation and prediction print plain progress lines to a log; --no-progress: none."""
    shards, run = trained
    train = [sys.executable, "-m", "train", f"data.dir={shards}", *TINY, "train.epochs=1"]
    err = _run(*train, "-o", str(tmp_path / "quiet"), progress_on=False)
    assert "step (" not in err and (tmp_path / "quiet" / "final_metrics.json").is_file()

    evaluate = [
        sys.executable,
        "-m",
        "train.use.evaluate",
        str(run),
        str(shards),
        "--split",
        "val",
        "--batch-size",
        "4",
    ]
    err = _run(*evaluate, "-o", str(tmp_path / "eval"))
    assert re.search(r"^evaluate: \d+/3 batch \(\d+ %\)", err, re.M), err[-2000:]
    assert "batch (" not in _run(*evaluate, "-o", str(tmp_path / "eval2"), progress_on=False)

    photos = sorted((real_data / "val" / "cat").iterdir())[:4]
    predict = [sys.executable, "-m", "train.use.predict", str(run), *map(str, photos), "--batch-size", "2"]
    assert re.search(r"^predict: \d+/4 img", _run(*predict), re.M)
    assert "img (" not in _run(*predict, progress_on=False)


@pytest.mark.slow
def test_export_checks_on_the_photos_given(trained, real_data: Path, tmp_path: Path):
    _, run = trained
    export = [sys.executable, "-m", "train.use.export", str(run), "--format", "torchscript", "--no-progress"]
    photos = real_data / "val" / "dog"
    err = _run(*export, "-o", str(tmp_path / "m.pt"), "--check-images", str(photos))
    assert (tmp_path / "m.pt").is_file() and err == ""
    err = _run(*export, "-o", str(tmp_path / "n.pt"), "--check-images", str(tmp_path / "none"), code=2)
    assert err == f"catdog-export: --check-images {tmp_path / 'none'}: no readable photo to check the export on\n"


def test_report_out_must_be_a_folder(capsys, tmp_path: Path):
    (tmp_path / "a_file").write_text("x")
    code, _, err = _exit(capsys, "catdog-report", [str(tmp_path), "-o", str(tmp_path / "a_file")])
    assert (
        code == 2
        and err == f"catdog-report: --out {tmp_path / 'a_file'} is a file, not a folder: pass a folder for the report\n"
    )


def test_no_progress_reaches_a_slurm_job(capsys, tmp_path: Path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("data: {dir: shards}\n")
    argv = ["slurm", "--config", str(cfg), "--dry-run", "--cpus-per-task", "2", "-o", str(tmp_path / "run")]
    code, out, _ = _exit(capsys, "catdog-launch", [*argv, "--no-progress"])
    assert code == 0 and "\nexport CATDOG_PROGRESS=off\n" in out and f"# run dir {tmp_path / 'run'}" in out
    code, out, _ = _exit(capsys, "catdog-launch", argv)
    assert code == 0 and "CATDOG_PROGRESS" not in out  # by default the job's log gets a line every 30 s
