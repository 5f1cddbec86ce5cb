"""Smoke test of `hf_zoo`: it finds the MoE block classes of the installed transformers and each one runs."""

import pytest
import torch

pytest.importorskip("transformers")

from .hf_zoo import SKIPPED, call_block, moe_block_classes, tiny_config, tiny_model

KNOWN_BLOCKS = {
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "Glm4MoeMoE",
    "DeepseekV3MoE",
    "GptOssMLP",
}


@pytest.fixture(scope="module")
def zoo():
    return moe_block_classes()


def test_finds_the_known_blocks_and_many_more(zoo):
    names = {zb.cls.__name__ for zb in zoo}
    assert KNOWN_BLOCKS <= names, sorted(KNOWN_BLOCKS - names)
    assert len(zoo) > 40
    keys = [(zb.cls.__module__, zb.cls.__qualname__) for zb in zoo]
    assert len(set(keys)) == len(keys)  # one entry per class
    for zb in zoo:
        assert type(zb.block) is zb.cls
        assert not zb.block.training
        assert zb.hidden_size == zb.config.hidden_size
        assert all(p.dtype == torch.float32 for p in zb.block.parameters())
        assert "experts" in zb.block._modules


def test_every_block_runs(zoo):
    failures = []
    for i, zb in enumerate(zoo):
        x = torch.randn(2, 5, zb.hidden_size, generator=torch.Generator().manual_seed(i))
        try:
            with torch.no_grad():
                out = call_block(zb.block, x)
        except Exception as exc:
            failures.append(f"{zb.model_type} {zb.cls.__name__}: {type(exc).__name__}: {exc}")
            continue
        if out.shape != x.shape or not torch.isfinite(out).all():
            failures.append(f"{zb.model_type} {zb.cls.__name__}: shape {tuple(out.shape)}, not finite or wrong shape")
    assert not failures, "\n".join(failures)


def test_skipped_families_have_reasons(zoo):
    print(f"\n{len(zoo)} MoE block classes; {len(SKIPPED)} families skipped")
    for model_type, reason in SKIPPED.items():
        print(f"  {model_type}: {reason}")
        assert isinstance(reason, str) and reason.strip()


def test_tiny_models_are_deterministic_and_routers_are_wide():
    a, b = tiny_model("mixtral"), tiny_model("mixtral")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    router = a.model.layers[0].mlp.gate.weight
    expert = a.model.layers[0].mlp.experts.gate_up_proj
    assert 0.2 < router.std() < 0.4 and 0.03 < expert.std() < 0.07
    norm = a.model.layers[0].input_layernorm.weight
    assert 0.05 < norm.std() < 0.15 and abs(norm.mean() - 1) < 0.1


def test_tiny_config_overrides_apply_last():
    config = tiny_config("deepseek_v3", n_routed_experts=16, num_experts_per_tok=4)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.hidden_size) == (16, 4, 32)
    assert config._experts_implementation == "eager"
