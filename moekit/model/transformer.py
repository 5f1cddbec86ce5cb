"""Decoder-only transformer LM: pre-norm RMSNorm, RoPE, causal attention, SwiGLU or MoE FFN.

Weight names follow HF Llama/Mixtral (`embed_tokens`, `layers.N.self_attn.q_proj`, `input_layernorm`,
`post_attention_layernorm`, `norm`, `lm_head`) so export is a renaming, not a reshaping. The attention block and
its options (biases, q/k norms, sliding windows, sinks, latent attention) live in `moekit.model.attention`, the
rotary embedding (partial, interleaved, scaled) in `moekit.model.rope`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..layer import MoELayer
from .attention import RMSNorm, build_attention
from .rope import rope_frequencies, rope_tables

__all__ = ["DecoderLayer", "DenseMLP", "KVCache", "LMOutput", "MoETransformer", "RMSNorm"]

KVCache = list[tuple[Tensor, Tensor]]


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
        self.self_attn = build_attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(index)
        self.mlp: nn.Module = MoELayer(config.moe) if self.is_moe else DenseMLP(config.hidden_size,
                                                                                 config.intermediate_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None = None,
                router_stats: bool = True):
        attn, present = self.self_attn(self.input_layernorm(x), rope, past)
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
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for biases and attention sinks."""
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                param.zero_()
            elif param.dim() >= 2:
                param.normal_(0.0, std)
            elif name.endswith("norm.weight"):
                param.fill_(1.0)

    def rotary_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [T, rotary_dim] of the model's RoPE (scaled as `rope_scaling` says) at `positions`."""
        config = self.config
        inv_freq, factor = rope_frequencies(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                            config.max_position_embeddings, positions.device)
        return rope_tables(positions, inv_freq, factor)

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
        rope = self.rotary_tables(positions)
        x = self.embed_tokens(input_ids)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats: dict[int, dict[str, Tensor]] = {}
        presents: KVCache = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            x, present, moe_out = layer(x, rope, past, router_stats)
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
