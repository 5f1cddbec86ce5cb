"""Rotary position embeddings: the plain one and the scaled variants transformers defines (linear, Llama 3, YaRN).

`rope_frequencies` gives the inverse frequencies of the rotated dimensions and the factor that multiplies cos and
sin (YaRN's attention factor; 1 otherwise); `rope_tables` turns them into cos/sin tables for some positions;
`apply_rope` rotates the first `rotary_dim` dimensions of each head and passes the rest through (partial rotary,
GLM-4.5), in the half-rotation convention (`rotate_half`) or, with `interleave`, DeepSeek's pairs
(x0, x1), (x2, x3)... The formulas are the published ones:

- linear (position interpolation): every frequency divided by `factor`;
- llama3: wavelengths longer than ``original / low_freq_factor`` divided by `factor`, shorter than
  ``original / high_freq_factor`` kept, and a smooth blend between;
- yarn (Peng et al. 2023): per dimension, a ramp between interpolated (``/ factor``) and extrapolated frequencies
  over the dimensions whose rotation counts at the original length lie between `beta_slow` and `beta_fast`; cos and
  sin are scaled by ``0.1 * ln(factor) + 1`` (or ``mscale`` / ``mscale_all_dim`` ratios, or `attention_factor`).
  Multi-head latent attention also multiplies its softmax scale by ``mscale(factor, mscale_all_dim) ** 2``.

`tests/test_rope.py` checks each against transformers' `ROPE_INIT_FUNCTIONS`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction: ``0.1 * mscale * ln(factor) + 1`` for factor > 1, else 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_factor(scaling: dict[str, Any], max_position_embeddings: int) -> float:
    factor = scaling.get("factor")  # without one, YaRN stretches the pretraining length to max_position_embeddings
    if factor is not None:
        return float(factor)
    return max_position_embeddings / scaling["original_max_position_embeddings"]


def rope_frequencies(rotary_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                     max_position_embeddings: int | None = None,
                     device: torch.device | None = None) -> tuple[Tensor, float]:
    """(inverse frequencies [rotary_dim / 2] in float32, factor on cos and sin) for one RoPE setting.

    `scaling` is a `ModelConfig.rope_scaling` mapping (checked by the config) or None for plain RoPE;
    `max_position_embeddings` is needed only by YaRN without a `factor`.
    """
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        factor, original = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    if rope_type == "yarn":
        factor = _yarn_factor(scaling, max_position_embeddings or 0)
        attention = scaling.get("attention_factor")
        if attention is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all \
                else _mscale(factor)
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
        original = float(scaling["original_max_position_embeddings"])

        def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
            return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dimension(fast), dimension(slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = ((torch.arange(rotary_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolated = 1 - ramp  # share of the unscaled frequency
        return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated, float(attention)
    raise ValueError(f"rope_type={rope_type!r} is not supported")  # pragma: no cover - refused by the config


def mla_softmax_scale(qk_head_dim: int, scaling: dict[str, Any] | None,
                      max_position_embeddings: int | None = None) -> float:
    """Multi-head latent attention's softmax scale: ``qk_head_dim ** -0.5``, times ``mscale ** 2`` under YaRN with
    `mscale_all_dim` (DeepSeek-V3 scales the whole score, not only the rotated dimensions)."""
    scale = qk_head_dim ** -0.5
    if scaling is not None and scaling.get("mscale_all_dim"):
        factor = _yarn_factor(scaling, max_position_embeddings or 0) if scaling["rope_type"] == "yarn" \
            else float(scaling["factor"])
        scale *= _mscale(factor, float(scaling["mscale_all_dim"])) ** 2
    return scale


def rope_tables(positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [T, rotary_dim] (the frequencies repeated for the two halves), times `attention_factor`."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # [T, rotary_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = False) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dimensions of x [..., T, D]; the others pass through unchanged.

    With `interleave`, the rotated dimensions are pairs (0, 1), (2, 3)...: they are first reordered to
    (0, 2, 4, ..., 1, 3, 5, ...), which turns the pair rotation into the half rotation (the output keeps that
    order, as transformers' does; queries and keys are reordered alike, so their products are unchanged).
    """
    rotary = cos.shape[-1]
    rot, rest = (x, None) if rotary == x.shape[-1] else (x[..., :rotary], x[..., rotary:])
    if interleave:
        rot = torch.cat([rot[..., 0::2], rot[..., 1::2]], dim=-1)
    half = rotary // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return out if rest is None else torch.cat([out, rest], dim=-1)
