"""transformers' own causal LM, trained the moekit way: balancing from the recorded routing, selection-bias updates.

`HFCausalLM` wraps a transformers MoE model so moekit's trainer drives it as it drives `MoETransformer`:
`forward(input_ids, targets)` returns the cross-entropy `loss`, moekit's balancing `aux_loss` and per-layer
`moe_stats`; `update_router_biases()` runs the auxiliary-loss-free sign update after each optimiser step.

The balancing terms are computed here from `RoutingCapture` (kept graph), so they are on whenever their
coefficient is > 0, whatever the family's `output_router_logits` says, and they see real tokens only:

- Switch loss E * sum_i f_i P_i (`moekit.layer.balance.switch_aux_loss`), f from every chosen expert and P the
  mean router probability: softmax of the router logits, or for families that score with a sigmoid (those with a
  selection bias, `scoring_func: sigmoid`, Llama 4) the sigmoid scores normalised per token;
- router z-loss on the logits; DeepSeek-V3's sequence-wise loss with the same probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HFModelConfig
from ..layer.balance import aux_free_bias_update, max_violation, router_z_loss, seq_aux_loss, switch_aux_loss
from .capture import SCORE_ROUTERS, LayerRouting, RoutingCapture
from .info import parameters_per_expert

#: the aux-loss-free update rate used when a family has a selection bias and the run sets none (DeepSeek-V3's)
DEFAULT_BIAS_UPDATE_RATE = 0.001


@dataclass
class HFOutput:
    """What `HFCausalLM.forward` returns, in `moekit.model.LMOutput`'s shape."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    moe_stats: dict[int, dict[str, Tensor]] = field(default_factory=dict)


def selection_bias(router: nn.Module | None, num_experts: int) -> Tensor | None:
    """The router's selection-bias buffer (`e_score_correction_bias` or the family's [E] bias buffer), or None."""
    if router is None:
        return None
    buffers = dict(router.named_buffers(recurse=False))
    if "e_score_correction_bias" in buffers:
        return buffers["e_score_correction_bias"]
    named = [tensor for name, tensor in buffers.items() if "bias" in name and tuple(tensor.shape) == (num_experts,)]
    return named[0] if len(named) == 1 else None


