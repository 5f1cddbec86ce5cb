"""Decoder-only transformer LM: pre-norm RMSNorm, RoPE, causal SDPA attention, SwiGLU or MoE FFN.

Weight names follow HF Llama/Mixtral (`embed_tokens`, `layers.N.self_attn.q_proj`, `input_layernorm`,
`post_attention_layernorm`, `norm`, `lm_head`) so export is a renaming, not a reshaping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..layer import MoELayer

KVCache = list[tuple[Tensor, Tensor]]


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


def rope_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [T, head_dim] for the half-rotation convention (HF `rotate_half`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, D] by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head (grouped-query) attention through `scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, D)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if past is None or seq == 1:
            # no cache: plain causal; one new token attends to everything cached
            out = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and seq > 1)
        else:  # several new tokens after a cache: causal within the new block
            total = k.shape[2]
            mask = torch.ones(seq, total, dtype=torch.bool, device=x.device).tril(diagonal=total - seq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        return self.o_proj(out), present


class DenseMLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or `MoELayer`."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(index)
        self.mlp: nn.Module = MoELayer(config.moe) if self.is_moe else DenseMLP(config.hidden_size,
                                                                                 config.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None = None,
                router_stats: bool = True):
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + attn
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out = self.mlp(h, compute_stats=router_stats)
            return x + out.hidden_states, present, out
        return x + self.mlp(h), present, None


@dataclass
class LMOutput:
    """`logits` [B, T, V]; `loss` (cross-entropy, when targets are given) excludes `aux_loss`;
    `moe_stats` holds each MoE layer's stats by layer index; `past_key_values` when caching."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    moe_stats: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    past_key_values: KVCache | None = None


class MoETransformer(nn.Module):
    """Decoder-only LM built from a `ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for router biases."""
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.fill_(1.0)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, router_stats: bool = True) -> LMOutput:
        """input_ids [B, T] -> logits; with `targets` [B, T] the mean next-token cross-entropy.

        `logits_to_keep` > 0 computes logits for the last that many positions only (as transformers'
        argument of that name): a prefill before decoding needs just the last one. `router_stats=False`
        skips the MoE layers' balancing terms and statistics in eval mode (generation needs neither).
        """
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep needs every position's logits for the loss: pass 0 with targets")
        seq = input_ids.shape[1]
        offset = past_key_values[0][0].shape[2] if past_key_values else 0
        if offset + seq > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {offset + seq} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}; shorten the input or raise the limit")
        positions = torch.arange(offset, offset + seq, device=input_ids.device)
        cos, sin = rope_tables(self.config.head_dim, positions, self.config.rope_theta)
        x = self.embed_tokens(input_ids)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats: dict[int, dict[str, Tensor]] = {}
        presents: KVCache = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            x, present, moe_out = layer(x, cos, sin, past, router_stats)
            presents.append(present)
            if moe_out is not None:
                aux_loss = aux_loss + moe_out.aux_loss
                if moe_out.stats:
                    stats[i] = moe_out.stats
        logits = self.lm_head(self.norm(x[:, -logits_to_keep:] if logits_to_keep else x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return LMOutput(logits, loss, aux_loss, stats, presents if use_cache else None)

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or those one token uses (k of E routed experts, shared experts, the rest)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        inactive = 0
        for layer in self.layers:
            if layer.is_moe:
                experts = layer.mlp.experts
                per_expert = sum(p[0].numel() for p in experts.parameters())
                moe = layer.mlp.config
                used = moe.num_experts_per_tok if moe.is_token_choice else moe.num_local_experts
                inactive += per_expert * (moe.num_local_experts - used)
        return total - inactive
