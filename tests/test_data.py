"""train/data/ and train/data/transforms.py on small real shards (real photos at 64 px), in one process."""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from data_shards import SHARD_LENGTHS, rewrite_member, tiny_jpegs, write_shards
from PIL import Image

import train.data.reader as data_mod
from data_prep.info import load_info
from train.config import DataConfig
from train.data.order import epoch_order
from train.data.reader import DataError, index_shard
from train.data.streams import TrainStream, eval_loader
from train.data.transforms import eval_transform, normalise, train_augment, train_transform

SIZE = 32  # model input size in these tests: small keeps decode + crop cheap


@pytest.fixture(scope="module")
def photos(real_data):
    return tiny_jpegs(real_data, sum(sum(v) for v in SHARD_LENGTHS.values()))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("shards")
    keys = write_shards(root, photos)
    return root, keys


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        dir=str(root), num_workers=kw.pop("num_workers", 0), shuffle_buffer=kw.pop("shuffle_buffer", 8), **kw
    )


def stream(root: Path, *, rank=0, world_size=1, batch_size=4, seed=0, **kw) -> TrainStream:
    return TrainStream(
        cfg(root, **kw),
        load_info(root),
        split="train",
        batch_size=batch_size,
        image_size=SIZE,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def collect(batches) -> list[tuple]:
    return [tuple(b) for b in batches]


# --- epoch order and batch counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths,world_size,batch_size",
    [
        ([7, 3, 11, 5, 1], 2, 4),  # odd number of uneven shards
        ([27], 3, 2),  # one shard < ranks x workers
        ([1, 1, 25], 2, 5),  # last global batch nearly empty
        ([2, 2], 4, 3),  # fewer samples than one global batch
    ],
)
def test_batches_per_epoch_is_the_same_on_every_rank(tmp_path, photos, lengths, world_size, batch_size):
    write_shards(tmp_path, photos, {"train": lengths})
    n = sum(lengths)
    streams = [stream(tmp_path, rank=r, world_size=world_size, batch_size=batch_size) for r in range(world_size)]
    assert {s.batches_per_epoch for s in streams} == {math.ceil(n / (batch_size * world_size))}
    # And every rank really yields that many full batches, through 2 workers each (more workers than shards).
    for s in streams:
        s.cfg.num_workers = 2
        got = [len(y) for _, y in s.loader(epoch=0)]
        assert got == [batch_size] * s.batches_per_epoch


def test_epoch_is_a_permutation_padded_by_wrapping(shards):
    root, keys = shards
    s = stream(root, world_size=2, batch_size=4)
    n, B = s.num_samples, s.global_batch
    order = s.order(epoch=3)
    assert sorted(order.tolist()) == list(range(n))
    ids = [
        flat
        for t in range(s.batches_per_epoch)
        for r in range(2)
        for _, flat in stream(root, rank=r, world_size=2, batch_size=4).rank_batch(order, t)
    ]
    # Every sample once, then the padding repeats the start of the order.
    assert ids == order.tolist() + order[: s.batches_per_epoch * B - n].tolist()


def test_order_depends_on_seed_and_epoch_and_mixes_shards():
    lengths = [7, 3, 11, 5, 1]
    a = epoch_order(lengths, seed=0, epoch=0, shuffle=True, buffer=8)
    assert np.array_equal(a, epoch_order(lengths, seed=0, epoch=0, shuffle=True, buffer=8))
    assert not np.array_equal(a, epoch_order(lengths, seed=0, epoch=1, shuffle=True, buffer=8))
    assert not np.array_equal(a, epoch_order(lengths, seed=1, epoch=0, shuffle=True, buffer=8))
    assert epoch_order(lengths, seed=0, epoch=0, shuffle=False, buffer=8).tolist() == list(range(27))
    # The buffer interleaves samples from different shards within the first few positions.
    shard_of = np.searchsorted(np.cumsum(lengths), a[:8], side="right")
    assert len(set(shard_of.tolist())) > 1


# --- the same samples whatever the world size, workers or resume --------------------------------------------------


