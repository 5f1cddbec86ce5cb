"""The model configuration dataclasses, with the field names Hugging Face configs use, and the field checks.

`MoEConfig` (one MoE layer), `MLAConfig`, `ModelConfig` (a moekit language model) and `HFModelConfig`
(transformers' own class, for the transformers training backend) live here, with the machinery that checks the
fields of every config dataclass; the training and run configs (`moekit.train.config`) use the same machinery.

`MoEConfig` is the single source of truth for one MoE layer. Every impossible combination is
refused at construction time with a `ValueError` that names the field, the value seen and what is
allowed, so a typo never turns into a silent shape error deep inside a forward pass.

Every field of every config dataclass is checked twice: its type, generically from the dataclass
annotation (`_check_fields`), then its range (the `_*_RULES` tables), before the checks that relate
several fields. The type rules:

- `int`: an `int`, not a `bool`;
- `float`: an `int` or `float`, not a `bool`, and finite (NaN and infinities are refused everywhere);
- `bool`: a real `bool` (the strings "false" or "abc" are refused: YAML and `--set` take true/false);
- `str`: a `str`; `X | None`: None or X; `MoEConfig | None`: None, a mapping of its fields or a `MoEConfig`.

Upper bounds on scales, coefficients and rates are far above any published setting; they exist so that an
accepted value cannot overflow a float32 forward or optimiser step (a typo such as 1e30 is refused, not run).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

ROUTER_NAMES = ("topk", "noisy_topk", "switch", "expert_choice", "deepseek_v3", "soft", "hierarchical")
TOKEN_CHOICE_ROUTERS = ("topk", "noisy_topk", "switch", "deepseek_v3", "hierarchical")
HIDDEN_ACTS = ("silu", "gelu", "clamped_swiglu")
#: hidden_act values whose experts are gated (gate and up projections, `gate_up_proj`)
GATED_ACTS = ("silu", "clamped_swiglu")
SCORING_FUNCS = ("softmax", "sigmoid")
EXPERT_BACKENDS = ("auto", "loop", "bmm", "grouped_mm")

# Routers whose top-k selection can use the aux-loss-free bias (the bias only selects).
_BIAS_ROUTERS = ("topk", "switch", "deepseek_v3")
# Routers that can limit each token's experts to a few devices (DeepSeek-V3's node-limited routing).
_DEVICE_LIMITED_ROUTERS = ("topk", "deepseek_v3")
# Routers computed by `TopKRouter` (one [E, H] weight), which can also carry a logit bias (GPT-OSS).
_LINEAR_ROUTERS = ("topk", "switch", "deepseek_v3")
# Routers whose every output mixes several tokens of a sequence (not causal as such).
_TOKEN_MIXING_ROUTERS = ("expert_choice", "soft")

#: the largest accepted loss coefficient and routed scaling factor (published values: 1e-3 to 16)
MAX_COEFFICIENT = 1000.0
#: the largest accepted clamp of activations (`clip_qkv`, `swiglu_limit`; published values: 7 to 10), far below
#: float16's largest value so a clamp is always representable
MAX_ACTIVATION_CLAMP = 10000.0
#: the largest accepted RoPE scaling number (factors, betas, mscales; published values: 1 to 64)
MAX_ROPE_NUMBER = 1e6


# Names users bring from other libraries, mapped to ours (difflib alone misses the short ones).
_ALIASES = {"learning_rate": "lr", "num_experts": "num_local_experts", "n_routed_experts": "num_local_experts",
            "top_k": "num_experts_per_tok", "experts_per_token": "num_experts_per_tok", "steps": "max_steps",
            "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size"}


def _refuse_unknown(owner: str, values: dict[str, Any], known: list[str]) -> None:
    """Raise for the first key of `values` not in `known`, suggesting the likely intended field."""
    for key in values:
        if key not in known:
            guess = _ALIASES.get(key) if _ALIASES.get(key) in known else None
            close = [guess] if guess else difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{owner} has no field {key!r}{hint}")


class _DictMixin:
    """`to_dict` / `from_dict` for the config dataclasses (unknown keys refused with a suggestion)."""

    def to_dict(self) -> dict[str, Any]:
        """A plain (nested) dict of every field, JSON/YAML friendly."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a dict, refusing unknown keys with the closest known name."""
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__} needs a mapping of its fields, got {type(values).__name__} {values!r}")
        _refuse_unknown(cls.__name__, values, [f.name for f in dataclasses.fields(cls)])  # type: ignore[arg-type]
        return cls(**values)


