"""The storage layer against a real S3 server (SeaweedFS on 127.0.0.1, keys enforced): what a user relies on when
shards live in a bucket -- round trips, ranged reads, listings, atomic writes, one-line errors without credentials,
and transient failures retried (faults injected by a proxy in front of the real server)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import random
import threading
import time

import boto3
import pytest
from s3_faults import FaultProxy
from s3_server import SeaweedFS

from data_prep import storage
from data_prep.storage import StorageError
from data_prep.storage import s3 as s3_backend

MB = 1 << 20
# Each fault breaks one request; the stall outlasts the 3 s read timeout the tests set.
READ_FAULTS = ["reset", "503", ("cut_response", 100), ("stall", 6)]
WRITE_FAULTS = ["reset", "503", ("cut_request", 1_000), ("stall", 6)]


def _direct(server):
    """A plain boto3 client straight to the server (not through the code under test), to check what it holds."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )


def _key(url: str) -> str:
    return url.split("/", 3)[3]


def assert_clean(message: str, server) -> None:
    """One line, and no credential in it."""
    assert "\n" not in message
    assert server.access_key not in message and server.secret_key not in message


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """A fault-injecting proxy in front of the server; the AWS variables point at it. Short timeouts and budgets
    keep the failing cases quick; the retried ones still have ample time (a loaded CI machine)."""
    with FaultProxy(s3_env.ports["s3"]) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        monkeypatch.setenv("CATDOG_STORAGE_TIMEOUT_S", "3")
        yield p


# ----------------------------------------------------------------------------------------------- what works


def test_round_trip_stat_list_and_remove(s3_prefix, s3_env):
    data = os.urandom(300_000)
    storage.write_bytes(f"{s3_prefix}/shards/train-000000.tar", data)
    storage.write_bytes(f"{s3_prefix}/shards/_info.json", b"{}")
    storage.write_bytes(f"{s3_prefix}/shards/sub/other.tar", b"not listed")  # in a sub-folder
    storage.write_bytes(f"{s3_prefix}/shards-old/x.tar", b"not listed")  # a sibling prefix sharing the start

    assert storage.read_bytes(f"{s3_prefix}/shards/train-000000.tar") == data
    info = storage.stat(f"{s3_prefix}/shards/train-000000.tar")
    assert info.size == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.list_dir(f"{s3_prefix}/shards") == {"_info.json": 2, "train-000000.tar": len(data)}
    assert storage.list_dir(f"{s3_prefix}/shards/") == storage.list_dir(f"{s3_prefix}/shards")
    assert storage.list_dir(f"{s3_prefix}/nothing") == {}
    assert storage.exists(f"{s3_prefix}/shards/_info.json")
    assert not storage.exists(f"{s3_prefix}/shards/_info.jso")

    storage.write_bytes(f"{s3_prefix}/shards/_info.json", b'{"v": 2}')  # overwrite
    assert storage.read_bytes(f"{s3_prefix}/shards/_info.json") == b'{"v": 2}'
    storage.remove(f"{s3_prefix}/shards/_info.json")
    assert not storage.exists(f"{s3_prefix}/shards/_info.json")


def test_list_pages_through_more_than_one_listing(s3_prefix, s3_env):
    # S3 returns at most 1,000 keys per listing: a dataset of many shards needs the continuation pages.
    direct = _direct(s3_env)
    names = [f"train-{i:06d}.tar" for i in range(1_005)]
    for name in names:
        direct.put_object(Bucket=s3_env.bucket, Key=f"{_key(s3_prefix)}/{name}", Body=b"x")
    assert list(storage.list_dir(s3_prefix)) == names


def test_ranged_reads_match_the_bytes(s3_prefix, s3_env):
    data = os.urandom(2 * MB + 123)
    url = f"{s3_prefix}/shard.tar"
    storage.write_bytes(url, data)
    rng = random.Random(0)
    for _ in range(20):
        size = rng.randrange(1, 100_000)
        offset = rng.randrange(0, len(data) - size)
        assert storage.read_range(url, offset, size) == data[offset : offset + size]
    assert storage.read_range(url, len(data) - 10, 100) == data[-10:]  # short at the end, as pread
    assert storage.read_range(url, len(data) + 5, 100) == b""  # past the end: empty, as pread
    assert storage.read_range(url, 0, 0) == b""


