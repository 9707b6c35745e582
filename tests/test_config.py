"""The config tree: every shipped YAML loads, and bad input fails at load time naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from train.__main__ import cli
from train.config import VAL_METRICS, ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path, ["data.dir=/data/shards"])
    assert cfg.data.dir == "/data/shards"
    assert cfg.model.input_size() == (299 if cfg.model.name == "inception_v3" else cfg.model.image_size)


def test_configs_differ_where_they_should():
    extract = load_config(CONFIGS / "inception_v3.yaml", ["data.dir=x"])
    finetune = load_config(CONFIGS / "inception_v3_finetune.yaml", ["data.dir=x"])
    assert extract.model.freeze_backbone and not finetune.model.freeze_backbone
    assert finetune.model.weights == extract.model.weights == "tf_inception_v3"  # inherited through `defaults:`
    assert load_config(CONFIGS / "debug_cpu.yaml", ["data.dir=x"]).train.cpu


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in ("NO", "MULTI_GPU")
    # Accelerate's own parser accepts it (what `accelerate launch --config_file` does first).
    assert ClusterConfig.from_yaml_file(str(path)).num_processes == raw["num_processes"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.widht=8"], "model.widht"),
        (["train.epochs=three"], "train.epochs"),
        (["train.mixed_precision=fp8"], "train.mixed_precision"),
        (["model.norm=layer"], "model.norm"),
        (["optim.name=adam"], "optim.name"),
        (["track.backends=[wandb,mlflow]"], "track.backends"),
        (["model.trainable_blocks=40"], "model.trainable_blocks"),
        (["data.on_error=ignore"], "data.on_error"),
        (["model.name=resnet50"], "model.name"),
        (["train.early_stop_metric=val/acc"], "train.early_stop_metric"),
        (["train.early_stop_metric=test/accuracy"], "train.early_stop_metric"),
        (["nosection.x=1"], "nosection"),
        (["train.epochs"], "train.epochs"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "cnn.yaml", ["data.dir=x", *overrides])


def test_every_val_metric_is_a_valid_early_stop_metric():
    for metric in VAL_METRICS:
        assert load_config(None, ["data.dir=x", f"train.early_stop_metric=val/{metric}"]).train.early_stop_metric


def test_missing_data_dir_is_named():
    with pytest.raises(ConfigError, match=r"data\.dir"):
        load_config(CONFIGS / "cnn.yaml")


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  widht: 8\n")
    with pytest.raises(ConfigError, match="widht"):
        load_config(unknown, ["data.dir=x"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_cannot_construct_objects(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("data:\n  dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(evil)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "cnn.yaml", ["data.dir=/d", "train.epochs=3", "model.width=12"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left beside it


def test_cli_reports_config_errors(capsys):
    assert cli(["--config", str(CONFIGS / "cnn.yaml"), "data.dir=x", "train.batchsize=3"]) == 2
    assert "train.batchsize" in capsys.readouterr().err


def test_per_device_batch_must_divide():
    cfg = load_config(CONFIGS / "cnn.yaml", ["data.dir=x", "train.batch_size=64", "train.grad_accum=2"])
    assert cfg.train.per_device_batch(world_size=4) == 8
    with pytest.raises(ConfigError, match="train.batch_size=64"):
        cfg.train.per_device_batch(world_size=3)
