"""Smoke test of the Meta-World bridge over real rclpy / Fast DDS with real MuJoCo rendering.

A probe node plays the rest of the system: it subscribes to the sim's camera, instruction, success,
pose and episode-end topics, publishes end-effector commands, sets parameters and calls ``~/reset``
through the standard ROS services. Checked: images arrive rgb8 at the contract size and are not
blank; a late subscriber gets the latched instruction; a TwistStamped moves the hand and a stale
command stops it; reset with a new task/seed publishes the new instruction and the time limit ends
the episode as 'truncated'; the expert node drives the sim to a published success; a bad contract
or action dims Meta-World lacks give errors naming the file.
"""

from __future__ import annotations

import os

DOMAIN_ID = 53  # this file's own DDS domain (passed to rclpy.init; other test files keep theirs)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from q_transformer_ros.contract import ContractError  # noqa: E402
from q_transformer_ros.ros.expert_node import ExpertNode  # noqa: E402
from q_transformer_ros.ros.qos import COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS, SENSOR_QOS  # noqa: E402
from q_transformer_ros.ros.sim_node import SimNode  # noqa: E402
from qtr_testing import Spinner, wait_for  # noqa: E402

pytestmark = pytest.mark.ros
RATE_HZ = 20.0  # faster than the contract's 10 Hz to keep the test short; rendering 64x64 takes ~25 ms


class Probe(Node):
    """Records what the sim publishes; sends commands, parameters and resets like other nodes would."""

    def __init__(self) -> None:
        super().__init__("sim_probe")
        self.lock = threading.Lock()
        self.images: list[Image] = []
        self.poses: list[PoseStamped] = []
        self.arm_poses: list[PoseStamped] = []
        self.grippers: list[Any] = []
        self.success: list[bool] = []
        self.ends: list[str] = []
        self.observations = 0
        self.create_subscription(Image, "/camera/front/image_raw", lambda m: self._add(self.images, m), SENSOR_QOS)
        self.create_subscription(PoseStamped, "/sim_node/ee_pose", lambda m: self._add(self.poses, m), SENSOR_QOS)
        self.create_subscription(PoseStamped, "/ee_pose", lambda m: self._add(self.arm_poses, m), SENSOR_QOS)
        self.create_subscription(JointState, "/gripper_state", lambda m: self._add(self.grippers, m), SENSOR_QOS)
        self.create_subscription(Bool, "/success", lambda m: self._add(self.success, m.data), DIAGNOSTIC_QOS)
        self.create_subscription(String, "/sim_node/episode_end", lambda m: self._add(self.ends, m.data), DIAGNOSTIC_QOS)
        self.create_subscription(Float64MultiArray, "/sim_node/observation", self._on_obs, DIAGNOSTIC_QOS)
        self.twist_pub = self.create_publisher(TwistStamped, "/ee_cmd", COMMAND_QOS)
        self.reset_client = self.create_client(Trigger, "/sim_node/reset")
        self.param_client = self.create_client(SetParameters, "/sim_node/set_parameters")

    def _add(self, store: list, item: Any) -> None:
        with self.lock:
            store.append(item)

    def _on_obs(self, msg: Float64MultiArray) -> None:
        assert len(msg.data) == 39
        with self.lock:
            self.observations += 1

    def latest_pose(self) -> np.ndarray:
        with self.lock:
            p = self.poses[-1].pose.position
        return np.array([p.x, p.y, p.z])

    def send_twist(self, dx: float, dy: float = 0.0, dz: float = 0.0) -> None:
        msg = TwistStamped()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "base_link"
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = dx, dy, dz
        self.twist_pub.publish(msg)

    def call(self, client: Any, request: Any, timeout: float = 15.0) -> Any:
        assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not available"
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert future.done(), f"service {client.srv_name} did not answer in {timeout} s"
        return future.result()

    def set_params(self, **values: Any) -> None:
        req = SetParameters.Request()
        for name, value in values.items():
            pv = ParameterValue()
            if isinstance(value, str):
                pv.type, pv.string_value = ParameterType.PARAMETER_STRING, value
            else:
                pv.type, pv.integer_value = ParameterType.PARAMETER_INTEGER, int(value)
            req.parameters.append(ParameterMsg(name=name, value=pv))
        result = self.call(self.param_client, req)
        assert all(r.successful for r in result.results), [r.reason for r in result.results]




