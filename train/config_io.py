"""Reading a training config (defaults <- YAML <- ``key.sub=value`` overrides, validated against train/config.py's
schema) and writing the resolved one. Every mistake is one line naming the key or file, with a "did you mean" for a
misspelt key; OmegaConf's own wording never reaches the user.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Sequence
from pathlib import Path

import yaml  # OmegaConf's own dependency
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from data_prep.atomic import atomic_write_text
from train.config import Config, ConfigError


def field_type(dotted: str) -> type | None:
    """The declared type of a dotted config key (``train.mixed_precision`` -> str), None if it is not a field."""
    cls: type = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def strings_as_written(node: DictConfig, path: Path, cls: type) -> None:
    """Give ``cls``'s string fields in ``node`` (``path`` as OmegaConf loaded it) what the user meant where YAML 1.1
    read an unquoted value as something else: a number keeps its text (a SLURM ``time: 4:00:00`` is "4:00:00", not
    the base-60 integer 14400 that went to sbatch as minutes; ``1e3`` is "1e3"), and a boolean word is "yes"/"no"
    (``mixed_precision: no`` is False to YAML)."""
    _restore_strings(node, yaml.compose(path.read_text(), Loader=yaml.SafeLoader), cls)


def _restore_strings(node: DictConfig, ynode, cls: type) -> None:
    if not isinstance(ynode, yaml.MappingNode):
        return
    hints = typing.get_type_hints(cls)
    loaded = OmegaConf.to_container(node, resolve=False)  # as OmegaConf read it; interpolations left alone
    for ykey, yvalue in ynode.value:
        if not isinstance(ykey, yaml.ScalarNode) or ykey.value not in loaded:
            continue
        kind, value = hints.get(ykey.value), loaded[ykey.value]
        if kind is str:
            written = as_written(value, yvalue)
            if written is not value:
                node[ykey.value] = written
        elif dataclasses.is_dataclass(kind) and isinstance(value, dict):
            _restore_strings(node[ykey.value], yvalue, kind)


def as_written(value, ynode):
    """What a string field means by ``value``, which YAML 1.1 resolved from ``ynode``: a boolean word is "yes"/"no",
    a number the text written (``4:00:00``, ``1e3``); anything else is ``value`` itself."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and isinstance(ynode, yaml.ScalarNode):
        return ynode.value
    return value


# Words a number field also takes, and the number each stands for (the number is what config.yaml records).
_WORDS = {"data.num_workers": {"auto": -1}}


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML from configs/ (e.g. configs/cnn.yaml)")
    try:
        # OmegaConf parses with yaml's SafeLoader: no Python objects are ever constructed from YAML.
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:  # where in the file, and what yaml expected there: one line
        mark = e.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML: {at}{e.problem or e.context}") from e
    except Exception as e:  # other yaml errors and friends; we want the file named
        raise ConfigError(f"config file {path} is not valid YAML: {_first_line(e)}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data:, model:, ...)")
    # `defaults: [other.yaml]` lets one YAML build on another (paths relative to the including file).
    bases = node.pop("defaults", [])
    strings_as_written(node, path, Config)
    for key, words in _WORDS.items():
        value = OmegaConf.select(node, key, default=None)
        if isinstance(value, str) and value.strip() in words:
            OmegaConf.update(node, key, words[value.strip()])
    merged = OmegaConf.create()
    for base in bases or []:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / str(base)).resolve()))
    return OmegaConf.merge(merged, node)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults <- YAML file <- dotted overrides (``train.epochs=3``) into a validated Config.

    Every mistake is a ConfigError of one line: where (the file or the override), the key, what was wrong, and for a
    misspelt key the nearest known one."""
    schema = OmegaConf.structured(Config)
    where, key, raw, loaded = "defaults", "", None, None
    try:
        if path is not None:
            where = str(path)
            loaded = _read_yaml(Path(path))
            schema = OmegaConf.merge(schema, loaded)
            loaded = None
        for item in overrides:
            where = f"override {item!r}"
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
            key, _, raw = (part.strip() for part in item.partition("="))
            if raw in _WORDS.get(key, {}):
                OmegaConf.update(schema, key, _WORDS[key][raw], merge=True)
                continue
            if field_type(key) is str:
                # A string field takes the text as typed: YAML would turn `no`, `off`, `yes`... into booleans
                # (train.mixed_precision=no would become 'False').
                OmegaConf.update(schema, key, raw.strip("'\""), merge=True)
                continue
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([item]))
        where, key, raw = f"config ({path or 'defaults'} + overrides)", "", None
        missing = sorted(OmegaConf.missing_keys(schema))
        if missing:
            raise ConfigError(
                f"{where}: required key(s) {missing} not set; add them to the YAML or pass e.g. data.dir=PATH"
            )
        cfg = OmegaConf.to_object(schema)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        if loaded is not None and not getattr(e, "full_key", None):  # OmegaConf did not say which key of the file
            key = _failing_key(loaded)
        raise ConfigError(f"{where}: {_omegaconf_message(e, key, raw)}") from e
    except (ValueError, TypeError) as e:  # raised by __post_init__ validation
        raise ConfigError(f"{where}: {e}") from e
    assert isinstance(cfg, Config)
    return cfg


def with_out(overrides: Sequence[str], out: str | None) -> list[str]:
    """The overrides with a command's ``--out DIR`` as ``run.dir=DIR`` (another run.dir among them is an error)."""
    if out is None:
        return list(overrides)
    given = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "run.dir"]
    if any(g != out for g in given):
        raise ConfigError(f"--out {out} and run.dir={given[-1]} name two run directories: pass one of them")
    return [*overrides, f"run.dir={out}"]


