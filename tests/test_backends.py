"""Every expert backend computes what the naive reference computes, and the loop's hand-written backward
(`moekit.layer.grouped_ffn`) equals autograd through the plain per-expert loop while saving less."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit import GroupedExperts, MoEConfig, MoELayer
from moekit.bench.harness import saved_activation_mib
from moekit.config import EXPERT_BACKENDS
from moekit.layer import experts as experts_module
from moekit.layer import grouped_ffn as grouped_ffn_module
from moekit.layer.grouped_ffn import grouped_ffn
from moekit.model.transformer import DenseMLP

from .reference import reference_moe
from .test_reference_parity import make_layer, random_input

BACKENDS = ["loop", "bmm", "grouped_mm"]
BACKEND_CASES = ["topk", "switch-capacity_0.5", "deepseek_v3-groups_2_keep_1", "topk-gelu", "expert_choice",
                 "soft", "topk-shared_gated"]


def _with_backend(case: str, backend: str) -> MoELayer:
    layer = make_layer(case)
    other = MoELayer(layer.config.replace(expert_backend=backend)).eval()
    other.load_state_dict(layer.state_dict())
    return other


@pytest.fixture(params=["weight_left_streamed", "weight_left_cached", "weight_right"])
def orientation(request, monkeypatch):
    """Small groups multiply as W x^T (large weights: both projections, single rows doubled), larger ones as
    x W^T: run every check every way."""
    rows = 0 if request.param == "weight_right" else 10**6
    monkeypatch.setattr(grouped_ffn_module, "WEIGHT_LEFT_MAX_ROWS", rows)
    padded = experts_module.AUTO_BACKEND_THRESHOLDS["padded_weight_left_max_rows"]  # the padded bmm's two orientations
    monkeypatch.setitem(experts_module.AUTO_BACKEND_THRESHOLDS, "padded_weight_left_max_rows",
                        dataclasses.replace(padded, value=rows))
    stream_bytes = 0 if request.param == "weight_left_streamed" else 2**62
    monkeypatch.setattr(grouped_ffn_module, "STREAM_WEIGHT_MIN_BYTES", stream_bytes)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_backend_output_and_all_gradients_match_reference(case, backend, orientation):
    layer = _with_backend(case, backend)
    x = random_input((2, 6, 16)).requires_grad_(True)
    upstream = random_input(x.shape, seed=2)
    names = ["experts.gate_up_proj" if layer.experts.gated else "experts.up_proj", "experts.down_proj"]
    state = {k: v.detach().clone().requires_grad_(k in names) for k, v in layer.state_dict().items()}

    expected = torch.stack(reference_moe(layer.config, state, list(x.unbind(0))))
    expected_grads = torch.autograd.grad(expected, [x, *(state[n] for n in names)], upstream)
    out = layer(x).hidden_states
    grads = torch.autograd.grad(out, [x, *(dict(layer.named_parameters())[n] for n in names)], upstream)

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for what, got, want in zip(["input", *names], grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, w=what: f"{w}: {m}")


# ------------------------------------------------------------------ grouped_ffn against plain autograd
def _plain_loop(x, row_index, sizes, w_in, w_out, scale, gated):
    """The obvious per-expert loop, differentiated by autograd."""
    xp = x if row_index is None else x[row_index]
    outs, start = [], 0
    for e, size in enumerate(sizes):
        h = xp[start:start + size] @ w_in[e].t()
        if gated:
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = F.gelu(h)
        if scale is not None:
            a = a * scale[start:start + size, None]
        outs.append(a @ w_out[e].t())
        start += size
    return torch.cat(outs)


#: both hand-written functions: experts one by one, and one grouped_mm call per projection
MATMULS = ["loop", pytest.param("grouped_mm", marks=pytest.mark.skipif(
    not hasattr(F, "grouped_mm"), reason="this torch has no torch.nn.functional.grouped_mm"))]


@pytest.mark.parametrize("matmul", MATMULS)
@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "gelu"])
@pytest.mark.parametrize("gather", [True, False], ids=["row_index", "grouped_input"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no_scale"])
def test_grouped_ffn_matches_autograd_of_the_plain_loop(gated, gather, with_scale, matmul, orientation):
    torch.manual_seed(0)
    # an expert with no rows; grouped_mm needs 16-byte rows (fp32: widths divisible by 4), the loop takes any
    hidden, inter, sizes = 12, 10 if matmul == "loop" else 8, [3, 0, 5, 1]
    rows, tokens = sum(sizes), 6
    w_in = torch.randn(len(sizes), (2 if gated else 1) * inter, hidden, requires_grad=True)
    w_out = torch.randn(len(sizes), hidden, inter, requires_grad=True)
    x = torch.randn(tokens if gather else rows, hidden, requires_grad=True)
    row_index = torch.randint(0, tokens, (rows,)) if gather else None
    scale = torch.rand(rows, requires_grad=True) if with_scale else None
    upstream = torch.randn(rows, hidden)
    inputs = [x, w_in, w_out] + ([scale] if with_scale else [])

    got = grouped_ffn(x, row_index, sizes, w_in, w_out, scale, gated, matmul=matmul)
    got_grads = torch.autograd.grad(got, inputs, upstream)
    want = _plain_loop(x, row_index, sizes, w_in, w_out, scale, gated)
    want_grads = torch.autograd.grad(want, inputs, upstream)

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
    assert not got_grads[1][1].any() and not got_grads[2][1].any()  # the idle expert gets exact zeros


@pytest.mark.parametrize("matmul", MATMULS)
def test_grouped_ffn_computes_only_the_gradients_asked_for(matmul):
    torch.manual_seed(0)
    w_in, w_out = torch.randn(2, 8, 4), torch.randn(2, 4, 4, requires_grad=True)
    x = torch.randn(5, 4)  # no gradient wanted for x or w_in
    out = grouped_ffn(x, None, [2, 3], w_in, w_out, matmul=matmul)
    (grad,) = torch.autograd.grad(out.sum(), [w_out])
    (want,) = torch.autograd.grad(_plain_loop(x, None, [2, 3], w_in, w_out, None, True).sum(), [w_out])
    torch.testing.assert_close(grad, want)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no torch.nn.functional.grouped_mm")
def test_grouped_mm_refuses_widths_it_cannot_stride_and_auto_avoids_them():
    x = torch.randn(6, 12, requires_grad=True)
    w_in, w_out = torch.randn(2, 20, 12, requires_grad=True), torch.randn(2, 12, 10, requires_grad=True)
    with pytest.raises(ValueError, match=r"multiples of 4 in torch.float32 .* intermediate 10; use matmul='loop'"):
        grouped_ffn(x, None, [3, 3], w_in, w_out, matmul="grouped_mm")
    experts = GroupedExperts(2, 12, 10)
    assert experts.resolve_backend(x, [3, 3]) == "loop"  # auto: small groups, but widths grouped_mm refuses
    with pytest.raises(ValueError, match="use expert_backend='auto' or 'loop'"):
        GroupedExperts(2, 12, 10, backend="grouped_mm")(x, [3, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 rows need widths divisible by 8
        assert GroupedExperts(2, 12, 8).resolve_backend(x, [3, 3]) == "loop"
        assert GroupedExperts(2, 16, 8).resolve_backend(x, [3, 3]) == "grouped_mm"


@pytest.mark.parametrize("matmul", MATMULS)
def test_grouped_ffn_with_no_rows_is_still_in_the_graph(matmul):
    w_in, w_out = torch.randn(2, 8, 4, requires_grad=True), torch.randn(2, 4, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    out = grouped_ffn(x, torch.empty(0, dtype=torch.long), [0, 0], w_in, w_out, matmul=matmul)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert not x.grad.any() and not w_in.grad.any() and not w_out.grad.any()


@pytest.mark.parametrize("matmul", MATMULS)
def test_grouped_ffn_saves_only_its_input_and_the_projection(matmul):
    # hand-computed: x [T, H] + h [N, 2I] (float32) + row_index [N] (int64) + scale [N] (float32)
    # (+ grouped_mm: the E int32 group offsets)
    tokens, rows, hidden, inter = 7, 9, 16, 24
    x = torch.randn(tokens, hidden, requires_grad=True)
    w_in, w_out = torch.randn(3, 2 * inter, hidden, requires_grad=True), torch.randn(3, hidden, inter)
    row_index, scale = torch.randint(0, tokens, (rows,)), torch.rand(rows, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != w_in.untyped_storage().data_ptr():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grouped_ffn(x, row_index, [4, 0, 5], w_in, w_out, scale, matmul=matmul)
    expected = 4 * tokens * hidden + 4 * rows * 2 * inter + 8 * rows + 4 * rows + 4 * hidden * 3 * inter
    expected += 4 * 3 if matmul == "grouped_mm" else 0
    assert sum(saved.values()) == expected  # w_out does not require grad here, so it counts as a tensor


# ------------------------------------------------------------------ activation memory against the dense floor
@pytest.mark.parametrize(("hidden", "ffn", "experts", "top_k", "shared"),
                         [(512, 1024, 8, 2, 0), (512, 256, 64, 8, 256), (128, 96, 32, 4, 128)],
                         ids=["mixtral-like", "deepseek-like", "tiny-deepseek"])
def test_training_activation_memory_is_within_the_issue_bound_of_the_floor(hidden, ffn, experts, top_k, shared):
    """fwd+bwd activation memory <= 1.25x a dense FFN of the same active width (saved tensors, exact bytes)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=hidden, moe_intermediate_size=ffn, num_local_experts=experts,
                               num_experts_per_tok=top_k, n_shared_experts=1 if shared else 0,
                               shared_expert_intermediate_size=shared or None, router_aux_loss_coef=0.01))
    x = torch.randn(256, hidden)
    moe = saved_activation_mib(_HiddenStates(layer), x)
    floor = saved_activation_mib(DenseMLP(hidden, top_k * ffn + shared), x)
    assert moe <= 1.25 * floor, f"MoE layer keeps {moe:.2f} MiB for backward, the dense floor {floor:.2f} MiB"


