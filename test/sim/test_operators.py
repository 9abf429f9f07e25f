"""Scripted operators with deliberate mistakes: each style does what its name says, reproducibly, and
in the simulator the mistakes turn successful demonstrations into failures."""

from __future__ import annotations

import numpy as np
import pytest

from q_transformer_ros.sim.operators import OPERATOR_STYLES, WORKSPACE_HIGH, WORKSPACE_LOW, ScriptedOperator

EXPERT = np.array([0.5, -0.5, 0.25, 1.0], dtype=np.float32)  # what the expert would do (gripper closed)


def test_expert_style_passes_the_expert_through() -> None:
    op = ScriptedOperator("expert", seed=0)
    for step in range(50):
        np.testing.assert_array_equal(op.act(step, np.zeros(3), EXPERT), EXPERT)


def test_wrong_target_drives_to_a_workspace_point_with_the_gripper_open() -> None:
    op = ScriptedOperator("wrong_target", seed=1)
    target = op._target
    assert np.all(target >= WORKSPACE_LOW) and np.all(target <= WORKSPACE_HIGH)
    ee = target + np.array([0.05, -0.02, 0.0])  # 5 cm past the target in x: move back in -x
    a = op.act(0, ee, EXPERT)
    assert a[0] < 0 and a[1] > 0 and a[3] == -1.0
    np.testing.assert_allclose(op.act(3, target, EXPERT)[:3], 0.0, atol=1e-6)  # at the target: stays


def test_stop_short_holds_still_from_its_step_on() -> None:
    op = ScriptedOperator("stop_short", seed=2)
    k = op._mistake_step
    assert 5 <= k <= 30
    for step in range(k):
        np.testing.assert_array_equal(op.act(step, np.zeros(3), EXPERT), EXPERT)
    held = op.act(k, np.zeros(3), np.array([1.0, 1.0, 1.0, -1.0], np.float32))
    np.testing.assert_array_equal(held, [0.0, 0.0, 0.0, EXPERT[3]])  # no motion, gripper as it was


def test_release_early_opens_the_gripper_from_its_step_on() -> None:
    op = ScriptedOperator("release_early", seed=3)
    k = op._mistake_step
    assert op.act(k - 1, np.zeros(3), EXPERT)[3] == EXPERT[3]
    a = op.act(k, np.zeros(3), EXPERT)
    assert a[3] == -1.0 and np.array_equal(a[:3], EXPERT[:3])


def test_near_miss_misjudges_the_scene_by_5_to_10_cm_sideways_and_nothing_else() -> None:
    obs = np.arange(39, dtype=np.float64) / 10  # Meta-World's layout: objects 4:7, 11:14, the last frame's 22:25,
    scene = [slice(4, 7), slice(11, 14), slice(22, 25), slice(29, 32), slice(36, 39)]  # 29:32, the goal 36:39
    misses = []
    for seed in range(20):
        op = ScriptedOperator("near_miss", seed=seed)
        seen = op.perceive(obs)
        miss = seen[4:7] - obs[4:7]
        for part in scene:  # every object, now and in the previous frame, and the goal: misjudged alike
            np.testing.assert_allclose(seen[part] - obs[part], miss)
        keep = np.ones(39, bool)
        for part in scene:
            keep[part] = False
        np.testing.assert_array_equal(seen[keep], obs[keep])  # hand, gripper, quaternions: as they are
        assert miss[2] == 0 and 0.05 <= np.linalg.norm(miss[:2]) <= 0.10
        assert op.perceive(obs)[4:7].tolist() == seen[4:7].tolist()  # one miss for the whole episode
        np.testing.assert_array_equal(op.act(3, np.zeros(3), EXPERT), EXPERT)  # acts as the expert it feeds
        misses.append(miss[:2])
    angles = np.arctan2(*np.array(misses).T)
    assert angles.max() - angles.min() > np.pi  # in every direction, not one
    for style in ("expert", "wrong_target", "stop_short", "release_early"):
        np.testing.assert_array_equal(ScriptedOperator(style, seed=0).perceive(obs), obs)


def test_same_seed_same_mistakes_and_new_ones_per_episode() -> None:
    a, b = ScriptedOperator("stop_short", seed=7), ScriptedOperator("stop_short", seed=7)
    assert a._mistake_step == b._mistake_step
    steps = {a._mistake_step}
    for _ in range(10):
        a.reset()
        steps.add(a._mistake_step)
    assert len(steps) > 1


def test_unknown_style_names_the_choices() -> None:
    with pytest.raises(ValueError, match="wrong_target"):
        ScriptedOperator("sloppy")
    assert OPERATOR_STYLES[0] == "expert"


def test_mistakes_fail_a_task_the_expert_solves() -> None:
    pytest.importorskip("metaworld")
    from pathlib import Path

    from q_transformer_ros.contract import load_contract
    from q_transformer_ros.sim.agent_env import MetaWorldEnvironment

    contract = load_contract(Path(__file__).resolve().parents[2] / "config" / "contract_ee_arm.yaml")
    env = MetaWorldEnvironment(contract, ["reach-v3"], max_episode_steps=60)
    outcome = {}
    try:
        for style in ("expert", "wrong_target", "stop_short", "near_miss"):
            env.reset(0)
            while True:
                _obs, _r, terminated, truncated, info = env.step(env.expert_action(0.0, style))
                if terminated or truncated:
                    break
            outcome[style] = info["success"]
    finally:
        env.close()
    assert outcome == {"expert": True, "wrong_target": False, "stop_short": False, "near_miss": False}
