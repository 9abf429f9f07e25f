"""ReceptionTime with made-up times: a message is logged at the sim time of its reception, however late
its callback runs and whatever jumps /clock made meanwhile (no DDS needed)."""

from __future__ import annotations

from q_transformer_ros.ros.reception_time import MAX_WAIT_NS, ReceptionTime

MS = 1_000_000


def test_late_callbacks_keep_the_reception_time_across_a_jump() -> None:
    rt = ReceptionTime()
    # before any clock sample: released at once, without a sim time
    assert list(rt.add(1 * MS, "early", now_wall_ns=1 * MS)) == [(None, "early")]
    assert list(rt.on_clock(sim_ns=1000 * MS, wall_ns=10 * MS)) == []
    # the command of a step arrives at wall 15 ms (sim 1005 ms) ...
    # ... the sim jumps to the tick (sim 1100 ms) at wall 16 ms; the frame comes at wall 20 ms.
    # The recorder's executor was stalled: it takes the jump first, then the command, then the frame.
    assert list(rt.on_clock(sim_ns=1100 * MS, wall_ns=16 * MS)) == []
    assert list(rt.add(15 * MS, "command", now_wall_ns=30 * MS)) == [(1005 * MS, "command")]
    # the frame came after the newest sample: held until a later one proves no jump came between
    assert list(rt.add(20 * MS, "frame", now_wall_ns=30 * MS)) == []
    assert rt.pending == 1
    assert list(rt.on_clock(sim_ns=1110 * MS, wall_ns=26 * MS)) == [(1104 * MS, "frame")]


def test_a_message_waits_for_a_later_sample_then_flush_and_timeout() -> None:
    rt = ReceptionTime()
    list(rt.on_clock(sim_ns=0, wall_ns=0))
    assert list(rt.add(5 * MS, "a", now_wall_ns=6 * MS)) == []
    assert list(rt.add(7 * MS, "b", now_wall_ns=8 * MS)) == []
    assert [item for _, item in rt.flush()] == ["a", "b"]  # the episode ends: extrapolated at wall speed
    assert list(rt.add(9 * MS, "c", now_wall_ns=9 * MS)) == []
    # the sim stopped publishing /clock: after MAX_WAIT the message goes out anyway
    assert list(rt.add(10 * MS, "d", now_wall_ns=9 * MS + MAX_WAIT_NS + 1)) == [(9 * MS, "c")]
    assert rt.pending == 1


def test_sim_time_lookup_and_pruning() -> None:
    rt = ReceptionTime()
    assert rt.sim_time(5) is None and not rt.has_clock
    for i in range(200):  # 200 samples, 100 ms apart on the wall: older than 5 s are dropped
        list(rt.on_clock(sim_ns=i * 1000 * MS, wall_ns=i * 100 * MS))
    assert rt.has_clock
    assert rt.sim_time(199 * 100 * MS + 3 * MS) == 199 * 1000 * MS + 3 * MS
    assert rt.sim_time(150 * 100 * MS) == 150 * 1000 * MS
    assert len(rt._walls) < 200


def test_released_in_reception_order_not_callback_order() -> None:
    """The executor took the frame's callback before the instruction's (creation order); the instruction
    was received first and must come out first (an armed recorder starts its episode on it)."""
    rt = ReceptionTime()
    list(rt.on_clock(sim_ns=0, wall_ns=0))
    assert list(rt.add(12 * MS, "frame", now_wall_ns=13 * MS)) == []
    assert list(rt.add(11 * MS, "instruction", now_wall_ns=13 * MS)) == []
    assert [item for _, item in rt.on_clock(sim_ns=20 * MS, wall_ns=20 * MS)] == ["instruction", "frame"]