def test_two_ranks_batch_b_equal_one_rank_batch_2b(shards):
    root, _ = shards
    one = collect(stream(root, world_size=1, batch_size=6, seed=5).loader(epoch=1))
    r0 = collect(stream(root, rank=0, world_size=2, batch_size=3, seed=5).loader(epoch=1))
    r1 = collect(stream(root, rank=1, world_size=2, batch_size=3, seed=5).loader(epoch=1))
    assert len(one) == len(r0) == len(r1) == math.ceil(27 / 6)
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1, strict=True):
        assert torch.equal(x, torch.cat([x0, x1]))  # same samples AND same augmentation
        assert torch.equal(y, torch.cat([y0, y1]))


def test_batches_do_not_depend_on_num_workers(shards):
    root, _ = shards
    a = collect(stream(root, num_workers=0).loader(epoch=2))
    b = collect(stream(root, num_workers=2).loader(epoch=2))
    assert len(a) == len(b) == 7
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], collect(stream(root).loader(epoch=3))[0][0])  # a new epoch reshuffles


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_tail_and_decodes_nothing_skipped(shards, workers):
    root, _ = shards
    full = collect(stream(root, num_workers=workers).loader(epoch=1))
    s = stream(root, num_workers=workers)
    tail = s.loader(epoch=1, start_batch=4)
    assert len(tail) == len(full) - 4
    got = collect(tail)
    assert len(got) == len(full) - 4
    for (x, y), (xf, yf) in zip(got, full[4:], strict=True):
        assert torch.equal(x, xf) and torch.equal(y, yf)
    assert s.stats()["decoded"] == 4 * len(got)  # only the resumed batches were decoded


def test_workers_persist_across_epochs_and_each_pass_seeks_its_own_batches(shards):
    """One DataLoader, workers started once, serves every epoch (and a resumed tail, and an epoch cut short):
    each pass yields exactly what a fresh stream yields for it."""
    root, _ = shards
    s = stream(root, num_workers=2)
    passes = [(0, 0, None), (1, 3, None), (2, 0, 2), (3, 0, None)]  # (epoch, start batch, stop after k batches)
    pids = []
    for epoch, start, cut in passes:
        batches = s.loader(epoch, start_batch=start)
        got = []
        for b in batches:
            got.append(b)
            if cut is not None and len(got) == cut:
                break  # e.g. train.max_steps mid-epoch: the next pass must not see this one's leftovers
        loader = s._loaders[False][2]
        pids.append(tuple(w.pid for w in loader._iterator._workers))
        fresh = collect(stream(root, num_workers=0).loader(epoch, start_batch=start))
        assert len(got) == (cut or len(fresh))
        for (x, y), (xf, yf) in zip(got, fresh, strict=False):
            assert torch.equal(x, xf) and torch.equal(y, yf)
    assert len(set(pids)) == 1 and len(pids[0]) == 2  # the same two worker processes served every pass


def test_loader_leaves_the_training_rng_alone(shards):
    root, _ = shards
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    collect(stream(root).loader(epoch=0))
    assert torch.equal(torch.rand(3), expected)


def test_batches_are_normalised_float_nchw_with_int64_labels(shards):
    root, keys = shards
    x, y, k = next(iter(stream(root).loader(epoch=0, with_keys=True)))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert x.min() < 0 < x.max()  # normalised, not [0, 1]
    assert set(k) <= set(keys["train"])


# --- evaluation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,workers,batch_size", [(2, 2, 2), (3, 2, 4), (2, 0, 16)])
def test_eval_sees_every_sample_exactly_once_across_ranks(shards, world_size, workers, batch_size):
    root, keys = shards
    info = load_info(root)
    seen = Counter()
    for r in range(world_size):
        for x, y, k in eval_loader(
            cfg(root, num_workers=workers),
            info,
            split="val",
            batch_size=batch_size,
            image_size=SIZE,
            rank=r,
            world_size=world_size,
            with_keys=True,
        ):
            assert len(x) == len(y) == len(k) <= batch_size
            seen.update(k)
    assert seen == Counter(keys["val"])