# ---------------------------------------------------------------------------------------------- field checks
#: a range rule: (predicate on a value of the right type, what is allowed: text or a function of the value)
_Rule = tuple[Callable[[Any], bool], str | Callable[[Any], str]]

_BOOL_TEXT = "true or false"


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) whose float value is finite (huge ints overflow the conversion).

    The one test every moekit argument check uses for "a real number" (configs, merge configs, sampling).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (the module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def _union_arms(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` describes, under the module docstring's rules."""
    if hint is Any:
        return True
    arms = _union_arms(hint)
    if len(arms) > 1:
        return any(_matches(value, arm) for arm in arms)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return is_finite_number(value)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"config field annotation {hint!r} has no type rule")  # pragma: no cover - a new kind of field


def _type_text(hint: Any) -> str:
    """What a type allows, in words (used when a field has no range rule)."""
    arms = _union_arms(hint)
    if len(arms) > 1:
        named = [_type_text(arm) for arm in arms if arm is not type(None)]
        return ("None or " if type(None) in arms else "") + " or ".join(named)
    if hint is bool:
        return _BOOL_TEXT
    if hint is int:
        return "an integer"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a string"
    if typing.get_origin(hint) is list:
        return "a list of " + _type_text(typing.get_args(hint)[0]).removeprefix("a ").removeprefix("an ") + "s"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return f"a {getattr(hint, '__name__', hint)}"


def _type_hint(value: Any, hint: Any) -> str:
    """A hint for the usual ways a value of the wrong type arrives (YAML quoting, text numbers)."""
    arms = _union_arms(hint)
    if isinstance(value, str):
        if bool in arms:
            return (" (a real bool: write true or false unquoted in YAML and --set; any quoted or other text "
                    "is a string)")
        if int in arms or float in arms:
            try:
                float(value)
            except ValueError:
                return ""
            return (f" ({value!r} is text, not a number: PyYAML reads exponent numbers without a dot, such as "
                    "1e-3, as strings; write 1.0e-3 or 0.001)")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str in arms:
        return " (a number here: quote it in YAML to use it as text)"
    if isinstance(value, float) and int in arms and float not in arms and value.is_integer():
        return " (an int: write it without a decimal point)"
    if isinstance(value, bool) and bool not in arms:
        return " (a bool is not a number here)"
    return ""


def _check_fields(config: Any, owner: str, rules: dict[str, _Rule], ints_to_float: bool = False) -> None:
    """Type-check every field of a config dataclass from its annotation, then apply its range rule.

    With `ints_to_float`, an int accepted by a `float` field is stored as a float (torch's optimisers refuse int
    betas). Model fields keep the int: their dict is hashed to recognise a checkpoint's model.
    """
    hints = _field_types(type(config))
    for field in dataclasses.fields(config):
        value, hint, rule = getattr(config, field.name), hints[field.name], rules.get(field.name)
        allowed: Any = rule[1] if rule is not None else _type_text(hint)
        if callable(allowed):
            allowed = allowed(value)
        if not _matches(value, hint):
            raise ValueError(f"{owner}.{field.name}={value!r} is not allowed: {allowed}{_type_hint(value, hint)}")
        if rule is not None and value is not None and not rule[0](value):
            raise ValueError(f"{owner}.{field.name}={value!r} is not allowed: {allowed}")
        if ints_to_float and float in _union_arms(hint) and isinstance(value, int):
            setattr(config, field.name, float(value))


def _positive_int() -> _Rule:
    return (lambda v: v >= 1, "a positive integer")


def _close_hint(value: Any, names: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{name}={value!r} is not allowed: {allowed}")


_COEFFICIENT_RULE: _Rule = (lambda v: 0 <= v <= MAX_COEFFICIENT, f"a finite number >= 0 (at most {MAX_COEFFICIENT:g})")

_MOE_RULES: dict[str, _Rule] = {
    "hidden_size": _positive_int(),
    "moe_intermediate_size": _positive_int(),
    "num_local_experts": _positive_int(),
    "num_experts_per_tok": _positive_int(),
    "n_shared_experts": (lambda v: v >= 0, "an integer >= 0"),
    "shared_expert_intermediate_size": (lambda v: v >= 1, "a positive integer, or None for n_shared_experts * "
                                        "moe_intermediate_size"),
    "hidden_act": (lambda v: v in HIDDEN_ACTS, "'silu' (SwiGLU experts), 'gelu' (plain GELU FFN experts) or "
                   "'clamped_swiglu' (GPT-OSS's SwiGLU with clamped inputs; needs swiglu_limit and swiglu_alpha)"),
    "swiglu_limit": (lambda v: 0 < v <= MAX_ACTIVATION_CLAMP, "None, or with hidden_act='clamped_swiglu' a number in "
                     f"(0, {MAX_ACTIVATION_CLAMP:g}] (the clamp)"),
    "swiglu_alpha": (lambda v: 0 < v <= MAX_COEFFICIENT, "None, or with hidden_act='clamped_swiglu' a number in "
                     f"(0, {MAX_COEFFICIENT:g}] (the slope of the gate's sigmoid)"),
    "router": (lambda v: v in ROUTER_NAMES,
               lambda v: f"one of {', '.join(ROUTER_NAMES)}{_close_hint(v, ROUTER_NAMES)}"),
    "scoring_func": (lambda v: v in SCORING_FUNCS, "'softmax' or 'sigmoid'"),
    "norm_topk_prob": (lambda v: True, "true, false or None (None: the router's convention)"),
    "routed_scaling_factor": (lambda v: 0 < v <= MAX_COEFFICIENT, f"a finite number > 0 (at most {MAX_COEFFICIENT:g})"),
    "n_group": _positive_int(),
    "topk_group": _positive_int(),
    "capacity_factor": (lambda v: v > 0, "a finite number > 0, or None for dropless routing"),
    "router_jitter_noise": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "slots_per_expert": _positive_int(),
    "router_aux_loss_coef": _COEFFICIENT_RULE,
    "router_z_loss_coef": _COEFFICIENT_RULE,
    "importance_loss_coef": _COEFFICIENT_RULE,
    "load_loss_coef": _COEFFICIENT_RULE,
    "seq_aux_loss_coef": _COEFFICIENT_RULE,
    "aux_free_bias_update_rate": (lambda v: 0 <= v <= 1, "a finite number in [0, 1] (the bias moves by this much "
                                  "per update; router scores are in [0, 1])"),
    "expert_backend": (lambda v: v in EXPERT_BACKENDS,
                       lambda v: f"one of {', '.join(EXPERT_BACKENDS)}{_close_hint(v, EXPERT_BACKENDS)}"),
    "expert_devices": (lambda v: v >= 1, "a positive integer dividing num_local_experts (the expert-parallel size "
                       "the experts are split over)"),
    "max_devices_per_token": (lambda v: v >= 1, "None or a positive integer, at most expert_devices"),
}


@dataclass
class MoEConfig(_DictMixin):
    """Configuration of one sparse MoE layer.

    Sizes follow the HF names: `hidden_size` (model width), `moe_intermediate_size` (one routed
    expert's FFN width), `num_local_experts` (E), `num_experts_per_tok` (k). Balancing
    coefficients default to 0 (off); a term whose coefficient is 0 is still reported in
    `MoEOutput.stats` (computed without gradient) but not added to `aux_loss`.

    `norm_topk_prob=None` means the router's own convention: renormalise the kept weights for
    `topk` (Mixtral) and `deepseek_v3`, never for `switch` (Switch scales by the raw probability).
    `shared_expert_intermediate_size=None` means `n_shared_experts * moe_intermediate_size`
    (DeepSeekMoE fuses its shared experts into one FFN of that width).

    GPT-OSS's experts: `hidden_act="clamped_swiglu"` computes ``(clamp(up, -L, L) + 1) * g * sigmoid(alpha * g)``
    with ``g = clamp(gate, max=L)``, ``L = swiglu_limit`` and ``alpha = swiglu_alpha``; `expert_bias=True` gives every
    routed expert a bias on both projections; `router_bias=True` adds a bias to the router's logits.

    Device-limited routing (DeepSeek-V3's node-limited routing): with `max_devices_per_token=M`, the
    experts are seen as `expert_devices` contiguous blocks (one per expert-parallel rank) and each token
    picks its k experts inside the M blocks whose best ceil(k / M) selection scores sum highest, so
    expert parallelism sends a token to at most M ranks.
    """

    hidden_size: int = 512
    moe_intermediate_size: int = 1024
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    hidden_act: str = "silu"
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    expert_bias: bool = False
    router: str = "topk"
    router_bias: bool = False
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
    expert_devices: int = 1
    max_devices_per_token: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ValueError` for a field of the wrong type or range, or an impossible combination of fields."""
        _check_fields(self, "MoEConfig", _MOE_RULES)
        if self.shared_expert_gate and self.n_shared_experts == 0:
            _fail("shared_expert_gate", self.shared_expert_gate,
                  "True only with n_shared_experts >= 1 (there is no shared expert to gate)")

        clamped = self.hidden_act == "clamped_swiglu"
        for name in ("swiglu_limit", "swiglu_alpha"):
            if clamped and getattr(self, name) is None:
                _fail(name, None, "a finite number > 0 with hidden_act='clamped_swiglu' (GPT-OSS: limit 7.0, alpha "
                      "1.702)")
            if not clamped and getattr(self, name) is not None:
                _fail(name, getattr(self, name), f"None with hidden_act={self.hidden_act!r} (it is a parameter of "
                      "'clamped_swiglu')")
        if self.router_bias and self.router not in _LINEAR_ROUTERS:
            _fail("router_bias", True, f"False for router={self.router!r}; a logit bias exists for {_LINEAR_ROUTERS}")

        E, k = self.num_local_experts, self.num_experts_per_tok
        if k > E:
            _fail("num_experts_per_tok", k,
                  f"at most num_local_experts={E} (a token cannot pick more experts than exist)")
        if self.scoring_func == "sigmoid" and self.router not in _BIAS_ROUTERS:
            _fail("scoring_func", "sigmoid",
                  f"only with router in {_BIAS_ROUTERS}; router={self.router!r} needs 'softmax'")

        # groups: only the group-limited routers read them
        if self.router in ("deepseek_v3", "hierarchical"):
            if E % self.n_group != 0:
                _fail("n_group", self.n_group, f"a divisor of num_local_experts={E}")
            if self.topk_group > self.n_group:
                _fail("topk_group", self.topk_group, f"at most n_group={self.n_group}")
        elif self.n_group != 1:
            _fail("n_group", self.n_group, f"1 (with topk_group=1) for router={self.router!r}; "
                  "groups are used by 'deepseek_v3' and 'hierarchical'")
        elif self.topk_group != 1:
            _fail("topk_group", self.topk_group, f"1 (with n_group=1) for router={self.router!r}; "
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

        if E % self.expert_devices:
            _fail("expert_devices", self.expert_devices, f"a positive divisor of num_local_experts={E} (the "
                  "expert-parallel size the experts are split over)")
        if self.max_devices_per_token is not None:
            M, D = self.max_devices_per_token, self.expert_devices
            if self.router not in _DEVICE_LIMITED_ROUTERS:
                _fail("max_devices_per_token", M, f"None for router={self.router!r}; device-limited routing "
                      f"applies to {_DEVICE_LIMITED_ROUTERS}")
            if M > D:
                _fail("max_devices_per_token", M, f"None or an integer in [1, expert_devices={D}]; set "
                      "expert_devices to the expert-parallel size first")
            if k > M * (E // D):
                _fail("max_devices_per_token", M, f"at least {math.ceil(k / (E // D))}: M devices hold M * "
                      f"num_local_experts / expert_devices = {M * (E // D)} experts, fewer than "
                      f"num_experts_per_tok={k}")

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
    def gated(self) -> bool:
        """True when the experts are gated (a gate and an up projection): SwiGLU or clamped SwiGLU."""
        return self.hidden_act in GATED_ACTS

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


QK_NORMS = ("head", "projection")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("linear", "llama3", "yarn")

_MODEL_RULES: dict[str, _Rule] = {
    "vocab_size": _positive_int(),
    "hidden_size": _positive_int(),
    "num_hidden_layers": _positive_int(),
    "num_attention_heads": _positive_int(),
    "num_key_value_heads": (lambda v: v >= 1, "None or a positive integer dividing num_attention_heads"),
    "intermediate_size": _positive_int(),
    "max_position_embeddings": _positive_int(),
    "rope_theta": (lambda v: v > 1, "a finite number > 1 (RoPE's wavelengths theta^(2i/d) grow with i only "
                   "for theta > 1; 10000 is the usual value)"),
    "rms_norm_eps": (lambda v: 0 < v < 1, "a finite number in (0, 1) (added to a mean square of order 1; "
                     "1e-5 or 1e-6 usually)"),
    "initializer_range": (lambda v: 0 < v <= 1, "a finite number in (0, 1] (the standard deviation of the "
                          "initial weights; 0.02 usually)"),
    "first_k_dense_replace": (lambda v: v >= 0, "an integer >= 0, at most num_hidden_layers"),
    "moe_layer_freq": _positive_int(),
    "mlp_only_layers": (lambda v: all(i >= 0 for i in v) and len(set(v)) == len(v),
                        "a list of distinct layer indices >= 0 whose FFN stays dense (Qwen-MoE's mlp_only_layers)"),
    "head_dim": (lambda v: v >= 2 and v % 2 == 0, "None (hidden_size / num_attention_heads) or an even integer >= 2"),
    "qkv_bias": (lambda v: True, _BOOL_TEXT),
    "o_proj_bias": (lambda v: True, _BOOL_TEXT),
    "qk_norm": (lambda v: v in QK_NORMS, "None, 'head' (an RMSNorm over each head's query and key: Qwen3, GLM-4.5) "
                "or 'projection' (over the whole query and key projections: OLMoE)"),
    "clip_qkv": (lambda v: 0 < v <= MAX_ACTIVATION_CLAMP, f"None or a number in (0, {MAX_ACTIVATION_CLAMP:g}] "
                 "(queries, keys and values are clamped to it: OLMoE)"),
    "partial_rotary_factor": (lambda v: 0 < v <= 1, "a number in (0, 1]: the share of each head's dimensions RoPE "
                              "rotates (GLM-4.5: 0.5)"),
    "rope_scaling": (lambda v: True, "None or a mapping with rope_type 'linear', 'llama3' or 'yarn' and its "
                     "parameters, as transformers' rope_parameters"),
    "rope_interleave": (lambda v: True, _BOOL_TEXT),
    "sliding_window": (lambda v: v >= 1, "None or a positive integer (each token attends to itself and the "
                       "sliding_window - 1 tokens before it)"),
    "layer_types": (lambda v: all(t in LAYER_TYPES for t in v), f"None or a list of {' / '.join(LAYER_TYPES)}, one "
                    "per layer"),
    "attention_sinks": (lambda v: True, _BOOL_TEXT),
    "mla": (lambda v: True, "None (grouped-query attention), a mapping of MLAConfig fields or an MLAConfig"),
    "moe": (lambda v: True, "None (a dense model), a mapping of MoEConfig fields or a MoEConfig"),
}

#: the keys each scaled RoPE takes besides rope_type (required ones first; transformers' names and meanings)
ROPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("original_max_position_embeddings",),
             ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
}


def check_rope_scaling(scaling: Any, owner: str = "ModelConfig.rope_scaling") -> None:
    """Raise a ValueError naming what is wrong with a rope scaling mapping (see `ROPE_KEYS`)."""
    if not isinstance(scaling, dict):
        raise ValueError(f"{owner}={scaling!r} is not allowed: None or a mapping with a rope_type")
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{owner}.rope_type={rope_type!r} is not allowed: one of {', '.join(ROPE_TYPES)} (moekit "
                         "computes these exactly as transformers defines them; 'dynamic' and 'longrope' change with "
                         "the sequence length and are not supported)")
    required, optional = ROPE_KEYS[rope_type]
    for key in required:
        if key not in scaling:
            raise ValueError(f"{owner} with rope_type={rope_type!r} needs {key!r}")
    for key, value in scaling.items():
        if key == "rope_type":
            continue
        if key not in required and key not in optional:
            raise ValueError(f"{owner} has {key!r}, which rope_type={rope_type!r} does not take; it takes "
                             f"{', '.join(required + optional)}")
        if key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"{owner}.truncate={value!r} is not allowed: true or false")
        elif key == "original_max_position_embeddings":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.{key}={value!r} is not allowed: a positive integer (the pretraining length)")
        elif value is not None and (not is_finite_number(value) or not 0 < value <= MAX_ROPE_NUMBER):
            raise ValueError(f"{owner}.{key}={value!r} is not allowed: a number in (0, {MAX_ROPE_NUMBER:g}]")
        elif value is None and key in required:
            raise ValueError(f"{owner}.{key}=None is not allowed: a finite number > 0")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{owner}: high_freq_factor={scaling['high_freq_factor']} must be greater than "
                         f"low_freq_factor={scaling['low_freq_factor']}")


_MLA_RULES: dict[str, _Rule] = {
    "q_lora_rank": (lambda v: v >= 1, "None (a plain q_proj) or a positive integer (the query's low-rank width)"),
    "kv_lora_rank": _positive_int(),
    "qk_nope_head_dim": (lambda v: v >= 0, "an integer >= 0 (each head's query/key dimensions without RoPE)"),
    "qk_rope_head_dim": (lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (each head's rotated dimensions)"),
    "v_head_dim": _positive_int(),
    "latent_norm_eps": (lambda v: 0 < v < 1, "a finite number in (0, 1)"),
}


@dataclass
class MLAConfig(_DictMixin):
    """Multi-head latent attention (DeepSeek-V2/V3), with transformers' `DeepseekV3Config` names.

    Queries come from `q_proj`, or with `q_lora_rank` from `q_b_proj(norm(q_a_proj(x)))`; keys and values from one
    RMS-normalised latent of width `kv_lora_rank` (`kv_b_proj`), except the `qk_rope_head_dim` rotated key
    dimensions, which are one vector shared by every head. `latent_norm_eps` is the latents' RMSNorm epsilon
    (transformers builds those norms with its default, 1e-6, not `rms_norm_eps`).
    """

    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    latent_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_fields(self, "MLAConfig", _MLA_RULES)

    @property
    def qk_head_dim(self) -> int:
        """Each head's query/key width: nope + rope dimensions."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class ModelConfig(_DictMixin):
    """A decoder-only language model whose FFNs are MoE layers (or dense when `moe` is None).

    Names follow HF configs: `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`
    (grouped-query attention; None = as many as query heads), `intermediate_size` (the dense FFN
    width, used by dense layers), `first_k_dense_replace` (DeepSeek: the first k layers stay
    dense) and `moe_layer_freq` (MoE in every n-th layer after those; 1 = every layer).
    """

    vocab_size: int = 257
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int = 1024
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    head_dim: int | None = None
    qkv_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: str | None = None
    clip_qkv: float | None = None
    partial_rotary_factor: float = 1.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_sinks: bool = False
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        for name, cls in (("mla", MLAConfig), ("moe", MoEConfig)):
            if isinstance(getattr(self, name), dict):
                try:
                    setattr(self, name, cls.from_dict(getattr(self, name)))
                except ValueError as error:
                    raise ValueError(f"ModelConfig.{name}: {error}") from None
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for a field of the wrong type or range, or an impossible combination of fields."""

        def fail(name: str, value: Any, allowed: str) -> None:
            raise ValueError(f"ModelConfig.{name}={value!r} is not allowed: {allowed}")

        _check_fields(self, "ModelConfig", _MODEL_RULES)
        layers = self.num_hidden_layers
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                fail("num_attention_heads", self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size} "
                     "(or set head_dim)")
            if (self.hidden_size // self.num_attention_heads) % 2:
                fail("num_attention_heads", self.num_attention_heads,
                     "a value giving an even head dimension (hidden_size / heads), which RoPE needs (or set head_dim)")
        kv = self.num_key_value_heads
        if kv is not None and self.num_attention_heads % kv:
            fail("num_key_value_heads", kv, f"None or a divisor of num_attention_heads={self.num_attention_heads}")
        if self.first_k_dense_replace > layers:
            fail("first_k_dense_replace", self.first_k_dense_replace, f"an integer in [0, num_hidden_layers={layers}]")
        if any(i >= layers for i in self.mlp_only_layers):
            fail("mlp_only_layers", self.mlp_only_layers, f"layer indices below num_hidden_layers={layers}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        rotary = self.rotary_dim
        if rotary < 2 or rotary % 2:
            fail("partial_rotary_factor", self.partial_rotary_factor, f"a factor giving an even rotary width >= 2 "
                 f"(head_dim {self.head_dim or self.hidden_size // self.num_attention_heads} x factor = {rotary})")
        if self.layer_types is not None:
            if len(self.layer_types) != layers:
                fail("layer_types", self.layer_types, f"None or one entry per layer ({layers})")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                fail("layer_types", self.layer_types, "sliding_attention layers only with a sliding_window")
        if self.mla is not None:
            if kv is not None and kv != self.num_attention_heads:
                fail("num_key_value_heads", kv, "None or num_attention_heads with mla (latent attention expands "
                     "one key and value per head)")
            for name, default in (("head_dim", None), ("qk_norm", None), ("clip_qkv", None),
                                  ("partial_rotary_factor", 1.0), ("attention_sinks", False)):
                if getattr(self, name) != default:
                    fail(name, getattr(self, name), f"{default!r} with mla (latent attention has no such option; "
                         "its rotated width is mla.qk_rope_head_dim)")
            if self.qkv_bias != self.o_proj_bias:
                fail("o_proj_bias", self.o_proj_bias, "equal to qkv_bias with mla (DeepSeek's attention_bias puts a "
                     "bias on q_a_proj, kv_a_proj_with_mqa and o_proj together)")
        if self.moe is not None and self.moe.hidden_size != self.hidden_size:
            fail("moe.hidden_size", self.moe.hidden_size, f"equal to hidden_size={self.hidden_size}")

    @property
    def attention_head_dim(self) -> int:
        """Width of one (grouped-query) attention head: `head_dim`, or hidden_size / num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head RoPE rotates (MLA: `qk_rope_head_dim`)."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.attention_head_dim * self.partial_rotary_factor)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `num_key_value_heads`, or as many as query heads when None."""
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        """True when layer `index` (0-based) uses an MoE FFN."""
        if self.moe is None or index < self.first_k_dense_replace or index in self.mlp_only_layers:
            return False
        return (index - self.first_k_dense_replace) % self.moe_layer_freq == 0

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index`'s attention, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[index] != "sliding_attention":
            return None
        return self.sliding_window


_HF_MODEL_RULES: dict[str, _Rule] = {
    "hf_config": (lambda v: isinstance(v.get("model_type"), str),
                  "the config.json mapping of a transformers model (with its model_type)"),
    "router_aux_loss_coef": (lambda v: v is None or v >= 0, "None (the checkpoint's router_aux_loss_coef) or >= 0"),
    "router_z_loss_coef": (lambda v: v >= 0, "a number >= 0"),
    "seq_aux_loss_coef": (lambda v: v >= 0, "a number >= 0"),
    "aux_free_bias_update_rate": (lambda v: v is None or v >= 0,
                                  "None (0.001 where the family has a selection bias, else 0) or >= 0"),
    "experts_implementation": (lambda v: bool(v.strip()), "a transformers experts implementation, e.g. 'moekit'"),
}


#: the fields of an HFModelConfig a run may set (its balancing); `--set model.X=...` reaches them directly
HF_BALANCE_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "seq_aux_loss_coef", "aux_free_bias_update_rate",
                     "experts_implementation")


@dataclass
class HFModelConfig(_DictMixin):
    """The model section of a run trained with `train.backend="transformers"`: transformers' own class.

    `hf_config` is the checkpoint's config.json as transformers writes it; the run builds the model from it (and
    from its checkpoints on resume), never from the folder again. The balancing fields are moekit's terms on the
    routing recorded from the model (`moekit.hf.RoutingCapture`), whatever the family's `output_router_logits`
    says: `router_aux_loss_coef` weights the Switch loss E * sum_i f_i P_i (1 at balance; transformers' value
    for the same routing is k times it), `router_z_loss_coef` the router z-loss, `seq_aux_loss_coef` DeepSeek-V3's
    sequence-wise loss, and `aux_free_bias_update_rate` the sign update of the family's selection bias
    (`e_score_correction_bias`) after each optimiser step.
    """

    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    aux_free_bias_update_rate: float | None = None
    experts_implementation: str = "moekit"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for a field of the wrong type or range."""
        _check_fields(self, "HFModelConfig", _HF_MODEL_RULES, ints_to_float=True)

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    def text_value(self, name: str, default: Any = None) -> Any:
        """A field of the text config (`text_config` of a multimodal checkpoint, else the config itself)."""
        text = self.hf_config.get("text_config") or self.hf_config
        return text.get(name, self.hf_config.get(name, default))

    @property
    def vocab_size(self) -> int:
        return int(self.text_value("vocab_size"))

    @property
    def max_position_embeddings(self) -> int | None:
        value = self.text_value("max_position_embeddings")
        return int(value) if value is not None else None
