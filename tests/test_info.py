"""moekit.info: analytic parameter, FLOP and memory counts against published numbers and real models."""

import json

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.info import (
    ModelInfo,
    info_from_hf_config,
    info_from_model_config,
    load_info_source,
)
from moekit.model import MoETransformer

MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}

DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "vocab_size": 129280,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
}


# ---------------------------------------------------------------------------------------------- published models
def test_mixtral_8x7b_matches_published_46_7b_total_12_9b_active():
    # Hand arithmetic (H=4096, I=14336, 32 layers, 32 heads of 128, 8 KV heads, V=32000, E=8, k=2):
    #   attention/layer: q 4096*4096 + k,v 2*4096*1024 + o 4096*4096 = 41,943,040
    #   one expert:      3 * 4096 * 14336                            = 176,160,768
    #   router 8*4096 = 32,768; two RMSNorms 2*4096 = 8,192
    #   total/layer:  41,943,040 + 8*176,160,768 + 32,768 + 8,192    = 1,451,270,144
    #   active/layer: 41,943,040 + 2*176,160,768 + 32,768 + 8,192    = 394,305,536
    #   embeddings + lm_head 2*32000*4096 = 262,144,000; final norm 4,096
    #   total  = 32*1,451,270,144 + 262,148,096 = 46,702,792,704  (46.70 B)
    #   active = 32*394,305,536   + 262,148,096 = 12,879,925,248  (12.88 B; published "12.9B active")
    info = info_from_hf_config(MIXTRAL_8X7B)
    print(info.format())
    assert abs(info.total_params - 46.70e9) <= 0.01e9
    assert 12.875e9 <= info.active_params <= 12.9e9  # 12.88 B to two decimals, at most the published 12.9 B
    assert info.total_params == 46_702_792_704
    assert info.active_params == 12_879_925_248
    assert info.num_moe_layers == 32
    text = info.format()
    assert "46.70 B" in text and "12.88 B" in text and "93.4 GB" in text


def test_deepseek_v3_matches_published_671b_total_37b_active():
    # DeepSeek-V3 reports 671B total / 37B activated parameters for the main model; the 685B of the
    # Hugging Face checkpoint adds the 14B multi-token-prediction (MTP) module, which transformers
    # does not build and which is not counted here. We get 671,026,404,352 (the checkpoint's
    # 671,026,419,200 minus the 58*256 `e_score_correction_bias` values, a buffer, not a parameter).
    # Active: 37.55B with the input embedding (0.93B) and lm_head counted; the published "37B" is a
    # rounded figure (36.62B without the input embedding), so we allow 1.5%.
    info = info_from_hf_config(DEEPSEEK_V3)
    print(info.format())
    assert abs(info.total_params - 671e9) <= 0.015 * 671e9
    assert abs(info.active_params - 37e9) <= 0.015 * 37e9
    assert info.num_layers == 61 and info.num_moe_layers == 58
    assert any("multi-token-prediction" in note for note in info.notes)


def test_other_published_models():
    # Llama-2-7B: the exact, well-known 6,738,415,616 parameters.
    llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "vocab_size": 32000}
    assert info_from_hf_config(llama).total_params == 6_738_415_616
    # Qwen1.5-MoE-A2.7B: "14.3B total, 2.7B activated" (shared expert + sigmoid gate, qkv bias).
    qwen2_moe = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
                 "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
                 "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "num_key_value_heads": 16, "vocab_size": 151936}
    info = info_from_hf_config(qwen2_moe)
    assert abs(info.total_params - 14.3e9) < 0.05e9 and abs(info.active_params - 2.7e9) < 0.05e9
    # Qwen3-30B-A3B: "30.5B total, 3.3B activated".
    qwen3_moe = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "vocab_size": 151936}
    info = info_from_hf_config(qwen3_moe)
    assert abs(info.total_params - 30.5e9) < 0.05e9 and abs(info.active_params - 3.3e9) < 0.06e9


