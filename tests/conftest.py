"""Shared fixtures: the real photos, small real shards, free ports, clean process state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
