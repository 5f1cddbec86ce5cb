"""The training and run configurations of `moekit train`, and the `--set KEY=VALUE` parser.

`TrainConfig` says how a run trains (data, optimiser, schedule, evaluation, checkpoints, what is frozen),
`RunConfig` is a whole run (its name, the model section, the training section, what each resume changed), and
`apply_overrides` applies `--set` items to a run config mapping before it is built. The fields are checked by the
same machinery as the model configs (`moekit.config`: a type rule from each annotation, then a range rule from
the `_*_RULES` tables), so a bad value is refused with the field, the value seen and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..config import (
    _BOOL_TEXT,
    HF_BALANCE_FIELDS,
    HFModelConfig,
    ModelConfig,
    MoEConfig,
    _check_fields,
    _DictMixin,
    _positive_int,
    _Rule,
)

#: the accepted range of `TrainConfig.collective_timeout_s`: 1 ms (a `datetime.timedelta` rounds below 1 us to
#: 0) to a week (it overflows near 1e14 s)
MIN_COLLECTIVE_TIMEOUT_S = 0.001
MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0

#: `train.backend` values: "moekit" trains moekit's own model, "transformers" trains transformers' own class from
#: `train.init_from` (any family), "auto" picks moekit where `moekit.interop.load_hf` reads the folder
TRAIN_BACKENDS = ("auto", "moekit", "transformers")


def split_patterns(text: str) -> list[str]:
    """`train.freeze` as a list of regular expressions (comma-separated; blanks ignored)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


