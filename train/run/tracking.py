"""Experiment trackers through Accelerate (W&B, TensorBoard) plus a CSV tracker of our own.

Only the main process creates trackers or logs (Accelerate's trackers are main-process-only). W&B runs online where
an API key is set up and offline otherwise, unless ``WANDB_MODE`` (or ``track.wandb.mode``) says otherwise; its run id lives in
``run.dir/wandb_run_id`` so a resumed or requeued run continues the same W&B run.

At the end of a run (``log_run_end``) W&B also gets what its own integrations log: the final metrics in the run
summary, the shards' ``_info.json`` as a ``dataset`` artifact the run used (lineage), and the model bundle as a
``model`` artifact ``model-<run id>`` with aliases ``best`` and ``latest`` -- Lightning's ``WandbLogger(
log_model=True)``: one version per finished session, so a resumed or requeued run adds a version to the same
artifact. Models are not logged during training (Lightning's ``log_model="all"``): an InceptionV3 bundle is
~87 MB a version, and the checkpoints in run.dir already cover a resume.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, on_main_process

from data_prep import storage
from data_prep.atomic import atomic_write_text
from data_prep.info import INFO_NAME, DatasetInfo
from data_prep.storage.errors import scrub
from data_prep.storage.urls import redact
from train.config import Config
from train.config_io import to_dict
from train.formats.bundle import META_NAME
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
    """WANDB_MODE in the environment wins; otherwise track.wandb.mode (auto: online where a key is set up)."""
    return cfg.track.wandb.resolved_mode()


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


def wandb_run(accelerator: Accelerator):
    """The W&B run on the main process when W&B is tracked and enabled; None elsewhere."""
    if not accelerator.is_main_process:
        return None
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
    except ValueError:  # trackers, but no wandb among them
        return None
    if not hasattr(run, "log_artifact") or getattr(run, "disabled", False):
        return None
    return run


def log_plots(accelerator: Accelerator, plots: dict[str, Path], step: int) -> None:
    """Send the PNG plots to W&B (the only backend here that shows images usefully)."""
    run = wandb_run(accelerator) if plots else None
    if run is None:
        return
    import wandb

    run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in plots.items() if path.is_file()}, step=step)


def log_run_end(accelerator: Accelerator, cfg: Config, info: DatasetInfo, final: dict, bundle: Path | None) -> None:
    """W&B only (a no-op elsewhere): ``final`` in the run summary, the shards as the run's input, ``bundle`` (the
    run's model folder, None when there is none) as its output. A failure is a warning naming what was not logged:
    the run's own files are complete by now, and a finished training must not fail over its upload."""
    run = wandb_run(accelerator)
    if run is None:
        return
    _attempt("the final metrics (run summary)", lambda: run.summary.update(summary_values(final)))
    _attempt(f"the dataset artifact of {redact(cfg.data.dir)}", lambda: use_dataset(run, cfg.data.dir, info))
    if bundle is not None:
        _attempt(f"the model artifact model-{run.id} ({bundle})", lambda: log_model(run, bundle))


def summary_values(final: dict) -> dict:
    """The run summary's entries: every scalar and string of final_metrics.json under its own name."""
    return {k: v for k, v in final.items() if isinstance(v, (int, float, str, bool))}


def log_model(run, bundle: Path) -> None:
    """``bundle``'s files as version N of the ``model`` artifact ``model-<run id>``, aliases best and latest.

    The name is the run's, like Lightning's ``model-<id>``: every session of the run (a resume, a requeue, more
    epochs) adds a version to the same artifact. The bundle holds the best checkpoint's weights, so the newest
    version is both the best and the latest; W&B moves both aliases to it.
    """
    import wandb

    meta = json.loads((bundle / META_NAME).read_text())
    training = meta.get("training", {})
    artifact = wandb.Artifact(
        f"model-{run.id}",
        type="model",
        description=f"catdog model bundle ({meta['model']['name']}, classes {', '.join(meta['classes'])})",
        metadata={
            "model": meta["model"]["name"],
            "classes": meta["classes"],
            "checkpoint": training.get("checkpoint"),
            "step": training.get("step"),
            "epoch": training.get("epoch"),
            "score": training.get("best_metric"),
            "monitor": training.get("early_stop_metric"),
            "metrics": meta.get("metrics", {}),
            "weights_sha256": meta.get("weights_sha256"),
        },
    )
    # Copied into W&B's staging folder now (the default "mutable" policy): a later session rewrites run.dir/model/
    # before an offline run is synced, and each version must upload the files it was logged with.
    artifact.add_dir(str(bundle))
    run.log_artifact(artifact, aliases=["best", "latest"])


def dataset_name(info: DatasetInfo, where: storage.Location) -> str:
    """The dataset artifact's name: _info.json's ``name`` (catdog-prep: the photo folder's name), else the
    shard folder's; W&B allows letters, digits, ``-``, ``_`` and ``.``. Versions are told apart by content."""
    raw = str(info.raw.get("name") or where.name or "shards")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "shards"


def use_dataset(run, data_dir: str, info: DatasetInfo) -> None:
    """The shards' _info.json as a ``dataset`` artifact this run used (W&B's lineage: data -> run -> model).

    Only _info.json is stored (it names every shard with its sha256), so two runs on the same shards log the
    same content and W&B keeps one version for both; the shards stay where they are, their location kept as
    metadata, never checksummed or uploaded (an s3:// folder is read once, for _info.json).
    """
    import wandb

    where = storage.Location.parse(data_dir)  # a local path or a URL (its credentials never reach the metadata)
    data = storage.read_bytes(where.join(INFO_NAME))
    splits = info.distinct_splits
    artifact = wandb.Artifact(
        dataset_name(info, where),
        type="dataset",
        description="catdog shards (WebDataset tars); _info.json lists each shard and its sha256",
        metadata={
            "dir": str(where.path.resolve()) if where.is_local else str(where),
            "info_sha256": hashlib.sha256(data).hexdigest(),
            "classes": list(info.classes),
            "num_samples": {name: s.num_samples for name, s in splits.items()},
            "shards": sum(len(s.filenames) for s in splits.values()),
        },
    )
    with artifact.new_file(INFO_NAME, mode="wb") as f:
        f.write(data)
    # run.use_artifact() refuses to run offline ("Cannot use artifact when in offline mode"). For an artifact not
    # logged before, it logs it flagged use-after-commit and then waits for the upload; the flag is what marks the
    # use, and `wandb sync` replays it from an offline run's records. Logging with the flag directly gives both
    # modes one path, the one the offline tests read back, and never blocks the end of a run on an upload.
    log_use = getattr(run, "_log_artifact", None)
    if log_use is None:  # a wandb without it: the public call (online only)
        run.use_artifact(artifact)
    else:
        log_use(artifact, is_user_created=True, use_after_commit=True)


def _attempt(what: str, action: Callable[[], object]) -> None:
    """Run ``action``; on failure log one warning naming ``what`` (no traceback, no credential)."""
    try:
        action()
    except Exception as e:  # noqa: BLE001 - the upload is a courtesy; the run's files are the record
        message = scrub(" ".join(str(e).split())[:400])  # AWS secrets, should a storage message echo one
        key = os.environ.get("WANDB_API_KEY", "")
        if len(key) >= 8:
            message = message.replace(key, "***")
        log.warning("W&B: could not log %s (%s: %s); the run's files are complete", what, type(e).__name__, message)
