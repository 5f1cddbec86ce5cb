"""Expert pruning (`moekit prune`): score each MoE layer's experts on routed data, keep the best N, write the
smaller model in the format it came in.

Scores (per MoE layer, per expert e, over the tokens T_e that the router sends to e):

- ``frequency``: |T_e|, the number of tokens routed to e (counted by `RoutingRecorder`);
- ``saliency``: REAP's router-weighted expert activation norm (Lasby et al. 2025, "REAP the Experts: Why Pruning
  Prevails for One-Shot MoE compression", arXiv:2510.13999, eq. for S_j):
  S_e = (1 / |T_e|) * sum_{x in T_e} g_e(x) * ||f_e(x)||_2, where g_e(x) is the gate weight the router gives e for
  token x (here the combine weight the layer multiplies e's output with) and f_e(x) is e's output; an expert no
  token reaches scores 0;
- ``random``: a random order per layer (a seeded baseline).

Slicing (`prune_model`) keeps, for every MoE layer, the chosen experts in their original order: every tensor of the
layer whose first dimension is the expert count (the experts' projections and biases, the router's weight rows,
its logit bias and its selection bias ``e_score_correction_bias``) is cut to those rows; shared experts, attention,
norms and embeddings are copied as they are. The kept experts therefore compute exactly what they computed before,
and the router's logits of the kept experts are the original's columns; only the choice among them changes for a
token whose top-k included a removed expert. Group-limited routing (DeepSeek-V3's ``n_group``/``topk_group``, the
hierarchical router, device-limited routing) stays valid by keeping the same number of experts in every group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._files import fsync_dir, fsync_file, overlapping_input, remove_stale_temps, temp_sibling
from ..layer import MoELayer
from ..model import MoETransformer
from .record import RoutingRecorder, moe_layers

__all__ = ["PRUNE_METHODS", "PruneResult", "expert_scores", "prune_experts", "prune_model", "select_experts",
           "token_batches"]

PRUNE_METHODS = ("frequency", "saliency", "random")
"""What `prune_experts(by=...)` accepts."""

Method = Literal["frequency", "saliency", "random"]
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.mlp\.")


# ============================================================================================== scoring
def token_batches(ids: Tensor | list[int], block_size: int, batch_size: int = 8,
                  max_tokens: int | None = None) -> list[Tensor]:
    """[B, block_size] windows cut from one token stream, in order, `max_tokens` tokens at most (the tail shorter
    than a window is left out; a stream shorter than `block_size` gives one window of its own length)."""
    stream = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if stream.numel() == 0:
        raise ValueError("prune_experts: no tokens to score the experts on: the data is empty after tokenisation")
    block = min(block_size, stream.numel())
    windows = stream[: stream.numel() // block * block].view(-1, block)
    return list(windows.split(batch_size))


@torch.no_grad()
def expert_scores(model: MoETransformer, batches: Iterable[Tensor], by: Method = "frequency") -> dict[int, Tensor]:
    """Per MoE layer, a score for each expert from routing `batches` of token ids through `model`.

    Args:
        model: a moekit `MoETransformer` with a token-choice router (run in eval mode here).
        batches: [B, T] token-id tensors (every position a real token).
        by: ``"frequency"`` (tokens routed to the expert) or ``"saliency"`` (REAP: the mean over the tokens routed
            to the expert of gate weight x L2 norm of the expert's output; see the module docstring).

    Returns:
        {decoder layer index: [E] float64 scores}, higher = more worth keeping.

    Raises:
        ValueError: `by` is unknown, the model has no MoE layer or its router is not token-choice, or no batch.
    """
    if by not in ("frequency", "saliency"):
        raise ValueError(f"expert_scores: by={by!r} is not allowed: 'frequency' or 'saliency'")
    layers = moe_layers(model)
    recorder = RoutingRecorder(model)  # refuses expert-choice and soft routers, and dense models
    num_experts = next(iter(layers.values())).config.num_local_experts
    counts = {i: torch.zeros(num_experts, dtype=torch.float64) for i in layers}
    weighted = {i: torch.zeros(num_experts, dtype=torch.float64) for i in layers}
    router_inputs: list[Tensor] = []
    handles = []
    if by == "saliency":  # the router's input rows are the experts' input rows (padding is removed before both)
        handles = [layer.router.register_forward_hook(lambda _m, args, _out: router_inputs.append(args[0].detach()))
                   for layer in layers.values()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with recorder:
            for batch in batches:
                device = next(model.parameters()).device
                model(batch.to(device), router_stats=False)
                seen += batch.numel()
                records = recorder.take()
                inputs, router_inputs[:] = list(router_inputs), []
                for n, record in enumerate(records):
                    index = record.expert_index.reshape(-1)
                    counts[record.layer] += torch.bincount(index, minlength=num_experts).double()
                    if by == "saliency":
                        _add_saliency(layers[record.layer], inputs[n], record.expert_index, record.weights,
                                      weighted[record.layer])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("expert_scores: no batches were given; pass token ids to route")
    if by == "frequency":
        return counts
    return {i: torch.where(counts[i] > 0, weighted[i] / counts[i].clamp_min(1), 0.0) for i in layers}


def _add_saliency(layer: MoELayer, x: Tensor, expert_index: Tensor, weights: Tensor, total: Tensor) -> None:
    """Add sum over the tokens routed to each expert of gate weight x ||expert output||_2 into `total` [E]."""
    x = x.reshape(-1, x.shape[-1])
    index = expert_index.to(x.device)
    gates = weights.to(x.device)
    for expert in torch.unique(index).tolist():
        token, slot = (index == expert).nonzero(as_tuple=True)
        out = layer.experts.expert_forward(x[token], expert)
        total[expert] += float((gates[token, slot].double() * out.double().norm(dim=-1)).sum())


# ============================================================================================== choosing
def routing_blocks(config: Any) -> int:
    """How many contiguous expert blocks routing depends on (1 when it does not): DeepSeek-V3 groups, hierarchical
    groups, device-limited routing. Pruning keeps the same number of experts in every block."""
    moe = config.moe if hasattr(config, "moe") else config
    blocks = 1
    if moe.router == "hierarchical" or (moe.router == "deepseek_v3" and moe.topk_group < moe.n_group):
        blocks = moe.n_group
    if moe.max_devices_per_token is not None and moe.max_devices_per_token < moe.expert_devices:
        blocks = math.lcm(blocks, moe.expert_devices)
    return blocks


def select_experts(scores: Tensor, keep: int, blocks: int = 1) -> list[int]:
    """The `keep` best experts by `scores` (ties: the lower index wins), `keep / blocks` from each contiguous block,
    in ascending order."""
    num_experts = scores.numel()
    if keep % blocks or num_experts % blocks:
        raise ValueError(f"cannot keep {keep} of {num_experts} experts evenly over {blocks} routing groups")
    size, per_block = num_experts // blocks, keep // blocks
    chosen: list[int] = []
    for block in range(blocks):
        part = scores[block * size:(block + 1) * size].double()
        order = torch.argsort(-part, stable=True)  # stable: equal scores keep index order
        chosen += [block * size + int(i) for i in order[:per_block]]
    return sorted(chosen)


def check_keep(config: Any, keep: int) -> None:
    """Refuse a `keep` the model cannot be pruned to, naming the fix (before anything is computed or written)."""
    moe = config.moe
    if moe is None:
        raise ValueError("prune_experts: the model is dense (no MoE layer); there are no experts to remove")
    if moe.router not in ("topk", "switch", "noisy_topk", "deepseek_v3", "hierarchical"):
        raise ValueError(f"prune_experts: router={moe.router!r} is not token-choice (a token gets any number "
                         "of experts or a soft mixture), so routing frequency and REAP saliency are undefined; "
                         "prune a token-choice model (topk, switch, noisy_topk, deepseek_v3, hierarchical)")
    num_experts, k = moe.num_local_experts, moe.num_experts_per_tok
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"prune_experts: --keep {keep!r} is not allowed: a positive number of experts per layer")
    if keep >= num_experts:
        raise ValueError(f"prune_experts: --keep {keep} removes nothing: the model has {num_experts} experts "
                         f"per layer; pass --keep below {num_experts}")
    if keep < k:
        raise ValueError(f"prune_experts: --keep {keep} is fewer than the {k} experts each token uses "
                         f"(num_experts_per_tok); pass --keep {k} or more")
    blocks = routing_blocks(config)
    groups = [n for n in (moe.n_group if moe.router in ("deepseek_v3", "hierarchical") else 1, moe.expert_devices,
                          blocks) if n > 1]
    for n in groups:
        if keep % n:
            fits = [m for m in range(k, num_experts) if all(m % g == 0 for g in groups)]
            hint = f"; e.g. --keep {fits[-1]}" if fits else ""
            raise ValueError(f"prune_experts: --keep {keep} cannot be split evenly over the {n} expert groups "
                             f"this router routes by (n_group / expert_devices): pass a multiple of "
                             f"{math.lcm(*groups)}{hint}")
    if moe.router == "deepseek_v3" and 1 < moe.n_group and moe.topk_group < moe.n_group and keep // moe.n_group < 2:
        raise ValueError(f"prune_experts: --keep {keep} leaves {keep // moe.n_group} expert per group, but DeepSeek-V3 "
                         "(and GLM-4.5) routing scores a group by its two best experts; pass --keep "
                         f"{2 * moe.n_group} or more")
    new = dataclasses.replace(moe, num_local_experts=keep)
    try:
        new.validate()
    except ValueError as error:
        raise ValueError(f"prune_experts: --keep {keep} gives an invalid MoE config ({error}); pass a larger "
                         "--keep") from None


def choose(scores: dict[int, Tensor], keep: int, config: Any) -> dict[int, list[int]]:
    """The experts to keep per layer from `scores` (see `select_experts`)."""
    blocks = routing_blocks(config)
    return {layer: select_experts(s, keep, blocks) for layer, s in scores.items()}


def random_scores(model: MoETransformer, seed: int) -> dict[int, Tensor]:
    """A random permutation per MoE layer as scores (the baseline that knows nothing about the data)."""
    generator = torch.Generator().manual_seed(seed)
    layers = moe_layers(model)
    return {i: torch.randperm(layer.config.num_local_experts, generator=generator).double() for i, layer in
            layers.items()}


# ============================================================================================== slicing
@torch.no_grad()
def prune_model(model: MoETransformer, keep: dict[int, list[int]]) -> MoETransformer:
    """A new `MoETransformer` with only the experts `keep[layer]` (ascending indices, the same count in every MoE
    layer) of each MoE layer; every other tensor is copied unchanged. The input model is left as it is.

    Raises:
        ValueError: `keep` does not name every MoE layer, repeats or misses an index, or gives layers different counts.
    """
    layers = moe_layers(model)
    if set(keep) != set(layers):
        raise ValueError(f"prune_model: keep names layers {sorted(keep)}, the model's MoE layers are {sorted(layers)}")
    config = model.config
    num_experts = config.moe.num_local_experts
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1:
        raise ValueError(f"prune_model: every MoE layer must keep the same number of experts, got {sorted(sizes)}")
    for layer, experts in keep.items():
        if list(experts) != sorted(set(experts)) or not all(0 <= e < num_experts for e in experts):
            raise ValueError(f"prune_model: layer {layer}: keep={experts} must be distinct ascending indices below "
                             f"{num_experts}")
    (count,) = sizes
    new_config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, num_local_experts=count))
    reference = next(model.parameters())
    pruned = MoETransformer(new_config).to(device=reference.device, dtype=reference.dtype)
    old_state, new_state = model.state_dict(), pruned.state_dict()
    state: dict[str, Tensor] = {}
    for name, target in new_state.items():
        old = old_state[name]
        if old.shape == target.shape:
            state[name] = old
            continue
        match = _LAYER_KEY.match(name)
        if (match is None or int(match.group(1)) not in keep or old.shape[0] != num_experts
                or target.shape != (count, *old.shape[1:])):  # pragma: no cover - a new per-expert layout
            raise RuntimeError(f"prune_model: {name} changes shape {tuple(old.shape)} -> {tuple(target.shape)} in a "
                               "way pruning does not know how to slice")
        rows = torch.tensor(keep[int(match.group(1))], device=old.device)
        state[name] = old.index_select(0, rows)
    pruned.load_state_dict(state, strict=True)
    for name, buffer in pruned.named_buffers():  # float32 selection biases stay float32, as the router keeps them
        if name in old_state and buffer.dtype != old_state[name].dtype:  # pragma: no cover
            buffer.data = buffer.data.to(old_state[name].dtype)
    return pruned.train(model.training)


def slice_optimizer_state(state: dict[str, Any], old: nn.Module, new: nn.Module,
                          keep: dict[int, list[int]]) -> dict[str, Any]:
    """A trainer state (`state.pt`) whose AdamW moments of the pruned tensors are cut to the kept experts' rows."""
    names = state.get("param_names") or []
    old_shapes = {n: p.shape for n, p in old.named_parameters()}
    new_shapes = {n: p.shape for n, p in new.named_parameters()}
    for index, name in enumerate(names):
        if old_shapes[name] == new_shapes[name]:
            continue
        match = _LAYER_KEY.match(name)
        assert match is not None
        rows = torch.tensor(keep[int(match.group(1))])
        moments = state["optimizer"]["state"].get(index) or {}
        for key, value in moments.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old_shapes[name]:
                moments[key] = value.index_select(0, rows.to(value.device))
    return state


# ============================================================================================== files
@dataclass
class PruneResult:
    """What `prune_experts` did."""

    out: Path
    kind: str  # "moekit-run" | "hf"
    method: str
    num_experts: int
    keep: int
    kept: dict[int, list[int]]
    scores: dict[int, list[float]]
    tokens: int

    def format(self) -> str:
        lines = [f"pruned {self.num_experts} -> {self.keep} experts per MoE layer by {self.method}"
                 + (f" ({self.tokens:,} tokens routed)" if self.tokens else "") + f"; wrote {self.out}"]
        for layer, experts in self.kept.items():
            removed = sorted(set(range(self.num_experts)) - set(experts))
            lines.append(f"  layer {layer}: removed {removed}")
        return "\n".join(lines)


def _is_run_dir(path: Path) -> bool:
    from ..train.rundir import is_run_config

    return (path / "checkpoints").is_dir() and is_run_config(path)


def _check_out(out: Path, source: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"prune_experts: {out} exists and is not empty; pass a new output directory "
                              "(nothing was written)")
    if overlapping_input(out, [source]) is not None:
        raise ValueError(f"prune_experts: the output {out} overlaps the model {source}; pass a directory outside it")


def _text_ids(data: str | os.PathLike[str], encode) -> list[int]:
    from ..train.data import load_corpus_text

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"prune_experts: --data {path} not found; pass a text file to route through the "
                                "model")
    return list(encode(load_corpus_text(path)))


