"""Export a `MoETransformer` as a Hugging Face transformers checkpoint, and load such checkpoints back.

`export_hf(model, out_dir)` writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads
with the library's own classes (no remote code) and that computes the same logits as the moekit model.
`load_hf(path)` reads a checkpoint folder of any native family into a `MoETransformer` computing what transformers
computes. Neither imports transformers: the files are plain JSON and safetensors.

Everything a format knows lives in its family module (`moekit.families`): the config mapping both ways, which
layers are MoE, the tensor map, and the refusals. `format=` is a family's `model_type`:

- MoE: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``glm4_moe``, ``deepseek_v3`` (multi-head latent
  attention: moekit models with `ModelConfig.mla`), ``gpt_oss``;
- dense: ``llama``, ``mistral``, ``qwen2``, ``qwen3``;
- ``auto`` (default): the first of mixtral, qwen2_moe, glm4_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss (dense:
  llama, mistral, qwen2, qwen3) that computes the model exactly.

Where a family computes the same function with other tensors, export writes those (and `load_hf` undoes it for a
folder moekit wrote): a `routed_scaling_factor` with softmax routing is folded into the experts' `down_proj`; an
ungated shared expert is written into Qwen2-MoE with a zero gate (sigmoid(0) = 1/2) and a doubled `down_proj`;
a missing shared expert as one of width 0; a DeepSeek-style shared width that is not a multiple of the expert width
is padded with zero units. Routers no transformers architecture computes (`noisy_topk`, `expert_choice`, `soft`,
`hierarchical`), token dropping (`capacity_factor`), device-limited routing, GELU experts and anything else a
family cannot hold are refused with a `ValueError` that says why and which format fits.

Checkpoints use the tensor layout transformers' own `save_pretrained` writes (one tensor per expert projection
where the family's conversion mapping fuses them on load; GPT-OSS's fused, transposed, interleaved experts).
`config.json` carries both the old and the new spellings of the RoPE and dtype fields, and a ``"moekit"`` entry
with the original `ModelConfig`, so `load_hf` restores the exact moekit configuration (router name, balancing
coefficients, unpadded shared width...) when the checkpoint still matches it, and otherwise builds the configuration
from the transformers fields.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import write_json
from ..config import ModelConfig
from ..families import DENSE_FAMILIES, FAMILIES, Family, family_for
from ..families.base import DictSource, StateSource
from ..families.equivalence import canonical, function_differences
from ..families.problems import universal_problems
from ..families.tensor_map import export_tensors, load_state
from ..model.transformer import MoETransformer
from .dtypes import dtype_name, resolve_dtype
from .writer import DEFAULT_MAX_SHARD_BYTES, TensorEntry, check_destination, write_atomically, write_weights

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "EXPORT_FORMATS", "TOKENIZER_FILES", "export_hf", "export_plan", "load_hf"]

#: MoE formats in the order `format="auto"` tries them (the first that computes the model exactly wins)
AUTO_MOE_ORDER = ("mixtral", "qwen2_moe", "glm4_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
EXPORT_FORMATS = ("auto", *AUTO_MOE_ORDER, *DENSE_FAMILIES)
"""Values `export_hf` accepts for `format`."""

METADATA_KEY = "moekit"
"""Key of the moekit entry in an exported `config.json`."""

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "moekit_tokenizer.json",
)
"""Tokenizer files copied into an exported, merged or upcycled folder when present."""
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
_EOS_TOKEN = "<|endoftext|>"

# ============================================================================================== export: the plan
@dataclass
class ExportPlan:
    """What writing a moekit config in one family takes: the family, the config it writes, and its config.json."""

    family: Family
    config: ModelConfig  # the config the family expresses natively (export_config of the model's)
    hf_config: dict[str, Any]


def _family_problems(family: Family, config: ModelConfig, source: StateSource | None = None) -> list[str]:
    problems = family.problems(canonical(config))
    if problems:
        return problems
    if source is not None:
        try:
            family.export_source(config, source)
        except ValueError as error:
            return [str(error)]
    written = family.export_config(config)
    try:
        read_back = family.read_config(family.write_config(written), "export")
    except ValueError as error:
        return [f"its config.json would not read back ({error})"]
    differences = function_differences(written, read_back)
    if differences:  # a family's writer and reader disagree: never write what would load as another model
        return [f"its config.json would read back as another model ({'; '.join(differences[:3])})"]
    return []


def export_plan(config: ModelConfig, format: str = "auto", caller: str = "export_hf",
                source: StateSource | None = None) -> ExportPlan:
    """The family `config` is written as, the config it writes and its transformers fields.

    `source` (the model's tensors) lets tensor values take part in the choice (a nonzero selection bias rules out
    the families without one).

    Raises:
        ValueError: `format` cannot express `config` exactly (or, for "auto", none can), with every reason and the
            formats that fit.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"{caller}: format={format!r} is not allowed: one of {', '.join(EXPORT_FORMATS)}")
    is_moe = config.moe is not None and any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    if is_moe:
        assert config.moe is not None
        universal = universal_problems(config.moe)
        if universal:
            raise ValueError(f"{caller}: {'; '.join(universal)}")
    candidates = [format] if format != "auto" else list(AUTO_MOE_ORDER if is_moe else DENSE_FAMILIES)
    reasons = {}
    for name in candidates:
        family = FAMILIES[name]
        problems = _family_problems(family, config, source)
        if not problems:
            written = family.export_config(config)
            hf = {"architectures": [family.architecture], "model_type": family.model_type,
                  **family.write_config(written)}
            return ExportPlan(family, written, hf)
        reasons[name] = problems
    if format != "auto":
        fitting = [n for n in (*AUTO_MOE_ORDER, *DENSE_FAMILIES) if n != format
                   and not _family_problems(FAMILIES[n], config, source)]
        hint = f"; format={fitting[0]!r} (or 'auto') computes it exactly" if fitting else ""
        raise ValueError(f"{caller}: format={format!r} cannot express this model exactly: "
                         f"{'; '.join(reasons[format])}{hint}")
    detail = "\n".join(f"  {name}: {'; '.join(problems)}" for name, problems in reasons.items())
    raise ValueError(f"{caller}: no transformers architecture computes this model exactly:\n{detail}")


