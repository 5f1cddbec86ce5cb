"""Benchmark one sparse MoE layer: moekit vs transformers' Mixtral block vs a naive loop vs a dense floor.

A thin command line over `moekit.bench.layer.run_layer_benchmark` (the harness lives in the package,
behind `moekit bench`); see that module for what each row is and how equal work is checked.

Usage::

    python benchmarks/bench_layer.py                  # full run, threads=2, 5 repeats, all configs
    python benchmarks/bench_layer.py --quick          # fewer repeats
    python benchmarks/bench_layer.py --json out.json  # also write every result as JSON
    python benchmarks/bench_layer.py --device cuda    # on the GPU in bf16, with peak memory per row
"""

from __future__ import annotations

import argparse

from moekit.bench.harness import bench_env
from moekit.bench.layer import CONFIGS, SMALL_TOKENS, resolve_configs, run_layer_benchmark


def parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from error
    if not tokens or any(t < 1 for t in tokens):
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row; the median is shown")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (2), for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every result as JSON to PATH")
    parser.add_argument("--tokens", type=parse_tokens, default=[4096],
                        help="tokens per batch for the main rows (default 4096; comma-separated for several)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of the configs {','.join(CONFIGS)}")
    parser.add_argument("--no-small", action="store_true", help=f"skip the {SMALL_TOKENS}-token forward-only rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (fp32, default) or cuda (bf16, with peak memory per row)")
    args = parser.parse_args()
    configs = [name for name in args.configs.split(",") if name.strip()]
    try:  # report a bad config name or a missing GPU as a usage error, before any work
        resolve_configs(configs)
        bench_env(args.device)
    except ValueError as error:
        parser.error(str(error))
    run_layer_benchmark(configs=configs, tokens=args.tokens, device=args.device, threads=args.threads,
                        repeats=args.repeats, quick=args.quick, json_path=args.json, small=not args.no_small)


if __name__ == "__main__":
    main()
