"""The trainer: AdamW, warmup + cosine, clipping, accumulation, autocast, balancer hooks and exact resume, with the
guarantees that keep a run from losing data or going silently wrong.

`Trainer.__init__` sets the run up (`moekit.train.setup`), then builds the model, optimiser, schedule and sampler.
`Trainer.train` is a short loop: `train_step` makes one whole optimiser step and reports a `StepRecord`; the
`MetricsLogger` (`moekit.train.metrics`) logs it, the `CheckpointPolicy` (`moekit.train.policy`) says when to
evaluate (`moekit.train.evaluator`), save, and write a weights-only snapshot (`moekit.train.snapshots`). How many
processes train is the parallel object's business (`moekit.train.parallel`): the loop reads the same with one
process or many.

How a step ends: signals (Ctrl-C, SIGTERM) are taken only between whole steps (`moekit.train.interrupts`); a
non-finite loss or gradient norm skips the step within `train.max_skipped_steps`, else stops training with
`NonFiniteTraining` and no checkpoint of it; a checkpoint is never written from non-finite weights or optimiser
state.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import rundir
from .config import RunConfig
from .data import BatchSampler
from .device import autocast_dtype, resolve_device
from .errors import NonFiniteTraining
from .evaluator import Evaluator
from .finite import discard_router_loads, diverged_message, nonfinite_state, nonfinite_step_value
from .freeze import apply_freezing
from .init_from import build_model
from .interrupts import StopSignals
from .metrics import MetricsLogger, StepRecord
from .optim import build_optimizer
from .parallel import start_parallel
from .policy import CheckpointPolicy
from .resume import lr_factor, planned_total
from .setup import RunInputs, RunSetup, check_router_use
from .snapshots import save_snapshot

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
        self.run, self.run_dir, self.read_only = run, Path(run_dir), read_only
        check_router_use(run)
        self.parallel = start_parallel(run)
        self._lock = rundir.RunLock(self.run_dir, enabled=self.parallel.is_main)  # rank 0 holds it for all
        self._saved_step: int | None = None
        try:
            setup = RunSetup(run, self.run_dir, self.parallel, self._lock)
            inputs = setup.open_existing(extend_schedule, read_only) if resume else setup.create_new(overwrite)
            self._build(inputs)
            self.metrics = MetricsLogger(self.run_dir, self.parallel, progress=progress, tensorboard=not read_only,
                                         init_from=run.train.init_from)
            if resume:
                self._restore(inputs.history_entry)
        except BaseException:
            self._lock.release()
            raise

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and reports (the only one without torchrun)."""
        return self.parallel.is_main

    def _build(self, inputs: RunInputs) -> None:
        """The model (on this rank's device, wrapped for torchrun), optimiser, schedule, sampler and evaluator."""
        t = self.run.train
        self.tokenizer, self.dataset, self.corpus_sha256 = inputs.tokenizer, inputs.dataset, inputs.corpus_sha256
        torch.manual_seed(t.seed)
        self.device = self.parallel.device_for(resolve_device(t.device))
        self.amp_dtype = autocast_dtype(t.dtype, self.device)
        model = inputs.init_model if inputs.init_model is not None else build_model(self.run.model)
        self.model = model.to(self.device)
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
        self.evaluator = Evaluator(self.model, self.dataset, t.batch_size, t.block_size, t.eval_batches, self.device,
                                   self._autocast)
        self.step, self.tokens, self.wall_s, self.skipped_steps = 0, 0, 0.0, []

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

    def _restore(self, history_entry: dict[str, Any] | None) -> None:
        """The checkpoint's weights (and, unless read-only, the whole training state) back in place."""
        if self.read_only:
            path = ckpt.find_checkpoint(self.run_dir, need="weights")
            ckpt.load_weights(path, self.model)
            self.step = ckpt.read_meta(path)["step"]
            return
        state, meta = self.parallel.load_training_state(self.run_dir, self.model, self._hashed_config(),
                                                        self._param_names)
        if meta["corpus_sha256"] != self.corpus_sha256:
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
        self.wall_s, self.skipped_steps = float(state["wall_s"]), list(state["skipped_steps"])
        self._saved_step = self.step
        self.metrics.trim_after(self.step)
        if history_entry is not None:
            self.metrics.log({"kind": "resume", "step": self.step, "changed": history_entry["changed"]})

    def _hashed_config(self) -> dict[str, Any]:
        """What the checkpoint's config hash covers: the model, and the checkpoint it started from."""
        return {**self.run.model.to_dict(), "init_from": self.run.train.init_from}

    def save(self) -> Path:
        """Write an atomic checkpoint of everything needed to continue exactly (under torchrun: every rank).

        Refuses (NonFiniteTraining) to write weights or optimiser state that are not finite.
        """
        bad = nonfinite_state(self.model, self.optimizer, self._param_names)
        (bad_any,) = self.parallel.agree(bad is not None)
        if bad_any:
            raise NonFiniteTraining(self._diverged(f"the {bad or 'state of another rank'} is not finite after step "
                                                   f"{self.step}"))
        meta = {"step": self.step, "tokens": self.tokens, "name": self.run.name, "corpus_sha256": self.corpus_sha256}
        path = self.parallel.save_checkpoint(self.run_dir, self.model, self._hashed_config(), self._state(), meta,
                                             keep=self.run.train.keep_checkpoints)
        self._saved_step = self.step
        return path

    def snapshot(self) -> Path | None:
        """Write the weights-only snapshot of this step (rank 0 writes it; every rank raises if that failed).

        Returns its folder on rank 0, None elsewhere.
        """
        return self.parallel.agreed_on_rank_0(
            lambda: save_snapshot(self.run_dir, self.model, self._hashed_config(), self.step, self.tokens),
            f"rank 0 could not write the snapshot of step {self.step}; its error is in its log")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def evaluate(self) -> dict[str, Any]:
        """Mean val loss over `eval_batches` fixed batches, perplexity and expert load on val."""
        return self.evaluator.evaluate()

    # ------------------------------------------------------------------ the loop
    def train(self, stop_at: int | None = None) -> TrainResult:
        """Train until `max_steps` (or stop early at step `stop_at`, schedule unchanged, with a checkpoint).

        Ctrl-C or SIGTERM stops after the step in progress, with a checkpoint of it; `--resume` continues
        exactly. A second one stops at once (one process only), leaving the last checkpoint.
        """
        if self.read_only:
            raise RuntimeError("this Trainer was opened read_only (for evaluation); it cannot train")
        t = self.run.train
        policy = CheckpointPolicy(t, min(t.max_steps, stop_at) if stop_at is not None else t.max_steps)
        self.metrics.open_progress(t.max_steps, self.step)
        self._val_loss: float | None = None
        self._session_start, self._wall_before = time.perf_counter(), self.wall_s
        self._lock.acquire()
        self.model.train()
        try:
            with StopSignals(force_on_repeat=self.parallel.repeat_signal_stops_at_once) as signals:
                while self.step < policy.last:
                    record = self._step_and_record(signals, policy)
                    if self.parallel.stop_after_step(record.stop, signals.requested):
                        return self._stop_on_signal(signals.requested)
        except KeyboardInterrupt:
            return self._stop_at_once()
        finally:
            self.metrics.close_progress()
            self._lock.release()
        return TrainResult(self.run_dir, self.step, self.tokens, self._val_loss)

    def _step_and_record(self, signals: StopSignals, policy: CheckpointPolicy) -> StepRecord:
        """`train_step`, then log, evaluate and save as `policy` says; a lost peer is reported as PeerLost."""
        try:
            record = self.train_step(signals)
            figures = self.metrics.log_step(record, logged=policy.log_now(record.step, record.skipped))
            if policy.evaluate_now(record.step):
                self._val_loss = self.metrics.log_eval(record.step, record.tokens, self.evaluate())
            if policy.snapshot_now(record.step):  # before the checkpoint: a crash between them redoes the step
                self.snapshot()
            if policy.save_now(record.step):
                self.save()
            self.metrics.advance(figures)
        except RuntimeError as error:
            lost = self.parallel.peer_lost(error, self.step, self._saved_step)
            if lost is None:
                raise
            raise lost from error
        return record

    def _stop_on_signal(self, signal_name: str | None) -> TrainResult:
        """After the step a signal asked to stop at: its checkpoint (unless written already), and the result."""
        if self._saved_step != self.step:
            self.save()
        self.metrics.say(f"{signal_name}: stopped after step {self.step}, checkpoint written; "
                         f"continue with --resume {self.run_dir}")
        return TrainResult(self.run_dir, self.step, self.tokens, self._val_loss, interrupted=True)

    def _stop_at_once(self) -> TrainResult:
        """A repeated signal stopped mid-step: the last checkpoint stands."""
        last_saved = self._saved_step or 0
        self.metrics.say(f"stopped at once during step {self.step + 1}; the last checkpoint "
                         f"({'step ' + str(last_saved) if self._saved_step else 'none yet'}) stands")
        return TrainResult(self.run_dir, last_saved, self.tokens, self._val_loss, interrupted=True, forced=True)

    def train_step(self, signals: StopSignals) -> StepRecord:
        """One whole optimiser step: every micro-batch's forward and backward, the gradients finished (reduced and
        clipped), the finite check, the update and the selection-bias update; a non-finite step is skipped."""
        t = self.run.train
        started = time.perf_counter()
        loss, aux, exchanged, stats = 0.0, 0.0, 0.0, {}
        for micro in range(t.grad_accum):
            inputs, targets = self.parallel.next_batch(self.sampler)  # under torchrun: this rank's share
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.parallel.no_sync(micro == t.grad_accum - 1):  # DDP reduces after the last micro-batch
                with self._autocast():
                    out = self.forward_model(inputs, targets=targets)
                ((out.loss + out.aux_loss) / t.grad_accum).backward()
            loss += float(out.loss.detach()) / t.grad_accum
            aux += float(out.aux_loss.detach()) / t.grad_accum
            exchanged += sum(float(s.get("all_to_all_bytes", 0.0)) for s in out.moe_stats.values())
            stats = out.moe_stats
        grad_norm = float(self.parallel.finish_gradients(self.model, t.grad_clip))
        bad = nonfinite_step_value(loss, aux, grad_norm)
        bad_any, stop = self.parallel.agree(bad is not None, signals.requested is not None)
        if bad_any:
            self._skip_step(bad or "a non-finite value on another rank")
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.parallel.update_router_biases(self.model)
        self.step += 1
        step_tokens = t.grad_accum * t.batch_size * t.block_size * self.parallel.world_size
        self.tokens += step_tokens
        self.wall_s = self._wall_before + (time.perf_counter() - self._session_start)
        return StepRecord(self.step, self.tokens, loss, aux, self.scheduler.get_last_lr()[0], grad_norm,
                          step_tokens / max(time.perf_counter() - started, 1e-9), self.wall_s, exchanged, stats,
                          skipped=bad_any, stop=stop)

    def _skip_step(self, what: str) -> None:
        """No update for a step with a non-finite value: within the budget, skip it; else stop with an error."""
        t = self.run.train
        self.optimizer.zero_grad(set_to_none=True)
        discard_router_loads(self.model)  # the bad step's router counts must not move the selection bias
        if len(self.skipped_steps) >= t.max_skipped_steps:
            raise NonFiniteTraining(self._diverged(f"at step {self.step + 1} {what}"))
        self.skipped_steps.append(self.step + 1)
        self.scheduler.step()  # the schedule stays aligned with the step count
        self.metrics.log_skip(self.step + 1, what)
        self.metrics.say(f"step {self.step + 1} skipped: {what} (skipped {len(self.skipped_steps)} of at most "
                         f"{t.max_skipped_steps}, train.max_skipped_steps)")

    def _diverged(self, what: str) -> str:
        return diverged_message(what, self.run.train, self._saved_step, self.run_dir)
