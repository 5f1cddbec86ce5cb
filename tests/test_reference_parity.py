"""MoELayer equals a naive per-token reference (tests/reference.py) for every router, in eval mode.

Each case builds a tiny layer, scales its router weights up (no near-ties in any top-k), gives any
selection bias random values, and compares the layer's output and its gradient w.r.t. the input
with the reference computed from the same state dict, on 2-D [tokens, hidden] and 3-D
[batch, seq, hidden] inputs, with and without an attention mask.
"""

import math

import pytest
import torch
from torch import Tensor, nn

from moekit import MoEConfig, MoELayer

from .reference import reference_moe, token_choice_assignments

ATOL = 1e-5
BASE = {"hidden_size": 16, "moe_intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2}
EIGHT_EXPERTS = {"num_local_experts": 8}

# the plainest configuration of each router
ROUTER_DEFAULTS = {
    "topk": {"router": "topk"},
    "noisy_topk": {"router": "noisy_topk"},
    "switch": {"router": "switch", "num_experts_per_tok": 1},
    "deepseek_v3": {"router": "deepseek_v3", "scoring_func": "sigmoid"},
    "expert_choice": {"router": "expert_choice", "capacity_factor": 2.0},
    "hierarchical": {"router": "hierarchical", **EIGHT_EXPERTS, "n_group": 2, "topk_group": 1},
    "soft": {"router": "soft"},
}

CASES = {
    **ROUTER_DEFAULTS,
    "topk-sigmoid": {"scoring_func": "sigmoid"},
    "topk-unnormalised_scaled": {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
    "topk-selection_bias": {"aux_free_bias_update_rate": 1e-3},
    "topk-capacity_0.75": {"capacity_factor": 0.75},
    "topk-gelu": {"hidden_act": "gelu"},
    "topk-gelu_shared_gated": {"hidden_act": "gelu", "n_shared_experts": 1, "shared_expert_gate": True},
    "noisy_topk-k3": {"router": "noisy_topk", "num_experts_per_tok": 3},
    "switch-sigmoid": {**ROUTER_DEFAULTS["switch"], "scoring_func": "sigmoid"},
    "switch-capacity_0.5": {**ROUTER_DEFAULTS["switch"], "capacity_factor": 0.5},
    "switch-capacity_1.25": {**ROUTER_DEFAULTS["switch"], "capacity_factor": 1.25},
    "deepseek_v3-softmax": {"router": "deepseek_v3"},
    "deepseek_v3-groups_2_keep_1": {**ROUTER_DEFAULTS["deepseek_v3"], **EIGHT_EXPERTS, "n_group": 2,
                                    "topk_group": 1, "routed_scaling_factor": 2.5},
    "deepseek_v3-groups_4_keep_2": {**ROUTER_DEFAULTS["deepseek_v3"], **EIGHT_EXPERTS, "n_group": 4,
                                    "topk_group": 2, "num_experts_per_tok": 3},
    "expert_choice-capacity_1": {"router": "expert_choice", "capacity_factor": 1.0},
    "hierarchical-groups_2_keep_2": {**ROUTER_DEFAULTS["hierarchical"], "topk_group": 2},
    "hierarchical-groups_2_keep_2_k4": {**ROUTER_DEFAULTS["hierarchical"], "topk_group": 2, "num_experts_per_tok": 4},
    "soft-slots_2": {"router": "soft", "slots_per_expert": 2},
    # shared experts, plain and gated (Qwen2-MoE), on top of every router
    **{f"{name}-shared": {**fields, "n_shared_experts": 1} for name, fields in ROUTER_DEFAULTS.items()},
    **{f"{name}-shared_gated": {**fields, "n_shared_experts": 1, "shared_expert_gate": True}
       for name, fields in ROUTER_DEFAULTS.items()},
}

CAPACITY_CASES = ["topk-capacity_0.75", "switch-capacity_0.5", "switch-capacity_1.25"]
MASK_CASES = [*ROUTER_DEFAULTS, "soft-slots_2", "expert_choice-capacity_1", *CAPACITY_CASES]
BIAS_CASES = ["topk-selection_bias", "deepseek_v3", "deepseek_v3-groups_2_keep_1", "deepseek_v3-groups_4_keep_2"]

SHAPES = {"2d": (10, 16), "3d": (2, 6, 16)}
# 3-D mask with a hole in the middle and padding at both ends of the second sequence
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)


def make_layer(case: str) -> MoELayer:
    """A tiny eval-mode layer whose top-k choices are far from ties."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**{**BASE, **CASES[case]})).eval()
    with torch.no_grad():
        for weight in layer.router.parameters():
            if not weight.any():  # noisy top-k starts its gates at zero: every logit would tie
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            weight.mul_(3.0)
        bias = getattr(layer.router, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(0.2 * torch.randn_like(bias))
    return layer


def random_input(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def state_of(layer: MoELayer) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in layer.state_dict().items()}


def reference_output(layer: MoELayer, x: Tensor) -> Tensor:
    """The reference on an unmasked 2-D (one sequence) or 3-D (one sequence per row) input."""
    sequences = [x] if x.dim() == 2 else list(x.unbind(0))
    return torch.stack(reference_moe(layer.config, state_of(layer), sequences)).view(x.shape)


def input_gradients(layer: MoELayer, x: Tensor) -> tuple[Tensor, Tensor]:
    """(layer, reference) gradients of <output, fixed random upstream gradient> w.r.t. x."""
    upstream = random_input(x.shape, seed=2)
    grads = []
    for forward in (lambda v: layer(v).hidden_states, lambda v: reference_output(layer, v)):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(forward(leaf), leaf, upstream)
        grads.append(grad)
    return grads[0], grads[1]


# ---------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_output_matches_reference(case, shape):
    layer = make_layer(case)
    x = random_input(shape)
    with torch.no_grad():
        got = layer(x).hidden_states
    torch.testing.assert_close(got, reference_output(layer, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- backward parity
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_input_gradient_matches_reference(case, shape):
    layer = make_layer(case)
    got, expected = input_gradients(layer, random_input(shape))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- attention mask
@pytest.mark.parametrize("case", MASK_CASES)
def test_masked_real_tokens_match_reference_on_real_tokens_only(case):
    layer = make_layer(case)
    x = random_input(SHAPES["3d"])
    with torch.no_grad():
        got = layer(x, attention_mask=MASK).hidden_states
    real_sequences = [row[keep] for row, keep in zip(x, MASK, strict=True)]
    expected = torch.cat(reference_moe(layer.config, state_of(layer), real_sequences))
    torch.testing.assert_close(got[MASK], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", MASK_CASES)
def test_masked_padded_positions_are_zero(case):
    layer = make_layer(case)
    with torch.no_grad():
        got = layer(random_input(SHAPES["3d"]), attention_mask=MASK).hidden_states
    assert torch.equal(got[~MASK], torch.zeros_like(got[~MASK]))


# ---------------------------------------------------------------------- the test data itself
@pytest.mark.parametrize("case", CAPACITY_CASES)
def test_capacity_cases_drop_what_the_reference_drops(case):
    layer = make_layer(case)
    x = random_input(SHAPES["2d"])
    kept, dropped = token_choice_assignments(layer.config, state_of(layer), list(x.unbind(0)))
    if case == "switch-capacity_0.5":
        assert dropped, "capacity_factor 0.5 must drop something, or the case tests nothing"
    with torch.no_grad():
        stats = layer(x).stats
    assert stats["dropped_fraction"].item() == pytest.approx(len(dropped) / (len(kept) + len(dropped)))


@pytest.mark.parametrize("case", BIAS_CASES)
def test_selection_bias_changes_some_choice(case):
    """Otherwise the bias cases could not tell "the bias only selects" from "the bias is ignored"."""
    layer = make_layer(case)
    tokens = list(random_input(SHAPES["2d"]).unbind(0))
    state = state_of(layer)
    unbiased = {name: value for name, value in state.items() if name != "router.e_score_correction_bias"}

    def choices(state):
        kept, _ = token_choice_assignments(layer.config, state, tokens)
        return [(a.token, a.expert) for a in kept]

    assert choices(state) != choices(unbiased)
