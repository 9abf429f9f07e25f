"""Learner targets and losses against hand-computed values on small tensors.

A fake network with fixed Q tables stands in for the model: Q depends on the state id (written into the
first pixel of the frames), the dim, the previous dim's bin (teacher forcing) and the bin. Every expected
number below is worked out by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from q_transformer_ros.core.batch import TrainingBatch
from q_transformer_ros.core.hl_gauss import support_for
from q_transformer_ros.core.learner import (
    LearnerConfig,
    bc_loss,
    bellman_targets,
    conservative_penalty,
    learning_step,
    make_target_network,
    n_step_return,
    td_loss,
    update_target_network,
)

N, A = 3, 3
# dim 2 has only 2 real bins: bin 2 is padding
BIN_MASK = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])


class TableQNet(nn.Module):
    """Q[k, state, dim, prev_bin, bin] as a learnable logit table; forward follows the model interface."""

    def __init__(self, q_table: torch.Tensor, bin_mask: torch.Tensor = BIN_MASK):
        super().__init__()
        self.logit_table = nn.Parameter(torch.logit(q_table.double()).float())
        self.register_buffer("bin_mask", bin_mask.clone())
        self.calls: list[int] = []

    def forward(self, frames, text_embed, text_mask, action_bins, cond_drop_prob=0.0):
        self.calls.append(frames.shape[0])
        state = frames[:, 0, 0, 0, 0, 0].long()  # (b,)
        prev = torch.cat([torch.zeros_like(action_bins[:, :1]), action_bins[:, :-1]], dim=1)  # (b, n)
        dims = torch.arange(action_bins.shape[1])
        # (k, b, n, a)
        return self.logit_table[:, state[:, None], dims[None, :], prev]

    def q_values(self, logits):
        return logits.sigmoid()


def make_table(k: int = 1, states: int = 3, fill: float = 0.1) -> torch.Tensor:
    return torch.full((k, states, N, A, A), fill)


def frames_for(states: list[int]) -> torch.Tensor:
    f = torch.zeros(len(states), 1, 1, 3, 4, 4, dtype=torch.uint8)
    f[:, 0, 0, 0, 0, 0] = torch.tensor(states, dtype=torch.uint8)
    return f


def q_from(net: TableQNet, states: list[int], bins: torch.Tensor) -> torch.Tensor:
    return net.q_values(net(frames_for(states), None, None, bins)).amin(0)


# ------------------------------------------------------------------------- pure bellman targets

def test_intermediate_dims_use_next_dim_max_given_data_prefix():
    t = make_table()
    # state 0, data bins (1, 0, 1)
    t[0, 0, 1, 1] = torch.tensor([0.2, 0.6, 0.3])  # dim 1 given a0=1 -> max 0.6 is dim 0's target
    t[0, 0, 1, 2] = torch.tensor([0.9, 0.9, 0.9])  # dim 1 given a0=2: NOT the data prefix, must be ignored
    t[0, 0, 2, 0] = torch.tensor([0.4, 0.25, 0.1])  # dim 2 given a1=0 -> max 0.4 is dim 1's target
    net = TableQNet(t)
    bins = torch.tensor([[1, 0, 1]])
    q_now = q_from(net, [0], bins)
    q_boot = q_from(net, [1], bins)[:, 0]  # all 0.1
    y = bellman_targets(q_now, q_boot, BIN_MASK, torch.tensor([[0.0]]), 0.9, torch.tensor([0.9]))
    # last dim: 0 + 0.9 * 0.1 = 0.09
    torch.testing.assert_close(y, torch.tensor([[0.6, 0.4, 0.09]]), atol=1e-5, rtol=0)


def test_last_dim_is_reward_plus_gamma_max_dim0_at_next_state():
    t = make_table()
    t[0, 2, 0, 0] = torch.tensor([0.3, 0.8, 0.5])  # dim 0 at s_{t+1}=state 2 -> max 0.8
    net = TableQNet(t)
    bins = torch.tensor([[0, 0, 0]])
    y = bellman_targets(q_from(net, [0], bins), q_from(net, [2], bins)[:, 0], BIN_MASK,
                        torch.tensor([[0.05]]), 0.9, torch.tensor([0.9]))
    # 0.05 + 0.9 * 0.8 = 0.77
    assert y[0, 2].item() == pytest.approx(0.77, abs=1e-5)


def test_terminal_does_not_bootstrap_but_truncation_does():
    q_now = torch.full((2, N, A), 0.1)
    q_boot = torch.tensor([[0.3, 0.8, 0.5], [0.3, 0.8, 0.5]])
    rewards = torch.tensor([[1.0], [0.0]])
    # sample 0 terminated with success: discount_to_next 0 -> target 1.0
    # sample 1 truncated by a time limit: still bootstraps -> 0 + 0.9 * 0.8 = 0.72
    y = bellman_targets(q_now, q_boot, BIN_MASK, rewards, 0.9, torch.tensor([0.0, 0.9]))
    torch.testing.assert_close(y[:, 2], torch.tensor([1.0, 0.72]), atol=1e-6, rtol=0)


def test_n_step_return_and_bootstrap():
    # n = 3, gamma = 0.5: rewards (0, 0, 1) -> 0.25; bootstrap gamma^3 * 0.8 = 0.1
    assert n_step_return(torch.tensor([[0.0, 0.0, 1.0]]), 0.5).item() == pytest.approx(0.25)
    q_now = torch.full((2, N, A), 0.1)
    q_boot = torch.tensor([[0.3, 0.8, 0.5], [0.3, 0.8, 0.5]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.4, 9.0]])
    reward_mask = torch.tensor([[True, True, True], [True, True, False]])  # sample 1: episode ends after 2 steps
    # sample 0: 0.25 + 0.125 * 0.8 = 0.35
    # sample 1: truncated after n_eff = 2 (masked reward 9 ignored): 0.2 + 0.5*0.4 + 0.25 * 0.8 = 0.6
    y = bellman_targets(q_now, q_boot, BIN_MASK, rewards, 0.5, torch.tensor([0.125, 0.25]), reward_mask=reward_mask)
    torch.testing.assert_close(y[:, 2], torch.tensor([0.35, 0.6]), atol=1e-6, rtol=0)


def test_monte_carlo_bound_is_per_sample():
    q_now = torch.full((2, N, A), 0.1)  # inner targets 0.1
    q_boot = torch.full((2, A), 0.2)
    # last-dim target without bound: 0 + 0.9 * 0.2 = 0.18 for both
    y = bellman_targets(q_now, q_boot, BIN_MASK, torch.zeros(2, 1), 0.9, torch.tensor([0.9, 0.9]),
                        mc_return=torch.tensor([0.5, 0.05]))
    # sample 0: every target clipped up to 0.5; sample 1: bound below all targets, unchanged
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.1, 0.18]]), atol=1e-6, rtol=0)


def test_invalid_bins_are_masked_in_max():
    q_now = torch.full((1, N, A), 0.1)
    q_now[0, 2] = torch.tensor([0.3, 0.2, 0.99])  # bin 2 of dim 2 is padding: 0.99 must not win
    q_boot = torch.full((1, A), 0.0)
    mask = BIN_MASK.clone()
    mask[0] = torch.tensor([True, False, True])
    q_boot[0] = torch.tensor([0.1, 0.95, 0.4])  # bin 1 of dim 0 masked out: bootstrap max 0.4
    y = bellman_targets(q_now, q_boot, mask, torch.zeros(1, 1), 1.0, torch.tensor([1.0]))
    torch.testing.assert_close(y, torch.tensor([[0.1, 0.3, 0.4]]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- losses

def test_conservative_penalty_value():
    q = torch.zeros(1, 1, N, A)
    q[0, 0, 0] = torch.tensor([0.5, 0.2, 0.1])  # taken 1: others (0.25 + 0.01)/2 = 0.13
    q[0, 0, 1] = torch.tensor([0.3, 0.3, 0.6])  # taken 2: (0.09 + 0.09)/2 = 0.09
    q[0, 0, 2] = torch.tensor([0.4, 0.9, 0.7])  # taken 1, bin 2 invalid: only 0.16
    bins = torch.tensor([[1, 2, 1]])
    val = conservative_penalty(q, bins, BIN_MASK, min_reward=0.0)
    assert val.item() == pytest.approx((0.13 + 0.09 + 0.16) / 3, abs=1e-6)
    # toward a different minimum reward: dim 0 others (0.5-0.1)^2=0.16, 0 -> 0.08 ...
    val2 = conservative_penalty(q[:, :, :1], bins[:, :1], BIN_MASK[:1], min_reward=0.1)
    assert val2.item() == pytest.approx((0.16 + 0.0) / 2, abs=1e-6)


def test_td_losses():
    pred = torch.tensor([[[0.5, 0.2]]])  # (k=1, b=1, n=2)
    target = torch.tensor([[0.7, 0.2]])
    assert td_loss(pred, target, "mse").item() == pytest.approx((0.04 + 0.0) / 2, abs=1e-7)
    bce = -(0.7 * math.log(0.5) + 0.3 * math.log(0.5) + 0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / 2
    assert td_loss(pred, target, "bce").item() == pytest.approx(bce, abs=1e-5)


def test_hl_gauss_support_round_trip():
    s = support_for(51)
    y = torch.tensor([0.0, 0.3, 0.77, 1.0])
    p = s.target_probs(y)
    torch.testing.assert_close(p.sum(-1), torch.ones(4))
    # interior targets come back as the expectation of their histogram
    assert (p @ s.centers())[1:3].sub(y[1:3]).abs().max() < 1e-3
    # the loss is smallest for logits = log of the target histogram
    logits = torch.log(p[1:2] + 1e-9).requires_grad_()
    other = torch.log(s.target_probs(torch.tensor([0.6])) + 1e-9)
    assert s.loss(logits, y[1:2]) < s.loss(other, y[1:2])
    assert s.expectation(logits).item() == pytest.approx(0.3, abs=1e-3)


def test_bc_loss_masks_invalid_bins():
    logits = torch.zeros(1, 1, N, A)
    logits[0, 0, 2, 2] = 50.0  # invalid bin with a huge logit must not count
    bins = torch.tensor([[0, 1, 0]])
    loss, acc = bc_loss(logits, bins, BIN_MASK)
    # dims 0, 1: uniform over 3 -> log 3; dim 2: uniform over 2 valid -> log 2
    assert loss.item() == pytest.approx((2 * math.log(3) + math.log(2)) / 3, abs=1e-5)
    assert 0.0 <= acc.item() <= 1.0


# ------------------------------------------------------------------------- the learning step

def _batch(states, next_states, bins, rewards, disc, mc) -> TrainingBatch:
    return TrainingBatch(
        frames=frames_for(states),
        next_frames=frames_for(next_states),
        action_bins=torch.tensor(bins),
        rewards=torch.tensor(rewards),
        reward_mask=torch.ones(len(rewards), len(rewards[0]), dtype=torch.bool),
        discount_to_next=torch.tensor(disc),
        mc_return=torch.tensor(mc),
        instruction_index=torch.full((len(states),), -1),
    )


def test_learning_step_dual_critic_min_and_one_target_forward():
    online_table = make_table(k=2, fill=0.5)
    target_table = make_table(k=2, fill=0.1)
    # critic 0 says dim 1 (given a0 = 1) is worth up to 0.6, critic 1 up to 0.4: min per bin then max
    target_table[0, 0, 1, 1] = torch.tensor([0.6, 0.1, 0.1])
    target_table[1, 0, 1, 1] = torch.tensor([0.4, 0.3, 0.1])
    # bootstrap at next state 1, dim 0: critic 0 (0.7, 0.2, 0.3), critic 1 (0.5, 0.6, 0.3) -> min (0.5,0.2,0.3) -> 0.5
    target_table[0, 1, 0, 0] = torch.tensor([0.7, 0.2, 0.3])
    target_table[1, 1, 0, 0] = torch.tensor([0.5, 0.6, 0.3])
    online, target = TableQNet(online_table), TableQNet(target_table)
    cfg = LearnerConfig(discount=0.9, conservative_weight=0.0, cond_drop_prob=0.0)
    batch = _batch([0], [1], [[1, 0, 1]], [[0.0]], [0.9], [0.0])
    loss, metrics = learning_step(batch, online, target, None, cfg)
    # targets: dim 0 -> min(0.6,0.4)=0.4 vs min(0.1,0.3)=0.1 -> 0.4; dim 1 -> 0.1 (all 0.1);
    # dim 2 -> 0 + 0.9 * 0.5 = 0.45.  Online Q is 0.5 everywhere:
    # mse = mean over 2 critics x 3 dims of (0.5 - y)^2 = ((0.1)^2 + 0.4^2 + 0.05^2) / 3
    expected = (0.01 + 0.16 + 0.0025) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["q/mean_target"].item() == pytest.approx((0.4 + 0.1 + 0.45) / 3, abs=1e-5)
    assert target.calls == [2], "target network must run once on the concatenated (s_t, s_t+n) batch"
    loss.backward()
    assert online.logit_table.grad is not None and online.logit_table.grad.abs().sum() > 0


def test_learning_step_conservative_term_and_mc_bound():
    online_table = make_table(k=1, fill=0.5)
    target_table = make_table(k=1, fill=0.1)
    online, target = TableQNet(online_table), TableQNet(target_table)
    cfg = LearnerConfig(discount=0.9, conservative_weight=2.0, cond_drop_prob=0.0)
    batch = _batch([0], [1], [[0, 0, 0]], [[0.0]], [0.9], [0.3])
    loss, m = learning_step(batch, online, target, None, cfg)
    # targets before bound: 0.1, 0.1, 0.09 -> MC bound 0.3 lifts all to 0.3: td = (0.2)^2 = 0.04
    # conservative: every non-taken valid bin has Q 0.5 -> 0.25 per row; weight 2 -> 0.5
    assert m["losses/td_loss"].item() == pytest.approx(0.04, abs=1e-5)
    assert m["losses/conservative_loss"].item() == pytest.approx(0.25, abs=1e-5)
    assert loss.item() == pytest.approx(0.04 + 0.5, abs=1e-5)


def test_learning_step_bc_objective():
    net = TableQNet(make_table(k=1, fill=0.5))
    cfg = LearnerConfig(objective="bc", cond_drop_prob=0.0)
    loss, m = learning_step(_batch([0], [1], [[0, 1, 0]], [[0.0]], [0.9], [0.0]), net, None, None, cfg)
    # equal logits: (2 log 3 + log 2) / 3
    assert loss.item() == pytest.approx((2 * math.log(3) + math.log(2)) / 3, abs=1e-5)
    assert "bc/accuracy" in m


def test_learning_step_auxiliary_cloning_term_adds_weighted_cross_entropy():
    online, target = TableQNet(make_table(k=1, fill=0.5)), TableQNet(make_table(k=1, fill=0.1))
    batch = _batch([0], [1], [[0, 1, 0]], [[0.0]], [0.9], [0.3])
    plain, _ = learning_step(batch, online, target, None, LearnerConfig(discount=0.9, cond_drop_prob=0.0))
    cfg = LearnerConfig(discount=0.9, cond_drop_prob=0.0, bc_weight=0.5)
    loss, m = learning_step(batch, online, target, None, cfg)
    ce = (2 * math.log(3) + math.log(2)) / 3  # equal logits over the valid bins, as in the bc objective
    assert m["losses/bc_loss"].item() == pytest.approx(ce, abs=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 0.5 * ce, abs=1e-5)
    with pytest.raises(ValueError, match="bc_weight"):
        LearnerConfig(bc_weight=-1.0)


def test_target_updates():
    online = TableQNet(make_table(fill=0.5))
    target = make_target_network(online)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.logit_table.add_(1.0)
    before = target.logit_table.clone()
    update_target_network(online, target, 1, LearnerConfig(target_update="ema", target_ema_tau=0.25))
    torch.testing.assert_close(target.logit_table, before + 0.25)
    cfg = LearnerConfig(target_update="copy", target_copy_every=3)
    assert not update_target_network(online, target, 2, cfg)
    assert update_target_network(online, target, 3, cfg)
    torch.testing.assert_close(target.logit_table, online.logit_table)


def test_config_validation_names_key():
    with pytest.raises(ValueError, match="objective"):
        LearnerConfig(objective="sarsa")
    with pytest.raises(ValueError, match="target_ema_tau"):
        LearnerConfig(target_ema_tau=0.0)
