"""``CATDOG_SYNC_DEBUG=1`` (scripts/gpu_check.sh): proof on a GPU that the training step never makes the host wait.

torch.cuda's sync debug mode is "error" around each step body from the second micro-batch on (the first one
initialises lazily), and "default" while the loop waits for the loader, whose wait it times; each epoch prints one
line with the figures. Unset, the training loop does not create a probe at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from accelerate import Accelerator

ENABLED = os.environ.get("CATDOG_SYNC_DEBUG", "0") not in ("", "0")


class SyncProbe:
    """Wraps an epoch's batches: "error" while the step body runs, "default" while the loader is waited for."""

    def __init__(self, device: torch.device, set_mode: Callable[[int | str], None] | None = None):
        self.cuda = device.type == "cuda"
        self.set_mode = set_mode or (torch.cuda.set_sync_debug_mode if self.cuda else lambda mode: None)
        self.batches = 0
        self.first_wait = self.wait = 0.0
        self.t0 = time.perf_counter()

    def wrap(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        while True:
            self.set_mode("default")
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            if self.batches:
                self.wait += time.perf_counter() - t
                self.set_mode("error")
            else:
                self.first_wait, self.t0 = time.perf_counter() - t, time.perf_counter()
            self.batches += 1
            yield item

    def report(self, accelerator: Accelerator, desc: str) -> None:
        """One line per epoch (scripts/gpu_check.py reads it): batches checked, loader wait as a share of the loop."""
        if self.cuda:
            torch.cuda.synchronize(accelerator.device)  # the steps still queued count as loop time
        loop = time.perf_counter() - self.t0
        mode = f"{max(self.batches - 1, 0)} checked in sync debug mode 'error'" if self.cuda else "no CUDA: not checked"
        accelerator.print(
            f"sync-debug: {desc}: {self.batches} micro-batches, {mode}; loader wait {self.wait:.3f} s of {loop:.3f} s "
            f"after the first batch ({100 * self.wait / max(loop, 1e-9):.1f} %); first batch {self.first_wait:.3f} s",
            flush=True,
        )