def test_eval_agrees_with_webdataset_reader(shards):
    """The shards are plain WebDataset tars: webdataset reads the same keys, labels and pixels, in order."""
    root, keys = shards
    info = load_info(root)
    urls = [str(p) for p in info.shard_paths("val")]
    ref = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls"))
    tf = eval_transform(cfg(root), SIZE)
    ours = [
        (k, x, y)
        for xb, yb, kb in eval_loader(
            cfg(root), info, split="val", batch_size=3, image_size=SIZE, rank=0, world_size=1, with_keys=True
        )
        for k, x, y in zip(kb, xb, yb.tolist(), strict=True)
    ]
    assert [k for k, _, _ in ours] == [k for k, _, _ in ref] == keys["val"]
    assert [y for _, _, y in ours] == [c for _, _, c in ref]
    for (_, x, _), (_, im, _) in zip(ours, ref, strict=True):
        # Different JPEG decoders (libjpeg-turbo via torchvision vs Pillow) may differ by a grey level.
        assert (x - tf(im)).abs().max() < 0.1


def test_eval_is_deterministic(shards):
    root, _ = shards
    info = load_info(root)
    a = [x for x, _ in eval_loader(cfg(root), info, split="val", batch_size=4, image_size=SIZE, rank=0, world_size=1)]
    b = [
        x
        for x, _ in eval_loader(
            cfg(root, num_workers=2), info, split="val", batch_size=4, image_size=SIZE, rank=0, world_size=1
        )
    ]
    assert len(a) == 3 and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_eval_of_an_empty_split_yields_nothing(shards):
    root, _ = shards
    got = eval_loader(cfg(root), load_info(root), split="test", batch_size=4, image_size=SIZE, rank=0, world_size=2)
    assert len(got) == 0 and list(got) == []


# --- corrupt data ------------------------------------------------------------------------------------------------------


@pytest.fixture
def corrupt_shards(tmp_path, photos):
    """Train shards with: an undecodable JPEG, a non-integer .cls, a missing .cls, and a truncated shard."""
    keys = write_shards(tmp_path, photos)
    rewrite_member(tmp_path / "train-000000.tar", "train_00_002", "jpg", b"\xff\xd8 not really a jpeg")
    rewrite_member(tmp_path / "train-000001.tar", "train_01_000", "cls", b"dog")
    rewrite_member(tmp_path / "train-000002.tar", "train_02_005", "cls", None)
    # Cut the 1-sample shard to its first header: the reader sees no complete sample in it.
    last = tmp_path / "train-000004.tar"
    last.write_bytes(last.read_bytes()[:700])
    bad = {"train_00_002", "train_01_000", "train_02_005", "train_04_000"}
    return tmp_path, keys, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_counted_and_batches_stay_full(corrupt_shards, workers):
    root, keys, bad = corrupt_shards
    s = stream(root, num_workers=workers, batch_size=5)
    batches = collect(s.loader(epoch=0, with_keys=True))
    assert [len(x) for x, _, _ in batches] == [5] * s.batches_per_epoch == [5] * 6
    seen = Counter(k for _, _, ks in batches for k in ks)
    assert not bad & set(seen)
    assert set(keys["train"]) - bad <= set(seen)
    # Every corrupt sample was met once (the 3 padding samples are repeats; count them too if corrupt).
    order = s.order(0).tolist()
    flat_keys = [k for k in keys["train"]]
    padded = order + order[: 6 * 5 - 27]
    expected = sum(flat_keys[i] in bad for i in padded)
    stats = s.stats()
    assert stats["corrupt_skipped"] == expected >= 4
    assert sum(stats["corrupt_by_shard"].values()) == expected
    assert set(stats["corrupt_by_shard"]) == {
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train-000004.tar",
    }


def test_pillow_fallback_decodes_like_torchvision_and_skips_the_same_corrupt_samples(
    corrupt_shards, photos, monkeypatch
):
    """A torchvision without image codecs (deprecated since 0.29, no upper bound in pyproject) still trains."""
    native = [data_mod.decode_rgb(bytearray(jpg)) for jpg, _, _ in photos[:4]]
    monkeypatch.setattr(data_mod, "_tv_decode_jpeg", None)
    for jpg, t in zip((p[0] for p in photos[:4]), native, strict=False):
        pil = data_mod.decode_rgb(bytearray(jpg))
        assert pil.shape == t.shape and pil.dtype == torch.uint8 and pil.shape[0] == 3
        assert (pil.float() - t.float()).abs().mean() < 1.0  # the same libjpeg-turbo decode, up to its build
    root, keys, bad = corrupt_shards
    s = stream(root, num_workers=0, batch_size=5)
    seen = {k for _, _, ks in collect(s.loader(epoch=0, with_keys=True)) for k in ks}
    assert not bad & seen and set(keys["train"]) - bad <= seen
    assert s.stats()["corrupt_by_shard"]["train-000000.tar"] >= 1  # the undecodable JPEG, caught from Pillow