# ============================================================================================== export: files
@dataclass
class _TokenizerFiles:
    files: list[Path]
    bos: int | None
    eos: int | None
    write_config: dict[str, Any] | None  # a tokenizer_config.json to add, when the folder has none


def _token_id(tokenizer_json: dict[str, Any], token: str) -> int | None:
    for added in tokenizer_json.get("added_tokens") or []:
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def _tokenizer_files(tokenizer_dir: str | os.PathLike[str], max_length: int) -> _TokenizerFiles:
    """The tokenizer files of `tokenizer_dir` to copy, and the bos/eos ids they define."""
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"export_hf: tokenizer_dir={str(src)!r} is not a directory")
    files = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not files:
        raise ValueError(f"export_hf: tokenizer_dir={str(src)!r} holds no tokenizer file; expected one of "
                         f"{', '.join(TOKENIZER_FILES)}")
    if not any((src / name).is_file() for name in _HF_TOKENIZER_FILES):
        warnings.warn(f"export_hf: {src} has no tokenizer file that transformers reads (such as tokenizer.json); "
                      "the files are copied, but AutoTokenizer will not load them", stacklevel=3)
    tok_json: dict[str, Any] = {}
    if (src / "tokenizer.json").is_file():
        tok_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tok_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token_of(key: str) -> str | None:
        value = tok_config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    bos_token, eos_token = token_of("bos_token"), token_of("eos_token")
    if eos_token is None and tok_json and _token_id(tok_json, _EOS_TOKEN) is not None:
        eos_token = _EOS_TOKEN
    bos = _token_id(tok_json, bos_token) if bos_token and tok_json else None
    eos = _token_id(tok_json, eos_token) if eos_token and tok_json else None
    marker = src / "moekit_tokenizer.json"
    if eos is None and marker.is_file():  # moekit's byte tokenizer: special tokens follow the 256 bytes
        meta = json.loads(marker.read_text(encoding="utf-8"))
        specials = meta.get("special_tokens") or []
        if meta.get("type") == "byte" and _EOS_TOKEN in specials:
            eos = 256 + specials.index(_EOS_TOKEN)
    write_config = None
    if tok_json and not tok_config:
        write_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                        "clean_up_tokenization_spaces": False}
        if eos_token is not None:
            write_config["eos_token"] = eos_token
    return _TokenizerFiles(files, bos, eos, write_config)




