"""Byte sizes as people write them: ``256MB``, ``1GiB``, ``500000``."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS.update({"t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '0' -> 0; ValueError (naming the text) for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 256MB, 1GiB, 500000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
