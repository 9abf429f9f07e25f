"""Robot-state inputs through the converter, with bags recorded the way robots publish state: joint
states at 100 Hz with jitter and a changing joint order, a PoseStamped at 30 Hz, a Float64MultiArray at
20 Hz, none in step with the camera. Every stored state row must be what the controller had at that
decision: each input's newest value at or before the decision moment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from bag_factory import NS, STATE_INPUTS, TEST_CONTRACT, BagScript, StateTopics, TrueStep, make_episode, make_state_contract
from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.data.convert import main
from q_transformer_ros.data.image import preprocess_frame
from q_transformer_ros.data.sync import DimStream, values_at
from q_transformer_ros.replay.format import STATE_FILE, read_manifest

LIMIT_NS = int(TEST_CONTRACT["max_frame_age_s"] * NS)
NAMES = [s["name"] for s in STATE_INPUTS]


def write_contract(tmp_path: Path, **overrides) -> Path:
    p = tmp_path / "contract.yaml"
    p.write_text(yaml.safe_dump({**TEST_CONTRACT, "state_inputs": STATE_INPUTS, **overrides}))
    return p


def run(bags: list[Path], out: Path, contract_file: Path, *extra: str) -> int:
    return main([*map(str, bags), "--out", str(out), "--contract", str(contract_file), "--no-progress", *extra])


def stored_states(root: Path) -> list[np.ndarray]:
    """Each episode's rows of state.npy, read straight from the dataset files (manifest order)."""
    manifest = read_manifest(root)
    out = []
    for e in manifest.episodes:
        arr = np.load(root / "chunks" / e.chunk / STATE_FILE, mmap_mode="r")
        out.append(np.asarray(arr[e.start:e.start + e.length]))
    return out


def state_drops(report: dict) -> dict[str, int]:
    """The report's drops that name a state input (others, like the final observation, are normal)."""
    return {reason: n for reason, n in report["dropped"].items() if "state input" in reason}


def usable(step: TrueStep) -> bool:
    """The controller's view was complete: every state value present, fresh and finite (frames are
    fresh in these episodes: the wrist camera runs at 8 Hz or faster)."""
    for name in NAMES:
        seen = step.state.get(name)
        if seen is None or step.decision_ns - seen[0] > LIMIT_NS or not math.isfinite(seen[1]):
            return False
    return True


def expected_runs(steps: list[TrueStep]) -> list[list[TrueStep]]:
    """Runs of consecutive usable steps: the converter's episodes."""
    runs, cur = [], []
    for st in steps:
        if usable(st):
            cur.append(st)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def check_runs(root: Path, script: BagScript) -> list[list[TrueStep]]:
    """Episode by episode, step by step: state, frames and actions are the controller's."""
    runs = expected_runs(script.steps)
    ds = ReplayDataset(root)
    states = stored_states(root)
    c = make_state_contract()
    assert ds.num_episodes == len(runs) == len(states)
    for i, (run_steps, state) in enumerate(zip(runs, states)):
        want = np.array([[st.state[n][1] for n in NAMES] for st in run_steps], dtype=np.float32)
        assert state.dtype == np.float32 and state.shape == (len(run_steps), len(NAMES))
        np.testing.assert_array_equal(state, want, err_msg=f"episode {i}")
        ep = ds.episode(i)
        np.testing.assert_allclose(np.asarray(ep.actions), np.stack([st.action for st in run_steps]), rtol=0, atol=1e-6)
        for cam in c.cameras:
            for k, st in enumerate(run_steps):
                np.testing.assert_array_equal(np.asarray(ep.frames[cam.name][k]),
                                              preprocess_frame(*st.frames[cam.topic][1:], cam))
    return runs


