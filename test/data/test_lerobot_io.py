"""LeRobot datasets in and out, checked against the REAL lerobot writers (test/data/lerobot_factory.py).

v3.0 test data are written in-process by lerobot 0.4.4; v2.1 test data by lerobot 0.3.3 (the last
release that writes v2.1) in a subprocess, both installed by scripts/setup_env.sh. Stored steps are
compared with the frames and actions handed to the writer: actions exactly, frames within the video
codec's error after the contract's resize (``preprocess_frame``, the converter's and node's path).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from lerobot_factory import smooth_frames, write_v21, write_with_lerobot
from q_transformer_ros.contract import CameraSpec
from q_transformer_ros.data import lerobot_import
from q_transformer_ros.data.image import preprocess_frame
from q_transformer_ros.data.lerobot_export import main as export_main
from q_transformer_ros.data.lerobot_import import main as import_main
from q_transformer_ros.replay import EpisodeData, ReplayWriter
from q_transformer_ros.replay.reader import ReplayReader
from q_transformer_ros.replay.testing import tiny_contract

try:  # the real writer: never skip silently (CI must exercise it)
    import lerobot  # noqa: F401
except ImportError as exc:
    pytest.fail(f"lerobot (the real LeRobot writer) is not importable: {exc}; run bash scripts/setup_env.sh "
                f"(requirements/no-deps/venv.txt)", pytrace=False)

FPS = 10
H, W = 32, 48  # what the writer stores; the contract cameras are 16x16 (resized on import)
SIZE = 16
FRAME_TOL = 10.0  # mean |stored - expected| per frame, uint8 levels: AV1 at LeRobot's crf 30 on smooth frames
VERSIONS = ("v3.0", "v2.1")


def video(shape=(H, W, 3)) -> dict:
    return {"dtype": "video", "shape": shape, "names": ["height", "width", "channels"]}


def vec(n: int, names=None) -> dict:
    return {"dtype": "float32", "shape": (n,), "names": names}


FLAG = {"dtype": "bool", "shape": (1,), "names": None}

# "single": one camera, state + action, success flags, two tasks over three episodes
SINGLE_TASKS = ["pick the cube", "open the drawer", "pick the cube"]
SINGLE_LENGTHS = [6, 5, 7]
SINGLE_SUCCESS_AT = [4, None, 6]  # next.success True from this frame on (None: never)
# "pair": two cameras, a 4-vector action with names, no success columns (labels file)
PAIR_LENGTHS = [5, 6]


def single_spec(root: Path) -> dict:
    rng = np.random.default_rng(1)
    episodes = []
    for e, (task, T, at) in enumerate(zip(SINGLE_TASKS, SINGLE_LENGTHS, SINGLE_SUCCESS_AT)):
        imgs = smooth_frames(T, H, W, seed=e)
        acts = rng.uniform(-0.9, 0.9, size=(T, 3)).astype(np.float32)
        if e == 2:
            acts[3, 2] = 1.5  # outside the contract range: reported, kept (clipped into the edge bin at load)
        frames = [{"observation.images.front": imgs[t], "observation.state": rng.normal(size=4).astype(np.float32),
                   "action": acts[t], "next.success": np.array([at is not None and t >= at]),
                   "next.done": np.array([t == T - 1])} for t in range(T)]
        episodes.append({"task": task, "frames": frames})
    return {"root": str(root), "fps": FPS, "episodes": episodes,
            "features": {"observation.images.front": video(), "observation.state": vec(4), "action": vec(3),
                         "next.success": FLAG, "next.done": FLAG}}


def pair_spec(root: Path) -> dict:
    rng = np.random.default_rng(2)
    episodes = []
    for e, T in enumerate(PAIR_LENGTHS):
        top, wrist = smooth_frames(T, H, W, seed=10 + e), smooth_frames(T, H, W, seed=20 + e)
        acts = rng.uniform(-0.9, 0.9, size=(T, 4)).astype(np.float32)
        episodes.append({"task": "stack the blocks", "frames": [
            {"observation.images.top": top[t], "observation.images.wrist": wrist[t], "action": acts[t]} for t in range(T)]})
    return {"root": str(root), "fps": FPS, "episodes": episodes,
            "features": {"observation.images.top": video(), "observation.images.wrist": video(),
                         "action": vec(4, ["x", "y", "z", "grip"])}}


def images_spec(root: Path) -> dict:
    """Image columns instead of videos (``use_videos=False``), a dense reward with a success threshold."""
    rng = np.random.default_rng(3)
    episodes = []
    for e, T in enumerate((4, 5)):
        imgs = smooth_frames(T, H, W, seed=30 + e)
        reward = np.linspace(0.0, 1.0 if e == 0 else 0.6, T).astype(np.float32)
        episodes.append({"task": "push the T", "frames": [
            {"observation.image": imgs[t], "action": rng.uniform(-0.9, 0.9, 3).astype(np.float32),
             "next.reward": reward[t:t + 1]} for t in range(T)]})
    return {"root": str(root), "fps": FPS, "episodes": episodes, "use_videos": False,
            "features": {"observation.image": {"dtype": "image", "shape": (H, W, 3), "names": ["height", "width", "channels"]},
                         "action": vec(3), "next.reward": {"dtype": "float32", "shape": (1,), "names": None}}}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, dict]]:
    """(name, version) -> (dataset folder, the spec handed to the real writer)."""
    base = tmp_path_factory.mktemp("lerobot")
    out = {}
    v21 = []
    for name, make in (("single", single_spec), ("pair", pair_spec), ("images", images_spec)):
        spec = make(base / f"{name}_v30")
        write_with_lerobot(spec)
        out[(name, "v3.0")] = (Path(spec["root"]), spec)
        spec21 = make(base / f"{name}_v21")
        v21.append(spec21)
        out[(name, "v2.1")] = (Path(spec21["root"]), spec21)
    write_v21(v21, base)
    for (name, version), (root, _) in out.items():
        info = json.loads((root / "meta" / "info.json").read_text())
        assert info["codebase_version"] == version, (name, info["codebase_version"])
    return out


def contract_file(tmp_path: Path, cameras: int = 1, state_dim: int = 0) -> Path:
    c = tiny_contract(num_cameras=cameras, size=SIZE, num_dims=3, frame_history=2, state_dim=state_dim)
    path = tmp_path / "contract.yaml"
    path.write_text(c.to_yaml())
    return path


def expected_frame(img: np.ndarray) -> np.ndarray:
    return preprocess_frame(img, "rgb8", CameraSpec(name="cam0", topic="/cam0", height=SIZE, width=SIZE))


def assert_frames_match(stored: np.ndarray, written_imgs: list[np.ndarray], who: str) -> None:
    """Each stored frame is close to its own written frame, and closer to it than to its neighbours."""
    exp = np.stack([expected_frame(i) for i in written_imgs]).astype(np.float64)
    assert stored.shape == exp.shape, (who, stored.shape, exp.shape)
    for t in range(len(stored)):
        errs = np.abs(exp - stored[t].astype(np.float64)).mean(axis=(1, 2, 3))
        assert errs[t] < FRAME_TOL, f"{who} frame {t}: mean error {errs[t]:.2f}"
        assert int(np.argmin(errs)) == t, f"{who} frame {t} looks like written frame {int(np.argmin(errs))}: {errs.round(1)}"


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_one_camera_state_action_success_flags_several_tasks(version, written, tmp_path, capsys):
    root, spec = written[("single", version)]
    out, report = tmp_path / "ds", tmp_path / "report.json"
    rc = import_main([str(root), "--out", str(out), "--contract", str(contract_file(tmp_path)), "--camera",
                      "cam0=observation.images.front", "--report-json", str(report), "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    r = ReplayReader(out)
    assert r.num_episodes == 3
    kept = [at + 1 if at is not None else T for at, T in zip(SINGLE_SUCCESS_AT, SINGLE_LENGTHS)]
    for e, ep in enumerate(r):
        frames = spec["episodes"][e]["frames"][:kept[e]]
        assert ep.length == kept[e]
        np.testing.assert_array_equal(ep.actions, np.stack([f["action"] for f in frames]))
        assert ep.instruction == SINGLE_TASKS[e]
        assert ep.entry.success == (SINGLE_SUCCESS_AT[e] is not None)
        assert ep.entry.terminal  # a success, or a failure the success column says (a verdict, as for bags)
        assert ep.rewards.tolist() == [0.0] * (kept[e] - 1) + [1.0 if ep.entry.success else 0.0]
        assert_frames_match(np.asarray(ep.frames["cam0"]), [f["observation.images.front"] for f in frames],
                            f"{version} episode {e}")
        assert ep.entry.metadata["episode_index"] == e and ep.entry.metadata["lerobot_version"] == version
    rep = json.loads(report.read_text())[0]
    assert (rep["status"], rep["episodes"], rep["successes"], rep["steps"]) == ("converted", 3, 2, sum(kept))
    assert rep["dropped"] == {"after the success frame": SINGLE_LENGTHS[0] - kept[0]}
    assert rep["clipped"] == {"a2": 1}
    assert any("observation.state" in n and "no state inputs" in n for n in rep["notes"])
    assert sorted(rep["instructions"]) == ["open the drawer", "pick the cube"]
    assert "WARNING" in text.out and "'a2'" in text.out and "CLIPPED" in text.out


@pytest.mark.parametrize("version", VERSIONS)
def test_state_inputs_from_observation_state(version, written, tmp_path, capsys):
    root, spec = written[("single", version)]
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"cameras": {"cam0": "observation.images.front"},
                                       "state": {"key": "observation.state", "dims": {"s0": 3, "s1": 1}}}))
    report = tmp_path / "report.json"
    assert import_main([str(root), "--out", str(tmp_path / "ds"), "--contract", str(contract_file(tmp_path, state_dim=2)),
                        "--mapping", str(mapping), "--report-json", str(report), "--no-progress"]) == 0, \
        capsys.readouterr().err
    kept = [at + 1 if at is not None else T for at, T in zip(SINGLE_SUCCESS_AT, SINGLE_LENGTHS)]
    for e, ep in enumerate(ReplayReader(tmp_path / "ds")):
        frames = spec["episodes"][e]["frames"][:kept[e]]
        np.testing.assert_array_equal(ep.state, np.stack([f["observation.state"][[3, 1]] for f in frames]))
    assert not any("not imported" in n for n in json.loads(report.read_text())[0]["notes"])
    # a contract with state inputs and a dataset without a state feature: the error names info.json
    pair_root, _ = written[("pair", version)]
    assert import_main([str(pair_root), "--out", str(tmp_path / "no_state"), "--contract",
                        str(contract_file(tmp_path, cameras=2, state_dim=2)), "--success", "--camera",
                        "cam0=observation.images.top", "--camera", "cam1=observation.images.wrist", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(pair_root / "meta" / "info.json") in err and "'observation.state' is not in 'features'" in err


@pytest.mark.parametrize("version", VERSIONS)
def test_two_cameras_action_names_labels_file(version, written, tmp_path, capsys):
    root, spec = written[("pair", version)]
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({
        "cameras": {"cam0": "observation.images.top", "cam1": "observation.images.wrist"},
        "action": {"key": "action", "dims": {"a0": "x", "a1": "z", "a2": 3}},
    }))
    args = [str(root), "--out", str(tmp_path / "ds"), "--contract", str(contract_file(tmp_path, cameras=2)),
            "--mapping", str(mapping), "--no-progress"]
    # no success column and no labels: refused before anything is written
    assert import_main(args) == 1
    err = capsys.readouterr().err
    assert "episode(s) [0, 1] have no success label" in err and "--labels" in err
    assert not (tmp_path / "ds").exists()
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([["bag", "success"], [f"{root.name}#0", "true"], [f"{root.name}#1", "false"]])
    assert import_main(args + ["--labels", str(labels)]) == 0, capsys.readouterr().err
    r = ReplayReader(tmp_path / "ds")
    assert [ep.entry.success for ep in r] == [True, False]
    assert [ep.entry.terminal for ep in r] == [True, True]  # a labels-file entry is a verdict
    for e, ep in enumerate(r):
        frames = spec["episodes"][e]["frames"]
        np.testing.assert_array_equal(ep.actions, np.stack([f["action"][[0, 2, 3]] for f in frames]))
        assert ep.instruction == "stack the blocks"
        assert_frames_match(np.asarray(ep.frames["cam0"]), [f["observation.images.top"] for f in frames], f"top {e}")
        assert_frames_match(np.asarray(ep.frames["cam1"]), [f["observation.images.wrist"] for f in frames], f"wrist {e}")


@pytest.mark.parametrize("version", VERSIONS)
def test_image_columns_and_a_reward_threshold(version, written, tmp_path, capsys):
    root, spec = written[("images", version)]
    assert json.loads((root / "meta" / "info.json").read_text())["features"]["observation.image"]["dtype"] == "image"
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"success": {"column": "next.reward", "threshold": 0.95, "failure": "truncated"},
                                       "reward": "next.reward"}))
    assert import_main([str(root), "--out", str(tmp_path / "ds"), "--contract", str(contract_file(tmp_path)),
                        "--mapping", str(mapping), "--no-progress"]) == 0, capsys.readouterr().err
    r = ReplayReader(tmp_path / "ds")
    assert [(ep.entry.success, ep.entry.terminal) for ep in r] == [(True, True), (False, False)]
    for e, ep in enumerate(r):
        frames = spec["episodes"][e]["frames"]
        np.testing.assert_array_equal(ep.rewards, np.concatenate([np.asarray(f["next.reward"]) for f in frames]))
        assert_frames_match(np.asarray(ep.frames["cam0"]), [f["observation.image"] for f in frames], f"{version} {e}")
        assert np.array_equal(ep.frames["cam0"], np.stack([expected_frame(f["observation.image"]) for f in frames]))  # PNG: lossless


def test_success_from_the_last_frame_of_done_episodes(written, tmp_path, capsys):
    root, _ = written[("single", "v3.0")]
    assert import_main([str(root), "--out", str(tmp_path / "ds"), "--contract", str(contract_file(tmp_path)),
                        "--camera", "cam0=observation.images.front", "--success-column", "next.done",
                        "--no-progress"]) == 0, capsys.readouterr().err
    r = ReplayReader(tmp_path / "ds")
    assert [(ep.length, ep.entry.success, ep.entry.terminal) for ep in r] == [(T, True, True) for T in SINGLE_LENGTHS]


def test_dropped_rows_are_counted_with_their_reason(written, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, spec = written[("single", "v3.0")]
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    data = broken / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    cols = table.to_pydict()
    # episode 2 (rows 11..17): a NaN action at frame 1, a timestamp with no video frame near it at frame 3
    cols["action"][11 + 1] = [float("nan"), 0.0, 0.0]
    cols["timestamp"][11 + 3] += 0.05
    pq.write_table(pa.table(cols, schema=table.schema), data)
    report = tmp_path / "report.json"
    assert import_main([str(broken), "--out", str(tmp_path / "ds"), "--contract", str(contract_file(tmp_path)),
                        "--camera", "cam0=observation.images.front", "--min-steps", "2", "--report-json", str(report),
                        "--no-progress"]) == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())[0]
    assert rep["dropped"] == {
        "after the success frame": 1,
        "NaN/inf in the action": 1,
        "no frame of video 'observation.images.front' within 0.0333 s of the row's timestamp": 1,
        "episode shorter than --min-steps 2": 2,  # frame 0 and frame 2, each alone between dropped rows
    }
    r = ReplayReader(tmp_path / "ds")
    lengths = [(ep.entry.metadata["episode_index"], ep.length, ep.entry.success, ep.entry.terminal) for ep in r]
    # episode 2 keeps frame 2 alone (dropped: shorter than 2) and frames 4..6 (the success at 6)
    assert lengths == [(0, 5, True, True), (1, 5, False, True), (2, 3, True, True)]
    np.testing.assert_array_equal(r.episode(2).actions, np.stack([f["action"] for f in spec["episodes"][2]["frames"][4:]]))
    assert rep["steps"] == 13


def test_a_faster_dataset_is_thinned_to_the_control_rate(tmp_path, capsys):
    """20 fps data, a 10 Hz contract: with --thin, frames 0, 2, 4, ... are the steps and each step's action
    is the last one before the next step (the converter's rule for commands faster than the control rate)."""
    rng = np.random.default_rng(4)
    T = 9
    imgs, acts = smooth_frames(T, H, W, seed=40), rng.uniform(-0.9, 0.9, (T, 3)).astype(np.float32)
    spec = {"root": str(tmp_path / "fast"), "fps": 20, "features": {"observation.images.front": video(),
                                                                    "action": vec(3), "next.success": FLAG},
            "episodes": [{"task": "wave", "frames": [{"observation.images.front": imgs[t], "action": acts[t],
                                                      "next.success": np.array([t == T - 1])} for t in range(T)]}]}
    write_with_lerobot(spec)
    args = [spec["root"], "--out", str(tmp_path / "ds"), "--contract", str(contract_file(tmp_path)),
            "--camera", "cam0=observation.images.front", "--report-json", str(tmp_path / "r.json"), "--no-progress"]
    assert import_main(args) == 1
    assert "'fps' = 20" in (err := capsys.readouterr().err) and "--thin" in err
    assert import_main(args + ["--thin"]) == 0, capsys.readouterr().err
    ep = ReplayReader(tmp_path / "ds").episode(0)
    steps = [0, 2, 4, 6, 8]
    np.testing.assert_array_equal(ep.actions, acts[[1, 3, 5, 7, 8]])
    assert_frames_match(np.asarray(ep.frames["cam0"]), [imgs[t] for t in steps], "thinned")
    assert (ep.entry.success, ep.entry.terminal, ep.entry.metadata["frame_stride"]) == (True, True, 2)
    rep = json.loads((tmp_path / "r.json").read_text())[0]
    assert rep["dropped"] == {"thinned to the contract's control rate (1 frame in 2 is a step)": 4}


def test_rerun_skips_and_a_crashed_run_resumes_to_the_same_dataset(written, tmp_path, monkeypatch, capsys):
    root, _ = written[("single", "v3.0")]
    contract = contract_file(tmp_path)
    base = [str(root), "--contract", str(contract), "--camera", "cam0=observation.images.front",
            "--episodes-per-chunk", "1", "--no-progress"]
    assert import_main(base + ["--out", str(tmp_path / "once")]) == 0
    manifest = (tmp_path / "once" / "manifest.json").read_bytes()
    report = tmp_path / "again.json"
    assert import_main(base + ["--out", str(tmp_path / "once"), "--report-json", str(report)]) == 0
    assert (tmp_path / "once" / "manifest.json").read_bytes() == manifest
    rep = json.loads(report.read_text())[0]
    assert rep["status"] == "already in dataset" and rep["steps"] == 0
    assert rep["notes"]["LeRobot episodes already in the dataset (skipped)"] == 3

    # the same episodes in another folder (here: written by the v2.1 writer) are recognised by content,
    # also within one run
    both = tmp_path / "both.json"
    assert import_main([str(root), str(written[("single", "v2.1")][0]), "--out", str(tmp_path / "both"),
                        "--report-json", str(both), *base[1:]]) == 0
    assert len(ReplayReader(tmp_path / "both").manifest.episodes) == 3
    reps = json.loads(both.read_text())
    assert [(r["status"], r["episodes"]) for r in reps] == [("converted", 3), ("already in dataset", 0)]
    assert reps[1]["notes"]["LeRobot episodes already in the dataset (skipped)"] == 3

    real = lerobot_import.DatasetImport.episode

    def crash_on_third(self, ep):
        if ep.index == 2:
            raise KeyboardInterrupt("killed")
        return real(self, ep)

    monkeypatch.setattr(lerobot_import.DatasetImport, "episode", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        import_main(base + ["--out", str(tmp_path / "resumed")])
    assert len(ReplayReader(tmp_path / "resumed").manifest.episodes) == 2  # two groups were committed
    monkeypatch.setattr(lerobot_import.DatasetImport, "episode", real)
    assert import_main(base + ["--out", str(tmp_path / "resumed")]) == 0
    assert (tmp_path / "resumed" / "manifest.json").read_bytes() == manifest
    for chunk in (tmp_path / "once" / "chunks").iterdir():
        for f in chunk.iterdir():
            assert (tmp_path / "resumed" / "chunks" / chunk.name / f.name).read_bytes() == f.read_bytes(), f
    capsys.readouterr()


def test_errors_name_the_file_and_the_column(written, tmp_path, capsys):
    import pyarrow.parquet as pq

    root, _ = written[("single", "v3.0")]
    contract = str(contract_file(tmp_path))
    cam = ["--camera", "cam0=observation.images.front", "--no-progress"]

    def err(*args: str) -> str:
        assert import_main([*args, "--contract", contract, *cam]) == 1
        return capsys.readouterr().err

    info = str(root / "meta" / "info.json")
    e = err(str(root), "--out", str(tmp_path / "a"), "--success-column", "next.nope")
    assert info in e and "'next.nope'" in e
    mapping = tmp_path / "m.yaml"
    mapping.write_text(yaml.safe_dump({"action": {"dims": {"a0": 0, "a1": 1, "a2": 7}}}))
    e = err(str(root), "--out", str(tmp_path / "b"), "--mapping", str(mapping))
    assert info in e and "index 7" in e and "'action' has shape [3]" in e
    mapping.write_text(yaml.safe_dump({"cameras": {"cam0": "observation.images.front"}, "bogus": 1}))
    e = err(str(root), "--out", str(tmp_path / "c"), "--mapping", str(mapping))
    assert str(mapping) in e and "'bogus'" in e
    # a data file that lacks the action column
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    data = broken / "data" / "chunk-000" / "file-000.parquet"
    pq.write_table(pq.read_table(data).drop_columns(["action"]), data)
    e = err(str(broken), "--out", str(tmp_path / "d"))
    assert str(data) in e and "'action'" in e and "missing" in e
    # a per-frame shape that contradicts info.json
    info_doc = json.loads((broken / "meta" / "info.json").read_text())
    shutil.copy(root / "data" / "chunk-000" / "file-000.parquet", data)
    info_doc["features"]["action"]["shape"] = [2]
    (broken / "meta" / "info.json").write_text(json.dumps(info_doc))
    e = err(str(broken), "--out", str(tmp_path / "e"))
    assert str(broken / "meta" / "info.json") in e and "index 2" in e  # the contract's third dim, a 2-vector
    info_doc["features"]["action"]["shape"] = [5]
    (broken / "meta" / "info.json").write_text(json.dumps(info_doc))
    e = err(str(broken), "--out", str(tmp_path / "f"))
    assert str(data) in e and "column 'action' has shape (3,) per frame, expected (5,)" in e
    # fps against the contract's control rate
    info_doc["features"]["action"]["shape"] = [3]
    info_doc["fps"] = 30
    (broken / "meta" / "info.json").write_text(json.dumps(info_doc))
    e = err(str(broken), "--out", str(tmp_path / "g"))
    assert "'fps' = 30" in e and "control_rate_hz" in e
    for name in "abcdefg":
        assert not (tmp_path / name).exists()


# ---------------------------------------------------------------------------------------------
# export and the round trip
# ---------------------------------------------------------------------------------------------

def our_dataset(path: Path) -> Path:
    """Three episodes: a success, a terminal failure with dense rewards, a truncated one without
    instruction; two cameras and two state inputs."""
    c = tiny_contract(num_cameras=2, size=32, num_dims=3, frame_history=2, state_dim=2)
    rng = np.random.default_rng(5)
    eps = []
    for i, (T, success, terminal, ins) in enumerate([(6, True, True, "pick"), (5, False, True, "place"),
                                                     (7, False, False, None)]):
        frames = {f"cam{k}": smooth_frames(T, 32, 32, seed=3 * i + k).transpose(0, 3, 1, 2).copy() for k in range(2)}
        rewards = np.linspace(0, 0.5, T).astype(np.float32) if i == 1 else None
        eps.append(EpisodeData(frames=frames, actions=rng.uniform(-1, 1, (T, 3)).astype(np.float32), success=success,
                               terminal=terminal, instruction=ins, source_id=f"ep{i}", rewards=rewards,
                               state=rng.uniform(-2, 2, (T, 2)).astype(np.float32)))
    with ReplayWriter(path, c) as w:
        w.add_episodes(eps)
    return path


def test_export_opens_in_lerobot_and_round_trips(tmp_path, capsys):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.datasets.video_utils import get_video_info

    ours = our_dataset(tmp_path / "ours")
    lr = tmp_path / "lerobot"
    assert export_main([str(ours), "--out", str(lr), "--episodes-per-file", "2"]) == 0, capsys.readouterr().err
    assert export_main([str(ours), "--out", str(lr)]) == 1
    assert "already exists" in capsys.readouterr().err
    # LeRobot's own reader opens it: metadata, tasks, per-frame tables, videos
    ds = LeRobotDataset("local/ours", root=lr)
    assert (ds.meta.total_episodes, ds.meta.total_frames, ds.fps) == (3, 18, 10)
    assert list(ds.meta.tasks.index) == ["pick", "place", ""]
    assert ds.meta.features["action"]["names"] == ["a0", "a1", "a2"]
    assert ds.meta.features["observation.state"]["names"] == ["s0", "s1"]
    src = ReplayReader(ours)
    np.testing.assert_array_equal(np.stack([np.asarray(a) for a in ds.hf_dataset["action"]]),
                                  np.concatenate([e.actions for e in src]))
    assert ds.meta.episodes[1]["dataset_from_index"] == 6 and ds.meta.episodes[2]["tasks"] == [""]
    assert [ds.meta.episodes[i]["data/file_index"] for i in range(3)] == [0, 0, 1]  # two episodes per file
    assert ds.meta.episodes[2]["videos/observation.images.cam0/from_timestamp"] == 0.0
    for cam in ("cam0", "cam1"):
        vinfo = get_video_info(lr / ds.meta.get_video_file_path(0, f"observation.images.{cam}"))
        assert vinfo["video.codec"] == "av1" and vinfo["video.fps"] == 10 and vinfo["video.height"] == 32
    assert ds.meta.stats["action"]["mean"].shape == (3,)
    # ... and back: actions, rewards, terminals, instructions exact; frames within the codec's error
    back = tmp_path / "back"
    contract = tmp_path / "contract.yaml"
    contract.write_text(src.contract.to_yaml())
    assert import_main([str(lr), "--out", str(back), "--contract", str(contract), "--reward", "next.reward",
                        "--no-progress"]) == 0, capsys.readouterr().err
    for a, b in zip(src, ReplayReader(back)):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
        np.testing.assert_array_equal(a.terminals, b.terminals)
        np.testing.assert_array_equal(a.truncated, b.truncated)
        np.testing.assert_array_equal(a.state, b.state)
        assert (a.entry.success, a.instruction) == (b.entry.success, b.instruction)
        for cam in ("cam0", "cam1"):
            err = np.abs(np.asarray(a.frames[cam], np.float64) - np.asarray(b.frames[cam])).mean()
            assert err < FRAME_TOL, (cam, err)
    assert len(ReplayReader(back).manifest.episodes) == 3


# ---------------------------------------------------------------------------------------------
# end to end: a LeRobot dataset -> our trainer -> our policy
# ---------------------------------------------------------------------------------------------

def test_lerobot_dataset_trains_and_the_policy_decides(written, tmp_path, one_thread, capsys):
    from q_transformer_ros.core.policy import QTransformerPolicy
    from q_transformer_ros.core.trainer import TrainConfig, train

    from q_transformer_ros.observation import Observation

    root, spec = written[("single", "v3.0")]
    assert import_main([str(root), "--out", str(tmp_path / "ds"), "--contract", str(contract_file(tmp_path, state_dim=2)),
                        "--camera", "cam0=observation.images.front", "--no-progress"]) == 0
    result = train(TrainConfig(
        dataset=[str(tmp_path / "ds")], out=str(tmp_path / "run"), model_preset="tiny",
        model_overrides={"dim": 8, "depth": (1,), "dim_head": 4, "heads": 2, "tokens_per_frame": 2,
                         "window_size": 4, "dropout": 0.0},
        text_encoder={"pretrained": None, "text_overrides": {"width": 32, "layers": 1, "heads": 2, "embed_dim": 32}},
        batch_size=8, steps=3, warmup_steps=1, checkpoint_every=1000, log_every=1, device="cpu", progress=False,
    ))
    policy = QTransformerPolicy.from_checkpoint(Path(result.checkpoint), device="cpu")
    policy.reset("pick the cube")
    first = spec["episodes"][0]["frames"][0]
    policy.push(Observation({"cam0": expected_frame(first["observation.images.front"])}, first["observation.state"][:2]))
    decision = policy.decide()
    assert decision.bins.shape == (3,) and np.all((decision.action >= -1) & (decision.action <= 1))
    capsys.readouterr()


def test_still_stretches_are_cut_as_the_bag_converter_cuts_them(tmp_path, capsys):
    """``lerobot_import --keep-still-steps``: an operator who paused for 16 frames (the same action, the
    state standing still) keeps the first 2 of them, as ``convert_bag`` would (``replay.still_steps``)."""
    T, still = 30, range(10, 26)
    rng = np.random.default_rng(5)
    imgs = smooth_frames(T, H, W, seed=50)
    state = np.cumsum(rng.normal(0.0, 0.1, size=(T, 2)), axis=0).astype(np.float32)
    acts = (np.where((np.arange(T) % 2 == 0)[:, None], 0.8, -0.8) * np.ones((T, 3))).astype(np.float32)
    for t in still:
        state[t], acts[t] = state[still[0]], [0.0, 0.0, 0.5]
    spec = {"root": str(tmp_path / "paused"), "fps": FPS, "features": {
        "observation.images.front": video(), "observation.state": vec(2), "action": vec(3),
        "next.success": FLAG, "next.done": FLAG},
        "episodes": [{"task": "pick the cube", "frames": [
            {"observation.images.front": imgs[t], "observation.state": state[t], "action": acts[t],
             "next.success": np.array([False]), "next.done": np.array([t == T - 1])} for t in range(T)]}]}
    write_with_lerobot(spec)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"cameras": {"cam0": "observation.images.front"},
                                       "state": {"key": "observation.state", "dims": {"s0": 0, "s1": 1}}}))
    report = tmp_path / "report.json"
    argv = [spec["root"], "--contract", str(contract_file(tmp_path, state_dim=2)), "--mapping", str(mapping),
            "--report-json", str(report), "--no-progress"]
    assert import_main([*argv, "--out", str(tmp_path / "ds"), "--keep-still-steps", "2"]) == 0, capsys.readouterr().err
    kept = [t for t in range(T) if not 13 <= t <= 24]  # the pause's first step changes the action; 2 still ones stay
    (ep,) = list(ReplayReader(tmp_path / "ds"))
    np.testing.assert_array_equal(ep.actions, acts[kept])
    np.testing.assert_array_equal(ep.state, state[kept])
    assert_frames_match(np.asarray(ep.frames["cam0"]), [imgs[t] for t in kept], "paused episode")
    assert ep.entry.terminal and not ep.entry.success
    rep = json.loads(report.read_text())[0]
    assert rep["dropped"] == {"arm still and command repeated (beyond --keep-still-steps 2)": 12}
    # without the option every frame is a step; a contract without state inputs cannot use it
    assert import_main([*argv, "--out", str(tmp_path / "all")]) == 0
    assert [ep.length for ep in ReplayReader(tmp_path / "all")] == [T]
    assert import_main([spec["root"], "--out", str(tmp_path / "x"), "--contract", str(contract_file(tmp_path)),
                        "--camera", "cam0=observation.images.front", "--keep-still-steps", "2", "--no-progress"]) == 1
    assert "declares no state_inputs" in capsys.readouterr().err
