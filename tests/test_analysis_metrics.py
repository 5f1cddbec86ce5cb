"""The routing metrics (`moekit.analysis.metrics`) against values computed by hand on small hand-made routings."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.analysis import metrics as m

# E = 4, k = 2, four tokens in one sequence; expert 3 is never chosen
ROUTING = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
WEIGHTS = torch.tensor([[0.6, 0.4]] * 4)
E = 4


def test_load_balance_and_entropy_by_hand():
    load = m.expert_load(ROUTING, E)
    assert load.tolist() == [4, 3, 1, 0]
    assert m.load_share_of_ideal(load).tolist() == [2.0, 1.5, 0.5, 0.0]  # ideal: 8 assignments / 4 = 2
    assert float(m.max_violation(load)) == pytest.approx((4 - 2) / 2)
    assert m.coefficient_of_variation(load) == pytest.approx(math.sqrt((4 + 1 + 1 + 4) / 4) / 2)
    entropy = -(0.5 * math.log(0.5) + 0.375 * math.log(0.375) + 0.125 * math.log(0.125))
    assert m.routing_entropy(load) == pytest.approx(entropy)
    assert m.effective_experts(load) == pytest.approx(math.exp(entropy))
    assert m.dead_experts(load) == [3]
    assert m.saturated_experts(load, capacity_factor=1.0) == [0, 1]  # capacity ceil(1.0 * 8 / 4) = 2
    assert m.max_violation_batch([torch.tensor([2, 2, 2, 2]), load]) == pytest.approx((0.0 + 1.0) / 2)


def test_k_equals_e_is_perfectly_balanced_and_fully_coactivated():
    everyone = torch.arange(E).repeat(5, 1)  # 5 tokens, each using all 4 experts
    load = m.expert_load(everyone, E)
    assert load.tolist() == [5] * E
    assert float(m.max_violation(load)) == 0.0 and m.coefficient_of_variation(load) == 0.0
    assert m.effective_experts(load) == pytest.approx(E)
    expected = torch.ones(E, E, dtype=torch.float64) - torch.eye(E, dtype=torch.float64)
    assert torch.equal(m.coactivation(everyone, E), expected)


def test_k_equals_one_has_no_coactivation_and_one_expert_has_zero_entropy():
    single = torch.tensor([[2], [2], [2]])
    load = m.expert_load(single, E)
    assert m.routing_entropy(load) == 0.0 and m.effective_experts(load) == 1.0
    assert m.dead_experts(load) == [0, 1, 3]
    assert torch.equal(m.coactivation(single, E), torch.zeros(E, E, dtype=torch.float64))


def test_coactivation_by_hand():
    # together: (0,1) in tokens 0, 2, 3; (0,2) in token 1. Chosen: e0 4 times, e1 3, e2 1, e3 never
    expected = torch.tensor([[0, 3 / 4, 1 / 4, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(m.coactivation(ROUTING, E), expected)


def test_padding_is_removed_before_counting():
    padded = torch.tensor([[[0, 1], [0, 2], [3, 3]], [[1, 0], [0, 1], [3, 3]]])  # [B=2, S=3, k]; last position pad
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    real = m.drop_padding(padded, mask)
    assert torch.equal(real, ROUTING)
    assert m.expert_load(real, E).tolist() == [4, 3, 1, 0]  # the padding's expert 3 is still dead
    with pytest.raises(ValueError, match="positions"):
        m.drop_padding(padded, mask[:, :2])


def test_dropped_fraction_follows_moekit_priority_and_lands_at_the_end():
    # capacity ceil(1.0 * 8 / 4) = 2. Expert 0 gets first choices of tokens 0, 1, 3 and a second choice of token 2:
    # it keeps tokens 0 and 1 (first choices, earlier tokens) and drops 3 and 2's. Expert 1 keeps token 2's first
    # choice and token 0's second (earlier than token 3's): token 3's second choice is dropped. 3 of 8 dropped.
    fraction, by_position = m.dropped_by_position(ROUTING, WEIGHTS, E, 1.0, torch.arange(4), 4)
    assert fraction == pytest.approx(3 / 8)
    assert by_position.tolist() == [0.0, 0.0, 0.5, 1.0]
    fraction, _ = m.dropped_by_position(ROUTING, WEIGHTS, E, 4.0, torch.arange(4), 4)
    assert fraction == 0.0


def test_layer_consistency_by_hand():
    # layer l chose 0, 0, 1, 0; layer l+1 chose 2, 2, 3, 1: after 0 the most common is 2 (twice), after 1 it is 3
    assert m.layer_consistency(torch.tensor([0, 0, 1, 0]), torch.tensor([2, 2, 3, 1]), E) == pytest.approx(3 / 4)
    assert m.layer_consistency(torch.tensor([0, 1, 2]), torch.tensor([3, 2, 1]), E) == 1.0


def test_token_specialisation_by_hand():
    # k = 1: id 1 goes to experts 0, 0, 1 (best 2 of 3); id 2 to experts 3, 2 (best 1 of 2)
    share, baseline = m.token_specialisation(torch.tensor([1, 1, 1, 2, 2]), torch.tensor([[0], [0], [1], [3], [2]]), E)
    assert share == pytest.approx((2 + 1) / 5) and baseline == 1 / 4
    share, _ = m.token_specialisation(torch.tensor([1, 1, 1, 2]), torch.tensor([[0], [0], [1], [3]]), E,
                                      min_occurrences=2)
    assert share == pytest.approx(2 / 3)  # id 2 (seen once) is left out


def test_domain_mutual_information_and_its_permutation_baseline():
    domains = torch.tensor([0, 1]).repeat_interleave(200)
    split = domains.unsqueeze(1)  # domain d always goes to expert d: I = H(domain) = ln 2
    info = m.domain_mutual_information(domains, split, 2, 2, permutations=50)
    assert info.mutual_information == pytest.approx(math.log(2))
    assert info.baseline_p95 < 0.05 and info.baseline_mean < info.baseline_p95 + 1e-12
    assert info.load_by_domain.tolist() == [[200, 0], [0, 200]]
    mixed = torch.tensor([0, 1]).repeat(200).unsqueeze(1)  # each domain split evenly: I = 0
    assert m.domain_mutual_information(domains, mixed, 2, 2, permutations=5).mutual_information == pytest.approx(0.0)


def test_bad_routing_is_refused():
    with pytest.raises(ValueError, match=r"\[tokens, k\]"):
        m.expert_load(torch.tensor([0, 1]), E)
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        m.expert_load(torch.tensor([[4]]), E)
