"""Multi-process training: the real `train` entry point under torchrun, 2 CPU processes over gloo,
plus the sharded, resumable batch sampler it relies on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from q_transformer_ros.core.checkpoint import load_checkpoint
from q_transformer_ros.replay import ReplayWriter
from q_transformer_ros.replay.testing import random_episode, tiny_contract
from q_transformer_ros.core.distributed import ShardedBatchSampler

REPO = Path(__file__).resolve().parents[2]


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    a = ShardedBatchSampler(20, batch_size=4, seed=3, rank=0, world_size=2)
    b = ShardedBatchSampler(20, batch_size=4, seed=3, rank=1, world_size=2)
    assert a.batches_per_epoch == b.batches_per_epoch == 2
    ea, eb = set(a.epoch_indices(0).tolist()), set(b.epoch_indices(0).tolist())
    assert not ea & eb and len(ea) == len(eb) == 8
    # epochs are reshuffled, deterministically
    assert a.epoch_indices(0).tolist() != a.epoch_indices(1).tolist()
    assert a.epoch_indices(1).tolist() == ShardedBatchSampler(20, 4, seed=3, rank=0, world_size=2).epoch_indices(1).tolist()


def test_sampler_resumes_at_a_batch_position():
    full = ShardedBatchSampler(10, batch_size=3, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(8)]  # crosses two epoch boundaries (3 batches per epoch)
    later = iter(ShardedBatchSampler(10, batch_size=3, seed=1, start_batch=5))
    assert [next(later) for _ in range(3)] == first[5:8]
    assert first[5] == full.batch(5)
    assert full.position(5) == {"consumed_batches": 5, "epoch": 1, "position": 2, "batches_per_epoch": 3,
                                "seed": 1, "world_size": 1}


def test_sampler_tiles_a_dataset_smaller_than_a_batch():
    s = ShardedBatchSampler(3, batch_size=8, seed=0, rank=1, world_size=2)
    assert s.batches_per_epoch == 1 and len(s.batch(0)) == 8 and set(s.batch(0)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="empty"):
        ShardedBatchSampler(0, batch_size=8)


def test_torchrun_two_cpu_processes_stay_in_sync(tmp_path):
    contract = tiny_contract(size=16, num_dims=2, bins=4, frame_history=2)
    rng = np.random.default_rng(0)
    with ReplayWriter(tmp_path / "ds", contract) as w:
        w.add_episodes([random_episode(contract, 5, rng, success=bool(i % 2), instruction="pick", source_id=str(i))
                        for i in range(4)])
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "q_transformer_ros.core.trainer", "--config", str(REPO / "config" / "train_tiny.yaml"),
           "--dataset", str(tmp_path / "ds"), "--out", str(out), "--steps", "3", "--batch-size", "4",
           "--device", "cpu", "--no-progress", "--set", "model_overrides.depth=[1]", "--set", "log_every=1",
           "--set", "grad_accum=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = dict(re.findall(r"rank (\d) finished step 3 param_checksum (\S+)", proc.stdout))
    assert set(found) == {"0", "1"}, proc.stdout
    assert found["0"] == found["1"]  # DDP kept the two replicas identical (the trainer also checks all-reduce)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 3 and ck["data_order"]["world_size"] == 2
    assert ck["data_order"]["consumed_batches"] == 6  # 3 steps x 2 accumulated micro-batches, per rank