def test_unsupported_model_type_names_it_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"model_type='gpt2' .*mixtral, qwen2_moe, qwen3_moe, olmoe, glm4_moe, "
                                         r"deepseek_v3, gpt_oss \(MoE\) and llama, mistral, qwen2, qwen3"):
        info_from_hf_config({"model_type": "gpt2", "hidden_size": 8})
    with pytest.raises(ValueError, match=r"lacks 'hidden_size', which a mixtral config needs"):
        info_from_hf_config({k: v for k, v in MIXTRAL_8X7B.items() if k != "hidden_size"})
    # a key transformers defaults is read with transformers' default (Mixtral: 8 local experts)
    eight = info_from_hf_config({k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"})
    assert eight.total_params == info_from_hf_config(MIXTRAL_8X7B).total_params


# ---------------------------------------------------------------------------------------------- moekit models
def _moe(**fields) -> MoEConfig:
    values = {"hidden_size": 32, "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2}
    values.update(fields)
    return MoEConfig(**values)


def _model(moe: MoEConfig | None = None, **fields) -> ModelConfig:
    values = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
              "intermediate_size": 48, "moe": moe}
    values.update(fields)
    return ModelConfig(**values)


CONFIGS = {
    "dense": _model(),
    "moe_every_layer": _model(_moe()),
    "gqa": _model(_moe(), num_key_value_heads=2),
    "tied": _model(_moe(), tie_word_embeddings=True),
    "tied_dense": _model(tie_word_embeddings=True),
    "first_dense_then_every_other": _model(_moe(), num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2),
    "shared_with_gate": _model(_moe(n_shared_experts=2, shared_expert_gate=True)),
    "shared_explicit_width": _model(_moe(n_shared_experts=1, shared_expert_intermediate_size=40)),
    "gelu": _model(_moe(hidden_act="gelu", n_shared_experts=1)),
    "hierarchical": _model(_moe(router="hierarchical", n_group=2, topk_group=1)),
    "noisy_topk": _model(_moe(router="noisy_topk")),
    "soft": _model(_moe(router="soft", slots_per_expert=3)),
    "expert_choice": _model(_moe(router="expert_choice", capacity_factor=2.0)),
    "deepseek_v3_router": _model(_moe(router="deepseek_v3", scoring_func="sigmoid", n_group=2, topk_group=2,
                                      n_shared_experts=1)),
    "switch": _model(_moe(router="switch", num_experts_per_tok=1)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_config_counts_match_an_instantiated_model(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = MoETransformer(config)
    info = info_from_model_config(config)
    assert info.total_params == sum(p.numel() for p in model.parameters())
    assert info.active_params == model.num_parameters(active=True)
    assert info.num_layers == config.num_hidden_layers
    assert info.num_moe_layers == sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def test_k_equals_e_makes_every_parameter_active():
    config = _model(_moe(num_local_experts=4, num_experts_per_tok=4, n_shared_experts=1))
    info = info_from_model_config(config)
    assert info.active_params == info.total_params
    partial = info_from_model_config(_model(_moe(num_local_experts=4, num_experts_per_tok=1)))
    assert partial.active_params < partial.total_params
    dense = info_from_model_config(_model())
    assert dense.active_params == dense.total_params


def test_flops_and_memory_follow_the_stated_formulas_on_a_hand_checked_model():
    # V=10, H=8, 1 layer, 2 heads of 4, 1 KV head, dense FFN width 16, untied:
    #   embed 80 + lm_head 80 + final norm 8 + layer norms 16
    #   + attention q 64 + k 32 + v 32 + o 64 = 192 + SwiGLU 3*8*16 = 384   -> 760 parameters
    #   matmul weights: 192 + 384 + lm_head 80 = 656 (the embedding lookup is not a matmul)
    #   forward FLOPs at context 5: 2*656 + 2*2*1 layer*5*(2 heads*4) = 1312 + 160 = 1472; train 3x = 4416
    #   inference (bf16, batch 3): weights 760*2 = 1520 + KV 2*1*1*4*5*3*2 = 240 -> 1760 bytes
    #   training: 16 * 760 = 12160 bytes
    config = ModelConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=16)
    info = info_from_model_config(config, context=5, batch=3, dtype_bytes=2)
    assert info.total_params == sum(p.numel() for p in MoETransformer(config).parameters()) == 760
    assert info.active_matmul_params == 656
    assert info.attention_flops_per_token == 160
    assert info.flops_per_token_forward == 1472
    assert info.train_flops_per_token == 4416
    assert (info.weights_bytes, info.kv_cache_bytes, info.memory_inference_bytes) == (1520, 240, 1760)
    assert info.memory_training_bytes == 12160
    # fp32 doubles weights and cache; the KV cache scales with batch and context
    fp32 = info_from_model_config(config, context=10, batch=3, dtype_bytes=4)
    assert (fp32.weights_bytes, fp32.kv_cache_bytes) == (3040, 960)
    # tying drops lm_head's parameters but not its matmul
    tied = info_from_model_config(ModelConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                                              tie_word_embeddings=True), context=5)
    assert tied.total_params == 680 and tied.flops_per_token_forward == 1472
    with pytest.raises(ValueError, match="batch=0"):
        info_from_model_config(config, batch=0)


def test_moe_flops_count_only_the_routed_experts_used():
    dense = _model(num_hidden_layers=1)
    one = info_from_model_config(_model(_moe(num_experts_per_tok=1), num_hidden_layers=1), context=0)
    two = info_from_model_config(_model(_moe(num_experts_per_tok=2), num_hidden_layers=1), context=0)
    expert_matmul = 3 * 32 * 16
    assert two.flops_per_token_forward - one.flops_per_token_forward == 2 * expert_matmul
    assert info_from_model_config(dense, context=0).attention_flops_per_token == 0


# ---------------------------------------------------------------------------------------------- HF parity
def _hf_param_count(config: dict) -> int:
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


_TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 64}
HF_TINY = {
    "llama": {**_TINY, "model_type": "llama"},
    "llama_bias_tied": {**_TINY, "model_type": "llama", "attention_bias": True, "mlp_bias": True,
                        "tie_word_embeddings": True},
    "mistral_head_dim": {**_TINY, "model_type": "mistral", "head_dim": 16},
    "qwen2": {**_TINY, "model_type": "qwen2"},
    "mixtral": {**_TINY, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_TINY, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "decoder_sparse_step": 2,
                  "mlp_only_layers": [3]},
    "qwen3_moe": {**_TINY, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "head_dim": 16, "mlp_only_layers": [0]},
    "deepseek_v3": {**_TINY, "model_type": "deepseek_v3", "num_key_value_heads": 4, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 16,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": 24,
                    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
    "deepseek_v3_no_q_lora": {**_TINY, "model_type": "deepseek_v3", "num_key_value_heads": 4, "n_routed_experts": 4,
                              "num_experts_per_tok": 2, "n_shared_experts": 2, "moe_intermediate_size": 16,
                              "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1, "q_lora_rank": None,
                              "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
}


@pytest.mark.parametrize("name", sorted(HF_TINY))
def test_hf_config_counts_match_transformers(name):
    config = HF_TINY[name]
    info = info_from_hf_config(config)
    assert info.total_params == _hf_param_count(config)


def test_qwen2_moe_layer_selection_and_shared_gate():
    info = info_from_hf_config(HF_TINY["qwen2_moe"])
    assert info.num_moe_layers == 1  # layers 1 and 3 by decoder_sparse_step=2, but 3 is in mlp_only_layers
    no_gate = info_from_hf_config({**HF_TINY["qwen2_moe"], "mlp_only_layers": [], "decoder_sparse_step": 1})
    assert no_gate.num_moe_layers == 4


# ---------------------------------------------------------------------------------------------- files
def test_load_info_source_reads_run_dirs_yaml_and_hf_dirs(tmp_path):
    config = CONFIGS["shared_with_gate"]
    expected = info_from_model_config(config)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"name": "tiny", "model": config.to_dict(), "train": {}}))
    from_run = load_info_source(run_dir)
    assert isinstance(from_run, ModelInfo)
    assert (from_run.total_params, from_run.active_params) == (expected.total_params, expected.active_params)

    yaml = pytest.importorskip("yaml")
    yaml_file = tmp_path / "tiny.yaml"
    yaml_file.write_text(yaml.safe_dump({"model": config.to_dict()}))
    assert load_info_source(yaml_file).total_params == expected.total_params

    hf_dir = tmp_path / "mixtral"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    assert load_info_source(hf_dir, context=1024).total_params == 46_702_792_704
    assert load_info_source(hf_dir / "config.json").name == "mixtral"

    with pytest.raises(FileNotFoundError):
        load_info_source(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_info_source(empty)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="neither an HF config"):
        load_info_source(bad)


def test_a_rope_moekit_cannot_compute_is_still_counted_with_a_note():
    config = {**HF_TINY["llama"], "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}
    info = info_from_hf_config(config)
    assert info.total_params == _hf_param_count(config)
    assert any("moekit cannot load this model" in note and "dynamic" in note for note in info.notes)
