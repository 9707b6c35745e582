"""Run a catdog command without installing the project: ``python3 scripts/catdog_cli.py catdog-evaluate ARGS...``.

The command's entry point is read from pyproject.toml's ``[project.scripts]``, so this follows the package layout
wherever the code moves; the project folder goes first on ``sys.path``. For a Python with the dependencies but not
catdog itself (a GPU machine's image: scripts/gpu_check.sh). ``--list`` imports every entry point and prints it.
Needs Python 3.11+ (tomllib).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def entry_points() -> dict[str, str]:
    """``{command: "module:function"}`` from pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def resolve(target: str) -> Callable[[], int | None]:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str]) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    scripts = entry_points()
    if argv[:1] == ["--list"]:
        for name, target in scripts.items():
            resolve(target)
            print(f"{name} = {target}")
        return 0
    if not argv or argv[0] not in scripts:
        got = argv[0] if argv else "nothing"
        print(f"catdog_cli.py: got {got}; give one of {', '.join(scripts)} (or --list)", file=sys.stderr)
        return 2
    sys.argv = [argv[0], *argv[1:]]
    return resolve(scripts[argv[0]])() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
