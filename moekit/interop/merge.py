"""Build Mixture-of-Experts checkpoints from dense Hugging Face models: `merge` (mergekit-moe configs).

`merge(config, out)` copies embeddings, attention, norms and the output head from the config's `base_model`,
copies each expert's FFN (`gate_proj`, `up_proj`, `down_proj`) from its `source_model`, initialises the routers
with `moekit.interop.gates.compute_gate_weights` and writes a checkpoint that
`transformers.AutoModelForCausalLM.from_pretrained(out)` loads with the library's own classes (no remote code).
`moekit.interop.upcycle.upcycle` builds on the same writer.

Output layouts (`architecture`):

- ``mixtral`` (`MixtralForCausalLM`): from Llama or Mistral bases; no shared experts. A Qwen2 base (q/k/v biases)
  or a Qwen3 base (per-head q/k RMSNorm) cannot be written as Mixtral and is refused.
- ``qwen2_moe`` (`Qwen2MoeForCausalLM`): from Llama, Mistral or Qwen2 bases (`qkv_bias` follows the base). Any
  number N of shared experts, fused into one shared FFN of width N x intermediate_size. Qwen2-MoE multiplies its
  shared expert by ``sigmoid(shared_expert_gate(x))``. mergekit writes the shared expert's own prompt vector
  there (the same computation as a router row); moekit does the same, with the mean of the shared experts' rows
  when there are several. When the shared experts have no prompts (mergekit refuses that), the gate weight is
  zero, so the gate is 1/2 for every token, and the shared `down_proj` is doubled: the shared experts are then
  always fully on.
- ``qwen3_moe`` (`Qwen3MoeForCausalLM`): from Qwen3 bases only (its attention always has q_norm/k_norm); no
  shared experts.
- ``deepseek_v3`` (also spelt ``deepseek``): DeepSeek-V3-style routing (sigmoid scores, a zero
  `e_score_correction_bias`, top-k weights renormalised, `routed_scaling_factor` 1, one group) and any number of
  always-on shared experts, written as `Glm4MoeForCausalLM`. transformers' `DeepseekV3ForCausalLM` uses
  multi-head latent attention, into which a Llama/Qwen attention cannot be written exactly (see
  `moekit.interop.hf`); Glm4-MoE is the same MoE with standard attention, and its `use_qk_norm` is the same
  per-head RMSNorm before RoPE as Qwen3's, so Qwen3 bases fit too. mergekit's own ``deepseek`` output instead
  names remote code from the Hub (DeepSeek-MoE v1, softmax routing) and allows at most one ungated shared expert.
  Shared experts with prompts are refused here (Glm4-MoE has no shared-expert gate).

Default layout (`architecture` unset), mirroring mergekit-moe's choice and extending it: without shared experts,
``mixtral`` for Llama/Mistral bases, ``qwen2_moe`` for Qwen2 and ``qwen3_moe`` for Qwen3; with shared experts,
``qwen2_moe`` when they have prompts (a gated shared expert) and ``deepseek_v3`` otherwise or for Qwen3 bases.

Expert weights: expert i's `gate_proj`/`up_proj`/`down_proj` are source i's, plus Gaussian noise of standard
deviation `noise_scale` (absolute, as in mergekit, but seeded by the config's `seed`), with `down_proj` times
`residual_scale` when given. Router rows are in the orientation of transformers' router weight ``[E, hidden]``.
Routers are computed in float32 by default (`gate_dtype`); the written weights use `dtype` (default: the base
model's dtype, else its stored tensor dtype).

Streaming: tensors are read one at a time from the inputs' safetensors files and each output shard is written
tensor by tensor into a file whose header is written first, so memory holds one tensor (the largest is usually
the embedding) rather than a shard or a model. GGUF inputs are the exception: transformers dequantises them
whole. Output goes to a temporary folder next to `out`, renamed into place once complete; a failure (a full disk
included: one `StorageError` line) removes it and leaves an existing `out` untouched. A non-empty `out` is replaced
only with `overwrite=True` and only when moekit wrote it (`moekit.interop.outputs`); an `out` overlapping an input
model is always refused. An expert model whose vocabulary differs from the base's is merged with a warning.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import write_json
from ..config import ModelConfig, MoEConfig
from ..families import FAMILIES, Family
from ..families.equivalence import canonical
from ..families.tensor_map import MLP_TENSOR_NAME, export_tensors
from .dense_source import DenseSource, check_same_shapes, check_tensors, open_dense, required_tensors
from .dtypes import WEIGHT_DTYPES, dtype_name, resolve_dtype
from .hf import TOKENIZER_FILES
from .merge_config import LAYOUT_FAMILIES, MergeConfig, load_merge_config
from .writer import TensorEntry, check_destination, split_shards, write_atomically, write_weights

__all__ = ["DEFAULT_MERGE_SHARD_BYTES", "LAYOUT_FAMILIES", "MergePlan", "choose_architecture", "merge"]

DEFAULT_MERGE_SHARD_BYTES = 2_000_000_000
"""Largest safetensors file `merge`/`upcycle` write by default (2 GB); shards are streamed, so memory does not grow
with it."""

_PROJ = ("gate_proj", "up_proj", "down_proj")


# ============================================================================================== layouts
def choose_architecture(family: str, num_shared: int, shared_gated: bool, requested: str | None = None) -> str:
    """The output layout for a `family` base (see the module docstring for the rule).

    Whether the layout can hold the model is decided by its family once the model's config is known
    (`MoEBuild`), with the family's own reasons.

    Args:
        family: the base model's `model_type` (llama, mistral, qwen2, qwen3).
        num_shared: number of shared experts.
        shared_gated: whether the shared experts need a gate (they have prompts).
        requested: an explicit layout, ``"qwen"`` (mergekit's prefix: qwen3_moe for Qwen3 bases, else
            qwen2_moe) or None.
    """
    if requested == "qwen":
        requested = "qwen3_moe" if family == "qwen3" else "qwen2_moe"
    if requested is not None:
        return requested
    if num_shared == 0:
        return {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}[family]
    return "qwen2_moe" if shared_gated and family != "qwen3" else "deepseek_v3"


def fitting_build(default: str, requested: bool, make: Callable[[str], MoEBuild]) -> tuple[MoEBuild, str | None]:
    """`make(default)`; when the layout was not requested and cannot hold the model, the first other layout that
    can (with a note saying why). Every layout's reasons are given when none can.

    Raises:
        ValueError: the requested layout, or every layout, cannot hold the model.
    """
    if requested:
        return make(default), None
    reasons = {}
    for architecture in (default, *(name for name in LAYOUT_FAMILIES if name != default)):
        try:
            build = make(architecture)
        except ValueError as error:
            reasons[architecture] = str(error).split(": ", 1)[-1]
            continue
        note = None if architecture == default else (f"the default layout {default!r} cannot hold this model "
                                                     f"({reasons[default]}); wrote {architecture!r} instead")
        return build, note
    detail = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
    raise ValueError(f"no MoE layout can hold this model exactly:\n{detail}")


def moe_config(architecture: str, base: DenseSource, *, num_experts: int, experts_per_token: int,
               expert_width: int, shared_width: int, shared_gated: bool) -> ModelConfig:
    """The moekit config of the MoE model: the base's attention and norms, an MoE FFN in every layer with the
    layout's routing (softmax top-k renormalised; DeepSeek-V3's sigmoid routing with a zero selection bias for
    ``deepseek_v3``), `shared_width` of shared experts (gated when `shared_gated`)."""
    dense = base.model_config
    hidden = dense.hidden_size
    routing: dict[str, Any] = {"router": "topk", "norm_topk_prob": True}
    if architecture == "deepseek_v3":
        routing = {"router": "deepseek_v3", "scoring_func": "sigmoid", "norm_topk_prob": True}
    shared: dict[str, Any] = {}
    if shared_width:
        count = shared_width // expert_width if shared_width % expert_width == 0 else 1
        shared = {"n_shared_experts": count, "shared_expert_intermediate_size": shared_width,
                  "shared_expert_gate": shared_gated}
    moe = MoEConfig(hidden_size=hidden, moe_intermediate_size=expert_width, num_local_experts=num_experts,
                    num_experts_per_tok=experts_per_token, **routing, **shared)
    return ModelConfig(**{**dense.to_dict(), "first_k_dense_replace": 0, "moe_layer_freq": 1, "mlp_only_layers": [],
                          "moe": moe.to_dict()})


# ============================================================================================== what to write
@dataclass
class FFNPart:
    """A slice of one dense FFN, as one expert or as part of a fused shared FFN.

    Attributes:
        source: the dense model it is read from.
        units: the intermediate units taken (rows of gate/up, columns of down), or None for all.
        down_scale: factor on the `down_proj` part.
        noise: standard deviation of Gaussian noise added to each weight (absolute, or relative to the weight's
            own standard deviation with `relative_noise`), applied before `down_scale`.
        seed: seed of this part's noise (each layer and projection draws from its own generator).
    """

    source: DenseSource
    units: slice | None = None
    down_scale: float = 1.0
    noise: float = 0.0
    relative_noise: bool = False
    seed: int = 0

    def read(self, layer: int, proj: str) -> Tensor:
        """This part's `proj` weight of `layer` (gate/up: [units, hidden]; down: [hidden, units])."""
        tensor = self.source.get(self.source.mlp_name(layer, proj))
        if self.units is not None:
            tensor = tensor[self.units] if proj != "down_proj" else tensor[:, self.units]
        scale = self.down_scale if proj == "down_proj" else 1.0
        if self.noise == 0.0 and scale == 1.0:
            return tensor
        tensor = tensor.float()
        if self.noise:
            generator = torch.Generator().manual_seed((self.seed * 100_003 + layer) * 3 + _PROJ.index(proj))
            std = self.noise * (float(tensor.std()) if self.relative_noise else 1.0)
            tensor = tensor + std * torch.randn(tensor.shape, generator=generator)
        return tensor * scale if scale != 1.0 else tensor


