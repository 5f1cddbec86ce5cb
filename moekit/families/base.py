"""What a Hugging Face architecture is, for moekit: the `Family` base class and the config helpers families share.

A family module (``moekit/families/mixtral.py`` ...) subclasses `Family` and declares, in one place:

- `model_type`, `architecture` (the transformers class `AutoModelForCausalLM` builds) and `defaults` (the
  transformers config class's values for keys a ``config.json`` may leave out);
- the config mapping both ways: `read_config` (a ``config.json`` dict -> the `ModelConfig` computing the same
  function, refusing anything moekit cannot compute exactly) and `write_config` (a `ModelConfig` the family can
  express -> ``config.json`` fields), with `problems` saying why a `ModelConfig` cannot be expressed;
- which layers are MoE (inside `read_config` / `write_config`: each family's own keys);
- the tensor map as data: the MoE block's tensor names (`block_names`, moekit name -> transformers name, both
  relative to the block), value transforms where layouts differ (`block_transforms`), where the block sits in a
  decoder layer (`hf_block`) and how per-expert checkpoints store experts (`expert_files`); every other tensor is
  ``model.`` + moekit's name, since moekit's model uses transformers' names;
- the transformers MoE block classes it reads (`block_classes`) and how a block instance's routing settings map
  to a `MoEConfig` (`block_config`), for `MoELayer.from_hf`.

`moekit.families.tensor_map` runs the tensor map in both directions; `moekit.interop` (load, export, merge,
upcycle), `moekit.model.info` and `MoELayer.from_hf` use families only through this interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..config import ModelConfig, MoEConfig, is_finite_number

if TYPE_CHECKING:
    from torch import Tensor, nn

_MISSING = object()


@dataclass(frozen=True)
class Transform:
    """The same values in moekit's layout and in the family's: `to_moekit` and `to_hf` undo each other."""

    to_moekit: Callable[[Tensor], Tensor]
    to_hf: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ExpertFiles:
    """How a per-expert checkpoint stores one layer's experts (what transformers' conversion mapping fuses).

    Expert e's projections are ``model.layers.{i}.{block}.experts.{e}.{gate|up|down}.weight``; fused in memory they
    are ``experts.gate_up_proj`` (gate rows, then up rows) and ``experts.down_proj``.
    """

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


class StateSource(Protocol):
    """moekit tensors by name, read on demand (a model's state dict, or a merge's inputs)."""

    def get(self, name: str) -> Tensor: ...

    def get_expert(self, name: str, expert: int) -> Tensor: ...


class DictSource:
    """A `StateSource` over a state dict."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state

    def get(self, name: str) -> Tensor:
        return self.state[name]

    def get_expert(self, name: str, expert: int) -> Tensor:
        return self.state[name][expert]


class MappedSource:
    """`source` with some tensors changed (`change`: name -> function of the tensor, applied to expert slices too, so
    only slice-wise functions such as scaling belong there) and some added (`add`: name -> function making it)."""

    def __init__(self, source: StateSource, change: dict[str, Callable[[Tensor], Tensor]] | None = None,
                 add: dict[str, Callable[[], Tensor]] | None = None) -> None:
        self.source, self.change, self.add = source, change or {}, add or {}

    def get(self, name: str) -> Tensor:
        if name in self.add:
            return self.add[name]()
        tensor = self.source.get(name)
        return self.change[name](tensor) if name in self.change else tensor

    def get_expert(self, name: str, expert: int) -> Tensor:
        if name in self.add:
            return self.add[name]()[expert]
        tensor = self.source.get_expert(name, expert)
        return self.change[name](tensor) if name in self.change else tensor


