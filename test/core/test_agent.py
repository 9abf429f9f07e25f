"""Agent: rolls a policy (or random bins) in the MockEnvironment and writes a readable dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from q_transformer_ros.core.agent import Agent, AgentConfig, MockEnvironment, make_mock_dataset
from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.replay.testing import tiny_contract


@dataclass
class FakeDecision:
    bins: np.ndarray
    all_q: np.ndarray


class FakePolicy:
    """Greedy choice: the top bin in dim 0 (first dim positive -> success), bin 0 elsewhere."""

    def __init__(self, contract):
        self.contract = contract
        self.instructions: list[str | None] = []
        self.pushed = 0

    def reset(self, instruction):
        self.instructions.append(instruction)

    def push(self, obs):
        obs.check(self.contract)
        self.pushed += 1

    def decide(self):
        A = max(self.contract.action_bins)
        q = np.zeros((self.contract.num_action_dims, A))
        q[0, A - 1] = 1.0
        q[1:, 0] = 1.0
        return FakeDecision(bins=q.argmax(-1), all_q=q)


def test_mock_dataset_random_policy(tmp_path: Path):
    c = tiny_contract(num_cameras=2)
    rep = make_mock_dataset(tmp_path / "ds", c, num_episodes=12, max_steps=6, horizon=(3, 8))
    assert rep.episodes_added == 12 and rep.episodes_skipped == 0
    ds = ReplayDataset(tmp_path / "ds", n_step=2)
    assert ds.num_episodes == 12 and ds.num_steps == rep.steps
    n_term = 0
    for i in range(12):
        ep = ds.episode(i)
        if ep.terminal:  # reached the horizon (<= 6 steps): reward 1 iff dim 0 was positive at the end
            n_term += 1
            assert ep.success == bool(ep.actions[-1, 0] > 0) == (ep.rewards[-1] == 1.0)
            assert len(ep.actions) <= 6
        else:  # cut at max_steps: 6 real steps + the final observation step
            assert len(ep.actions) == 7 and not ep.success and ep.metadata["final_observation_step"]
            assert np.array_equal(ep.actions[-1], ep.actions[-2]) and ep.rewards.sum() == 0
        assert ep.instruction in ("push the block left", "push the block right")
        # all actions are bin centres of the contract
        np.testing.assert_allclose(c.bins_to_actions(c.actions_to_bins(ep.actions)), ep.actions, atol=1e-6)
    assert 0 < n_term < 12  # horizons 3..8 vs max_steps 6 give both kinds
    # re-running the same collection adds nothing
    again = make_mock_dataset(tmp_path / "ds", c, num_episodes=12, max_steps=6, horizon=(3, 8))
    assert again.episodes_added == 0 and again.episodes_skipped == 12
    assert ReplayDataset(tmp_path / "ds").num_episodes == 12


def test_mock_environment_is_deterministic_per_seed():
    c = tiny_contract()
    env = MockEnvironment(c)
    ins1, o1 = env.reset(seed=5)
    o1b, *_ = env.step(np.zeros(3, np.float32))
    ins2, o2 = env.reset(seed=5)
    o2b, *_ = env.step(np.zeros(3, np.float32))
    assert ins1 == ins2 and np.array_equal(o1.frames["cam0"], o2.frames["cam0"])
    assert np.array_equal(o1b.frames["cam0"], o2b.frames["cam0"])
    assert not np.array_equal(o1.frames["cam0"], o1b.frames["cam0"])  # frames change over time
    _, o3 = env.reset(seed=6)
    assert not np.array_equal(o1.frames["cam0"], o3.frames["cam0"])
    with pytest.raises(ValueError, match=r"action shape \(2,\), expected \(3,\)"):
        env.step(np.zeros(2, np.float32))


def test_greedy_policy_succeeds_and_is_called(tmp_path: Path):
    c = tiny_contract()
    pol = FakePolicy(c)
    cfg = AgentConfig(num_episodes=5, max_steps=20, epsilon_start=0.0, epsilon_end=0.0, progress=False)
    rep = Agent(pol, MockEnvironment(c), c, cfg).collect(tmp_path / "ds")
    assert rep.successes == 5 and rep.explored_steps == 0 and rep.success_rate == 1.0
    assert pol.pushed == rep.steps and len(pol.instructions) == 5
    ds = ReplayDataset(tmp_path / "ds")
    bins = ds.get_batch(np.arange(len(ds))).action_bins.numpy()
    assert (bins[:, 0] == 7).all() and (bins[:, 1:] == 0).all()
    assert ds.summary()["success_rate"] == 1.0


def test_subset_exploration_changes_only_some_dims():
    c = tiny_contract(num_dims=6, bins=16)
    cfg = AgentConfig(epsilon_start=1.0, epsilon_end=1.0, explore_dims="subset", subset_prob=0.3, progress=False)
    agent = Agent(FakePolicy(c), MockEnvironment(c), c, cfg)
    agent.policy.reset(None)
    greedy = np.array([15, 0, 0, 0, 0, 0])
    changed = []
    for _ in range(300):
        bins, explored = agent.select_bins(MockEnvironment(c).reset(seed=0)[1])
        assert explored
        changed.append(int((bins != greedy).sum()))
    # some dims keep the policy's bin, but every exploratory step re-draws at least one dim
    assert 0 < np.mean(changed) < 6 * 0.5
    cfg_all = AgentConfig(epsilon_start=1.0, epsilon_end=1.0, explore_dims="all", progress=False)
    agent_all = Agent(FakePolicy(c), MockEnvironment(c), c, cfg_all)
    draws = np.stack([agent_all.select_bins(MockEnvironment(c).reset(seed=0)[1])[0] for _ in range(300)])
    assert (draws != greedy).mean() > 0.8


def test_gumbel_sampling_anneals_to_greedy():
    c = tiny_contract(bins=8)
    cfg = AgentConfig(epsilon_start=0.0, epsilon_end=0.0, gumbel_temperature_start=5.0,
                      gumbel_temperature_end=0.0, decay_steps=100, progress=False)
    agent = Agent(FakePolicy(c), MockEnvironment(c), c, cfg)
    obs = MockEnvironment(c).reset(seed=0)[1]
    hot = np.stack([agent.select_bins(obs)[0] for _ in range(200)])
    assert len(np.unique(hot[:, 0])) > 3  # high temperature: sampled, not greedy
    agent.global_step = 100  # temperature reached 0: greedy
    cold = np.stack([agent.select_bins(obs)[0] for _ in range(20)])
    assert (cold[:, 0] == 7).all() and (cold[:, 1:] == 0).all()
    assert cfg.temperature(50) == pytest.approx(2.5) and cfg.epsilon(10**6) == 0.0


def test_agent_config_validation():
    with pytest.raises(ValueError, match=r"AgentConfig.epsilon_start = 1.5"):
        AgentConfig(epsilon_start=1.5)
    with pytest.raises(ValueError, match=r"AgentConfig.max_steps = 0"):
        AgentConfig(max_steps=0)
    with pytest.raises(ValueError, match="explore_dims"):
        AgentConfig(explore_dims="some")


def test_agent_records_the_state_inputs_it_observed(tmp_path: Path):
    """With state inputs the environment's observations carry them, the policy gets them, and the
    stored episode holds exactly the states the policy saw, step by step."""
    c = tiny_contract(state_dim=2)
    seen = []

    class Recording(FakePolicy):
        def push(self, obs):
            super().push(obs)
            seen.append(obs.state.copy())

    report = Agent(Recording(c), MockEnvironment(c, horizon=(4, 4)), c,
                   AgentConfig(num_episodes=1, max_steps=10, epsilon_start=0.0, epsilon_end=0.0, progress=False)
                   ).collect(tmp_path / "ds")
    assert report.episodes_added == 1
    stored = ReplayDataset(tmp_path / "ds").episode(0).state
    assert stored.shape == (4, 2)
    np.testing.assert_array_equal(stored, np.stack(seen))
