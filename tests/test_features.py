"""train.precompute_features: the frozen backbone's features computed once and cached; only the head trains.

Real photos and the real offline InceptionV3 weights, at 160 px on ~100 photos so the whole file stays ~1 min on 2
cores (InceptionV3 runs ~10-20 img/s here at 299 px; the full-size, full-data run is bench/transfer.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from data_shards import rewrite_member, tiny_jpegs, write_shards
from kill_helpers import assert_one_line, kill_env, killed, run_killed
from safetensors.torch import load_file
from train_helpers import run_env_ranks, run_train, run_train_failing, train_cmd

from data_prep.info import load_info
from train.config import ConfigError
from train.config_io import load_config
from train.data.streams import eval_loader
from train.hardware.precision import native_bf16
from train.loop.epoch import batch_reseeder
from train.models import pretrained
from train.models.inception import folded_for_inference
from train.models.registry import build_model
from train.run import feature_cache as features
from train.run.features import epoch_batches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where run_train trains
LENGTHS = {"train": [32, 32], "val": [40]}  # alternating cat/dog: balanced splits
SIZE = 160
BASE = [
    "model.name=inception_v3",
    "model.weights=tf_inception_v3",
    "model.freeze_backbone=true",
    "model.aux_logits=false",
    f"model.image_size={SIZE}",
    "train.precompute_features=true",
    "train.mixed_precision=auto",  # as configs/inception_v3.yaml: bf16 features only where the CPU has it natively
    "train.channels_last=true",
    "data.num_workers=0",
    "track.backends=[csv]",
]


@pytest.fixture(scope="module")
def shards(real_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, tiny_jpegs(real_data, sum(sum(v) for v in LENGTHS.values()), size=SIZE), LENGTHS)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private XDG cache (empty feature cache) that links the real, already converted weights."""
    try:
        pretrained.ensure_converted("tf_inception_v3")
    except pretrained.PretrainedError as e:
        if os.environ.get("CATDOG_REQUIRE_WEIGHTS"):
            pytest.fail(str(e))
        pytest.skip(f"tf_inception_v3 weights unavailable: {e}")
    return empty_xdg(tmp_path_factory.mktemp("xdg"))


def empty_xdg(xdg: Path) -> Path:
    """``xdg`` as an XDG cache with no features cached yet and the real converted weights linked in."""
    (xdg / "catdog").mkdir(parents=True)
    (xdg / "catdog" / "weights").symlink_to(pretrained.weights_dir())
    return xdg


@pytest.fixture
def xdg(cache, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_transfer_run_learns_keeps_the_backbone_and_writes_a_normal_run_dir(shards, xdg, tmp_path):
    run_dir = tmp_path / "run"
    common = [*BASE, f"data.dir={shards}", f"run.dir={run_dir}", "train.epochs=8", "train.batch_size=16"]
    run_train(common, XDG_CACHE_HOME=str(xdg))
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert (
        final["val/samples"] == 40
        and final["features/cached"] is False
        and final["features/bf16"] is native_bf16(DEVICE)
    )
    assert final["best/val/accuracy"] >= 0.8, final  # chance is 0.5; ~0.95 measured
    assert (run_dir / "train.log").read_text().count(" final: ") == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert {"loss.png", "accuracy.png", "confusion_matrix.png", "roc.png"} <= {
        p.name for p in (run_dir / "plots").iterdir()
    }

    # Checkpoints hold the whole model: frozen trunk (weights AND BN statistics) exactly as loaded, new head.
    loaded = pretrained.load_state_dict("tf_inception_v3")
    best = load_file(str(run_dir / "checkpoints" / final["best_checkpoint"] / "model.safetensors"))
    last = load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    for saved in (best, last):
        for k, v in loaded.items():
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(saved[f"net.{k}"], v), k
    assert not torch.equal(
        best["net.fc.weight"], build_model(load_config(None, ["data.dir=x", *BASE]).model, 2).net.fc.weight
    )

    # The best checkpoint, run on images the ordinary way (fp32, no feature cache), scores what the head did.
    cfg = load_config(None, [f"data.dir={shards}", *BASE])
    model = build_model(cfg.model, 2)
    model.load_state_dict(best)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in eval_loader(
            cfg.data, load_info(shards), split="val", batch_size=20, image_size=SIZE, rank=0, world_size=1
        ):
            correct += int((model(x).argmax(1) == y).sum())
    assert abs(correct / 40 - final["best/val/accuracy"]) <= 1 / 40 + 1e-6  # bf16 features may flip one photo

    # Second run on the same inputs: the features come from the cache (the run dir is new, so nothing resumes).
    run_train(
        [*common[:-2], f"run.dir={tmp_path / 'again'}", "train.epochs=2", "train.batch_size=16"],
        XDG_CACHE_HOME=str(xdg),
    )
    again = json.loads((tmp_path / "again" / "final_metrics.json").read_text())
    assert again["features/cached"] is True and again["features/extract_seconds"] < 5
    assert list((xdg / "catdog" / "features").glob(".tmp-*")) == []


def test_a_cached_feature_run_logs_the_loss_and_accuracy_its_head_trained_with(shards, xdg, tmp_path, monkeypatch):
    """train/loss and train/accuracy of a cached-feature run are its head's (they were logged as 0.0). At a zero
    learning rate the head keeps its initial weights, so every epoch's numbers are recomputed here from the cached
    train features: the run's epoch order and its per-batch dropout seeds, the initial head, the loss."""
    run_dir = tmp_path / "run"
    overrides = [*BASE, f"data.dir={shards}", "train.batch_size=16", "optim.lr=0"]
    run_train([*overrides, f"run.dir={run_dir}", "train.epochs=2"], XDG_CACHE_HOME=str(xdg))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "final_metrics.json").read_text())

    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    cfg = load_config(None, overrides)
    key, _ = features.cache_key(cfg, load_info(shards), "train", final["features/bf16"])
    cached = load_file(str(features.features_dir() / f"{key}.safetensors"))
    set_seed(cfg.train.seed)  # as the run did before building its model: the same initial head
    head = build_model(cfg.model, 2).head().train()
    assert len(rows) == 2
    for epoch, row in enumerate(rows):
        batches = epoch_batches(cached["features"], cached["labels"], 16, cfg.train.seed, epoch)
        reseed = batch_reseeder(cfg.train.seed, epoch)
        loss_sum = correct = 0.0
        with torch.no_grad():
            for b, (x, y) in enumerate(batches):
                reseed(b)
                logits = head(x)
                loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
        n = len(cached["labels"])
        assert row["train/loss"] == pytest.approx(loss_sum / n, rel=1e-4), epoch
        assert row["train/accuracy"] == pytest.approx(correct / n, abs=1e-9), epoch
        assert row["train/loss"] > 0.1  # an untrained 2-class head: about log(2), nothing like 0.0


