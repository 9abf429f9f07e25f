"""`sim_node`: Meta-World as a ROS 2 robot that speaks a robot contract.

The node plays the robot of ``config/contract_ee_arm.yaml`` (or any contract whose action dims are
``dx, dy, dz, gripper``): it steps the simulator at the contract's control rate with the latest
command and publishes what a real arm with a camera would.

Published (every control step, stamped with the node clock, the arm's state before the frames, so a
node or recorder that gets both at once takes the frame with the state it shows):

- ``/ee_pose`` (``ee_pose_topic``): ``geometry_msgs/PoseStamped`` of the hand (tool centre) in frame
  ``world``, sensor-data QoS: the state inputs ``ee_x``, ``ee_y``, ``ee_z`` of the ee contract.
- ``/gripper_state`` (``gripper_state_topic``): ``sensor_msgs/JointState`` with one joint ``gripper``
  whose position is Meta-World's finger opening (~1 open, ~0 closed), sensor-data QoS.
- each contract camera: ``sensor_msgs/Image`` rgb8, upright, at the contract size, sensor-data QoS;
  ``header.frame_id`` = the Meta-World camera name.
- the contract's success topic (``/success``): ``std_msgs/Bool``, Meta-World's success flag.
- ``~/ee_pose``: the same pose as ``/ee_pose`` (kept for tools that read the node's own topic).
- ``~/observation``: ``std_msgs/Float64MultiArray``, Meta-World's 39-d observation (hand xyz,
  gripper opening, object poses, the same one step earlier, goal xyz); the scripted expert needs it.

Published on every reset (latched, transient-local): the contract's instruction topic
(``/instruction``, the task's sentence) and ``~/task`` (the Meta-World task name).
Published when an episode ends: ``~/episode_end`` ``std_msgs/String`` = ``success`` (first success
step, with ``end_on_success``) or ``truncated`` (``max_episode_steps`` reached). The sim then holds
(no stepping, frames keep coming) until the next reset.

Subscribed (reliable): each contract target topic (``/ee_cmd`` TwistStamped -> dx, dy, dz;
``/gripper_cmd`` Float64MultiArray -> gripper). Values are Meta-World action units, clipped to
[-1, 1] (1.0 = 1 cm of hand motion per step; gripper -1 open, +1 close). A topic silent for longer
than ``command_timeout_s`` (and before its first message after a reset) counts as zero.

Sim time (``publish_clock:=true``): the node is the clock of the ROS graph. It publishes
``/clock`` (``rosgraph_msgs/Clock``) from a ``sim.sim_clock.FastForwardClock`` and stamps everything
with it; the other nodes run with ``use_sim_time:=true``. During an episode it steps as soon as every
command topic has answered the last frame (the idle rest of the control period is skipped) and at the
latest when the period is over, as a robot would; between answer and step, sim time runs at wall
speed, so message latencies, stamps and staleness stay what they are in real time. Recording and the
closed loop are then bound by compute, not by the control rate. A command that arrives after its
period was over counts as the answer to the next frame (the loop is overrunning; a real robot would
apply it at the next tick as well, but a period later). An episode's first step waits its whole
period, so that a recorder starting on the new instruction misses nothing. Without an episode (hold),
the clock runs at wall speed and frames come at the control rate.

Service ``~/reset`` (``std_srvs/Trigger``) starts an episode of the parameters ``task`` and
``seed`` (set them first, e.g. through ``~/set_parameters``); its message reports task, seed and
instruction. Standard types only: no custom srv needs building.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.time import Time
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, MultiArrayDimension, String
from std_srvs.srv import Trigger

from q_transformer_ros.contract import RobotContract, load_contract
from q_transformer_ros.data.messages import read_field
from q_transformer_ros.ros.conversions import group_outputs, message_class
from q_transformer_ros.ros.qos import (
    CLOCK_QOS, COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS, RECORD_RELIABLE_QOS, SENSOR_QOS,
)
from q_transformer_ros.ros.params import declare, param, parse_pairs
from q_transformer_ros.ros.runner import print_help_if_asked, spin_node
from q_transformer_ros.sim.metaworld_env import (
    MetaWorldEnv,
    SimConfig,
    contract_action_order,
    resolve_cameras,
)
from q_transformer_ros.sim.sim_clock import FastForwardClock
from q_transformer_ros.sim.tasks import TASK_INSTRUCTIONS

NODE_NAME = "sim_node"
DEFAULT_CONTRACT = "contract_ee_arm.yaml"


def default_contract_path(file_name: str = DEFAULT_CONTRACT) -> Path:
    """``config/<file_name>`` from the installed share directory, else from the source checkout."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory  # noqa: PLC0415

        candidates.append(Path(get_package_share_directory("q_transformer_ros")) / "config" / file_name)
    except Exception:  # noqa: BLE001 - not installed through colcon: fall back to the checkout
        pass
    if os.environ.get("QTR_REPO_ROOT"):
        candidates.append(Path(os.environ["QTR_REPO_ROOT"]) / "config" / file_name)
    candidates.append(Path(__file__).resolve().parents[2] / "config" / file_name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"contract file {file_name} not found; looked in {[str(p) for p in candidates]}")


