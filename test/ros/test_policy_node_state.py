"""The policy node with robot-state inputs, over real rclpy / Fast DDS.

A fake robot publishes a camera at 30 Hz, the hand pose (PoseStamped) at 50 Hz and the gripper as its
own JointState at 25 Hz on a topic that also carries the arm's joints (without the gripper) in other
messages. The node's policy is a fake that checks every Observation against the contract (so a
non-finite or missing state value reaching it would fail the step). Checked: the state goes to the
policy and into the Decision message, a silent or non-finite state input gives one stop naming it and
then silence, and ``state_topics`` remaps an input's topic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

DOMAIN_ID = 45  # this file's own DDS domain (the policy-node tests own 41-49)

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from q_transformer_ros.contract import RobotContract, parse_contract  # noqa: E402
from q_transformer_ros.ros.policy_node import PolicyNode, load_interfaces  # noqa: E402
from q_transformer_ros.ros.qos import COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS, SENSOR_QOS  # noqa: E402
from qtr_testing import ros_domain, wait_for  # noqa: E402

DecisionMsg, _ = load_interfaces()


def state_contract() -> RobotContract:
    ref = {"topic": "/s/ee_cmd", "msg_type": "geometry_msgs/msg/TwistStamped", "field": "twist.linear.x"}
    return parse_contract({
        "name": "state_test", "control_rate_hz": 10.0, "frame_history": 2, "max_frame_age_s": 0.3,
        "cameras": [{"name": "front", "topic": "/s/front/image_raw", "height": 16, "width": 16}],
        "instruction": {"topic": "/s/instruction"}, "success": {"topic": "/s/success"},
        "action_dims": [{"name": "dx", "low": -1.0, "high": 1.0, "bins": 8, "source": ref, "target": ref}],
        "state_inputs": [
            {"name": "ee_z", "low": 0.0, "high": 1.0,
             "source": {"topic": "/s/ee_pose", "msg_type": "geometry_msgs/msg/PoseStamped", "field": "pose.position.z"}},
            {"name": "gripper", "low": 0.0, "high": 1.0,
             "source": {"topic": "/s/joint_states", "msg_type": "sensor_msgs/msg/JointState", "field": "position",
                        "joint": "gripper"}},
        ],
    })


@dataclass
class FakeDecision:
    action: np.ndarray
    bins: np.ndarray
    q_values: np.ndarray
    value: float
    inference_time_s: float = 0.001


class FakeStatePolicy:
    """Decides dx = 0.25 (bin 5 of 8) on every observation, after checking it against the contract."""

    def __init__(self, contract: RobotContract) -> None:
        self.contract = contract
        self.observations: list[Any] = []
        self.lock = threading.Lock()

    def warmup(self) -> None:
        pass

    def reset(self, instruction: str | None = None) -> None:
        pass

    def push(self, obs: Any) -> None:
        obs.check(self.contract, where="observation pushed by the node")
        with self.lock:
            self.observations.append(obs)

    def decide(self) -> FakeDecision:
        return FakeDecision(np.array([0.25]), np.array([5]), np.array([0.5]), 0.5)


class StateRobot(Node):
    """Camera at 30 Hz, hand pose at 50 Hz, arm joints and gripper as separate JointStates on one topic."""

    def __init__(self, pose_topic: str = "/s/ee_pose") -> None:
        super().__init__("state_robot")
        self.lock = threading.Lock()
        self.z = 0.5
        self.grip = 0.8
        self.pose_on = True
        self.published_z: list[float] = []
        self.commands: list[TwistStamped] = []
        self.decisions: list[Any] = []
        self.cam = self.create_publisher(Image, "/s/front/image_raw", SENSOR_QOS)
        self.pose = self.create_publisher(PoseStamped, pose_topic, SENSOR_QOS)
        self.joints = self.create_publisher(JointState, "/s/joint_states", SENSOR_QOS)
        self.instruction = self.create_publisher(String, "/s/instruction", INSTRUCTION_QOS)
        self.create_subscription(TwistStamped, "/s/ee_cmd", self._on_cmd, COMMAND_QOS)
        if DecisionMsg is not None:
            self.create_subscription(DecisionMsg, "/policy_node/decision", self._on_decision, DIAGNOSTIC_QOS)
        self.ticks = 0
        self.create_timer(1 / 30, self._camera)
        self.create_timer(1 / 50, self._pose)
        self.create_timer(1 / 25, self._gripper)

    def _on_cmd(self, msg: TwistStamped) -> None:
        with self.lock:
            self.commands.append(msg)

    def _on_decision(self, msg: Any) -> None:
        with self.lock:
            self.decisions.append(msg)

    def _camera(self) -> None:
        msg = Image(height=16, width=16, encoding="rgb8", step=48, data=bytes(16 * 16 * 3))
        msg.header.stamp = self.get_clock().now().to_msg()
        self.cam.publish(msg)

    def _pose(self) -> None:
        if not self.pose_on:
            return
        with self.lock:
            self.z = round(self.z + 0.001, 6) if np.isfinite(self.z) else self.z
            self.published_z.append(self.z)
        msg = PoseStamped()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.pose.position.z = float(self.z)
        self.pose.publish(msg)

    def _gripper(self) -> None:
        self.ticks += 1
        stamp = self.get_clock().now().to_msg()
        arm = JointState(name=["shoulder", "elbow"], position=[0.1, 0.2])  # no gripper in it: skipped
        arm.header.stamp = stamp
        self.joints.publish(arm)
        grip = JointState(name=["gripper"], position=[float(self.grip)])
        grip.header.stamp = stamp
        self.joints.publish(grip)

    def moving_since(self, n: int) -> list[TwistStamped]:
        with self.lock:
            return [m for m in self.commands[n:] if m.twist.linear.x != 0.0]

    def count(self) -> int:
        with self.lock:
            return len(self.commands)


class Rig:
    def __init__(self, pose_topic: str = "/s/ee_pose", **params: Any) -> None:
        self.contract = state_contract()
        self.policy = FakeStatePolicy(self.contract)
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.node = PolicyNode(self.policy, parameter_overrides=overrides)
        self.robot = StateRobot(pose_topic)
        self.executors = [SingleThreadedExecutor(), SingleThreadedExecutor()]
        self.executors[0].add_node(self.node)
        self.executors[1].add_node(self.robot)
        self.threads = [threading.Thread(target=ex.spin, daemon=True) for ex in self.executors]
        for t in self.threads:
            t.start()
        self.robot.instruction.publish(String(data="lift"))

    def close(self) -> None:
        for ex, t in zip(self.executors, self.threads):
            ex.shutdown(timeout_sec=5.0)
            t.join(timeout=5.0)
        self.node.destroy_node()
        self.robot.destroy_node()


@pytest.fixture(scope="module", autouse=True)
def ros_context():
    with ros_domain(DOMAIN_ID):
        yield


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_state_reaches_the_policy_and_the_decision_message(rig: Rig) -> None:
    wait_for(lambda: len(rig.robot.moving_since(0)) >= 5, 15, "5 commands")
    with rig.policy.lock:
        observations = list(rig.policy.observations)
    with rig.robot.lock:
        published = set(np.float32(rig.robot.published_z).tolist())
    assert observations and all(o.state.dtype == np.float32 and o.state.shape == (2,) for o in observations)
    assert all(float(o.state[0]) in published for o in observations)  # a value the robot sent, not a made-up one
    assert all(o.state[1] == np.float32(0.8) for o in observations)  # the gripper message, never the arm's
    assert all(set(o.stamps_ns) == {"front", "ee_z", "gripper"} for o in observations)
    assert rig.node.state_topics == {"ee_z": "/s/ee_pose", "gripper": "/s/joint_states"}
    if DecisionMsg is not None:
        wait_for(lambda: any(d.commanded for d in list(rig.robot.decisions)), 5, "a commanded Decision")
        d = next(d for d in reversed(list(rig.robot.decisions)) if d.commanded)
        assert list(d.state_names) == ["ee_z", "gripper"]
        assert np.float32(d.state[0]) in published and d.state[1] == pytest.approx(0.8)
        assert all(0.0 <= a < 0.3 for a in d.state_age_s) and len(d.state_stamps) == 2


def test_silent_state_topic_stops_once_naming_the_input_then_recovers(rig: Rig) -> None:
    wait_for(lambda: len(rig.robot.moving_since(0)) >= 3, 15, "3 commands")
    rig.robot.pose_on = False
    wait_for(lambda: "state input 'ee_z'" in (rig.node.stop_reason or ""), 5, "a stop naming ee_z")
    assert "is stale" in rig.node.stop_reason
    n = rig.robot.count()
    time.sleep(0.6)
    assert rig.robot.moving_since(n) == [] and rig.robot.count() - n <= 1  # at most the one zero stop
    rig.robot.pose_on = True
    wait_for(lambda: len(rig.robot.moving_since(n)) >= 3, 10, "commands after the pose is back")


def test_non_finite_state_stops_and_never_reaches_the_policy(rig: Rig) -> None:
    wait_for(lambda: len(rig.robot.moving_since(0)) >= 3, 15, "3 commands")
    rig.robot.grip = float("nan")
    wait_for(lambda: "not finite" in (rig.node.stop_reason or ""), 5, "a stop on the NaN gripper")
    assert rig.node.stop_reason.startswith("state input 'gripper'")
    n = rig.robot.count()
    time.sleep(0.5)
    assert rig.robot.moving_since(n) == []
    with rig.policy.lock:
        assert all(np.isfinite(o.state).all() for o in rig.policy.observations)
    rig.robot.grip = 0.8
    wait_for(lambda: len(rig.robot.moving_since(n)) >= 3, 10, "commands after the gripper recovers")


def test_state_topics_parameter_remaps_an_input() -> None:
    r = Rig(state_topics=["ee_z:=/s/other_pose"], pose_topic="/s/other_pose")
    try:
        assert r.node.state_topics["ee_z"] == "/s/other_pose"
        wait_for(lambda: len(r.robot.moving_since(0)) >= 3, 15, "commands with the remapped pose")
    finally:
        r.close()
    with pytest.raises(ValueError, match="unknown state inputs \\['ee_y'\\]"):
        PolicyNode(FakeStatePolicy(state_contract()), parameter_overrides=[Parameter("state_topics", value=["ee_y:=/x"])])
