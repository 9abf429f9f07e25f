"""Bags -> dataset: real bags (MCAP, sqlite3, split, zstd, ROS 1) checked step by step against what was written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bag_factory import NS, TEST_CONTRACT, BagScript, make_contract, make_episode
from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.data.convert import main
from q_transformer_ros.data.image import preprocess_frame


@pytest.fixture
def contract_file(tmp_path: Path) -> Path:
    p = tmp_path / "contract.yaml"
    p.write_text(yaml.safe_dump(TEST_CONTRACT))
    return p


def run(bags: list[Path], out: Path, contract_file: Path, *extra: str) -> int:
    return main([*map(str, bags), "--out", str(out), "--contract", str(contract_file), "--no-progress", *extra])


def expected_episode(script: BagScript, start_ns: int, end_ns: int):
    """Frames and actions the converter must store for the span [start, end): the generator's true steps."""
    c = make_contract()
    steps = script.steps_between(start_ns, end_ns)
    frames = {cam.name: np.stack([preprocess_frame(*st.frames[cam.topic][1:], cam) for st in steps]) for cam in c.cameras}
    actions = np.stack([st.action for st in steps]).astype(np.float32)
    return steps, frames, actions


def check_episode(ds: ReplayDataset, index: int, script: BagScript, start_ns: int, end_ns: int,
                  success: bool, instruction: str | None, terminal: bool | None = None) -> None:
    """Step by step: every stored frame and action is the one the controller saw and sent."""
    steps, frames, actions = expected_episode(script, start_ns, end_ns)
    ep = ds.episode(index)
    assert len(ep.actions) == len(steps)
    for name, want in frames.items():
        for k in range(len(steps)):
            np.testing.assert_array_equal(np.asarray(ep.frames[name][k]), want[k], err_msg=f"camera {name} step {k}")
    np.testing.assert_allclose(np.asarray(ep.actions), actions, rtol=0, atol=1e-6)
    want_rewards = np.zeros(len(steps), np.float32)
    want_rewards[-1] = float(success)
    np.testing.assert_array_equal(np.asarray(ep.rewards), want_rewards)
    assert ep.success is success
    assert ep.terminal is (True if terminal is None else terminal)  # a label is a verdict unless said otherwise
    assert ep.instruction == instruction


@pytest.mark.parametrize("storage,compression", [("mcap", None), ("sqlite3", None), ("mcap", "file"),
                                                 ("sqlite3", "message")])
def test_two_cameras_step_by_step(tmp_path, contract_file, storage, compression) -> None:
    script = make_episode(seed=1, front_encoding="bgr8", wrist_format="png")
    bag = script.write(tmp_path / "run_001", storage=storage, compression=compression)
    assert run([bag], tmp_path / "ds", contract_file) == 0
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 1
    check_episode(ds, 0, script, int(1.0 * NS), int(3.0 * NS), success=True, instruction="pick the cube")


def test_single_file_jpeg_rgb8_and_flags(tmp_path, contract_file) -> None:
    script = make_episode(seed=2, front_encoding="rgb8", wrist_format="jpeg", success=None, instruction=None)
    bag_dir = script.write(tmp_path / "bagdir", storage="mcap")
    single = tmp_path / "run_single.mcap"
    shutil.copy(next(bag_dir.glob("*.mcap")), single)  # a lone .mcap without metadata.yaml
    assert run([single], tmp_path / "ds", contract_file, "--failure", "--instruction", "open the drawer") == 0
    ds = ReplayDataset(tmp_path / "ds")
    check_episode(ds, 0, script, int(1.0 * NS), int(3.0 * NS), success=False, instruction="open the drawer",
                  terminal=True)  # --failure is a verdict: the failing last step is kept, no bootstrap


