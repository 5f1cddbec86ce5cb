"""`moekit analyze` end to end: a tiny moekit run and a tiny transformers MoE folder, traces, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moekit.analysis.analyze import analyze
from moekit.analysis.record import RoutingRecorder
from moekit.analysis.source import open_routed_model
from moekit.analysis.trace import analyze_trace, read_trace
from moekit.cli import main
from moekit.train.loop import Trainer

from .family_cases import save_case
from .run_helpers import small_run

DOMAIN_TEXT = {
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 12,
    "maths": "12 + 30 = 42\n7 * 6 = 42\n99 - 57 = 42\n(3 + 4) * 6 = 42\n" * 14,
    "plays": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 9,
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(DOMAIN_TEXT.values()) * 3)
    run_dir = root / "run"
    Trainer(small_run("tiny-mixtral", corpus, "train.max_steps=3", "train.tokenizer=byte",
                        "train.snapshot_interval=1"), run_dir,
            overwrite=True, progress=False).train()
    return run_dir


@pytest.fixture()
def domains(tmp_path) -> Path:
    folder = tmp_path / "domains"
    folder.mkdir()
    for name, text in DOMAIN_TEXT.items():
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_a_moekit_run_with_domains(trained_run, domains, tmp_path):
    out = tmp_path / "out"
    result = analyze(trained_run, domains=domains, tokens=900, batch_size=3, out=out, permutations=20)
    routed = open_routed_model(trained_run)
    k, num_experts, block = routed.top_k, routed.num_experts, routed.block_size
    streams = [torch.tensor(routed.encode(text))[:300] for text in DOMAIN_TEXT.values()]  # 900 tokens over 3
    assert result["data"]["tokens"] == sum(s.numel() for s in streams)
    assert result["data"]["domains"] == ["code", "maths", "plays"]
    # the reference: the same windows, routed one by one under the (hand-checked) recorder
    expected_load = {layer: torch.zeros(num_experts, dtype=torch.long) for layer in routed.moe_layers}
    expected_domain = {layer: torch.zeros(3, num_experts, dtype=torch.long) for layer in routed.moe_layers}
    with RoutingRecorder(routed.model) as recorder:
        for d, stream in enumerate(streams):
            for start in range(0, stream.numel(), block):
                routed.model(stream[start:start + block][None])
                for record in recorder.take():
                    counts = torch.bincount(record.expert_index.reshape(-1), minlength=num_experts)
                    expected_load[record.layer] += counts
                    expected_domain[record.layer][d] += counts
    for layer in result["layers"]:
        assert layer["load"] == expected_load[layer["layer"]].tolist()
        assert layer["domains"]["load"] == expected_domain[layer["layer"]].tolist()
        assert sum(layer["load"]) == result["data"]["tokens"] * k
        assert len(layer["dropped_by_position"]) == block
        assert layer["domains"]["baseline_p95"] >= layer["domains"]["baseline_mean"] >= 0
    assert result["layers"][-1]["consistency_with_next"] is None
    assert 0 <= result["layers"][0]["consistency_with_next"] <= 1
    # the page's sample: each domain's first tokens, with the routing the model gave them
    sample = result["sample"]
    first = streams[0][:block]
    assert sample["ids"][:block] == first.tolist()
    with RoutingRecorder(routed.model) as recorder:
        routed.model(first[None])
    for record in recorder.take():
        assert sample["experts"][str(record.layer)][:block] == record.expert_index.tolist()
    assert "".join(sample["tokens"][:block]) == DOMAIN_TEXT["code"][:block]
    written = json.loads((out / "analysis.json").read_text())
    assert written == json.loads(json.dumps(result))
    # the run kept snapshots at every step: router saturation against the final weights, drawn as a curve
    saturation = result["saturation"]
    assert saturation["steps"] == [1, 2, 3] and saturation["final_step"] == 3
    assert saturation["overall"][-1] == 1.0
    assert all(0 <= value <= 1 for value in saturation["overall"])
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "coactivation.png", "domain_experts.png", "dropped_by_position.png", "load_heatmap.png", "saturation.png"]
    assert (out / "routing.html").is_file()


def test_a_trace_gives_the_same_analysis_without_the_model(trained_run, domains, tmp_path):
    result = analyze(trained_run, domains=domains, tokens=600, batch_size=2, out=tmp_path / "a", save_trace=True,
                     permutations=10)
    trace = tmp_path / "a" / "trace.safetensors"
    tensors, meta = read_trace(trace)
    layers = len(result["model"]["moe_layers"])
    assert tensors["expert_index"].shape == (600, layers, 2)
    assert tensors["weights"].shape == (600, layers, 2)
    assert int(tensors["batch_tokens"].sum()) == 600
    assert meta["domains"] == ["code", "maths", "plays"]
    assert not list((tmp_path / "a").glob(".*"))  # no spill files left
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copy(trace, copy)  # no run directory needed: the trace carries its token texts
    again = analyze_trace(copy, out=tmp_path / "b", permutations=10)
    assert again["layers"] == result["layers"]
    assert again["overall"] == result["overall"]
    assert again["sample"] == result["sample"]


def test_a_transformers_folder_matches_its_own_router(tmp_path):
    """Mixtral through transformers: every layer's load equals the top-k of transformers' own router logits."""
    folder = save_case("mixtral", tmp_path / "mixtral")
    text = tmp_path / "text.txt"
    text.write_text("the king and the queen cook bread and soup in the castle at night " * 6)
    result = analyze(folder, data=text, tokens=10_000, batch_size=4, block_size=16, out=tmp_path / "out",
                     permutations=0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(folder), experts_implementation="eager").eval()
    windows = [ids[i:i + 16] for i in range(0, len(ids), 16)]
    assert len(windows[-1]) < 16  # the last window is short: it rides padded and masked
    batch = torch.full((len(windows), 16), 3)
    mask = torch.zeros(len(windows), 16, dtype=torch.long)
    for row, window in enumerate(windows):
        batch[row, :len(window)] = torch.tensor(window)
        mask[row, :len(window)] = 1
    load = {}
    with torch.no_grad():
        for start in range(0, len(windows), 4):
            out = model(input_ids=batch[start:start + 4], attention_mask=mask[start:start + 4],
                        output_router_logits=True)
            keep = mask[start:start + 4].reshape(-1).bool()
            for layer, logits in enumerate(out.router_logits):
                top = torch.softmax(logits.float(), dim=-1)[keep].topk(2, dim=-1).indices
                load[layer] = load.get(layer, 0) + torch.bincount(top.reshape(-1), minlength=4)
    assert result["model"]["kind"] == "hf"
    assert result["data"]["tokens"] == len(ids)
    assert [layer["layer"] for layer in result["layers"]] == [0, 1, 2]
    for layer in result["layers"]:
        assert layer["load"] == load[layer["layer"]].tolist()
    assert (tmp_path / "out" / "analysis.json").is_file()


def test_qwen3_moe_folder_numbers_its_sparse_layers(tmp_path):
    folder = save_case("qwen3_moe", tmp_path / "qwen3")  # decoder_sparse_step 2: only layer 1 is MoE
    text = tmp_path / "t.txt"
    text.write_text("write a python function to sum a list of numbers " * 4)
    result = analyze(folder, data=text, tokens=500, block_size=16, permutations=0)
    assert result["model"]["moe_layers"] == [1]
    assert sum(result["layers"][0]["load"]) == result["data"]["tokens"] * 2


def test_bad_input_is_refused_and_writes_nothing(trained_run, tmp_path):
    out = tmp_path / "out"
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("only one domain")
    with pytest.raises(ValueError, match="at least two"):
        analyze(trained_run, domains=one, out=out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze(tmp_path / "missing", out=out)
    with pytest.raises(ValueError, match="either --data or --domains"):
        analyze(trained_run, data=one / "a.txt", domains=one, out=out)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        analyze(trained_run, data=tmp_path / "nope.txt", out=out)
    with pytest.raises(ValueError, match="neither a moekit run"):
        analyze(one, out=out)
    with pytest.raises(ValueError, match="capacity_factor"):
        analyze(trained_run, out=out, capacity_factor=0)
    assert not out.exists()
    folder = save_case("mixtral", tmp_path / "hf")
    with pytest.raises(ValueError, match="--data FILE"):
        analyze(folder, out=out)
    assert not out.exists()


def test_the_command(trained_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["analyze", str(trained_run), "--out", str(out), "--tokens", "400", "--no-progress",
                 "--save-trace", "--permutations", "5"]) == 0
    printed = capsys.readouterr().out
    assert "| layer | MaxVio_global" in printed and "validation split" not in printed
    assert (out / "analysis.json").is_file() and (out / "trace.safetensors").is_file()
    assert main(["analyze", str(out / "trace.safetensors"), "--out", str(tmp_path / "again")]) == 0
    assert main(["analyze", str(out / "trace.safetensors"), "--data", "x.txt", "--out", str(tmp_path / "x")]) == 2
    assert "a trace already holds its tokens" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
