"""Real bags for converter tests: written with rosbags' Writer, messages serialized via the typestore.

`BagScript` records what was written (frames as arrays, commands and state values as numbers, with
times), so tests can compute the expected dataset from it independently of the converter.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from q_transformer_ros.data.bag_reader import typestore_for
from q_transformer_ros.data.bag_writer import BagWriter
from q_transformer_ros.contract import parse_contract

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


def joint_state_msg(names: list[str], positions: list[float], t_ns: int, velocities: list[float] | None = None) -> Any:
    return M["sensor_msgs/msg/JointState"](header=header(t_ns), name=names, position=np.asarray(positions, np.float64),
                                          velocity=np.asarray(velocities or [], np.float64), effort=np.zeros(0))


def pose_msg(x: float, y: float, z: float, t_ns: int) -> Any:
    P = M["geometry_msgs/msg/Point"]
    Q = M["geometry_msgs/msg/Quaternion"]
    return M["geometry_msgs/msg/PoseStamped"](header=header(t_ns, "world"), pose=M["geometry_msgs/msg/Pose"](
        position=P(x=x, y=y, z=z), orientation=Q(x=0.0, y=0.0, z=0.0, w=1.0)))


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


def _state_input(name: str, low: float, high: float, topic: str, msg_type: str, field_path: str, **ref: Any) -> dict:
    return {"name": name, "low": low, "high": high,
            "source": {"topic": topic, "msg_type": msg_type, "field": field_path, **ref}}


STATE_INPUTS = [
    _state_input("elbow_pos", -0.5, 0.5, "/joint_states", "sensor_msgs/msg/JointState", "position", joint="elbow"),
    _state_input("elbow_vel", -2.0, 2.0, "/joint_states", "sensor_msgs/msg/JointState", "velocity", joint="elbow"),
    _state_input("ee_x", -0.6, 0.6, "/ee_pose", "geometry_msgs/msg/PoseStamped", "pose.position.x"),
    _state_input("ee_z", 0.0, 0.8, "/ee_pose", "geometry_msgs/msg/PoseStamped", "pose.position.z"),
    _state_input("grip_width", 0.0, 0.08, "/gripper_state", "std_msgs/msg/Float64MultiArray", "data[1]"),
]
"""State inputs of ``TEST_CONTRACT`` episodes made with ``state=StateTopics()``: a JointState by joint
name (position and velocity; the joint order changes between messages), two fields of a PoseStamped
and one element of a Float64MultiArray."""


def make_state_contract(**overrides: Any):
    return make_contract(**{"state_inputs": STATE_INPUTS, **overrides})


@dataclass(frozen=True)
class StateTopics:
    """Robot-state topics an episode records, each at its own rate with its own timing jitter, the way
    drivers publish them (not in step with the camera): ``/joint_states`` (JointState, shoulder and
    elbow in a changing order, positions and velocities), ``/ee_pose`` (PoseStamped) and
    ``/gripper_state`` (Float64MultiArray ``[effort, width]``)."""

    joint_hz: float = 100.0
    pose_hz: float = 30.0
    gripper_hz: float = 20.0
    jitter: float = 0.3
    """Per-message timing jitter, +- this fraction of each topic's own period."""
    pose_silent_s: tuple[float, float] | None = None
    """(start, end) in seconds from t0: the pose topic publishes nothing (its driver hung)."""
    gripper_nan_s: tuple[float, float] | None = None
    """(start, end) in seconds from t0: the gripper reports NaN width (a sensor fault)."""


@dataclass
class TrueStep:
    """One control step as the generator's controller lived it: what it saw and what it sent."""

    decision_ns: int
    """Receive time of the step camera frame it decided on."""
    frames: dict[str, tuple[int, np.ndarray, str]]
    """camera topic -> (t_ns, source array, encoding) of the newest frame it had."""
    action: np.ndarray
    """float64 (dims,) in contract order: the command it sent (absolute) / the joint's change (delta)."""
    state: dict[str, tuple[int, float] | None] = field(default_factory=dict)
    """state input name -> (t_ns, value) of the newest value it had (None: none yet); empty without state topics."""


