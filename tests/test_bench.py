"""Smoke tests of the layer benchmark harness (`moekit.bench`): structure only, never speed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from moekit.bench import run_layer_benchmark
from moekit.bench.layer import resolve_configs

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_TUTEL = importlib.util.find_spec("tutel") is not None
NO_TUTEL = "tutel is not installed (it is not on PyPI; it builds from a clone of microsoft/tutel)"
TINY = {"hidden": 32, "ffn": 32}  # tiny shapes: the harness runs in seconds


def _row(rows: list[dict], prefix: str) -> dict:
    matches = [r for r in rows if r["impl"].startswith(prefix)]
    assert matches, f"no {prefix!r} row in {[r['impl'] for r in rows]}"
    return matches[0]


def _check_rows(result: dict, *, transformers_rows: bool, backward: bool = True) -> list[dict]:
    assert len(result["results"]) == 1
    rows = result["results"][0]["rows"]
    assert all(r["tokens"] == 64 for r in rows)
    moekit, floor = _row(rows, "moekit"), _row(rows, "floor")
    expected = [moekit, floor, _row(rows, "naive loop")]
    eager = _row(rows, "transformers[eager]") if transformers_rows else None
    if transformers_rows:
        expected.append(eager)
    else:
        assert not any(r["impl"].startswith("transformers") for r in rows)
    for row in expected:
        assert row["fwd_ms"] > 0
        assert row["fwd_bwd_ms"] > 0
        assert row["ratio_basis"] == "fwd+bwd"
    for row in rows:  # every ratio is the row's time over its baseline's, recomputed here
        assert row["ratio_floor"] == pytest.approx(row["fwd_bwd_ms"] / floor["fwd_bwd_ms"])
        if eager is None:
            assert row["ratio_eager"] is None
        else:
            assert row["ratio_eager"] == pytest.approx(row["fwd_bwd_ms"] / eager["fwd_bwd_ms"])
        assert row["tokens_per_s"] == pytest.approx(64 / (row["fwd_bwd_ms"] / 1e3))
    return rows


def test_layer_benchmark_structure_cpu(capsys):
    threads = torch.get_num_threads()
    result = run_layer_benchmark(configs=["mixtral"], tokens=[64], repeats=1, quick=True, small=False, sizes=TINY)
    assert torch.get_num_threads() == threads  # restored
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["results"][0]["config"]["name"] == "mixtral"
    assert result["results"][0]["config"]["hidden"] == 32
    rows = _check_rows(result, transformers_rows=HAS_TRANSFORMERS)
    assert all(r["fwd_peak_mib"] is None and r["fwd_bwd_peak_mib"] is None for r in rows)  # CUDA only
    out = capsys.readouterr().out
    assert "Config (mixtral)" in out and "calibration at end" in out


def test_layer_benchmark_without_transformers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    result = run_layer_benchmark(configs=["mixtral"], tokens=[64], repeats=1, quick=True, small=False,
                                 sizes={**TINY, "experts": 4})
    _check_rows(result, transformers_rows=False)
    assert result["machine"]["transformers"] == "not installed"
    assert any("transformers is not installed" in note for note in result["results"][0]["notes"])
    assert "transformers is not installed" in capsys.readouterr().out


def test_layer_benchmark_says_how_to_get_tutel(monkeypatch):
    monkeypatch.setitem(sys.modules, "tutel", None)  # `from tutel import moe` now raises ImportError
    result = run_layer_benchmark(configs=["mixtral"], tokens=[64], repeats=1, quick=True, small=False,
                                 sizes={**TINY, "experts": 4})
    assert not any(r["impl"].startswith("tutel") for r in result["results"][0]["rows"])
    assert result["machine"]["tutel"] == "not installed"
    assert any("NO_CUDA=1 pip install --no-build-isolation ." in note for note in result["results"][0]["notes"])


@pytest.mark.skipif(not HAS_TUTEL, reason=NO_TUTEL)
def test_layer_benchmark_has_tutel_rows_doing_the_same_work():
    # the harness checks every row's outputs and gradients against moekit's before timing (an AssertionError
    # otherwise), so a tutel row in the result means Tutel computed the same layer
    result = run_layer_benchmark(configs=["mixtral", "deepseek"], tokens=[64], repeats=1, quick=True, small=False,
                                 sizes={**TINY, "experts": 4, "top_k": 2, "shared": 16})
    for res in result["results"]:
        tutel = _row(res["rows"], "tutel")
        assert tutel["fwd_ms"] > 0 and tutel["fwd_bwd_ms"] > 0
        assert tutel["impl"] == ("tutel +shared" if res["config"]["shared"] else "tutel")
    assert result["machine"]["tutel"] not in ("not installed", "")


def test_config_names():
    assert resolve_configs(None) == ["mixtral", "deepseek", "dbrx"]
    assert resolve_configs(["mixtral", " deepseek", "dbrx"]) == ["mixtral", "deepseek", "dbrx"]
    with pytest.raises(ValueError, match="unknown layer benchmark config"):
        resolve_configs(["c"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_gpu_raises():
    with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
        run_layer_benchmark(configs=["mixtral"], tokens=[64], device="cuda", repeats=1, quick=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_benchmark_structure_cuda():
    result = run_layer_benchmark(configs=["mixtral"], tokens=[64], device="cuda", repeats=1, quick=True,
                                 small=False, sizes=TINY)
    assert result["device"] == "cuda" and result["dtype"] == "bfloat16"
    rows = _check_rows(result, transformers_rows=HAS_TRANSFORMERS)
    for row in rows:
        assert row["fwd_peak_mib"] is not None and row["fwd_peak_mib"] >= 0
        assert row["fwd_bwd_peak_mib"] is not None and row["fwd_bwd_peak_mib"] > 0


def test_bench_cli_refuses_an_unknown_config_before_any_work(capsys):
    from moekit.cli import main

    assert main(["bench", "layer", "--configs", "mixtral,gpt5"]) == 2
    assert "gpt5" in capsys.readouterr().err
