"""A trained run read back for use: its config, its model with a checkpoint's (or snapshot's) weights, its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import find_checkpoint, load_weights
from .config import RunConfig
from .init_from import build_model
from .rundir import read_run_config
from .tokenizers import load_tokenizer

__all__ = ["load_run"]


def load_run(run_dir: str | Path, weights: str | Path | None = None,
             what: str = "load the run") -> tuple[RunConfig, nn.Module, Any]:
    """`(run config, model in eval mode, tokenizer)` of the run directory `run_dir`.

    The weights are those of `weights` (a checkpoint or snapshot folder of the run) or, by default, of the newest
    complete checkpoint (weights only: a damaged optimiser state does not matter here). The model is moekit's own
    `MoETransformer`, or transformers' own class for a run trained with `train.backend=transformers`. `what` words
    the errors ("cannot load the run: ...").
    """
    path = Path(run_dir)
    run = RunConfig.from_dict(read_run_config(path, what))
    model = build_model(run.model)
    load_weights(Path(weights) if weights is not None else find_checkpoint(path), model)
    return run, model.eval(), load_tokenizer(path / "tokenizer")
