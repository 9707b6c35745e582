"""Shards in object storage end to end, against the real S3 server (SeaweedFS) the suite starts on 127.0.0.1:
catdog-prep uploads the same bytes a local run writes; 2 gloo ranks train from s3:// exactly as from the local copy
(same weights, same counts); catdog-evaluate and catdog-predict read the s3:// shard folder and give what they give
on the local one; no credential reaches the run dir, its logs or W&B's records."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prep_helpers import make_tree
from safetensors.torch import load_file
from train_helpers import ROOT, TINY, env, run_train

from data_prep import storage
from train.use.predict import main as predict_main

PREP = ["--image-size", "48", "--shard-max-count", "8", "--workers", "1", "--no-progress"]


def prep(src: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_prep", str(src), out, *PREP, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def use(tool: str, *args, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"train.use.{tool}", *map(str, args), "--workers", "1"]
    run_env = env(CATDOG_SHARD_CACHE=str(cache))  # the tools take the default cache folder: this test's
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def files_text(root: Path) -> str:
    """Every file under ``root`` as text (binary files too: a secret in a W&B record would show)."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_prep_train_evaluate_predict_from_s3_match_local(tmp_path, real_data, s3_prefix, s3_env, port, capsys):
    src = make_tree(real_data, tmp_path / "src", 20, short_side=64)
    local = tmp_path / "local"
    prep(src, str(local))
    prep(src, s3_prefix, "--stage", str(tmp_path / "stage"))
    objects = storage.list_dir(s3_prefix)
    assert sorted(objects) == sorted(p.name for p in local.iterdir()) and len(objects) >= 8
    for name in objects:  # the same bytes, _info.json included
        remote = hashlib.sha256(storage.read_bytes(f"{s3_prefix}/{name}")).hexdigest()
        assert remote == hashlib.sha256((local / name).read_bytes()).hexdigest(), name
    assert not (tmp_path / "stage").exists()  # staged shards leave once uploaded

    common = [
        *TINY,
        "model.norm=group",
        "model.dropout=0",
        "train.epochs=2",
        "train.deterministic=true",
        "data.num_workers=1",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    run_train([*common, f"data.dir={local}", f"run.dir={tmp_path / 'run_local'}"], procs=2, port=port)
    run_train(
        [*common, f"data.dir={s3_prefix}", f"run.dir={tmp_path / 'run_s3'}", "track.backends=[csv,wandb]"],
        procs=2,
        port=port + 1,
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
    )
    finals = [json.loads((tmp_path / r / "final_metrics.json").read_text()) for r in ("run_local", "run_s3")]
    counted = [k for k in finals[0] if k.endswith(("samples", "decoded", "batches", "corrupt_skipped", "step"))]
    assert counted and {k: finals[1].get(k) for k in counted} == {k: finals[0][k] for k in counted}
    ckpts = sorted((tmp_path / "run_local" / "checkpoints").glob("step_*"))
    assert ckpts
    for ckpt in ckpts:  # every checkpoint, epoch end and final: the same batches in the same order
        a = load_file(str(ckpt / "model.safetensors"))
        b = load_file(str(tmp_path / "run_s3" / "checkpoints" / ckpt.name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ckpt.name
    # One copy of each shard in the node's cache, shared by both ranks and their workers.
    info = json.loads((local / "_info.json").read_text())
    cached = sorted(p.name for p in (tmp_path / "cache" / "shards").glob("*.tar"))
    used = {f for s in ("train", "val", "test") for f in info["splits"].get(s, {}).get("filenames", [])}
    assert cached == sorted(f"{info['shards'][f]['sha256']}.tar" for f in used)

    bundle_local, bundle_s3 = tmp_path / "run_local" / "model", tmp_path / "run_s3" / "model"
    assert json.loads((bundle_s3 / "model.json").read_text())["data"]["dir"] == s3_prefix
    evals = {}
    for name, bundle, data in (("local", bundle_local, local), ("s3", bundle_s3, s3_prefix)):
        out = tmp_path / f"eval_{name}"
        use("evaluate", bundle, data, "--split", "val", "--out", out, "--mistakes", "0", cache=tmp_path / "cache")
        evals[name] = json.loads((tmp_path / f"eval_{name}" / "metrics.json").read_text())
    assert evals["s3"]["samples"] == evals["local"]["samples"] == sum(info["counts"]["per_split"]["val"].values())
    assert evals["s3"]["accuracy"] == evals["local"]["accuracy"]
    rows = {}
    for name, bundle, data in (("local", bundle_local, local), ("s3", bundle_s3, s3_prefix)):
        use(
            "predict",
            bundle,
            data,
            "--output",
            tmp_path / f"pred_{name}.csv",
            "--no-progress",
            cache=tmp_path / "cache",
        )
        lines = (tmp_path / f"pred_{name}.csv").read_text().splitlines()
        rows[name] = [line.replace(str(data), "DATA") for line in lines[1:]]
    assert len(rows["s3"]) == info["counts"]["written"] and rows["s3"] == rows["local"]

    # A URL storage cannot open: one line, exit 2.
    cmd = [sys.executable, "-m", "train.use.evaluate", str(bundle_s3), "foo://bucket/shards"]
    bad = subprocess.run(cmd, cwd=ROOT, env=env(CATDOG_SHARD_CACHE=str(tmp_path / "cache")), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "unsupported URL scheme foo://" in lines[0], bad.stderr
    capsys.readouterr()
    assert predict_main([str(bundle_s3), "foo://bucket/shards"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unsupported URL scheme foo://" in lines[0], lines

    # Credentials: in the environment of every process above, never in what they wrote.
    written = files_text(tmp_path / "run_s3") + files_text(tmp_path / "wandb-data") + files_text(tmp_path / "eval_s3")
    assert "wandb" in {p.name for p in (tmp_path / "run_s3").iterdir()}  # W&B's offline records are in there
    for secret in (s3_env.secret_key, s3_env.access_key):
        assert secret not in written
