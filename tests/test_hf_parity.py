"""`MoELayer.from_hf(block)` computes the same function as the transformers MoE block it was read from.

Each HF block is built from a tiny config with seeded random weights, converted, and both modules
run in eval mode on the same input. Outputs, router logits, the input gradient for a fixed random
upstream gradient and the weight gradients (mapped by name) must agree in fp32; the Mixtral
conversion is also checked on a 2-D [tokens, hidden] input and in bf16.
"""

import pytest
import torch
from torch import nn

from moekit import MoELayer

transformers = pytest.importorskip("transformers")

HIDDEN = 32
LEADING_SHAPE = (2, 7)  # [batch, seq]
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}

# moekit parameter name -> HF parameter name (transformers 5 layout: fused 3-D expert tensors).
EXPERT_NAMES = {
    "router.weight": "gate.weight",
    "experts.gate_up_proj": "experts.gate_up_proj",
    "experts.down_proj": "experts.down_proj",
}
QWEN2_NAMES = {
    **EXPERT_NAMES,
    "shared_experts.gate_proj.weight": "shared_expert.gate_proj.weight",
    "shared_experts.up_proj.weight": "shared_expert.up_proj.weight",
    "shared_experts.down_proj.weight": "shared_expert.down_proj.weight",
    "shared_experts.gate.weight": "shared_expert_gate.weight",
}
DEEPSEEK_NAMES = {
    **EXPERT_NAMES,
    "shared_experts.gate_proj.weight": "shared_experts.gate_proj.weight",
    "shared_experts.up_proj.weight": "shared_experts.up_proj.weight",
    "shared_experts.down_proj.weight": "shared_experts.down_proj.weight",
}


# ---------------------------------------------------------------------------------------------- builders
def _seeded_normal(shape, seed: int, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


@torch.no_grad()
def _randomise(block: nn.Module, seed: int = 0, expert_std: float = 0.05) -> nn.Module:
    """Set every parameter (HF leaves some `torch.empty`): routers at std 0.1 so routing has no ties."""
    for i, (name, param) in enumerate(block.named_parameters()):
        std = 0.1 if name.endswith("gate.weight") else expert_std  # gate: router and Qwen2's shared_expert_gate
        param.copy_(_seeded_normal(param.shape, seed + i, std))
    return block.eval()


def _tiny(config):
    config._experts_implementation = "eager"  # HF's reference per-expert loop (and no "standalone" warning)
    return config


def mixtral_block(expert_std: float = 0.05) -> nn.Module:
    config = _tiny(transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=64, num_local_experts=8,
                                              num_experts_per_tok=2))
    return _randomise(transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config), expert_std=expert_std)


def qwen2_block(norm_topk_prob: bool) -> nn.Module:
    config = _tiny(transformers.Qwen2MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=16, num_experts=8,
                                               num_experts_per_tok=2, shared_expert_intermediate_size=48,
                                               norm_topk_prob=norm_topk_prob))
    return _randomise(transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(config))


def deepseek_block(n_shared_experts: int) -> nn.Module:
    config = _tiny(transformers.DeepseekV3Config(hidden_size=HIDDEN, moe_intermediate_size=16, n_routed_experts=16,
                                                 num_experts_per_tok=4, n_group=4, topk_group=2,
                                                 n_shared_experts=n_shared_experts, routed_scaling_factor=2.5,
                                                 norm_topk_prob=True))
    block = _randomise(transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(config))
    # A nonzero selection bias, on the scale of the sigmoid scores' spread, so it changes which experts win.
    block.gate.e_score_correction_bias.copy_(_seeded_normal(16, seed=99, std=0.1))
    return block


