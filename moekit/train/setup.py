"""Setting a run up: a new run directory created (or an old run replaced with `--overwrite`), or an existing one
opened to resume or evaluate, with its tokenizer and token cache.

Everything that can fail on bad input (the config, `train.init_from`, the corpus, the tokenizer, the split sizes)
is checked in memory first; only then is a new run directory created (or an old run set aside for
`--overwrite`), locked, and its config, tokenizer and token cache written. A failure while writing removes the new
directory and puts the old run back. Under torchrun rank 0 does this; the other ranks wait for its verdict, then
read what it wrote.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import fsync_dir, overlapping_input, remove_stale_temps, storage_faults, temp_sibling, write_json
from . import checkpoint as ckpt
from . import rundir
from .config import RunConfig
from .data import TokenDataset, build_tokenizer
from .freeze import apply_freezing
from .init_from import build_model, model_from_checkpoint
from .parallel import LocalParallel, TrainParallel
from .resume import check_resume_changes, resume_changes
from .tokenizers import load_tokenizer

__all__ = ["RunInputs", "RunSetup", "check_router_use"]


def check_router_use(run: RunConfig) -> None:
    """Refuse a router that mixes future tokens unless the run allows it; warn about expert choice."""
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


@dataclass
class RunInputs:
    """What a set-up run gives the trainer."""

    tokenizer: Any
    dataset: TokenDataset
    corpus_sha256: str
    init_model: torch.nn.Module | None = None  # a new run's weights from `train.init_from`
    history_entry: dict[str, Any] | None = None  # what this resume changed (recorded in config.json's history)


class RunSetup:
    """Creates or opens the run directory `run_dir` for `run`; `lock` is taken once the directory is the run's."""

    def __init__(self, run: RunConfig, run_dir: Path, parallel: LocalParallel | TrainParallel,
                 lock: rundir.RunLock) -> None:
        self.run, self.run_dir, self.parallel, self.lock = run, Path(run_dir), parallel, lock
        self._failure = f"rank 0 could not open the run directory {self.run_dir}; its error is in its log"

    # ------------------------------------------------------------------ an existing run
    def open_existing(self, extend_schedule: bool, read_only: bool) -> RunInputs:
        """Check what a resume asks for against config.json and the checkpoint, before anything is written.

        `read_only` (evaluation) takes no lock, checks no changes and writes nothing.
        """
        stored = rundir.read_run_config(self.run_dir, "evaluate" if read_only else "resume")
        self.parallel.agreed_on_rank_0(lambda: None if read_only else self.lock.acquire(), self._failure)
        tokenizer = load_tokenizer(self.run_dir / "tokenizer")
        entry = None if read_only else self._record_changes(stored, extend_schedule)
        prepared = self._prepare(tokenizer)
        dataset = prepared.in_memory() if read_only else prepared.write()
        self._check_vocabulary(tokenizer)
        return RunInputs(tokenizer, dataset, prepared.source_sha256, history_entry=entry)

    def _record_changes(self, stored: dict[str, Any], extend_schedule: bool) -> dict[str, Any] | None:
        """Refuse what a resume cannot honour; record the rest in the run's history (and config.json)."""
        with warnings.catch_warnings():  # a fallback to an older checkpoint is reported once, when it loads
            warnings.simplefilter("ignore")
            meta = ckpt.read_meta(ckpt.find_checkpoint(self.run_dir, need="all"))
        changes = resume_changes(stored, self.run.to_dict())
        saved_world = (meta.get("layout") or {}).get("world_size", 1)
        saved_accum = (stored.get("train") or {}).get("grad_accum", 1)
        check_resume_changes(changes, meta["step"], extend_schedule,
                             grad_accum=(saved_accum, self.run.train.grad_accum),
                             world_size=(saved_world, self.parallel.world_size))
        self.parallel.barrier()  # every rank has read config.json before rank 0 records the change in it
        if not changes:
            return None
        entry = {"step": meta["step"], "changed": {k: list(v) for k, v in changes.items()}}
        self.run.history = [*self.run.history, entry]
        self.parallel.on_main(lambda: write_json(self.run_dir / "config.json", self.run.to_dict(), what="run config"))
        return entry

    # ------------------------------------------------------------------ a new run
    def create_new(self, overwrite: bool) -> RunInputs:
        """A new run: rank 0 checks every input and writes the directory; the other ranks then read it."""
        inputs = self.parallel.agreed_on_rank_0(lambda: self._write_new_run(overwrite), self._failure,
                                                elsewhere=self._read_new_run)
        self._check_vocabulary(inputs.tokenizer)
        return inputs

    def _check_free_directory(self, overwrite: bool) -> bool:
        """Refuse an occupied directory unless it is a moekit run that --overwrite may replace; True if occupied."""
        t = self.run.train
        source = overlapping_input(self.run_dir, [t.data, t.init_from])
        if source is not None:
            raise ValueError(f"the run directory {self.run_dir} overlaps the run's own input {source} (train.data or "
                             "train.init_from): the run would write into what it reads, or --overwrite delete it; "
                             "choose another --out")
        remove_stale_temps(self.run_dir)  # a run set aside by a killed --overwrite comes back first
        occupied = self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir()))
        if occupied and not overwrite:
            raise FileExistsError(f"{self.run_dir} already exists and is not empty; pass --overwrite to replace "
                                  "it, --resume to continue it, or --out to choose another directory")
        if occupied:
            rundir.check_replaceable(self.run_dir)
        return occupied

    def _write_new_run(self, overwrite: bool) -> RunInputs:
        """Check every input in memory, then create (or replace) the run directory and write its first files.

        A failure while writing removes the new directory and puts a replaced run back.
        """
        t = self.run.train
        occupied = self._check_free_directory(overwrite)
        init_model = model_from_checkpoint(self.run.model, t.init_from) if t.init_from is not None else None
        if t.freeze_router or t.train_only_router or t.freeze:  # a pattern that matches nothing: refused now
            if init_model is not None:
                apply_freezing(init_model, t)
            else:
                with torch.device("meta"):
                    apply_freezing(build_model(self.run.model), t)
        tokenizer = build_tokenizer(t)
        self._check_vocabulary(tokenizer)
        prepared = self._prepare(tokenizer, reuse=not occupied)
        # the directory is assembled under a temporary name and renamed into place with its first files, so a
        # kill at any moment leaves either no run or a run with its config, tokenizer and token cache
        building = temp_sibling(self.run_dir)
        aside = None
        try:
            with storage_faults("run directory", self.run_dir):
                self.run_dir.parent.mkdir(parents=True, exist_ok=True)
                building.mkdir()
                write_json(building / "config.json", self.run.to_dict(), what="run config")
                tokenizer.save(building / "tokenizer")
                dataset = prepared.write(building / "data")
                fsync_dir(building)
                aside = rundir.set_aside(self.run_dir) if occupied else None
                os.replace(building, self.run_dir)
                fsync_dir(self.run_dir.parent)
                self.lock.acquire()
        except BaseException:
            self.lock.release()
            shutil.rmtree(building, ignore_errors=True)
            if aside is not None:
                rundir.restore(aside, self.run_dir)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return RunInputs(tokenizer, dataset, prepared.source_sha256, init_model=init_model)

    def _read_new_run(self) -> RunInputs:
        """What rank 0 wrote: its tokenizer and token cache (verified and reused), the start weights read again."""
        t = self.run.train
        tokenizer = load_tokenizer(self.run_dir / "tokenizer")
        prepared = self._prepare(tokenizer)
        init_model = model_from_checkpoint(self.run.model, t.init_from) if t.init_from is not None else None
        return RunInputs(tokenizer, prepared.write(), prepared.source_sha256, init_model=init_model)

    # ------------------------------------------------------------------ inputs
    def _prepare(self, tokenizer: Any, reuse: bool = True):
        """The corpus read, checked and (unless its cache is valid) tokenised in memory; nothing written."""
        t = self.run.train
        return TokenDataset.prepare(t.data, tokenizer, self.run_dir / "data", val_fraction=t.val_fraction,
                                    block_size=t.block_size, reuse=reuse)

    def _check_vocabulary(self, tokenizer: Any) -> None:
        vocab = tokenizer.vocab_size
        if self.run.model.vocab_size < vocab:
            if self.run.train.init_from is not None:
                raise ValueError(f"train.init_from={self.run.train.init_from!r}: its tokenizer.json has ids up to "
                                 f"{vocab - 1}, but the model's embedding has only {self.run.model.vocab_size} rows "
                                 "(vocab_size); the tokenizer does not belong to this model: copy the base model's "
                                 "tokenizer files into the folder")
            raise ValueError(f"model.vocab_size={self.run.model.vocab_size} is smaller than the tokenizer's "
                             f"{vocab}; set --set model.vocab_size={vocab}")
