"""Q-learning must beat cloning where the paper says it does: data whose failures are systematic, with
the reward only at the end of a long episode.

Each episode is 40 steps. The robot state shows a cue (+1 or -1) and the hand position x (starting at 0,
moved by 0.05 x the action each step). The operator moves toward the cue (right) or away
from it (wrong) throughout an episode, with noise; the episode succeeds at its end exactly when x ended
on the cue's side. The operator is wrong in 3 of 4 episodes, so cloning copies the wrong first move,
while the rewards say which first move pays off 40 steps later (there the value that tells the two
apart is gamma^39 ~ 0.45 at gamma 0.98).

Why this shape: in the Meta-World runs where QT lost to BC (benchmarks/README.md, "Learning"), QT went
wrong on early decisions (first quarter of expert episodes: the first dim 11 bins off the data; last
quarter 0.2 off), where that value is small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from q_transformer_ros.core.policy import QTransformerPolicy
from q_transformer_ros.core.trainer import config_from_args, train
from q_transformer_ros.observation import Observation
from q_transformer_ros.replay import EpisodeData, ReplayWriter
from q_transformer_ros.replay.testing import tiny_contract

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_YAML = Path(__file__).resolve().parents[2] / "config" / "train_tiny.yaml"
LENGTH = 40
STEP = 0.05
BLANK = np.zeros((3, 16, 16), np.uint8)


def make_data(path: Path, episodes: int = 48, seed: int = 0) -> None:
    c = tiny_contract(size=16, num_dims=1, bins=4, frame_history=1, state_dim=2, discount=0.98)
    rng = np.random.default_rng(seed)
    eps = []
    for i in range(episodes):
        cue = 1.0 if i % 2 else -1.0
        right = (i // 2) % 4 == 0  # the operator is right in 1 of 4 episodes, for both cues alike
        move = 0.75 * cue if right else -0.75 * cue
        actions = np.clip(move + rng.normal(0.0, 0.1, size=(LENGTH, 1)), -0.99, 0.99).astype(np.float32)
        x = np.concatenate([[0.0], np.cumsum(STEP * actions[:-1, 0])])  # x before each step's action
        success = bool(np.sign(x[-1] + STEP * actions[-1, 0]) == cue)
        state = np.stack([np.full(LENGTH, cue), x], axis=1).astype(np.float32)
        eps.append(EpisodeData(frames={"cam0": np.repeat(BLANK[None], LENGTH, axis=0)}, actions=actions,
                               success=success, terminal=True, state=state, source_id=f"e{i}"))
    with ReplayWriter(path, c) as w:
        w.add_episodes(eps)


def first_bins(checkpoint: Path) -> dict[float, int]:
    """The greedy bin at the first step (x = 0), for each cue."""
    policy = QTransformerPolicy.from_checkpoint(checkpoint, device="cpu")
    out = {}
    for cue in (1.0, -1.0):
        policy.reset(None)
        policy.push(Observation({"cam0": BLANK}, np.array([cue, 0.0], np.float32)))
        out[cue] = int(policy.decide().bins[0])
    return out


def run(tmp_path: Path, objective: str) -> dict[float, int]:
    result = train(config_from_args([
        "--config", str(TINY_YAML), "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / objective),
        "--objective", objective, "--steps", "800", "--batch-size", "64", "--no-progress", "--no-tensorboard",
        "--device", "cpu", "--set", "model_overrides.depth=[1]", "--set", "model_overrides.window_size=4",
        "--set", "lr=0.003"]))
    return first_bins(result.checkpoint)


def test_q_learning_takes_the_rewarded_first_move_where_cloning_copies_the_mistake(tmp_path) -> None:
    make_data(tmp_path / "ds")
    toward_cue = {1.0: 3, -1.0: 0}  # bins of +0.75 and -0.75 with 4 bins over [-1, 1]
    away = {1.0: 0, -1.0: 3}
    assert run(tmp_path, "bc") == away  # the setting: cloning copies the majority's wrong move
    assert run(tmp_path, "q_learning") == toward_cue
