"""A family's config.json, read and written: defaults and aliases filled in, refusals naming the setting.

`HFConfig` wraps a ``config.json`` dict for one family (its `defaults` for omitted keys, its `aliases` for other
spellings); the readers and writers here (`read_common`, `read_rope`, `read_layer_types`...) are what several
families share, each family module adding its own keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import ModelConfig, is_finite_number


class FamilyKeys(Protocol):
    """What reading a config.json needs of a family (`moekit.families.base.Family` has it)."""

    model_type: str
    defaults: dict[str, Any]
    aliases: dict[str, str]

_MISSING = object()


@dataclass
class HFConfig:
    """A ``config.json`` dict read for one family: defaults filled in, refusals that name the setting."""

    values: dict[str, Any]
    family: FamilyKeys
    where: str
    used: set[str] = field(default_factory=set)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value of `key` (or of a spelling of it in the family's `aliases`): the config's, else the family's
        default, else `default` (None if not given)."""
        value = self.values.get(key)
        aliases = self.family.aliases
        for other in (aliases.get(key), *(alias for alias, real in aliases.items() if real == key)):
            if value is None and other is not None:
                value = self.values.get(other)
        if value is None:
            value = self.family.defaults.get(key)
        if value is None:
            return None if default is _MISSING else default
        return value

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.where}: config.json lacks {key!r}, which a {self.family.model_type} config "
                             "needs")
        return value

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self.need(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{self.where}: {key}={value!r} in config.json has the wrong type or range: an integer "
                             f">= {minimum}")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self.get(key, default)
        if not is_finite_number(value):
            raise ValueError(f"{self.where}: {key}={value!r} in config.json has the wrong type: a finite number")
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.where}: {key}={value!r} in config.json has the wrong type: true or false")
        return value

    def refuse(self, what: str, why: str) -> ValueError:
        """The error for a setting moekit cannot compute exactly."""
        return ValueError(f"{self.where}: {self.family.model_type} with {what} is not supported: {why}")


def read_rope(f: HFConfig, partial_default: float = 1.0) -> dict[str, Any]:
    """ModelConfig's RoPE fields (rope_theta, rope_scaling, partial_rotary_factor) from transformers' keys.

    transformers 5 writes ``rope_parameters`` (with ``rope_theta`` inside); transformers 4 wrote ``rope_theta``
    and ``rope_scaling`` beside the other keys. Both are read. ``default`` RoPE gives no scaling; linear, llama3 and
    yarn are kept with their parameters; any other type (dynamic, longrope, per-layer RoPE) is refused.
    """
    params = f.values.get("rope_scaling") or f.values.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{f.where}: rope_parameters={params!r} in config.json is not a mapping")
    layer_types = f.values.get("layer_types") or ()
    if any(key in layer_types for key in params):
        raise f.refuse("RoPE parameters per layer type", "moekit's layers share one rotary embedding")
    theta = params.get("rope_theta", f.values.get("rope_theta"))
    theta = f.family.defaults.get("rope_theta", 10000.0) if theta is None else theta
    partial = params.get("partial_rotary_factor", f.values.get("partial_rotary_factor"))
    partial = partial_default if partial is None else partial
    rope_type = params.get("rope_type", params.get("type")) or "default"
    scaling = None
    if rope_type != "default":
        from ..config import ROPE_KEYS, check_rope_scaling

        if rope_type not in ROPE_KEYS:
            raise f.refuse(f"rope_type={rope_type!r}", "moekit computes the default, linear, llama3 and yarn rotary "
                           "embeddings (dynamic and longrope ones change with the sequence length)")
        required, optional = ROPE_KEYS[rope_type]
        scaling = {"rope_type": rope_type}
        for key in (*required, *optional):
            if params.get(key) is not None:
                scaling[key] = params[key]
        if "original_max_position_embeddings" in required:
            original = (f.values.get("original_max_position_embeddings")  # beside rope_parameters: it wins
                        or params.get("original_max_position_embeddings") or f.get("max_position_embeddings"))
            scaling["original_max_position_embeddings"] = original
        ignored = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", *scaling}
        if ignored:
            raise f.refuse(f"rope parameters {sorted(ignored)} for rope_type={rope_type!r}", "moekit does not know "
                           "what they change; it reads " + ", ".join((*required, *optional)))
        try:
            check_rope_scaling(scaling, f"{f.where}: rope_parameters")
        except ValueError as error:
            raise ValueError(str(error)) from None
    return {"rope_theta": float(theta), "rope_scaling": scaling, "partial_rotary_factor": float(partial)}