def prune_experts(model: str | os.PathLike[str], out: str | os.PathLike[str], keep: int, by: Method = "frequency",
                  data: str | os.PathLike[str] | None = None, tokens: int = 65536, seed: int = 0,
                  batch_size: int = 8) -> PruneResult:
    """Remove the lowest-scoring experts of every MoE layer of `model` and write the result to `out`.

    Args:
        model: a moekit run directory (config.json, checkpoints/, tokenizer/) or a Hugging Face checkpoint folder
            of a family moekit reads natively (`moekit.interop.load_hf`).
        out: the folder to write: a new run directory (for a run) or an HF folder (for an HF folder). It must not
            exist or be empty; it is written next to itself under a temporary name and renamed into place.
        keep: experts to keep per MoE layer (at least `num_experts_per_tok`, fewer than the model has, and for
            group-limited routing a multiple of the group count).
        by: ``"frequency"``, ``"saliency"`` (REAP) or ``"random"`` (seeded by `seed`); see the module docstring.
        data: a text file to route (tokenised with the model's tokenizer). Default for a run: its validation split;
            an HF folder needs one.
        tokens: at most this many tokens are routed.
        seed: the random order of ``by="random"``.
        batch_size: windows per forward.

    A pruned run keeps the source's newest checkpoint step with the experts (and their AdamW moments) sliced, its
    config with ``model.moe.num_local_experts = keep``, its tokenizer, token cache and log, so `moekit eval`,
    `moekit generate` and `moekit train --resume OUT --max-steps M --extend-schedule` work on it. A pruned HF folder
    is written by `export_hf` in the source's `model_type`.

    Raises:
        FileNotFoundError: `model` or `data` does not exist.
        FileExistsError: `out` exists and is not empty.
        ValueError: a bad `keep` or `by`, a non-token-choice router, an HF folder without `data`.
    """
    source, out_path = Path(model).expanduser(), Path(out).expanduser().absolute()
    if by not in PRUNE_METHODS:
        raise ValueError(f"prune_experts: --by {by!r} is not allowed: one of {', '.join(PRUNE_METHODS)}")
    if not source.exists():
        raise FileNotFoundError(f"prune_experts: {source} not found; pass a moekit run directory or a Hugging Face "
                                "checkpoint folder")
    _check_out(out_path, source)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"prune_experts: --tokens {tokens!r} is not allowed: a positive number of tokens")
    if _is_run_dir(source):
        return _prune_run(source, out_path, keep, by, data, tokens, seed, batch_size)
    if (source / "config.json").is_file():
        return _prune_hf(source, out_path, keep, by, data, tokens, seed, batch_size)
    raise ValueError(f"prune_experts: {source} is neither a moekit run directory (config.json with model and "
                     "train sections, checkpoints/) nor a Hugging Face checkpoint folder (config.json + safetensors)")


