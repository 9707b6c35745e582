"""Stronger augmentation (data.augment: TrivialAugment/RandAugment, RandomErasing, MixUp/CutMix): a pure function of
(seed, epoch, position), mixed targets that still score against hard labels, and short real runs with each option."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from data_shards import tiny_jpegs, write_shards
from train_helpers import ROOT, TINY, make_shards, run_train

from data_prep.info import load_info
from train.config import AugmentConfig, ConfigError, DataConfig
from train.config_io import load_config
from train.data.streams import TrainStream
from train.data.transforms import normalise
from train.loop.epoch import EpochTotals, classification_loss

CONFIGS = ROOT / "configs"
OPTIONS = {
    "trivial+erasing": {"policy": "trivial", "erasing": 0.5},
    "rand": {"policy": "rand", "rand_magnitude": 15},
    "mixup": {"mixup_alpha": 0.4},
    "mixup|cutmix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_data):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, tiny_jpegs(real_data, 27), {"train": [11, 9, 7]})
    return root


def stream(
    root, aug: dict, workers: int = 0, color_jitter: float = 0.2, image_size: int = 32, crop_sizes: tuple = ()
) -> TrainStream:
    cfg = DataConfig(
        dir=str(root), num_workers=workers, shuffle_buffer=8, augment=AugmentConfig(color_jitter=color_jitter, **aug)
    )
    return TrainStream(
        cfg, load_info(root), split="train", batch_size=4, image_size=image_size, rank=0, world_size=1, seed=3,
        crop_sizes=crop_sizes,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_is_a_function_of_seed_epoch_and_position(shards, name):
    aug = OPTIONS[name]
    full = list(stream(shards, aug).loader(epoch=1))
    by_workers = list(stream(shards, aug, workers=2).loader(epoch=1))
    resumed = list(stream(shards, aug).loader(epoch=1, start_batch=3))
    assert len(full) == len(by_workers) == 7 and len(resumed) == 4
    for (x, y), (xw, yw) in zip(full, by_workers, strict=True):
        assert torch.equal(x, xw) and torch.equal(y, yw)
    for (x, y), (xr, yr) in zip(full[3:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    plain = list(stream(shards, {}).loader(epoch=1))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, plain, strict=True))  # the option did something


def test_mixup_mixes_each_image_with_its_neighbour_and_the_targets_alike(shards):
    plain = list(stream(shards, {}, color_jitter=0.0).loader(epoch=0))
    mixed = list(stream(shards, {"mixup_alpha": 0.4}, color_jitter=0.0).loader(epoch=0))
    for (x0, y0), (x1, y1) in zip(plain, mixed, strict=True):
        assert y0.dtype == torch.int64 and y1.shape == (4, 2) and y1.dtype == torch.float32
        torch.testing.assert_close(y1.sum(1), torch.ones(4))
        # torchvision's MixUp: x1 = lam * x0 + (1 - lam) * x0.roll(1); lam solved from the images by least squares.
        d = x0 - x0.roll(1, 0)
        lam = float(((x1 - x0.roll(1, 0)) * d).sum() / (d * d).sum())
        torch.testing.assert_close(x1, lam * x0 + (1 - lam) * x0.roll(1, 0), atol=1e-4, rtol=1e-4)
        onehot = F.one_hot(y0, 2).float()
        torch.testing.assert_close(y1, lam * onehot + (1 - lam) * onehot.roll(1, 0), atol=1e-4, rtol=1e-4)


def test_soft_targets_train_and_count_accuracy_against_the_dominant_class():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.5, 0.0]])
    soft = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])  # dominant classes 0, 1, 1, 0
    loss, _ = classification_loss(logits, soft, label_smoothing=0.1, aux_weight=0.0)
    expected = -(((1 - 0.1) * soft + 0.1 / 2) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    totals = EpochTotals()
    totals.add(loss, logits, soft)
    assert totals.seen == 4 and float(totals._pending[1]) == 3.0  # rows 0, 1, 3 right; row 2 wrong


def test_bad_augment_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="data.augment.policy='auto'"):
        load_config(None, ["data.dir=x", "data.augment.policy=auto"])
    with pytest.raises(ConfigError, match="data.augment.mixup_alpha=-1.0"):
        load_config(None, ["data.dir=x", "data.augment.mixup_alpha=-1"])
    with pytest.raises(ConfigError, match="data.augment.erasing=1.5"):
        load_config(None, ["data.dir=x", "data.augment.erasing=1.5"])


def test_progressive_resizing_ramps_the_crop_size_in_steps_of_16():
    aug = load_config(
        None, ["data.dir=x", "data.augment.size_start=64", "data.augment.size_ramp=[0.2,0.6]"]
    ).data.augment
    assert aug.crop_sizes(10, 96) == (64, 64, 64, 64, 80, 80, 96, 96, 96, 96)
    assert AugmentConfig(size_start=48, size_end=80, size_ramp=(0.0, 0.5)).crop_sizes(4, 96) == (48, 64, 80, 80)
    assert AugmentConfig().crop_sizes(3, 96) == (96, 96, 96)  # off by default
    # The last epoch trains at the size validation and the exported model use, however short the schedule.
    assert [AugmentConfig(size_start=64).crop_sizes(n, 96) for n in (1, 2, 3)] == [(96,), (64, 96), (64, 64, 96)]
    assert AugmentConfig(size_start=64, size_ramp=(1.0, 1.0)).crop_sizes(4, 96) == (64, 64, 64, 96)
    assert AugmentConfig(size_start=72).crop_sizes(4, 96) == (72, 80, 80, 96)  # the start as given, then 16 px steps
    shrinking = AugmentConfig(size_start=160, size_end=100).crop_sizes(8, 96)
    assert (
        shrinking[0] == 160
        and shrinking[-1] == 100
        and all(a >= b >= 100 for a, b in zip(shrinking[:-1], shrinking[1:], strict=True))
    )
    with pytest.raises(ConfigError, match=r"data.augment.size_ramp=\[0.8, 0.2\]"):
        load_config(None, ["data.dir=x", "data.augment.size_ramp=[0.8,0.2]"])
    with pytest.raises(ConfigError, match="data.augment.size_start=-8"):
        load_config(None, ["data.dir=x", "data.augment.size_start=-8"])
    # Crops the model cannot take, and cached features (nothing to resize), are refused at load.
    with pytest.raises(ConfigError, match="scratch_cnn needs crops of at least 32 px"):
        load_config(None, ["data.dir=x", "model.depth=5", "data.augment.size_start=16"])
    with pytest.raises(ConfigError, match="auxiliary head needs 299 px"):
        load_config(None, ["data.dir=x", "model.name=inception_v3", "data.augment.size_start=128"])
    with pytest.raises(ConfigError, match="cached features"):
        load_config(CONFIGS / "inception_v3.yaml", ["data.dir=x", "data.augment.size_start=128"])
    finetune = ["data.dir=x", "model.aux_logits=false", "data.augment.size_start=160"]
    assert load_config(CONFIGS / "inception_v3_finetune.yaml", finetune).data.augment.size_start == 160


def test_progressive_resizing_crops_each_epoch_at_its_size_and_the_same_region(shards):
    """Each epoch's batches come at that epoch's crop size, equal to a run at that fixed size (the crop's random
    draws do not depend on its size), from any number of workers and after a resume."""
    sizes = (16, 32, 32)
    ramp = stream(shards, {"policy": "trivial"}, workers=2, crop_sizes=sizes)
    for epoch, size in enumerate(sizes[:2]):
        got = list(ramp.loader(epoch))
        fixed = list(stream(shards, {"policy": "trivial"}, image_size=size).loader(epoch))
        resumed = list(stream(shards, {"policy": "trivial"}, crop_sizes=sizes).loader(epoch, start_batch=5))
        assert len(got) == len(fixed) == 7 and got[0][0].shape == (4, 3, size, size)
        for (x, y), (xf, yf) in zip(got, fixed, strict=True):
            assert torch.equal(x, xf) and torch.equal(y, yf)
        for (x, _), (xr, _) in zip(got[5:], resumed, strict=True):
            assert torch.equal(x, xr)
    assert ramp.crops.size(7) == 32  # past the schedule: the last size


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["data.augment.policy=rand", "data.augment.mixup_alpha=0.4"],
        ["data.augment.policy=trivial", "data.augment.erasing=0.5", "data.augment.cutmix_alpha=1.0"],
        ["data.augment.size_start=32", "data.augment.size_ramp=[0,0.5]"],
    ],
    ids=["rand+mixup", "trivial+erasing+cutmix", "progressive_resizing"],
)
def test_short_real_run_with_the_options(tmp_path, real_data, options):
    shards = make_shards(real_data, tmp_path / "shards")
    run_dir = tmp_path / "run"
    run_train([f"data.dir={shards}", f"run.dir={run_dir}", *TINY, "train.epochs=2", "data.num_workers=1", *options])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    for r in rows:
        assert 0 < r["train/loss"] < 5 and 0 <= r["train/accuracy"] <= 1 and r["val/samples"] == 11
        assert r["train/accuracy"] * 40 == pytest.approx(round(r["train/accuracy"] * 40))  # counts of 40 samples
    # Metrics use the hard labels: the accuracy is the confusion matrix's diagonal over its total.
    cm = final["test/confusion_matrix"]
    assert sum(map(sum, cm)) == 5 and final["test/accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / 5)
    saved = load_config(run_dir / "config.yaml")
    assert saved.data.augment == load_config(None, ["data.dir=x", *options]).data.augment


def test_batch_colour_equals_torchvision_colour_ops_in_the_drawn_order(real_data):
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from train.data.reader import decode_rgb
    from train.data.transforms import BatchColour

    c = DataConfig(dir="unused", augment=AugmentConfig(color_jitter=0.4))
    crop = v2.Compose([v2.Resize(48), v2.CenterCrop(48)])
    photos = sorted((real_data / "train" / "cat").glob("*.jpg"))[:6]
    # Mid-range pixels (64..149): no op pushes a value out of [0, 1], where torchvision clamps after each op.
    batch = torch.stack([64 + crop(decode_rgb(bytearray(p.read_bytes()))) // 3 for p in photos])
    colour = BatchColour(c)
    torch.manual_seed(0)
    params = torch.stack([colour.draw() for _ in photos])
    assert params.shape == (6, 3) and ((params >= 0.6) & (params <= 1.4)).all() and params.std() > 0.05
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    got = colour(batch, params)
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):  # without clamping they commute: any order ColorJitter draws
        expected = []
        for image, p in zip(batch, params, strict=True):
            v = image.float() / 255
            for op in order:
                v = ops[op](v, float(p[op]))
            expected.append(TF.normalize(v, list(c.mean), list(c.std)))
        torch.testing.assert_close(got, torch.stack(expected), atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, normalise(c)(batch), atol=1e-2)
    # Without jitter parameters it is plain normalisation.
    torch.testing.assert_close(colour(batch), normalise(c)(batch), atol=2e-6, rtol=1e-6)
