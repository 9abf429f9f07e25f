"""Encode each distinct frame once: exact de-duplication of the images a batch sends to the encoder.

Why: the images of one batch repeat. The learner's target pass encodes s_t and s_{t+n} together, and
with a frame history F > n the two share F - n frames per sample (small benchmark config F = 2, n = 1:
4 images per sample, 3 distinct; README config F = 6: 12 images, 7 distinct); a history padded at an
episode start repeats its first frame. The encoder treats images independently (FiLM on the sample's
conditioning only; eval-mode norms), so an image encoded under the same conditioning gives the same
tokens wherever it appears. Matching is exact (bytes of the uint8 image and of the conditioning row),
never approximate: a false match is impossible, a missed one only costs time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor


class UniqueFrames(NamedTuple):
    images: Tensor
    """The distinct images ``(u, 3, h, w)``, in order of first appearance."""
    text: Tensor | None
    """Their conditioning rows ``(u, t)`` (or None)."""
    mask: Tensor | None
    """Their instruction masks ``(u,)`` (or None)."""
    inverse: Tensor
    """``(n,)`` long: image i of the input is distinct image ``inverse[i]``."""


def _row_ids(rows: Tensor) -> Tensor:
    """``(n, m)`` -> ``(n,)`` long: equal rows get equal ids (exact comparison)."""
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def unique_frames(images: Tensor, text: Tensor | None, mask: Tensor | None) -> UniqueFrames | None:
    """The distinct (image, conditioning) pairs of ``images`` ``(n, 3, h, w)`` uint8 with per-image
    ``text`` ``(n, t)`` and ``mask`` ``(n,)``; None when every pair is distinct (or images are not uint8)."""
    n = images.shape[0]
    if n < 2 or images.dtype != torch.uint8:
        return None
    cond = [c.reshape(n, -1).float() for c in (text, mask) if c is not None]
    cond_id = _row_ids(torch.cat(cond, dim=1)) if cond else torch.zeros(n, dtype=torch.long, device=images.device)
    cond_bytes = torch.stack([(cond_id >> s) & 0xFF for s in (0, 8, 16, 24)], dim=1).to(torch.uint8)
    keys = torch.cat([rearrange(images, "n ch h w -> n (ch h w)"), cond_bytes], dim=1)
    inverse = _row_ids(keys)
    u = int(inverse.max()) + 1
    if u == n:
        return None
    first = torch.full((u,), n, dtype=torch.long, device=images.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=images.device), reduce="amin")
    # renumber by first appearance so the distinct images keep the batch's order
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(u, device=images.device)
    first = first[order]
    return UniqueFrames(images[first], None if text is None else text[first], None if mask is None else mask[first],
                        rank[inverse])
