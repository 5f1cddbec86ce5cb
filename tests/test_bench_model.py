"""Tests of the end-to-end benchmarks (`moekit bench model`, `moekit bench decode`): structure and checks, never speed.

The runners get tiny `RunConfig`s (hidden 32, 2 layers) and tiny shapes so each run takes seconds. What is
asserted: every row and ratio is where it should be and recomputes from the raw times; the equality checks
ran for every transformers twin and do fail when one weight of the twin differs; the MLA sizes match
transformers' own DeepseekV3Attention parameter count; the CLI path works with --quick and refuses options
of `bench layer`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.bench import decode as bench_decode  # noqa: E402
from moekit.bench import harness  # noqa: E402
from moekit.bench import model as bench_model  # noqa: E402
from moekit.bench.decode import compare_greedy, run_decode_benchmark  # noqa: E402
from moekit.bench.harness import load_transformers  # noqa: E402
from moekit.bench.model import (  # noqa: E402
    ModelCandidate,
    attention_parameters,
    deepseek_v3_config,
    load_preset,
    mla_dims,
    run_model_benchmark,
)
from moekit.cli import main  # noqa: E402
from moekit.model import MoETransformer  # noqa: E402
from moekit.model.generate import generate  # noqa: E402
from moekit.train.config import RunConfig, apply_overrides  # noqa: E402

TINY = ["model.hidden_size=32", "model.moe.hidden_size=32", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.intermediate_size=64", "model.moe.moe_intermediate_size=16",
        "model.max_position_embeddings=64", "model.moe.num_local_experts=8", "model.moe.num_experts_per_tok=2",
        "train.batch_size=2", "train.block_size=16"]


def tiny(preset: str, *extra: str) -> RunConfig:
    """The preset's routing and options at hidden 32, 2 layers, 8 experts (tiny-deepseek: shared width 24, which
    transformers' Glm4-MoE holds as 2 x 16 with zero units)."""
    values = load_preset(preset).to_dict()
    overrides = list(TINY)
    if preset == "tiny-deepseek":
        overrides.append("model.moe.shared_expert_intermediate_size=24")
    return RunConfig.from_dict(apply_overrides(values, overrides + list(extra)))


def _rows(result: dict) -> dict[str, dict]:
    return {row["label"]: row for row in result["rows"]}


def _twins(result: dict, architecture: str) -> list[dict]:
    return [row for row in result["rows"] if row["architecture"] == architecture]


