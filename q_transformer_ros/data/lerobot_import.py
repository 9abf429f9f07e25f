"""Local LeRobot datasets (v2.1, v3.0) -> replay dataset (``lerobot_import``), per the robot contract.

Driven by the contract (camera sizes, action dims and ranges, state inputs, control rate, instruction
rules) plus a small mapping (``ImportMapping``, docs/lerobot.md): which ``observation.images.*`` feature
is which contract camera, which entries of the ``action`` and ``observation.state`` vectors are which
action dims and state inputs, where success and rewards come from. Per dataset:

1. ``open_lerobot`` reads ``meta/`` (either version) and locates each episode's rows and video segment;
2. per episode, ``episode_rows`` reads the needed columns, ``episode_label`` decides success the same
   way the bag converter does (labels file > --success/--failure > success column > --unlabeled; a
   verdict is terminal, ``convert.Label``) and cuts the rows after the first success;
3. ``DatasetImport.step_rows`` picks the steps (every row, or 1 in n with ``--thin``), ``check_steps``
   and ``camera_frames`` drop invalid ones with their reason (NaN action, no instruction, no video frame
   at the row's timestamp), ``task_runs`` splits at task changes and gaps; frames go through
   ``data.image.preprocess_frame``, the one preprocessing path of the converter and the policy node;
4. episodes are written in transactions of ``--episodes-per-chunk`` LeRobot episodes; episode ids are
   ``lerobot:<content hash>:<run>``, so a re-run (after a kill, or on a copied folder) skips what is
   already in the dataset without decoding videos.
The report is the bag converter's (``convert.BagReport``, one row per dataset): steps, drops with
reasons, notes, the action range against the contract.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import yaml

from q_transformer_ros.contract import ContractError, RobotContract, load_contract
from q_transformer_ros.data.convert import (
    ON_ERROR_CHOICES, UNLABELED_CHOICES, BagReport, Label, contract_from_dataset, dataset_has_episodes, format_report,
    outside_range, write_report_json,
)
from q_transformer_ros.data.image import ImageError, preprocess_frame
from q_transformer_ros.data.labels import Labels, LabelsError, load_labels
from q_transformer_ros.data.lerobot_format import (
    EpisodeRef, LeRobotFormatError, LeRobotLayout, VideoFrames, column_array, decode_image_cell, open_lerobot,
)
from q_transformer_ros.data.sync import valid_runs
from q_transformer_ros.replay.still_steps import dropped_reason, keep_option_problem, keep_still_steps, still_steps

SOURCE_PREFIX = "lerobot"
SUCCESS_AUTO = ("next.success", "next.done")
"""Columns ``success: auto`` looks for, in this order (``next.reward`` needs an explicit threshold)."""
TRUNCATED_COLUMN = "next.truncated"
"""A bool column whose True on an episode's last row marks a time-limit cut (not terminal)."""
FAILURE_CHOICES = ("terminal", "truncated")


class LeRobotImportError(ValueError):
    """An import that cannot go on; names the dataset / mapping file / key / column."""


# ---------------------------------------------------------------------------------------------
# mapping
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportMapping:
    """How a LeRobot dataset's features map onto the contract (YAML file, docs/lerobot.md)."""

    cameras: dict[str, str] = field(default_factory=dict)
    """Contract camera -> LeRobot feature (``observation.images.<key>``, video or image). Default: the
    feature ``observation.images.<camera name>``, or the only image feature for a one-camera contract."""
    action: str = "action"
    """The action feature (a float vector per frame)."""
    action_dims: dict[str, int | str] = field(default_factory=dict)
    """Contract action dim -> index in the action vector, or an entry of the feature's ``names``.
    Default: the contract's dims in order, ``0 .. D-1``."""
    state: str | None = None
    """The state feature (default ``observation.state``); read when the contract declares state inputs."""
    state_dims: dict[str, int | str] = field(default_factory=dict)
    """Contract state input -> index in the state vector, or an entry of the feature's ``names``.
    Default: the contract's state inputs in order, ``0 .. S-1``."""
    success: str = "auto"
    """``auto`` (``next.success``, else ``next.done``), ``none``, or a column: a bool column (first True =
    success), ``next.done`` (success when the last frame is done), or a number column with ``success_threshold``."""
    success_threshold: float | None = None
    """For a number column such as ``next.reward``: success at the first frame with value >= this."""
    failure: str = "terminal"
    """An episode the success column never marks: ``terminal`` (a verdict, as a bag's False message) or
    ``truncated`` (a time limit: bootstrap from the last frame). A True ``next.truncated`` on the last
    frame always means truncated."""
    reward: str = "sparse"
    """``sparse`` (1 on the last step of a success, else 0) or a number column (``next.reward``)."""

    def __post_init__(self) -> None:
        if self.failure not in FAILURE_CHOICES:
            raise LeRobotImportError(f"mapping: 'failure' = {self.failure!r}: use one of {FAILURE_CHOICES}")


_MAPPING_KEYS = {"cameras", "action", "state", "success", "reward"}


