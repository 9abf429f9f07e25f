"""Real bags for converter tests: written with rosbags' Writer, messages serialized via the typestore.

`BagScript` records what was written (frames as arrays, commands as numbers, with times), so tests can
compute the expected dataset from it independently of the converter.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from q_transformer_ros.data.bag_reader import typestore_for
from q_transformer_ros.data.bag_writer import BagWriter
from q_transformer_ros.data.contract import parse_contract

NS = 1_000_000_000
TS = typestore_for(None)
M = TS.types


def stamp(t_ns: int) -> Any:
    return M["builtin_interfaces/msg/Time"](sec=int(t_ns // NS), nanosec=int(t_ns % NS))


def header(t_ns: int, frame_id: str = "") -> Any:
    return M["std_msgs/msg/Header"](stamp=stamp(t_ns), frame_id=frame_id)


def image_msg(arr: np.ndarray, encoding: str, t_ns: int, step: int | None = None) -> Any:
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    row = arr.reshape(h, -1).view(np.uint8)
    if step is not None and step > row.shape[1]:
        row = np.concatenate([row, np.zeros((h, step - row.shape[1]), np.uint8)], axis=1)
    data = np.ascontiguousarray(row).reshape(-1)
    return M["sensor_msgs/msg/Image"](header=header(t_ns), height=h, width=w, encoding=encoding, is_bigendian=0,
                                     step=row.shape[1], data=data)


def compressed_msg(arr: np.ndarray, fmt: str, t_ns: int) -> Any:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=95)
    return M["sensor_msgs/msg/CompressedImage"](header=header(t_ns), format=fmt,
                                               data=np.frombuffer(buf.getvalue(), np.uint8))


def twist_msg(x: float, y: float, t_ns: int) -> Any:
    V = M["geometry_msgs/msg/Vector3"]
    return M["geometry_msgs/msg/TwistStamped"](header=header(t_ns, "base_link"), twist=M["geometry_msgs/msg/Twist"](
        linear=V(x=x, y=y, z=0.0), angular=V(x=0.0, y=0.0, z=0.0)))


def f64_msg(values: list[float]) -> Any:
    layout = M["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    return M["std_msgs/msg/Float64MultiArray"](layout=layout, data=np.asarray(values, dtype=np.float64))


def joint_state_msg(names: list[str], positions: list[float], t_ns: int) -> Any:
    return M["sensor_msgs/msg/JointState"](header=header(t_ns), name=names, position=np.asarray(positions, np.float64),
                                          velocity=np.zeros(0), effort=np.zeros(0))


def string_msg(text: str) -> Any:
    return M["std_msgs/msg/String"](data=text)


def bool_msg(value: bool) -> Any:
    return M["std_msgs/msg/Bool"](data=value)


TEST_CONTRACT = {
    "name": "test_arm",
    "control_rate_hz": 10.0,
    "frame_history": 2,
    "max_frame_age_s": 0.3,
    "cameras": [
        {"name": "front", "topic": "/front/image_raw", "msg_type": "sensor_msgs/msg/Image", "height": 16, "width": 16},
        {"name": "wrist", "topic": "/wrist/image/compressed", "msg_type": "sensor_msgs/msg/CompressedImage",
         "height": 16, "width": 16},
    ],
    "instruction": {"topic": "/instruction"},
    "success": {"topic": "/success"},
    "action_dims": [
        {"name": "vx", "low": -1.0, "high": 1.0, "bins": 16,
         "source": {"topic": "/cmd", "msg_type": "geometry_msgs/msg/TwistStamped", "field": "twist.linear.x"},
         "target": {"topic": "/cmd", "msg_type": "geometry_msgs/msg/TwistStamped", "field": "twist.linear.x"}},
        {"name": "vy", "low": -1.0, "high": 1.0, "bins": 16,
         "source": {"topic": "/cmd", "msg_type": "geometry_msgs/msg/TwistStamped", "field": "twist.linear.y"},
         "target": {"topic": "/cmd", "msg_type": "geometry_msgs/msg/TwistStamped", "field": "twist.linear.y"}},
        {"name": "grip", "low": 0.0, "high": 1.0, "bins": 8,
         "source": {"topic": "/gripper", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[0]"},
         "target": {"topic": "/gripper", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[0]"}},
        {"name": "elbow", "low": -0.2, "high": 0.2, "bins": 8, "mode": "delta",
         "source": {"topic": "/joint_states", "msg_type": "sensor_msgs/msg/JointState", "field": "position[0]",
                    "joint": "elbow"},
         "target": {"topic": "/arm/cmd", "msg_type": "trajectory_msgs/msg/JointTrajectory",
                    "field": "points[0].positions[0]", "joint": "elbow"}},
    ],
}


def make_contract(**overrides: Any):
    data = {**TEST_CONTRACT, **overrides}
    return parse_contract(data, where="<test contract>")


@dataclass
class BagScript:
    """Messages to write, plus the plain values they carry (for computing expectations)."""

    msgs: list[tuple[str, str, int, Any]] = field(default_factory=list)
    frames: dict[str, list[tuple[int, np.ndarray, str]]] = field(default_factory=dict)
    """topic -> [(t_ns, source array as decoded, encoding)]"""
    values: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """action dim name -> [(t_ns, value)]"""

    def add(self, topic: str, msgtype: str, t_ns: int, msg: Any) -> None:
        self.msgs.append((topic, msgtype, int(t_ns), msg))

    def write(self, path: Path, storage: str = "mcap", compression: str | None = None,
              custom: dict[str, str] | None = None) -> Path:
        with BagWriter(path, storage=storage, compression=compression) as w:
            for topic, msgtype, _, _ in self.msgs:
                w.add_topic(topic, msgtype)
            for topic, _, t, msg in sorted(self.msgs, key=lambda m: m[2]):
                w.write(topic, t, msg)
            for k, v in (custom or {}).items():
                w.set_custom_data(k, v)
        return path


def make_episode(seed: int = 0, t0: float = 1.0, duration: float = 2.0, instruction: str | None = "pick the cube",
                 success: bool | None = True, front_hz: float = 20.0, wrist_hz: float = 8.0, cmd_hz: float = 10.0,
                 front_encoding: str = "bgr8", wrist_format: str = "png", camera_gap: tuple[float, float] | None = None,
                 script: BagScript | None = None) -> BagScript:
    """A scripted episode: two cameras at different rates, commands, joint states, instruction, success.

    front: 24x32 raw Image; wrist: 20x20 PNG (lossless) or JPEG. Commands at ``cmd_hz`` with values
    drawn from a seeded RNG; the elbow joint moves so that its delta per step is known.
    ``camera_gap`` (start, end) in seconds from t0: the front camera sends nothing then.
    """
    rng = np.random.default_rng(seed)
    s = script or BagScript()
    start = int(t0 * NS)
    end = start + int(duration * NS)
    if instruction is not None:
        s.add("/instruction", "std_msgs/msg/String", start, string_msg(instruction))
    t = start + int(0.013 * NS)
    while t <= end:
        if camera_gap is None or not (start + camera_gap[0] * NS <= t < start + camera_gap[1] * NS):
            arr = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            s.add("/front/image_raw", "sensor_msgs/msg/Image", t, image_msg(arr, front_encoding, t))
            s.frames.setdefault("/front/image_raw", []).append((t, arr, front_encoding))
        t += int(NS / front_hz)
    t = start + int(0.021 * NS)
    while t <= end:
        arr = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
        msg = compressed_msg(arr, wrist_format, t)
        if wrist_format == "jpeg":  # lossy: the expectation is what a decoder makes of it
            arr = np.asarray(PILImage.open(io.BytesIO(bytes(msg.data))).convert("RGB"))
        s.add("/wrist/image/compressed", "sensor_msgs/msg/CompressedImage", t, msg)
        s.frames.setdefault("/wrist/image/compressed", []).append((t, arr, "rgb8"))
        t += int(NS / wrist_hz)
    t = start + int(0.005 * NS)
    elbow = 0.0
    while t <= end:
        vx, vy, g = (float(v) for v in rng.uniform(-0.9, 0.9, size=3))
        g = abs(g)
        s.add("/cmd", "geometry_msgs/msg/TwistStamped", t, twist_msg(vx, vy, t))
        s.add("/gripper", "std_msgs/msg/Float64MultiArray", t, f64_msg([g]))
        s.values.setdefault("vx", []).append((t, vx))
        s.values.setdefault("vy", []).append((t, vy))
        s.values.setdefault("grip", []).append((t, g))
        t += int(NS / cmd_hz)
    t = start + int(0.002 * NS)
    while t <= end:
        elbow += float(rng.uniform(-0.01, 0.01))
        # joint order varies between messages: the converter must look the joint up by name
        names, pos = (["shoulder", "elbow"], [0.5, elbow]) if rng.random() < 0.5 else (["elbow", "shoulder"], [elbow, 0.5])
        s.add("/joint_states", "sensor_msgs/msg/JointState", t, joint_state_msg(names, pos, t))
        s.values.setdefault("elbow", []).append((t, elbow))
        t += int(NS / 50)
    if success is not None:
        s.add("/success", "std_msgs/msg/Bool", end, bool_msg(success))
    return s
