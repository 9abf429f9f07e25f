"""``convert_bag --keep-still-steps``: stretches where the operator has stopped and the robot stands still
are cut to their first K steps; everything else, and the pairing of what is kept, stays as it was.

The bags are recorded the way closed loops record them (``bag_factory.make_episode``: commands a few ms
after their frame with jitter, a second camera and the state topics at their own rates), with a window
in which the operator sends (0, 0, the same gripper) and the arm's joints, pose and gripper stand still.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bag_factory import NS, STATE_INPUTS, TEST_CONTRACT, StateTopics, make_episode, make_state_contract
from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.data.convert import main
from q_transformer_ros.replay.still_steps import keep_still_steps, still_steps

STILL = (1.5, 4.0)
"""Seconds from the episode's start in which the operator has stopped."""


def convert(tmp_path: Path, name: str, bag: Path, *extra: str, state: bool = True) -> tuple[int, dict]:
    contract = tmp_path / f"{name}.yaml"
    contract.write_text(yaml.safe_dump({**TEST_CONTRACT, **({"state_inputs": STATE_INPUTS} if state else {})}))
    report = tmp_path / f"{name}.json"
    rc = main([str(bag), "--out", str(tmp_path / name), "--contract", str(contract), "--no-progress",
               "--report-json", str(report), *extra])
    return rc, (json.loads(report.read_text())[0] if report.exists() else {})


def test_still_steps_marks_repeated_commands_with_the_state_standing_still() -> None:
    c = make_state_contract()
    t = 8
    actions = np.tile(np.array([0.5, -0.5, 0.4, 0.0]), (t, 1))
    actions[:3, 0] = [0.9, -0.9, 0.3]                 # steps 0-2 differ from each other
    state = np.cumsum(np.full((t, len(STATE_INPUTS)), 0.05), axis=0)
    state[3:] = state[3]                               # from step 3 on nothing moves
    still = still_steps(actions, state, c)
    # step 3: same command as 2? no (0.3 vs 0.5); steps 4..7: same command, state still
    np.testing.assert_array_equal(still, [False, False, False, False, True, True, True, True])
    np.testing.assert_array_equal(keep_still_steps(still, 2), [True] * 6 + [False] * 2)
    np.testing.assert_array_equal(keep_still_steps(still, 0), [True] * 4 + [False] * 4)
    moving = state.copy()
    moving[5:, 2] += 0.01 * c.state_high[2]            # one input moves by 1 % of its range: not still
    np.testing.assert_array_equal(still_steps(actions, moving, c)[4:], [False, True, True, True])
    with pytest.raises(ValueError, match="keep"):
        keep_still_steps(still, -1)


def test_a_still_stretch_is_cut_to_its_first_steps_and_the_rest_keeps_its_pairing(tmp_path) -> None:
    script = make_episode(seed=11, duration=6.0, latency=0.6, jitter=0.2, wrist_hz=30.0, state=StateTopics(),
                          still_s=STILL, success=False)
    bag = script.write(tmp_path / "stopped_short")
    start = int(1.0 * NS)
    in_window = [start + STILL[0] * NS <= st.decision_ns < start + STILL[1] * NS for st in script.steps]
    assert sum(in_window) >= 20

    rc, full = convert(tmp_path, "all", bag)
    assert rc == 0 and full["steps"] == len(script.steps)
    rc, cut = convert(tmp_path, "cut", bag, "--keep-still-steps", "2")
    assert rc == 0
    reason = "arm still and command repeated (beyond --keep-still-steps 2)"
    dropped = cut["dropped"].get(reason, 0)
    # the stretch loses all but a few of its steps (its first step still answers a moving frame, its
    # last can border the next move), nothing outside it is dropped
    assert sum(in_window) - 4 <= dropped <= sum(in_window) - 2
    assert cut["steps"] == full["steps"] - dropped

    ds = ReplayDataset(tmp_path / "cut")
    assert ds.num_episodes == 1
    ep = ds.episode(0)
    kept_actions = np.asarray(ep.actions)
    # what is kept is the true steps, in order, each with its own command, less one block inside the window
    true_actions = np.stack([st.action for st in script.steps])
    inside = np.flatnonzero(in_window)
    matches = [i for i in range(inside[0], inside[-1] + 2 - dropped)
               if np.allclose(kept_actions, np.concatenate([true_actions[:i], true_actions[i + dropped:]]), atol=1e-6)]
    assert matches, "the stored steps are not the recorded ones less one block of the still stretch"
    assert not ep.success


def test_keep_still_steps_needs_state_inputs(tmp_path, capsys) -> None:
    script = make_episode(seed=12, duration=2.0, still_s=(0.5, 1.5))
    bag = script.write(tmp_path / "no_state")
    rc, _ = convert(tmp_path, "ds", bag, "--keep-still-steps", "2", state=False)
    assert rc == 1
    assert "declares no state_inputs" in capsys.readouterr().err
