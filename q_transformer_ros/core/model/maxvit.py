"""MaxViT image encoder (Tu et al. 2022) with FiLM language conditioning in every block.

Each block: FiLM(instruction) -> MBConv -> block (local window) attention -> FF -> grid (dilated,
global) attention -> FF. Window attention uses a 2-D axial rotary embedding so SDPA's fused
kernels stay usable (no additive bias). The first block of every stage halves the resolution.

einops legend: ``b`` images, ``c`` channels, ``h w`` feature-map rows/cols, ``x y`` number of
windows along rows/cols, ``w1 w2`` positions inside a window, ``d`` head width.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .config import ModelConfig
from .layers import Attention, FeedForward, FiLM, RMSNorm, chan_norm


def axial_rotary_angles(window: int, dim_head: int) -> Tensor:
    """Rotation angles ``(w1*w2, dim_head/2)``: the first half of the rotated pairs encodes the row,
    the second half the column of each position in a window."""
    quarter = dim_head // 4
    inv_freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    pos = torch.arange(window, dtype=torch.float32)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    ang_r = rows.flatten()[:, None] * inv_freq[None, :]
    ang_c = cols.flatten()[:, None] * inv_freq[None, :]
    return torch.cat((ang_r, ang_c), dim=-1)


def pair_rotation(dim_head: int) -> Tensor:
    """``(d, d)`` signed permutation R with ``(t @ R)[2i] = -t[2i+1]``, ``(t @ R)[2i+1] = t[2i]``: the
    "rotate each pair by 90 degrees" of the rotary embedding as one matmul (entries 0/±1, exact)."""
    r = torch.zeros(dim_head, dim_head)
    idx = torch.arange(0, dim_head, 2)
    r[idx + 1, idx] = -1.0
    r[idx, idx + 1] = 1.0
    return r


def apply_rotary_fast(t: Tensor, cos_full: Tensor, sin_full: Tensor, rot: Tensor) -> Tensor:
    """Same as ``apply_rotary`` with the angles repeated per pair (``(n, d)``) and ``rot`` from
    ``pair_rotation``: 4 kernels instead of ~10 (the per-op cost dominates on CPU windows)."""
    return torch.addcmul(t * cos_full, t @ rot, sin_full)


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of the last axis of ``t`` ``(..., n, d)`` by angles ``(n, d/2)``."""
    pairs = rearrange(t, "... (d two) -> ... d two", two=2)
    x1, x2 = pairs.unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rearrange(out, "... d two -> ... (d two)")


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, shrinkage: float):
        super().__init__()
        hidden = max(1, int(channels * shrinkage))
        self.gate = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate(x.mean(dim=(2, 3)))
        return x * rearrange(g, "b c -> b c 1 1")


class MBConv(nn.Module):
    """Inverted-bottleneck depthwise conv; residual when the shape is kept."""

    def __init__(self, dim_in: int, dim_out: int, downsample: bool, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mbconv_expansion_rate * dim_out)
        bn = cfg.use_batchnorm
        self.net = nn.Sequential(
            nn.Conv2d(dim_in, hidden, 1), chan_norm(hidden, bn), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2 if downsample else 1, padding=1, groups=hidden), chan_norm(hidden, bn), nn.GELU(),
            SqueezeExcite(hidden, cfg.mbconv_shrinkage_rate),
            nn.Conv2d(hidden, dim_out, 1), chan_norm(dim_out, bn),
        )
        self.residual = dim_in == dim_out and not downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out + x if self.residual else out


class WindowAttentionFF(nn.Module):
    """Pre-norm attention + FF over windows of tokens ``(b x y, w1 w2, c)``."""

    def __init__(self, dim: int, heads: int, cfg: ModelConfig):
        super().__init__()
        self.norm_attn = RMSNorm(dim)
        self.attn = Attention(dim, heads, cfg.dim_head, dropout=cfg.dropout)
        self.norm_ff = RMSNorm(dim)
        self.ff = FeedForward(dim, cfg.ff_mult, cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, rot: Tensor) -> Tensor:
        """cos/sin ``(w1 w2, d)`` (angles repeated per pair), rot from ``pair_rotation``."""
        q, k, v = self.attn.self_qkv(self.norm_attn(x))
        x = x + self.attn.attend(apply_rotary_fast(q, cos, sin, rot), apply_rotary_fast(k, cos, sin, rot), v)
        return x + self.ff(self.norm_ff(x))


class MaxViTBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, downsample: bool, cond_dim: int, heads: int, cfg: ModelConfig):
        super().__init__()
        self.window = cfg.window_size
        self.film = FiLM(cond_dim, dim_in)
        self.mbconv = MBConv(dim_in, dim_out, downsample, cfg)
        self.block_attn = WindowAttentionFF(dim_out, heads, cfg)
        self.grid_attn = WindowAttentionFF(dim_out, heads, cfg)

    def forward(self, x: Tensor, cond: Tensor, cos: Tensor, sin: Tensor, rot: Tensor) -> Tensor:
        w = self.window
        x = self.mbconv(self.film(x, cond, channel_first=True))
        hh, ww = x.shape[-2] // w, x.shape[-1] // w
        # block attention: contiguous w x w windows (local)
        t = rearrange(x, "b c (x w1) (y w2) -> (b x y) (w1 w2) c", w1=w, w2=w)
        t = self.block_attn(t, cos, sin, rot)
        x = rearrange(t, "(b x y) (w1 w2) c -> b c (x w1) (y w2)", x=hh, y=ww, w1=w)
        # grid attention: w x w positions strided over the whole map (global, dilated)
        t = rearrange(x, "b c (w1 x) (w2 y) -> (b x y) (w1 w2) c", w1=w, w2=w)
        t = self.grid_attn(t, cos, sin, rot)
        return rearrange(t, "(b x y) (w1 w2) c -> b c (w1 x) (w2 y)", x=hh, y=ww, w1=w)


class MaxViT(nn.Module):
    """Images ``(b, 3, H, W)`` (normalized floats) + condition ``(b, cond_dim)`` -> feature map
    ``(b, D, H/2^(S+1), W/2^(S+1))``."""

    def __init__(self, cfg: ModelConfig, cond_dim: int):
        super().__init__()
        stem = cfg.dim_conv_stem or cfg.dim
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(stem, stem, 3, padding=1))
        blocks = []
        dim_prev = stem
        for stage, (stage_dim, n) in enumerate(zip(cfg.stage_dims, cfg.depth)):
            for i in range(n):
                blocks.append(MaxViTBlock(dim_prev if i == 0 else stage_dim, stage_dim, i == 0, cond_dim, cfg.vit_heads(stage), cfg))
            dim_prev = stage_dim
        self.blocks = nn.ModuleList(blocks)
        angles = axial_rotary_angles(cfg.window_size, cfg.dim_head)
        # per-pair angles repeated to the full head width, for apply_rotary_fast
        self.register_buffer("rot_cos", angles.cos().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("rot_sin", angles.sin().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("rot_mat", pair_rotation(cfg.dim_head), persistent=False)

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        x = self.stem(images)
        cos, sin, rot = self.rot_cos.to(x.dtype), self.rot_sin.to(x.dtype), self.rot_mat.to(x.dtype)
        for block in self.blocks:
            x = block(x, cond, cos, sin, rot)
        return x
