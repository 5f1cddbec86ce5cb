"""The trainer: AdamW, warmup + cosine, clipping, accumulation, autocast, eval, balancer hooks, JSONL metrics,
progress, checkpoints, exact resume, and the guarantees that keep a run from losing data or going silently wrong.

How a run is set up (`Trainer.__init__`): everything that can fail on bad input (the config, `train.init_from`,
the corpus, the tokenizer, the split sizes) is checked in memory first; only then is the run directory created
(or an old run set aside for `--overwrite`), locked, and its config, tokenizer and token cache written. A failure
while writing removes the new directory and puts the old run back.

How a step ends (`Trainer.train`): signals (Ctrl-C, SIGTERM) are taken only between whole steps
(`moekit.train.interrupts`); a non-finite loss or gradient norm skips the step within `train.max_skipped_steps`,
else stops training with `NonFiniteTraining` and no checkpoint of it; a checkpoint is never written from
non-finite weights or optimiser state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import (
    append_line,
    fsync_dir,
    overlapping_input,
    read_json_lines,
    remove_stale_temps,
    storage_faults,
    temp_sibling,
    write_json,
    write_json_lines,
)
from ..layer import MoELayer
from ..model import MoETransformer
from . import checkpoint as ckpt
from . import rundir
from .config import RunConfig
from .data import BatchSampler, TokenDataset, iter_eval_batches
from .device import autocast_dtype, resolve_device
from .errors import NonFiniteTraining
from .freeze import apply_freezing
from .init_from import _model_from_checkpoint, build_model
from .interrupts import StopSignals
from .optim import build_optimizer
from .parallel import LocalParallel, TrainParallel, wants_parallel
from .resume import check_resume_changes, hashed_model_dict, lr_factor, planned_total, resume_changes
from .tokenizers import build_tokenizer, load_tokenizer

__all__ = ["TrainResult", "Trainer"]


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    interrupted: bool = False
    forced: bool = False  # a repeated signal stopped it at once: `step` is the last checkpoint's, not the last run


def discard_router_loads(model: torch.nn.Module) -> None:
    """Forget the router counts gathered since the last selection-bias update (moekit's or transformers' model)."""
    if hasattr(model, "discard_router_loads"):
        model.discard_router_loads()
        return
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.load_since_update.zero_()


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


def _check_router_use(run: RunConfig) -> None:
    if run.uses_transformers:
        return
    moe = run.model.moe
    if moe is not None and moe.router == "soft" and not run.allow_token_mixing:
        raise ValueError("router='soft' mixes every token of a sequence, future ones included, so a causal LM "
                         "trained with it sees the future and its loss is not comparable; set "
                         "allow_token_mixing: true (or --set allow_token_mixing=true) to train it anyway")
    if moe is not None and moe.router == "expert_choice":
        warnings.warn("router='expert_choice' lets each expert pick tokens across the whole batch, future "
                      "tokens included: in a causal LM this leaks the future and lowers the loss for the wrong "
                      "reason; do not compare its loss with token-choice runs", stacklevel=3)


def _start_parallel(run: RunConfig) -> LocalParallel | TrainParallel:
    t = run.train
    if not wants_parallel(t.expert_parallel):
        return LocalParallel()
    if run.uses_transformers:
        raise ValueError("train.backend='transformers' trains transformers' own class in one process; run it without "
                         "torchrun and --ep (moekit's expert and data parallelism need moekit's model)")
    moe = run.model.moe
    if moe is None and t.expert_parallel > 1:
        raise ValueError(f"--ep {t.expert_parallel} shards MoE experts, but this model is dense (model.moe is "
                         "null); train it data parallel with --ep 1, or pick an MoE preset")
    if moe is not None and moe.max_devices_per_token is not None and t.expert_parallel % moe.expert_devices:
        raise ValueError(f"model.moe.max_devices_per_token={moe.max_devices_per_token} limits each token to a "
                         f"few of model.moe.expert_devices={moe.expert_devices} expert blocks, but --ep "
                         f"{t.expert_parallel} does not split into {moe.expert_devices} groups of ranks; set "
                         f"--set model.moe.expert_devices={t.expert_parallel} (one block per rank) or to the "
                         "number of nodes (node-limited routing)")
    return TrainParallel.start(t.expert_parallel, resolve_device(t.device).type,
                               moe.num_local_experts if moe is not None else None, timeout_s=t.collective_timeout_s)


class Trainer:
    """Trains a `MoETransformer` described by a `RunConfig` into `run_dir`.

    With `train.init_from` set, a new run starts from that Hugging Face checkpoint's weights and tokenizer (its
    model section must be the checkpoint's: see :func:`init_from_values`); a resumed run reads only its own
    checkpoint, never the folder again.

    `resume=True` continues the run in `run_dir`; `run` may differ from its config.json only where
    `moekit.train.resume` says a resume can honour it (`extend_schedule=True` allows a longer `max_steps`).
    `read_only=True` opens a run for evaluation: weights only, no lock, nothing written.

    Launched by torchrun on several processes, every rank runs a Trainer: the experts are split over
    `train.expert_parallel` ranks and the rest is data parallel (`moekit.train.parallel`); `batch_size` is per
    rank, and rank 0 writes the logs. Checkpoints are saved per rank and resume at any layout.
    """

    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, *, extend_schedule: bool = False, read_only: bool = False) -> None:
        self.run, self.run_dir, self.progress = run, Path(run_dir), progress
        self.read_only = read_only
        _check_router_use(run)
        self.parallel = _start_parallel(run)
        self._lock = rundir.RunLock(self.run_dir)
        self._saved_step: int | None = None
        self._history_entry: dict[str, Any] | None = None
        self._overwrite = overwrite
        try:
            if resume:
                self._open_existing(extend_schedule)
            self._build(resume)
        except BaseException:
            self._lock.release()
            raise

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and reports (the only one without torchrun)."""
        return self.parallel.is_main

    # ------------------------------------------------------------------ opening a run
    def _open_existing(self, extend_schedule: bool) -> None:
        """Check what a resume asks for against config.json and the checkpoint, before anything is written."""
        stored = rundir.read_run_config(self.run_dir, "evaluate" if self.read_only else "resume")
        self._on_rank_0(lambda: None if self.read_only else self._lock.acquire())
        self.tokenizer = load_tokenizer(self.run_dir / "tokenizer")
        if self.read_only:
            return
        with warnings.catch_warnings():  # a fallback to an older checkpoint is reported once, when it loads
            warnings.simplefilter("ignore")
            meta = ckpt.read_meta(ckpt.find_checkpoint(self.run_dir, need="all"))
        # as moekit reads it now: fields added since the run started take their defaults, not "a change"
        stored = RunConfig.from_dict(stored).to_dict()
        changes = resume_changes(stored, self.run.to_dict())
        saved_world = (meta.get("layout") or {}).get("world_size", 1)
        saved_accum = (stored.get("train") or {}).get("grad_accum", 1)
        check_resume_changes(changes, meta["step"], extend_schedule,
                             grad_accum=(saved_accum, self.run.train.grad_accum),
                             world_size=(saved_world, self.parallel.world_size))
        self.parallel.barrier()  # every rank has read config.json before rank 0 records the change in it
        if changes:
            self._history_entry = {"step": meta["step"], "changed": {k: list(v) for k, v in changes.items()}}
            self.run.history = [*self.run.history, self._history_entry]
            if self.is_main:
                write_json(self.run_dir / "config.json", self.run.to_dict(), what="run config")

    def _on_rank_0(self, work) -> Any:
        """Run `work` on rank 0 only; every rank raises if it failed (so none waits for a rank that gave up)."""
        error: BaseException | None = None
        result = None
        if self.is_main:
            try:
                result = work()
            except BaseException as caught:
                error = caught
        if not self.parallel.all_ok(error is None):
            raise error if error is not None else RuntimeError(
                f"rank 0 could not open the run directory {self.run_dir}; its error is in its log")
        return result

    def _create_new(self, overwrite: bool) -> None:
        """A new run: refuse an occupied directory unless it is a moekit run that --overwrite may replace."""
        t = self.run.train
        source = overlapping_input(self.run_dir, [t.data, t.init_from])
        if source is not None:
            raise ValueError(f"the run directory {self.run_dir} overlaps the run's own input {source} (train.data or "
                             "train.init_from): the run would write into what it reads, or --overwrite delete it; "
                             "choose another --out")
        remove_stale_temps(self.run_dir)  # a run set aside by a killed --overwrite comes back first
        self._occupied = self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir()))
        if self._occupied and not overwrite:
            raise FileExistsError(f"{self.run_dir} already exists and is not empty; pass --overwrite to replace "
                                  "it, --resume to continue it, or --out to choose another directory")
        if self._occupied:
            rundir.check_replaceable(self.run_dir)

    def _build(self, resume: bool) -> None:
        """Inputs checked in memory, then (new runs) the directory written, then the model and optimiser."""
        t = self.run.train
        init_model = None
        if resume:
            self.dataset = self._dataset(write=not self.read_only)
        else:  # rank 0 checks and writes; the other ranks wait for its verdict, then read what it wrote
            init_model = self._on_rank_0(self._set_up_new_run)
            if not self.is_main:
                self.tokenizer = load_tokenizer(self.run_dir / "tokenizer")
                self.dataset = self._dataset(write=True)  # the cache rank 0 wrote: verified and reused
                if t.init_from is not None:
                    init_model = _model_from_checkpoint(self.run.model, t.init_from)
        self._check_vocabulary()

        torch.manual_seed(t.seed)
        self.device = resolve_device(t.device)
        if self.parallel.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.amp_dtype = autocast_dtype(t.dtype, self.device)
        self.model = (init_model if init_model is not None else build_model(self.run.model)).to(self.device)
        self.num_parameters = (self.model.num_parameters(), self.model.num_parameters(active=True))
        self.frozen = apply_freezing(self.model, t)
        self.num_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        # under torchrun: this rank's slice of the experts, the rest wrapped in DDP (every rank built the same model)
        self.forward_model = self.parallel.wrap(self.model, self.device)
        self.optimizer = build_optimizer(self.model, self.run)
        names = {id(p): name for name, p in self.model.named_parameters()}
        self._param_names = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.sampler = BatchSampler(self.dataset.train, t.batch_size, t.block_size, seed=t.seed,
                                    label_shift=self.dataset.label_shift)
        self.step, self.tokens, self.wall_s, self.skipped_steps = 0, 0, 0.0, []
        self._tensorboard = _tensorboard_writer(self.run_dir / "tensorboard") \
            if self.is_main and not self.read_only else None
        if resume:
            self._restore()

    def _check_vocabulary(self) -> None:
        vocab = self.tokenizer.vocab_size
        if self.run.model.vocab_size < vocab:
            if self.run.train.init_from is not None:
                raise ValueError(f"train.init_from={self.run.train.init_from!r}: its tokenizer.json has ids up to "
                                 f"{vocab - 1}, but the model's embedding has only {self.run.model.vocab_size} rows "
                                 "(vocab_size); the tokenizer does not belong to this model: copy the base model's "
                                 "tokenizer files into the folder")
            raise ValueError(f"model.vocab_size={self.run.model.vocab_size} is smaller than the tokenizer's "
                             f"{vocab}; set --set model.vocab_size={vocab}")

    def _prepare(self, reuse: bool = True):
        """The corpus read, checked and (unless its cache is valid) tokenised in memory; nothing written."""
        t = self.run.train
        prepared = TokenDataset.prepare(t.data, self.tokenizer, self.run_dir / "data", val_fraction=t.val_fraction,
                                        block_size=t.block_size, reuse=reuse)
        self.corpus_sha256 = prepared.source_sha256
        return prepared

    def _dataset(self, write: bool) -> TokenDataset:
        prepared = self._prepare()
        return prepared.write() if write else prepared.in_memory()

    def _set_up_new_run(self) -> MoETransformer | None:
        """Check every input in memory, then create (or replace) the run directory and write its first files.

        A failure while writing removes the new directory and puts a replaced run back.
        """
        t = self.run.train
        self._create_new(self._overwrite)
        init_model = _model_from_checkpoint(self.run.model, t.init_from) if t.init_from is not None else None
        if t.freeze_router or t.train_only_router or t.freeze:  # a pattern that matches nothing: refused now
            if init_model is not None:
                apply_freezing(init_model, t)
            else:
                with torch.device("meta"):
                    apply_freezing(build_model(self.run.model), t)
        self.tokenizer = build_tokenizer(t)
        self._check_vocabulary()
        prepared = self._prepare(reuse=not self._occupied)
        # the directory is assembled under a temporary name and renamed into place with its first files, so a
        # kill at any moment leaves either no run or a run with its config, tokenizer and token cache
        building = temp_sibling(self.run_dir)
        aside = None
        try:
            with storage_faults("run directory", self.run_dir):
                self.run_dir.parent.mkdir(parents=True, exist_ok=True)
                building.mkdir()
                write_json(building / "config.json", self.run.to_dict(), what="run config")
                self.tokenizer.save(building / "tokenizer")
                self.dataset = prepared.write(building / "data")
                fsync_dir(building)
                aside = rundir.set_aside(self.run_dir) if self._occupied else None
                os.replace(building, self.run_dir)
                fsync_dir(self.run_dir.parent)
                self._lock.acquire()
        except BaseException:
            self._lock.release()
            shutil.rmtree(building, ignore_errors=True)
            if aside is not None:
                rundir.restore(aside, self.run_dir)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return init_model

    # ------------------------------------------------------------------ state
    def _lr_factor(self, step: int) -> float:
        t = self.run.train
        return lr_factor(step, t.warmup_steps, planned_total(step, t.max_steps, self.run.history), t.min_lr_ratio)

    def _state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "step": self.step,
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "skipped_steps": list(self.skipped_steps),
            "param_names": self._param_names,
        }

    def _restore(self) -> None:
        if self.read_only:
            path = ckpt.find_checkpoint(self.run_dir, need="weights")
            ckpt.load_weights(path, self.model)
            self.step = ckpt.read_meta(path)["step"]
            return
        state, meta = self.parallel.load_training_state(self.run_dir, self.model, self._hashed_config(),
                                                        self._param_names)
        recorded = meta.get("corpus_sha256")
        if recorded is not None and recorded != self.corpus_sha256:
            raise ValueError(f"cannot resume {self.run_dir}: the corpus (train.data={self.run.train.data!r}) changed "
                             "since the run started (its sha256 differs); resume with the same text, or start a new "
                             "run")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.wall_s, self.skipped_steps = float(state.get("wall_s", 0.0)), list(state.get("skipped_steps", []))
        self._saved_step = self.step
        if self.is_main:
            self._trim_metrics()
            if self._history_entry is not None:
                self._log({"kind": "resume", "step": self.step, "changed": self._history_entry["changed"]})

    def _trim_metrics(self) -> None:
        """Drop log records of steps after the checkpoint (they are trained again), so no step appears twice."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        records = read_json_lines(path)
        kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= self.step]
        if len(kept) != len(records) or path.read_bytes()[-1:] not in (b"", b"\n"):
            write_json_lines(path, kept)

    def _hashed_config(self) -> dict[str, Any]:
        """What the checkpoint's config hash covers: the model, and the checkpoint it started from if any."""
        config = hashed_model_dict(self.run.model.to_dict())  # later fields at their defaults: older runs resume
        if self.run.train.init_from is not None:  # absent otherwise, so older checkpoints still resume
            config["init_from"] = self.run.train.init_from
        return config

    def _nonfinite_state(self) -> str | None:
        """The first weight or optimiser moment that is not finite, or None."""
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"weight {name}"
        for index, moments in self.optimizer.state.items():
            for key, value in moments.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0 \
                        and not bool(torch.isfinite(value).all()):
                    return f"optimiser {key} of {self._param_names[self._param_index(index)]}"
        return None

    def _param_index(self, param: Any) -> int:
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        return next((i for i, p in enumerate(flat) if p is param), 0)

    def save(self) -> Path:
        """Write an atomic checkpoint of everything needed to continue exactly (under torchrun: every rank).

        Refuses (NonFiniteTraining) to write weights or optimiser state that are not finite.
        """
        bad = self._nonfinite_state()
        (bad_any,) = self.parallel.agree(bad is not None)
        if bad_any:
            raise NonFiniteTraining(self._nonfinite_message(f"the {bad or 'state of another rank'} is not finite "
                                                            f"after step {self.step}"))
        meta = {"step": self.step, "tokens": self.tokens, "name": self.run.name, "corpus_sha256": self.corpus_sha256}
        path = self.parallel.save_checkpoint(self.run_dir, self.model, self._hashed_config(), self._state(), meta,
                                             keep=self.run.train.keep_checkpoints)
        self._saved_step = self.step
        return path

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        append_line(self.run_dir / "metrics.jsonl", json.dumps(record), what="training log")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"moekit train: {message}", file=sys.stderr, flush=True)

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
        for inputs, targets in iter_eval_batches(self.dataset.val, t.batch_size, t.block_size, t.eval_batches,
                                                 self.dataset.label_shift):
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

        Ctrl-C or SIGTERM stops after the step in progress, with a checkpoint of it; `--resume` continues
        exactly. A second one stops at once (one process only), leaving the last checkpoint.
        """
        if self.read_only:
            raise RuntimeError("this Trainer was opened read_only (for evaluation); it cannot train")
        t = self.run.train
        last = min(t.max_steps, stop_at) if stop_at is not None else t.max_steps
        bar = _progress(self.progress and self.is_main, t.max_steps, self.step)
        self._val_loss: float | None = None
        self._session_start, self._wall_before = time.perf_counter(), self.wall_s
        if self.is_main:
            self._lock.acquire()
        self.model.train()
        try:
            with StopSignals(force_on_repeat=not self.parallel.distributed) as signals:
                while self.step < last:
                    try:
                        stop = self._train_step(signals, bar)
                        self._after_step(last, bar)
                        # one process needs no agreement: a signal that came after the check inside the step
                        # still stops after this step (under torchrun it is agreed on at the next one)
                        stop = stop or (not self.parallel.distributed and signals.requested is not None)
                    except RuntimeError as error:
                        lost = self.parallel.peer_lost(error, self.step, self._saved_step)
                        if lost is None:
                            raise
                        raise lost from error
                    if stop:
                        if self._saved_step != self.step:
                            self.save()
                        self._say(f"{signals.requested}: stopped after step {self.step}, checkpoint written; "
                                  f"continue with --resume {self.run_dir}")
                        return TrainResult(self.run_dir, self.step, self.tokens, self._val_loss, interrupted=True)
        except KeyboardInterrupt:
            last_saved = self._saved_step or 0
            self._say(f"stopped at once during step {self.step + 1}; the last checkpoint "
                      f"({'step ' + str(last_saved) if self._saved_step else 'none yet'}) stands")
            return TrainResult(self.run_dir, last_saved, self.tokens, self._val_loss, interrupted=True, forced=True)
        finally:
            if bar is not None:
                bar.close()
            self._lock.release()
        return TrainResult(self.run_dir, self.step, self.tokens, self._val_loss)

    def _train_step(self, signals: StopSignals, bar) -> bool:
        """One whole step (all micro-batches, the update, the balancing hook); returns whether to stop after it."""
        t = self.run.train
        started = time.perf_counter()
        loss_sum, aux_sum, exchanged, last_stats = 0.0, 0.0, 0.0, {}
        for micro in range(t.grad_accum):
            inputs, targets = self.parallel.next_batch(self.sampler)  # under torchrun: this rank's share
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.parallel.no_sync(micro == t.grad_accum - 1):  # DDP reduces after the last micro-batch
                with self._autocast():
                    out = self.forward_model(inputs, targets=targets)
                ((out.loss + out.aux_loss) / t.grad_accum).backward()
            loss_sum += float(out.loss.detach()) / t.grad_accum
            aux_sum += float(out.aux_loss.detach()) / t.grad_accum
            exchanged += sum(float(s.get("all_to_all_bytes", 0.0)) for s in out.moe_stats.values())
            last_stats = out.moe_stats
        grad_norm = float(self.parallel.finish_gradients(self.model, t.grad_clip))
        bad = next((f"{name} is {value}" for name, value in (("the loss", loss_sum), ("the aux loss", aux_sum),
                                                              ("the gradient norm", grad_norm))
                    if not math.isfinite(value)), None)
        bad_any, stop = self.parallel.agree(bad is not None, signals.requested is not None)
        if bad_any:
            self._skip_step(bad or "a non-finite value on another rank")
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.parallel.update_router_biases(self.model)
        self.step += 1
        world = self.parallel.world_size
        step_tokens = t.grad_accum * t.batch_size * t.block_size * world
        self.tokens += step_tokens
        self.wall_s = self._wall_before + (time.perf_counter() - self._session_start)
        self._last = {"loss": loss_sum, "aux": aux_sum, "exchanged": exchanged, "stats": last_stats,
                      "grad_norm": grad_norm, "tokens_per_s": step_tokens / max(time.perf_counter() - started, 1e-9),
                      "skipped": bad_any}
        return stop

    def _skip_step(self, what: str) -> None:
        """No update for a step with a non-finite value: within the budget, skip it; else stop with an error."""
        t = self.run.train
        self.optimizer.zero_grad(set_to_none=True)
        discard_router_loads(self.model)  # the bad step's router counts must not move the selection bias
        if len(self.skipped_steps) >= t.max_skipped_steps:
            raise NonFiniteTraining(self._nonfinite_message(f"at step {self.step + 1} {what}"))
        self.skipped_steps.append(self.step + 1)
        self.scheduler.step()  # the schedule stays aligned with the step count
        self._log({"kind": "skip", "step": self.step + 1, "reason": what})
        self._say(f"step {self.step + 1} skipped: {what} (skipped {len(self.skipped_steps)} of at most "
                  f"{t.max_skipped_steps}, train.max_skipped_steps)")

    def _nonfinite_message(self, what: str) -> str:
        t = self.run.train
        kept = (f"the last checkpoint (step {self._saved_step}) is kept in {self.run_dir}" if self._saved_step
                else "no checkpoint had been written yet")
        return (f"training stopped: {what}; nothing of this step was saved, {kept}. The run diverged: try a lower "
                f"train.lr (now {t.lr:g}), a smaller train.grad_clip (now {t.grad_clip:g}), more "
                f"train.warmup_steps (now {t.warmup_steps}), train.dtype=float32, or let a few bad steps be "
                f"skipped with train.max_skipped_steps=N (now {t.max_skipped_steps})")

    def _after_step(self, last: int, bar) -> None:
        """Log, evaluate and checkpoint as the intervals say, and move the progress bar."""
        t, info, world = self.run.train, self._last, self.parallel.world_size
        logging = (self.step % t.log_interval == 0 or self.step == 1) and not info["skipped"]
        loss, aux, exchanged, stats = info["loss"], info["aux"], info["exchanged"], info["stats"]
        if logging and self.parallel.distributed:  # the same steps on every rank: collectives line up
            loss, aux, exchanged = self.parallel.mean(loss, aux, exchanged)
            exchanged *= world
            stats = self.parallel.summarise(stats)
        summary = _moe_summary(stats, with_load=logging) if logging or bar is not None else {}
        if logging:
            origin = {"init_from": t.init_from} if self.step == 1 and t.init_from is not None else {}
            parallel = {"world_size": world, "all_to_all_bytes": exchanged} if self.parallel.distributed else {}
            self._log({"kind": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "aux_loss": aux,
                       "lr": self.scheduler.get_last_lr()[0], "grad_norm": info["grad_norm"],
                       "tokens_per_s": info["tokens_per_s"], "elapsed_s": self.wall_s, **summary, **origin,
                       **parallel})
        if self.step % t.eval_interval == 0 or self.step == t.max_steps:
            record = self.evaluate()
            self._val_loss = record["val_loss"]
            self._log({"kind": "eval", "step": self.step, "tokens": self.tokens, **record})
        if self.step % t.checkpoint_interval == 0 or self.step == last:
            self.save()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{info['tokens_per_s']:,.0f}",
                            maxvio=f"{summary.get('max_violation', 0.0):.2f}")


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
