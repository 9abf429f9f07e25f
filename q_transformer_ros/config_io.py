"""Build a config dataclass from a plain mapping (YAML, a checkpoint, a manifest) with clear errors.

Why one helper: every config (contract parts, model, learner, trainer) is read from files people edit
by hand, so an unknown key (a typo) or a bad value must be reported with where it came from and the
keys that are allowed, the same way everywhere.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` is a number, not the string "1e-3"."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text people type (config files, ``--set`` values): safe, with ``1e-3`` read as a float
    (PyYAML follows YAML 1.1, where a float needs a dot: ``lr: 1e-3`` would arrive as a string)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def known_keys(cls: type) -> set[str]:
    """Field names of a dataclass."""
    return {f.name for f in fields(cls)}


def check_keys(cls: type, data: Any, where: str, ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The mapping as a dict, or ValueError naming ``where``, the first unknown key and the known ones."""
    known = known_keys(cls)
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {sorted(known)}, got {data!r}")
    unknown = sorted(set(data) - known - ignore)
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}' = {data[unknown[0]]!r}; known keys are {sorted(known)}")
    return {k: v for k, v in data.items() if k in known}


def dataclass_from_dict(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` after the key check; the dataclass's own validation errors get ``where`` prefixed."""
    kwargs = check_keys(cls, data, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
