"""TokenLearner (Ryoo et al. 2021): summarize a feature map by K learned spatial soft-attention maps.

Why: the history transformer then sees K tokens per camera frame instead of every pixel, which
keeps the per-decision cost independent of the image size.

einops legend: ``b`` images, ``c`` channels, ``k`` learned tokens, ``s`` spatial positions (h w).
"""

from __future__ import annotations

from einops import rearrange
import torch
from torch import Tensor, nn

from .layers import ChanRMSNorm


class TokenLearner(nn.Module):
    """Feature map ``(b, c, h, w)`` -> tokens ``(b, k, c)``: each token is a softmax-weighted spatial
    average whose weights come from a small per-pixel MLP."""

    def __init__(self, dim: int, num_tokens: int, ff_mult: int = 2):
        super().__init__()
        self.norm = ChanRMSNorm(dim)
        self.to_maps = nn.Sequential(nn.Conv2d(dim, dim * ff_mult, 1), nn.GELU(), nn.Conv2d(dim * ff_mult, num_tokens, 1))

    def forward(self, x: Tensor) -> Tensor:
        maps = rearrange(self.to_maps(self.norm(x)), "b k h w -> b k (h w)").softmax(dim=-1)
        feats = rearrange(x, "b c h w -> b (h w) c")
        return torch.bmm(maps, feats)
