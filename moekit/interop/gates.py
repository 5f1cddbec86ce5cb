"""Router initialisation for MoE models merged from dense checkpoints (`moekit merge`).

`compute_gate_weights` returns one gate vector per expert and layer, in the orientation of a router
``nn.Linear(hidden_size, num_experts)`` weight: ``gates[l, e]`` is the row that scores expert ``e`` in layer ``l``.
The gate modes are those of mergekit-moe, read from mergekit 0.1.5 (`mergekit/moe/router.py`,
`mergekit/scripts/moe.py`), plus one of moekit's own:

``random``
    Standard normal entries. mergekit draws them from torch's global generator (seeded only when its
    ``--random-seed`` option is given); moekit draws them from a generator seeded with `seed`, so the same call
    gives the same gates.
``uniform_random``
    Uniform on ``[-1/sqrt(hidden_size), 1/sqrt(hidden_size)]``: the distribution `nn.Linear` initialises its
    weight with. Same seeding as ``random``.
``cheap_embed``
    No forward pass: the rows of the base model's input embedding for every token of every prompt (the BOS token
    in front of each prompt included, padding excluded) are summed over tokens and prompts, and the sum is
    L2-normalised. The same vector is used for every layer. With negative prompts, their normalised sum is
    subtracted from the positive one and the difference is normalised again (mergekit normalises both sides
    before subtracting here, unlike in the hidden modes). Only the embedding tensor is read from disk.
``hidden`` and ``hidden_last`` (the same mode in mergekit)
    The base model runs on the prompts. For layer ``l`` the vector is the hidden state entering that layer (the
    embedding output for layer 0, the output of layer ``l - 1`` after it) at each prompt's last token, averaged
    over the prompts. With negative prompts, their average is subtracted; then the result is L2-normalised per
    layer.
``hidden_avg``
    As ``hidden``, but each prompt's vector is the average of the hidden states over its tokens instead of the
    last one.
``router_input`` (moekit only)
    As ``hidden``, but the vector is the state the router of that layer actually reads: the output of the layer's
    ``post_attention_layernorm`` (residual stream after attention, RMS-normalised and scaled by the norm's
    weight), at each prompt's last token, averaged over prompts, minus the negative prompts' average, normalised.

Shared by the prompt modes: each prompt is tokenised as the tokenizer's BOS token followed by the prompt's
tokens, with no other special tokens (a tokenizer without a BOS token, such as Qwen2's, gets none, as in
mergekit); prompts of one batch are left-padded (with the BOS id, as mergekit does; the padding is masked, so
the id does not matter). Normalisation divides by ``max(norm, 1e-8)``, mergekit's epsilon.

Where moekit differs from mergekit, on purpose:

- Precision: mergekit loads the base model in bfloat16 for the hidden modes and averages in bfloat16. moekit
  runs the model in `dtype` (float32 by default; bfloat16 reproduces mergekit's precision) and always
  accumulates averages, differences and norms in float32.
- ``hidden_avg`` padding: mergekit averages over every position of the padded batch, so a short prompt's
  vector includes the hidden states of the BOS tokens it was padded with, and changes with the length of the
  longest prompt it happens to be batched with. moekit averages over the prompt's real tokens only.
- Positions: left padding shifts a short prompt's position ids in mergekit; moekit gives each prompt positions
  ``0, 1, ...`` from its first real token, so a prompt's vectors do not depend on its batch partners (up to
  floating-point rounding).
- The router's input: mergekit's ``hidden`` gate is built from the residual stream entering the layer, but a
  Llama-style router reads that stream after attention and after ``post_attention_layernorm``, whose
  per-channel weight changes directions. ``router_input`` builds the gate from exactly what the router reads;
  `benchmarks/bench_merge.py` measures which of the two sends each expert's own prompts to it more often.
- The base model is loaded once for all experts (prompts are deduplicated, sorted by length and batched), run in
  eval mode under `torch.inference_mode()` through its decoder only (no LM head), and only the needed
  per-prompt vectors are kept (forward hooks), never all hidden states of a batch.

`ill_conditioned_layers` flags the layers whose gate rows are nearly linearly dependent: the ratio of the largest
to the smallest singular value of the layer's ``[num_experts, hidden_size]`` gate matrix (its 2-norm condition
number) above a threshold, 5 by default as in mergekit. Such a layer may not tell some experts apart: the
prompts of those experts are too similar. Hidden-state rows of real models share a large common direction, which
this test counts against them although it changes no routing decision; ``centred=True`` measures only the part
that does (the rows minus their mean).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

GATE_MODES = ("random", "uniform_random", "cheap_embed", "hidden", "hidden_avg", "hidden_last", "router_input")
"""Every gate mode `compute_gate_weights` accepts (mergekit's six and moekit's ``router_input``)."""

PROMPT_MODES = ("cheap_embed", "hidden", "hidden_avg", "hidden_last", "router_input")
"""Gate modes that need every expert's positive prompts."""

HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last", "router_input")
"""Gate modes that run the base model."""

DEFAULT_CONDITION_THRESHOLD = 5.0
"""Condition number above which `ill_conditioned_layers` flags a layer (mergekit's threshold)."""

NORM_EPS = 1e-8
"""Lower bound on the norm a gate vector is divided by (mergekit's)."""

DEFAULT_BATCH_SIZE = 16
"""Prompts per forward pass in the hidden modes."""


@dataclass
class ExpertPrompts:
    """The prompts that should be routed to one expert (`positive_prompts`) and those that should not."""

    positive_prompts: list[str]
    negative_prompts: list[str] = field(default_factory=list)


def resolve_checkpoint(path: str | os.PathLike[str], gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Split a model location into (directory, GGUF file name or None).

    `path` is an HF checkpoint directory, a directory holding the GGUF file `gguf_file`, or the path of a
    ``.gguf`` file itself. Raises `FileNotFoundError` naming what is missing.
    """
    p = Path(path)
    if gguf_file is not None:
        if p.is_dir() and (p / gguf_file).is_file():
            return p, str(gguf_file)
        if Path(gguf_file).is_file():
            return Path(gguf_file).parent, Path(gguf_file).name
        raise FileNotFoundError(f"GGUF file {str(gguf_file)!r} is neither in {str(p)!r} nor a path to a file")
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {str(p)!r} does not exist")
        return p.parent, p.name
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {str(p)!r} does not exist (give an HF checkpoint directory, or a "
                                "directory and gguf_file, or the path of a .gguf file)")
    return p, None


def _check_expert_prompts(experts: Sequence[ExpertPrompts], gate_mode: str) -> None:
    for i, expert in enumerate(experts):
        if not isinstance(expert, ExpertPrompts):
            raise TypeError(f"experts[{i}] is a {type(expert).__name__}; pass ExpertPrompts(positive_prompts=[...])")
        if not expert.positive_prompts:
            raise ValueError(f"expert {i} has no positive_prompts, and gate_mode {gate_mode!r} builds its router "
                             "row from them: give it one or more prompts typical of what it should receive, or use "
                             "gate_mode 'random'")
        for kind in ("positive_prompts", "negative_prompts"):
            prompts = getattr(expert, kind)
            if isinstance(prompts, str):
                raise TypeError(f"expert {i}: {kind} is a string; give a list of strings")
            for j, prompt in enumerate(prompts):
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError(f"expert {i}: {kind}[{j}] is {prompt!r}; every prompt must be non-empty text")


# ----------------------------------------------------------------------------------------------- tokenisation


def load_base_tokenizer(base_model: str | os.PathLike[str], gguf_file: str | None = None,
                   tokenizer_path: str | os.PathLike[str] | None = None) -> Any:
    """The base model's tokenizer (from `tokenizer_path` when given, else from the model directory or GGUF file).

    The last few tokenizers loaded are kept (keyed by location and the files' modification times), so a merge
    that checks its prompts before computing the routers reads a GGUF file's tokenizer once, not twice.
    """
    if tokenizer_path is not None:
        location, gguf = Path(tokenizer_path), None
    else:
        location, gguf = resolve_checkpoint(base_model, gguf_file)
    source = location / gguf if gguf is not None else location
    files = [source] if source.is_file() else sorted(source.glob("*token*")) if source.is_dir() else []
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
    try:
        return _load_base_tokenizer_cached(str(location), gguf, stamp)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {str(source)!r} ({err}); the prompt gate modes need "
                         "the base model's tokenizer: save it next to the model or pass tokenizer_path") from err


@functools.lru_cache(maxsize=4)
def _load_base_tokenizer_cached(location: str, gguf: str | None, _stamp: tuple[tuple[str, int, int], ...]) -> Any:
    from transformers import AutoTokenizer

    if gguf is not None:
        return AutoTokenizer.from_pretrained(location, gguf_file=gguf)
    return AutoTokenizer.from_pretrained(location)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt: the BOS id (if the tokenizer has one), then the prompt's own ids, nothing else."""
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for prompt in prompts:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) gives no tokens for prompt {prompt!r}: it "
                             "cannot read this text, or it is not the model's tokenizer (check tokenizer_path)")
        out.append(([bos] if bos is not None else []) + ids)
    return out


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), both ``[len(sequences), longest]`` int64."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------------------------- reading the model