USAGE = ('sim_node [-h] --ros-args'
         ' [-p contract:=CONTRACT.yaml]'
         ' [-p task:=drawer-open-v3]'
         ' [-p seed:=0]'
         ' [-p max_episode_steps:=150]'
         ' [-p publish_clock:=true]')
CLOCK_TIMER_S = 0.01
"""With ``publish_clock``: how often (wall time) /clock goes out and the period's end is checked (and
at every step). Finer would only cost: between samples, sim time runs at wall speed."""

class SimNode(Node):
    """Steps a MetaWorldEnv at the contract's rate with the latest commands; publishes its senses."""

    def __init__(self, *, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self._declare_parameters()
        contract_file = self._param("contract") or str(default_contract_path())
        self.contract: RobotContract = load_contract(contract_file)
        c = self.contract
        self._order = contract_action_order([d.name for d in c.action_dims], where=f"{contract_file} action_dims")
        self.camera_map = resolve_cameras([cam.name for cam in c.cameras], parse_pairs(self._param("camera_map"), "camera_map"))
        rate = self._param("control_rate_hz") or c.control_rate_hz
        self.period_s = 1.0 / rate
        self.command_timeout_s = self._param("command_timeout_s") or c.max_frame_age_s
        self.end_on_success = bool(self._param("end_on_success"))  # read again at each reset
        self.world_frame = self._param("world_frame")

        self.env: MetaWorldEnv | None = None
        self.episode_active = False
        self.episode_index = -1
        self.end_reason = ""
        self._reset_time = 0.0
        # latest command per target topic: (receive time, {dim index: value})
        self._commands: dict[str, tuple[float, dict[int, float]]] = {}
        self.sim_clock: FastForwardClock | None = (
            FastForwardClock(int(round(self.period_s * 1e9))) if self._param("publish_clock") else None)
        self._command_topics = {g.topic for g in group_outputs(c)}
        self._answered: set[str] = set()
        """Command topics heard from since the last frame went out (sim time: all of them = step now)."""
        self._first_step_pending = False
        """Sim time: an episode's first step waits its whole period (wall speed), so a recorder that starts
        on the new instruction is running before anything moves (as with a wall-clock sim)."""
        self.step_log: list[tuple[np.ndarray, np.ndarray]] = []
        """This episode's steps: (hand position in the frame that went out before the step, Meta-World action
        applied). What a recording of the episode must pair; cleared at each reset."""
        self.steps_answered = 0
        """Steps taken as soon as every command topic had answered (sim time), not at the period's end."""

        self._image_pubs = {cam.name: self.create_publisher(Image, cam.topic, SENSOR_QOS) for cam in c.cameras}
        self._instruction_pub = (self.create_publisher(String, c.instruction.topic, INSTRUCTION_QOS)
                                 if c.instruction.topic else None)
        # A deep history: a sim stepping 100+ times a second must not overwrite a step's outcome before a
        # busy reader (recorder, demo driver) acknowledged it.
        self._success_pub = self.create_publisher(Bool, c.success.topic, RECORD_RELIABLE_QOS) if c.success.topic else None
        self._task_pub = self.create_publisher(String, "~/task", INSTRUCTION_QOS)
        self._end_pub = self.create_publisher(String, "~/episode_end", RECORD_RELIABLE_QOS)
        self._pose_pub = self.create_publisher(PoseStamped, "~/ee_pose", SENSOR_QOS)
        self._state_pubs = {"pose": self.create_publisher(PoseStamped, self._param("ee_pose_topic"), SENSOR_QOS),
                            "gripper": self.create_publisher(JointState, self._param("gripper_state_topic"), SENSOR_QOS)}
        self._warn_unpublished_state_inputs()
        self._obs_pub = self.create_publisher(Float64MultiArray, "~/observation", DIAGNOSTIC_QOS)
        for group in group_outputs(c):
            self.create_subscription(message_class(group.msg_type), group.topic,
                                     self._make_command_callback(group.topic, group.dims, group.refs), COMMAND_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.add_on_set_parameters_callback(self._check_parameters)
        if self._param("reset_on_start"):
            self.reset_episode(self._param("task"), self._param("seed"))
        if self.sim_clock is None:
            self._timer = self.create_timer(self.period_s, self._on_tick)
        else:  # wall-clock timer: the sim's own time only moves through this node
            self._clock_pub = self.create_publisher(ClockMsg, "/clock", CLOCK_QOS)
            self._timer = self.create_timer(CLOCK_TIMER_S, self._on_clock_timer,
                                            clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info(
            f"contract '{c.name}' ({contract_file}): cameras {self.camera_map}, {rate:g} Hz, "
            f"commands {[g.topic for g in group_outputs(c)]}, timeout {self.command_timeout_s:g} s, "
            f"max_episode_steps {self._param('max_episode_steps')}"
            + ("; sim time: publishing /clock, stepping as soon as the commands answer" if self.sim_clock else "")
        )

    # -- parameters ---------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        """Every parameter with its value and description; task, seed, max_episode_steps and
        end_on_success take effect at the next reset (set them, then call ~/reset), the rest are read-only."""
        d = lambda *a, **k: declare(self, *a, **k)  # noqa: E731
        d("contract", "", "Robot contract YAML; empty = config/contract_ee_arm.yaml of this package.")
        d("task", "drawer-open-v3", "Meta-World task of the next reset (e.g. drawer-open-v3).", read_only=False)
        d("seed", 0, "Layout seed of the next reset (>= 0).", read_only=False)
        d("max_episode_steps", 150, "Steps after which an episode ends as 'truncated'.", read_only=False)
        d("end_on_success", True, "End the episode at its first success step (else run to the time limit).",
          read_only=False)
        d("camera_map", [], "Contract camera -> Meta-World camera as 'front:=corner' items; unlisted cameras use "
                            "their own name if Meta-World has it, else 'corner'.")
        d("control_rate_hz", 0.0, "Step rate override in Hz; 0 = the contract's control rate.")
        d("command_timeout_s", 0.0, "Commands older than this count as zero; 0 = the contract's max_frame_age_s.")
        d("reset_on_start", True, "Start an episode of task/seed at start-up (else wait for ~/reset).")
        d("world_frame", "world", "frame_id of the end-effector poses.")
        d("publish_clock", False, "Sim time: publish /clock and step as soon as every command topic answered the last "
                                  "frame (idle time skipped); run the other nodes with use_sim_time:=true.")
        d("ee_pose_topic", "/ee_pose", "Where the hand pose goes (geometry_msgs/PoseStamped): the ee state inputs.")
        d("gripper_state_topic", "/gripper_state", "Where the gripper opening goes (sensor_msgs/JointState, joint "
                                                   "'gripper').")

    def _param(self, name: str) -> Any:
        return param(self, name)

    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name == "task" and p.value not in TASK_INSTRUCTIONS:
                return SetParametersResult(successful=False, reason=f"task {p.value!r} is no Meta-World v3 task")
            if p.name == "seed" and p.value < 0:
                return SetParametersResult(successful=False, reason=f"seed {p.value} must be >= 0")
            if p.name == "max_episode_steps" and p.value < 1:
                return SetParametersResult(successful=False, reason=f"max_episode_steps {p.value} must be >= 1")
        return SetParametersResult(successful=True)

    def _warn_unpublished_state_inputs(self) -> None:
        """A contract state input on a topic this sim does not publish can never be fresh: the policy node
        would stop at every step. Say so at start rather than then."""
        published = {self.resolve_topic_name(self._param("ee_pose_topic")): "geometry_msgs/msg/PoseStamped",
                     self.resolve_topic_name(self._param("gripper_state_topic")): "sensor_msgs/msg/JointState"}
        for spec in self.contract.state_inputs:
            topic = self.resolve_topic_name(spec.source.topic)
            if published.get(topic) != spec.source.msg_type:
                self.get_logger().warning(
                    f"state input '{spec.name}' reads {spec.source.msg_type} on {topic}, which this sim does not "
                    f"publish (it publishes {published})")

    # -- commands -----------------------------------------------------------------------------
    def _make_command_callback(self, topic: str, dims: tuple[int, ...], refs: tuple[Any, ...]) -> Callable[[Any], None]:
        def on_command(msg: Any) -> None:
            try:
                values = {i: float(read_field(msg, ref)) for i, ref in zip(dims, refs)}
            except Exception as e:  # noqa: BLE001 - a malformed command must not kill the robot
                self.get_logger().warning(f"command on {topic} ignored: {e}", throttle_duration_sec=2.0)
                return
            self._commands[topic] = (self._now_s(), values)
            if self.sim_clock is not None and self.episode_active and not self._first_step_pending:
                self._answered.add(topic)
                if self._answered >= self._command_topics:
                    self.steps_answered += 1
                    self._step_now()

        return on_command

    # -- time -----------------------------------------------------------------------------------
    def _now_s(self) -> float:
        """Seconds on the clock command ages are measured with: sim time, else the monotonic wall clock."""
        return self.sim_clock.now_ns() / 1e9 if self.sim_clock is not None else time.monotonic()

    def _stamp(self) -> Any:
        if self.sim_clock is not None:
            return Time(nanoseconds=self.sim_clock.now_ns()).to_msg()
        return self.get_clock().now().to_msg()

    def _publish_clock(self, now_ns: int) -> None:
        self._clock_pub.publish(ClockMsg(clock=Time(nanoseconds=now_ns).to_msg()))

    def _on_clock_timer(self) -> None:
        """Sim time: publish the time; step (with what commands there are) once the period is over."""
        assert self.sim_clock is not None
        if self.sim_clock.tick_due():
            self._step_now()
        else:
            self._publish_clock(self.sim_clock.now_ns())

    def _step_now(self) -> None:
        """Sim time: move the clock to this step's tick (publish it before the frames it stamps), step."""
        assert self.sim_clock is not None
        self._publish_clock(self.sim_clock.start_tick())
        self._answered.clear()
        self._first_step_pending = False
        self._on_tick()

    def current_action(self) -> np.ndarray:
        """The Meta-World action (4,) from the freshest commands; stale or missing dims are 0."""
        action = np.zeros(len(self.contract.action_dims))
        now = self._now_s()
        for received, values in self._commands.values():
            if received >= self._reset_time and now - received <= self.command_timeout_s:
                for i, v in values.items():
                    action[i] = v if np.isfinite(v) else 0.0
        return np.clip(action[self._order], -1.0, 1.0)

    # -- episodes -----------------------------------------------------------------------------
    def reset_episode(self, task: str, seed: int) -> str:
        """Start an episode of ``task`` with layout ``seed`` and publish its first frame; returns the instruction."""
        max_steps = int(self._param("max_episode_steps"))
        if self.env is None or self.env.task_name != task:
            if self.env is not None:
                self.env.close()
            cam0 = self.contract.cameras[0]
            self.env = MetaWorldEnv(SimConfig(task=task, cameras=tuple(dict.fromkeys(self.camera_map.values())),
                                              height=cam0.height, width=cam0.width, max_episode_steps=max_steps))
        self.env.set_max_episode_steps(max_steps)
        self.env.reset(int(seed))
        self.episode_active, self.end_reason = True, ""
        self.episode_index += 1
        self._commands.clear()
        self._answered.clear()
        self.step_log = []
        self._reset_time = self._now_s()
        if self.sim_clock is not None:
            self.sim_clock.restart_period()
            self._first_step_pending = True
        instruction = self.env.instruction
        if self._instruction_pub is not None:
            self._instruction_pub.publish(String(data=instruction))
        self._task_pub.publish(String(data=task))
        self._publish_state(step_success=None)
        self.get_logger().info(f"episode {self.episode_index}: task {task} seed {seed}: '{instruction}'")
        return instruction

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        task, seed = self._param("task"), self._param("seed")
        try:
            instruction = self.reset_episode(task, seed)
        except Exception as e:  # noqa: BLE001 - report to the caller, keep running
            response.success, response.message = False, f"reset failed for task {task!r} seed {seed}: {type(e).__name__}: {e}"
            self.get_logger().error(response.message)
            return response
        response.success = True
        response.message = f"task={task} seed={seed} instruction={instruction!r}"
        return response

    def _end_episode(self, reason: str) -> None:
        self.episode_active, self.end_reason = False, reason
        self._end_pub.publish(String(data=reason))
        assert self.env is not None
        self.get_logger().info(f"episode {self.episode_index} ({self.env.task_name} seed {self.env.seed}) "
                               f"ended: {reason} after {self.env.steps} steps")

    def _on_tick(self) -> None:
        if self.env is None:
            return
        if not self.episode_active:
            self._publish_state(step_success=None)  # hold: frames keep coming for late subscribers
            return
        action = self.current_action()
        self.step_log.append((np.asarray(self.env.ee_position, dtype=np.float64).copy(), action))
        result = self.env.step(action)
        self._publish_state(step_success=result.success)
        if result.success and self.end_on_success:
            self._end_episode("success")
        elif self.env.truncated:
            self._end_episode("truncated")

    # -- publishing ---------------------------------------------------------------------------
    def _publish_state(self, step_success: bool | None) -> None:
        env = self.env
        assert env is not None
        stamp = self._stamp()
        self._publish_arm_state(env, stamp)  # before the frames: see the module docstring
        for cam in self.contract.cameras:
            mw_cam = self.camera_map[cam.name]
            pixels = env.render(mw_cam, cam.height, cam.width)
            msg = Image()
            msg.header.stamp, msg.header.frame_id = stamp, mw_cam
            msg.height, msg.width, msg.encoding, msg.is_bigendian = cam.height, cam.width, "rgb8", 0
            msg.step = cam.width * 3
            msg.data = pixels.tobytes()
            self._image_pubs[cam.name].publish(msg)
        obs = Float64MultiArray()
        obs.layout.dim = [MultiArrayDimension(label="observation", size=len(env.obs), stride=len(env.obs))]
        obs.data = env.obs.astype(float).tolist()
        self._obs_pub.publish(obs)
        if step_success is not None and self._success_pub is not None:
            self._success_pub.publish(Bool(data=bool(step_success)))

    def _publish_arm_state(self, env: MetaWorldEnv, stamp: Any) -> None:
        """The hand pose (``/ee_pose`` and ``~/ee_pose``) and the gripper opening (``/gripper_state``)."""
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, self.world_frame
        x, y, z = env.ee_position
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = float(x), float(y), float(z)
        pose.pose.orientation.w = 1.0
        self._state_pubs["pose"].publish(pose)
        self._pose_pub.publish(pose)
        gripper = JointState(name=["gripper"], position=[float(env.gripper_opening)])
        gripper.header.stamp = stamp
        self._state_pubs["gripper"].publish(gripper)

    def destroy_node(self) -> None:
        env = getattr(self, "env", None)  # absent when __init__ failed (rclpy still destroys the node)
        if env is not None:
            env.close()
            self.env = None
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point: ``sim_node --ros-args -p task:=drawer-open-v3 -p seed:=0 [-p contract:=...]``."""
    if print_help_if_asked(args, USAGE, __doc__):
        return 0
    rclpy.init(args=args)
    return spin_node(SimNode, NODE_NAME)


if __name__ == "__main__":
    raise SystemExit(main())