def test_multipart_upload_and_download(s3_prefix, s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr(s3_backend, "MULTIPART_THRESHOLD", 6 * MB)  # parts of 5 MiB, S3's smallest
    monkeypatch.setattr(s3_backend, "PART_SIZE", 5 * MB)
    src = tmp_path / "big.tar"
    src.write_bytes(os.urandom(12 * MB + 7))
    storage.upload(src, f"{s3_prefix}/big.tar")
    info = storage.stat(f"{s3_prefix}/big.tar")
    assert info.etag.strip('"').endswith("-3")  # really three parts
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "big.tar"
    assert storage.download(f"{s3_prefix}/big.tar", dest) == src.stat().st_size
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["big.tar"]  # no temp file left


def _read_in_child(url: str, q) -> None:
    inherited = s3_backend._clients[s3_backend._env_key()][0]  # the parent's client, copied by fork
    mine = s3_backend.client()[0]
    q.put((mine is not inherited, storage.read_range(url, 10, 5)))


def test_a_forked_process_makes_its_own_client(s3_prefix, s3_env):
    url = f"{s3_prefix}/x.bin"
    storage.write_bytes(url, bytes(range(100)))  # the parent has a client with pooled connections
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(url, q))
    p.start()
    own_client, data = q.get(timeout=120)
    p.join(60)
    assert own_client and data == bytes(range(10, 15))
    assert storage.read_range(url, 0, 3) == bytes(range(3))  # the parent's client still works


class _Ranges:
    """A map-style dataset reading spans of one object, as the shard reader reads members."""

    def __init__(self, url: str, spans: list[tuple[int, int]]):
        self.url, self.spans = url, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> bytes:
        return storage.read_range(self.url, *self.spans[i])


def test_dataloader_workers_read_ranges(s3_prefix, s3_env):
    torch = pytest.importorskip("torch")
    data = os.urandom(MB)
    url = f"{s3_prefix}/shard.tar"
    storage.write_bytes(url, data)
    spans = [(i * 10_000, 5_000) for i in range(40)]
    loader = torch.utils.data.DataLoader(_Ranges(url, spans), batch_size=None, num_workers=2)
    got = list(loader)
    assert got == [data[o : o + n] for o, n in spans]


def test_reads_over_http(s3_prefix, s3_env):
    # A plain web server with Range support (SeaweedFS's filer port serves the bucket's files), read-only.
    data = os.urandom(200_000)
    storage.write_bytes(f"{s3_prefix}/shard.tar", data)
    base = f"http://127.0.0.1:{s3_env.ports['filer']}/buckets/{s3_env.bucket}/{_key(s3_prefix)}"
    assert storage.read_bytes(f"{base}/shard.tar") == data
    assert storage.read_range(f"{base}/shard.tar", 1_000, 500) == data[1_000:1_500]
    assert storage.read_range(f"{base}/shard.tar", len(data) + 1, 5) == b""
    assert storage.stat(f"{base}/shard.tar").size == len(data)
    with pytest.raises(StorageError) as e:
        storage.read_bytes(f"{base}/missing.tar")
    assert e.value.kind == storage.NOT_FOUND and str(e.value).startswith(f"{base}/missing.tar: ")


