"""Tiny checkpoints of every native family, built with transformers' own classes and saved as transformers saves.

Each case is a family's config with the features that family's real checkpoints have switched on (sliding
windows shorter than the test sequences, q/k norms, biases, partial or scaled RoPE, shared experts, dense layers,
groups...). `hf_model(name)` builds it with seeded random weights the way trained checkpoints have them (norms
1 + noise, biases and selection biases nonzero, routers large enough that routing has no near-ties; see
`hf_zoo.randomise`); `save_case(name, path)` saves it with `save_pretrained` and the test tokenizer, so the folder
is what a user downloads. Nothing is downloaded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .hf_zoo import randomise
from .merge_fixtures import VOCAB_SIZE, make_tokenizer

SEQ = 12  # test sequences are longer than every sliding window below
_COMMON = {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}

#: case name -> (family model_type, transformers config class, fields on top of the common tiny sizes)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("mixtral", "MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 5}),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
        "decoder_sparse_step": 1, "mlp_only_layers": [1], "norm_topk_prob": False, "use_sliding_window": True,
        "sliding_window": 4, "max_window_layers": 2}),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 16, "norm_topk_prob": True,
        "decoder_sparse_step": 2, "mlp_only_layers": []}),
    "qwen3_moe_unnormalised": ("qwen3_moe", "Qwen3MoeConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": False,
        "attention_bias": True, "use_sliding_window": True, "sliding_window": 5}),
    "olmoe": ("olmoe", "OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 2.0,
                                       "norm_topk_prob": False}),
    "glm4_moe": ("glm4_moe", "Glm4MoeConfig", {
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_shared_experts": 1,
        "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "use_qk_norm": True, "attention_bias": True,
        "routed_scaling_factor": 1.5, "head_dim": 16}),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", {
        "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 24,
        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
        "routed_scaling_factor": 2.5, "rope_parameters": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "deepseek_v3_plain_q": ("deepseek_v3", "DeepseekV3Config", {
        "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "n_shared_experts": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 2, "q_lora_rank": None,
        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12,
        "rope_interleave": False, "attention_bias": True}),
    "gpt_oss": ("gpt_oss", "GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8,
                                            "sliding_window": 4,
                                            "rope_parameters": {**_YARN, "beta_fast": 32.0, "beta_slow": 1.0,
                                                                "truncate": False, "rope_theta": 150000.0}}),
    "llama": ("llama", "LlamaConfig", {}),
    "llama3_rope": ("llama", "LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0}, "attention_bias": True}),
    "llama_linear_rope": ("llama", "LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 10000.0}, "head_dim": 16}),
    "llama_yarn_rope": ("llama", "LlamaConfig", {"rope_parameters": dict(_YARN), "tie_word_embeddings": True}),
    "mistral": ("mistral", "MistralConfig", {"sliding_window": 5, "head_dim": 16}),
    "qwen2": ("qwen2", "Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3", "Qwen3Config", {"head_dim": 16}),
}

#: one case per native family, the family's name as the case name where it has one
FAMILY_CASE = {family: name for name, (family, _, _) in reversed(CASES.items())}


def hf_config(name: str) -> Any:
    """The transformers config of case `name` (eager attention and experts: transformers' reference code)."""
    import transformers

    _, cls, fields = CASES[name]
    config = getattr(transformers, cls)(**{**_COMMON, **fields})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """Case `name`'s transformers CausalLM with seeded random weights, in eval mode."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name))
    return randomise(model, seed=seed).eval()


def save_case(name: str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save case `name` (weights, config.json, the test tokenizer) as a transformers checkpoint folder."""
    path = Path(path)
    model = hf_model(name, seed)
    model.save_pretrained(str(path))
    make_tokenizer(path)
    return path


def token_ids(batch: int = 2, seq: int = SEQ, seed: int = 3) -> torch.Tensor:
    """Seeded token ids inside the tokenizer's vocabulary."""
    return torch.randint(4, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))
