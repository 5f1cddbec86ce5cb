"""Dtype names in one place: the dtypes moekit writes weights in, and the safetensors codes it reads and writes."""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_DTYPES", "WEIGHT_DTYPES", "dtype_name", "resolve_dtype", "safetensors_dtype"]

WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The dtypes `export_hf`, `load_hf`, `merge` and `upcycle` accept for weights, by the name config.json uses."""

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
"""The safetensors header's dtype codes that moekit reads and writes."""

_SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The name config.json gives `dtype` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    if dtype not in _SAFETENSORS_CODES:
        raise ValueError(f"dtype {dtype} has no safetensors code")
    return _SAFETENSORS_CODES[dtype]


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype, caller: str) -> torch.dtype:
    """`dtype` as one of :data:`WEIGHT_DTYPES` (a name such as "bfloat16" or "torch.float32", a torch dtype, or
    None for `default`); anything else is a ValueError that names `caller`."""
    if dtype is None:
        return default
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in WEIGHT_DTYPES:
            raise ValueError(f"{caller}: dtype={dtype!r} is not allowed: one of {', '.join(WEIGHT_DTYPES)} or None")
        return WEIGHT_DTYPES[name]
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"{caller}: dtype={dtype!r} is not allowed: torch.float32, torch.float16, torch.bfloat16")
    return dtype
