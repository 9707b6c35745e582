"""Weight EMA (``train.ema``): an exponential moving average of the model's weights, updated after every optimizer
step, that validation, early stopping, the best checkpoint and the final test scoring use instead of the raw weights.

Built on torch's kept pieces: ``torch.optim.swa_utils.AveragedModel`` holds the averaged copy (a deep copy of the
unwrapped model, on its device) and its update counter ``n_averaged``; ``get_ema_multi_avg_fn`` is the update
(one ``torch._foreach_lerp_`` over all floating tensors). We do not call ``AveragedModel.update_parameters``: it
reads ``n_averaged == 0`` and copies ``n_averaged`` to the device with a blocking copy on every call, a host/GPU
sync per step. Here the counter stays on the host (a CPU tensor) and the decay is a Python float, so an update
only queues device work.

Warm-up (``train.ema_warmup``, on by default): the decay ramps as in timm's ``ModelEmaV3``,
``min(ema_decay, 1 - (1 + t) ** -2/3)`` for the t-th update (0 at the first, 0.37 at the second, 0.9 at ~30,
0.99 at ~1,000), so the average is not dominated by the random initial weights in short runs. Off, the first
update copies the weights and every later one uses ``ema_decay`` (``get_ema_multi_avg_fn``'s definition).

BatchNorm buffers are averaged too (``AveragedModel(use_buffers=True)``, as timm's ModelEmaV3 and torchvision's
classification reference do): the raw model's running statistics describe the CURRENT weights' activations, and
pairing them with weights averaged over the last few hundred steps mismatches most early in training, when the
weights move fastest; the same average over the statistics matches the averaged weights. Integer buffers
(``num_batches_tracked``) are copied.

On disk: ``ema.safetensors`` in each checkpoint folder, with exactly the model's state_dict keys (a plain model
loads it with ``load_state_dict``) and the update count in the safetensors metadata.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

EMA_NAME = "ema.safetensors"
WARMUP_POWER = 2 / 3  # timm ModelEmaV3's default warmup_power (warmup_gamma 1)


def ema_decay_at(t: int, decay: float, warmup: bool) -> float:
    """Decay of the t-th update (t = updates before this one). t = 0 copies the weights."""
    if t <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + t) ** -WARMUP_POWER)


class WeightEMA:
    """The averaged weights of ``model`` (the UNWRAPPED module: no DDP or compile wrapper)."""

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.averaged = AveragedModel(model, use_buffers=True)  # deep copy on the model's device; n_averaged on CPU
        self.module = self.averaged.module
        self.module.requires_grad_(False)
        self.module.eval()

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)  # a CPU tensor: no device sync

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` in. Queues device work only (no host sync)."""
        ema = list(itertools.chain(self.module.parameters(), self.module.buffers()))
        src = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if len(ema) != len(src):
            raise RuntimeError(f"EMA holds {len(ema)} tensors, the model {len(src)}: not the model it was made from")
        floats = [(e, s) for e, s in zip(ema, src, strict=True) if e.is_floating_point()]
        fn = get_ema_multi_avg_fn(ema_decay_at(self.updates, self.decay, self.warmup))
        fn([e for e, _ in floats], [s for _, s in floats], None)
        for e, s in zip(ema, src, strict=True):
            if not e.is_floating_point():
                e.copy_(s)
        self.averaged.n_averaged += 1

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for ``ema.safetensors``: the model's keys, contiguous CPU copies."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        return tensors, {
            "ema_updates": str(self.updates),
            "ema_decay": repr(self.decay),
            "ema_warmup": str(self.warmup),
        }

    def load(self, path: Path) -> None:
        """Restore from an ``ema.safetensors`` (a safetensors file: nothing is unpickled)."""
        self.module.load_state_dict(load_file(str(path), device="cpu"))
        with safe_open(str(path), framework="pt") as f:
            self.averaged.n_averaged.fill_(int((f.metadata() or {}).get("ema_updates", "1")))
