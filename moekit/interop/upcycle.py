"""Sparse upcycling (Komatsuzaki et al., 2022): an MoE checkpoint whose experts are copies of one dense model's FFN.

`upcycle(model, out, num_experts=8, top_k=2)` keeps the dense model's embeddings, attention, norms and head, and
replaces each FFN by `num_experts` copies of it behind a freshly initialised router; the result is written by the
same streaming, atomic writer as `moekit.interop.merge` in any of its layouts (mixtral, qwen2_moe, qwen3_moe,
deepseek_v3 as `Glm4MoeForCausalLM`).

What is initialised how, and when the MoE computes exactly the dense model's function at initialisation:

- **Experts** are copies, so with top-k weights that sum to 1 (every layout here renormalises them:
  `norm_topk_prob=True`, `routed_scaling_factor=1`) the routed output is ``sum_i w_i FFN(x) = FFN(x)`` whatever
  the router does. The upcycled model computes the dense model's logits (up to float rounding).
- **Router** rows are drawn from a normal distribution with the base config's `initializer_range` (0.02 if
  unset), seeded by `seed`.
- **Fine-grained experts** (`fine_grained=M`, DeepSeekMoE-style): each copy's FFN is cut along its intermediate
  dimension into M segments of width I/M, giving ``num_experts * M`` experts of width I/M with ``top_k * M``
  active, so a token uses as many expert parameters as with `top_k` coarse experts. A segment computes only part
  of the FFN, so equality needs every segment to be chosen equally often and weighted so the parts add up. moekit
  does it as a "virtual group" initialisation: the M segments of one copy share one router row, so they tie and
  are chosen together (the top ``top_k * M`` scores are exactly the segments of the `top_k` best copies), each
  gets weight ``p_c / M`` where ``p_c`` is the renormalised weight of its copy, and the segments' `down_proj` are
  multiplied by M. Then the output is ``sum_c p_c sum_m segment_m(x) = FFN(x)``. The tie is a property of the
  initial weights only: training changes the rows independently and the segments specialise.
- **Shared experts** (`shared_experts=N`): shared expert n holds segment ``n mod M`` of the dense FFN (width I/M,
  the routed experts' width; with M = 1 each is a full copy). For each segment m held by ``s_m`` shared experts,
  its ``s_m`` shared copies and the routed experts share its output equally: each shared copy's `down_proj` is
  scaled by ``1 / (s_m + 1)`` and the routed segment's by ``M / (s_m + 1)``; a segment no shared expert holds
  stays with the routed experts (scale M). The sum is again exactly the dense FFN. Qwen2-MoE multiplies its
  shared expert by ``sigmoid(shared_expert_gate(x))``: the gate is written as zero (1/2 for every token) and the
  shared `down_proj` doubled. Mixtral and Qwen3-MoE have no shared experts (refused).
- **Noise** (`noise=sigma`): Gaussian noise of standard deviation ``sigma * std(W)`` (relative to each weight
  matrix, seeded) is added to every routed expert's weights, so copies differ from the start. Equality with the
  dense model then no longer holds; shared experts get no noise.

Equality is tested on tiny models in float32 for every layout (`tests/test_upcycle.py`) and, as equal greedy
generations, on SmolLM2-135M (slow test).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .dense_source import check_tensors, open_dense, required_tensors
from .dtypes import resolve_dtype
from .merge import (
    DEFAULT_MERGE_SHARD_BYTES,
    FFNPart,
    MergePlan,
    MoEBuild,
    _entries,
    _plan,
    check_max_shard_bytes,
    choose_architecture,
    fitting_build,
    write_build,
)
from .writer import check_destination

__all__ = ["upcycle"]


def _int_at_least(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"upcycle: {name}={value!r} must be an integer >= {minimum}")
    return value


def upcycle(model: str | os.PathLike[str], out: str | os.PathLike[str], num_experts: int = 8, top_k: int = 2, *,
            fine_grained: int = 1, shared_experts: int = 0, noise: float = 0.0, architecture: str | None = None,
            dtype: str | torch.dtype | None = None, seed: int = 0, overwrite: bool = False, dry_run: bool = False,
            max_shard_bytes: int = DEFAULT_MERGE_SHARD_BYTES, progress: bool = True) -> MergePlan:
    """Turn a dense model into an MoE whose experts are copies of its FFN (see the module docstring).

    Args:
        model: a dense Llama/Mistral/Qwen2/Qwen3 model directory (safetensors) or ``.gguf`` file.
        out: the folder to create; it must not exist or be empty unless `overwrite`.
        num_experts: copies of the FFN (before fine-graining).
        top_k: copies each token uses (before fine-graining).
        fine_grained: M; split each copy into M experts of width intermediate_size / M, with top_k * M active.
        shared_experts: N shared experts of the routed experts' width (not in mixtral or qwen3_moe).
        noise: relative standard deviation of noise added to the routed experts (0 keeps exact copies).
        architecture: mixtral, qwen2_moe, qwen3_moe or deepseek_v3; None picks as `merge` does for a model
            without prompts (mixtral, or deepseek_v3 with shared experts; qwen3_moe, or deepseek_v3 with shared
            experts, for Qwen3), except that Qwen2 models always become qwen2_moe.
        dtype: dtype of the written weights (default: the model's).
        seed: seed of the router rows and the noise.
        overwrite: replace a non-empty `out` that moekit wrote (see `moekit.interop.outputs`); `out` may never
            be, contain or lie inside `model`.
        dry_run: check everything and return the plan without writing.
        max_shard_bytes: largest safetensors file.
        progress: show a progress bar.

    Returns:
        The `MergePlan`, with `out` set unless `dry_run`.

    Raises:
        ValueError: an unsupported model, a bad argument (named), an intermediate size that M does not divide, a
            layout that cannot hold the model, or an `out` that overlaps `model`.
        FileExistsError: `out` exists and is not empty, and `overwrite` is False; or it is a folder moekit did not
            write, or a training run.
        StorageError: the disk filled up or the destination is read-only (one line; nothing is left behind).
    """
    num_experts = _int_at_least("num_experts", num_experts)
    top_k = _int_at_least("top_k", top_k)
    fine_grained = _int_at_least("fine_grained", fine_grained)
    shared_experts = _int_at_least("shared_experts", shared_experts, minimum=0)
    seed = _int_at_least("seed", seed, minimum=0)
    check_max_shard_bytes(max_shard_bytes)
    if top_k > num_experts:
        raise ValueError(f"upcycle: top_k={top_k} is more than num_experts={num_experts}; lower top_k or add experts")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"upcycle: noise={noise!r} must be a number >= 0")
    if architecture is not None:
        from .merge_config import ARCHITECTURE_ALIASES

        if str(architecture).lower() not in ARCHITECTURE_ALIASES:
            raise ValueError(f"upcycle: architecture={architecture!r} is not known; use one of mixtral, qwen2_moe, "
                             "qwen3_moe, deepseek_v3")
        architecture = ARCHITECTURE_ALIASES[str(architecture).lower()]
    check_destination(Path(out).expanduser().absolute(), overwrite, "upcycle", [model])  # before any work
    source = open_dense(model)
    source.cache_size = 4  # one layer's gate/up/down are read once for all copies
    check_tensors(source, required_tensors(source, mlp=True, rest=True))
    dense_width = source.intermediate_size
    if dense_width % fine_grained:
        raise ValueError(f"upcycle: fine_grained={fine_grained} does not divide the intermediate size {dense_width} "
                         f"of {source.path}; choose a divisor")
    if architecture is None and source.family == "qwen2":
        architecture = "qwen2_moe"  # Qwen's own MoE; its gated shared expert is written to be always on
    default = choose_architecture(source.family, shared_experts, False, architecture)
    width = dense_width // fine_grained
    holders = [sum(1 for n in range(shared_experts) if n % fine_grained == m) for m in range(fine_grained)]
    routed = [
        FFNPart(source, units=slice(m * width, (m + 1) * width), down_scale=fine_grained / (holders[m] + 1),
                noise=float(noise), relative_noise=True, seed=seed * 1000 + copy * fine_grained + m)
        for copy in range(num_experts) for m in range(fine_grained)
    ]
    shared = [
        FFNPart(source, units=slice((n % fine_grained) * width, (n % fine_grained + 1) * width),
                down_scale=1.0 / (holders[n % fine_grained] + 1))
        for n in range(shared_experts)
    ]
    out_dtype = resolve_dtype(dtype, source.weight_dtype, "upcycle")
    build, layout_note = fitting_build(
        default, architecture is not None,
        lambda arch: MoEBuild(architecture=arch, base=source, experts=routed, shared=shared,
                              experts_per_token=top_k * fine_grained, dtype=out_dtype))
    plan = _plan(build, _entries(build), max_shard_bytes, "random (upcycled copies)")
    if layout_note:
        plan.notes.append(layout_note)
    if fine_grained > 1:
        plan.notes.append(f"fine-grained: {num_experts} copies x {fine_grained} segments = {len(routed)} experts, "
                          f"{top_k * fine_grained} per token; each copy's segments share one router row at init")
    if dry_run:
        return plan
    std = float(source.config.get("initializer_range") or 0.02)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(source.num_layers, num_experts, source.hidden_size, generator=generator) * std
    build.router = rows.repeat_interleave(fine_grained, dim=1)  # [L, E * M, H]: a copy's segments tie
    plan.out = write_build(build, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
                           caller="upcycle", inputs=[model])
    return plan
