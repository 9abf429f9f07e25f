"""Append episodes to a replay dataset so that nothing half-written is ever visible.

Why transactions: a converter may run for hours over many bags; if it dies (or one bag is bad) the
dataset must stay exactly as it was before, and re-running it must neither duplicate nor lose
episodes. So every transaction streams its episodes into a hidden temp chunk, fsyncs it, renames it
into place and only then swaps ``manifest.json`` (the single source of truth readers trust) with
``os.replace``. An unreferenced chunk or temp dir left by a crash is invisible and is removed by the
next writer. Episodes carry a ``source_id`` (e.g. a bag identity); a known one is skipped.

One writer per dataset at a time (an ``flock`` on ``.writer.lock`` enforces it); readers need no lock.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import struct
import uuid
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from q_transformer_ros.replay.format import (
    ACTIONS_FILE, CHUNKS_DIR, EMBEDDINGS_DIR, LOCK_NAME, MANIFEST_NAME, MANIFEST_TMP_NAME, MC_RETURNS_FILE,
    NO_INSTRUCTION, REWARDS_FILE, STATE_FILE, STEP_ARRAYS, TERMINALS_FILE, TMP_PREFIX, TRUNCATED_FILE, ChunkEntry,
    DatasetError, EpisodeEntry, Manifest, embedding_file, frames_file, fsync_dir, read_manifest,
    write_bytes_atomic, write_manifest,
)
from q_transformer_ros.replay.returns import discounted_returns
from q_transformer_ros.contract import RobotContract

_NPY_HEADER_BYTES = 256
"""Fixed header size of the .npy files we stream, so the final shape can be written in place."""


class StepObservation(Protocol):
    """What ``EpisodeData.from_observations`` reads of one step: ``observation.Observation`` has it.
    A protocol, not that class, so this numpy-only layer imports nothing above the contract."""

    frames: Mapping[str, np.ndarray]
    state: np.ndarray | None


@dataclass
class EpisodeData:
    """One episode in memory, as handed to the writer.

    Step t holds the observation (one frame per camera), the action taken there and its reward.
    """

    frames: dict[str, np.ndarray]
    """Camera name -> uint8 (T, 3, H, W) RGB frames at the contract's size (one per step)."""
    actions: np.ndarray
    """float32 (T, D) continuous actions in the contract's units (bins are derived at load)."""
    success: bool
    """The task was achieved (drives the default sparse reward)."""
    terminal: bool | None = None
    """The last step ends the task (no bootstrap past it). Default: ``terminal = success``; a
    non-terminal episode is a time-limit truncation."""
    instruction: str | None = None
    """Language instruction; None = no instruction (index -1)."""
    source_id: str | None = None
    """Where the episode came from (bag identity, env seed); episodes with a known id are skipped."""
    rewards: np.ndarray | None = None
    """Optional float32 (T,) rewards. Default sparse: 1 on the last step if ``success`` else 0."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-serializable extras stored in the manifest's episode entry."""
    state: np.ndarray | None = None
    """float32 (T, S) raw state inputs at each step's observation (contract order); required exactly
    when the contract declares state inputs."""

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions)
        if self.state is not None:
            self.state = np.asarray(self.state)
        if self.actions.ndim != 2:
            raise DatasetError(f"episode {self.name}: actions must be (T, D), got shape {self.actions.shape}")
        self.success = bool(self.success)
        self.terminal = self.success if self.terminal is None else bool(self.terminal)
        if self.rewards is None:
            self.rewards = np.zeros(self.actions.shape[0], dtype=np.float32)
            if self.success and self.actions.shape[0] > 0:
                self.rewards[-1] = 1.0
        self.rewards = np.asarray(self.rewards)
        if not isinstance(self.metadata, dict):
            raise DatasetError(f"episode {self.name}: metadata must be a dict, got {type(self.metadata).__name__}")

    @classmethod
    def from_observations(cls, observations: Sequence[StepObservation], actions: np.ndarray | Sequence[np.ndarray],
                          **fields: Any) -> "EpisodeData":
        """An episode from the ``Observation`` seen at each step (what an environment or the control loop
        produces) and the action taken there; ``fields``: the other fields (success, instruction, ...).

        Why: collectors hold one Observation per step; stacking its cameras and state here, once, keeps
        them from threading frames and state as separate lists (a new input declared by the contract
        then needs no change in any collector). Steps must carry the same cameras, and state in all or
        none."""
        if not observations:
            raise DatasetError("EpisodeData.from_observations: no observations")
        def layout(o: StepObservation) -> tuple[list[str], bool]:
            return sorted(o.frames), o.state is not None

        first = layout(observations[0])
        for t, o in enumerate(observations):
            if layout(o) != first:
                raise DatasetError(f"EpisodeData.from_observations: step {t} has (cameras, state given) {layout(o)}, "
                                   f"step 0 has {first}")
        cams, has_state = first
        frames = {c: np.stack([o.frames[c] for o in observations]) for c in cams}
        state = np.stack([np.asarray(o.state, dtype=np.float32) for o in observations]) if has_state else None
        return cls(frames=frames, actions=np.stack([np.asarray(a) for a in actions]).astype(np.float32), state=state,
                   **fields)

    @property
    def name(self) -> str:
        """How errors refer to the episode."""
        return repr(self.source_id) if self.source_id is not None else "<no source_id>"

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