def _scores(model: MoETransformer, by: str, seed: int, batches: Iterable[Tensor] | None) -> dict[int, Tensor]:
    if by == "random":
        return random_scores(model, seed)
    assert batches is not None
    return expert_scores(model, batches, by)  # type: ignore[arg-type]


def _prune_run(source: Path, out: Path, keep: int, by: str, data: Any, tokens: int, seed: int,
               batch_size: int) -> PruneResult:
    from ..train import checkpoint as ckpt
    from ..train.config import RunConfig
    from ..train.data import TokenDataset
    from ..train.rundir import read_run_config
    from ..train.tokenizers import load_tokenizer

    values = read_run_config(source, "prune")
    run = RunConfig.from_dict(values)
    if run.uses_transformers:
        raise ValueError(f"prune_experts: {source} trained transformers' own class (train.backend=transformers); "
                         "prune works on moekit's model: export the run (`moekit export`) and prune the HF folder")
    check_keep(run.model, keep)
    model = MoETransformer(run.model)
    hashed = {**run.model.to_dict(), "init_from": run.train.init_from}
    state, meta = ckpt.load_checkpoint(source, model, hashed)
    model.eval()
    tokenizer = load_tokenizer(source / "tokenizer")
    t = run.train
    block = min(t.block_size, run.model.max_position_embeddings)
    batches = None
    if by != "random":
        if data is not None:
            ids: Any = _text_ids(data, tokenizer.encode)
        else:
            prepared = TokenDataset.prepare(t.data, tokenizer, source / "data", val_fraction=t.val_fraction,
                                            block_size=t.block_size)
            ids = prepared.in_memory().val
        batches = token_batches(ids, block, batch_size, tokens)
    scores = _scores(model, by, seed, batches)
    kept = choose(scores, keep, run.model)
    pruned = prune_model(model, kept)
    state = slice_optimizer_state(state, model, pruned, kept)
    new_values = run.to_dict()
    new_values["model"]["moe"]["num_local_experts"] = keep
    new_run = RunConfig.from_dict(new_values)
    new_hashed = {**new_run.model.to_dict(), "init_from": new_run.train.init_from}
    record = {"source": str(source.resolve()), "method": by, "num_experts": run.model.moe.num_local_experts,
              "keep": keep, "kept": {str(k): v for k, v in kept.items()}, "seed": seed if by == "random" else None}
    new_meta = {k: v for k, v in meta.items() if k not in ("files", "config_hash", "layout")}
    new_meta["pruned_from"] = record

    def write(tmp: Path) -> None:
        from .._files import write_json

        write_json(tmp / "config.json", new_run.to_dict(), what="run config")
        shutil.copytree(source / "tokenizer", tmp / "tokenizer")
        for name in ("data",):
            if (source / name).is_dir():
                shutil.copytree(source / name, tmp / name)
        if (source / "metrics.jsonl").is_file():
            shutil.copyfile(source / "metrics.jsonl", tmp / "metrics.jsonl")
        ckpt.save_checkpoint(tmp, pruned, new_hashed, state, new_meta, keep=1)

    _write_atomically(out, source, write)
    return PruneResult(out, "moekit-run", by, run.model.moe.num_local_experts, keep, kept,
                       {k: v.tolist() for k, v in scores.items()}, _num_tokens(batches))


