"""What a training run needs to know about its processes besides devices (models never import this).

- ``convert_sync_batchnorm``: BatchNorm statistics over the global batch instead of each rank's slice.
- ``StopFlag``: a preemption / time-limit signal turned into "every rank stops at the same step boundary".
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over all ranks with an autograd-aware all-reduce.

    torch's SyncBatchNorm runs only on GPUs (it raises for CPU tensors); this is the same computation for
    CPU (gloo) ranks, so a CPU run with model.sync_bn=true behaves as the GPU run does. GPUs use torch's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() // c, dtype=xf.dtype, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        out = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` normalises over the global batch: torch's SyncBatchNorm on GPUs, the gloo
    equivalent above on CPU ranks. Weights and running statistics carry over unchanged."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CpuSyncBatchNorm):
            new = CpuSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            for p_new, p_old in zip(new.parameters(), child.parameters(), strict=True):
                p_new.requires_grad_(p_old.requires_grad)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


class StopFlag:
    """A signal (SLURM's USR2 before a time limit or a preemption) asks the run to stop; ``agreed()`` turns that
    into a decision every rank takes at the same optimizer step.

    While the training loop polls (between ``start_polling`` and ``stop_polling``) the handler only sets a flag: the
    loop finishes its step, and after each optimizer step all ranks OR their flags with one all-reduce of one
    integer over a gloo group (a CPU round trip: it never waits for the GPU). Any rank that got the signal stops
    them all, so they save one checkpoint together at that step, and the launcher then calls ``hand_over()``.
    Outside the loop nobody would look at the flag (start-up, feature extraction, the final test scoring and
    model export), so a signal there goes straight to the handler it replaced (submitit's: checkpoint and
    requeue now; the requeued job redoes that phase), as does one that arrived after the loop's last poll.
    Swallowing it there would let SLURM kill the job at its time limit without a requeue.
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s  # the vote's gloo group beside NCCL: train.dist_timeout_s, not torch's 30 min
        self.requested = False
        self.signum: int | None = None
        self.polling = False
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        self._handed_over = False
        self._group = None
        self._ready = False

    def install(self, *signums: int) -> dict[int, object]:
        """Handle ``signums`` as above; returns the handlers they replace (``hand_over`` chains to them)."""
        self._pid = os.getpid()
        for s in signums:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        return dict(self._previous)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if os.getpid() != self._pid:
            # A forked DataLoader worker inherits this handler, and SLURM signals every process of the job step:
            # only the rank itself may act (a worker running submitit's handler would requeue the job from there).
            return
        self.requested = True
        self.signum = signum
        if not self.polling:
            self.hand_over()

    def start_polling(self) -> None:
        """The training loop checks ``agreed()`` at every step boundary from now on."""
        self.polling = True

    def stop_polling(self) -> None:
        """The loop is over: a signal it did not act on, or a later one, goes to the replaced handler."""
        self.polling = False
        if self.requested:
            self.hand_over()

    def hand_over(self) -> None:
        """Run the handler the signal replaced (once; nothing when it was SIG_DFL/SIG_IGN). submitit's requeues
        the job and exits on rank 0, and returns on the other ranks. Also when this rank got no signal itself:
        the vote stops every rank when any one was signalled (nodes get it at slightly different times), and rank
        0 must requeue all the same."""
        signum = self.signum if self.signum is not None else next(iter(self._previous), None)
        previous = self._previous.get(signum) if signum is not None else None
        if self._handed_over or not callable(previous):
            return
        self._handed_over = True
        previous(signum, None)

    def setup(self) -> None:
        """Collective, once, after the process group exists: a gloo group for the per-step vote."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            timeout = None if self.timeout_s is None else timedelta(seconds=self.timeout_s)
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        self._ready = True

    def agreed(self, step: int) -> bool:  # noqa: ARG002 - the step is part of the loop's contract
        """True on every rank once any rank has been signalled. Every rank must call it after every step."""
        if not self._ready or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
