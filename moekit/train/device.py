"""Where a run trains: the device `train.device` names, and the autocast dtype `train.dtype` asks for there."""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device: "auto" is CUDA when one is visible, else the CPU; "cuda" needs one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is visible; use --set train.device=cpu")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device runs it fast (CUDA with bf16 support); None = plain fp32."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPUs without bf16 matrix units run bf16 slower than fp32
