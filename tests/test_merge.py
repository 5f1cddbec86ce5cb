"""Tests for `moekit merge` (moekit.interop.merge, merge_config, dense_source) on tiny models built offline."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("yaml")

from moekit.cli import main  # noqa: E402
from moekit.interop import writer  # noqa: E402
from moekit.interop.gates import ExpertPrompts, compute_gate_weights  # noqa: E402
from moekit.interop.merge import choose_architecture, merge  # noqa: E402
from moekit.interop.merge_config import load_merge_config  # noqa: E402

from .merge_fixtures import (  # noqa: E402
    HIDDEN_SIZE,
    INTERMEDIATE_SIZE,
    NUM_LAYERS,
    load_checked,
    make_dense_model,
    tiny_config,
)

PROMPTS = (["write a python function", "fix the bug in this code"], ["solve the equation", "prove the sum"],
           ["tell a story about a dragon", "the king and queen"])


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # width-0 shared experts


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """Per family: a base and three independent expert sources (llama's base is sharded)."""
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        shard = "40KB" if family == "llama" else None
        base = make_dense_model(root / family / "base", family, seed=0, max_shard_size=shard)
        sources = [make_dense_model(root / family / f"src{i}", family, seed=i + 1) for i in range(3)]
        out[family] = (base, sources)
    return out


def _config(base: Path, sources: list[Path], gate_mode: str = "hidden", num_experts: int = 2, shared: int = 0,
            shared_prompts: bool = False, **extra: object) -> dict:
    experts = [{"source_model": str(sources[i]), "positive_prompts": PROMPTS[i]} for i in range(num_experts)]
    config = {"base_model": str(base), "gate_mode": gate_mode, "experts": experts, **extra}
    if shared:
        config["shared_experts"] = [
            {"source_model": str(sources[-1 - j]), **({"positive_prompts": PROMPTS[2]} if shared_prompts else {})}
            for j in range(shared)]
    return config


def _dense(path: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _expert_output(block: torch.nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """Output of one expert alone: every token routed to `expert` with weight 1."""
    index = torch.full((x.shape[0], 1), expert, dtype=torch.long)
    return block.experts(x, index, torch.ones(x.shape[0], 1))


def _non_ffn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".mlp." not in k and "rotary" not in k}


CASES = [  # family, architecture, gate_mode, shared experts, shared with prompts
    ("llama", "mixtral", "random", 0, False),
    ("mistral", "mixtral", "cheap_embed", 0, False),
    ("qwen2", "qwen2_moe", "hidden", 1, True),
    ("llama", "qwen2_moe", "cheap_embed", 2, False),
    ("qwen3", "qwen3_moe", "hidden", 0, False),
    ("qwen3", "deepseek_v3", "cheap_embed", 2, False),
    ("llama", "deepseek_v3", "hidden", 0, False),
]


@pytest.mark.parametrize(("family", "architecture", "gate_mode", "shared", "shared_prompts"), CASES)
def test_merge_copies_base_experts_and_router_rows(models, tmp_path: Path, family: str, architecture: str,
                                                   gate_mode: str, shared: int, shared_prompts: bool) -> None:
    base, sources = models[family]
    config = _config(base, sources, gate_mode, shared=shared, shared_prompts=shared_prompts,
                     architecture=architecture, seed=3)
    plan = merge(config, tmp_path / "out", progress=False)
    moe = load_checked(plan.out)
    assert type(moe).__name__ == plan.model_class
    dense_base = _dense(base)

    # everything but the FFNs is the base model's, bit for bit
    base_state, moe_state = _non_ffn(dense_base.state_dict()), _non_ffn(moe.state_dict())
    assert base_state.keys() <= moe_state.keys()
    for name, tensor in base_state.items():
        assert torch.equal(moe_state[name], tensor), name

    x = torch.randn(5, HIDDEN_SIZE, generator=torch.Generator().manual_seed(0))
    for layer in range(NUM_LAYERS):
        block = moe.model.layers[layer].mlp
        for expert in range(2):  # expert i computes source i's MLP
            source_mlp = _dense(sources[expert]).model.layers[layer].mlp
            torch.testing.assert_close(_expert_output(block, x, expert), source_mlp(x), rtol=1e-5, atol=1e-6)
        if shared:
            expected = sum(_dense(sources[-1 - j]).model.layers[layer].mlp(x) for j in range(shared))
            shared_module = block.shared_expert if architecture == "qwen2_moe" else block.shared_experts
            output = shared_module(x)
            if architecture == "qwen2_moe":
                gate = torch.sigmoid(block.shared_expert_gate(x))
                if not shared_prompts:  # zero gate (1/2) and a doubled down_proj: the shared experts fully on
                    assert torch.all(block.shared_expert_gate.weight == 0)
                output = gate * output if not shared_prompts else output
            torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)

    # router rows are exactly what compute_gate_weights returns for this config (one call, all experts)
    specs = [ExpertPrompts(list(PROMPTS[i])) for i in range(2)]
    if shared_prompts:
        specs += [ExpertPrompts(list(PROMPTS[2])) for _ in range(shared)]
    gates = compute_gate_weights(base, specs, gate_mode, num_layers=NUM_LAYERS, hidden_size=HIDDEN_SIZE, seed=3)
    for layer in range(NUM_LAYERS):
        block = moe.model.layers[layer].mlp
        assert torch.equal(block.gate.weight, gates[layer, :2]), f"router of layer {layer}"
        if shared_prompts:  # Qwen2-MoE's shared expert gate holds the shared expert's own row (mergekit)
            assert torch.equal(block.shared_expert_gate.weight[0], gates[layer, 2:].mean(dim=0))

    out = moe.generate(torch.tensor([[1, 20, 30]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and out[0, :3].tolist() == [1, 20, 30]
    written = json.loads((plan.out / "config.json").read_text())
    assert written["num_experts_per_tok"] == 2
    assert (plan.out / "tokenizer.json").is_file() and (plan.out / "generation_config.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(str(plan.out))("write code").input_ids[0] == 1


def test_random_gates_follow_the_seed(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    first = merge(_config(base, sources, "random", seed=5), tmp_path / "a", progress=False)
    again = merge(_config(base, sources, "random", seed=5), tmp_path / "b", progress=False)
    other = merge(_config(base, sources, "random", seed=6), tmp_path / "c", progress=False)
    rows = [load_checked(p.out).model.layers[1].mlp.gate.weight for p in (first, again, other)]
    assert rows[0].shape == (2, HIDDEN_SIZE)
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])
    assert 0.8 < float(rows[0].std()) < 1.2  # standard normal, as mergekit's `random`


def test_dry_run_plan_matches_written_model_and_writes_nothing(models, tmp_path: Path) -> None:
    base, sources = models["qwen2"]
    config = _config(base, sources, "cheap_embed", num_experts=3, shared=1, experts_per_token=2)
    plan = merge(config, tmp_path / "out", dry_run=True, progress=False, max_shard_bytes=100_000)
    assert plan.out is None and not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    written = merge(config, tmp_path / "out", progress=False, max_shard_bytes=100_000)
    moe = load_checked(written.out)
    assert plan.total_params == sum(p.numel() for p in moe.parameters())
    idle = NUM_LAYERS * (3 - 2) * 3 * HIDDEN_SIZE * INTERMEDIATE_SIZE  # one routed expert per layer unused
    assert plan.active_params == plan.total_params - idle
    shards = sorted(written.out.glob("*.safetensors"))
    assert plan.num_shards == len(shards) > 1 and (written.out / "model.safetensors.index.json").is_file()
    data_bytes = 0
    for shard in shards:  # a safetensors file: 8-byte header length, JSON header, then the tensor data
        raw = shard.read_bytes()
        data_bytes += len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert plan.output_bytes == data_bytes


def test_streamed_shards_are_bounded_and_complete(models, tmp_path: Path) -> None:
    base, sources = models["llama"]  # the base itself is sharded
    plan = merge(_config(base, sources, "random", dtype="bfloat16"), tmp_path / "out", progress=False,
                 max_shard_bytes=50_000)
    index = json.loads((plan.out / "model.safetensors.index.json").read_text())
    files = {plan.out / name for name in index["weight_map"].values()}
    assert files == set(plan.out.glob("*.safetensors"))
    biggest = HIDDEN_SIZE * 320 * 2  # the embedding alone may exceed the bound
    assert all(f.stat().st_size <= max(50_000, biggest) + 10_000 for f in files)
    moe = load_checked(plan.out)
    assert moe.model.embed_tokens.weight.dtype == torch.float32  # loaded as asked; stored as bf16
    stored = transformers.AutoConfig.from_pretrained(str(plan.out)).dtype
    assert stored == torch.bfloat16
    ref = _dense(base).model.embed_tokens.weight.to(torch.bfloat16).float()
    assert torch.equal(moe.model.embed_tokens.weight, ref)


def test_interrupted_merge_leaves_nothing_and_keeps_existing_output(models, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, sources = models["llama"]
    out = merge(_config(base, sources, "random"), tmp_path / "out", progress=False, max_shard_bytes=50_000).out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = writer.stream_safetensors

    def failing(entries, path, on_tensor=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(entries, path, on_tensor)

    monkeypatch.setattr(writer, "stream_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        merge(_config(base, sources, "random"), out, overwrite=True, progress=False, max_shard_bytes=50_000)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left beside it
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_existing_output_needs_overwrite(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge(_config(base, sources, "random"), out, progress=False)
    with pytest.raises(FileExistsError, match=r"'keep.txt' and no moekit_output.json"):  # not moekit's folder
        merge(_config(base, sources, "random"), out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    merge(_config(base, sources, "random"), out, progress=False)  # an empty folder needs no overwrite
    with pytest.raises(FileExistsError, match="overwrite"):
        merge(_config(base, sources, "random"), out, progress=False)
    merge(_config(base, sources, "random"), out, overwrite=True, progress=False)  # moekit's own output
    assert (out / "config.json").is_file()


def test_noise_and_residual_scale_change_only_that_expert(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    config = _config(base, sources, "random")
    config["experts"][1].update(noise_scale=0.01, residual_scale=0.5)
    plan = merge(config, tmp_path / "out", progress=False)
    experts = load_checked(plan.out).model.layers[0].mlp.experts
    source0, source1 = (_dense(s).model.layers[0].mlp for s in sources[:2])
    inter = INTERMEDIATE_SIZE
    assert torch.equal(experts.gate_up_proj[0, :inter], source0.gate_proj.weight)
    gate_diff = experts.gate_up_proj[1, :inter] - source1.gate_proj.weight
    assert 0.007 < float(gate_diff.std()) < 0.013  # N(0, 0.01) noise
    down_diff = experts.down_proj[1] - 0.5 * source1.down_proj.weight  # noise first, then the residual scale
    assert 0.0035 < float(down_diff.std()) < 0.0065
    again = merge(config, tmp_path / "again", progress=False)  # seeded: the same noise again
    assert torch.equal(load_checked(again.out).model.layers[0].mlp.experts.gate_up_proj, experts.gate_up_proj)


def test_merged_mixtral_loads_into_moekit(models, tmp_path: Path) -> None:
    from moekit.interop import load_hf

    base, sources = models["llama"]
    plan = merge(_config(base, sources, "cheap_embed"), tmp_path / "out", progress=False)
    hf = load_checked(plan.out)
    ours = load_hf(plan.out).eval()
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_ill_conditioned_router_layers_are_named(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    config = _config(base, sources, "cheap_embed", num_experts=3)
    # cheap_embed rows are normalised token sums, the same in every layer: two experts with the same prompts get
    # the same row, so once the direction all rows share is removed, the three rows span one direction, not two
    config["experts"][0]["positive_prompts"] = ["write code"]
    config["experts"][1]["positive_prompts"] = ["write code"]
    config["experts"][2]["positive_prompts"] = ["solve math"]
    with pytest.warns(UserWarning, match=r"layer\(s\) 0, 1 .*ill-conditioned"):
        plan = merge(config, tmp_path / "out", progress=False)
    assert any("ill-conditioned" in note for note in plan.notes)


# ---------------------------------------------------------------------------------------------- bad input
def _assert_refused(config: dict, out: Path, error: type[Exception], match: str, **kwargs: object) -> None:
    with pytest.raises(error, match=match):
        merge(config, out, progress=False, **kwargs)
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_missing_model_is_refused(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    _assert_refused(_config(base, [tmp_path / "nowhere", sources[1]]), tmp_path / "out", FileNotFoundError,
                    "nowhere.*not found")
    _assert_refused(_config("someorg/some-model", sources), tmp_path / "out", FileNotFoundError,
                    "huggingface-cli download someorg/some-model")


def test_mismatched_shapes_name_the_tensor_and_both_shapes(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    wide = make_dense_model(tmp_path / "wide", "llama", seed=9, intermediate_size=96)
    _assert_refused(_config(base, [sources[0], wide]), tmp_path / "out", ValueError,
                    r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\) .* but \(128, 64\)")


@pytest.mark.parametrize(("change", "match"), [
    ({"gate_mode": "hiden"}, "gate_mode='hiden' is not known; use one of hidden"),
    ({"experts_per_token": 3}, "experts_per_token=3 is more than the 2 experts"),
    ({"experts_per_token": 0}, "experts_per_token=0 must be an integer >= 1"),
    ({"dtype": "float8"}, "dtype='float8' is not allowed"),
    ({"architecture": "llama4"}, "architecture='llama4' is not known"),
    ({"gate_modes": "hidden"}, "unknown key 'gate_modes'; accepted keys: base_model, experts"),
    ({"tokenizer_source": "union"}, "tokenizer_source='union' is not supported"),
])
def test_bad_config_values_are_refused(models, tmp_path: Path, change: dict, match: str) -> None:
    base, sources = models["llama"]
    _assert_refused({**_config(base, sources), **change}, tmp_path / "out", ValueError, match)


def test_missing_prompts_and_identical_experts_are_refused(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    no_prompts = _config(base, sources, "hidden")
    no_prompts["experts"][1]["positive_prompts"] = []
    _assert_refused(no_prompts, tmp_path / "out", ValueError, r"experts\[1\].*no positive_prompts")
    empty = _config(base, sources, "hidden")
    empty["experts"][0]["positive_prompts"] = ["   "]
    _assert_refused(empty, tmp_path / "out", ValueError, "empty prompt")
    same_prompts = _config(base, sources, "hidden")
    same_prompts["experts"][1]["positive_prompts"] = same_prompts["experts"][0]["positive_prompts"]
    _assert_refused(same_prompts, tmp_path / "out", ValueError, "same positive and negative prompts")
    same_source = _config(base, [sources[0], sources[0]], "cheap_embed")
    _assert_refused(same_source, tmp_path / "out", ValueError, "for_further_training")
    extra_key = _config(base, sources)
    extra_key["experts"][0]["weight"] = 1.0
    _assert_refused(extra_key, tmp_path / "out", ValueError, r"experts\[0\] has unknown key 'weight'")
    # the escape hatch, for models meant to be trained further
    plan = merge(same_source, tmp_path / "out", progress=False, for_further_training=True)
    moe = load_checked(plan.out)
    experts = moe.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])


def test_layouts_that_cannot_hold_the_model_are_refused(models, tmp_path: Path) -> None:
    llama_base, llama_sources = models["llama"]
    qwen2_base, qwen2_sources = models["qwen2"]
    qwen3_base, qwen3_sources = models["qwen3"]
    _assert_refused(_config(qwen2_base, qwen2_sources, architecture="mixtral"), tmp_path / "out", ValueError,
                    "q/k/v biases, which Mixtral attention lacks")
    _assert_refused(_config(qwen3_base, qwen3_sources, architecture="qwen2_moe"), tmp_path / "out", ValueError,
                    "q_norm/k_norm")
    _assert_refused(_config(llama_base, llama_sources, architecture="qwen3_moe"), tmp_path / "out", ValueError,
                    "always applies q_norm/k_norm")
    _assert_refused(_config(llama_base, llama_sources, shared=1, architecture="mixtral"), tmp_path / "out",
                    ValueError, "Mixtral has no shared experts")
    _assert_refused(_config(llama_base, llama_sources, shared=1, shared_prompts=True, architecture="deepseek"),
                    tmp_path / "out", ValueError, "without a gate")
    mixed = _config(llama_base, llama_sources, shared=2, shared_prompts=True)
    mixed["shared_experts"][1].pop("positive_prompts")
    _assert_refused(mixed, tmp_path / "out", ValueError, "every shared expert or to none")


def test_unsupported_inputs_are_refused(models, tmp_path: Path) -> None:
    base, sources = models["llama"]
    moe_dir = tmp_path / "mixtral"
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2)).save_pretrained(str(moe_dir))
    _assert_refused(_config(base, [sources[0], moe_dir]), tmp_path / "out", ValueError,
                    "Mixture-of-Experts model .* take dense models")
    gemma_dir = tmp_path / "gemma"
    transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).save_pretrained(str(gemma_dir))
    _assert_refused(_config(gemma_dir, sources), tmp_path / "out", ValueError, "model_type 'gemma'.*llama, mistral")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    tiny_config("llama").save_pretrained(str(pickled))
    torch.save({}, pickled / "pytorch_model.bin")
    _assert_refused(_config(base, [sources[0], pickled]), tmp_path / "out", ValueError, "no safetensors weights")


def test_default_architecture_follows_mergekit_rule() -> None:
    assert choose_architecture("llama", 0, False) == "mixtral"
    assert choose_architecture("mistral", 0, False) == "mixtral"
    assert choose_architecture("qwen2", 0, False) == "qwen2_moe"
    assert choose_architecture("qwen3", 0, False) == "qwen3_moe"
    assert choose_architecture("llama", 1, True) == "qwen2_moe"  # a gated shared expert
    assert choose_architecture("llama", 1, False) == "deepseek_v3"  # an always-on shared expert
    assert choose_architecture("qwen3", 2, False) == "deepseek_v3"
    assert choose_architecture("qwen3", 0, False, "qwen") == "qwen3_moe"  # mergekit's prefix spelling
    assert choose_architecture("llama", 0, False, "qwen") == "qwen2_moe"


# ---------------------------------------------------------------------------------------------- YAML and CLI
def test_yaml_config_and_cli(models, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    base, sources = models["mistral"]
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_config(base, sources, "cheap_embed", dtype="bfloat16", experts_per_token=1)))
    config = load_merge_config(path)
    assert config.gate_mode == "cheap_embed" and config.experts_per_token == 1 and config.dtype == "bfloat16"
    assert config.experts[1].positive_prompts == list(PROMPTS[1])
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "nothing written" in printed and "mixtral (MixtralForCausalLM)" in printed and "1 per token" in printed
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress", "--max-shard-size", "60KB"]) == 0
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_config(base, sources), "experts_per_token": 5}))
    assert main(["merge", str(bad), str(tmp_path / "other"), "--no-progress"]) == 2
    assert "experts_per_token=5" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_relative_paths_resolve_from_the_working_directory(models, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base, sources = models["llama"]
    monkeypatch.chdir(base.parent)
    config = _config(Path("base"), [Path(os.path.relpath(s, base.parent)) for s in sources], "random")
    plan = merge(config, tmp_path / "out", dry_run=True, progress=False)
    assert plan.num_experts == 2