def _embedding_from_safetensors(directory: Path) -> Tensor:
    from safetensors import safe_open

    index, single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    elif single.is_file():
        with safe_open(str(single), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(f"{str(directory)!r} has no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are read)")
    names = [n for n in ("model.embed_tokens.weight", "embed_tokens.weight") if n in weight_map]
    if not names:
        names = sorted(n for n in weight_map if n.endswith("embed_tokens.weight"))
    if not names:
        raise ValueError(f"{str(directory)!r}: no input embedding tensor (model.embed_tokens.weight) found")
    with safe_open(str(directory / weight_map[names[0]]), framework="pt") as f:
        return f.get_tensor(names[0])


def _embedding_from_gguf(path: Path) -> Tensor:
    from gguf import GGUFReader, dequantize

    for tensor in GGUFReader(str(path)).tensors:
        if tensor.name == "token_embd.weight":
            return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    raise ValueError(f"{str(path)!r}: GGUF file has no token_embd.weight tensor")


def read_input_embedding(base_model: str | os.PathLike[str], gguf_file: str | None = None) -> Tensor:
    """The base model's input embedding ``[vocab_size, hidden_size]``, read alone (no other tensor is loaded)."""
    directory, gguf = resolve_checkpoint(base_model, gguf_file)
    if gguf is not None:
        return _embedding_from_gguf(directory / gguf)
    return _embedding_from_safetensors(directory)


def load_dense_model(base_model: str | os.PathLike[str], gguf_file: str | None = None, *,
                     dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """The base model as a transformers causal LM in eval mode, weights in `dtype` on `device`.

    GGUF files are read by transformers (dequantised). transformers' `from_pretrained` wants the `accelerate`
    package for GGUF; without it the model is built from the GGUF config and filled with transformers' own GGUF
    reader, which gives the same weights.
    """
    from transformers import AutoModelForCausalLM

    directory, gguf = resolve_checkpoint(base_model, gguf_file)
    if gguf is None:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    else:
        import importlib.util

        if importlib.util.find_spec("accelerate") is not None:
            model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf, dtype=dtype)
        else:
            from transformers import AutoConfig
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            state = load_gguf_checkpoint(str(directory / gguf), return_tensors=True, model_to_load=model)["tensors"]
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            if getattr(model.config, "tie_word_embeddings", False):
                tied |= {"lm_head.weight"}
            if unexpected or [m for m in missing if m not in tied]:
                raise ValueError(f"GGUF file {gguf!r}: tensors do not match the model transformers builds from its "
                                 f"metadata (missing {missing[:3]}, unexpected {unexpected[:3]})")
            if getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()
            model = model.to(dtype)
    return model.to(device).eval()


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list (model.layers) found; the hidden gate modes "
                         "support Llama, Mistral, Qwen2 and Qwen3 style models")
    return layers


# ------------------------------------------------------------------------------------------ per-prompt vectors