def test_cache_is_reused_and_invalidated_when_an_input_changes(shards, xdg, tmp_path, monkeypatch):
    from accelerate import Accelerator

    cfg = load_config(None, [f"data.dir={shards}", *BASE, "model.image_size=96"])
    info = load_info(shards)
    acc = Accelerator(cpu=True)
    model = build_model(cfg.model, 2)
    first = features.split_features(cfg, info, model, acc, "val")
    assert not first["cached"] and first["features"].shape == (40, 2048) and first["path"].is_file()

    def no_extract(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(features, "extract", no_extract)
    second = features.split_features(cfg, info, model, acc, "val")
    assert second["cached"] and torch.equal(second["features"], first["features"])
    assert torch.equal(second["labels"], first["labels"])

    key = features.cache_key(cfg, info, "val", first["bf16"])[0]
    changed = {
        "image size": load_config(None, [f"data.dir={shards}", *BASE, "model.image_size=128"]),
        "weights": load_config(None, [f"data.dir={shards}", *BASE, "model.image_size=96", "model.weights=none"]),
        "mean": load_config(None, [f"data.dir={shards}", *BASE, "model.image_size=96", "data.mean=[0.5,0.5,0.5]"]),
    }
    for what, other in changed.items():
        assert features.cache_key(other, info, "val", first["bf16"])[0] != key, what
    assert features.cache_key(cfg, info, "val", not first["bf16"])[0] != key  # precision
    assert features.cache_key(cfg, info, "train", first["bf16"])[0] != key

    # A shard's content changes (same name, same _info.json): recomputed, not served stale.
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shards.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    rewrite_member(copy / "val-000000.tar", "val_00_000", "cls", b"0" if first["labels"][0] else b"1")
    info2 = load_info(copy)
    assert features.cache_key(cfg, info2, "val", first["bf16"])[0] != key
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    third = features.split_features(cfg, info2, model, acc, "val")
    assert not third["cached"] and (third["labels"] != first["labels"]).sum() == 1
    # _info.json's recorded shard sha256 (catdog-prep writes them) is what the key uses when present.
    raw = json.loads((copy / "_info.json").read_text())
    raw["shards"] = {"val-000000.tar": {"sha256": "0" * 64, "bytes": 1}}
    (copy / "_info.json").write_text(json.dumps(raw))
    assert features.cache_key(cfg, load_info(copy), "val", first["bf16"])[1]["shards"] == [["val-000000.tar", "0" * 64]]


def test_features_come_from_a_folded_copy_equal_to_the_model(shards, xdg):
    """The cache's features (BatchNorm folded into the convs, for speed) are the model's own to 1e-5, and the model
    whose checkpoints and bundle are saved keeps its BatchNorm layers and weights."""
    cfg = load_config(None, [f"data.dir={shards}", *BASE, "model.image_size=96"])
    model = build_model(cfg.model, 2).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"batch_size": 8, "image_size": 96, "rank": 0, "world_size": 1, "with_keys": True}
    batches = list(eval_loader(cfg.data, load_info(shards), split="val", **args))[:2]
    feats, labels, _ = features.extract(model, batches, device=torch.device("cpu"), bf16=False, channels_last=True)
    model.eval()
    with torch.no_grad():
        ref = torch.cat([model.features(x.contiguous(memory_format=torch.channels_last)) for x, _, _ in batches])
    assert feats.shape == ref.shape == (16, 2048)
    assert ((feats - ref).norm(dim=1) / ref.norm(dim=1)).max().item() < 1e-5
    assert torch.equal(labels, torch.cat([y for _, y, _ in batches]))
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(before[k], state[k]) for k in state)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 94
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded_for_inference(model).modules())