@dataclass
class MoEBuild:
    """Everything a layout needs to be written: the base, the experts and the router weights.

    Attributes:
        architecture: one of mixtral, qwen2_moe, qwen3_moe, deepseek_v3 (the layouts in `LAYOUT_FAMILIES`).
        base: model giving everything but the FFNs.
        experts: routed experts, one `FFNPart` each, in router order.
        shared: parts fused (concatenated along the intermediate dimension) into the shared FFN.
        experts_per_token: top-k.
        dtype: dtype of the written weights.
        shared_gated: the shared experts have a sigmoid gate (Qwen2-MoE, with prompts); without one, the layout's
            family writes whatever computes an always-on shared expert.
        router: ``[layers, experts, hidden]`` float32, set before writing.
        shared_gate: ``[layers, hidden]`` weights of the shared experts' sigmoid gate (with `shared_gated`).
        config: the moekit `ModelConfig` of the MoE model (`moe_config`).
        family: the family writing the layout.

    Raises:
        ValueError: the layout cannot hold this model, with the family's reasons.
    """

    architecture: str
    base: DenseSource
    experts: list[FFNPart]
    shared: list[FFNPart]
    experts_per_token: int
    dtype: torch.dtype
    shared_gated: bool = False
    router: Tensor | None = None
    shared_gate: Tensor | None = None
    config: ModelConfig = field(init=False)
    family: Family = field(init=False)

    @property
    def expert_width(self) -> int:
        return _width(self.experts[0])

    @property
    def shared_width(self) -> int:
        return sum(_width(p) for p in self.shared)

    def __post_init__(self) -> None:
        widths = {_width(p) for p in self.experts}
        if len(widths) != 1:  # pragma: no cover - callers build equal experts
            raise ValueError(f"experts must have one width, got {sorted(widths)}")
        if self.architecture == "deepseek_v3" and self.shared_width % self.expert_width:
            raise ValueError(f"the DeepSeek-V3 layout needs a shared width that is a multiple of the expert width "
                             f"{self.expert_width}; got {self.shared_width}")
        self.family = FAMILIES[LAYOUT_FAMILIES[self.architecture]]
        self.config = moe_config(self.architecture, self.base, num_experts=len(self.experts),
                                 experts_per_token=self.experts_per_token, expert_width=self.expert_width,
                                 shared_width=self.shared_width, shared_gated=self.shared_gated)
        problems = self.family.problems(canonical(self.config))
        if problems:
            hint = (" (the shared experts' prompts need a sigmoid gate: remove them, or use qwen2_moe)"
                    if self.shared_gated and self.architecture != "qwen2_moe" else "")
            raise ValueError(f"architecture {self.architecture!r} cannot hold this model ({self.base.family} base): "
                             f"{'; '.join(problems)}{hint}")

    def hf_config(self) -> dict[str, Any]:
        """The output `config.json`: the family's fields, the base's token ids, the output dtype."""
        written = self.family.export_config(self.config)
        src = self.base.config
        name = dtype_name(self.dtype)
        return {"architectures": [self.family.architecture], "model_type": self.family.model_type,
                **self.family.write_config(written), "bos_token_id": src.get("bos_token_id"),
                "eos_token_id": src.get("eos_token_id"), "pad_token_id": src.get("pad_token_id"), "dtype": name,
                "torch_dtype": name}


