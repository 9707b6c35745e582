"""The stderr of `accelerate launch`, passed on as it comes, minus the launcher's own report of a failure that the
trainer has already explained.

When a rank ends on bad input it prints one line starting ``catdog-train: `` and exits (2 for bad input, 1 for bad
data). accelerate then adds its own traceback (``CalledProcessError`` for one process; torchrun's ``ChildFailedError``
and its log lines for several), which repeats nothing useful. So from the trainer's first such line on, the rest of
the stream is held back; at the end, when the launch failed, only the ranks' other distinct ``catdog-train:`` lines
are shown and the trainer's own exit code is returned. A failure without such a line (a bug, a killed rank) is
passed on untouched, traceback included.
"""

from __future__ import annotations

import re
from typing import BinaryIO

MARK = b"catdog-train: "
# The rank's exit code as accelerate's single-process launcher and torchrun report it.
_EXIT_CODE = re.compile(rb"non-zero exit status (\d+)|exitcode\s*:\s*(\d+)")


class FailureRelay:
    """Feed it the launch's stderr in chunks (``feed``), then ``finish`` with the launch's exit code."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.line = b""  # the current line since the last newline
        self.written = 0  # how much of it has been passed on
        self.shown: list[bytes] = []  # the trainer's lines passed on
        self.held: bytearray | None = None  # everything after the trainer's first line

    def feed(self, data: bytes) -> None:
        if self.held is not None:
            self.held += data
            return
        end = 0
        for piece in data.split(b"\n"):
            end += len(piece) + 1
            self.line += piece + (b"\n" if end <= len(data) else b"")
            last = self.line.rsplit(b"\r", 1)[-1]  # after a progress bar's redraws
            if end <= len(data):  # a whole line
                self._write(self.line[self.written :])
                self.line, self.written = b"", 0
                if last.startswith(MARK):
                    self.shown.append(last.strip())
                    self.held = bytearray(data[end:])
                    return
                continue
            # An unfinished line goes on at once (a progress bar redraws without a newline), unless it may become
            # the trainer's line: that waits for its end.
            could_be_mark = MARK.startswith(last) or last.startswith(MARK)
            upto = len(self.line) - len(last) if could_be_mark else len(self.line)
            if upto > self.written:
                self._write(self.line[self.written : upto])
                self.written = upto

    def finish(self, returncode: int) -> int:
        """Pass on or drop what was held; the exit code to report (the trainer's, when it explained a failure)."""
        held = bytes(self.held or b"") + (b"" if self.held is not None else self.line[self.written :])
        if self.held is None or returncode == 0:
            self._write(held)
            return returncode
        for line in held.splitlines():
            text = line.rsplit(b"\r", 1)[-1].strip()
            if text.startswith(MARK) and text not in self.shown:  # another rank with another explanation
                self.shown.append(text)
                self._write(text + b"\n")
        code = _EXIT_CODE.search(held)
        return int(next(g for g in code.groups() if g)) if code else returncode

    def _write(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.out.flush()
