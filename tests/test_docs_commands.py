"""The README's and docs' example commands run as written, as far as that is cheap: every catdog command's flags
exist (checked against its --help), every config it names loads with its overrides, every resource file exists, and
the commands that only print (--help, --version) run. The long-running ones (training, SLURM jobs) are the suite's
other tests."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from train.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOOLS = {
    "catdog-prep": "data_prep",
    "catdog-train": "train",
    "catdog-launch": "launch",
    "catdog-predict": "train.use.predict",
    "catdog-evaluate": "train.use.evaluate",
    "catdog-export": "train.use.export",
    "catdog-report": "train.use.report",
}
OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=")


def commands(path: Path) -> list[list[str]]:
    """The catdog commands in ``path``'s fenced shell blocks, continuation lines joined, comments dropped."""
    out, block, lang = [], None, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
                continue
            if lang in ("", "bash", "sh"):
                out += _catdog_lines("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return out


def _catdog_lines(text: str) -> list[list[str]]:
    found = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell
            continue
        if words and words[0] in TOOLS:
            found.append(words)
    return found


ALL = [(p.relative_to(ROOT).as_posix(), words) for p in DOCS for words in commands(p)]


def test_the_docs_show_every_command():
    shown = {words[0] for _, words in ALL}
    assert shown == set(TOOLS), f"no example of {set(TOOLS) - shown}"
    assert len(ALL) > 20


@cache
def help_text(tool: str, sub: str = "") -> str:
    argv = [sys.executable, "-m", TOOLS[tool], *([sub] if sub else []), "--help"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{tool} {sub} --help: {out.stderr}"
    return out.stdout


def _id(item) -> str:
    where, words = item
    return f"{where}: {' '.join(words)[:80]}"


@pytest.mark.parametrize("item", ALL, ids=[_id(i) for i in ALL])
def test_a_documented_command_is_valid(item):
    where, words = item
    tool, args = words[0], words[1:]
    sub = args[0] if tool == "catdog-launch" and args and not args[0].startswith("-") else ""
    text = help_text(tool, sub)
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{where}: {tool} {sub} has no {flag}"
    config = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"), None)
    overrides = [a for a in args if OVERRIDE.match(a)]
    if config or (tool == "catdog-train" and overrides):
        path = ROOT / config if config else None
        assert path is None or path.is_file(), f"{where}: no {config}"
        load_config(path, [o for o in overrides if not o.startswith("data.dir=")] + ["data.dir=x"])
    for i, a in enumerate(args[:-1]):
        if a in ("--slurm-config", "--sweep"):
            assert (ROOT / args[i + 1]).is_file(), f"{where}: no {args[i + 1]}"
    if "--help" in args or "--version" in args:
        out = subprocess.run([sys.executable, "-m", TOOLS[tool], *args], cwd=ROOT, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
