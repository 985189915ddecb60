"""From YAML presets and typed flags to a config dataclass, and back to YAML in the run folder.

Precedence, lowest first: the dataclass defaults, a YAML preset (``--config FILE`` or ``--demo``), then the
flags a user typed. The resolved config is written to the run folder, so ``--resume RUN_DIR`` needs nothing else.
The dataclasses themselves live in ``minialign.config.schema``, ``.online`` and ``.evaluation``, which import
nothing from here: every function takes the config class as an argument, so these modules form no import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import yaml

from minialign.base.errors import UserError, kind_of
from minialign.base.files import write_atomic

PRESETS = Path(__file__).resolve().parents[1] / "configs"


def load_yaml(path: str | Path, cls) -> dict:
    """Read a preset and check every key against the dataclass, naming the file and the bad key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist (presets live in {PRESETS}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must hold a mapping of field: value, not {kind_of(data)}.")
    check_keys(data, cls, str(path))
    return data


def check_keys(data: dict, cls, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}. Valid fields: {', '.join(sorted(names))}.")


def build(cls, *layers: dict):
    """Instantiate ``cls`` from dicts applied in order, coercing YAML scalars to the field types."""
    types = typing.get_type_hints(cls)
    values: dict = {}
    for layer in layers:
        for key, value in layer.items():
            values[key] = _coerce(value, types[key], key)
    return cls(**values)


def _coerce(value, kind, key: str):
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"Field {key}: expected true or false, got {value!r}.")
        return bool(value)
    if kind is str and isinstance(value, list):  # a YAML list for a comma-separated field (report_to)
        value = ",".join(map(str, value))
    if kind in (int, float, str):
        if kind is int and isinstance(value, float) and not value.is_integer():
            value = None  # 2.5 is no int; fall through to the error
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise UserError(f"Field {key}: expected {kind.__name__}, got {value!r}.") from None
    return value


def flag_values(args: argparse.Namespace, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def save_config(config, path: Path) -> None:
    """The resolved config as YAML, written whole or not at all (a run folder's config.yaml is what --resume reads)."""
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def preset(name: str) -> Path:
    return PRESETS / f"{name}.yaml"


CONFIG_FILE = "config.yaml"


def load_run_config(run_dir: Path, cls):
    """The ``cls`` config a run folder's config.yaml holds (fields ``cls`` does not know are left out)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a minialign run folder (no {CONFIG_FILE}).")
    data = yaml.safe_load(path.read_text()) or {}
    return build(cls, {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})
