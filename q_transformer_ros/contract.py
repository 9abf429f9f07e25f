"""The robot contract: one YAML file that tells converter, trainer and node what the robot is.

Why one contract: the converter must build arrays exactly the way the node will see them live, the
trainer must know the action ranges and bins, and the node must know topics and sizes from a
checkpoint alone. So the contract is parsed in one place (`load_contract`), validated on
construction, and a copy of it (`RobotContract.to_dict`) travels inside every dataset and checkpoint,
where it is compared on load (`RobotContract.check_compatible`).

This module is ROS-free: message types are plain strings such as ``sensor_msgs/msg/Image``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import yaml

CONTRACT_FORMAT_VERSION = 1

IMAGE_MSG_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
ACTION_MSG_TYPES = (
    "trajectory_msgs/msg/JointTrajectory",
    "sensor_msgs/msg/JointState",
    "std_msgs/msg/Float64MultiArray",
    "geometry_msgs/msg/TwistStamped",
    "geometry_msgs/msg/PoseStamped",
)
INSTRUCTION_MSG_TYPES = ("std_msgs/msg/String",)
STATE_NORMALIZED_LIMIT = 3.0
"""Normalised state values are clipped to +-this (a reading far outside its declared range must not
drive the network far outside anything it was trained on)."""
_MSG_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*/msg/[A-Z][A-Za-z0-9_]*$")
SUCCESS_MSG_TYPES = ("std_msgs/msg/Bool",)

_FIELD_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?)*$")
_TOPIC_RE = re.compile(r"^~?/?[A-Za-z_][A-Za-z0-9_/]*$")


class ContractError(ValueError):
    """A contract that cannot be used; the message names the file (if any), the key and the value."""


def _fail(where: str, key: str, value: Any, why: str) -> ContractError:
    return ContractError(f"{where}: '{key}' = {value!r}: {why}")


@dataclass(frozen=True)
class CameraSpec:
    """One camera the policy sees."""

    name: str
    """Short name, used for dataset array names (``frames_<name>.npy``) and logs."""
    topic: str
    """ROS topic the frames arrive on, in bags and live."""
    msg_type: str = "sensor_msgs/msg/Image"
    """``sensor_msgs/msg/Image`` or ``sensor_msgs/msg/CompressedImage``."""
    height: int = 128
    """Height the frame is resized to before the model (and before storage)."""
    width: int = 128
    """Width the frame is resized to before the model (and before storage)."""
    depth: bool = False
    """True for a depth camera (16UC1 millimetres or 32FC1 metres); stored as uint8 over ``depth_max_m``."""
    depth_max_m: float = 3.0
    """Depth that maps to 255 when a depth image is quantized to uint8."""
    flip_vertical: bool = False
    """Flip rows (cameras mounted upside-down, or simulators that render upside-down)."""


@dataclass(frozen=True)
class FieldRef:
    """Where a number lives in a ROS message: topic, message type and a field path.

    The path is attribute access with optional list indices, e.g. ``twist.linear.x``,
    ``data[6]``, ``points[0].positions[2]``, ``position[3]``. With ``joint`` set, the index of that
    joint name in the message's ``name`` (JointState) or ``joint_names`` (JointTrajectory) list is
    used instead of a fixed index in the last path element, so joint order in the message does not
    matter.
    """

    topic: str
    msg_type: str
    field: str
    joint: str | None = None
    frame_id: str = ""
    """Frame id written into the header of stamped outgoing messages (TwistStamped, PoseStamped)."""


@dataclass(frozen=True)
class ActionDimSpec:
    """One action dimension: its range, its discretization and where it is read and written."""

    name: str
    low: float
    high: float
    bins: int
    source: FieldRef
    """Where the converter reads this dim from in a bag (the command the robot was given)."""
    target: FieldRef
    """Where the policy node writes this dim when it commands the robot."""
    mode: Literal["absolute", "delta"] = "absolute"
    """``absolute``: the action is the source field's value over the step; ``delta``: the change of
    the source field over the step (value at step end minus value at step start)."""

    def bin_width(self) -> float:
        return (self.high - self.low) / self.bins


@dataclass(frozen=True)
class StateInputSpec:
    """One number of robot state the policy sees next to its cameras (LeRobot's ``observation.state``):
    a joint position, velocity or effort by joint name, a gripper opening, an end-effector coordinate;
    any numeric field of any message (``pose.position.x`` of a PoseStamped, ``data[2]`` of a
    Float64MultiArray, ``position`` of a JointState with ``joint: elbow``).

    The converter samples it at each step's decision moment (newest message at or before it, stale
    after ``max_frame_age_s``, like a frame), datasets store the raw value (float32), and the model
    sees it normalised by ``low``/``high`` to [-1, 1] (clipped at +-``STATE_NORMALIZED_LIMIT``). The
    checkpoint's contract carries the range, so the node normalises exactly as training did."""

    name: str
    source: FieldRef
    low: float
    high: float
    """The range mapped to [-1, 1]: the robot's limits, or the data's observed range."""