def load_mapping(path: str | Path) -> ImportMapping:
    """Read a mapping YAML file; unknown keys and bad values are refused with the file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise LeRobotImportError(f"{path}: cannot read mapping file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LeRobotImportError(f"{path}: not valid YAML: {e}") from None
    return parse_mapping(data, str(path))


def parse_mapping(data: Any, where: str = "<mapping>") -> ImportMapping:
    if not isinstance(data, dict):
        raise LeRobotImportError(f"{where}: expected a mapping with keys {sorted(_MAPPING_KEYS)}")
    unknown = set(data) - _MAPPING_KEYS
    if unknown:
        raise LeRobotImportError(f"{where}: unknown key '{sorted(unknown)[0]}'; known keys are {sorted(_MAPPING_KEYS)}")
    kw: dict[str, Any] = {}
    cams = data.get("cameras") or {}
    if not isinstance(cams, dict) or not all(isinstance(v, str) for v in cams.values()):
        raise LeRobotImportError(f"{where}: 'cameras' = {cams!r}: expected camera: feature (e.g. front: observation.images.top)")
    kw["cameras"] = {str(k): v for k, v in cams.items()}
    action = data.get("action") or {}
    if isinstance(action, str):
        action = {"key": action}
    if not isinstance(action, dict) or set(action) - {"key", "dims"}:
        raise LeRobotImportError(f"{where}: 'action' = {action!r}: expected {{key: action, dims: {{dim: index or name}}}}")
    kw["action"] = str(action.get("key", "action"))
    dims = action.get("dims") or {}
    if not isinstance(dims, dict) or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in dims.values()):
        raise LeRobotImportError(f"{where}: 'action.dims' = {dims!r}: expected dim: index (or a name of the feature)")
    kw["action_dims"] = {str(k): v for k, v in dims.items()}
    state = data.get("state")
    if isinstance(state, dict):
        if set(state) - {"key", "dims"}:
            raise LeRobotImportError(f"{where}: 'state' = {state!r}: expected {{key: observation.state, dims: {{input: index or name}}}}")
        sdims = state.get("dims") or {}
        if not isinstance(sdims, dict) or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in sdims.values()):
            raise LeRobotImportError(f"{where}: 'state.dims' = {sdims!r}: expected input: index (or a name of the feature)")
        kw["state_dims"] = {str(k): v for k, v in sdims.items()}
        state = state.get("key")
    kw["state"] = None if state is None else str(state)
    success = data.get("success", "auto")
    if isinstance(success, dict):
        if set(success) - {"column", "threshold", "failure"}:
            raise LeRobotImportError(f"{where}: 'success' = {success!r}: keys are column, threshold, failure")
        kw["success"] = str(success.get("column", "auto"))
        if success.get("threshold") is not None:
            try:
                kw["success_threshold"] = float(success["threshold"])
            except (TypeError, ValueError):
                raise LeRobotImportError(f"{where}: 'success.threshold' = {success['threshold']!r}: not a number") from None
        kw["failure"] = str(success.get("failure", "terminal"))
    elif success is not None:
        kw["success"] = str(success)
    reward = data.get("reward", "sparse")
    if isinstance(reward, dict):
        reward = reward.get("column", "sparse")
    kw["reward"] = str(reward)
    try:
        return ImportMapping(**kw)
    except LeRobotImportError as e:
        raise LeRobotImportError(str(e).replace("mapping:", f"{where}:", 1)) from None


class ResolvedMapping(NamedTuple):
    """A mapping checked against one dataset's features."""

    cameras: dict[str, str]
    """Contract camera -> feature key."""
    action: str
    """The action feature."""
    action_index: np.ndarray
    """int64 (D,): entry of the action vector for each contract dim."""
    action_width: int
    state: str | None
    """The state feature, or None when the contract declares no state inputs."""
    state_index: np.ndarray
    """int64 (S,): entry of the state vector for each contract state input."""
    state_width: int
    success: str | None
    """The success column, or None."""
    reward: str | None
    """The reward column, or None for sparse rewards."""


def vector_index(layout: LeRobotLayout, key: str, role: str, wanted: list[str], refs: dict[str, int | str],
                 mapping_key: str, contract_name: str) -> tuple[np.ndarray, int]:
    """(entry of the feature ``key``'s vector for each name in ``wanted``, the vector's length).

    ``refs`` maps a name to an index or to one of the feature's ``names``; without ``refs`` the names
    take entries ``0 .. len(wanted)-1`` in order. Errors name info.json, the feature and the mapping key."""
    where = layout.where()
    feat = layout.feature(key, role)
    shape = list(feat.get("shape") or [])
    if len(shape) != 1 or feat.get("dtype") not in ("float32", "float64", "float16", "int64", "int32"):
        raise LeRobotImportError(f"{where}: feature '{key}' ({role}) has dtype {feat.get('dtype')!r} shape {shape}, "
                                 f"expected a 1-D number vector")
    width = int(shape[0])
    names = feat.get("names")
    if isinstance(names, dict):  # some datasets give {"motors": [...]}
        names = next(iter(names.values()), None)
    extra = set(refs) - set(wanted)
    if extra:
        raise LeRobotImportError(f"mapping '{mapping_key}': {sorted(extra)} not in contract '{contract_name}' ({wanted})")
    index = []
    for i, name in enumerate(wanted):
        ref = refs.get(name, i if not refs else None)
        if ref is None:
            raise LeRobotImportError(f"mapping '{mapping_key}' has no entry for contract {role} '{name}'")
        if isinstance(ref, str):
            if not isinstance(names, list) or ref not in names:
                raise LeRobotImportError(f"{where}: mapping '{mapping_key}.{name}' = {ref!r}: not among the names of "
                                         f"feature '{key}' ({names})")
            ref = names.index(ref)
        if not 0 <= ref < width:
            raise LeRobotImportError(f"{where}: {role} '{name}' -> index {ref}, but feature '{key}' has shape [{width}]")
        index.append(ref)
    return np.asarray(index, dtype=np.int64), width


