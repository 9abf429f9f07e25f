"""The typed training Batch: field bookkeeping, row selection, concatenation and the DataLoader path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_convert

from q_transformer_ros.core.batch import Batch, TrainingBatch
from q_transformer_ros.core.distributed import DistInfo
from q_transformer_ros.core.replay_dataset import ReplayDataset, ReplaySample
from q_transformer_ros.core.trainer import BatchDataset, TrainConfig, make_loader
from q_transformer_ros.replay import ReplayWriter
from q_transformer_ros.replay.testing import random_episode, tiny_contract


def names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def make_dataset(path: Path, state_dim: int = 0, seed: int = 0) -> ReplayDataset:
    c = tiny_contract(size=8, num_dims=2, bins=4, frame_history=2, state_dim=state_dim)
    rng = np.random.default_rng(seed)
    with ReplayWriter(path, c) as w:
        w.add_episodes([random_episode(c, 4, rng, success=bool(i % 2), source_id=f"e{i}") for i in range(3)])
    return ReplayDataset(path, n_step=2)


def assert_same(a: TrainingBatch, b: TrainingBatch) -> None:
    assert type(a) is type(b)
    for k in names(type(a)):
        x, y = getattr(a, k), getattr(b, k)
        assert (x is None) == (y is None), k
        assert x is None or (x.dtype == y.dtype and torch.equal(x, y)), k


def test_fields_match_the_sample_and_the_training_view(tmp_path: Path) -> None:
    # one field list: the per-sample reference dict has the same names, the training view is a prefix
    assert set(names(Batch)) == ReplaySample.__required_keys__ | ReplaySample.__optional_keys__
    assert set(names(TrainingBatch)) < set(names(Batch))
    batch = make_dataset(tmp_path / "ds").get_batch(np.arange(5))
    view = batch.training_view()
    assert type(view) is TrainingBatch and view.batch_size == 5 and view.state is None
    assert all(getattr(view, k) is getattr(batch, k) for k in names(TrainingBatch))  # no copy
    assert "frames=uint8(5, 1, 2, 3, 8, 8)" in repr(batch)


def test_to_index_concat(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", state_dim=3)
    batch = ds.get_batch(np.arange(len(ds)))
    assert batch.state is not None and batch.state.shape == (len(ds), 2, 3)
    moved = batch.to("cpu")
    assert type(moved) is Batch
    assert_same(moved, batch)
    plain = make_dataset(tmp_path / "plain").get_batch(np.arange(4))
    assert plain.to("cpu").state is None and plain.to("cpu").next_state is None

    rows = torch.tensor([3, 0, 2])
    picked = batch.index(rows)
    assert_same(picked, ds.get_batch([3, 0, 2]))
    assert_same(Batch.concat([ds.get_batch([1, 2]), ds.get_batch([0])]), ds.get_batch([1, 2, 0]))
    assert_same(TrainingBatch.concat([picked.training_view()]), picked.training_view())
    with pytest.raises(ValueError, match="field 'state' is None in 1 of 2"):
        Batch.concat([plain, batch])
    with pytest.raises(ValueError, match="no batches"):
        Batch.concat([])
    with pytest.raises(ValueError, match="both be given or both be None"):
        dataclasses.replace(batch, next_state=None)
    with pytest.raises(ValueError, match="rewards has shape"):
        dataclasses.replace(batch, rewards=batch.rewards[:2])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_loader_passes_the_batch_through(tmp_path: Path, num_workers: int) -> None:
    data = BatchDataset([make_dataset(tmp_path / "a", seed=0), make_dataset(tmp_path / "b", seed=1)])
    assert default_convert(data[[0, 1]]).__class__ is Batch  # batch_size=None: converted as is
    cfg = TrainConfig(batch_size=4, num_workers=num_workers, seed=3)
    sampler, loader = make_loader(data, cfg, DistInfo(), torch.device("cpu"), consumed=0)
    it = iter(loader)  # the sampler is endless: take two epochs' worth
    for g in range(2 * sampler.batches_per_epoch):
        b = next(it)
        assert type(b) is Batch and b.batch_size == 4
        assert_same(b, data[sampler.batch(g)])
    del it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_and_device_move(tmp_path: Path) -> None:
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = make_dataset(tmp_path / "ds", state_dim=2).get_batch(np.arange(6))
    pinned = pin_memory(batch)  # what the DataLoader's pin thread does
    assert type(pinned) is Batch and all(getattr(pinned, k).is_pinned() for k in names(Batch))
    on_gpu = pinned.training_view().to("cuda", non_blocking=True)
    assert on_gpu.frames.is_cuda and on_gpu.state is not None and on_gpu.state.is_cuda
    assert_same(on_gpu.to("cpu"), batch.training_view())
