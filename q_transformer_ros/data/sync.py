"""The one pairing rule: which observation and which command make up each control step.

Bag and live steps follow the same rule, seen from the two sides of a closed loop (the converter reads
it here; the policy node keeps it by acting this way, with ``DecisionClock``):

1. **Decision moments.** The contract's *step camera* (its first camera) paces the loop: each of its
   frames is a decision moment ``D_k``, thinned to the control rate by ``DecisionClock`` when the
   camera runs faster: with ``n = round(P / P_cam)`` camera frames per control period ``P`` (``P_cam``
   the camera's measured period), a frame counts when at least ``P - P/(2n)`` has passed since the
   previous decision frame: every frame of a camera at the control rate (even with +-40 % jitter
   between two frames), every third of a 30 Hz camera at 10 Hz.
2. **Observation of step k** = the step camera's frame at ``D_k`` plus every other camera's newest
   frame at or before ``D_k`` (never a later one), and each state input's newest value at or before
   ``D_k`` (``values_at``; the node keeps the newest value per input and takes them at ``D_k``). A
   frame or state value older than ``max_frame_age_s`` makes the step stale; a non-finite state value
   makes it unusable (the converter drops it, the node stops).
3. **Action of step k** = the command issued in response to that observation. A closed loop answers a
   frame after a response latency ``L`` (inference, a human's reaction), so the command of step k
   arrives around ``D_k + L``, possibly after the next frame when ``L`` is long, or before the frame's
   own receive time when timing jitters. ``L`` is estimated per episode as the circular mean of the
   command times' phase after their decision frames (robust to per-message jitter); the response
   window of step k is then ``(D_k + L - P/2, D_{k+1} + L - P/2]``: a period wide, centred on the
   expected answer. ``absolute`` dims take the command in force at the window's end (the last one in
   the window; when none arrived in it, the previous command still holds). ``delta`` dims take the
   change of the source field between the step's observation and the next one,
   ``value(D_{k+1}) - value(D_k)``: the node adds the decided delta to the latest value it has at ``D_k``.
4. **Commands faster than the control rate** (a teleoperator's joystick at 50 Hz: more than 1.5
   commands per step): no response latency can be read from them, so ``L = P/2`` and the window is
   ``(D_k, D_{k+1}]``: the last command before the next observation counts, i.e. the command in force
   when the next frame shows its effect (earlier ones in the window were overridden before it).
5. **Episode end.** A decision is a step only if its answer is in the episode: some command arrived
   after its response window opened and before the episode's end (the success message, a marker, the
   end of the bag). The frame that shows the outcome, answered by nothing, is the final observation,
   not a step. Contracts with only ``delta`` dims need the next observation inside the episode.

Exactness: with the step camera at the control rate this recovers the pairing for any latency from 1 %
to 90 % of the period and per-message jitter up to +-20 % (the combined jitter of a frame and its
command stays under half a period). Times are bag receive times in nanoseconds (header stamps may come
from other clocks). Axis legend: k steps, n messages.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np

NS = 1_000_000_000
COMMANDS_PER_STEP_TELEOP = 1.5
"""More commands than this per control step: a stream faster than the control rate (teleoperation)."""
CLOCK_INTERVALS = 16
"""Step-camera intervals the DecisionClock keeps to measure the camera's period (median)."""


def latest_at_or_before(times_ns: np.ndarray, query_ns: np.ndarray) -> np.ndarray:
    """Index of the last ``times`` entry ``<= query`` for each query (-1 where there is none)."""
    return np.searchsorted(times_ns, query_ns, side="right").astype(np.int64) - 1


class DecisionClock:
    """Which frames of the step camera are decision moments (rule 1); live in the node, offline in the converter.

    Fed the step camera's frame times in order; ``offer`` says whether a frame is a decision moment.
    The camera period is the median of the last ``CLOCK_INTERVALS`` intervals, rounded to a whole
    number of frames per step, so a camera at the control rate decides on every frame even with
    jittered intervals, and a faster one is thinned to the frames closest to one period apart.
    """

    def __init__(self, period_ns: int) -> None:
        if period_ns <= 0:
            raise ValueError(f"control period must be > 0 ns, got {period_ns}")
        self.period_ns = int(period_ns)
        self._intervals: deque[int] = deque(maxlen=CLOCK_INTERVALS)
        self._previous_frame_ns: int | None = None
        self._last_decision_ns: int | None = None

    def reset(self) -> None:
        """Forget the last decision (a new episode, or resuming after a stop); keep the camera period."""
        self._last_decision_ns = None

    @property
    def camera_period_ns(self) -> int:
        """Measured period of the step camera (the control period until two frames were seen)."""
        return int(np.median(self._intervals)) if self._intervals else self.period_ns

    def offer(self, frame_ns: int) -> bool:
        """A step-camera frame arrived at ``frame_ns``: is it a decision moment?"""
        frame_ns = int(frame_ns)
        if self._previous_frame_ns is not None and frame_ns > self._previous_frame_ns:
            self._intervals.append(frame_ns - self._previous_frame_ns)
        self._previous_frame_ns = frame_ns
        frames_per_step = max(1, round(self.period_ns / max(self.camera_period_ns, 1)))
        threshold = self.period_ns - self.period_ns // (2 * frames_per_step)
        if self._last_decision_ns is None or frame_ns - self._last_decision_ns >= threshold:
            self._last_decision_ns = frame_ns
            return True
        return False


