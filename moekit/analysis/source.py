"""A model to analyse, whatever it is: a moekit run directory or a transformers MoE folder, behind one interface.

`open_routed_model(path)` returns a `RoutedModel` whose `route(input_ids, attention_mask)` runs one forward and
returns, per MoE layer, the experts each real token chose and their weights, rows in the row-major order of the
mask's real positions. moekit runs are recorded by `RoutingRecorder` (hooks on moekit's routers), transformers
folders by `moekit.hf.RoutingCapture` (hooks where every family hands its routing to its experts), so a family
transformers can load is analysed without moekit re-implementing its router.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RoutedModel", "open_routed_model"]

#: the window length used for an HF folder when the caller gives none (capped by the model's context)
DEFAULT_HF_BLOCK_SIZE = 256


@dataclass
class RoutedModel:
    """A loaded model plus what an analysis needs to feed it text and read its routing."""

    kind: str  # "moekit-run" or "hf"
    source: str
    model: nn.Module
    encode: Callable[[str], list[int]]  # text -> ids, no special tokens added
    decode_one: Callable[[int], str]  # one id -> its text
    num_experts: int
    top_k: int
    moe_layers: list[int]
    block_size: int
    vocab_size: int
    default_tokens: Callable[[], Tensor] | None = None  # the run's validation split (moekit runs)
    _route: Callable[[Tensor, Tensor | None], dict[int, tuple[Tensor, Tensor]]] = field(default=None, repr=False)

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[int, tuple[Tensor, Tensor]]:
        """One forward of `input_ids` [B, T]: {decoder layer: (expert_index [N, k] long, weights [N, k] float)}
        on the CPU, N the real tokens (mask 1) in row-major order."""
        return self._route(input_ids, attention_mask)


def open_routed_model(path: str | Path, block_size: int | None = None) -> RoutedModel:
    """Open a moekit run directory (its newest complete checkpoint) or an HF folder (config.json + weights).

    Raises FileNotFoundError for a missing path and ValueError for anything else that cannot be analysed (no MoE
    layer, a router with no per-token top-k, a folder that is neither), each naming the fix.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a moekit run directory or an HF model folder")
    from ..train.rundir import is_run_config

    if is_run_config(path):
        return _open_run(path, block_size)
    if (path / "config.json").is_file():
        return _open_hf(path, block_size)
    raise ValueError(f"{path} is neither a moekit run directory nor an HF model folder (no config.json); pass the "
                     "directory `moekit train` wrote or a folder saved by transformers' save_pretrained")


def _open_run(path: Path, block_size: int | None) -> RoutedModel:
    from ..train.data import TokenDataset
    from ..train.load import load_run
    from .record import RoutingRecorder

    run, model, tokenizer = load_run(path, what="analyse")
    if run.uses_transformers:
        raise ValueError(f"{path} trains transformers' own model class (train.init_from with a family moekit "
                         "does not build natively); export it with `moekit export` and analyse the HF folder")
    recorder = RoutingRecorder(model)  # refuses dense models and non-token-choice routers, with the reason
    moe = run.model.moe

    def route(input_ids: Tensor, attention_mask: Tensor | None) -> dict[int, tuple[Tensor, Tensor]]:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("moekit's own models take no attention mask: feed unpadded windows")
        with recorder:
            model(input_ids, router_stats=False, logits_to_keep=1)  # the routing is all we read
        return {record.layer: (record.expert_index, record.weights) for record in recorder.take()}

    def validation_tokens() -> Tensor:
        t = run.train
        prepared = TokenDataset.prepare(t.data, tokenizer, path / "data", val_fraction=t.val_fraction,
                                        block_size=t.block_size)
        return prepared.in_memory().val

    return RoutedModel("moekit-run", str(path), model, tokenizer.encode,
                       lambda i: tokenizer.decode([i]), moe.num_local_experts, moe.num_experts_per_tok,
                       [index for index, _ in recorder.layers], block_size or run.train.block_size,
                       run.model.vocab_size, validation_tokens, route)


def _open_hf(path: Path, block_size: int | None) -> RoutedModel:
    from ..hf import RoutingCapture
    from ..hf.load import load_model

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model = load_model(path).eval()
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: no tokenizer transformers can load ({error}); save the model's tokenizer in the "
                         "folder (tokenizer.save_pretrained) or analyse a trace") from None
    capture = RoutingCapture(model, logits=False)
    layers = capture.layers
    experts = {layer.num_experts for layer in layers}
    if len(experts) != 1:
        raise ValueError(f"{path}: its MoE layers have different expert counts {sorted(experts)}; moekit analyze "
                         "compares layers on one expert axis")
    context = int(config.get("max_position_embeddings") or DEFAULT_HF_BLOCK_SIZE)
    top_k = _hf_top_k(model, config, path)

    def route(input_ids: Tensor, attention_mask: Tensor | None) -> dict[int, tuple[Tensor, Tensor]]:
        capture.clear()
        capture.attention_mask = attention_mask
        with capture:
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        return {layer.layer: (layer.expert_index.long().cpu(), layer.weights.float().cpu()) for layer in layers}

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
    return RoutedModel("hf", str(path), model, encode, lambda i: tokenizer.decode([i]), experts.pop(), top_k,
                       [layer.layer for layer in layers], block_size or min(context, DEFAULT_HF_BLOCK_SIZE), vocab,
                       None, route)


def _hf_top_k(model: nn.Module, config: dict[str, Any], path: Path) -> int:
    """k, read from the config under the names the families use."""
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    for name in ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token"):
        value = getattr(text, name, None) or config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{path}: its config names no experts-per-token (num_experts_per_tok); moekit analyze needs k")
