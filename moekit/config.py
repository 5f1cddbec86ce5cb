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
EXPERT_BACKENDS = ("auto", "loop", "bmm", "grouped_mm")

# Routers whose top-k selection can use the aux-loss-free bias (the bias only selects).
_BIAS_ROUTERS = ("topk", "switch", "deepseek_v3")
# Routers that can limit each token's experts to a few devices (DeepSeek-V3's node-limited routing).
_DEVICE_LIMITED_ROUTERS = ("topk", "deepseek_v3")
# Routers whose every output mixes several tokens of a sequence (not causal as such).
_TOKEN_MIXING_ROUTERS = ("expert_choice", "soft")


# Names users bring from other libraries, mapped to ours (difflib alone misses the short ones).
_ALIASES = {"learning_rate": "lr", "num_experts": "num_local_experts", "n_routed_experts": "num_local_experts",
            "top_k": "num_experts_per_tok", "experts_per_token": "num_experts_per_tok", "steps": "max_steps",
            "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size"}


def _refuse_unknown(owner: str, values: dict[str, Any], known: list[str]) -> None:
    """Raise for the first key of `values` not in `known`, suggesting the likely intended field."""
    for key in values:
        if key not in known:
            guess = _ALIASES.get(key) if _ALIASES.get(key) in known else None
            close = [guess] if guess else difflib.get_close_matches(key, sorted(known), n=1)
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
        _refuse_unknown(cls.__name__, values, [f.name for f in dataclasses.fields(cls)])  # type: ignore[arg-type]
        return cls(**values)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{name}={value!r} is not allowed: {allowed}")


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
    expert_devices: int = 1
    max_devices_per_token: int | None = None

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

        if not isinstance(self.expert_devices, int) or isinstance(self.expert_devices, bool) \
                or self.expert_devices < 1 or E % self.expert_devices:
            _fail("expert_devices", self.expert_devices, f"a positive divisor of num_local_experts={E} (the "
                  "expert-parallel size the experts are split over)")
        if self.max_devices_per_token is not None:
            M, D = self.max_devices_per_token, self.expert_devices
            if self.router not in _DEVICE_LIMITED_ROUTERS:
                _fail("max_devices_per_token", M, f"None for router={self.router!r}; device-limited routing "
                      f"applies to {_DEVICE_LIMITED_ROUTERS}")
            if not isinstance(M, int) or isinstance(M, bool) or not 1 <= M <= D:
                _fail("max_devices_per_token", M, f"None or an integer in [1, expert_devices={D}]; set "
                      "expert_devices to the expert-parallel size first")
            if k > M * (E // D):
                _fail("max_devices_per_token", M, f"at least {math.ceil(k / (E // D))}: M devices hold "
                      f"M * {E // D} experts, fewer than num_experts_per_tok={k}")

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
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for any impossible combination of fields."""

        def fail(name: str, value: Any, allowed: str) -> None:
            raise ValueError(f"ModelConfig.{name}={value!r} is not allowed: {allowed}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            fail("num_attention_heads", self.num_attention_heads,
                 "a value giving an even head dimension (hidden_size / heads), which RoPE needs")
        kv = self.num_key_value_heads
        if kv is not None and (not isinstance(kv, int) or kv < 1 or self.num_attention_heads % kv):
            fail("num_key_value_heads", kv, f"None or a divisor of num_attention_heads={self.num_attention_heads}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", self.first_k_dense_replace,
                 f"an integer in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.moe is not None and self.moe.hidden_size != self.hidden_size:
            fail("moe.hidden_size", self.moe.hidden_size, f"equal to hidden_size={self.hidden_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        """True when layer `index` (0-based) uses an MoE FFN."""
        if self.moe is None or index < self.first_k_dense_replace:
            return False
        return (index - self.first_k_dense_replace) % self.moe_layer_freq == 0



@dataclass
class TrainConfig:
    """How `moekit train` trains: data, optimiser, schedule, evaluation and checkpointing.

    `init_from` names a Hugging Face checkpoint folder (what `moekit merge` or `moekit upcycle` writes, or any
    mixtral / qwen2_moe / glm4_moe / llama folder `moekit.interop.load_hf` reads) to start from instead of random
    weights. Its `tokenizer.json` is then the tokenizer: `tokenizer` becomes "hf" ("byte" is replaced, since
    it is the default; "bpe" is refused, because the model's embedding rows are the folder tokenizer's ids).
    """

    seed: int = 0
    data: str | None = None  # None = the embedded Shakespeare corpus; else a text file or folder
    init_from: str | None = None  # None = random initialisation; else an HF checkpoint folder (see above)
    tokenizer: str = "byte"  # "byte", "bpe" (trained locally with `tokenizers`) or "hf" (init_from's tokenizer.json)
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.05
    block_size: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    checkpoint_interval: int = 100
    dtype: str = "auto"  # "auto" (bf16 autocast where the device supports it well), "float32", "bfloat16"
    device: str = "auto"  # "auto", "cpu", "cuda"
    expert_parallel: int = 1  # ranks that share each layer's experts (`--ep`, under torchrun); the rest is DP

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for an impossible setting."""

        def fail(name: str, value: Any, allowed: str) -> None:
            raise ValueError(f"TrainConfig.{name}={value!r} is not allowed: {allowed}")

        for name in ("block_size", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                     "log_interval", "checkpoint_interval", "bpe_vocab_size", "expert_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "a positive integer")
        if self.warmup_steps < 0:
            fail("warmup_steps", self.warmup_steps, "an integer >= 0")
        if self.init_from is not None:
            if not isinstance(self.init_from, str) or not self.init_from.strip():
                fail("init_from", self.init_from, "None or the path of a Hugging Face checkpoint folder")
            if self.tokenizer == "bpe":
                fail("tokenizer", self.tokenizer, "'hf' with init_from: the model's embedding rows are the ids of "
                     "the tokenizer.json in init_from, so a newly trained tokenizer cannot be used")
            self.tokenizer = "hf"  # the default "byte" means "whatever the model brings" here
        if self.tokenizer not in ("byte", "bpe", "hf"):
            fail("tokenizer", self.tokenizer, "'byte', 'bpe' or 'hf'")
        if self.tokenizer == "hf" and self.init_from is None:
            fail("tokenizer", self.tokenizer, "'byte' or 'bpe' ('hf' is the tokenizer.json of train.init_from; "
                 "set --set train.init_from=DIR)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            fail("dtype", self.dtype, "'auto', 'float32' or 'bfloat16'")
        if self.device not in ("auto", "cpu", "cuda"):
            fail("device", self.device, "'auto', 'cpu' or 'cuda'")
        if not 0.0 < self.val_fraction < 0.5:
            fail("val_fraction", self.val_fraction, "a number in (0, 0.5)")
        if not self.lr > 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("lr", self.lr, "lr > 0 and min_lr_ratio in [0, 1]")


@dataclass
class RunConfig:
    """Everything a training run needs: a name, the model and the training settings."""

    name: str = "run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    allow_token_mixing: bool = False  # opt in to Soft MoE in a causal LM (it leaks future tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {"name", "model", "train", "allow_token_mixing"}
        for key in values:
            if key not in known:
                raise ValueError(f"run config has no section {key!r}; expected {sorted(known)}")
        train = dict(values.get("train") or {})
        _refuse_unknown("TrainConfig", train, [f.name for f in dataclasses.fields(TrainConfig)])
        return cls(name=str(values.get("name", "run")), model=ModelConfig.from_dict(dict(values.get("model") or {})),
                   train=TrainConfig(**train), allow_token_mixing=bool(values.get("allow_token_mixing", False)))


def _parse_value(text: str) -> Any:
    """'16' -> 16, '1e-3' -> 0.001, 'true' -> True, 'null' -> None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `KEY=VALUE` overrides (dotted keys, e.g. `model.moe.num_local_experts=16`) to a config dict.

    `model.X` where X is an MoE field is read as `model.moe.X`, so `--set model.num_local_experts=16`
    works as users expect. Unknown keys are refused later by the dataclasses with a suggestion.
    """
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE; e.g. --set model.moe.num_local_experts=16")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 2 and parts[0] == "model" and parts[1] in moe_fields and parts[1] not in model_fields:
            parts = ["model", "moe", parts[1]]
        node = values
        for part in parts[:-1]:
            if node.get(part) is None:
                if parts[:2] == ["model", "moe"] and part == "moe":
                    raise ValueError(f"override {item!r}: this preset is dense (model.moe is null); "
                                     "choose an MoE preset to set MoE fields")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = _parse_value(raw)
    return values
