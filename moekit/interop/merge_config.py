"""The `moekit merge` configuration: mergekit-moe's YAML, with the same keys, defaults and meaning.

A config names a base model (attention, norms, embeddings and the output head come from it), a list of experts
(each expert's FFN comes from its `source_model`; its router row is computed from its prompts) and how to
initialise the routers. Example::

    base_model: ./models/base
    gate_mode: hidden            # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random
    dtype: bfloat16              # of the written weights; default: the base model's
    experts_per_token: 2
    experts:
      - source_model: ./models/code
        positive_prompts: ["write a python function"]
      - source_model: ./models/math
        positive_prompts: ["solve the equation"]
        negative_prompts: ["write a story"]
        noise_scale: 0.01        # Gaussian noise added to this expert's FFN weights

Keys mergekit-moe accepts: `base_model`, `experts` (`source_model`, `positive_prompts`, `negative_prompts`,
`noise_scale`, `residual_scale`), `gate_mode`, `dtype`, `experts_per_token`, `shared_experts`, `architecture`.
moekit adds `gate_mode: router_input` (see `moekit.interop.gates`), `gate_dtype` (precision of the router
computation, float32 by default where mergekit uses bfloat16), `seed` (for `random`/`uniform_random` routers and
`noise_scale`, which mergekit leaves unseeded), `tokenizer_source` (``base`` or a local tokenizer directory) and
`for_further_training` (accept experts that all come from one model or all have the same prompts, which only
makes sense if the model is trained after merging; mergekit's `--i-understand-this-is-not-useful-without-training`).
mergekit silently ignores keys it does not know; moekit refuses them, naming the key and the accepted ones.

Model references are local paths (relative paths are relative to the current directory, as in mergekit): a
Hugging Face model directory with safetensors weights, or a ``.gguf`` file. Hub ids are refused with how to
download them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import is_finite_number
from .dtypes import WEIGHT_DTYPES

__all__ = ["ARCHITECTURES", "ARCHITECTURE_ALIASES", "LAYOUT_FAMILIES", "MERGE_GATE_MODES", "ExpertSpec", "MergeConfig",
           "load_merge_config"]

MERGE_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "router_input")
"""`gate_mode` values: mergekit-moe's six and moekit's `router_input`."""

LAYOUT_FAMILIES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "deepseek_v3": "glm4_moe"}
"""Output layouts (mergekit's names) and the `moekit.families` family that writes each: DeepSeek-V3 routing goes
into GLM-4.5's class, which has standard attention (see `moekit.families.glm4_moe`)."""
ARCHITECTURES = tuple(LAYOUT_FAMILIES)
"""Output layouts (`architecture`); see `moekit.interop.merge` for what each writes."""

ARCHITECTURE_ALIASES = {
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
    "qwen3": "qwen3_moe", "deepseek_v3": "deepseek_v3", "deepseek": "deepseek_v3", "glm4_moe": "deepseek_v3",
    "qwen": "qwen",  # mergekit matches "qwen" to its first Qwen layout that fits: resolved against the base model
}
_PROMPT_FREE_MODES = ("random", "uniform_random")
_TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
             "gate_dtype", "seed", "tokenizer_source", "tokenizer", "for_further_training")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")

MAX_SCALE = 1000.0
"""The largest accepted `noise_scale` and `residual_scale` (weights are of order 0.01 to 1; float16 overflows at
65504)."""
SEED_LIMIT = 2**32
"""`seed` is an integer in [0, SEED_LIMIT): each tensor's noise seed is derived from it and must fit torch's
64-bit seed."""


def _refuse(where: str, value: Any, allowed: str) -> ValueError:
    """The error for a value of the wrong type or range at YAML key `where`."""
    return ValueError(f"merge config: {where}={value!r} is not allowed: {allowed}")


def _check_scale(value: Any, where: str) -> None:
    """`noise_scale` (>= 0) or `residual_scale` (> 0): None or a finite number up to `MAX_SCALE`."""
    if value is None:
        return
    if where.endswith("noise_scale"):
        ok = is_finite_number(value) and 0 <= value <= MAX_SCALE
        allowed = (f"None or a finite number in [0, {MAX_SCALE:g}] (the standard deviation of the Gaussian noise "
                   "added to the expert's weights)")
    else:
        ok = is_finite_number(value) and 0 < value <= MAX_SCALE
        allowed = (f"None or a finite number in (0, {MAX_SCALE:g}] (the factor on the expert's down_proj; 0 would "
                   "silence it, a negative one flip its sign)")
    if not ok:
        if isinstance(value, str):
            allowed += "; this is text: write the number unquoted (1.0e-3 rather than 1e-3, which YAML reads as text)"
        raise _refuse(where, value, allowed)


