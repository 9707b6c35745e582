"""Atomic, resumable checkpoints: ``accelerator.save_state`` plus our own JSON state, renamed into place.

The folder layout and the JSON state are train/formats/rundir.py's; this module adds Accelerate's state handling.
Everything is written into a hidden ``.tmp-step_...`` folder first and renamed when every rank has finished, so a
``step_*`` folder is complete by construction.

Loading never unpickles code: the model is safetensors, and Accelerate's ``load_state`` reads the optimizer
and RNG files with ``torch.load(weights_only=True)`` (it allow-lists only numpy's array reconstruction for the
numpy RNG state). A file that fails that check is refused with a ``CheckpointError``, never retried unsafely.
We do NOT use ``register_for_checkpointing``: Accelerate loads those files with ``weights_only=False``. Our
state is JSON instead.

``trainer_state.json`` also records what the saved weights and data position mean (``TrainerState.fingerprint``:
model shapes, global batch, accumulation, ...); ``check_resumable`` refuses a checkpoint written under another
config instead of failing deep in ``load_state`` or resuming at a position that means something else now.
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import load as weights_only_load
from accelerate.utils.constants import SCALER_NAME
from safetensors.torch import save_file

from data_prep.atomic import atomic_write_json, publish_dir
from train.config import ConfigError
from train.formats.rundir import STATE_NAME, TrainerState, step_dir_name
from train.hardware.gpus import wait_for_everyone

# Fingerprint keys a resume must match, with the config key a user would change to cause a mismatch.
# world_size is recorded but not compared: the data position counts global micro-batches
# (train.batch_size / grad_accum samples each), so it means the same on any number of ranks.
RESUME_KEYS = {
    "model": "model.name",
    "model_shapes": "model.* (parameter names/shapes or which layers train)",
    "optimizer": "optim.name",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "train_samples": "the train split in data.dir (its sample count)",
    "seed": "train.seed (it fixes the data order)",
}


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded safely; the message names the file and what to do."""


def save_checkpoint(
    accelerator: Accelerator, root: Path, state: TrainerState, extra: dict[str, tuple[dict, dict]] | None = None
) -> Path:
    """Save model/optimizer/RNG + ``state`` as ``root/step_XXXXXXXX`` atomically. Every rank must call this.

    ``extra`` maps file names to (tensors, metadata) that the main process writes as safetensors into the same
    temp folder before the rename (the EMA weights). A folder for the same step (an epoch end that is also a
    periodic checkpoint) is replaced.
    """
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait_for_everyone(accelerator)
    # Every rank writes its own RNG file into the shared temp folder; the main process writes the rest.
    accelerator.save_state(str(tmp), safe_serialization=True)
    wait_for_everyone(accelerator)
    if accelerator.is_main_process:
        for name, (tensors, metadata) in (extra or {}).items():
            save_file(tensors, str(tmp / name), metadata=metadata)
        atomic_write_json(tmp / STATE_NAME, asdict(state))
        publish_dir(tmp, final)
    wait_for_everyone(accelerator)
    return final


def check_resumable(path: Path, state: TrainerState, current: dict) -> None:
    """Raise ConfigError when ``state`` (read from checkpoint ``path``) was saved under a config whose weights or
    data position do not carry over to ``current``. Keys missing from an older checkpoint are not compared."""
    saved = state.fingerprint
    diffs = [
        f"{RESUME_KEYS[k]}: checkpoint {saved[k]!r}, now {current[k]!r}"
        for k in RESUME_KEYS
        if k in saved and k in current and saved[k] != current[k]
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: it was saved under a different config ({'; '.join(diffs)}). "
            "Use a new run.dir for the new config, restore the old values, or pass train.resume=none to start over"
        )


_PRECISION_WORD = {"no": "fp32", "bf16": "bf16"}  # TrainerState.precision (Accelerate's names)


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore model/optimizer/RNG from ``path`` (weights_only loads) and return its TrainerState.

    Raises CheckpointError when a file holds anything but tensors and plain containers (e.g. pickled code).
    """
    state = TrainerState.from_json(path / STATE_NAME)
    # Check each pickled file on its own first, so the error names it. Accelerate would load the optimizer
    # with weights_only too, but it swallows any failure on the RNG file and resumes with other random numbers.
    pickled = sorted(path.glob("*.bin")) + [path / f"random_states_{accelerator.process_index}.pkl"]
    for f in pickled:
        if not f.is_file():
            continue
        try:
            weights_only_load(f, map_location="cpu")
        except pickle.UnpicklingError as e:
            reason = next((line for line in str(e).splitlines() if "Unsupported" in line), str(e).splitlines()[0])
            raise CheckpointError(
                f"{f} does not load with torch.load(weights_only=True) ({reason.strip()}): it is not a file we "
                f"wrote (tampered or corrupt), and is never unpickled. Delete {path} to resume from an older "
                "checkpoint, or pass train.resume=none"
            ) from e
    if getattr(accelerator, "scaler", None) is not None and not (path / SCALER_NAME).is_file():
        # fp16 on a GPU keeps a loss scaler; a checkpoint trained in bf16 or fp32 has none, and Accelerate would
        # fail on the missing file after loading the weights.
        raise ConfigError(
            f"cannot resume from {path} with train.mixed_precision=fp16: it was trained in "
            f"{_PRECISION_WORD.get(state.precision, 'bf16 or fp32')} and holds no fp16 loss-scaler state "
            f"({SCALER_NAME}); resume with train.mixed_precision={state.precision or 'bf16'} (or auto), or start over "
            "with train.resume=none"
        )
    # map_location="cpu": with several GPU processes Accelerate would load optimizer.bin onto the GPU, and
    # Optimizer.load_state_dict keeps each parameter's step counter where it was loaded (torch casts every other
    # state to the parameter's device): AdamW then reads those CUDA steps with .item(), two host syncs per
    # parameter per step, for the whole resumed run. From the CPU the counters stay on the CPU, as in a fresh run.
    accelerator.load_state(str(path), map_location="cpu")
    return state
