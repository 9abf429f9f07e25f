"""The ROS-free Meta-World wrapper with real MuJoCo physics and real (EGL) rendering.

Checked: the instruction table covers exactly Meta-World's 50 tasks; seeds are reproducible layouts;
images have the asked size, are not blank and are upright (dark background above the table);
actions move the hand in the commanded direction; the scripted expert solves an easy task with and
without noise; the episode limit and bad inputs raise clear errors; a broken GL set-up names
MUJOCO_GL; and the core Agent collects a dataset through the BaseEnvironment adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from q_transformer_ros.sim.metaworld_env import (
    CAMERAS,
    MetaWorldEnv,
    RenderError,
    SimConfig,
    contract_action_order,
    resolve_cameras,
)
from q_transformer_ros.sim.tasks import DEMO_TASKS, MT10_TASKS, TASK_INSTRUCTIONS, instruction_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def drawer() -> MetaWorldEnv:
    env = MetaWorldEnv.make("drawer-open-v3", seed=0, height=64, width=64, max_episode_steps=150)
    yield env
    env.close()


def test_instruction_table_covers_every_task_once() -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    assert set(TASK_INSTRUCTIONS) == set(ALL_V3_ENVIRONMENTS) == set(ENV_POLICY_MAP)
    assert len(TASK_INSTRUCTIONS) == 50
    assert len(set(TASK_INSTRUCTIONS.values())) == 50, "two tasks share an instruction"
    assert instruction_for("drawer-open-v3") == "open the drawer"
    assert set(MT10_TASKS) <= set(TASK_INSTRUCTIONS) and set(DEMO_TASKS) <= set(TASK_INSTRUCTIONS)
    with pytest.raises(KeyError, match="drawer-opn-v3"):
        instruction_for("drawer-opn-v3")


def test_seed_gives_a_reproducible_layout(drawer: MetaWorldEnv) -> None:
    a = drawer.reset(3)
    b = drawer.reset(3)
    c = drawer.reset(4)
    assert a.shape == (39,)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[4:7], c[4:7]), "different seeds should move the drawer"
    assert drawer.seed == 4 and drawer.steps == 0 and not drawer.success


def test_render_size_not_blank_and_upright(drawer: MetaWorldEnv) -> None:
    drawer.reset(0)
    img = drawer.render()
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img.std() > 20, "image looks blank"
    big = drawer.render("corner", 96, 128)
    assert big.shape == (96, 128, 3)
    # 'corner' is rolled 180 degrees in the model; upright, the unlit (black) background is above the
    # table, so the top rows are darker than the bottom rows; the raw image has it the other way round.
    assert drawer._is_rolled("corner")
    top, bottom = img[:12].mean(), img[-12:].mean()
    assert top + 30 < bottom, (top, bottom)
    raw = MetaWorldEnv(SimConfig(task="drawer-open-v3", upright=False))
    try:
        raw.reset(0)
        np.testing.assert_array_equal(raw.render(), img[::-1, ::-1])
    finally:
        raw.close()
    for cam in CAMERAS:
        assert drawer.render(cam, 32, 32).std() > 5, cam
    with pytest.raises(ValueError, match="frontview"):
        drawer.render("frontview")


def test_actions_move_the_hand(drawer: MetaWorldEnv) -> None:
    drawer.reset(1)
    start = drawer.ee_position
    for _ in range(8):
        drawer.step(np.array([1.0, 0.0, 0.0, -1.0]))
    moved = drawer.ee_position - start
    assert moved[0] > 0.03 and abs(moved[1]) < 0.01, moved
    for _ in range(8):
        drawer.step(np.array([0.0, 0.0, -1.0, -1.0]))
    assert drawer.ee_position[2] < start[2] - 0.02
    closed_before = drawer.gripper_opening
    for _ in range(10):
        drawer.step(np.array([0.0, 0.0, 0.0, 1.0]))
    assert drawer.gripper_opening < closed_before - 0.1, "gripper +1 should close the fingers"
    assert drawer.steps == 26


def test_step_errors_and_episode_limit() -> None:
    env = MetaWorldEnv.make("reach-v3", seed=0, max_episode_steps=3)
    try:
        with pytest.raises(ValueError, match=r"shape \(3,\)"):
            env.step(np.zeros(3))
        with pytest.raises(ValueError, match="not finite"):
            env.step(np.array([0, 0, np.nan, 0]))
        for _ in range(3):
            env.step(np.zeros(4))
        assert env.truncated
        with pytest.raises(RuntimeError, match="max_episode_steps"):
            env.step(np.zeros(4))
        env.reset(1)
        assert not env.truncated
    finally:
        env.close()
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        SimConfig(task="drawer-open-v2")
    with pytest.raises(ValueError, match="height"):
        SimConfig(height=4)
    with pytest.raises(ValueError, match="frontview"):
        SimConfig(cameras=("frontview",))


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
def test_scripted_expert_solves_drawer_open(drawer: MetaWorldEnv, noise_std: float) -> None:
    expert = drawer.expert(noise_std=noise_std, seed=0)
    solved = 0
    for seed in (10, 11):
        obs = drawer.reset(seed)
        for _ in range(150):
            action = expert.act(obs)
            assert action.shape == (4,) and np.all(np.abs(action) <= 1.0)
            obs, success = drawer.step(action)
            if success:
                solved += 1
                break
    assert solved == 2
    if noise_std > 0:
        obs = drawer.reset(12)
        assert not np.allclose(expert.act(obs), expert.clean_action(obs))


def test_contract_mapping_helpers() -> None:
    assert contract_action_order(["gripper", "dx", "dy", "dz"]) == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="missing \\['dz'\\]"):
        contract_action_order(["dx", "dy", "yaw", "gripper"])
    assert resolve_cameras(["front", "topview"]) == {"front": "corner", "topview": "topview"}
    assert resolve_cameras(["front"], {"front": "corner2"}) == {"front": "corner2"}
    with pytest.raises(ValueError, match="nocam"):
        resolve_cameras(["front"], {"front": "nocam"})


def test_broken_gl_names_mujoco_gl(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        from q_transformer_ros.sim.metaworld_env import MetaWorldEnv
        MetaWorldEnv.make('reach-v3', seed=0).render()
    """)
    env = {**os.environ, "MUJOCO_GL": "no-such-backend", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RenderError" in proc.stderr and "MUJOCO_GL='no-such-backend'" in proc.stderr
    assert "libegl1" in proc.stderr


def test_agent_collects_through_the_adapter(tmp_path: Path) -> None:
    from q_transformer_ros.core.agent import Agent, AgentConfig
    from q_transformer_ros.core.replay_dataset import ReplayDataset
    from q_transformer_ros.contract import load_contract
    from q_transformer_ros.sim.agent_env import MetaWorldEnvironment

    contract = load_contract(REPO / "config" / "contract_ee_arm.yaml")
    env = MetaWorldEnvironment(contract, ["button-press-topdown-v3", "drawer-open-v3"], max_episode_steps=20)
    try:
        instruction, obs = env.reset(1)
        assert instruction == "open the drawer"
        assert obs.frames["front"].shape == (3, 64, 64) and obs.frames["front"].dtype == np.uint8
        action = env.expert_action()
        assert action.shape == (4,)
        report = Agent(None, env, contract, AgentConfig(num_episodes=2, max_steps=6, progress=False)).collect(tmp_path / "ds")
    finally:
        env.close()
    assert report.episodes_added == 2 and report.steps >= 12
    ds = ReplayDataset(tmp_path / "ds")
    assert len(ds) > 0
    sample = ds[0]
    assert tuple(sample["frames"].shape[-3:]) == (3, 64, 64)


def test_sim_package_imports_without_rclpy() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules['rclpy'] = None  # any import of rclpy now raises ImportError
        import q_transformer_ros.sim.metaworld_env, q_transformer_ros.sim.tasks, q_transformer_ros.sim.agent_env
        assert 'rclpy' not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
