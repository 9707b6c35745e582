"""``python -m train --config configs/cnn.yaml key=value ...`` (also ``catdog-train``, ``accelerate launch -m train``)."""

from __future__ import annotations

import sys

from data_prep.cli import Parser, add_no_progress, add_out, say
from data_prep.info import InfoError
from data_prep.progress import disable_progress
from train.config import ConfigError
from train.config_io import load_config, with_out
from train.data.workers import worker_died
from train.run.main import EXPLAINED, main


def cli(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="catdog-train",
        description="Train an image classifier on catdog shards. Reusing run.dir resumes from its newest checkpoint.",
        epilog="examples of keys: train.mixed_precision=auto|fp32|bf16|fp16 (no = fp32; fp16 applies on GPUs only), "
        "data.num_workers=auto|N, train.epochs=N; every key is in train/config.py",
    )
    parser.add_argument("--config", help="YAML config (e.g. configs/cnn.yaml); omitted = defaults")
    add_out(parser, "the run directory (the same as run.dir=DIR)", metavar="DIR")
    add_no_progress(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.dir=shards train.epochs=3")
    args = parser.parse_intermixed_args(argv)  # overrides may sit between options
    if args.no_progress:
        disable_progress()
    try:
        cfg = load_config(args.config, with_out(args.overrides, args.out))
    except ConfigError as e:
        say(f"catdog-train: config error: {e}")
        return 2
    # Bad input becomes one line naming what to fix (the exceptions' messages do); anything else is a bug and
    # keeps its traceback.
    try:
        main(cfg)
    except EXPLAINED as e:
        bad_input = isinstance(e, (ConfigError, InfoError))  # exit 2; a broken sample or checkpoint: exit 1
        say(f"catdog-train: {e if bad_input else _last_line(e)}")
        return 2 if bad_input else 1
    except Exception as e:
        if (death := worker_died(e)) is None:
            raise
        say(
            f"\ncatdog-train: {death}; training stopped. Run the same command again to resume from the last "
            f"checkpoint in {cfg.run.dir}; if this happens again, lower data.num_workers (was {cfg.data.workers()})"
        )
        return 1
    return 0


def _last_line(e: Exception) -> str:
    """The message itself: an error raised in a DataLoader worker arrives wrapped in the worker's traceback,
    whose last line is ``module.Type: message``."""
    line = str(e).strip().splitlines()[-1]
    return line.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")


if __name__ == "__main__":
    sys.exit(cli())
