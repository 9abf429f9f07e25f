"""Atomic appends: an exception or a killed process mid-write leaves the dataset exactly as before,
readable, and the next writer cleans up what was left."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from q_transformer_ros.replay import DatasetError, ReplayWriter

from q_transformer_ros.core.batch import Batch
from q_transformer_ros.core.replay_dataset import ReplayDataset
from q_transformer_ros.replay.testing import random_episode, tiny_contract

REPO = Path(__file__).resolve().parents[2]


def make_base(root: Path):
    c = tiny_contract(num_cameras=2)
    rng = np.random.default_rng(0)
    with ReplayWriter(root, c) as w:
        w.add_episodes([random_episode(c, 5, rng, source_id="a"), random_episode(c, 4, rng, success=False, source_id="b")])
    return c


def snapshot(root: Path) -> tuple[bytes, Batch]:
    ds = ReplayDataset(root, n_step=2)
    return (root / "manifest.json").read_bytes(), ds.get_batch(np.arange(len(ds)))


def assert_unchanged(root: Path, before: tuple[bytes, Batch]) -> None:
    manifest, batch = snapshot(root)
    assert manifest == before[0]
    for f in dataclasses.fields(batch):
        now, then = getattr(batch, f.name), getattr(before[1], f.name)
        assert (now is None) == (then is None), f.name
        assert now is None or torch.equal(now, then), f.name


def test_exception_inside_transaction_leaves_dataset_unchanged(tmp_path: Path):
    root = tmp_path / "ds"
    c = make_base(root)
    before = snapshot(root)
    rng = np.random.default_rng(1)
    with ReplayWriter(root, c) as w:
        with pytest.raises(RuntimeError, match="bag 3 is corrupt"):
            with w.transaction() as tx:
                tx.add_episode(random_episode(c, 6, rng, source_id="c"))
                tx.add_episode(random_episode(c, 6, rng, source_id="d"))
                raise RuntimeError("bag 3 is corrupt")
        # a validation error inside a transaction aborts it the same way
        bad = random_episode(c, 3, rng, source_id="e")
        bad.actions[1, 0] = np.nan
        with pytest.raises(DatasetError, match="step 1"):
            with w.transaction() as tx:
                tx.add_episode(random_episode(c, 6, rng, source_id="f"))
                tx.add_episode(bad)
        assert w.num_episodes == 2 and not w.has_source("c") and not w.has_source("f")
    assert_unchanged(root, before)
    assert sorted(p.name for p in (root / "chunks").iterdir()) == sorted(
        e["id"] for e in __import__("json").loads(before[0])["chunks"])


def test_second_writer_is_refused(tmp_path: Path):
    root = tmp_path / "ds"
    c = make_base(root)
    with ReplayWriter(root, c):
        with pytest.raises(DatasetError, match="another ReplayWriter"):
            ReplayWriter(root, c)
    ReplayWriter(root, c).close()  # released on close


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from q_transformer_ros.replay import ReplayWriter
    from q_transformer_ros.replay.testing import random_episode, tiny_contract
    root, stage = sys.argv[1], sys.argv[2]
    c = tiny_contract(num_cameras=2)
    rng = np.random.default_rng(2)
    w = ReplayWriter(root, c)
    seen = []
    def hook(name):
        seen.append(name)
        # die on the second episode written, or at the named commit stage
        if name == stage and (name != "episode_written" or seen.count(name) == 2):
            os._exit(17)
    w.stage_hook = hook
    with w.transaction() as tx:
        for k in range(3):
            tx.add_episode(random_episode(c, 4, rng, source_id=f"new{k}"))
    sys.exit(0)
""")


@pytest.mark.parametrize("stage", ["episode_written", "chunk_written", "chunk_renamed", "manifest_written"])
def test_killed_writer_leaves_dataset_readable(tmp_path: Path, stage: str):
    root = tmp_path / "ds"
    c = make_base(root)
    before = snapshot(root)
    r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root), stage], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 17, r.stderr
    if stage == "manifest_written":  # died after the commit point: the transaction is complete
        ds = ReplayDataset(root)
        assert ds.num_episodes == 5 and ds.episode(4).source_id == "new2"
    else:
        assert_unchanged(root, before)
        leftovers = {p.name for p in (root / "chunks").iterdir()} - {ch.id for ch in ReplayDataset(root).manifest.chunks}
        assert leftovers, "the crash should have left an orphan for this test to mean something"
    with ReplayWriter(root, c) as w:  # next writer cleans orphans and appends normally
        known = {ch.id for ch in w.manifest.chunks}
        assert {p.name for p in (root / "chunks").iterdir()} == known
        assert not (root / "manifest.json.tmp").exists()
        n = w.num_episodes
        assert w.add_episode(random_episode(c, 3, np.random.default_rng(3), source_id="after"))
    ds = ReplayDataset(root)
    assert ds.num_episodes == n + 1 and ds.episode(n).source_id == "after"