def test_values_at_takes_the_newest_value_at_or_before_each_moment() -> None:
    stream = DimStream(np.array([10, 20, 30], np.int64), np.array([1.0, math.nan, 3.0]))
    s = values_at(stream, np.array([5, 10, 25, 29, 31], np.int64))
    np.testing.assert_array_equal(s.times_ns, [-1, 10, 20, 20, 30])
    np.testing.assert_array_equal(s.values, [math.nan, 1.0, math.nan, math.nan, 3.0])
    np.testing.assert_array_equal(s.age_ns(np.array([5, 10, 25, 29, 31])), [-1, 0, 5, 9, 1])
    empty = values_at(DimStream(np.zeros(0, np.int64), np.zeros(0)), np.array([1, 2]))
    assert (empty.times_ns == -1).all() and np.isnan(empty.values).all()


@pytest.mark.parametrize("latency,jitter", [(0.3, 0.1), (0.8, 0.2)])
def test_state_is_what_the_controller_saw_at_each_decision(tmp_path, latency, jitter) -> None:
    script = make_episode(seed=70, duration=4.0, latency=latency, jitter=jitter, wrist_hz=30.0, state=StateTopics())
    orders = {tuple(m[3].name) for m in script.msgs if m[0] == "/joint_states"}
    assert orders == {("shoulder", "elbow"), ("elbow", "shoulder")}  # the joint order changes between messages
    bag = script.write(tmp_path / "arm_with_state")
    report = tmp_path / "report.json"
    assert run([bag], tmp_path / "ds", write_contract(tmp_path), "--report-json", str(report)) == 0
    runs = check_runs(tmp_path / "ds", script)
    assert len(runs) == 1 and len(runs[0]) == len(script.steps) >= 35
    r = json.loads(report.read_text())[0]
    assert state_drops(r) == {}
    stored = stored_states(tmp_path / "ds")[0].astype(np.float64)
    np.testing.assert_allclose(r["state_min"], stored.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(r["state_max"], stored.max(axis=0), rtol=1e-6)
    assert set(r["state_age_p99_s"]) == set(NAMES) and all(0 <= v < 0.1 for v in r["state_age_p99_s"].values())


def test_report_compares_state_ranges_with_the_contract(tmp_path, capsys) -> None:
    narrow = [dict(s) for s in STATE_INPUTS]
    narrow[2] = {**narrow[2], "low": -0.05, "high": 0.05}  # ee_x walks beyond this
    script = make_episode(seed=71, duration=3.0, state=StateTopics())
    bag = script.write(tmp_path / "narrow")
    assert run([bag], tmp_path / "ds", write_contract(tmp_path, state_inputs=narrow)) == 0
    out = capsys.readouterr().out
    assert "state range seen vs contract" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("ee_x"))
    assert "OUTSIDE in" in line and "contract [    -0.05,      0.05]" in line
    assert "OUTSIDE" not in next(l for l in out.splitlines() if l.strip().startswith("elbow_pos"))


def test_a_state_topic_that_stops_drops_and_cuts_steps_named_in_the_report(tmp_path, capsys) -> None:
    script = make_episode(seed=72, duration=3.0, state=StateTopics(pose_silent_s=(1.0, 1.7)))
    stale = [st for st in script.steps if not usable(st)]
    assert stale and all(st.state["ee_x"] is not None and st.decision_ns - st.state["ee_x"][0] > LIMIT_NS for st in stale)
    bag = script.write(tmp_path / "pose_hung")
    report = tmp_path / "report.json"
    assert run([bag], tmp_path / "ds", write_contract(tmp_path), "--report-json", str(report)) == 0
    reason = "stale state input 'ee_x' on /ee_pose (> 0.3 s)"
    assert state_drops(json.loads(report.read_text())[0]) == {reason: len(stale)}
    assert f"dropped {len(stale)} step(s): {reason}" in capsys.readouterr().out
    runs = check_runs(tmp_path / "ds", script)
    assert len(runs) == 2
    ds = ReplayDataset(tmp_path / "ds")
    assert not ds.episode(0).terminal and not ds.episode(0).success  # cut before the gap: truncated
    assert ds.episode(1).terminal and ds.episode(1).success


