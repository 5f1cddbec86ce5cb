"""`export_hf` writes checkpoints that transformers loads with its own classes and the same logits; `load_hf`
reads them back.

Each case builds a tiny moekit model with seeded random weights (routers at a larger scale so routing has no
near-ties, a random nonzero selection bias where there is one), exports it, loads it with
`AutoModelForCausalLM.from_pretrained` and compares fp32 logits and greedy generation; `load_hf` must give back
the same configuration and identical logits. Checkpoints saved by transformers itself are read too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.interop import export_hf, load_hf, writer
from moekit.model import MoETransformer
from moekit.model.generate import generate

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# transformers builds a width-0 shared expert for models without one; torch notes that initialising it is a no-op
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

VOCAB, HIDDEN = 64, 32
ATOL = 1e-4


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _quiet(quiet_transformers):
    """Every test here runs with transformers' log quiet (conftest's `quiet_transformers`)."""


def _moe(**fields) -> MoEConfig:
    return MoEConfig(hidden_size=HIDDEN, **{"moe_intermediate_size": 16, "num_local_experts": 4, **fields})


def _config(moe: MoEConfig | None, **fields) -> ModelConfig:
    values = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 48, "max_position_embeddings": 64, "rope_theta": 5000.0, "moe": moe, **fields}
    return ModelConfig(**values)


@torch.no_grad()
def _random_model(config: ModelConfig, seed: int = 0) -> MoETransformer:
    """Seeded weights: matrices N(0, 0.08), routers N(0, 0.3), norms 1 + N(0, 0.1), selection biases N(0, 0.05)."""
    model = MoETransformer(config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.dim() == 1:
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(noise * (0.3 if "router" in name or name.endswith("gate.weight") else 0.08))
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)
    return model.eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def _hf_load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


# ---------------------------------------------------------------------------------------------- cases
CASES = {
    # every layer MoE, softmax top-k renormalised, GQA (2 kv heads), untied
    "mixtral": (_config(_moe(num_experts_per_tok=2), num_key_value_heads=2), "MixtralForCausalLM"),
    # dense first layer, gated shared expert, no renormalisation, tied embeddings
    "qwen2_moe": (_config(_moe(num_local_experts=6, num_experts_per_tok=2, norm_topk_prob=False, n_shared_experts=1,
                               shared_expert_intermediate_size=24, shared_expert_gate=True),
                          num_hidden_layers=3, first_k_dense_replace=1, tie_word_embeddings=True),
                  "Qwen2MoeForCausalLM"),
    # two fused shared experts without a gate (zero gate, doubled down_proj), MoE every other layer, GQA
    "qwen2_moe_ungated": (_config(_moe(num_experts_per_tok=2, n_shared_experts=2), num_hidden_layers=3,
                                  moe_layer_freq=2, num_key_value_heads=2), "Qwen2MoeForCausalLM"),
    # DeepSeek-V3 routing: sigmoid, nonzero bias, 4 groups keep 2, scaling; shared width 24 padded to 2 x 16
    "glm4_moe": (_config(_moe(num_local_experts=8, num_experts_per_tok=3, router="deepseek_v3",
                              scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              n_shared_experts=1, shared_expert_intermediate_size=24, aux_free_bias_update_rate=1e-3),
                         num_hidden_layers=3, first_k_dense_replace=1, num_key_value_heads=2, tie_word_embeddings=True),
                 "Glm4MoeForCausalLM"),
    # sigmoid top-k router with the aux-free bias and no shared expert (a width-0 shared expert in Glm4-MoE)
    "glm4_moe_topk_sigmoid": (_config(_moe(num_experts_per_tok=2, scoring_func="sigmoid",
                                           aux_free_bias_update_rate=1e-3)), "Glm4MoeForCausalLM"),
    "llama": (_config(None, num_key_value_heads=2), "LlamaForCausalLM"),
}
FORMAT_OF = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen2_moe_ungated": "qwen2_moe",
             "glm4_moe": "glm4_moe", "glm4_moe_topk_sigmoid": "glm4_moe", "llama": "llama"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_the_export_with_the_same_logits_and_load_hf_round_trips(case, tmp_path):
    config, architecture = CASES[case]
    model = _random_model(config)
    fmt = FORMAT_OF[case]
    out = export_hf(model, tmp_path / "hf", format=fmt)
    assert out == (tmp_path / "hf").absolute()
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [architecture] and written["model_type"] == fmt
    assert written["dtype"] == written["torch_dtype"] == "float32"

    hf_model = _hf_load(out)
    assert type(hf_model).__name__ == architecture
    ids = _ids()
    expected = _logits(model, ids)
    torch.testing.assert_close(_logits(hf_model, ids), expected, atol=ATOL, rtol=0)

    loaded = load_hf(out)
    assert loaded.config == config
    assert torch.equal(_logits(loaded, ids), expected)
    if config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight

    # "auto" makes the same choice
    auto = export_hf(model, tmp_path / "auto")
    assert json.loads((auto / "config.json").read_text())["model_type"] == fmt


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "glm4_moe", "llama"])
def test_greedy_generation_matches(case, tmp_path):
    config, _ = CASES[case]
    model = _random_model(config, seed=3)
    hf_model = _hf_load(export_hf(model, tmp_path / "hf"))
    ids = _ids(seed=4)
    expected = generate(model, ids, 3, temperature=0)
    with torch.no_grad():
        got = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)


def test_glm4_export_keeps_the_bias_and_groups_that_change_routing(tmp_path):
    config, _ = CASES["glm4_moe"]
    model = _random_model(config)
    out = export_hf(model, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert (written["n_group"], written["topk_group"], written["routed_scaling_factor"]) == (4, 2, 2.5)
    assert written["n_shared_experts"] == 2 and written["first_k_dense_replace"] == 1
    assert written["rope_parameters"]["partial_rotary_factor"] == 1.0 and not written["use_qk_norm"]
    hf_model = _hf_load(out)
    ids = _ids()
    with torch.no_grad():  # the bias matters: zeroing it in the HF model changes the logits
        for layer in hf_model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
    assert not torch.allclose(_logits(hf_model, ids), _logits(model, ids), atol=ATOL)


def test_softmax_routed_scaling_factor_is_folded_into_the_experts(tmp_path):
    model = _random_model(_config(_moe(num_experts_per_tok=2, routed_scaling_factor=2.5)))
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    ids = _ids()
    expected = _logits(model, ids)
    torch.testing.assert_close(_logits(_hf_load(out), ids), expected, atol=ATOL, rtol=0)
    loaded = load_hf(out)
    assert loaded.config == model.config
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=0)  # x * 2.5 / 2.5 may round


def test_switch_without_shared_expert_exports_as_qwen2_moe_with_a_width_zero_shared_expert(tmp_path):
    model = _random_model(_config(_moe(num_experts_per_tok=1, router="switch"), num_hidden_layers=3,
                                  first_k_dense_replace=1))
    out = export_hf(model, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen2_moe" and written["shared_expert_intermediate_size"] == 0
    assert written["norm_topk_prob"] is False and written["mlp_only_layers"] == [0]
    ids = _ids()
    torch.testing.assert_close(_logits(_hf_load(out), ids), _logits(model, ids), atol=ATOL, rtol=0)
    assert load_hf(out).config == model.config


# ---------------------------------------------------------------------------------------------- files
def test_sharded_export_loads_in_transformers_and_moekit(tmp_path):
    config, _ = CASES["glm4_moe"]
    model = _random_model(config)
    out = export_hf(model, tmp_path / "hf", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ids = _ids()
    torch.testing.assert_close(_logits(_hf_load(out), ids), _logits(model, ids), atol=ATOL, rtol=0)
    assert torch.equal(_logits(load_hf(out), ids), _logits(model, ids))


def test_bfloat16_export(tmp_path):
    config, _ = CASES["glm4_moe"]
    model = _random_model(config)
    out = export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.dtype == torch.bfloat16
    loaded = load_hf(out)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.layers[1].mlp.router.e_score_correction_bias.dtype == torch.float32
    assert load_hf(out, dtype="float32").embed_tokens.weight.dtype == torch.float32


def test_tokenizer_files_are_copied_and_define_eos(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2,
                                                             "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    config, _ = CASES["mixtral"]
    out = export_hf(_random_model(config), tmp_path / "hf", tokenizer_dir=tok_dir)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("hello world").input_ids == [1, 2] and hf_tok.eos_token_id == 0


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("router, fields", [
    ("expert_choice", {"capacity_factor": 2.0}),
    ("noisy_topk", {}),
    ("soft", {}),
    ("hierarchical", {"num_local_experts": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}),
])
def test_routers_without_a_transformers_equivalent_are_refused(router, fields, tmp_path):
    model = MoETransformer(_config(_moe(router=router, **fields)))
    for fmt in ("auto", "mixtral", "qwen2_moe", "glm4_moe"):
        with pytest.raises(ValueError, match=rf"router='{router}'.*no transformers architecture computes it"):
            export_hf(model, tmp_path / "hf", format=fmt)
    assert not (tmp_path / "hf").exists()


def test_other_refusals_explain_why(tmp_path):
    capacity = MoETransformer(_config(_moe(num_experts_per_tok=1, router="switch", capacity_factor=1.25)))
    with pytest.raises(ValueError, match=r"capacity_factor=1\.25 drops"):
        export_hf(capacity, tmp_path / "a")
    limited = MoETransformer(_config(_moe(num_experts_per_tok=2, expert_devices=2, max_devices_per_token=1)))
    with pytest.raises(ValueError, match=r"max_devices_per_token=1 \(device-limited routing"):
        export_hf(limited, tmp_path / "a")
    sigmoid = MoETransformer(CASES["glm4_moe"][0])
    with pytest.raises(ValueError, match="multi-head latent attention"):
        export_hf(sigmoid, tmp_path / "b", format="deepseek_v3")
    with pytest.raises(ValueError, match=r"format='mixtral' cannot express.*sigmoid.*format='glm4_moe'"):
        export_hf(sigmoid, tmp_path / "c", format="mixtral")
    gated = MoETransformer(CASES["qwen2_moe"][0])
    with pytest.raises(ValueError, match="no shared experts"):
        export_hf(gated, tmp_path / "d", format="mixtral")
    with pytest.raises(ValueError, match="shared_expert_gate=True"):
        export_hf(gated, tmp_path / "d", format="glm4_moe")
    biased = _random_model(_config(_moe(aux_free_bias_update_rate=1e-3)))  # softmax scores with a nonzero bias
    with pytest.raises(ValueError, match="no transformers architecture computes this model exactly"):
        export_hf(biased, tmp_path / "e")
    with pytest.raises(ValueError, match="format='bogus' is not allowed"):
        export_hf(gated, tmp_path / "f", format="bogus")
    assert not any(tmp_path.iterdir())


def test_existing_out_dir_is_refused_unless_overwrite(tmp_path):
    model = _random_model(CASES["mixtral"][0])
    out = tmp_path / "hf"
    out.mkdir()  # an empty folder is fine
    export_hf(model, out)
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(out))}.*not empty.*overwrite=True"):
        export_hf(model, out)
    export_hf(model, out, format="qwen2_moe", overwrite=True)  # a previous export is replaced
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left behind
    (out / "stale.txt").write_text("old")  # a file moekit did not write: overwrite no longer replaces the folder
    with pytest.raises(FileExistsError, match=r"'stale.txt'.*delete it by hand"):
        export_hf(model, out, format="mixtral", overwrite=True)
    assert (out / "stale.txt").read_text() == "old"
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"


# ---------------------------------------------------------------------------------------------- atomicity
def test_out_dir_appears_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    real_write = writer.stream_safetensors
    seen = []

    def checking_write(entries, filename, on_tensor=None):
        seen.append(Path(filename).parent)
        assert not out.exists(), "out_dir must not exist while it is being written"
        return real_write(entries, filename, on_tensor)

    monkeypatch.setattr(writer, "stream_safetensors", checking_write)
    export_hf(_random_model(CASES["glm4_moe"][0]), out, max_shard_bytes=40_000)
    assert len(seen) > 1 and all(parent != out and parent.parent == tmp_path for parent in seen)
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_failure_mid_write_leaves_no_out_dir(tmp_path, monkeypatch):
    calls = []

    def failing_write(entries, filename, on_tensor=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return None

    monkeypatch.setattr(writer, "stream_safetensors", failing_write)
    model = _random_model(CASES["mixtral"][0])
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path / "hf", max_shard_bytes=40_000)
    assert not any(tmp_path.iterdir())

    # with overwrite=True, a failed export leaves the previous export as it was
    monkeypatch.undo()
    previous = export_hf(model, tmp_path / "prev", format="qwen2_moe")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    monkeypatch.setattr(writer, "stream_safetensors", failing_write)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, previous, max_shard_bytes=40_000, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before


# ---------------------------------------------------------------------------------------------- load_hf
def _randomise_hf(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(".bias"):
                param.zero_()
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise * (0.3 if name.endswith("gate.weight") else 0.08))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)
    return model.eval()


HF_NATIVE = {
    "mixtral": lambda common: transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda common: transformers.Qwen2MoeConfig(
        **common, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=2, norm_topk_prob=True),
    "glm4_moe": lambda common: transformers.Glm4MoeConfig(
        **common, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1,
        n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=1.7, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        tie_word_embeddings=True),
}


@pytest.mark.parametrize("model_type", sorted(HF_NATIVE))
def test_load_hf_reads_checkpoints_saved_by_transformers(model_type, tmp_path):
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 40, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    hf_model = _randomise_hf(transformers.AutoModelForCausalLM.from_config(HF_NATIVE[model_type](common)))
    hf_model.save_pretrained(tmp_path / "saved")
    ids = _ids()
    expected = _logits(hf_model, ids)
    loaded = load_hf(tmp_path / "saved")
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=ATOL, rtol=0)
    # transformers 5's fused in-memory layout (3-D gate_up_proj / down_proj) is read as well
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {name: t.contiguous().clone() for name, t in hf_model.state_dict().items()
             if not (hf_model.config.tie_word_embeddings and name == "lm_head.weight")}
    safetensors_torch.save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    torch.testing.assert_close(_logits(load_hf(fused), ids), expected, atol=ATOL, rtol=0)


def test_load_hf_falls_back_to_the_transformers_fields_when_the_metadata_is_stale(tmp_path):
    model = _random_model(CASES["qwen2_moe_ungated"][0])
    out = export_hf(model, tmp_path / "hf")
    hf_model = _hf_load(out)
    with torch.no_grad():  # "fine-tune" the zero shared-expert gate in transformers and save again
        hf_model.model.layers[0].mlp.shared_expert_gate.weight.normal_()
    hf_model.save_pretrained(tmp_path / "tuned")
    with pytest.warns(UserWarning, match="does not describe this checkpoint"):
        loaded = load_hf(tmp_path / "tuned")
    assert loaded.config.moe.shared_expert_gate
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(hf_model, ids), atol=ATOL, rtol=0)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_load_hf_refuses_unsupported_input_clearly(tmp_path):
    out = export_hf(_random_model(CASES["glm4_moe"][0]), tmp_path / "hf")
    _edit_config(out, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_hf(out)
    _edit_config(out, model_type="deepseek_v3")
    with pytest.raises(ValueError, match="multi-head latent attention"):
        load_hf(out)
    _edit_config(out, model_type="glm4_moe", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                              "rope_theta": 5000.0})
    with pytest.raises(ValueError, match=r"rope_type='dynamic' is not supported.*linear, llama3 and yarn"):
        load_hf(out)

    out = export_hf(_random_model(CASES["qwen2_moe"][0]), tmp_path / "qwen")
    assert json.loads((out / "config.json").read_text())["qkv_bias"] is False
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(HIDDEN)  # this config has no q/k/v biases
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    safetensors_torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.2.mlp.experts.3.up_proj.weight' is missing"):
        load_hf(out)
    tensors["model.layers.2.mlp.experts.3.up_proj.weight"] = torch.zeros(16, HIDDEN)
    safetensors_torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.bias' has no place"):
        load_hf(out)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf(tmp_path)
