"""CPU training keeps freed memory in the heap (train/hardware/memory.py): large tensors stop being fresh mmaps.

Each case runs in a fresh interpreter: the allocator setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from train.hardware.memory import user_choice

ROOT = Path(__file__).resolve().parents[1]

# glibc's mallinfo2 reports bytes held in mmapped blocks (hblkhd) apart from the heap (arena). A 64 MB tensor is
# over glibc's largest mmap threshold (32 MB), so by default it is an mmap of its own.
PROBE = r"""
import ctypes, json, os, sys
import torch
from train.hardware.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mmapped_while_holding(mb):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(mb * 2**20, dtype=torch.uint8)
    t.fill_(1)
    grown = libc.mallinfo2().hblkhd - before
    del t
    return grown

note = keep_freed_memory(json.loads(sys.argv[1])) if sys.argv[1] != "skip" else "not called"
print(json.dumps({"note": note, "mmapped": mmapped_while_holding(64)}))
"""


def _probe(env_arg: str) -> dict:
    # The child runs with glibc's defaults even where this runner tunes its allocator (LD_PRELOAD, MALLOC_*).
    env = {k: v for k, v in os.environ.items() if k not in user_choice(os.environ)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, env_arg],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc_with_mallinfo2() -> bool:
    return platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="the probe reads glibc >= 2.33's mallinfo2")
def test_large_tensors_come_from_the_heap_once_switched():
    default = _probe("skip")
    assert default["mmapped"] >= 64 * 2**20, default  # the baseline this module exists to change
    switched = _probe("{}")
    assert "keeps freed memory" in switched["note"]
    assert switched["mmapped"] == 0, switched


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="the probe reads glibc >= 2.33's mallinfo2")
def test_a_users_own_allocator_choice_is_left_alone():
    kept = _probe(json.dumps({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}))
    assert kept["note"] == "allocator left as set (LD_PRELOAD)"
    assert kept["mmapped"] >= 64 * 2**20  # nothing changed


def test_the_allocator_settings_that_count_as_a_users_choice():
    assert user_choice({}) == [] and user_choice({"HOME": "/root", "GLIBC_TUNABLES": "glibc.rtld.x=1"}) == []
    assert user_choice({"MALLOC_ARENA_MAX": "2", "CATDOG_MALLOC": "default"}) == ["MALLOC_ARENA_MAX", "CATDOG_MALLOC"]
    assert user_choice({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}) == ["GLIBC_TUNABLES"]