def test_non_finite_state_is_never_stored(tmp_path, capsys) -> None:
    script = make_episode(seed=73, duration=3.0, state=StateTopics(gripper_nan_s=(1.2, 1.5)))
    bad = [st for st in script.steps if not math.isfinite(st.state["grip_width"][1])]
    assert bad
    bag = script.write(tmp_path / "gripper_fault")
    report = tmp_path / "report.json"
    assert run([bag], tmp_path / "ds", write_contract(tmp_path), "--report-json", str(report)) == 0
    reason = "non-finite state input 'grip_width' on /gripper_state (NaN/inf in the bag)"
    assert state_drops(json.loads(report.read_text())[0]) == {reason: len(bad)}
    check_runs(tmp_path / "ds", script)
    assert all(np.isfinite(s).all() for s in stored_states(tmp_path / "ds"))


def test_missing_state_topic_names_bag_and_topic(tmp_path, capsys) -> None:
    script = make_episode(seed=74, duration=1.0, state=StateTopics())
    script.msgs = [m for m in script.msgs if m[0] != "/ee_pose"]
    bag = script.write(tmp_path / "no_pose")
    assert run([bag], tmp_path / "ds", write_contract(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"{bag}: state input 'ee_x' topic /ee_pose is not in the bag" in err
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("change,words", [
    ({"field": "pose.position.w"}, ["has no field 'w'", "field 'pose.position.w'"]),
    ({"field": "header.frame_id"}, ["is not a number", "field 'header.frame_id'"]),
    ({"field": "pose"}, ["is not a number", "field 'pose'"]),
])
def test_bad_state_field_names_bag_topic_and_field(tmp_path, capsys, change, words) -> None:
    inputs = [dict(s) for s in STATE_INPUTS]
    inputs[2] = {**inputs[2], "source": {**inputs[2]["source"], **change}}
    bag = make_episode(seed=75, duration=1.0, state=StateTopics()).write(tmp_path / "bad_field")
    assert run([bag], tmp_path / "ds", write_contract(tmp_path, state_inputs=inputs)) == 1
    err = capsys.readouterr().err
    assert f"{bag}: state input 'ee_x'" in err and "topic /ee_pose" in err
    for w in words:
        assert w in err


def test_joint_missing_from_every_message_is_an_error(tmp_path, capsys) -> None:
    inputs = [dict(s) for s in STATE_INPUTS]
    inputs[0] = {**inputs[0], "source": {**inputs[0]["source"], "joint": "wrist"}}
    bag = make_episode(seed=76, duration=1.0, state=StateTopics()).write(tmp_path / "no_wrist")
    assert run([bag], tmp_path / "ds", write_contract(tmp_path, state_inputs=inputs)) == 1
    err = capsys.readouterr().err
    assert f"{bag}: state input 'elbow_pos': no value read from topic /joint_states" in err
    assert "joint 'wrist' not in message name" in err


def test_arm_and_gripper_joint_states_on_one_topic(tmp_path) -> None:
    """A driver that publishes the gripper as its own JointState on /joint_states: messages without
    the joint are skipped, each step takes the newest message that has it."""
    from bag_factory import joint_state_msg

    script = make_episode(seed=77, duration=2.0, state=StateTopics())
    finger = []
    t = int(1.0 * NS) + 5_000_000
    while t < int(3.3 * NS):
        v = 0.01 * (t // 10_000_000 % 7)
        script.add("/joint_states", "sensor_msgs/msg/JointState", t, joint_state_msg(["finger"], [v], t, [0.0]))
        finger.append((t, v))
        t += int(NS / 25)
    inputs = [*STATE_INPUTS, {"name": "finger", "low": 0.0, "high": 0.1,
                              "source": {"topic": "/joint_states", "msg_type": "sensor_msgs/msg/JointState",
                                         "field": "position", "joint": "finger"}}]
    assert run([script.write(tmp_path / "split_states")], tmp_path / "ds", write_contract(tmp_path, state_inputs=inputs)) == 0
    state = stored_states(tmp_path / "ds")[0]
    want_elbow = [st.state["elbow_pos"][1] for st in script.steps]
    want_finger = [max((e for e in finger if e[0] <= st.decision_ns), default=(0, math.nan))[1] for st in script.steps]
    np.testing.assert_array_equal(state[:, 0], np.float32(want_elbow))
    np.testing.assert_array_equal(state[:, -1], np.float32(want_finger))
