"""Numbers in ROS messages <-> action vectors, by the contract's field references.

Why duck-typed: the converter reads rosbags message objects (dataclasses with numpy arrays) and the
policy node writes rclpy messages (with ``array.array`` sequences); both expose the same attribute
names, so one walker over a parsed field path serves both, and this module stays ROS-free.

A field path is attribute access with optional list indices (``points[0].positions[2]``). With
``FieldRef.joint`` set, the last index comes from the joint's position in ``name`` (JointState) or
``joint_names`` (JointTrajectory) instead, so the joint order inside a message does not matter.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from q_transformer_ros.contract import ActionDimSpec, FieldRef

_PART_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")
_JOINT_LIST_FIELD = {
    "sensor_msgs/msg/JointState": "name",
    "trajectory_msgs/msg/JointTrajectory": "joint_names",
}


class FieldError(ValueError):
    """A field reference that does not fit a message; the message names topic, type, field and value."""


class JointNotInMessage(FieldError):
    """The joint a field reference names is not in this message's joint list. Not always a fault: a
    robot may publish its arm and its gripper as separate JointState messages on one topic, so readers
    of a stream skip such messages (and complain only when no message has the joint)."""


@lru_cache(maxsize=1024)
def parse_field_path(path: str) -> tuple[tuple[str, int | None], ...]:
    """``'points[0].positions[2]'`` -> ``(('points', 0), ('positions', 2))``."""
    parts = []
    for part in path.split("."):
        m = _PART_RE.match(part)
        if not m:
            raise FieldError(f"field path {path!r}: bad element {part!r} (expected name or name[index])")
        parts.append((m.group(1), int(m.group(2)) if m.group(2) is not None else None))
    return tuple(parts)


def _describe(ref: FieldRef) -> str:
    joint = f" (joint {ref.joint!r})" if ref.joint else ""
    return f"topic {ref.topic} ({ref.msg_type}) field '{ref.field}'{joint}"


def _joint_index(msg: Any, ref: FieldRef, create: bool) -> int:
    list_field = _JOINT_LIST_FIELD.get(ref.msg_type)
    if list_field is None or not hasattr(msg, list_field):
        raise FieldError(f"{_describe(ref)}: joint lookup needs a '{list_field or 'name'}' list in the message")
    names = [str(n) for n in getattr(msg, list_field)]
    if ref.joint in names:
        return names.index(ref.joint)
    if not create:
        raise JointNotInMessage(f"{_describe(ref)}: joint {ref.joint!r} not in message {list_field} {names}")
    setattr(msg, list_field, [*names, ref.joint])
    return len(names)


def _attr(obj: Any, name: str, ref: FieldRef) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        have = [a for a in dir(obj) if not a.startswith("_") and not callable(getattr(obj, a, None))]
        raise FieldError(f"{_describe(ref)}: {type(obj).__name__} has no field {name!r} (fields: {have})") from None


def read_field(msg: Any, ref: FieldRef) -> float:
    """The float at ``ref.field`` in ``msg`` (joint name resolved if ``ref.joint``)."""
    parts = parse_field_path(ref.field)
    obj = msg
    for i, (name, index) in enumerate(parts):
        obj = _attr(obj, name, ref)
        last = i == len(parts) - 1
        if last and ref.joint:
            index = _joint_index(msg, ref, create=False)
        if index is not None:
            try:
                n = len(obj)
            except TypeError:
                raise FieldError(f"{_describe(ref)}: '{name}' is not a list (got {type(obj).__name__})") from None
            if index >= n:
                raise FieldError(f"{_describe(ref)}: index {index} out of range, '{name}' has {n} element(s)")
            obj = obj[index]
    try:
        value = float(obj)
    except (TypeError, ValueError):
        raise FieldError(f"{_describe(ref)}: value {obj!r} is not a number") from None
    return value


def _new_element(parent: Any, name: str, seq: Any, ref: FieldRef) -> Any:
    """A default-constructed element for sequence field ``name`` of ``parent`` (rclpy or rosbags)."""
    if len(seq) and not isinstance(seq[0], (int, float, str, np.generic)):
        try:
            return type(seq[0])()
        except TypeError:
            pass
    get_types = getattr(type(parent), "get_fields_and_field_types", None)
    if get_types is not None:  # rclpy message: 'sequence<trajectory_msgs/JointTrajectoryPoint>'
        spec = get_types().get(name, "")
        m = re.match(r"^sequence<([\w]+)/([\w]+)(?:, \d+)?>$", spec)
        if m:
            module = importlib.import_module(f"{m.group(1)}.msg")
            return getattr(module, m.group(2))()
    raise FieldError(f"{_describe(ref)}: cannot create a new element of '{name}' on {type(parent).__name__}")


def write_field(msg: Any, ref: FieldRef, value: float) -> None:
    """Set the float at ``ref.field`` in ``msg``, growing lists as needed (new joints appended by name)."""
    parts = parse_field_path(ref.field)
    obj = msg
    for i, (name, index) in enumerate(parts):
        last = i == len(parts) - 1
        if last and ref.joint:
            index = _joint_index(msg, ref, create=True)
        if index is None:
            if last:
                setattr(obj, name, float(value))
            else:
                obj = _attr(obj, name, ref)
            continue
        seq = _attr(obj, name, ref)
        if len(seq) <= index:
            if last:
                grown = [float(v) for v in seq] + [0.0] * (index + 1 - len(seq))
            else:
                grown = list(seq) + [_new_element(obj, name, seq, ref) for _ in range(index + 1 - len(seq))]
            setattr(obj, name, grown)
            seq = _attr(obj, name, ref)
        if last:
            if isinstance(seq, np.ndarray) and not seq.flags.writeable:
                seq = seq.copy()
                setattr(obj, name, seq)
            seq[index] = float(value)
            if isinstance(seq, list):  # rclpy setters copy lists: write it back to be sure
                setattr(obj, name, seq)
        else:
            obj = seq[index]


@dataclass(frozen=True)
class TopicGroup:
    """The action dims read from (or written to) one topic."""

    topic: str
    msg_type: str
    dim_indices: tuple[int, ...]
    """Positions of these dims in the action vector."""
    refs: tuple[FieldRef, ...]


def group_dims_by_topic(dims: Sequence[ActionDimSpec], side: str = "target") -> list[TopicGroup]:
    """Group action dims by their ``source`` or ``target`` topic, in first-seen order.

    Why: the node publishes one message per target topic holding all its dims, and the converter
    reads each source topic once per step. A topic named with two message types is an error.
    """
    if side not in ("source", "target"):
        raise ValueError(f"side must be 'source' or 'target', got {side!r}")
    groups: dict[str, tuple[str, list[int], list[FieldRef]]] = {}
    for i, d in enumerate(dims):
        ref: FieldRef = getattr(d, side)
        if ref.topic in groups:
            msg_type, idx, refs = groups[ref.topic]
            if msg_type != ref.msg_type:
                raise FieldError(
                    f"action dim '{d.name}': {side} topic {ref.topic} has type {ref.msg_type} but another dim "
                    f"uses it with {msg_type}"
                )
            idx.append(i)
            refs.append(ref)
        else:
            groups[ref.topic] = (ref.msg_type, [i], [ref])
    return [TopicGroup(t, mt, tuple(idx), tuple(refs)) for t, (mt, idx, refs) in groups.items()]


def actions_from_messages(messages: Mapping[str, Any], dims: Sequence[ActionDimSpec], side: str = "source") -> np.ndarray:
    """Read every dim from ``messages`` (topic -> message) -> float32 ``(D,)``."""
    out = np.empty(len(dims), dtype=np.float32)
    for i, d in enumerate(dims):
        ref: FieldRef = getattr(d, side)
        if ref.topic not in messages:
            raise FieldError(f"action dim '{d.name}': no message on {ref.topic} to read field '{ref.field}'")
        out[i] = read_field(messages[ref.topic], ref)
    return out


def write_action(messages: Mapping[str, Any], dims: Sequence[ActionDimSpec], action: Iterable[float]) -> None:
    """Write an action vector into per-topic messages (topic -> message) at the dims' target fields.

    Stamped messages get ``header.frame_id`` from the target FieldRef when it names one; stamping the
    time is the caller's job (it owns the clock).
    """
    values = [float(v) for v in action]
    if len(values) != len(dims):
        raise FieldError(f"action has {len(values)} values, the contract has {len(dims)} dims ({[d.name for d in dims]})")
    for d, v in zip(dims, values):
        ref = d.target
        if ref.topic not in messages:
            raise FieldError(f"action dim '{d.name}': no message given for target topic {ref.topic}")
        msg = messages[ref.topic]
        write_field(msg, ref, v)
        if ref.frame_id and hasattr(msg, "header"):
            msg.header.frame_id = ref.frame_id
