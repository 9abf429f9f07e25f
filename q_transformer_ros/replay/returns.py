"""Returns: Monte-Carlo return-to-go per step and the n-step bookkeeping of a sample.

Why here and not in the learner: both are facts about the data (where an episode ends, whether it
ended in a terminal or a time-limit cut), so they are computed once from the episode layout and handed
to the learner as plain numbers (``n_eff``, ``discount_to_next``, ``mc_return``).

Conventions (also in docs/dataset_format.md): an episode of length L has steps 0..L-1; step t holds
the observation o_t, the action a_t taken there and the reward r_t received for it. A *terminal*
episode ends with a terminal transition out of step L-1 (no next state). A *truncated* episode was
cut: o_{L-1} is the last observation we have, and its own transition has no next observation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def discounted_returns(rewards: np.ndarray, discount: float) -> np.ndarray:
    """Return-to-go ``G_t = r_t + discount * G_{t+1}`` within one episode, float32 (T,).

    Accumulated in float64 and backwards, so long episodes do not drift.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D (T,), got shape {r.shape}")
    out = np.empty_like(r)
    acc = 0.0
    for t in range(r.shape[0] - 1, -1, -1):
        acc = r[t] + discount * acc
        out[t] = acc
    return out.astype(np.float32)


class NStep(NamedTuple):
    """n-step bookkeeping of samples (all arrays have the samples' shape)."""

    n_eff: np.ndarray
    """int64: number of rewards summed (1..n)."""
    next_offset: np.ndarray
    """int64: step inside the episode whose frame window is the next state (clamped to the last step)."""
    discount_to_next: np.ndarray
    """float32: ``discount ** n_eff``, or 0 when the episode terminated within the window."""
    terminal: np.ndarray
    """bool: the window reaches the episode's terminal transition."""


def n_step_layout(t: np.ndarray, length: np.ndarray, terminal: np.ndarray, n: int, discount: float) -> NStep:
    """Vectorised n-step layout for steps ``t`` of episodes with ``length`` and ``terminal`` flags.

    Terminal episode: the window runs to ``min(t + n, L)``; reaching L means the terminal transition is
    inside, so there is no bootstrap (discount 0). Truncated episode: the window runs to
    ``min(t + n, L - 1)`` and always bootstraps from the last available observation.
    """
    if n < 1:
        raise ValueError(f"n_step must be >= 1, got {n}")
    t = np.asarray(t, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    terminal = np.asarray(terminal, dtype=bool)
    end = np.where(terminal, length, length - 1)
    if np.any(t >= end):
        bad = int(np.flatnonzero(np.broadcast_to(t >= end, t.shape))[0])
        raise ValueError(f"step {int(t.flat[bad])} of an episode of length {int(np.broadcast_to(length, t.shape).flat[bad])} is not a sample")
    n_eff = np.minimum(t + n, end) - t
    hit_terminal = terminal & (t + n_eff >= length)
    next_offset = np.minimum(t + n_eff, length - 1)
    disc = np.where(hit_terminal, 0.0, np.power(float(discount), n_eff)).astype(np.float32)
    return NStep(n_eff=n_eff, next_offset=next_offset, discount_to_next=disc, terminal=hit_terminal)


def n_step_rewards(rewards: np.ndarray, first: np.ndarray, n_eff: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather reward windows ``rewards[first : first + n_eff]`` zero-padded to ``n``.

    Returns ``(rewards (B, n) float32, mask (B, n) bool)``; ``first`` indexes the flat reward array.
    """
    first = np.asarray(first, dtype=np.int64)
    k = np.arange(n, dtype=np.int64)
    mask = k[None, :] < np.asarray(n_eff)[:, None]
    idx = np.where(mask, first[:, None] + k[None, :], first[:, None])
    out = np.where(mask, np.asarray(rewards)[idx], 0.0).astype(np.float32)
    return out, mask
