"""rclpy glue for the policy node: message classes from type strings, and command messages built from
the contract's action dims.

Why here: filling a field is ROS-free and duck-typed (``data.messages.write_field``, which also
grows lists), and grouping dims by topic is ``data.messages.group_dims_by_topic``; what needs rclpy is
the message classes themselves, headers, joint names in contract order and ``time_from_start``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

from builtin_interfaces.msg import Duration, Time

from q_transformer_ros.contract import FieldRef, RobotContract
from q_transformer_ros.data.messages import group_dims_by_topic, write_field

@lru_cache(maxsize=None)
def message_class(type_string: str) -> type:
    """``'sensor_msgs/msg/Image'`` (or ``'sensor_msgs/Image'``) -> the rclpy message class."""
    parts = type_string.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"message type {type_string!r} is not of the form 'package/msg/Name'")
    pkg, kind, name = parts
    try:
        module = importlib.import_module(f"{pkg}.{kind}")
        return getattr(module, name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"message type {type_string!r} is not available in this ROS install: {e}") from None


@dataclass(frozen=True)
class OutputGroup:
    """All action dims that one outgoing command message carries."""

    topic: str
    """Topic the message is published on (the contract's target topic, after any remap)."""
    contract_topic: str
    """The target topic as written in the contract (what remaps refer to)."""
    msg_type: str
    """Message type string, e.g. ``geometry_msgs/msg/TwistStamped``."""
    dims: tuple[int, ...]
    """Indices of the action dims (contract order) written into this message."""
    refs: tuple[FieldRef, ...]
    """The target FieldRef of each of those dims (same order as ``dims``)."""

    @property
    def frame_id(self) -> str:
        """Header frame id for stamped messages: the first non-empty one among the dims."""
        return next((r.frame_id for r in self.refs if r.frame_id), "")

    @property
    def joint_names(self) -> list[str]:
        """Joint names in contract order (JointTrajectory / JointState targets), without repeats."""
        names: list[str] = []
        for r in self.refs:
            if r.joint and r.joint not in names:
                names.append(r.joint)
        return names


def group_outputs(contract: RobotContract, remap: dict[str, str] | None = None) -> list[OutputGroup]:
    """Group the contract's action dims by target topic (first-seen order), applying topic remaps.

    Raises ``data.messages.FieldError`` if two dims name the same topic with different message types.
    """
    remap = remap or {}
    return [
        OutputGroup(topic=remap.get(g.topic, g.topic), contract_topic=g.topic, msg_type=g.msg_type,
                    dims=g.dim_indices, refs=g.refs)
        for g in group_dims_by_topic(contract.action_dims, side="target")
    ]


def duration_from_seconds(seconds: float) -> Duration:
    """builtin_interfaces/Duration from float seconds."""
    sec = int(seconds)
    return Duration(sec=sec, nanosec=int(round((seconds - sec) * 1e9)))


def build_command(group: OutputGroup, values: Sequence[float], stamp: Time, period_s: float) -> Any:
    """One command message for ``group`` carrying ``values`` (one per dim in ``group.dims``).

    Stamped messages get ``stamp`` and the contract's frame id; JointTrajectory gets the contract's
    joint names and one point reached after one control period; JointState gets the joint names.
    """
    if len(values) != len(group.dims):
        raise ValueError(f"topic {group.topic}: {len(values)} values for {len(group.dims)} action dims")
    msg = message_class(group.msg_type)()
    if hasattr(msg, "header"):
        msg.header.stamp = stamp
        msg.header.frame_id = group.frame_id
    joints = group.joint_names
    if group.msg_type == "trajectory_msgs/msg/JointTrajectory":
        msg.joint_names = joints
        point = message_class("trajectory_msgs/msg/JointTrajectoryPoint")()
        point.time_from_start = duration_from_seconds(period_s)
        msg.points = [point]
    elif group.msg_type == "sensor_msgs/msg/JointState":
        msg.name = joints
    for ref, value in zip(group.refs, values):
        write_field(msg, ref, float(value))
    return msg