def _merge_split(parts: list[Path], dest: Path) -> Path:
    """Make one split rosbag2 (several storage files, one metadata.yaml) from bags written separately."""
    dest.mkdir()
    metas = [yaml.safe_load((p / "metadata.yaml").read_text())["rosbag2_bagfile_information"] for p in parts]
    meta = metas[0]
    files, rel = [], []
    for i, (p, m) in enumerate(zip(parts, metas)):
        src = p / m["relative_file_paths"][0]
        name = f"{dest.name}_{i}{''.join(src.suffixes)}"
        shutil.copy(src, dest / name)
        rel.append(name)
        files.append({**m["files"][0], "path": name})
    topics: dict[str, dict] = {}
    for m in metas:
        for t in m["topics_with_message_count"]:
            name = t["topic_metadata"]["name"]
            if name in topics:
                topics[name]["message_count"] += t["message_count"]
            else:
                topics[name] = dict(t)
    meta["topics_with_message_count"] = list(topics.values())
    start = min(m["starting_time"]["nanoseconds_since_epoch"] for m in metas)
    stop = max(m["starting_time"]["nanoseconds_since_epoch"] + m["duration"]["nanoseconds"] for m in metas)
    meta.update(relative_file_paths=rel, files=files, message_count=sum(m["message_count"] for m in metas),
                starting_time={"nanoseconds_since_epoch": start}, duration={"nanoseconds": stop - start})
    (dest / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": meta}))
    return dest


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_split_bag(tmp_path, contract_file, storage) -> None:
    script = make_episode(seed=3)
    cut = int(2.0 * NS)
    first, second = BagScript(), BagScript()
    for m in script.msgs:
        (first if m[2] < cut else second).msgs.append(m)
    # every topic in both parts, so both files carry all connections
    parts = [first.write(tmp_path / "a", storage=storage), second.write(tmp_path / "b", storage=storage)]
    bag = _merge_split(parts, tmp_path / "split_run")
    assert run([bag], tmp_path / "ds", contract_file) == 0
    ds = ReplayDataset(tmp_path / "ds")
    check_episode(ds, 0, script, int(1.0 * NS), int(3.0 * NS), success=True, instruction="pick the cube")


def test_instruction_change_and_gap_split_episodes(tmp_path, contract_file) -> None:
    script = make_episode(seed=4, t0=1.0, duration=2.0, instruction="pick the cube", success=True)
    make_episode(seed=5, t0=5.0, duration=1.5, instruction="open the drawer", success=False, script=script)
    bag = script.write(tmp_path / "two_tasks")
    assert run([bag], tmp_path / "ds", contract_file, "--episode-split", "gap:1.0") == 0
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 2
    check_episode(ds, 0, script, int(1.0 * NS), int(3.0 * NS), success=True, instruction="pick the cube")
    second = script
    # the episode ends on its False success message: a terminal failure
    check_episode(ds, 1, second, int(5.0 * NS), int(6.6 * NS), success=False, instruction="open the drawer")
    assert ds.instructions == ["pick the cube", "open the drawer"]


def test_silent_step_camera_cuts_the_episode(tmp_path, contract_file, capsys) -> None:
    script = make_episode(seed=6, duration=3.0, camera_gap=(1.0, 1.8))
    bag = script.write(tmp_path / "stale")
    assert run([bag], tmp_path / "ds", contract_file) == 0
    out = capsys.readouterr().out
    assert "step camera 'front' silent for > 0.3 s: episode cut there" in out
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 2
    first, second = ds.episode(0), ds.episode(1)
    assert not first.success and not first.terminal and first.rewards.sum() == 0  # cut short: truncated
    gap = int(2.0 * NS)
    check_episode(ds, 0, script, int(1.0 * NS), gap, success=False, instruction="pick the cube", terminal=False)
    check_episode(ds, 1, script, gap, int(4.0 * NS), success=True, instruction="pick the cube")
    assert second.success and second.rewards[-1] == 1.0


def test_stale_second_camera_drops_steps_with_reason(tmp_path, contract_file, capsys) -> None:
    script = make_episode(seed=16, duration=3.0, wrist_hz=2.0)  # the wrist frame is up to 0.5 s old
    bag = script.write(tmp_path / "slow_wrist")
    assert run([bag], tmp_path / "ds", contract_file, "--report-json", str(tmp_path / "r.json")) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())[0]
    stale = [st for st in script.steps if st.decision_ns - st.frames["/wrist/image/compressed"][0] > 0.3 * NS]
    assert stale
    assert report["dropped"]["stale frame from camera 'wrist' (> 0.3 s)"] == len(stale)
    assert f"dropped {len(stale)} step(s): stale frame from camera 'wrist'" in out
    ds = ReplayDataset(tmp_path / "ds")
    assert sum(len(ds.episode(i).actions) for i in range(ds.num_episodes)) == len(script.steps) - len(stale)


def test_rerun_skips_converted_bags_and_appends_new(tmp_path, contract_file) -> None:
    a = make_episode(seed=7).write(tmp_path / "a")
    b = make_episode(seed=8).write(tmp_path / "b")
    out = tmp_path / "ds"
    assert run([a], out, contract_file) == 0
    assert run([a], out, contract_file) == 0
    assert ReplayDataset(out).num_episodes == 1
    assert run([a, b], out, contract_file, "--workers", "2") == 0
    ds = ReplayDataset(out)
    assert ds.num_episodes == 2
    assert len({ds.episode(i).source_id for i in range(2)}) == 2
    # a copy of a bag elsewhere is the same recording
    shutil.copytree(b, tmp_path / "copy_of_b")
    assert run([tmp_path / "copy_of_b"], out, contract_file) == 0
    assert ReplayDataset(out).num_episodes == 2


