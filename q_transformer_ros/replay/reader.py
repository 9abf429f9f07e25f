"""Read a replay dataset's episodes back with numpy alone (memory-mapped), in manifest order.

Why here: exporters and checks in ``data/`` need the stored steps without torch; the torch reader
(``core.replay_dataset.ReplayDataset``) serves training samples, not whole episodes, and ``data/``
must not import ``core/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from q_transformer_ros.contract import RobotContract
from q_transformer_ros.replay.format import (
    ACTIONS_FILE, CHUNKS_DIR, MANIFEST_NAME, NO_INSTRUCTION, REWARDS_FILE, STATE_FILE, TERMINALS_FILE, TRUNCATED_FILE,
    DatasetError, EpisodeEntry, Manifest, frames_file, read_manifest,
)


@dataclass
class StoredEpisode:
    """One stored episode: step t holds the frames of o_t, the action a_t and the reward r_t."""

    index: int
    """Position in the manifest's episode list."""
    entry: EpisodeEntry
    """The manifest entry (source_id, success, terminal, truncated, metadata)."""
    instruction: str | None
    frames: dict[str, np.ndarray]
    """Camera -> uint8 (T, 3, H, W), memory-mapped views."""
    actions: np.ndarray
    """float32 (T, D)."""
    rewards: np.ndarray
    """float32 (T,)."""
    terminals: np.ndarray
    """bool (T,): True only on the last step of a terminal episode."""
    truncated: np.ndarray
    """bool (T,): True only on the last step of a truncated episode."""
    state: np.ndarray | None = None
    """float32 (T, S) raw state inputs, or None when the contract declares none."""

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


class ReplayReader:
    """The episodes of a replay dataset folder, read through its manifest (numpy memory maps)."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.manifest: Manifest = read_manifest(self.root)
        self.contract: RobotContract = self.manifest.robot_contract(str(self.root / MANIFEST_NAME))
        self._chunks: dict[str, dict[str, np.ndarray]] = {}

    @property
    def num_episodes(self) -> int:
        return len(self.manifest.episodes)

    def _chunk(self, chunk_id: str) -> dict[str, np.ndarray]:
        if chunk_id not in self._chunks:
            folder = self.root / CHUNKS_DIR / chunk_id
            names = [frames_file(c.name) for c in self.contract.cameras]
            names += [ACTIONS_FILE, REWARDS_FILE, TERMINALS_FILE, TRUNCATED_FILE]
            names += [STATE_FILE] if self.contract.state_dim else []
            arrays: dict[str, Any] = {}
            for name in names:
                try:
                    arrays[name] = np.load(folder / name, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise DatasetError(f"{folder / name}: cannot read chunk array: {e}") from None
            self._chunks[chunk_id] = arrays
        return self._chunks[chunk_id]

    def episode(self, index: int) -> StoredEpisode:
        e = self.manifest.episodes[index]
        arrays = self._chunk(e.chunk)
        rows = slice(e.start, e.start + e.length)
        instruction = None if e.instruction_index == NO_INSTRUCTION else self.manifest.instructions[e.instruction_index]
        return StoredEpisode(
            index=index, entry=e, instruction=instruction,
            frames={c.name: arrays[frames_file(c.name)][rows] for c in self.contract.cameras},
            actions=arrays[ACTIONS_FILE][rows], rewards=arrays[REWARDS_FILE][rows],
            terminals=arrays[TERMINALS_FILE][rows], truncated=arrays[TRUNCATED_FILE][rows],
            state=arrays[STATE_FILE][rows] if STATE_FILE in arrays else None,
        )

    def __iter__(self) -> Iterator[StoredEpisode]:
        for i in range(self.num_episodes):
            yield self.episode(i)
