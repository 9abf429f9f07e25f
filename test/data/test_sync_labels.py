"""The pairing rule (decision moments, response latency, step plans, actions), frame selection, labels files."""

from __future__ import annotations

import numpy as np
import pytest

from q_transformer_ros.data.labels import LabelsError, load_labels
from q_transformer_ros.data.sync import (
    DecisionClock, DimStream, LatestFrameSelector, actions_for_steps, decision_moments, plan_steps,
    response_latency_ns, valid_runs,
)


MS = 1_000_000
P = 100 * MS


def test_decision_clock_every_frame_at_the_control_rate_even_with_jitter() -> None:
    rng = np.random.default_rng(0)
    frames = ((np.arange(200) + rng.uniform(-0.2, 0.2, size=200)) * P).astype(np.int64)  # +-20 % per frame
    assert len(decision_moments(frames, P)) == len(frames)


@pytest.mark.parametrize("camera_hz,every", [(30.0, 3), (20.0, 2), (60.0, 6)])
def test_decision_clock_thins_a_faster_camera_to_the_control_rate(camera_hz, every) -> None:
    rng = np.random.default_rng(1)
    cam = int(1e9 / camera_hz)
    frames = (np.arange(120) * cam + rng.uniform(-0.1, 0.1, 120) * cam).astype(np.int64)
    d = decision_moments(frames, P)
    np.testing.assert_array_equal(d, frames[::every][: len(d)])
    clock = DecisionClock(P)  # the live side: the same answers frame by frame, and reset restarts it
    live = [t for t in frames if clock.offer(t)]
    np.testing.assert_array_equal(live, d)


@pytest.mark.parametrize("latency", [0.01, 0.3, 0.6, 0.9])
def test_response_latency_is_recovered_through_jitter(latency) -> None:
    rng = np.random.default_rng(2)
    d = np.cumsum(rng.uniform(0.8, 1.2, size=300) * P).astype(np.int64)
    c = d + np.maximum(MS, ((latency + rng.uniform(-0.2, 0.2, size=300)) * P)).astype(np.int64)
    assert abs(response_latency_ns(d, np.sort(c), P) - latency * P) < 0.06 * P


def test_response_latency_of_a_fast_stream_is_half_a_period() -> None:
    d = np.arange(50) * P
    c = np.arange(250) * (P // 5) + 3 * MS  # a 50 Hz joystick
    assert response_latency_ns(d, c, P) == P // 2
    # a twist and a gripper command sent together are one command
    pairs = np.sort(np.concatenate([d + 30 * MS, d + 30 * MS + MS // 2]))
    assert abs(response_latency_ns(d, pairs, P) - 30 * MS) < MS


def test_plan_pairs_each_frame_with_its_answer_even_after_the_next_frame() -> None:
    d = np.array([0, 100, 200, 300]) * MS
    c = np.array([95, 205, 290, 390]) * MS  # L ~ 0.9 P: answers 2 arrives before frame 3 and after it
    plan = plan_steps(d, c, P, end_ns=400 * MS)
    s = DimStream(c, np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(actions_for_steps(s, plan, "absolute", P).values, [1.0, 2.0, 3.0, 4.0])
    # the old rule (command at or before the next tick) would have taken [1, 3, 3, 4]


def test_plan_ends_before_the_unanswered_final_frame_and_holds_missing_commands() -> None:
    d = np.array([0, 100, 200, 300]) * MS
    c = np.array([30, 230]) * MS  # step 1's answer was lost; frame 3 shows the outcome, no answer
    plan = plan_steps(d, c, P, end_ns=301 * MS)
    assert len(plan.decision_ns) == 3 and plan.cut == 1
    acts = actions_for_steps(DimStream(c, np.array([1.0, 3.0])), plan, "absolute", P)
    np.testing.assert_array_equal(acts.values, [1.0, 1.0, 3.0])
    np.testing.assert_array_equal(acts.held, [False, True, False])


def test_delta_is_the_source_change_between_observations() -> None:
    d = np.array([0, 100, 200]) * MS
    s = DimStream(np.array([0, 50, 100, 150, 200, 250]) * MS, np.array([0.0, 1.0, 2.0, 4.0, 8.0, 16.0]))
    plan = plan_steps(d, np.zeros(0, np.int64), P, end_ns=250 * MS)
    assert len(plan.decision_ns) == 2  # delta-only: a step needs its next observation in the episode
    np.testing.assert_array_equal(actions_for_steps(s, plan, "delta", P).values, [2.0, 6.0])


def test_silence_of_the_step_camera_breaks_the_plan() -> None:
    d = np.array([0, 100, 200, 900, 1000]) * MS
    c = d + 20 * MS
    plan = plan_steps(d, c, P, end_ns=1100 * MS, max_gap_ns=300 * MS)
    np.testing.assert_array_equal(plan.breaks, [False, False, True, False, False])
    assert plan.next_decision_ns[2] == 300 * MS  # the step before the gap ends one period later


def test_selector_takes_latest_at_or_before_and_never_future() -> None:
    sel = LatestFrameSelector(np.array([10, 20, 30, 40]))
    picks = []
    for t in (5, 20, 21, 25):
        picks += list(sel.push(t, f"m{t}"))
    picks += list(sel.finish())
    assert picks == [(0, 5, "m5"), (1, 20, "m20"), (2, 25, "m25"), (3, 25, "m25")]
    sel = LatestFrameSelector(np.array([1, 2]))
    assert list(sel.push(5, "late")) == []  # steps before the first frame get nothing
    assert list(sel.finish()) == []


def test_valid_runs() -> None:
    assert valid_runs(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]
    assert valid_runs(np.zeros(3, bool)) == []


def test_labels_csv_yaml_and_errors(tmp_path) -> None:
    from pathlib import Path

    csv = tmp_path / "l.csv"
    csv.write_text("bag,success\nrun_1,yes\n/data/run_2.mcap,0\nrun_3#1,true\n")
    lab = load_labels(csv)
    assert lab.lookup(Path("x/run_1"), 0) is True
    assert lab.lookup(Path("run_2.mcap"), 0) is False
    assert lab.lookup(Path("run_3"), 1) is True and lab.lookup(Path("run_3"), 0) is None
    with pytest.raises(LabelsError, match="not among the inputs: \\['run_3#1'\\]"):
        lab.check_bags_exist([Path("run_1"), Path("run_2.mcap")])
    bad = tmp_path / "bad.csv"
    bad.write_text("bag,success\nrun_1,maybe\n")
    with pytest.raises(LabelsError, match=r"bad.csv:2: success value 'maybe'"):
        load_labels(bad)
    y = tmp_path / "l.yaml"
    y.write_text("- {bag: run_1, success: true}\n- {bag: run_1, success: false}\n")
    with pytest.raises(LabelsError, match="labelled twice"):
        load_labels(y)
