"""torch.distributed helpers and the resumable, sharded batch sampler.

Why a batch sampler of our own: the dataset assembles a whole batch in one vectorised ``get_batch``
call (no per-sample Python loop over frames), so the DataLoader is fed lists of indices; and a killed
run must resume with the same data order, which is easiest when batch g (counted from the start of
training) is a pure function of (seed, g, rank, world size). The only data-order state is then the
number of batches consumed, saved in every checkpoint.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) :func:`init_distributed`
joins the process group (NCCL on CUDA, gloo on CPU) and each rank reads a disjoint shard of every
epoch's permutation, like ``DistributedSampler``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class ShardedBatchSampler:
    """Infinite, deterministic batches of dataset indices for one rank.

    Epoch e uses ``torch.randperm(num_samples)`` seeded by (seed, e), tiled when the dataset is smaller
    than one global batch, and padded by wrapping so every rank gets the same number of batches
    (``batches_per_epoch``); rank r takes every world_size-th index starting at r, then consecutive
    ``batch_size`` slices. Iteration starts at ``start_batch`` (batches already consumed)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start_batch: int = 0):
        if num_samples < 1:
            raise ValueError(f"ShardedBatchSampler: num_samples = {num_samples}: the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"ShardedBatchSampler: batch_size = {batch_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatchSampler: rank {rank} not in [0, {world_size})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start_batch = start_batch
        per_rank = -(-max(num_samples, batch_size * world_size) // world_size)  # ceil
        self.batches_per_epoch = per_rank // batch_size
        self._epoch_len = per_rank * world_size

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices of one epoch, (batches_per_epoch * batch_size,)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        reps = -(-self._epoch_len // self.num_samples)
        perm = perm.repeat(reps)[: self._epoch_len]
        mine = perm[self.rank :: self.world_size]
        return mine[: self.batches_per_epoch * self.batch_size]

    def batch(self, g: int) -> list[int]:
        """Global batch number g (0-based, counted over epochs) for this rank."""
        epoch, pos = divmod(g, self.batches_per_epoch)
        idx = self.epoch_indices(epoch)
        return idx[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()

    def position(self, consumed_batches: int) -> dict[str, int]:
        """Data-order state after ``consumed_batches`` batches (what checkpoints store)."""
        epoch, pos = divmod(consumed_batches, self.batches_per_epoch)
        return {"consumed_batches": consumed_batches, "epoch": epoch, "position": pos,
                "batches_per_epoch": self.batches_per_epoch, "seed": self.seed, "world_size": self.world_size}

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start_batch
        epoch, pos = divmod(g, self.batches_per_epoch)
        while True:
            idx = self.epoch_indices(epoch)
            for p in range(pos, self.batches_per_epoch):
                yield idx[p * self.batch_size : (p + 1) * self.batch_size].tolist()
            epoch, pos = epoch + 1, 0


def parameter_checksum(model: nn.Module) -> torch.Tensor:
    """A float64 checksum of all parameters (sum of values weighted by position), for sync checks."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        flat = p.detach().double().flatten().cpu()
        w = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
        total += (flat * w).sum() * (1.0 + 1e-3 * i)
    return total


def check_in_sync(model: nn.Module, info: DistInfo, device: torch.device) -> float:
    """Raise if the ranks' parameters differ (DDP keeps them equal); returns this rank's checksum."""
    local = parameter_checksum(model)
    if not info.enabled:
        return float(local)
    t = local.to(device)
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if float(hi - lo) > 1e-6 * max(1.0, abs(float(local))):
        raise RuntimeError(f"rank {info.rank}: parameters out of sync across ranks (checksum min {float(lo)}, max {float(hi)})")
    return float(local)


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
