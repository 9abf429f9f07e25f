"""The training batch as one typed value: what the replay dataset serves and the learner reads.

Why a type and not a ``dict[str, Tensor]``: the batch used to be threaded by string keys through the
dataset, the trainer's data loader and the learner, with a hand-kept tuple of the keys worth moving to
the GPU. The issue asks for one typed Observation (:mod:`q_transformer_ros.observation`) and a Batch, so
that the next input (depth, force) is a change in one place; lerobot's ``input_features`` is the
pattern. A field declared here is carried by :meth:`~TrainingBatch.to`, ``pin_memory``, ``index`` and
``concat`` with no further edit, and whether it reaches the GPU is decided by the class it is declared
in, not by a list of names:

* :class:`TrainingBatch`: what :func:`~q_transformer_ros.core.learner.learning_step` reads (the only
  tensors the trainer moves to the device);
* :class:`Batch` (a TrainingBatch): adds the bookkeeping the dataset computes anyway (stored actions,
  n-step return, n_eff, terminal, step and episode indices) for tests, tools and diagnostics;
  :meth:`Batch.training_view` drops it.

The per-sample reference path (``ReplayDataset.__getitem__``) stays a ``ReplaySample`` dict with the
same field names and no ``b`` axis; the dataset tests compare the two field by field.

Torch only (no numpy, no ROS). einops legend: ``b`` batch, ``c`` cameras, ``f`` frame history,
``h w`` image size, ``n`` action dims, ``s`` n-step reward steps, ``p`` state inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

B = TypeVar("B", bound="TrainingBatch")


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class TrainingBatch:
    """The tensors one loss evaluation needs, each with a leading ``b`` axis (on one device)."""

    frames: Tensor
    """uint8 (b, c, f, 3, h, w): history window ending at step t (first frame repeated at episode start)."""
    next_frames: Tensor
    """uint8 (b, c, f, 3, h, w): window ending at step t + n_eff (the bootstrap state)."""
    action_bins: Tensor
    """int64 (b, n): bins of the action at t under the reader's contract."""
    rewards: Tensor
    """float32 (b, s): r_t .. r_{t+n_eff-1}, zero-padded to n_step."""
    reward_mask: Tensor
    """bool (b, s): which entries of ``rewards`` are real."""
    discount_to_next: Tensor
    """float32 (b,): gamma^n_eff, or 0 when the episode's terminal transition is inside the window."""
    mc_return: Tensor
    """float32 (b,): discounted return-to-go from t to the episode end (the MC lower bound)."""
    instruction_index: Tensor
    """int64 (b,): row of the instruction table / text embeddings, -1 = no instruction."""
    state: Tensor | None = None
    """float32 (b, f, p): the robot's state inputs over the frame window, normalised by the reader's
    contract; None when the contract declares no state inputs."""
    next_state: Tensor | None = None
    """float32 (b, f, p): the same over the bootstrap window (None exactly when ``state`` is)."""

    def __post_init__(self) -> None:
        if (self.state is None) != (self.next_state is None):
            raise ValueError(f"{type(self).__name__}: state and next_state must both be given or both be None")
        size = self.frames.shape[0]
        for name, value in self._tensors().items():
            if value is not None and (value.ndim == 0 or value.shape[0] != size):
                raise ValueError(f"{type(self).__name__}.{name} has shape {tuple(value.shape)}; every field needs "
                                 f"the batch size {size} (of frames) as its first axis")

    def _tensors(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self: B, fn: Callable[[Tensor], Tensor]) -> B:
        return type(self)(**{k: None if v is None else fn(v) for k, v in self._tensors().items()})

    @property
    def batch_size(self) -> int:
        return int(self.frames.shape[0])

    def to(self: B, device: torch.device | str, non_blocking: bool = False) -> B:
        """Every tensor moved to ``device`` (None fields stay None). On a :class:`Batch`, call
        :meth:`Batch.training_view` first to move only what the loss reads."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: B) -> B:
        """Every tensor in page-locked memory; the DataLoader (``pin_memory=True``) calls this on
        objects that have it, so a batch arrives pinned and ``to(..., non_blocking=True)`` overlaps."""
        return self._map(lambda t: t.pin_memory())

    def index(self: B, rows: Tensor) -> B:
        """Rows ``rows`` (int64 indices or a bool mask over ``b``) of every field, in that order."""
        return self._map(lambda t: t[rows])

    @classmethod
    def concat(cls: type[B], batches: Sequence[B]) -> B:
        """The batches one after the other along ``b`` (``torch.cat`` per field). An optional field
        must be None in all of them or in none (a ValueError names it otherwise)."""
        if not batches:
            raise ValueError(f"{cls.__name__}.concat: no batches given")
        out: dict[str, Tensor | None] = {}
        for f in fields(cls):
            values = [getattr(b, f.name) for b in batches]
            missing = sum(v is None for v in values)
            if missing == len(values):
                out[f.name] = None
            elif missing:
                raise ValueError(f"{cls.__name__}.concat: field '{f.name}' is None in {missing} of {len(values)} "
                                 f"batches (it must be present in all or in none)")
            else:
                out[f.name] = torch.cat(values, dim=0)
        return cls(**out)

    def __repr__(self) -> str:
        parts = [f"{k}=None" if v is None else f"{k}={str(v.dtype).removeprefix('torch.')}{tuple(v.shape)}"
                 for k, v in self._tensors().items()]
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Batch(TrainingBatch):
    """A batch of n-step samples as ``ReplayDataset.get_batch`` serves it: the training fields plus the
    dataset's bookkeeping."""

    actions: Tensor
    """float32 (b, n): the stored continuous action at t."""
    n_step_return: Tensor
    """float32 (b,): sum_k gamma^k r_{t+k} over the n_eff rewards."""
    n_eff: Tensor
    """int64 (b,): number of real rewards (1..n_step)."""
    terminal: Tensor
    """bool (b,): the window reaches a terminal transition (same as discount_to_next == 0)."""
    step_index: Tensor
    """int64 (b,): global step index of t (chunks concatenated in manifest order)."""
    episode_index: Tensor
    """int64 (b,): index of the episode in the manifest."""

    def training_view(self) -> TrainingBatch:
        """Only the fields the learner reads (same tensors, no copy): what the trainer moves to the
        device, so the bookkeeping never crosses to the GPU."""
        return TrainingBatch(**{f.name: getattr(self, f.name) for f in fields(TrainingBatch)})
