"""What the training tests share: a small corpus, overrides that make any preset tiny, and a weights copy."""

from pathlib import Path

import torch

from moekit.cli import load_run_dict
from moekit.train.config import RunConfig, apply_overrides

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 40

SMALL = ["model.hidden_size=32", "model.moe.hidden_size=32", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64",
         "train.block_size=32", "train.batch_size=4", "train.eval_batches=2", "train.eval_interval=5",
         "train.log_interval=1", "train.checkpoint_interval=5", "train.warmup_steps=2", "train.lr=0.01"]


def small_overrides(preset: str, corpus: Path, *extra: str) -> list[str]:
    """The `--set` items that make `preset` tiny and train it on `corpus` (what :func:`small_run` applies)."""
    values = load_run_dict(preset, None)
    overrides = [item for item in SMALL if values["model"].get("moe") or not item.startswith("model.moe.")]
    if values["model"].get("moe") and values["model"]["moe"].get("n_shared_experts"):
        overrides.append("model.moe.shared_expert_intermediate_size=32")
    if values["model"].get("moe"):
        overrides.append("model.moe.moe_intermediate_size=32")
    return [*overrides, f"train.data={corpus}", *extra]


def small_run(preset: str, corpus: Path, *extra: str) -> RunConfig:
    """A tiny run of `preset` on `corpus`, with `extra` overrides last."""
    return RunConfig.from_dict(apply_overrides(load_run_dict(preset, None), small_overrides(preset, corpus, *extra)))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
