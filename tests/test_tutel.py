"""moekit's layer written into Tutel (`moekit.bench.tutel`): the weight layout conversion, checked against Tutel's
own forward and backward and against a hand-written SwiGLU reference. Skipped where tutel is not installed (it is
not on PyPI; the layer benchmark says how to build it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig
from moekit.layer import MoELayer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tutel") is None,
                                reason="tutel is not installed (it is not on PyPI; it builds from a clone of "
                                       "microsoft/tutel)")


def _layer(shared: int = 0) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(hidden_size=16, moe_intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                       n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared or None)
    return MoELayer(config).eval()


def _reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over the router logits, the 2 best renormalised, each expert's SwiGLU summed."""
    weight, gate_up, down = layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj
    inner = layer.config.moe_intermediate_size
    rows = []
    for token in x:
        probs = torch.softmax(weight @ token, dim=-1)
        top = probs.topk(2)
        out = torch.zeros_like(token)
        for w, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
            h = gate_up[e] @ token
            out = out + w * (down[e] @ (F.silu(h[:inner]) * h[inner:]))
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("shared", [0, 12])
def test_tutel_computes_the_moekit_layer(shared):
    from moekit.bench.layer import WithShared, shared_copy
    from moekit.bench.tutel import build_tutel, load_tutel, tutel_grads

    layer = _layer(shared)
    tutel = WithShared(build_tutel(load_tutel(), layer), shared_copy(layer))
    x = torch.randn(10, 16)
    with torch.no_grad():
        expected = _reference(layer, x)
        if shared:
            expected = expected + layer.shared_experts(x)
        torch.testing.assert_close(tutel(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x).hidden_states, expected, atol=1e-5, rtol=1e-5)
    # gradients, converted back to moekit's layout, equal moekit's own
    grad = torch.randn(10, 16)
    tutel(x).backward(grad)
    layer(x).hidden_states.backward(grad)
    grads = tutel_grads(tutel.block)
    torch.testing.assert_close(grads["router"], layer.router.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["gate_up"], layer.experts.gate_up_proj.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["down"], layer.experts.down_proj.grad, atol=1e-5, rtol=1e-5)
    if shared:
        torch.testing.assert_close(tutel.shared.up_proj.weight.grad, layer.shared_experts.up_proj.weight.grad)


def test_build_tutel_refuses_routing_tutel_does_not_have():
    from moekit.bench.tutel import build_tutel, load_tutel

    layer = MoELayer(MoEConfig(hidden_size=16, moe_intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                               router="deepseek_v3", scoring_func="sigmoid"))
    with pytest.raises(ValueError, match="softmax with the kept weights renormalised"):
        build_tutel(load_tutel(), layer)
