"""Step clock and synchronisation: which frame and which action belong to each control step.

Rules (the node acts the same way live, so training data matches deployment):
- Steps tick at the contract's control rate from the episode start: ``t_k = t0 + k / rate``.
- Each camera contributes its latest frame at or before ``t_k`` (never a future frame). Its age
  ``t_k - t_frame`` over ``max_frame_age_s`` makes the step stale: it is dropped and reported,
  never filled in.
- The action of step k is what the robot was commanded over ``[t_k, e_k]`` with ``e_k = t_{k+1}``
  (clipped to the episode end): ``absolute`` = the source field's latest value at or before ``e_k``
  (the command in force at the end of the step); ``delta`` = value at ``e_k`` minus value at ``t_k``.

Times are bag receive times in nanoseconds (header stamps may come from other clocks).
Axis legend: k steps, n messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

NS = 1_000_000_000


def step_times(t0_ns: int, end_ns: int, period_ns: int, include_partial: bool = False) -> np.ndarray:
    """Step start times ``t_k = t0 + k * period`` (int64 ns) for steps that fit in ``[t0, end]``.

    A step fits when it ends by ``end`` (1 ms tolerance for jitter); with ``include_partial`` also the
    step in progress at ``end`` (an episode ended by a success message counts the step it happened in).
    """
    if end_ns < t0_ns or period_ns <= 0:
        return np.zeros(0, dtype=np.int64)
    tol = 1_000_000
    n_full = (end_ns + tol - t0_ns) // period_ns
    n = int(n_full)
    if include_partial and t0_ns + n * period_ns < end_ns:
        n += 1
    return t0_ns + np.arange(n, dtype=np.int64) * period_ns


def latest_at_or_before(times_ns: np.ndarray, query_ns: np.ndarray) -> np.ndarray:
    """Index of the last ``times`` entry ``<= query`` for each query (-1 where there is none)."""
    return np.searchsorted(times_ns, query_ns, side="right").astype(np.int64) - 1


@dataclass
class DimStream:
    """All values of one action dim's source field in a bag, time-sorted."""

    times_ns: np.ndarray
    """int64 (n,)"""
    values: np.ndarray
    """float64 (n,)"""


@dataclass
class StepActions:
    """Actions of one dim for a run of steps."""

    values: np.ndarray
    """float64 (k,); NaN where no command is known."""
    valid: np.ndarray
    """bool (k,)"""
    age_ns: np.ndarray
    """int64 (k,) age of the command used at the step end (absolute) or at the step start (delta)."""


def actions_for_steps(stream: DimStream, starts_ns: np.ndarray, ends_ns: np.ndarray, mode: str) -> StepActions:
    """The commanded value of one dim over each step ``[start, end]`` (see module docstring)."""
    if mode not in ("absolute", "delta"):
        raise ValueError(f"action mode must be 'absolute' or 'delta', got {mode!r}")
    if len(stream.times_ns) == 0:
        k = len(starts_ns)
        return StepActions(np.full(k, np.nan), np.zeros(k, bool), np.full(k, -1, np.int64))
    at_end = latest_at_or_before(stream.times_ns, ends_ns)
    ok = at_end >= 0
    end_idx = np.clip(at_end, 0, None)
    values = np.where(ok, stream.values[end_idx], np.nan)
    age = np.where(ok, ends_ns - stream.times_ns[end_idx], -1).astype(np.int64)
    if mode == "delta":
        at_start = latest_at_or_before(stream.times_ns, starts_ns)
        ok &= at_start >= 0
        values = np.where(ok, values - stream.values[np.clip(at_start, 0, None)], np.nan)
    return StepActions(values.astype(np.float64), ok, age)


class LatestFrameSelector:
    """Streams one camera's messages (time order) and hands each step its latest frame at or before it.

    Why streaming: a bag's image data can be far larger than memory; only the latest message is held,
    and a message is decoded only when some step selects it (once, even if several steps use it).
    """

    def __init__(self, steps_ns: np.ndarray):
        self.steps_ns = np.asarray(steps_ns, dtype=np.int64)
        self.next_step = 0
        self.latest: tuple[int, Any] | None = None

    def push(self, time_ns: int, item: Any) -> Iterator[tuple[int, int, Any]]:
        """Feed a message; yields ``(step_index, frame_time_ns, item)`` for steps now decided."""
        while self.next_step < len(self.steps_ns) and self.steps_ns[self.next_step] < time_ns:
            if self.latest is not None:
                yield self.next_step, self.latest[0], self.latest[1]
            self.next_step += 1
        self.latest = (time_ns, item)

    def finish(self) -> Iterator[tuple[int, int, Any]]:
        """After the last message: the remaining steps all get the last frame."""
        while self.next_step < len(self.steps_ns):
            if self.latest is not None:
                yield self.next_step, self.latest[0], self.latest[1]
            self.next_step += 1

    @property
    def done(self) -> bool:
        return self.next_step >= len(self.steps_ns)


def valid_runs(valid: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[start, stop)`` of True in a bool array."""
    v = np.concatenate([[False], np.asarray(valid, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(v.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


@dataclass
class AgeStats:
    """Frame ages of the steps written, for the report."""

    ages_s: list[float] = field(default_factory=list)

    def add(self, ages_ns: np.ndarray) -> None:
        self.ages_s.extend((np.asarray(ages_ns, dtype=np.float64) / NS).tolist())

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.ages_s, q)) if self.ages_s else float("nan")