def test_workers_match_single_process(tmp_path, contract_file) -> None:
    bags = [make_episode(seed=10 + i, duration=1.0).write(tmp_path / f"bag_{i}") for i in range(3)]
    assert run(bags, tmp_path / "one", contract_file) == 0
    assert run(bags, tmp_path / "many", contract_file, "--workers", "3") == 0
    one, many = ReplayDataset(tmp_path / "one"), ReplayDataset(tmp_path / "many")
    assert one.num_episodes == many.num_episodes == 3
    for i in range(3):
        e1, e2 = one.episode(i), many.episode(i)
        assert e1.source_id == e2.source_id
        np.testing.assert_array_equal(e1.actions, e2.actions)
        np.testing.assert_array_equal(e1.frames["front"], e2.frames["front"])


def test_labels_file_and_unlabeled_policies(tmp_path, contract_file, capsys) -> None:
    a = make_episode(seed=20, success=None, duration=1.0).write(tmp_path / "run_a")
    b = make_episode(seed=21, success=None, duration=1.0).write(tmp_path / "run_b")
    assert run([a, b], tmp_path / "refused", contract_file) == 1
    err = capsys.readouterr().err
    assert "no success label" in err and "run_a" in err
    assert not (tmp_path / "refused").exists()
    labels = tmp_path / "labels.csv"
    labels.write_text("bag,success\nrun_a,yes\n")
    assert run([a, b], tmp_path / "ds", contract_file, "--labels", str(labels), "--unlabeled", "skip") == 0
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 1 and ds.episode(0).success and ds.episode(0).metadata["bag_name"] == "run_a"
    labels_yaml = tmp_path / "labels.yaml"
    labels_yaml.write_text(yaml.safe_dump({"run_a": False}))
    assert run([a, b], tmp_path / "ds2", contract_file, "--labels", str(labels_yaml), "--unlabeled", "failure") == 0
    ds2 = ReplayDataset(tmp_path / "ds2")
    assert [ds2.episode(i).success for i in range(2)] == [False, False]


def test_ros1_bag(tmp_path, contract_file) -> None:
    from rosbags.rosbag1 import Writer as Writer1
    from rosbags.typesys import Stores, get_typestore

    ros1 = get_typestore(Stores.ROS1_NOETIC)
    script = make_episode(seed=30)
    path = tmp_path / "old_fleet.bag"
    with Writer1(path) as w:
        conns = {}
        for topic, msgtype, t, msg in sorted(script.msgs, key=lambda m: m[2]):
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=ros1)
            w.write(conns[topic], t, ros1.serialize_ros1(_to_ros1(msg, ros1), msgtype))
    assert run([path], tmp_path / "ds", contract_file) == 0
    ds = ReplayDataset(tmp_path / "ds")
    check_episode(ds, 0, script, int(1.0 * NS), int(3.0 * NS), success=True, instruction="pick the cube")


def _to_ros1(msg, store):
    """Rebuild a ROS 2 rosbags message as the ROS 1 type (Header gains seq, Time fields keep names)."""
    from dataclasses import fields, is_dataclass

    cls = store.types[msg.__msgtype__]
    kwargs = {}
    for f in fields(cls):
        if f.name == "seq" and not hasattr(msg, "seq"):
            kwargs[f.name] = 0
            continue
        v = getattr(msg, f.name)
        if is_dataclass(v):
            v = _to_ros1(v, store)
        elif isinstance(v, list) and v and is_dataclass(v[0]):
            v = [_to_ros1(x, store) for x in v]
        kwargs[f.name] = v
    return cls(**kwargs)


