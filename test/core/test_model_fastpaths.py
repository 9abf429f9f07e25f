"""The CPU fast paths of core/model compute the same numbers as the plain formulations they replace."""

from __future__ import annotations

import torch
from torch import nn

from q_transformer_ros.core.model.layers import Attention, ChanRMSNorm, RMSNorm
from q_transformer_ros.core.model.maxvit import apply_rotary, apply_rotary_fast, axial_rotary_angles, pair_rotation


def test_rmsnorm_matches_torch_and_keeps_state_dict_keys() -> None:
    torch.manual_seed(0)
    for affine in (True, False):
        ours, ref = RMSNorm(24, elementwise_affine=affine), nn.RMSNorm(24, elementwise_affine=affine)
        if affine:
            nn.init.uniform_(ref.weight, 0.5, 1.5)
        ours.load_state_dict(ref.state_dict())
        assert list(ours.state_dict()) == list(ref.state_dict())
        x = torch.randn(3, 7, 24) * 5
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
        xg = x.clone().requires_grad_(True)
        ours(xg).square().sum().backward()
        xr = x.clone().requires_grad_(True)
        ref(xr).square().sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_chan_rmsnorm_inplace_path_equals_graph_path() -> None:
    torch.manual_seed(1)
    norm = ChanRMSNorm(6)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(2, 6, 5, 5)
    expected = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + norm.eps) * norm.weight
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x), expected)  # grad path (weight requires grad)


def test_fast_rotary_equals_pairwise_rotary() -> None:
    torch.manual_seed(2)
    window, dh = 4, 16
    angles = axial_rotary_angles(window, dh)
    t = torch.randn(3, 2, window * window, dh)
    slow = apply_rotary(t, angles.cos(), angles.sin())
    fast = apply_rotary_fast(t, angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1), pair_rotation(dh))
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)


def test_fused_qkv_equals_separate_projections_and_tracks_weight_updates() -> None:
    torch.manual_seed(3)
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(2, 5, 16)

    def separate() -> tuple[torch.Tensor, ...]:
        return (attn.queries(x), *attn.keys_values(x))

    with torch.no_grad():
        for a, b in zip(attn.self_qkv(x), separate()):
            torch.testing.assert_close(a, b)
        attn.to_kv.weight.mul_(2.0)  # an in-place update (EMA / optimizer) must invalidate the cached fused weight
        for a, b in zip(attn.self_qkv(x), separate()):
            torch.testing.assert_close(a, b)
    q, k, v = attn.self_qkv(x)  # with grad: gradients reach both original weights
    (q.sum() + k.sum() + v.sum()).backward()
    assert attn.to_q.weight.grad is not None and attn.to_kv.weight.grad is not None


def test_chunked_cpu_inference_encode_equals_one_batch() -> None:
    from q_transformer_ros.core.model import ModelConfig, QTransformerNet

    torch.manual_seed(4)
    net = QTransformerNet(ModelConfig.preset("tiny", text_dim=8, frame_history=3)).eval()
    h, w = net.cfg.image_size
    frames = torch.randint(0, 256, (2, net.cfg.num_cameras, 3, 3, h, w), dtype=torch.uint8)
    text = torch.randn(2, 8)
    mask = torch.tensor([True, False])
    whole = net.encode(frames, text, mask)  # grad enabled: one batch
    net.ENCODE_CHUNK_PIXELS = 2 * h * w  # instance override: 2 images per chunk
    with torch.no_grad():
        assert net._encode_chunk(frames.flatten(0, 2)) == 2
        chunked = net.encode(frames, text, mask)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
