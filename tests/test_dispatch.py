"""Dispatch: grouping by expert, capacity dropping by router priority, combine."""

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.layer import dispatch
from moekit.layer.dispatch import combine, expert_capacity, permute, plan_dispatch


def test_dropless_plan_groups_assignments_by_expert_in_token_order():
    experts = torch.tensor([2, 0, 1, 0, 2, 2])
    plan = plan_dispatch(experts, num_experts=4)
    assert plan.order.tolist() == [1, 3, 2, 0, 4, 5]
    assert plan.group_sizes == [2, 1, 3, 0]
    assert plan.num_dropped == 0


def test_capacity_is_ceil_of_factor_times_assignments_over_experts():
    assert expert_capacity(8, 2, 0.5) == 2
    assert expert_capacity(10, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(4096 * 2, 8, 1.25) == 1280


def test_capacity_drops_second_choices_then_low_weights_first():
    # 4 tokens, top-2 over 2 experts, token-major: (t0: e0 .9, e1 .1) (t1: e0 .6, e1 .4) ...
    experts = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    weights = torch.tensor([0.9, 0.1, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2])
    plan = plan_dispatch(experts, 2, weights, num_experts_per_tok=2, capacity=2)
    # expert 0 first choices: t0 (.9), t3 (.8), t1 (.6) -> keeps t0, t3; t2's second choice is dropped too.
    # expert 1 first choices: t2 (.7); then second choices by weight: t1 (.4), t3 (.2), t0 (.1) -> keeps t2, t1.
    assert plan.order.tolist() == [0, 6, 4, 3]
    assert plan.group_sizes == [2, 2]
    assert plan.num_dropped == 4


def test_capacity_ties_go_to_the_earlier_token():
    experts = torch.tensor([0, 0, 0])
    plan = plan_dispatch(experts, 1, torch.tensor([0.5, 0.5, 0.5]), num_experts_per_tok=1, capacity=2)
    assert plan.order.tolist() == [0, 1]


def test_combine_sums_weighted_rows_per_token_and_drops_nothing_else():
    x = torch.arange(6.0).view(3, 2)
    token_index = torch.tensor([0, 0, 1, 2])
    experts = torch.tensor([1, 0, 1, 0])
    weights = torch.tensor([0.5, 0.25, 1.0, 2.0])
    plan = plan_dispatch(experts, 2)
    rows = permute(x, token_index, plan)  # identity experts: output = input
    out = combine(rows, token_index, weights, plan, num_tokens=3)
    assert torch.allclose(out, torch.stack([0.75 * x[0], x[1], 2.0 * x[2]]))


def test_switch_layer_zeroes_exactly_the_overflowing_tokens():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=4, moe_intermediate_size=8, num_local_experts=4, num_experts_per_tok=1,
                    router="switch", capacity_factor=1.0)
    layer = MoELayer(cfg).eval()
    with torch.no_grad():  # every token prefers expert 0, more strongly the larger its first feature
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(8, 4)
    x[:, 0] = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.4, 0.7])
    out = layer(x)
    capacity = 2  # ceil(1.0 * 8 / 4)
    kept = set(x[:, 0].topk(capacity).indices.tolist())  # the two largest router probabilities for expert 0
    assert kept == {1, 4}
    for t in range(8):
        assert bool(out.hidden_states[t].abs().sum() > 0) == (t in kept)
    assert out.stats["dropped_fraction"].item() == 6 / 8
    assert out.stats["tokens_per_expert"].tolist() == [8, 0, 0, 0]  # the router's choices, before dropping


@pytest.mark.parametrize("num_experts", [1, 3, 8, 64])
@pytest.mark.parametrize("num_assignments", [0, 1, 2, 16, 64, 300])
def test_counting_order_equals_the_stable_sort(num_assignments, num_experts):
    # tiny plans are ordered in Python, small ones by counting, large ones by argsort: all must give argsort's
    # stable order
    expert_index = torch.randint(0, num_experts, (num_assignments,), generator=torch.Generator().manual_seed(3))
    plan = plan_dispatch(expert_index, num_experts)
    assert torch.equal(plan.order, torch.argsort(expert_index, stable=True))
    assert plan.group_sizes == torch.bincount(expert_index, minlength=num_experts).tolist()
    counting = dispatch._counting_order(expert_index, torch.bincount(expert_index, minlength=num_experts),
                                        num_experts)
    assert torch.equal(counting, torch.argsort(expert_index, stable=True))
