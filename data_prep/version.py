"""The installed catdog's version: what every command's --version prints and what _info.json and model.json record."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def catdog_version() -> str:
    try:
        return version("catdog")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
