"""The two transformers: the block-causal history encoder and the action-head decoder layers.

einops legend: ``b`` batch, ``f`` frames (time), ``t`` tokens per time step (cameras x K),
``n`` queries, ``m`` keys, ``h`` heads, ``d`` width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import Attention, FeedForward, FiLM, RMSNorm


def block_causal_mask(frames: int, tokens_per_frame: int, device: torch.device | None = None) -> Tensor:
    """``(f*t, f*t)`` bool, True where query token (frame i) may see key token (frame j <= i).

    Tokens of one time step see each other (all cameras, all K tokens) and every earlier step, never
    a later one: the state at step t does not depend on what comes after it."""
    time = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame)
    return time[:, None] >= time[None, :]


def sincos_embedding(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal positions ``(length, dim)``."""
    half = dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1)))
    ang = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat((ang.sin(), ang.cos()), dim=-1)
    if emb.shape[-1] < dim:
        emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[-1]))
    return emb


class HistoryLayer(nn.Module):
    """Self-attention + FF, pre-norm, both norms FiLM-modulated by the instruction."""

    def __init__(self, cfg: ModelConfig, cond_dim: int):
        super().__init__()
        d = cfg.embed_dim
        self.norm_attn, self.film_attn = RMSNorm(d, elementwise_affine=False), FiLM(cond_dim, d)
        self.attn = Attention(d, cfg.heads, cfg.dim_head, dropout=cfg.dropout)
        self.norm_ff, self.film_ff = RMSNorm(d, elementwise_affine=False), FiLM(cond_dim, d)
        self.ff = FeedForward(d, cfg.ff_mult, cfg.dropout)

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.film_attn(self.norm_attn(x), cond), mask=mask)
        return x + self.ff(self.film_ff(self.norm_ff(x), cond))


class HistoryTransformer(nn.Module):
    """Tokens ``(b, f*t, d)`` -> ``(b, f*t, d)`` under the block-causal mask."""

    def __init__(self, cfg: ModelConfig, cond_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(HistoryLayer(cfg, cond_dim) for _ in range(cfg.transformer_depth))
        self.norm = RMSNorm(cfg.embed_dim)

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, cond, mask)
        return self.norm(x)


class DecoderLayer(nn.Module):
    """Causal self-attention over action tokens, cross-attention to the state, FF (all pre-norm).

    ``forward`` runs teacher-forced over the whole sequence; ``step`` runs one new token against a
    KV cache of the previous action tokens and the state's precomputed cross-attention K/V, and
    gives the same numbers (up to float rounding)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm_self = RMSNorm(d)
        self.self_attn = Attention(d, cfg.heads, cfg.dim_head, dropout=cfg.dropout)
        self.norm_cross = RMSNorm(d)
        self.norm_context = RMSNorm(d)
        self.cross_attn = Attention(d, cfg.heads, cfg.dim_head, dropout=cfg.dropout)
        self.norm_ff = RMSNorm(d)
        self.ff = FeedForward(d, cfg.ff_mult, cfg.dropout)

    def context_kv(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """state ``(b, m, d)`` -> cross-attention k, v ``(b, h, m, dh)`` (computed once per decision)."""
        return self.cross_attn.keys_values(self.norm_context(state))

    def forward(self, x: Tensor, ctx_kv: tuple[Tensor, Tensor]) -> Tensor:
        """x ``(b, n, d)`` teacher-forced, causal."""
        x = x + self.self_attn(self.norm_self(x), causal=True)
        x = x + self.cross_attn.attend(self.cross_attn.queries(self.norm_cross(x)), *ctx_kv)
        return x + self.ff(self.norm_ff(x))

    def step(self, x: Tensor, ctx_kv: tuple[Tensor, Tensor], cache: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x ``(b, 1, d)``: one new action token; cache k, v ``(b, h, n_prev, dh)`` or None.
        Returns the new token's output and the cache with its k, v appended."""
        q, k, v = self.self_attn.self_qkv(self.norm_self(x))
        if cache is not None:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        x = x + self.self_attn.attend(q, k, v)
        x = x + self.cross_attn.attend(self.cross_attn.queries(self.norm_cross(x)), *ctx_kv)
        return x + self.ff(self.norm_ff(x)), (k, v)
