"""Evidence for the README: does an MoE learn faster than a dense model at equal active compute, and
how do auxiliary-loss and auxiliary-loss-free balancing compare? Also moekit's training speed against
transformers' MixtralForCausalLM of the same shape, measured in one run.

Runs (same data, seed, steps, batch and active FFN width 512):
  dense, tiny-mixtral (softmax top-2 of 8, aux loss), tiny-deepseek (32 fine-grained experts top-4 +
  1 shared, sigmoid, aux-free bias), and tiny-deepseek with the aux loss instead of the aux-free bias.

Usage:
    python benchmarks/quality.py                 # default budget (the presets' 1000 steps each)
    python benchmarks/quality.py --steps 200     # quicker
Writes benchmarks/results/quality.md and quality.json, and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moekit.cli import load_run_dict
from moekit.train.config import RunConfig, apply_overrides
from moekit.train.loop import Trainer
from moekit.train.report import compare_runs

RUNS = {
    "dense": ("dense", []),
    "tiny-mixtral": ("tiny-mixtral", []),
    "tiny-deepseek (aux-free)": ("tiny-deepseek", []),
    "tiny-deepseek (aux loss)": ("tiny-deepseek", ["model.moe.aux_free_bias_update_rate=0",
                                                   "model.moe.router_aux_loss_coef=0.01", "name=tiny-deepseek-aux"]),
}


def train_all(out: Path, steps: int | None) -> list[Path]:
    dirs = []
    for label, (preset, overrides) in RUNS.items():
        values = load_run_dict(preset, None)
        extra = [o for o in overrides if not o.startswith("name=")]
        if any(o.startswith("name=") for o in overrides):
            values["name"] = next(o for o in overrides if o.startswith("name="))[5:]
        if steps:
            extra += [f"train.max_steps={steps}", f"train.eval_interval={max(1, steps // 5)}"]
        run = RunConfig.from_dict(apply_overrides(values, extra))
        run_dir = out / run.name
        started = time.perf_counter()
        Trainer(run, run_dir, overwrite=True, progress=False).train()
        print(f"  {label}: {time.perf_counter() - started:.0f} s", flush=True)
        dirs.append(run_dir)
    return dirs


def speed_vs_transformers(repeats: int = 6) -> dict[str, float]:
    """Training-step tokens/s of tiny-mixtral in moekit and in transformers' MixtralForCausalLM (same shape)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from moekit.model import MoETransformer

    run = RunConfig.from_dict(load_run_dict("tiny-mixtral", None))
    m, t = run.model, run.train
    hf_config = MixtralConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                              intermediate_size=m.moe.moe_intermediate_size,
                              num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                              num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_position_embeddings,
                              num_local_experts=m.moe.num_local_experts, num_experts_per_tok=m.moe.num_experts_per_tok,
                              tie_word_embeddings=m.tie_word_embeddings, rms_norm_eps=m.rms_norm_eps,
                              router_aux_loss_coef=m.moe.router_aux_loss_coef, output_router_logits=True)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    models = {"moekit": MoETransformer(m), "transformers": MixtralForCausalLM(hf_config)}
    opts = {k: torch.optim.AdamW(v.parameters(), lr=1e-3) for k, v in models.items()}
    ids = torch.randint(0, m.vocab_size, (t.batch_size, t.block_size + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def step(name: str) -> None:
        model, opt = models[name], opts[name]
        if name == "moekit":
            out = model(x, targets=y)
            loss = out.loss + out.aux_loss
        else:
            out = model(input_ids=x, labels=y)  # includes its router aux loss, as moekit's does
            loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(repeats + 2):  # interleaved rounds; the first two warm up
        for name in models:
            started = time.perf_counter()
            step(name)
            if i >= 2:
                times[name].append(time.perf_counter() - started)
    tokens = t.batch_size * t.block_size
    result = {f"{k}_tokens_per_s": tokens / statistics.median(v) for k, v in times.items()}
    result["ratio"] = result["moekit_tokens_per_s"] / result["transformers_tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the presets' budget)")
    parser.add_argument("--out", default="runs/quality", help="where the runs are written")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("training the runs ...", flush=True)
    dirs = train_all(Path(args.out), args.steps)
    table, summaries = compare_runs(dirs, Path(args.out))
    speed = speed_vs_transformers()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    date = datetime.date.today().isoformat()
    text = [f"Measured {date} on {machine}; command: `python benchmarks/quality.py"
            + (f" --steps {args.steps}" if args.steps else "") + "`.", "", table, "",
            "| training step, tiny-mixtral shape (batch 16 x 128 tokens, fp32) | tokens/s |", "|---|---|",
            f"| moekit | {speed['moekit_tokens_per_s']:,.0f} |",
            f"| transformers MixtralForCausalLM (sdpa, eager experts) | {speed['transformers_tokens_per_s']:,.0f} |",
            f"| ratio (moekit / transformers) | {speed['ratio']:.2f}x |"]
    print("\n".join(text))
    results = Path("benchmarks/results")
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.md").write_text("\n".join(text) + "\n")
    slim = [{k: v for k, v in s.items() if k not in ("train", "evals")} for s in summaries]
    (results / "quality.json").write_text(json.dumps({"date": date, "machine": machine, "runs": slim,
                                                     "speed": speed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