def test_corrupt_samples_are_dropped_from_eval(tmp_path, photos):
    keys = write_shards(tmp_path, photos)
    rewrite_member(tmp_path / "val-000001.tar", "val_01_001", "jpg", b"garbage")
    info = load_info(tmp_path)
    got = [
        k
        for _, _, ks in eval_loader(
            cfg(tmp_path), info, split="val", batch_size=4, image_size=SIZE, rank=0, world_size=1, with_keys=True
        )
        for k in ks
    ]
    assert got == [k for k in keys["val"] if k != "val_01_001"]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_sample_raises_naming_shard_and_key(corrupt_shards, workers):
    root, _, _ = corrupt_shards
    s = stream(root, num_workers=workers, on_error="raise", shuffle=False)
    with pytest.raises(DataError, match=r"train-000000\.tar.*train_00_002.*cannot be decoded"):
        collect(s.loader(epoch=0))


def test_missing_shard_is_reported_by_name(tmp_path, photos):
    write_shards(tmp_path, photos)
    (tmp_path / "train-000003.tar").unlink()
    s = stream(tmp_path, on_error="raise", shuffle=False)
    with pytest.raises(DataError, match=r"train-000003\.tar.*cannot open shard"):
        collect(s.loader(epoch=0))
    s = stream(tmp_path, batch_size=27)
    assert [len(y) for _, y in s.loader(epoch=0)] == [27]
    assert s.stats()["corrupt_by_shard"] == {"train-000003.tar": 5}


def test_a_batch_with_no_valid_sample_borrows_from_the_epoch(tmp_path, photos):
    write_shards(tmp_path, photos, {"train": [1, 2]})
    rewrite_member(tmp_path / "train-000000.tar", "train_00_000", "jpg", b"garbage")
    s = stream(tmp_path, batch_size=1, shuffle=False)
    got = [k for _, _, ks in s.loader(epoch=0, with_keys=True) for k in ks]
    assert got == ["train_01_000", "train_01_000", "train_01_001"]
    assert s.stats()["corrupt_skipped"] == 1


# --- transforms ----------------------------------------------------------------------------------------------------


def test_transforms_accept_tensors_and_pil_and_crop_to_size(photos):
    jpg = photos[0][0]
    tensor = data_mod.decode_rgb(bytearray(jpg))
    pil = Image.open(io.BytesIO(jpg))
    c = DataConfig(dir="unused")
    for tf in (train_transform(c, 48), eval_transform(c, 48)):
        for im in (tensor, pil):
            out = tf(im)
            assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert torch.equal(eval_transform(c, 48)(tensor), eval_transform(c, 48)(tensor))


def test_color_jitter_is_optional():
    c = DataConfig(dir="unused")
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert "ColorJitter" in names(train_augment(c, 32))
    c.augment.color_jitter = 0.0
    assert "ColorJitter" not in names(train_augment(c, 32))
    assert names(train_augment(c, 32))[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]


def test_batched_normalisation_matches_the_per_image_pipeline(photos):
    """The loader augments per image and normalises per batch; that equals the per-image train_transform."""
    c = DataConfig(dir="unused")
    images = [data_mod.decode_rgb(bytearray(jpg)) for jpg, _, _ in photos[:4]]
    torch.manual_seed(7)
    per_image = torch.stack([train_transform(c, 40)(im) for im in images])
    torch.manual_seed(7)
    batched = normalise(c)(torch.stack([train_augment(c, 40)(im) for im in images]))
    torch.testing.assert_close(batched, per_image)


