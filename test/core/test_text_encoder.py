"""InstructionEncoder: random-init text tower (no network), per-string caching, reproducible key,
clear errors for missing weights."""

from __future__ import annotations

import pytest
import torch

from q_transformer_ros.core.text_encoder import InstructionEncoder, TextEncoderConfig

TINY = {"width": 64, "layers": 1, "heads": 2, "embed_dim": 32}


@pytest.fixture(scope="module")
def encoder() -> InstructionEncoder:
    return InstructionEncoder(TextEncoderConfig(text_overrides=TINY))


def test_embed_shapes_and_cache(encoder: InstructionEncoder, monkeypatch) -> None:
    assert encoder.dim == 32
    calls: list[list[str]] = []
    real = encoder._encode
    monkeypatch.setattr(encoder, "_encode", lambda texts: calls.append(list(texts)) or real(texts))
    out = encoder.embed(["pick the cube", "open the drawer", "pick the cube"])
    assert out.shape == (3, 32) and out.dtype == torch.float32
    assert torch.equal(out[0], out[2]) and not torch.allclose(out[0], out[1])
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    again = encoder.embed(["open the drawer", "pick the cube"])
    assert torch.equal(again[0], out[1])
    assert calls == [["open the drawer", "pick the cube"]]  # each unique string encoded once
    assert encoder.embed([]).shape == (0, 32)
    with pytest.raises(TypeError, match="list of strings"):
        encoder.embed("pick the cube")


def test_seeded_random_init_is_reproducible(encoder: InstructionEncoder) -> None:
    twin = InstructionEncoder(TextEncoderConfig(text_overrides=TINY))
    other_seed = InstructionEncoder(TextEncoderConfig(text_overrides=TINY, seed=1))
    assert twin.key == encoder.key and "ViT-B-32" in encoder.key and "random-seed0" in encoder.key
    assert other_seed.key != encoder.key
    text = ["stack the blocks"]
    assert torch.allclose(twin.embed(text), encoder.embed(text))
    assert not torch.allclose(other_seed.embed(text), encoder.embed(text))


def test_missing_weights_and_bad_config_errors(tmp_path) -> None:
    missing = tmp_path / "clip_weights.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        InstructionEncoder(TextEncoderConfig(pretrained=str(missing)))
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        InstructionEncoder(TextEncoderConfig(pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="not an open_clip tag"):
        InstructionEncoder(TextEncoderConfig(pretrained="no_such_tag", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="model_name"):
        InstructionEncoder(TextEncoderConfig(model_name="NoSuchModel"))
    with pytest.raises(ValueError, match="text_overrides"):
        TextEncoderConfig(pretrained="openai", text_overrides=TINY)
    cfg = TextEncoderConfig(text_overrides=TINY, seed=3)
    assert TextEncoderConfig.from_dict(cfg.to_dict()) == cfg

