"""The decoder-only MoE language model."""

from .transformer import LMOutput, MoETransformer

__all__ = ["LMOutput", "MoETransformer"]
