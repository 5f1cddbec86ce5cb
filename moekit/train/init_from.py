"""Starting a run from a Hugging Face checkpoint folder (`train.init_from`): its weights, config and tokenizer.

The folder is what `moekit merge` or `moekit upcycle` writes, or any checkpoint of a family moekit reads
(`moekit.interop.load_hf`): then its config.json becomes the run's moekit model section, and only the fields in
:data:`INIT_FROM_MOE_FIELDS` may differ, since they change how the model trains, not what its weights mean.

Any other transformers MoE folder (or any folder, with `train.backend=transformers`) is trained as transformers'
own class (`moekit.hf.HFCausalLM`): the model section is then an `HFModelConfig` holding the folder's config.json
and moekit's balancing settings. `train.backend=auto` takes moekit's model where `load_hf` reads the folder.
Everything here runs before the run directory is touched, so a bad folder loses nothing.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import HFModelConfig, ModelConfig
from ..model import MoETransformer
from .config import apply_overrides

INIT_FROM_MOE_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "importance_loss_coef", "load_loss_coef",
                        "seq_aux_loss_coef", "aux_free_bias_update_rate", "router_jitter_noise", "capacity_factor",
                        "expert_backend")
"""`model.moe` fields a run started from `train.init_from` may set differently from the checkpoint: balancing,
jitter, capacity and the expert backend change how the model trains, not the shape or meaning of its weights.
Every other model field comes from the checkpoint's config.json and is refused if it differs."""


def _init_path(init_from: str) -> Path:
    """The `train.init_from` folder, checked before anything is read or written."""
    path = Path(init_from).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"train.init_from={init_from!r} does not exist; pass the folder that `moekit merge` "
                                "or `moekit upcycle` wrote (or another mixtral, qwen2_moe, glm4_moe or llama "
                                "checkpoint folder)")
    if not path.is_dir():
        raise ValueError(f"train.init_from={init_from!r} is a file, not a folder; pass the checkpoint folder "
                         "(the one holding config.json, the safetensors weights and tokenizer.json)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"train.init_from={init_from!r} has no config.json; pass a Hugging Face checkpoint "
                                "folder (config.json, the safetensors weights and tokenizer.json)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"train.init_from={init_from!r} has no tokenizer.json, which moekit train reads as "
                                "the model's tokenizer; copy the base model's tokenizer files (tokenizer.json, "
                                "tokenizer_config.json) into it")
    return path


def load_init_model(init_from: str) -> MoETransformer:
    """`load_hf(init_from)` in float32, with errors that name `train.init_from`."""
    from ..interop import load_hf

    path = _init_path(init_from)
    try:
        return load_hf(path, dtype=torch.float32)
    except (ValueError, FileNotFoundError) as err:
        message = str(err).removeprefix("load_hf: ")
        raise type(err)(f"train.init_from={init_from!r} cannot be loaded: {message}") from err


def _folder_config(path: Path) -> dict[str, Any]:
    """The folder's config.json as a mapping with a model_type."""
    try:
        values = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"train.init_from={str(path)!r}: its config.json cannot be read ({error})") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ValueError(f"train.init_from={str(path)!r}: its config.json has no model_type; pass a Hugging Face "
                         "checkpoint folder")
    return values


def choose_train_backend(init_from: str, backend: str) -> tuple[str, MoETransformer | None, str | None]:
    """("moekit" or "transformers", the moekit model when that is the choice, why "auto" chose transformers)."""
    if backend == "transformers":
        _init_path(init_from)
        return "transformers", None, None
    if backend == "moekit":
        return "moekit", load_init_model(init_from), None
    try:
        return "moekit", load_init_model(init_from), None
    except ValueError as error:  # a family moekit does not convert, or a feature of it moekit refuses
        return "transformers", None, str(error)


