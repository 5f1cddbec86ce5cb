"""`moekit analyze`: stream text through a model, record its routing by hooks, and write what the routers did.

    analysis = analyze("runs/tiny-mixtral", domains="texts/", tokens=200_000, out="analysis/")

The text is cut into windows of the model's block size (a domain's last, shorter window included), batched, and
fed through the model; every batch's routing goes into one `LayerAccumulator` per MoE layer and is then dropped,
so memory does not grow with the number of tokens. OUT receives `analysis.json` (format below), the PNG figures
(`figures.py`) and `routing.html` (`page.py`); `save_trace=True` also writes `trace.safetensors`
(`trace.py`), from which `analyze_trace` recomputes the same numbers without the model.

The analysis.json format is described in docs/analysis.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import atomic_write
from .accumulate import LayerAccumulator
from .source import RoutedModel, open_routed_model

__all__ = ["ANALYSIS_FORMAT", "SAMPLE_TOKENS", "RoutingAnalysis", "analyze", "read_domains", "write_outputs"]

ANALYSIS_FORMAT = "moekit-analysis/1"
#: tokens of text shown on routing.html (spread over the domains when there are several)
SAMPLE_TOKENS = 512
DEFAULT_TOKENS = 100_000


@dataclass
class Batch:
    """One forward's worth of tokens: ids [B, T], mask [B, T], and per real token its position and domain."""

    input_ids: Tensor
    attention_mask: Tensor | None
    positions: Tensor  # [N]
    domains: Tensor | None  # [N]


class RoutingAnalysis:
    """Accumulates every MoE layer's routing over batches, plus the sample routing.html shows."""

    def __init__(self, num_experts: int, top_k: int, moe_layers: list[int], block_size: int,
                 capacity_factor: float, domain_names: list[str] | None, decode) -> None:
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts, self.top_k, self.moe_layers = num_experts, top_k, list(moe_layers)
        self.block_size, self.capacity_factor, self.decode = block_size, capacity_factor, decode
        self.domain_names = domain_names
        domains = len(domain_names) if domain_names else 0
        self.layers = {layer: LayerAccumulator(layer, num_experts, top_k, block_size, capacity_factor, domains)
                       for layer in self.moe_layers}
        self.batches = 0
        self._per_domain_sample = SAMPLE_TOKENS // max(domains, 1)
        self._sample: dict[int, dict[str, Any]] = {}  # domain (or 0) -> its sampled tokens

    def add(self, routing: dict[int, tuple[Tensor, Tensor]], token_ids: Tensor, positions: Tensor,
            domains: Tensor | None) -> None:
        """One batch: `routing` {layer: (expert_index [N, k], weights [N, k])} of N real tokens with these ids,
        positions and domains ([N] each)."""
        missing = set(self.moe_layers) - set(routing)
        if missing:
            raise ValueError(f"the batch's routing lacks MoE layers {sorted(missing)}")
        for layer in self.moe_layers:
            index, weights = routing[layer]
            self.layers[layer].add(index, weights, token_ids, positions, domains)
        for here, after in zip(self.moe_layers, self.moe_layers[1:], strict=False):
            self.layers[here].add_transitions(routing[here][0][:, 0], routing[after][0][:, 0])
        self._take_sample(routing, token_ids, domains)
        self.batches += 1

    def _take_sample(self, routing, token_ids: Tensor, domains: Tensor | None) -> None:
        labels = domains.tolist() if domains is not None else [0] * token_ids.numel()
        wanted = {d for d in set(labels) if len(self._sample.get(d, {}).get("ids", [])) < self._per_domain_sample}
        for row, (token, domain) in enumerate(zip(token_ids.tolist(), labels, strict=True)):
            if domain not in wanted:
                continue
            entry = self._sample.setdefault(domain, {"ids": [], "experts": {}, "weights": {}})
            if len(entry["ids"]) >= self._per_domain_sample:
                continue
            entry["ids"].append(token)
            for layer in self.moe_layers:
                index, weights = routing[layer]
                entry["experts"].setdefault(str(layer), []).append(index[row].tolist())
                entry["weights"].setdefault(str(layer), []).append([round(w, 4) for w in weights[row].tolist()])

    def sample(self) -> dict[str, Any]:
        ids: list[int] = []
        domain: list[int] = []
        experts: dict[str, list] = {str(layer): [] for layer in self.moe_layers}
        weights: dict[str, list] = {str(layer): [] for layer in self.moe_layers}
        for label in sorted(self._sample):
            entry = self._sample[label]
            ids += entry["ids"]
            domain += [label] * len(entry["ids"])
            for layer in experts:
                experts[layer] += entry["experts"][layer]
                weights[layer] += entry["weights"][layer]
        return {"tokens": [self.decode(i) for i in ids], "ids": ids,
                "domain": domain if self.domain_names else None, "experts": experts, "weights": weights}

    def result(self, model_info: dict[str, Any], data_info: dict[str, Any], permutations: int = 100,
               seed: int = 0) -> dict[str, Any]:
        """The whole analysis.json dict."""
        layers = []
        for layer in self.moe_layers:
            entry = self.layers[layer].result(self.decode, self.domain_names, permutations, seed)
            entry["consistency_with_next"] = self.layers[layer].consistency() if layer != self.moe_layers[-1] else None
            layers.append(entry)

        def mean(name: str) -> float:
            return sum(entry[name] for entry in layers) / len(layers)

        overall = {name: mean(name) for name in (
            "max_violation_global", "max_violation_batch", "coefficient_of_variation", "entropy",
            "effective_experts", "dropped_fraction", "token_specialisation", "token_specialisation_baseline")}
        overall["dead_experts"] = sum(len(entry["dead_experts"]) for entry in layers)
        with_domains = [entry["domains"] for entry in layers if entry["domains"]]
        for name, key in (("domain_mutual_information", "mutual_information"),
                          ("domain_baseline_mean", "baseline_mean"), ("domain_baseline_p95", "baseline_p95")):
            overall[name] = sum(d[key] for d in with_domains) / len(with_domains) if with_domains else None
        data = dict(data_info, tokens=self.layers[self.moe_layers[0]].tokens, batches=self.batches,
                    block_size=self.block_size, domains=self.domain_names)
        model = dict(model_info, num_experts=self.num_experts, num_experts_per_tok=self.top_k,
                     moe_layers=self.moe_layers)
        return {"format": ANALYSIS_FORMAT, "model": model, "data": data, "capacity_factor": self.capacity_factor,
                "overall": overall, "layers": layers, "saturation": None, "sample": self.sample()}