# case id -> (builder, moekit -> HF parameter names, expected fields of the converted MoEConfig)
CASES = {
    "mixtral": (mixtral_block, EXPERT_NAMES, {
        "num_local_experts": 8, "num_experts_per_tok": 2, "router": "topk", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "n_shared_experts": 0,
        "hidden_size": HIDDEN, "moe_intermediate_size": 64}),
    "qwen2-norm": (lambda: qwen2_block(norm_topk_prob=True), QWEN2_NAMES, {
        "num_local_experts": 8, "num_experts_per_tok": 2, "router": "topk", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "n_shared_experts": 1,
        "shared_expert_intermediate_size": 48, "shared_expert_gate": True}),
    "qwen2-no-norm": (lambda: qwen2_block(norm_topk_prob=False), QWEN2_NAMES, {
        "num_local_experts": 8, "num_experts_per_tok": 2, "router": "topk", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": False, "n_shared_experts": 1,
        "shared_expert_intermediate_size": 48, "shared_expert_gate": True}),
    "deepseek-1-shared": (lambda: deepseek_block(n_shared_experts=1), DEEPSEEK_NAMES, {
        "num_local_experts": 16, "num_experts_per_tok": 4, "router": "deepseek_v3", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "n_shared_experts": 1,
        "shared_expert_intermediate_size": 16}),
    "deepseek-2-shared": (lambda: deepseek_block(n_shared_experts=2), DEEPSEEK_NAMES, {
        "num_local_experts": 16, "num_experts_per_tok": 4, "router": "deepseek_v3", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "n_shared_experts": 2,
        "shared_expert_intermediate_size": 32}),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    """(HF block, moekit layer converted from it, moekit -> HF parameter names, expected config fields)."""
    build, names, expected = CASES[request.param]
    block = build()
    return block, MoELayer.from_hf(block).eval(), names, expected


# ---------------------------------------------------------------------------------------------- helpers
def _inputs(leading_shape=LEADING_SHAPE, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, upstream gradient): fixed random tensors of shape [*leading_shape, HIDDEN]."""
    shape = (*leading_shape, HIDDEN)
    return _seeded_normal(shape, seed=1234, std=1.0).to(dtype), _seeded_normal(shape, seed=4321, std=1.0).to(dtype)


def _forward_backward(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, d output . upstream / dx); parameter gradients are left in `.grad`."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    out = out.hidden_states if isinstance(module, MoELayer) else out
    out.backward(upstream)
    return out.detach(), x.grad


def _grad(module: nn.Module, name: str) -> torch.Tensor:
    param = module.get_parameter(name)
    return torch.zeros_like(param) if param.grad is None else param.grad


def _assert_weight_grads_match(layer: MoELayer, block: nn.Module, names: dict[str, str], tol: dict) -> None:
    for name, hf_name in names.items():
        torch.testing.assert_close(_grad(layer, name), _grad(block, hf_name), **tol,
                                   msg=lambda m, name=name, hf_name=hf_name: f"grad of {name} vs HF {hf_name}: {m}")


# ---------------------------------------------------------------------------------------------- tests
def test_from_hf_sets_the_expected_config_fields(case):
    _, layer, _, expected = case
    actual = {field: getattr(layer.config, field) for field in expected}
    assert actual == expected


def test_forward_output_matches_hf(case):
    block, layer, _, _ = case
    x, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).hidden_states, block(x), **FP32_TOL)


def test_router_logits_match_hf(case):
    block, layer, _, _ = case
    x, _ = _inputs()
    with torch.no_grad():
        hf_logits, _, _ = block.gate(x.reshape(-1, HIDDEN))  # transformers 5 routers: (logits, weights, indices)
        logits = layer(x).router_logits
    assert logits.shape == (x.shape[0] * x.shape[1], layer.config.num_local_experts)
    torch.testing.assert_close(logits, hf_logits, **FP32_TOL)


def test_input_gradient_matches_hf(case):
    block, layer, _, _ = case
    x, upstream = _inputs()
    _, grad_hf = _forward_backward(block, x, upstream)
    _, grad = _forward_backward(layer, x, upstream)
    torch.testing.assert_close(grad, grad_hf, **FP32_TOL)


def test_weight_gradients_match_hf(case):
    block, layer, names, _ = case
    x, upstream = _inputs()
    _forward_backward(block, x, upstream)
    _forward_backward(layer, x, upstream)
    _assert_weight_grads_match(layer, block, names, FP32_TOL)


def test_every_trainable_moekit_parameter_has_an_hf_counterpart(case):
    _, layer, names, _ = case
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == set(names)


def test_deepseek_selection_bias_is_copied_and_changes_the_chosen_experts():
    block = deepseek_block(n_shared_experts=1)
    layer = MoELayer.from_hf(block).eval()
    torch.testing.assert_close(layer.router.e_score_correction_bias, block.gate.e_score_correction_bias)
    x, _ = _inputs()
    with torch.no_grad():
        _, _, chosen_with_bias = block.gate(x.reshape(-1, HIDDEN))
        block.gate.e_score_correction_bias.zero_()
        _, _, chosen_without_bias = block.gate(x.reshape(-1, HIDDEN))
    # otherwise the parity tests above would not exercise "the bias selects, the raw scores weight"
    assert not torch.equal(chosen_with_bias.sort(dim=-1).values, chosen_without_bias.sort(dim=-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("leading_shape", [(14,), LEADING_SHAPE], ids=["2d-tokens", "3d-batch"])
def test_mixtral_conversion_matches_hf_for_2d_input_and_bf16(leading_shape, dtype):
    # Expert weights at std 0.1 (not 0.05) make the outputs O(0.1-1), so the loose bf16 tolerance below
    # is still small next to the values it compares.
    block = mixtral_block(expert_std=0.1).to(dtype)
    layer = MoELayer.from_hf(block).eval()
    assert next(layer.parameters()).dtype == dtype
    # bf16 keeps 8 significant bits (machine epsilon 2**-7 ~ 8e-3). The two implementations round at
    # different points (HF multiplies the bf16 expert output by the fp32 routing weight and rounds once,
    # moekit rounds the weight to bf16 first) and accumulate in different orders, so they agree only to
    # a few bf16 ulps of the O(1) intermediate values: hence 2e-2 instead of fp32's 1e-5.
    tol = FP32_TOL if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    x, upstream = _inputs(leading_shape, dtype)
    # the HF block only takes [batch, seq, hidden]: it sees a 2-D input as one sequence
    x_hf, upstream_hf = (x, upstream) if x.dim() == 3 else (x.unsqueeze(0), upstream.unsqueeze(0))
    out_hf, grad_hf = _forward_backward(block, x_hf, upstream_hf)
    out, grad = _forward_backward(layer, x, upstream)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, out_hf.view_as(out), **tol)
    torch.testing.assert_close(grad, grad_hf.view_as(grad), **tol)
    _assert_weight_grads_match(layer, block, EXPERT_NAMES, tol)


def test_from_hf_rejects_an_unsupported_module():
    with pytest.raises(ValueError, match=r"Linear is not a supported MoE block.*MixtralSparseMoeBlock.*"
                                         r"Qwen2MoeSparseMoeBlock.*DeepseekV3MoE"):
        MoELayer.from_hf(nn.Linear(HIDDEN, HIDDEN))


def test_deepseek_router_logits_stay_float32_in_bf16_like_hf():
    # DeepSeek-V3 computes its router logits in float32 even for a bf16 model; bf16 logits could flip
    # near-tied expert choices, so moekit's deepseek_v3 router must do the same.
    block = deepseek_block(n_shared_experts=1).to(torch.bfloat16)
    layer = MoELayer.from_hf(block).eval()
    x, _ = _inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        logits_hf = block.gate(x.reshape(-1, HIDDEN))[0]
        logits = layer(x).router_logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, logits_hf, **FP32_TOL)
