"""The recorder over real rclpy / Fast DDS: publish frames, commands, robot state and an instruction,
start/stop episodes via std_srvs/Trigger (and via the success topic), then convert the recorded bags and
check the dataset against what was published."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

os.environ["ROS_DOMAIN_ID"] = "63"
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from q_transformer_ros.contract import parse_contract  # noqa: E402
from q_transformer_ros.data.image import preprocess_frame  # noqa: E402
from q_transformer_ros.ros.qos import COMMAND_QOS, INSTRUCTION_QOS, SENSOR_QOS  # noqa: E402
from q_transformer_ros.ros.recorder import EpisodeRecorder  # noqa: E402
from qtr_testing import call_trigger  # noqa: E402

CONTRACT = {
    "name": "rec_test", "control_rate_hz": 10.0, "frame_history": 2, "max_frame_age_s": 0.5,
    "cameras": [
        {"name": "front", "topic": "/rt/front/image_raw", "msg_type": "sensor_msgs/msg/Image", "height": 16, "width": 16},
        {"name": "wrist", "topic": "/rt/wrist/compressed", "msg_type": "sensor_msgs/msg/CompressedImage",
         "height": 16, "width": 16},
    ],
    "instruction": {"topic": "/rt/instruction"}, "success": {"topic": "/rt/success"},
    "action_dims": [
        {"name": "vx", "low": -1.0, "high": 1.0, "bins": 8,
         "source": {"topic": "/rt/cmd", "msg_type": "geometry_msgs/msg/TwistStamped", "field": "twist.linear.x"},
         "target": {"topic": "/rt/cmd", "msg_type": "geometry_msgs/msg/TwistStamped", "field": "twist.linear.x"}},
        {"name": "grip", "low": 0.0, "high": 1.0, "bins": 8,
         "source": {"topic": "/rt/gripper", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[0]"},
         "target": {"topic": "/rt/gripper", "msg_type": "std_msgs/msg/Float64MultiArray", "field": "data[0]"}},
        {"name": "elbow", "low": -0.2, "high": 0.2, "bins": 8, "mode": "delta",
         "source": {"topic": "/rt/joint_states", "msg_type": "sensor_msgs/msg/JointState", "field": "position[0]",
                    "joint": "elbow"},
         "target": {"topic": "/rt/joint_states", "msg_type": "sensor_msgs/msg/JointState", "field": "position[0]",
                    "joint": "elbow"}},
    ],
    "state_inputs": [
        {"name": "ee_z", "low": 0.0, "high": 1.0,
         "source": {"topic": "/rt/ee_pose", "msg_type": "geometry_msgs/msg/PoseStamped", "field": "pose.position.z"}},
        {"name": "elbow_pos", "low": -1.0, "high": 1.0,  # the delta dim's topic, read as state too
         "source": {"topic": "/rt/joint_states", "msg_type": "sensor_msgs/msg/JointState", "field": "position",
                    "joint": "elbow"}},
    ],
}


class Robot(Node):
    """Plays the robot: frames (two cameras, different rates), commands, joint states; remembers all of it."""

    def __init__(self) -> None:
        super().__init__("fake_robot")
        self.front = self.create_publisher(Image, "/rt/front/image_raw", SENSOR_QOS)
        self.wrist = self.create_publisher(CompressedImage, "/rt/wrist/compressed", SENSOR_QOS)
        self.cmd = self.create_publisher(TwistStamped, "/rt/cmd", COMMAND_QOS)
        self.grip = self.create_publisher(Float64MultiArray, "/rt/gripper", COMMAND_QOS)
        self.joints = self.create_publisher(JointState, "/rt/joint_states", COMMAND_QOS)
        self.pose = self.create_publisher(PoseStamped, "/rt/ee_pose", SENSOR_QOS)
        self.instruction = self.create_publisher(String, "/rt/instruction", INSTRUCTION_QOS)
        self.success = self.create_publisher(Bool, "/rt/success", COMMAND_QOS)
        self.start = self.create_client(Trigger, "/recorder/start_episode")
        self.stop = self.create_client(Trigger, "/recorder/stop_episode")
        self.rng = np.random.default_rng(0)
        self.front_frames: list[np.ndarray] = []
        self.wrist_frames: list[np.ndarray] = []
        self.vx: list[float] = []
        self.grip_values: list[float] = []
        self.elbow = 0.0
        self.tick = 0

    def step(self) -> None:
        """One 20 Hz tick: the pose (z = tick / 1000) then front every tick, wrist every 3rd, commands
        every 2nd, joints every tick."""
        pose = PoseStamped()
        pose.pose.position.z = self.tick / 1000
        self.pose.publish(pose)
        arr = self.rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
        msg = Image(height=12, width=20, encoding="rgb8", step=60, data=arr.tobytes())
        self.front.publish(msg)
        self.front_frames.append(arr)
        if self.tick % 3 == 0:
            arr = self.rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
            buf = io.BytesIO()
            PILImage.fromarray(arr).save(buf, format="PNG")
            self.wrist.publish(CompressedImage(format="png", data=buf.getvalue()))
            self.wrist_frames.append(arr)
        if self.tick % 2 == 0:
            vx, g = float(self.rng.uniform(-0.9, 0.9)), float(self.rng.uniform(0, 1))
            tw = TwistStamped()
            tw.twist.linear.x = vx
            self.cmd.publish(tw)
            self.grip.publish(Float64MultiArray(data=[g]))
            self.vx.append(vx)
            self.grip_values.append(g)
        self.elbow += 0.004
        self.joints.publish(JointState(name=["elbow"], position=[self.elbow]))
        self.tick += 1


def spin_for(executor, seconds: float, robot: Robot | None = None, hz: float = 20.0) -> None:
    end = time.monotonic() + seconds
    next_tick = time.monotonic()
    while time.monotonic() < end:
        if robot is not None and time.monotonic() >= next_tick:
            robot.step()
            next_tick += 1.0 / hz
        executor.spin_once(timeout_sec=0.005)


def wait_matched(executor, robot: Robot, timeout: float = 10.0) -> None:
    pubs = [robot.front, robot.wrist, robot.cmd, robot.grip, robot.joints, robot.pose, robot.instruction, robot.success]
    end = time.monotonic() + timeout
    while time.monotonic() < end and not all(p.get_subscription_count() > 0 for p in pubs):
        executor.spin_once(timeout_sec=0.02)
    assert all(p.get_subscription_count() > 0 for p in pubs), "recorder did not subscribe to every topic"


@pytest.mark.timeout(120)
def test_record_then_convert(tmp_path: Path) -> None:
    contract_file = tmp_path / "contract.yaml"
    contract_file.write_text(yaml.safe_dump(CONTRACT))
    contract = parse_contract(CONTRACT)
    out_dir = tmp_path / "bags"
    rclpy.init()
    try:
        recorder = EpisodeRecorder(parameter_overrides=[
            Parameter("contract", value=str(contract_file)), Parameter("output_dir", value=str(out_dir))])
        robot = Robot()
        ex = SingleThreadedExecutor()
        ex.add_node(recorder)
        ex.add_node(robot)
        wait_matched(ex, robot)
        robot.instruction.publish(String(data="stack the blocks"))
        spin_for(ex, 0.5, robot)

        # episode 1: started by service, ended by the success topic
        first_front = len(robot.front_frames)
        resp = call_trigger(ex, robot.start)
        assert resp.success, resp.message
        spin_for(ex, 1.0, robot)
        robot.success.publish(Bool(data=False))  # a simulator's per-step "not yet" must not end it
        spin_for(ex, 1.0, robot)
        assert recorder.writer is not None and not recorder.finished
        robot.success.publish(Bool(data=True))
        spin_for(ex, 0.5)
        assert len(recorder.finished) == 1 and recorder.writer is None
        after_first = len(robot.front_frames)

        # episode 2: started and stopped by service (no success message: unlabeled)
        assert call_trigger(ex, robot.start).success
        spin_for(ex, 1.5, robot)
        resp = call_trigger(ex, robot.stop)
        assert resp.success, resp.message
        assert not call_trigger(ex, robot.stop).success  # nothing to stop now
        assert len(recorder.finished) == 2
        ex.shutdown()
        recorder.destroy_node()
        robot.destroy_node()
    finally:
        rclpy.try_shutdown()

    bags = sorted(out_dir.iterdir())
    assert [b.name for b in bags] == [p.name for p in recorder.finished]
    for b in bags:  # standard rosbag2 layout: metadata.yaml + one .mcap
        meta = yaml.safe_load((b / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        assert meta["storage_identifier"] == "mcap" and (b / meta["relative_file_paths"][0]).exists()
        assert meta["custom_data"]["instruction"] == "stack the blocks"

    from q_transformer_ros.data.bag_reader import BagReader

    for b in bags:  # each episode starts with the state in force (received before it), then the instruction
        with BagReader(b) as bag:
            first = [(topic, t) for topic, t, _ in bag.messages(["/rt/ee_pose", "/rt/joint_states", "/rt/instruction"])][:3]
        assert sorted(topic for topic, _ in first) == ["/rt/ee_pose", "/rt/instruction", "/rt/joint_states"], first
        assert first[-1][0] == "/rt/instruction" and first[0][1] <= first[1][1] < first[2][1]

    from q_transformer_ros.core.replay_dataset import ReplayDataset
    from q_transformer_ros.data.convert import main

    ds_path = tmp_path / "ds"
    report = tmp_path / "report.json"
    assert main([*map(str, bags), "--out", str(ds_path), "--contract", str(contract_file), "--no-progress",
                 "--unlabeled", "failure", "--report-json", str(report)]) == 0
    import json

    drops = [reason for r in json.loads(report.read_text()) for reason in r["dropped"]]
    assert not [d for d in drops if "state input" in d], drops  # the first frames have their state too
    ds = ReplayDataset(ds_path)
    assert ds.num_episodes == 2
    ep1, ep2 = ds.episode(0), ds.episode(1)
    assert ep1.success and ep1.rewards[-1] == 1.0 and ep1.instruction == "stack the blocks"
    assert not ep2.success and ep2.rewards.sum() == 0
    assert 15 <= len(ep1.actions) <= 22  # ~2 s at 10 Hz (DDS/scheduling jitter tolerated)
    assert 10 <= len(ep2.actions) <= 16

    # every stored frame is exactly one published frame, in publication order, from inside the episode
    cam_front, cam_wrist = contract.camera("front"), contract.camera("wrist")
    front = {preprocess_frame(a, "rgb8", cam_front).tobytes(): i for i, a in enumerate(robot.front_frames)}
    wrist = {preprocess_frame(a, "rgb8", cam_wrist).tobytes(): i for i, a in enumerate(robot.wrist_frames)}
    idx = [front[f.tobytes()] for f in np.asarray(ep1.frames["front"])]
    assert idx == sorted(idx) and idx[0] >= first_front - 2 and idx[-1] < after_first
    widx = [wrist[f.tobytes()] for f in np.asarray(ep1.frames["wrist"])]
    assert widx == sorted(widx)
    # absolute commands are published values; the elbow delta is 2 ticks * 0.004 per 0.1 s step (± a tick)
    vx_set = np.asarray(robot.vx, np.float32)
    for a in np.asarray(ep1.actions):
        assert np.isclose(vx_set, a[0], atol=1e-6).any()
        assert 0.0 <= a[2] <= 0.0125
    assert abs(float(np.median(np.asarray(ep1.actions)[:, 2])) - 0.008) < 0.0045
    # state: each step's pose is the one published with its frame (the same tick) or, when DDS handed
    # the frame over first, the tick before; the elbow is the joint state of about that tick
    from q_transformer_ros.replay.format import STATE_FILE, read_manifest

    entry = read_manifest(ds_path).episodes[0]
    state = np.load(ds_path / "chunks" / entry.chunk / STATE_FILE)[entry.start:entry.start + entry.length]
    assert state.dtype == np.float32 and state.shape == (len(idx), 2)
    pose_tick = np.rint(state[:, 0].astype(np.float64) * 1000).astype(int)
    lag = np.asarray(idx) - pose_tick
    assert ((lag == 0) | (lag == 1)).all(), f"frame tick minus pose tick per step: {lag.tolist()}"
    elbow_tick = np.rint(state[:, 1].astype(np.float64) / 0.004).astype(int) - 1
    assert (np.abs(np.asarray(idx) - elbow_tick) <= 1).all()