def _check_string(value: Any, where: str, what: str, optional: bool = False) -> None:
    """A non-empty string (or None when `optional`)."""
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise _refuse(where, value, ("None or " if optional else "") + what)


def _check_expert(spec: ExpertSpec, where: str) -> None:
    """Types and ranges of one expert's fields, named by their YAML key under `where`."""
    _check_string(spec.source_model, f"{where}.source_model", "a path to a model directory or .gguf file")
    for key in ("positive_prompts", "negative_prompts"):
        prompts = getattr(spec, key)
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise _refuse(f"{where}.{key}", prompts, "a list of non-empty strings")
    for key in ("noise_scale", "residual_scale"):
        _check_scale(getattr(spec, key), f"{where}.{key}")


@dataclass
class ExpertSpec:
    """One expert (or shared expert) of the merge: where its FFN comes from and what should be routed to it.

    Attributes:
        source_model: the model whose FFN weights this expert copies (a directory or a ``.gguf`` file).
        positive_prompts: texts that should be routed to this expert.
        negative_prompts: texts that should not; their vector is subtracted before normalising.
        noise_scale: standard deviation of Gaussian noise added to every FFN weight of this expert (absolute, as in
            mergekit), or None.
        residual_scale: factor on this expert's `down_proj` (mergekit's key), or None.
    """

    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "expert") -> None:
        """Check every field's type and range; raise `ValueError` naming the YAML key (`where`.key)."""
        _check_expert(self, where)

    def prompt_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The prompts as a hashable pair, to compare experts."""
        return tuple(self.positive_prompts), tuple(self.negative_prompts)


@dataclass
class MergeConfig:
    """A parsed, checked merge configuration (see the module docstring for every key).

    Attributes:
        base_model: model giving embeddings, attention, norms and the output head.
        experts: the routed experts, in router order.
        gate_mode: how router rows are initialised (`MERGE_GATE_MODES`).
        dtype: dtype name of the written weights, or None for the base model's.
        experts_per_token: experts each token is routed to (top-k).
        shared_experts: experts every token uses (fused into one shared FFN by the output layouts).
        architecture: an output layout of `ARCHITECTURES`, "qwen" (mergekit's prefix spelling), or None to choose
            (see `moekit.interop.merge.choose_architecture`).
        gate_dtype: dtype name the router computation runs in (float32 by default).
        seed: seed of random routers and of `noise_scale` noise.
        tokenizer_source: None (the base model's tokenizer) or a local directory holding tokenizer files.
        for_further_training: accept degenerate expert sets (one source model, or identical prompts).
    """

    base_model: str
    experts: list[ExpertSpec]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertSpec] = field(default_factory=list)
    architecture: str | None = None
    gate_dtype: str = "float32"
    seed: int = 0
    tokenizer_source: str | None = None
    for_further_training: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shared_have_prompts(self) -> bool:
        """Whether the shared experts carry prompts (then they get router rows, as in mergekit)."""
        return any(e.positive_prompts for e in self.shared_experts)

    def validate(self) -> None:
        """Check every value that does not need the models themselves; raise `ValueError` naming the problem."""
        _check_string(self.base_model, "base_model", "a path to a model directory or .gguf file")
        for key in ("experts", "shared_experts"):
            specs = getattr(self, key)
            if not isinstance(specs, list) or not all(isinstance(s, ExpertSpec) for s in specs):
                raise _refuse(key, specs, "a list of experts (mappings with a source_model)")
            for index, spec in enumerate(specs):
                spec.validate(f"{key}[{index}]")
        if not isinstance(self.gate_mode, str) or self.gate_mode not in MERGE_GATE_MODES:
            raise ValueError(f"merge config: gate_mode={self.gate_mode!r} is not known; use one of "
                             f"{', '.join(MERGE_GATE_MODES)}")
        for key in ("dtype", "gate_dtype"):
            value = getattr(self, key)
            if (value is not None or key == "gate_dtype") and not (isinstance(value, str) and value in WEIGHT_DTYPES):
                raise ValueError(f"merge config: {key}={value!r} is not allowed; use one of {', '.join(WEIGHT_DTYPES)}")
        if self.architecture is not None:
            if not isinstance(self.architecture, str):
                raise _refuse("architecture", self.architecture, f"None or one of {', '.join(ARCHITECTURES)}")
            name = self.architecture.lower()
            if name not in ARCHITECTURE_ALIASES:
                raise ValueError(f"merge config: architecture={self.architecture!r} is not known; use one of "
                                 f"{', '.join(ARCHITECTURES)} (or mergekit's spellings qwen, qwen3, deepseek)")
            self.architecture = ARCHITECTURE_ALIASES[name]
        if isinstance(self.experts_per_token, bool) or not isinstance(self.experts_per_token, int) \
                or self.experts_per_token < 1:
            raise ValueError(f"merge config: experts_per_token={self.experts_per_token!r} must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise _refuse("seed", self.seed, "an integer in [0, 2**32) (the noise and random routers' seeds are "
                          "derived from it)")
        _check_string(self.tokenizer_source, "tokenizer_source", "a local directory holding tokenizer files",
                      optional=True)
        if not isinstance(self.for_further_training, bool):
            raise _refuse("for_further_training", self.for_further_training, "true or false (unquoted)")
        if not self.experts:
            raise ValueError("merge config: experts is empty; list at least one expert with a source_model")
        if self.experts_per_token > len(self.experts):
            raise ValueError(f"merge config: experts_per_token={self.experts_per_token} is more than the "
                             f"{len(self.experts)} experts listed; lower experts_per_token or add experts")
        needs_prompts = self.gate_mode not in _PROMPT_FREE_MODES
        if needs_prompts:
            for index, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise ValueError(f"merge config: experts[{index}] ({expert.source_model}) has no "
                                     f"positive_prompts, which gate_mode {self.gate_mode!r} needs; add prompts or "
                                     "use gate_mode random")
        with_prompts = [bool(e.positive_prompts) for e in self.shared_experts]
        if any(with_prompts) and not all(with_prompts):
            raise ValueError("merge config: give positive_prompts to every shared expert or to none (a fused "
                             "shared expert has one gate)")
        if self.for_further_training or len(self.experts) < 2:
            if len(self.experts) < 2 and not self.for_further_training:
                raise ValueError("merge config: a single expert makes a model that computes the same as its source "
                                 "with more parameters; list several experts, or set for_further_training: true "
                                 "(CLI --for-further-training) if you train the model after merging")
            return
        if needs_prompts and len({e.prompt_key() for e in self.experts}) == 1:
            raise ValueError("merge config: every expert has the same positive and negative prompts, so every "
                             "router row is the same and routing cannot tell the experts apart; give each expert "
                             "prompts for what it should handle (or set for_further_training: true, CLI "
                             "--for-further-training, if you train the model after merging)")
        if len({os.path.abspath(e.source_model) for e in self.experts}) == 1:
            raise ValueError("merge config: every expert comes from the same source_model "
                             f"({self.experts[0].source_model}), so the model computes the same as that model with "
                             "more parameters; use different source models, or set for_further_training: true (CLI "
                             "--for-further-training) if you train the model after merging")


def _model_reference(value: Any, where: str) -> str:
    """A model reference as a path string: mergekit's plain string or `{model: {path: ...}}` mapping."""
    if isinstance(value, dict):
        inner = value.get("model", value)
        if isinstance(inner, dict) and set(inner) <= {"path", "revision"} and "path" in inner:
            if inner.get("revision"):
                raise ValueError(f"merge config: {where} has revision={inner['revision']!r}; moekit reads local "
                                 "directories only, so check out that revision locally and drop the key")
            value = inner["path"]
        else:
            raise ValueError(f"merge config: {where} must be a path string (or {{model: {{path: ...}}}}), got "
                             f"{value!r}")
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"merge config: {where} must be a path to a model directory or .gguf file, got {value!r}")
    text = str(value)
    if "+" in text and not Path(text).exists():
        raise ValueError(f"merge config: {where}={text!r} looks like a model with a LoRA adapter (model+lora); "
                         "moekit does not apply adapters: merge the adapter into the model first")
    return text


def _prompts(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"merge config: {where} must be a list of strings, got {value!r}")
    empty = [i for i, p in enumerate(value) if not p.strip()]
    if empty:
        raise ValueError(f"merge config: {where}[{empty[0]}] is an empty prompt; remove it or give it text")
    return list(value)


def _optional_float(value: Any, where: str) -> float | None:
    _check_scale(value, where)
    return None if value is None else float(value)


def _expert(value: Any, where: str) -> ExpertSpec:
    if not isinstance(value, dict):
        raise ValueError(f"merge config: {where} must be a mapping with a source_model, got {value!r}")
    unknown = sorted(set(value) - set(_EXPERT_KEYS))
    if unknown:
        raise ValueError(f"merge config: {where} has unknown key {unknown[0]!r}; accepted keys: "
                         f"{', '.join(_EXPERT_KEYS)}")
    if "source_model" not in value:
        raise ValueError(f"merge config: {where} has no source_model; give the model its FFN is copied from")
    return ExpertSpec(
        source_model=_model_reference(value["source_model"], f"{where}.source_model"),
        positive_prompts=_prompts(value.get("positive_prompts"), f"{where}.positive_prompts"),
        negative_prompts=_prompts(value.get("negative_prompts"), f"{where}.negative_prompts"),
        noise_scale=_optional_float(value.get("noise_scale"), f"{where}.noise_scale"),
        residual_scale=_optional_float(value.get("residual_scale"), f"{where}.residual_scale"),
    )


def _tokenizer_source(data: dict[str, Any]) -> str | None:
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict) or set(tokenizer) - {"source"}:
            raise ValueError("merge config: tokenizer may only hold `source` here (moekit does not add or merge "
                             f"tokens); got {tokenizer!r}")
        if source is not None:
            raise ValueError("merge config: give tokenizer_source or tokenizer.source, not both")
        source = tokenizer.get("source")
    if source is None or source == "base":
        return None
    if not isinstance(source, str) or source == "union" or source.startswith("model:"):
        raise ValueError(f"merge config: tokenizer_source={source!r} is not supported; use 'base' (default) or a "
                         "local directory holding tokenizer files (moekit does not build union vocabularies)")
    return source