class _HiddenStates(torch.nn.Module):
    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x).hidden_states


def test_auto_backend_choice():
    experts = GroupedExperts(8, 16, 32)
    few, many = torch.randn(16, 16), torch.randn(4096, 16)
    large = GroupedExperts(8, 256, 512)  # 1 MiB per expert projection: streamed from memory
    with torch.no_grad():  # inference: loop for a few rows per expert of large weights, padded bmm for small busy
        # groups, grouped_mm for mid-size, loop for large
        assert large.resolve_backend(torch.randn(16, 256), [2] * 8) == "loop"  # <= 4 rows per busy expert
        assert large.resolve_backend(torch.randn(16, 256), [9, 1, 1, 1, 1, 1, 1, 1]) == "loop"  # the average counts
        assert large.resolve_backend(torch.randn(40, 256), [5] * 8) == "bmm"
        assert experts.resolve_backend(few, [2] * 8) == "bmm"  # cache-resident weights: one batched call
        assert experts.resolve_backend(torch.randn(96, 16), [12] * 8) == "bmm"
        assert experts.resolve_backend(many, [512] * 8) == "loop"
        assert experts.resolve_backend(few, [2, 0, 0, 0, 0, 0, 0, 0]) == "loop"  # one busy expert: no padding
        mid = torch.randn(600, 16)  # 100 rows per expert: too many for the padded batch, few for the loop
        assert experts.resolve_backend(mid, [100] * 6 + [0, 0]) == ("grouped_mm" if hasattr(F, "grouped_mm")
                                                                    else "loop")
        assert experts.resolve_backend(mid, [300, 300] + [0] * 6) == "loop"  # 300 rows each: the loop again
    # gradients needed: a hand-written backward, grouped_mm for small groups (rows x hidden <= 65,536), else the loop
    small_groups = "grouped_mm" if hasattr(F, "grouped_mm") else "loop"
    assert experts.resolve_backend(few, [2] * 8) == small_groups
    assert experts.resolve_backend(many, [4096] * 8) == small_groups  # 4096 x 16 = 65,536
    assert experts.resolve_backend(many, [4097] * 8) == "loop"
    assert experts.resolve_backend(many, [8192] * 4 + [0] * 4) == "loop"  # the average over busy experts
    assert GroupedExperts(8, 16, 32, backend="bmm").resolve_backend(many, [512] * 8) == "bmm"  # forced
    assert {*BACKENDS, "auto"} == set(EXPERT_BACKENDS)  # every backend the config accepts is tested above


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_cuda_bf16_backends_match_the_fp32_reference(backend):
    layer = _with_backend("topk", backend)
    x = random_input((2, 6, 16))
    expected = layer(x).hidden_states  # fp32 on the CPU
    cuda_layer = layer.to("cuda", torch.bfloat16)
    if backend == "auto":
        assert cuda_layer.experts.resolve_backend(x.cuda().bfloat16(), [3] * 4) == "grouped_mm"
    got = cuda_layer(x.to("cuda", torch.bfloat16)).hidden_states.float().cpu()
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_run_under_cpu_autocast_and_stay_close_to_fp32(backend):
    # `moekit train --set train.dtype=bfloat16` on CPU trains under torch.autocast("cpu", bfloat16)
    layer = _with_backend("topk", backend).train()
    x = random_input((2, 6, 16)).requires_grad_(True)
    expected = layer(x).hidden_states
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x).hidden_states
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert out.dtype in (torch.bfloat16, torch.float32)  # bf16 matmuls; elementwise ops may promote
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(grad, expected_grad, atol=5e-2, rtol=5e-2)
    assert all(p.grad is None or p.grad.dtype == p.dtype for p in layer.parameters())