def test_http_faults_are_retried_and_downloads_resume(s3_prefix, s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("CATDOG_STORAGE_TIMEOUT_S", "3")
    data = os.urandom(3 * MB)
    storage.write_bytes(f"{s3_prefix}/shard.tar", data)
    with FaultProxy(s3_env.ports["filer"]) as proxy:
        url = f"{proxy.endpoint}/buckets/{s3_env.bucket}/{_key(s3_prefix)}/shard.tar"
        proxy.add(*READ_FAULTS)
        assert storage.read_range(url, 5_000, 20_000) == data[5_000:25_000]
        proxy.add(None, ("cut_response", MB))  # HEAD, then the GET is cut after 1 MB
        assert storage.download(url, tmp_path / "shard.tar") == len(data)
        assert (tmp_path / "shard.tar").read_bytes() == data
        assert proxy.pending() == 0
        ranges = [r for m, _, r in proxy.log if m == "GET"][-2:]
        assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != f"bytes=0-{len(data) - 1}"


# ----------------------------------------------------------------------------------------------- errors to fix


def test_missing_object_and_bucket_are_one_line(s3_prefix, s3_env):
    for call in (
        lambda: storage.read_bytes(f"{s3_prefix}/_info.json"),
        lambda: storage.read_range(f"{s3_prefix}/train-000000.tar", 0, 10),
        lambda: storage.stat(f"{s3_prefix}/_info.json"),
    ):
        with pytest.raises(StorageError) as e:
            call()
        assert e.value.kind == storage.NOT_FOUND
        assert str(e.value).startswith(s3_prefix) and "check the URL" in str(e.value)
        assert_clean(str(e.value), s3_env)
    with pytest.raises(StorageError) as e:
        storage.read_bytes("s3://no-such-bucket-here/shards/_info.json")
    assert e.value.kind == storage.NOT_FOUND and "bucket 'no-such-bucket-here' does not exist" in str(e.value)
    assert_clean(str(e.value), s3_env)


@pytest.mark.parametrize(
    ("var", "value", "names"),
    [
        ("AWS_SECRET_ACCESS_KEY", "a-wrong-secret-key-of-some-length", "AWS_SECRET_ACCESS_KEY"),
        ("AWS_ACCESS_KEY_ID", "CATDOGUNKNOWNKEY0001", "AWS_ACCESS_KEY_ID"),
    ],
)
def test_wrong_key_is_a_clear_error(s3_prefix, s3_env, monkeypatch, caplog, var, value, names):
    storage.write_bytes(f"{s3_prefix}/_info.json", b"{}")
    good_key, good_secret = s3_env.access_key, s3_env.secret_key
    monkeypatch.setenv(var, value)
    caplog.set_level(logging.DEBUG, logger="catdog")
    for call in (
        lambda: storage.read_bytes(f"{s3_prefix}/_info.json"),
        lambda: storage.stat(f"{s3_prefix}/_info.json"),
        lambda: storage.list_dir(s3_prefix),
        lambda: storage.write_bytes(f"{s3_prefix}/x", b"x"),
    ):
        with pytest.raises(StorageError) as e:
            call()
        msg = str(e.value)
        assert e.value.kind == storage.DENIED, msg
        assert msg.startswith(s3_prefix) and names in msg
        for secret in (good_key, good_secret, value):
            assert secret not in msg
        assert "\n" not in msg
    for secret in (good_key, good_secret, value):
        assert secret not in caplog.text


def test_no_credentials_says_which_variables(s3_prefix, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError) as e:
        storage.read_bytes(f"{s3_prefix}/_info.json")
    assert e.value.kind == storage.CONFIG and "AWS_ACCESS_KEY_ID" in str(e.value) and "AWS_PROFILE" in str(e.value)


def test_profile_from_aws_files(s3_prefix, s3_env, monkeypatch, tmp_path):
    # Credentials and endpoint from ~/.aws-style files and AWS_PROFILE only, as on a cluster login node.
    storage.write_bytes(f"{s3_prefix}/_info.json", b"{}")
    config, creds = tmp_path / "config", tmp_path / "credentials"
    config.write_text(f"[profile shards]\nregion = {s3_env.region}\nendpoint_url = {s3_env.endpoint}\n")
    creds.write_text(
        f"[shards]\naws_access_key_id = {s3_env.access_key}\naws_secret_access_key = {s3_env.secret_key}\n"
    )
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "shards")
    assert storage.read_bytes(f"{s3_prefix}/_info.json") == b"{}"
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StorageError) as e:
        storage.read_bytes(f"{s3_prefix}/_info.json")
    assert e.value.kind == storage.CONFIG and "no-such-profile" in str(e.value)
    assert_clean(str(e.value), s3_env)


def test_wrong_endpoint_is_reported_in_seconds(s3_prefix, s3_env, monkeypatch):
    closed = FaultProxy(s3_env.ports["s3"])  # take a free port, then close it: nothing listens there
    closed.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed.endpoint)
    with pytest.raises(StorageError) as e:
        storage.read_bytes(f"{s3_prefix}/_info.json")
    msg = str(e.value)
    assert e.value.kind == storage.UNREACHABLE
    assert msg.startswith(s3_prefix) and closed.endpoint in msg and "AWS_ENDPOINT_URL" in msg
    assert_clean(msg, s3_env)


# ----------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("cut_at", [0, 1_000, 3 * MB])
def test_an_upload_cut_midway_leaves_no_partial_object(s3_prefix, s3_env, proxy, monkeypatch, cut_at):
    old = b"the previous object" * 100
    storage.write_bytes(f"{s3_prefix}/_info.json", old)
    monkeypatch.setenv("CATDOG_STORAGE_RETRY_S", "0")  # no retry: the upload fails for good
    direct = _direct(s3_env)
    for key, before in (("_info.json", old), ("train-000000.tar", None)):
        proxy.add(("cut_request", cut_at))
        with pytest.raises(StorageError) as e:
            storage.write_bytes(f"{s3_prefix}/{key}", os.urandom(4 * MB))
        assert e.value.kind == storage.UNAVAILABLE
        if before is None:
            assert not storage.exists(f"{s3_prefix}/{key}")
        else:
            assert direct.get_object(Bucket=s3_env.bucket, Key=f"{_key(s3_prefix)}/{key}")["Body"].read() == before
    assert proxy.pending() == 0  # both cuts happened


def test_a_multipart_upload_cut_midway_leaves_nothing(s3_prefix, s3_env, proxy, monkeypatch, tmp_path):
    monkeypatch.setattr(s3_backend, "MULTIPART_THRESHOLD", 6 * MB)
    monkeypatch.setattr(s3_backend, "PART_SIZE", 5 * MB)
    monkeypatch.setenv("CATDOG_STORAGE_RETRY_S", "0")
    src = tmp_path / "big.tar"
    src.write_bytes(os.urandom(12 * MB))
    proxy.add(None, None, ("cut_request", 100_000))  # start + part 1 go through, part 2 is cut
    with pytest.raises(StorageError):
        storage.upload(src, f"{s3_prefix}/big.tar")
    assert not storage.exists(f"{s3_prefix}/big.tar")
    uploads = _direct(s3_env).list_multipart_uploads(Bucket=s3_env.bucket, Prefix=_key(s3_prefix))
    assert not uploads.get("Uploads")  # aborted, not left to take space
    assert [m for m, _, _ in proxy.log].count("DELETE") == 1