# ---------------------------------------------------------------------------------------------- model
def test_model_benchmark_structure(tmp_path):
    threads = torch.get_num_threads()
    lines: list[str] = []
    path = tmp_path / "model.json"
    result = run_model_benchmark([tiny("tiny-mixtral"), tiny("tiny-deepseek")], threads=1, repeats=1,
                                 batch_size=2, block_size=16, json_path=path, print_fn=lines.append)
    assert torch.get_num_threads() == threads  # restored
    assert result["benchmark"] == "model" and result["device"] == "cpu" and result["dtype"] == "float32"
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    mixtral, deepseek = result["results"]
    assert mixtral["preset"] == "tiny-mixtral" and mixtral["export_architecture"] == "MixtralForCausalLM"
    assert deepseek["export_architecture"] == "Glm4MoeForCausalLM"
    for res in (mixtral, deepseek):
        assert res["tokens_per_step"] == 2 * 16
        rows = res["rows"]
        moekit = rows[0]
        assert moekit["label"] == "moekit" and moekit["library"] == "moekit"
        assert moekit["train_moekit_speedup"] == pytest.approx(1.0)
        for row in rows:
            assert row["train_ms"] > 0 and row["fwd_ms"] > 0 and row["saved_mib"] > 0
            assert row["train_tokens_per_s"] == pytest.approx(32 / (row["train_ms"] / 1e3))
            assert row["fwd_tokens_per_s"] == pytest.approx(32 / (row["fwd_ms"] / 1e3))
            assert row["train_moekit_speedup"] == pytest.approx(row["train_ms"] / moekit["train_ms"])
            assert row["fwd_moekit_speedup"] == pytest.approx(row["fwd_ms"] / moekit["fwd_ms"])
            assert row["train_peak_mib"] is None and row["fwd_peak_mib"] is None  # CUDA only
        # the floor: the same model with each MoE FFN one dense SwiGLU FFN of the active width, so its parameters
        # are moekit's active parameters less the routers' (hand-counted); every row's time is put over its time
        floor = next(row for row in rows if row["library"] == "floor")
        moe = load_preset(res["preset"]).model.moe
        shared = 24 if res["preset"] == "tiny-deepseek" else 0
        width = 2 * 16 + shared
        assert floor["label"] == f"floor (dense FFN {width})"
        model = MoETransformer(tiny(res["preset"]).model)
        routers = sum(p.numel() for name, p in model.named_parameters() if ".router." in name)
        assert floor["parameters"] == model.num_parameters(active=True) - routers
        moe_ffn = 8 * 3 * 16 * 32 + 3 * shared * 32  # routed + shared expert weights per MoE layer
        assert floor["parameters"] == model.num_parameters() - 2 * (moe_ffn - 3 * width * 32) - routers
        assert moe.router in ("topk", "deepseek_v3")
        for row in rows:
            assert row["train_vs_floor"] == pytest.approx(row["train_ms"] / floor["train_ms"])
            assert row["fwd_vs_floor"] == pytest.approx(row["fwd_ms"] / floor["fwd_ms"])
        for best in res["best"].values():
            assert best["train_vs_floor"] > 0
        # every transformers row passed its check first, and each check compared something
        hf_rows = [row for row in rows if row["library"] == "transformers"]
        assert len(res["checks"]) == len(hf_rows)
        for row, check in zip(hf_rows, res["checks"], strict=True):
            assert check["what"].startswith(row["label"]) and check["passed"]
            assert 0 <= check["max_abs_diff"] <= check["atol"]
        # the best implementation per architecture is the fastest of its rows
        for arch, best in res["best"].items():
            fastest = min(_twins(res, arch), key=lambda r: r["train_ms"])
            assert best["experts_implementation"] == fastest["experts_implementation"]
            assert best["moekit_speedup"] == pytest.approx(fastest["train_moekit_speedup"])
    mixtral_twins = _twins(mixtral, "MixtralForCausalLM")
    assert "eager" in {r["experts_implementation"] for r in mixtral_twins}
    assert all("same weights" in c["what"] for c in mixtral["checks"])
    assert _twins(deepseek, "Glm4MoeForCausalLM") and _twins(deepseek, "DeepseekV3ForCausalLM")
    # same weights -> same parameter count (Glm4 adds the zero-padded shared units: 2 layers x 3 x 8 x 32)
    assert all(r["parameters"] == mixtral["rows"][0]["parameters"] for r in mixtral_twins)
    glm = _twins(deepseek, "Glm4MoeForCausalLM")[0]
    assert glm["parameters"] == deepseek["rows"][0]["parameters"] + 2 * 3 * 8 * 32
    notes = " ".join(deepseek["notes"])
    assert "multi-head latent attention" in notes and "(width 24) is exported as width 32" in notes
    text = "\n".join(lines)
    assert "Preset tiny-mixtral" in text and "Preset tiny-deepseek" in text and "calibration at end" in text


def test_model_benchmark_catches_a_mismatched_weight(monkeypatch):
    original = bench_model.load_exported

    def perturbed(tf, path, impl):
        hf = original(tf, path, impl)
        with torch.no_grad():
            hf.model.layers[0].self_attn.o_proj.weight[0, 0] += 0.5
        return hf

    monkeypatch.setattr(bench_model, "load_exported", perturbed)
    with pytest.raises(AssertionError, match="logits differ although the weights are the same"):
        run_model_benchmark([tiny("tiny-mixtral")], threads=1, repeats=1, batch_size=2, block_size=8,
                            print_fn=lambda *a: None)


def test_model_benchmark_skips_training_steps_that_would_not_fit(monkeypatch):
    monkeypatch.setattr(harness, "TRAIN_MEMORY_FRACTION", 0.0)  # any per-(token, expert) weight copy is too much
    result = run_model_benchmark([tiny("tiny-mixtral")], threads=1, repeats=1, print_fn=lambda *a: None)
    (res,) = result["results"]
    gathered = [row for row in res["rows"] if row["experts_implementation"] == "batched_mm"]
    others = [row for row in res["rows"] if row["experts_implementation"] != "batched_mm"]
    assert gathered and others
    for row in gathered:
        assert row["train_ms"] is None and row["train_moekit_speedup"] is None and row["fwd_ms"] > 0
        assert any(note.startswith(f"{row['label']}: training step skipped") for note in res["notes"])
    assert all(row["train_ms"] > 0 for row in others)


