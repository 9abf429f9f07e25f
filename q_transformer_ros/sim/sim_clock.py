"""Simulated time that skips the idle part of every control period: the sim's ``/clock``.

A real robot at 10 Hz spends most of each 100 ms period waiting: the camera frame travels, the
controller decides, the command travels back, and then nothing happens until the next tick. A
simulator does not have to wait. ``FastForwardClock`` runs at wall speed while anything is in flight
(so a frame's trip, the policy's decision and the command's way back take in sim time exactly what
they take on the wall, and the stamps, the node's staleness checks and the converter's pairing see a
real robot's timing), and jumps over the rest of the period once every command of the step has
arrived. An episode then runs as fast as the loop (physics, transport, policy) allows; a loop slower
than the control period runs at wall speed, as it would on the robot.

ROS-free (``sim_node`` publishes it on ``/clock``); the wall clock is injectable for tests.
"""

from __future__ import annotations

import time
from typing import Callable


class FastForwardClock:
    """Sim time in nanoseconds: wall speed between ticks, a jump to the tick when the step is answered."""

    def __init__(self, period_ns: int, start_ns: int | None = None,
                 wall_ns: Callable[[], int] = time.monotonic_ns) -> None:
        if period_ns <= 0:
            raise ValueError(f"FastForwardClock: period_ns = {period_ns} must be > 0")
        self.period_ns = int(period_ns)
        self._wall_ns = wall_ns
        start = time.time_ns() if start_ns is None else int(start_ns)  # bags then carry plausible dates
        self._offset_ns = start - wall_ns()
        self.next_tick_ns = start + self.period_ns
        """When the next control step is due if nothing answers earlier."""
        self.skipped_ns = 0
        """Idle time jumped over so far (sim time minus wall time elapsed)."""

    def now_ns(self) -> int:
        return self._offset_ns + self._wall_ns()

    def tick_due(self) -> bool:
        """True once the period is over without an answer: the sim steps with what it has, as a robot would."""
        return self.now_ns() >= self.next_tick_ns

    def start_tick(self) -> int:
        """The sim steps now: jump to the due tick if it is still ahead (the step was answered early),
        schedule the next one a period later and return the tick's time."""
        now = self.now_ns()
        if now < self.next_tick_ns:
            self._offset_ns += self.next_tick_ns - now
            self.skipped_ns += self.next_tick_ns - now
            now = self.next_tick_ns
        self.next_tick_ns = now + self.period_ns
        return now

    def restart_period(self) -> None:
        """A new episode's first frame goes out now: its step is due a whole period later."""
        self.next_tick_ns = self.now_ns() + self.period_ns
