"""catdog-prep writing to s3:// on the real S3 server (SeaweedFS, 127.0.0.1): _info.json only once everything else is
there, a killed run resumed without uploading again what is already in the store (even from an empty staging
folder, as on another machine), the bytes of a local run, and bad destinations refused in one line."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prep_helpers import make_tree
from s3_faults import FaultProxy
from train_helpers import ROOT, env

from data_prep import storage
from data_prep.__main__ import main as prep_main
from data_prep.shards import PROGRESS_NAME


def one_line(capsys, code: int) -> str:
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("catdog-prep: error: "), out.err
    return lines[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_a_killed_upload_resumes_without_uploading_again(real_data, s3_prefix, s3_env, tmp_path):
    # Original-size photos and tiny shards: the run takes a few seconds and finishes many shards.
    src = make_tree(real_data, tmp_path / "src", 60, short_side=None)
    args = ["--image-size", "128", "--shard-max-count", "5", "--workers", "1", "--no-progress"]
    stage = tmp_path / "stage"
    cmd = [sys.executable, "-m", "data_prep", str(src), s3_prefix, *args, "--stage", str(stage)]
    # The first run's store never answers the upload of _info.json: however fast the machine, it is killed with
    # shards uploaded and the dataset unfinished.
    with FaultProxy(s3_env.ports["s3"]) as first:
        first.hold = lambda method, path: method == "PUT" and path.endswith("/_info.json")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(AWS_ENDPOINT_URL=first.endpoint), stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 120
        before: dict[str, int] = {}
        while sum(n.endswith(".tar") for n in before) < 3:  # some shards uploaded
            assert proc.poll() is None, "ended before it could be killed"
            assert time.monotonic() < deadline, "no shard uploaded within 120 s"
            time.sleep(0.05)
            before = storage.list_dir(s3_prefix)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    left = storage.list_dir(s3_prefix)
    assert "_info.json" not in left and PROGRESS_NAME in left  # no reader takes it for a dataset
    uploaded = sorted(n for n in left if n.endswith(".tar"))

    for p in stage.iterdir():  # as on another machine: nothing staged, the store's progress object only
        p.unlink()
    with FaultProxy(s3_env.ports["s3"]) as proxy:
        rerun = subprocess.run(
            cmd, cwd=ROOT, env=env(AWS_ENDPOINT_URL=proxy.endpoint), capture_output=True, text=True, timeout=180
        )
        puts = [Path(path).name for method, path, _ in proxy.log if method == "PUT"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stdout, rerun.stdout
    assert uploaded and not set(uploaded) & set(puts)  # verified in the store by size and sha256, not sent again
    assert puts[-1] == "_info.json"  # the last object written (the progress object is then deleted)
    assert not stage.exists()

    local = tmp_path / "local"
    subprocess.run([sys.executable, "-m", "data_prep", str(src), str(local), *args], cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=180)  # fmt: skip
    objects = storage.list_dir(s3_prefix)
    assert sorted(objects) == sorted(p.name for p in local.iterdir())
    for name in objects:
        assert sha(storage.read_bytes(f"{s3_prefix}/{name}")) == sha((local / name).read_bytes()), name


def test_bad_destinations_are_one_line(real_data, s3_prefix, s3_env, tmp_path, monkeypatch, capsys):
    src = make_tree(real_data, tmp_path / "src", 3, short_side=48)
    monkeypatch.chdir(tmp_path)
    base = ["--workers", "1", "--no-progress", "--stage", str(tmp_path / "stage")]
    line = one_line(capsys, prep_main([str(src), "foo://bucket/shards", *base]))
    assert "foo://bucket/shards" in line and "unsupported URL scheme foo://" in line
    line = one_line(capsys, prep_main([str(src), "https://example.org/shards", *base]))
    assert "https:// is read-only" in line
    line = one_line(capsys, prep_main(["s3://bucket/photos", str(tmp_path / "out"), *base]))
    assert "local folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no folder named foo:, https: or s3:

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY0123456")
    line = one_line(capsys, prep_main([str(src), s3_prefix, *base]))
    assert s3_prefix in line and "InvalidAccessKeyId" in line and "AWS_ACCESS_KEY_ID" in line
    assert s3_env.secret_key not in line
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.access_key)

    storage.write_bytes(f"{s3_prefix}/notes.txt", b"someone else's")
    line = one_line(capsys, prep_main([str(src), s3_prefix, *base]))
    assert "not empty and was not written by catdog-prep" in line and "notes.txt" in line
    assert prep_main([str(src), s3_prefix, *base, "--force"]) == 0  # only catdog-prep's own objects are replaced
    objects = storage.list_dir(s3_prefix)
    assert "notes.txt" in objects and "_info.json" in objects
    capsys.readouterr()
    assert prep_main([str(src), s3_prefix, *base]) == 0
    assert "already complete" in capsys.readouterr().out
