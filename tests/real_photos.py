"""The real photos the suite trains and predicts on: ``python tests/real_photos.py`` prints their folder.

``CATDOG_REAL_DATA`` when set; otherwise the checksum-verified cats_and_dogs_filtered download that ``make demo``
uses (data_prep/fetch.py, into ~/.cache/catdog), fetched if needed. The tests address photos as
``train/cat/cat.0.jpg`` and ``val/dog/dog.2000.jpg``; the download names its folders ``train/cats`` and
``validation/cats``, so a copy in that layout gets a view in the tests' layout beside it, made of hard links (no
second copy of the bytes) and put in place by one rename. Exit 2 with one line when there are no photos to be had.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# The tests' layout <- the download's (cats_and_dogs_filtered.zip) for each folder.
LAYOUT = {
    "train/cat": "train/cats",
    "train/dog": "train/dogs",
    "val/cat": "validation/cats",
    "val/dog": "validation/dogs",
}
VIEW_NAME = "catsdogs-tests"


def in_test_layout(folder: Path) -> bool:
    return all((folder / d).is_dir() for d in LAYOUT)


def test_layout_view(folder: Path, view: Path) -> Path:
    """``view``: ``folder`` (in the download's layout) seen in the tests' layout. Built once; reused after."""
    if in_test_layout(view):
        return view
    view.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=view.parent, prefix=f".{view.name}.tmp-"))
    try:
        for ours, theirs in LAYOUT.items():
            (tmp / ours).mkdir(parents=True)
            for photo in (folder / theirs).glob("*.jpg"):
                try:
                    os.link(photo, tmp / ours / photo.name)
                except OSError:  # another filesystem (or no hard links there): a copy
                    shutil.copy2(photo, tmp / ours / photo.name)
        os.replace(tmp, view)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return view


def real_photos() -> Path:
    """The photos' folder in the tests' layout; SystemExit(2) with one line when there are none."""
    given = os.environ.get("CATDOG_REAL_DATA")
    if given:
        folder = Path(given).expanduser()
        if in_test_layout(folder):
            return folder
        if all((folder / d).is_dir() for d in LAYOUT.values()):
            return test_layout_view(folder, folder.parent / f"{folder.name}-{VIEW_NAME}")
        sys.exit(
            f"real photos: CATDOG_REAL_DATA={given} holds neither train/ and val/ (cat, dog) nor train/ and "
            "validation/ (cats, dogs) folders: point it at a copy of cats_and_dogs_filtered"
        )
    from data_prep.fetch import FetchError, cache_dir, fetch

    try:
        folder = fetch(instead="point CATDOG_REAL_DATA at a copy of cats_and_dogs_filtered (train/, val/ folders)")
    except FetchError as e:
        sys.exit(f"real photos: {e}")
    return test_layout_view(folder, cache_dir() / VIEW_NAME)


if __name__ == "__main__":
    try:
        print(real_photos())
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
