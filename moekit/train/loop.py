"""The trainer: AdamW, warmup + cosine, clipping, accumulation, autocast, eval, balancer hooks,
JSONL metrics, progress, atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, RunConfig, apply_overrides
from ..layer import update_aux_free_biases
from ..model import MoETransformer
from . import checkpoint as ckpt
from .data import BatchSampler, TokenDataset, build_tokenizer, iter_eval_batches, load_tokenizer
from .parallel import TrainParallel, wants_parallel


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    interrupted: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is visible; use --set train.device=cpu")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device runs it fast (CUDA with bf16 support); None = plain fp32."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPUs without bf16 matrix units run bf16 slower than fp32


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio` at `total` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_adamw(params: Any, **hyperparameters: Any) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with its fused kernel where this torch and device have one, else the default.

    The fused step is one kernel over all tensors; on CPU it took 2.4-3.5 ms against 19-25 ms for the default
    (multi-tensor) step on the tiny presets' 3.5M-5.2M parameters (2 cores). Same update rule; a checkpoint
    keeps the flag, so a run resumes with the implementation it started with.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **hyperparameters)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for these tensors' device or dtype
        return torch.optim.AdamW(params, **hyperparameters)


def build_optimizer(model: torch.nn.Module, run: RunConfig) -> torch.optim.AdamW:
    t = run.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return make_adamw(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def _moe_summary(stats: dict[int, dict[str, torch.Tensor]], with_load: bool = True) -> dict[str, Any]:
    """Mean MaxVio and dropped fraction over MoE layers (and each layer's load, for the log)."""
    if not stats:
        return {}
    summary: dict[str, Any] = {
        "max_violation": float(sum(s["max_violation"] for s in stats.values()) / len(stats)),
        "dropped_fraction": float(sum(s["dropped_fraction"] for s in stats.values()) / len(stats)),
    }
    if with_load:
        summary["load"] = {str(i): s["tokens_per_expert"].tolist() for i, s in stats.items()}
    return summary


# ---------------------------------------------------------------------------------- starting from an HF checkpoint
INIT_FROM_MOE_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "importance_loss_coef", "load_loss_coef",
                        "seq_aux_loss_coef", "aux_free_bias_update_rate", "router_jitter_noise", "capacity_factor",
                        "expert_backend")
"""`model.moe` fields a run started from `train.init_from` may set differently from the checkpoint: balancing,
jitter, capacity and the expert backend change how the model trains, not the shape or meaning of its weights.
Every other model field comes from the checkpoint's config.json and is refused if it differs."""


def _init_path(init_from: str) -> Path:
    """The `train.init_from` folder, checked before anything is read or written."""
    path = Path(init_from).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"train.init_from={init_from!r} does not exist; pass the folder that `moekit merge` "
                                "or `moekit upcycle` wrote (or another mixtral, qwen2_moe, glm4_moe or llama "
                                "checkpoint folder)")
    if not path.is_dir():
        raise ValueError(f"train.init_from={init_from!r} is a file, not a folder; pass the checkpoint folder "
                         "(the one holding config.json, the safetensors weights and tokenizer.json)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"train.init_from={init_from!r} has no tokenizer.json, which moekit train reads as "
                                "the model's tokenizer; copy the base model's tokenizer files (tokenizer.json, "
                                "tokenizer_config.json) into it")
    return path


def load_init_model(init_from: str) -> MoETransformer:
    """`load_hf(init_from)` in float32, with errors that name `train.init_from`."""
    from ..interop import load_hf

    path = _init_path(init_from)
    try:
        return load_hf(path, dtype=torch.float32)
    except (ValueError, FileNotFoundError) as err:
        message = str(err).removeprefix("load_hf: ")
        raise type(err)(f"train.init_from={init_from!r} cannot be loaded: {message}") from err