# ----------------------------------------------------------------------------------------------- transient faults


def test_transient_failures_are_retried(s3_prefix, s3_env, proxy, caplog):
    data = os.urandom(300_000)
    url = f"{s3_prefix}/shard.tar"
    proxy.add(*WRITE_FAULTS)
    storage.write_bytes(url, data)  # PUT through four faults, then it lands
    assert proxy.pending() == 0 and proxy.seen["PUT"] >= len(WRITE_FAULTS) + 1
    proxy.add(*READ_FAULTS)
    assert storage.read_bytes(url) == data
    proxy.add(*READ_FAULTS)
    assert storage.read_range(url, 1_234, 50_000) == data[1_234:51_234]
    proxy.add(*READ_FAULTS)
    assert storage.list_dir(s3_prefix) == {"shard.tar": len(data)}
    # (>=: on a loaded machine a healthy request may time out too, and is retried as well)
    assert proxy.pending() == 0 and proxy.seen["GET"] >= 3 * (len(READ_FAULTS) + 1)
    retries = [r for r in caplog.records if r.name.startswith("catdog") and "retry" in r.getMessage()]
    assert len(retries) >= 4 * len(READ_FAULTS)
    assert all(s3_env.secret_key not in r.getMessage() for r in caplog.records)


def test_a_cut_download_resumes_where_it_stopped(s3_prefix, s3_env, proxy, tmp_path):
    data = os.urandom(3 * MB)
    storage.write_bytes(f"{s3_prefix}/shard.tar", data)
    proxy.add(None, ("cut_response", MB))  # the HEAD passes, the GET is cut after 1 MB
    dest = tmp_path / "shard.tar"
    assert storage.download(f"{s3_prefix}/shard.tar", dest) == len(data)
    assert dest.read_bytes() == data
    ranges = [r for m, _, r in proxy.log if m == "GET"]
    assert ranges[0] == f"bytes=0-{len(data) - 1}"
    resumed = int(ranges[1].removeprefix("bytes=").split("-")[0])
    assert MB // 2 <= resumed <= MB  # from what had arrived, not from the start


def test_failures_beyond_the_budget_become_one_line(s3_prefix, s3_env, proxy, monkeypatch):
    storage.write_bytes(f"{s3_prefix}/_info.json", b"{}")
    monkeypatch.setenv("CATDOG_STORAGE_RETRY_S", "1")
    proxy.add(*["503"] * 1_000)
    with pytest.raises(StorageError) as e:
        storage.read_bytes(f"{s3_prefix}/_info.json")
    msg = str(e.value)
    assert e.value.kind == storage.UNAVAILABLE and "503" in msg and "CATDOG_STORAGE_RETRY_S" in msg
    assert_clean(msg, s3_env)


@pytest.mark.slow
def test_reads_go_on_across_a_server_restart(tmp_path, monkeypatch, caplog):
    """The store is killed (SIGKILL, mid-read) and comes back on the same address: every read still returns the
    right bytes, as a training epoch must go on through a restart of the store."""
    with SeaweedFS(tmp_path / "s3") as server:
        for var, value in server.env().items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        data = os.urandom(MB)
        url = server.url("shards/train-000000.tar")
        storage.write_bytes(url, data)
        restarted = threading.Event()
        reads = {"before": 0, "after": 0, "wrong": 0}
        errors: list[BaseException] = []

        def read_on() -> None:  # reads until 20 reads after the restart have succeeded
            i = 0
            try:
                while reads["after"] < 20:
                    offset, size = (i * 7_919) % (MB - 50_000), 50_000
                    phase = "after" if restarted.is_set() else "before"
                    reads["wrong"] += storage.read_range(url, offset, size) != data[offset : offset + size]
                    reads[phase] += 1
                    i += 1
            except BaseException as e:
                errors.append(e)

        reader = threading.Thread(target=read_on)
        reader.start()
        deadline = time.monotonic() + 120
        while reads["before"] < 20 and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # while the reader is reading
        time.sleep(1.0)
        server.restart()
        restarted.set()
        reader.join(300)
        assert not reader.is_alive() and not errors, errors
        assert reads["wrong"] == 0 and reads["before"] >= 20 and reads["after"] == 20
        assert any(r.name.startswith("catdog") and "retry" in r.getMessage() for r in caplog.records)