def _width(part: FFNPart) -> int:
    total = part.source.intermediate_size
    return len(range(*part.units.indices(total))) if part.units is not None else total


class _BuildSource:
    """The MoE model's tensors under moekit's names, read from the inputs when asked (a `StateSource`)."""

    def __init__(self, build: MoEBuild) -> None:
        self.build = build
        self._last: tuple[tuple[str, int], Tensor] | None = None  # export reads gate and up of one expert in turn

    def get(self, name: str) -> Tensor:
        build, match = self.build, MLP_TENSOR_NAME.fullmatch(name)
        if match is None:
            return build.base.get(build.base.hf_name(name))
        layer, rest = int(match[1]), match[2]
        if rest == "router.weight":
            if build.router is None:
                raise RuntimeError("router weights were not computed before writing")
            return build.router[layer]
        if rest == "router.e_score_correction_bias":
            return torch.zeros(len(build.experts))
        if rest in ("experts.gate_up_proj", "experts.down_proj"):
            return torch.stack([self.get_expert(name, e).float() for e in range(len(build.experts))])
        if rest == "shared_experts.gate.weight":
            if build.shared_gate is None:  # pragma: no cover - guarded by shared_gated
                raise RuntimeError("shared-expert gate weights were not computed before writing")
            return build.shared_gate[layer].reshape(1, -1)
        proj = rest.removeprefix("shared_experts.").removesuffix(".weight")
        return torch.cat([p.read(layer, proj).float() for p in build.shared], dim=1 if proj == "down_proj" else 0)

    def get_expert(self, name: str, expert: int) -> Tensor:
        if self._last is not None and self._last[0] == (name, expert):
            return self._last[1]
        match = MLP_TENSOR_NAME.fullmatch(name)
        assert match is not None
        layer, part = int(match[1]), self.build.experts[expert]
        if match[2] == "experts.gate_up_proj":
            tensor = torch.cat([part.read(layer, "gate_proj").float(), part.read(layer, "up_proj").float()])
        else:
            tensor = part.read(layer, "down_proj")
        self._last = ((name, expert), tensor)
        return tensor


