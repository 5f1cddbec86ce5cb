"""Tests of `moekit bench hf` (transformers' own MoE models under every experts implementation): structure and
checks, never speed.

The quick mode builds tiny versions of the families (hidden 64, 8 experts top-2) and times each row once. What is
asserted: every implementation transformers registers is listed, and each one that runs on the CPU was checked
against eager (training-mode logits, loss and gradients; greedy tokens; the first timed step's loss) before it
got a time; every ratio recomputes from the medians; the JSON holds what was printed; a wrong implementation
stops the run before timing; bad family names fail before any work.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="moekit.hf needs transformers >= 5 (ExpertsInterface)")

import moekit.hf.experts as hf_experts
from moekit.bench import harness
from moekit.bench import hf as bench_hf
from moekit.bench.hf import BENCH_FAMILIES, resolve_families, run_hf_benchmark
from moekit.cli import main

CPU_IMPLEMENTATIONS = {"eager", "grouped_mm", "batched_mm", "moekit"}  # the others need a GPU, bf16 or a package


def _value(row: dict, measure: str) -> float | None:
    return {"train": row["train_ms"], "prefill": row["prefill_ms"], "decode": row["decode_ms_per_token"]}[measure]


def test_cli_quick_run_checks_times_and_writes_every_implementation(tmp_path, capsys):
    path = tmp_path / "hf.json"
    threads = torch.get_num_threads()
    assert main(["bench", "hf", "--families", "qwen3_moe,gpt_oss", "--quick", "--repeats", "1", "--threads", "1",
                 "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["benchmark"] == "hf" and result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["repeats"] == 1 and result["warmup"] == bench_hf.WARMUP
    assert {"torch", "transformers", "threads", "calibration_start_gflops", "calibration_end_gflops"} <= set(
        result["machine"])
    assert [res["family"] for res in result["results"]] == ["qwen3_moe", "gpt_oss"]
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    registered = [name for name in ALL_EXPERTS_FUNCTIONS if name not in hf_experts.IMPLEMENTATIONS]
    for res in result["results"]:
        assert res["architecture"] == {"qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}[
            res["family"]]
        assert (res["batch_size"], res["seq_len"]) == bench_hf.QUICK_TRAIN_SHAPE
        assert (res["prompt_tokens"], res["new_tokens"]) == bench_hf.QUICK_DECODE_SHAPE
        assert res["shape"]["hidden_size"] == 64 and res["shape"]["num_experts"] == 8 and res["shape"]["top_k"] == 2
        # every implementation is listed: eager, all of transformers' own, and moekit's
        assert res["implementations"] == ["eager", *registered, "moekit"]
        rows = {row["experts_implementation"]: row for row in res["rows"]}
        assert set(rows) == CPU_IMPLEMENTATIONS
        for name in set(res["implementations"]) - set(rows):  # the ones that cannot run here say why
            assert any(note.startswith(f"[{name}]: skipped") for note in res["notes"]), name
        assert rows["moekit"]["library"] == "moekit"
        assert all(row["library"] == "transformers" for name, row in rows.items() if name != "moekit")
        # checked before timing: training outputs and gradients, greedy tokens, and the first timed step's loss
        for name in set(rows) - {"eager"}:
            whats = [check["what"] for check in res["checks"] if check["what"].startswith(f"[{name}]:")]
            assert any("logits, loss and all" in what for what in whats), name
            assert any("greedy tokens equal to [eager]'s" in what for what in whats), name
            assert any("first timed training step's loss" in what for what in whats), name
        for check in res["checks"]:
            assert check["passed"]
            if "max_abs_diff_logits" in check:
                assert check["max_abs_diff_logits"] <= check["atol"]
                assert check["max_grad_diff_relative"] <= check["grad_tol"]
        eager_loss = rows["eager"]["first_step_loss"]
        assert all(row["first_step_loss"] == pytest.approx(eager_loss, rel=1e-4) for row in rows.values())
        # ratios come from the medians
        tokens = res["batch_size"] * res["seq_len"]
        for row in rows.values():
            assert row["train_ms"] > 0 and row["generate_1_ms"] > 0 and row["generate_n_ms"] > 0
            assert row["train_tokens_per_s"] == pytest.approx(tokens / (row["train_ms"] / 1e3))
            assert row["prefill_ms"] == row["generate_1_ms"]
            per_token = (row["generate_n_ms"] - row["generate_1_ms"]) / (res["new_tokens"] - 1)
            assert row["decode_ms_per_token"] == (pytest.approx(per_token) if per_token > 0 else None)
        for measure in ("train", "prefill", "decode"):
            timed_rows = [r for r in rows.values() if r["library"] == "transformers" and _value(r, measure)]
            fastest = min(timed_rows, key=lambda r, m=measure: _value(r, m))
            for row in rows.values():
                mine = _value(row, measure)
                if mine is None:
                    continue
                assert row[f"{measure}_fastest_transformers"] == fastest["experts_implementation"]
                assert row[f"{measure}_speedup_vs_fastest"] == pytest.approx(_value(fastest, measure) / mine)
                if _value(rows["eager"], measure):
                    assert row[f"{measure}_speedup_vs_eager"] == pytest.approx(_value(rows["eager"], measure) / mine)
            summary = res["moekit"]["moekit"][measure]
            assert summary["fastest_transformers"] == fastest["experts_implementation"]
            assert summary["speedup_vs_fastest"] == rows["moekit"][f"{measure}_speedup_vs_fastest"]
        assert f"Family {res['family']} ({res['architecture']}" in out
    assert "[moekit] over transformers' fastest: train" in out and "calibration at end" in out


@pytest.mark.parametrize("fault", ["output", "gradient"])
def test_a_wrong_implementation_stops_the_run_before_timing(fault, monkeypatch):
    original = hf_experts.experts_forward

    def wrong(*args, **kwargs):
        out = original(*args, **kwargs)
        if fault == "output":
            return out * 1.05
        return out + 0.01 * (out - out.detach())  # the same forward, gradients 1% too large

    monkeypatch.setattr(hf_experts, "experts_forward", wrong)
    lines: list[str] = []
    message = "logits differ" if fault == "output" else "the gradient of .* differs"
    with pytest.raises(AssertionError, match=rf"\[moekit\] vs \[eager\]: {message}"):
        run_hf_benchmark(["qwen3_moe"], quick=True, threads=1, repeats=1, implementations=["moekit"],
                         print_fn=lines.append)
    assert not any(line.startswith("Family") for line in lines)  # no table: nothing was timed


def test_training_steps_that_would_not_fit_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(harness, "TRAIN_MEMORY_FRACTION", 0.0)  # any per-(token, expert) weight copy is too much
    result = run_hf_benchmark(["olmoe"], quick=True, threads=1, repeats=1, implementations=["batched_mm"],
                              print_fn=lambda *a: None)
    (res,) = result["results"]
    rows = {row["experts_implementation"]: row for row in res["rows"]}
    assert set(rows) == {"eager", "batched_mm"}
    assert rows["batched_mm"]["train_ms"] is None and rows["batched_mm"]["decode_ms_per_token"] is not None
    assert rows["eager"]["train_ms"] > 0
    assert any(note.startswith("[batched_mm]: training step skipped") for note in res["notes"])


def test_bad_names_fail_before_any_work(capsys, monkeypatch):
    assert resolve_families(None) == list(bench_hf.DEFAULT_FAMILIES)
    assert resolve_families(["olmoe", " qwen3_moe", "olmoe"]) == ["olmoe", "qwen3_moe"]
    with pytest.raises(ValueError, match="supported model_types: " + ", ".join(BENCH_FAMILIES)):
        resolve_families(["qwen3_moe", "llama"])

    def never(**kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench_hf, "run_hf_benchmark", never)  # the CLI refuses before it would start
    assert main(["bench", "hf", "--families", "qwen3_moe,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown family 'nope'" in err and "qwen3_moe, olmoe, gpt_oss" in err
    assert main(["bench", "hf", "--presets", "tiny-mixtral"]) == 2
    assert "--presets does not apply to `moekit bench hf`" in capsys.readouterr().err
    assert main(["bench", "model", "--families", "olmoe"]) == 2
    assert "--families applies to `moekit bench hf`" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown experts implementation 'fast'"):
        run_hf_benchmark(["olmoe"], implementations=["fast"], print_fn=lambda *a: None)
