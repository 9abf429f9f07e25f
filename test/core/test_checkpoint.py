"""Checkpoint files: atomic writes, weights_only loading, validation errors, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from q_transformer_ros.core.checkpoint import (
    CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from q_transformer_ros.replay.testing import tiny_contract


def payload(contract=None, bins=None):
    contract = contract or tiny_contract(num_dims=3, bins=8)
    return {
        "contract": contract.to_dict(),
        "model_config": {"action_bins": list(bins or contract.action_bins)},
        "text_encoder": {"model_name": "ViT-B-32", "pretrained": None},
        "objective": "q_learning",
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "target_model": {"w": torch.zeros(2, 3)},
        "step": 7,
        "rng": rng_state(),
        "instruction_embeddings": {"texts": ["a"], "embeddings": torch.ones(1, 4)},
    }


def test_round_trip_is_weights_only_and_atomic(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", payload())
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no temp file left
    data = load_checkpoint(path)
    assert data["step"] == 7 and data["kind"] == "q_transformer_ros/checkpoint" and data["format_version"] == 1
    torch.testing.assert_close(data["model"]["w"], torch.arange(6.0).reshape(2, 3))
    # the same file also loads with plain torch.load(weights_only=True): no pickled code inside
    torch.load(path, weights_only=True)
    # a folder resolves to its checkpoint.pt
    assert load_checkpoint(path.parent)["step"] == 7


def test_overwrite_keeps_old_file_until_the_new_one_is_complete(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", payload())

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {**payload(), "step": 8})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_our_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a q_transformer_ros checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({**payload(), "kind": "q_transformer_ros/checkpoint", "format_version": 1, "x": Evil()}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "e.pt")


def test_contract_and_num_actions_mismatch(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", payload())
    with pytest.raises(CheckpointError, match="action dims differ"):
        load_checkpoint(path, expected_contract=tiny_contract(num_dims=2, bins=8))
    with pytest.raises(CheckpointError, match="num_actions"):
        load_checkpoint(path, expected_contract=tiny_contract(num_dims=3, bins=16))
    with pytest.raises(CheckpointError, match="cameras differ"):
        load_checkpoint(path, expected_contract=tiny_contract(num_dims=3, bins=8, size=64))
    load_checkpoint(path, expected_contract=tiny_contract(num_dims=3, bins=8))
    bad = save_checkpoint(tmp_path / "b.pt", payload(bins=[8, 8, 4]))
    with pytest.raises(CheckpointError, match="disagree"):
        load_checkpoint(bad)


def test_missing_keys(tmp_path):
    p = payload()
    del p["model"]
    with pytest.raises(CheckpointError, match="model"):
        load_checkpoint(save_checkpoint(tmp_path / "c.pt", p))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = save_checkpoint(tmp_path / "c.pt", {**payload(), "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_untrained_checkpoint_serves_cached_instructions_without_text_model(tmp_path) -> None:
    """save_untrained_checkpoint: loads as a policy whose cached instructions need no text model."""
    from q_transformer_ros.core.checkpoint import load_checkpoint, save_untrained_checkpoint
    from q_transformer_ros.core.policy import QTransformerPolicy
    from q_transformer_ros.core.text_encoder import TextEncoderConfig

    contract = tiny_contract()
    path = save_untrained_checkpoint(tmp_path / "u.pt", contract, text_dim=16, instructions=["pick", "place"],
                                     text_encoder={"text_overrides": {"embed_dim": 16}})
    data = load_checkpoint(path)
    assert data["contract"] == contract.to_dict() and data["step"] == 0
    assert tuple(data["instruction_embeddings"]["embeddings"].shape) == (2, 16)
    policy = QTransformerPolicy.from_checkpoint(path, device="cpu")
    policy.reset("place")
    cam = contract.cameras[0]
    policy.push_frames({cam.name: np.zeros((3, cam.height, cam.width), np.uint8)})
    decision = policy.decide()
    assert decision.bins.shape == (contract.num_action_dims,) and 0.0 <= decision.value <= 1.0
    assert isinstance(policy._text_encoder, TextEncoderConfig), "the text model was built for a cached instruction"