def test_mla_dims_match_standard_attention():
    run = load_preset("tiny-deepseek")  # hidden 128, 4 heads of 32
    dims = mla_dims(run)
    # H (r + rope) + r heads (nope + v) = 2 H kv_heads head_dim: 128 (r + 16) + 4 r 48 = 32768 -> r = 96
    assert dims == {"q_lora_rank": None, "kv_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
                    "v_head_dim": 32}
    standard, mla = attention_parameters(run)
    assert standard == 4 * 128 * 128
    assert mla == standard + 96  # the same projections plus the latent's RMSNorm weight
    # independent references: the modules themselves
    moekit_attention = MoETransformer(run.model).layers[0].self_attn
    assert sum(p.numel() for p in moekit_attention.parameters()) == standard
    tf = load_transformers()
    exported = SimpleNamespace(n_shared_experts=2, n_group=4, topk_group=2, first_k_dense_replace=0)
    config = deepseek_v3_config(tf, run, exported)
    config._experts_implementation = "eager"
    hf_attention = transformers.DeepseekV3ForCausalLM(config).model.layers[0].self_attn
    assert sum(p.numel() for p in hf_attention.parameters()) == mla
    assert config.qk_nope_head_dim + config.qk_rope_head_dim == run.model.attention_head_dim == config.v_head_dim


