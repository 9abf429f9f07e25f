"""`expert_node`: Meta-World's scripted policy as a noisy teleoperator of the sim node.

Why a node and not a loop inside the sim: the demonstrations must reach the recorder the same way a
person's teleoperation would, as command messages on the contract's topics, so the recorded bags
are exactly what a real robot's would be.

Subscribes to the sim node's ``~/task`` (std_msgs/String, latched: picks the scripted policy) and
``~/observation`` (std_msgs/Float64MultiArray, Meta-World's 39-d observation). For every
observation it publishes one command on the contract's target topics (TwistStamped dx, dy, dz and
Float64MultiArray gripper for ``config/contract_ee_arm.yaml``): the scripted action plus Gaussian
noise of std ``noise_std``, clipped to [-1, 1]. The sim publishes one observation per control step,
so the expert answers at the control rate, one step behind, like a teleoperator looking at the robot.

``noise_std`` and ``operator`` may be changed while running (``~/set_parameters``), e.g. per episode
to record expert, noisy and failed episodes. ``operator`` makes a deliberate mistake
(``sim.operators``: wrong_target, stop_short, release_early, near_miss), drawn anew at each episode start (each
message on the task topic).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import Float64MultiArray, String

from q_transformer_ros.contract import RobotContract, load_contract
from q_transformer_ros.ros.conversions import build_command, group_outputs, message_class
from q_transformer_ros.ros.qos import COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS
from q_transformer_ros.ros.params import declare
from q_transformer_ros.ros.runner import print_help_if_asked, spin_node
from q_transformer_ros.ros.sim_node import default_contract_path
from q_transformer_ros.sim.metaworld_env import OBS_DIM, ScriptedExpert, contract_action_order
from q_transformer_ros.sim.operators import OPERATOR_STYLES, ScriptedOperator

NODE_NAME = "expert_node"


USAGE = ('expert_node [-h] --ros-args'
         ' [-p contract:=CONTRACT.yaml]'
         ' [-p noise_std:=0.3]'
         ' [-p operator:=expert|wrong_target|stop_short|release_early|near_miss]'
         ' [-p seed:=N]'
         ' [-p task:=TASK]')

class ExpertNode(Node):
    """Answers each sim observation with the scripted (noisy) action on the contract's command topics."""

    def __init__(self, *, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self._declare_parameters()
        contract_file = self.get_parameter("contract").value or str(default_contract_path())
        self.contract: RobotContract = load_contract(contract_file)
        self._order = contract_action_order([d.name for d in self.contract.action_dims], where=f"{contract_file} action_dims")
        self._groups = group_outputs(self.contract)
        self._pubs = {g.topic: self.create_publisher(message_class(g.msg_type), g.topic, COMMAND_QOS) for g in self._groups}
        self.expert: ScriptedExpert | None = None
        self.operator: ScriptedOperator | None = None
        self.episode_step = 0
        self._episodes = 0
        self.commands_sent = 0
        task = self.get_parameter("task").value
        if task:
            self._set_task(task)
        self.create_subscription(String, self.get_parameter("task_topic").value, self._on_task, INSTRUCTION_QOS)
        self.create_subscription(Float64MultiArray, self.get_parameter("observation_topic").value,
                                 self._on_observation, DIAGNOSTIC_QOS)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.get_logger().info(
            f"contract '{self.contract.name}': commands on {[g.topic for g in self._groups]}, "
            f"noise_std {self.get_parameter('noise_std').value:g}"
        )

    def _declare_parameters(self) -> None:
        """Every parameter with its value and description; noise_std can change while running (per
        episode), the rest are read-only."""
        d = lambda *a, **k: declare(self, *a, **k)  # noqa: E731
        d("contract", "", "Robot contract YAML (command topics); empty = config/contract_ee_arm.yaml.")
        d("noise_std", 0.0, "Std of the Gaussian noise added to each action dim (action units, actions in [-1, 1]).",
          read_only=False)
        d("operator", "expert", f"Operator style {OPERATOR_STYLES}: the expert, or the expert making one deliberate "
          "mistake per episode (sim/operators.py).", read_only=False)
        d("seed", -1, "Seed of the noise generator (and of the operator's mistakes); -1 = fresh entropy.")
        d("task", "", "Meta-World task; empty = follow the sim node's task topic.")
        d("task_topic", "/sim_node/task", "Latched std_msgs/String topic with the sim's task name.")
        d("observation_topic", "/sim_node/observation", "std_msgs/Float64MultiArray topic with the 39-d observation.")

    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name == "noise_std" and not (np.isfinite(p.value) and p.value >= 0):
                return SetParametersResult(successful=False, reason=f"noise_std {p.value} must be finite and >= 0")
            if p.name == "operator" and p.value not in OPERATOR_STYLES:
                return SetParametersResult(successful=False, reason=f"operator {p.value!r}: choose one of {OPERATOR_STYLES}")
        return SetParametersResult(successful=True)

    def _set_task(self, task: str) -> None:
        if self.expert is not None and self.expert.task_name == task:
            return
        seed = self.get_parameter("seed").value
        self.expert = ScriptedExpert(task, noise_std=0.0, seed=None if seed < 0 else seed)
        self.get_logger().info(f"scripted policy for task {task}")

    def _on_task(self, msg: String) -> None:
        self._start_episode()  # the sim publishes its task at every episode start
        if self.get_parameter("task").value:  # a fixed task parameter wins
            return
        try:
            self._set_task(msg.data)
        except ValueError as e:
            self.get_logger().error(f"task topic: {e}")

    def _on_observation(self, msg: Float64MultiArray) -> None:
        if self.expert is None:
            self.get_logger().warning("observation before any task: no command sent", throttle_duration_sec=2.0)
            return
        obs = np.asarray(msg.data, dtype=np.float64)
        if obs.shape != (OBS_DIM,) or not np.all(np.isfinite(obs)):
            self.get_logger().warning(f"observation of shape {obs.shape} (expected ({OBS_DIM},)) or not finite: ignored",
                                      throttle_duration_sec=2.0)
            return
        self.expert.noise_std = float(self.get_parameter("noise_std").value)
        action = self.expert.act(obs if self.operator is None else self.operator.perceive(obs))
        if self.operator is not None:
            action = self.operator.act(self.episode_step, obs[:3], action)  # obs[0:3]: hand position
        self.episode_step += 1
        self.publish_action(action)

    def _start_episode(self) -> None:
        """Episode start: step 0, and the operator's mistake for this episode (seeded per episode)."""
        self.episode_step = 0
        self._episodes += 1
        style = self.get_parameter("operator").value
        seed = self.get_parameter("seed").value
        self.operator = None if style == "expert" else ScriptedOperator(
            style, seed=None if seed < 0 else seed * 1_000_003 + self._episodes)

    def publish_action(self, sim_action: np.ndarray) -> None:
        """Publish a Meta-World action (dx, dy, dz, gripper) on the contract's command topics."""
        contract_action = np.zeros(len(self.contract.action_dims))
        contract_action[self._order] = sim_action
        stamp = self.get_clock().now().to_msg()
        for g in self._groups:
            msg = build_command(g, [contract_action[i] for i in g.dims], stamp, self.contract.control_period_s)
            self._pubs[g.topic].publish(msg)
        self.commands_sent += 1


def main(args: list[str] | None = None) -> int:
    """Entry point: ``expert_node --ros-args -p noise_std:=0.3``."""
    if print_help_if_asked(args, USAGE, __doc__):
        return 0
    rclpy.init(args=args)
    return spin_node(ExpertNode, NODE_NAME)


if __name__ == "__main__":
    raise SystemExit(main())
