"""Atomic, resumable checkpoints: ``accelerator.save_state`` plus our own JSON state, renamed into place.

Layout: ``run.dir/checkpoints/step_00000123/`` holds Accelerate's files (``model.safetensors``,
``optimizer.bin``, ``random_states_<rank>.pkl``), ``trainer_state.json`` (epoch, data position, best
metric, history, W&B run id) and, with ``train.ema=true``, ``ema.safetensors`` (the averaged weights, same keys as
``model.safetensors``; train/ema.py).

Which weights a checkpoint was VALIDATED with: ``trainer_state.json``'s ``eval_weights`` names the file
(``model.safetensors``, or ``ema.safetensors`` when EMA is on); ``eval_weights_file(folder)`` resolves it. Anything
that scores, bundles or exports a checkpoint must read that file: ``model.safetensors`` always holds the raw
training weights, which resuming needs. Everything is written into a hidden ``.tmp-step_...`` folder first and renamed
when every rank has finished, so a ``step_*`` folder is complete by construction; a kill leaves at most a
hidden temp folder, which the next run deletes.

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

import json
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import load as weights_only_load
from accelerate.utils.constants import SCALER_NAME
from safetensors.torch import save_file

from data_prep.atomic import atomic_write_json
from train.config import ConfigError
from train.distributed import wait_for_everyone

STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

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


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    epoch: int = 0  # the epoch in progress (or the next one, when batch_in_epoch == 0)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already trained on: TrainStream.loader's start_batch
    step: int = 0  # optimizer steps done
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # all-reduced EpochTotals so far
    best_metric: float | None = None
    best_epoch: int = -1
    best_checkpoint: str = ""  # folder name under checkpoints/
    epochs_since_best: int = 0
    history: list[dict] = field(default_factory=list)  # one dict of scalar metrics per finished epoch
    last_eval: dict = field(default_factory=dict)  # latest confusion matrix + ROC curve, for the plots
    stopped_early: bool = False
    train_seconds: float = 0.0  # wall time spent training (all sessions of this run)
    wandb_run_id: str = ""
    corrupt_in_epoch: int = 0  # corrupt samples skipped (all ranks) in `epoch` before batch_in_epoch
    fingerprint: dict = field(default_factory=dict)  # what weights and position depend on; see RESUME_KEYS
    eval_weights: str = "model.safetensors"  # the weights file validation scored (ema.safetensors with train.ema)
    precision: str = ""  # what training and validation computed in (Accelerate's no/bf16/fp16, auto resolved)

    @classmethod
    def from_json(cls, path: Path) -> TrainerState:
        raw = json.loads(path.read_text())
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: Path) -> None:
    """Delete temp folders a killed save left behind (main process, before anything is written)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


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
        if final.exists():
            old = root / f".tmp-old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    wait_for_everyone(accelerator)
    return final


def eval_weights_file(folder: Path) -> Path:
    """The weights file checkpoint ``folder`` was validated with (its ``eval_weights``): what to score or export."""
    return folder / TrainerState.from_json(folder / STATE_NAME).eval_weights


def prune_checkpoints(root: Path, keep: int, best: str) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints and the one named ``best``; returns deleted."""
    found = complete_checkpoints(root)
    keep_names = {p.name for p in found[-keep:]} if keep > 0 else set()
    if best:
        keep_names.add(best)
    deleted = [p for p in found if p.name not in keep_names]
    for p in deleted:
        # Rename first: a kill during rmtree then leaves a temp folder, not a half-deleted "complete" one.
        doomed = p.with_name(f".tmp-del-{p.name}")
        p.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return deleted


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


# What a run dir holds from a previous start that a fresh start (train.resume=none) must not continue or mix
# with: checkpoints, the tracker state that would reattach to the old W&B run or keep its rows, old results.
RUN_STATE = (
    "checkpoints",
    "wandb_run_id",
    "wandb",
    "tensorboard",
    "metrics.csv",
    "metrics.jsonl",
    "final_metrics.json",
    "plots",
    "model",
)
PREVIOUS_DIR = "previous"


def start_over(run_dir: Path, stamp: str) -> Path | None:
    """Move a previous start's checkpoints and tracker state to ``run_dir/previous/<stamp>/`` (rename, on the
    same filesystem: atomic per entry, nothing deleted). Returns that folder, or None when there was nothing.

    A fresh start in a used run dir must really start over: otherwise pruning keeps the old (higher) steps and
    deletes the new ones, a later auto-resume continues the old run, and W&B reattaches to the old run id.
    """
    present = [run_dir / name for name in RUN_STATE if (run_dir / name).exists()]
    if not present:
        return None
    dest = run_dir / PREVIOUS_DIR / stamp
    n = 1
    while dest.exists():
        dest = run_dir / PREVIOUS_DIR / f"{stamp}-{n}"
        n += 1
    dest.mkdir(parents=True)
    for path in present:
        path.rename(dest / path.name)
    return dest


def pin_resume(resume: str, run_dir: Path) -> Path:
    """``train.resume=PATH`` for a job that SLURM may requeue: copy the checkpoint into ``run_dir`` now (``adopt``)
    and make sure it is the newest complete checkpoint there, so the job can run with ``resume=auto``.

    A requeue (node failure, a preemption that requeues without a signal) reruns the job as submitted: with the
    path it would go back to that checkpoint and drop everything trained since. Returns the copy.
    """
    path = Path(resume).expanduser().resolve()
    root = run_dir / "checkpoints"
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"train.resume={resume!r} is not a complete checkpoint folder (no {STATE_NAME})")
    if not _STEP_DIR.match(path.name):
        raise ConfigError(
            f"train.resume={resume!r}: a SLURM job resumes from catdog-train's own checkpoint folders "
            "(checkpoints/step_NNNNNNNN); pass one of those"
        )
    step = int(_STEP_DIR.match(path.name).group(1))
    newer = [p for p in complete_checkpoints(root) if int(_STEP_DIR.match(p.name).group(1)) > step]
    if newer:
        raise ConfigError(
            f"train.resume={resume!r}: run.dir {run_dir} already holds a newer checkpoint ({newer[-1].name}), which a "
            "requeued job would continue instead; use a new run.dir to continue from this checkpoint, or "
            f"train.resume=auto to continue {newer[-1].name}"
        )
    return adopt(path, root)


def adopt(path: Path, root: Path) -> Path:
    """Resume from a checkpoint of ANOTHER run: copy it (and that run's best checkpoint, which early stopping and
    the final test scoring refer to by name) into this run's ``root``, so the run dir is self-contained and a
    later auto-resume or requeue finds it. Copies go through a temp folder and a rename. Returns the copy."""
    path = path.resolve()
    if path.parent == root.resolve():
        return path
    state = TrainerState.from_json(path / STATE_NAME)
    names = [path.name] + ([state.best_checkpoint] if state.best_checkpoint not in ("", path.name) else [])
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = path.parent / name, root / name
        if not (src / STATE_NAME).is_file():
            continue
        if dst.exists():
            if (dst / STATE_NAME).is_file() and (dst / STATE_NAME).read_bytes() == (src / STATE_NAME).read_bytes():
                continue  # copied by an earlier start of this command
            raise ConfigError(
                f"train.resume={path}: this run dir already has a different {dst}; resume it with "
                "train.resume=auto, or use a new run.dir to continue from the other run's checkpoint"
            )
        tmp = root / f".tmp-copy-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(dst)
    return root / path.name