class Family:
    """One Hugging Face architecture (see the module docstring). Subclasses set the class attributes."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    is_moe: ClassVar[bool] = True
    #: values of the transformers config class for keys a config.json may omit (checked against transformers in tests)
    defaults: ClassVar[dict[str, Any]] = {}
    #: other spellings of a config key (transformers' `attribute_map`: alias -> the attribute it stands for)
    aliases: ClassVar[dict[str, str]] = {}
    #: the attribute of a decoder layer holding the FFN (dense or MoE) in transformers' module tree
    hf_block: ClassVar[str] = "mlp"
    #: MoE block tensors: moekit name -> transformers name, both relative to the block
    block_names: ClassVar[dict[str, str]] = {}
    #: moekit block name -> how its values differ from the transformers tensor's
    block_transforms: ClassVar[dict[str, Transform]] = {}
    #: per-expert checkpoint layout, or None when checkpoints store the fused tensors (GPT-OSS)
    expert_files: ClassVar[ExpertFiles | None] = ExpertFiles()
    #: the transformers MoE block classes this family reads, as "module.ClassName"
    block_classes: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ config
    def read_config(self, hf: dict[str, Any], where: str) -> ModelConfig:  # pragma: no cover - abstract
        """The `ModelConfig` computing what transformers computes for this ``config.json`` dict.

        Raises:
            ValueError: a setting moekit cannot compute exactly, naming it and what is supported.
        """
        raise NotImplementedError

    def write_config(self, config: ModelConfig) -> dict[str, Any]:  # pragma: no cover - abstract
        """The ``config.json`` fields (without dtype, token ids and metadata) of `config`; call `problems` first."""
        raise NotImplementedError

    def problems(self, config: ModelConfig) -> list[str]:
        """Why this family cannot express `config` exactly (empty when it can)."""
        return []

    # ------------------------------------------------------------------ export and its inverse
    def export_config(self, config: ModelConfig) -> ModelConfig:
        """The config this family writes for `config`: one it expresses natively that computes the same function
        (from the tensors `export_source` gives). Call `problems` first."""
        return canonical(config)

    def export_source(self, config: ModelConfig, source: StateSource) -> StateSource:
        """`config`'s tensors as `export_config(config)`'s model holds them.

        Raises:
            ValueError: a tensor value the family cannot hold (a nonzero selection bias where it has none...).
        """
        return source

    def restore(self, stored: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Undo `export_source`: the state of `export_config(stored)`'s model -> `stored`'s model's state.

        Raises:
            ValueError: the state is not what an export of `stored` writes (so `stored` does not describe it).
        """
        return state

    # ------------------------------------------------------------------ tensors that need more than a renaming
    def extra_tensors(self, config: ModelConfig) -> dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]]:
        """Tensors the family's checkpoint must hold that moekit's model has no place for (zero-width parts)."""
        return {}

    def ignorable_tensors(self, config: ModelConfig) -> dict[str, bool]:
        """Checkpoint tensors moekit may drop for this config: name -> True if they must be all zeros to be dropped
        (they would change the output otherwise), False if they never change it (they multiply a width-0 part)."""
        return {}

    def ignorable_block_tensors(self, moe: MoEConfig) -> dict[str, bool]:
        """`ignorable_tensors` for one transformers MoE block (names relative to the block)."""
        return {}

    # ------------------------------------------------------------------ transformers blocks
    def block_config(self, block: nn.Module) -> MoEConfig:  # pragma: no cover - abstract
        """The `MoEConfig` of a transformers MoE block instance of one of `block_classes` (its routing settings)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.model_type}>"


# ================================================================================================ config reading
@dataclass
class HFConfig:
    """A ``config.json`` dict read for one family: defaults filled in, refusals that name the setting."""

    values: dict[str, Any]
    family: Family
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


# ================================================================================================ what a family holds
_UNEXPORTABLE_ROUTERS = {
    "noisy_topk": "noisy top-k gating with a learned noise projection (in eval mode it computes a renormalised "
                  "softmax top-k: for inference only, copy router.weight into a router='topk' model)",
    "expert_choice": "expert-choice routing, where each expert picks its tokens across the batch",
    "soft": "Soft MoE, whose expert slots average the tokens of a sequence",
    "hierarchical": "two-level gating, a softmax over groups times a softmax inside each chosen group",
}


def universal_problems(moe: MoEConfig) -> list[str]:
    """What no transformers architecture computes, whatever the family."""
    problems = []
    if moe.router in _UNEXPORTABLE_ROUTERS:
        problems.append(f"router={moe.router!r} ({_UNEXPORTABLE_ROUTERS[moe.router]}) cannot be exported: no "
                        "transformers architecture computes it, so no Hugging Face checkpoint would reproduce this "
                        "model's outputs; the routers that export are 'topk', 'switch' and 'deepseek_v3'")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor={moe.capacity_factor} drops the tokens over an expert's capacity, which no "
                        "transformers architecture computes; export a dropless model (capacity_factor=None)")
    if moe.max_devices_per_token is not None and moe.max_devices_per_token < moe.expert_devices:
        problems.append(f"max_devices_per_token={moe.max_devices_per_token} (device-limited routing over "
                        f"expert_devices={moe.expert_devices} blocks) changes which experts a token gets, and no "
                        "transformers architecture computes it")
    if moe.hidden_act == "gelu":
        problems.append("hidden_act='gelu' experts (a plain GELU FFN) have no transformers MoE counterpart")
    return problems


def attention_problems(config: ModelConfig, name: str, *, qkv_bias: bool = False, o_proj_bias: bool = False,
                       qk_norm: tuple[str, ...] = (), clip_qkv: bool = False, partial_rotary: bool = False,
                       rope_interleave: bool = False, windows: str = "none", sinks: bool = False,
                       head_dim: bool = True, mla: bool = False, tied_biases: bool = False) -> list[str]:
    """What `name`'s attention cannot hold of `config` (each flag: the family has that feature).

    `windows`: "none", "all" (one window for every layer) or "per_layer" (layer_types). `tied_biases`: the family
    has one attention_bias flag for q, k, v and o together (Llama, Qwen3, OLMoE, GPT-OSS).
    """
    problems = []
    if config.mla is not None and not mla:
        problems.append(f"{name} has standard attention, this model multi-head latent attention (mla)")
    if config.mla is None and mla:
        problems.append(f"{name} has multi-head latent attention (MLA: keys and values come from an RMS-normalised "
                        "low-rank latent and one rotary key is shared by all heads), which this model's standard "
                        "attention cannot be written into exactly")
    if config.qkv_bias and not qkv_bias:
        problems.append(f"this model's attention has q/k/v biases, which {name} attention lacks")
    if config.o_proj_bias and not o_proj_bias:
        problems.append(f"this model's attention has an o_proj bias, which {name} attention lacks")
    if tied_biases and config.qkv_bias != config.o_proj_bias:
        problems.append(f"{name}'s attention_bias puts biases on q, k, v and o together (this model: qkv_bias="
                        f"{config.qkv_bias}, o_proj_bias={config.o_proj_bias})")
    if config.qk_norm is not None and config.qk_norm not in qk_norm:
        kind = "per head" if config.qk_norm == "head" else "over the whole projections"
        problems.append(f"this model normalises queries and keys {kind} (q_norm/k_norm, qk_norm={config.qk_norm!r}), "
                        f"which {name} attention lacks")
    if config.clip_qkv is not None and not clip_qkv:
        problems.append(f"{name} attention does not clamp q/k/v (this model: clip_qkv={config.clip_qkv})")
    if config.partial_rotary_factor != 1.0 and not partial_rotary:
        problems.append(f"{name} rotates whole heads (this model: partial_rotary_factor="
                        f"{config.partial_rotary_factor})")
    if config.rope_interleave and not rope_interleave:
        problems.append(f"{name} has no interleaved RoPE (this model: rope_interleave=True)")
    if config.attention_sinks and not sinks:
        problems.append(f"{name} attention has no sinks (this model: attention_sinks=True)")
    if config.head_dim is not None and not head_dim:
        problems.append(f"{name} derives head_dim from hidden_size / num_attention_heads (this model: head_dim="
                        f"{config.head_dim})")
    if config.sliding_window is not None:
        per_layer = config.layer_types is not None and len(set(config.layer_types)) > 1
        if windows == "none":
            problems.append(f"{name} has no sliding-window attention (this model: sliding_window="
                            f"{config.sliding_window})")
        elif windows == "all" and per_layer:
            problems.append(f"{name}'s sliding window applies to every layer (this model's layer_types mix full and "
                            "sliding attention)")
    return problems


def dense_problems(config: ModelConfig, name: str) -> list[str]:
    """A dense family holds no MoE layer."""
    if config.moe is not None and any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        return [f"{name} has no experts, and this model has MoE layers"]
    return []


def moe_problems(config: ModelConfig, name: str, *, scoring: str = "softmax", norm_topk_prob: bool | None = None,
                 shared: str = "none", groups: bool = False, router_bias: bool = False, expert_bias: bool = False,
                 activation: str = "silu", selection_bias: bool = False, scaling: bool = True,
                 every_layer: bool = False, first_dense: bool = False) -> list[str]:
    """What `name`'s MoE cannot hold of `config`'s.

    `norm_topk_prob`: the family's fixed value, or None when configurable; `shared`: "none", "plain" (always on,
    no gate) or "gated" (a sigmoid gate, Qwen2-MoE; an ungated expert is written with a zero gate); `scaling`:
    routed_scaling_factor is expressible (natively, or folded into the experts for softmax scores);
    `every_layer` / `first_dense`: the family's MoE layers are all layers / all after the first dense ones.
    """
    moe = config.moe
    layers = moe_layers(config)
    if moe is None or not layers:
        return [f"{name} is an MoE architecture and this model is dense"]
    problems = universal_problems(moe)
    if moe.scoring_func != scoring:
        problems.append(f"{name} scores experts with a {scoring}, this model with scoring_func={moe.scoring_func!r}")
    if norm_topk_prob is not None and moe.resolved_norm_topk_prob != norm_topk_prob:
        problems.append(f"{name} {'always' if norm_topk_prob else 'never'} renormalises the top-k weights, this "
                        f"model has norm_topk_prob={moe.resolved_norm_topk_prob}")
    if moe.n_shared_experts and shared == "none":
        problems.append(f"{name} has no shared experts")
    if moe.shared_expert_gate and shared != "gated":
        problems.append(f"{name} adds its shared experts without a gate (this model: shared_expert_gate=True)")
    if not groups and moe.router == "deepseek_v3" and moe.n_group > 1 and moe.topk_group < moe.n_group \
            and moe.num_local_experts // moe.n_group >= 2:
        problems.append(f"{name} has no group-limited routing (this model: n_group={moe.n_group}, topk_group="
                        f"{moe.topk_group})")
    if moe.router_bias and not router_bias:
        problems.append(f"{name}'s router has no logit bias (this model: router_bias=True)")
    if moe.expert_bias and not expert_bias:
        problems.append(f"{name}'s experts have no biases (this model: expert_bias=True)")
    if moe.hidden_act != activation and moe.hidden_act != "gelu":
        problems.append(f"{name}'s experts use {activation!r}, this model's {moe.hidden_act!r}")
    if moe.uses_aux_free_bias and not selection_bias and moe.router == "deepseek_v3":
        problems.append(f"{name} has no selection bias (e_score_correction_bias), which router='deepseek_v3' keeps")
    if moe.routed_scaling_factor != 1.0 and not scaling:
        problems.append(f"{name} has no routed_scaling_factor (this model: {moe.routed_scaling_factor})")
    if every_layer:
        dense = [i for i in range(config.num_hidden_layers) if i not in layers]
        if dense:
            problems.append(f"{name} has an MoE FFN in every layer, layers {dense} are dense")
    if first_dense and layers != list(range(config.num_hidden_layers - len(layers), config.num_hidden_layers)):
        problems.append(f"{name}'s dense layers are the first first_k_dense_replace layers, this model's MoE layers "
                        f"are {layers}")
    return problems


# ================================================================================================ equal functions
#: MoEConfig fields that change how a model trains, not what it computes in eval mode
TRAINING_MOE_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "importance_loss_coef", "load_loss_coef",
                       "seq_aux_loss_coef", "aux_free_bias_update_rate", "router_jitter_noise", "expert_backend",
                       "expert_devices")


def canonical(config: ModelConfig) -> ModelConfig:
    """`config` with every choice that does not change the function written one way: Switch as top-1 without
    renormalisation, `norm_topk_prob` and the shared width resolved, the MoE layers as `layer_pattern` writes
    them, `head_dim` None when it is hidden_size / heads. Training settings are kept."""
    changes: dict[str, Any] = {**moe_pattern_fields(config), "num_key_value_heads": config.kv_heads}
    if config.head_dim is not None and config.head_dim * config.num_attention_heads == config.hidden_size:
        changes["head_dim"] = None
    if config.layer_types is not None and len(set(config.layer_types)) == 1:
        changes["layer_types"] = None
        if config.layer_types[0] == "full_attention":
            changes["sliding_window"] = None
    moe = config.moe
    if moe is not None:
        moe_changes: dict[str, Any] = {"norm_topk_prob": moe.resolved_norm_topk_prob,
                                       "shared_expert_intermediate_size": moe.resolved_shared_intermediate_size or None}
        if moe.router == "switch":
            moe_changes["router"] = "topk"
        changes["moe"] = moe.replace(**moe_changes)
    return ModelConfig(**{**config.to_dict(), **{k: v.to_dict() if isinstance(v, MoEConfig) else v
                                                 for k, v in changes.items()}})


def function_key(config: ModelConfig) -> dict[str, Any]:
    """What determines `config`'s eval-mode function, as a dict: two configs with equal keys compute the same
    function from the same weights (training settings, `initializer_range` and unused widths left out)."""
    values = canonical(config).to_dict()
    values.pop("initializer_range")
    moe = values.get("moe")
    if moe is not None:
        for name in TRAINING_MOE_FIELDS:
            moe.pop(name)
        moe["selection_bias"] = config.moe.uses_aux_free_bias if config.moe is not None else False
    if not any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        values.pop("intermediate_size")  # no dense layer uses it
    return values


def function_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The fields where `a` and `b` compute different functions, as "name: a vs b" texts."""
    ka, kb = function_key(a), function_key(b)
    out = []
    for key in sorted(set(ka) | set(kb)):
        if key == "moe" and isinstance(ka.get(key), dict) and isinstance(kb.get(key), dict):
            out += [f"moe.{k}: {ka[key].get(k)!r} vs {kb[key].get(k)!r}" for k in sorted(set(ka[key]) | set(kb[key]))
                    if ka[key].get(k) != kb[key].get(k)]
        elif ka.get(key) != kb.get(key):
            out.append(f"{key}: {ka.get(key)!r} vs {kb.get(key)!r}")
    return out


