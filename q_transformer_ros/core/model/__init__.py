"""The Q-Transformer network: config, building blocks and the bare nn.Module."""

from .config import ModelConfig
from .network import QTransformerNet

__all__ = ["ModelConfig", "QTransformerNet"]