def test_precompute_features_needs_a_frozen_backbone(shards, tmp_path):
    with pytest.raises(ConfigError, match="train.precompute_features=true needs a frozen backbone"):
        load_config(None, ["data.dir=x", "train.precompute_features=true"])
    proc = run_train_failing([f"data.dir={shards}", f"run.dir={tmp_path / 'r'}", "train.precompute_features=true"])
    assert "model.freeze_backbone=true" in proc.stderr


@pytest.mark.slow
def test_two_ranks_split_the_extraction_and_cache_what_one_rank_does(shards, cache, tmp_path, port):
    """Two gloo ranks each extract half the images, gather them sorted by key, and cache the same table."""
    from safetensors import safe_open

    tables = []
    for procs in (1, 2):
        xdg = tmp_path / f"xdg{procs}"
        (xdg / "catdog").mkdir(parents=True)
        (xdg / "catdog" / "weights").symlink_to(pretrained.weights_dir())
        run_dir = tmp_path / f"run{procs}"
        args = [*BASE, "model.image_size=96", f"data.dir={shards}", f"run.dir={run_dir}", "train.epochs=2"]
        run_train([*args, "train.batch_size=16", "eval.batch_size=16"], procs=procs, port=port, XDG_CACHE_HOME=str(xdg))
        found = {}
        for f in (xdg / "catdog" / "features").glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as t:
                split = json.loads(t.metadata()["inputs"])["split"]
                found[split] = (t.get_tensor("features"), t.get_tensor("labels"), json.loads(t.metadata()["keys"]))
        tables.append(found)
        assert json.loads((run_dir / "final_metrics.json").read_text())["val/samples"] == 40
    one, two = tables
    for split in ("train", "val"):
        assert one[split][2] == two[split][2] and len(one[split][2]) == sum(LENGTHS[split])  # same rows, same order
        assert torch.equal(one[split][1], two[split][1])
        # bf16 convolutions may round differently for another batch composition; the rows are the same images.
        assert torch.allclose(one[split][0], two[split][0], rtol=0.05, atol=0.05)

    # Ranks that disagree about the cache (a node-local cache folder: rank 0 holds the 1-rank run's entries, rank 1
    # an empty one) must still make one choice together: before, rank 0 read its cache and went on to the next
    # collective while rank 1 waited in the extraction's gather, until the timeout.
    fresh = empty_xdg(tmp_path / "xdg_fresh")
    run_dir = tmp_path / "disagree"
    args = [*BASE, "model.image_size=96", f"data.dir={shards}", f"run.dir={run_dir}", "train.epochs=2"]
    run_env_ranks(
        [*args, "train.batch_size=16", "eval.batch_size=16"],
        world=2,
        port=port + 1,
        timeout=300,
        rank_envs=[{"XDG_CACHE_HOME": str(tmp_path / "xdg1")}, {"XDG_CACHE_HOME": str(fresh)}],
    )
    assert "features: train 64 x 2048 (extracted" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "final_metrics.json").read_text())["val/samples"] == 40


@pytest.mark.slow
def test_extraction_worker_killed_mid_send_stops_the_run_with_one_line(shards, tmp_path):
    """A loader worker of the feature extraction killed part-way through sending a batch (tests/kill_helpers.py):
    one line, exit 1, and no cache entry a rerun would trust."""
    xdg = empty_xdg(tmp_path / "xdg")  # its own: with the module's cache, an earlier test's features skip extraction
    run_dir = tmp_path / "run"
    args = [*BASE, "data.num_workers=2", "eval.batch_size=8", f"data.dir={shards}", f"run.dir={run_dir}"]
    claim = tmp_path / "claim"
    proc = run_killed(train_cmd(args), claim, kill_env(claim, at=2, XDG_CACHE_HOME=str(xdg)))
    advice = (f"resume from the last checkpoint in {run_dir}", "data.num_workers (was 2)")
    assert_one_line(proc.stderr, proc.returncode, "catdog-train", killed(claim)[0], *advice)
    assert not list((xdg / "catdog" / "features").glob("*.safetensors"))