def resolve_mapping(m: ImportMapping, layout: LeRobotLayout, contract: RobotContract) -> ResolvedMapping:
    """Fill the mapping's defaults from the dataset and check every feature it names (errors name info.json)."""
    where = layout.where()
    image_feats = layout.video_keys + layout.image_keys
    cams: dict[str, str] = {}
    unknown = set(m.cameras) - {c.name for c in contract.cameras}
    if unknown:
        raise LeRobotImportError(f"mapping 'cameras': {sorted(unknown)} not cameras of contract '{contract.name}' "
                                 f"({[c.name for c in contract.cameras]})")
    for cam in contract.cameras:
        if cam.depth:
            raise LeRobotImportError(f"contract camera '{cam.name}' is a depth camera: LeRobot import reads RGB videos only")
        key = m.cameras.get(cam.name)
        if key is None:
            guess = f"observation.images.{cam.name}"
            if guess in image_feats:
                key = guess
            elif len(contract.cameras) == 1 and len(image_feats) == 1:
                key = image_feats[0]
            else:
                raise LeRobotImportError(f"{where}: no feature for contract camera '{cam.name}': map it in the mapping's "
                                         f"'cameras' (image features here: {image_feats})")
        feat = layout.feature(key, f"camera '{cam.name}'")
        if feat.get("dtype") not in ("video", "image"):
            raise LeRobotImportError(f"{where}: feature '{key}' (camera '{cam.name}') has dtype {feat.get('dtype')!r}, "
                                     f"expected video or image")
        cams[cam.name] = key
    index, width = vector_index(layout, m.action, "action", [d.name for d in contract.action_dims], m.action_dims,
                                "action.dims", contract.name)
    state_key, state_index, state_width = None, np.zeros(0, np.int64), 0
    if contract.state_inputs:
        state_key = m.state or "observation.state"
        state_index, state_width = vector_index(layout, state_key, "state", [s.name for s in contract.state_inputs],
                                                m.state_dims, "state.dims", contract.name)
    elif m.state_dims:
        raise LeRobotImportError(f"mapping 'state.dims' given, but contract '{contract.name}' declares no state_inputs")
    success: str | None
    if m.success == "auto":
        success = next((c for c in SUCCESS_AUTO if c in layout.features), None)
    elif m.success == "none":
        success = None
    else:
        layout.feature(m.success, "success column")
        success = m.success
    if success is not None:
        dtype = layout.features[success].get("dtype")
        if dtype != "bool" and m.success_threshold is None and success != "next.done":
            raise LeRobotImportError(f"{where}: success column '{success}' has dtype {dtype!r}: give a threshold "
                                     f"(success: {{column: {success}, threshold: 1.0}}) or use a bool column")
    reward = None
    if m.reward != "sparse":
        layout.feature(m.reward, "reward column")
        reward = m.reward
    return ResolvedMapping(cams, m.action, index, width, state_key, state_index, state_width, success, reward)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportConfig:
    """Everything an import needs besides the inputs and the output folder."""

    contract: RobotContract
    mapping: ImportMapping = field(default_factory=ImportMapping)
    instruction: str | None = None
    """Instruction for every episode (overrides the dataset's tasks)."""
    success: bool | None = None
    """--success / --failure: label every episode the labels file does not label."""
    labels: Labels | None = None
    """Labels file: ``<dataset folder name>`` or ``<dataset folder name>#<episode_index>`` -> success."""
    unlabeled: str = "refuse"
    min_steps: int = 1
    frame_tolerance_s: float | None = None
    """A video frame farther than this from a row's timestamp is missing (default: a third of a period)."""
    episodes_per_chunk: int = 50
    """LeRobot episodes per dataset transaction (each transaction is one chunk, all or nothing)."""
    thin: bool = False
    """A dataset recorded at an integer multiple of the contract's control rate: every n-th frame is a
    step, its action the last one before the next step (the dataset's actions must be targets, not
    per-frame deltas)."""
    keep_still_steps: int | None = None
    """If set, keep only the first this many steps of every stretch where the state inputs stand still and
    the action repeats (``replay.still_steps``, as ``convert_bag --keep-still-steps``); None keeps all."""

    def __post_init__(self) -> None:
        if self.unlabeled not in UNLABELED_CHOICES:
            raise LeRobotImportError(f"--unlabeled {self.unlabeled!r}: use one of {UNLABELED_CHOICES}")
        if not (isinstance(self.min_steps, int) and self.min_steps >= 1):
            raise LeRobotImportError(f"--min-steps {self.min_steps!r}: must be an integer >= 1")
        if not (isinstance(self.episodes_per_chunk, int) and self.episodes_per_chunk >= 1):
            raise LeRobotImportError(f"--episodes-per-chunk {self.episodes_per_chunk!r}: must be an integer >= 1")
        if self.frame_tolerance_s is not None and not self.frame_tolerance_s > 0:
            raise LeRobotImportError(f"--frame-tolerance {self.frame_tolerance_s!r}: must be > 0 seconds")
        if self.instruction is not None and not self.instruction.strip():
            raise LeRobotImportError("--instruction: empty text")
        if self.keep_still_steps is not None and (problem := keep_option_problem(self.keep_still_steps, self.contract)):
            raise LeRobotImportError(problem)

    @property
    def tolerance_s(self) -> float:
        return self.frame_tolerance_s if self.frame_tolerance_s is not None else self.contract.control_period_s / 3