def _read_tensors(root: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index, single = root / "model.safetensors.index.json", root / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        tensors: dict[str, Tensor] = {}
        for filename in sorted(set(weight_map.values())):
            tensors.update(load_file(str(root / filename)))
    elif single.is_file():
        tensors = load_file(str(single))
    else:
        raise FileNotFoundError(f"load_hf: {root} has no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are read)")
    return tensors





def export_hf(model: MoETransformer, out_dir: str | os.PathLike[str], format: str = "auto",
              dtype: torch.dtype | str | None = None, tokenizer_dir: str | os.PathLike[str] | None = None, *,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Write `model` as a transformers checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
        model: the moekit model.
        out_dir: the folder to create. It must not exist or be empty, unless `overwrite=True`.
        format: ``"auto"`` or a family's `model_type` (`EXPORT_FORMATS`; see the module docstring). A format that
            cannot compute the model exactly is refused with the reasons and a format that fits.
        dtype: dtype of the written weights (``torch.bfloat16``, ``"float32"``, ...); None keeps the model's.
            The selection bias `e_score_correction_bias` is always written in float32.
        tokenizer_dir: a folder whose tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...)
            are copied; its end-of-text token becomes ``eos_token_id``. A ``tokenizer.json`` without a
            ``tokenizer_config.json`` gets a minimal one naming ``PreTrainedTokenizerFast``.
        overwrite: replace a non-empty `out_dir` that moekit wrote (it holds ``moekit_output.json`` and only
            the files that lists; see `moekit.interop.outputs`). The old folder stays until the new one is
            complete. A training run or any other folder is never replaced.
        max_shard_bytes: largest safetensors file; a bigger checkpoint is split into
            ``model-0000i-of-0000n.safetensors`` files with ``model.safetensors.index.json``.
        inputs: paths this export reads (the training run, for the CLI): `out_dir` may not be, contain or lie
            inside any of them, with or without `overwrite`.

    Returns:
        The absolute path of the written folder, which holds ``config.json``, ``generation_config.json``, the
        weights and ``moekit_output.json``. Everything is written into a temporary folder next to `out_dir`
        and renamed into place, so `out_dir` never holds a partial export.

    Raises:
        ValueError: the model cannot be expressed exactly in the requested format (or in any, for
            ``"auto"``), an argument is invalid, or `out_dir` overlaps one of `inputs`.
        FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False; or it is a training run
            or a folder moekit did not write (the message names the first foreign entry).
        StorageError: the disk filled up, a file-size limit was reached, or the destination is read-only or
            forbidden (one line; the temporary folder is removed and a previous `out_dir` kept).
    """
    if not isinstance(model, MoETransformer):
        raise TypeError(f"export_hf: model must be a moekit MoETransformer, got {type(model).__name__}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"export_hf: max_shard_bytes={max_shard_bytes!r} is not allowed: a positive integer")
    state = DictSource({name: t.detach() for name, t in model.state_dict().items()})
    plan = export_plan(model.config, format, source=state)
    out_dtype = resolve_dtype(dtype, model.embed_tokens.weight.dtype, "export_hf")
    source = plan.family.export_source(model.config, state)
    check_destination(Path(out_dir).expanduser().absolute(), overwrite, "export_hf", inputs)
    tokenizer = (_tokenizer_files(tokenizer_dir, model.config.max_position_embeddings)
                 if tokenizer_dir is not None else None)
    bos = tokenizer.bos if tokenizer else None
    eos = tokenizer.eos if tokenizer else None
    hf_config = {**plan.hf_config, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None,
                 "dtype": dtype_name(out_dtype), "torch_dtype": dtype_name(out_dtype),
                 METADATA_KEY: {"format_version": 1, "format": plan.family.model_type,
                                "model_config": model.config.to_dict()}}
    generation_config = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos,
                         "pad_token_id": None, "use_cache": True}
    entries = [TensorEntry(t.name, t.shape, torch.float32 if t.float32 else out_dtype, t.make)
               for t in export_tensors(plan.family, plan.config, source)]
    needed = sum(e.nbytes for e in entries) + sum(p.stat().st_size for p in (tokenizer.files if tokenizer else []))

    def write(directory: Path) -> None:
        write_weights(directory, entries, max_shard_bytes)
        write_json(directory / "config.json", hf_config)
        write_json(directory / "generation_config.json", generation_config)
        if tokenizer is not None:
            for path in tokenizer.files:
                shutil.copyfile(path, directory / path.name)
            if tokenizer.write_config is not None:
                write_json(directory / "tokenizer_config.json", tokenizer.write_config)

    with torch.no_grad():
        return write_atomically(out_dir, overwrite, write, "export_hf", inputs=inputs, needed=needed)


# ============================================================================================== load
def _restored(family: Family, hf: dict[str, Any], inferred: ModelConfig,
              state: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The moekit config stored in config.json and its model's state, when they still describe this checkpoint.

    Raises:
        ValueError: they do not (the transformers fields or the tensors were changed after export).
    """
    meta = hf[METADATA_KEY]
    if not isinstance(meta, dict) or meta.get("format") != family.model_type or "model_config" not in meta:
        raise ValueError(f"its format is not {family.model_type!r}")
    try:
        stored = ModelConfig.from_dict(dict(meta["model_config"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"its model_config is invalid ({err})") from err
    problems = family.problems(canonical(stored))
    if problems:
        raise ValueError(f"its model_config cannot be written as {family.model_type!r} ({'; '.join(problems)})")
    differences = function_differences(family.export_config(stored), inferred)
    if differences:
        raise ValueError(f"config.json's transformers fields were changed after export ({'; '.join(differences[:3])})")
    return stored, family.restore(stored, state)


def load_hf(path: str | os.PathLike[str], dtype: torch.dtype | str | None = None) -> MoETransformer:
    """Read a transformers checkpoint folder into a `MoETransformer` (in eval mode).

    Reads ``config.json`` and ``model.safetensors`` (or the shards of ``model.safetensors.index.json``) of any
    native family (`moekit.families.FAMILIES`: mixtral, qwen2_moe, qwen3_moe, olmoe, glm4_moe, deepseek_v3, gpt_oss,
    llama, mistral, qwen2, qwen3), in the per-expert layout that `save_pretrained` writes or transformers 5's fused
    one. A folder written by `export_hf` gives back the exported moekit configuration and identical logits; for
    other checkpoints the configuration is derived from the transformers fields.

    Args:
        path: the checkpoint folder.
        dtype: dtype of the returned model's parameters; None keeps the checkpoint's.

    Raises:
        ValueError: an unsupported `model_type` or setting (the message names it and what is supported), or a
            missing, unexpected or misshapen tensor.
        FileNotFoundError: no ``config.json`` or no safetensors weights.
    """
    root = Path(path).expanduser()
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"load_hf: {root} has no config.json; pass a transformers checkpoint folder")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    where = str(root)
    try:
        family = family_for(hf.get("model_type") if isinstance(hf, dict) else None, where)
        config = family.read_config(hf, where)
        state = load_state(family, config, _read_tensors(root), where)
    except ValueError as error:
        raise ValueError(f"load_hf: {error}") from error
    if METADATA_KEY in hf:
        try:
            config, state = _restored(family, hf, config, state)
        except (ValueError, KeyError, RuntimeError) as err:
            warnings.warn(f"load_hf: {where}: the moekit entry of config.json does not describe this checkpoint "
                          f"({err}); building the configuration from the transformers fields instead", stacklevel=2)
    target = resolve_dtype(dtype, state["embed_tokens.weight"].dtype, "load_hf")
    model = MoETransformer(config).to(target)
    result = model.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:  # pragma: no cover - load_state fills exactly the model's tensors
        raise ValueError(f"load_hf: {where}: internal mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    return model.eval()
