"""How a start begins: rank 0 decides what to resume from, every rank loads it, the trackers reattach."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from train.config import Config, ConfigError
from train.config_io import save_config
from train.formats.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    CSV_NAME,
    EMA_WEIGHTS,
    STATE_NAME,
    TrainerState,
    adopt,
    latest_checkpoint,
    remove_partial,
    start_over,
)
from train.run import checkpoint as ckpt
from train.run import tracking
from train.run.session import Run

log = logging.getLogger("catdog")


@dataclass
class StartNote:
    checkpoint: Path | None  # what to resume from, as rank 0 decided
    moved: Path | None  # where train.resume=none moved a previous start's state


def decide_start(cfg: Config, acc: Accelerator) -> StartNote:
    """Rank 0 decides what this start resumes from and tells the others (one broadcast).

    Ranks must not each list checkpoints/ on their own: on NFS or Lustre with attribute caching, right after a
    requeue, they can see different folders and then load different states or wait in different collectives.
    An error on rank 0 (a bad train.resume path) is broadcast too, so every rank raises it instead of hanging.
    """
    note: list = [None]
    if acc.is_main_process:
        try:
            note[0] = _start_on_main(cfg)
        except Exception as e:  # noqa: BLE001 - any error must reach every rank, or they wait in the broadcast
            note[0] = e
    if acc.num_processes > 1:
        broadcast_object_list(note, from_process=0)
    if isinstance(note[0], Exception):
        raise note[0]
    return note[0]


def _start_on_main(cfg: Config) -> StartNote:
    run_dir = Path(cfg.run.dir)
    root = run_dir / CHECKPOINTS_DIR
    remove_partial(root)
    mode = cfg.train.resume
    if mode == "none":
        return StartNote(None, start_over(run_dir, time.strftime("%Y%m%d-%H%M%S")))
    if mode == "auto":
        return StartNote(latest_checkpoint(root), None)
    path = Path(mode).expanduser()
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"train.resume={mode!r} is not a complete checkpoint folder (no {STATE_NAME})")
    return StartNote(adopt(path, root), None)


def resume(run: Run, path: Path | None) -> TrainerState:
    """The state to start from: a fresh one, or the checkpoint rank 0 picked (loaded on every rank)."""
    state = TrainerState(fingerprint=run.fingerprint)
    if path is not None:
        # Read the JSON state first: a checkpoint from another config is refused before any tensor is loaded.
        ckpt.check_resumable(path, TrainerState.from_json(path / STATE_NAME), run.fingerprint)
        state = ckpt.load_checkpoint(run.acc, path)
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, state.epoch, state.batch_in_epoch, state.step)
        if run.ema is not None:
            if (path / EMA_WEIGHTS).is_file():
                run.ema.load(path / EMA_WEIGHTS)
            else:
                log.warning(
                    "train.ema=true but %s has no %s: the average starts from the resumed weights", path, EMA_WEIGHTS
                )
        saved_world = state.fingerprint.get("world_size", run.acc.num_processes)
        if saved_world != run.acc.num_processes:
            log.warning(
                "resuming a run saved on %d process(es) on %d: the data position carries over (it counts global "
                "batches), the per-rank random number streams do not",
                saved_world,
                run.acc.num_processes,
            )
        state.fingerprint = run.fingerprint
    state.precision = run.acc.mixed_precision  # train.mixed_precision=auto resolved on this hardware (bundles say it)
    run.seconds_before = state.train_seconds
    run.session_start = time.perf_counter()
    return state


def start_trackers(run: Run, state: TrainerState) -> None:
    """config.yaml, the CSV cut back to the checkpoint, the W&B id; then the trackers (every rank calls this)."""
    cfg, acc = run.cfg, run.acc
    if acc.is_main_process:
        save_config(cfg, run.dir / CONFIG_NAME)  # only once the checkpoint (if any) was accepted for it
        # Rows the killed session logged after its last checkpoint are re-logged by this one: drop them first.
        tracking.truncate_csv(run.dir / CSV_NAME, state.step)
        state.wandb_run_id = tracking.wandb_run_id(run.dir, state.wandb_run_id) if "wandb" in cfg.track.backends else ""
    tracking.init_trackers(acc, cfg, run.dir, state.wandb_run_id, resume_step=state.step)
