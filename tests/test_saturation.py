"""Router saturation across a run's snapshots, checked against hand-made snapshots whose saturation is known: a
router with two experts' rows swapped (the share follows from the final choices alone) and a router replaced (an
independent top-k of the router input with Python sets)."""

import json
import warnings

import pytest
import torch

from moekit.analysis.saturation import router_saturation, topk_overlap
from moekit.train.load import load_run
from moekit.train.loop import Trainer
from moekit.train.snapshots import save_snapshot

from .run_helpers import small_run


def _batches(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (2, 8), generator=generator) for _ in range(2)]


def _reference_choices(model, batches, k) -> dict[int, list[set[int]]]:
    """Each token's top-k experts per layer: the router input captured by a hook, its logits' top k by hand."""
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [block.mlp.router.register_forward_pre_hook(
        lambda module, args, i=i: inputs.setdefault(i, []).append(args[0].detach()))
        for i, block in enumerate(model.layers)]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for hook in hooks:
        hook.remove()
    choices = {}
    for i, rows in inputs.items():
        weight = model.layers[i].mlp.router.weight.detach()
        choices[i] = []
        for x in torch.cat(rows):
            logits = [float(x @ weight[e]) for e in range(weight.shape[0])]  # Mixtral: top-k of softmax = of logits
            choices[i].append(set(sorted(range(len(logits)), key=lambda e: -logits[e])[:k]))
    return choices


def _naive_saturation(earlier: list[set[int]], final: list[set[int]], k: int) -> float:
    return sum(len(a & b) for a, b in zip(earlier, final, strict=True)) / (k * len(final))


def test_saturation_of_hand_made_snapshots_matches_the_hand_computed_share(corpus, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(small_run("tiny-mixtral", corpus, "train.max_steps=3"), run_dir, progress=False)
    trainer.train()
    batches = _batches(trainer.run.model.vocab_size)
    assert router_saturation(run_dir, batches) is None  # no snapshots yet
    run, final_model, _ = load_run(run_dir)
    k, hashed = run.model.moe.num_experts_per_tok, {"any": "config"}
    final = _reference_choices(final_model, batches, k)

    # step 1: layer 1's router with the rows of experts 0 and 1 swapped. Layer 0 and every layer's input are
    # unchanged, so a token whose final experts S hold both or neither of 0, 1 keeps both of its k = 2 experts, and
    # one holding exactly one of them keeps the other only.
    swapped = load_run(run_dir)[1]
    with torch.no_grad():
        swapped.layers[1].mlp.router.weight[[0, 1]] = swapped.layers[1].mlp.router.weight[[1, 0]].clone()
    save_snapshot(run_dir, swapped, hashed, step=1, tokens=128)
    by_hand = sum(1.0 if len(s & {0, 1}) in (0, 2) else 0.5 for s in final[1]) / len(final[1])
    assert 0 < by_hand < 1  # the swap matters for some tokens and not for others

    # step 2: layer 0's router replaced by random rows: both layers route otherwise (layer 1 through its input)
    replaced = load_run(run_dir)[1]
    with torch.no_grad():
        replaced.layers[0].mlp.router.weight.copy_(torch.randn(replaced.layers[0].mlp.router.weight.shape,
                                                               generator=torch.Generator().manual_seed(7)))
    save_snapshot(run_dir, replaced, hashed, step=2, tokens=256)
    earlier = _reference_choices(replaced, batches, k)

    result = router_saturation(run_dir, batches)
    assert json.loads(json.dumps(result)) == result  # plain JSON
    assert result["steps"] == [1, 2, 3] and result["final_step"] == 3
    assert list(result["layers"]) == ["0", "1"]
    layer0, layer1 = result["layers"]["0"], result["layers"]["1"]
    assert layer0[0] == 1.0 and layer1[0] == pytest.approx(by_hand, abs=1e-12)
    assert layer0[1] == pytest.approx(_naive_saturation(earlier[0], final[0], k), abs=1e-12)
    assert layer1[1] == pytest.approx(_naive_saturation(earlier[1], final[1], k), abs=1e-12)
    assert layer0[1] < 1  # random rows choose other experts for some tokens
    assert layer0[2] == layer1[2] == 1.0  # the final step itself
    assert result["overall"] == pytest.approx([(a + b) / 2 for a, b in zip(layer0, layer1, strict=True)])

    # a snapshot of the final step itself is the final weights: it adds no step
    save_snapshot(run_dir, final_model, hashed, step=3, tokens=384)
    assert router_saturation(run_dir, batches)["steps"] == [1, 2, 3]


def test_a_trained_run_is_measured_from_its_own_snapshots_and_ends_at_one(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run = small_run("tiny-mixtral", corpus, "train.max_steps=4", "train.snapshot_interval=2")
    Trainer(run, run_dir, progress=False).train()
    result = router_saturation(run_dir, _batches(run.model.vocab_size))
    assert result["steps"] == [2, 4] and result["final_step"] == 4
    assert all(0 <= v <= 1 for values in result["layers"].values() for v in values)
    assert result["overall"][-1] == 1.0


def test_topk_overlap_counts_shared_experts_per_token():
    chosen = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    final = torch.tensor([[1, 0], [3, 4], [6, 7], [0, 2]])
    assert topk_overlap(chosen, final).tolist() == [2, 1, 0, 1]
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        topk_overlap(chosen, final[:, :1])


def test_bad_batches_and_routers_without_k_choices_are_refused(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run = small_run("tiny-mixtral", corpus, "train.max_steps=1", "train.snapshot_interval=1")
    Trainer(run, run_dir, progress=False).train()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        router_saturation(run_dir, [torch.full((1, 4), run.model.vocab_size)])
    with pytest.raises(ValueError, match=r"\[B, T\] tensor of integer token ids"):
        router_saturation(run_dir, [torch.zeros(4)])
    with pytest.raises(ValueError, match="at least one batch"):
        router_saturation(run_dir, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice leaks the future: the trainer warns
        choice = small_run("expert-choice", corpus, "train.max_steps=1", "train.snapshot_interval=1")
        Trainer(choice, tmp_path / "ec", progress=False).train()
    with pytest.raises(ValueError, match="expert_choice"):
        router_saturation(tmp_path / "ec", _batches(choice.model.vocab_size))
