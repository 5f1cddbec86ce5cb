"""Every balancing term against a value computed by hand on a tiny example."""

import math

import pytest
import torch

from moekit.layer import balance


def _phi(z: float) -> float:  # standard normal CDF
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])


def test_switch_aux_loss_top1_by_hand():
    # f = [1/2, 1/2, 0], P = [0.4, 0.4, 0.2] -> 3 * (0.2 + 0.2)
    loss = balance.switch_aux_loss(PROBS, torch.tensor([0, 1]), 3)
    assert loss.item() == pytest.approx(1.2)


def test_switch_aux_loss_top2_counts_every_choice():
    # token 0 -> {0, 1}, token 1 -> {1, 2}: f = [1/4, 2/4, 1/4]; 3 * (0.1 + 0.2 + 0.05)
    loss = balance.switch_aux_loss(PROBS, torch.tensor([0, 1, 1, 2]), 3)
    assert loss.item() == pytest.approx(1.05)


def test_switch_aux_loss_is_one_at_perfect_balance_for_any_k():
    probs = torch.full((4, 4), 0.25)
    assert balance.switch_aux_loss(probs, torch.tensor([0, 1, 2, 3]), 4).item() == pytest.approx(1.0)
    assert balance.switch_aux_loss(probs, torch.tensor([0, 1, 2, 3, 1, 0, 3, 2]), 4).item() == pytest.approx(1.0)


def test_importance_loss_is_cv_squared_of_gate_sums():
    # importance = [0.6, 0.4 + 0.7, 0.3]; mean 2/3; population variance by hand
    loss = balance.importance_loss(torch.tensor([0, 1, 1, 2]), torch.tensor([0.6, 0.4, 0.7, 0.3]), 3)
    mean = 2 / 3
    var = ((0.6 - mean) ** 2 + (1.1 - mean) ** 2 + (0.3 - mean) ** 2) / 3
    assert loss.item() == pytest.approx(var / mean**2, rel=1e-5)


def test_load_probs_follow_shazeer_kth_excluding():
    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[1.5, 0.2, -1.0]])
    std = torch.tensor([[1.0, 2.0, 1.5]])
    probs = balance.noisy_topk_load_probs(clean, noisy, std, k=1)
    # expert 0 is in the top-1: compare with the 2nd largest noisy value (0.2); others with the 1st (1.5)
    expected = [_phi((1.0 - 0.2) / 1.0), _phi((0.0 - 1.5) / 2.0), _phi((-1.0 - 1.5) / 1.5)]
    assert probs[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_load_loss_is_cv_squared_of_summed_probs():
    load_probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])  # load = [1.4, 0.6], mean 1, var 0.16
    assert balance.load_loss(load_probs).item() == pytest.approx(0.16, rel=1e-5)


def test_load_probs_are_one_when_every_expert_is_chosen():
    clean = torch.randn(3, 2)
    assert torch.equal(balance.noisy_topk_load_probs(clean, clean, torch.ones(3, 2), k=2), torch.ones(3, 2))


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = ln 2, ln 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert balance.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_seq_aux_loss_averages_per_sequence_terms():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts = torch.tensor([0, 0, 0])  # top-1 choices
    seq_ids = torch.tensor([0, 0, 1])
    # seq 0: f = 2/(1*2) * [2, 0] = [2, 0], P = [0.7, 0.3] -> 1.4
    # seq 1: f = 2/(1*1) * [1, 0] = [2, 0], P = [0.3, 0.7] -> 0.6
    loss = balance.seq_aux_loss(probs, torch.arange(3), experts, seq_ids, num_sequences=2, num_experts_per_tok=1)
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_seq_aux_loss_skips_empty_sequences():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    loss = balance.seq_aux_loss(probs, torch.arange(2), torch.tensor([0, 0]), torch.tensor([1, 1]), 3, 1)
    assert loss.item() == pytest.approx(1.4, rel=1e-6)


def test_max_violation_by_hand():
    assert balance.max_violation(torch.tensor([2.0, 4.0, 6.0])).item() == pytest.approx(0.5)
    assert balance.max_violation(torch.zeros(4)).item() == 0.0


def test_aux_free_update_moves_bias_against_load():
    bias = torch.zeros(3)
    balance.aux_free_bias_update(bias, torch.tensor([2.0, 4.0, 6.0]), rate=0.1)
    assert bias.tolist() == pytest.approx([0.1, 0.0, -0.1])


def test_terms_are_zero_on_an_empty_batch():
    empty = torch.zeros(0, 4)
    idx = torch.zeros(0, dtype=torch.long)
    assert balance.switch_aux_loss(empty, idx, 4).item() == 0.0
    assert balance.router_z_loss(empty).item() == 0.0
    assert balance.importance_loss(idx, torch.zeros(0), 4).item() == 0.0
    assert balance.seq_aux_loss(empty, idx, idx, idx, 1, 2).item() == 0.0
