"""On-disk layout of a replay dataset: file names, the manifest schema and atomic file helpers.

Why a separate module: the writer, the reader and any outside tool that writes the format must agree
on the same names and the same manifest, and that agreement lives here (documented in
docs/dataset_format.md). Nothing here imports torch.

Layout::

    <dataset>/manifest.json                 the only file a reader trusts (replaced atomically)
    <dataset>/chunks/<chunk_id>/*.npy       one folder per committed transaction
    <dataset>/embeddings/<key>.npy          cached instruction embeddings, float32 (I, T)
    <dataset>/chunks/.tmp-<uuid>/           a transaction being written (ignored, cleaned on open)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from q_transformer_ros.contract import RobotContract

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_TMP_NAME = "manifest.json.tmp"
LOCK_NAME = ".writer.lock"
CHUNKS_DIR = "chunks"
EMBEDDINGS_DIR = "embeddings"
TMP_PREFIX = ".tmp-"

ACTIONS_FILE = "actions.npy"
REWARDS_FILE = "rewards.npy"
TERMINALS_FILE = "terminals.npy"
TRUNCATED_FILE = "truncated.npy"
MC_RETURNS_FILE = "mc_returns.npy"
NO_INSTRUCTION = -1
"""Instruction index of an episode without an instruction (the model uses its null embedding)."""

STEP_ARRAYS: dict[str, np.dtype] = {
    ACTIONS_FILE: np.dtype(np.float32),
    REWARDS_FILE: np.dtype(np.float32),
    TERMINALS_FILE: np.dtype(np.bool_),
    TRUNCATED_FILE: np.dtype(np.bool_),
    MC_RETURNS_FILE: np.dtype(np.float32),
}
"""Per-step arrays of every chunk (besides the frames) and their dtypes; first axis is the step."""

STATE_FILE = "state.npy"
"""float32 (T, S) raw state inputs (``contract.state_inputs`` order, the sources' units); present in a
chunk exactly when the dataset's contract declares state inputs."""


class DatasetError(ValueError):
    """A dataset that cannot be read or written; the message names the path and what is wrong."""


def frames_file(camera: str) -> str:
    """File name of one camera's frames in a chunk: ``frames_<camera>.npy``, uint8 (T, 3, H, W)."""
    return f"frames_{camera}.npy"


def embedding_file(key: str) -> str:
    """File name (under ``embeddings/``) for an encoder key such as ``open_clip:ViT-B-32``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".npy"


@dataclass
class ChunkEntry:
    id: str
    """Folder name under ``chunks/``."""
    num_steps: int
    """Length of the first axis of every array in the chunk."""


@dataclass
class EpisodeEntry:
    chunk: str
    """Id of the chunk that holds the episode (an episode never spans chunks)."""
    start: int
    """First step of the episode inside its chunk."""
    length: int
    """Number of steps (observations with the action taken there)."""
    instruction_index: int
    """Row of the instruction table, or -1 for no instruction."""
    source_id: str | None
    """Identity of where the episode came from (e.g. a bag); a writer skips a known source_id."""
    success: bool
    terminal: bool
    """The last step ends the task (no bootstrap past it)."""
    truncated: bool
    """The episode was cut (time limit / end of recording): the last step has no next observation."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free JSON metadata (converter report, environment seed, ...)."""


@dataclass
class Manifest:
    contract: dict[str, Any]
    """``RobotContract.to_dict()`` of the contract the data were written with."""
    chunks: list[ChunkEntry] = field(default_factory=list)
    episodes: list[EpisodeEntry] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    text_embeddings: dict[str, str] = field(default_factory=dict)
    """Encoder key -> file name under ``embeddings/`` (float32 (I, T), rows = instructions)."""
    format_version: int = FORMAT_VERSION

    @property
    def num_steps(self) -> int:
        return sum(c.num_steps for c in self.chunks)

    def source_ids(self) -> set[str]:
        return {e.source_id for e in self.episodes if e.source_id is not None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_steps"] = self.num_steps
        d["num_episodes"] = len(self.episodes)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "Manifest":
        if not isinstance(data, Mapping):
            raise DatasetError(f"{where}: manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetError(f"{where}: 'format_version' = {version!r}: this package reads version {FORMAT_VERSION}")
        for key in ("contract", "chunks", "episodes", "instructions"):
            if key not in data:
                raise DatasetError(f"{where}: manifest key '{key}' is missing")
        try:
            chunks = [ChunkEntry(id=str(c["id"]), num_steps=int(c["num_steps"])) for c in data["chunks"]]
            episodes = [
                EpisodeEntry(
                    chunk=str(e["chunk"]), start=int(e["start"]), length=int(e["length"]),
                    instruction_index=int(e["instruction_index"]), source_id=e.get("source_id"),
                    success=bool(e["success"]), terminal=bool(e["terminal"]), truncated=bool(e["truncated"]),
                    metadata=dict(e.get("metadata") or {}),
                )
                for e in data["episodes"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{where}: malformed chunk or episode entry: {e!r}") from None
        m = cls(
            contract=dict(data["contract"]), chunks=chunks, episodes=episodes,
            instructions=[str(s) for s in data["instructions"]],
            text_embeddings={str(k): str(v) for k, v in (data.get("text_embeddings") or {}).items()},
        )
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Cross-check entries so that a reader never indexes outside an array."""
        sizes = {}
        for c in self.chunks:
            if c.id in sizes:
                raise DatasetError(f"{where}: chunk id '{c.id}' listed twice")
            if c.num_steps <= 0:
                raise DatasetError(f"{where}: chunk '{c.id}' has num_steps = {c.num_steps}")
            sizes[c.id] = c.num_steps
        for i, e in enumerate(self.episodes):
            if e.chunk not in sizes:
                raise DatasetError(f"{where}: episodes[{i}].chunk = '{e.chunk}' is not a listed chunk")
            if e.length <= 0 or e.start < 0 or e.start + e.length > sizes[e.chunk]:
                raise DatasetError(
                    f"{where}: episodes[{i}] (start={e.start}, length={e.length}) does not fit chunk "
                    f"'{e.chunk}' of {sizes[e.chunk]} steps"
                )
            if not (e.instruction_index == NO_INSTRUCTION or 0 <= e.instruction_index < len(self.instructions)):
                raise DatasetError(
                    f"{where}: episodes[{i}].instruction_index = {e.instruction_index} but the table has "
                    f"{len(self.instructions)} instructions"
                )

    def robot_contract(self, where: str) -> RobotContract:
        return RobotContract.from_dict(self.contract, where=f"{where} (embedded contract)")


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"{root}: not a replay dataset (no {MANIFEST_NAME})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from None
    return Manifest.from_dict(data, where=str(path))


def fsync_dir(path: Path) -> None:
    """Make a rename / file creation inside ``path`` durable (POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to ``<path>.tmp``, fsync, then ``os.replace``: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(root: Path, manifest: Manifest) -> None:
    write_bytes_atomic(root / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=1).encode())
