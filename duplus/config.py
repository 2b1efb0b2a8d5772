"""YAML configuration files read into frozen dataclasses: one loader for every command's configuration."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any


def read_yaml_config(path: str | Path, cls: type, /, **overrides: Any) -> dict:
    """The mapping in ``path`` for the dataclass ``cls``: unknown keys are a ValueError naming them, and
    ``overrides`` that are not None replace what the file says."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(raw).__name__}")
    known = sorted(f.name for f in fields(cls))
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"{path}: unknown configuration keys {sorted(unknown)} (unknown keys are refused; "
                         f"{cls.__name__} has {known})")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return raw