# ---------------------------------------------------------------------------------------------- the text


def _read_text(path: Path) -> str:
    from ..train.data import load_corpus_text

    return load_corpus_text(path)


def read_domains(directory: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(name, text) per domain: each text file of `directory`, or each sub-folder (its files joined, sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--domains {directory} is not a folder; give a folder with one text file (or one folder "
                         "of text files) per domain")
    domains = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise ValueError(f"domain folder {entry} holds no files")
            domains.append((entry.name, "\n".join(_read_text(p) for p in files)))
        elif entry.is_file():
            domains.append((entry.stem, _read_text(entry)))
    if len(domains) < 2:
        raise ValueError(f"--domains {directory} holds {len(domains)} domain(s); give at least two (one text file "
                         "or folder per domain)")
    return domains


def _windows(tokens: Tensor, block_size: int, budget: int) -> Iterator[Tensor]:
    """Consecutive windows of `block_size` tokens of `tokens` (the last may be shorter), `budget` tokens in all."""
    tokens = tokens[:budget]
    for start in range(0, tokens.numel(), block_size):
        yield tokens[start:start + block_size]


def _batches(streams: list[tuple[int | None, Tensor]], block_size: int, batch_size: int, budget: int,
             pad: bool) -> Iterator[Batch]:
    """Batches of windows from each stream (a domain's windows are never mixed with another's within a window).

    With `pad` (transformers models), windows of different lengths share a batch, right-padded and masked;
    otherwise (moekit models take no mask) a batch holds windows of one length.
    """
    share = budget // len(streams)
    pending: list[tuple[int | None, Tensor]] = []

    def flush(group: list[tuple[int | None, Tensor]]) -> Batch:
        longest = max(window.numel() for _, window in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for row, (_, window) in enumerate(group):
            ids[row, :window.numel()] = window
            mask[row, :window.numel()] = 1
        positions = torch.cat([torch.arange(window.numel()) for _, window in group])
        domains = (torch.cat([torch.full((window.numel(),), d, dtype=torch.long) for d, window in group])
                   if group[0][0] is not None else None)
        return Batch(ids, mask if not bool(mask.all()) else None, positions, domains)

    for domain, tokens in streams:
        for window in _windows(tokens, block_size, share):
            if pending and not pad and window.numel() != pending[0][1].numel():
                yield flush(pending)
                pending = []
            pending.append((domain, window))
            if len(pending) == batch_size:
                yield flush(pending)
                pending = []
    if pending:
        yield flush(pending)


# ---------------------------------------------------------------------------------------------- the command


def analyze(model: str | os.PathLike[str] | RoutedModel, data: str | os.PathLike[str] | None = None,
            domains: str | os.PathLike[str] | None = None, tokens: int = DEFAULT_TOKENS, batch_size: int = 8,
            out: str | os.PathLike[str] | None = None, capacity_factor: float = 1.0, save_trace: bool = False,
            block_size: int | None = None, permutations: int = 100, seed: int = 0, progress: bool = False,
            figures: bool = True) -> dict[str, Any]:
    """Analyse the routing of `model` (a moekit run directory, an HF folder, or an opened `RoutedModel`).

    Text: `domains` (a folder, one text file or folder per domain), else `data` (one text file), else the run's
    validation split. At most `tokens` tokens (split evenly over domains). Writes OUT/analysis.json, figures and
    routing.html when `out` is given (and OUT/trace.safetensors with `save_trace`). Returns the analysis dict.
    Bad input raises before anything is written.
    """
    if data is not None and domains is not None:
        raise ValueError("pass either --data or --domains, not both")
    if tokens < 1 or batch_size < 1:
        raise ValueError(f"--tokens and --batch-size must be at least 1 (got {tokens}, {batch_size})")
    if save_trace and out is None:
        raise ValueError("--save-trace needs --out, the folder the trace is written to")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    routed = model if isinstance(model, RoutedModel) else open_routed_model(model, block_size)
    streams, names, source = _streams(routed, data, domains, tokens)
    analysis = RoutingAnalysis(routed.num_experts, routed.top_k, routed.moe_layers, routed.block_size,
                               capacity_factor, names, routed.decode_one)
    from .trace import TraceWriter

    trace = TraceWriter(out_dir / "trace.safetensors", routed.moe_layers, routed.top_k) if save_trace else None
    total = min(tokens, sum(t.numel() for _, t in streams))
    bar = _progress(total, progress)
    try:
        for batch in _batches(streams, routed.block_size, batch_size, tokens, pad=routed.kind == "hf"):
            routing = routed.route(batch.input_ids, batch.attention_mask)
            real = batch.input_ids[batch.attention_mask.bool()] if batch.attention_mask is not None \
                else batch.input_ids.reshape(-1)
            analysis.add(routing, real, batch.positions, batch.domains)
            if trace is not None:
                trace.add(routing, real, batch.positions, batch.domains)
            if bar is not None:
                bar.update(real.numel())
    except BaseException:
        if trace is not None:
            trace.abandon()
        raise
    finally:
        if bar is not None:
            bar.close()
    model_info = {"source": routed.source, "kind": routed.kind}
    data_info = {"source": source, "batch_size": batch_size}
    result = analysis.result(model_info, data_info, permutations, seed)
    if routed.kind == "moekit-run":
        result["saturation"] = _saturation(routed, streams, batch_size)
    if out_dir is not None:
        if trace is not None:
            trace.finish(result, routed.decode_one, routed.vocab_size)
        write_outputs(result, out_dir, figures=figures)
    return result


def _streams(routed: RoutedModel, data, domains, budget: int
             ) -> tuple[list[tuple[int | None, Tensor]], list[str] | None, str]:
    def encode(text: str, what: str) -> Tensor:
        # encode a growing prefix until it holds the budget: a large corpus is not tokenised in full for a sample
        chars = max(budget * 8, 4096)
        while True:
            ids = routed.encode(text[:chars])
            if len(ids) > budget or chars >= len(text):
                break
            chars *= 4
        if not ids:
            raise ValueError(f"{what} holds no tokens")
        return torch.tensor(ids[:budget], dtype=torch.long)

    if domains is not None:
        read = read_domains(domains)
        return ([(i, encode(text, f"domain {name}")) for i, (name, text) in enumerate(read)],
                [name for name, _ in read], str(domains))
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {path} is not a file; give a text file (or --domains FOLDER)")
        return [(None, encode(_read_text(path), f"--data {path}"))], None, str(path)
    if routed.default_tokens is None:
        raise ValueError(f"{routed.source} is an HF folder with no validation split of its own; pass --data FILE "
                         "or --domains FOLDER")
    return [(None, routed.default_tokens().long())], None, "validation split"


def _saturation(routed: RoutedModel, streams, batch_size: int) -> dict[str, Any] | None:
    """Router saturation over the run's snapshots (None when it kept none): see `saturation.py`."""
    from .saturation import router_saturation

    batches = [batch.input_ids for batch in _batches(streams, routed.block_size, batch_size,
                                                     min(16 * batch_size * routed.block_size, 65_536), pad=False)]
    return router_saturation(Path(routed.source), batches)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", desc="analyze", dynamic_ncols=True)


def write_outputs(result: dict[str, Any], out_dir: Path, figures: bool = True) -> None:
    """OUT/analysis.json (atomically), the figures and routing.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "analysis.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n",
                 what="analysis.json")
    if figures:
        from .figures import write_figures
        from .page import write_page

        write_figures(result, out_dir)
        write_page(result, out_dir / "routing.html")
