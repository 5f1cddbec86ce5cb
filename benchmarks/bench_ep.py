"""Expert parallelism on CPU: training step time and all-to-all bytes at 1, 2 and 4 ranks (gloo, torchrun).

    python benchmarks/bench_ep.py --json benchmarks/results/bench_ep.json --txt benchmarks/results/bench_ep.txt

Each row trains the `tiny-mixtral` preset (hidden 128, 4 MoE layers, E=8, k=2, fp32) for `--steps` steps at
one global batch (16 sequences x 128 tokens per step, in micro-batches of 4 sequences), launched as

    torchrun --standalone --nproc-per-node N -m moekit train --preset tiny-mixtral --ep N \
        --set train.batch_size=4 --set train.grad_accum=4/N

so every layout trains the same model on the same micro-batches (balancing losses are per micro-batch, so the
micro-batch must be the same too) and reaches the same loss up to floating-point order (the `loss` columns:
after 5 steps, and at the end, where discrete top-k choices that flip on rounding have made the runs drift).
Rows with `M=1` add device-limited routing (`model.moe.max_devices_per_token=1`, `expert_devices=N`), which
changes the routing (and so the loss). Step time is the median over the steps after `--warmup`; bytes are
what the trainer logs (`all_to_all_bytes`: every rank's forward exchange per step, token rows out and back plus
per-assignment metadata; the backward sends as much again). `predicted` is the communication model of
docs/scaling.md for uniform routing: per token and layer, 2 x E[remote ranks] x hidden x 4 bytes + metadata.

The machine is what it is: with 2 cores, 2 ranks get one core each and 4 ranks share two (OMP_NUM_THREADS is
set to max(1, cores // N)), so the table measures the exchange's cost and correctness, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, EXPERTS, TOP_K, GLOBAL_BATCH, BLOCK, MICRO_BATCH = 128, 4, 8, 2, 16, 128, 4


def expected_remote_ranks(experts: int, top_k: int, ranks: int, max_ranks: int | None) -> float:
    """E[number of other ranks a token's k experts live on], experts chosen uniformly without replacement."""
    if ranks == 1:
        return 0.0
    per_rank = experts // ranks
    if max_ranks is not None and max_ranks == 1:
        return (ranks - 1) / ranks
    miss = math.comb(experts - per_rank, top_k) / math.comb(experts, top_k)  # a given rank holds none of them
    return (ranks - 1) * (1.0 - miss)


def predicted_bytes_per_token(ranks: int, max_ranks: int | None) -> float:
    rows = expected_remote_ranks(EXPERTS, TOP_K, ranks, max_ranks)
    remote_assignments = TOP_K * (ranks - 1) / ranks if (max_ranks is None or ranks == 1) else TOP_K * rows
    return (2 * rows * HIDDEN * 4 + remote_assignments * 20) * LAYERS


def run(ranks: int, max_ranks: int | None, steps: int, work: Path) -> dict:
    out = work / f"n{ranks}-m{max_ranks}"
    accumulate = GLOBAL_BATCH // MICRO_BATCH // ranks
    sets = [f"train.batch_size={MICRO_BATCH}", f"train.grad_accum={accumulate}", f"train.max_steps={steps}",
            "train.log_interval=1",
            f"train.eval_interval={steps}", "train.eval_batches=2", f"train.checkpoint_interval={steps}",
            "train.device=cpu", "train.dtype=float32"]
    if max_ranks is not None:
        sets += [f"model.moe.expert_devices={ranks}", f"model.moe.max_devices_per_token={max_ranks}"]
    args = ["-m", "moekit", "train", "--preset", "tiny-mixtral", "--out", str(out), "--overwrite", "--no-progress",
            "--ep", str(ranks)] + [item for s in sets for item in ("--set", s)]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"run with {ranks} ranks failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {"ranks": ranks, "max_devices_per_token": max_ranks, "steps": steps, "wall_s": time.perf_counter() - started,
            "train": train, "loss": train[-1]["loss"], "loss_step5": train[4]["loss"],
            "val_loss": [r for r in records if r["kind"] == "eval"][-1]["val_loss"]}


def summarise(result: dict, warmup: int) -> dict:
    train = result["train"][warmup:]
    tokens_per_step = GLOBAL_BATCH * BLOCK
    step_ms = statistics.median(tokens_per_step / r["tokens_per_s"] * 1e3 for r in train)
    sent = statistics.mean(r.get("all_to_all_bytes", 0.0) for r in train)
    ranks, limit = result["ranks"], result["max_devices_per_token"]
    return {"ranks": ranks, "ep": ranks, "max_devices_per_token": limit, "step_ms": step_ms,
            "tokens_per_s": tokens_per_step / step_ms * 1e3, "all_to_all_mb_per_step": sent / 1e6,
            "bytes_per_token_layer": sent / tokens_per_step / LAYERS,
            "predicted_bytes_per_token_layer": predicted_bytes_per_token(ranks, limit) / LAYERS,
            "loss_step5": result["loss_step5"], "loss": result["loss"], "val_loss": result["val_loss"]}


def table(rows: list[dict]) -> str:
    lines = ["| ranks (ep) | device limit | step ms | tokens/s | all-to-all MB/step (fwd) | B/token/layer "
             "measured | predicted (uniform) | loss at step 5 | loss at last step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        limit = "-" if r["max_devices_per_token"] is None else f"M={r['max_devices_per_token']}"
        lines.append(f"| {r['ranks']} | {limit} | {r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['all_to_all_mb_per_step']:.2f} | {r['bytes_per_token_layer']:.0f} | "
                     f"{r['predicted_bytes_per_token_layer']:.0f} | {r['loss_step5']:.5f} | {r['loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json")
    parser.add_argument("--txt")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_ep_"))
    layouts = [(1, None), (2, None), (2, 1), (4, None), (4, 1)]
    rows = []
    for ranks, limit in layouts:
        rows.append(summarise(run(ranks, limit, args.steps, work), args.warmup))
        print(f"ranks {ranks} limit {limit}: {rows[-1]['step_ms']:.0f} ms/step", file=sys.stderr)
    import torch

    header = (f"moekit expert parallelism, tiny-mixtral fp32, global batch {GLOBAL_BATCH}x{BLOCK} tokens in "
              f"micro-batches of {MICRO_BATCH}, "
              f"{args.steps} steps (median after {args.warmup}); torch {torch.__version__}, gloo, "
              f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}")
    text = header + "\n\n" + table(rows) + "\n"
    print(text)
    if args.txt:
        Path(args.txt).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
