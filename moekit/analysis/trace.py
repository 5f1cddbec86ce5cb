"""Routing traces: every analysed token's chosen experts and weights per MoE layer, in one safetensors file.

`moekit analyze --save-trace` writes OUT/trace.safetensors with the layout serving engines use for "routed
experts" (tokens x layers x k):

    expert_index   [N, L, k] int32    the experts each token chose at each MoE layer, first choice first
    weights        [N, L, k] float32  their combine weights
    token_ids      [N] int64          the token ids
    positions      [N] int32          each token's position in its window
    domains        [N] int32          each token's domain index (only when the analysis had domains)
    batch_tokens   [B] int64          how many tokens each forward held (MaxVio_batch and drops are per forward)

and in the header's metadata: "format" = "moekit-trace/1", and JSON texts "moe_layers", "model", "data",
"domains", "token_text" (the text of every id that occurs, so the analysis needs no tokenizer).
While the analysis runs, each tensor is appended to a spill file, so memory does not grow with the tokens; the
safetensors file is assembled at the end, one tensor at a time, and appears by one rename.

`analyze_trace(path)` recomputes the analysis from a trace alone, batch by batch as it was recorded, so every
number equals the original analysis's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import fsync_dir, fsync_file, temp_sibling

__all__ = ["TRACE_FORMAT", "TraceWriter", "analyze_trace", "read_trace"]

TRACE_FORMAT = "moekit-trace/1"
_SPILLED = {"expert_index": torch.int32, "weights": torch.float32, "token_ids": torch.int64,
            "positions": torch.int32, "domains": torch.int32, "batch_tokens": torch.int64}


class TraceWriter:
    """Appends each batch's routing to spill files; `finish` assembles trace.safetensors, `abandon` removes all."""

    def __init__(self, path: Path, moe_layers: list[int], top_k: int) -> None:
        self.path, self.moe_layers, self.top_k = Path(path), list(moe_layers), top_k
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spill = temp_sibling(self.path, "spill")
        self.spill.mkdir()
        self._files = {name: open(self.spill / name, "wb") for name in _SPILLED}
        self._rows = dict.fromkeys(_SPILLED, 0)
        self.tokens = 0
        self.has_domains = False

    def _append(self, name: str, tensor: Tensor) -> None:
        tensor = tensor.detach().to("cpu", _SPILLED[name]).contiguous()
        if tensor.numel():
            self._files[name].write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._rows[name] += tensor.shape[0]

    def add(self, routing: dict[int, tuple[Tensor, Tensor]], token_ids: Tensor, positions: Tensor,
            domains: Tensor | None) -> None:
        """One forward: {layer: (expert_index [N, k], weights [N, k])} and the N tokens' ids, positions, domains."""
        self._append("expert_index", torch.stack([routing[layer][0] for layer in self.moe_layers], dim=1))
        self._append("weights", torch.stack([routing[layer][1] for layer in self.moe_layers], dim=1))
        self._append("token_ids", token_ids)
        self._append("positions", positions)
        if domains is not None:
            self.has_domains = True
            self._append("domains", domains)
        self._append("batch_tokens", torch.tensor([token_ids.numel()]))
        self.tokens += token_ids.numel()

    def finish(self, analysis: dict[str, Any], decode, vocab_size: int) -> Path:
        """Write trace.safetensors (atomically) with the metadata taken from `analysis`; remove the spill files."""
        from ..interop.writer import TensorEntry, stream_safetensors

        for handle in self._files.values():
            handle.close()
        layers, k = len(self.moe_layers), self.top_k
        shapes = {"expert_index": (self.tokens, layers, k), "weights": (self.tokens, layers, k),
                  "token_ids": (self.tokens,), "positions": (self.tokens,), "domains": (self.tokens,),
                  "batch_tokens": (self._rows["batch_tokens"],)}
        names = [name for name in _SPILLED if name != "domains" or self.has_domains]

        def reader(name: str):
            count = int(torch.tensor(shapes[name]).prod())
            return lambda: torch.from_file(str(self.spill / name), size=count,
                                           dtype=_SPILLED[name]).reshape(shapes[name])

        entries = [TensorEntry(name, shapes[name], _SPILLED[name], reader(name)) for name in names]
        ids = torch.from_file(str(self.spill / "token_ids"), size=self.tokens, dtype=torch.int64).unique().tolist()
        metadata = {"format": TRACE_FORMAT, "moe_layers": json.dumps(self.moe_layers),
                    "num_experts": str(analysis["model"]["num_experts"]), "top_k": str(k),
                    "block_size": str(analysis["data"]["block_size"]),
                    "model": json.dumps(analysis["model"]), "data": json.dumps(analysis["data"]),
                    "domains": json.dumps(analysis["data"]["domains"]), "vocab_size": str(vocab_size),
                    "token_text": json.dumps({str(i): decode(i) for i in ids}, ensure_ascii=False)}
        tmp = temp_sibling(self.path)
        try:
            stream_safetensors(entries, tmp, metadata=metadata)
            fsync_file(tmp)
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
            shutil.rmtree(self.spill, ignore_errors=True)
        return self.path

    def abandon(self) -> None:
        """Remove the spill files (an analysis that failed leaves no partial trace)."""
        for handle in self._files.values():
            handle.close()
        shutil.rmtree(self.spill, ignore_errors=True)


def read_trace(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata with its JSON values decoded) of a trace; ValueError for a file that is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the trace.safetensors `moekit analyze --save-trace` wrote")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a safetensors file ({error}); pass a trace written by --save-trace") \
            from None
    if raw.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path} is not a moekit routing trace (format {raw.get('format')!r}, expected "
                         f"{TRACE_FORMAT!r})")
    meta: dict[str, Any] = dict(raw)
    for key in ("moe_layers", "model", "data", "domains", "token_text"):
        meta[key] = json.loads(raw[key])
    for key in ("num_experts", "top_k", "block_size", "vocab_size"):
        meta[key] = int(raw[key])
    return tensors, meta


def analyze_trace(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                  capacity_factor: float = 1.0, permutations: int = 100, seed: int = 0,
                  figures: bool = True) -> dict[str, Any]:
    """The analysis of a saved trace, computed without the model, forward by forward as recorded."""
    from .analyze import RoutingAnalysis, write_outputs

    tensors, meta = read_trace(path)
    text = meta["token_text"]
    analysis = RoutingAnalysis(meta["num_experts"], meta["top_k"], meta["moe_layers"], meta["block_size"],
                               capacity_factor, meta["domains"], lambda i: text.get(str(i), f"<{i}>"))
    start = 0
    for count in tensors["batch_tokens"].tolist():
        rows = slice(start, start + count)
        routing = {layer: (tensors["expert_index"][rows, j].long(), tensors["weights"][rows, j])
                   for j, layer in enumerate(meta["moe_layers"])}
        domains = tensors["domains"][rows].long() if "domains" in tensors else None
        analysis.add(routing, tensors["token_ids"][rows], tensors["positions"][rows].long(), domains)
        start += count
    model = dict(meta["model"], source=meta["model"]["source"], trace=str(path))
    data = {key: value for key, value in meta["data"].items() if key in ("source", "batch_size")}
    result = analysis.result(model, data, permutations, seed)
    if out is not None:
        write_outputs(result, Path(out), figures=figures)
    return result
