"""Still stretches in the data teach cloning to stand still; cutting them (``convert_bag
--keep-still-steps``, ``replay.still_steps``) removes that trap and leaves what the rewards say intact.

The task: move the hand (state x, from 0, +0.05 x action per step) to x >= 1 within 40 steps. In 1 of 4
episodes the operator moves right all the way (success after 25 steps); in the others they stop short
after 5-10 steps and stand still, command 0, until the episode's 40 steps are up (failure). So every
failed episode holds 30-35 copies of one (x, "stand still") pair at x in 0.2..0.4, a place the
successful episodes pass once. This is the shape of the demo's stop-short and wrong-target recordings,
where most drawer failures of both QT and BC stood still for their last 40 steps
(benchmarks/README.md, "Learning, session 7").

What this small task shows and what it does not: cloning stands still where the failed operators did,
and moves on once the stretches are cut; the Q-Transformer moves on in both cases here (its values for
one state input and one dim are easy to fit). In the Meta-World demo, from pixels with the tiny network,
the Q-Transformer stood still too; this test does not reproduce that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from q_transformer_ros.core.policy import QTransformerPolicy
from q_transformer_ros.core.trainer import config_from_args, train
from q_transformer_ros.observation import Observation
from q_transformer_ros.replay import EpisodeData, ReplayWriter
from q_transformer_ros.replay.still_steps import keep_still_steps, still_steps
from q_transformer_ros.replay.testing import tiny_contract

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_YAML = Path(__file__).resolve().parents[2] / "config" / "train_tiny.yaml"
LENGTH = 40
STEP = 0.05
MOVE, STILL = 4, 2
"""Bins of +0.8 and 0 with 5 bins over [-1, 1]."""
BLANK = np.zeros((3, 16, 16), np.uint8)
CONTRACT = tiny_contract(size=16, num_dims=1, bins=5, frame_history=1, state_dim=1, discount=0.98)


def make_data(path: Path, keep_still: int | None, episodes: int = 48) -> int:
    """Writes the episodes (cut with ``keep_still`` as the converter would); returns the steps written."""
    rng = np.random.default_rng(0)
    eps = []
    for i in range(episodes):
        expert = i % 4 == 0
        stop = LENGTH if expert else 5 + i % 6
        actions = np.where(np.arange(LENGTH) < stop, 0.8, 0.0)[:, None]
        actions = np.clip(actions + np.where(actions > 0, rng.normal(0.0, 0.03, actions.shape), 0.0), -1, 1)
        x = np.concatenate([[0.0], np.cumsum(STEP * actions[:, 0])])  # x before each step, and after the last
        done = np.flatnonzero(x[1:] >= 1.0)
        length = int(done[0]) + 1 if len(done) else LENGTH
        actions, state = actions[:length].astype(np.float32), x[:length, None].astype(np.float32)
        keep = slice(None) if keep_still is None else keep_still_steps(still_steps(actions, state, CONTRACT), keep_still)
        eps.append(EpisodeData(frames={"cam0": np.repeat(BLANK[None], length, axis=0)[keep]}, actions=actions[keep],
                               success=bool(len(done)), terminal=True, state=state[keep], source_id=f"e{i}"))
    with ReplayWriter(path, CONTRACT) as w:
        w.add_episodes(eps)
    return sum(len(e.actions) for e in eps)


def greedy_bins(checkpoint: Path, xs: list[float]) -> list[int]:
    policy = QTransformerPolicy.from_checkpoint(checkpoint, device="cpu")
    out = []
    for x in xs:
        policy.reset(None)
        policy.push(Observation({"cam0": BLANK}, np.array([x], np.float32)))
        out.append(int(policy.decide().bins[0]))
    return out


def run(tmp_path: Path, name: str, objective: str) -> list[int]:
    result = train(config_from_args([
        "--config", str(TINY_YAML), "--dataset", str(tmp_path / name), "--out", str(tmp_path / f"{name}_{objective}"),
        "--objective", objective, "--steps", "800", "--batch-size", "64", "--no-progress", "--no-tensorboard",
        "--device", "cpu", "--set", "model_overrides.depth=[1]", "--set", "model_overrides.window_size=4",
        "--set", "lr=0.003"]))
    return greedy_bins(result.checkpoint, [0.25, 0.3, 0.35, 0.4])  # where the failed operators stood still


def test_cutting_still_stretches_removes_the_cloning_trap_and_keeps_the_rewarded_move(tmp_path) -> None:
    every_step = make_data(tmp_path / "all", keep_still=None)
    cut = make_data(tmp_path / "cut", keep_still=2)
    assert cut < every_step * 0.5  # the still stretches were most of the data
    # every still step kept: cloning stands still where the failed operators did (the data's majority there)
    assert run(tmp_path, "all", "bc") == [STILL] * 4
    assert run(tmp_path, "all", "q_learning") == [MOVE] * 4
    # cut to 2 steps each: cloning moves on too, and the Q-Transformer still takes the rewarded move
    assert run(tmp_path, "cut", "bc") == [MOVE] * 4
    assert run(tmp_path, "cut", "q_learning") == [MOVE] * 4