@dataclass
class BagScript:
    """Messages to write, plus the plain values they carry and the true steps (for expectations)."""

    msgs: list[tuple[str, str, int, Any]] = field(default_factory=list)
    frames: dict[str, list[tuple[int, np.ndarray, str]]] = field(default_factory=dict)
    """topic -> [(t_ns, source array as decoded, encoding)]"""
    values: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """action dim name -> [(t_ns, value)]"""
    state_values: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """state input name -> [(t_ns, value)] as published (NaN included)"""
    steps: list[TrueStep] = field(default_factory=list)
    """The controller's steps in time order (the ground truth a converter must recover)."""

    def add(self, topic: str, msgtype: str, t_ns: int, msg: Any) -> None:
        self.msgs.append((topic, msgtype, int(t_ns), msg))

    def steps_between(self, start_ns: int, end_ns: int) -> list[TrueStep]:
        return [s for s in self.steps if start_ns <= s.decision_ns < end_ns]

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


def _newest(events: list[tuple[int, Any]], t: int) -> Any:
    best = None
    for te, v in events:
        if te <= t:
            best = v
    return best


def make_episode(seed: int = 0, t0: float = 1.0, duration: float = 2.0, instruction: str | None = "pick the cube",
                 success: bool | None = True, latency: float = 0.3, jitter: float = 0.1, front_hz: float | None = None,
                 front_jitter: float | None = None, wrist_hz: float = 8.0, teleop_hz: float | None = None,
                 front_encoding: str = "bgr8", wrist_format: str = "png", camera_gap: tuple[float, float] | None = None,
                 max_gap_s: float = 0.3, state: StateTopics | None = None, script: BagScript | None = None,
                 still_s: tuple[float, float] | None = None) -> BagScript:
    """An episode recorded the way a closed loop records it (contract: ``TEST_CONTRACT``, 10 Hz).

    The front camera (the step camera) sends a frame each control period (or at ``front_hz``; the
    controller then decides on every frame a period apart), each with timing jitter of +-``jitter``
    periods (``front_jitter`` for a faster camera); the controller answers each decision frame after
    ``latency`` periods, +-``jitter`` periods of its own, with a TwistStamped (vx, vy) and, 0.4 ms later,
    the gripper (Float64MultiArray): so a command may land after the next frame, or its frame may be
    late. The wrist camera (CompressedImage) runs free at ``wrist_hz``, joint states at 50 Hz (the elbow
    is a delta dim: its true action is the joint's change between two decisions). With ``teleop_hz``
    an operator sends commands at that rate instead, unrelated to frames; the step's action is then the
    last command before the next decision frame (the documented rule for fast command streams).
    ``success`` True/False: after the last step a final frame shows the outcome and the success topic
    says it 0.5 ms later (followed by one more command, as a controller that has not heard yet would
    send); None: nothing. ``camera_gap`` (start, end) in seconds from t0: the front camera is silent
    (no decisions, no commands). ``state``: robot-state topics recorded too (``StateTopics``; joint
    states then at its ``joint_hz`` with jitter, with velocities). Each true step records the frames and
    state values the controller had and what it sent.
    """
    rng = np.random.default_rng(seed)
    s = script or BagScript()
    period = NS // 10
    start = int(t0 * NS)
    end = start + int(duration * NS)
    front, wrist = "/front/image_raw", "/wrist/image/compressed"
    if instruction is not None:
        s.add("/instruction", "std_msgs/msg/String", start, string_msg(instruction))

    def in_still(t: int) -> bool:
        return still_s is not None and start + still_s[0] * NS <= t < start + still_s[1] * NS

    def add_front(t: int) -> None:
        arr = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        s.add(front, "sensor_msgs/msg/Image", t, image_msg(arr, front_encoding, t))
        s.frames.setdefault(front, []).append((t, arr, front_encoding))

    # wrist camera: free running, from just after the start
    t = start + int(0.001 * NS)
    while t <= end + period:
        arr = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
        msg = compressed_msg(arr, wrist_format, t)
        if wrist_format == "jpeg":  # lossy: the expectation is what a decoder makes of it
            arr = np.asarray(PILImage.open(io.BytesIO(bytes(msg.data))).convert("RGB"))
        s.add(wrist, "sensor_msgs/msg/CompressedImage", t, msg)
        s.frames.setdefault(wrist, []).append((t, arr, "rgb8"))
        t += int(NS / wrist_hz)
    # joint states at 50 Hz (or the state topics' rate, jittered): the elbow walks
    elbow, joints = 0.0, []
    t = start + int(0.002 * NS)
    state_rng = np.random.default_rng(seed + 7919)  # the other streams stay as they were without state
    while t <= end + 2 * period:
        step = elbow
        move = float(rng.uniform(-0.01, 0.01))
        elbow += 0.0 if in_still(t) else move
        if state is None:
            names, pos = (["shoulder", "elbow"], [0.5, elbow]) if rng.random() < 0.5 else (["elbow", "shoulder"], [elbow, 0.5])
            s.add("/joint_states", "sensor_msgs/msg/JointState", t, joint_state_msg(names, pos, t))
            t_next = t + int(NS / 50)
        else:
            vel = (elbow - step) * state.joint_hz
            flip = state_rng.random() < 0.5
            names, pos, v = (["elbow", "shoulder"], [elbow, 0.5], [vel, 0.0]) if flip else \
                (["shoulder", "elbow"], [0.5, elbow], [0.0, vel])
            s.add("/joint_states", "sensor_msgs/msg/JointState", t, joint_state_msg(names, pos, t, v))
            s.state_values.setdefault("elbow_pos", []).append((t, elbow))
            s.state_values.setdefault("elbow_vel", []).append((t, vel))
            t_next = t + _jittered(state_rng, state.joint_hz, state.jitter)
        s.values.setdefault("elbow", []).append((t, elbow))
        joints.append((t, elbow))
        t = t_next
    if state is not None:
        _add_pose_and_gripper(s, state, state_rng, start, end + 2 * period, in_still)
    last_grip = [0.5]

    def send(t: int) -> tuple[float, float, float]:
        vx, vy, g = (float(v) for v in rng.uniform(-0.9, 0.9, size=3))
        g = abs(g)
        if in_still(t):
            vx, vy, g = 0.0, 0.0, last_grip[0]
        last_grip[0] = g
        s.add("/cmd", "geometry_msgs/msg/TwistStamped", t, twist_msg(vx, vy, t))
        s.add("/gripper", "std_msgs/msg/Float64MultiArray", t + 400_000, f64_msg([g]))
        s.values.setdefault("vx", []).append((t, vx))
        s.values.setdefault("vy", []).append((t, vy))
        s.values.setdefault("grip", []).append((t + 400_000, g))
        return vx, vy, g

    # the step camera and the controller
    in_gap = (lambda t: camera_gap is not None and start + camera_gap[0] * NS <= t < start + camera_gap[1] * NS)
    cam_period = period if front_hz is None else int(NS / front_hz)
    cam_jitter = jitter if front_hz is None else (front_jitter if front_jitter is not None else 0.0)
    decisions: list[int] = []
    sent: list[tuple[float, float, float]] = []
    tick, last_decision, last_frame = start + int(0.03 * NS), None, start
    while tick + period <= end:
        t = max(last_frame + 1_000_000, tick + int(rng.uniform(-cam_jitter, cam_jitter) * period))
        tick += cam_period
        if in_gap(t):
            continue
        add_front(t)
        last_frame = t
        if last_decision is not None and t - last_decision < period - cam_period // 2:
            continue  # a faster camera: the controller decides on frames a period apart
        last_decision = t
        decisions.append(t)
        if teleop_hz is None:
            answer = t + max(1_000_000, int((latency + rng.uniform(-jitter, jitter)) * period))
            sent.append(send(answer))
    final = None
    if success is not None:
        # the frame that shows the outcome comes after the last command took effect
        last_command = max((t for t, _ in s.values.get("grip", [])), default=0)
        final = max(last_frame + 1_000_000, tick, last_command + 1_000_000)
        add_front(final)
        s.add("/success", "std_msgs/msg/Bool", final + 500_000, bool_msg(success))
        if teleop_hz is None:
            send(final + max(1_000_000, int(latency * period)))
    if teleop_hz is not None:  # operator commands, unrelated to frames
        teleop, t = [], start + int(0.003 * NS)
        stop = (final if final is not None else end)
        while t <= stop:
            teleop.append((t, send(t)))
            t += int(NS / teleop_hz)
    for k, d in enumerate(decisions):
        nxt = decisions[k + 1] if k + 1 < len(decisions) else (final if final is not None else d + period)
        if nxt - d > max_gap_s * NS:
            nxt = d + period
        if teleop_hz is None:
            vx, vy, g = sent[k]
        else:  # the last operator command before the next decision frame (the gripper goes 0.4 ms later)
            vx, vy, _ = _newest(teleop, nxt)
            g = _newest([(t + 400_000, v[2]) for t, v in teleop], nxt)
        action = np.array([vx, vy, g, _newest(joints, nxt) - _newest(joints, d)])
        frames = {topic: _newest([(e[0], e) for e in s.frames[topic]], d) for topic in (front, wrist)}
        seen = {name: _newest([(te, (te, v)) for te, v in events], d) for name, events in s.state_values.items()}
        s.steps.append(TrueStep(d, frames, action, seen))
    return s


