"""Download the public cats_and_dogs_filtered photos for `make demo` (when DATA_DIR is not set).

    python -m data_prep.fetch      # prints the dataset folder on stdout (progress goes to stderr)

The archive is downloaded into ~/.cache/catdog (or $XDG_CACHE_HOME/catdog) through a temp file,
extracted into a temp folder, and only renamed into place when its photos match a known content
checksum: the sha256 of the sorted per-file sha256 hex digests of all *.jpg files. That checksum
does not depend on paths or the zip container, so it is the same for any copy of these 3,000 photos.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
NAME = "cats_and_dogs_filtered"
NUM_FILES = 3000
CONTENT_SHA256 = "4f98e9cd336b29019966f18d283341e76f213d73500fcad569660a312b40b65a"


class FetchError(RuntimeError):
    """Download or verification failed; the message says what to do instead (``instead``: set DATA_DIR, ...)."""


# What a user of `make demo` can do instead of the download.
DEMO_INSTEAD = "set DATA_DIR to a folder of photos (e.g. make demo DATA_DIR=/path/to/catsdogs)"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "catdog"


def content_checksum(folder: str | os.PathLike) -> tuple[str, int]:
    """(sha256 over the sorted sha256 hex digests of every *.jpg under folder, number of files)."""
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*.jpg") if p.is_file())
    return hashlib.sha256("".join(digests).encode()).hexdigest(), len(digests)


def verify(folder: str | os.PathLike, instead: str = DEMO_INSTEAD) -> None:
    """Raise FetchError unless folder holds exactly the cats_and_dogs_filtered photos."""
    digest, n = content_checksum(folder)
    if (digest, n) != (CONTENT_SHA256, NUM_FILES):
        raise FetchError(
            f"{folder}: photos do not match cats_and_dogs_filtered ({n} files, content sha256 {digest[:12]}... "
            f"expected {NUM_FILES} files, {CONTENT_SHA256[:12]}...); delete it and retry, or {instead}"
        )


def _download(url: str, dest: Path, instead: str) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"could not download {url} ({getattr(e, 'reason', e)}); offline? {instead}") from None


def fetch(root: Path | None = None, url: str = URL, instead: str = DEMO_INSTEAD) -> Path:
    """The verified dataset folder, downloading and extracting it first if needed. ``instead``: what the error
    messages tell the user to do when that fails."""
    root = root or cache_dir()
    final = root / NAME
    if final.is_dir():
        verify(final, instead)
        return final
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{NAME}.zip"
    if not archive.is_file():
        print(f"downloading {url} -> {archive}", file=sys.stderr)
        _download(url, archive, instead)
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # zipfile drops absolute paths and '..' components
        except zipfile.BadZipFile:
            archive.unlink()
            raise FetchError(f"{archive} is not a valid zip (deleted it); run again, or {instead}") from None
        extracted = Path(tmp) / NAME
        try:
            verify(extracted, instead)
        except FetchError:
            archive.unlink()  # a bad download must not be trusted on the next run
            raise
        os.replace(extracted, final)
    return final


# The photos by split and class, as the tests and benchmarks address them (train/cat/cat.0.jpg, val/dog/...), from
# the download's folders (train/cats, validation/cats, ...).
SPLIT_LAYOUT = {
    "train/cat": "train/cats",
    "train/dog": "train/dogs",
    "val/cat": "validation/cats",
    "val/dog": "validation/dogs",
}
VIEW_NAME = "catsdogs-split"


def in_split_layout(folder: Path) -> bool:
    return all((folder / d).is_dir() for d in SPLIT_LAYOUT)


def split_view(folder: Path, view: Path) -> Path:
    """``view``: ``folder`` (in the download's layout) seen in the split layout, made of hard links (no second copy
    of the bytes; a copy across filesystems) and put in place by one rename. Built once; reused after."""
    if in_split_layout(view):
        return view
    view.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=view.parent, prefix=f".{view.name}.tmp-"))
    try:
        for ours, theirs in SPLIT_LAYOUT.items():
            (tmp / ours).mkdir(parents=True)
            for photo in (folder / theirs).glob("*.jpg"):
                try:
                    os.link(photo, tmp / ours / photo.name)
                except OSError:
                    shutil.copy2(photo, tmp / ours / photo.name)
        os.replace(tmp, view)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return view


def photos_by_split(given: str | None = None) -> Path:
    """The 3,000 photos in the split layout: ``given`` (CATDOG_REAL_DATA by default) in either layout, else the
    verified download, fetched if needed. Raises FetchError saying what to do."""
    given = os.environ.get("CATDOG_REAL_DATA") if given is None else given
    instead = "point CATDOG_REAL_DATA at a copy of cats_and_dogs_filtered (train/, val/ folders)"
    if given:
        folder = Path(given).expanduser()
        if in_split_layout(folder):
            return folder
        if all((folder / d).is_dir() for d in SPLIT_LAYOUT.values()):
            return split_view(folder, folder.parent / f"{folder.name}-{VIEW_NAME}")
        raise FetchError(
            f"CATDOG_REAL_DATA={given} holds neither train/ and val/ (cat, dog) nor train/ and validation/ (cats, dogs) "
            "folders: point it at a copy of cats_and_dogs_filtered"
        )
    return split_view(fetch(instead=instead), cache_dir() / VIEW_NAME)


def main() -> int:
    try:
        print(fetch())
    except FetchError as e:
        print(f"catdog fetch: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
