"""When did a message arrive, in sim time? The recorder's log times under ``use_sim_time``.

Why not the node clock at callback time: a sim that skips idle time (``sim_node`` with
``publish_clock``) moves ``/clock`` forward by most of a control period as soon as the command of a
step arrives. A recorder whose executor is a few milliseconds behind then takes that command from its
queue *after* the jump and would log it a period late, next to the following frame: exactly the
mispairing the converter exists to avoid. The middleware stamps every message when it is received
(``MessageInfo.received_timestamp``, system clock), before it waits in any queue. ``ReceptionTime``
maps that wall time into sim time through the ``/clock`` samples, which are stamped on reception the
same way: the sim time of the newest sample received before the message plus the wall time since
(sim time runs at wall speed between samples). A message is released only once a sample received
after it has been seen, so every jump before it is known however late the callbacks run.

Plain Python (no rclpy): ``test/ros/test_reception_time.py`` drives it with made-up times.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from typing import Any, Iterator

KEEP_SAMPLES_NS = 5_000_000_000
"""Clock samples kept (wall time): far more than any executor lag a recorder survives."""
MAX_WAIT_NS = 1_000_000_000
"""A message with no later clock sample after this long (the sim paused or stopped) is released
with the newest sample: its time is then extrapolated at wall speed."""


class ReceptionTime:
    """Sim-time log times for messages stamped with their wall reception time."""

    def __init__(self) -> None:
        self._walls: list[int] = []
        self._sims: list[int] = []
        self._pending: list[tuple[int, int, Any]] = []  # heap: (reception time, arrival count, item)
        self._count = itertools.count()

    @property
    def has_clock(self) -> bool:
        return bool(self._walls)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def sim_time(self, wall_ns: int) -> int | None:
        """Sim time at wall reception time ``wall_ns``; None before the first clock sample."""
        i = bisect.bisect_right(self._walls, wall_ns) - 1
        if i < 0:
            return None
        return self._sims[i] + (wall_ns - self._walls[i])

    def on_clock(self, sim_ns: int, wall_ns: int) -> Iterator[tuple[int | None, Any]]:
        """Add a ``/clock`` sample (its value and its reception time); yields ``(sim time, item)`` of every
        waiting message received before it, in reception order (not the order the executor took them in:
        an instruction received before a frame is handled before it)."""
        if self._walls and wall_ns < self._walls[-1]:
            wall_ns = self._walls[-1]  # reception stamps of one subscription never go back; guard anyway
        self._walls.append(int(wall_ns))
        self._sims.append(int(sim_ns))
        if self._walls[0] < wall_ns - KEEP_SAMPLES_NS and len(self._walls) > 64:
            cut = bisect.bisect_left(self._walls, wall_ns - KEEP_SAMPLES_NS)
            del self._walls[:cut], self._sims[:cut]
        yield from self._release(lambda w: w <= wall_ns)

    def add(self, wall_ns: int, item: Any, now_wall_ns: int) -> Iterator[tuple[int | None, Any]]:
        """A message received at ``wall_ns``: held until a later clock sample; yields whatever is released now
        (this one included when a sample after it is already known, when there is no clock yet (time None),
        or when the oldest waited too long)."""
        heapq.heappush(self._pending, (int(wall_ns), next(self._count), item))
        latest = self._walls[-1] if self._walls else None
        yield from self._release(lambda w: latest is None or w <= latest or now_wall_ns - w > MAX_WAIT_NS)

    def flush(self) -> Iterator[tuple[int | None, Any]]:
        """Release everything still waiting (the episode ends), extrapolating from the newest sample."""
        yield from self._release(lambda w: True)

    def _release(self, ready: Any) -> Iterator[tuple[int | None, Any]]:
        while self._pending and ready(self._pending[0][0]):
            wall, _, item = heapq.heappop(self._pending)
            yield self.sim_time(wall), item  # None: received before any clock sample
