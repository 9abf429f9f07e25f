"""Bags -> dataset: real bags (MCAP, sqlite3, split, zstd, ROS 1) checked step by step against what was written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bag_factory import NS, TEST_CONTRACT, BagScript, make_contract, make_episode
from q_transformer_ros.core.dataset import ReplayDataset
from q_transformer_ros.data.convert import main
from q_transformer_ros.data.image import preprocess_frame


@pytest.fixture
def contract_file(tmp_path: Path) -> Path:
    p = tmp_path / "contract.yaml"
    p.write_text(yaml.safe_dump(TEST_CONTRACT))
    return p


def run(bags: list[Path], out: Path, contract_file: Path, *extra: str) -> int:
    return main([*map(str, bags), "--out", str(out), "--contract", str(contract_file), "--no-progress", *extra])


def latest(events: list[tuple[int, object]], t: int):
    """Value of the last event at or before t (the test's own implementation of the rule)."""
    best = None
    for te, v in events:
        if te <= t:
            best = v
    assert best is not None, f"no event at or before {t}"
    return best


def expected_episode(script: BagScript, start_ns: int, end_ns: int, by_success: bool = True):
    """Steps, frames and actions the converter must produce for the span [start, end]."""
    c = make_contract()
    firsts = [ev[0][0] for ev in script.frames.values()] + [v[0][0] for v in script.values.values()]
    t0 = max([start_ns] + firsts)
    period = int(NS / c.control_rate_hz)
    steps = []
    t = t0
    while (t < end_ns) if by_success else (t + period <= end_ns):
        steps.append(t)
        t += period
    frames = {}
    for cam in c.cameras:
        evs = [(te, (arr, enc)) for te, arr, enc in script.frames[cam.topic]]
        frames[cam.name] = np.stack([preprocess_frame(*latest(evs, s), cam) for s in steps])
    actions = np.zeros((len(steps), c.num_action_dims), np.float32)
    for k, s in enumerate(steps):
        e = min(s + period, end_ns)
        for i, d in enumerate(c.action_dims):
            evs = script.values[d.name]
            actions[k, i] = latest(evs, e) - latest(evs, s) if d.mode == "delta" else latest(evs, e)
    return np.array(steps), frames, actions


def check_episode(ds: ReplayDataset, index: int, script: BagScript, start_ns: int, end_ns: int,
                  success: bool, instruction: str | None, by_success: bool = True) -> None:
    steps, frames, actions = expected_episode(script, start_ns, end_ns, by_success)
    ep = ds.episode(index)
    assert len(ep.actions) == len(steps)
    for name, want in frames.items():
        np.testing.assert_array_equal(np.asarray(ep.frames[name]), want, err_msg=f"camera {name}")
    np.testing.assert_allclose(np.asarray(ep.actions), actions, rtol=0, atol=1e-6)
    want_rewards = np.zeros(len(steps), np.float32)
    want_rewards[-1] = float(success)
    np.testing.assert_array_equal(np.asarray(ep.rewards), want_rewards)
    assert ep.success is success
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
    # no success message: the episode runs to the last message (3.0 s), whole steps only
    check_episode(ds, 0, script, int(1.0 * NS), int(3.0 * NS), success=False, instruction="open the drawer",
                  by_success=False)


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
    first = BagScript(frames={k: [e for e in v if e[0] < 4 * NS] for k, v in script.frames.items()},
                      values={k: [e for e in v if e[0] < 4 * NS] for k, v in script.values.items()})
    second = BagScript(frames={k: [e for e in v if e[0] >= 4 * NS] for k, v in script.frames.items()},
                       values={k: [e for e in v if e[0] >= 4 * NS] for k, v in script.values.items()})
    check_episode(ds, 0, first, int(1.0 * NS), int(3.0 * NS), success=True, instruction="pick the cube")
    # a False success message labels the episode a failure; it runs until the False message at 6.5 s
    # (the message does not end the span, the gap split and the bag end do)
    check_episode(ds, 1, second, int(5.0 * NS), int(6.5 * NS), success=False, instruction="open the drawer",
                  by_success=False)
    assert ds.instructions == ["pick the cube", "open the drawer"]


def test_stale_camera_drops_steps_and_splits(tmp_path, contract_file, capsys) -> None:
    script = make_episode(seed=6, duration=3.0, camera_gap=(1.0, 1.8))
    bag = script.write(tmp_path / "stale")
    assert run([bag], tmp_path / "ds", contract_file) == 0
    out = capsys.readouterr().out
    assert "stale frame from camera 'front'" in out
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 2
    first, second = ds.episode(0), ds.episode(1)
    assert not first.success and not first.terminal and first.rewards.sum() == 0  # cut short: truncated
    assert second.success and second.rewards[-1] == 1.0
    # no step whose front frame is older than the 0.3 s limit survived
    for ep in (first, second):
        for s in range(len(ep.actions)):
            t = ep.metadata["start_ns"] + s * NS // 10
            age = t - max(te for te, _, _ in script.frames["/front/image_raw"] if te <= t)
            assert age <= 0.3 * NS
    total = len(first.actions) + len(second.actions)
    steps_without_gap = 30  # 3 s at 10 Hz, the last partial step included
    dropped = steps_without_gap - total
    assert 4 <= dropped <= 6  # 0.8 s gap minus the 0.3 s tolerance -> ~5 stale steps
    assert f"dropped {dropped} step(s)" in out


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
