"""What `--resume` may change, and the learning-rate schedule a run's history implies.

A resume continues the run its `config.json` describes. A field given again on resume (`--set`, `--max-steps`)
is either honoured exactly or refused with the field's name; config.json then records the change in its
`history` (the step it took effect and the old and new values), so it never claims a setting that did not hold.

Honoured (:data:`RESUMABLE_FIELDS`): how often to log, evaluate and checkpoint, how many checkpoints to keep, the
skipped-step budget, the collective timeout, the expert-parallel layout (checkpoints reshard), the interval of
weight snapshots, and the run's name. None of these changes the weights a step produces. A training field that the
run's config.json does not have (it was written before the field existed) counts as its default, so such a run
resumes unchanged. The number of ranks and `train.grad_accum` may change together
when their product, the micro-batches one step draws, stays the same.

`train.max_steps` plans the cosine schedule, so changing it on resume would bend the learning rate of every later
step. It is refused unless the schedule is extended on purpose (`--extend-schedule`): then the learning rate follows
warmup + cosine planned over the new `max_steps` from the second update after the resume step s on (the first one
uses the rate the checkpoint already holds); the steps before keep the rates they had. The rate therefore jumps from
`lr_factor(s, N)` to `lr_factor(s + 1, M)`. To stop
early on the planned schedule, use `--stop-at N` instead, which changes nothing.
Everything else (model, data, tokenizer, optimiser, batch, seed, device, dtype...) is refused.
"""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig

RESUMABLE_FIELDS = frozenset({
    "name", "train.eval_interval", "train.eval_batches", "train.log_interval", "train.checkpoint_interval",
    "train.keep_checkpoints", "train.max_skipped_steps", "train.collective_timeout_s", "train.expert_parallel",
    "train.snapshot_interval",
})
SCHEDULE_FIELD = "train.max_steps"

def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("model", "train", "moe"):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resume_changes(stored: dict[str, Any], given: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every field whose value in the resumed run's config (`given`) differs from config.json (`stored`)."""
    stored = {**stored, "train": {**TrainConfig().to_dict(), **(stored.get("train") or {})}}  # older: defaults
    old, new = _flatten({k: v for k, v in stored.items() if k != "history"}), \
        _flatten({k: v for k, v in given.items() if k != "history"})
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def check_resume_changes(changes: dict[str, tuple[Any, Any]], step: int, extend_schedule: bool,
                         grad_accum: tuple[int, int] = (1, 1), world_size: tuple[int, int] = (1, 1)) -> None:
    """Raise ValueError for the first change a resume at `step` cannot honour (see the module docstring).

    `grad_accum` and `world_size` are (saved, now): a step draws grad_accum x world_size micro-batches, so a
    resume on another number of ranks must keep that product (`train.grad_accum` may change to do so).
    """
    saved, now = grad_accum[0] * world_size[0], grad_accum[1] * world_size[1]
    if saved != now:
        fitting = saved / world_size[1]
        hint = (f"set --set train.grad_accum={int(fitting)}" if fitting == int(fitting) and fitting >= 1
                else f"launch a number of ranks that divides {saved}")
        raise ValueError(f"--resume on {world_size[1]} rank(s) with train.grad_accum={grad_accum[1]} would draw {now} "
                         f"micro-batches per step, but the run drew {saved} ({world_size[0]} rank(s) x "
                         f"grad_accum {grad_accum[0]}), so its steps would train on other batches; {hint}")
    for key, (old, new) in changes.items():
        if key in RESUMABLE_FIELDS or key == "train.grad_accum":  # the product is checked above
            continue
        if key == SCHEDULE_FIELD:
            if not extend_schedule:
                raise ValueError(f"--resume cannot change train.max_steps from {old} to {new} silently: it plans the "
                                 "learning-rate schedule. To stop early on the planned schedule use --stop-at N; to "
                                 "continue past it pass --extend-schedule (from this step on the cosine is planned "
                                 f"over {new} steps, so the learning rate jumps)")
            if not isinstance(new, int) or new <= step:
                raise ValueError(f"--extend-schedule needs train.max_steps above the checkpoint's step {step}, got "
                                 f"{new}; the run has already trained that far")
            if new < old:
                raise ValueError(f"--extend-schedule lengthens the schedule, but train.max_steps={new} is shorter "
                                 f"than the planned {old}; use --stop-at {new} to stop early on the planned schedule")
            continue
        if key.startswith("model.") or key == "train.init_from":  # the weights' origin is part of the model
            raise ValueError(f"--resume cannot change {key} ({old!r} -> {new!r}): the model config differs from the "
                             "one it was trained with, and the checkpoint's weights belong to that model; resume "
                             "without model changes, or start a new run (--out DIR)")
        raise ValueError(f"--resume cannot change {key} ({old!r} -> {new!r}): the checkpoint's weights, optimiser "
                         "state and data position were made with the old value, so the run would no longer be the "
                         "one config.json describes. Resume may change: "
                         + ", ".join(sorted(RESUMABLE_FIELDS | {SCHEDULE_FIELD + ' (with --extend-schedule)'}))
                         + ". To train with other settings start a new run (--out DIR)")


def planned_total(step: int, max_steps: int, history: list[dict[str, Any]]) -> int:
    """The `max_steps` the schedule was planned over at `step`, given the run's history of extensions."""
    extensions = sorted((entry["step"], entry["changed"][SCHEDULE_FIELD]) for entry in history
                        if SCHEDULE_FIELD in entry.get("changed", {}))
    if not extensions:
        return max_steps
    total = extensions[0][1][0]  # the plan before the first extension
    for at, (_, new) in extensions:
        if step > at:  # the rate for step index `at` was computed (and checkpointed) before the extension
            total = new
    return total


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio` at `total` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
