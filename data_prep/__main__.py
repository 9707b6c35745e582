"""catdog-prep / python -m data_prep: shard a folder of photos into WebDataset tars."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from data_prep import sizes
from data_prep.cli import Parser, add_no_progress, add_out
from data_prep.cpus import usable_cpus
from data_prep.errors import PrepError
from data_prep.prepare import PrepArgs, run
from data_prep.scan import LAYOUTS


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '0' -> 0 (no limit)."""
    try:
        return sizes.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    d = PrepArgs(Path("."), Path("."))
    p = Parser(
        prog="catdog-prep",
        description=(
            "Shard a folder of photos into WebDataset tars (OUT/{split}-000000.tar + OUT/_info.json). "
            "Layouts: SRC/<class>/..., SRC/{train,val,validation,test}/<class>/..., Kaggle-flat "
            "SRC/<class>.<id>.jpg, or Kaggle-flat inside split folders (SRC/train/<class>.<id>.jpg). "
            "Images are EXIF-rotated, converted to RGB (alpha flattened on white), "
            "resized so the shorter side is --image-size, and stored as JPEG. Bad files are skipped and "
            "listed in OUT/skipped.jsonl. A killed run resumes when rerun with the same arguments. OUT may be "
            "s3://bucket/prefix."
        ),
        epilog="example: catdog-prep ~/photos/catsdogs shards/catsdogs --image-size 256 --workers 8",
    )
    # str, not Path: Path("s3://b/x") is "s3:/b/x", a local folder named "s3:"
    p.add_argument("src", metavar="SRC", help="folder of photos (searched recursively)")
    p.add_argument(
        "out_dir",
        nargs="?",
        metavar="OUT",
        help="output folder for the shards, or s3://bucket/prefix (endpoint and credentials from the AWS variables "
        "or a profile): shards are uploaded as they are finished, _info.json last (or --out)",
    )
    add_out(p, "output folder for the shards (the same as OUT)", metavar="OUT")
    p.add_argument(
        "--image-size",
        metavar="PX",
        type=int,
        default=d.image_size,
        help="shorter side in pixels (default %(default)s)",
    )
    p.add_argument(
        "--val-fraction",
        metavar="F",
        type=float,
        default=d.val_fraction,
        help="val share per class when SRC is not pre-split (default %(default)s)",
    )
    p.add_argument(
        "--test-fraction",
        metavar="F",
        type=float,
        default=d.test_fraction,
        help="test share per class when SRC is not pre-split (default %(default)s)",
    )
    p.add_argument(
        "--shard-max-count",
        metavar="N",
        type=int,
        default=d.shard_max_count,
        help="samples per shard at most; 0 = no limit (default %(default)s). A shard closes at whichever limit comes first",
    )
    p.add_argument(
        "--shard-max-size",
        metavar="SIZE",
        type=parse_size,
        default=d.shard_max_size,
        help="bytes per shard at most, e.g. 256MB or 1GiB; 0 = no limit (default 256MB)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=usable_cpus(),
        help="decode/encode processes (default: all %(default)s cores); the output is identical for any value",
    )
    p.add_argument("--quality", metavar="Q", type=int, default=d.quality, help="JPEG quality (default %(default)s)")
    p.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=d.seed,
        help="seed of the split assignment and shard order (default %(default)s)",
    )
    p.add_argument(
        "--max-pixels",
        metavar="N",
        type=int,
        default=d.max_pixels,
        help="skip images with more pixels than this as decompression bombs (default %(default)s)",
    )
    p.add_argument(
        "--min-size",
        metavar="PX",
        type=int,
        default=d.min_size,
        help="skip images whose shorter side is below this (default %(default)s px)",
    )
    p.add_argument(
        "--max-aspect",
        metavar="R",
        type=float,
        default=d.max_aspect,
        help="cap on long/short side: longer images are centre-cropped along the long side to this ratio "
        "before resizing, so a panorama does not become a huge strip (default %(default)s)",
    )
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="force the input layout (default: detect)")
    p.add_argument(
        "--force", action="store_true", help="replace catdog-prep output already in OUT (other files are kept)"
    )
    add_no_progress(p)
    p.add_argument(
        "--stage",
        metavar="DIR",
        type=Path,
        help="OUT at s3://: local folder where finished shards wait for their upload (default: one per OUT in the "
        "temp folder); a rerun on this machine resumes from it",
    )
    return p


class Terminated(BaseException):
    """SIGTERM (SLURM preemption or time limit, ``timeout``, ``kill``) raised in the main thread.

    A BaseException like KeyboardInterrupt, so the same clean-up runs: workers stopped, the unfinished
    temp shard deleted, the progress file of the finished shards kept for the rerun.
    """


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if (ns.out is None) == (ns.out_dir is None):
        parser.error("pass the output folder once: as OUT or as --out/-o" if ns.out else "OUT (or --out) is required")
    signal.signal(signal.SIGTERM, _raise_terminated)
    args = PrepArgs(
        src=ns.src,
        out=ns.out or ns.out_dir,
        image_size=ns.image_size,
        val_fraction=ns.val_fraction,
        test_fraction=ns.test_fraction,
        shard_max_count=ns.shard_max_count,
        shard_max_size=ns.shard_max_size,
        workers=ns.workers,
        quality=ns.quality,
        seed=ns.seed,
        max_pixels=ns.max_pixels,
        min_size=ns.min_size,
        max_aspect=ns.max_aspect,
        layout=ns.layout,
        force=ns.force,
        progress=not ns.no_progress,  # off also when CATDOG_PROGRESS=off (data_prep/progress.py)
        stage=ns.stage,
    )
    try:
        run(args)
    except PrepError as e:
        print(f"catdog-prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("catdog-prep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("catdog-prep: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