def test_model_benchmark_refuses_bad_presets():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        run_model_benchmark(["nope"])
    with pytest.raises(ValueError, match="dense model"):
        run_model_benchmark(["dense"])
    with pytest.raises(ValueError, match=r"no transformers twin.*capacity_factor"):
        run_model_benchmark([tiny("tiny-mixtral", "model.moe.capacity_factor=1.25")], print_fn=lambda *a: None)
    with pytest.raises(ValueError, match="block_size=65 exceeds preset 'tiny-mixtral'"):
        run_model_benchmark([tiny("tiny-mixtral")], batch_size=1, block_size=65)
    with pytest.raises(ValueError, match="prompt_tokens \\+ new_tokens = 65 exceeds"):
        run_decode_benchmark([tiny("tiny-mixtral")], prompt_tokens=60, new_tokens=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_decode_benchmark([tiny("tiny-mixtral")], json_path="/nonexistent-folder/out.json")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            run_model_benchmark([tiny("tiny-mixtral")], device="cuda")


# ---------------------------------------------------------------------------------------------- decode
def test_decode_benchmark_structure(tmp_path):
    path = tmp_path / "decode.json"
    # tiny-deepseek has both kinds of transformers rows (exported Glm4-MoE, random DeepseekV3); the Mixtral path
    # runs in the CLI and mismatch tests
    result = run_decode_benchmark([tiny("tiny-deepseek")], threads=1, repeats=1,
                                  prompt_tokens=8, new_tokens=4, batch_sizes=[1, 2], json_path=path,
                                  print_fn=lambda *a: None)
    assert result["benchmark"] == "decode"
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    for res in result["results"]:
        assert res["prompt_tokens"] == 8 and res["new_tokens"] == 4 and res["batches"] == [1, 2]
        labels = {row["label"] for row in res["rows"]}
        for batch in (1, 2):
            rows = [row for row in res["rows"] if row["batch"] == batch]
            assert {row["label"] for row in rows} == labels  # every model at every batch size
            moekit = next(row for row in rows if row["library"] == "moekit")
            for row in rows:
                assert row["generate_1_ms"] > 0 and row["generate_n_ms"] > 0
                assert row["prefill_ms"] == row["generate_1_ms"]
                per_token = (row["generate_n_ms"] - row["generate_1_ms"]) / 3
                assert row["decode_ms_per_token"] == pytest.approx(per_token)
                if per_token > 0:
                    assert row["decode_tokens_per_s"] == pytest.approx(batch / (per_token / 1e3))
                assert row["prefill_moekit_speedup"] == pytest.approx(row["prefill_ms"] / moekit["prefill_ms"])
        twins = [row for row in res["rows"] if row["library"] == "transformers"]
        assert len(res["checks"]) == len(twins)  # one check per transformers row and batch
        same = [c for c in res["checks"] if "greedy tokens equal to moekit's" in c["what"]]
        assert same and all(c["passed"] for c in res["checks"])
    deepseek = result["results"][0]
    assert any("DeepseekV3ForCausalLM" in c["what"] and "random weights" in c["what"] for c in deepseek["checks"])


def test_decode_benchmark_catches_a_mismatched_weight(monkeypatch):
    original = bench_model.load_exported

    def perturbed(tf, path, impl):
        hf = original(tf, path, impl)
        with torch.no_grad():
            hf.model.norm.weight.add_(torch.randn(hf.model.norm.weight.shape, generator=torch.Generator()
                                                  .manual_seed(0)) * 3)
        return hf

    monkeypatch.setattr(bench_model, "load_exported", perturbed)
    with pytest.raises(AssertionError, match="not a tie"):
        run_decode_benchmark([tiny("tiny-mixtral")], threads=1, repeats=1, prompt_tokens=8, new_tokens=6,
                             batch_sizes=[2], print_fn=lambda *a: None)


def test_compare_greedy_accepts_only_ties():
    run = tiny("tiny-mixtral", "model.tie_word_embeddings=false")
    torch.manual_seed(0)
    model = MoETransformer(run.model).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)  # distinct tokens' logits now differ by far more than the tie tolerance
    prompt = torch.randint(0, run.model.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    expected = generate(model, prompt, 3, temperature=0)
    chosen = int(expected[0, 8])
    unused = [t for t in range(run.model.vocab_size) if t not in set(expected[0].tolist())]
    tied, other = unused[0], unused[1]
    with torch.no_grad():
        model.lm_head.weight[tied] = model.lm_head.weight[chosen]  # an exact tie with the chosen token
    reference = ModelCandidate("moekit", "moekit", "MoETransformer", None, model, True)
    assert compare_greedy(expected, expected.clone(), reference, 8, "same") == []
    flipped = expected.clone()
    flipped[0, 8] = tied
    notes = compare_greedy(expected, flipped, reference, 8, "tie")
    assert len(notes) == 1 and "a tie" in notes[0] and "new token 0" in notes[0]
    wrong = expected.clone()
    wrong[0, 9] = other
    with pytest.raises(AssertionError, match=r"greedy token 1 of row 0.*not a tie"):
        compare_greedy(expected, wrong, reference, 8, "wrong")


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("what", ["model", "decode"])
def test_cli_bench_quick(what, tmp_path, capsys, monkeypatch):
    # the CLI path (parsing, dispatch, --quick shapes, JSON) on the tiny version of the named preset; the full
    # presets run in the recorded benchmark (benchmarks/results/bench_model.txt, bench_decode.txt)
    monkeypatch.setattr(bench_model, "load_preset", lambda name, original=bench_model.load_preset: tiny(name)
                        if name in ("tiny-mixtral", "tiny-deepseek") else original(name))
    path = tmp_path / f"{what}.json"
    assert main(["bench", what, "--presets", "tiny-mixtral", "--quick", "--repeats", "1", "--threads", "1",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["benchmark"] == what and result["repeats"] == 1
    (res,) = result["results"]
    assert res["preset"] == "tiny-mixtral"
    if what == "model":
        assert (res["batch_size"], res["block_size"]) == (bench_model.QUICK_BATCH, bench_model.QUICK_BLOCK)
    else:
        assert res["batches"] == list(bench_decode.QUICK_BATCHES)
        assert res["new_tokens"] == bench_decode.QUICK_NEW_TOKENS
    assert any(row["architecture"] == "MixtralForCausalLM" for row in res["rows"])
    assert "Preset tiny-mixtral" in capsys.readouterr().out


def test_cli_bench_refuses_options_of_the_other_kind(capsys):
    assert main(["bench", "model", "--configs", "mixtral"]) == 2
    assert "--configs applies only to `moekit bench layer`" in capsys.readouterr().err
    assert main(["bench", "decode", "--tokens", "64", "--no-small"]) == 2
    assert "--tokens, --no-small applies only" in capsys.readouterr().err
    assert main(["bench", "layer", "--presets", "tiny-mixtral"]) == 2
    assert "--presets applies to `moekit bench model|decode`" in capsys.readouterr().err
    assert main(["bench", "model", "--presets", "tiny-mixtral,nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
