"""catdog-report on two real (short) runs: Markdown table, overlaid curves PNG, confusion matrices PNG, W&B table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from train_helpers import ROOT, TINY, env, make_shards, run_train

from train.use.report import load_run, markdown_table


@pytest.fixture(scope="module")
def two_runs(real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    shards = make_shards(real_data, root / "shards")
    runs = []
    for name, width in (("narrow", 4), ("wide", 8)):
        run_dir = root / name
        run_train([*TINY, f"model.width={width}", f"data.dir={shards}", f"run.dir={run_dir}", "train.epochs=2"])
        runs.append(run_dir)
    return runs


def test_report_writes_table_and_figures_and_logs_a_wandb_table(two_runs, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "train.use.report", *map(str, two_runs), "--out", str(out), "--wandb"],
        cwd=ROOT,
        env=env(WANDB_MODE="offline"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    for run_dir in two_runs:
        final = json.loads((run_dir / "final_metrics.json").read_text())
        row = next(line for line in md.splitlines() if line.startswith(f"| {run_dir.name} |"))
        assert "scratch CNN" in row and "from scratch" in row
        assert f"{100 * final['best/val/accuracy']:.2f} %" in row  # the kept epoch's accuracy
        assert row in proc.stdout
    with Image.open(out / "val_curves.png") as curves, Image.open(out / "confusion_matrices.png") as cms:
        assert curves.format == cms.format == "PNG"
        assert cms.width > 1.6 * cms.height  # two matrices side by side
    tables = list(out.glob("wandb/offline-run-*/files/media/table/report/table_*.table.json"))
    assert len(tables) == 1, sorted(p.relative_to(out) for p in out.rglob("*"))[:40]
    logged = json.loads(tables[0].read_text())
    assert logged["columns"][:4] == ["run", "model", "weights", "mode"]
    assert [r[0] for r in logged["data"]] == [p.name for p in two_runs]


def test_report_rows_describe_transfer_modes(two_runs):
    run = load_run(two_runs[0])
    run.config["model"].update(name="inception_v3", weights="tf_inception_v3", freeze_backbone=True)
    run.config["train"]["precompute_features"] = True
    assert run.mode == "feature extraction (cached features)"
    run.config["model"].update(freeze_backbone=False, trainable_blocks=3)
    run.config["optim"]["backbone_lr_scale"] = 0.1
    assert run.mode == "fine-tuning (last 3 blocks, backbone LR x0.1)"
    assert markdown_table([run]).count("\n") == 3


def test_not_a_run_dir_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train.use.report", str(tmp_path), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"catdog-report: {tmp_path}: no config.yaml; is this a finished catdog-train run dir (run.dir)?"
    )
