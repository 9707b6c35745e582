"""Training and evaluation batches from shards at a URL, against the real S3 server (SeaweedFS) on 127.0.0.1: the same
batches in the same order as from the same shards on a local disk (resume included), one download per shard per
node, a bounded cache, a replaced or damaged object counted like a corrupt local shard, transient faults and a store
restarting mid-epoch retried, and a wrong key, endpoint or URL refused at start-up in one line."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from data_shards import tiny_jpegs, write_shards
from prep_helpers import make_tree
from s3_faults import FaultProxy
from s3_server import SeaweedFS

from data_prep import storage
from data_prep.info import INFO_NAME, load_info
from data_prep.prepare import PrepArgs, run
from data_prep.storage import s3
from launch.__main__ import main as launch_main
from train.__main__ import cli as train_cli
from train.config import ConfigError, DataConfig
from train.config_io import load_config
from train.data.reader import DataError
from train.data.streams import TrainStream, eval_loader
from train.run.feature_cache import cache_key


@pytest.fixture(scope="module")
def shards(real_data: Path, tmp_path_factory) -> Path:
    """Real catdog-prep shards (sha256s in _info.json, a member index beside each shard): 32 train photos in
    shards of 6, val and test."""
    tmp = tmp_path_factory.mktemp("remote")
    src = make_tree(real_data, tmp / "src", 20, short_side=48)
    out = tmp / "shards"
    run(PrepArgs(src=src, out=out, image_size=32, shard_max_count=6, workers=1, progress=False), log=lambda _: None)
    return out


def upload(folder: Path, url: str) -> str:
    for p in sorted(folder.iterdir()):
        storage.upload(p, f"{url}/{p.name}")
    return url


def stream(data: str | Path, cache: Path, **kw) -> TrainStream:
    settings = {"num_workers": 2, "shuffle_buffer": 8, "cache_dir": str(cache), **kw}
    cfg = DataConfig(dir=str(data), **settings)
    return TrainStream(cfg, load_info(data), split="train", batch_size=4, image_size=32, rank=0, world_size=1, seed=7)


def epochs(ts: TrainStream) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Epoch 0, then epoch 1 resumed at batch 3: what a run and its resume read."""
    out = [(x.clone(), y.clone(), k) for x, y, k in ts.loader(0, with_keys=True)]
    return out + [(x.clone(), y.clone(), k) for x, y, k in ts.loader(1, 3, with_keys=True)]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya, ka), (xb, yb, kb) in zip(a, b, strict=True):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def cached(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (cache / "shards").glob("*.tar")}


# ----------------------------------------------------------------------------------------------- same batches


@pytest.mark.parametrize("scheme", ["s3", "https"])
def test_batches_from_a_url_are_those_of_the_local_shards(shards, s3_prefix, s3_env, tmp_path, scheme):
    url = upload(shards, s3_prefix)
    if scheme == "https":  # a plain web server with Range support: SeaweedFS's filer port serves the bucket's files
        key = s3_prefix.split("/", 3)[3]
        url = f"http://127.0.0.1:{s3_env.ports['filer']}/buckets/{s3_env.bucket}/{key}"
    local = stream(shards, tmp_path / "unused")
    remote = stream(url, tmp_path / "cache", num_workers=2 if scheme == "s3" else 0)
    assert_same(epochs(remote), epochs(local))
    assert remote.stats() == local.stats() and remote.stats()["corrupt_skipped"] == 0
    info = load_info(url)
    cfg = DataConfig(dir=url, num_workers=1, cache_dir=str(tmp_path / "cache"))
    kw = {"split": "val", "batch_size": 3, "image_size": 32, "rank": 0, "world_size": 1, "with_keys": True}
    got = [(k, y.tolist()) for _, y, k in eval_loader(cfg, info, **kw)]
    assert got == [(k, y.tolist()) for _, y, k in eval_loader(DataConfig(dir=str(shards)), load_info(shards), **kw)]
    # The copies in the cache are the shards, named by their sha256 in _info.json.
    recorded = info.raw["shards"]
    assert set(cached(tmp_path / "cache")) == {f"{recorded[f]['sha256']}.tar" for f in (*info.splits["train"].filenames,
                                                                                        *info.splits["val"].filenames)}  # fmt: skip