def _num_tokens(batches: list[Tensor] | None) -> int:
    return sum(b.numel() for b in batches) if batches else 0


def _prune_hf(source: Path, out: Path, keep: int, by: str, data: Any, tokens: int, seed: int,
              batch_size: int) -> PruneResult:
    from ..interop import export_hf, load_hf
    from ..interop.hf import TOKENIZER_FILES

    hf = json.loads((source / "config.json").read_text(encoding="utf-8"))
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    if by != "random" and data is None:
        raise ValueError(f"prune_experts: {source} is a Hugging Face folder, which has no validation split of its "
                         "own; pass --data PATH, a text file to route through the model (or --by random)")
    model = load_hf(source)
    check_keep(model.config, keep)
    batches = None
    if by != "random":
        tokenizer_json = source / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"prune_experts: {source} has no tokenizer.json to tokenise --data with; copy the "
                                    "model's tokenizer files into it")
        from ..train.tokenizers import HFTokenizer

        tokenizer = HFTokenizer.from_model_dir(source)
        block = min(256, model.config.max_position_embeddings)
        batches = token_batches(_text_ids(data, tokenizer.encode), block, batch_size, tokens)
    scores = _scores(model, by, seed, batches)
    kept = choose(scores, keep, model.config)
    pruned = prune_model(model, kept)
    has_tokenizer = any((source / name).is_file() for name in TOKENIZER_FILES)
    written = export_hf(pruned, out, format=model_type, tokenizer_dir=source if has_tokenizer else None,
                        inputs=[source])
    return PruneResult(written, "hf", by, model.config.moe.num_local_experts, keep, kept,
                       {k: v.tolist() for k, v in scores.items()}, _num_tokens(batches))


def _write_atomically(out: Path, source: Path, write) -> None:
    """Fill a temporary folder next to `out` with `write`, sync it, and rename it into place."""
    remove_stale_temps(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        tmp.mkdir()
        write(tmp)
        for path in sorted(tmp.rglob("*"), reverse=True):
            if path.is_file():
                fsync_file(path)
            else:
                fsync_dir(path)
        fsync_dir(tmp)
        _check_out(out, source)  # something may have appeared meanwhile
        os.replace(tmp, out)  # onto a missing or empty folder
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
