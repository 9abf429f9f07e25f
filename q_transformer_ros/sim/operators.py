"""Scripted operators that make the mistakes real demonstrators make, on purpose.

Why: Q-learning and behaviour cloning differ on data with *systematic* failures, not on zero-mean noise
around an expert (argmax cloning removes Gaussian noise by itself). Real recordings hold an operator
who went for the wrong object, stopped before the task was done, or let go too early; the success
flag at the end says which episodes worked. Cloning such data copies the mistakes in proportion;
learning from the rewards should not. Each style below is the scripted expert (``ScriptedExpert``,
with its noise) plus one deliberate mistake whose timing is drawn per episode:

* ``expert``: no mistake.
* ``wrong_target``: ignores the task and moves the hand to a random point of the workspace, gripper
  open, and stays there.
* ``stop_short``: the expert until a random step, then no motion (the gripper held).
* ``release_early``: the expert, but the gripper is forced open from a random step on.
* ``near_miss``: the expert acting on a misjudged scene (objects and goal), off by 5-10 cm in a
  random horizontal direction for the whole episode: it presses the button's housing, hooks the air in front
  of a handle. The failure a policy itself makes most (session 7's closed-loop failures), so the data
  show the value of those states instead of leaving them to extrapolation.

Actions are in Meta-World's order (dx, dy, dz, gripper), in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OPERATOR_STYLES = ("expert", "wrong_target", "stop_short", "release_early", "near_miss")

WORKSPACE_LOW = np.array([-0.3, 0.45, 0.05])
WORKSPACE_HIGH = np.array([0.3, 0.85, 0.3])
"""Where a wrong target is drawn (metres, world frame): reachable, in front of the arm."""
MISTAKE_STEPS = {"stop_short": (5, 30), "release_early": (10, 40)}
"""Step range (uniform, inclusive) at which the mistake starts, per style."""
NEAR_MISS_M = (0.05, 0.10)
"""How far (metres, uniform) a near-miss operator misjudges the object, in a horizontal direction."""
SCENE_POSITION_SLICES = (slice(4, 7), slice(11, 14), slice(22, 25), slice(29, 32), slice(36, 39))
"""Meta-World's observation (39,): the positions the scripted policies aim at. Hand 0:3 and gripper 3,
the first object 4:7 (+ quaternion), the second 11:14 (+ quaternion), the same 18 values of the
previous frame at 18:36 (objects at 22:25 and 29:32), the goal 36:39."""
GAIN = 10.0
"""Proportional gain from position error (m) to a normalised velocity command (as Meta-World's own
scripted policies use)."""


@dataclass
class ScriptedOperator:
    """One operator style; ``reset`` draws the episode's mistake, ``act`` turns the expert's action
    for the current step into what this operator does."""

    style: str = "expert"
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)
    _target: np.ndarray = field(init=False, repr=False)
    _mistake_step: int = field(init=False, default=0)
    _held_gripper: float = field(init=False, default=-1.0)
    _miss: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.style not in OPERATOR_STYLES:
            raise ValueError(f"ScriptedOperator.style = {self.style!r}: choose one of {OPERATOR_STYLES}")
        self._rng = np.random.default_rng(self.seed)
        self.reset()

    def reset(self) -> None:
        """A new episode: a new wrong target and mistake step."""
        self._target = self._rng.uniform(WORKSPACE_LOW, WORKSPACE_HIGH)
        lo, hi = MISTAKE_STEPS.get(self.style, (0, 0))
        self._mistake_step = int(self._rng.integers(lo, hi + 1))
        self._held_gripper = -1.0
        self._miss = np.zeros(3)
        if self.style == "near_miss":  # drawn only for this style: the other styles' draws stay as they were
            angle = self._rng.uniform(0.0, 2 * np.pi)
            self._miss = self._rng.uniform(*NEAR_MISS_M) * np.array([np.cos(angle), np.sin(angle), 0.0])

    def perceive(self, sim_observation: np.ndarray) -> np.ndarray:
        """What this operator believes it sees: Meta-World's observation (39,) as given, except for
        ``near_miss``, whose object and goal positions (now and in the previous frame) are off by the
        episode's miss; the hand is seen where it is. The expert acts on the result:
        ``ScriptedExpert.act(operator.perceive(obs))``."""
        obs = np.array(sim_observation, dtype=np.float64, copy=True)
        if self.style == "near_miss":
            for s in SCENE_POSITION_SLICES:
                obs[s] += self._miss
        return obs

    def act(self, step: int, ee_position: np.ndarray, expert_action: np.ndarray) -> np.ndarray:
        """This operator's action at episode step ``step`` (0-based), given the hand position and what
        the (noisy) expert would do."""
        action = np.asarray(expert_action, dtype=np.float32).copy()
        if self.style == "wrong_target":
            action[:3] = np.clip(GAIN * (self._target - np.asarray(ee_position)), -1.0, 1.0)
            action[3] = -1.0
        elif self.style == "stop_short":
            if step < self._mistake_step:
                self._held_gripper = float(action[3])
            else:
                action[:3] = 0.0
                action[3] = self._held_gripper
        elif self.style == "release_early" and step >= self._mistake_step:
            action[3] = -1.0
        return action
