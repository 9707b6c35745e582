"""The run directory's layout: what catdog-train writes where, and the rules every reader of a run dir follows.

One module owns it: the trainer's checkpointing (train/run/checkpoint.py, which adds Accelerate's state handling),
the bundle code, catdog-report and the launchers all read folder and file names from here.

    run.dir/
      config.yaml                 the resolved config of the latest start
      checkpoints/step_00000123/  model.safetensors, optimizer.bin, random_states_<rank>.pkl (Accelerate's),
                                  trainer_state.json (TrainerState), ema.safetensors with train.ema
      metrics.jsonl, final_metrics.json, metrics.csv, plots/, tensorboard/, wandb/, wandb_run_id, train.log
      model/                      the bundle of the best checkpoint (train/formats/bundle.py)
      previous/<stamp>/           what train.resume=none moved aside

A ``step_*`` folder is complete by construction: it is written as a hidden ``.tmp-*`` folder and renamed when done,
so a kill leaves at most a hidden folder, which the next start deletes (``remove_partial``). Which weights a
checkpoint was VALIDATED with is its trainer_state.json's ``eval_weights`` (``validated_weights``): anything that
scores, bundles or exports a checkpoint reads that file; ``model.safetensors`` holds the raw training weights, which
resuming needs.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from train.config import ConfigError

CONFIG_NAME = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
METRICS_NAME = "metrics.jsonl"
FINAL_NAME = "final_metrics.json"
CSV_NAME = "metrics.csv"
WANDB_ID_FILE = "wandb_run_id"
PLOTS_DIR = "plots"
BUNDLE_DIR = "model"
PREVIOUS_DIR = "previous"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

# What a run dir holds from a previous start that a fresh start (train.resume=none) must not continue or mix
# with: checkpoints, the tracker state that would reattach to the old W&B run or keep its rows, old results.
RUN_STATE = (
    CHECKPOINTS_DIR,
    WANDB_ID_FILE,
    "wandb",
    "tensorboard",
    CSV_NAME,
    METRICS_NAME,
    FINAL_NAME,
    PLOTS_DIR,
    BUNDLE_DIR,
)


class RunDirError(ValueError):
    """A run dir or checkpoint folder cannot be read; the message names the file and what to do."""


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped (trainer_state.json)."""

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
    fingerprint: dict = field(default_factory=dict)  # what weights and position depend on (train/run/checkpoint.py)
    eval_weights: str = MODEL_WEIGHTS  # the weights file validation scored (ema.safetensors with train.ema)
    precision: str = ""  # what training and validation computed in (Accelerate's no/bf16/fp16, auto resolved)

    @classmethod
    def from_json(cls, path: Path) -> TrainerState:
        known = {k: v for k, v in read_state(path).items() if k in cls.__dataclass_fields__}
        return cls(**known)


def read_state(path: Path) -> dict:
    """A trainer_state.json as a plain dict (what inference reads: no dataclass defaults filled in)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(state, dict):
        raise RunDirError(f"{path} is not a catdog trainer state (not a JSON object)")
    return state


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The optimizer step a checkpoint folder name stands for; None for anything else."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root`` (run.dir/checkpoints), oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: step_of(p.name))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def validated_weights(folder: Path) -> Path:
    """The weights file checkpoint ``folder`` was validated with (its ``eval_weights``): ``model.safetensors``, or
    ``ema.safetensors`` when the run kept a weight EMA. What to score, bundle or export."""
    name = read_state(folder / STATE_NAME).get("eval_weights", MODEL_WEIGHTS)
    if not isinstance(name, str) or "/" in name or not name.endswith(".safetensors"):
        raise RunDirError(f"{folder / STATE_NAME}: eval_weights={name!r} is not a weights file of that folder")
    return folder / name


def remove_partial(root: Path) -> None:
    """Delete temp folders a killed save left behind (main process, before anything is written)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


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
    root = run_dir / CHECKPOINTS_DIR
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"train.resume={resume!r} is not a complete checkpoint folder (no {STATE_NAME})")
    step = step_of(path.name)
    if step is None:
        raise ConfigError(
            f"train.resume={resume!r}: a SLURM job resumes from catdog-train's own checkpoint folders "
            "(checkpoints/step_NNNNNNNN); pass one of those"
        )
    newer = [p for p in complete_checkpoints(root) if step_of(p.name) > step]
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