@dataclass
class ImportedEpisode:
    """One replay episode built from (part of) a LeRobot episode."""

    frames: dict[str, np.ndarray]
    actions: np.ndarray
    success: bool
    terminal: bool
    instruction: str | None
    source_id: str
    rewards: np.ndarray | None
    metadata: dict[str, Any]
    state: np.ndarray | None
    """float32 (T, S) raw state inputs, or None when the contract declares none."""
    frame_error_s: dict[str, np.ndarray]
    """camera -> |video frame time - row time| per step (for the report's frame-age columns)."""


# ---------------------------------------------------------------------------------------------
# one episode
# ---------------------------------------------------------------------------------------------

class EpisodeRows(NamedTuple):
    """The columns of one LeRobot episode the import needs, as numpy arrays (rows by frame_index)."""

    actions: np.ndarray
    """float64 (T, D) in contract dim order."""
    timestamps: np.ndarray
    """float64 (T,) seconds from the episode start."""
    task_index: np.ndarray
    """int64 (T,)."""
    success: np.ndarray | None
    """float64 (T,) of the success column, or None."""
    truncated_last: bool
    """``next.truncated`` is True on the last row."""
    rewards: np.ndarray | None
    """float32 (T,) of the reward column, or None (sparse)."""
    state: np.ndarray | None
    """float64 (T, S) state inputs in contract order, or None."""
    images: dict[str, Any]
    """Image-column cameras -> the pyarrow column (decoded only for kept rows)."""
    identity: str
    """Content hash of the episode (what makes a re-run skip it)."""


def episode_rows(layout: LeRobotLayout, ep: EpisodeRef, rm: ResolvedMapping) -> EpisodeRows:
    """Read and check the episode's columns; errors name the parquet file and the column."""
    image_cams = {cam: key for cam, key in rm.cameras.items() if key in layout.image_keys}
    action_key = rm.action
    cols = ["timestamp", "task_index", action_key]
    for c in (rm.success, rm.reward, rm.state):
        if c is not None and c not in cols:
            cols.append(c)
    if TRUNCATED_COLUMN in layout.features and TRUNCATED_COLUMN not in cols:
        cols.append(TRUNCATED_COLUMN)
    cols += [k for k in image_cams.values() if k not in cols]
    data = layout.read_rows(ep, cols)
    path = ep.data_path
    vec = column_array(data[action_key], path, action_key, np.float64, width=rm.action_width)
    actions = vec[:, rm.action_index]
    ts = column_array(data["timestamp"], path, "timestamp", np.float64)
    tasks = column_array(data["task_index"], path, "task_index", np.int64)
    success = None if rm.success is None else column_array(data[rm.success], path, rm.success, np.float64)
    rewards = None if rm.reward is None else column_array(data[rm.reward], path, rm.reward, np.float32)
    state_vec = None if rm.state is None else column_array(data[rm.state], path, rm.state, np.float64, width=rm.state_width)
    trunc = False
    if TRUNCATED_COLUMN in data:
        trunc = bool(column_array(data[TRUNCATED_COLUMN], path, TRUNCATED_COLUMN, bool)[-1])
    h = hashlib.sha256()
    h.update(json.dumps({"fps": layout.fps, "episode": ep.index, "length": ep.length,
                         "tasks": [layout.tasks.get(int(t), "") for t in np.unique(tasks)]}, sort_keys=True).encode())
    for arr in (vec, ts, tasks, success, rewards, state_vec):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    state = None if state_vec is None else state_vec[:, rm.state_index]
    return EpisodeRows(actions, ts, tasks, success, trunc, rewards, state,
                       {c: data[k] for c, k in image_cams.items()}, h.hexdigest()[:24])


def episode_label(rows: EpisodeRows, rm: ResolvedMapping, mapping: ImportMapping, layout: LeRobotLayout,
                  ep: EpisodeRef, cfg: ImportConfig) -> tuple[Label, int]:
    """(label, rows kept): labels file > --success/--failure > success column > --unlabeled failure.

    A success column cuts the episode after its first success frame (the rows after it are dropped).
    Verdicts are terminal, as for bags, except a True ``next.truncated`` on the last kept row, a
    ``failure: truncated`` mapping, or a ``next.done`` episode that is not done (a cut).
    """
    T = len(rows.actions)
    if cfg.labels is not None:
        lab = cfg.labels.lookup(layout.root, ep.index)
        if lab is not None:
            return Label(lab, not rows.truncated_last), T
    if cfg.success is not None:
        return Label(cfg.success, not rows.truncated_last), T
    if rows.success is not None:
        col = rm.success
        if col == "next.done" and mapping.success_threshold is None:
            done = bool(rows.success[-1])
            return Label(done, done and not rows.truncated_last), T
        hit = rows.success >= (mapping.success_threshold if mapping.success_threshold is not None else 0.5)
        if hit.any():
            k = int(np.argmax(hit)) + 1
            return Label(True, not (rows.truncated_last and k == T)), k
        return Label(False, mapping.failure == "terminal" and not rows.truncated_last), T
    if cfg.unlabeled == "failure":
        return Label(False, False), T
    return Label(None, False), T


