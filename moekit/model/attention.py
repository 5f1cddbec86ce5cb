"""Causal self-attention: grouped-query attention with the options real checkpoints use, and latent attention.

`Attention` is the Llama-style block (`q_proj`, `k_proj`, `v_proj`, `o_proj`, grouped-query key/value heads) with
each family's extras as `ModelConfig` fields: biases (`qkv_bias`, `o_proj_bias`), query/key RMSNorms per head or
over the whole projection (`qk_norm`), clamped projections (`clip_qkv`), partial or interleaved RoPE, a sliding
window per layer, and GPT-OSS's attention sinks (one learned logit per head that joins every softmax and takes
probability mass without adding a value). `LatentAttention` is DeepSeek-V2/V3's multi-head latent attention
(`ModelConfig.mla`). Both take the rotary tables of the whole model and a KV cache entry, and return the output
and the new cache entry; weight names are transformers'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .rope import apply_rope, mla_softmax_scale

Cache = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), normalised in float32 and cast back (as HF Llama/Mixtral do)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _causal_mask(queries: int, keys: int, window: int | None, device: torch.device,
                 always: bool = False) -> Tensor | None:
    """[queries, keys] True where a query may attend: keys up to its position and, with a window, less than
    `window` positions back. Unless `always`, None when no window and one query or no cache (SDPA's own causal
    flag, or nothing, covers those)."""
    if not always and window is None and (queries == 1 or queries == keys):
        return None
    offset = keys - queries
    q_pos = torch.arange(offset, keys, device=device).unsqueeze(1)
    k_pos = torch.arange(keys, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    return allowed


def attend(q: Tensor, k: Tensor, v: Tensor, window: int | None = None, sinks: Tensor | None = None,
           scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + causal/window mask [+ sink logits]) v, for q [B, h, T, D], k [B, h, S, D] and
    v [B, h, S, Dv].

    Without sinks this is one `scaled_dot_product_attention` call; with them the scores get one more column per
    head (the sink's logit) that is dropped after the softmax.
    """
    queries, keys = q.shape[2], k.shape[2]
    if sinks is None:
        mask = _causal_mask(queries, keys, window, q.device)
        causal = mask is None and queries == keys and queries > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    mask = _causal_mask(queries, keys, window, q.device, always=True)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, queries, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


class Attention(nn.Module):
    """Causal multi-head (grouped-query) attention of layer `index`."""

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.config = config
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, \
            config.attention_head_dim
        hidden, q_width, kv_width = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_width, hidden, bias=config.o_proj_bias)
        self.q_norm = self.k_norm = None
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        elif config.qk_norm == "projection":
            self.q_norm = RMSNorm(q_width, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_width, config.rms_norm_eps)
        self.sinks = nn.Parameter(torch.zeros(self.heads)) if config.attention_sinks else None
        self.window = config.layer_window(index)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: Cache | None = None) -> tuple[Tensor, Cache]:
        config = self.config
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if config.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, self.heads, self.head_dim)
        k = k.view(batch, seq, self.kv_heads, self.head_dim)
        if config.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if config.clip_qkv is not None:
            limit = config.clip_qkv
            q, k, v = q.clamp(-limit, limit), k.clamp(-limit, limit), v.clamp(-limit, limit)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, T, D)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin, config.rope_interleave), apply_rope(k, cos, sin, config.rope_interleave)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = attend(q, k, v, self.window, self.sinks)
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        return self.o_proj(out), present


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) as transformers' `DeepseekV3Attention` computes it.

    q = q_proj(x), or q_b_proj(norm(q_a_proj(x))) with a query rank; [kv latent, k_rot] = kv_a_proj_with_mqa(x);
    [k_nope, v] per head = kv_b_proj(norm(kv latent)); k_rot (one vector, RoPE'd) is shared by all heads. The KV
    cache holds the normalised latent and the rotated key: [B, 1, S, kv_lora_rank] and [B, 1, S, qk_rope_head_dim].
    """

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        mla = config.mla
        assert mla is not None
        self.config, self.mla = config, mla
        self.heads = config.num_attention_heads
        hidden, bias = config.hidden_size, config.qkv_bias
        q_width = self.heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, mla.latent_norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, mla.latent_norm_eps)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, self.heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * mla.v_head_dim, hidden, bias=config.o_proj_bias)
        self.scale = mla_softmax_scale(mla.qk_head_dim, config.rope_scaling, config.max_position_embeddings)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: Cache | None = None) -> tuple[Tensor, Cache]:
        mla, config = self.mla, self.config
        batch, seq, _ = x.shape
        q = self.q_proj(x) if mla.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, seq, self.heads, mla.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [B, 1, T, rank]
        k_rot = k_rot.unsqueeze(1)  # [B, 1, T, rope]
        cos, sin = rope
        q_rot, k_rot = apply_rope(q_rot, cos, sin, config.rope_interleave), apply_rope(k_rot, cos, sin,
                                                                                        config.rope_interleave)
        if past is not None:
            latent, k_rot = torch.cat([past[0], latent], dim=2), torch.cat([past[1], k_rot], dim=2)
        present = (latent, k_rot)
        keys = latent.shape[2]
        kv = self.kv_b_proj(latent.squeeze(1)).view(batch, keys, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        out = attend(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * mla.v_head_dim)
        return self.o_proj(out), present


def build_attention(config: ModelConfig, index: int) -> nn.Module:
    """The attention block of layer `index`: latent attention when `config.mla` is set, else `Attention`."""
    return LatentAttention(config, index) if config.mla is not None else Attention(config, index)
