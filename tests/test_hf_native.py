"""moekit inside transformers' own MoE models: `experts_implementation="moekit"` and routing capture.

References are transformers' own: the `eager` experts implementation (each family's original forward), the
router logits transformers returns with `output_router_logits=True`, and the family's own routing rule.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="moekit.hf needs transformers >= 5 (ExpertsInterface)")

import moekit.hf as mh
import moekit.hf.experts as hf_experts

from .hf_zoo import moe_block_classes, tiny_model

#: the families the issue names, by model_type (text part of multimodal ones)
FAMILIES = ["qwen3_moe", "olmoe", "gpt_oss", "llama4", "granitemoe", "phimoe", "dbrx", "deepseek_v2", "deepseek_v3",
            "minimax", "qwen3_next", "jamba"]
#: families whose experts are plain modules outside transformers' experts interface
UNSERVED = {"llama4": "Llama4TextExperts", "dbrx": "DbrxExperts"}


def _experts_hidden(experts) -> int:
    weight = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return weight.shape[1] if experts.is_transposed else weight.shape[2]


def _run(experts, implementation, x, index, weights):
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = experts(x, index, weights)
    probe = torch.linspace(-1, 1, out.numel()).view_as(out)  # a gradient that is not all ones
    (out * probe).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, weights.grad, grads


def test_registered_names_reach_transformers_registry():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert mh.register() == list(mh.IMPLEMENTATIONS)
    assert mh.register() == list(mh.IMPLEMENTATIONS)  # idempotent
    for name in ("moekit", "moekit_loop", "moekit_grouped_mm", "moekit_bmm"):
        assert name in ALL_EXPERTS_FUNCTIONS.valid_keys()


def test_every_interface_experts_class_equals_eager():
    """Every experts class of the installed transformers that uses the interface: outputs and every gradient."""
    checked, failures = [], []
    for zb in moe_block_classes():
        experts = zb.block.experts
        if not mh.is_interface_experts(experts):
            continue
        experts = copy.deepcopy(experts).float()
        generator = torch.Generator().manual_seed(len(checked))
        tokens, k = 13, 2
        x = torch.randn(tokens, _experts_hidden(experts), generator=generator)
        index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:k] for _ in range(tokens)])
        index[0, 1] = index[0, 0]  # a token that picks one expert twice still sums both
        weights = torch.rand(tokens, k, generator=generator)
        reference = _run(experts, "eager", x, index, weights)
        for implementation in mh.IMPLEMENTATIONS:
            got = _run(experts, implementation, x, index, weights)
            for what, mine, theirs in (("output", got[0], reference[0]), ("input grad", got[1], reference[1]),
                                       ("weights grad", got[2], reference[2])):
                if not torch.allclose(mine, theirs, atol=2e-5, rtol=1e-4):
                    failures.append(f"{type(experts).__name__} {implementation}: {what}")
            if got[3].keys() != reference[3].keys():
                failures.append(f"{type(experts).__name__} {implementation}: gradients of {sorted(got[3])}")
            for name in reference[3]:
                if name in got[3] and not torch.allclose(got[3][name], reference[3][name], atol=2e-5, rtol=1e-4):
                    failures.append(f"{type(experts).__name__} {implementation}: grad of {name}")
        checked.append(type(experts).__name__)
    assert not failures, failures
    assert len(checked) >= 60, checked  # transformers 5.25 has 73 such classes
    # both paths are exercised: the hand-written stacked backward and the family's own functions
    served = [zb.block.experts for zb in moe_block_classes() if mh.is_interface_experts(zb.block.experts)]
    kinds = {mh.stacked_kind(experts) for experts in served}
    assert {True, None} <= kinds


def test_stacked_path_is_taken_for_plain_swiglu_and_not_for_gpt_oss():
    qwen = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    gpt_oss = tiny_model("gpt_oss").model.layers[0].mlp.experts
    assert mh.stacked_kind(qwen) is True
    assert mh.stacked_kind(gpt_oss) is None  # interleaved, clamped, biased: its own _apply_gate runs


def test_ids_outside_the_experts_add_nothing():
    experts = copy.deepcopy(tiny_model("qwen3_moe").model.layers[0].mlp.experts)
    x = torch.randn(3, _experts_hidden(experts))
    index = torch.tensor([[0, experts.num_experts], [1, 2], [experts.num_experts, 3]])
    weights = torch.rand(3, 2)
    experts.config._experts_implementation = "moekit"
    got = experts(x, index, weights)
    experts.config._experts_implementation = "eager"
    assert torch.allclose(got, experts(x, index, weights), atol=1e-6)


def _tiny_folder(tmp_path, model_type):
    model = tiny_model(model_type)
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", FAMILIES)
def test_whole_model_equals_eager(model_type, tmp_path, quiet_transformers):
    folder = _tiny_folder(tmp_path, model_type)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    results = {}
    for implementation in ("eager", "moekit"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = mh.load_model(folder, experts_implementation=implementation)
        notes = [str(w.message) for w in caught if "experts interface" in str(w.message)]
        if implementation == "moekit" and model_type in UNSERVED:
            assert len(notes) == 1 and UNSERVED[model_type] in notes[0]
        else:
            assert notes == []
        model.train()
        torch.manual_seed(0)  # families with router jitter draw the same noise
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                                         if p.grad is not None})
    (logits, grads), (ref_logits, ref_grads) = results["moekit"], results["eager"]
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-5, rtol=1e-3), name


@pytest.mark.parametrize("model_type", FAMILIES)
def test_capture_matches_transformers_router_logits_and_masks_padding(model_type, quiet_transformers):
    model = tiny_model(model_type).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad(), mh.RoutingCapture(model) as routing:
        out = model(input_ids=ids, output_router_logits=True)  # no mask: every row, to compare with transformers
        routing.clear()
        routing.attention_mask = mask
        model(input_ids=ids, attention_mask=mask)
    layers = routing.layers
    config = model.config.get_text_config()
    k = next(getattr(config, name) for name in ("num_experts_per_tok", "moe_top_k", "top_k") if hasattr(config, name)) \
        if model_type != "dbrx" else config.ffn_config.moe_top_k
    assert layers and all(layer.expert_index.shape == (int(mask.sum()), k) for layer in layers)
    assert all(layer.weights.shape == layer.expert_index.shape for layer in layers)
    assert all(int(layer.load().sum()) == int(mask.sum()) * k for layer in layers)
    reference = getattr(out, "router_logits", None)
    if reference is not None and model_type != "llama4":  # transformers' own record of the router logits
        with torch.no_grad(), mh.RoutingCapture(model) as again:
            model(input_ids=ids)
        theirs = [t.reshape(-1, t.shape[-1]) for t in reference if t is not None]
        mine = [layer.router_logits for layer in again.layers]
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert torch.allclose(a, b.to(a.dtype), atol=1e-6)


def test_capture_follows_the_family_rule_qwen3_moe():
    """Qwen3-MoE routes top-k of softmax(logits): the recorded ids are that set, the weights renormalised."""
    model = tiny_model("qwen3_moe", norm_topk_prob=True).eval()
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), mh.RoutingCapture(model) as routing:
        model(input_ids=ids)
    for layer in routing.layers:
        probs = layer.router_logits.float().softmax(-1)
        top = probs.topk(layer.expert_index.shape[-1], dim=-1)
        assert torch.equal(layer.expert_index.sort(-1).values, top.indices.sort(-1).values)
        expected = top.values / top.values.sum(-1, keepdim=True)
        assert torch.allclose(layer.weights.sort(-1).values, expected.sort(-1).values, atol=1e-6)


def test_capture_keeps_the_graph_when_asked():
    model = tiny_model("olmoe")
    ids = torch.randint(0, 100, (2, 5))
    with mh.RoutingCapture(model, detach=False) as routing:
        model(input_ids=ids)
    logits = routing.layers[0].router_logits
    assert logits.requires_grad
    logits.square().sum().backward()
    assert model.model.layers[0].mlp.gate.weight.grad is not None


def test_capture_refuses_a_mask_of_another_batch():
    model = tiny_model("olmoe")
    with mh.RoutingCapture(model, attention_mask=torch.ones(3, 4)), pytest.raises(ValueError, match="attention mask"):
        model(input_ids=torch.randint(0, 100, (2, 5)))


def test_capture_refuses_a_model_without_moe_layers():
    with pytest.raises(ValueError, match="routing cannot be recorded"):
        mh.RoutingCapture(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_the_core_imports_without_transformers_and_moekit_hf_says_what_it_needs():
    import subprocess
    import sys

    blocked = ("import sys\nsys.modules['transformers'] = None\n"
               "import moekit, moekit.layer, moekit.model, moekit.train.loop, moekit.cli\n"
               "try:\n    import moekit.hf\nexcept ImportError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'moekit.hf needs transformers >= 5: pip install "moekit[hf]"' in done.stdout


# ---------------------------------------------------------------------------------------------- the timed paths
# `moekit bench hf` times experts_implementation="moekit" at sizes where experts_forward takes two paths that the
# tiny whole-model tests above do not reach: decoding steps (a handful of assignments, no graph)
# and CPU training with large groups (`_CombinedLoopFFN`). Both are checked here against eager on every experts
# class of the installed transformers that the interface serves.
def _interface_experts():
    from .hf_zoo import moe_block_classes

    served = [zb.block.experts for zb in moe_block_classes() if hf_experts.is_interface_experts(zb.block.experts)]
    assert len(served) >= 60  # transformers 5.25 has 73 such classes
    return served


def _call(experts, implementation, x, index, weights, grad: bool):
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    if not grad:
        with torch.no_grad():
            return experts(x, index, weights), {}
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = experts(x, index, weights)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters() if p.grad is not None}
    return out.detach(), {"input": x.grad, "routing weights": weights.grad, **grads}


def _inputs(experts, tokens: int, k: int, seed: int):
    import copy

    experts = copy.deepcopy(experts).float()
    in_proj = experts.gate_up_proj if experts.has_gate else experts.up_proj
    hidden = in_proj.shape[1] if experts.is_transposed else in_proj.shape[2]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator)
    index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:k] for _ in range(tokens)])
    return experts, x, index, torch.rand(tokens, k, generator=generator)


def test_decoding_steps_equal_eager_for_every_interface_experts_class():
    failures = []
    for seed, source in enumerate(_interface_experts()):
        for tokens in (1, 3):  # 2 and 6 assignments: the few-assignment path
            experts, x, index, weights = _inputs(source, tokens, 2, seed)
            index[-1, 1] = index[-1, 0]  # one token picks an expert twice: both count
            if tokens == 3:
                index[0, 0] = index[1, 0]  # two tokens share an expert
            expected, _ = _call(experts, "eager", x, index, weights, grad=False)
            got, _ = _call(experts, "moekit", x, index, weights, grad=False)
            if not torch.allclose(got, expected, atol=2e-5, rtol=1e-4):
                failures.append(f"{type(experts).__name__} ({tokens} tokens)")
    assert not failures, failures


def test_decoding_steps_skip_ids_outside_the_experts():
    from .hf_zoo import tiny_model

    experts, x, index, weights = _inputs(tiny_model("qwen3_moe").model.layers[0].mlp.experts, 3, 2, 0)
    index[0, 1] = index[2, 0] = experts.num_experts  # a family's "no expert" slot adds nothing
    expected, _ = _call(experts, "eager", x, index, weights, grad=False)
    got, _ = _call(experts, "moekit", x, index, weights, grad=False)
    assert torch.allclose(got, expected, atol=1e-6)


def test_large_group_training_equals_eager_for_every_stacked_experts_class(monkeypatch):
    monkeypatch.setattr(hf_experts, "COMBINED_LOOP_MIN_ROW_ELEMENTS", 0)  # every CPU training call takes it
    taken = []
    original = hf_experts._CombinedLoopFFN.forward
    monkeypatch.setattr(hf_experts._CombinedLoopFFN, "forward",
                        staticmethod(lambda ctx, *args: taken.append(1) or original(ctx, *args)))
    failures, checked = [], 0
    for seed, source in enumerate(_interface_experts()):
        if hf_experts.stacked_kind(source) is None:
            continue
        experts, x, index, weights = _inputs(source, 13, 2, seed)
        index[0, 1] = index[0, 0]
        expected = _call(experts, "eager", x, index, weights, grad=True)
        before = len(taken)
        got = _call(experts, "moekit", x, index, weights, grad=True)
        assert len(taken) == before + 1, type(experts).__name__
        if not torch.allclose(got[0], expected[0], atol=2e-5, rtol=1e-4):
            failures.append(f"{type(experts).__name__}: output")
        if got[1].keys() != expected[1].keys():
            failures.append(f"{type(experts).__name__}: gradients of {sorted(got[1])}")
        for name, grad in expected[1].items():
            if name in got[1] and not torch.allclose(got[1][name], grad, atol=2e-5, rtol=1e-4):
                failures.append(f"{type(experts).__name__}: grad of {name}")
        checked += 1
    assert not failures, failures
    assert checked >= 40
