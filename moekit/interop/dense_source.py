"""Dense Hugging Face models as merge and upcycle inputs, read one tensor at a time.

`open_dense(path)` opens a Llama, Mistral, Qwen2 or Qwen3 style causal LM given as

- a directory of safetensors weights (``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
  with its ``config.json``: tensors are read lazily with plain positioned file reads (no memory map, so pages of
  a model that were read once do not stay in the process's resident memory);
- a ``.gguf`` file that transformers can read: transformers dequantises it into a full model
  (`from_pretrained(dir, gguf_file=...)`), so a GGUF input is held in memory whole, as float32. Streaming does
  not apply to it.

The model's config is read by its family (`moekit.families`), so a dense base is refused for exactly what moekit
cannot compute (and the tensors it must have are the family's tensor map of that config). `check_same_shapes`
compares the tensors a merge takes from each model and names the first one that differs.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..families import DENSE_FAMILIES, FAMILIES, MOE_TYPES
from ..families.tensor_map import hf_name, moekit_shapes
from .dtypes import SAFETENSORS_DTYPES, WEIGHT_DTYPES

__all__ = ["DENSE_FAMILIES", "DenseSource", "check_same_shapes", "check_tensors", "open_dense", "required_tensors"]

@dataclass
class _TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """The tensor table of one safetensors file (its JSON header), without reading any tensor data."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file: unreadable header ({error})") from error
    table: dict[str, _TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {meta['dtype']}, which moekit does not read")
        begin, end = meta["data_offsets"]
        table[name] = _TensorInfo(path, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + length + begin,
                                  8 + length + end)
    return table


def _read_tensor(info: _TensorInfo) -> Tensor:
    size = info.stop - info.start
    buffer = bytearray(size)
    if size:
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            view, done = memoryview(buffer), 0
            while done < size:
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{info.file} is truncated: tensor data ends early")
                done += got
    flat = torch.frombuffer(buffer, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    return flat.view(info.dtype).reshape(info.shape)


@dataclass
class DenseSource:
    """One dense input model: its transformers config and lazy access to its tensors by HF name.

    Attributes:
        path: the directory, or the ``.gguf`` file.
        config: the model's transformers config as a dict (`PretrainedConfig.to_dict()`, so RoPE settings are in
            transformers 5's `rope_parameters` form whatever the file's version).
        family: `model_type`, one of `DENSE_FAMILIES`.
        model_config: the moekit `ModelConfig` computing this model (its family's reading of `config`).
        gguf_file: the GGUF file name inside `path.parent` when the model is a GGUF file, else None.
        cache_size: how many recently read tensors to keep (upcycling reads one layer's FFN for every expert).
    """

    path: Path
    config: dict[str, Any]
    family: str
    model_config: ModelConfig
    gguf_file: str | None = None
    cache_size: int = 0
    _table: dict[str, _TensorInfo] = field(default_factory=dict, repr=False)
    _state: dict[str, Tensor] | None = field(default=None, repr=False)
    _cache: OrderedDict[str, Tensor] = field(default_factory=OrderedDict, repr=False)

    @property
    def model_dir(self) -> Path:
        """The directory transformers loads from (the GGUF file's folder for a GGUF input)."""
        return self.path.parent if self.gguf_file else self.path

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def intermediate_size(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden_size // int(self.config["num_attention_heads"]))

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint."""
        return list(self._state) if self._state is not None else list(self._table)

    def has(self, name: str) -> bool:
        return name in (self._state if self._state is not None else self._table)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` (read from the header; nothing is loaded)."""
        if self._state is not None:
            return tuple(self._state[name].shape)
        return self._table[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype if self._state is not None else self._table[name].dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the config declares (``dtype`` or ``torch_dtype``) when it is one of `WEIGHT_DTYPES`, else the
        one the input embedding is stored in."""
        declared = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(declared, torch.dtype):
            return declared
        name = str(declared).removeprefix("torch.") if declared else None
        return WEIGHT_DTYPES[name] if name in WEIGHT_DTYPES else self.dtype("model.embed_tokens.weight")

    def get(self, name: str) -> Tensor:
        """Tensor `name` in its stored dtype, as a CPU tensor (the last `cache_size` are kept)."""
        if not self.has(name):
            raise KeyError(f"{self.path} has no tensor {name!r}")
        if self._state is not None:
            return self._state[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        tensor = _read_tensor(self._table[name])
        if self.cache_size:
            self._cache[name] = tensor
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return tensor

    def release(self) -> None:
        """Drop cached tensors."""
        self._cache.clear()

    def hf_name(self, name: str) -> str:
        """The checkpoint name of moekit's tensor `name` in this model (its family's tensor map)."""
        return hf_name(FAMILIES[self.family], self.model_config, name)[0]

    def mlp_name(self, layer: int, proj: str) -> str:
        """The checkpoint name of layer `layer`'s FFN projection `proj` (gate_proj, up_proj or down_proj)."""
        return self.hf_name(f"layers.{layer}.mlp.{proj}.weight")


def _load_config(model_dir: Path, gguf_file: str | None) -> dict[str, Any]:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - transformers is in the dev and hf extras
        raise ImportError("merging Hugging Face models needs transformers: pip install 'moekit[hf]'") from error
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read the model config of {model_dir / (gguf_file or 'config.json')}: {error}") \
            from error
    return config.to_dict()


def _check_family(config: dict[str, Any], where: Path) -> tuple[str, ModelConfig]:
    """The dense family and moekit config of a model, or a ValueError saying why it cannot be merged."""
    model_type = config.get("model_type")
    if model_type in MOE_TYPES:
        raise ValueError(f"{where} is a Mixture-of-Experts model (model_type {model_type!r}); merge and upcycle "
                         f"take dense models: {', '.join(DENSE_FAMILIES)}")
    if model_type not in DENSE_FAMILIES:
        raise ValueError(f"{where} has model_type {model_type!r}, which moekit cannot merge; supported dense "
                         f"families: {', '.join(DENSE_FAMILIES)}")
    return str(model_type), FAMILIES[model_type].read_config(config, str(where))


def _load_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Config and float32 state dict of a GGUF model, dequantised whole by transformers."""
    from .gates import load_dense_model

    try:
        model = load_dense_model(path.parent, path.name, dtype=torch.float32)
    except ImportError as error:
        raise ImportError(f"reading {path} needs the gguf package: pip install gguf ({error})") from error
    return model.config.to_dict(), {name: t.detach() for name, t in model.state_dict().items()}


def open_dense(path: str | os.PathLike[str]) -> DenseSource:
    """Open a dense model directory (safetensors) or ``.gguf`` file; check it is a supported family.

    Raises:
        FileNotFoundError: nothing at `path` (a Hub id gets a hint on downloading it).
        ValueError: not a supported dense model, or weights in a format moekit does not read.
    """
    where = Path(path).expanduser()
    if not where.exists():
        hint = ""
        if not str(path).startswith((".", "/", "~")) and str(path).count("/") == 1:
            hint = (f"; moekit reads local models only: download it first, e.g. `huggingface-cli download {path} "
                    f"--local-dir models/{str(path).split('/')[-1]}`")
        raise FileNotFoundError(f"model {str(path)!r} not found{hint}")
    if where.is_file():
        if where.suffix != ".gguf":
            raise ValueError(f"{where} is a file but not a .gguf file; pass a model directory or a .gguf file")
        config, state = _load_gguf(where)
        family, model_config = _check_family(config, where)
        return DenseSource(where, config, family, model_config, gguf_file=where.name, _state=state)
    if not (where / "config.json").is_file():
        raise FileNotFoundError(f"{where} has no config.json; pass a Hugging Face model directory")
    index = where / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        files = sorted({where / name for name in weight_map.values()})
    elif (where / "model.safetensors").is_file():
        files = [where / "model.safetensors"]
    else:
        pickles = sorted(p.name for p in where.glob("*.bin"))
        what = f" (it has {', '.join(pickles)}: PyTorch pickles)" if pickles else ""
        raise ValueError(f"{where} has no safetensors weights{what}; convert it with transformers: "
                         "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{where}: shard {missing[0].name} listed in the index is missing")
    config = _load_config(where, None)
    family, model_config = _check_family(config, where)
    table: dict[str, _TensorInfo] = {}
    for file in files:
        table.update(_read_header(file))
    return DenseSource(where, config, family, model_config, _table=table)


def required_tensors(source: DenseSource, *, mlp: bool, rest: bool) -> list[str]:
    """Checkpoint names a merge reads from `source`: its FFNs (`mlp`) and/or everything else (`rest`)."""
    names = []
    for name in moekit_shapes(source.model_config):
        is_mlp = name.startswith("layers.") and ".mlp." in name
        if (mlp and is_mlp) or (rest and not is_mlp):
            names.append(source.hf_name(name))
    return names


def check_tensors(source: DenseSource, names: list[str]) -> None:
    """Raise `ValueError` naming the first tensor of `names` that `source` lacks."""
    for name in names:
        if not source.has(name):
            raise ValueError(f"{source.path} has no tensor {name!r}, which a {source.family} model should have; "
                             "is the checkpoint complete?")


def check_same_shapes(reference: DenseSource, other: DenseSource, names: list[str]) -> None:
    """Raise `ValueError` naming the first tensor of `names` whose shape differs between the two models."""
    for name in names:
        if not other.has(name):
            raise ValueError(f"{other.path} has no tensor {name!r} (present in {reference.path}); all models of a "
                             "merge must have the same shapes")
        if other.shape(name) != reference.shape(name):
            raise ValueError(f"tensor {name} has shape {tuple(other.shape(name))} in {other.path} but "
                             f"{tuple(reference.shape(name))} in {reference.path}; all models of a merge must have "
                             "the same shapes")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        if reference.config.get(key) != other.config.get(key):
            raise ValueError(f"{other.path} does not have the shape of {reference.path}: {key} is "
                             f"{other.config.get(key)} there and {reference.config.get(key)} in {reference.path}; "
                             "all models of a merge must have the same shapes")