def decision_moments(step_frames_ns: np.ndarray, period_ns: int) -> np.ndarray:
    """The decision moments (rule 1) among a run of step-camera frame times."""
    clock = DecisionClock(period_ns)
    frames = np.asarray(step_frames_ns, dtype=np.int64)
    return frames[np.array([clock.offer(t) for t in frames], dtype=bool)] if len(frames) else frames


def command_events(commands_ns: np.ndarray, period_ns: int) -> np.ndarray:
    """One time per command: messages within a quarter period of the previous kept one (an arm twist
    and a gripper command published back to back) are one command."""
    c = np.sort(np.asarray(commands_ns, dtype=np.int64))
    keep = np.zeros(len(c), dtype=bool)
    last = None
    for i, t in enumerate(c):
        if last is None or t - last >= period_ns // 4:
            keep[i], last = True, t
    return c[keep]


def response_latency_ns(decisions_ns: np.ndarray, commands_ns: np.ndarray, period_ns: int) -> int:
    """The typical delay from a decision frame to the command answering it (rules 3 and 4), in [0, P).

    Circular mean of each command's phase after its newest decision frame, modulo the period: a command
    that jitters past the next frame (long latency) or before its own frame (short latency) still
    lands near the right phase. Commands faster than the control rate, or none at all, give ``P/2``.
    """
    d = np.asarray(decisions_ns, dtype=np.int64)
    c = np.asarray(commands_ns, dtype=np.int64)
    if len(d) == 0 or len(c) == 0:
        return period_ns // 2
    c = command_events(c, period_ns)
    inside = c[(c > d[0]) & (c <= d[-1] + period_ns)]
    if len(inside) == 0 or len(inside) > COMMANDS_PER_STEP_TELEOP * len(d):
        return period_ns // 2
    newest = d[latest_at_or_before(d, inside)]
    phase = 2 * np.pi * ((inside - newest) % period_ns) / period_ns
    mean = math.atan2(float(np.sin(phase).mean()), float(np.cos(phase).mean()))
    return int(round((mean % (2 * np.pi)) / (2 * np.pi) * period_ns)) % period_ns


class StepPlan(NamedTuple):
    """The steps of one episode span under the pairing rule (arrays of length k, int64 ns)."""

    decision_ns: np.ndarray
    """D_k: observation moments (step-camera frame times)."""
    window_end_ns: np.ndarray
    """End of each step's response window: ``absolute`` dims take the command in force here."""
    next_decision_ns: np.ndarray
    """D_{k+1} (the nominal ``D_k + P`` for the last step): ``delta`` dims end here."""
    latency_ns: int
    """The response latency L used for this span."""
    breaks: np.ndarray
    """bool (k,) the step camera fell silent for longer than the frame-age limit after step k: the
    episode is cut there (the model never saw such a gap)."""
    cut: int
    """Decision moments left out at the end (rule 5): their answer is not in the recording."""


def plan_steps(step_frames_ns: np.ndarray, commands_ns: np.ndarray, period_ns: int, end_ns: int,
               max_gap_ns: int | None = None) -> StepPlan:
    """Apply the pairing rule to one episode span.

    ``step_frames_ns``: the step camera's frame times inside the span; ``commands_ns``: times of the
    command messages of the ``absolute`` dims (all source topics merged; empty when every dim is
    ``delta``); ``end_ns``: the span's end; ``max_gap_ns``: a longer silence of the step camera
    between two decisions cuts the episode (the step before it ends one period after its decision).
    """
    d = decision_moments(step_frames_ns, period_ns)
    commands = np.asarray(commands_ns, dtype=np.int64)
    commands = commands[commands <= end_ns]
    latency = response_latency_ns(d, commands, period_ns)
    nxt = np.append(d[1:], d[-1] + period_ns) if len(d) else d
    breaks = np.zeros(len(d), dtype=bool)
    if max_gap_ns is not None and len(d):
        breaks[:-1] = np.diff(d) > max_gap_ns
        nxt = np.where(breaks, d + period_ns, nxt)
    window_end = nxt + latency - period_ns // 2
    if len(commands_ns):
        keep = d + latency - period_ns // 2 < (commands[-1] if len(commands) else np.iinfo(np.int64).min)
    else:
        keep = nxt <= end_ns
    n = int(np.count_nonzero(np.cumprod(keep)))  # steps stop at the first one without an answer
    return StepPlan(d[:n], window_end[:n], nxt[:n], latency, breaks[:n], len(d) - n)