def listen(topic: str, qos: Any) -> tuple[Spinner, list[str]]:
    """A fresh node (a late joiner) collecting std_msgs/String data from ``topic``."""
    got: list[str] = []
    node = Node(f"listener_{int(time.monotonic() * 1e6)}")
    node.create_subscription(String, topic, lambda m: got.append(m.data), qos)
    return Spinner(node), got


@pytest.fixture(scope="module")
def system():
    rclpy.init(domain_id=DOMAIN_ID)
    sim = Spinner(SimNode(parameter_overrides=[
        Parameter("task", value="drawer-open-v3"), Parameter("seed", value=0),
        Parameter("control_rate_hz", value=RATE_HZ), Parameter("max_episode_steps", value=400),
    ]))
    probe = Spinner(Probe())
    yield sim.node, probe.node
    probe.stop()
    sim.stop()
    rclpy.try_shutdown()


def test_images_state_and_latched_instruction(system) -> None:
    sim, probe = system
    wait_for(lambda: len(probe.images) >= 3 and len(probe.poses) >= 3 and probe.observations >= 3, 20, "images, poses, observations")
    img = probe.images[-1]
    assert (img.encoding, img.height, img.width, img.step) == ("rgb8", 64, 64, 192)
    assert img.header.frame_id == "corner"
    pixels = np.frombuffer(bytes(img.data), dtype=np.uint8).reshape(64, 64, 3)
    assert pixels.std() > 20, "camera image looks blank"
    assert pixels[:12].mean() + 30 < pixels[-12:].mean(), "image is not upright (dark background should be on top)"
    # a subscriber that joins after the reset still gets the instruction (transient-local)
    late, got = listen("/instruction", INSTRUCTION_QOS)
    try:
        wait_for(lambda: bool(got), 10, "latched /instruction")
        assert got[-1] == "open the drawer"
    finally:
        late.stop()
    wait_for(lambda: len(probe.success) >= 3, 10, "/success")
    assert probe.success[-1] is False


def test_arm_state_on_the_ee_contract_topics(system) -> None:
    """/ee_pose and /gripper_state carry the hand position and the finger opening, the state inputs of
    config/contract_ee_arm.yaml, readable by the same field references."""
    from q_transformer_ros.contract import load_contract  # noqa: PLC0415
    from q_transformer_ros.data.messages import read_field  # noqa: PLC0415

    sim, probe = system
    wait_for(lambda: len(probe.arm_poses) >= 3 and len(probe.grippers) >= 3, 20, "/ee_pose and /gripper_state")
    with probe.lock:
        pose, grip = probe.arm_poses[-1], probe.grippers[-1]
    assert pose.header.frame_id == "world" and pose.header.stamp.sec > 0
    assert list(grip.name) == ["gripper"] and 0.0 <= grip.position[0] <= 1.05 and grip.header.stamp.sec > 0
    contract = load_contract(Path(__file__).resolve().parents[2] / "config" / "contract_ee_arm.yaml")
    messages = {"/ee_pose": pose, "/gripper_state": grip}
    values = {s.name: read_field(messages[s.source.topic], s.source) for s in contract.state_inputs}
    assert values["gripper"] == grip.position[0]
    for s in contract.state_inputs:  # Meta-World's hand stays inside the contract's ranges
        assert s.low <= values[s.name] <= s.high, (s.name, values[s.name])


def test_twist_moves_the_hand_and_stale_command_stops_it(system) -> None:
    sim, probe = system
    wait_for(lambda: len(probe.poses) > 0, 10, "a pose")
    start, first = probe.latest_pose(), sim.env.steps
    deadline = time.monotonic() + 20
    while sim.env.steps < first + 12 and time.monotonic() < deadline:  # +x for 12 sim steps, however fast the sim runs
        probe.send_twist(1.0)
        time.sleep(0.05)
    time.sleep(0.2)
    moved = probe.latest_pose() - start
    assert moved[0] > 0.03, f"hand moved {moved} after +x commands"
    assert abs(moved[2]) < 0.02
    # no command for longer than the timeout -> zero action (waited for, not slept: a loaded machine
    # may deliver the last queued commands late)
    last = time.monotonic()
    wait_for(lambda: not sim.current_action().any(), 10, "the stale command to count as zero")
    assert time.monotonic() - last >= sim.command_timeout_s - 0.3
    # the hand lags its mocap target by ~10 steps; count sim steps, not seconds (a loaded machine steps slower)
    settle = sim.env.steps + 15
    wait_for(lambda: sim.env.steps >= settle, 20, "15 more sim steps")
    held, later = probe.latest_pose(), sim.env.steps + 5
    wait_for(lambda: sim.env.steps >= later, 20, "5 more sim steps")
    time.sleep(0.1)  # the pose of the last step reaches the probe
    assert np.abs(probe.latest_pose() - held).max() < 0.003, "hand kept moving on a stale command"


