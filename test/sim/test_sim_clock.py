"""FastForwardClock with a made-up wall clock: wall speed while waiting, a jump to the tick when the
step is answered early, real time when the loop is slower than the period."""

from __future__ import annotations

import pytest

from q_transformer_ros.sim.sim_clock import FastForwardClock

MS = 1_000_000


class Wall:
    def __init__(self) -> None:
        self.ns = 5_000 * MS

    def __call__(self) -> int:
        return self.ns


def test_runs_at_wall_speed_and_jumps_over_idle_time() -> None:
    wall = Wall()
    clock = FastForwardClock(100 * MS, start_ns=0, wall_ns=wall)
    assert clock.now_ns() == 0 and not clock.tick_due()
    wall.ns += 7 * MS  # the frame travels, the policy decides, the command comes back
    assert clock.now_ns() == 7 * MS
    assert clock.start_tick() == 100 * MS  # answered: the 93 ms of idle time are skipped
    assert clock.now_ns() == 100 * MS and clock.skipped_ns == 93 * MS
    wall.ns += 3 * MS  # the step's latencies stay what they are on the wall
    assert clock.now_ns() == 103 * MS
    assert clock.next_tick_ns == 200 * MS


def test_a_slow_loop_runs_in_real_time() -> None:
    wall = Wall()
    clock = FastForwardClock(100 * MS, start_ns=0, wall_ns=wall)
    wall.ns += 99 * MS
    assert not clock.tick_due()
    wall.ns += 31 * MS  # nobody answered within the period: the sim steps with what it has
    assert clock.tick_due()
    assert clock.start_tick() == 130 * MS and clock.skipped_ns == 0
    assert clock.next_tick_ns == 230 * MS  # the next period counts from this step, no catch-up burst


def test_restart_period_and_bad_period() -> None:
    wall = Wall()
    clock = FastForwardClock(50 * MS, start_ns=10 * MS, wall_ns=wall)
    wall.ns += 400 * MS  # hold between episodes: time passes
    clock.restart_period()  # a new episode's first frame goes out now
    assert clock.next_tick_ns == clock.now_ns() + 50 * MS == 460 * MS
    with pytest.raises(ValueError, match="period_ns"):
        FastForwardClock(0)
