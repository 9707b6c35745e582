"""``python -m train --config configs/cnn.yaml key=value ...`` (also ``catdog-train``, ``accelerate launch -m train``)."""

from __future__ import annotations

import argparse
import sys

from train.config import ConfigError, load_config


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
    from data_prep.info import InfoError
    from train.trainer import main  # heavy imports (torch, accelerate) only after the config is valid

    try:
        main(cfg)
    except (ConfigError, InfoError) as e:
        print(f"catdog-train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
