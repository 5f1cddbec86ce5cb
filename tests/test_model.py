"""The decoder-only MoE transformer: layer layout, KV cache, generation sampling, parameter counts."""

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.model import MoETransformer
from moekit.model.generate import generate, sample_next


def tiny(with_moe: bool = True, **fields) -> ModelConfig:
    moe_config = MoEConfig(hidden_size=32, moe_intermediate_size=16, num_local_experts=4) if with_moe else None
    values = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
              "intermediate_size": 32, "max_position_embeddings": 64, "moe": moe_config, **fields}
    return ModelConfig(**values)


def test_moe_placement_follows_first_k_dense_and_frequency():
    model = MoETransformer(tiny(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2))
    assert [layer.is_moe for layer in model.layers] == [False, True, False, True, False, True]
    assert not any(layer.is_moe for layer in MoETransformer(tiny(with_moe=False)).layers)


def test_loss_is_next_token_cross_entropy_and_aux_loss_sums_layers():
    torch.manual_seed(0)
    cfg = tiny(with_moe=True)
    cfg.moe = cfg.moe.replace(router_aux_loss_coef=0.1)
    model = MoETransformer(cfg)
    ids = torch.randint(0, 40, (2, 10))
    out = model(ids, targets=ids)
    expected = torch.nn.functional.cross_entropy(out.logits.view(-1, 40), ids.view(-1))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    layer_terms = sum(0.1 * s["router_aux_loss"] for s in out.moe_stats.values())
    assert out.aux_loss.item() == pytest.approx(layer_terms.item(), rel=1e-5)
    assert sorted(out.moe_stats) == [0, 1, 2]


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_kv_cache_gives_the_same_logits_as_a_full_forward(kv_heads):
    torch.manual_seed(0)
    model = MoETransformer(tiny(num_key_value_heads=kv_heads)).eval()
    ids = torch.randint(0, 40, (2, 12))
    full = model(ids).logits
    first = model(ids[:, :7], use_cache=True)
    rest = model(ids[:, 7:], past_key_values=first.past_key_values, use_cache=True)  # several tokens at once
    assert torch.allclose(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5)
    step = model(ids[:, 11:], past_key_values=model(ids[:, :11], use_cache=True).past_key_values)
    assert torch.allclose(step.logits[:, 0], full[:, 11], atol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    ids = torch.randint(0, 40, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 40
    assert torch.allclose(model(ids).logits[:, :6], model(changed).logits[:, :6], atol=1e-6)


def test_logits_to_keep_gives_the_last_positions_of_the_full_forward():
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    ids = torch.randint(0, 40, (2, 9))
    full = model(ids).logits
    assert torch.allclose(model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
    assert torch.allclose(model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, targets=ids, logits_to_keep=1)


def test_router_stats_false_gives_the_same_logits_without_stats():
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    ids = torch.randint(0, 40, (2, 9))
    full, lean = model(ids), model(ids, router_stats=False)
    assert torch.equal(lean.logits, full.logits)
    assert full.moe_stats and not lean.moe_stats and lean.aux_loss.item() == 0.0


def test_greedy_generation_matches_step_by_step_argmax():
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    prompt = torch.randint(0, 40, (1, 4))
    out = generate(model, prompt, max_new_tokens=5, temperature=0)
    ids = prompt
    for _ in range(5):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_generation_runs_one_forward_per_new_token(new_tokens):
    # the prefill picks the first new token and each later token needs one cached step: N forwards in all
    torch.manual_seed(0)
    model = MoETransformer(tiny()).eval()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    out = generate(model, torch.randint(0, 40, (2, 4)), max_new_tokens=new_tokens, temperature=0)
    assert out.shape == (2, 4 + new_tokens) and len(calls) == new_tokens


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert picks == {0, 1}
    # softmax of the logits is about [0.69, 0.25, 0.03, ...]: top_p 0.8 keeps the first two only
    picks = {int(sample_next(logits, 1.0, top_p=0.8, generator=gen)) for _ in range(200)}
    assert picks == {0, 1}


def test_active_parameters_count_k_of_e_experts():
    model = MoETransformer(tiny())
    moe = model.layers[0].mlp
    per_expert = sum(p[0].numel() for p in moe.experts.parameters())
    assert model.num_parameters() - model.num_parameters(active=True) == 3 * per_expert * (4 - 2)


def test_tied_embeddings_share_one_matrix():
    model = MoETransformer(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_too_long_input_is_refused_with_the_limit():
    model = MoETransformer(tiny(max_position_embeddings=8))
    with pytest.raises(ValueError, match=r"9 tokens exceeds max_position_embeddings=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_attention_heads": 5}, r"num_attention_heads=5 .*divisor of hidden_size=32"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads=3 .*divisor of num_attention_heads=4"),
        ({"first_k_dense_replace": 4}, r"first_k_dense_replace=4 .*\[0, num_hidden_layers=3\]"),
        ({"moe": MoEConfig(hidden_size=16)}, r"moe.hidden_size=16 .*equal to hidden_size=32"),
    ],
)
def test_model_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny(**fields)
