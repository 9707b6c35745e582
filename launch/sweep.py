"""Sweeps: a grid (or list) of overrides -> one run dir per point -> a table of runs -> side-by-side metrics.

A sweep file (sweeps/*.yaml) holds exactly one of
    grid:   {optim.lr: [1e-3, 3e-3], optim.weight_decay: [0.0, 0.05]}   # the cartesian product
    points: [{optim.lr: 1e-3}, {optim.lr: 3e-3, train.epochs: 20}]     # these points only
and optionally `config: ../configs/cnn.yaml` (relative to the sweep file; --config wins).
Every point gets run.dir = <the run.dir given on the command line>/<point name>.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig, OmegaConf

from data_prep.atomic import atomic_write_text
from train.config import ConfigError
from train.config_io import as_written, field_type

TABLE = "sweep.tsv"  # in the sweep's root dir: point, job id, run dir, overrides
_COLUMNS = ["point", "job_id", "run_dir", "overrides"]


@dataclass
class Point:
    name: str  # also the run dir's name: "00-optim.lr=0.001"
    overrides: list[str]  # key=value, applied after the command line's


def _value(v: Any) -> str:
    # Overrides are parsed as YAML by OmegaConf's dotlist: scalars as written, containers as JSON (valid YAML).
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _name(i: int, items: Sequence[tuple[str, Any]]) -> str:
    text = ",".join(f"{k}={_value(v)}" for k, v in items)
    return f"{i:02d}-" + re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:120]


@dataclass
class Sweep:
    points: list[Point]
    config: Path | None  # the training YAML the sweep is meant for, if the file names one


def _as_written(key: str, value: Any, ynode) -> Any:
    """A string field's value as the sweep file wrote it (``train.mixed_precision: no``, ``run.name: 1e3``)."""
    return as_written(value, ynode) if field_type(key) is str else value


def _yaml_nodes(path: Path) -> dict:
    """The sweep's value nodes, as composed before YAML 1.1 resolves them: ``{"grid": {key: [node, ...]},
    "points": [{key: node}, ...]}``."""
    import yaml  # OmegaConf's own dependency

    def mapping(node) -> dict:
        if not isinstance(node, yaml.MappingNode):
            return {}
        return {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}

    doc = mapping(yaml.compose(path.read_text(), Loader=yaml.SafeLoader))
    grid = mapping(doc.get("grid"))
    out: dict = {"grid": {k: n.value for k, n in grid.items() if isinstance(n, yaml.SequenceNode)}}
    points = doc.get("points")
    if isinstance(points, yaml.SequenceNode):
        out["points"] = [mapping(p) for p in points.value]
    return out


def load_sweep(path: str | os.PathLike) -> Sweep:
    """The points of a sweep file, in order; fails naming the file and key on a malformed sweep."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist; see sweeps/ for examples")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors: name the file
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from e
    if not isinstance(node, DictConfig) or set(node.keys()) - {"grid", "points", "config"}:
        raise ConfigError(f"sweep file {path} may only hold `grid:` or `points:`, and `config:`")
    raw = OmegaConf.to_container(node, resolve=True)
    assert isinstance(raw, dict)
    config = (path.parent / str(raw.pop("config"))).resolve() if "config" in raw else None
    if len(raw) != 1:
        raise ConfigError(f"sweep file {path} must hold exactly one of `grid:` or `points:`")
    written = _yaml_nodes(path)
    if "grid" in raw:
        grid = raw["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{path}: `grid:` must map config keys to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid key {key!r} needs a non-empty list of values, got {values!r}")
            nodes = written["grid"].get(key, [])
            grid[key] = [_as_written(key, v, nodes[i] if i < len(nodes) else None) for i, v in enumerate(values)]
        combos = [list(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]
    else:
        points = raw["points"]
        if not isinstance(points, list) or not points or not all(isinstance(p, dict) and p for p in points):
            raise ConfigError(f"{path}: `points:` must be a non-empty list of key: value mappings")
        nodes = written.get("points", [])
        combos = [
            [(k, _as_written(k, v, (nodes[i] if i < len(nodes) else {}).get(k))) for k, v in p.items()]
            for i, p in enumerate(points)
        ]
    out = []
    for i, items in enumerate(combos):
        if any(k == "run.dir" for k, _ in items):
            raise ConfigError(f"{path}: a sweep must not set run.dir (each point gets <run.dir>/<point name>)")
        out.append(Point(_name(i, items), [f"{k}={_value(v)}" for k, v in items]))
    if len({tuple(p.overrides) for p in out}) != len(out):
        raise ConfigError(f"{path}: two points are identical")
    return Sweep(out, config)


def write_table(root: Path, rows: Sequence[dict[str, str]]) -> Path:
    """Write <root>/sweep.tsv atomically: one row per point with its SLURM job id."""
    lines = ["\t".join(_COLUMNS)]
    lines += ["\t".join(str(r[c]) for c in _COLUMNS) for r in rows]
    path = root / TABLE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_table(root: Path) -> list[dict[str, str]]:
    with open(root / TABLE, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if any(None in r.values() or set(r) != set(_COLUMNS) for r in rows):
        raise ConfigError(f"{root / TABLE} is not a sweep table (tab-separated {', '.join(_COLUMNS)})")
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def summarize(root: str | os.PathLike, out: TextIO, states: dict[str, str] | None = None) -> int:
    """Print each point's final metrics side by side (rows: points, columns: metrics). Returns #finished."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"{root} is not a folder: pass the run.dir a sweep was launched with, or a folder of run dirs"
            + ("" if root.exists() else " (it does not exist)")
        )
    if (root / TABLE).is_file():
        rows = read_table(root)
    else:  # not launched as a sweep: every sub-directory that is a run
        rows = [
            {"point": d.name, "job_id": "", "run_dir": str(d), "overrides": ""}
            for d in sorted(root.iterdir())
            if d.is_dir() and ((d / "final_metrics.json").is_file() or (d / "config.yaml").is_file())
        ]
    if not rows:
        raise ConfigError(f"{root} holds no {TABLE} and no run dirs; pass the run.dir a sweep was launched with")
    metrics = {}
    for r in rows:
        f = Path(r["run_dir"]) / "final_metrics.json"
        try:
            metrics[r["point"]] = json.loads(f.read_text()) if f.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f} is not valid JSON ({e}); the run that wrote it did not finish cleanly") from e
    keys = sorted({k for m in metrics.values() if m for k in m})
    # One column per point, one row per metric: sweeps have a few points and ~20 metrics.
    table = [["point", *(r["point"] for r in rows)], ["job_id", *(r["job_id"] or "-" for r in rows)]]
    table.append(["state", *(_state(r, metrics[r["point"]], states) for r in rows)])
    table += [[k, *(_fmt((metrics[r["point"]] or {}).get(k)) for r in rows)] for k in keys]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return sum(m is not None for m in metrics.values())


def _state(row: dict[str, str], metrics: dict | None, states: dict[str, str] | None) -> str:
    if states and row["job_id"] in states:
        return states[row["job_id"]]
    return "finished" if metrics is not None else "no results"