def prompt_vectors(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], mode: str, *, pad_id: int = 0,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Per-prompt, per-layer vectors ``[len(token_ids), num_layers, hidden_size]`` (float32) for a hidden `mode`.

    ``hidden``/``hidden_last``: the hidden state entering each decoder layer at the prompt's last token;
    ``hidden_avg``: that state averaged over the prompt's tokens; ``router_input``: the layer's
    ``post_attention_layernorm`` output at the last token. Prompts are left-padded in batches of `batch_size`
    (longest first), with position ids counted from each prompt's first token.
    """
    if mode not in HIDDEN_MODES:
        raise ValueError(f"prompt_vectors: mode {mode!r} runs no model; use one of {HIDDEN_MODES}")
    layers = _decoder_layers(model)
    if mode == "router_input":
        missing = [i for i, layer in enumerate(layers) if not hasattr(layer, "post_attention_layernorm")]
        if missing:
            raise ValueError(f"gate_mode 'router_input': decoder layer {missing[0]} of {type(model).__name__} has no "
                             "post_attention_layernorm; use gate_mode 'hidden' for this model")
    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    out = torch.zeros(len(token_ids), len(layers), model.config.hidden_size, dtype=torch.float32)
    captured: dict[int, Tensor] = {}
    current: dict[str, Tensor] = {}

    def reduce(index: int, states: Tensor) -> None:
        states = states.float()
        if mode == "hidden_avg":
            mask = current["mask"].unsqueeze(-1).bool()
            # where(), not a product: a padded position's state may be NaN (a query row with nothing to attend)
            captured[index] = torch.where(mask, states, 0.0).sum(dim=1) / mask.sum(dim=1)
        else:
            captured[index] = states[:, -1, :]  # left padding: the last position is every prompt's last token

    handles = []
    for index, layer in enumerate(layers):
        if mode == "router_input":
            def hook(_module: Any, _args: Any, output: Any, index: int = index) -> None:
                reduce(index, output[0] if isinstance(output, tuple) else output)

            handles.append(layer.post_attention_layernorm.register_forward_hook(hook))
        else:
            def pre_hook(_module: Any, args: Any, kwargs: Any, index: int = index) -> None:
                reduce(index, args[0] if args else kwargs["hidden_states"])

            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                ids, mask = pad_left([token_ids[i] for i in rows], pad_id)
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                current["mask"] = mask.to(device)
                captured.clear()
                decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=False)
                out[rows] = torch.stack([captured[i].cpu() for i in range(len(layers))], dim=1)
    finally:
        for handle in handles:
            handle.remove()
    return out


def _normalise(v: Tensor) -> Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_EPS)


# ------------------------------------------------------------------------------------------------- entry point


def compute_gate_weights(base_model: str | os.PathLike[str], experts: list[ExpertPrompts], gate_mode: str, *,
                         num_layers: int, hidden_size: int, gguf_file: str | None = None,
                         tokenizer_path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32,
                         device: str = "cpu", seed: int = 0,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Router weights ``[num_layers, num_experts, hidden_size]`` (float32, CPU) for `gate_mode`.

    Row ``e`` of layer ``l`` is expert ``e``'s gate vector, in the orientation of a router
    ``nn.Linear(hidden_size, num_experts)`` weight. `dtype` is the precision the base model's weights and forward
    pass use (hidden modes) or the embedding is rounded to (``cheap_embed``); sums and norms are float32.
    `seed` seeds the random modes. See the module docstring for each mode's definition.
    Raises `ValueError` for an unknown mode, missing or empty prompts, or a model whose shape differs from
    (`num_layers`, `hidden_size`).
    """
    if gate_mode not in GATE_MODES:
        raise ValueError(f"unknown gate_mode {gate_mode!r}; use one of {', '.join(GATE_MODES)}")
    if not experts:
        raise ValueError("no experts given; an MoE needs at least one expert")
    for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
    shape = (num_layers, len(experts), hidden_size)
    if gate_mode in ("random", "uniform_random"):
        generator = torch.Generator().manual_seed(seed)
        if gate_mode == "random":
            return torch.randn(shape, generator=generator, dtype=torch.float32)
        bound = 1.0 / math.sqrt(hidden_size)
        return torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    _check_expert_prompts(experts, gate_mode)
    tokenizer = load_base_tokenizer(base_model, gguf_file, tokenizer_path)
    prompts = sorted({p for e in experts for p in (*e.positive_prompts, *e.negative_prompts)})
    token_ids = tokenize_prompts(tokenizer, prompts)
    row_of = {p: i for i, p in enumerate(prompts)}

    if gate_mode == "cheap_embed":
        embedding = read_input_embedding(base_model, gguf_file)
        if embedding.shape[1] != hidden_size:
            raise ValueError(f"base model {str(base_model)!r}: embedding width {embedding.shape[1]} differs from "
                             f"hidden_size {hidden_size}")
        _check_vocab(token_ids, embedding.shape[0], base_model)
        embedding = embedding.to(dtype).float()
        sums = torch.stack([embedding[torch.tensor(ids)].sum(dim=0) for ids in token_ids])  # [P, H]

        def side(group: list[str]) -> Tensor:
            return _normalise(sums[[row_of[p] for p in group]].sum(dim=0))

        return _expert_rows(experts, side).unsqueeze(0).expand(num_layers, -1, -1).contiguous()

    model = load_dense_model(base_model, gguf_file, dtype=dtype, device=device)
    try:
        config = model.config
        if config.num_hidden_layers != num_layers or config.hidden_size != hidden_size:
            raise ValueError(f"base model {str(base_model)!r} has {config.num_hidden_layers} layers of width "
                             f"{config.hidden_size}, but the gates were asked for {num_layers} x {hidden_size}")
        _check_vocab(token_ids, model.get_input_embeddings().weight.shape[0], base_model)
        per_prompt = prompt_vectors(model, token_ids, gate_mode, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    finally:
        del model
        gc.collect()
        if str(device).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def mean(group: list[str]) -> Tensor:
        return per_prompt[[row_of[p] for p in group]].mean(dim=0)  # [L, H]

    return _expert_rows(experts, mean).transpose(0, 1).contiguous()  # [E, L, H] -> [L, E, H]


def _expert_rows(experts: Sequence[ExpertPrompts], side: Callable[[list[str]], Tensor]) -> Tensor:
    """Stack, per expert, normalise(side(positives) - side(negatives)) (the negative term only when given)."""
    rows = []
    for expert in experts:
        vector = side(expert.positive_prompts)
        if expert.negative_prompts:
            vector = vector - side(expert.negative_prompts)
        rows.append(_normalise(vector))
    return torch.stack(rows)


def _check_vocab(token_ids: Sequence[Sequence[int]], vocab_size: int, base_model: str | os.PathLike[str]) -> None:
    top = max(max(ids) for ids in token_ids)
    if top >= vocab_size:
        raise ValueError(f"the tokenizer gives token id {top}, but the embedding of {str(base_model)!r} has only "
                         f"{vocab_size} rows: the tokenizer does not belong to this model (check tokenizer_path)")


# ------------------------------------------------------------------------------------------------ conditioning


def gate_condition_numbers(gates: Tensor, *, centred: bool = False) -> Tensor:
    """Per layer, the 2-norm condition number (largest / smallest singular value) of ``gates[l]`` ``[E, H]``.

    ``inf`` where the rows are linearly dependent (or there are more experts than dimensions). With `centred`,
    the rows' mean is subtracted first and the ratio is taken over the ``E - 1`` directions the centred rows can
    span: adding one vector to every row shifts every logit of a token equally, which changes no softmax routing
    weight and no top-k choice, so this is the part of the geometry that decides which expert wins. (For two
    experts it is 1 unless the rows are equal.)
    """
    if gates.dim() != 3:
        raise ValueError(f"gates must be [num_layers, num_experts, hidden_size], got shape {tuple(gates.shape)}")
    num_layers, num_experts, hidden = gates.shape
    rows = gates.double()
    if centred:
        if num_experts < 2:
            return torch.ones(num_layers, dtype=torch.float64)
        rows = rows - rows.mean(dim=1, keepdim=True)
        if num_experts - 1 > hidden:
            return torch.full((num_layers,), math.inf, dtype=torch.float64)
        sv = torch.linalg.svdvals(rows)[:, : num_experts - 1]  # descending; the E-th one is 0 after centring
    else:
        if num_experts > hidden:
            return torch.full((num_layers,), math.inf, dtype=torch.float64)
        sv = torch.linalg.svdvals(rows)  # [L, E], descending
    small = sv[:, -1]
    return torch.where(small > 0, sv[:, 0] / small.clamp(min=torch.finfo(torch.float64).tiny),
                       torch.full_like(small, math.inf))


def ill_conditioned_layers(gates: Tensor, threshold: float = DEFAULT_CONDITION_THRESHOLD, *,
                           centred: bool = False) -> list[int]:
    """Layers whose gate rows are nearly linearly dependent: condition number above `threshold` (or not finite).

    The default is mergekit's test (plain condition number, threshold 5). Hidden-state gates of real models share
    a large common direction, so that test flags most layers of a typical merge (all 30 layers of the SmolLM2
    merge in `benchmarks/bench_merge.py`, whose routers still pick each prompt's own expert for most
    (prompt, layer) pairs). `centred=True` ignores that common part (see `gate_condition_numbers`) and flags only
    the layers where the differences between some experts' rows nearly vanish or nearly coincide.
    """
    cond = gate_condition_numbers(gates, centred=centred)
    return [i for i, c in enumerate(cond.tolist()) if not math.isfinite(c) or c > threshold]


__all__ = [
    "DEFAULT_CONDITION_THRESHOLD",
    "GATE_MODES",
    "HIDDEN_MODES",
    "PROMPT_MODES",
    "ExpertPrompts",
    "compute_gate_weights",
    "gate_condition_numbers",
    "ill_conditioned_layers",
    "load_base_tokenizer",
    "load_dense_model",
    "pad_left",
    "prompt_vectors",
    "read_input_embedding",
    "resolve_checkpoint",
    "tokenize_prompts",
]
