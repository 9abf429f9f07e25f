"""Replay dataset: a folder of memory-mapped .npy chunks + a JSON manifest (docs/dataset_format.md).

The writer side (format, writer, returns) needs only numpy, so converters can write datasets without
importing torch; the torch reader is imported lazily on first use of ``ReplayDataset``.
"""

from typing import Any

from q_transformer_ros.core.dataset.format import FORMAT_VERSION, NO_INSTRUCTION, DatasetError
from q_transformer_ros.core.dataset.returns import discounted_returns, n_step_layout
from q_transformer_ros.core.dataset.writer import EpisodeData, ReplayWriter, Transaction

__all__ = [
    "FORMAT_VERSION", "NO_INSTRUCTION", "DatasetError", "ReplayDataset", "ReplaySample", "StoredEpisode",
    "discounted_returns", "n_step_layout", "EpisodeData", "ReplayWriter", "Transaction",
]


def __getattr__(name: str) -> Any:
    if name in ("ReplayDataset", "ReplaySample", "StoredEpisode"):
        from q_transformer_ros.core.dataset import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