def load_merge_config(source: str | os.PathLike[str] | dict[str, Any], *,
                      for_further_training: bool = False) -> MergeConfig:
    """Parse a merge config from a YAML file path or an already-loaded mapping.

    Args:
        source: path of a YAML file, or the mapping itself.
        for_further_training: the CLI's ``--for-further-training`` (ORed with the YAML key).

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ValueError: invalid YAML, an unknown key (named, with the accepted ones), or a bad value.
    """
    if isinstance(source, dict):
        data = source
        where = "merge config"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"merge config {str(path)!r} not found; pass a YAML file like mergekit-moe's")
        try:
            import yaml
        except ImportError as error:  # pragma: no cover - PyYAML is a dependency of the train extra
            raise ImportError("reading a merge config needs PyYAML: pip install pyyaml") from error
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"merge config {path} is not valid YAML: {error}") from error
        where = f"merge config {path}"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a mapping with base_model and experts, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; accepted keys: {', '.join(_TOP_KEYS)}")
    for key in ("base_model", "experts"):
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r}")
    experts = data["experts"]
    if not isinstance(experts, list):
        raise ValueError(f"{where}: experts must be a list of mappings, got {type(experts).__name__}")
    shared = data.get("shared_experts") or []
    if not isinstance(shared, list):
        raise ValueError(f"{where}: shared_experts must be a list of mappings, got {type(shared).__name__}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: seed={seed!r} must be an integer")
    further = data.get("for_further_training", False)
    if not isinstance(further, bool):
        raise ValueError(f"{where}: for_further_training={further!r} must be true or false (unquoted)")
    return MergeConfig(
        base_model=_model_reference(data["base_model"], "base_model"),
        experts=[_expert(e, f"experts[{i}]") for i, e in enumerate(experts)],
        gate_mode=data.get("gate_mode", "hidden"),
        dtype=data.get("dtype"),
        experts_per_token=data.get("experts_per_token", 2),
        shared_experts=[_expert(e, f"shared_experts[{i}]") for i, e in enumerate(shared)],
        architecture=data.get("architecture"),
        gate_dtype=data.get("gate_dtype", "float32"),
        seed=seed,
        tokenizer_source=_tokenizer_source(data),
        for_further_training=further or for_further_training,
    )
