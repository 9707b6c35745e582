"""What every catdog command line shares: ``--version``, wrong arguments as one line (exit 2), ``--out/-o`` for
where the output goes, ``--no-progress`` (data_prep/progress.py)."""

from __future__ import annotations

import argparse
import sys

from data_prep.progress import LINE_EVERY_S
from data_prep.version import catdog_version

NO_PROGRESS_HELP = (
    f"no progress bar and no progress lines (also CATDOG_PROGRESS=off). Default: a bar when stderr is a terminal, "
    f"else a plain line every {LINE_EVERY_S:g} s (CATDOG_PROGRESS_EVERY_S)"
)


def say(line: str) -> None:
    """``line`` and its newline on stderr in one write. print() writes them separately (stderr to a pipe is not
    buffered), so ranks sharing the launcher's pipe could interleave two errors into one garbled line; one write of
    less than PIPE_BUF bytes to a pipe is atomic."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Parser(argparse.ArgumentParser):
    """argparse with catdog's conventions: ``--version`` prints the installed catdog's version, and a wrong argument
    is one line naming it (exit 2) instead of the usage block. Sub-command parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {catdog_version()}")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_out(parser: argparse.ArgumentParser, help: str, *aliases: str, **kwargs) -> None:
    """``--out/-o`` (and older spellings in ``aliases``), stored as ``out``."""
    parser.add_argument("--out", "-o", *aliases, dest="out", help=help, **kwargs)


def add_no_progress(parser: argparse.ArgumentParser, help: str = NO_PROGRESS_HELP) -> None:
    parser.add_argument("--no-progress", action="store_true", help=help)
