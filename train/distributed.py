"""What the trainer needs to know about processes and devices, in one place (models never import this).

- ``cuda_device_plan``: which GPU a rank uses, so that the device Accelerate picks and the device DDP is given
  agree in every launch route (accelerate launch / torchrun: every rank sees the node's GPUs; SLURM: the same,
  or one GPU per task where the site binds GPUs to tasks).
- ``convert_sync_batchnorm``: BatchNorm statistics over the global batch instead of each rank's slice.
- ``StopFlag``: a preemption / time-limit signal turned into "every rank stops at the same step boundary".
- ``wait_for_everyone``: a barrier on the rank's own GPU (Accelerate's picks cuda:<local rank>).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from train.config import local_world_size

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The ranks of a node cannot each get a GPU of their own; the message says what to change."""


@dataclass(frozen=True)
class CudaPlan:
    local_rank: int
    local_world_size: int
    visible: int  # CUDA devices this process sees (after CUDA_VISIBLE_DEVICES)
    device_index: int  # the cuda:<index> this rank trains on
    ddp_device_from_module: bool  # DDP must take the module's device instead of [local_rank]

    def describe(self) -> str:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        how = "one GPU per task" if self.ddp_device_from_module else "all of the node's GPUs visible to each rank"
        return (
            f"local rank {self.local_rank}/{self.local_world_size} -> cuda:{self.device_index} "
            f"({self.visible} visible, CUDA_VISIBLE_DEVICES={seen}; {how})"
        )


def cuda_device_plan(env: Mapping[str, str], visible: int) -> CudaPlan:
    """The GPU this rank uses, from LOCAL_RANK / LOCAL_WORLD_SIZE (set by accelerate launch, torchrun and
    submitit's export) and the number of GPUs this process sees.

    Accelerate trains on ``cuda:<local_rank % visible>`` but hands DDP ``device_ids=[local_rank]``: the two agree
    only when the rank sees at least local_rank + 1 GPUs. Where a launcher or the site gives each task exactly
    one GPU (CUDA_VISIBLE_DEVICES=<one id> per task), the rank's GPU is cuda:0 and DDP must be told to use the
    module's device. Fewer GPUs than ranks otherwise would put two ranks on one GPU, which NCCL refuses.
    """
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = local_world_size(env)
    if visible < 1:
        raise DeviceError("no CUDA device visible to this rank; set train.cpu=true to train on CPU")
    if local_rank < visible:
        return CudaPlan(local_rank, local_world, visible, local_rank, False)
    if visible == 1:
        return CudaPlan(local_rank, local_world, visible, 0, True)
    raise DeviceError(
        f"local rank {local_rank} of {local_world} sees only {visible} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank per GPU "
        "(catdog-launch local --gpus N, or --gpus-per-node N on SLURM) or make every GPU of the node visible"
    )


def apply_cuda_plan(plan: CudaPlan) -> None:
    """Make Accelerate's DDP wrapper use ``plan``'s device. Call before ``accelerator.prepare``."""
    if plan.ddp_device_from_module:
        # Accelerate's switch for "do not pass device_ids=[local_rank] to DDP": DDP then uses the device the
        # (single-device) module lives on, which is what torch documents for device_ids=None.
        os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"


def wait_for_everyone(acc) -> None:
    """``acc.wait_for_everyone()`` on the GPU this rank trains on.

    Accelerate's barrier names the device as ``device_ids=[local rank]`` (accelerate/state.py), and NCCL runs
    it there: where each task sees one GPU (``CudaPlan.ddp_device_from_module``: every rank on cuda:0), local
    rank 1 has no cuda:1 and dies at the first checkpoint with "invalid device ordinal" (accelerate#3775).
    """
    if acc.num_processes > 1 and acc.device.type == "cuda":
        index = acc.device.index if acc.device.index is not None else torch.cuda.current_device()
        dist.barrier(device_ids=[index])
    else:
        acc.wait_for_everyone()


# --------------------------------------------------------------------------------------------- SyncBatchNorm


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


# --------------------------------------------------------------------------------------------- stop on signal


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