def test_shards_without_recorded_sha256s_or_indexes(real_data, s3_prefix, s3_env, tmp_path):
    """Shards written by another tool (webdataset's TarWriter; no sha256s in _info.json, no member index): keyed
    by ETag and size, downloaded and scanned at start-up; the same batches."""
    local = tmp_path / "wds"
    write_shards(local, tiny_jpegs(real_data, 38, size=32))
    bucket, key = s3_prefix.removeprefix("s3://").split("/", 1)
    for p in local.iterdir():  # as another tool uploads: no sha256 stored with the objects
        s3.client()[0].put_object(Bucket=bucket, Key=f"{key}/{p.name}", Body=p.read_bytes())
    url = s3_prefix
    assert_same(epochs(stream(url, tmp_path / "cache")), epochs(stream(local, tmp_path / "unused")))
    assert all(name.startswith("etag-") for name in cached(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------- the cache


def _read_epoch(url: str, cache: str, env: dict, done) -> None:
    os.environ.update(env)
    done.put(len(list(stream(url, Path(cache), num_workers=2, prefetch_shards=2).loader(0))))


def test_each_shard_is_downloaded_once_per_node(shards, s3_prefix, s3_env, tmp_path, monkeypatch):
    """Two processes (ranks), two DataLoader workers each, prefetching: every shard crosses the network once."""
    url = upload(shards, s3_prefix)
    with FaultProxy(s3_env.ports["s3"]) as proxy:
        env = {**s3_env.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
        ctx = multiprocessing.get_context("fork")
        done = ctx.Queue()
        procs = [ctx.Process(target=_read_epoch, args=(url, str(tmp_path / "cache"), env, done)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
        assert all(p.exitcode == 0 for p in procs)
        assert [done.get(timeout=5) for _ in procs] == [8, 8]
        gets = [path for method, path, _ in proxy.log if method == "GET" and path.endswith(".tar")]
    train = load_info(shards).splits["train"].filenames
    assert sorted(Path(p).name for p in gets) == sorted(train)


def test_the_cache_keeps_to_its_size(shards, s3_prefix, s3_env, tmp_path):
    url = upload(shards, s3_prefix)
    sizes = sorted(p.stat().st_size for p in shards.glob("train-*.tar"))
    limit = sizes[-1] * 2 + sizes[0] // 2  # two shards fit, never three
    ts = stream(url, tmp_path / "cache", num_workers=0, cache_size=str(limit), shuffle=False)
    assert_same(epochs(ts), epochs(stream(shards, tmp_path / "unused", num_workers=0, shuffle=False)))
    assert 0 < sum(cached(tmp_path / "cache").values()) <= limit and len(cached(tmp_path / "cache")) <= 2


# ----------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize("damage", ["one byte changed", "truncated"])
def test_a_replaced_or_damaged_object_counts_as_a_corrupt_shard(shards, s3_prefix, s3_env, tmp_path, damage):
    url = upload(shards, s3_prefix)
    info = load_info(shards)
    name = info.splits["train"].filenames[1]
    data = bytearray((shards / name).read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    storage.write_bytes(f"{url}/{name}", bytes(data))  # the object changes, _info.json does not
    ts = stream(url, tmp_path / "cache")
    batches = list(ts.loader(0))
    stats = ts.stats()
    n = info.splits["train"].shard_lengths[1]
    assert len(batches) == ts.batches_per_epoch and stats["corrupt_by_shard"] == {name: n}
    bad = hashlib.sha256((shards / name).read_bytes()).hexdigest()
    assert f"{bad}.tar" not in cached(tmp_path / "cache")  # never stored under the sha it does not have
    strict = stream(url, tmp_path / "cache", on_error="raise")
    with pytest.raises(DataError, match=f"{name}.*(sha256 differs|bytes where _info.json records)"):
        list(strict.loader(0))


def test_transient_faults_while_downloading_are_retried(shards, s3_prefix, s3_env, tmp_path, monkeypatch, caplog):
    url = upload(shards, s3_prefix)
    with FaultProxy(s3_env.ports["s3"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("CATDOG_STORAGE_TIMEOUT_S", "3")
        ts = stream(url, tmp_path / "cache", num_workers=0, prefetch_shards=0)
        ts.loader(0)  # reads the member indexes: the faults below hit the shards' downloads (a HEAD and a GET each)
        faults = ["503", ("cut_response", 2_000), "reset", ("stall", 5), "503"]
        proxy.add(faults[0], None, *faults[1:])  # the HEAD fails once, then its GET four times
        got = epochs(ts)
        assert proxy.pending() == 0
    assert_same(got, epochs(stream(shards, tmp_path / "unused", num_workers=0)))
    retried = [r.getMessage() for r in caplog.records if r.name.startswith("catdog") and "retry" in r.getMessage()]
    assert len(retried) >= len(faults) and all(".tar:" in m for m in retried), retried


@pytest.mark.slow
def test_an_epoch_goes_on_while_the_store_restarts(shards, tmp_path, monkeypatch):
    """The store is killed mid-epoch and comes back on the same address: the DataLoader worker waiting for a shard
    retries until it is back, and the epoch's batches are the local ones."""
    with SeaweedFS(tmp_path / "s3") as server:
        for var, value in server.env().items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        url = upload(shards, server.url("shards"))
        ts = stream(url, tmp_path / "cache", num_workers=1, prefetch_shards=0, shuffle=False)
        got = []
        for x, y, k in ts.loader(0, with_keys=True):
            got.append((x.clone(), y.clone(), k))
            if len(got) == 1:  # the worker has read a shard or two, and needs four more
                server.kill()
                time.sleep(1.0)
                server.restart()  # while the worker retries
    local = stream(shards, tmp_path / "unused", num_workers=1, shuffle=False)
    assert_same(got, [(x.clone(), y.clone(), k) for x, y, k in local.loader(0, with_keys=True)])


# ----------------------------------------------------------------------------------------------- start-up errors


def one_line(capsys, code: int) -> str:
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("catdog-train: "), out.err
    return lines[0]


def test_start_up_errors_are_one_line_naming_the_url(shards, s3_prefix, s3_env, tmp_path, monkeypatch, capsys, port):
    url = upload(shards, s3_prefix)
    base = [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "track.backends=[csv]"]
    missing = one_line(capsys, train_cli([*base, f"data.dir={url}/nothing-here"]))
    assert f"{url}/nothing-here/{INFO_NAME}" in missing and "no such object" in missing
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-0123456789")
    denied = one_line(capsys, train_cli([*base, f"data.dir={url}"]))
    assert "SignatureDoesNotMatch" in denied and "AWS_SECRET_ACCESS_KEY" in denied and url in denied
    assert "wrong-secret-key-0123456789" not in denied and s3_env.access_key not in denied
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # a free port: nothing listens there
    unreachable = one_line(capsys, train_cli([*base, f"data.dir={url}"]))
    assert f"cannot reach http://127.0.0.1:{port}" in unreachable and "AWS_ENDPOINT_URL" in unreachable
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unsupported_schemes_are_refused_and_make_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_line(capsys, train_cli(["data.dir=foo://bucket/shards", f"run.dir={tmp_path / 'run'}"]))
    assert "foo://bucket/shards" in line and "unsupported URL scheme foo://" in line
    line = one_line(capsys, train_cli(["data.dir=s3://KEY:SECRETSECRET@bucket/x", f"run.dir={tmp_path / 'run'}"]))
    assert "credentials do not go in an s3:// URL" in line and "SECRETSECRET" not in line
    assert list(tmp_path.iterdir()) == []


def test_launch_checks_the_store_at_submission(shards, s3_prefix, s3_env, tmp_path, capsys):
    """catdog-launch slurm: a missing _info.json, a shard the key may not read (here: gone) or a wrong key is one
    line and exit 2 when the job is submitted, before SLURM is asked anything (no cluster needed to fail)."""
    url = upload(shards, s3_prefix)
    first = load_info(shards).splits["train"].filenames[0]
    storage.remove(f"{url}/{first}")
    base = ["slurm", "--config", str(Path(__file__).parents[1] / "configs" / "debug_cpu.yaml"), f"run.dir={tmp_path}/r"]
    cases = [
        (f"{url}/nothing", f"{url}/nothing/{INFO_NAME}: no such object", {}),
        (url, f"{url}/{first}: no such object", {}),
        (url, "SignatureDoesNotMatch", {"AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0123"}),
    ]
    for data, says, env in cases:
        with pytest.MonkeyPatch.context() as mp:
            for var, value in env.items():
                mp.setenv(var, value)
            assert launch_main([*base, f"data.dir={data}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("catdog-launch: error: ") and says in err[0], err
    assert not (tmp_path / "r").exists()


def test_the_cache_settings_are_checked_when_the_config_loads():
    for override, says in (
        ("data.cache_size=lots", "data.cache_size='lots': use auto or a size"),
        ("data.prefetch_shards=-1", "data.prefetch_shards=-1: use 0 (none) or N >= 1"),
        ("data.dir=https://me:hunter2hunter2@example.org/shards", "a user:password in data.dir would be saved"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)) as e:
            load_config(None, ["data.dir=s3://bucket/shards", override])
        assert "hunter2" not in str(e.value)
    assert load_config(None, ["data.dir=s3://b/x", "data.cache_size=20GiB"]).data.cache_bytes() == 20 * 2**30


def test_the_feature_cache_key_of_remote_shards_is_the_local_one(shards, s3_prefix, s3_env, monkeypatch):
    """The same shards local or remote share their cached features, and nothing is downloaded to compute the key."""
    url = upload(shards, s3_prefix)
    configs = Path(__file__).parents[1] / "configs" / "inception_v3.yaml"
    cfg = load_config(configs, [f"data.dir={url}"])
    with FaultProxy(s3_env.ports["s3"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        key, inputs = cache_key(cfg, load_info(url), "train", bf16=False)
        assert [m for m, _, _ in proxy.log] == ["GET"]  # _info.json only
    assert (key, inputs) == cache_key(cfg, load_info(shards), "train", bf16=False)
