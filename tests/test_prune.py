"""`moekit prune`: expert scores against naive references, exact slicing (the kept experts compute bit for bit what
they computed, the router's kept logits are the original's columns), group-limited routing kept valid, pruned runs
that eval and resume, pruned HF folders that transformers loads with the same logits, and refusals that write
nothing."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moekit.analysis.prune import (
    check_keep,
    expert_scores,
    moe_layers,
    prune_experts,
    prune_model,
    select_experts,
    token_batches,
)
from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig
from moekit.model import MoETransformer
from moekit.train.config import RunConfig
from moekit.train.loop import Trainer
from moekit.train.rundir import read_run_config

from .run_helpers import small_run

VOCAB = 64


def _model(seed: int = 0, **moe) -> MoETransformer:
    moe_fields = {"hidden_size": 32, "moe_intermediate_size": 24, "num_local_experts": 8, "num_experts_per_tok": 2,
                  **moe}
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         moe=MoEConfig(**moe_fields))
    torch.manual_seed(seed)
    model = MoETransformer(config)
    with torch.no_grad():  # spread the routers so experts differ in use; nonzero selection biases where present
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.05)
        for layer in moe_layers(model).values():
            layer.router.weight.mul_(4.0)
    return model.eval()


def _ids(seed: int = 1, batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- scores
def _layer_inputs(model: MoETransformer, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    seen = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].reshape(-1, 32)))
               for i, layer in moe_layers(model).items()]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen


def _naive_expert(layer, x: torch.Tensor, e: int) -> torch.Tensor:
    """SwiGLU written out from the raw stacked weights (not through GroupedExperts)."""
    gate_up = layer.experts.gate_up_proj[e]
    gate, up = gate_up[: layer.experts.intermediate_size], gate_up[layer.experts.intermediate_size:]
    return (F.silu(x @ gate.T) * (x @ up.T)) @ layer.experts.down_proj[e].T


@torch.no_grad()
def test_scores_match_a_token_by_token_reference():
    model = _model()
    ids = _ids()
    inputs = _layer_inputs(model, ids)
    frequency = expert_scores(model, [ids], "frequency")
    saliency = expert_scores(model, [ids], "saliency")
    for i, layer in moe_layers(model).items():
        x = inputs[i]
        probs = torch.softmax(x @ layer.router.weight.T, dim=-1)  # Mixtral-style: softmax, top-2, renormalise
        top = probs.topk(2, dim=-1)
        gates = top.values / top.values.sum(-1, keepdim=True)
        count, total = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
        for t in range(x.shape[0]):
            for slot in range(2):
                e = int(top.indices[t, slot])
                count[e] += 1
                total[e] += float(gates[t, slot]) * float(_naive_expert(layer, x[t], e).norm())
        assert torch.equal(frequency[i], count)
        assert count.sum() == ids.numel() * 2
        expected = torch.where(count > 0, total / count.clamp_min(1), 0.0)
        torch.testing.assert_close(saliency[i], expected, rtol=1e-5, atol=1e-7)
        assert (count == 0).any() == (saliency[i] == 0).any()  # an unused expert scores 0


def test_frequency_agrees_with_the_layers_own_load_statistics():
    model = _model(seed=3)
    ids = _ids(seed=4)
    with torch.no_grad():
        stats = model(ids).moe_stats
    scores = expert_scores(model, token_batches(ids.reshape(-1), 16, batch_size=2), "frequency")
    for i, s in stats.items():
        assert scores[i].tolist() == s["tokens_per_expert"].double().tolist()


def test_selection_breaks_ties_by_lower_index_and_keeps_order():
    assert select_experts(torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0, 2.0]), 3) == [1, 2, 4]
    assert select_experts(torch.tensor([3.0, 3.0, 3.0, 3.0]), 2) == [0, 1]
    # two groups of three: the best two of each, even where the other group holds better scores
    assert select_experts(torch.tensor([9.0, 8.0, 7.0, 1.0, 3.0, 2.0]), 4, blocks=2) == [0, 1, 4, 5]


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("moe", [
    {"router": "topk", "router_bias": True},
    {"router": "deepseek_v3", "scoring_func": "sigmoid", "n_group": 2, "topk_group": 1,
     "aux_free_bias_update_rate": 1e-3, "n_shared_experts": 1, "routed_scaling_factor": 2.5},
])
def test_pruning_keeps_the_kept_experts_and_router_columns_exactly(moe):
    model = _model(**moe)
    rows = [0, 2, 5, 7] if moe["router"] == "topk" else [1, 2, 4, 7]  # deepseek_v3: two of each group of four
    keep = {i: rows for i in moe_layers(model)}
    pruned = prune_model(model, keep)
    assert pruned.config.moe.num_local_experts == 4
    x = torch.randn(10, 32)
    for i, layer in moe_layers(model).items():
        new = moe_layers(pruned)[i]
        for j, e in enumerate(keep[i]):
            assert torch.equal(new.experts.expert_forward(x, j), layer.experts.expert_forward(x, e))
        seq = torch.zeros(10, dtype=torch.long)
        old_logits = layer.router(x, seq, 1).logits
        assert torch.equal(new.router(x, seq, 1).logits, old_logits[:, keep[i]])
        if layer.router.e_score_correction_bias is not None:
            assert torch.equal(new.router.e_score_correction_bias, layer.router.e_score_correction_bias[keep[i]])
        if layer.shared_experts is not None:
            assert torch.equal(new.shared_experts(x), layer.shared_experts(x))
    # the new model routes only among kept experts and runs end to end
    with torch.no_grad():
        out = pruned(_ids())
    assert out.logits.shape == (3, 16, VOCAB)


def test_a_model_whose_tokens_never_reach_a_removed_expert_computes_the_same_logits():
    model = _model(seed=5)
    ids = _ids(seed=6, batch=1, length=3)  # 3 tokens x top-2: at most 6 of the 8 experts used per layer
    scores = expert_scores(model, [ids], "frequency")
    keep = {i: select_experts(s, 6) for i, s in scores.items()}
    assert all(set(torch.nonzero(s).flatten().tolist()) <= set(keep[i]) for i, s in scores.items())
    pruned = prune_model(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_bad_keep_values_are_refused_with_the_fix():
    config = _model().config
    with pytest.raises(ValueError, match=r"removes nothing.*below 8"):
        check_keep(config, 8)
    with pytest.raises(ValueError, match=r"fewer than the 2 experts each token uses.*--keep 2 or more"):
        check_keep(config, 1)
    grouped = _model(router="deepseek_v3", scoring_func="sigmoid", n_group=2, topk_group=1).config
    with pytest.raises(ValueError, match=r"evenly over the 2 expert groups.*multiple of 2; e.g. --keep 6"):
        check_keep(grouped, 5)
    with pytest.raises(ValueError, match=r"1 expert per group.*two best experts; pass --keep 4 or more"):
        check_keep(grouped, 2)
    check_keep(grouped, 4)
    soft = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       moe=MoEConfig(hidden_size=32, router="expert_choice", capacity_factor=1.0))
    with pytest.raises(ValueError, match="not token-choice"):
        check_keep(soft, 4)


# ---------------------------------------------------------------------------------------------- a moekit run
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from .run_helpers import TEXT

    root = tmp_path_factory.mktemp("prune_run")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    run = small_run("tiny-mixtral", corpus, "train.max_steps=3", "train.eval_interval=3", "train.checkpoint_interval=3",
                    "model.moe.num_local_experts=4", "model.moe.num_experts_per_tok=2")
    Trainer(run, root / "run", progress=False).train()
    return root / "run"


def test_a_pruned_run_evaluates_generates_and_trains_on(trained_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(trained_run), str(out), "--keep", "3", "--by", "saliency"]) == 0
    assert "pruned 4 -> 3 experts" in capsys.readouterr().out
    values = read_run_config(out)
    assert values["model"]["moe"]["num_local_experts"] == 3
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert "expert shares" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "To", "--max-new-tokens", "4", "--seed", "0"]) == 0
    # the weights are the source's experts, sliced; it trains on from its step with sliced AdamW moments
    from moekit.train.load import load_run

    _, source, _ = load_run(str(trained_run))
    _, pruned, _ = load_run(str(out))
    meta = json.loads(next((out / "checkpoints").iterdir()).joinpath("meta.json").read_text())
    kept = meta["pruned_from"]["kept"]
    for i, layer in moe_layers(source).items():
        rows = kept[str(i)]
        assert torch.equal(moe_layers(pruned)[i].experts.gate_up_proj, layer.experts.gate_up_proj[rows])
        assert torch.equal(moe_layers(pruned)[i].router.weight, layer.router.weight[rows])
    resumed = Trainer(RunConfig.from_dict({**values, "train": {**values["train"], "max_steps": 4}}), out, resume=True,
                      progress=False, extend_schedule=True)
    assert resumed.step == 3
    assert resumed.train().step == 4


def test_refusals_write_nothing(trained_run, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = [
        (["prune", str(trained_run), str(occupied), "--keep", "2"], "exists and is not empty"),
        (["prune", str(tmp_path / "missing"), str(tmp_path / "o1"), "--keep", "2"], "not found"),
        (["prune", str(trained_run), str(tmp_path / "o2"), "--keep", "4"], "removes nothing"),
        (["prune", str(trained_run), str(tmp_path / "o3"), "--keep", "1"], "--keep 2 or more"),
        (["prune", str(trained_run), str(trained_run / "inside"), "--keep", "2"], "overlaps"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert not (trained_run / "inside").exists()


# ---------------------------------------------------------------------------------------------- an HF folder
def _hf_folder(tmp_path: Path, model_type: str) -> tuple[Path, list[str]]:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if model_type == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                             norm_topk_prob=True, head_dim=8)
    elif model_type == "glm4_moe":  # sigmoid scores, selection bias, the best of 2 groups searched, shared expert
        config = transformers.Glm4MoeConfig(
            **common, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
            n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.7, num_nextn_predict_layers=0,
            head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
    else:
        config = transformers.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.3 if name.endswith("gate.weight") else 0.08) if "norm" not in name else None
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.05)
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    words = [f"w{i}" for i in range(VOCAB - 1)]
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder, words


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "glm4_moe"])
def test_a_pruned_hf_folder_loads_in_transformers_with_moekits_logits(model_type, tmp_path):
    import transformers

    from moekit.interop import load_hf

    folder, words = _hf_folder(tmp_path, model_type)
    data = tmp_path / "data.txt"
    data.write_text(" ".join(words[:3]))  # 3 tokens x top-2: no token reaches the 2 removed experts
    grouped = model_type == "glm4_moe"
    if grouped:  # 2 groups of 4: the same number kept in each, at least the two a group is scored by
        with pytest.raises(ValueError, match=r"evenly over the 2 expert groups.*--keep 6"):
            prune_experts(folder, tmp_path / "out", keep=5, by="saliency", data=data)
        with pytest.raises(ValueError, match="two best experts"):
            prune_experts(folder, tmp_path / "out", keep=2, by="saliency", data=data)
        assert not (tmp_path / "out").exists()
    keep = 4 if grouped else 6
    result = prune_experts(folder, tmp_path / "out", keep=keep, by="saliency" if grouped else "frequency", data=data)
    assert result.tokens == 3
    if grouped:
        assert all([e // 4 for e in kept] == [0, 0, 1, 1] for kept in result.kept.values())
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    experts_key = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts", "glm4_moe": "n_routed_experts"}
    assert getattr(loaded.config, experts_key[model_type]) == keep
    original = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = prune_model(load_hf(folder), result.kept)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        hf_logits = loaded.eval()(ids).logits
        torch.testing.assert_close(hf_logits, ours(ids).logits, rtol=0, atol=1e-5)
        if not grouped:  # nothing routed was removed (with groups, keeping 4 of 8 removes some routed experts)
            torch.testing.assert_close(hf_logits, original(ids).logits, rtol=0, atol=1e-5)
    # and on other ids (routed to removed experts before) moekit's pruned model is still what transformers computes
    other = _ids(seed=9, batch=2, length=12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(other).logits, ours(other).logits, rtol=0, atol=1e-5)


def test_an_hf_folder_needs_data_to_score(tmp_path):
    folder, _ = _hf_folder(tmp_path, "qwen3_moe")
    with pytest.raises(ValueError, match="pass --data PATH"):
        prune_experts(folder, tmp_path / "out", keep=4)
    assert not (tmp_path / "out").exists()
    result = prune_experts(folder, tmp_path / "out", keep=4, by="random", seed=1)
    assert all(len(v) == 4 for v in result.kept.values())
    assert result.kept != prune_experts(folder, tmp_path / "out2", keep=4, by="random", seed=2).kept


def test_a_failure_while_writing_leaves_no_output(trained_run, tmp_path, monkeypatch):
    from moekit.train import checkpoint as ckpt

    def broken_save(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(ckpt, "save_checkpoint", broken_save)
    with pytest.raises(OSError, match="disk on fire"):
        prune_experts(trained_run, tmp_path / "out", keep=2, by="frequency")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary sibling
