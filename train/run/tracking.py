"""Experiment trackers through Accelerate (W&B, TensorBoard) plus a CSV tracker of our own.

Only the main process creates trackers or logs (Accelerate's trackers are main-process-only). W&B runs
offline unless ``WANDB_MODE`` (or ``track.wandb.mode``) says otherwise; its run id lives in
``run.dir/wandb_run_id`` so a resumed or requeued run continues the same W&B run.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import secrets
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, on_main_process

from data_prep.atomic import atomic_write_text
from train.config import Config, to_dict
from train.formats.rundir import CSV_NAME, WANDB_ID_FILE

log = logging.getLogger(__name__)


class CsvTracker(GeneralTracker):
    """Appends ``step,name,value`` rows to ``run.dir/metrics.csv`` (long format: any key, any step).

    Appending keeps a crash from losing rows; ``truncate_csv`` at (re)start drops the rows a resumed run
    will log again, so each (step, name) appears once.
    """

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self._file = None

    @on_main_process
    def start(self) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["step", "name", "value"])
            self._file.flush()

    @property
    def tracker(self):
        return self._file

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        """The config is in run.dir/config.yaml already."""

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._writer.writerow([step, k, v])
        self._file.flush()

    @on_main_process
    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_csv(path: Path, step: int) -> None:
    """Keep only the rows a checkpoint at ``step`` covers: steps <= ``step``, minus ``final/*`` (written after
    the last checkpoint, and written again at the end of this session). Atomic; no file, nothing to do."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if _covered(r, step)]
    if len(kept) < len(rows):
        out = io.StringIO()
        csv.writer(out).writerows(kept)
        atomic_write_text(path, out.getvalue())
        log.info("%s: dropped %d row(s) logged after the checkpoint at step %d", path, len(rows) - len(kept), step)


def _covered(row: list[str], step: int) -> bool:
    try:
        return int(row[0]) <= step and not row[1].startswith("final/")
    except (ValueError, IndexError):  # a row cut short by a kill mid-write
        return False


def wandb_mode(cfg: Config) -> str:
    """WANDB_MODE in the environment wins; otherwise track.wandb.mode (offline by default)."""
    return os.environ.get("WANDB_MODE") or cfg.track.wandb.mode


def wandb_run_id(run_dir: Path, saved: str = "") -> str:
    """The run's W&B id: from the checkpoint state, else run.dir/wandb_run_id, else a new one (persisted)."""
    path = run_dir / WANDB_ID_FILE
    run_id = saved or (path.read_text().strip() if path.is_file() else "")
    if not run_id:
        run_id = secrets.token_hex(8)  # W&B accepts any [a-z0-9] id; chosen by us so it is known before init
    if not path.is_file() or path.read_text().strip() != run_id:
        atomic_write_text(path, run_id + "\n")
    return run_id


def log_with(cfg: Config, run_dir: Path) -> list:
    """The ``log_with`` argument for ``Accelerator`` from track.backends."""
    out: list = []
    for name in cfg.track.backends:
        out.append(CsvTracker(run_dir / CSV_NAME) if name == "csv" else name)
    return out


def flat_config(cfg: Config) -> dict:
    """Dotted keys with scalar values: what TensorBoard's hparams accept (W&B shows them just as well)."""
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", to_dict(cfg))
    return out


def init_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path, run_id: str, resume_step: int = 0) -> None:
    """Start the configured trackers (main process only; a no-op elsewhere). Every rank may call it.

    ``resume_step``: the step of the checkpoint this session resumed from (0 = a fresh start). What the
    interrupted session logged after it is logged again by this one, so each tracker drops it first: the CSV in
    ``truncate_csv``, TensorBoard through ``purge_step``, W&B by rewinding the run (``track.wandb.rewind``).
    """
    if not cfg.track.backends:
        return
    init_kwargs: dict = {}
    if "tensorboard" in cfg.track.backends and resume_step > 0:
        init_kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    if "wandb" in cfg.track.backends:
        w = cfg.track.wandb
        if resume_step > 0 and w.rewind:
            where = {"resume_from": f"{run_id}?_step={resume_step + 1}"}
        else:
            where = {"id": run_id, "resume": "allow"}
            if resume_step > 0 and accelerator.is_main_process:
                log.warning(
                    "W&B run %s resumes at step %d: W&B ignores steps it already has, so for steps logged after "
                    "that checkpoint it keeps the interrupted session's values (the CSV and TensorBoard keep "
                    "this session's). Set track.wandb.rewind=true if your W&B account has run rewind.",
                    run_id,
                    resume_step,
                )
        init_kwargs["wandb"] = {
            "dir": str(run_dir),
            **where,
            "mode": wandb_mode(cfg),
            "name": cfg.run.name or run_dir.name,
            "tags": list(w.tags),
            **({"entity": w.entity} if w.entity else {}),
        }
    # The project name is W&B's project; TensorBoard uses it as the sub-folder of run.dir/tensorboard.
    accelerator.init_trackers(cfg.track.wandb.project, config=flat_config(cfg), init_kwargs=init_kwargs)


def log_plots(accelerator: Accelerator, plots: dict[str, Path], step: int) -> None:
    """Send the PNG plots to W&B (the only backend here that shows images usefully)."""
    if not accelerator.is_main_process or not plots:
        return
    try:
        tracker = accelerator.get_tracker("wandb", unwrap=True)
    except ValueError:
        return
    if tracker is None or not hasattr(tracker, "log"):
        return
    import wandb

    tracker.log({f"plots/{name}": wandb.Image(str(path)) for name, path in plots.items() if path.is_file()}, step=step)