def _entries(build: MoEBuild) -> list[TensorEntry]:
    """Every tensor of the output checkpoint, under the layout's names; each is read only when written."""
    written = build.family.export_config(build.config)
    source = build.family.export_source(build.config, _BuildSource(build))
    return [TensorEntry(t.name, t.shape, torch.float32 if t.float32 else build.dtype, t.make)
            for t in export_tensors(build.family, written, source)]


# ============================================================================================== plan
@dataclass
class MergePlan:
    """What a merge or upcycle writes (returned by `merge`/`upcycle`, printed by ``--dry-run``).

    Attributes:
        architecture: output layout; `model_class` its transformers class.
        num_layers, num_experts, experts_per_token: the MoE shape; `expert_width` and `shared_width` are the
            intermediate sizes of one routed expert and of the fused shared FFN.
        total_params, active_params: parameters in all, and used per token (k routed experts per layer).
        output_bytes, num_shards: size of the weights written and the number of safetensors files.
        dtype: dtype of the written weights; `gate_mode` how routers were initialised.
        out: the written folder, or None for a dry run.
        notes: warnings and facts worth showing (ill-conditioned router layers, ...).
    """

    architecture: str
    model_class: str
    num_layers: int
    num_experts: int
    experts_per_token: int
    expert_width: int
    shared_width: int
    total_params: int
    active_params: int
    output_bytes: int
    num_shards: int
    dtype: str
    gate_mode: str
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A readable multi-line summary."""
        from ..info import human_bytes, human_count

        share = 100.0 * self.active_params / self.total_params if self.total_params else 0.0
        lines = [
            f"architecture        {self.architecture} ({self.model_class})",
            f"layers              {self.num_layers}, every one MoE",
            f"experts             {self.num_experts} routed (width {self.expert_width}), "
            f"{self.experts_per_token} per token" + (f", shared width {self.shared_width}" if self.shared_width
                                                       else ""),
            f"router init         {self.gate_mode}",
            f"total parameters    {human_count(self.total_params)} ({self.total_params:,})",
            f"active parameters   {human_count(self.active_params)} per token ({share:.1f}%)",
            f"output              {human_bytes(self.output_bytes)} in {self.num_shards} safetensors file(s), "
            f"{self.dtype}",
        ]
        if self.out is not None:
            lines.append(f"written to          {self.out}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _plan(build: MoEBuild, entries: list[TensorEntry], max_shard_bytes: int, gate_mode: str) -> MergePlan:
    total = sum(math.prod(e.shape) for e in entries if not e.name.endswith("e_score_correction_bias"))
    base = build.base
    idle = base.num_layers * (len(build.experts) - build.experts_per_token) * 3 * base.hidden_size * build.expert_width
    return MergePlan(
        architecture=build.architecture, model_class=build.family.architecture, num_layers=base.num_layers,
        num_experts=len(build.experts), experts_per_token=build.experts_per_token, expert_width=build.expert_width,
        shared_width=build.shared_width, total_params=total, active_params=total - idle,
        output_bytes=sum(e.nbytes for e in entries), num_shards=len(split_shards(entries, max_shard_bytes)),
        dtype=str(build.dtype).removeprefix("torch."), gate_mode=gate_mode)


# ============================================================================================== files
def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return None
    return tqdm(total=total, desc=desc, unit="tensor")


def _tokenizer_writer(base: DenseSource, tokenizer_source: str | None) -> Callable[[Path], None]:
    """A function that puts the tokenizer files into the output folder (copies, or transformers' save)."""
    if tokenizer_source is not None:
        directory = Path(tokenizer_source)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer_source {tokenizer_source!r} is not a directory")
    elif base.gguf_file is None:
        directory = base.path
    else:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base.model_dir), gguf_file=base.gguf_file)
        return lambda out: tokenizer.save_pretrained(str(out))
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        warnings.warn(f"{directory} holds no tokenizer files; the output has none (copy them in before use)",
                      stacklevel=3)

    def copy(out: Path) -> None:
        for file in files:
            shutil.copyfile(file, out / file.name)

    return copy


