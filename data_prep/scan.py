"""Find the images under SRC, recognise the folder layout and label each file.

Nothing is opened here (only stat): a FIFO or a device named ``x.jpg`` must not block the scan, and
bad files are only *noted* so the summary can account for every path that looked like an image.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
# Folder names that mean "this split was given"; `validation` is the Keras/TF spelling of val.
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
LAYOUTS = ("auto", "folders", "presplit", "presplit-flat", "flat")
PRESPLIT_LAYOUTS = ("presplit", "presplit-flat")  # the folders give the split
LAYOUT_TEXT = {
    "folders": "class-per-folder (SRC/<class>/...)",
    "presplit": "pre-split (SRC/{train,val,test}/<class>/...)",
    "presplit-flat": "pre-split Kaggle flat (SRC/{train,val,test}/<class>.<id>.<ext>, label from the filename)",
    "flat": "Kaggle flat (SRC/<class>.<id>.<ext>, label from the filename)",
}


class ScanError(ValueError):
    """SRC cannot be used at all (missing, no images, one class); the message says what to do."""


@dataclass(frozen=True)
class Candidate:
    """One path with an image extension. ``problem`` is (reason, detail) when it cannot be used."""

    rel: str  # POSIX path relative to SRC
    label: str | None = None
    split: str | None = None  # the split the folder layout gives, if any
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class Scan:
    layout: str
    candidates: tuple[Candidate, ...]
    classes: tuple[str, ...]
    ignored: int  # files without an image extension, hidden entries, unreadable folders
    fingerprint: str  # sha256 of the sorted (path, kind, size) listing: cheap "did SRC change?" check


def _walk(src: Path, exclude: Path | None) -> tuple[list[tuple[str, str, int]], int]:
    """(rel, kind, size) for every entry with an image extension, and the number of other entries.

    kind: file | dir | broken_symlink | special. Symlinked folders are followed once (loops are cut
    by remembering (device, inode) of every folder entered).
    """
    found: list[tuple[str, str, int]] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()
    stack = [src]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            ignored += 1
            continue
        for e in entries:
            path = Path(e.path)
            if e.name.startswith("."):
                ignored += 1  # .git, .DS_Store, macOS ._x.jpg resource forks, our own temp files
                continue
            rel = path.relative_to(src).as_posix()
            is_image_name = path.suffix.lower() in IMAGE_EXTENSIONS
            try:
                is_dir = e.is_dir()
                is_file = e.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if exclude is not None and path.resolve() == exclude:
                    continue
                stack.append(path)
                if is_image_name:
                    found.append((rel, "dir", 0))
            elif not is_image_name:
                ignored += 1
            elif e.is_symlink() and not path.exists():
                found.append((rel, "broken_symlink", 0))
            elif is_file:
                try:
                    size = e.stat().st_size
                except OSError:
                    size = -1
                found.append((rel, "file", size))
            else:
                found.append((rel, "special", 0))
    found.sort()
    return found, ignored


def _name_label(name: str) -> tuple[str | None, tuple[str, str] | None]:
    """(label, problem) from a Kaggle-style file name <class>.<id>.<ext>."""
    pieces = name.split(".")
    if len(pieces) < 3 or not pieces[0]:
        return None, ("no_label", "no class prefix in the filename (expected <class>.<id>.<ext>)")
    return pieces[0], None


def _detect(rels: list[str]) -> tuple[str, str]:
    """Pick a layout from where the image files sit; returns (layout, why)."""
    top_dirs = {r.split("/", 1)[0] for r in rels if "/" in r}
    split_dirs = sorted(d for d in top_dirs if d.lower() in SPLIT_DIRS)
    if split_dirs:
        # Kaggle's dogs-vs-cats unpacks to train/cat.0.jpg: a split folder holding flat-named files.
        in_splits = [r.split("/") for r in rels if r.split("/", 1)[0] in split_dirs]
        named = sum(len(p) == 2 and _name_label(p[1])[0] is not None for p in in_splits)
        if named > sum(len(p) > 2 for p in in_splits):
            return "presplit-flat", f"{named:,} files named <class>.<id>.<ext> in split folders {', '.join(split_dirs)}"
        return "presplit", f"split folders {', '.join(split_dirs)}"
    nested = sum("/" in r for r in rels)
    if nested >= len(rels) - nested and top_dirs:
        return "folders", f"{len(top_dirs)} top-level folders"
    return "flat", f"{len(rels) - nested} images directly in SRC"


def _label(rel: str, layout: str) -> tuple[str | None, str | None, tuple[str, str] | None]:
    """(label, split, problem) for one file under the given layout."""
    parts = rel.split("/")
    if layout in PRESPLIT_LAYOUTS:
        split = SPLIT_DIRS.get(parts[0].lower())
        if split is None:
            return None, None, ("no_label", "not under a train/val/validation/test folder")
        if layout == "presplit-flat":
            label, problem = _name_label(parts[-1])
            return label, split, problem
        if len(parts) < 3:
            return None, split, ("no_label", f"directly in {parts[0]}/, expected {parts[0]}/<class>/<file>")
        return parts[1], split, None
    if layout == "folders":
        if len(parts) < 2:
            return None, None, ("no_label", "not inside a class folder (expected <class>/<file>)")
        return parts[0], None, None
    label, problem = _name_label(parts[-1])
    return label, None, problem


_KIND_PROBLEMS = {
    "dir": ("not_a_file", "a directory named like an image"),
    "broken_symlink": ("broken_symlink", "symlink to a missing file"),
    "special": ("not_a_file", "not a regular file (FIFO, socket or device)"),
}


def scan(src: str | os.PathLike, layout: str = "auto", exclude: str | os.PathLike | None = None) -> tuple[Scan, str]:
    """Scan SRC; returns the Scan and a one-line description of the layout and why it was chosen."""
    src = Path(src)
    if not src.exists():
        raise ScanError(f"SRC {src} does not exist: pass a folder of photos")
    if not src.is_dir():
        raise ScanError(f"SRC {src} is not a folder: pass a folder of photos (class subfolders or train/val/test)")
    entries, ignored = _walk(src, Path(exclude).resolve() if exclude else None)
    if not entries:
        raise ScanError(f"no images ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) found under {src}")
    files = [rel for rel, kind, _ in entries if kind == "file"]
    if layout == "auto":
        layout, why = _detect(files or [rel for rel, _, _ in entries])
        how = f"detected {LAYOUT_TEXT[layout]} from {why}"
    else:
        how = f"{LAYOUT_TEXT[layout]} (forced with --layout)"
    candidates = []
    for rel, kind, _ in entries:
        label, split, problem = _label(rel, layout)
        candidates.append(Candidate(rel, label, split, _KIND_PROBLEMS.get(kind) or problem))
    classes = tuple(sorted({c.label for c in candidates if c.problem is None and c.label is not None}))
    if len(classes) < 2:
        got = f"only class {classes[0]!r}" if classes else "no labelled images"
        raise ScanError(
            f"{got} found under {src} with the {layout} layout; a classifier needs at least 2 classes "
            "(check the folder structure or force another --layout)"
        )
    listing = "\n".join(f"{rel}\t{kind}\t{size}" for rel, kind, size in entries)
    fingerprint = hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()
    return Scan(layout, tuple(candidates), classes, ignored, fingerprint), how


def walk_images(src: str | os.PathLike) -> tuple[list[tuple[str, str, int]], int]:
    """Every entry under ``src`` with an image extension as (rel, kind, size), and the count of other entries.

    The same walk ``scan`` does (nothing opened, symlink loops cut, hidden entries ignored), for callers that
    need no labels (catdog-predict).
    """
    return _walk(Path(src), None)


def kind_problem(kind: str) -> tuple[str, str] | None:
    """(reason, detail) for an entry that is not a regular file (a ``walk_images`` kind), else None."""
    return _KIND_PROBLEMS.get(kind)