_SEED_RULE: _Rule = (lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")

_TRAIN_RULES: dict[str, _Rule] = {
    "seed": _SEED_RULE,
    "data": (lambda v: bool(v.strip()), "None (the embedded corpus) or the path of a text file or folder"),
    "init_from": (lambda v: bool(v.strip()), "None or the path of a Hugging Face checkpoint folder"),
    "tokenizer": (lambda v: v in ("byte", "bpe", "hf"), "'byte', 'bpe' or 'hf'"),
    "bpe_vocab_size": (lambda v: v > 257, "an integer > 257 (the 256 bytes and the end-of-text token come first)"),
    "val_fraction": (lambda v: 0 < v < 0.5, "a number in (0, 0.5)"),
    "block_size": _positive_int(),
    "batch_size": _positive_int(),
    "grad_accum": _positive_int(),
    "max_steps": _positive_int(),
    "lr": (lambda v: 0 < v <= 1, "a finite number in (0, 1] (AdamW moves each weight by about lr per step)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    "beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "grad_clip": (lambda v: v > 0, "a finite number > 0 (the largest gradient norm; 1.0 usually)"),
    "eval_interval": _positive_int(),
    "eval_batches": _positive_int(),
    "log_interval": _positive_int(),
    "checkpoint_interval": _positive_int(),
    "keep_checkpoints": (lambda v: v >= 1, "a positive integer (checkpoints kept, newest first)"),
    "snapshot_interval": (lambda v: v >= 0, "an integer >= 0 (0: no snapshots; else the steps between weights-only "
                          "snapshots under RUN/snapshots/, which `moekit analyze` reads for router saturation)"),
    "max_skipped_steps": (lambda v: v >= 0, "an integer >= 0 (0: stop at the first non-finite step)"),
    "collective_timeout_s": (lambda v: MIN_COLLECTIVE_TIMEOUT_S <= v <= MAX_COLLECTIVE_TIMEOUT_S,
                             f"a number of seconds in [{MIN_COLLECTIVE_TIMEOUT_S:g}, {MAX_COLLECTIVE_TIMEOUT_S:g}] "
                             "(1 ms to a week)"),
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'"),
    "device": (lambda v: v in ("auto", "cpu", "cuda"), "'auto', 'cpu' or 'cuda'"),
    "expert_parallel": _positive_int(),
    "backend": (lambda v: v in TRAIN_BACKENDS, "'auto', 'moekit' or 'transformers' (see TrainConfig)"),
    "freeze": (lambda v: v is None or all(_valid_regex(part) for part in split_patterns(v)),
               "None or comma-separated regular expressions over parameter names (each must compile)"),
}

@dataclass
class TrainConfig(_DictMixin):
    """How `moekit train` trains: data, optimiser, schedule, evaluation and checkpointing.

    `init_from` names a Hugging Face checkpoint folder (what `moekit merge` or `moekit upcycle` writes, or any
    mixtral / qwen2_moe / glm4_moe / llama folder `moekit.interop.load_hf` reads) to start from instead of random
    weights. Its `tokenizer.json` is then the tokenizer: `tokenizer` becomes "hf" ("byte" is replaced, since
    it is the default; "bpe" is refused, because the model's embedding rows are the folder tokenizer's ids).

    `backend` says who computes the model of such a run: "moekit" converts the folder into moekit's own model
    (the native families), "transformers" trains transformers' own class with moekit's experts implementation,
    routing capture and balancing (any MoE family transformers has), "auto" takes moekit's where it reads the
    folder and transformers' otherwise. `freeze_router`, `train_only_router` and `freeze` choose what trains.
    """

    seed: int = 0  # seeds torch and the batch sampler; an integer in [0, 2**63)
    data: str | None = None  # None = the embedded Shakespeare corpus; else a text file or folder
    init_from: str | None = None  # None = random initialisation; else an HF checkpoint folder (see above)
    tokenizer: str = "byte"  # "byte", "bpe" (trained locally with `tokenizers`) or "hf" (init_from's tokenizer.json)
    bpe_vocab_size: int = 2048  # ids of the "bpe" tokenizer, > 257 (the 256 bytes and end-of-text come first)
    val_fraction: float = 0.05  # share of the corpus held out for evaluation, in (0, 0.5)
    block_size: int = 128  # tokens per training sequence
    batch_size: int = 16  # sequences per optimiser step (split into grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 1000  # optimiser steps of the whole run (the cosine schedule ends there)
    lr: float = 3e-3  # peak learning rate, in (0, 1]
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio, in [0, 1]
    warmup_steps: int = 30  # linear warmup steps, >= 0
    weight_decay: float = 0.1  # AdamW's decoupled decay of matrices, >= 0 with lr * weight_decay <= 1
    beta1: float = 0.9  # AdamW's betas, each in [0, 1)
    beta2: float = 0.95
    grad_clip: float = 1.0  # the largest global gradient norm, > 0
    eval_interval: int = 50  # steps between evaluations
    eval_batches: int = 8  # batches per evaluation
    log_interval: int = 10  # steps between log lines
    checkpoint_interval: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2  # how many of the newest complete checkpoints a run keeps, >= 1
    # steps between weights-only snapshots (RUN/snapshots/step-N/, never pruned; also at max_steps), for router
    # saturation across the run; 0 = none, >= 0
    snapshot_interval: int = 0
    # how many steps with a non-finite loss or gradient norm may be skipped over the whole run before training
    # stops with an error, >= 0 (0 = stop at the first)
    max_skipped_steps: int = 0
    # under torchrun: how long a rank waits for the others in one collective before it stops with an error naming
    # a hung or lost peer, in seconds, > 0 (1 ms to a week)
    collective_timeout_s: float = 300.0
    dtype: str = "auto"  # "auto" (bf16 autocast where the device supports it well), "float32", "bfloat16"
    device: str = "auto"  # "auto", "cpu", "cuda"
    expert_parallel: int = 1  # ranks that share each layer's experts (`--ep`, under torchrun); the rest is DP
    # "auto", "moekit" or "transformers": which implementation trains a run started from init_from (see above)
    backend: str = "auto"
    freeze_router: bool = False  # keep every router's weights as they are (the selection bias still updates)
    train_only_router: bool = False  # train the routers alone: every other parameter frozen
    freeze: str | None = None  # comma-separated regexes: parameters whose name matches one are frozen

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for a field of the wrong type or range, or an impossible setting."""

        def fail(name: str, value: Any, allowed: str) -> None:
            raise ValueError(f"TrainConfig.{name}={value!r} is not allowed: {allowed}")

        _check_fields(self, "TrainConfig", _TRAIN_RULES, ints_to_float=True)
        if self.init_from is not None:
            if self.tokenizer == "bpe":
                fail("tokenizer", self.tokenizer, "'hf' with init_from: the model's embedding rows are the ids of "
                     "the tokenizer.json in init_from, so a newly trained tokenizer cannot be used")
            self.tokenizer = "hf"  # the default "byte" means "whatever the model brings" here
        if self.tokenizer == "hf" and self.init_from is None:
            fail("tokenizer", self.tokenizer, "'byte' or 'bpe' ('hf' is the tokenizer.json of train.init_from; "
                 "set --set train.init_from=DIR)")
        if self.freeze_router and self.train_only_router:
            fail("train_only_router", self.train_only_router, "false with freeze_router=true (nothing would train)")
        if self.backend == "transformers" and self.init_from is None:
            fail("backend", self.backend, "'moekit' or 'auto' without init_from: the transformers backend trains "
                 "transformers' own class loaded from train.init_from=DIR")
        if self.snapshot_interval > 0 and self.expert_parallel > 1:
            fail("snapshot_interval", self.snapshot_interval, f"0 with expert_parallel={self.expert_parallel}: a "
                 "snapshot is written by rank 0 alone, which holds only its slice of the experts; train with --ep 1 "
                 "(data parallel keeps every expert on every rank) or set train.snapshot_interval=0")
        if self.lr * self.weight_decay > 1:
            fail("weight_decay", self.weight_decay, f"at most 1 / lr = {1 / self.lr:g} with lr={self.lr!r} (AdamW "
                 "multiplies every matrix by 1 - lr * weight_decay each step)")


def _plain_file_name(name: str) -> bool:
    """A name usable as one path component on every platform (it becomes `runs/<name>`)."""
    return (bool(name) and name == name.strip() and name not in (".", "..") and not any(c in name for c in "/\\\0")
            and not (len(name) >= 2 and name[0].isalpha() and name[1] == ":"))


_RUN_RULES: dict[str, _Rule] = {
    "name": (_plain_file_name, "a plain file name (the run is written to runs/<name>): not empty, not '.' or "
             "'..', no '/', '\\\\' or NUL, no drive such as 'C:', no leading or trailing whitespace"),
    "model": (lambda v: True, "a ModelConfig, or an HFModelConfig (a mapping with hf_config) for the transformers "
              "backend (RunConfig.from_dict takes a mapping of its fields)"),
    "train": (lambda v: True, "a TrainConfig (RunConfig.from_dict takes a mapping of its fields)"),
    "allow_token_mixing": (lambda v: True, _BOOL_TEXT),
    "history": (lambda v: True, "a list of mappings (one per resume: what it changed)"),
}


@dataclass
class RunConfig(_DictMixin):
    """Everything a training run needs: a name, the model and the training settings.

    `history` records what each resume changed (one mapping per resume, filled by the trainer); it travels
    with `to_dict` / `from_dict` so a run's `config.json` keeps it.
    """

    name: str = "run"  # the run directory is runs/<name>: a plain file name
    model: ModelConfig | HFModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    allow_token_mixing: bool = False  # opt in to Soft MoE in a causal LM (it leaks future tokens)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # what each resume changed

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` for a field of the wrong type or value (the sections check themselves)."""
        _check_fields(self, "RunConfig", _RUN_RULES)
        if isinstance(self.model, HFModelConfig) and self.train.backend == "moekit":
            raise ValueError("RunConfig: the model section is a transformers model (hf_config) but train.backend is "
                             "'moekit'; set train.backend=transformers or start from a folder moekit converts")
        if not isinstance(self.model, HFModelConfig) and self.train.backend == "transformers" \
                and self.train.init_from is not None:
            raise ValueError("RunConfig: train.backend='transformers' needs the model section of the init_from folder "
                             "(model.hf_config); build the run config with moekit.train.init_from.init_from_values "
                             "(moekit train --init-from DIR --set train.backend=transformers does)")

    @property
    def uses_transformers(self) -> bool:
        """True when transformers' own class is the model (`train.backend="transformers"`)."""
        return isinstance(self.model, HFModelConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a run config mapping (`config.json`, a preset), checking every section and field."""
        if not isinstance(values, dict):
            raise ValueError(f"run config must be a mapping with 'model' and 'train' sections, got "
                             f"{type(values).__name__} {values!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                raise ValueError(f"run config has no section {key!r}; expected {sorted(known)}")
        sections: dict[str, Any] = {}
        model_values = values.get("model")
        model_class = HFModelConfig if isinstance(model_values, dict) and "hf_config" in model_values else ModelConfig
        for key, section in (("model", model_class), ("train", TrainConfig)):
            given = values.get(key)
            if given is None:
                given = {}
            if not isinstance(given, dict):
                raise ValueError(f"RunConfig.{key}={given!r} is not allowed: a mapping of {section.__name__} fields")
            sections[key] = section.from_dict(dict(given))
        history = values.get("history", [])
        if isinstance(history, list):
            history = [dict(item) if isinstance(item, dict) else item for item in history]
        return cls(name=values.get("name", "run"), model=sections["model"], train=sections["train"],
                   allow_token_mixing=values.get("allow_token_mixing", False), history=history)


def _parse_value(text: str) -> Any:
    """'16' -> 16, '1e-3' -> 0.001, 'true' -> True, 'null' -> None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `KEY=VALUE` overrides (dotted keys, e.g. `model.moe.num_local_experts=16`) to a config dict.

    `model.X` where X is an MoE field is read as `model.moe.X`, so `--set model.num_local_experts=16`
    works as users expect. Unknown keys are refused later by the dataclasses with a suggestion.
    """
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE; e.g. --set model.moe.num_local_experts=16")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        hf_model = isinstance(values.get("model"), dict) and "hf_config" in values["model"]
        if len(parts) == 2 and parts[0] == "model" and parts[1] in moe_fields and parts[1] not in model_fields \
                and not (hf_model and parts[1] in HF_BALANCE_FIELDS):
            parts = ["model", "moe", parts[1]]
        if hf_model and parts[:2] == ["model", "moe"]:
            raise ValueError(f"override {item!r}: this run trains transformers' own class, whose model section has "
                             f"no moe part; set its balancing directly: model.{', model.'.join(HF_BALANCE_FIELDS)}")
        node = values
        for part in parts[:-1]:
            if node.get(part) is None:
                if parts[:2] == ["model", "moe"] and part == "moe":
                    raise ValueError(f"override {item!r}: this preset is dense (model.moe is null); "
                                     "choose an MoE preset to set MoE fields")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = _parse_value(raw)
    return values