def _jittered(rng: np.random.Generator, hz: float, jitter: float) -> int:
    """The next message of a topic at ``hz`` is a period later, +- ``jitter`` of its period."""
    return max(1_000_000, int(NS / hz * (1.0 + rng.uniform(-jitter, jitter))))


def _add_pose_and_gripper(s: BagScript, state: StateTopics, rng: np.random.Generator, start: int, stop: int,
                          still: Any = lambda t: False) -> None:
    """``/ee_pose`` and ``/gripper_state`` at their own rates over [start, stop], with the silences and
    faults ``state`` asks for, standing still while ``still(t)``; every published value is recorded in
    ``s.state_values``."""
    def inside(t: int, window: tuple[float, float] | None) -> bool:
        return window is not None and start + window[0] * NS <= t < start + window[1] * NS

    x, z, t = 0.1, 0.3, start + int(0.004 * NS)
    while t <= stop:
        dx, dz = float(rng.uniform(-0.01, 0.01)), float(rng.uniform(-0.01, 0.01))
        if not still(t):
            x, z = x + dx, z + dz
        if not inside(t, state.pose_silent_s):
            s.add("/ee_pose", "geometry_msgs/msg/PoseStamped", t, pose_msg(x, 0.7, z, t))
            s.state_values.setdefault("ee_x", []).append((t, x))
            s.state_values.setdefault("ee_z", []).append((t, z))
        t += _jittered(rng, state.pose_hz, state.jitter)
    width, t = 0.04, start + int(0.006 * NS)
    while t <= stop:
        dw = float(rng.uniform(-0.005, 0.005))
        if not still(t):
            width = float(np.clip(width + dw, 0.0, 0.08))
        shown = math.nan if inside(t, state.gripper_nan_s) else width
        s.add("/gripper_state", "std_msgs/msg/Float64MultiArray", t, f64_msg([1.5, shown]))
        s.state_values.setdefault("grip_width", []).append((t, shown))
        t += _jittered(rng, state.gripper_hz, state.jitter)
