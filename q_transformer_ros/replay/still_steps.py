"""Still steps: stretches where the robot stands still and the command repeats, and which of them to keep.

Why: recordings hold long stretches in which nothing happens. An operator who stopped short, or went to
the wrong place, stands there until the recording ends; a teleoperator pauses before and after the task.
Each such stretch puts tens of copies of one (observation, "do nothing") pair into the data. Cloning
then learns to stand still wherever the stretches were. Q-learning's conservative term is applied once
per sample, so at those observations it pushes every other action toward the minimum reward tens of
times for each time an expert's passage pushed the right one up; in the demo's runs the Q-Transformer
stood still there as well (benchmarks/README.md, "Learning, session 7"). The stretches carry nothing
beyond their first few steps: the state does not change, and a transition from a state to itself only
repeats the first one.

A step ``t`` is *still* when the state inputs move less than ``state_tolerance`` (a fraction of each
input's contract range) from step ``t`` to ``t + 1`` (for the last step: from ``t - 1`` to ``t``) and its
action is within one bin width of step ``t - 1``'s on every dim (not "in the same bin": a command that
hovers around zero, as a position controller's does at its goal, flickers across the bin edge at 0).
``keep_still_steps`` keeps the first ``k`` steps of every run of still steps and drops the rest, so an
episode still says, once, that the robot stopped there. Judged on the state inputs: contracts without
them cannot tell "still" from "moving".
"""

from __future__ import annotations

import numpy as np

from q_transformer_ros.contract import RobotContract

STATE_TOLERANCE = 0.002
"""Default: moved less than 0.2 % of each state input's range in a step (2 mm on a 1 m workspace axis)."""


def keep_option_problem(keep: object, contract: RobotContract) -> str | None:
    """Why ``--keep-still-steps keep`` cannot be used with ``contract`` (the importers' error text), or None."""
    if not (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0):
        return f"--keep-still-steps {keep!r}: must be an integer >= 0"
    if not contract.state_dim:
        return (f"--keep-still-steps: contract '{contract.name}' declares no state_inputs, so standing still cannot "
                "be told from moving; drop the option or add state inputs")
    return None


def dropped_reason(keep: int) -> str:
    """The importers' report reason for the still steps ``keep_still_steps`` drops."""
    return f"arm still and command repeated (beyond --keep-still-steps {keep})"


def still_steps(actions: np.ndarray, state: np.ndarray, contract: RobotContract,
                state_tolerance: float = STATE_TOLERANCE) -> np.ndarray:
    """bool (T,): which steps of one episode are still (module docstring)."""
    actions = np.asarray(actions)
    state = np.asarray(state, dtype=np.float64)
    if state.ndim != 2 or state.shape[0] != actions.shape[0]:
        raise ValueError(f"still_steps: state has shape {state.shape}, expected ({actions.shape[0]}, state dims)")
    if not state_tolerance >= 0:
        raise ValueError(f"still_steps: state_tolerance = {state_tolerance!r} must be >= 0")
    t = actions.shape[0]
    if t < 2:
        return np.zeros(t, dtype=bool)
    span = (contract.state_high - contract.state_low).astype(np.float64)
    moved = np.abs(np.diff(state, axis=0)) / span            # (T-1, S): step t -> t+1
    still_state = np.all(moved < state_tolerance, axis=1)    # (T-1,)
    still_state = np.concatenate([still_state, still_state[-1:]])  # the last step: judged by t-1 -> t
    bin_width = (contract.action_high - contract.action_low).astype(np.float64) / np.asarray(contract.action_bins)
    change = np.abs(np.diff(actions.astype(np.float64), axis=0))
    same_command = np.concatenate([[False], np.all(change <= bin_width, axis=1)])
    return still_state & same_command


def keep_still_steps(still: np.ndarray, keep: int) -> np.ndarray:
    """bool (T,) mask of the steps to keep: all moving steps and the first ``keep`` of each still run."""
    still = np.asarray(still, dtype=bool)
    if not isinstance(keep, (int, np.integer)) or keep < 0:
        raise ValueError(f"keep_still_steps: keep = {keep!r} must be an integer >= 0")
    mask = np.ones(still.shape[0], dtype=bool)
    run = 0
    for i, s in enumerate(still):
        run = run + 1 if s else 0
        if run > keep:
            mask[i] = False
    return mask