# ---------------------------------------------------------------------------------------------
# one dataset
# ---------------------------------------------------------------------------------------------

def _instruction_of(task_index: int, layout: LeRobotLayout, cfg: ImportConfig) -> tuple[bool, str | None]:
    """(usable, instruction) of a row's task: --instruction > task text > fixed_text > none if allowed."""
    if cfg.instruction is not None:
        return True, cfg.instruction
    text = layout.tasks.get(int(task_index))
    if text:
        return True, text
    fixed = cfg.contract.instruction.fixed_text
    if fixed:
        return True, fixed
    return cfg.contract.instruction.allow_none, None


def frame_stride(fps: float, contract: RobotContract, thin: bool, where: str) -> int:
    """Frames per step: 1 when the dataset's fps is the control rate; with ``--thin``, the integer ratio."""
    ratio = fps / contract.control_rate_hz
    if abs(ratio - 1) < 1e-6:
        return 1
    n = int(round(ratio))
    integer = n > 1 and abs(ratio - n) < 1e-6
    if thin and integer:
        return n
    hint = f"pass --thin to take 1 frame in {n} as a step, or " if integer and not thin else ""
    raise LeRobotImportError(
        f"{where}: 'fps' = {fps:g} but contract '{contract.name}' has control_rate_hz {contract.control_rate_hz:g}: "
        f"{hint}set control_rate_hz: {fps:g} in the contract (each LeRobot frame is then one decision)")


