"""MoELayer behaviour: padding, stats, aux-free balancing, noise, segmentation, shapes and dtypes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, MoELayer, update_aux_free_biases
from moekit.config import ROUTER_NAMES

ROUTER_FIELDS = {
    "topk": {},
    "noisy_topk": {"load_loss_coef": 0.01},
    "switch": {"num_experts_per_tok": 1, "capacity_factor": 1.5},
    "expert_choice": {"capacity_factor": 2.0},
    "deepseek_v3": {"scoring_func": "sigmoid", "n_group": 2, "topk_group": 1, "seq_aux_loss_coef": 1e-3},
    "soft": {"slots_per_expert": 2},
    "hierarchical": {"n_group": 2, "topk_group": 2},
}


def make_config(router: str, **fields) -> MoEConfig:
    balancing = {} if router in ("soft", "expert_choice") else {"router_aux_loss_coef": 0.01,
                                                               "importance_loss_coef": 0.01}
    values = {"hidden_size": 16, "moe_intermediate_size": 32, "num_local_experts": 4, "router": router,
              "router_z_loss_coef": 1e-3, **balancing, **ROUTER_FIELDS[router], **fields}
    return MoEConfig(**values)


def test_every_router_has_a_test_config():
    assert set(ROUTER_FIELDS) == set(ROUTER_NAMES)


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_padding_is_not_routed_and_counts_nowhere(router):
    torch.manual_seed(0)
    layer = MoELayer(make_config(router)).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    garbage = x.clone()
    garbage[mask == 0] = 100.0 * torch.randn_like(garbage[mask == 0])
    a, b = layer(x, attention_mask=mask), layer(garbage, attention_mask=mask)
    assert torch.equal(a.hidden_states, b.hidden_states)
    assert torch.equal(a.aux_loss, b.aux_loss)
    assert a.stats.keys() == b.stats.keys()
    for name in a.stats:
        assert torch.equal(a.stats[name], b.stats[name]), name
    assert torch.all(a.hidden_states[mask == 0] == 0)
    assert torch.all(a.router_logits.view(2, 6, -1)[mask == 0] == 0)
    if layer.config.is_token_choice:
        assert a.stats["tokens_per_expert"].sum().item() == layer.config.num_experts_per_tok * 7


def test_padded_batch_matches_its_real_tokens_alone():
    torch.manual_seed(0)
    layer = MoELayer(make_config("topk", seq_aux_loss_coef=0.01)).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = layer(x, attention_mask=mask)
    first, second = layer(x[0:1, :3]), layer(x[1:2])
    assert torch.allclose(padded.hidden_states[0, :3], first.hidden_states[0], atol=1e-6)
    assert torch.allclose(padded.hidden_states[1], second.hidden_states[0], atol=1e-6)
    counts = first.stats["tokens_per_expert"] + second.stats["tokens_per_expert"]
    assert torch.equal(padded.stats["tokens_per_expert"], counts)
    # the sequence-wise loss is a mean over sequences, each normalised by its own real length
    expected = (first.stats["seq_aux_loss"] + second.stats["seq_aux_loss"]) / 2
    assert padded.stats["seq_aux_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_aux_loss_is_the_coefficient_weighted_sum_of_terms():
    cfg = make_config("noisy_topk", router_aux_loss_coef=0.1, importance_loss_coef=0.2, load_loss_coef=0.3,
                      router_z_loss_coef=0.4, seq_aux_loss_coef=0.5)
    out = MoELayer(cfg).train()(torch.randn(3, 4, 16))
    s = out.stats
    expected = (0.1 * s["router_aux_loss"] + 0.2 * s["importance_loss"] + 0.3 * s["load_loss"]
                + 0.4 * s["router_z_loss"] + 0.5 * s["seq_aux_loss"])
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.aux_loss.requires_grad


def test_aux_loss_is_zero_without_coefficients_but_terms_are_reported():
    cfg = MoEConfig(hidden_size=8, moe_intermediate_size=16, num_local_experts=4)
    out = MoELayer(cfg)(torch.randn(5, 8))
    assert out.aux_loss.item() == 0.0
    assert {"router_aux_loss", "router_z_loss", "importance_loss", "seq_aux_loss"} <= out.stats.keys()
    assert out.stats["router_aux_loss"].item() > 0


def test_eval_mode_reports_only_the_terms_that_enter_the_loss():
    cfg = MoEConfig(hidden_size=8, moe_intermediate_size=16, num_local_experts=4, router_z_loss_coef=0.1)
    layer = MoELayer(cfg).eval()
    x = torch.randn(5, 8)
    out = layer(x)
    assert {"router_z_loss", "tokens_per_expert", "dropped_fraction", "max_violation"} == out.stats.keys()
    assert out.aux_loss.item() == pytest.approx(0.1 * out.stats["router_z_loss"].item())
    assert {"router_aux_loss", "importance_loss", "seq_aux_loss"} <= layer.train()(x).stats.keys()


def test_compute_stats_false_skips_terms_in_eval_only():
    cfg = MoEConfig(hidden_size=8, moe_intermediate_size=16, num_local_experts=4, router_z_loss_coef=0.1,
                    aux_free_bias_update_rate=1e-3)
    layer = MoELayer(cfg).eval()
    x = torch.randn(5, 8)
    full, lean = layer(x), layer(x, compute_stats=False)
    assert torch.equal(lean.hidden_states, full.hidden_states)
    assert torch.equal(lean.router_logits, full.router_logits)
    assert lean.stats == {} and lean.aux_loss.item() == 0.0
    trained = layer.train()(x, compute_stats=False)  # training needs the loss terms and the balancer's counts
    assert trained.aux_loss.item() > 0 and "tokens_per_expert" in trained.stats
    assert layer.load_since_update.sum().item() == 5 * cfg.num_experts_per_tok


def test_max_violation_matches_its_definition():
    out = MoELayer(make_config("topk"))(torch.randn(40, 16))
    load = out.stats["tokens_per_expert"]
    assert out.stats["max_violation"].item() == pytest.approx(((load.max() - load.mean()) / load.mean()).item())


def test_noisy_topk_adds_noise_only_in_training():
    torch.manual_seed(0)
    layer = MoELayer(make_config("noisy_topk"))
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(32, 16)
    layer.eval()
    first, second = layer(x), layer(x)
    assert torch.equal(first.hidden_states, second.hidden_states)
    assert torch.allclose(first.router_logits, x @ layer.router.weight.t(), atol=1e-5)  # clean logits in eval
    layer.train()
    noisy_a, noisy_b = layer(x), layer(x)
    assert not torch.allclose(noisy_a.router_logits, noisy_b.router_logits)
    assert not torch.allclose(noisy_a.router_logits, first.router_logits)


def test_router_jitter_only_in_training():
    layer = MoELayer(make_config("topk", router_jitter_noise=0.5))
    x = torch.randn(16, 16)
    layer.eval()
    assert torch.equal(layer(x).router_logits, layer(x).router_logits)
    layer.train()
    assert not torch.equal(layer(x).router_logits, layer(x).router_logits)


def _skewed_batch(direction: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(256, direction.numel(), generator=generator) + 3.0 * direction


@pytest.mark.parametrize("router", ["deepseek_v3", "topk"])
def test_aux_free_bias_lowers_max_violation_within_50_updates(router):
    torch.manual_seed(0)
    fields = {"scoring_func": "sigmoid"} if router == "deepseek_v3" else {}
    cfg = MoEConfig(hidden_size=16, moe_intermediate_size=8, num_local_experts=8, num_experts_per_tok=2,
                    router=router, aux_free_bias_update_rate=0.02, **fields)
    layer = MoELayer(cfg)
    weight = layer.router.weight.detach()
    direction = (weight[0] + weight[1]) / (weight[0] + weight[1]).norm()  # the stream favours experts 0 and 1
    gen = torch.Generator().manual_seed(1)
    held_out = _skewed_batch(direction, gen)
    with torch.no_grad():
        before = layer.eval()(held_out).stats["max_violation"].item()
        layer.train()
        for _ in range(50):
            layer(_skewed_batch(direction, gen))
            update_aux_free_biases(layer)
        after = layer.eval()(held_out).stats["max_violation"].item()
    assert before > 1.0
    assert after < 0.5 * before
    bias = layer.router.e_score_correction_bias
    assert bias[0] < 0 and bias[1] < 0  # the overloaded experts were pushed down
    assert not bias.requires_grad


def test_aux_free_counts_every_micro_batch_since_the_last_update():
    cfg = make_config("topk", aux_free_bias_update_rate=0.1)
    layer = MoELayer(cfg).train()
    a, b = layer(torch.randn(8, 16)), layer(torch.randn(8, 16))
    assert torch.equal(layer.load_since_update, a.stats["tokens_per_expert"] + b.stats["tokens_per_expert"])
    load = layer.load_since_update.clone()
    layer.update_router_bias()
    assert torch.allclose(layer.router.e_score_correction_bias, 0.1 * torch.sign(load.mean() - load))
    assert layer.load_since_update.sum() == 0


def test_aux_free_bias_stays_float32_in_bf16():
    layer = MoELayer(make_config("deepseek_v3", aux_free_bias_update_rate=1e-3)).to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.bfloat16
    assert layer.router.e_score_correction_bias.dtype == torch.float32


def test_segmented_experts_sum_to_the_original_expert():
    torch.manual_seed(0)
    for act in ("silu", "gelu"):
        layer = MoELayer(MoEConfig(hidden_size=8, moe_intermediate_size=12, num_local_experts=3, hidden_act=act))
        fine = layer.experts.segment(4)
        assert fine.num_experts == 12 and fine.intermediate_size == 3
        x = torch.randn(5, 8)
        for e in range(3):
            pieces = sum(fine.expert_forward(x, e * 4 + j) for j in range(4))
            assert torch.allclose(pieces, layer.experts.expert_forward(x, e), atol=1e-6)


def test_shared_expert_gate_scales_the_shared_output():
    torch.manual_seed(0)
    layer = MoELayer(make_config("topk", n_shared_experts=1, shared_expert_gate=True)).eval()
    x = torch.randn(6, 16)
    shared = layer.shared_experts
    ungated = shared.down_proj(torch.nn.functional.silu(shared.gate_proj(x)) * shared.up_proj(x))
    assert torch.allclose(shared(x), torch.sigmoid(shared.gate(x)) * ungated)
    with torch.no_grad():
        full = layer(x).hidden_states
        layer.shared_experts = None
        routed_only = layer(x).hidden_states
    assert torch.allclose(full - routed_only, shared(x), atol=1e-6)


def test_bad_shapes_are_refused_with_the_shape_seen():
    layer = MoELayer(make_config("topk"))
    with pytest.raises(ValueError, match=r"expects x of shape \[batch, seq, 16\].*got \(3, 8\)"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but x has leading shape \(2, 3\)"):
        layer(torch.randn(2, 3, 16), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_every_router_trains_on_a_toy_task(router):
    """A layer learns a piecewise map (a different linear map per input cluster) well below its start."""
    torch.manual_seed(0)
    layer = MoELayer(make_config(router))
    centers = torch.randn(4, 16) * 3
    maps = torch.randn(4, 16, 16) / 4

    def batch():
        cluster = torch.randint(0, 4, (64,))
        x = centers[cluster] + torch.randn(64, 16) * 0.3
        return x.view(4, 16, 16), torch.einsum("th,thd->td", x, maps[cluster]).view(4, 16, 16)

    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x_eval, y_eval = batch()
    with torch.no_grad():
        start = torch.nn.functional.mse_loss(layer.eval()(x_eval).hidden_states, y_eval).item()
    layer.train()
    for _ in range(120):
        x, y = batch()
        out = layer(x)
        loss = torch.nn.functional.mse_loss(out.hidden_states, y) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.update_router_bias()
    with torch.no_grad():
        end = torch.nn.functional.mse_loss(layer.eval()(x_eval).hidden_states, y_eval).item()
    assert end < 0.2 * start


# ---------------------------------------------------------------------------- property tests
def _topk_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Dense reference: every expert on every token, weighted by a dense top-k gate matrix."""
    cfg = layer.config
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    top = probs.topk(cfg.num_experts_per_tok, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    outs = torch.stack([layer.experts.expert_forward(x, e) for e in range(cfg.num_local_experts)], dim=1)
    return (gates.unsqueeze(-1) * outs).sum(dim=1)


@settings(max_examples=40, deadline=None)
@given(tokens=st.sampled_from([0, 1, 2, 7]), num_experts=st.sampled_from([1, 2, 5]), data=st.data())
def test_topk_matches_dense_reference_for_any_shape(tokens, num_experts, data):
    k = data.draw(st.integers(1, num_experts), label="k")
    torch.manual_seed(tokens * 31 + num_experts * 7 + k)
    layer = MoELayer(MoEConfig(hidden_size=6, moe_intermediate_size=5, num_local_experts=num_experts,
                               num_experts_per_tok=k)).eval()
    x = torch.randn(tokens, 6, requires_grad=True)
    out = layer(x)
    assert out.hidden_states.shape == (tokens, 6)
    assert torch.allclose(out.hidden_states, _topk_reference(layer, x), atol=1e-5)
    assert out.stats["tokens_per_expert"].sum().item() == tokens * k
    out.hidden_states.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@settings(max_examples=40, deadline=None)
@given(router=st.sampled_from(ROUTER_NAMES), batch=st.sampled_from([1, 2]), seq=st.sampled_from([0, 1, 3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_every_router_handles_tiny_batches_in_fp32_and_bf16(router, batch, seq, dtype):
    torch.manual_seed(0)
    layer = MoELayer(make_config(router)).to(dtype)
    x = torch.randn(batch, seq, 16, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.hidden_states.shape == x.shape and out.hidden_states.dtype == dtype
    assert torch.isfinite(out.hidden_states.float()).all()
    assert torch.isfinite(out.aux_loss) and all(torch.isfinite(v).all() for v in out.stats.values())
    grad = torch.randn_like(out.hidden_states)
    (out.hidden_states * grad).sum().add(out.aux_loss.to(dtype)).backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("router", ["topk", "deepseek_v3"])
def test_single_expert_layer_is_that_expert(router):
    # softmax over one expert, or one sigmoid score renormalised over itself: the weight is 1
    fields = {"num_local_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}
    layer = MoELayer(make_config(router, **fields)).eval()
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x).hidden_states, layer.experts.expert_forward(x, 0), atol=1e-6)


@pytest.mark.parametrize("backend", ["loop", "bmm", "grouped_mm"])
@pytest.mark.parametrize(("hidden", "inter"), [(16, 8), (16, 32)], ids=["scale-inner", "scale-output"])
def test_row_scale_multiplies_each_rows_output(backend, hidden, inter):
    from moekit import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(3, hidden, inter, backend=backend)
    x, scale, sizes = torch.randn(10, hidden), torch.rand(10), [4, 0, 6]
    expected = experts(x, sizes) * scale.unsqueeze(-1)
    assert torch.allclose(experts(x, sizes, row_scale=scale), expected, atol=1e-5)
