"""Bad input: each case fails with an error naming bag, topic and field, and the failing bag writes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from bag_factory import TEST_CONTRACT, image_msg, make_episode
from q_transformer_ros.data.convert import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the dataset with its content hash (lock file excluded)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".writer.lock"}


@pytest.fixture
def setup(tmp_path: Path):
    """A contract file and an output dataset that already holds one good episode."""
    contract = tmp_path / "contract.yaml"
    contract.write_text(yaml.safe_dump(TEST_CONTRACT))
    out = tmp_path / "ds"
    good = make_episode(seed=100, duration=1.0).write(tmp_path / "good")
    assert main([str(good), "--out", str(out), "--contract", str(contract), "--no-progress"]) == 0
    return contract, out


def fails(bags: list[Path], contract: Path, out: Path, capsys, *needles: str, extra: tuple[str, ...] = ()) -> str:
    before = snapshot(out)
    another_good = make_episode(seed=101, duration=1.0).write(out.parent / f"good_{len(list(out.parent.iterdir()))}")
    # the bad bag first: it fails before the good one after it is reached (bags commit one by one)
    rc = main([*map(str, bags), str(another_good), "--out", str(out), "--contract", str(contract), "--no-progress",
               *extra])
    err = capsys.readouterr().err
    assert rc == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert snapshot(out) == before, "the dataset changed although the conversion failed"
    return err


@pytest.mark.parametrize("storage,suffix", [("sqlite3", ".db3"), ("mcap", ".mcap")])
def test_truncated_file(tmp_path, setup, capsys, storage, suffix) -> None:
    contract, out = setup
    bag = make_episode(seed=1).write(tmp_path / f"cut_{storage}", storage=storage)
    f = next(bag.glob(f"*{suffix}"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    fails([bag], contract, out, capsys, str(bag))


def test_missing_camera_topic_lists_topics(tmp_path, setup, capsys) -> None:
    contract, out = setup
    s = make_episode(seed=2)
    s.msgs = [m for m in s.msgs if m[0] != "/wrist/image/compressed"]
    bag = s.write(tmp_path / "no_wrist")
    err = fails([bag], contract, out, capsys, str(bag), "camera 'wrist'", "/wrist/image/compressed",
                "the bag has:", "/front/image_raw (sensor_msgs/msg/Image")
    assert "/joint_states" in err


def test_missing_action_topic(tmp_path, setup, capsys) -> None:
    contract, out = setup
    s = make_episode(seed=3)
    s.msgs = [m for m in s.msgs if m[0] != "/gripper"]
    bag = s.write(tmp_path / "no_gripper")
    fails([bag], contract, out, capsys, str(bag), "action (grip) source topic /gripper", "the bag has:")


def test_unknown_encoding(tmp_path, setup, capsys) -> None:
    contract, out = setup
    s = make_episode(seed=4)
    s.msgs = [(t, ty, ts, image_msg(np.zeros((24, 32, 2), np.uint8), "yuv422", ts) if t == "/front/image_raw" else m)
              for t, ty, ts, m in s.msgs]
    bag = s.write(tmp_path / "yuv")
    fails([bag], contract, out, capsys, str(bag), "camera 'front'", "/front/image_raw", "'yuv422'", "32x24")


def test_wrong_size_for_encoding(tmp_path, setup, capsys) -> None:
    contract, out = setup
    s = make_episode(seed=5)
    bad = []
    for t, ty, ts, m in s.msgs:
        if t == "/front/image_raw":
            m.data = m.data[: len(m.data) // 2]  # claims 32x24 bgr8, carries half the bytes
        bad.append((t, ty, ts, m))
    s.msgs = bad
    bag = s.write(tmp_path / "short_frames")
    fails([bag], contract, out, capsys, str(bag), "/front/image_raw", "'bgr8'", "32x24", "needs 2304 bytes", "has 1152")


def test_unexpected_message_type(tmp_path, setup, capsys) -> None:
    contract, out = setup
    s = make_episode(seed=6)
    s.msgs = [(t, "geometry_msgs/msg/Twist", ts, m.twist) if t == "/cmd" else (t, ty, ts, m) for t, ty, ts, m in s.msgs]
    bag = s.write(tmp_path / "twist_not_stamped")
    fails([bag], contract, out, capsys, str(bag), "/cmd", "geometry_msgs/msg/Twist",
          "expects geometry_msgs/msg/TwistStamped")


def test_empty_bag(tmp_path, setup, capsys) -> None:
    contract, out = setup
    bag = tmp_path / "empty"
    from q_transformer_ros.data.bag_writer import BagWriter
    with BagWriter(bag) as w:
        w.add_topic("/front/image_raw", "sensor_msgs/msg/Image")
    fails([bag], contract, out, capsys, str(bag), "empty")


def test_labels_name_missing_bag(tmp_path, setup, capsys) -> None:
    contract, out = setup
    bag = make_episode(seed=7, success=None).write(tmp_path / "run_7")
    labels = tmp_path / "labels.csv"
    labels.write_text("bag,success\nrun_7,true\nrun_8,false\n")
    fails([bag], contract, out, capsys, str(labels), "run_8", "not among the inputs", extra=("--labels", str(labels)))


def test_failed_conversion_into_new_folder_leaves_nothing(tmp_path, capsys) -> None:
    contract = tmp_path / "contract.yaml"
    contract.write_text(yaml.safe_dump(TEST_CONTRACT))
    good = make_episode(seed=8, duration=1.0).write(tmp_path / "good")
    s = make_episode(seed=9)
    s.msgs = [m for m in s.msgs if m[0] != "/front/image_raw"]
    bad = s.write(tmp_path / "bad")
    out = tmp_path / "new_ds"
    assert main([str(bad), str(good), "--out", str(out), "--contract", str(contract), "--no-progress",
                 "--workers", "2"]) == 1
    assert "camera 'front'" in capsys.readouterr().err
    assert not out.exists()  # the first bag failed: the folder this run created is gone again


def test_on_error_skip_converts_the_good_bags(tmp_path, capsys) -> None:
    contract = tmp_path / "contract.yaml"
    contract.write_text(yaml.safe_dump(TEST_CONTRACT))
    good = make_episode(seed=10, duration=1.0).write(tmp_path / "good")
    s = make_episode(seed=11)
    s.msgs = [(t, "geometry_msgs/msg/Twist", ts, m.twist) if t == "/cmd" else (t, ty, ts, m) for t, ty, ts, m in s.msgs]
    bad = s.write(tmp_path / "bad")
    out = tmp_path / "ds"
    rc = main([str(good), str(bad), "--out", str(out), "--contract", str(contract), "--no-progress", "--on-error", "skip"])
    report = capsys.readouterr().out
    assert rc == 1 and "ERROR bad" in report
    from q_transformer_ros.core.replay_dataset import ReplayDataset
    assert ReplayDataset(out).num_episodes == 1


def test_bags_before_a_failing_bag_stay_committed(tmp_path, setup, capsys) -> None:
    """One transaction per bag: a good bag before a bad one is kept; the rerun converts only what is left."""
    contract, out = setup
    first = make_episode(seed=110, duration=1.0).write(tmp_path / "first")
    bad = make_episode(seed=111).write(tmp_path / "bad_cut")
    f = next(bad.glob("*.mcap"))
    f.write_bytes(f.read_bytes()[:2000])
    rc = main([str(first), str(bad), "--out", str(out), "--contract", str(contract), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "bad_cut" in err and "stay in" in err
    from q_transformer_ros.core.replay_dataset import ReplayDataset

    assert {ReplayDataset(out).episode(i).metadata["bag_name"] for i in range(2)} == {"good", "first"}


SERVICE_EVENT_SCHEMAS = {
    # what rosbag2's C++ MCAP writer stores for service-event topics (rosbags cannot parse either form)
    "/robot/reset/_service_event": ("test_msgs/srv/BasicTypes_Event",
                                    "MSG: test_msgs/srv/BasicTypes_Event\nservice_msgs/ServiceEventInfo info\n"
                                    "test_msgs/srv/BasicTypes_Request[<=1] request\n"
                                    "test_msgs/srv/BasicTypes_Response[<=1] response\n"),
    "/robot/add/_service_event": ("example_interfaces/srv/AddTwoInts_Event",
                                  "=" * 80 + "\nSRV: example_interfaces/srv/AddTwoInts\nint64 a\nint64 b\n---\n"
                                  "int64 sum\n"),
}


def test_mcap_with_service_event_topics_converts(tmp_path, setup, capsys) -> None:
    """Topics the contract does not name never stop a bag: service-event schemas rosbags cannot parse."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from bag_factory import TS
    from q_transformer_ros.core.replay_dataset import ReplayDataset

    contract, out = setup
    script = make_episode(seed=120, duration=1.0)
    path = tmp_path / "with_services"
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {}
        for topic, msgtype, _, _ in script.msgs:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=TS)
        events = {topic: w.add_connection(topic, msgtype, msgdef=text, rihs01="RIHS01_" + "0" * 64)
                  for topic, (msgtype, text) in SERVICE_EVENT_SCHEMAS.items()}
        for topic, _, t, msg in sorted(script.msgs, key=lambda m: m[2]):
            w.write(conns[topic], t, TS.serialize_cdr(msg, msg.__msgtype__))
            if topic == "/cmd":
                for conn in events.values():
                    w.write(conn, t + 1, b"\x00\x01\x00\x00" + bytes(40))
    assert main([str(path), "--out", str(out), "--contract", str(contract), "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert ReplayDataset(out).num_episodes == 2  # the setup's bag and this one


def test_unsupported_serialization_format_says_so(tmp_path, setup, capsys) -> None:
    contract, out = setup
    bag = make_episode(seed=121, duration=1.0).write(tmp_path / "json_bag", storage="sqlite3")
    meta = bag / "metadata.yaml"
    meta.write_text(meta.read_text().replace("serialization_format: cdr", "serialization_format: json"))
    err = fails([bag], contract, out, capsys, str(bag), "unsupported serialization format", "json")
    assert "truncated, corrupt" not in err