def task_runs(valid: np.ndarray, task_index: np.ndarray) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of valid steps with one task each (a task change starts a new run)."""
    runs = []
    for a, b in valid_runs(valid):
        cuts = np.flatnonzero(np.diff(task_index[a:b])) + a + 1
        bounds = [a, *cuts.tolist(), b]
        runs.extend(zip(bounds[:-1], bounds[1:]))
    return runs


class DatasetImport:
    """Turns the episodes of one LeRobot dataset into replay episodes, counting every dropped row."""

    def __init__(self, path: str | Path, cfg: ImportConfig, known: set[str] | frozenset[str] = frozenset()):
        self.cfg = cfg
        self.layout = open_lerobot(path)
        self.report = BagReport(bag=str(self.layout.root))
        self.dropped: Counter = Counter()
        self.notes: Counter = Counter()
        self.known = known
        """``lerobot:<content hash>`` of the episodes already in the output dataset (updated by the caller
        as groups commit, so an episode seen in an earlier input of the same run is skipped too)."""
        c = cfg.contract
        self.stride = frame_stride(self.layout.fps, c, cfg.thin, self.layout.where())
        self.rm = resolve_mapping(cfg.mapping, self.layout, c)
        state = cfg.mapping.state or ("observation.state" if "observation.state" in self.layout.features else None)
        if state is not None and not c.state_inputs:
            self.notes[f"'{state}' not imported: contract '{c.name}' declares no state inputs"] += 1
        if cfg.labels is not None:
            cfg.labels.check_bags_exist([self.layout.root])
        if cfg.unlabeled == "refuse" and cfg.success is None and self.rm.success is None:  # before writing anything
            missing = [e.index for e in self.layout.episodes
                       if cfg.labels is None or cfg.labels.lookup(self.layout.root, e.index) is None]
            if missing:
                raise LeRobotImportError(
                    f"{self.layout.root}: episode(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} have no "
                    f"success label (no next.success/next.done column, not in the labels file, no --success/--failure); "
                    f"pass --labels, --success/--failure, --success-column or --unlabeled failure|skip")
        self.identity = hashlib.sha256((self.layout.root / "meta" / "info.json").read_bytes()).hexdigest()[:16]
        self.report.identity = f"{self.layout.version}:{self.identity}"
        self.skipped = 0
        """LeRobot episodes skipped because their content is already in the dataset."""
        self.skipped_runs = 0
        """Episodes the writer skipped (a source_id it already had)."""

    def episodes(self) -> Iterator[list[ImportedEpisode]]:
        """Yield the replay episodes of each group of ``episodes_per_chunk`` LeRobot episodes."""
        eps = self.layout.episodes
        n = self.cfg.episodes_per_chunk
        for start in range(0, len(eps), n):
            group: list[ImportedEpisode] = []
            for ep in eps[start:start + n]:
                group.extend(self.episode(ep))
            yield group

    def episode(self, ep: EpisodeRef) -> list[ImportedEpisode]:
        """One LeRobot episode -> replay episodes (none when already imported or every row dropped)."""
        cfg, layout = self.cfg, self.layout
        rows = episode_rows(layout, ep, self.rm)
        if f"{SOURCE_PREFIX}:{rows.identity}" in self.known:
            self.skipped += 1
            return []
        label, keep = episode_label(rows, self.rm, cfg.mapping, layout, ep, cfg)
        T = len(rows.actions)
        if label.success is None:
            if cfg.unlabeled == "skip":
                self.dropped["unlabeled episode (--unlabeled skip)"] += T
                return []
            src = f"success column {self.rm.success}" if self.rm.success else "no success column (next.success/next.done)"
            raise LeRobotImportError(
                f"{layout.root}: episode {ep.index} has no success label ({src}, not in the labels file, no "
                f"--success/--failure); pass --labels, --success/--failure or --unlabeled failure|skip")
        if keep < T:
            self.dropped["after the success frame"] += T - keep
        steps, actions = self.step_rows(rows, keep)
        valid, reasons = self.check_steps(rows, steps, actions)
        frames, errors = self.camera_frames(ep, rows, steps, valid, reasons)
        for r in reasons[~valid]:
            self.dropped[r] += 1
        runs = task_runs(valid, rows.task_index[steps])
        out: list[ImportedEpisode] = []
        for ri, (a, b) in enumerate(runs):
            if b - a < cfg.min_steps:
                self.dropped[f"episode shorter than --min-steps {cfg.min_steps}"] += b - a
                continue
            last = ri == len(runs) - 1  # as for bags: the last run carries the label, earlier ones are cuts
            success, terminal = (bool(label.success), bool(label.verdict)) if last else (False, False)
            if not terminal:
                self.notes["truncated episodes (their last step is an observation without a training sample)"] += 1
            if len(runs) > 1:
                self.notes["episodes cut by a task change or dropped frames"] += 1
            idx = np.arange(a, b)
            if cfg.keep_still_steps is not None:
                idx = idx[keep_still_steps(still_steps(actions[a:b], rows.state[steps[a:b]], cfg.contract),
                                           cfg.keep_still_steps)]
                if b - a > len(idx):
                    self.dropped[dropped_reason(cfg.keep_still_steps)] += b - a - len(idx)
            rewards = None
            if rows.rewards is not None:
                rewards = rows.rewards[steps[idx]].astype(np.float32)
                if (rewards < 0).any() or (rewards > 1).any():
                    self.notes["reward column values outside [0, 1] (Q is a sigmoid)"] += 1
            out.append(ImportedEpisode(
                frames={k: v[idx] for k, v in frames.items()}, actions=actions[idx].astype(np.float32),
                success=success, terminal=terminal,
                instruction=_instruction_of(rows.task_index[steps[a]], layout, cfg)[1],
                source_id=f"{SOURCE_PREFIX}:{rows.identity}:{ri}", rewards=rewards,
                metadata={"lerobot_dataset": str(layout.root), "lerobot_version": layout.version,
                          "episode_index": ep.index, "run": ri, "first_frame": int(steps[a]),
                          "frame_stride": self.stride, "fps": layout.fps},
                state=None if rows.state is None else rows.state[steps[idx]].astype(np.float32),
                frame_error_s={k: v[idx] for k, v in errors.items()},
            ))
        return out

    def step_rows(self, rows: EpisodeRows, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """(row of each step, float64 (K, D) action of each step) among the first ``keep`` rows.

        Stride 1: every row is a step with its own action. Stride n (``--thin``): rows 0, n, 2n, ... are
        the decision moments and a step's action is the last command before the next one (row
        ``k*n + n - 1``), the bag converter's rule for commands faster than the control rate."""
        n = self.stride
        steps = np.arange(0, keep, n, dtype=np.int64)
        if n > 1:
            self.dropped[f"thinned to the contract's control rate (1 frame in {n} is a step)"] += keep - len(steps)
        return steps, rows.actions[np.minimum(steps + n - 1, keep - 1)]

    def check_steps(self, rows: EpisodeRows, steps: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(valid, reason) per step: finite actions and state, and an instruction."""
        valid = np.isfinite(actions).all(axis=1)
        reasons = np.where(valid, "", "NaN/inf in the action").astype(object)
        if rows.state is not None:
            bad = ~np.isfinite(rows.state[steps]).all(axis=1) & valid
            reasons[bad] = "NaN/inf in the state"
            valid &= ~bad
        usable = np.array([_instruction_of(t, self.layout, self.cfg)[0] for t in rows.task_index[steps]], dtype=bool)
        reasons[~usable & valid] = "no task text, --instruction or fixed_text (and allow_none is false)"
        return valid & usable, reasons

    def camera_frames(self, ep: EpisodeRef, rows: EpisodeRows, steps: np.ndarray, valid: np.ndarray,
                      reasons: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Each camera's uint8 (K, 3, H, W) frames of the steps (``preprocess_frame``) and the video time
        error per step; a step without a video frame near its timestamp becomes invalid (in place)."""
        cfg = self.cfg
        frames, errors = {}, {}
        for cam in cfg.contract.cameras:
            key = self.rm.cameras[cam.name]
            out = np.zeros((len(steps), 3, cam.height, cam.width), dtype=np.uint8)

            def prepare(image: np.ndarray, where: str) -> np.ndarray:
                return preprocess_frame(np.asarray(image), "rgb8", cam, f"{self.layout.root}: feature '{key}' "
                                        f"(camera '{cam.name}') episode {ep.index} {where}")

            if cam.name in rows.images:  # image column: decode only the kept steps' cells
                for k in np.flatnonzero(valid):
                    row = int(steps[k])
                    out[k] = prepare(decode_image_cell(rows.images[cam.name][row].as_py(), ep.data_path, key, row),
                                     f"frame {row}")
                err = np.zeros(len(steps))
            else:
                decoded, err = VideoFrames(cfg.tolerance_s).frames(
                    ep.videos[key], rows.timestamps[steps], key, lambda image, t: prepare(image, f"video time {t:.3f} s"))
                missing = ~np.isfinite(err) & valid
                reasons[missing] = f"no frame of video '{key}' within {cfg.tolerance_s:.3g} s of the row's timestamp"
                valid &= ~missing
                for k in np.flatnonzero(valid):
                    out[k] = decoded[k]
            frames[cam.name], errors[cam.name] = out, err
        return frames, errors

    def finish(self, episodes: Sequence[ImportedEpisode], status: str | None = None) -> BagReport:
        """Fill the report (the bag converter's fields) from the episodes written."""
        r, c = self.report, self.cfg.contract
        r.episodes = len(episodes)
        r.successes = sum(e.success for e in episodes)
        r.steps = sum(len(e.actions) for e in episodes)
        r.dropped = {k: int(v) for k, v in self.dropped.items() if v}
        r.notes = {k: int(v) for k, v in self.notes.items() if v}
        if self.skipped:
            r.notes["LeRobot episodes already in the dataset (skipped)"] = self.skipped
        if self.skipped_runs:
            r.notes["episodes already in the dataset (skipped by the writer)"] = self.skipped_runs
        for cam in c.cameras:
            errs = np.concatenate([e.frame_error_s[cam.name] for e in episodes]) if episodes else np.zeros(0)
            r.frame_age_p50_s[cam.name] = float(np.percentile(errs, 50)) if len(errs) else None
            r.frame_age_p99_s[cam.name] = float(np.percentile(errs, 99)) if len(errs) else None
        r.instructions = sorted({e.instruction for e in episodes if e.instruction is not None})
        if episodes:
            acts = np.concatenate([e.actions for e in episodes])
            r.action_min = acts.min(axis=0).tolist()
            r.action_max = acts.max(axis=0).tolist()
            r.clipped.update(outside_range(acts, c.action_dims))
            if c.state_inputs:
                states = np.concatenate([e.state for e in episodes])
                outside = outside_range(states, c.state_inputs)
                for i, si in enumerate(c.state_inputs):
                    n = outside.get(si.name, 0)
                    if n:
                        lo, hi = float(states[:, i].min()), float(states[:, i].max())
                        r.notes[f"state input '{si.name}' seen in [{lo:.4g}, {hi:.4g}], outside its range "
                                f"[{si.low:g}, {si.high:g}] (normalised values beyond the range are clipped)"] = n
        if status is not None:
            r.status = status
        elif not episodes:
            r.status = "already in dataset" if self.skipped else "no episodes"
            if not self.skipped:
                r.error = r.error or ("; ".join(f"{n} step(s): {k}" for k, n in sorted(r.dropped.items()))
                                      or "no episodes in the dataset")
        return r


# ---------------------------------------------------------------------------------------------
# many datasets -> transactions
# ---------------------------------------------------------------------------------------------

def run_import(inputs: Sequence[str | Path], out: str | Path, cfg: ImportConfig, on_error: str = "abort",
               progress: bool = True) -> list[BagReport]:
    """Import LeRobot dataset folders into the replay dataset at ``out``; one report per input.

    Episodes go in one transaction per ``episodes_per_chunk`` LeRobot episodes: committed groups
    survive a later error or a kill, and a re-run skips them (content-hashed source ids). A dataset
    folder this call created and left without episodes is removed again.
    """
    from tqdm import tqdm

    from q_transformer_ros.replay import EpisodeData, ReplayWriter

    if on_error not in ON_ERROR_CHOICES:
        raise LeRobotImportError(f"--on-error {on_error!r}: use one of {ON_ERROR_CHOICES}")
    out = Path(out)
    created = not out.exists()
    reports: list[BagReport] = []
    try:
        with ReplayWriter(out, cfg.contract, create_ok=True) as writer:
            known = {s.rsplit(":", 1)[0] for s in writer.manifest.source_ids() if s.startswith(SOURCE_PREFIX)}
            for path in inputs:
                written: list[ImportedEpisode] = []
                try:
                    job = DatasetImport(path, cfg, known)
                    bar = tqdm(total=len(job.layout.episodes), unit="episode", desc=Path(path).name,
                               disable=not progress, file=sys.stderr)
                    for group in job.episodes():
                        if group:
                            with writer.transaction() as tx:  # a group: all or nothing
                                added = [tx.add_episode(EpisodeData(
                                    frames=ep.frames, actions=ep.actions, success=ep.success, terminal=ep.terminal,
                                    instruction=ep.instruction, source_id=ep.source_id, rewards=ep.rewards,
                                    metadata=ep.metadata, state=ep.state)) for ep in group]
                            written.extend(ep for ep, ok in zip(group, added) if ok)
                            job.skipped_runs += added.count(False)
                            known.update(ep.source_id.rsplit(":", 1)[0] for ep in group)
                        bar.update(min(cfg.episodes_per_chunk, bar.total - bar.n))
                    bar.close()
                    reports.append(job.finish(written))
                except (LeRobotImportError, LeRobotFormatError, LabelsError, ImageError) as e:
                    if on_error == "abort":
                        raise
                    reports.append(BagReport(bag=str(path), status="error", error=str(e), episodes=len(written),
                                             steps=sum(len(w.actions) for w in written)))
    except BaseException:
        if created and out.exists() and not dataset_has_episodes(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    if created and not dataset_has_episodes(out):
        shutil.rmtree(out, ignore_errors=True)
    return reports


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lerobot_import",
        description="Import local LeRobot datasets (v2.1 or v3.0 folders; no hub access) into a Q-Transformer "
                    "replay dataset, per the robot contract and a mapping (docs/lerobot.md). Re-runs skip "
                    "episodes already imported.",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="LeRobot dataset folders (with meta/info.json)")
    p.add_argument("--out", required=True, type=Path, help="replay dataset folder (created, or appended to)")
    p.add_argument("--contract", type=Path, help="robot contract YAML (default: the one inside an existing --out)")
    p.add_argument("--mapping", type=Path, help="mapping YAML: cameras, action dims, success and reward columns")
    p.add_argument("--camera", action="append", default=[], metavar="CAMERA=FEATURE",
                   help="contract camera -> LeRobot image/video feature (overrides the mapping file; repeatable)")
    p.add_argument("--success-column", help="auto (next.success, else next.done), none, or a column")
    p.add_argument("--success-threshold", type=float, help="number column: success at the first value >= this")
    p.add_argument("--reward", help="sparse (default) or a number column such as next.reward")
    p.add_argument("--instruction", help="instruction for every episode (overrides the dataset's tasks)")
    p.add_argument("--labels", type=Path, help="CSV/YAML labels: '<dataset folder name>[#<episode_index>]' -> success")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--success", dest="success", action="store_const", const=True, default=None,
                     help="label every episode not in --labels a success")
    lab.add_argument("--failure", dest="success", action="store_const", const=False,
                     help="label every episode not in --labels a failure")
    p.add_argument("--unlabeled", choices=UNLABELED_CHOICES, default="refuse",
                   help="episodes with no label from any source: refuse (error, default), failure, or skip")
    p.add_argument("--min-steps", type=int, default=1, help="drop episodes shorter than this")
    p.add_argument("--keep-still-steps", type=int, default=None, metavar="K",
                   help="keep only the first K steps of every stretch where the state stands still and the action "
                        "repeats (as convert_bag's); default: keep every step")
    p.add_argument("--frame-tolerance", type=float, default=None,
                   help="seconds; a video frame farther from a row's timestamp is missing (default: period / 3)")
    p.add_argument("--episodes-per-chunk", type=int, default=50, help="LeRobot episodes per dataset transaction")
    p.add_argument("--thin", action="store_true",
                   help="fps an integer multiple n of the control rate: 1 frame in n is a step (the actions must be targets)")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="abort",
                   help="abort (default) or skip bad datasets and report them")
    p.add_argument("--report-json", type=Path, help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def mapping_from_args(args: argparse.Namespace) -> ImportMapping:
    m = load_mapping(args.mapping) if args.mapping is not None else ImportMapping()
    cams = dict(m.cameras)
    for item in args.camera:
        cam, sep, feat = item.partition("=")
        if not sep or not cam or not feat:
            raise LeRobotImportError(f"--camera {item!r}: use CAMERA=FEATURE, e.g. front=observation.images.top")
        cams[cam] = feat
    kw: dict[str, Any] = {"cameras": cams}
    if args.success_column is not None:
        kw["success"] = args.success_column
    if args.success_threshold is not None:
        kw["success_threshold"] = args.success_threshold
    if args.reward is not None:
        kw["reward"] = args.reward
    return replace(m, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """``lerobot_import`` entry point; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.contract is not None:
            contract = load_contract(args.contract)
        elif (args.out / "manifest.json").exists():
            contract = contract_from_dataset(args.out)
        else:
            raise LeRobotImportError("--contract is required when --out is not an existing dataset")
        cfg = ImportConfig(
            contract=contract, mapping=mapping_from_args(args), instruction=args.instruction, success=args.success,
            labels=load_labels(args.labels) if args.labels is not None else None, unlabeled=args.unlabeled,
            min_steps=args.min_steps, frame_tolerance_s=args.frame_tolerance, episodes_per_chunk=args.episodes_per_chunk,
            thin=args.thin, keep_still_steps=args.keep_still_steps,
        )
        reports = run_import(args.inputs, args.out, cfg, on_error=args.on_error, progress=not args.no_progress)
    except (LeRobotImportError, LeRobotFormatError, LabelsError, ContractError, ImageError) as e:
        print(f"lerobot_import: error: {e}", file=sys.stderr)
        print(f"lerobot_import: episodes committed before the error stay in {args.out}", file=sys.stderr)
        return 1
    except ValueError as e:  # DatasetError: already names the dataset
        print(f"lerobot_import: error: {e}", file=sys.stderr)
        return 1
    print(format_report(reports, contract, source="dataset"))
    if args.report_json is not None:
        write_report_json(args.report_json, reports)
    return 0 if not any(r.status == "error" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
