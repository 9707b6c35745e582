"""``catdog-report RUN_DIR... --out report/``: runs side by side, one table row and one confusion matrix each.

Writes ``report.md`` (one Markdown table row per run: model, weights, mode, val accuracy / precision / recall / F1 /
ROC-AUC at the kept (best) epoch, training time, images/s), ``val_curves.png`` (every run's validation accuracy
and loss, by epoch and by training time) and ``confusion_matrices.png`` (each run's val confusion matrix at its
best epoch, side by side), and prints the table. With ``--wandb`` (or when the first run tracked to W&B) the same
table and figures are logged to W&B as a ``report`` job. Reads only what a run dir holds: config.yaml,
metrics.jsonl, final_metrics.json and the best checkpoint's trainer_state.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from data_prep.atomic import atomic_write_bytes, atomic_write_text
from data_prep.cli import Parser, add_no_progress, add_out
from data_prep.info import INFO_NAME
from train.config import WandbConfig
from train.formats.rundir import CHECKPOINTS_DIR, CONFIG_NAME, FINAL_NAME, METRICS_NAME, STATE_NAME
from train.plots import draw_confusion, figure_png, plt

COLUMNS = (
    "run",
    "model",
    "weights",
    "mode",
    "epoch",
    "val acc",
    "precision",
    "recall",
    "F1",
    "ROC-AUC",
    "train time",
    "images/s",
)


class ReportError(ValueError):
    """A run dir cannot be reported on; the message names it and what is missing."""


@dataclass
class RunSummary:
    name: str
    path: Path
    config: dict
    history: list[dict]
    final: dict
    best_row: dict
    confusion: list[list[int]] | None
    classes: list[str]
    train_samples: int = 0

    @property
    def model(self) -> str:
        m = self.config.get("model", {})
        if m.get("name") == "scratch_cnn":
            return f"scratch CNN ({m.get('depth')}x{m.get('width')}, {m.get('image_size')} px)"
        return f"{m.get('name')} ({self.config.get('model', {}).get('image_size') or 299} px)"

    @property
    def weights(self) -> str:
        return str(self.config.get("model", {}).get("weights", "none"))

    @property
    def mode(self) -> str:
        m, t = self.config.get("model", {}), self.config.get("train", {})
        if m.get("name") != "inception_v3" or m.get("weights", "none") == "none":
            return "from scratch"
        if m.get("freeze_backbone"):
            return "feature extraction" + (" (cached features)" if t.get("precompute_features") else "")
        blocks = m.get("trainable_blocks", -1)
        scale = self.config.get("optim", {}).get("backbone_lr_scale", 1.0)
        what = "all layers" if blocks < 0 else f"last {blocks} blocks"
        return f"fine-tuning ({what}, backbone LR x{scale:g})"

    def row(self) -> list[str]:
        b = self.best_row
        seconds = float(self.final.get("train_seconds", b.get("time_s", 0.0)))
        # Training images per second of the whole training time (feature extraction, evaluation and all): the
        # figure that compares a scratch run with a cached-feature one. Logged step throughput only as a fallback.
        ips = [h["train/images_per_s"] for h in self.history if "train/images_per_s" in h]
        overall = len(self.history) * self.train_samples / seconds if self.train_samples and seconds > 0 else None
        return [
            self.name,
            self.model,
            self.weights,
            self.mode,
            f"{b.get('epoch', '?')}/{len(self.history)}",
            _pct(b.get("val/accuracy")),
            _pct(b.get("val/precision")),
            _pct(b.get("val/recall")),
            _pct(b.get("val/f1")),
            f"{b['val/auroc']:.4f}" if isinstance(b.get("val/auroc"), float) else "-",
            _duration(seconds),
            f"{overall:.1f}" if overall else (f"{sum(ips) / len(ips):.0f}" if ips else "-"),
        ]


def _pct(v) -> str:
    return f"{100 * v:.2f} %" if isinstance(v, (int, float)) else "-"


def _duration(s: float) -> str:
    return f"{int(s // 60)} min {s % 60:04.1f} s" if s >= 60 else f"{s:.1f} s"


def load_run(path: Path) -> RunSummary:
    """Read one run dir; ReportError names the file that is missing."""
    for name in (CONFIG_NAME, METRICS_NAME, FINAL_NAME):
        if not (path / name).is_file():
            raise ReportError(f"{path}: no {name}; is this a finished catdog-train run dir (run.dir)?")
    # Plain YAML, not the typed schema: a run written by another catdog version may have other keys.
    config = OmegaConf.to_container(OmegaConf.load(path / CONFIG_NAME), resolve=True)
    history = [json.loads(line) for line in (path / METRICS_NAME).read_text().splitlines() if line.strip()]
    final = json.loads((path / FINAL_NAME).read_text())
    if not history:
        raise ReportError(f"{path}: metrics.jsonl has no finished epoch")
    best_epoch = final.get("best_epoch", -1)
    best_row = next((h for h in history if h["epoch"] == best_epoch), history[-1])
    confusion = None
    best = path / CHECKPOINTS_DIR / str(final.get("best_checkpoint", "")) / STATE_NAME
    if final.get("best_checkpoint") and best.is_file():
        confusion = json.loads(best.read_text()).get("last_eval", {}).get("confusion_matrix")
    classes, train_samples = [], 0
    info = Path(str(config.get("data", {}).get("dir", ""))) / INFO_NAME
    if info.is_file():
        raw = json.loads(info.read_text())
        classes = list(raw.get("classes", []))
        split = config.get("data", {}).get("train_split", "train")
        train_samples = int(raw.get("splits", {}).get(split, {}).get("num_samples", 0))
    if confusion and len(classes) != len(confusion):
        classes = [str(i) for i in range(len(confusion))]
    name = config.get("run", {}).get("name") or path.name
    return RunSummary(name, path, config, history, final, best_row, confusion, classes, train_samples)


def markdown_table(runs: list[RunSummary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r.row()) + " |" for r in runs]
    return "\n".join(lines) + "\n"


def curves_png(runs: list[RunSummary]) -> bytes:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in runs:
        rows = [h for h in r.history if "val/accuracy" in h]
        epochs = [h["epoch"] for h in rows]
        (line,) = axes[0].plot(epochs, [h["val/accuracy"] for h in rows], marker="o", markersize=3, label=r.name)
        times = [h.get("time_s", 0) / 60 for h in rows]
        axes[1].plot(times, [h["val/accuracy"] for h in rows], marker="o", markersize=3, color=line.get_color())
        axes[2].plot(epochs, [h["val/loss"] for h in rows], marker="o", markersize=3, color=line.get_color())
    for ax, (x, y) in zip(
        axes, (("epoch", "val accuracy"), ("training time (min)", "val accuracy"), ("epoch", "val loss")), strict=True
    ):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend()
    return figure_png(fig)


def confusion_png(runs: list[RunSummary]) -> bytes:
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.9), squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        cm = r.confusion
        if not cm:
            ax.text(0.5, 0.5, "no confusion matrix\n(no best checkpoint)", ha="center", va="center")
            ax.set_axis_off()
            continue
        title = f"{r.name}\nval, epoch {r.best_row.get('epoch', '?')}: {_pct(r.best_row.get('val/accuracy'))}"
        draw_confusion(ax, cm, r.classes, title)
    return figure_png(fig)


def log_to_wandb(runs: list[RunSummary], out: Path) -> str:
    """The table and both figures as one W&B run (job_type=report); returns its directory."""
    import wandb

    track = runs[0].config.get("track", {}).get("wandb", {})
    run = wandb.init(
        project=track.get("project", "catdog"),
        entity=track.get("entity") or None,
        mode=WandbConfig(mode=str(track.get("mode", "auto"))).resolved_mode(),
        job_type="report",
        name=f"report: {' vs '.join(r.name for r in runs)}",
        dir=str(out),
    )
    run.log(
        {
            "report/table": wandb.Table(columns=list(COLUMNS), data=[r.row() for r in runs]),
            "report/val_curves": wandb.Image(str(out / "val_curves.png")),
            "report/confusion_matrices": wandb.Image(str(out / "confusion_matrices.png")),
        }
    )
    where = run.dir
    run.finish()
    return where


def write_report(run_dirs: list[Path], out: Path, *, wandb: bool | None = None) -> str:
    """Write report.md + the two PNGs into ``out``; returns the Markdown table."""
    runs = [load_run(Path(p)) for p in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs of the same name (outputs/a/run, outputs/b/run): name them by their parent too
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.name}"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    atomic_write_bytes(out / "val_curves.png", curves_png(runs))
    atomic_write_bytes(out / "confusion_matrices.png", confusion_png(runs))
    body = (
        f"# catdog runs compared\n\n{table}\n"
        "Metrics are the validation split's at each run's kept (best) epoch; train time includes feature extraction "
        "for cached-feature runs; images/s is epochs x training images / train time (everything included).\n\n"
        "![validation curves](val_curves.png)\n\n![confusion matrices](confusion_matrices.png)\n\n"
        + "".join(f"- {r.name}: `{r.path}`\n" for r in runs)
    )
    atomic_write_text(out / "report.md", body)
    if wandb is None:
        wandb = "wandb" in runs[0].config.get("track", {}).get("backends", [])
    if wandb:
        log_to_wandb(runs, out)
    return table


def main(argv: list[str] | None = None) -> int:
    what = __doc__.splitlines()[0].split(": ", 1)[-1]
    ap = Parser(prog="catdog-report", description=what[:1].upper() + what[1:])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs (run.dir of catdog-train)")
    add_out(ap, "output folder (default: report/)", type=Path, default=Path("report"))
    add_no_progress(ap, "accepted as by every catdog command; a report shows no progress (it reads a few files)")
    ap.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None, help="also log to W&B")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"catdog-report: --out {args.out} is a file, not a folder: pass a folder for the report", file=sys.stderr)
        return 2
    try:
        table = write_report(args.runs, args.out, wandb=args.wandb)
    except ReportError as e:
        print(f"catdog-report: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"report: {args.out / 'report.md'} (+ val_curves.png, confusion_matrices.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
