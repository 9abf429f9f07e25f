"""Step clock, latest-frame selection, action rules and labels files."""

from __future__ import annotations

import numpy as np
import pytest

from q_transformer_ros.data.labels import LabelsError, load_labels
from q_transformer_ros.data.sync import DimStream, LatestFrameSelector, actions_for_steps, step_times, valid_runs


def test_step_times_full_and_partial() -> None:
    ms = 1_000_000
    np.testing.assert_array_equal(step_times(0, 1000 * ms, 300 * ms), np.array([0, 300, 600]) * ms)
    np.testing.assert_array_equal(step_times(0, 1000 * ms, 300 * ms, include_partial=True),
                                  np.array([0, 300, 600, 900]) * ms)
    # 1 ms of jitter at the end still counts as a whole step
    assert len(step_times(0, 899 * ms + ms // 2, 300 * ms)) == 3
    assert len(step_times(10, 5, 3)) == 0


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


def test_actions_absolute_and_delta() -> None:
    s = DimStream(np.array([0, 10, 20, 30]), np.array([1.0, 2.0, 4.0, 8.0]))
    starts, ends = np.array([0, 10, 20]), np.array([10, 20, 25])
    ab = actions_for_steps(s, starts, ends, "absolute")
    np.testing.assert_array_equal(ab.values, [2.0, 4.0, 4.0])
    np.testing.assert_array_equal(ab.age_ns, [0, 0, 5])
    de = actions_for_steps(s, starts, ends, "delta")
    np.testing.assert_array_equal(de.values, [1.0, 2.0, 0.0])
    early = actions_for_steps(s, np.array([-5]), np.array([-1]), "delta")
    assert not early.valid[0]


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
