"""``python -m train --config configs/cnn.yaml key=value ...`` (also ``catdog-train``, ``accelerate launch -m train``)."""

from __future__ import annotations

import argparse
import sys

from data_prep.info import InfoError
from train.config import ConfigError, load_config
from train.data.reader import DataError
from train.data.workers import worker_died
from train.run.checkpoint import CheckpointError
from train.run.main import main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="catdog-train",
        description="Train an image classifier on catdog shards. Reusing run.dir resumes from its newest checkpoint.",
    )
    parser.add_argument("--config", help="YAML config (e.g. configs/cnn.yaml); omitted = defaults")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.dir=shards train.epochs=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"catdog-train: config error: {e}", file=sys.stderr)
        return 2
    # Bad input becomes one line naming what to fix (the exceptions' messages do); anything else is a bug and
    # keeps its traceback.
    try:
        main(cfg)
    except (ConfigError, InfoError) as e:
        print(f"catdog-train: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError) as e:
        print(f"catdog-train: {_last_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        if (death := worker_died(e)) is None:
            raise
        print(
            f"\ncatdog-train: {death}; training stopped. Run the same command again to resume from the last "
            f"checkpoint in {cfg.run.dir}; if this happens again, lower data.num_workers (was {cfg.data.workers()})",
            file=sys.stderr,
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
