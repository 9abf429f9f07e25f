"""HL-Gauss: regress a scalar by classifying it over value bins (Imani & White 2018; Farebrother et
al. 2024, "Stop regressing").

Why: a cross-entropy loss over a histogram of the target, smoothed by a Gaussian, trains value
networks more stably than MSE on a sigmoid. The target scalar y becomes the probability mass a
Gaussian N(y, sigma^2) puts on each bin of a fixed support [v_min, v_max]; the prediction is the
softmax over V logits and its scalar value is the expectation over bin centres.

einops legend: ``... `` any leading axes, ``v`` value bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class HLGaussSupport:
    """The fixed value support: ``num_bins`` equal bins over ``[v_min, v_max]``."""

    num_bins: int
    """Number of value bins V (> 1)."""
    v_min: float = 0.0
    """Lower edge of the support (the minimum reward: Q lives in [0, 1])."""
    v_max: float = 1.0
    """Upper edge of the support."""
    sigma_ratio: float = 0.75
    """Gaussian std as a fraction of the bin width (0.75 is the value recommended by Farebrother et al.)."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_bins, int) or self.num_bins < 2:
            raise ValueError(f"HLGaussSupport.num_bins = {self.num_bins!r}: must be an integer >= 2")
        if not self.v_min < self.v_max:
            raise ValueError(f"HLGaussSupport.v_min/v_max = {(self.v_min, self.v_max)!r}: need v_min < v_max")
        if not self.sigma_ratio > 0:
            raise ValueError(f"HLGaussSupport.sigma_ratio = {self.sigma_ratio!r}: must be > 0")

    @property
    def bin_width(self) -> float:
        return (self.v_max - self.v_min) / self.num_bins

    @property
    def sigma(self) -> float:
        return self.sigma_ratio * self.bin_width

    def edges(self, device: torch.device | None = None) -> Tensor:
        """Bin edges ``(V+1,)``."""
        return torch.linspace(self.v_min, self.v_max, self.num_bins + 1, device=device)

    def centers(self, device: torch.device | None = None) -> Tensor:
        """Bin centres ``(V,)``: the values the expectation is taken over."""
        e = self.edges(device)
        return (e[:-1] + e[1:]) / 2

    def target_probs(self, target: Tensor) -> Tensor:
        """Scalar targets ``(...)`` -> histogram ``(..., V)`` summing to 1.

        The Gaussian's mass outside the support is renormalized away (targets are clamped into the
        support first, so a target at the edge still gives a proper distribution)."""
        target = target.float().clamp(self.v_min, self.v_max)
        edges = self.edges(target.device)
        cdf = torch.special.ndtr((edges - target.unsqueeze(-1)) / self.sigma)  # (..., V+1)
        mass = cdf[..., 1:] - cdf[..., :-1]
        return mass / (cdf[..., -1:] - cdf[..., :1]).clamp_min(1e-12)

    def expectation(self, logits: Tensor) -> Tensor:
        """Logits ``(..., V)`` -> scalar value ``(...)`` = E over the softmax of the bin centres."""
        probs = logits.float().softmax(dim=-1)
        return probs @ self.centers(logits.device)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy between softmax(logits) ``(..., V)`` and the HL-Gauss histogram of ``target`` ``(...)``;
        returns per-element losses ``(...)`` (no reduction)."""
        probs = self.target_probs(target)
        return -(probs * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def support_for(num_bins: int, v_min: float = 0.0, v_max: float = 1.0, sigma_ratio: float = 0.75) -> HLGaussSupport:
    """The support used for a model with ``num_bins`` value bins (one place, so model and learner agree)."""
    return HLGaussSupport(num_bins=num_bins, v_min=v_min, v_max=v_max, sigma_ratio=sigma_ratio)