def _first_line(e: BaseException) -> str:
    return (str(getattr(e, "msg", None) or e).strip().splitlines() or [type(e).__name__])[0]


def _omegaconf_message(e: OmegaConfBaseException, written: str, raw: str | None) -> str:
    """OmegaConf's error in our words, one line, without its ``full_key:`` / ``reference_type=`` lines. ``written``
    and ``raw``: the override's key and value as typed ("" / None for a YAML file)."""
    key = getattr(e, "full_key", None) or written
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and key:
        return _unknown_key(key, written)
    expected = _expected(key) if key else ""
    if key == written and raw is not None:  # the override already names key and value
        return f"expected {expected}" if expected else _first_line(e)
    value = getattr(e, "value", None)
    shown = f"{key}={value}" if value is not None else key
    return f"{shown or 'config'}: {f'expected {expected}' if expected else _first_line(e)}"


def _failing_key(node: DictConfig) -> str:
    """The dotted key of ``node`` (a YAML file's) that does not merge into the schema ("" if none alone fails)."""

    def leaves(value, prefix: str):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            yield prefix, value

    for dotted, value in leaves(OmegaConf.to_container(node, resolve=False), ""):
        single: dict = {}
        *parents, last = dotted.split(".")
        at = single
        for p in parents:
            at = at.setdefault(p, {})
        at[last] = value
        try:
            OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(single))
        except OmegaConfBaseException:
            return dotted
    return ""


def _unknown_key(key: str, written: str) -> str:
    """``unknown key traim.epochs; did you mean train.epochs?``: the nearest field of the section (difflib), else
    the section's keys."""
    parent, _, name = key.rpartition(".")
    cls = field_type(parent) if parent else Config
    fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    shown = written if written.startswith(key) else key
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        guess = f"{parent}.{close[0]}" if parent else close[0]
        rest = shown[len(key) :]
        if rest and field_type(guess + rest) is not None:
            guess += rest  # the misspelt section of traim.epochs: suggest train.epochs, not train
        return f"unknown key {shown}; did you mean {guess}?"
    if not fields:
        return f"unknown key {shown}: {parent} takes no sub-keys"
    return f"unknown key {shown}; the keys of {parent or 'the config'} are {', '.join(fields)}"


def _expected(key: str) -> str:
    """What a field takes, in words, for a value OmegaConf could not convert ("" when the type says nothing)."""
    kind = field_type(key)
    words = _WORDS.get(key, {})
    if dataclasses.is_dataclass(kind):
        first = dataclasses.fields(kind)[0].name
        return f"its keys, not a value: {key} is a section (e.g. {key}.{first}=...)"
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return f"{len(args)} numbers, e.g. {key}=[{','.join(['0.5'] * len(args))}]"
    if origin is list or kind is list:
        return f"a list, e.g. '{key}=[a,b]' (quoted for the shell)"
    names = {int: "an integer", float: "a number", bool: "true or false"}
    if kind in names:
        return " or ".join([*words, names[kind]])
    return ""


def to_dict(cfg: Config) -> dict:
    """Plain-dict view (for trackers and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file, fsync, rename)."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
