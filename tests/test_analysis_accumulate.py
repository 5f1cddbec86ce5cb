"""The streaming accumulators agree with the whole-table metrics (each checked by hand in test_analysis_metrics)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from moekit.analysis import metrics
from moekit.analysis.accumulate import LayerAccumulator

E, K, S = 6, 2, 8  # experts, choices, window length


def _random_batches(count: int, tokens: int = 24, vocab: int = 12, domains: int = 3, seed: int = 0, k: int = K):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        # skewed scores, so some experts are busier (and a capacity drops something)
        scores = torch.rand(tokens, E, generator=generator) + torch.linspace(0, 1.5, E)
        index = scores.topk(k, dim=1).indices
        weights = torch.softmax(scores.gather(1, index), dim=1)
        ids = torch.randint(0, vocab, (tokens,), generator=generator)
        positions = torch.arange(tokens) % S
        domain = torch.randint(0, domains, (tokens,), generator=generator)
        batches.append((index, weights, ids, positions, domain))
    return batches


def _fold(batches, k: int = K, domains: int = 3, capacity_factor: float = 1.0) -> LayerAccumulator:
    acc = LayerAccumulator(0, E, k, S, capacity_factor, domains)
    for index, weights, ids, positions, domain in batches:
        acc.add(index, weights, ids, positions, domain)
    return acc


def _cat(batches, part: int) -> torch.Tensor:
    return torch.cat([batch[part] for batch in batches])


@pytest.mark.parametrize("k", [1, K, E])
def test_streamed_counts_equal_whole_table_metrics(k):
    batches = _random_batches(5, k=k)
    acc = _fold(batches, k=k)
    index, ids = _cat(batches, 0), _cat(batches, 2)
    result = acc.result(lambda i: f"t{i}", ["a", "b", "c"], permutations=0)
    load = metrics.expert_load(index, E)
    assert result["load"] == load.tolist()
    assert result["tokens"] == index.shape[0]
    assert result["max_violation_global"] == pytest.approx(float(metrics.max_violation(load)))
    per_batch = [metrics.expert_load(batch[0], E) for batch in batches]
    assert result["max_violation_batch"] == pytest.approx(metrics.max_violation_batch(per_batch))
    assert result["coefficient_of_variation"] == pytest.approx(metrics.coefficient_of_variation(load))
    assert result["effective_experts"] == pytest.approx(metrics.effective_experts(load))
    assert result["entropy_max"] == pytest.approx(math.log(E))
    assert torch.allclose(torch.tensor(result["coactivation"], dtype=torch.float64), metrics.coactivation(index, E))
    share, baseline = metrics.token_specialisation(ids, index, E)
    assert result["token_specialisation"] == pytest.approx(share)
    assert result["token_specialisation_baseline"] == pytest.approx(baseline)
    info = metrics.domain_mutual_information(_cat(batches, 4), index, E, 3, permutations=0)
    assert result["domains"]["load"] == info.load_by_domain.tolist()
    assert result["domains"]["mutual_information"] == pytest.approx(info.mutual_information)


def test_drops_are_counted_per_forward_with_moekits_priority():
    batches = _random_batches(4)
    acc = _fold(batches, capacity_factor=1.0)
    dropped = torch.zeros(S, dtype=torch.float64)
    total = torch.zeros(S, dtype=torch.float64)
    for index, weights, _, positions, _ in batches:  # a capacity applies to one forward's tokens
        _, by_position = metrics.dropped_by_position(index, weights, E, 1.0, positions, S)
        counts = torch.bincount(positions, minlength=S).double() * K
        dropped += by_position * counts
        total += counts
    result = acc.result(str, ["a", "b", "c"], permutations=0)
    assert sum(result["dropped_by_position"]) > 0  # the skewed scores overflow the busiest expert
    assert torch.allclose(torch.tensor(result["dropped_by_position"], dtype=torch.float64), dropped / total)
    assert result["dropped_fraction"] == pytest.approx(float(dropped.sum() / total.sum()))


def test_top_tokens_match_a_naive_count():
    batches = _random_batches(3)
    acc = _fold(batches)
    index, ids = _cat(batches, 0), _cat(batches, 2)
    occurrences = Counter(ids.tolist())
    top = acc.top_tokens(lambda i: f"t{i}", limit=3)
    for expert in range(E):
        counts = Counter(int(t) for t, row in zip(ids.tolist(), index.tolist(), strict=True) if expert in row)
        expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:3]
        assert [(entry["id"], entry["count"]) for entry in top[expert]] == expected
        for entry in top[expert]:
            assert entry["token"] == f"t{entry['id']}"
            assert entry["share"] == pytest.approx(entry["count"] / occurrences[entry["id"]])


def test_consistency_matches_the_whole_table_function():
    batches = _random_batches(3)
    second = _random_batches(3, seed=9)
    acc = LayerAccumulator(0, E, K, S, 1.0)
    for (index, *_), (after, *_) in zip(batches, second, strict=True):
        acc.add_transitions(index[:, 0], after[:, 0])
    expected = metrics.layer_consistency(_cat(batches, 0)[:, 0], _cat(second, 0)[:, 0], E)
    assert acc.consistency() == pytest.approx(expected)
    assert LayerAccumulator(0, E, K, S, 1.0).consistency() is None


def test_domain_baseline_matches_a_naive_permutation_of_token_labels():
    """Re-dealing the expert sets among domains is a permutation of the labels: the two baselines agree."""
    batches = _random_batches(6, tokens=40)
    acc = _fold(batches)
    streamed = acc.domain_baseline(permutations=300, seed=1)
    naive = metrics.domain_mutual_information(_cat(batches, 4), _cat(batches, 0), E, 3, permutations=300, seed=2)
    spread = float(streamed.std()) / math.sqrt(300)
    assert float(streamed.mean()) == pytest.approx(naive.baseline_mean, abs=5 * spread + 1e-9)
    assert (streamed >= 0).all()


def test_state_does_not_grow_with_tokens():
    """What is kept per layer is bounded by E, the vocabulary and the distinct expert sets, not by the tokens."""
    few, many = _fold(_random_batches(5)), _fold(_random_batches(200))
    assert many.tokens == 40 * few.tokens
    for acc in (few, many):
        assert acc._token_keys.numel() <= 12 * E  # vocab x experts at most
        assert acc._set_counts.shape[1] <= math.comb(E, K)
    assert many.together.shape == few.together.shape == (E, E)


def test_a_batch_that_does_not_fit_is_refused():
    acc = LayerAccumulator(0, E, K, S, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        acc.add(torch.zeros(4, K, dtype=torch.long), torch.ones(4, K), torch.zeros(3, dtype=torch.long),
                torch.zeros(4, dtype=torch.long))
    with_domains = LayerAccumulator(0, E, K, S, 1.0, num_domains=2)
    with pytest.raises(ValueError, match="without them"):
        with_domains.add(torch.zeros(4, K, dtype=torch.long), torch.ones(4, K), torch.zeros(4, dtype=torch.long),
                         torch.zeros(4, dtype=torch.long))