# ================================================================================================ shared MoE behaviour
def _replace_moe(config: ModelConfig, **changes: Any) -> ModelConfig:
    assert config.moe is not None
    return dataclasses.replace(config, moe=config.moe.replace(**changes))


def zero_selection_bias(config: ModelConfig, source: StateSource, family: str) -> None:
    """Refuse a nonzero aux-free selection bias for a family that has none (a zero one selects nothing)."""
    assert config.moe is not None
    if not config.moe.uses_aux_free_bias:
        return
    nonzero = [i for i in moe_layers(config)
               if bool(source.get(f"layers.{i}.mlp.router.e_score_correction_bias").ne(0).any())]
    if nonzero:
        raise ValueError(f"{family} has no selection bias (e_score_correction_bias), which is nonzero in layers "
                         f"{nonzero}")


class SoftmaxMoE(Family):
    """MoE families whose router is a softmax top-k (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS).

    They have no selection bias (a zero one is dropped; a nonzero one refused) and no `routed_scaling_factor`:
    moekit's factor multiplies every routed expert's output, so it is folded into the experts' `down_proj` (and
    its bias) on export and taken out again by `restore`.
    """

    def export_config(self, config: ModelConfig) -> ModelConfig:
        config = canonical(config)
        if config.moe is None:
            return config
        return _replace_moe(config, aux_free_bias_update_rate=0.0, routed_scaling_factor=1.0)

    def export_source(self, config: ModelConfig, source: StateSource) -> StateSource:
        moe = config.moe
        if moe is None:
            return source
        zero_selection_bias(config, source, self.architecture)
        factor = moe.routed_scaling_factor
        if factor == 1.0:
            return source
        change = {}
        for i in moe_layers(config):
            change[f"layers.{i}.mlp.experts.down_proj"] = lambda t: t.float() * factor
            if moe.expert_bias:
                change[f"layers.{i}.mlp.experts.down_proj_bias"] = lambda t: t.float() * factor
        return MappedSource(source, change)

    def restore(self, stored: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        moe = stored.moe
        if moe is None:
            return state
        import torch

        state = dict(state)
        for i in moe_layers(stored):
            layer = f"layers.{i}.mlp"
            if moe.routed_scaling_factor != 1.0:
                for name in (f"{layer}.experts.down_proj", f"{layer}.experts.down_proj_bias"):
                    if name in state:
                        state[name] = (state[name].float() / moe.routed_scaling_factor).to(state[name].dtype)
            if moe.uses_aux_free_bias:
                state[f"{layer}.router.e_score_correction_bias"] = torch.zeros(moe.num_local_experts)
        return state


def block_expert_dims(block: nn.Module, fused: str = "experts.gate_up_proj", per_expert: str = "gate_proj",
                      transposed: bool = False) -> tuple[int, int, int]:
    """(experts, hidden, expert width) of a transformers MoE block, fused (transformers 5) or per expert (4.x)."""
    state = block.state_dict()
    if fused in state:
        experts, a, b = state[fused].shape
        hidden, two_i = (a, b) if transposed else (b, a)
        return experts, hidden, two_i // 2
    count = 0
    while f"experts.{count}.{per_expert}.weight" in state:
        count += 1
    if count == 0:
        raise ValueError(f"{type(block).__name__}: no expert tensors found ({fused} or experts.0.{per_expert}.weight)")
    inner, hidden = state[f"experts.0.{per_expert}.weight"].shape
    return count, hidden, inner


def silu_act(module: object, what: str) -> None:
    """Refuse an activation other than SiLU (moekit's SwiGLU) for `what` ("expert", "shared expert")."""
    name = type(module).__name__.lower()
    if "silu" not in name and "swish" not in name:
        raise ValueError(f"the {what} activation {type(module).__name__} is not supported; moekit's gated experts "
                         "use SiLU (SwiGLU)")


def zero_width_mlp(prefix: str, hidden: int) -> dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]]:
    """The tensors of a width-0 SwiGLU MLP at `prefix` (``...shared_expert``): what transformers builds for a
    missing shared expert (its output is exactly 0)."""
    import torch

    return {f"{prefix}.gate_proj.weight": ((0, hidden), lambda: torch.zeros(0, hidden)),
            f"{prefix}.up_proj.weight": ((0, hidden), lambda: torch.zeros(0, hidden)),
            f"{prefix}.down_proj.weight": ((hidden, 0), lambda: torch.zeros(hidden, 0))}


def experts_activation(experts: nn.Module) -> object:
    """The activation module of a transformers experts module (fused, or a 4.x list of expert MLPs)."""
    if hasattr(experts, "act_fn"):
        return experts.act_fn
    first = experts[0] if len(experts) else None
    return getattr(first, "act_fn", None)
