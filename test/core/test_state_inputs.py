"""Robot-state inputs through the core: contract, dataset, model, learner, trainer, policy (torch and
ONNX). The learning test is the behavioural proof: frames carry no information, only the state says
which action succeeds, and the greedy action of the trained policy must follow the state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from q_transformer_ros.contract import ContractError, RobotContract, load_contract
from q_transformer_ros.core.model import ModelConfig, QTransformerNet
from q_transformer_ros.core.policy import PolicyInputError, QTransformerPolicy
from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.observation import Observation, ObservationError
from q_transformer_ros.replay import DatasetError, EpisodeData, ReplayWriter
from q_transformer_ros.replay.testing import random_episode, tiny_contract

pytestmark = pytest.mark.usefixtures("one_thread")

T = 16
JOINT_STATE = {"topic": "/joint_states", "msg_type": "sensor_msgs/msg/JointState", "field": "position"}


def contract_dict(**state) -> dict:
    ref = {"topic": "/cmd", "msg_type": "std_msgs/msg/Float64MultiArray"}
    return {
        "name": "arm", "frame_history": 2,
        "cameras": [{"name": "wrist", "topic": "/wrist", "height": 16, "width": 16}],
        "action_dims": [{"name": "x", "low": -1, "high": 1, "bins": 4, "source": {**ref, "field": "data[0]"},
                         "target": {**ref, "field": "data[0]"}}],
        "instruction": {"allow_none": True, "topic": None}, "success": {"topic": "/success"},
        "state_inputs": [{"name": "elbow", "low": -3.0, "high": 1.0, "source": {**JOINT_STATE, "joint": "elbow"}},
                         {"name": "ee_z", "low": 0.0, "high": 0.5,
                          "source": {"topic": "/ee_pose", "msg_type": "geometry_msgs/msg/PoseStamped",
                                     "field": "pose.position.z"}}],
        **state,
    }


# -- contract -------------------------------------------------------------------------------------

def test_contract_parses_state_inputs_and_normalises_by_range(tmp_path) -> None:
    c = RobotContract.from_dict(contract_dict())
    assert c.state_dim == 2 and [s.name for s in c.state_inputs] == ["elbow", "ee_z"]
    assert c.state_inputs[0].source.joint == "elbow"
    np.testing.assert_allclose(c.normalize_state(np.array([[-3.0, 0.0], [1.0, 0.5], [-1.0, 0.25]])),
                               [[-1, -1], [1, 1], [0, 0]], atol=1e-6)
    assert c.normalize_state(np.array([100.0, -100.0])).tolist() == [3.0, -3.0]  # clipped
    again = RobotContract.from_dict(c.to_dict())
    assert again == c
    (tmp_path / "c.yaml").write_text(c.to_yaml())
    assert load_contract(tmp_path / "c.yaml") == c


def test_contract_without_state_keeps_its_dict_and_fingerprint() -> None:
    d = contract_dict()
    del d["state_inputs"]
    c = RobotContract.from_dict(d)
    assert "state_inputs" not in c.to_dict()
    assert c.fingerprint() == RobotContract.from_dict(c.to_dict()).fingerprint()


@pytest.mark.parametrize("bad, message", [
    ({"low": 1.0, "high": 1.0}, "state_inputs[0].low/high"),
    ({"name": "ee_z"}, "duplicate state input name"),
    ({"source": {"topic": "/x", "msg_type": "Pose", "field": "position"}}, "state_inputs[0].source.msg_type"),
    ({"source": {"topic": "/x", "msg_type": "geometry_msgs/msg/Pose", "field": "position..x"}}, "state_inputs[0].source.field"),
    ({"source": {"topic": "/x", "msg_type": "geometry_msgs/msg/Pose", "field": "position.x", "joint": "j"}}, "joint names apply"),
])
def test_contract_state_errors_name_the_key(bad, message) -> None:
    d = contract_dict()
    d["state_inputs"][0] = {**d["state_inputs"][0], **bad}
    with pytest.raises(ContractError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RobotContract.from_dict(d)


def test_contracts_with_other_state_inputs_are_incompatible() -> None:
    a = RobotContract.from_dict(contract_dict())
    d = contract_dict()
    d["state_inputs"] = d["state_inputs"][:1]
    with pytest.raises(ContractError, match="state inputs differ"):
        a.check_compatible(RobotContract.from_dict(d), what="dataset", where="here")


def test_observation_check_names_camera_and_state_input() -> None:
    c = RobotContract.from_dict(contract_dict())
    frame = np.zeros((3, 16, 16), np.uint8)
    Observation({"wrist": frame}, np.array([0.0, 0.1])).check(c)
    with pytest.raises(ObservationError, match="no state"):
        Observation({"wrist": frame}).check(c)
    with pytest.raises(ObservationError, match="'ee_z' is nan"):
        Observation({"wrist": frame}, np.array([0.0, np.nan])).check(c)
    with pytest.raises(ObservationError, match="camera 'wrist'"):
        Observation({"wrist": np.zeros((16, 16, 3), np.uint8)}, np.array([0.0, 0.1])).check(c)


# -- dataset --------------------------------------------------------------------------------------

def test_dataset_stores_raw_state_and_serves_normalised_windows(tmp_path) -> None:
    c = tiny_contract(size=16, num_dims=2, bins=4, frame_history=3, state_dim=2)
    rng = np.random.default_rng(0)
    eps = [random_episode(c, 5, rng, success=bool(i % 2), source_id=f"e{i}") for i in range(3)]
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episodes(eps)
    ds = ReplayDataset(tmp_path / "ds", n_step=2)
    for i, ep in enumerate(eps):
        np.testing.assert_array_equal(ds.episode(i).state, ep.state)
    batch = ds.get_batch(np.arange(len(ds)))
    assert batch.state is not None and batch.next_state is not None
    assert batch.state.shape == (len(ds), 3, 2) and batch.next_state.shape == (len(ds), 3, 2)
    for i in range(len(ds)):
        one = ds[i]
        torch.testing.assert_close(batch.state[i], one["state"], rtol=0, atol=0)
        torch.testing.assert_close(batch.next_state[i], one["next_state"], rtol=0, atol=0)
    # sample 0 is step 0 of episode 0: its window repeats step 0, normalised by the contract's range
    want = c.normalize_state(eps[0].state[[0, 0, 0]])
    np.testing.assert_allclose(batch.state[0].numpy(), want)


def test_writer_refuses_missing_or_non_finite_state(tmp_path) -> None:
    c = tiny_contract(size=16, num_dims=2, bins=4, state_dim=2)
    rng = np.random.default_rng(0)
    ep = random_episode(c, 4, rng, source_id="e0")
    with ReplayWriter(tmp_path / "ds", c) as w:
        with pytest.raises(DatasetError, match=r"no state given.*\['s0', 's1'\]"):
            w.add_episode(EpisodeData(frames=ep.frames, actions=ep.actions, success=True))
        bad = ep.state.copy()
        bad[2, 1] = np.inf
        with pytest.raises(DatasetError, match="step 2: state input 's1' is inf"):
            w.add_episode(EpisodeData(frames=ep.frames, actions=ep.actions, success=True, state=bad))


def test_episode_from_observations_round_trips_through_the_dataset(tmp_path) -> None:
    """Collectors hand the writer one Observation per step; the dataset serves back exactly those frames
    and states (the same as the columns they came from)."""
    c = tiny_contract(size=16, num_dims=2, bins=4, frame_history=2, state_dim=2)
    ep = random_episode(c, 6, np.random.default_rng(1), success=True, source_id="cols")
    seen = [Observation(frames={k: v[t] for k, v in ep.frames.items()}, state=ep.state[t]) for t in range(6)]
    from_obs = EpisodeData.from_observations(seen, list(ep.actions), success=True, source_id="obs")
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episodes([ep, from_obs])
    ds = ReplayDataset(tmp_path / "ds")
    for k in ep.frames:
        np.testing.assert_array_equal(ds.episode(1).frames[k], ep.frames[k])
    np.testing.assert_array_equal(ds.episode(1).state, ep.state)
    np.testing.assert_array_equal(ds.episode(1).actions, ep.actions)
    no_state = Observation(frames=seen[3].frames)
    with pytest.raises(DatasetError, match=r"step 3 has .*False\), step 0 has .*True\)"):
        EpisodeData.from_observations(seen[:3] + [no_state], list(ep.actions[:4]), success=False)


# -- model and policy -----------------------------------------------------------------------------

def make_policy(state_dim: int = 2, seed: int = 0) -> QTransformerPolicy:
    c = tiny_contract(size=16, num_dims=2, bins=4, frame_history=3, state_dim=state_dim)
    torch.manual_seed(seed)
    net = QTransformerNet(ModelConfig.preset("tiny", c, text_dim=T, depth=(1,), window_size=4))
    return QTransformerPolicy(c, net, None, "cpu", {"go": torch.randn(T)})


def test_model_state_token_changes_q_and_is_required() -> None:
    policy = make_policy()
    net = policy.net
    frames = torch.randint(0, 256, (2, 1, 3, 3, 16, 16), dtype=torch.uint8)
    bins = torch.zeros(2, 2, dtype=torch.long)
    a = net(frames, None, None, bins, proprio=torch.zeros(2, 3, 2))
    b = net(frames, None, None, bins, proprio=torch.ones(2, 3, 2))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"proprio \(robot state\) has shape None"):
        net(frames, None, None, bins)


def test_policy_streaming_full_and_act_agree_with_state() -> None:
    policy = make_policy()
    rng = np.random.default_rng(1)
    steps = [Observation({"cam0": rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)},
                         rng.uniform(-2, 2, 2).astype(np.float32)) for _ in range(5)]
    policy.reset("go")
    for k, obs in enumerate(steps):
        policy.push(obs)
        stream, full = policy.decide(), policy.decide_full()
        window = steps[max(0, k - 2):k + 1]
        act = policy.act({"cam0": np.stack([o.frames["cam0"] for o in window])}, "go",
                         state=np.stack([o.state for o in window]))
        np.testing.assert_array_equal(stream.bins, full.bins)
        np.testing.assert_array_equal(stream.bins, act.bins)
        np.testing.assert_allclose(stream.all_q, act.all_q, atol=1e-5)
        np.testing.assert_allclose(stream.all_q, full.all_q, atol=1e-5)


def test_policy_refuses_missing_or_non_finite_state() -> None:
    policy = make_policy()
    frame = {"cam0": np.zeros((3, 16, 16), np.uint8)}
    policy.reset("go")
    with pytest.raises(PolicyInputError, match="no state"):
        policy.push_frames(frame)
    with pytest.raises(PolicyInputError, match="'s0' is nan"):
        policy.push(Observation(frame, np.array([np.nan, 0.0])))
    assert policy.history_length == 0  # nothing was kept from a refused step


def test_onnx_decide_with_state_matches_torch(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from q_transformer_ros.core.onnx_backend import OnnxSteps, export_onnx, onnx_paths

    policy = make_policy()
    files = export_onnx(policy, onnx_paths(tmp_path / "ckpt.pt"))
    onnx = OnnxSteps(files, threads=1)
    rng = np.random.default_rng(2)
    policy.reset("go")
    for _ in range(3):
        policy.push(Observation({"cam0": rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)},
                                rng.uniform(-2, 2, 2).astype(np.float32)))
    with torch.inference_mode():
        tokens = torch.stack(policy._padded(policy._tokens))[None]
        want = policy.steps.decide(tokens, *policy._text, policy._history_proprio())
        got = onnx.decide(tokens, *policy._text, policy._history_proprio())
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
    np.testing.assert_allclose(got[2].numpy(), want[2].numpy(), atol=1e-4)
    # the newest frame encoded and decided in one graph (frame history 3), with the state history
    assert onnx.fused
    with torch.inference_mode():
        previous = torch.stack(policy._padded(policy._tokens))[None][:, :-1]
        new_tokens, *fused = onnx.encode_decide(policy._frames[-1], previous, *policy._text, policy._history_proprio())
    np.testing.assert_allclose(new_tokens.reshape(-1, new_tokens.shape[-1]).numpy(), policy._tokens[-1].numpy(),
                               atol=1e-4)
    np.testing.assert_array_equal(fused[0].numpy(), want[0].numpy())
    np.testing.assert_allclose(fused[2].numpy(), want[2].numpy(), atol=1e-4)


# -- learning: the state decides ------------------------------------------------------------------

def test_trained_policy_follows_the_state(tmp_path) -> None:
    """One blank camera, one state input s0 in {-1, +1}; action dim a0 succeeds exactly when its sign
    matches s0 (high bin for +1, low bin for -1), every other action fails. The data hold both choices
    in both states, so only a policy that reads the state can pick the successful one."""
    from q_transformer_ros.core.trainer import config_from_args, train

    c = tiny_contract(size=16, num_dims=1, bins=4, frame_history=1, state_dim=1, discount=0.9)
    blank = {"cam0": np.zeros((1, 3, 16, 16), np.uint8)}
    rng = np.random.default_rng(0)
    eps = []
    for i in range(64):
        s = float(rng.choice([-1.0, 1.0]))
        a = float(rng.choice([-0.75, -0.25, 0.25, 0.75]))
        success = np.sign(a) == np.sign(s) and abs(a) > 0.5
        eps.append(EpisodeData(frames=blank, actions=np.array([[a]], np.float32), success=success, terminal=True,
                               state=np.array([[s]], np.float32), source_id=f"e{i}"))
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episodes(eps)
    tiny_yaml = Path(__file__).resolve().parents[2] / "config" / "train_tiny.yaml"
    result = train(config_from_args([
        "--config", str(tiny_yaml), "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
        "--steps", "300", "--batch-size", "32", "--no-progress", "--no-tensorboard", "--device", "cpu",
        "--set", "model_overrides.depth=[1]", "--set", "model_overrides.window_size=4"]))
    policy = QTransformerPolicy.from_checkpoint(result.checkpoint, device="cpu")
    for s, want_bin in ((1.0, 3), (-1.0, 0)):
        policy.reset(None)
        policy.push(Observation({"cam0": blank["cam0"][0]}, np.array([s], np.float32)))
        d = policy.decide()
        assert d.bins.tolist() == [want_bin], (s, d.all_q)