def test_shard_copy_with_other_mtime_is_reindexed(shards, tmp_path):
    """The member index cache is keyed by size+mtime: a rewritten shard is not read with a stale index."""
    root, keys = shards
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    s = stream(copy, batch_size=27, shuffle=False)
    assert [len(y) for _, y in s.loader(epoch=0)] == [27]
    rewrite_member(
        copy / "train-000000.tar", "train_00_000", "json", b'{"src": "a much longer json value than before"}'
    )
    assert [len(y) for _, y in s.loader(epoch=0)] == [27]
    assert s.stats()["corrupt_skipped"] == 0


# --- shards written by catdog-prep ------------------------------------------------------------------------------------


def test_reads_shards_written_by_catdog_prep(tmp_path, real_data):
    """The real writer's output: every val key once across ranks, full train batches on every rank."""
    src = tmp_path / "src"
    for split, n in (("train", 7), ("val", 5)):
        for cls in ("cat", "dog"):
            (src / split / cls).mkdir(parents=True)
            for f in sorted((real_data / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(f, src / split / cls / f.name)
    out = tmp_path / "shards"
    prep = Path(sys.executable).with_name("catdog-prep")
    cmd = [
        str(prep),
        str(src),
        str(out),
        "--image-size",
        "48",
        "--shard-max-count",
        "3",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = load_info(out)
    val_keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in info.shard_paths("val")], shardshuffle=False)]
    assert len(val_keys) == 10 and len(info.split("train").filenames) == 5  # 14 train samples, 3 per shard
    seen = Counter()
    for r in range(2):
        for _, y, k in eval_loader(
            cfg(out, num_workers=2),
            info,
            split="val",
            batch_size=2,
            image_size=SIZE,
            rank=r,
            world_size=2,
            with_keys=True,
        ):
            assert set(y.tolist()) <= {0, 1}
            seen.update(k)
    assert seen == Counter(val_keys)
    for r in range(2):
        s = TrainStream(
            cfg(out, num_workers=2), info, split="train", batch_size=3, image_size=SIZE, rank=r, world_size=2, seed=0
        )
        assert [len(y) for _, y in s.loader(epoch=0)] == [3, 3, 3]
        assert s.stats()["corrupt_skipped"] == 0


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_member_index_matches_tarfile_for_every_tar_format(tmp_path, photos, fmt):
    """The fast header scan agrees with tarfile on ustar, pax (long paths) and GNU (long-name records) tars."""
    path = tmp_path / "x.tar"
    deep = "d" * 90 + "/" + "e" * 60  # > 100 chars: ustar prefix field, pax path record, GNU long name
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, (jpg, cls, _) in enumerate(photos[:3]):
            for ext, data in (("jpg", jpg), ("cls", str(cls).encode())):
                info = tarfile.TarInfo(f"{deep}/s{i}.{ext}")
                info.size, info.mtime = len(data), 1.5  # a float mtime makes the pax writer add records
                tf.addfile(info, io.BytesIO(data))
    index = index_shard(path)
    assert index.error == ""
    assert index.keys == tuple(f"{deep}/s{i}" for i in range(3))
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".")
            offset, size = index.members[key][ext]
            assert (offset, size) == (m.offset_data, m.size)


def test_reads_survive_short_reads_and_a_stale_descriptor(tmp_path, real_data, monkeypatch):
    """MOCKED network filesystem (none here): preadv returning a few bytes at a time, and an NFS-style ESTALE on a
    descriptor kept open. Every sample still decodes; the failed descriptor is replaced, not reused."""
    import errno
    import os

    write_shards(tmp_path, tiny_jpegs(real_data, 6), {"train": [6]})
    info = load_info(tmp_path)
    reader = data_mod.ShardReader([index_shard(p) for p in info.shard_paths("train")], info.num_classes)
    expected = [reader.load(0, i) for i in range(6)]
    real_preadv, real_open, calls, opened = os.preadv, os.open, [], []

    def network_fs(fd, buffers, offset):
        calls.append(fd)
        if len(calls) == 1:  # the descriptor kept open since the reads above went stale
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_preadv(fd, [memoryview(buffers[0])[:100]], offset)  # at most 100 bytes a call

    monkeypatch.setattr(os, "preadv", network_fs)
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for i, (image, label) in enumerate(expected):
        got, got_label = reader.load(0, i)
        assert torch.equal(got, image) and got_label == label
    assert len(opened) == 1 and len(calls) > 12  # the shard opened again once, then read 100 bytes at a time
    reader.close()
