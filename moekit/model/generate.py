"""KV-cache decoding with temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import is_finite_number
from .transformer import MoETransformer


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise `ValueError` naming the argument when a sampling setting is not a usable value."""
    if not is_finite_number(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature={temperature!r} is not allowed: a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"generate: top_k={top_k!r} is not allowed: None (no limit) or an integer >= 1")
    if top_p is not None and (not is_finite_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p={top_p!r} is not allowed: None (no limit) or a number in (0, 1]")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token id for each row of `logits` [B, V]; temperature 0 is greedy.

    Raises `ValueError` for a temperature that is not finite and >= 0, a `top_k` below 1 or a `top_p` outside
    (0, 1].
    """
    check_sampling(temperature, top_k, top_p)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MoETransformer, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | None = None) -> Tensor:
    """Extend `input_ids` [B, T] by up to `max_new_tokens`, reusing the KV cache at every step.

    `temperature` is a finite number >= 0 (0 = greedy), `top_k` None or an integer >= 1, `top_p` None or a number in
    (0, 1], `max_new_tokens` an integer >= 0, `seed` and `eos_token_id` None or an integer; anything else raises
    `ValueError` naming the argument, before the model runs.
    """
    check_sampling(temperature, top_k, top_p)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} is not allowed: an integer >= 0")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"generate: seed={seed!r} is not allowed: None or an integer in [-2**63, 2**64)")
    if eos_token_id is not None and not _is_int(eos_token_id):
        raise ValueError(f"generate: eos_token_id={eos_token_id!r} is not allowed: None or an integer token id")
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] >= limit:
        input_ids = input_ids[:, -(limit - 1):]  # keep the most recent context that fits
    # prefill: only the last position is sampled; generation needs no balancing terms or router statistics
    out = model(input_ids, use_cache=True, logits_to_keep=1, router_stats=False)
    tokens = input_ids
    for step in range(max_new_tokens):
        if tokens.shape[1] >= limit:
            break
        next_id = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_id.unsqueeze(-1)], dim=1)
        if eos_token_id is not None and bool((next_id == eos_token_id).all()):
            break
        if step + 1 < max_new_tokens and tokens.shape[1] < limit:  # the last token needs no forward of its own
            out = model(next_id.unsqueeze(-1), past_key_values=out.past_key_values, use_cache=True,
                        router_stats=False)
    return tokens
