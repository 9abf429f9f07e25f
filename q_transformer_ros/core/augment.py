"""Random-shift image augmentation (DrQ, Kostrikov et al. 2020) for training batches.

Why: with tens of recorded episodes the image encoder memorises pixels; shifting each image by a few
pixels (edges replicated) makes the Q-function see the same state under small camera jitter, which is
DrQ's regularisation for learning from pixels. One shift per sample and camera, the same for all frames
of its history (the history keeps its motion); the next observation gets its own shift. Uses torch's
global RNG, which the trainer checkpoints, so a resumed run stays exact.

einops legend: ``b`` batch, ``c`` cameras, ``f`` frames, ``ch`` channels, ``h``/``w`` image size.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def random_shift(frames: Tensor, pad: int) -> Tensor:
    """Shift every (sample, camera) image stack by up to ``pad`` pixels in x and y, edges replicated.

    frames: (b, c, f, ch, h, w), any dtype; ``pad`` 0 returns the input unchanged."""
    if pad <= 0:
        return frames
    b, c, _, _, h, w = frames.shape
    dev = frames.device
    dy = torch.randint(-pad, pad + 1, (b, c, 1), device=dev)
    dx = torch.randint(-pad, pad + 1, (b, c, 1), device=dev)
    rows = (torch.arange(h, device=dev) + dy).clamp_(0, h - 1)  # (b, c, h): replicate the edge rows
    cols = (torch.arange(w, device=dev) + dx).clamp_(0, w - 1)  # (b, c, w)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    out = frames[bi, ci, :, :, rows[:, :, :, None], cols[:, :, None, :]]  # (b, c, h, w, f, ch)
    return rearrange(out, "b c h w f ch -> b c f ch h w").contiguous()
