"""Analytic size, FLOP and memory estimates for moekit models and Hugging Face MoE checkpoints.

Everything here is computed from a configuration alone (no model is built), so it works for
DeepSeek-V3-sized models on a laptop. `info_from_model_config` agrees exactly with
`sum(p.numel() for p in MoETransformer(config).parameters())`.

Conventions (shared by every entry point):

* **total_params**: every trainable parameter once (tied embeddings once). Buffers such as the
  aux-loss-free `e_score_correction_bias` are not parameters and are not counted.
* **active_params**: the parameters one token uses: of each MoE layer's E routed experts only the
  k it is sent to (token-choice routers); shared experts, routers, attention, norms, biases and the
  embeddings are all counted (embeddings once when tied). Expert-choice and Soft MoE routers have
  no fixed per-token k, so all E experts are counted there (an upper bound, as
  `MoETransformer.num_parameters(active=True)` does).
* **flops_per_token_forward**: 2 FLOPs (multiply + add) per *active matmul weight* — every weight
  matrix a token is multiplied by, including the routers and `lm_head` but excluding the embedding
  lookup, norms, biases and attention sinks — plus the attention scores and weighted values of one token
  attending to `context` positions: ``2 * 2 * num_layers * context * num_heads * head_dim`` (for MLA:
  ``2 * num_layers * context * num_heads * (qk_head_dim + v_head_dim)``). No causal halving and no sliding
  window: it is the cost of a token that attends to `context` positions. Elementwise work (activations, softmax,
  RoPE) and Soft MoE's dispatch/combine mixing are ignored.
* **train_flops_per_token**: 3 x forward (backward = 2 x forward), no activation recomputation.
* **memory_inference_bytes**: all parameters at `dtype_bytes` each (2 = bf16/fp16) plus the KV
  cache for `batch` sequences of `context` tokens: ``2 * layers * kv_heads * head_dim * context *
  batch * dtype_bytes`` (MLA caches its latent and rotary key: ``kv_lora_rank + qk_rope_head_dim`` values per
  token and layer). Framework workspace and activations are not included.

Hugging Face configs are read by their family (`moekit.families`), so the counts are those of the model
`moekit.interop.load_hf` builds, which holds exactly the checkpoint's tensors (plus any the family writes for
parts of width 0, such as Qwen2-MoE's gate of a missing shared expert, counted here too).
* **memory_training_bytes**: 16 bytes per parameter (fp32 master weights 4 + fp32 gradients 4 +
  AdamW first and second moments 4 + 4). Activations, which depend on batch, sequence length and
  checkpointing, are **not** included.

Byte and FLOP counts are printed in decimal units (1 GB = 1e9 bytes).
"""

from __future__ import annotations

import json
import math
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import NotRegularFile, file_kind, read_regular_file
from .config import ModelConfig, MoEConfig

#: Bytes per parameter for mixed-precision AdamW training: fp32 weights, gradients and two moments.
TRAINING_BYTES_PER_PARAM = 16


