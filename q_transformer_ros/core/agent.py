"""Collect episodes by rolling a policy in an environment and write them as a replay dataset.

This is the seed's dataset creator done our way: the environment speaks the robot contract (frames
per camera at the contract's size, continuous actions in the contract's ranges), exploration is
epsilon-greedy over a random subset of action dims plus optional Gumbel sampling over the policy's
per-dim Q-values with an annealed temperature, and episodes are appended with ``ReplayWriter``
(atomic, skipping episodes already collected with the same env seed).

Environments return ``observation.Observation`` values (a frame per camera, the state inputs the
contract declares). The policy is duck-typed (``core.policy.QTransformerPolicy`` fits):
``reset(instruction)``, ``push(observation)``, ``decide()`` returning an object with ``.bins`` (D,) int64
and optionally ``.all_q`` (D, A). ``policy=None`` acts uniformly at random (usable before a model
exists). No torch import here.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from q_transformer_ros.contract import RobotContract
from q_transformer_ros.observation import Observation
from q_transformer_ros.replay.writer import EpisodeData, ReplayWriter


class BaseEnvironment(abc.ABC):
    """An environment that speaks the robot contract.

    ``reset(seed)`` starts an episode and returns ``(instruction, observation)``; ``step(action)`` takes
    a continuous float32 action (D,) in the contract's units and returns
    ``(observation, reward, terminated, truncated, info)`` (Gymnasium semantics: ``terminated`` = the
    task ended, ``truncated`` = cut by a time limit). ``info["success"]`` may say whether the task
    succeeded; otherwise success = terminated with a positive reward.
    """

    name: str = "env"
    """Prefix of episode source ids (``<name>:seed<seed>``) so re-collection does not duplicate."""

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> tuple[str | None, Observation]:
        ...

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        ...

    def close(self) -> None:
        """Release resources (simulators, windows)."""


class MockEnvironment(BaseEnvironment):
    """Tiny deterministic-random environment of the contract's shapes, for tests and the first demo.

    Each episode (fixed by its seed) draws an instruction, a noise image per camera and a horizon in
    ``horizon``. Frames are the noise image with a brightness ramp over time. At the horizon the episode
    terminates, successful (reward 1) iff the action's first dim was positive on that step; before it
    rewards are 0. State inputs (if the contract declares any) are random within their ranges. So the optimal Q of "first dim positive at the last step" is 1, which a learner can
    find. With ``max_steps`` shorter than the horizon an Agent truncates the episode.
    """

    name = "mock"

    def __init__(self, contract: RobotContract, horizon: tuple[int, int] = (3, 8),
                 instructions: Sequence[str] = ("push the block left", "push the block right")):
        if not (1 <= horizon[0] <= horizon[1]):
            raise ValueError(f"MockEnvironment: horizon must be (lo, hi) with 1 <= lo <= hi, got {horizon}")
        self.contract = contract
        self.horizon = horizon
        self.instructions = list(instructions)
        self._rng = np.random.default_rng(0)
        self._base: dict[str, np.ndarray] = {}
        self._t = 0
        self._horizon = horizon[0]

    def _observe(self) -> Observation:
        ramp = np.uint8(min(255, 16 * self._t))
        frames = {name: base + ramp for name, base in self._base.items()}  # uint8 wraps: still a valid image
        c = self.contract
        state = self._rng.uniform(c.state_low, c.state_high).astype(np.float32) if c.state_dim else None
        return Observation(frames=frames, state=state)

    def reset(self, seed: int | None = None) -> tuple[str | None, Observation]:
        self._rng = np.random.default_rng(seed)
        self._t = 0
        self._horizon = int(self._rng.integers(self.horizon[0], self.horizon[1] + 1))
        self._base = {c.name: self._rng.integers(0, 200, size=(3, c.height, c.width), dtype=np.uint8)
                      for c in self.contract.cameras}
        instruction = self.instructions[int(self._rng.integers(len(self.instructions)))] if self.instructions else None
        return instruction, self._observe()

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.contract.num_action_dims,):
            raise ValueError(f"MockEnvironment.step: action shape {action.shape}, expected ({self.contract.num_action_dims},)")
        self._t += 1
        terminated = self._t >= self._horizon
        success = bool(terminated and action[0] > 0)
        return self._observe(), float(success), terminated, False, {"success": success}


class PolicyLike(Protocol):
    def reset(self, instruction: str | None) -> None: ...
    def push(self, obs: Observation) -> None: ...
    def decide(self) -> Any: ...


@dataclass
class AgentConfig:
    """How the agent collects data."""

    num_episodes: int = 10
    """Episodes to collect."""
    max_steps: int = 50
    """Time limit per episode; an episode cut here is stored as truncated (not terminal)."""
    epsilon_start: float = 0.25
    """Probability of an exploratory action at the first collected step."""
    epsilon_end: float = 0.01
    """Probability of an exploratory action after ``decay_steps`` environment steps."""
    decay_steps: int = 1000
    """Environment steps over which epsilon and the Gumbel temperature anneal linearly."""
    explore_dims: str = "subset"
    """Exploratory action: ``all`` re-draws every dim uniformly; ``subset`` re-draws a random subset
    (each dim with ``subset_prob``, at least one), keeping the policy's bins for the others."""
    subset_prob: float = 0.5
    """Per-dim probability of being re-drawn in ``subset`` exploration."""
    gumbel_temperature_start: float = 0.0
    """Temperature of Gumbel-max sampling over the policy's per-dim Q (0 = greedy). Needs ``all_q``."""
    gumbel_temperature_end: float = 0.0
    """Temperature after ``decay_steps`` steps."""
    seed: int = 0
    """Episode k uses env seed ``seed + k`` (also its source id), exploration rng seeded by ``seed``."""
    episodes_per_chunk: int = 16
    """Episodes written per transaction (one chunk each); fewer, larger chunks read faster."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        for key in ("num_episodes", "max_steps", "decay_steps", "episodes_per_chunk"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AgentConfig.{key} = {v!r}: must be an integer >= 1")
        for key in ("epsilon_start", "epsilon_end", "subset_prob"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"AgentConfig.{key} = {v!r}: must be in [0, 1]")
        for key in ("gumbel_temperature_start", "gumbel_temperature_end"):
            if getattr(self, key) < 0:
                raise ValueError(f"AgentConfig.{key} = {getattr(self, key)!r}: must be >= 0")
        if self.explore_dims not in ("all", "subset"):
            raise ValueError(f"AgentConfig.explore_dims = {self.explore_dims!r}: must be 'all' or 'subset'")

    def anneal(self, start: float, end: float, step: int) -> float:
        frac = min(1.0, step / self.decay_steps)
        return start + (end - start) * frac

    def epsilon(self, step: int) -> float:
        return self.anneal(self.epsilon_start, self.epsilon_end, step)

    def temperature(self, step: int) -> float:
        return self.anneal(self.gumbel_temperature_start, self.gumbel_temperature_end, step)


@dataclass
class CollectReport:
    """What ``Agent.collect`` did."""

    path: Path
    episodes_added: int = 0
    episodes_skipped: int = 0
    """Episodes whose source id (env seed) the dataset already had."""
    steps: int = 0
    successes: int = 0
    explored_steps: int = 0
    returns: list[float] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        n = self.episodes_added + self.episodes_skipped
        return self.successes / n if n else 0.0


class Agent:
    """Rolls ``policy`` (or uniform random bins when None) in ``env`` and writes the episodes."""

    def __init__(self, policy: PolicyLike | None, env: BaseEnvironment, contract: RobotContract,
                 config: AgentConfig | None = None):
        self.policy = policy
        self.env = env
        self.contract = contract
        self.config = config or AgentConfig()
        self.rng = np.random.default_rng(self.config.seed)
        self.global_step = 0
        self._bins = np.array(contract.action_bins, dtype=np.int64)

    # -- one decision ---------------------------------------------------------------------------
    def select_bins(self, obs: Observation) -> tuple[np.ndarray, bool]:
        """Bins (D,) for this step and whether exploration changed any of them."""
        cfg, D = self.config, self.contract.num_action_dims
        if self.policy is None:
            return self.rng.integers(0, self._bins), True
        self.policy.push(obs)
        decision = self.policy.decide()
        bins = np.asarray(decision.bins, dtype=np.int64).reshape(D).copy()
        tau = cfg.temperature(self.global_step)
        all_q = getattr(decision, "all_q", None)
        if tau > 0 and all_q is not None:
            # Gumbel-max over each dim's Q / tau (the policy's Q of dim i is conditioned on its own
            # greedy earlier dims; sampling per dim is the cheap approximation the reference uses too)
            for d in range(D):
                q = np.asarray(all_q[d][: self._bins[d]], dtype=np.float64)
                bins[d] = int(np.argmax(q / tau + self.rng.gumbel(size=q.shape)))
        explored = False
        if self.rng.random() < cfg.epsilon(self.global_step):
            if cfg.explore_dims == "all":
                mask = np.ones(D, dtype=bool)
            else:
                mask = self.rng.random(D) < cfg.subset_prob
                if not mask.any():
                    mask[self.rng.integers(D)] = True
            bins = np.where(mask, self.rng.integers(0, self._bins), bins)
            explored = True
        return bins, explored

    # -- one episode ----------------------------------------------------------------------------
    def rollout(self, seed: int) -> tuple[EpisodeData, int]:
        """Run one episode with env seed ``seed``; returns the episode and its number of explored steps.

        A truncated episode also stores the observation reached after its last action as an extra
        final step (action repeated, reward 0): that step is never a sample (no next observation),
        but it lets the previous, real transition bootstrap from the state it actually reached.
        """
        instruction, obs = self.env.reset(seed=seed)
        if self.policy is not None:
            self.policy.reset(instruction)
        seen: list[Observation] = []
        actions, rewards = [], []
        terminated = success = False
        explored_steps = 0
        for _ in range(self.config.max_steps):
            obs.check(self.contract, where=f"{self.env.name} seed {seed}")
            seen.append(obs)
            bins, explored = self.select_bins(obs)
            explored_steps += explored
            action = self.contract.bins_to_actions(bins)
            obs, reward, terminated, truncated, info = self.env.step(action)
            actions.append(action)
            rewards.append(float(reward))
            self.global_step += 1
            if terminated or truncated:
                success = bool(info.get("success", terminated and reward > 0))
                break
        extra = not terminated
        if extra:
            seen.append(obs)
            actions.append(actions[-1])
            rewards.append(0.0)
        ep = EpisodeData.from_observations(
            seen, actions,
            rewards=np.asarray(rewards, dtype=np.float32),
            success=success, terminal=terminated, instruction=instruction,
            source_id=f"{self.env.name}:seed{seed}",
            metadata={"env": self.env.name, "seed": seed, "explored_steps": explored_steps,
                      "final_observation_step": extra},
        )
        return ep, explored_steps

    # -- many episodes --------------------------------------------------------------------------
    def collect(self, path: str | Path) -> CollectReport:
        """Collect ``config.num_episodes`` episodes into the dataset at ``path`` (created if needed)."""
        cfg = self.config
        report = CollectReport(path=Path(path))
        with ReplayWriter(path, self.contract) as writer:
            seeds = [cfg.seed + k for k in range(cfg.num_episodes)]
            bar = tqdm(total=len(seeds), desc=f"collect {Path(path).name}", unit="ep", disable=not cfg.progress)
            for first in range(0, len(seeds), cfg.episodes_per_chunk):
                with writer.transaction() as tx:
                    for seed in seeds[first:first + cfg.episodes_per_chunk]:
                        if writer.has_source(f"{self.env.name}:seed{seed}"):
                            report.episodes_skipped += 1
                            bar.update(1)
                            continue
                        ep, explored = self.rollout(seed)
                        if tx.add_episode(ep):
                            report.episodes_added += 1
                            report.steps += ep.length
                            report.successes += ep.success
                            report.explored_steps += explored
                            report.returns.append(float(ep.rewards.sum()))
                        else:
                            report.episodes_skipped += 1
                        bar.update(1)
                        bar.set_postfix(success=f"{report.successes}/{report.episodes_added}")
            bar.close()
        return report


def make_mock_dataset(path: str | Path, contract: RobotContract, num_episodes: int = 8, max_steps: int = 10,
                      horizon: tuple[int, int] = (3, 8), seed: int = 0, progress: bool = False) -> CollectReport:
    """A small dataset from random actions in ``MockEnvironment`` (for other components' tests)."""
    cfg = AgentConfig(num_episodes=num_episodes, max_steps=max_steps, seed=seed, progress=progress)
    return Agent(None, MockEnvironment(contract, horizon=horizon), contract, cfg).collect(path)
