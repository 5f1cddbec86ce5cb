"""Interoperability with other libraries' checkpoint formats (Hugging Face transformers)."""

from . import writer
from .hf import DEFAULT_MAX_SHARD_BYTES, EXPORT_FORMATS, export_hf, load_hf

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "EXPORT_FORMATS", "export_hf", "load_hf", "writer"]