# ---------------------------------------------------------------------------------------------- result
@dataclass
class ModelInfo:
    """Size, compute and memory of one model (see the module docstring for every convention).

    Attributes:
        total_params: all parameters, tied embeddings once.
        active_params: parameters one token uses (k of E routed experts per MoE layer).
        flops_per_token_forward: 2 * active matmul weights (lm_head included, embedding lookup not)
            + attention score/value FLOPs at `context`.
        train_flops_per_token: 3 * flops_per_token_forward.
        memory_inference_bytes: weights at `dtype_bytes` + KV cache for `batch` x `context`.
        memory_training_bytes: 16 bytes/param (fp32 weights, grads, AdamW m and v); activations excluded.
        name: what was described (e.g. "mixtral" or "moekit ModelConfig").
        num_layers, num_moe_layers: decoder layers, and how many of them are MoE.
        active_matmul_params: the active weights that enter a matmul (the FLOP count's basis).
        attention_flops_per_token: the attention score/value part of the forward FLOPs.
        weights_bytes, kv_cache_bytes: the two parts of `memory_inference_bytes`.
        context, batch, dtype_bytes: the settings the FLOP and memory numbers were computed for.
        notes: approximations and caveats specific to this model.
    """

    total_params: int
    active_params: int
    flops_per_token_forward: int
    train_flops_per_token: int
    memory_inference_bytes: int
    memory_training_bytes: int
    name: str = "model"
    num_layers: int = 0
    num_moe_layers: int = 0
    active_matmul_params: int = 0
    attention_flops_per_token: int = 0
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    context: int = 4096
    batch: int = 1
    dtype_bytes: float = 2
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A readable multi-line summary with human units (e.g. "46.70 B" parameters, "93.4 GB")."""
        share = 100.0 * self.active_params / self.total_params if self.total_params else 0.0
        dtype = f"{self.dtype_bytes:g} bytes/param"
        lines = [
            f"{self.name}: {self.num_layers} layers ({self.num_moe_layers} MoE)",
            f"  total parameters      {human_count(self.total_params)}",
            f"  active parameters     {human_count(self.active_params)} per token ({share:.1f}% of total)",
            f"  forward FLOPs/token   {human_flops(self.flops_per_token_forward)} "
            f"(2 x {human_count(self.active_matmul_params)} active matmul weights + "
            f"{human_flops(self.attention_flops_per_token)} attention at context {self.context})",
            f"  training FLOPs/token  {human_flops(self.train_flops_per_token)} (3 x forward)",
            f"  inference memory      {human_bytes(self.memory_inference_bytes)} = weights "
            f"{human_bytes(self.weights_bytes)} ({dtype}) + KV cache {human_bytes(self.kv_cache_bytes)} "
            f"(batch {self.batch}, context {self.context})",
            f"  training memory       {human_bytes(self.memory_training_bytes)} "
            f"({TRAINING_BYTES_PER_PARAM} bytes/param: fp32 weights + grads + AdamW m, v; activations not included)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def human_count(n: float) -> str:
    """12_879_925_248 -> '12.88 B' (decimal: K, M, B, T)."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def _three_digits(value: float) -> str:
    """Three significant digits: 93.41 -> '93.4', 1.342 -> '1.34', 747.2 -> '747'."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def human_bytes(n: float) -> str:
    """93_405_585_408 -> '93.4 GB' (decimal units, 1 GB = 1e9 bytes; three significant digits)."""
    for scale, unit in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= scale:
            return f"{_three_digits(n / scale)} {unit}"
    return f"{n:g} bytes"


def human_flops(n: float) -> str:
    """2.76e10 -> '27.6 GFLOP' (decimal units, three significant digits)."""
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if abs(n) >= scale:
            return f"{_three_digits(n / scale)} {unit}"
    return f"{n:g} FLOP"


# ---------------------------------------------------------------------------------------------- building blocks
@dataclass(frozen=True)
class _Block:
    """Parameter tallies of one block: all of them, those one token uses, and the used matmul weights."""

    total: int
    active: int
    matmul: int

    def __add__(self, other: _Block) -> _Block:
        return _Block(self.total + other.total, self.active + other.active, self.matmul + other.matmul)


_ZERO = _Block(0, 0, 0)


def _linear(d_in: int, d_out: int, bias: bool = False) -> _Block:
    """An always-used `nn.Linear(d_in, d_out)`: the weight is a matmul, the bias is not."""
    params = d_in * d_out + (d_out if bias else 0)
    return _Block(params, params, d_in * d_out)


def _norm(width: int) -> _Block:
    """An RMSNorm weight: used by every token, no matmul."""
    return _Block(width, width, 0)


def _ffn(hidden: int, intermediate: int, gated: bool = True, bias: bool = False) -> _Block:
    """A dense FFN: SwiGLU (gate, up, down) when `gated`, else up and down."""
    block = _linear(hidden, intermediate, bias) + _linear(intermediate, hidden, bias)
    return block + _linear(hidden, intermediate, bias) if gated else block


def _moe(router: _Block, expert: _Block, num_experts: int, used: int, shared: _Block = _ZERO) -> _Block:
    """An MoE FFN: router + E experts (`used` of them per token) + always-on shared experts."""
    experts = _Block(num_experts * expert.total, used * expert.active, used * expert.matmul)
    return router + experts + shared


@dataclass(frozen=True)
class _Attention:
    """One attention block's parameters and its per-token, per-context-position costs."""

    params: _Block
    score_dims: int  # heads * (qk_dim + v_dim): FLOPs per context position = 2 * score_dims
    kv_elements: int  # cache elements per token and layer


