"""Replay dataset: write then read back, samples (n-step, terminal vs truncation, history padding),
re-binning, splits, batched path, text embeddings, bad input."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from q_transformer_ros.replay import DatasetError, EpisodeData, ReplayWriter

from q_transformer_ros.core.replay_dataset import ReplayDataset, ReplaySample
from q_transformer_ros.replay.testing import random_episode, tiny_contract
from q_transformer_ros.contract import ContractError, RobotContract


def marked_episode(contract, rewards, success, terminal=None, tag=0, instruction="push", source_id=None):
    """Frames whose pixels all equal ``tag * 16 + t`` (so windows can be checked by value)."""
    L = len(rewards)
    frames = {}
    for ci, c in enumerate(contract.cameras):
        v = (tag * 16 + np.arange(L) + 100 * ci).astype(np.uint8)
        frames[c.name] = np.broadcast_to(v[:, None, None, None], (L, 3, c.height, c.width)).copy()
    actions = np.linspace(-0.9, 0.9, L * contract.num_action_dims, dtype=np.float32).reshape(L, -1)
    return EpisodeData(frames=frames, actions=actions, success=success, terminal=terminal,
                       rewards=np.asarray(rewards, dtype=np.float32), instruction=instruction, source_id=source_id)


def tag_of(frames: torch.Tensor) -> list[int]:
    """(C, F, 3, H, W) of camera 0 -> the step tag of each history frame."""
    return [int(frames[0, f, 0, 0, 0]) for f in range(frames.shape[1])]


def test_write_read_back_step_by_step(tmp_path: Path):
    c = tiny_contract(num_cameras=2)
    rng = np.random.default_rng(1)
    eps = [random_episode(c, 6, rng, source_id="a"),
           random_episode(c, 3, rng, success=False, source_id="b", instruction="other"),
           random_episode(c, 4, rng, instruction=None, source_id="c")]
    eps[1].metadata = {"bag": "b.mcap", "steps_dropped": 2}
    with ReplayWriter(tmp_path / "ds", c) as w:
        assert w.add_episode(eps[0])
        assert w.add_episodes(eps[1:]) == [True, True]
        assert w.num_episodes == 3 and w.num_steps == 13
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 3 and ds.num_steps == 13
    assert ds.instructions == ["pick the cube", "other"]
    for i, ep in enumerate(eps):
        st = ds.episode(i)
        for cam in c.cameras:
            np.testing.assert_array_equal(st.frames[cam.name], ep.frames[cam.name])
        np.testing.assert_array_equal(st.actions, ep.actions)
        np.testing.assert_array_equal(st.rewards, ep.rewards)
        L = ep.length
        assert st.terminals.tolist() == [False] * (L - 1) + [ep.terminal]
        assert st.truncated.tolist() == [False] * (L - 1) + [not ep.terminal]
        assert st.instruction == ep.instruction and st.source_id == ep.source_id and st.success == ep.success
        assert st.metadata == ep.metadata
        # default sparse reward: 1 on the last step iff success
        assert st.rewards.tolist() == [0.0] * (L - 1) + [1.0 if ep.success else 0.0]
        expected = [sum(float(ep.rewards[k]) * c.discount ** (k - t) for k in range(t, L)) for t in range(L)]
        np.testing.assert_allclose(st.mc_returns, expected, rtol=1e-6)
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["episodes"][2]["instruction_index"] == -1 and m["format_version"] == 1
    assert RobotContract.from_dict(m["contract"]) == c and ds.dataset_contract == c


def test_mc_returns_hand_computed(tmp_path: Path):
    c = tiny_contract(discount=0.9)
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episode(marked_episode(c, [0, 0.5, 0, 1], success=True))
        w.add_episode(marked_episode(c, [0.2, 0, 0, 0.7], success=False, tag=1))
    ds = ReplayDataset(tmp_path / "ds")
    np.testing.assert_allclose(ds.episode(0).mc_returns, [1.179, 1.31, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(ds.episode(1).mc_returns, [0.7103, 0.567, 0.63, 0.7], rtol=1e-6)
    # a reader with another discount recomputes the returns
    ds2 = ReplayDataset(tmp_path / "ds", contract=tiny_contract(discount=0.5))
    np.testing.assert_allclose(ds2.episode(0).mc_returns, [0.375, 0.75, 0.5, 1.0], rtol=1e-6)


def test_n_step_terminal_vs_truncation(tmp_path: Path):
    """n=2, gamma=0.9. Terminal episode A (rewards 0,.5,0,1): all 4 steps are samples, windows that reach
    the end do not bootstrap. Truncated episode B (.2,0,0,.7): 3 samples, the last bootstraps from o_3."""
    c = tiny_contract(discount=0.9, frame_history=2)
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episode(marked_episode(c, [0, 0.5, 0, 1], success=True, tag=0))
        w.add_episode(marked_episode(c, [0.2, 0, 0, 0.7], success=False, tag=1))
    ds = ReplayDataset(tmp_path / "ds", n_step=2)
    assert len(ds) == 4 + 3
    # (episode, t, rewards, n_eff, discount, terminal, next step)
    expected = [
        (0, 0, [0, 0.5], 2, 0.81, False, 2),
        (0, 1, [0.5, 0], 2, 0.81, False, 3),
        (0, 2, [0, 1], 2, 0.0, True, 3),
        (0, 3, [1, 0], 1, 0.0, True, 3),
        (1, 0, [0.2, 0], 2, 0.81, False, 2),
        (1, 1, [0, 0], 2, 0.81, False, 3),
        (1, 2, [0, 0], 1, 0.9, False, 3),
    ]
    for i, (e, t, r, n_eff, disc, term, nxt) in enumerate(expected):
        s = ds[i]
        assert int(s["episode_index"]) == e and int(s["step_index"]) == 4 * e + t
        np.testing.assert_allclose(s["rewards"].numpy(), r, atol=1e-7)
        assert s["reward_mask"].tolist() == [True] * n_eff + [False] * (2 - n_eff)
        assert int(s["n_eff"]) == n_eff and bool(s["terminal"]) == term
        assert float(s["discount_to_next"]) == pytest.approx(disc, abs=1e-7)
        assert float(s["n_step_return"]) == pytest.approx(r[0] + 0.9 * r[1] * (n_eff > 1), abs=1e-6)
        assert tag_of(s["frames"]) == [16 * e + max(0, t - 1), 16 * e + t]
        assert tag_of(s["next_frames"]) == [16 * e + nxt - 1, 16 * e + nxt]
    # 1-step: the truncated episode's step 2 bootstraps from step 3 with gamma
    ds1 = ReplayDataset(tmp_path / "ds", n_step=1)
    s = ds1[6]
    assert float(s["discount_to_next"]) == pytest.approx(0.9) and tag_of(s["next_frames"])[-1] == 16 + 3
    assert float(ds1[3]["discount_to_next"]) == 0.0 and float(ds1[2]["discount_to_next"]) == pytest.approx(0.9)


def test_history_padding_repeats_first_frame(tmp_path: Path):
    c = tiny_contract(num_cameras=2, frame_history=4)
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episode(marked_episode(c, [0] * 3, success=False, tag=2))  # truncated: 2 samples
        w.add_episode(marked_episode(c, [0] * 6, success=True, tag=5))
    ds = ReplayDataset(tmp_path / "ds")
    assert len(ds) == 2 + 6
    s = ds[0]
    assert s["frames"].shape == (2, 4, 3, 32, 32)
    assert tag_of(s["frames"]) == [32, 32, 32, 32]
    assert [int(s["frames"][1, f, 0, 0, 0]) for f in range(4)] == [132] * 4  # camera 1 aligned too
    assert tag_of(ds[1]["frames"]) == [32, 32, 32, 33]
    assert tag_of(ds[1]["next_frames"]) == [32, 32, 33, 34]
    # the second episode starts fresh: no frames of the first leak into its window
    assert tag_of(ds[2]["frames"]) == [80, 80, 80, 80]
    assert tag_of(ds[7]["frames"]) == [82, 83, 84, 85]


@pytest.mark.parametrize("num_cameras,one_chunk", [(2, False), (1, True), (1, False)])
def test_get_batch_equals_stacked_getitem(tmp_path: Path, num_cameras: int, one_chunk: bool):
    c = tiny_contract(num_cameras=num_cameras, frame_history=3)
    rng = np.random.default_rng(3)
    eps = []
    for k in range(6):
        ep = random_episode(c, int(rng.integers(1, 7)), rng, success=bool(k % 2))
        if k >= 3:
            ep.rewards = rng.random(ep.length).astype(np.float32)
        eps.append(ep)
    with ReplayWriter(tmp_path / "ds", c) as w:
        if one_chunk:
            w.add_episodes(eps)
        else:
            w.add_episodes(eps[:3])
            for ep in eps[3:]:
                w.add_episode(ep)
    ds = ReplayDataset(tmp_path / "ds", n_step=3)
    idx = rng.permutation(len(ds))
    batch = ds.get_batch(idx)
    names = [f.name for f in dataclasses.fields(batch)]
    assert set(names) == ReplaySample.__required_keys__ | ReplaySample.__optional_keys__
    present = {k for k in names if getattr(batch, k) is not None}
    for j, i in enumerate(idx):
        s = ds[int(i)]
        assert set(s) == present
        for k, v in s.items():
            got = getattr(batch, k)[j]
            assert got.dtype == v.dtype, k
            if v.dtype.is_floating_point:
                torch.testing.assert_close(got, v, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(got, v), (k, int(i))
    # a default DataLoader collates samples too; workers get a pickled copy without memory maps
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    first = next(iter(loader))
    assert torch.equal(first["frames"], ds.get_batch(np.arange(4)).frames)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 64 * 1024 and torch.equal(clone[5]["frames"], ds[5]["frames"])


def test_rebinning_with_another_contract(tmp_path: Path):
    c8 = tiny_contract(bins=8)
    rng = np.random.default_rng(4)
    with ReplayWriter(tmp_path / "ds", c8) as w:
        w.add_episode(random_episode(c8, 20, rng))
    c4 = tiny_contract(bins=4, low=-2.0, high=2.0)
    ds8, ds4 = ReplayDataset(tmp_path / "ds"), ReplayDataset(tmp_path / "ds", contract=c4)
    b8, b4 = ds8.get_batch(np.arange(len(ds8))), ds4.get_batch(np.arange(len(ds4)))
    acts = b8.actions.numpy()
    assert np.array_equal(b8.action_bins.numpy(), c8.actions_to_bins(acts))
    assert np.array_equal(b4.action_bins.numpy(), c4.actions_to_bins(acts))
    assert b4.action_bins.max() <= 3 and b8.action_bins.max() > 3
    # [-1, 1] actions land in the middle two bins of [-2, 2] / 4
    assert set(np.unique(b4.action_bins.numpy())) <= {1, 2}


def test_splits_select_episodes(tmp_path: Path):
    c = tiny_contract()
    rng = np.random.default_rng(5)
    with ReplayWriter(tmp_path / "ds", c) as w:
        for k in range(5):
            w.add_episode(random_episode(c, 4, rng, source_id=f"e{k}"))
    train = ReplayDataset(tmp_path / "ds", episodes=slice(0, 4))
    val = ReplayDataset(tmp_path / "ds", episodes=[4])
    assert len(train) == 16 and len(val) == 4
    assert set(train.get_batch(np.arange(16)).episode_index.tolist()) == {0, 1, 2, 3}
    assert set(val.get_batch(np.arange(4)).episode_index.tolist()) == {4}
    with pytest.raises(DatasetError, match="out of range"):
        ReplayDataset(tmp_path / "ds", episodes=[7])


def test_duplicate_source_id_skipped(tmp_path: Path):
    c = tiny_contract()
    rng = np.random.default_rng(6)
    with ReplayWriter(tmp_path / "ds", c) as w:
        assert w.add_episode(random_episode(c, 3, rng, source_id="bag1"))
    with ReplayWriter(tmp_path / "ds", c) as w:  # a re-run of the same conversion
        with w.transaction() as tx:
            assert not tx.add_episode(random_episode(c, 3, rng, source_id="bag1"))
            assert tx.add_episode(random_episode(c, 3, rng, source_id="bag2"))
            assert not tx.add_episode(random_episode(c, 3, rng, source_id="bag2"))  # twice in one run
            assert tx.skipped == ["bag1", "bag2"]
        assert w.add_episode(random_episode(c, 3, rng, source_id=None))  # no id: always added
        assert w.has_source("bag2")
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.num_episodes == 3 and [ds.episode(i).source_id for i in range(3)] == ["bag1", "bag2", None]


def test_text_embeddings_cached_and_invalidated(tmp_path: Path):
    c = tiny_contract()
    rng = np.random.default_rng(7)
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episodes([random_episode(c, 3, rng, instruction="a"), random_episode(c, 3, rng, instruction="b")])
        emb = rng.standard_normal((2, 16)).astype(np.float32)
        w.set_text_embeddings("open_clip:ViT-B-32", emb)
        with pytest.raises(DatasetError, match=r"\(2, T\)"):
            w.set_text_embeddings("x", emb[:1])
        ds = ReplayDataset(tmp_path / "ds")
        np.testing.assert_array_equal(ds.text_embeddings("open_clip:ViT-B-32"), emb)
        assert ds.text_embeddings("other") is None
        w.add_episode(random_episode(c, 3, rng, instruction="a"))  # known instruction: cache stays valid
        assert ReplayDataset(tmp_path / "ds").text_embeddings("open_clip:ViT-B-32") is not None
        w.add_episode(random_episode(c, 3, rng, instruction="new"))  # table grew: cache dropped
    ds = ReplayDataset(tmp_path / "ds")
    assert ds.text_embeddings("open_clip:ViT-B-32") is None
    assert list((tmp_path / "ds" / "embeddings").iterdir()) == []


# -- bad input ------------------------------------------------------------------------------------

def test_nan_in_actions_and_rewards_names_episode_and_step(tmp_path: Path):
    c = tiny_contract()
    rng = np.random.default_rng(8)
    w = ReplayWriter(tmp_path / "ds", c)
    ep = random_episode(c, 5, rng, source_id="bag_7")
    ep.actions[3, 1] = np.nan
    with pytest.raises(DatasetError, match=r"episode 'bag_7': step 3: action dim 'a1' is nan"):
        w.add_episode(ep)
    ep = random_episode(c, 5, rng, source_id="bag_8")
    ep.rewards[2] = np.inf
    with pytest.raises(DatasetError, match=r"episode 'bag_8': step 2: reward is inf"):
        w.add_episode(ep)
    assert w.num_episodes == 0 and list((tmp_path / "ds" / "chunks").iterdir()) == []


def test_shape_errors_name_camera_and_shapes(tmp_path: Path):
    c = tiny_contract(num_cameras=2)
    rng = np.random.default_rng(9)
    w = ReplayWriter(tmp_path / "ds", c)
    ep = random_episode(c, 4, rng, source_id="s")
    ep.frames["cam1"] = ep.frames["cam1"][:, :, :16]
    with pytest.raises(DatasetError, match=r"camera 'cam1' frames are shape \(4, 3, 16, 32\) dtype uint8, expected uint8 \(4, 3, 32, 32\)"):
        w.add_episode(ep)
    ep = random_episode(c, 4, rng)
    ep.frames["cam0"] = ep.frames["cam0"].astype(np.float32)
    with pytest.raises(DatasetError, match=r"camera 'cam0' frames are .* dtype float32"):
        w.add_episode(ep)
    ep = random_episode(c, 4, rng)
    del ep.frames["cam1"]
    with pytest.raises(DatasetError, match=r"frames given for cameras \['cam0'\]"):
        w.add_episode(ep)
    ep = random_episode(c, 4, rng)
    ep.actions = ep.actions[:, :2]
    with pytest.raises(DatasetError, match=r"actions have shape \(4, 2\), expected \(4, 3\)"):
        w.add_episode(ep)
    with pytest.raises(DatasetError, match="empty episode"):
        w.add_episode(random_episode(c, 0, rng))
    assert w.num_episodes == 0


def test_contract_mismatch_errors_name_the_dataset(tmp_path: Path):
    c = tiny_contract()
    rng = np.random.default_rng(10)
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episode(random_episode(c, 3, rng))
    other = tiny_contract(num_cameras=2)
    with pytest.raises(ContractError, match=f"{tmp_path / 'ds'}.*cameras differ"):
        ReplayWriter(tmp_path / "ds", other)
    with pytest.raises(ContractError, match=f"{tmp_path / 'ds'}.*cameras differ"):
        ReplayDataset(tmp_path / "ds", contract=other)
    with pytest.raises(ContractError, match="action dims differ"):
        ReplayDataset(tmp_path / "ds", contract=tiny_contract(num_dims=4))


def test_empty_and_missing_dataset_errors(tmp_path: Path):
    c = tiny_contract()
    ReplayWriter(tmp_path / "ds", c).close()
    with pytest.raises(DatasetError, match=r"ds: dataset is empty \(no episodes; an interrupted first conversion"):
        ReplayDataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"nope: not a replay dataset \(no manifest.json\)"):
        ReplayDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="create_ok=False"):
        ReplayWriter(tmp_path / "nope", c, create_ok=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty and not a replay dataset"):
        ReplayWriter(tmp_path / "junk", c)
    # one truncated single-step episode has no sample
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episode(random_episode(c, 1, np.random.default_rng(0), success=False))
    with pytest.raises(DatasetError, match="no samples"):
        ReplayDataset(tmp_path / "ds")


def test_bytes_per_stored_step_224(tmp_path: Path):
    """One 224² camera: a stored step is one uint8 frame + a few scalars; the reference stores a
    float32 stack of 6 frames per step (3*6*224*224*4 bytes)."""
    c = tiny_contract(size=224, frame_history=6)
    rng = np.random.default_rng(11)
    with ReplayWriter(tmp_path / "ds", c) as w:
        w.add_episodes([random_episode(c, 50, rng) for _ in range(2)])
    s = ReplayDataset(tmp_path / "ds").summary()
    reference = 3 * 6 * 224 * 224 * 4
    ratio = reference / s["bytes_per_step"]
    print(f"bytes per stored step: {s['bytes_per_step']:.0f} (reference {reference}), {ratio:.1f}x fewer")
    assert s["bytes_per_step"] < 3 * 224 * 224 + 64 + 4096 / 50
    assert ratio >= 20
