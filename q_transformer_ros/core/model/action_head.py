"""Autoregressive action head: one critic's decoder over action dims (encoder-decoder variant).

Input tokens ``[start, emb_0(bin_0), ..., emb_{N-2}(bin_{N-2})]``: position i carries the bins of
the dims before i, so output i is Q(s, a_<i, a_i) for every bin a_i of dim i (the Q-Transformer
per-dim factorization). Causal self-attention over the action tokens plus cross-attention to the
state tokens. Each dim has its own output weights because dims have different meanings and bin
counts (bins beyond a dim's count are invalid: ``bin_mask``).

einops legend: ``b`` batch, ``n`` action dims (positions), ``a`` action bins (A = max over dims),
``v`` value bins (HL-Gauss), ``r`` value-bin rank, ``d`` width, ``m`` state tokens.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

from .config import ModelConfig
from .layers import RMSNorm
from .transformer import DecoderLayer

ContextKV = list[tuple[Tensor, Tensor]]
SelfCache = list[tuple[Tensor, Tensor] | None]


class ActionHead(nn.Module):
    def __init__(self, cfg: ModelConfig, bin_mask: Tensor):
        super().__init__()
        n, a, d, v = cfg.num_action_dims, cfg.max_bins, cfg.embed_dim, cfg.value_bins
        self.num_dims, self.value_bins, self.dueling = n, v, cfg.dueling
        self.register_buffer("bin_mask", bin_mask.clone(), persistent=False)
        # float mask and 1 / (valid bins per dim) for the dueling mean, precomputed (not per decode step)
        self.register_buffer("bin_mask_f", bin_mask.float(), persistent=False)
        self.register_buffer("inv_bin_count", 1.0 / bin_mask.float().sum(-1, keepdim=True), persistent=False)
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        self.start_from_state = nn.Linear(d, d)
        # only dims 0..n-2 are ever fed back (the last dim's bin is never an input): sized n-1 so every
        # parameter gets a gradient (DDP without find_unused_parameters), absent in single-action mode
        self.bin_embed = nn.Parameter(torch.randn(n - 1, a, d) * 0.02) if n > 1 else None
        self.dim_pos = nn.Parameter(torch.randn(n, d) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.head_depth))
        self.norm_out = RMSNorm(d)
        if v == 1:
            self.out_w = nn.Parameter(torch.randn(n, a, d) * d**-0.5 * 0.1)
            self.out_b = nn.Parameter(torch.zeros(n, a))
        else:
            self.rank = cfg.dim_head
            self.to_value_feats = nn.Linear(d, v * self.rank)
            self.out_w = nn.Parameter(torch.randn(n, a, self.rank) * self.rank**-0.5)
            self.out_b = nn.Parameter(torch.zeros(n, a, v))
        if cfg.dueling:
            self.val_w = nn.Parameter(torch.randn(n, v, d) * d**-0.5 * 0.1)
            self.val_b = nn.Parameter(torch.zeros(n, v))

    # -- pieces shared by teacher forcing and stepping ------------------------------------------------
    def context(self, state: Tensor) -> ContextKV:
        """Cross-attention K/V of the state for every layer (once per decision)."""
        return [layer.context_kv(state) for layer in self.layers]

    def start_token(self, state: Tensor) -> Tensor:
        """state ``(b, m, d)`` -> ``(b, 1, d)``: learned start + a projection of the mean state token."""
        pooled = reduce(state, "b m d -> b 1 d", "mean")
        return self.start + self.start_from_state(pooled) + self.dim_pos[0]

    def bin_token(self, dim: int, bins: Tensor) -> Tensor:
        """bins ``(b,)`` of dim ``dim`` -> the input token ``(b, 1, d)`` of position ``dim + 1``."""
        return rearrange(self.bin_embed[dim][bins] + self.dim_pos[dim + 1], "b d -> b 1 d")

    def logits(self, hidden: Tensor, dims: slice) -> Tensor:
        """hidden ``(b, n, d)`` for action dims ``dims`` -> ``(b, n, a)`` or ``(b, n, a, v)``."""
        h = self.norm_out(hidden)
        w, b = self.out_w[dims], self.out_b[dims]
        if self.value_bins == 1:
            out = torch.einsum("bnd,nad->bna", h, w) + b
        else:
            feats = rearrange(self.to_value_feats(h), "b n (v r) -> b n v r", r=self.rank)
            out = torch.einsum("bnvr,nar->bnav", feats, w) + b
        if not self.dueling:
            return out
        value = torch.einsum("bnd,nvd->bnv", h, self.val_w[dims]) + self.val_b[dims]
        mask, inv_count = self.bin_mask_f[dims].to(out.dtype), self.inv_bin_count[dims].to(out.dtype)  # (n, a), (n, 1)
        if self.value_bins == 1:
            mean_adv = (out * mask).sum(-1, keepdim=True) * inv_count
            return value + out - mean_adv
        mask = rearrange(mask, "n a -> n a 1")
        mean_adv = (out * mask).sum(-2, keepdim=True) * rearrange(inv_count, "n 1 -> n 1 1")
        return rearrange(value, "b n v -> b n 1 v") + out - mean_adv

    # -- teacher forced ----------------------------------------------------------------------------
    def forward(self, state: Tensor, action_bins: Tensor) -> Tensor:
        """state ``(b, m, d)``, action_bins ``(b, n)`` -> logits ``(b, n, a[, v])``; output i sees bins < i."""
        n = self.num_dims
        tokens = [self.start_token(state)]
        if n > 1:
            prev = action_bins[:, : n - 1]
            emb = self.bin_embed[torch.arange(n - 1, device=state.device)[None, :], prev]  # (b, n-1, d)
            tokens.append(emb + self.dim_pos[1:n])
        x = torch.cat(tokens, dim=1)
        for layer, kv in zip(self.layers, self.context(state)):
            x = layer(x, kv)
        return self.logits(x, slice(0, n))

    # -- one step with caches -------------------------------------------------------------------------
    def step(self, token: Tensor, dim: int, ctx: ContextKV, cache: SelfCache) -> tuple[Tensor, SelfCache]:
        """token ``(b, 1, d)`` at position ``dim`` -> logits ``(b, a[, v])`` of that dim and the grown cache."""
        x, new_cache = token, []
        for layer, kv, c in zip(self.layers, ctx, cache):
            x, c = layer.step(x, kv, c)
            new_cache.append(c)
        return self.step_logits(x, dim), new_cache

    def step_logits(self, hidden: Tensor, dim: int) -> Tensor:
        """``logits(hidden, slice(dim, dim + 1))[:, 0]`` for one position ``(b, 1, d)`` -> ``(b, a[, v])``,
        with plain matmuls instead of einsums (same math; a decode step is dominated by per-op cost)."""
        h = self.norm_out(hidden)[:, 0]  # (b, d)
        if self.value_bins == 1:
            out = torch.nn.functional.linear(h, self.out_w[dim], self.out_b[dim])  # (b, a)
        else:
            feats = rearrange(self.to_value_feats(h), "b (v r) -> b v r", r=self.rank)
            out = (feats @ self.out_w[dim].t()).transpose(1, 2) + self.out_b[dim]  # (b, a, v)
        if not self.dueling:
            return out
        value = torch.nn.functional.linear(h, self.val_w[dim], self.val_b[dim])  # (b, v)
        mask, inv_count = self.bin_mask_f[dim].to(out.dtype), self.inv_bin_count[dim].to(out.dtype)  # (a,), (1,)
        if self.value_bins == 1:
            return value + out - (out * mask).sum(-1, keepdim=True) * inv_count
        mean_adv = (out * mask[:, None]).sum(-2, keepdim=True) * inv_count
        return value[:, None, :] + out - mean_adv