@dataclass(frozen=True)
class InstructionSpec:
    """Where the language instruction comes from."""

    topic: str | None = "/instruction"
    """std_msgs/String topic (latched / transient-local); None when the text is fixed."""
    fixed_text: str | None = None
    """A fixed instruction used when there is no topic (single-task robots)."""
    allow_none: bool = False
    """If True the node acts without an instruction using the learned null conditioning."""


@dataclass(frozen=True)
class SuccessSpec:
    """How episode success (the sparse reward) is known."""

    topic: str | None = "/success"
    """std_msgs/Bool topic; a True message marks the episode successful."""
    msg_type: str = "std_msgs/msg/Bool"
    external_labels: bool = False
    """True when success comes from a labels file given to the converter instead of a topic."""


@dataclass(frozen=True)
class RobotContract:
    """Everything the converter, trainer and node must agree on about one robot set-up."""

    name: str
    cameras: tuple[CameraSpec, ...]
    action_dims: tuple[ActionDimSpec, ...]
    frame_history: int = 4
    """Number of most recent frames (per camera) the model sees."""
    control_rate_hz: float = 10.0
    """Decision rate: the step camera's frames are thinned to it, in bags (converter) and live (node)."""
    instruction: InstructionSpec = field(default_factory=InstructionSpec)
    success: SuccessSpec = field(default_factory=SuccessSpec)
    discount: float = 0.98
    """Discount factor gamma used for returns and Bellman targets."""
    max_frame_age_s: float = 0.5
    """Frames older than this at a step are stale: the converter drops the step, the node stops."""
    stop_behaviour: Literal["zero", "hold"] = "zero"
    """What the node publishes on stale input: zero command (velocity robots) or hold (no message)."""
    state_inputs: tuple[StateInputSpec, ...] = ()
    """Robot-state numbers the model sees at every step besides the frames (empty: cameras only)."""

    def __post_init__(self) -> None:
        validate_contract(self)

    # -- derived --------------------------------------------------------------------------------
    @property
    def num_action_dims(self) -> int:
        return len(self.action_dims)

    @property
    def action_bins(self) -> tuple[int, ...]:
        return tuple(d.bins for d in self.action_dims)

    @property
    def action_low(self) -> np.ndarray:
        return np.array([d.low for d in self.action_dims], dtype=np.float32)

    @property
    def action_high(self) -> np.ndarray:
        return np.array([d.high for d in self.action_dims], dtype=np.float32)

    @property
    def control_period_s(self) -> float:
        return 1.0 / self.control_rate_hz

    @property
    def state_dim(self) -> int:
        return len(self.state_inputs)

    @property
    def state_low(self) -> np.ndarray:
        return np.array([s.low for s in self.state_inputs], dtype=np.float32)

    @property
    def state_high(self) -> np.ndarray:
        return np.array([s.high for s in self.state_inputs], dtype=np.float32)

    def normalize_state(self, values: np.ndarray) -> np.ndarray:
        """Raw state ``(..., S)`` in the sources' units -> float32 in [-1, 1] over each input's range
        (clipped at +-STATE_NORMALIZED_LIMIT). Used by the dataset reader and the live policy alike."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape[-1:] != (self.state_dim,):
            raise ValueError(f"state has shape {values.shape}, contract '{self.name}' declares {self.state_dim} "
                             f"state inputs {[s.name for s in self.state_inputs]}")
        low, high = self.state_low, self.state_high
        out = (values - low) / (high - low) * 2.0 - 1.0
        return np.clip(out, -STATE_NORMALIZED_LIMIT, STATE_NORMALIZED_LIMIT).astype(np.float32)

    def camera(self, name: str) -> CameraSpec:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise KeyError(f"contract '{self.name}' has no camera '{name}' (cameras: {[c.name for c in self.cameras]})")

    # -- actions <-> bins -----------------------------------------------------------------------
    def actions_to_bins(self, actions: np.ndarray) -> np.ndarray:
        """Continuous actions ``(..., D)`` -> bin indices ``(..., D)`` (int64), clipped into range."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape[-1] != self.num_action_dims:
            raise ValueError(
                f"actions have {actions.shape[-1]} dims in their last axis, contract '{self.name}' has "
                f"{self.num_action_dims} ({[d.name for d in self.action_dims]})"
            )
        low, high = self.action_low.astype(np.float64), self.action_high.astype(np.float64)
        bins = np.array(self.action_bins, dtype=np.float64)
        frac = (actions - low) / (high - low)
        idx = np.floor(frac * bins)
        return np.clip(idx, 0, bins - 1).astype(np.int64)

    def bins_to_actions(self, bins: np.ndarray) -> np.ndarray:
        """Bin indices ``(..., D)`` -> continuous actions at bin centres ``(..., D)`` float32."""
        bins = np.asarray(bins)
        if bins.shape[-1] != self.num_action_dims:
            raise ValueError(f"bins have {bins.shape[-1]} dims, contract '{self.name}' has {self.num_action_dims}")
        n = np.array(self.action_bins, dtype=np.float64)
        if np.any(bins < 0) or np.any(bins >= n):
            raise ValueError(f"bin index out of range for contract '{self.name}': {bins} (bins per dim {self.action_bins})")
        low, high = self.action_low.astype(np.float64), self.action_high.astype(np.float64)
        return (low + (bins + 0.5) * (high - low) / n).astype(np.float32)

    # -- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["state_inputs"]:  # contracts without state keep the dict (and fingerprint) they always had
            del d["state_inputs"]
        d["format_version"] = CONTRACT_FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<contract>") -> "RobotContract":
        return parse_contract(data, where)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Short hash of everything that changes what data mean (not the name)."""
        d = self.to_dict()
        d.pop("name", None)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_compatible(self, other: "RobotContract", *, what: str, where: str, allow_rebin: bool = True) -> None:
        """Raise ContractError if ``other`` (e.g. a dataset's contract) cannot be used with ``self``.

        Cameras (names, sizes), frame history and action dim names must match. Ranges and bins may
        differ when ``allow_rebin`` (datasets store continuous actions, re-binned at load).
        """
        problems: list[str] = []
        mine = [(c.name, c.height, c.width, c.depth) for c in self.cameras]
        theirs = [(c.name, c.height, c.width, c.depth) for c in other.cameras]
        if mine != theirs:
            problems.append(f"cameras differ: {theirs} vs {mine}")
        if [d.name for d in self.action_dims] != [d.name for d in other.action_dims]:
            problems.append(
                f"action dims differ: {[d.name for d in other.action_dims]} vs {[d.name for d in self.action_dims]}"
            )
        elif not allow_rebin:
            for a, b in zip(other.action_dims, self.action_dims):
                if (a.low, a.high, a.bins) != (b.low, b.high, b.bins):
                    problems.append(f"action dim '{a.name}' range/bins differ: {(a.low, a.high, a.bins)} vs {(b.low, b.high, b.bins)}")
        if [s.name for s in self.state_inputs] != [s.name for s in other.state_inputs]:
            problems.append(f"state inputs differ: {[s.name for s in other.state_inputs]} vs "
                            f"{[s.name for s in self.state_inputs]}")
        if self.frame_history != other.frame_history and not allow_rebin:
            problems.append(f"frame_history differs: {other.frame_history} vs {self.frame_history}")
        if problems:
            raise ContractError(
                f"{where}: {what} was made with contract '{other.name}' which does not match contract "
                f"'{self.name}': " + "; ".join(problems)
            )


# ---------------------------------------------------------------------------------------------
# parsing and validation
# ---------------------------------------------------------------------------------------------

def _take(cls: type, data: Mapping[str, Any], where: str, key: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _fail(where, key, data, f"expected a mapping with keys {[f.name for f in fields(cls)]}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known - {"format_version"}
    if unknown:
        raise _fail(where, f"{key}.{sorted(unknown)[0]}", data[sorted(unknown)[0]], f"unknown key; known keys are {sorted(known)}")
    return {k: v for k, v in data.items() if k in known}


def _field_ref(data: Any, where: str, key: str) -> FieldRef:
    kw = _take(FieldRef, data, where, key)
    for req in ("topic", "msg_type", "field"):
        if req not in kw:
            raise _fail(where, f"{key}.{req}", None, "missing")
    return FieldRef(**kw)


def parse_contract(data: Mapping[str, Any], where: str = "<contract>") -> RobotContract:
    """Build a validated RobotContract from a plain mapping (parsed YAML or an embedded copy)."""
    if not isinstance(data, Mapping):
        raise ContractError(f"{where}: a contract must be a mapping, got {type(data).__name__}")
    version = data.get("format_version", CONTRACT_FORMAT_VERSION)
    if version != CONTRACT_FORMAT_VERSION:
        raise _fail(where, "format_version", version, f"this package reads version {CONTRACT_FORMAT_VERSION}")
    kw = _take(RobotContract, data, where, "contract")
    for req in ("name", "cameras", "action_dims"):
        if req not in kw:
            raise _fail(where, req, None, "missing")
    cams = kw["cameras"]
    if not isinstance(cams, (list, tuple)) or not cams:
        raise _fail(where, "cameras", cams, "expected a non-empty list of cameras")
    kw["cameras"] = tuple(CameraSpec(**_take(CameraSpec, c, where, f"cameras[{i}]")) for i, c in enumerate(cams))
    dims = kw["action_dims"]
    if not isinstance(dims, (list, tuple)) or not dims:
        raise _fail(where, "action_dims", dims, "expected a non-empty list of action dims")
    parsed = []
    for i, d in enumerate(dims):
        dk = _take(ActionDimSpec, d, where, f"action_dims[{i}]")
        for req in ("name", "low", "high", "bins", "source", "target"):
            if req not in dk:
                raise _fail(where, f"action_dims[{i}].{req}", None, "missing")
        dk["source"] = _field_ref(dk["source"], where, f"action_dims[{i}].source")
        dk["target"] = _field_ref(dk["target"], where, f"action_dims[{i}].target")
        dk["low"], dk["high"] = float(dk["low"]), float(dk["high"])
        parsed.append(ActionDimSpec(**dk))
    kw["action_dims"] = tuple(parsed)
    states = kw.get("state_inputs") or ()
    if not isinstance(states, (list, tuple)):
        raise _fail(where, "state_inputs", states, "expected a list of state inputs (name, source, low, high)")
    parsed_states = []
    for i, s in enumerate(states):
        sk = _take(StateInputSpec, s, where, f"state_inputs[{i}]")
        for req in ("name", "source", "low", "high"):
            if req not in sk:
                raise _fail(where, f"state_inputs[{i}].{req}", None, "missing")
        sk["source"] = _field_ref(sk["source"], where, f"state_inputs[{i}].source")
        try:
            sk["low"], sk["high"] = float(sk["low"]), float(sk["high"])
        except (TypeError, ValueError):
            raise _fail(where, f"state_inputs[{i}].low/high", (sk["low"], sk["high"]), "must be numbers") from None
        parsed_states.append(StateInputSpec(**sk))
    kw["state_inputs"] = tuple(parsed_states)
    if "instruction" in kw:
        kw["instruction"] = InstructionSpec(**_take(InstructionSpec, kw["instruction"] or {}, where, "instruction"))
    if "success" in kw:
        kw["success"] = SuccessSpec(**_take(SuccessSpec, kw["success"] or {}, where, "success"))
    try:
        return RobotContract(**kw)
    except ContractError as e:
        raise ContractError(str(e).replace("<contract>", where, 1)) from None


def _check_named_range(item: ActionDimSpec | StateInputSpec, seen: set[str], where: str, key: str, what: str) -> None:
    """A non-empty name unique among its kind (added to ``seen``) and a finite ``low < high``."""
    if not isinstance(item.name, str) or not item.name:
        raise _fail(where, f"{key}.name", item.name, "must be a non-empty string")
    if item.name in seen:
        raise _fail(where, f"{key}.name", item.name, f"duplicate {what} name")
    seen.add(item.name)
    if not (math.isfinite(item.low) and math.isfinite(item.high) and item.low < item.high):
        raise _fail(where, f"{key}.low/high", (item.low, item.high), "need finite low < high")


def _check_field_ref(ref: FieldRef, where: str, key: str, example: str,
                     msg_types: tuple[str, ...] | None = None) -> None:
    """Topic, message type (one of ``msg_types``, or any when None), field path and joint of a field
    reference (action source/target, state source)."""
    if not isinstance(ref.topic, str) or not _TOPIC_RE.match(ref.topic):
        raise _fail(where, f"{key}.topic", ref.topic, "not a valid ROS topic name")
    if msg_types is not None:
        if ref.msg_type not in msg_types:
            raise _fail(where, f"{key}.msg_type", ref.msg_type, f"must be one of {msg_types}")
    elif not isinstance(ref.msg_type, str) or not _MSG_TYPE_RE.match(ref.msg_type):
        raise _fail(where, f"{key}.msg_type", ref.msg_type, "not a message type like 'sensor_msgs/msg/JointState'")
    if not isinstance(ref.field, str) or not _FIELD_PATH_RE.match(ref.field):
        raise _fail(where, f"{key}.field", ref.field, f"not a field path like {example}")
    if ref.joint is not None and ref.msg_type not in ("sensor_msgs/msg/JointState", "trajectory_msgs/msg/JointTrajectory"):
        raise _fail(where, f"{key}.joint", ref.joint, "joint names apply to JointState / JointTrajectory only")


def validate_contract(c: RobotContract, where: str = "<contract>") -> None:
    """Check every value; errors name the key and the bad value."""
    if not isinstance(c.name, str) or not c.name:
        raise _fail(where, "name", c.name, "must be a non-empty string")
    names = set()
    for i, cam in enumerate(c.cameras):
        k = f"cameras[{i}]"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(cam.name)):
            raise _fail(where, f"{k}.name", cam.name, "must be an identifier (letters, digits, underscore)")
        if cam.name in names:
            raise _fail(where, f"{k}.name", cam.name, "duplicate camera name")
        names.add(cam.name)
        if not isinstance(cam.topic, str) or not _TOPIC_RE.match(cam.topic):
            raise _fail(where, f"{k}.topic", cam.topic, "not a valid ROS topic name")
        if cam.msg_type not in IMAGE_MSG_TYPES:
            raise _fail(where, f"{k}.msg_type", cam.msg_type, f"must be one of {IMAGE_MSG_TYPES}")
        for key in ("height", "width"):
            v = getattr(cam, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 8 or v > 4096:
                raise _fail(where, f"{k}.{key}", v, "must be an integer in [8, 4096]")
        if not (isinstance(cam.depth_max_m, (int, float)) and cam.depth_max_m > 0):
            raise _fail(where, f"{k}.depth_max_m", cam.depth_max_m, "must be > 0")
    dim_names: set[str] = set()
    for i, d in enumerate(c.action_dims):
        k = f"action_dims[{i}]"
        _check_named_range(d, dim_names, where, k, "action dim")
        if not isinstance(d.bins, int) or isinstance(d.bins, bool) or d.bins < 2 or d.bins > 4096:
            raise _fail(where, f"{k}.bins", d.bins, "must be an integer in [2, 4096]")
        if d.mode not in ("absolute", "delta"):
            raise _fail(where, f"{k}.mode", d.mode, "must be 'absolute' or 'delta'")
        for side in ("source", "target"):
            ref: FieldRef = getattr(d, side)
            _check_field_ref(ref, where, f"{k}.{side}", "'twist.linear.x' or 'data[3]'", ACTION_MSG_TYPES)
    state_names: set[str] = set()
    for i, s in enumerate(c.state_inputs):
        k = f"state_inputs[{i}]"
        _check_named_range(s, state_names, where, k, "state input")
        _check_field_ref(s.source, where, f"{k}.source", "'pose.position.x' or 'data[3]'")
    if not isinstance(c.frame_history, int) or isinstance(c.frame_history, bool) or not 1 <= c.frame_history <= 64:
        raise _fail(where, "frame_history", c.frame_history, "must be an integer in [1, 64]")
    if not (isinstance(c.control_rate_hz, (int, float)) and 0 < c.control_rate_hz <= 1000):
        raise _fail(where, "control_rate_hz", c.control_rate_hz, "must be in (0, 1000]")
    if not (isinstance(c.discount, (int, float)) and 0 < c.discount <= 1):
        raise _fail(where, "discount", c.discount, "must be in (0, 1]")
    if not (isinstance(c.max_frame_age_s, (int, float)) and c.max_frame_age_s > 0):
        raise _fail(where, "max_frame_age_s", c.max_frame_age_s, "must be > 0")
    if c.stop_behaviour not in ("zero", "hold"):
        raise _fail(where, "stop_behaviour", c.stop_behaviour, "must be 'zero' or 'hold'")
    ins = c.instruction
    if ins.topic is None and ins.fixed_text is None and not ins.allow_none:
        raise _fail(where, "instruction", asdict(ins), "give a topic, a fixed_text, or allow_none: true")
    if ins.topic is not None and not _TOPIC_RE.match(ins.topic):
        raise _fail(where, "instruction.topic", ins.topic, "not a valid ROS topic name")
    suc = c.success
    if suc.topic is None and not suc.external_labels:
        raise _fail(where, "success", asdict(suc), "give a topic or external_labels: true")
    if suc.topic is not None and suc.msg_type not in SUCCESS_MSG_TYPES:
        raise _fail(where, "success.msg_type", suc.msg_type, f"must be one of {SUCCESS_MSG_TYPES}")


def load_contract(path: str | Path) -> RobotContract:
    """Read and validate a contract YAML file. The file may hold the contract at top level or under
    a ``contract:`` key (so a contract can live inside a larger config)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ContractError(f"{path}: cannot read contract file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ContractError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, Mapping) and "contract" in data and isinstance(data["contract"], Mapping):
        data = data["contract"]
    return parse_contract(data, where=str(path))