@pytest.mark.parametrize("latency", [0.01, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_pairing_across_latency_and_jitter(tmp_path, contract_file, latency, jitter) -> None:
    """Frames, then the command answering each one `latency` periods later, each message +-`jitter`
    periods: every stored (frame, action) pair is what the controller saw and sent."""
    script = make_episode(seed=int(latency * 100 + jitter * 10), duration=4.0, latency=latency, jitter=jitter,
                          wrist_hz=30.0)
    bag = script.write(tmp_path / "loop")
    assert run([bag], tmp_path / "ds", contract_file) == 0
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 1
    check_episode(ds, 0, script, int(1.0 * NS), int(5.0 * NS), success=True, instruction="pick the cube")
    assert abs(ds.episode(0).metadata["response_latency_s"] - latency * 0.1) < 0.012


def test_pairing_with_a_faster_step_camera(tmp_path, contract_file) -> None:
    """A 30 Hz step camera at a 10 Hz control rate: the controller decided on every third frame."""
    script = make_episode(seed=41, duration=4.0, front_hz=30.0, front_jitter=0.02, latency=0.5, jitter=0.2)
    assert len(script.frames["/front/image_raw"]) > 2.5 * len(script.steps)
    bag = script.write(tmp_path / "fast_cam", storage="sqlite3")
    assert run([bag], tmp_path / "ds", contract_file) == 0
    check_episode(ReplayDataset(tmp_path / "ds"), 0, script, int(1.0 * NS), int(5.0 * NS), success=True,
                  instruction="pick the cube")


@pytest.mark.parametrize("teleop_hz", [50.0, 20.0])
def test_teleoperation_faster_than_the_control_rate(tmp_path, contract_file, teleop_hz) -> None:
    """A joystick at 50 Hz: each step takes the last command before the next observation."""
    script = make_episode(seed=42, duration=3.0, teleop_hz=teleop_hz, jitter=0.1)
    bag = script.write(tmp_path / "teleop")
    assert run([bag], tmp_path / "ds", contract_file) == 0
    ds = ReplayDataset(tmp_path / "ds")
    check_episode(ds, 0, script, int(1.0 * NS), int(4.0 * NS), success=True, instruction="pick the cube")
    assert ds.episode(0).metadata["response_latency_s"] == pytest.approx(0.05)


def test_failures_are_terminal_and_cuts_are_truncated(tmp_path, contract_file, capsys) -> None:
    failed = make_episode(seed=43, success=False, duration=1.5).write(tmp_path / "failed")
    unlabeled = make_episode(seed=44, success=None, duration=1.5).write(tmp_path / "unlabeled")
    labelled = make_episode(seed=45, success=None, duration=1.5).write(tmp_path / "labelled")
    labels = tmp_path / "labels.csv"
    labels.write_text("bag,success\nlabelled,no\n")
    assert run([failed, unlabeled, labelled], tmp_path / "ds", contract_file, "--labels", str(labels),
               "--unlabeled", "failure") == 0
    ds = ReplayDataset(tmp_path / "ds")
    by_bag = {ds.episode(i).metadata["bag_name"]: ds.episode(i) for i in range(ds.num_episodes)}
    for name in ("failed", "labelled"):  # a verdict: the failing last step is a terminal transition
        ep = by_bag[name]
        assert not ep.success and ep.terminal and ep.rewards.sum() == 0
    assert not by_bag["unlabeled"].terminal  # no verdict (--unlabeled failure): a cut, bootstrapped
    # the failing last step is a training sample (terminal), the cut's last step is not
    assert len(ds) == sum(len(e.actions) for e in by_bag.values()) - 1
    out = capsys.readouterr().out
    assert "unlabeled: note: 1 x truncated episodes" in out


def test_report_names_bags_without_episodes_and_json_is_strict(tmp_path, contract_file, capsys) -> None:
    good = make_episode(seed=46, duration=1.0).write(tmp_path / "good")
    script = make_episode(seed=47, duration=1.0, instruction=None)  # no instruction anywhere: nothing to keep
    empty = script.write(tmp_path / "no_instruction")
    report = tmp_path / "report.json"
    assert run([good, empty], tmp_path / "ds", contract_file, "--report-json", str(report)) == 0
    out = capsys.readouterr().out
    data = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    bad = next(r for r in data if r["bag"].endswith("no_instruction"))
    assert bad["status"] == "no episodes" and bad["episodes"] == 0
    assert bad["frame_age_p50_s"]["wrist"] is None
    assert "before the first instruction" in bad["error"]
    assert "NO EPISODES no_instruction:" in out
    assert sum(bad["dropped"].values()) >= len(script.steps)


def test_kill_after_k_of_n_bags_then_rerun_is_byte_identical(tmp_path, contract_file) -> None:
    """kill -9 right after the 2nd of 5 bags is committed; the rerun converts only the other 3, and the
    dataset is byte for byte the one an uninterrupted run writes."""
    import hashlib
    import subprocess
    import sys

    bags = [make_episode(seed=60 + i, duration=1.0).write(tmp_path / f"bag_{i}") for i in range(5)]
    argv = [*map(str, bags), "--contract", str(contract_file), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    script = f"""
import os, signal, sys
from q_transformer_ros.replay import writer as w
real_init, commits = w.ReplayWriter.__init__, [0]
def hook(stage):
    if stage == "manifest_written":
        commits[0] += 1
        if commits[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
def init(self, *a, **k):
    real_init(self, *a, **k)
    self.stage_hook = hook
w.ReplayWriter.__init__ = init
from q_transformer_ros.data.convert import main
sys.exit(main({[*argv, "--out", str(killed)]!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert ReplayDataset(killed).num_episodes == 2
    report = tmp_path / "report.json"
    assert main([*argv, "--out", str(killed), "--report-json", str(report)]) == 0
    statuses = [r["status"] for r in json.loads(report.read_text())]
    assert statuses == ["already in dataset"] * 2 + ["converted"] * 3

    def files(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".writer.lock"}

    assert files(killed) == files(tmp_path / "straight")