def validate_episode(ep: EpisodeData, contract: RobotContract, where: str) -> None:
    """Check an episode against the contract; errors name the dataset, episode, camera/step."""
    who = f"{where}: episode {ep.name}"
    T = ep.length
    if T == 0:
        raise DatasetError(f"{who}: empty episode (0 steps)")
    names = [c.name for c in contract.cameras]
    if sorted(ep.frames) != sorted(names):
        raise DatasetError(f"{who}: frames given for cameras {sorted(ep.frames)}, contract '{contract.name}' has {names}")
    for cam in contract.cameras:
        fr = ep.frames[cam.name]
        want = (T, 3, cam.height, cam.width)
        if not isinstance(fr, np.ndarray) or fr.dtype != np.uint8 or fr.shape != want:
            got = (getattr(fr, "shape", None), str(getattr(fr, "dtype", type(fr).__name__)))
            raise DatasetError(
                f"{who}: camera '{cam.name}' frames are shape {got[0]} dtype {got[1]}, expected uint8 {want} "
                f"(T, 3, H, W)"
            )
    D = contract.num_action_dims
    if ep.actions.shape != (T, D):
        raise DatasetError(f"{who}: actions have shape {ep.actions.shape}, expected ({T}, {D}) for dims "
                           f"{[d.name for d in contract.action_dims]}")
    if not np.issubdtype(ep.actions.dtype, np.number):
        raise DatasetError(f"{who}: actions dtype {ep.actions.dtype} is not numeric")
    acts = ep.actions.astype(np.float32)
    bad = ~np.isfinite(acts)
    if bad.any():
        t, d = np.argwhere(bad)[0]
        raise DatasetError(f"{who}: step {t}: action dim '{contract.action_dims[d].name}' is "
                           f"{float(ep.actions[t, d])} (NaN/inf in actions)")
    S = contract.state_dim
    if S == 0 and ep.state is not None:
        raise DatasetError(f"{who}: state given, but contract '{contract.name}' declares no state_inputs")
    if S > 0:
        names = [s.name for s in contract.state_inputs]
        if ep.state is None:
            raise DatasetError(f"{who}: no state given; contract '{contract.name}' declares state inputs {names}")
        if ep.state.shape != (T, S) or not np.issubdtype(ep.state.dtype, np.number):
            raise DatasetError(f"{who}: state has shape {ep.state.shape} dtype {ep.state.dtype}, expected "
                               f"numeric ({T}, {S}) for state inputs {names}")
        bad = ~np.isfinite(ep.state.astype(np.float32))
        if bad.any():
            t, s = np.argwhere(bad)[0]
            raise DatasetError(f"{who}: step {t}: state input '{names[s]}' is {float(ep.state[t, s])} (NaN/inf in state)")
    if ep.rewards.shape != (T,):
        raise DatasetError(f"{who}: rewards have shape {ep.rewards.shape}, expected ({T},)")
    rew = ep.rewards.astype(np.float32)
    bad = ~np.isfinite(rew)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{who}: step {t}: reward is {float(ep.rewards[t])} (NaN/inf in rewards)")


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 .npy header padded to a fixed size (numpy accepts space padding)."""
    d = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    hlen = _NPY_HEADER_BYTES - 10
    if len(d) + 1 > hlen:
        raise DatasetError(f"array header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", hlen) + (d.ljust(hlen - 1) + "\n").encode("latin1")


class _StreamedArray:
    """A .npy file whose first axis grows as episodes are appended (header rewritten on close)."""

    def __init__(self, path: Path, dtype: np.dtype, tail: tuple[int, ...]):
        self.path, self.dtype, self.tail, self.rows = path, np.dtype(dtype), tail, 0
        self.f: BinaryIO = open(path, "wb")
        self.f.write(_npy_header(self.dtype, (0, *tail)))

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        assert arr.shape[1:] == self.tail, (arr.shape, self.tail)
        self.f.write(memoryview(arr).cast("B"))
        self.rows += arr.shape[0]

    def finish(self) -> None:
        self.f.flush()
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, (self.rows, *self.tail)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


class Transaction:
    """Episodes added here become visible together, in one new chunk, when the ``with`` block exits
    without an exception; on an exception nothing is written. Use through ``ReplayWriter.transaction``."""

    def __init__(self, writer: "ReplayWriter"):
        self.writer = writer
        # deterministic: the same inputs give the same dataset, byte for byte (a chunk folder a crashed
        # writer left under this name was not in the manifest and was removed when the writer opened)
        self.chunk_id = f"{len(writer.manifest.chunks):06d}"
        self.tmp_dir = writer.root / CHUNKS_DIR / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        self.tmp_dir.mkdir()
        c = writer.contract
        self._arrays: dict[str, _StreamedArray] = {}
        for cam in c.cameras:
            self._arrays[frames_file(cam.name)] = _StreamedArray(
                self.tmp_dir / frames_file(cam.name), np.uint8, (3, cam.height, cam.width))
        for name, dtype in STEP_ARRAYS.items():
            tail = (c.num_action_dims,) if name == ACTIONS_FILE else ()
            self._arrays[name] = _StreamedArray(self.tmp_dir / name, dtype, tail)
        if c.state_dim:
            self._arrays[STATE_FILE] = _StreamedArray(self.tmp_dir / STATE_FILE, np.dtype(np.float32), (c.state_dim,))
        self.episodes: list[EpisodeEntry] = []
        self.new_instructions: list[str] = []
        self.skipped: list[str] = []
        """source_ids skipped because the dataset (or this transaction) already has them."""
        self._source_ids = writer.manifest.source_ids()

    @property
    def num_steps(self) -> int:
        return self._arrays[ACTIONS_FILE].rows

    def add_episode(self, ep: EpisodeData) -> bool:
        """Validate and stream one episode into the transaction's chunk. Returns False (and writes
        nothing) when its ``source_id`` is already in the dataset or in this transaction."""
        w = self.writer
        validate_episode(ep, w.contract, str(w.root))
        if ep.source_id is not None and ep.source_id in self._source_ids:
            self.skipped.append(ep.source_id)
            return False
        instructions = w.manifest.instructions + self.new_instructions
        if ep.instruction is None:
            ins = NO_INSTRUCTION
        elif ep.instruction in instructions:
            ins = instructions.index(ep.instruction)
        else:
            self.new_instructions.append(ep.instruction)
            ins = len(instructions)
        T = ep.length
        rewards = ep.rewards.astype(np.float32)
        terminals = np.zeros(T, dtype=bool)
        truncated = np.zeros(T, dtype=bool)
        (terminals if ep.terminal else truncated)[-1] = True
        start = self.num_steps
        for cam in w.contract.cameras:
            self._arrays[frames_file(cam.name)].append(ep.frames[cam.name])
        self._arrays[ACTIONS_FILE].append(ep.actions.astype(np.float32))
        if ep.state is not None:
            self._arrays[STATE_FILE].append(ep.state.astype(np.float32))
        self._arrays[REWARDS_FILE].append(rewards)
        self._arrays[TERMINALS_FILE].append(terminals)
        self._arrays[TRUNCATED_FILE].append(truncated)
        self._arrays[MC_RETURNS_FILE].append(discounted_returns(rewards, w.discount))
        self.episodes.append(EpisodeEntry(
            chunk=self.chunk_id, start=start, length=T, instruction_index=ins, source_id=ep.source_id,
            success=ep.success, terminal=bool(ep.terminal), truncated=not ep.terminal, metadata=dict(ep.metadata),
        ))
        if ep.source_id is not None:
            self._source_ids.add(ep.source_id)
        w._stage("episode_written")
        return True

    def _abort(self) -> None:
        for a in self._arrays.values():
            a.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _commit(self) -> None:
        w = self.writer
        if not self.episodes:
            self._abort()
            return
        new = deepcopy(w.manifest)
        new.episodes.extend(self.episodes)
        new.instructions.extend(self.new_instructions)
        new.chunks.append(ChunkEntry(id=self.chunk_id, num_steps=self.num_steps))
        stale = []
        if self.new_instructions:  # cached embeddings no longer cover the instruction table
            stale = list(new.text_embeddings.values())
            new.text_embeddings = {}
        try:  # metadata must be JSON before anything is renamed into place
            json.dumps(new.to_dict())
        except TypeError as e:
            raise DatasetError(f"{w.root}: episode metadata is not JSON-serializable: {e}") from None
        for a in self._arrays.values():
            a.finish()
        fsync_dir(self.tmp_dir)
        w._stage("chunk_written")
        final = w.root / CHUNKS_DIR / self.chunk_id
        os.rename(self.tmp_dir, final)
        fsync_dir(w.root / CHUNKS_DIR)
        w._stage("chunk_renamed")
        write_manifest(w.root, new)
        w.manifest = new
        w._stage("manifest_written")
        for name in stale:
            (w.root / EMBEDDINGS_DIR / name).unlink(missing_ok=True)


class ReplayWriter:
    """Create or open a replay dataset folder and append episodes to it atomically.

    ``ReplayWriter(path, contract)`` creates the dataset if needed (``create_ok``); an existing one
    must have been made with a compatible contract (same cameras and action dims; ranges and bins may
    differ because actions are stored continuous). Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | Path, contract: RobotContract, create_ok: bool = True):
        self.root = Path(path)
        self.contract = contract
        self.stage_hook: Callable[[str], None] | None = None
        """Test hook called with 'episode_written' | 'chunk_written' | 'chunk_renamed' | 'manifest_written'."""
        self._lock_fd: int | None = None
        if not (self.root / MANIFEST_NAME).exists():
            if not create_ok:
                raise DatasetError(f"{self.root}: no replay dataset here (no {MANIFEST_NAME}) and create_ok=False")
            if self.root.exists() and not self.root.is_dir():
                raise DatasetError(f"{self.root}: exists and is not a directory")
            self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if (self.root / MANIFEST_NAME).exists():
                self.manifest = read_manifest(self.root)
                existing = self.manifest.robot_contract(str(self.root / MANIFEST_NAME))
                contract.check_compatible(existing, what="replay dataset", where=str(self.root))
            else:
                leftovers = {p.name for p in self.root.iterdir()} - {CHUNKS_DIR, EMBEDDINGS_DIR, LOCK_NAME, MANIFEST_TMP_NAME}
                if leftovers:
                    raise DatasetError(f"{self.root}: not empty and not a replay dataset (has {sorted(leftovers)[:5]}, "
                                       f"no {MANIFEST_NAME})")
                (self.root / CHUNKS_DIR).mkdir(exist_ok=True)
                self.manifest = Manifest(contract=contract.to_dict())
                write_manifest(self.root, self.manifest)
            self._clean_orphans()
        except BaseException:
            self.close()
            raise

    # -- properties -----------------------------------------------------------------------------
    @property
    def discount(self) -> float:
        """Discount of MC returns: the dataset's embedded contract (so all chunks agree)."""
        return float(self.manifest.contract.get("discount", self.contract.discount))

    @property
    def num_episodes(self) -> int:
        return len(self.manifest.episodes)

    @property
    def num_steps(self) -> int:
        return self.manifest.num_steps

    @property
    def instructions(self) -> list[str]:
        return list(self.manifest.instructions)

    def has_source(self, source_id: str) -> bool:
        return source_id in self.manifest.source_ids()

    # -- writing --------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """``with writer.transaction() as tx: tx.add_episode(...)`` — all or nothing, one chunk."""
        self._check_open()
        tx = Transaction(self)
        try:
            yield tx
        except BaseException:
            tx._abort()
            raise
        try:
            tx._commit()
        except BaseException:
            tx._abort()
            raise

    def add_episode(self, episode: EpisodeData) -> bool:
        """Append one episode in its own transaction; False if its source_id is already present."""
        with self.transaction() as tx:
            return tx.add_episode(episode)

    def add_episodes(self, episodes: Iterable[EpisodeData]) -> list[bool]:
        """Append several episodes in one transaction (one chunk); returns added/skipped per episode."""
        with self.transaction() as tx:
            return [tx.add_episode(ep) for ep in episodes]

    def set_text_embeddings(self, key: str, embeddings: np.ndarray) -> None:
        """Cache instruction embeddings of one encoder: float32 (I, T), row i = ``instructions[i]``."""
        self._check_open()
        emb = np.asarray(embeddings, dtype=np.float32)
        n = len(self.manifest.instructions)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise DatasetError(f"{self.root}: text embeddings '{key}' have shape {emb.shape}, expected ({n}, T) "
                               f"(one row per instruction)")
        if not np.isfinite(emb).all():
            raise DatasetError(f"{self.root}: text embeddings '{key}' contain NaN/inf")
        (self.root / EMBEDDINGS_DIR).mkdir(exist_ok=True)
        name = embedding_file(key)
        buf = io.BytesIO()
        np.save(buf, emb)
        write_bytes_atomic(self.root / EMBEDDINGS_DIR / name, buf.getvalue())
        new = deepcopy(self.manifest)
        new.text_embeddings[key] = name
        write_manifest(self.root, new)
        self.manifest = new

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "ReplayWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _stage(self, name: str) -> None:
        if self.stage_hook is not None:
            self.stage_hook(name)

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise DatasetError(f"{self.root}: writer is closed")

    def _lock(self) -> None:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatasetError(f"{self.root}: another ReplayWriter has this dataset open (lock {LOCK_NAME})") from None
        self._lock_fd = fd

    def _clean_orphans(self) -> None:
        """Remove what a crashed writer left: temp chunks, chunks the manifest never listed, temp
        manifest and unreferenced embedding files. Safe because we hold the writer lock."""
        chunks = self.root / CHUNKS_DIR
        known = {c.id for c in self.manifest.chunks}
        if chunks.is_dir():
            for p in chunks.iterdir():
                if p.name not in known:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        (self.root / MANIFEST_TMP_NAME).unlink(missing_ok=True)
        emb = self.root / EMBEDDINGS_DIR
        if emb.is_dir():
            keep = set(self.manifest.text_embeddings.values())
            for p in emb.iterdir():
                if p.name not in keep:
                    p.unlink(missing_ok=True)
