"""The config tree: every shipped YAML loads, and bad input fails at load time naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from data_prep.cpus import auto_num_workers
from train.__main__ import cli
from train.config import VAL_METRICS, ConfigError
from train.config_io import load_config, save_config

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
    # The demo trains cnn.yaml's model on the short schedule docs/benchmarks.md describes; cnn.yaml stays the recipe.
    demo, recipe = (load_config(CONFIGS / name, ["data.dir=x"]) for name in ("demo.yaml", "cnn.yaml"))
    assert demo.model == recipe.model and (demo.train.epochs, recipe.train.epochs) == (30, 75)
    assert demo.data.augment.crop_sizes(30, 96) == (64,) * 12 + (80,) * 11 + (96,) * 7
    assert recipe.data.augment.crop_sizes(75, 96) == (96,) * 75


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
        (["track.plot_every_s=-1"], "track.plot_every_s"),
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


def test_an_aux_head_with_no_loss_weight_is_refused_on_several_processes(caplog):
    # Nothing trains it, and DDP fails at the second step on its parameters that get no gradient. Configs, bundles
    # and run dirs with it still load; training refuses it on several processes and warns on one.
    from train.run.setup import check_aux_head

    cfg = load_config(None, ["data.dir=x", "model.name=inception_v3", "model.aux_loss_weight=0"])
    with pytest.raises(ConfigError, match="model.aux_logits=true with model.aux_loss_weight=0 on 2 processes"):
        check_aux_head(cfg.model, world=2)
    with caplog.at_level("WARNING", logger="catdog"):
        check_aux_head(cfg.model, world=1)
    assert "nothing trains the auxiliary head" in caplog.text
    cfg.model.aux_logits = False
    check_aux_head(cfg.model, world=2)


def test_yaml_boolean_words_reach_string_fields_as_typed(tmp_path):
    # YAML 1.1 reads `no`/`off`/`yes` as booleans; for a string field the user meant the word.
    for value in ("no", "bf16", "auto"):
        assert load_config(None, ["data.dir=x", f"train.mixed_precision={value}"]).train.mixed_precision == value
    assert load_config(None, ["data.dir=x", "run.name=off"]).run.name == "off"
    f = tmp_path / "c.yaml"
    f.write_text("data: {dir: x}\ntrain:\n  mixed_precision: no\n")
    assert load_config(f).train.mixed_precision == "no"
    with pytest.raises(
        ConfigError, match=r"train.mixed_precision='fp8': choose one of auto, fp32, bf16, fp16 \(no = fp32\)"
    ):
        load_config(None, ["data.dir=x", "train.mixed_precision=fp8"])


@pytest.mark.slow
def test_mixed_precision_no_typed_on_a_real_command_line(tmp_path, real_data):
    """The README's spelling, through the real CLI: it trains in fp32 and saves 'no' in config.yaml."""
    from train_helpers import TINY, make_shards, run_train

    shards = make_shards(real_data, tmp_path / "shards")
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("train.mixed_precision")]
    run_train([f"data.dir={shards}", f"run.dir={run}", *args, "train.max_steps=1", "train.mixed_precision=no"])
    assert "mixed_precision: 'no'" in (run / "config.yaml").read_text()
    assert "MULTI_CPU" not in (log := (run / "train.log").read_text()) and ", fp32, " in log


def test_auto_precision_follows_what_the_hardware_supports():
    from train.hardware.precision import choose_precision

    # The hardware's answer is simulated both ways (no bf16-capable and bf16-less machine exists side by side here).
    assert choose_precision("auto", "cpu", cpu_bf16=lambda: True) == ("bf16", "the CPU has AVX512-BF16 or AMX")
    precision, why = choose_precision("auto", "cpu", cpu_bf16=lambda: False)
    assert precision == "no" and "neither AVX512-BF16 nor AMX" in why
    assert choose_precision("auto", "cuda", cuda_bf16=lambda: True)[0] == "bf16"
    assert choose_precision("auto", "cuda", cuda_bf16=lambda: False)[0] == "no"
    assert choose_precision("fp16", "cpu", cpu_bf16=lambda: True) == ("fp16", "as configured")


def test_auto_num_workers_follow_the_cpus_of_the_rank():
    # Environments as the launchers set them; the affinity mask size is a parameter (this machine has 2 CPUs).
    slurm_task = {"SLURM_CPUS_PER_TASK": "10", "SLURM_NTASKS": "8", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert auto_num_workers(slurm_task, affinity=10)[0] == 9  # catdog-launch slurm: each rank a bound task
    assert auto_num_workers(slurm_task, affinity=40)[0] == 9  # an unbound task sees the node: its share is 10
    assert auto_num_workers(slurm_task, affinity=4)[0] == 3  # a mask smaller than the request wins
    inside_one_task = {"SLURM_CPUS_PER_TASK": "32", "SLURM_NTASKS": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    n, why = auto_num_workers(inside_one_task, affinity=32)  # accelerate launch inside one SLURM task: 4 share it
    assert n == 7 and "shared by 4 local ranks" in why and "auto -> 7 per rank" in why
    assert auto_num_workers({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, affinity=64)[0] == 16  # capped
    assert auto_num_workers({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, affinity=2)[0] == 0  # 1 CPU: no workers
    assert auto_num_workers({}, affinity=2)[0] == 1  # one process on this 2-core machine


def test_num_workers_auto_is_the_default_and_explicit_values_are_kept(monkeypatch):
    cfg = load_config(CONFIGS / "cnn.yaml", ["data.dir=x"])
    assert cfg.data.num_workers == -1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # a 1-CPU task: nothing left for workers
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cfg.data.workers() == 0
    assert load_config(CONFIGS / "cnn.yaml", ["data.dir=x", "data.num_workers=3"]).data.workers() == 3
    with pytest.raises(ConfigError, match="data.num_workers=-2"):
        load_config(CONFIGS / "cnn.yaml", ["data.dir=x", "data.num_workers=-2"])


def test_wandb_goes_online_where_a_key_is_set_up_and_stays_offline_elsewhere(tmp_path):
    """track.wandb.mode=auto (the default): online with WANDB_API_KEY or `wandb login`'s netrc entry, else offline;
    WANDB_MODE and an explicit mode win."""
    auto = load_config(None, ["data.dir=x"]).track.wandb
    assert auto.mode == "auto"
    no_netrc = {"NETRC": str(tmp_path / "missing")}
    assert auto.resolved_mode(no_netrc) == "offline"
    assert auto.resolved_mode(no_netrc | {"WANDB_API_KEY": "k" * 40}) == "online"
    logged_in = tmp_path / "netrc"
    logged_in.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    logged_in.chmod(0o600)
    assert auto.resolved_mode({"NETRC": str(logged_in)}) == "online"
    elsewhere = {"NETRC": str(logged_in), "WANDB_BASE_URL": "https://wandb.example.org"}
    assert auto.resolved_mode(elsewhere) == "offline"  # the key is for another W&B server
    assert auto.resolved_mode({"NETRC": str(logged_in), "WANDB_MODE": "offline"}) == "offline"
    explicit = load_config(None, ["data.dir=x", "track.wandb.mode=offline"]).track.wandb
    assert explicit.resolved_mode(no_netrc | {"WANDB_API_KEY": "k" * 40}) == "offline"
    with pytest.raises(ConfigError, match="track.wandb.mode"):
        load_config(None, ["data.dir=x", "track.wandb.mode=sometimes"])