class HFCausalLM(nn.Module):
    """A transformers causal LM with moekit's balancing on its recorded routing (see the module docstring)."""

    def __init__(self, model: nn.Module, config: HFModelConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.aux_coef = float(config.router_aux_loss_coef if config.router_aux_loss_coef is not None
                              else getattr(text, "router_aux_loss_coef", 0.0) or 0.0)
        self.z_coef, self.seq_coef = config.router_z_loss_coef, config.seq_aux_loss_coef
        self.capture = RoutingCapture(model, detach=False, logits=True)
        self.capture.__enter__()
        self.biases = {layer.layer: bias for layer in self.capture.layers
                       if (bias := selection_bias(layer.router, layer.num_experts)) is not None}
        rate = config.aux_free_bias_update_rate
        if rate is None:
            rate = DEFAULT_BIAS_UPDATE_RATE if self.biases else 0.0
        if rate > 0 and not self.biases:
            raise ValueError(f"model.aux_free_bias_update_rate={rate}: {type(model).__name__} has no selection bias "
                             "(e_score_correction_bias) to update; leave it unset or 0")
        self.bias_rate = float(rate)
        self.sigmoid_scores = {layer.layer: self._scores_with_sigmoid(layer, text) for layer in self.capture.layers}
        self._loads: dict[int, Tensor] = {}
        self.experts_per_token = self._measure_top_k()

    # ------------------------------------------------------------------ what the model is
    def _scores_with_sigmoid(self, layer: LayerRouting, text: Any) -> bool:
        router_name = type(layer.router).__name__ if layer.router is not None else ""
        return (layer.layer in self.biases or getattr(text, "scoring_func", None) == "sigmoid"
                or router_name in SCORE_ROUTERS)

    @torch.no_grad()
    def _measure_top_k(self) -> dict[int, int]:
        """Experts per token of each MoE layer, read from one two-token forward (whatever the config calls it)."""
        was_training = self.model.training
        self.model.eval()
        self.capture.clear()
        try:
            device = next(self.model.parameters()).device
            self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
            return {layer.layer: int(layer.expert_index.shape[-1]) for layer in self.capture.layers}
        finally:
            self.capture.clear()
            self.model.train(was_training)

    def _experts_module(self, layer: LayerRouting) -> nn.Module | None:
        modules = dict(self.model.named_modules())
        if layer.top_k is None:
            return modules[layer.name]
        parent = layer.name.rsplit(".", 1)[0]
        return modules.get(f"{parent}.experts")

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or those one token uses (k of E routed experts, and everything else)."""
        total = sum(p.numel() for p in self.model.parameters())
        if not active:
            return total
        for layer in self.capture.layers:
            experts = self._experts_module(layer)
            if experts is None:
                continue
            per_expert = parameters_per_expert(experts, layer.num_experts)
            total -= per_expert * (layer.num_experts - self.experts_per_token[layer.layer])
        return total

    def router_parameter_names(self) -> list[str]:
        """Names (in this module's `named_parameters`) of every router's own weights."""
        routers = {id(layer.router) for layer in self.capture.layers if layer.router is not None}
        if len(routers) < len(self.capture.layers):
            missing = [layer.name for layer in self.capture.layers if layer.router is None]
            raise ValueError(f"moekit cannot tell which module routes {missing[0]} in {type(self.model).__name__} "
                             "(the family declares no router output), so train.freeze_router and "
                             "train.train_only_router cannot be honoured; freeze by name with train.freeze=REGEX")
        names = []
        for name, module in self.named_modules():
            if id(module) in routers:
                names += [f"{name}.{param}" for param, _ in module.named_parameters()]
        return names

    # ------------------------------------------------------------------ the forward
    def forward(self, input_ids: Tensor, targets: Tensor | None = None,
                attention_mask: Tensor | None = None) -> HFOutput:
        """input_ids [B, T] -> logits; with `targets` [B, T] (-100 = no loss) the mean next-token cross-entropy."""
        self.capture.clear()
        self.capture.attention_mask = attention_mask
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100)
            aux, stats = self._balance(input_ids.shape, attention_mask, logits)
        finally:
            self.capture.clear()  # the records hold the graph: never keep them past the step
        return HFOutput(logits, loss, aux, stats)

    def _balance(self, shape: torch.Size, attention_mask: Tensor | None, logits: Tensor) -> tuple[Tensor, dict]:
        aux = logits.new_zeros((), dtype=torch.float32)
        stats: dict[int, dict[str, Tensor]] = {}
        batch, seq = shape
        seq_ids = torch.arange(batch, device=logits.device).repeat_interleave(seq)
        if attention_mask is not None:
            seq_ids = seq_ids[attention_mask.reshape(-1).bool()]
        wants_probs = self.training and torch.is_grad_enabled() and (self.aux_coef or self.z_coef or self.seq_coef)
        for layer in self.capture.layers:
            index = layer.expert_index
            if index is None:
                continue
            flat = index.reshape(-1)
            counts = torch.bincount(flat[(flat >= 0) & (flat < layer.num_experts)],
                                    minlength=layer.num_experts).float()
            stats[layer.layer] = {"tokens_per_expert": counts.detach().cpu(), "max_violation": max_violation(counts),
                                  "dropped_fraction": torch.zeros(())}
            if self.training and torch.is_grad_enabled():
                previous = self._loads.get(layer.layer)
                self._loads[layer.layer] = counts.detach() if previous is None else previous + counts.detach()
            if not wants_probs:
                continue
            router_logits = layer.router_logits
            if router_logits is None:
                raise ValueError(f"{layer.name}: the family exposes no router logits, so moekit's balancing terms "
                                 "cannot be computed; set model.router_aux_loss_coef=0 (and the z / seq "
                                 "coefficients)")
            router_logits = router_logits.float()
            if self.sigmoid_scores[layer.layer]:
                scores = torch.sigmoid(router_logits)
                probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
            else:
                probs = router_logits.softmax(-1)
            valid = (flat >= 0) & (flat < layer.num_experts)
            if self.aux_coef:
                aux = aux + self.aux_coef * switch_aux_loss(probs, flat[valid], layer.num_experts)
            if self.z_coef:
                aux = aux + self.z_coef * router_z_loss(router_logits)
            if self.seq_coef:
                k = index.shape[-1]
                token_index = torch.arange(index.shape[0], device=flat.device).repeat_interleave(k)
                aux = aux + self.seq_coef * seq_aux_loss(probs, token_index[valid], flat[valid], seq_ids, batch, k)
        return aux, stats

    # ------------------------------------------------------------------ after the optimiser step
    @torch.no_grad()
    def update_router_biases(self) -> None:
        """The aux-loss-free sign update of every selection bias from the loads since the last call."""
        if self.bias_rate > 0:
            for number, bias in self.biases.items():
                load = self._loads.get(number)
                if load is not None:
                    aux_free_bias_update(bias, load, self.bias_rate)
        self._loads.clear()

    def discard_router_loads(self) -> None:
        """Forget the loads since the last update (a skipped step must not move the selection bias)."""
        self._loads.clear()


def _transformers_config(config: HFModelConfig):
    from transformers import AutoConfig

    values = dict(config.hf_config)
    model_type = values.pop("model_type")
    try:
        hf = AutoConfig.for_model(model_type, **values)
    except ValueError as error:
        raise ValueError(f"model.hf_config: transformers {_version()} does not know model_type {model_type!r} "
                         f"({error}); install the transformers version the run was started with") from error
    hf._experts_implementation = config.experts_implementation
    return hf


def _version() -> str:
    import transformers

    return transformers.__version__


def build_from_config(config: HFModelConfig) -> HFCausalLM:
    """transformers' causal LM of `config.hf_config` (weights initialised by transformers), wrapped."""
    from transformers import AutoModelForCausalLM

    from .experts import register
    from .load import warn_unserved

    register()
    model = AutoModelForCausalLM.from_config(_transformers_config(config),
                                             experts_implementation=config.experts_implementation,
                                             dtype=torch.float32)
    warn_unserved(model, config.experts_implementation)
    return HFCausalLM(model, config)


def load_from_folder(path: str, config: HFModelConfig) -> HFCausalLM:
    """The checkpoint folder `path` loaded by transformers in float32 with `config`'s experts, wrapped."""
    from .load import load_model

    model = load_model(path, experts_implementation=config.experts_implementation, dtype=torch.float32)
    with torch.no_grad():  # fresh, aligned storage: see `_own_storage`
        _own_storage(model)
    return HFCausalLM(model, config)


def _own_storage(model: nn.Module) -> None:
    """Give every parameter and buffer a fresh allocation of its own.

    transformers leaves loaded tensors inside the safetensors file's memory map, at the file's offsets (8-byte
    aligned); a model built from its config, as a resumed run builds it, has fresh 64-byte aligned tensors, and
    CPU matmul kernels round differently at different alignments. With fresh copies a run computes the same
    steps whether it started from the folder or resumed from its checkpoint (exact resume), and no tensor keeps
    the file open.
    """
    for param in model.parameters():
        param.data = param.data.clone(memory_format=torch.contiguous_format)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                setattr(module, name, buffer.clone(memory_format=torch.contiguous_format))


@torch.no_grad()
def hf_generate(model: HFCausalLM, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> Tensor:
    """Sample from transformers' own model with moekit's sampling rule (`moekit.model.generate.sample_next`).

    The prompt and each new token go through the model with transformers' KV cache; `temperature=0` is greedy.
    Returns [B, T + new] ids. Arguments are checked as `moekit.model.generate.generate` checks them.
    """
    from ..model.generate import check_sampling, sample_next

    check_sampling(temperature, top_k, top_p)
    model.eval()
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    out = model.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    tokens = input_ids
    for _ in range(max_new_tokens):
        next_id = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_id.unsqueeze(-1)], dim=1)
        model.capture.clear()  # routing is recorded for training; generation keeps none of it
        out = model.model(input_ids=next_id.unsqueeze(-1), past_key_values=out.past_key_values, use_cache=True)
    model.capture.clear()
    return tokens
