"""Read a replay dataset as training samples: frame-history windows, n-step rewards and bootstraps.

Why it looks like this: frames are by far the largest data, so they stay on disk as memory maps and
each frame is stored once; history windows (padded at the episode start by repeating the first frame)
are assembled at sample time with numpy fancy indexing. Everything small (actions, rewards, flags,
returns) is loaded into RAM once, bins are computed from the *given* contract (so re-binning needs no
reconversion) and the n-step layout of every sample is precomputed, so ``get_batch`` is a handful of
vectorised gathers returning one typed :class:`~q_transformer_ros.core.batch.Batch`. ``__getitem__`` is
written independently (plain per-sample slicing, a ``ReplaySample`` dict with the same field names) and
the tests check that both agree field by field.

Axis legend: B batch, C cameras, F frame history, N n-step, D action dims, H W image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, Sequence, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from q_transformer_ros.core.batch import Batch
from q_transformer_ros.replay.format import (
    ACTIONS_FILE, CHUNKS_DIR, EMBEDDINGS_DIR, MANIFEST_NAME, MC_RETURNS_FILE, REWARDS_FILE, STATE_FILE, STEP_ARRAYS,
    TERMINALS_FILE, TRUNCATED_FILE, DatasetError, Manifest, frames_file, read_manifest,
)
from q_transformer_ros.replay.returns import discounted_returns, n_step_layout, n_step_rewards
from q_transformer_ros.contract import RobotContract


class ReplaySample(TypedDict):
    """One sample (``__getitem__``, the reference path); ``get_batch`` returns a
    :class:`~q_transformer_ros.core.batch.Batch` with the same field names and a leading B axis."""

    frames: torch.Tensor
    """uint8 (C, F, 3, H, W): history window ending at step t (first frame repeated at episode start)."""
    next_frames: torch.Tensor
    """uint8 (C, F, 3, H, W): window ending at step t + n_eff (the bootstrap state)."""
    action_bins: torch.Tensor
    """int64 (D,): bins of the action at t under the reader's contract."""
    actions: torch.Tensor
    """float32 (D,): the stored continuous action at t."""
    rewards: torch.Tensor
    """float32 (N,): r_t .. r_{t+n_eff-1}, zero-padded to n_step."""
    reward_mask: torch.Tensor
    """bool (N,): which entries of ``rewards`` are real."""
    n_step_return: torch.Tensor
    """float32 (): sum_k gamma^k r_{t+k} over the n_eff rewards."""
    discount_to_next: torch.Tensor
    """float32 (): gamma^n_eff, or 0 when the episode's terminal transition is inside the window."""
    n_eff: torch.Tensor
    """int64 (): number of real rewards (1..n_step)."""
    mc_return: torch.Tensor
    """float32 (): discounted return-to-go from t to the episode end (the MC lower bound)."""
    instruction_index: torch.Tensor
    """int64 (): row of ``instructions`` / text embeddings, -1 = no instruction."""
    terminal: torch.Tensor
    """bool (): the window reaches a terminal transition (same as discount_to_next == 0)."""
    step_index: torch.Tensor
    """int64 (): global step index of t (chunks concatenated in manifest order)."""
    episode_index: torch.Tensor
    """int64 (): index of the episode in the manifest."""
    state: NotRequired[torch.Tensor]
    """float32 (F, S): the robot's state inputs over the frame window, normalised by the reader's
    contract (only when it declares state inputs)."""
    next_state: NotRequired[torch.Tensor]
    """float32 (F, S): the same over the bootstrap window."""


@dataclass
class StoredEpisode:
    """One episode exactly as stored (for checks, converters' tests and tools)."""

    frames: dict[str, np.ndarray]
    """Camera -> uint8 (L, 3, H, W) (memory-mapped, read-only)."""
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    truncated: np.ndarray
    mc_returns: np.ndarray
    instruction: str | None
    source_id: str | None
    success: bool
    terminal: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    state: np.ndarray | None = None
    """float32 (L, S) raw state inputs as stored (None without state inputs)."""


def _select_episodes(episodes: slice | Sequence[int] | np.ndarray | None, n: int, where: str) -> np.ndarray:
    if episodes is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(episodes, slice):
        return np.arange(n, dtype=np.int64)[episodes]
    sel = np.asarray(episodes, dtype=np.int64).reshape(-1)
    if sel.size and (sel.min() < -n or sel.max() >= n):
        raise DatasetError(f"{where}: episode indices {sel.min()}..{sel.max()} out of range for {n} episodes")
    return np.where(sel < 0, sel + n, sel)


