"""Meta-World as a ``core.agent.BaseEnvironment``: the core Agent can collect data in the simulator
without ROS (fast, in-process), in the contract's camera names, sizes and action order.

Why both this and the sim node: the ROS path (sim node + recorder + converter) proves the product
works as on a robot; this path makes large data sets and benchmark evaluations cheap. Both go
through ``MetaWorldEnv`` and the same contract mapping (``contract_action_order``, ``resolve_cameras``),
so frames and actions mean the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from einops import rearrange

from q_transformer_ros.contract import RobotContract
from q_transformer_ros.core.agent import BaseEnvironment
from q_transformer_ros.observation import Observation
from q_transformer_ros.sim.metaworld_env import (
    MetaWorldEnv, ScriptedExpert, SimConfig, contract_action_order, resolve_cameras, sim_state_reader,
)
from q_transformer_ros.sim.operators import ScriptedOperator
from q_transformer_ros.sim.tasks import TASK_INSTRUCTIONS


class MetaWorldEnvironment(BaseEnvironment):
    """One or more Meta-World tasks behind the BaseEnvironment interface.

    Episode ``seed`` runs task ``tasks[seed % len(tasks)]`` with layout ``seed``, so a seed names
    one episode exactly (the Agent's source ids stay unique across tasks). Reward is 1 on the step
    that first succeeds, which also terminates the episode; ``max_episode_steps`` truncates.
    """

    def __init__(self, contract: RobotContract, tasks: Sequence[str], *, max_episode_steps: int = 150,
                 camera_map: Mapping[str, str] | None = None, noise_seed: int | None = 0) -> None:
        tasks = list(tasks)
        if not tasks:
            raise ValueError("MetaWorldEnvironment: tasks is empty; name at least one Meta-World task")
        unknown = [t for t in tasks if t not in TASK_INSTRUCTIONS]
        if unknown:
            raise ValueError(f"MetaWorldEnvironment: unknown tasks {unknown}; known: {sorted(TASK_INSTRUCTIONS)}")
        self.contract = contract
        self.tasks = tasks
        self.max_episode_steps = max_episode_steps
        self._order = contract_action_order([d.name for d in contract.action_dims], where=f"contract '{contract.name}'")
        self.camera_map = resolve_cameras([c.name for c in contract.cameras], camera_map)
        self._state = sim_state_reader([s.name for s in contract.state_inputs], where=f"contract '{contract.name}'")
        self.name = "metaworld[" + ",".join(tasks) + "]"
        self._envs: dict[str, MetaWorldEnv] = {}
        self.env: MetaWorldEnv | None = None
        self.noise_seed = noise_seed
        self._experts: dict[str, ScriptedExpert] = {}
        self._operator: ScriptedOperator | None = None
        self._episode_seed = 0

    def task_for_seed(self, seed: int) -> str:
        return self.tasks[seed % len(self.tasks)]

    def _observe(self) -> Observation:
        assert self.env is not None
        frames = {cam.name: rearrange(self.env.render(self.camera_map[cam.name], cam.height, cam.width), "h w c -> c h w").copy()
                  for cam in self.contract.cameras}
        return Observation(frames=frames, state=self._state(self.env))

    def reset(self, seed: int | None = None) -> tuple[str | None, Observation]:
        seed = 0 if seed is None else int(seed)
        task = self.task_for_seed(seed)
        if task not in self._envs:
            cam0 = self.contract.cameras[0]
            self._envs[task] = MetaWorldEnv(SimConfig(task=task, cameras=tuple(dict.fromkeys(self.camera_map.values())),
                                                      height=cam0.height, width=cam0.width,
                                                      max_episode_steps=self.max_episode_steps))
        self.env = self._envs[task]
        self.env.reset(seed)
        self._episode_seed, self._operator = seed, None
        return self.env.instruction, self._observe()

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        if self.env is None:
            raise RuntimeError("MetaWorldEnvironment.step before reset")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (len(self.contract.action_dims),):
            raise ValueError(f"MetaWorldEnvironment.step: action shape {action.shape}, contract '{self.contract.name}' "
                             f"has {len(self.contract.action_dims)} dims")
        result = self.env.step(action[self._order])
        info = {"success": result.success, "task": self.env.task_name, "steps": self.env.steps}
        return self._observe(), float(result.success), result.success, self.env.truncated and not result.success, info

    def expert_action(self, noise_std: float = 0.0, style: str = "expert") -> np.ndarray:
        """The scripted expert's action (+ Gaussian noise) for the current state, in the contract's
        dim order: for collecting demonstrations without ROS. Noise is drawn from ``noise_seed``.
        ``style``: an operator style of ``sim.operators`` (a deliberate mistake drawn per episode)."""
        if self.env is None:
            raise RuntimeError("MetaWorldEnvironment.expert_action before reset")
        expert = self._experts.get(self.env.task_name)
        if expert is None:
            expert = self._experts[self.env.task_name] = self.env.expert(0.0, self.noise_seed)
        expert.noise_std = float(noise_std)
        if style != "expert" or self._operator is not None:
            if self._operator is None or self._operator.style != style:
                self._operator = ScriptedOperator(style, seed=(self.noise_seed or 0) * 1_000_003 + self._episode_seed)
            sim_action = expert.act(self._operator.perceive(self.env.obs))
            sim_action = self._operator.act(self.env.steps, self.env.ee_position, sim_action)
        else:
            sim_action = expert.act(self.env.obs)
        out = np.zeros(len(self.contract.action_dims), dtype=np.float32)
        out[self._order] = sim_action
        return out

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
        self.env = None


class DecidingPolicy(Protocol):
    """What a closed loop needs of a policy (``core.policy.QTransformerPolicy`` has it)."""

    def reset(self, instruction: str | None = None) -> None: ...
    def push(self, observation: Observation) -> None: ...
    def decide(self, beam_width: int = 1, beam_margin: float | None = None) -> Any: ...


@dataclass
class PolicyEpisode:
    """One closed-loop episode of a policy in the simulator."""

    success: bool
    steps: int
    values: list[float] = field(default_factory=list)
    """The decision's predicted value at every step."""


def run_policy_episode(policy: DecidingPolicy, env: MetaWorldEnvironment, seed: int, beam_width: int = 1,
                       beam_margin: float | None = None) -> PolicyEpisode:
    """Reset ``env`` at layout ``seed`` and let ``policy`` act on every observation (``decide(beam_width)``,
    with ``beam_margin`` when one is given) until the episode succeeds or is truncated. Why one function: the benchmarks' ROS-free closed loops
    (bench_learning, bench_decoding) must run the same loop to be comparable with each other; the ROS
    closed loop (``ros.episode_driver``) matched it episode for episode (benchmarks/README.md, session 9)."""
    instruction, obs = env.reset(seed)
    policy.reset(instruction)
    values: list[float] = []
    decoding: dict[str, Any] = {"beam_width": beam_width}
    if beam_margin is not None:
        decoding["beam_margin"] = beam_margin
    while True:
        policy.push(obs)
        decision = policy.decide(**decoding)
        values.append(round(float(decision.value), 5))
        obs, _reward, terminated, truncated, info = env.step(np.asarray(decision.action, dtype=np.float32))
        if terminated or truncated:
            return PolicyEpisode(success=bool(info["success"]), steps=len(values), values=values)