def _generation_config(base: DenseSource, config: dict[str, Any]) -> dict[str, Any]:
    path = base.path / "generation_config.json"
    if base.gguf_file is None and path.is_file():
        values = json.loads(path.read_text(encoding="utf-8"))
        values.pop("transformers_version", None)
        return values
    return {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
            "pad_token_id": config.get("pad_token_id"), "use_cache": True}


def write_build(build: MoEBuild, out: str | os.PathLike[str], *, tokenizer_source: str | None = None,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_MERGE_SHARD_BYTES, progress: bool = True,
                caller: str = "merge", extra_files: dict[str, str] | None = None,
                inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Write `build` atomically into `out` (weights, config, generation config, tokenizer, marker); return the path.

    `inputs` are the paths the build reads: `out` may not overlap them. A full disk or a read-only destination
    raises one `StorageError` (the temporary folder is removed and a previous `out` kept).
    """
    entries = _entries(build)
    hf_config = build.hf_config()
    write_tokenizer = _tokenizer_writer(build.base, tokenizer_source)
    generation = _generation_config(build.base, hf_config)
    needed = sum(e.nbytes for e in entries) + sum(len(text.encode("utf-8")) for text in (extra_files or {}).values())

    def write(directory: Path) -> None:
        bar = _progress_bar(len(entries), f"moekit {caller}: writing", progress)
        try:
            write_weights(directory, entries, max_shard_bytes, on_tensor=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        write_json(directory / "config.json", hf_config)
        write_json(directory / "generation_config.json", generation)
        write_tokenizer(directory)
        for name, text in (extra_files or {}).items():
            (directory / name).write_text(text, encoding="utf-8")

    with torch.no_grad():
        return write_atomically(out, overwrite, write, caller=caller, inputs=inputs, needed=needed)


def check_max_shard_bytes(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_shard_bytes={value!r} must be a positive integer")
    return value


# ============================================================================================== merge
def _open_models(config: MergeConfig) -> tuple[DenseSource, list[DenseSource], list[DenseSource]]:
    opened: dict[str, DenseSource] = {}

    def get(path: str) -> DenseSource:
        key = os.path.abspath(path)
        if key not in opened:
            opened[key] = open_dense(path)
        return opened[key]

    base = get(config.base_model)
    check_tensors(base, required_tensors(base, mlp=False, rest=True))
    mlp = required_tensors(base, mlp=True, rest=False)
    experts = [get(e.source_model) for e in config.experts]
    shared = [get(e.source_model) for e in config.shared_experts]
    for source in [base, *experts, *shared]:
        check_tensors(source, mlp)
        check_same_shapes(base, source, mlp)
        if source.family != base.family:
            warnings.warn(f"{source.path} is a {source.family} model and the base {base.path} a {base.family} model; "
                          "only their FFN shapes must agree, so the merge goes on", stacklevel=3)
    _warn_vocabularies(base, [*experts, *shared])
    return base, experts, shared


def _vocabulary(source: DenseSource) -> dict[str, int] | None:
    """Token -> id of the model's ``tokenizer.json`` (its vocabulary and added tokens), or None without one."""
    path = source.path / "tokenizer.json"
    if source.gguf_file is not None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    vocab: dict[str, int] = {}
    table = (data.get("model") or {}).get("vocab")
    if isinstance(table, dict):  # BPE, WordPiece, WordLevel: token -> id
        vocab.update({str(token): int(index) for token, index in table.items()})
    elif isinstance(table, list):  # Unigram: [piece, score] in id order
        for index, item in enumerate(table):
            vocab[str(item[0] if isinstance(item, (list, tuple)) else item)] = index
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and "content" in added and "id" in added:
            vocab[str(added["content"])] = int(added["id"])
    return vocab


def _vocabulary_difference(base: dict[str, int], other: dict[str, int]) -> str:
    """How the token -> id table `other` differs from `base`, in a few words (the tables are not equal)."""
    changed = [token for token, index in base.items() if other.get(token) != index]
    extra = [token for token in other if token not in base]
    sizes = f"{len(other)} tokens against the base's {len(base)}; " if len(other) != len(base) else ""
    if changed:
        token = min(changed, key=lambda t: base[t])
        first = (f"{token!r} is id {other[token]} there and {base[token]} in the base" if token in other
                 else f"{token!r} (id {base[token]} in the base) is missing there")
    else:
        token = min(extra, key=lambda t: other[t])
        first = f"{token!r} (id {other[token]} there) is not in the base's"
    return f"its tokenizer.json has {sizes}{len(changed) + len(extra)} token(s) differ, first {first}"


def _warn_vocabularies(base: DenseSource, sources: list[DenseSource]) -> None:
    """Warn for each expert model whose tokenizer vocabulary or `vocab_size` differs from the base model's."""
    base_vocab = _vocabulary(base)
    seen: set[int] = {id(base)}
    for source in sources:
        if id(source) in seen:
            continue
        seen.add(id(source))
        differences = []
        rows, base_rows = source.config.get("vocab_size"), base.config.get("vocab_size")
        if rows != base_rows:
            differences.append(f"its config's vocab_size is {rows}, the base's {base_rows}")
        vocab = _vocabulary(source) if base_vocab is not None else None
        if vocab is not None and base_vocab is not None and vocab != base_vocab:
            differences.append(_vocabulary_difference(base_vocab, vocab))
        if differences:
            warnings.warn(f"expert model {source.path} has a different vocabulary from the base model {base.path}: "
                          f"{'; '.join(differences)}. The merged model uses the base's embeddings and tokenizer, so "
                          "this expert's FFN will read token ids and embeddings it was not trained with",
                          stacklevel=4)


def _shared_gated(config: MergeConfig, architecture: str) -> bool:
    """Whether the shared experts get a sigmoid gate: their prompts need one (Qwen2-MoE's gate computes a router
    row); with random router modes, Qwen2-MoE's gate gets random rows as mergekit writes it."""
    if not config.shared_experts:
        return False
    return config.shared_have_prompts or (architecture == "qwen2_moe" and config.gate_mode in ("random",
                                                                                               "uniform_random"))


def merge_inputs(config: MergeConfig) -> list[str]:
    """The paths a merge reads: the base model, every expert's source model and the tokenizer source."""
    paths = [config.base_model, *(e.source_model for e in config.experts),
             *(e.source_model for e in config.shared_experts)]
    if config.tokenizer_source is not None:
        paths.append(config.tokenizer_source)
    return [str(path) for path in paths]


def _check_prompts_tokenise(config: MergeConfig, base: DenseSource) -> None:
    """Tokenise every prompt as the router initialisation will: none may be empty (checked before any work)."""
    if config.gate_mode in ("random", "uniform_random"):
        return
    from .gates import load_base_tokenizer, tokenize_prompts

    tokenizer = load_base_tokenizer(base.model_dir, base.gguf_file, config.tokenizer_source)
    for group, experts in (("experts", config.experts), ("shared_experts", config.shared_experts)):
        for index, expert in enumerate(experts):
            try:
                tokenize_prompts(tokenizer, [*expert.positive_prompts, *expert.negative_prompts])
            except ValueError as error:
                raise ValueError(f"{group}[{index}] ({expert.source_model}): {error}") from error


def _router_rows(config: MergeConfig, base: DenseSource, device: str) -> tuple[Tensor, Tensor | None, list[int]]:
    """Routed rows [L, E, H], the shared experts' rows [L, N, H] (when they get some) and ill-conditioned layers."""
    from .gates import ExpertPrompts, compute_gate_weights, ill_conditioned_layers

    with_shared = bool(config.shared_experts) and (config.shared_have_prompts
                                                   or config.gate_mode in ("random", "uniform_random"))
    specs = config.experts + (config.shared_experts if with_shared else [])
    prompts = [ExpertPrompts(list(e.positive_prompts), list(e.negative_prompts)) for e in specs]
    gates = compute_gate_weights(base.model_dir, prompts, config.gate_mode, num_layers=base.num_layers,
                                 hidden_size=base.hidden_size, gguf_file=base.gguf_file,
                                 tokenizer_path=config.tokenizer_source, dtype=WEIGHT_DTYPES[config.gate_dtype],
                                 device=device, seed=config.seed)
    expected = (base.num_layers, len(specs), base.hidden_size)
    if tuple(gates.shape) != expected:  # pragma: no cover - guards the interface with moekit.interop.gates
        raise RuntimeError(f"compute_gate_weights returned shape {tuple(gates.shape)}, expected {expected}")
    gates = gates.float()
    # centred: a direction shared by every row moves all logits alike and decides nothing; mergekit's plain test
    # flags nearly every layer of a real model for it (30 of 30 on SmolLM2, benchmarks/bench_merge.py)
    bad = ill_conditioned_layers(gates, centred=True) if len(specs) > 1 else []
    routed = gates[:, : len(config.experts)].contiguous()
    shared = gates[:, len(config.experts):].contiguous() if with_shared else None
    return routed, shared, bad


def merge(config: MergeConfig | str | os.PathLike[str] | dict[str, Any], out: str | os.PathLike[str], *,
          dry_run: bool = False, device: str = "cpu", overwrite: bool = False, for_further_training: bool = False,
          max_shard_bytes: int = DEFAULT_MERGE_SHARD_BYTES, progress: bool = True) -> MergePlan:
    """Merge dense models into an MoE checkpoint as a mergekit-moe config describes.

    Args:
        config: a `MergeConfig`, a YAML file path, or the mapping (see `moekit.interop.merge_config`).
        out: the folder to create; it must not exist or be empty unless `overwrite`.
        dry_run: check everything (config, models, shapes, layout, tokenised prompts, destination) and return the
            plan without computing routers or writing anything.
        device: where the router initialisation runs the base model (``"cpu"`` or ``"cuda"``).
        overwrite: replace a non-empty `out` that moekit wrote (it holds ``moekit_output.json`` and only the
            files that lists; see `moekit.interop.outputs`); the old folder stays until the new one is complete.
            `out` may never be, contain or lie inside a model or tokenizer folder the merge reads.
        for_further_training: accept experts that all come from one model or share their prompts (the model is
            meant to be trained after merging); same as the YAML key.
        max_shard_bytes: largest safetensors file; more weights are split into shards with an index.
        progress: show progress bars.

    Returns:
        The `MergePlan`; `out` is set to the written folder unless `dry_run`.

    Raises:
        ValueError: a bad config (named key and value), an unsupported or mismatched model (named tensor and both
            shapes), a layout that cannot hold the models, or an `out` that overlaps an input.
        FileNotFoundError: a model, the config file or the tokenizer source is missing.
        FileExistsError: `out` exists and is not empty, and `overwrite` is False; or it is a folder moekit did not
            write, or a training run.
        StorageError: the disk filled up or the destination is read-only (one line; nothing is left behind).

    Warns:
        UserWarning: an expert model's vocabulary (tokenizer.json or vocab_size) differs from the base model's.
    """
    if not isinstance(config, MergeConfig):
        config = load_merge_config(config, for_further_training=for_further_training)
    elif for_further_training and not config.for_further_training:
        config.for_further_training = True
        config.validate()
    check_max_shard_bytes(max_shard_bytes)
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device={device!r} is not allowed; use cpu or cuda")
    inputs = merge_inputs(config)
    check_destination(Path(out).expanduser().absolute(), overwrite, "merge", inputs)  # before any work
    base, experts, shared = _open_models(config)
    default = choose_architecture(base.family, len(config.shared_experts), config.shared_have_prompts,
                                  config.architecture)

    def make(architecture: str) -> MoEBuild:
        return MoEBuild(
            architecture=architecture, base=base,
            experts=[FFNPart(src, down_scale=spec.residual_scale if spec.residual_scale is not None else 1.0,
                             noise=spec.noise_scale or 0.0, seed=config.seed * 1000 + index)
                     for index, (src, spec) in enumerate(zip(experts, config.experts, strict=True))],
            shared=[FFNPart(src, down_scale=spec.residual_scale if spec.residual_scale is not None else 1.0,
                            noise=spec.noise_scale or 0.0, seed=config.seed * 1000 + 500 + index)
                    for index, (src, spec) in enumerate(zip(shared, config.shared_experts, strict=True))],
            experts_per_token=config.experts_per_token, dtype=resolve_dtype(config.dtype, base.weight_dtype, "merge"),
            shared_gated=_shared_gated(config, architecture))

    build, layout_note = fitting_build(default, config.architecture is not None, make)
    _check_prompts_tokenise(config, base)
    if config.tokenizer_source is not None and not Path(config.tokenizer_source).is_dir():
        raise FileNotFoundError(f"tokenizer_source {config.tokenizer_source!r} is not a directory")
    plan = _plan(build, _entries(build), max_shard_bytes, config.gate_mode)
    if layout_note:
        plan.notes.append(layout_note)
    if dry_run:
        return plan
    build.router, shared_rows, bad = _router_rows(config, base, device)
    if bad:
        names = ", ".join(str(i) for i in bad)
        message = (f"router rows of layer(s) {names} are nearly linearly dependent (ill-conditioned, after removing "
                   "the direction all rows share): some experts will rarely be told apart; make the experts' prompts "
                   "more distinct")
        warnings.warn(message, stacklevel=2)
        plan.notes.append(message)
    if build.shared_gated and shared_rows is not None:  # the prompts' rows (their mean) gate the shared experts
        build.shared_gate = shared_rows.mean(dim=1)
    plan.out = write_build(build, out, tokenizer_source=config.tokenizer_source, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes, progress=progress, caller="merge", inputs=inputs)
    return plan
