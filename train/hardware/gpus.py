"""Which GPU a rank trains on, and a barrier that runs there (models and data never import this).

- ``cuda_device_plan``: which GPU a rank uses, so that the device Accelerate picks and the device DDP is given
  agree in every launch route (accelerate launch / torchrun: every rank sees the node's GPUs; SLURM: the same,
  or one GPU per task where the site binds GPUs to tasks).
- ``wait_for_everyone``: a barrier on the rank's own GPU (Accelerate's picks cuda:<local rank>).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_prep.cpus import local_world_size


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