def init_from_values(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A run config dict whose model section is `train.init_from`'s, with `overrides` applied on top.

    `values` is a preset or config file (a dict with `model` and `train` sections); `train.init_from` comes
    from it or from `overrides` (`KEY=VALUE` items, as for :func:`moekit.train.config.apply_overrides`). Without
    `init_from` this is `apply_overrides(values, overrides)`. With it, the model section is replaced by the
    checkpoint's configuration before the overrides apply, so `model.moe.router_aux_loss_coef=0.01` adds a
    balancing loss to the checkpoint's router, while a field outside :data:`INIT_FROM_MOE_FIELDS` that differs is
    refused by `Trainer`. `train.init_from` is made absolute and the run is named after the folder. Use it for a
    new run only; a resumed run's config.json already holds the model section.

    `train.backend` (from `values` or `overrides`) decides the kind of model section: moekit's `ModelConfig`, or
    for transformers' own class an `HFModelConfig` (`model.router_aux_loss_coef=...` then sets its balancing).
    """
    train = {"train": dict(values.get("train") or {})}
    early = [item for item in overrides if item.split("=", 1)[0].strip() in ("train.init_from", "train.backend")]
    early_train = apply_overrides(train, early)["train"]
    init_from = early_train.get("init_from")
    if init_from is None:
        return apply_overrides(values, list(overrides))
    path = Path(str(init_from)).expanduser().resolve()
    backend, native, reason = choose_train_backend(str(init_from), str(early_train.get("backend", "auto")))
    fresh = copy.deepcopy(values)
    if backend == "moekit":
        fresh["model"] = native.config.to_dict()
    else:
        if reason is not None:
            print(f"moekit train: {path.name} is trained as transformers' own class (train.backend=auto): {reason}",
                  file=sys.stderr)
        fresh["model"] = {"hf_config": _folder_config(path)}
        fresh.setdefault("train", {})
    fresh["train"] = {**(fresh.get("train") or {}), "backend": backend}
    fresh["name"] = path.name  # the preset's name would describe another model; `name=...` still wins
    fresh = apply_overrides(fresh, [item for item in overrides if item.split("=", 1)[0].strip() != "train.backend"])
    fresh["train"]["init_from"] = str(path)  # the run records where it came from
    return fresh


def _init_from_mismatches(given: ModelConfig, loaded: ModelConfig) -> list[str]:
    """Fields of `given` that differ from the checkpoint's `loaded` config and may not."""
    mine, theirs = given.to_dict(), loaded.to_dict()
    my_moe, their_moe = mine.pop("moe"), theirs.pop("moe")
    problems = [f"model.{key}={mine[key]!r} (the checkpoint has {theirs[key]!r})"
                for key in mine if mine[key] != theirs[key]]
    if (my_moe is None) != (their_moe is None):
        problems.append(f"model.moe={'null' if my_moe is None else 'a section'} (the checkpoint is "
                        f"{'dense' if their_moe is None else 'an MoE'})")
    elif my_moe is not None:
        problems += [f"model.moe.{key}={my_moe[key]!r} (the checkpoint has {their_moe[key]!r})"
                     for key in my_moe if key not in INIT_FROM_MOE_FIELDS and my_moe[key] != their_moe[key]]
    return problems


def build_model(config: ModelConfig | HFModelConfig):
    """A freshly initialised model for a model section: `MoETransformer`, or transformers' class for an HF section."""
    if isinstance(config, HFModelConfig):
        from ..hf.causal_lm import build_from_config

        return build_from_config(config)
    return MoETransformer(config)


def model_from_checkpoint(config: ModelConfig | HFModelConfig, init_from: str):
    """A model of `config` holding the weights of `init_from` (float32)."""
    if isinstance(config, HFModelConfig):
        return _hf_model_from_checkpoint(config, init_from)
    loaded = load_init_model(init_from)
    problems = _init_from_mismatches(config, loaded.config)
    if problems:
        raise ValueError(f"train.init_from={init_from!r}: the run's model section must be the checkpoint's, but "
                         f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}. The checkpoint's weights "
                         "fix these; only model.moe." + ", model.moe.".join(INIT_FROM_MOE_FIELDS) + " may change. "
                         "Build the config with moekit.train.init_from.init_from_values (the CLI does) or drop the "
                         "override")
    if loaded.config.moe is None:
        warnings.warn(f"train.init_from={init_from!r} is a dense model (no MoE layers); it is trained as a dense "
                      "model. To train an MoE, pass the folder `moekit merge` or `moekit upcycle` wrote",
                      stacklevel=3)
    model = MoETransformer(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    # an aux-free rate switched on gives a router a selection bias the checkpoint lacks: it starts at zero
    missing = [name for name in result.missing_keys if not name.endswith("router.e_score_correction_bias")]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise ValueError(f"train.init_from={init_from!r}: tensor {name!r} is "
                         f"{'missing from' if missing else 'not used by'} the model the run config describes; "
                         "drop the model.moe override that changes it")
    return model


def _hf_model_from_checkpoint(config: HFModelConfig, init_from: str):
    """transformers' class loaded from `init_from`, whose config.json must be the run's `model.hf_config`."""
    from ..hf.causal_lm import load_from_folder

    path = _init_path(init_from)
    if _folder_config(path) != config.hf_config:
        raise ValueError(f"train.init_from={init_from!r}: its config.json is not the run's model.hf_config; the "
                         "checkpoint's weights fix the model: build the config with "
                         "moekit.train.init_from.init_from_values (the CLI does), changing only the balancing fields")
    try:
        return load_from_folder(str(path), config)
    except ValueError as error:
        raise ValueError(f"train.init_from={init_from!r} cannot be loaded: {error}") from error
