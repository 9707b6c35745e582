"""``main(cfg)``: a training run from start to end, whichever kind it is.

Works the same under ``accelerate launch``, ``torchrun``, SLURM (after submitit's
``TorchDistributedEnvironment().export()`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and a
plain ``python -m train`` (one process): Accelerate reads the process layout from the environment. The start-up is
shared; then a frozen backbone with ``train.precompute_features`` trains its head on cached features
(train/run/features.py) and everything else trains on images (train/run/images.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator

from data_prep.info import DatasetInfo, InfoError, check_train_split, load_info
from train.config import Config, ConfigError
from train.data.reader import DataError
from train.data.workers import worker_died
from train.hardware.memory import keep_freed_memory
from train.hardware.precision import auto_reason, native_bf16
from train.run.checkpoint import CheckpointError
from train.run.distributed import StopFlag
from train.run.features import train_features
from train.run.images import train_images
from train.run.setup import check_same_data, make_accelerator, setup_logging
from train.run.start import decide_start

log = logging.getLogger("catdog")

# Errors this rank raises itself with a message that explains them (catdog-train prints it as its one line).
EXPLAINED = (ConfigError, InfoError, DataError, CheckpointError)


def main(cfg: Config, stop: StopFlag | None = None) -> dict:
    """Train (resuming from run.dir when it holds a checkpoint) and return the final metrics.

    ``stop`` (SLURM jobs): when its signal arrives during the training loop, every rank stops at the same step
    boundary, a checkpoint is saved there, and main returns ``{"interrupted": True, ...}`` without scoring the test
    split; the launcher then requeues the job, which resumes from that step. Before and after the loop (start-up,
    feature extraction, the final scoring) the signal requeues at once (``StopFlag``).
    """
    info = load_info(cfg.data.dir)  # bad data is refused before anything is written
    check_train_split(info, cfg.data.train_split)
    # A val split absent from _info.json (other tools' shards may name it only "validation") fails now, not after
    # the first epoch; an empty one is evaluated as empty, as before.
    info.split(cfg.data.val_split)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(cfg, run_dir)
    try:
        final = _train(cfg, acc, info, stop)
    except Exception as e:
        _close_on_refusal(acc, e)
        raise
    acc.end_training()
    return final


def _train(cfg: Config, acc: Accelerator, info: DatasetInfo, stop: StopFlag | None) -> dict:
    check_same_data(acc, info)
    # Before the loaders fork their workers, so they inherit it (train/hardware/memory.py: ~10 % a step on CPU).
    alloc_note = keep_freed_memory() if acc.device.type == "cpu" else None
    start_note = decide_start(cfg, acc)  # before logging opens run.dir/train.log: a start-over moves files
    setup_logging(Path(cfg.run.dir), acc.is_main_process)
    if acc.is_main_process:  # once per run, not once per rank
        _log_start(cfg, acc, alloc_note, start_note.moved)
    if cfg.train.precompute_features:
        return train_features(cfg, acc, info, start_note.checkpoint)
    return train_images(cfg, acc, info, stop, start_note.checkpoint)


def _close_on_refusal(acc: Accelerator, error: Exception) -> None:
    """After this rank's own refusal (bad config or data, a checkpoint or a loader worker it explains), destroy the
    process group as ``end_training`` does on success: a gloo group left to interpreter finalisation can abort the
    rank after its one-line error (SIGABRT, "terminate called without an active exception"; about 1 in 8 two-rank
    start-ups here). Not after a failed collective: its peers may be gone and the teardown could wait on them
    (launch/slurm_job.py exits at once then)."""
    if isinstance(error, EXPLAINED) or worker_died(error) is not None:
        acc.state.destroy_process_group()


def _log_start(cfg: Config, acc: Accelerator, alloc_note: str | None, moved: Path | None) -> None:
    """What the start-up decided that the user should know: the allocator, the precision and why, a start-over."""
    if alloc_note:
        log.info("CPU memory: %s", alloc_note)
    if cfg.train.mixed_precision == "fp16" and acc.mixed_precision == "no":
        log.warning("train.mixed_precision=fp16 is not applied on CPU: training in fp32 (bf16 works on CPU)")
    if acc.mixed_precision == "bf16" and cfg.train.mixed_precision == "bf16" and not native_bf16(acc.device):
        # Honoured as configured (a user may want bf16 numerics), but it costs.
        log.warning(
            "train.mixed_precision=bf16 on %s: %s. Use train.mixed_precision=auto for fp32 here and bf16 where the "
            "hardware has it natively.",
            acc.device,
            auto_reason("no", acc.device.type),
        )
    if cfg.train.mixed_precision == "auto":
        # The reason for the choice make_accelerator made, not a second look at the hardware.
        log.info(
            "train.mixed_precision=auto: %s (%s)",
            "fp32" if acc.mixed_precision == "no" else acc.mixed_precision,
            auto_reason(acc.mixed_precision, acc.device.type),
        )
    if moved:
        log.info("train.resume=none: moved the previous start's checkpoints and tracker state to %s", moved)