def init_from_values(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A run config dict whose model section is `train.init_from`'s, with `overrides` applied on top.

    `values` is a preset or config file (a dict with `model` and `train` sections); `train.init_from` comes
    from it or from `overrides` (`KEY=VALUE` items, as for :func:`moekit.config.apply_overrides`). Without
    `init_from` this is `apply_overrides(values, overrides)`. With it, the model section is replaced by the
    checkpoint's configuration before the overrides apply, so `model.moe.router_aux_loss_coef=0.01` adds a
    balancing loss to the checkpoint's router, while a field outside :data:`INIT_FROM_MOE_FIELDS` that differs is
    refused by `Trainer`. `train.init_from` is made absolute and the run is named after the folder. Use it for a
    new run only; a resumed run's config.json already holds the model section.
    """
    train = {"train": dict(values.get("train") or {})}
    init_items = [item for item in overrides if item.split("=", 1)[0].strip() == "train.init_from"]
    init_from = apply_overrides(train, init_items)["train"].get("init_from")
    if init_from is None:
        return apply_overrides(values, list(overrides))
    path = Path(str(init_from)).expanduser().resolve()
    fresh = copy.deepcopy(values)
    fresh["model"] = load_init_model(str(init_from)).config.to_dict()
    fresh["name"] = path.name  # the preset's name would describe another model; `name=...` still wins
    fresh = apply_overrides(fresh, list(overrides))
    fresh["train"]["init_from"] = str(path)  # the run records where it came from
    return fresh


def _init_from_mismatches(given: ModelConfig, loaded: ModelConfig) -> list[str]:
    """Fields of `given` that differ from the checkpoint's `loaded` config and may not."""
    mine, theirs = given.to_dict(), loaded.to_dict()
    my_moe, their_moe = mine.pop("moe"), theirs.pop("moe")
    problems = [f"model.{key}={mine[key]!r} (the checkpoint has {theirs[key]!r})"
                for key in mine if mine[key] != theirs[key]]
    if (my_moe is None) != (their_moe is None):
        problems.append(f"model.moe={'null' if my_moe is None else 'a section'} (the checkpoint is "
                        f"{'dense' if their_moe is None else 'an MoE'})")
    elif my_moe is not None:
        problems += [f"model.moe.{key}={my_moe[key]!r} (the checkpoint has {their_moe[key]!r})"
                     for key in my_moe if key not in INIT_FROM_MOE_FIELDS and my_moe[key] != their_moe[key]]
    return problems


def _model_from_checkpoint(config: ModelConfig, init_from: str) -> MoETransformer:
    """A `MoETransformer(config)` holding the weights of `init_from` (float32)."""
    loaded = load_init_model(init_from)
    problems = _init_from_mismatches(config, loaded.config)
    if problems:
        raise ValueError(f"train.init_from={init_from!r}: the run's model section must be the checkpoint's, but "
                         f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}. The checkpoint's weights "
                         "fix these; only model.moe." + ", model.moe.".join(INIT_FROM_MOE_FIELDS) + " may change. "
                         "Build the config with moekit.train.loop.init_from_values (the CLI does) or drop the "
                         "override")
    if loaded.config.moe is None:
        warnings.warn(f"train.init_from={init_from!r} is a dense model (no MoE layers); it is trained as a dense "
                      "model. To train an MoE, pass the folder `moekit merge` or `moekit upcycle` wrote",
                      stacklevel=3)
    model = MoETransformer(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    # an aux-free rate switched on gives a router a selection bias the checkpoint lacks: it starts at zero
    missing = [name for name in result.missing_keys if not name.endswith("router.e_score_correction_bias")]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise ValueError(f"train.init_from={init_from!r}: tensor {name!r} is "
                         f"{'missing from' if missing else 'not used by'} the model the run config describes; "
                         "drop the model.moe override that changes it")
    return model


class Trainer:
    """Trains a `MoETransformer` described by a `RunConfig` into `run_dir`.

    With `train.init_from` set, a new run starts from that Hugging Face checkpoint's weights and tokenizer (its
    model section must be the checkpoint's: see :func:`init_from_values`); a resumed run reads only its own
    checkpoint, never the folder again.

    Launched by torchrun on several processes, every rank runs a Trainer: the experts are split over
    `train.expert_parallel` ranks and the rest is data parallel (`moekit.train.parallel`); `batch_size` is per
    rank, and rank 0 writes the logs. Checkpoints are saved per rank and resume at any layout.
    """

    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> None:
        self.run, self.run_dir, self.progress = run, Path(run_dir), progress
        t = run.train
        moe = run.model.moe
        if moe is not None and moe.router == "soft" and not run.allow_token_mixing:
            raise ValueError("router='soft' mixes every token of a sequence, future ones included, so a causal LM "
                             "trained with it sees the future and its loss is not comparable; set "
                             "allow_token_mixing: true (or --set allow_token_mixing=true) to train it anyway")
        if moe is not None and moe.router == "expert_choice":
            warnings.warn("router='expert_choice' lets each expert pick tokens across the whole batch, future "
                          "tokens included: in a causal LM this leaks the future and lowers the loss for the wrong "
                          "reason; do not compare its loss with token-choice runs", stacklevel=2)
        self.parallel: TrainParallel | None = None
        if wants_parallel(t.expert_parallel):
            if moe is None and t.expert_parallel > 1:
                raise ValueError(f"--ep {t.expert_parallel} shards MoE experts, but this model is dense (model.moe is "
                                 "null); train it data parallel with --ep 1, or pick an MoE preset")
            if moe is not None and moe.max_devices_per_token is not None \
                    and t.expert_parallel % moe.expert_devices:
                raise ValueError(f"model.moe.max_devices_per_token={moe.max_devices_per_token} limits each token to a "
                                 f"few of model.moe.expert_devices={moe.expert_devices} expert blocks, but --ep "
                                 f"{t.expert_parallel} does not split into {moe.expert_devices} groups of ranks; set "
                                 f"--set model.moe.expert_devices={t.expert_parallel} (one block per rank) or to the "
                                 "number of nodes (node-limited routing)")
            self.parallel = TrainParallel.start(t.expert_parallel, resolve_device(t.device).type,
                                                moe.num_local_experts if moe is not None else None)
        main = self.parallel is None or self.parallel.is_main
        init_model, init_tokenizer = None, None
        if t.init_from is not None and not resume:  # before the run directory is touched: errors lose nothing
            init_model = _model_from_checkpoint(run.model, t.init_from)
            init_tokenizer = build_tokenizer(t)
            if init_tokenizer.vocab_size > run.model.vocab_size:
                raise ValueError(f"train.init_from={t.init_from!r}: its tokenizer.json has ids up to "
                                 f"{init_tokenizer.vocab_size - 1}, but the model's embedding has only "
                                 f"{run.model.vocab_size} rows (vocab_size); the tokenizer does not belong to this "
                                 "model: copy the base model's tokenizer files into the folder")
        if resume:
            if not (self.run_dir / "config.json").is_file():
                raise FileNotFoundError(f"cannot resume: {self.run_dir} has no config.json; pass a run directory "
                                        "written by `moekit train`")
        occupied = not resume and self.run_dir.exists() and any(self.run_dir.iterdir())
        if occupied and not overwrite:
            raise FileExistsError(f"{self.run_dir} already exists and is not empty; pass --overwrite to replace "
                                  "it, --resume to continue it, or --out to choose another directory")
        self._barrier()  # every rank has looked before rank 0 changes anything
        if main:
            if occupied:
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(t.seed)
        self.device = resolve_device(t.device)
        if self.parallel is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.amp_dtype = autocast_dtype(t.dtype, self.device)
        # rank 0 writes the tokenizer and the token cache; the other ranks then read what it wrote
        if main:
            self.tokenizer = self._tokenizer(resume, init_tokenizer)
        self._barrier()
        if not main:
            self.tokenizer = load_tokenizer(self.run_dir / "tokenizer")
        if main:
            self.dataset = self._dataset()
        self._barrier()
        if not main:
            self.dataset = self._dataset()
        if run.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.tokenizer.vocab_size}; set --set model.vocab_size={self.tokenizer.vocab_size}")
        self.model = (init_model if init_model is not None else MoETransformer(run.model)).to(self.device)
        self.num_parameters = (self.model.num_parameters(), self.model.num_parameters(active=True))
        # under torchrun: this rank's slice of the experts, the rest wrapped in DDP (every rank built the same model)
        self.forward_model = self.model if self.parallel is None else self.parallel.wrap(self.model, self.device)
        self.optimizer = build_optimizer(self.model, run)
        names = {id(p): name for name, p in self.model.named_parameters()}
        self._param_names = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
        self.sampler = BatchSampler(self.dataset.train, t.batch_size, t.block_size, seed=t.seed)
        self.step, self.tokens = 0, 0
        self._tensorboard = _tensorboard_writer(self.run_dir / "tensorboard") if main else None
        if resume:
            self._restore()
        elif main:
            (self.run_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")

    def _dataset(self) -> TokenDataset:
        t = self.run.train
        return TokenDataset.build(t.data, self.tokenizer, self.run_dir / "data", val_fraction=t.val_fraction,
                                  block_size=t.block_size)

    def _barrier(self) -> None:
        if self.parallel is not None:
            self.parallel.barrier()

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and reports (the only one without torchrun)."""
        return self.parallel is None or self.parallel.is_main

    # ------------------------------------------------------------------ setup helpers
    def _tokenizer(self, resume: bool, tokenizer=None):
        tok_dir = self.run_dir / "tokenizer"
        if resume and tok_dir.exists():
            return load_tokenizer(tok_dir)
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(self.run.train)
        tokenizer.save(tok_dir)
        return tokenizer

    def _state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "step": self.step,
            "tokens": self.tokens,
            "param_names": self._param_names,
        }

    def _restore(self) -> None:
        if self.parallel is None:
            state, _ = ckpt.load_checkpoint(self.run_dir, self.model, self._hashed_config())
        else:
            state, _ = ckpt.load_training_state(self.run_dir, self.model, self._hashed_config(), self.parallel.rank,
                                                self.parallel.world_size, self.parallel.expert_slices,
                                                self._param_names)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.tokens = state["step"], state["tokens"]

    def _hashed_config(self) -> dict[str, Any]:
        """What the checkpoint's config hash covers: the model, and the checkpoint it started from if any."""
        config = self.run.model.to_dict()
        moe = config.get("moe")
        if moe is not None and moe.get("max_devices_per_token") is None and moe.get("expert_devices") == 1:
            del moe["max_devices_per_token"], moe["expert_devices"]  # their defaults: runs saved before them resume
        if self.run.train.init_from is not None:  # absent otherwise, so older checkpoints still resume
            config["init_from"] = self.run.train.init_from
        return config

    def save(self) -> Path:
        """Write an atomic checkpoint of everything needed to continue exactly (under torchrun: every rank)."""
        meta = {"step": self.step, "tokens": self.tokens, "name": self.run.name}
        if self.parallel is None:
            return ckpt.save_checkpoint(self.run_dir, self.model, self._hashed_config(), self._state(), meta)
        return ckpt.save_sharded_checkpoint(self.run_dir, self.model, self._hashed_config(), self._state(), meta,
                                            expert_slices=self.parallel.expert_slices, barrier=self.parallel.barrier,
                                            **self.parallel.layout())

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _sync(self, last_micro_batch: bool):
        """DDP reduces the dense gradients only after a step's last micro-batch."""
        if self.parallel is None:
            return contextlib.nullcontext()
        return self.parallel.no_sync(last_micro_batch)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean val loss over `eval_batches` fixed batches, perplexity and expert load on val."""
        t = self.run.train
        self.model.eval()
        losses, loads = [], {}
        for inputs, targets in iter_eval_batches(self.dataset.val, t.batch_size, t.block_size, t.eval_batches):
            with self._autocast():
                out = self.model(inputs.to(self.device), targets=targets.to(self.device))
            losses.append(float(out.loss))
            for i, s in out.moe_stats.items():
                loads[i] = loads.get(i, 0) + s["tokens_per_expert"].float().cpu()
        self.model.train()
        val_loss = sum(losses) / len(losses)
        record: dict[str, Any] = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if loads:
            vios = [float((v.max() - v.mean()) / v.mean()) if v.mean() > 0 else 0.0 for v in loads.values()]
            record["val_max_violation"] = sum(vios) / len(vios)
            record["val_load"] = {str(i): v.tolist() for i, v in loads.items()}
        return record

    # ------------------------------------------------------------------ the loop
    def train(self, stop_at: int | None = None) -> TrainResult:
        """Train until `max_steps` (or stop early at step `stop_at`, schedule unchanged, with a checkpoint).

        Ctrl-C writes a checkpoint before returning; `--resume` continues either exactly.
        """
        t = self.run.train
        last = min(t.max_steps, stop_at) if stop_at is not None else t.max_steps
        bar = _progress(self.progress and self.is_main, t.max_steps, self.step)
        world = 1 if self.parallel is None else self.parallel.world_size
        val_loss = None
        mid_step, step_start = False, None
        self.model.train()
        try:
            while self.step < last:
                started = time.perf_counter()
                # where this step starts: an interrupt mid-step rewinds here so the resume is exact
                step_start = (self.sampler.state_dict(), torch.get_rng_state())
                mid_step = True
                loss_sum, aux_sum, exchanged, last_stats = 0.0, 0.0, 0.0, {}
                for micro in range(t.grad_accum):
                    if self.parallel is None:
                        inputs, targets = self.sampler.next_batch()
                    else:  # every rank draws the same batches and keeps every world_size-th one
                        inputs, targets = self.parallel.next_batch(self.sampler)
                    inputs, targets = inputs.to(self.device), targets.to(self.device)
                    with self._sync(micro == t.grad_accum - 1):
                        with self._autocast():
                            out = self.forward_model(inputs, targets=targets)
                        ((out.loss + out.aux_loss) / t.grad_accum).backward()
                    loss_sum += float(out.loss.detach()) / t.grad_accum
                    aux_sum += float(out.aux_loss.detach()) / t.grad_accum
                    exchanged += sum(float(s.get("all_to_all_bytes", 0.0)) for s in out.moe_stats.values())
                    last_stats = out.moe_stats
                if self.parallel is None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                else:  # experts reduced over their replicas, one norm over the whole model
                    grad_norm = self.parallel.finish_gradients(t.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.parallel is None:
                    update_aux_free_biases(self.model)
                else:
                    self.parallel.update_router_biases(self.model)
                self.step += 1
                step_tokens = t.grad_accum * t.batch_size * t.block_size * world
                self.tokens += step_tokens
                mid_step = False
                tokens_per_s = step_tokens / max(time.perf_counter() - started, 1e-9)
                logging = self.step % t.log_interval == 0 or self.step == 1
                if logging and self.parallel is not None:  # the same steps on every rank: collectives line up
                    loss_sum, aux_sum, exchanged = self.parallel.mean(loss_sum, aux_sum, exchanged)
                    exchanged *= world
                    last_stats = self.parallel.summarise(last_stats)
                summary = _moe_summary(last_stats, with_load=logging) if logging or bar is not None else {}
                if logging:
                    origin = {"init_from": t.init_from} if self.step == 1 and t.init_from is not None else {}
                    parallel = {} if self.parallel is None else {"world_size": world,
                                                                 "all_to_all_bytes": exchanged}
                    self._log({"kind": "train", "step": self.step, "tokens": self.tokens, "loss": loss_sum,
                               "aux_loss": aux_sum, "lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s, **summary, **origin,
                               **parallel})
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    record = self.evaluate()
                    val_loss = record["val_loss"]
                    self._log({"kind": "eval", "step": self.step, "tokens": self.tokens, **record})
                if self.step % t.checkpoint_interval == 0 or self.step == last:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                    maxvio=f"{summary.get('max_violation', 0.0):.2f}")
        except KeyboardInterrupt:
            if mid_step:
                self.sampler.load_state_dict(step_start[0])
                torch.set_rng_state(step_start[1])
            self.optimizer.zero_grad(set_to_none=True)
            self.save()
            if bar is not None:
                bar.close()
            return TrainResult(self.run_dir, self.step, self.tokens, val_loss, interrupted=True)
        if bar is not None:
            bar.close()
        return TrainResult(self.run_dir, self.step, self.tokens, val_loss)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _tensorboard_writer(path: Path):
    """A TensorBoard SummaryWriter when the `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
