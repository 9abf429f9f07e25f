"""Learning-rate schedule: linear warm-up then cosine decay to a floor.

Why a callable class (not a lambda): ``LambdaLR.state_dict`` stores the ``__dict__`` of callable
objects, so the schedule's parameters travel with the checkpoint and a resumed run continues on the
same curve.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps = {warmup_steps!r}: must be >= 0")
        if total_steps < 1:
            raise ValueError(f"total_steps = {total_steps!r}: must be >= 1")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio = {min_lr_ratio!r}: must be in [0, 1]")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> LambdaLR:
    """A LambdaLR following :class:`WarmupCosine`; call ``.step()`` once per optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
