"""Small building blocks shared by the MaxViT, the history transformer and the action head.

einops legend: ``b`` batch, ``n`` sequence (queries), ``m`` keys/values, ``h`` heads, ``d`` width,
``c`` channels, ``x y`` window grid, ``w1 w2`` positions inside a window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state-dict keys) with a cheaper CPU forward.

    Why: on CPU, torch's fused ``rms_norm`` costs ~60 us even on a 32-wide token and 3-4x more than
    this on MaxViT-sized inputs; ``vector_norm`` + one ``addcmul`` + ``rsqrt`` computes the same
    ``x / sqrt(mean(x^2) + eps)`` (up to float rounding) in fewer, faster kernels. Other devices keep
    the fused kernel. In an ONNX export it is written as ``x / sqrt(mean(x^2) + eps) * weight``, the pattern
    onnxruntime fuses into one SimplifiedLayerNormalization kernel (8 nodes -> 1 per norm)."""

    def forward(self, x: Tensor) -> Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if torch.onnx.is_in_onnx_export():
            out = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return out * self.weight if self.weight is not None else out
        if x.device.type != "cpu":
            return super().forward(x)
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        scale = torch.addcmul(n.new_full((), eps), n, n, value=1.0 / x.shape[-1]).rsqrt_()
        out = x * scale
        return out * self.weight if self.weight is not None else out


class ChanRMSNorm(nn.Module):
    """RMS norm over the channel axis of ``(b, c, h, w)`` maps: no batch statistics, so batch 1 at the
    robot and DDP training behave the same."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = x * torch.rsqrt((x * x).mean(dim=1, keepdim=True) + self.eps)
        if torch.compiler.is_compiling():  # the compiler fuses the multiply; no dtype probing in its graph
            return out * self.weight
        # in place when no graph is recorded: saves allocating another full feature map (same values)
        needs_graph = torch.is_grad_enabled() and (out.requires_grad or self.weight.requires_grad)
        if needs_graph or out.dtype != torch.result_type(out, self.weight):  # e.g. bf16 maps, fp32 weight
            return out * self.weight
        return out.mul_(self.weight)


def chan_norm(channels: int, use_batchnorm: bool) -> nn.Module:
    """The 2-D norm of MBConv: BatchNorm2d (the seed's) or the batch-free channel RMSNorm."""
    return nn.BatchNorm2d(channels) if use_batchnorm else ChanRMSNorm(channels)


class FiLM(nn.Module):
    """Feature-wise linear modulation ``x * (1 + gamma(cond)) + beta(cond)``.

    Zero-initialized so that an untrained conditioner leaves the features unchanged (the image
    encoder starts as a plain MaxViT and learns how much the instruction should steer it)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.to_gamma_beta = nn.Linear(cond_dim, channels * 2)
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, x: Tensor, cond: Tensor, channel_first: bool = False) -> Tensor:
        """x ``(b, c, h, w)`` when ``channel_first`` else ``(b, ..., c)``; cond ``(b, cond_dim)``."""
        gamma, beta = self.to_gamma_beta(cond).chunk(2, dim=-1)
        if channel_first:
            gamma, beta = (rearrange(t, "b c -> b c 1 1") for t in (gamma, beta))
        else:
            shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
            gamma, beta = gamma.reshape(shape), beta.reshape(shape)
        return torch.addcmul(beta, x, 1 + gamma)  # x * (1 + gamma) + beta in one pass over x


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same module, no parameters) with a faster CPU training path.

    Why: on CPU, torch's dropout draws one Mersenne-Twister number per element (``bernoulli_``), which was
    13 % of a small-config training step (38 calls, 4 ms each). Here one 64-bit draw gives four 16-bit
    uniforms, so the keep mask costs far less (1M elements, 1 thread, forward + backward: 26.7 -> ~12 ms). The drop
    probability is rounded to a multiple of 1/65536 (0.1 -> 0.100006); kept values are scaled by
    1/(1 - that probability), so the expectation is preserved exactly. Other devices, eval mode and
    p = 0 use ``nn.Dropout`` unchanged. Seeded by ``torch.manual_seed`` like any CPU draw."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        threshold = round(self.p * 65536)
        if threshold >= 65536:
            return torch.zeros_like(x)
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        uniform16 = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        keep = uniform16 >= threshold - 32768  # P(keep) = 1 - threshold / 65536
        return x * keep.to(x.dtype).mul_(65536 / (65536 - threshold))  # one float mask: backward is one mul too


class FeedForward(nn.Module):
    """Pre-norm MLP; the norm is applied by the caller (so it can be FiLM-modulated)."""

    def __init__(self, dim: int, mult: float = 4.0, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(nn.Linear(dim, inner), nn.GELU(), Dropout(dropout), nn.Linear(inner, dim), Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head attention over SDPA (fused kernels on GPU), for self- and cross-attention.

    Inputs are already normalized by the caller. ``kv_cache`` support: ``attend`` takes precomputed
    ``k, v`` so the action head can keep the cross-attention K/V of the state for a whole decision
    and append self-attention K/V one action token at a time."""

    def __init__(self, dim: int, heads: int, dim_head: int, dim_context: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_context or dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def split(self, t: Tensor) -> Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def queries(self, x: Tensor) -> Tensor:
        """x ``(b, n, dim)`` -> q ``(b, h, n, d)``."""
        return self.split(self.to_q(x))

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """context ``(b, m, dim_context)`` -> k, v ``(b, h, m, d)``."""
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def fused_qkv_weight(self) -> Tensor:
        """``cat(to_q.weight, to_kv.weight)`` for self-attention: one matmul instead of two. Under
        no-grad the concatenation is cached and rebuilt when either weight changes (optimizer step,
        EMA, load_state_dict bump the tensors' versions); with grad it is rebuilt (autograd splits it),
        and under torch.compile too (a concatenation of parameters is one cheap kernel of the graph)."""
        wq, wkv = self.to_q.weight, self.to_kv.weight
        # with grad, or inside torch.compile (a Python-side cache keyed on tensor versions would be a
        # guard that fails on every call): concatenate each time
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (wq.requires_grad or wkv.requires_grad)):
            return torch.cat((wq, wkv), dim=0)
        key = (wq.data_ptr(), wq._version, wkv.data_ptr(), wkv._version, wq.dtype, wq.device)
        cached = getattr(self, "_qkv_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.cat((wq, wkv), dim=0))
            self._qkv_cache = cached
        return cached[1]

    def self_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention x ``(b, n, dim)`` -> q, k, v ``(b, h, n, d)`` with one fused projection
        (requires ``dim_context`` == ``dim``)."""
        qkv = F.linear(x, self.fused_qkv_weight())
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """q ``(b, h, n, d)``, k/v ``(b, h, m, d)``, mask ``(n, m)`` or ``(b, 1, n, m)`` bool (True = may
        attend) -> ``(b, n, dim)``."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        if context is None:
            q, k, v = self.self_qkv(x)
            return self.attend(q, k, v, mask=mask, causal=causal)
        k, v = self.keys_values(context)
        return self.attend(self.queries(x), k, v, mask=mask, causal=causal)