def test_reset_service_new_task_and_time_limit(system) -> None:
    sim, probe = system
    listener, got = listen("/instruction", INSTRUCTION_QOS)
    try:
        probe.set_params(task="reach-v3", seed=7, max_episode_steps=5)
        ends_before = len(probe.ends)
        result = probe.call(probe.reset_client, Trigger.Request())
        assert result.success, result.message
        assert "reach-v3" in result.message and "seed=7" in result.message
        wait_for(lambda: "reach the goal" in got, 10, "the new instruction")
        wait_for(lambda: len(probe.ends) > ends_before, 10, "episode end")
        assert probe.ends[-1] == "truncated"
        assert sim.env.steps == 5 and sim.env.seed == 7 and not sim.episode_active
    finally:
        listener.stop()
    # a bad task is refused by parameter validation, and the sim keeps running
    req = SetParameters.Request()
    req.parameters = [ParameterMsg(name="task", value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="nope-v3"))]
    res = probe.call(probe.param_client, req)
    assert not res.results[0].successful and "nope-v3" in res.results[0].reason


@contextmanager
def button_press_by_expert(probe: Probe, max_episode_steps: int, **params: Any) -> Iterator[ExpertNode]:
    """An ExpertNode (``params``: its ROS parameters) runs one button-press episode (layout seed 2) to its
    end; yields the node, still spinning, for the caller's checks."""
    expert = ExpertNode(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    spinner = Spinner(expert)
    try:
        probe.set_params(task="button-press-topdown-v3", seed=2, max_episode_steps=max_episode_steps)
        ends_before = len(probe.ends)
        assert probe.call(probe.reset_client, Trigger.Request()).success
        wait_for(lambda: len(probe.ends) > ends_before, 40, "the expert's episode to end")
        yield expert
    finally:
        spinner.stop()


def test_expert_node_drives_the_sim_to_success(system) -> None:
    sim, probe = system
    with button_press_by_expert(probe, 150, noise_std=0.1, seed=0) as expert:
        assert probe.ends[-1] == "success", f"expert episode ended '{probe.ends[-1]}' after {sim.env.steps} steps"
        assert True in probe.success
        assert expert.expert is not None and expert.expert.task_name == "button-press-topdown-v3"
        assert expert.commands_sent >= sim.env.steps - 2


def test_expert_node_as_a_near_miss_operator_presses_beside_the_button(system) -> None:
    """The ROS expert applies the operator's misjudged scene (``perceive``), not only its action edits:
    the hand ends 5-10 cm beside the button and the episode fails."""
    sim, probe = system
    with button_press_by_expert(probe, 80, noise_std=0.0, seed=0, operator="near_miss") as expert:
        assert probe.ends[-1] == "truncated", f"a near miss ended '{probe.ends[-1]}'"
        assert expert.operator is not None and expert.operator.style == "near_miss"
        beside = float(np.linalg.norm(sim.env.ee_position[:2] - sim.env.obs[4:6]))  # hand vs button, xy
        assert 0.04 <= beside <= 0.11, f"hand {beside * 100:.1f} cm from the button"


def test_bad_contract_is_named_in_the_error(system, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_contract.yaml"
    with pytest.raises(ContractError, match="no_such_contract.yaml"):
        SimNode(node_name="sim_bad_contract", parameter_overrides=[Parameter("contract", value=str(missing))])
    wrong_dims = tmp_path / "wrong_dims.yaml"
    text = (Path(__file__).resolve().parents[2] / "config" / "contract_ee_arm.yaml").read_text()
    wrong_dims.write_text(text.replace("name: dz", "name: yaw"))
    with pytest.raises(ValueError, match=r"wrong_dims.yaml.*missing \['dz'\]"):
        SimNode(node_name="sim_wrong_dims", parameter_overrides=[Parameter("contract", value=str(wrong_dims))])