class ReplayDataset(Dataset):
    """A replay dataset folder as a torch ``Dataset`` of n-step samples.

    Args:
        path: dataset folder (with manifest.json).
        contract: contract to read with; must be compatible with the dataset's (same cameras and
            action dims). Its bins, ranges, discount and frame history are used. Default: the
            dataset's own contract.
        n_step: number of rewards per sample before bootstrapping.
        episodes: which episodes (manifest order) to sample from, e.g. ``slice(0, 90)`` for a split.

    A step t of an episode of length L is a sample when it has a next state in the episode
    (t < L - 1) or it is the last step of a terminal episode. The last step of a truncated episode
    has no next observation, so it is not a sample; the step before it bootstraps from it.
    """

    def __init__(
        self,
        path: str | Path,
        contract: RobotContract | None = None,
        n_step: int = 1,
        episodes: slice | Sequence[int] | np.ndarray | None = None,
    ):
        self.root = Path(path)
        where = str(self.root)
        if not isinstance(n_step, int) or n_step < 1:
            raise ValueError(f"{where}: n_step must be an integer >= 1, got {n_step!r}")
        self.n_step = n_step
        self.manifest: Manifest = read_manifest(self.root)
        self.dataset_contract = self.manifest.robot_contract(str(self.root / MANIFEST_NAME))
        if contract is not None:
            contract.check_compatible(self.dataset_contract, what="replay dataset", where=where)
        self.contract: RobotContract = contract if contract is not None else self.dataset_contract
        if not self.manifest.episodes:
            raise DatasetError(f"{where}: dataset is empty (no episodes; an interrupted first conversion leaves "
                               f"this: run convert_bag again, it continues)")
        sizes = {(c.height, c.width) for c in self.contract.cameras}
        if len(sizes) != 1:
            raise DatasetError(f"{where}: cameras have different sizes {sizes}; frames (C, F, 3, H, W) need one size")

        # -- small per-step arrays, all chunks concatenated (global step index) --------------------
        self._chunk_ids = [c.id for c in self.manifest.chunks]
        chunk_pos = {cid: i for i, cid in enumerate(self._chunk_ids)}
        counts = np.array([c.num_steps for c in self.manifest.chunks], dtype=np.int64)
        self._chunk_offset = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in STEP_ARRAYS}
        D = self.contract.num_action_dims
        for c in self.manifest.chunks:
            for name, dtype in STEP_ARRAYS.items():
                f = self.root / CHUNKS_DIR / c.id / name
                try:
                    arr = np.load(f)
                except (OSError, ValueError) as e:
                    raise DatasetError(f"{f}: cannot read: {e}") from None
                want = (c.num_steps, D) if name == ACTIONS_FILE else (c.num_steps,)
                if arr.shape != want or arr.dtype != dtype:
                    raise DatasetError(f"{f}: shape {arr.shape} dtype {arr.dtype}, manifest says {want} {dtype}")
                parts[name].append(arr)
        self.actions = np.concatenate(parts[ACTIONS_FILE])
        self.rewards = np.concatenate(parts[REWARDS_FILE])
        self.terminals = np.concatenate(parts[TERMINALS_FILE])
        self.truncated = np.concatenate(parts[TRUNCATED_FILE])
        self.mc_returns = np.concatenate(parts[MC_RETURNS_FILE])
        self.action_bins = self.contract.actions_to_bins(self.actions)
        self.state = self._load_state() if self.contract.state_dim else None
        """float32 (steps, S) raw state inputs as stored; ``state_norm`` is what the model sees."""
        self.state_norm = self.contract.normalize_state(self.state) if self.state is not None else None

        # -- episodes -----------------------------------------------------------------------------
        eps = self.manifest.episodes
        self.ep_chunk = np.array([chunk_pos[e.chunk] for e in eps], dtype=np.int64)
        self.ep_local_start = np.array([e.start for e in eps], dtype=np.int64)
        self.ep_start = self._chunk_offset[self.ep_chunk] + self.ep_local_start
        self.ep_length = np.array([e.length for e in eps], dtype=np.int64)
        self.ep_terminal = np.array([e.terminal for e in eps], dtype=bool)
        self.ep_instruction = np.array([e.instruction_index for e in eps], dtype=np.int64)
        if abs(self.contract.discount - self.dataset_contract.discount) > 1e-12:
            # stored returns use the dataset's discount; recompute them with ours
            for s, L in zip(self.ep_start, self.ep_length):
                self.mc_returns[s:s + L] = discounted_returns(self.rewards[s:s + L], self.contract.discount)

        # -- samples ------------------------------------------------------------------------------
        self.selected_episodes = _select_episodes(episodes, len(eps), where)
        per_ep = self.ep_length[self.selected_episodes] - 1 + self.ep_terminal[self.selected_episodes]
        total = int(per_ep.sum())
        if total == 0:
            raise DatasetError(f"{where}: the selected {len(self.selected_episodes)} episode(s) have no samples "
                               f"(each needs a next state or a terminal last step)")
        self.sample_episode = np.repeat(self.selected_episodes, per_ep)
        firsts = np.concatenate([[0], np.cumsum(per_ep)[:-1]])
        self.sample_t = np.arange(total, dtype=np.int64) - np.repeat(firsts, per_ep)
        L = self.ep_length[self.sample_episode]
        self._layout = n_step_layout(self.sample_t, L, self.ep_terminal[self.sample_episode], n_step,
                                     self.contract.discount)
        self._frames: dict[int, dict[str, np.ndarray]] = {}

    def _load_state(self) -> np.ndarray:
        S = self.contract.state_dim
        parts = []
        for c in self.manifest.chunks:
            f = self.root / CHUNKS_DIR / c.id / STATE_FILE
            try:
                arr = np.load(f)
            except (OSError, ValueError) as e:
                raise DatasetError(f"{f}: cannot read the state inputs "
                                   f"{[s.name for s in self.contract.state_inputs]}: {e}") from None
            if arr.shape != (c.num_steps, S) or arr.dtype != np.float32:
                raise DatasetError(f"{f}: shape {arr.shape} dtype {arr.dtype}, manifest and contract say "
                                   f"({c.num_steps}, {S}) float32")
            parts.append(arr)
        return np.concatenate(parts)

    # -- public info ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sample_t.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_episodes(self) -> int:
        return len(self.manifest.episodes)

    @property
    def instructions(self) -> list[str]:
        return list(self.manifest.instructions)

    @property
    def frame_history(self) -> int:
        return self.contract.frame_history

    @property
    def camera_names(self) -> list[str]:
        return [c.name for c in self.contract.cameras]

    def text_embeddings(self, key: str) -> np.ndarray | None:
        """Cached embeddings (I, T) float32 of encoder ``key``, or None if not cached."""
        name = self.manifest.text_embeddings.get(key)
        if name is None:
            return None
        f = self.root / EMBEDDINGS_DIR / name
        try:
            emb = np.load(f)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{f}: cannot read text embeddings '{key}': {e}") from None
        if emb.ndim != 2 or emb.shape[0] != len(self.manifest.instructions):
            raise DatasetError(f"{f}: text embeddings '{key}' have shape {emb.shape}, expected "
                               f"({len(self.manifest.instructions)}, T)")
        return emb

    def episode(self, index: int) -> StoredEpisode:
        """Episode ``index`` (manifest order) as stored, all steps, independent of sampling."""
        e = self.manifest.episodes[index]
        s, L = int(self.ep_start[index]), e.length
        mms = self._chunk_frames(int(self.ep_chunk[index]))
        b = e.start
        return StoredEpisode(
            frames={k: v[b:b + L] for k, v in mms.items()},
            actions=self.actions[s:s + L], rewards=self.rewards[s:s + L], terminals=self.terminals[s:s + L],
            truncated=self.truncated[s:s + L], mc_returns=self.mc_returns[s:s + L],
            instruction=None if e.instruction_index < 0 else self.manifest.instructions[e.instruction_index],
            source_id=e.source_id, success=e.success, terminal=e.terminal, metadata=dict(e.metadata),
            state=None if self.state is None else self.state[s:s + L],
        )

    def summary(self) -> dict[str, Any]:
        frame_bytes = sum(3 * c.height * c.width for c in self.contract.cameras)
        disk = sum(p.stat().st_size for p in (self.root / CHUNKS_DIR).rglob("*.npy"))
        return {
            "path": str(self.root),
            "contract": self.contract.name,
            "cameras": self.camera_names,
            "num_episodes": self.num_episodes,
            "num_steps": self.num_steps,
            "num_samples": len(self),
            "selected_episodes": int(len(self.selected_episodes)),
            "success_rate": float(np.mean([e.success for e in self.manifest.episodes])),
            "terminal_episodes": int(self.ep_terminal.sum()),
            "mean_episode_length": float(self.ep_length.mean()),
            "num_instructions": len(self.manifest.instructions),
            "num_chunks": len(self._chunk_ids),
            "n_step": self.n_step,
            "frame_history": self.frame_history,
            "text_embeddings": sorted(self.manifest.text_embeddings),
            "bytes_on_disk": int(disk),
            "bytes_per_step": disk / max(self.num_steps, 1),
            "frame_bytes_per_step": frame_bytes,
        }

    # -- frames ---------------------------------------------------------------------------------
    def _chunk_frames(self, chunk: int) -> dict[str, np.ndarray]:
        """Memory maps of one chunk's frames (opened on first use, so workers open their own)."""
        fr = self._frames.get(chunk)
        if fr is None:
            cid = self._chunk_ids[chunk]
            n = self.manifest.chunks[chunk].num_steps
            fr = {}
            for cam in self.contract.cameras:
                f = self.root / CHUNKS_DIR / cid / frames_file(cam.name)
                try:
                    mm = np.load(f, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise DatasetError(f"{f}: cannot open frames of camera '{cam.name}': {e}") from None
                want = (n, 3, cam.height, cam.width)
                if mm.shape != want or mm.dtype != np.uint8:
                    raise DatasetError(f"{f}: camera '{cam.name}' frames are {mm.shape} {mm.dtype}, expected uint8 {want}")
                fr[cam.name] = mm
            self._frames[chunk] = fr
        return fr

    def open_all(self) -> None:
        """Memory-map every chunk now (otherwise done lazily on first access)."""
        for c in range(len(self._chunk_ids)):
            self._chunk_frames(c)

    def _gather(self, episode: np.ndarray, *offsets: np.ndarray) -> list[np.ndarray]:
        """Frames at episode-local ``offsets`` (B, K) of ``episode`` (B,) -> uint8 (B, C, K, 3, H, W) each.

        One ``np.take`` per (chunk, camera, window) straight from the memory map, then one copy into
        place: no per-sample loop and no intermediate stacks.
        """
        cams = self.contract.cameras
        B = episode.shape[0]
        H, W = cams[0].height, cams[0].width
        outs = [np.empty((B, len(cams), o.shape[1], 3, H, W), dtype=np.uint8) for o in offsets]
        chunk = self.ep_chunk[episode]
        start = self.ep_local_start[episode][:, None]
        for c in np.unique(chunk):
            rows = np.flatnonzero(chunk == c)
            whole = rows.size == B
            mms = self._chunk_frames(int(c))
            for off, out in zip(offsets, outs):
                idx = (start + off) if whole else (start[rows] + off[rows])
                if whole and len(cams) == 1:  # the output is contiguous: take straight into it
                    np.take(mms[cams[0].name], idx.reshape(-1), axis=0, mode="clip", out=out.reshape(-1, 3, H, W))
                    continue
                for ci, cam in enumerate(cams):
                    got = np.take(mms[cam.name], idx.reshape(-1), axis=0, mode="clip")
                    got = got.reshape(*idx.shape, 3, H, W)
                    if whole:
                        out[:, ci] = got
                    else:
                        out[rows, ci] = got
        return outs

    # -- samples --------------------------------------------------------------------------------
    def get_batch(self, indices: np.ndarray | Sequence[int]) -> Batch:
        """A whole batch of samples with vectorised indexing: the fields of ``__getitem__`` with a leading b
        axis, as one :class:`~q_transformer_ros.core.batch.Batch`."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.root}: sample indices {idx.min()}..{idx.max()} out of range for {len(self)} samples")
        F, N, gamma = self.frame_history, self.n_step, self.contract.discount
        ep, t = self.sample_episode[idx], self.sample_t[idx]
        n_eff = self._layout.n_eff[idx]
        nxt = self._layout.next_offset[idx]
        back = np.arange(-(F - 1), 1, dtype=np.int64)
        frames, next_frames = self._gather(ep, (t[:, None] + back).clip(min=0), (nxt[:, None] + back).clip(min=0))
        g = self.ep_start[ep] + t
        rewards, mask = n_step_rewards(self.rewards, g, n_eff, N)
        powers = np.power(gamma, np.arange(N, dtype=np.float64))
        state = next_state = None
        if self.state_norm is not None:
            first = self.ep_start[ep][:, None]
            state = torch.from_numpy(self.state_norm[first + (t[:, None] + back).clip(min=0)])
            next_state = torch.from_numpy(self.state_norm[first + (nxt[:, None] + back).clip(min=0)])
        return Batch(
            frames=torch.from_numpy(frames),
            next_frames=torch.from_numpy(next_frames),
            state=state,
            next_state=next_state,
            action_bins=torch.from_numpy(self.action_bins[g]),
            actions=torch.from_numpy(self.actions[g]),
            rewards=torch.from_numpy(rewards),
            reward_mask=torch.from_numpy(mask),
            n_step_return=torch.from_numpy((rewards.astype(np.float64) @ powers).astype(np.float32)),
            discount_to_next=torch.from_numpy(self._layout.discount_to_next[idx]),
            n_eff=torch.from_numpy(n_eff.astype(np.int64)),
            mc_return=torch.from_numpy(self.mc_returns[g]),
            instruction_index=torch.from_numpy(self.ep_instruction[ep]),
            terminal=torch.from_numpy(self._layout.terminal[idx]),
            step_index=torch.from_numpy(g),
            episode_index=torch.from_numpy(ep.astype(np.int64)),
        )

    def __getitem__(self, i: int) -> ReplaySample:
        """One sample, by plain per-sample slicing (the reference path ``get_batch`` is tested against)."""
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.root}: sample {i} out of range for {len(self)} samples")
        e, t = int(self.sample_episode[i]), int(self.sample_t[i])
        L, term, s = int(self.ep_length[e]), bool(self.ep_terminal[e]), int(self.ep_start[e])
        F, N, gamma = self.frame_history, self.n_step, self.contract.discount
        end = L if term else L - 1          # last index + 1 a reward window may reach
        n_eff = min(N, end - t)
        hit_terminal = term and t + n_eff == L
        nxt = min(t + n_eff, L - 1)
        mms = self._chunk_frames(int(self.ep_chunk[e]))
        base = int(self.ep_local_start[e])

        def window(last: int) -> np.ndarray:
            steps = [base + max(0, last - k) for k in range(F - 1, -1, -1)]
            return np.stack([np.stack([mms[c.name][j] for j in steps]) for c in self.contract.cameras])

        rewards = np.zeros(N, dtype=np.float32)
        rewards[:n_eff] = self.rewards[s + t:s + t + n_eff]
        ret = sum(float(rewards[k]) * gamma ** k for k in range(n_eff))
        sample = ReplaySample(
            frames=torch.from_numpy(window(t)),
            next_frames=torch.from_numpy(window(nxt)),
            action_bins=torch.from_numpy(self.contract.actions_to_bins(self.actions[s + t])),
            actions=torch.from_numpy(self.actions[s + t].copy()),
            rewards=torch.from_numpy(rewards),
            reward_mask=torch.arange(N) < n_eff,
            n_step_return=torch.tensor(ret, dtype=torch.float32),
            discount_to_next=torch.tensor(0.0 if hit_terminal else gamma ** n_eff, dtype=torch.float32),
            n_eff=torch.tensor(n_eff, dtype=torch.int64),
            mc_return=torch.tensor(float(self.mc_returns[s + t]), dtype=torch.float32),
            instruction_index=torch.tensor(int(self.ep_instruction[e]), dtype=torch.int64),
            terminal=torch.tensor(hit_terminal),
            step_index=torch.tensor(s + t, dtype=torch.int64),
            episode_index=torch.tensor(e, dtype=torch.int64),
        )
        if self.state is not None:  # normalised here, independently of get_batch's precomputed table
            def state_window(last: int) -> np.ndarray:
                rows = [self.state[s + max(0, last - k)] for k in range(F - 1, -1, -1)]
                return self.contract.normalize_state(np.stack(rows))

            sample["state"] = torch.from_numpy(state_window(t))
            sample["next_state"] = torch.from_numpy(state_window(nxt))
        return sample

    # -- pickling (DataLoader workers reopen their own memory maps) ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_frames"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
