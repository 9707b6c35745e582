"""Progress for every catdog command: a bar on a terminal, a plain line now and then in a log, or nothing.

``CATDOG_PROGRESS`` = auto (default) | bar | lines | off, and each command's ``--no-progress`` (which sets it to off
for the command and the processes it starts). auto is a bar when stderr is a terminal, else lines: a SLURM ``.err``
file or a CI log gets one plain line every ``CATDOG_PROGRESS_EVERY_S`` seconds (default 30) instead of a
carriage-return redraw per step.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

ENV = "CATDOG_PROGRESS"
EVERY_ENV = "CATDOG_PROGRESS_EVERY_S"
MODES = ("auto", "bar", "lines", "off")
LINE_EVERY_S = 30.0


def progress_mode(stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off`` for this process: CATDOG_PROGRESS, with auto decided by ``stream`` (stderr)."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        _warn_once(f"{ENV}={mode}: use one of {', '.join(MODES)}; using auto")
        mode = "auto"
    if mode != "auto":
        return mode
    stream = stream or sys.stderr
    return "bar" if _is_terminal(stream) else "lines"


def disable_progress() -> None:
    """``--no-progress``: no bar and no progress lines here, nor in the processes this one starts."""
    os.environ[ENV] = "off"


def line_every_s() -> float:
    """Seconds between two progress lines (CATDOG_PROGRESS_EVERY_S, default 30)."""
    text = os.environ.get(EVERY_ENV, "")
    try:
        return max(0.0, float(text)) if text else LINE_EVERY_S
    except ValueError:
        _warn_once(f"{EVERY_ENV}={text!r}: not a number of seconds; using {LINE_EVERY_S:g}")
        return LINE_EVERY_S


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A bad setting is said once per process, not at every epoch's progress display."""
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` (and iteration), printing one plain line at most every
    ``every_s`` seconds: ``desc: 12/31 it (39 %), 1.2 it/s, 00:10 elapsed, loss=0.6931``."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every_s: float | None = None,
        file: TextIO | None = None,
    ):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self._start = total, initial, initial
        self.every_s = line_every_s() if every_s is None else every_s
        self.file = file
        self.postfix: dict[str, object] = {}
        self.t0 = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:  # noqa: ARG002
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """Nothing to clear: each line is complete, and the command's own summary line follows."""

    def _print(self, now: float) -> None:
        elapsed = now - self.t0
        rate = (self.n - self._start) / max(elapsed, 1e-9)
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f} %)" if self.total else f"{self.n}"
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        line = f"{self.desc}: {done}, {rate:.3g} {self.unit}/s, {tqdm.format_interval(elapsed)} elapsed{extra}"
        print(line.lstrip(": "), file=self.file or sys.stderr, flush=True)


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = False,
) -> tqdm | LineProgress:
    """A progress display for ``progress_mode()``: a tqdm bar, a LineProgress, or a silent tqdm (also when
    ``disable``: a process that is not the one reporting, such as a rank other than the main one)."""
    mode = "off" if disable else progress_mode()
    if mode == "lines":
        return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
    kwargs: dict = {"dynamic_ncols": True} if _is_terminal(sys.stderr) else {}
    if not kwargs and os.environ.get("COLUMNS", "").isdigit():  # a terminal behind a pipe (catdog-launch local)
        kwargs["ncols"] = int(os.environ["COLUMNS"])
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, initial=initial, disable=mode == "off", leave=leave, **kwargs
    )