def write_rope(config: ModelConfig, partial: bool = False) -> dict[str, Any]:
    """transformers' RoPE keys for `config`: ``rope_parameters`` (transformers 5) and the older spellings."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        params.update(config.rope_scaling)
    out: dict[str, Any] = {"rope_theta": config.rope_theta}
    if partial:
        params["partial_rotary_factor"] = config.partial_rotary_factor
        out["partial_rotary_factor"] = config.partial_rotary_factor
    out["rope_parameters"] = params
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(config.rope_scaling)
    return out


def read_common(f: HFConfig, *, intermediate_key: str = "intermediate_size") -> dict[str, Any]:
    """The ModelConfig fields every family reads the same way (sizes, norms, embeddings, RoPE, head width)."""
    act = f.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise f.refuse(f"hidden_act={act!r}", "moekit's FFNs are SwiGLU with SiLU")
    hidden, heads = f.integer("hidden_size", 1), f.integer("num_attention_heads", 1)
    kv = f.get("num_key_value_heads") or heads
    head_dim = f.get("head_dim")
    values: dict[str, Any] = {
        "vocab_size": f.integer("vocab_size", 1),
        "hidden_size": hidden,
        "num_hidden_layers": f.integer("num_hidden_layers", 1),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "intermediate_size": f.integer(intermediate_key, 1),
        "max_position_embeddings": f.integer("max_position_embeddings", 1),
        "rms_norm_eps": f.number("rms_norm_eps"),
        "tie_word_embeddings": f.flag("tie_word_embeddings"),
        "initializer_range": f.number("initializer_range", 0.02),
    }
    if head_dim is not None and not (hidden % heads == 0 and int(head_dim) == hidden // heads):
        values["head_dim"] = int(head_dim)
    return values


def write_common(config: ModelConfig) -> dict[str, Any]:
    """transformers' keys for the fields `read_common` reads."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.attention_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def read_layer_types(f: HFConfig, layers: int, rule: Callable[[int], bool] | None) -> dict[str, Any]:
    """ModelConfig's window fields from ``layer_types`` (or, when absent, `rule`: is layer i sliding?)."""
    types = f.values.get("layer_types")
    if types is None:
        types = ["sliding_attention" if rule is not None and rule(i) else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers:
        raise ValueError(f"{f.where}: layer_types={types!r} in config.json is not one entry per layer ({layers})")
    unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if unknown:
        raise f.refuse(f"layer_types {unknown}", "moekit's layers use full or sliding-window causal attention")
    if "sliding_attention" not in types:
        return {}
    window = f.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"{f.where}: sliding_window={window!r} in config.json is not a positive integer, and "
                         "layer_types has sliding_attention layers")
    if all(t == "sliding_attention" for t in types):
        return {"sliding_window": window}
    return {"sliding_window": window, "layer_types": list(types)}


def layer_types_of(config: ModelConfig) -> list[str]:
    """Every layer's attention kind ("full_attention" or "sliding_attention")."""
    return ["sliding_attention" if config.layer_window(i) is not None else "full_attention"
            for i in range(config.num_hidden_layers)]


def moe_layers(config: ModelConfig) -> list[int]:
    """Indices of `config`'s MoE layers."""
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


def layer_pattern(is_moe: list[bool]) -> dict[str, Any]:
    """ModelConfig's first_k_dense_replace / moe_layer_freq / mlp_only_layers giving exactly the MoE layers `is_moe`.

    The smallest description: dense first layers and MoE every n-th layer after them where that fits, with the
    exceptions listed in `mlp_only_layers`.
    """
    layers = len(is_moe)
    if not any(is_moe):
        return {}
    first = is_moe.index(True)
    best: dict[str, Any] | None = None
    for freq in range(1, layers + 1):
        pattern = [i >= first and (i - first) % freq == 0 for i in range(layers)]
        if any(not p and m for p, m in zip(pattern, is_moe, strict=True)):
            continue  # the pattern misses an MoE layer: mlp_only_layers can only remove layers
        extra = [i for i in range(layers) if pattern[i] and not is_moe[i]]
        if best is None or len(extra) < len(best["mlp_only_layers"]):
            best = {"first_k_dense_replace": first, "moe_layer_freq": freq, "mlp_only_layers": extra}
    assert best is not None  # freq 1 always fits
    return best


def moe_pattern_fields(config: ModelConfig) -> dict[str, Any]:
    """`config`'s MoE-layer fields as `layer_pattern` writes them (to compare two configs' layer choice)."""
    return layer_pattern([config.is_moe_layer(i) for i in range(config.num_hidden_layers)])


