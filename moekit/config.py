"""Configuration dataclasses for moekit, with the field names Hugging Face configs use.

`MoEConfig` is the single source of truth for one MoE layer. Every impossible combination is
refused at construction time with a `ValueError` that names the field, the value seen and what is
allowed, so a typo never turns into a silent shape error deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

ROUTER_NAMES = ("topk", "noisy_topk", "switch", "expert_choice", "deepseek_v3", "soft", "hierarchical")
TOKEN_CHOICE_ROUTERS = ("topk", "noisy_topk", "switch", "deepseek_v3", "hierarchical")
HIDDEN_ACTS = ("silu", "gelu")
SCORING_FUNCS = ("softmax", "sigmoid")
EXPERT_BACKENDS = ("auto", "loop", "grouped_mm")

# Routers whose top-k selection can use the aux-loss-free bias (the bias only selects).
_BIAS_ROUTERS = ("topk", "switch", "deepseek_v3")
# Routers whose every output mixes several tokens of a sequence (not causal as such).
_TOKEN_MIXING_ROUTERS = ("expert_choice", "soft")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{name}={value!r} is not allowed: {allowed}")


@dataclass
class MoEConfig:
    """Configuration of one sparse MoE layer.

    Sizes follow the HF names: `hidden_size` (model width), `moe_intermediate_size` (one routed
    expert's FFN width), `num_local_experts` (E), `num_experts_per_tok` (k). Balancing
    coefficients default to 0 (off); a term whose coefficient is 0 is not computed.

    `norm_topk_prob=None` means the router's own convention: renormalise the kept weights for
    `topk` (Mixtral) and `deepseek_v3`, never for `switch` (Switch scales by the raw probability).
    `shared_expert_intermediate_size=None` means `n_shared_experts * moe_intermediate_size`
    (DeepSeekMoE fuses its shared experts into one FFN of that width).
    """

    hidden_size: int = 512
    moe_intermediate_size: int = 1024
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    hidden_act: str = "silu"
    router: str = "topk"
    scoring_func: str = "softmax"
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    slots_per_expert: int = 1
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    importance_loss_coef: float = 0.0
    load_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    aux_free_bias_update_rate: float = 0.0
    expert_backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ValueError` for any impossible combination of fields."""
        for name in ("hidden_size", "moe_intermediate_size", "num_local_experts", "num_experts_per_tok",
                     "n_group", "topk_group", "slots_per_expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "a positive integer")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            _fail("n_shared_experts", self.n_shared_experts, "an integer >= 0")
        if self.shared_expert_intermediate_size is not None and (
            not isinstance(self.shared_expert_intermediate_size, int) or self.shared_expert_intermediate_size < 1
        ):
            _fail("shared_expert_intermediate_size", self.shared_expert_intermediate_size,
                  "a positive integer, or None for n_shared_experts * moe_intermediate_size")
        if self.shared_expert_gate and self.n_shared_experts == 0:
            _fail("shared_expert_gate", self.shared_expert_gate,
                  "True only with n_shared_experts >= 1 (there is no shared expert to gate)")
        if self.router not in ROUTER_NAMES:
            close = difflib.get_close_matches(str(self.router), ROUTER_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail("router", self.router, f"one of {', '.join(ROUTER_NAMES)}{hint}")
        if self.hidden_act not in HIDDEN_ACTS:
            _fail("hidden_act", self.hidden_act, "'silu' (SwiGLU experts) or 'gelu' (plain GELU FFN experts)")
        if self.scoring_func not in SCORING_FUNCS:
            _fail("scoring_func", self.scoring_func, "'softmax' or 'sigmoid'")
        if self.expert_backend not in EXPERT_BACKENDS:
            _fail("expert_backend", self.expert_backend, f"one of {', '.join(EXPERT_BACKENDS)}")

        E, k = self.num_local_experts, self.num_experts_per_tok
        if k > E:
            _fail("num_experts_per_tok", k,
                  f"at most num_local_experts={E} (a token cannot pick more experts than exist)")
        if self.scoring_func == "sigmoid" and self.router not in _BIAS_ROUTERS:
            _fail("scoring_func", "sigmoid",
                  f"only with router in {_BIAS_ROUTERS}; router={self.router!r} needs 'softmax'")
        if not self.routed_scaling_factor > 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "a number > 0")
        if not 0.0 <= self.router_jitter_noise < 1.0:
            _fail("router_jitter_noise", self.router_jitter_noise, "a number in [0, 1)")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            _fail("capacity_factor", self.capacity_factor, "a number > 0, or None for dropless routing")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "importance_loss_coef", "load_loss_coef",
                     "seq_aux_loss_coef", "aux_free_bias_update_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                _fail(name, value, "a finite number >= 0")

        # groups: only the group-limited routers read them
        if self.router in ("deepseek_v3", "hierarchical"):
            if E % self.n_group != 0:
                _fail("n_group", self.n_group, f"a divisor of num_local_experts={E}")
            if self.topk_group > self.n_group:
                _fail("topk_group", self.topk_group, f"at most n_group={self.n_group}")
        elif self.n_group != 1 or self.topk_group != 1:
            _fail("n_group", self.n_group, f"1 (with topk_group=1) for router={self.router!r}; "
                  "groups are used by 'deepseek_v3' and 'hierarchical'")
        if self.router == "deepseek_v3":
            eligible = self.topk_group * (E // self.n_group)
            if k > eligible:
                _fail("num_experts_per_tok", k,
                      f"at most topk_group * experts per group = {eligible} (only that many experts are eligible)")
        if self.router == "hierarchical":
            if k % self.topk_group != 0:
                _fail("num_experts_per_tok", k, f"a multiple of topk_group={self.topk_group} "
                      "(each chosen group picks num_experts_per_tok / topk_group experts)")
            if k // self.topk_group > E // self.n_group:
                _fail("num_experts_per_tok", k,
                      f"at most topk_group * experts per group = {self.topk_group * (E // self.n_group)}")

        if self.router == "switch":
            if k != 1:
                _fail("num_experts_per_tok", k,
                      "1 for router='switch' (Switch routing is top-1); use router='topk' for k > 1")
            if self.norm_topk_prob:
                _fail("norm_topk_prob", True, "False or None for router='switch': with k=1 it would set every "
                      "weight to 1 and the router would get no gradient")
        if self.router == "expert_choice" and self.capacity_factor is None:
            _fail("capacity_factor", None, "a number > 0 for router='expert_choice' (each expert takes "
                  "capacity_factor * tokens / experts tokens; 2.0 is the paper's default)")
        if self.router == "soft" and self.capacity_factor is not None:
            _fail("capacity_factor", self.capacity_factor, "None for router='soft' (Soft MoE uses "
                  "slots_per_expert and drops nothing)")
        if self.router in _TOKEN_MIXING_ROUTERS:
            for name in ("router_aux_loss_coef", "importance_loss_coef", "seq_aux_loss_coef"):
                if getattr(self, name) > 0:
                    _fail(name, getattr(self, name), f"0 for router={self.router!r}: it balances by construction "
                          "(every expert gets the same number of tokens or slots)")
        if self.load_loss_coef > 0 and self.router != "noisy_topk":
            _fail("load_loss_coef", self.load_loss_coef,
                  "0 unless router='noisy_topk' (the load loss is a smooth estimator over the noisy gates)")
        if self.aux_free_bias_update_rate > 0 and self.router not in _BIAS_ROUTERS:
            _fail("aux_free_bias_update_rate", self.aux_free_bias_update_rate,
                  f"0 unless router is one of {_BIAS_ROUTERS} (the bias acts on top-k selection)")

    # ------------------------------------------------------------------ derived values
    @property
    def is_token_choice(self) -> bool:
        """True when each token picks its experts (everything but expert choice and Soft MoE)."""
        return self.router in TOKEN_CHOICE_ROUTERS

    @property
    def mixes_tokens(self) -> bool:
        """True when a token's output depends on other tokens of its sequence (future ones included).

        Such routers leak the future in a causal language model: expert choice and Soft MoE.
        """
        return self.router in _TOKEN_MIXING_ROUTERS

    @property
    def resolved_norm_topk_prob(self) -> bool:
        """`norm_topk_prob` with `None` resolved to the router's convention."""
        if self.norm_topk_prob is not None:
            return self.norm_topk_prob
        return self.router in ("topk", "deepseek_v3")

    @property
    def resolved_shared_intermediate_size(self) -> int:
        """Width of the (fused) shared expert FFN; 0 when there is none."""
        if self.n_shared_experts == 0:
            return 0
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def uses_aux_free_bias(self) -> bool:
        """True when the router keeps a selection bias (`e_score_correction_bias`)."""
        return self.router == "deepseek_v3" or self.aux_free_bias_update_rate > 0

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of every field (JSON/YAML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEConfig:
        """Build from a dict, refusing unknown keys with the closest known name."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"MoEConfig has no field {key!r}{hint}")
        return cls(**values)

    def replace(self, **changes: Any) -> MoEConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def fine_grained(config: MoEConfig, m: int) -> MoEConfig:
    """DeepSeekMoE fine-grained segmentation: (E, k, ffn) -> (m*E, m*k, ffn/m).

    Active parameters per token stay the same: m*k experts of width ffn/m instead of k of width
    ffn. Shared experts keep their total width.
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"fine_grained: m={m!r} is not allowed: a positive integer")
    if config.moe_intermediate_size % m != 0:
        raise ValueError(
            f"fine_grained: moe_intermediate_size={config.moe_intermediate_size} is not divisible by m={m}; "
            "choose m dividing the expert FFN width"
        )
    shared = config.resolved_shared_intermediate_size or None
    return config.replace(
        num_local_experts=config.num_local_experts * m,
        num_experts_per_tok=config.num_experts_per_tok * m,
        moe_intermediate_size=config.moe_intermediate_size // m,
        shared_expert_intermediate_size=shared if config.n_shared_experts else config.shared_expert_intermediate_size,
    )
