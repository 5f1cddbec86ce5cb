"""`RoutingRecorder` records what moekit's routers chose, checked against a hand-computed top-k of the layer input."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis import expert_load
from moekit.analysis.record import RoutingRecorder
from moekit.model import MoETransformer

from .run_helpers import small_run


def test_recorded_choices_are_the_top_k_of_the_router_scores(corpus):
    run = small_run("tiny-mixtral", corpus)
    torch.manual_seed(0)
    model = MoETransformer(run.model).eval()
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(model.layers)]
    ids = torch.randint(0, run.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with RoutingRecorder(model) as recorder:
        out = model(ids)
    for hook in hooks:
        hook.remove()
    records = recorder.take()
    moe = run.model.moe
    assert [r.layer for r in records] == list(range(run.model.num_hidden_layers))
    for record in records:
        layer = model.layers[record.layer].mlp
        x = inputs[record.layer].reshape(-1, moe.hidden_size)
        probs = torch.softmax(x @ layer.router.weight.T, dim=-1)  # Mixtral: softmax, top-k, renormalised
        top = probs.topk(moe.num_experts_per_tok, dim=-1)
        assert record.expert_index.shape == (16, moe.num_experts_per_tok)
        assert torch.equal(record.expert_index, top.indices)
        torch.testing.assert_close(record.weights, top.values / top.values.sum(-1, keepdim=True))
        counted = out.moe_stats[record.layer]["tokens_per_expert"]  # the layer's own count
        assert expert_load(record.expert_index, moe.num_local_experts).tolist() == counted.long().tolist()
    assert recorder.take() == []  # taken records are forgotten
    model(ids)
    assert recorder.take() == []  # nothing is recorded once the context is closed


def test_layers_are_numbered_as_decoder_layers_when_the_first_are_dense(corpus):
    run = small_run("tiny-deepseek", corpus, "model.first_k_dense_replace=1")
    model = MoETransformer(run.model).eval()
    with RoutingRecorder(model) as recorder:
        model(torch.zeros(1, 4, dtype=torch.long))
    assert [r.layer for r in recorder.take()] == list(range(1, run.model.num_hidden_layers))


def test_routers_without_k_choices_per_token_and_dense_models_are_refused(corpus):
    with pytest.raises(ValueError, match="expert_choice"):
        RoutingRecorder(MoETransformer(small_run("expert-choice", corpus).model))
    with pytest.raises(ValueError, match="no MoELayer"):
        RoutingRecorder(MoETransformer(small_run("dense", corpus).model))
