"""`MoELayer`: router -> dispatcher (experts, combine) (+ shared experts), with balancing and stats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from . import balance
from .dispatch import LocalDispatcher, TokenDispatcher, expert_capacity, plan_dispatch, soft_combine, soft_dispatch
from .experts import GroupedExperts, SharedExperts
from .routers import Router, Routing, build_router


@dataclass
class MoEOutput:
    """What `MoELayer.forward` returns.

    Attributes:
        hidden_states: same shape as the input; padded positions are 0.
        aux_loss: scalar, sum of coefficient * term over the balancing terms with a coefficient > 0
            (0 when none is on). Add it to the training loss.
        router_logits: [tokens, E] (Soft MoE: [tokens, E * slots]) for every input position,
            zero rows at padded positions.
        stats: detached tensors: `tokens_per_expert` [E] (the router's choices, before any
            capacity dropping), `dropped_fraction`, `max_violation` (MaxVio), and each balancing
            term that applies to the router, by name (`router_aux_loss`, `router_z_loss`,
            `importance_loss`, `load_loss`, `seq_aux_loss`): in training mode whatever its
            coefficient, in eval mode only those with a coefficient > 0. Under expert parallelism also
            `all_to_all_bytes` and `all_to_all_rows`: what this rank sent to other ranks in this forward.
    """

    hidden_states: Tensor
    aux_loss: Tensor
    router_logits: Tensor
    stats: dict[str, Tensor]


class MoELayer(nn.Module):
    """A sparse Mixture-of-Experts FFN built from one `MoEConfig`.

    Example:
        >>> layer = MoELayer(MoEConfig(hidden_size=64, moe_intermediate_size=128))
        >>> out = layer(torch.randn(2, 5, 64))
        >>> out.hidden_states.shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router: Router = build_router(config)
        self.experts = GroupedExperts.from_config(config)
        # how routed rows reach `experts` and come back; `shard_experts` puts an expert-parallel one in its place
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        self.shared_experts = SharedExperts.from_config(config) if config.n_shared_experts else None
        # router choices accumulated over micro-batches since the last aux-free bias update
        self.register_buffer("load_since_update", torch.zeros(config.num_local_experts), persistent=False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, attention_mask: Tensor | None = None, compute_stats: bool = True) -> MoEOutput:
        """Route `x: [batch, seq, hidden]` or `[tokens, hidden]`.

        `attention_mask` (same leading shape as `x`, 1/True = real token) keeps padded tokens
        out of routing, of every balancing term and of every statistic; their output is 0.
        A 3-D input is treated as `batch` sequences (for the sequence-wise loss and Soft MoE);
        a 2-D input as one sequence. `compute_stats=False` skips the balancing terms and the
        statistics in eval mode (`aux_loss` is then 0 and `stats` empty), for generation; training
        always computes them, since the loss and the aux-free balancer need them.
        """
        self._check_input(x)
        tokens = _TokenRows.unpad(x, attention_mask)
        routing = self._route(tokens)
        if routing.is_soft:
            out, num_dropped = self._soft_experts(tokens, routing), 0
        else:
            out, num_dropped = self._routed_experts(tokens.rows, routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens.rows)
        aux_loss, stats = self._balance_and_stats(routing, tokens, num_dropped, compute_stats)
        return MoEOutput(tokens.repad(out).view(x.shape), aux_loss, tokens.repad(routing.logits), stats)

    def _route(self, tokens: _TokenRows) -> Routing:
        """The router's decision for the real token rows; in training with `router_jitter_noise`, on a jittered
        copy of them (the experts still see the rows themselves)."""
        router_input, jitter = tokens.rows, self.config.router_jitter_noise
        if self.training and jitter > 0:
            router_input = router_input * torch.empty_like(router_input).uniform_(1.0 - jitter, 1.0 + jitter)
        return self.router(router_input, tokens.seq_ids, tokens.num_sequences)

    def _routed_experts(self, rows: Tensor, routing: Routing) -> tuple[Tensor, int]:
        """Discrete routing: plan the assignments expert-major (dropping over capacity), hand them to the
        dispatcher; returns the token rows' expert output [T, H] and the number of dropped assignments."""
        cfg = self.config
        capacity = None
        if cfg.capacity_factor is not None and routing.num_experts_per_tok is not None:
            capacity = expert_capacity(routing.expert_index.numel(), cfg.num_local_experts, cfg.capacity_factor)
        plan = plan_dispatch(routing.expert_index, cfg.num_local_experts, routing.weights,
                             routing.num_experts_per_tok or 1, capacity)
        # the combine weights ride along with the rows: the experts apply them where it is cheapest
        row_scale, row_index = routing.weights[plan.order], routing.token_index[plan.order]
        out = self.dispatcher.dispatch_and_combine(self.experts, rows, plan.group_sizes, row_scale, row_index)
        return out, plan.num_dropped

    def _soft_experts(self, tokens: _TokenRows, routing: Routing) -> Tensor:
        """Soft MoE: every expert's slots are weighted averages of a sequence's tokens; [T, H]."""
        cfg = self.config
        # per sequence, so a non-finite token reaches no other sequence (None: equal-length sequences in order)
        seq_ids = None if tokens.kept_rows is None else tokens.seq_ids
        slots, sizes = soft_dispatch(tokens.rows, routing.soft_dispatch, cfg.num_local_experts, cfg.slots_per_expert,
                                     seq_ids)
        return soft_combine(self.experts(slots, sizes), routing.soft_combine, cfg.num_local_experts,
                            cfg.slots_per_expert, seq_ids)

    def _balance_and_stats(self, routing: Routing, tokens: _TokenRows, num_dropped: int,
                           compute_stats: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The balancing loss and the statistics (skipped in eval mode without `compute_stats`); counts the
        router's choices for the aux-free bias update in training."""
        if not (compute_stats or self.training):
            return routing.logits.new_zeros((), dtype=torch.float32), {}
        aux_loss, stats = self._balance(routing, tokens.seq_ids, tokens.num_sequences, num_dropped,
                                        tokens.rows.shape[0])
        if self.training and self.config.aux_free_bias_update_rate > 0:
            self.load_since_update += stats["tokens_per_expert"]
        if not routing.is_soft:
            stats.update(self.dispatcher.stats())  # what reaching the experts cost (expert parallelism)
        return aux_loss, stats

    def _check_input(self, x: Tensor) -> None:
        """Refuse an input the layer cannot route, naming what is wrong and how to fix it."""
        hidden = self.config.hidden_size
        if not isinstance(x, Tensor):
            raise TypeError(f"MoELayer expects x to be a torch.Tensor of shape [batch, seq, {hidden}] or "
                            f"[tokens, {hidden}], got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != hidden:
            if x.dim() not in (2, 3):
                problem = f"a {x.dim()}-D tensor; pass 3-D [batch, seq, hidden] or 2-D [tokens, hidden]"
            else:
                problem = f"last dimension {x.shape[-1]}, but the layer's hidden_size is {hidden}"
            raise ValueError(f"MoELayer expects x of shape [batch, seq, {hidden}] or [tokens, {hidden}], got "
                             f"{tuple(x.shape)}: {problem}")
        if not x.is_floating_point():
            raise ValueError(f"MoELayer expects a floating-point x (hidden states), got dtype {x.dtype}")
        weight = getattr(self.router, "weight", None)
        if weight is None or x.dtype == weight.dtype or _autocast_on(x.device.type):
            return
        raise ValueError(f"MoELayer got x of dtype {x.dtype} but its weights are {weight.dtype}; cast one to the "
                         f"other (layer.to({x.dtype}), e.g. layer.double(), or x.to({weight.dtype}), e.g. x.float()) "
                         "or run under torch.autocast")

    # ------------------------------------------------------------------ balancing
    def _balance(self, routing: Routing, seq_ids: Tensor, num_sequences: int, num_dropped: int,
                 num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, num_experts = self.config, self.config.num_local_experts
        aux_loss = routing.logits.new_zeros((), dtype=torch.float32)
        stats: dict[str, Tensor] = {}

        def term(name: str, coef: float, fn: Callable[[], Tensor]) -> None:
            nonlocal aux_loss
            if coef > 0:
                value = fn()
                aux_loss = aux_loss + coef * value
            elif not self.training:  # inference does not pay for terms that enter no loss
                return
            else:
                with torch.no_grad():
                    value = fn()
            stats[name] = value.detach()

        term("router_z_loss", cfg.router_z_loss_coef, lambda: balance.router_z_loss(routing.logits))
        k = routing.num_experts_per_tok
        if k is not None:  # token choice: the balancing losses apply
            probs, experts = routing.probs, routing.expert_index
            term("router_aux_loss", cfg.router_aux_loss_coef,
                 lambda: balance.switch_aux_loss(probs, experts, num_experts))
            term("importance_loss", cfg.importance_loss_coef,
                 lambda: balance.importance_loss(experts, routing.weights, num_experts))
            term("seq_aux_loss", cfg.seq_aux_loss_coef,
                 lambda: balance.seq_aux_loss(probs, routing.token_index, experts, seq_ids, num_sequences, k))
            if routing.load_probs is not None:
                term("load_loss", cfg.load_loss_coef, lambda: balance.load_loss(routing.load_probs))

        with torch.no_grad():
            if routing.is_soft:  # dispatch mass per expert: the same for every expert
                mass = routing.soft_dispatch.sum(dim=0).view(-1, num_experts, cfg.slots_per_expert)
                load = mass.sum(dim=(0, 2))
                dropped = load.new_zeros(())
            else:
                load = balance.tokens_per_expert(routing.expert_index, num_experts)
                if k is not None:
                    dropped = load.new_tensor(num_dropped / max(routing.expert_index.numel(), 1))
                else:  # expert choice: the fraction of tokens no expert took
                    covered = torch.zeros(num_tokens, dtype=torch.bool, device=load.device)
                    covered[routing.token_index] = True
                    dropped = 1.0 - covered.float().mean() if num_tokens else load.new_zeros(())
            stats["tokens_per_expert"] = load
            stats["dropped_fraction"] = dropped
            stats["max_violation"] = balance.max_violation(load)
        return aux_loss, stats

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Aux-loss-free balancing step: call after each optimiser step (outside autograd).

        Moves `router.e_score_correction_bias` by `aux_free_bias_update_rate * sign(mean - load)`
        using the router choices counted over every training forward since the last call, then
        resets the count. Does nothing when the rate is 0 or nothing was counted.
        """
        rate = self.config.aux_free_bias_update_rate
        if rate <= 0 or self.load_since_update.sum() <= 0:
            return
        balance.aux_free_bias_update(self.router.e_score_correction_bias, self.load_since_update, rate)
        self.load_since_update.zero_()

    # ------------------------------------------------------------------ interop
    @classmethod
    def from_hf(cls, module: nn.Module) -> MoELayer:
        """A moekit layer computing the same function as a transformers MoE block.

        The block is recognised by its exact class, one of the native families' blocks
        (`MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock`, `Qwen3MoeSparseMoeBlock`, `OlmoeSparseMoeBlock`,
        `Glm4MoeMoE`, `DeepseekV3MoE`, `GptOssMLP`; see `moekit.families`), and read strictly: every tensor of
        the block is used and every parameter of the layer filled, with every routing detail mapped (scores,
        `norm_topk_prob`, selection bias, groups, scaling, shared experts and their gate, expert biases,
        activation). Anything else is refused with a ValueError naming the class. Weights are copied;
        transformers itself is not imported. Mixtral's `router_jitter_noise` is applied to the router input only
        (Switch's definition), so outputs match in eval mode.
        """
        from .hf_blocks import block_tensors, read_block

        family, config = read_block(module)
        layer = cls(config)
        state = block_tensors(family, config, module, {name: tuple(t.shape) for name, t in layer.state_dict().items()})
        reference = next(module.parameters())
        layer.to(device=reference.device, dtype=reference.dtype)
        layer.load_state_dict(state, strict=True)
        bias = getattr(layer.router, "e_score_correction_bias", None)
        if bias is not None:  # the selection bias stays float32 whatever the layer's dtype
            bias.copy_(state["router.e_score_correction_bias"].float())
        return layer


@dataclass
class _TokenRows:
    """The real tokens of a layer input as rows `[T, H]`, with what puts them back in place.

    Attributes:
        rows: [T, H] the input's rows, padded positions left out.
        seq_ids: [T] the sequence of each row.
        num_sequences: sequences in the input (its batch size; 1 for a 2-D input).
        kept_rows: [T] each row's position in the flattened input; None when nothing was left out.
        num_positions: positions in the flattened input.
    """

    rows: Tensor
    seq_ids: Tensor
    num_sequences: int
    kept_rows: Tensor | None
    num_positions: int

    @classmethod
    def unpad(cls, x: Tensor, attention_mask: Tensor | None) -> _TokenRows:
        """The rows of `x: [B, S, H]` or `[S, H]` whose mask is set (every row without a mask)."""
        num_sequences = x.shape[0] if x.dim() == 3 else 1
        seq_len = x.shape[1] if x.dim() == 3 else x.shape[0]
        rows = x.reshape(-1, x.shape[-1])
        seq_ids = torch.arange(num_sequences, device=x.device).repeat_interleave(seq_len)
        if attention_mask is None:
            return cls(rows, seq_ids, num_sequences, None, rows.shape[0])
        if tuple(attention_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but x has leading "
                             f"shape {tuple(x.shape[:-1])}; pass one mask value per token")
        kept_rows = attention_mask.reshape(-1).bool().nonzero().squeeze(1)
        return cls(rows[kept_rows], seq_ids[kept_rows], num_sequences, kept_rows, rows.shape[0])

    def repad(self, values: Tensor) -> Tensor:
        """Per-row `values: [T, C]` back at their input positions: [positions, C], zero rows at padding."""
        if self.kept_rows is None:
            return values
        return values.new_zeros(self.num_positions, values.shape[-1]).index_copy(0, self.kept_rows, values)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (then mixed input and weight dtypes are its business)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


def update_aux_free_biases(model: nn.Module) -> None:
    """Call `update_router_bias` on every `MoELayer` inside `model` (after the optimiser step)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.update_router_bias()
