"""Turn scanned candidates + their content hashes into the ordered list of samples to write.

Everything here is a pure function of (file contents, relative paths, seed): the listing order, the
machine and the number of workers cannot change which split an image lands in or where in the
shards it goes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass

from data_prep.info import SPLITS
from data_prep.scan import Candidate

# Duplicates across splits are kept in the split that is used for evaluation, never in train.
_KEEP_PRIORITY = {"test": 0, "val": 1, "train": 2}


@dataclass(frozen=True)
class Item:
    """One image to decode and write, at position ``index`` of the plan."""

    index: int
    rel: str
    sha256: str
    label: int
    class_name: str
    split: str
    key: str


@dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]  # train, then val, then test; shuffled within each split by a seeded hash
    skipped: tuple[dict, ...]  # scan/read problems: {"path", "reason", "detail"}
    duplicates: tuple[dict, ...]  # {"path", "reason": "duplicate", "detail", "duplicate_of", "leakage"}
    digest: str  # sha256 of the plan: a resumed run continues only if this is unchanged


def hash_file(path: str | os.PathLike) -> tuple[str | None, tuple[str, str] | None]:
    """(sha256 hex, None) or (None, (reason, detail)) for one file; never raises."""
    h = hashlib.sha256()
    n = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
    except OSError as e:
        return None, ("unreadable", f"{type(e).__name__}: {e.strerror or e}")
    if n == 0:
        return None, ("empty", "zero-byte file")
    return h.hexdigest(), None


def rank(seed: int, sha256: str) -> str:
    """Seeded pseudo-random order key of an image, from its content (stable across machines and renames)."""
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def safe_key_part(name: str) -> str:
    """A class name reduced to the key alphabet [A-Za-z0-9_-] (WebDataset splits keys at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:32] or "x"


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of n unique images, rounded half up."""
    n_test = int(n * test_fraction + 0.5)
    n_val = min(int(n * val_fraction + 0.5), n - n_test)
    return n_val, n_test


def make_plan(
    candidates: tuple[Candidate, ...],
    hashes: dict[str, tuple[str | None, tuple[str, str] | None]],
    classes: tuple[str, ...],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> Plan:
    """Deduplicate, assign splits (given, or stratified per class) and order the samples."""
    skipped: list[dict] = []
    by_sha: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        problem = c.problem
        sha = None
        if problem is None:
            sha, problem = hashes[c.rel]
        if problem is not None:
            skipped.append({"path": c.rel, "reason": problem[0], "detail": problem[1]})
            continue
        by_sha[sha].append(c)

    duplicates: list[dict] = []
    unique: list[tuple[Candidate, str]] = []
    for sha, group in by_sha.items():
        group.sort(key=lambda c: (_KEEP_PRIORITY.get(c.split or "train"), c.rel))
        kept = group[0]
        unique.append((kept, sha))
        for dup in group[1:]:
            leakage = dup.split is not None and dup.split != kept.split
            detail = f"same bytes as {kept.rel}"
            if leakage:
                detail += f" (leakage: in {dup.split} and {kept.split}; kept only in {kept.split})"
            if dup.label != kept.label:
                detail += f"; labelled {dup.label!r} here but {kept.label!r} there, kept as {kept.label!r}"
            duplicates.append(
                {
                    "path": dup.rel,
                    "reason": "duplicate",
                    "detail": detail,
                    "duplicate_of": kept.rel,
                    "leakage": leakage,
                }
            )

    split_of: dict[str, str] = {}
    if any(c.split is None for c, _ in unique):
        per_class: dict[str, list[str]] = defaultdict(list)
        for c, sha in unique:
            per_class[c.label].append(sha)
        for shas in per_class.values():
            shas.sort(key=lambda s: rank(seed, s))
            n_val, n_test = _split_counts(len(shas), val_fraction, test_fraction)
            for i, s in enumerate(shas):
                split_of[s] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    else:
        split_of = {sha: c.split for c, sha in unique}

    index = {name: i for i, name in enumerate(classes)}
    ordered = sorted(unique, key=lambda cs: (SPLITS.index(split_of[cs[1]]), rank(seed, cs[1])))
    items = []
    used_keys: set[str] = set()
    for i, (c, sha) in enumerate(ordered):
        split = split_of[sha]
        key = f"{split}_{safe_key_part(c.label)}_{sha[:16]}"
        if key in used_keys:  # a 64-bit prefix collision: a longer prefix, still deterministic and < 100 bytes
            key = f"{split}_{safe_key_part(c.label)}_{sha[:48]}"
        used_keys.add(key)
        items.append(Item(i, c.rel, sha, index[c.label], c.label, split, key))

    skipped.sort(key=lambda r: r["path"])
    duplicates.sort(key=lambda r: r["path"])
    digest = hashlib.sha256(
        "\n".join(f"{it.rel}\t{it.sha256}\t{it.split}\t{it.label}" for it in items).encode("utf-8", "surrogateescape")
    ).hexdigest()
    return Plan(tuple(items), tuple(skipped), tuple(duplicates), digest)
