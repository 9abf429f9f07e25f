"""The real tiny model learns the closed-form optimal Q of a small visual task.

Task (2 steps, 2 action dims x 2 bins, gamma = 0.9): the image is red or blue. At step 0 the top half
of the image is black ("start"), at step 1 the whole image shows the colour. The episode ends after
step 1 with reward 1 iff the step-1 action's bins are (0, 1) for red or (1, 0) for blue; step 0's
action does not matter. Data: random actions, written and read through the real replay dataset.

Closed-form optimal Q (Q of dim i = best achievable return given the bins of dims <= i):
    Q*(s1, a0 = right)            = 1,   Q*(s1, a0 = wrong)        = 0
    Q*(s1, a0 = right, a1 = right) = 1,  Q*(s1, a0 = right, a1 = wrong) = 0
    Q*(s0, any a0) = Q*(s0, any a0, any a1) = gamma * max Q*(s1, .) = 0.9
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from q_transformer_ros.replay import EpisodeData, ReplayWriter

from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.replay.testing import tiny_contract
from q_transformer_ros.core.learner import LearnerConfig, learning_step, make_target_network, update_target_network
from q_transformer_ros.core.model import ModelConfig, QTransformerNet

GAMMA = 0.9
SIZE = 16
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
RIGHT = {"red": (0, 1), "blue": (1, 0)}


def image(colour: str, start: bool) -> np.ndarray:
    img = np.empty((3, SIZE, SIZE), dtype=np.uint8)
    img[:] = np.array(COLOURS[colour], dtype=np.uint8)[:, None, None]
    if start:
        img[:, : SIZE // 2] = 0
    return img


def bins_to_action(bins) -> np.ndarray:
    # contract range [-1, 1] with 2 bins: bin 0 centre -0.5, bin 1 centre 0.5
    return np.array([-0.5 + b for b in bins], dtype=np.float32)


def write_task(path, contract, episodes: int, rng: np.random.Generator) -> None:
    eps = []
    for e in range(episodes):
        colour = "red" if e % 2 == 0 else "blue"
        bins = rng.integers(0, 2, size=(2, 2))
        reward = float(tuple(bins[1]) == RIGHT[colour])
        eps.append(EpisodeData(
            frames={"cam0": np.stack([image(colour, True), image(colour, False)])},
            actions=np.stack([bins_to_action(bins[0]), bins_to_action(bins[1])]),
            success=reward > 0, terminal=True, instruction=None, source_id=f"ep{e}",
            rewards=np.array([0.0, reward], dtype=np.float32),
        ))
    with ReplayWriter(path, contract) as w:
        w.add_episodes(eps)


def q_of(net: QTransformerNet, colour: str, start: bool, bins) -> torch.Tensor:
    frames = torch.from_numpy(image(colour, start))[None, None, None]  # (1, c, f, 3, h, w)
    with torch.no_grad():
        logits = net(frames, None, torch.zeros(1, dtype=torch.bool), torch.tensor([bins]))
    return net.q_values(logits).amin(0)[0]  # (n, a)


def train_task(tmp_path, steps: int, model_overrides: dict, learner_overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    contract = tiny_contract(size=SIZE, num_dims=2, bins=2, frame_history=1, discount=GAMMA)
    write_task(tmp_path / "ds", contract, episodes=64, rng=np.random.default_rng(seed))
    ds = ReplayDataset(tmp_path / "ds")
    assert len(ds) == 128  # 64 episodes x (step 0 with a next state + terminal step 1)
    cfg = ModelConfig.preset("tiny", contract, text_dim=8, **{
        "dim": 8, "depth": (1,), "dim_head": 4, "heads": 2, "tokens_per_frame": 2, "window_size": 4,
        "dropout": 0.0, **model_overrides})
    net = QTransformerNet(cfg)
    target = make_target_network(net)
    lcfg = LearnerConfig(**{"discount": GAMMA, "conservative_weight": 0.0, "cond_drop_prob": 0.0,
                            "target_update": "ema", "target_ema_tau": 0.2, **learner_overrides})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0, foreach=True)
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        batch = ds.get_batch(rng.integers(0, len(ds), size=32))
        loss, _ = learning_step(batch, net, target, None, lcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_target_network(net, target, step, lcfg)
    net.eval()
    return net


def check_closed_form(net, tol: float) -> None:
    for colour in ("red", "blue"):
        r0, r1 = RIGHT[colour]
        w0, w1 = 1 - r0, 1 - r1
        q_right = q_of(net, colour, False, (r0, r1))
        q_wrong_first = q_of(net, colour, False, (w0, r1))
        # dim 0 at s1: right first bin -> 1, wrong -> 0
        assert q_right[0, r0].item() == pytest.approx(1.0, abs=tol), colour
        assert q_right[0, w0].item() == pytest.approx(0.0, abs=tol), colour
        # dim 1 at s1 given the right first bin: right second bin -> 1, wrong -> 0
        assert q_right[1, r1].item() == pytest.approx(1.0, abs=tol), colour
        assert q_right[1, w1].item() == pytest.approx(0.0, abs=tol), colour
        # given a wrong first bin nothing can succeed
        assert q_wrong_first[1].max().item() == pytest.approx(0.0, abs=tol), colour
        # start state: every action is worth gamma * 1 (the reward comes one step later)
        q_start = q_of(net, colour, True, (w0, w1))
        assert torch.allclose(q_start, torch.full_like(q_start, GAMMA), atol=tol), (colour, q_start)


def test_tiny_model_learns_closed_form_q(tmp_path, one_thread):
    net = train_task(tmp_path, steps=150, model_overrides={}, learner_overrides={})
    check_closed_form(net, tol=0.1)


@pytest.mark.parametrize("model_overrides,learner_overrides", [
    ({"dual_critics": True}, {}),
    ({"value_bins": 21}, {"td_loss": "hl_gauss"}),
    ({}, {"td_loss": "bce"}),
    ({"dueling": True, "dual_critics": True, "value_bins": 11}, {"td_loss": "hl_gauss", "conservative_weight": 1.0}),
])
def test_real_model_variants_take_a_step(tmp_path, one_thread, model_overrides, learner_overrides):
    """Every head/loss variant runs through learning_step with the real network and moves the loss."""
    net = train_task(tmp_path, steps=3, model_overrides=model_overrides, learner_overrides=learner_overrides)
    q = q_of(net, "red", False, (0, 1))
    assert q.shape == (2, 2) and bool(((q >= 0) & (q <= 1)).all())


@pytest.mark.slow
@pytest.mark.parametrize("model_overrides,learner_overrides", [
    ({"dual_critics": True}, {}),
    ({"value_bins": 21}, {"td_loss": "hl_gauss"}),
])
def test_variants_learn_closed_form_q(tmp_path, one_thread, model_overrides, learner_overrides):
    net = train_task(tmp_path, steps=250, model_overrides=model_overrides, learner_overrides=learner_overrides)
    check_closed_form(net, tol=0.1)