def _attention(config: ModelConfig) -> _Attention:
    """One attention block of `config`: grouped-query attention with its options, or multi-head latent attention."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    mla = config.mla
    if mla is not None:  # DeepSeek's MLA, as transformers' DeepseekV3Attention builds it
        bias = config.qkv_bias
        if mla.q_lora_rank:
            q = _linear(hidden, mla.q_lora_rank, bias) + _norm(mla.q_lora_rank) + _linear(mla.q_lora_rank,
                                                                                         heads * mla.qk_head_dim)
        else:
            q = _linear(hidden, heads * mla.qk_head_dim)
        kv = (_linear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias) + _norm(mla.kv_lora_rank)
              + _linear(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim)))
        o = _linear(heads * mla.v_head_dim, hidden, config.o_proj_bias)
        return _Attention(q + kv + o, heads * (mla.qk_head_dim + mla.v_head_dim),
                          mla.kv_lora_rank + mla.qk_rope_head_dim)
    head_dim = config.attention_head_dim
    q, kv = heads * head_dim, config.kv_heads * head_dim
    params = _linear(hidden, q, config.qkv_bias) + _linear(hidden, kv, config.qkv_bias)
    params = params + _linear(hidden, kv, config.qkv_bias) + _linear(q, hidden, config.o_proj_bias)
    if config.qk_norm == "head":
        params = params + _norm(head_dim) + _norm(head_dim)
    elif config.qk_norm == "projection":
        params = params + _norm(q) + _norm(kv)
    if config.attention_sinks:
        params = params + _norm(heads)  # one logit per head: used by every token, no matmul
    return _Attention(params, heads * 2 * head_dim, 2 * kv)


def _assemble(name: str, vocab: int, hidden: int, tie: bool, attention: list[_Attention], ffns: list[_Block],
              moe_layers: int, context: int, batch: int, dtype_bytes: float, notes: list[str]) -> ModelInfo:
    """Add embeddings, per-layer norms, final norm and lm_head, then derive FLOPs and memory."""
    if not isinstance(context, int) or context < 0:
        raise ValueError(f"context={context!r} is not allowed: an integer >= 0 (tokens attended to)")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} is not allowed: a positive integer")
    if not dtype_bytes > 0:
        raise ValueError(f"dtype_bytes={dtype_bytes!r} is not allowed: a number > 0 (2 for bf16, 4 for fp32)")
    embed = _Block(vocab * hidden, vocab * hidden, 0)  # a lookup, not a matmul
    lm_head = _Block(0, 0, vocab * hidden) if tie else _linear(hidden, vocab)  # tied: same weight, still a matmul
    body = embed + _norm(hidden) + lm_head
    for attn, ffn in zip(attention, ffns, strict=True):
        body = body + _norm(hidden) + attn.params + _norm(hidden) + ffn
    attn_flops = sum(2 * context * attn.score_dims for attn in attention)
    forward = 2 * body.matmul + attn_flops
    weights_bytes = round(body.total * dtype_bytes)
    kv_bytes = round(sum(attn.kv_elements for attn in attention) * context * batch * dtype_bytes)
    return ModelInfo(
        total_params=body.total,
        active_params=body.active,
        flops_per_token_forward=forward,
        train_flops_per_token=3 * forward,
        memory_inference_bytes=weights_bytes + kv_bytes,
        memory_training_bytes=TRAINING_BYTES_PER_PARAM * body.total,
        name=name,
        num_layers=len(attention),
        num_moe_layers=moe_layers,
        active_matmul_params=body.matmul,
        attention_flops_per_token=attn_flops,
        weights_bytes=weights_bytes,
        kv_cache_bytes=kv_bytes,
        context=context,
        batch=batch,
        dtype_bytes=dtype_bytes,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------- moekit configs
def _router_params(moe: MoEConfig) -> int:
    """Parameters of a moekit router (all used by every token: each computes logits against all rows)."""
    E, H = moe.num_local_experts, moe.hidden_size
    if moe.router == "noisy_topk":
        return 2 * E * H  # weight + noise_weight
    if moe.router == "hierarchical":
        return (moe.n_group + E) * H  # primary (group) gate + secondary gates
    if moe.router == "soft":
        return E * moe.slots_per_expert * H  # one vector per slot
    return E * H


def _moekit_moe(moe: MoEConfig) -> _Block:
    gated = moe.gated
    router = _Block(_router_params(moe), _router_params(moe), _router_params(moe))
    if moe.router_bias:
        router = router + _norm(moe.num_local_experts)  # a logit bias: used by every token, no matmul
    expert = _ffn(moe.hidden_size, moe.moe_intermediate_size, gated)
    if moe.expert_bias:  # one bias per projection output: 2I (or I) + H values, no matmul
        width = (2 if gated else 1) * moe.moe_intermediate_size + moe.hidden_size
        expert = expert + _norm(width)
    shared = _ZERO
    if moe.n_shared_experts:
        shared = _ffn(moe.hidden_size, moe.resolved_shared_intermediate_size, gated)
        if moe.shared_expert_gate:
            shared = shared + _linear(moe.hidden_size, 1)
    used = moe.num_experts_per_tok if moe.is_token_choice else moe.num_local_experts
    return _moe(router, expert, moe.num_local_experts, used, shared)


def info_from_model_config(config: ModelConfig, context: int = 4096, batch: int = 1,
                           dtype_bytes: float = 2) -> ModelInfo:
    """Size, FLOPs and memory of `MoETransformer(config)`, computed from the config alone.

    `total_params` equals `sum(p.numel() for p in MoETransformer(config).parameters())` exactly.
    `context` is the number of positions each token attends to (and the KV cache length), `batch`
    the number of cached sequences, `dtype_bytes` the bytes per parameter and cache element for
    inference (2 = bf16). See the module docstring for the conventions.
    """
    H = config.hidden_size
    attention = _attention(config)
    ffns: list[_Block] = []
    moe_layers = 0
    notes: list[str] = []
    for index in range(config.num_hidden_layers):
        if config.is_moe_layer(index):
            assert config.moe is not None
            ffns.append(_moekit_moe(config.moe))
            moe_layers += 1
        else:
            ffns.append(_ffn(H, config.intermediate_size))
    if config.moe is not None and not config.moe.is_token_choice:
        notes.append(f"router {config.moe.router!r} has no fixed per-token k: all experts counted as active")
    return _assemble("moekit ModelConfig", config.vocab_size, H, config.tie_word_embeddings,
                     [attention] * config.num_hidden_layers, ffns, moe_layers, context, batch, dtype_bytes, notes)


# ---------------------------------------------------------------------------------------------- HF configs
def info_from_hf_config(config: dict[str, Any], context: int = 4096, batch: int = 1,
                        dtype_bytes: float = 2) -> ModelInfo:
    """Size, FLOPs and memory of a Hugging Face model from its `config.json` dict.

    Every native family (`moekit.families.FAMILIES`) is read by its own module, with its own keys and defaults,
    so shared experts, dense layers, MLA, biases, sinks and q/k norms are counted as transformers builds them.
    Multi-token-prediction modules that transformers does not build (DeepSeek-V3's `num_nextn_predict_layers`) are
    not counted. Conventions as in the module docstring.

    Raises:
        ValueError: a `model_type` moekit has no family for (naming the supported ones), or a config value the
            counts need that is missing or wrong.
    """
    from .families import family_for
    from .families.config_io import HFConfig, read_rope

    model_type = config.get("model_type")
    family = family_for(model_type, "info")
    notes: list[str] = []
    counted = dict(config)
    try:  # a RoPE moekit does not compute (dynamic, longrope) has no parameters: count the model anyway
        read_rope(HFConfig(counted, family, "info"))
    except ValueError as error:
        notes.append(f"moekit cannot load this model ({error}); the counts do not depend on it")
        counted["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        counted.pop("rope_scaling", None)
    mlp_bias = bool(counted.pop("mlp_bias", False)) and not family.is_moe
    model = family.read_config(counted, f"info ({model_type})")
    info = info_from_model_config(model, context=context, batch=batch, dtype_bytes=dtype_bytes)
    extra = sum(math.prod(shape) for shape, _ in family.extra_tensors(family.export_config(model)).values())
    if mlp_bias:  # Llama's optional FFN biases: gate and up (I each) and down (H) per layer, no matmul
        extra += model.num_hidden_layers * (2 * model.intermediate_size + model.hidden_size)
        notes.append("mlp_bias=True: counted, but moekit cannot load FFN biases")
    if extra:
        info.total_params += extra
        info.active_params += extra
        info.weights_bytes = round(info.total_params * dtype_bytes)
        info.memory_inference_bytes = info.weights_bytes + info.kv_cache_bytes
        info.memory_training_bytes = TRAINING_BYTES_PER_PARAM * info.total_params
    if model.mla is not None:
        notes.append("KV cache counted as latent attention stores it (the normalised latent and the rotary key: "
                     "kv_lora_rank + qk_rope_head_dim values per token and layer)")
    mtp = config.get("num_nextn_predict_layers") or config.get("num_mtp_layers")
    if mtp and family.model_type in ("deepseek_v3", "glm4_moe"):
        notes.append(f"the {mtp} multi-token-prediction layer(s) are not counted")
    info.name = str(model_type)
    info.notes = notes + info.notes
    return info


# ---------------------------------------------------------------------------------------------- files
INFO_SOURCES = ("a moekit run directory, a run config file (YAML or JSON), a preset name (`moekit presets` lists "
                "them) or a Hugging Face model directory with config.json")
"""What `moekit info` accepts, as the error messages say it."""

#: Config files are small; anything larger is a weights file or data passed by mistake (never read whole).
MAX_CONFIG_BYTES = 16 * 2**20

def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _read_config_bytes(path: Path) -> bytes:
    """The bytes of the regular file `path` (at most MAX_CONFIG_BYTES), opened so that nothing can block."""
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES + 1)  # a FIFO swapped in after the caller's stat: no block
    except NotRegularFile:
        raise ValueError(f"{path} is not a regular file; pass {INFO_SOURCES}") from None
    except PermissionError as error:
        raise ValueError(f"cannot read {path}: permission denied; make it readable, or pass {INFO_SOURCES}") from error
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}; pass {INFO_SOURCES}") from error
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB, too large to be a config file "
                         f"(a weights file?); pass {INFO_SOURCES}")
    return data


def _read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a JSON or YAML config file; anything else is a one-line ValueError naming `path`."""
    data = _read_config_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise ValueError(f"{path} is not a config file (it holds binary data, not UTF-8 text); pass {INFO_SOURCES}")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml (or use a JSON config)") from error
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(error, "problem", None) or _one_line(error)
            raise ValueError(f"{path} is not valid YAML ({where}{problem}); fix it, or pass {INFO_SOURCES}") from error
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            where = f"line {error.lineno} column {error.colno}: {error.msg}"
            what = f"valid JSON ({where})" if path.suffix.lower() == ".json" else \
                f"a config file: not JSON ({where}) and not named .yaml/.yml"
            raise ValueError(f"{path} is not {what}; pass {INFO_SOURCES}") from error
    if values is None:
        raise ValueError(f"{path} is empty; pass {INFO_SOURCES}")
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a {type(values).__name__}, not a mapping of config keys; pass {INFO_SOURCES}")
    return values


def _moekit_family(model_type: Any) -> bool:
    """True when moekit has a family module that reads `model_type`."""
    from .families import family_for

    try:
        family_for(model_type, "info")
    except (ValueError, TypeError):
        return False
    return True


def _transformers_knows(model_type: Any) -> bool:
    """True when transformers >= 5 is installed and has a config class for `model_type`."""
    from .extras import installed

    if not isinstance(model_type, str) or not installed("transformers"):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def info_from_transformers(hf_config: dict[str, Any], context: int = 4096, batch: int = 1,
                           dtype_bytes: float = 2) -> ModelInfo:
    """Parameters (total and per token) and weight memory of transformers' own class for `hf_config`.

    The model is built on the meta device (no memory, no weights). Active parameters leave out E - k experts of
    every experts module; FLOPs are 2 x the active matmul weights (attention scores and the KV cache are not
    computed for a family moekit does not model: the notes say so).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf.info import experts_per_token, parameters_per_expert

    values = dict(hf_config)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    k = experts_per_token(text)
    total = sum(p.numel() for p in model.parameters())
    inactive, moe_layers = 0, 0
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if name.rsplit(".", 1)[-1] != "experts" or not isinstance(experts, int) or k is None:
            continue
        moe_layers += 1
        per_expert = parameters_per_expert(module, experts)
        inactive += per_expert * (experts - min(k, experts))
    active = total - inactive
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    matmul = active - embeddings
    notes = [f"counted on transformers' own {type(model).__name__} (moekit does not convert {model_type}); "
             "attention-score FLOPs and the KV cache are not computed"]
    if k is None:
        notes.append("the config names no experts-per-token field moekit knows: active = total")
    weights = round(total * dtype_bytes)
    return ModelInfo(total_params=total, active_params=active, flops_per_token_forward=2 * matmul,
                     train_flops_per_token=6 * matmul, memory_inference_bytes=weights,
                     memory_training_bytes=TRAINING_BYTES_PER_PARAM * total, name=str(model_type),
                     num_layers=int(getattr(text, "num_hidden_layers", 0) or 0), num_moe_layers=moe_layers,
                     active_matmul_params=matmul, weights_bytes=weights, context=context, batch=batch,
                     dtype_bytes=dtype_bytes, notes=notes)


def load_info_source(path: str | Path, context: int = 4096, batch: int = 1, dtype_bytes: float = 2) -> ModelInfo:
    """`ModelInfo` for a moekit run directory or config file, or an HF model directory / config.json.

    A directory is read through its `config.json` (else `config.yaml` / `config.yml`). A file
    holding `"model_type"` is an HF config; otherwise its `"model"` section holds `ModelConfig`
    fields (a moekit run config; YAML needs PyYAML). Preset names are resolved by the caller (the CLI).

    Anything else (a missing path, a FIFO or device, a folder without a config, a binary or non-config file,
    broken JSON/YAML, a mapping that is no model config, unusable values) raises FileNotFoundError or ValueError
    with one line naming the path and what is expected (:data:`INFO_SOURCES`). A FIFO is never opened.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path} does not exist; pass {INFO_SOURCES}") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}; pass {INFO_SOURCES}") from error
    if stat.S_ISDIR(mode):
        candidates = [path / name for name in ("config.json", "config.yaml", "config.yml")]
        found = next((c for c in candidates if c.is_file()), None)  # is_file: regular files only, never a FIFO
        if found is None:
            raise FileNotFoundError(f"{path} has no config.json, config.yaml or config.yml; pass {INFO_SOURCES}")
        path = found
    elif not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {file_kind(mode)}, not a file or directory; pass {INFO_SOURCES}")
    values = _read_config_file(path)
    model_type = values.get("model_type")
    if model_type is not None and not _moekit_family(model_type) and _transformers_knows(model_type):
        try:
            info = info_from_transformers(values, context=context, batch=batch, dtype_bytes=dtype_bytes)
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            raise ValueError(f"{path}: transformers cannot build {model_type!r} as a causal LM from this config "
                             f"({_one_line(error)}); pass another model directory") from error
    elif "model_type" in values:
        try:
            info = info_from_hf_config(values, context=context, batch=batch, dtype_bytes=dtype_bytes)
        except ValueError as error:
            raise ValueError(f"{path}: {_one_line(error)}") from error
        except (TypeError, AttributeError, KeyError, ZeroDivisionError) as error:
            raise ValueError(f"{path}: an HF config value has the wrong type or is zero ({_one_line(error)}); fix "
                             "the config, or pass another model directory") from error
    elif isinstance(values.get("model"), dict) and "hf_config" in values["model"]:  # a transformers-backend run
        info = info_from_transformers(dict(values["model"]["hf_config"]), context=context, batch=batch,
                                      dtype_bytes=dtype_bytes)
        info.name = f"moekit {values.get('name', 'model')} ({info.name}, transformers' own class)"
    elif isinstance(values.get("model"), dict):
        try:
            model = ModelConfig.from_dict(dict(values["model"]))
            info = info_from_model_config(model, context=context, batch=batch, dtype_bytes=dtype_bytes)
        except ValueError as error:
            raise ValueError(f"{path}: its model section is not a valid moekit model ({_one_line(error)})") from error
        except (TypeError, AttributeError, KeyError, ZeroDivisionError) as error:
            raise ValueError(f"{path}: its model section is not a valid moekit model (a value has the wrong type: "
                             f"{_one_line(error)}); fix the config") from error
        info.name = f"moekit {values.get('name', 'model')}"
    else:
        raise ValueError(f"{path} is neither an HF config (no 'model_type') nor a moekit config (no 'model' "
                         f"section with ModelConfig fields); pass {INFO_SOURCES}")
    return info
