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


def test_unique_frames_is_exact_and_keeps_conditioning_apart() -> None:
    from q_transformer_ros.core.model.frame_dedup import unique_frames

    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=g) for _ in range(3))
    b_one_pixel_off = b.clone()
    b_one_pixel_off[2, 3, 3] ^= 1
    images = torch.stack([a, b, a, c, b, b_one_pixel_off, a])
    text = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [2.0]])  # the last 'a' has another instruction
    mask = torch.ones(7, dtype=torch.bool)
    d = unique_frames(images, text, mask)
    assert d is not None
    assert torch.equal(d.images[d.inverse], images) and torch.equal(d.text[d.inverse], text)
    assert d.images.shape[0] == 5  # a, b, c, b', a-with-text-2
    assert d.inverse.tolist() == [0, 1, 0, 2, 1, 3, 4]  # numbered by first appearance
    mask_differs = mask.clone()
    mask_differs[2] = False  # the same image without instruction is a different encoding
    assert unique_frames(images, text, mask_differs).images.shape[0] == 6
    assert unique_frames(torch.stack([a, b, c]), None, None) is None  # nothing repeats
    assert unique_frames(images.float(), text, mask) is None  # only uint8 frames are matched


def test_encode_shares_repeated_frames_without_changing_the_state() -> None:
    """The learner's target pass: s_t and s_{t+1} of the same samples share F - 1 frames."""
    from q_transformer_ros.core.learner import make_target_network
    from q_transformer_ros.core.model import ModelConfig, QTransformerNet

    torch.manual_seed(6)
    net = QTransformerNet(ModelConfig.preset("tiny", text_dim=8, frame_history=3)).eval()
    h, w = net.cfg.image_size
    seq = torch.randint(0, 256, (2, net.cfg.num_cameras, 4, 3, h, w), dtype=torch.uint8)  # 4 frames per sample
    frames = torch.cat([seq[:, :, :3], seq[:, :, 1:]])  # s_t and s_{t+1}: 12 images per camera, 8 distinct
    text, mask = torch.randn(2, 8).repeat(2, 1), torch.tensor([True, False, True, False])
    calls: list[int] = []
    encode_frames = net.encode_frames
    net.encode_frames = lambda images, *a: calls.append(images.shape[0]) or encode_frames(images, *a)
    with torch.no_grad():
        separate = net.encode(frames, text, mask)  # not asked to share: every image is encoded
        assert sum(calls) == 12 * net.cfg.num_cameras
        calls.clear()
        net.share_repeated_frames = True  # what learner.make_target_network sets on the target network
        shared = net.encode(frames, text, mask)
        assert sum(calls) == 8 * net.cfg.num_cameras
    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5)
    assert make_target_network(QTransformerNet(net.cfg)).share_repeated_frames
    net.train()
    calls.clear()
    net.encode(frames, text, mask)  # with a gradient every image is encoded
    assert sum(calls) == 12 * net.cfg.num_cameras


def test_fast_cpu_dropout_keeps_the_expectation_and_is_seeded() -> None:
    from q_transformer_ros.core.model.layers import Dropout

    drop = Dropout(0.1)
    x = torch.ones(400_000, requires_grad=True)
    torch.manual_seed(7)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # P(keep) = 1 - round(0.1 * 65536) / 65536
    assert abs(y.mean().item() - 1.0) < 0.005  # kept values scaled by 1 / P(keep): same expectation
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 65536 / (65536 - 6554)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask)/dx = mask, which is y for x = 1
    torch.manual_seed(7)
    assert torch.equal(drop(x), y)  # torch.manual_seed reproduces the mask
    drop.eval()
    assert torch.equal(drop(x), x)
    assert list(Dropout(0.1).state_dict()) == list(nn.Dropout(0.1).state_dict()) == []
