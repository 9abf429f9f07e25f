"""Replay dataset format, writer and returns: numpy only (docs/dataset_format.md).

A dataset is a folder of memory-mapped .npy chunks plus a JSON manifest. This package is the layer
both sides import downward: ``data/`` (converters) writes with it without importing torch, and
``core/`` reads it (``core.replay_dataset`` wraps it as a torch ``Dataset``). It imports nothing from
either.
"""

from q_transformer_ros.replay.format import FORMAT_VERSION, NO_INSTRUCTION, DatasetError
from q_transformer_ros.replay.returns import discounted_returns, n_step_layout
from q_transformer_ros.replay.writer import EpisodeData, ReplayWriter, Transaction

__all__ = [
    "FORMAT_VERSION", "NO_INSTRUCTION", "DatasetError", "discounted_returns", "n_step_layout",
    "EpisodeData", "ReplayWriter", "Transaction",
]
