"""Success labels for bags from a CSV or YAML file (when no success topic was recorded).

CSV: a header with ``bag`` and ``success`` columns, one row per bag. YAML: a mapping ``bag: success``
or a list of ``{bag: ..., success: ...}``. ``bag`` is the bag's name (directory or file name without
suffix, e.g. ``run_007``) or its path; ``run_007#2`` labels only the third episode of a split bag.
Success values: true/false, 1/0, yes/no, success/failure.

Why strict: a label for a bag that is not among the inputs is almost always a typo or a wrong
folder, and silently ignoring it would turn a success into an unlabeled (or failed) episode.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from q_transformer_ros.data.bag_reader import bag_name

_TRUE = {"true", "1", "yes", "y", "success", "succeeded", "ok"}
_FALSE = {"false", "0", "no", "n", "failure", "failed", "fail"}


class LabelsError(ValueError):
    """A labels file that cannot be used; names the file, the line/entry and the value."""


@dataclass(frozen=True)
class Labels:
    """Parsed labels: key (bag name, or ``name#episode``) -> success."""

    path: Path
    entries: dict[str, bool]

    def lookup(self, bag: Path, episode_index: int) -> bool | None:
        """The label of episode ``episode_index`` of ``bag``, or None if the file does not label it."""
        for key in (f"{bag_name(bag)}#{episode_index}", bag_name(bag)):
            if key in self.entries:
                return self.entries[key]
        return None

    def check_bags_exist(self, bags: Sequence[Path]) -> None:
        """Every labelled bag must be one of the inputs; the error lists the unknown ones and the inputs."""
        names = {bag_name(b) for b in bags}
        unknown = sorted(k for k in self.entries if k.split("#", 1)[0] not in names)
        if unknown:
            raise LabelsError(
                f"{self.path}: labels name bag(s) not among the inputs: {unknown}; input bags are {sorted(names)}"
            )


def _parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LabelsError(f"{where}: success value {value!r} is not one of true/false, 1/0, yes/no, success/failure")


def _key(raw: Any, where: str) -> str:
    text = str(raw).strip()
    if not text:
        raise LabelsError(f"{where}: empty bag name")
    name, sep, episode = text.partition("#")
    if sep and not episode.isdigit():
        raise LabelsError(f"{where}: bag {text!r}: episode after '#' must be a number")
    return bag_name(Path(name)) + (f"#{int(episode)}" if sep else "")


def load_labels(path: str | Path) -> Labels:
    """Read a CSV (``.csv``) or YAML (``.yaml``/``.yml``) labels file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LabelsError(f"{path}: cannot read labels file: {e.strerror}") from None
    entries: dict[str, bool] = {}

    def put(key: str, value: bool, where: str) -> None:
        if key in entries and entries[key] != value:
            raise LabelsError(f"{where}: bag {key!r} is labelled twice with different values")
        entries[key] = value

    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        header = [h.strip().lower() for h in (csv.reader(text.splitlines()[:1]).__next__() if text.strip() else [])]
        if "bag" not in header or "success" not in header:
            raise LabelsError(f"{path}: CSV labels need a header with 'bag' and 'success' columns, got {header}")
        for i, row in enumerate(rows, start=2):
            row = {k.strip().lower(): v for k, v in row.items() if k is not None}
            where = f"{path}:{i}"
            if not any((v or "").strip() for v in row.values()):
                continue
            put(_key(row.get("bag"), where), _parse_bool(row.get("success"), where), where)
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LabelsError(f"{path}: not valid YAML: {e}") from None
        if isinstance(data, dict):
            for k, v in data.items():
                put(_key(k, f"{path}: {k!r}"), _parse_bool(v, f"{path}: {k!r}"), f"{path}: {k!r}")
        elif isinstance(data, list):
            for i, item in enumerate(data):
                where = f"{path}: entry {i}"
                if not isinstance(item, dict) or "bag" not in item or "success" not in item:
                    raise LabelsError(f"{where}: expected a mapping with 'bag' and 'success', got {item!r}")
                put(_key(item["bag"], where), _parse_bool(item["success"], where), where)
        else:
            raise LabelsError(f"{path}: expected a mapping bag -> success or a list of {{bag, success}}, got {type(data).__name__}")
    else:
        raise LabelsError(f"{path}: labels file must be .csv, .yaml or .yml")
    if not entries:
        raise LabelsError(f"{path}: labels file has no entries")
    return Labels(path=path, entries=entries)