@dataclass
class DimStream:
    """All values of one field in a bag over time, time-sorted: an action dim's source, a state input."""

    times_ns: np.ndarray
    """int64 (n,) receive times"""
    values: np.ndarray
    """float64 (n,); NaN and inf are kept (a step that samples one must not be stored or commanded)"""


@dataclass
class StepActions:
    """Actions of one dim for the steps of a plan."""

    values: np.ndarray
    """float64 (k,); NaN where no command is known."""
    valid: np.ndarray
    """bool (k,)"""
    age_ns: np.ndarray
    """int64 (k,) age of the command used at the window end (absolute) or of the value at D_k (delta)."""
    held: np.ndarray
    """bool (k,) absolute dims: no new command arrived in the step's response window (the previous one held)."""


def actions_for_steps(stream: DimStream, plan: StepPlan, mode: str, period_ns: int) -> StepActions:
    """One dim's action for every step of ``plan`` (rule 3; see the module docstring)."""
    if mode not in ("absolute", "delta"):
        raise ValueError(f"action mode must be 'absolute' or 'delta', got {mode!r}")
    k = len(plan.decision_ns)
    if len(stream.times_ns) == 0:
        return StepActions(np.full(k, np.nan), np.zeros(k, bool), np.full(k, -1, np.int64), np.zeros(k, bool))
    if mode == "absolute":
        at = latest_at_or_before(stream.times_ns, plan.window_end_ns)
        ok = at >= 0
        idx = np.clip(at, 0, None)
        values = np.where(ok, stream.values[idx], np.nan)
        age = np.where(ok, plan.window_end_ns - stream.times_ns[idx], -1).astype(np.int64)
        window_start = plan.decision_ns + plan.latency_ns - period_ns // 2
        held = ok & (stream.times_ns[idx] <= window_start)
        return StepActions(values.astype(np.float64), ok, age, held)
    at_obs = latest_at_or_before(stream.times_ns, plan.decision_ns)
    at_next = latest_at_or_before(stream.times_ns, plan.next_decision_ns)
    ok = (at_obs >= 0) & (at_next >= 0)
    i0, i1 = np.clip(at_obs, 0, None), np.clip(at_next, 0, None)
    values = np.where(ok, stream.values[i1] - stream.values[i0], np.nan)
    age = np.where(at_obs >= 0, plan.decision_ns - stream.times_ns[i0], -1).astype(np.int64)
    return StepActions(values.astype(np.float64), ok, age, np.zeros(k, bool))


class Sampled(NamedTuple):
    """A stream sampled at decision moments (rule 2), arrays of length k."""

    values: np.ndarray
    """float64 (k,): the newest value at or before each moment; NaN where there is none yet."""
    times_ns: np.ndarray
    """int64 (k,): receive time of the value used; -1 where there is none yet."""

    def age_ns(self, moments_ns: np.ndarray) -> np.ndarray:
        """int64 (k,) age of the value used at each moment; -1 where there is none."""
        return np.where(self.times_ns >= 0, np.asarray(moments_ns, np.int64) - self.times_ns, -1)


def values_at(stream: DimStream, moments_ns: np.ndarray) -> Sampled:
    """Rule 2 for a state input: the newest value at or before each decision moment, never a later one
    (the same rule ``LatestFrameSelector`` applies to the other cameras' frames)."""
    moments = np.asarray(moments_ns, dtype=np.int64)
    if not len(stream.times_ns):
        return Sampled(np.full(len(moments), np.nan), np.full(len(moments), -1, np.int64))
    at = latest_at_or_before(stream.times_ns, moments)
    ok = at >= 0
    idx = np.clip(at, 0, None)
    return Sampled(np.where(ok, stream.values[idx], np.nan).astype(np.float64),
                   np.where(ok, stream.times_ns[idx], -1).astype(np.int64))


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

    def percentile(self, q: float) -> float | None:
        """The q-th percentile in seconds; None without data (JSON has no NaN)."""
        return float(np.percentile(self.ages_s, q)) if self.ages_s else None
