"""Evidence for `moekit prune`: validation loss of a small trained MoE after removing 25% and 50% of its experts per
layer, chosen by routing frequency, by REAP saliency, and at random (3 seeds: mean and spread).

The model is `tiny-mixtral` (8 experts, top-2, 4 MoE layers) trained for `--steps` steps on the embedded
Shakespeare corpus (reused when the run directory already holds that step). Experts are scored on `--calib-tokens`
tokens of the *training* split (so the validation loss measures pruned models on text the scores never saw), and every
model is evaluated on the run's own validation batches (`train.eval_batches` windows, as `moekit eval` does). No
fine-tuning after pruning. One CPU thread.

Usage:
    python benchmarks/prune.py                  # 250 training steps (~5 min on one shared core), then the table
    python benchmarks/prune.py --steps 100      # quicker
Writes benchmarks/results/prune.md and prune.json, and prints the table.
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

from moekit.analysis.prune import choose, expert_scores, prune_model, random_scores, token_batches
from moekit.cli import load_run_dict
from moekit.train import checkpoint as ckpt
from moekit.train.config import RunConfig, apply_overrides
from moekit.train.loop import Trainer

SEEDS = (0, 1, 2)


def trained_run(run_dir: Path, steps: int) -> tuple[Trainer, bool]:
    """The trained tiny-mixtral run (trained now unless `run_dir` already holds step `steps`), opened read-only, and
    whether it was trained now."""
    overrides = [f"train.max_steps={steps}", f"train.eval_interval={steps}", f"train.checkpoint_interval={steps}",
                 "train.warmup_steps=30"]
    run = RunConfig.from_dict(apply_overrides(load_run_dict("tiny-mixtral", None), overrides))
    done = False
    try:
        done = ckpt.read_meta(ckpt.find_checkpoint(run_dir))["step"] == steps
    except (FileNotFoundError, ValueError):
        pass
    if not done:
        started = time.perf_counter()
        Trainer(run, run_dir, overwrite=True, progress=False).train()
        print(f"trained tiny-mixtral for {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    return Trainer(run, run_dir, resume=True, progress=False, read_only=True), not done


def val_loss(trainer: Trainer, model: torch.nn.Module) -> float:
    """The run's validation loss (its fixed eval batches) of `model`."""
    evaluator = trainer.evaluator
    saved = evaluator.model
    evaluator.model = model
    try:
        return float(evaluator.evaluate()["val_loss"])
    finally:
        evaluator.model = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--run-dir", default="runs/bench-prune")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    trainer, trained = trained_run(Path(args.run_dir), args.steps)
    model, config = trainer.model.eval(), trainer.run.model
    num_experts = config.moe.num_local_experts
    train_ids = trainer.dataset.train
    calib = token_batches(train_ids[: args.calib_tokens], trainer.run.train.block_size, 8)
    scores = {by: expert_scores(model, calib, by) for by in ("frequency", "saliency")}
    base = val_loss(trainer, model)
    rows: list[dict] = []
    for removed in (0.25, 0.5):
        keep = round(num_experts * (1 - removed))
        row = {"removed": removed, "keep": keep}
        for by in ("frequency", "saliency"):
            kept = choose(scores[by], keep, config)
            row[by] = val_loss(trainer, prune_model(model, kept))
            row[f"{by}_kept"] = {str(k): v for k, v in kept.items()}
        randoms = [val_loss(trainer, prune_model(model, choose(random_scores(model, seed), keep, config)))
                   for seed in SEEDS]
        row["random"] = randoms
        rows.append(row)
        print(f"removed {removed:.0%}: done", flush=True)
    elapsed = time.perf_counter() - started

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    text = [f"Validation loss of `tiny-mixtral` ({num_experts} experts, top-{config.moe.num_experts_per_tok}, "
            f"{args.steps} steps) after removing experts in every MoE layer, no fine-tuning; scores from "
            f"{sum(b.numel() for b in calib):,} training-split tokens; random: mean ± std over seeds "
            f"{', '.join(map(str, SEEDS))}. Unpruned: **{base:.4f}**.", "",
            "| removed | experts kept | frequency | saliency (REAP) | random (3 seeds) |",
            "|---|---|---|---|---|"]
    for row in rows:
        text.append(f"| {row['removed']:.0%} | {row['keep']} of {num_experts} | {row['frequency']:.4f} | "
                    f"{row['saliency']:.4f} | {spread(row['random'])} |")
    shares = {layer: (c / c.mean()).tolist() for layer, c in scores["frequency"].items()}
    text += ["", "Expert load on the calibration tokens, as a share of the ideal (min-max per layer): "
             + ", ".join(f"layer {layer} {min(v):.2f}-{max(v):.2f}" for layer, v in shares.items()) + "."]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread, torch {torch.__version__}"
    text += ["", f"`python benchmarks/prune.py --steps {args.steps}` ({date}, {machine}, {elapsed:.0f} s in all"
             f"{', training included' if trained else ', the trained run reused'})"]
    print("\n".join(text))
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "prune.md").write_text("\n".join(text) + "\n")
    (results / "prune.json").write_text(json.dumps({
        "date": date, "machine": machine, "steps": args.steps, "calibration_tokens": sum(b.numel() for b in calib),
        "val_loss_unpruned": base, "rows": rows,
        "scores": {by: {str(k): v.tolist() for k, v in s.items()} for by, s in scores.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
