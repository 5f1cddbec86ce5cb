"""Training under faults: signals at every point of a step, divergence, full and read-only disks, two processes on
one run, and `--overwrite` aimed at the wrong folder. Each test injects the fault for real (signals, subprocesses,
file-size limits, tmpfs in a user namespace) and checks the promised outcome."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.train import checkpoint as ckpt
from moekit.train import loop as loop_module
from moekit.train.errors import NonFiniteTraining
from moekit.train.loop import Trainer

from .run_helpers import SMALL, TEXT, small_overrides, small_run, weights

STEPS = 8
EXTRA = (f"train.max_steps={STEPS}", "train.checkpoint_interval=3", "train.eval_interval=4")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the uninterrupted run every interrupted one must end with."""
    root = tmp_path_factory.mktemp("straight")
    (root / "corpus.txt").write_text(TEXT)
    trainer = Trainer(small_run("tiny-deepseek", root / "corpus.txt", *EXTRA), root / "run", progress=False)
    trainer.train()
    return weights(trainer.model)


def _loaded(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a run's newest checkpoint, loaded into its model (tied tensors filled)."""
    from moekit.model import MoETransformer
    from moekit.train.config import RunConfig

    model = MoETransformer(RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())).model)
    ckpt.load_weights(ckpt.find_checkpoint(run_dir), model)
    return weights(model)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit, the aux-free selection bias included


# ---------------------------------------------------------------------------------- signals inside a step
def _points(trainer: Trainer, monkeypatch, fire) -> dict[str, object]:
    """Hooks that call `fire(point)` at each point of a step; returns the hook handles to remove."""
    model = trainer.model
    handles = {}
    real_next = trainer.sampler.next_batch
    monkeypatch.setattr(trainer.sampler, "next_batch", lambda: (fire("batch"), real_next())[1])
    handles["forward"] = model.layers[0].register_forward_hook(lambda *a: fire("forward"))
    handles["backward"] = model.layers[0].register_full_backward_hook(lambda *a: fire("backward"))
    real_finish = trainer.parallel.finish_gradients
    monkeypatch.setattr(trainer.parallel, "finish_gradients", lambda *a: (fire("clip"), real_finish(*a))[1])
    real_opt_step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (real_opt_step(*a, **k), fire("after_update"))[0])
    real_sched = type(trainer.scheduler).step  # on the class: the instance's __dict__ is its saved state
    monkeypatch.setattr(type(trainer.scheduler), "step", lambda self, *a: (real_sched(self, *a), fire("scheduler"))[0])
    real_bias = trainer.parallel.update_router_biases
    monkeypatch.setattr(trainer.parallel, "update_router_biases", lambda m: (real_bias(m), fire("bias_update"))[0])
    real_log = trainer.metrics.log
    monkeypatch.setattr(trainer.metrics, "log", lambda r: (fire("log"), real_log(r))[1])
    real_eval = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda: (fire("eval"), real_eval())[1])
    real_write = ckpt._write_file
    monkeypatch.setattr(ckpt, "_write_file", lambda p, d: (fire("checkpoint_write"), real_write(p, d))[1])
    return handles


# the step each point is hit in (eval and checkpoint writes happen only at their intervals)
POINTS = {"batch": 5, "forward": 5, "backward": 5, "clip": 5, "after_update": 5, "scheduler": 5, "bias_update": 5,
          "log": 5, "eval": 4, "checkpoint_write": 6}


# every point with Ctrl-C; SIGTERM takes the same handler, so three points of it
SIGNAL_CASES = [(point, signal.SIGINT) for point in sorted(POINTS)] + [
    (point, signal.SIGTERM) for point in ("backward", "after_update", "checkpoint_write")]


@pytest.mark.parametrize(("point", "signum"), SIGNAL_CASES)
def test_a_signal_at_any_point_of_a_step_stops_after_the_whole_step(point, signum, straight, corpus, tmp_path,
                                                                    monkeypatch):
    trainer = Trainer(small_run("tiny-deepseek", corpus, *EXTRA), tmp_path / "run", progress=False)
    target, fired = POINTS[point], []

    def fire(where: str) -> None:
        # the step in progress is trainer.step + 1 until the step counter moves, which happens after the update
        in_step = trainer.step + (0 if where in ("log", "eval", "checkpoint_write") else 1)
        if where in ("forward", "backward") and not trainer.model.training:
            return  # evaluation's forwards are not part of a training step
        if where == point and in_step == target and not fired:
            fired.append(where)
            signal.raise_signal(signum)  # a real signal, delivered to the handler the trainer installed

    handles = _points(trainer, monkeypatch, fire)
    result = trainer.train()
    for handle in handles.values():
        handle.remove()
    monkeypatch.undo()
    assert fired == [point]
    assert result.interrupted and not result.forced and result.step == target
    saved = ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "run", need="all"))
    assert saved["step"] == target  # the checkpoint holds exactly the step it is labelled with
    resumed = Trainer(small_run("tiny-deepseek", corpus, *EXTRA), tmp_path / "run", resume=True, progress=False)
    assert resumed.step == target
    resumed.train()
    _assert_same(straight, weights(resumed.model))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, STEPS + 1))  # no step logged twice


def test_a_second_signal_stops_at_once_and_the_last_checkpoint_stands(straight, corpus, tmp_path, monkeypatch):
    trainer = Trainer(small_run("tiny-deepseek", corpus, *EXTRA), tmp_path / "run", progress=False)
    real_opt_step = trainer.optimizer.step

    def twice_in_step_five(*args, **kwargs):
        out = real_opt_step(*args, **kwargs)
        if trainer.step + 1 == 5:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # impatient: the second one stops now, mid-step
        return out

    monkeypatch.setattr(trainer.optimizer, "step", twice_in_step_five)
    result = trainer.train()
    monkeypatch.undo()
    assert result.interrupted and result.forced and result.step == 3  # the checkpoint before the step
    assert ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "run", need="all"))["step"] == 3
    resumed = Trainer(small_run("tiny-deepseek", corpus, *EXTRA), tmp_path / "run", resume=True, progress=False)
    resumed.train()
    _assert_same(straight, weights(resumed.model))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_as_the_subprocesses(trainer: Trainer) -> None:
    """Train in this process with one thread, as `_env()` runs the subprocesses: sums split over threads differ in
    their last bits, so a bit-for-bit comparison needs the same thread count on both sides."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)


def _train_command(out: Path, corpus: Path, *extra: str, preset: str = "tiny-mixtral") -> list[str]:
    return [sys.executable, "-m", "moekit", "train", "--preset", preset, "--out", str(out), "--no-progress",
            *[f"--set={s}" for s in small_overrides(preset, corpus, *extra)]]


def _train_lines(run_dir: Path) -> int:
    """How many training steps a run's metrics.jsonl logs (0 before it exists)."""
    log = run_dir / "metrics.jsonl"
    return sum(1 for line in log.read_text().splitlines() if '"train"' in line) if log.is_file() else 0


def _wait_for_steps(run_dir: Path, n: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = run_dir / "metrics.jsonl"
        if log.is_file() and sum(1 for line in log.read_text().splitlines() if '"train"' in line) >= n:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{run_dir}: fewer than {n} steps after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_to_a_training_process_write_a_checkpoint_that_resumes_exactly(signum, corpus, tmp_path):
    steps = 60
    extra = (f"train.max_steps={steps}", "train.checkpoint_interval=1000", "train.eval_interval=1000")
    process = subprocess.Popen(_train_command(tmp_path / "run", corpus, *extra), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_steps(tmp_path / "run", 5, process)
    process.send_signal(signum)  # what docker stop, a scheduler or a terminal sends
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    stopped = ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "run", need="all"))["step"]
    assert 5 <= stopped < steps and f"interrupted at step {stopped}" in out, (out, err)
    assert f"{signal.Signals(signum).name}: stopped after step {stopped}" in err
    resumed = subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(tmp_path / "run"),
                              "--no-progress"], capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = Trainer(small_run("tiny-mixtral", corpus, *extra), tmp_path / "straight", progress=False)
    _train_as_the_subprocesses(straight)
    _assert_same(weights(straight.model), _loaded(tmp_path / "run"))


# ---------------------------------------------------------------------------------- non-finite values
def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_finite_checkpoint(corpus, tmp_path, capsys,
                                                                                         monkeypatch):
    # lr 1e4 is refused by the config now (lr is at most 1); the guard must still catch a run that diverges for any
    # reason, so the optimiser gets that rate behind the config's back: the real numerics of a diverging run
    real_build = loop_module.build_optimizer

    def explosive(model, run):
        optimizer = real_build(model, run)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = 1e4
        return optimizer

    monkeypatch.setattr(loop_module, "build_optimizer", explosive)
    run_dir = tmp_path / "run"
    code = main(["train", "--out", str(run_dir), "--no-progress", *[f"--set={s}" for s in SMALL],
                 f"--set=train.data={corpus}", "--set=train.max_steps=200", "--set=train.checkpoint_interval=1",
                 "--set=train.keep_checkpoints=200", "--set=train.warmup_steps=0"])
    err = capsys.readouterr().err
    assert code == 2, err
    message = err.strip().splitlines()[-1]
    assert "training stopped: " in message and "try a lower train.lr" in message, message
    assert ("is nan" in message or "is inf" in message or "not finite" in message), message
    stop_step = int(message.split("step ")[1].split()[0])
    folders = ckpt.checkpoint_candidates(run_dir)
    assert folders and all(c.step < stop_step for c in folders)  # nothing of the bad step was written
    for candidate in folders:  # and every checkpoint that exists is finite
        for name, tensor in ckpt.read_model_state(candidate.path).items():
            assert torch.isfinite(tensor).all(), (candidate.path, name)
    assert f"the last checkpoint (step {folders[0].step}) is kept" in message
    assert "finished" not in capsys.readouterr().out


def _nan_at_step(trainer: Trainer, monkeypatch, bad_steps: set[int]) -> None:
    real_forward = trainer.forward_model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if trainer.step + 1 in bad_steps:
            out.loss = out.loss * float("nan")  # what an overflow in one batch gives
        return out

    monkeypatch.setattr(trainer.forward_model, "forward", forward)


def test_bad_steps_are_skipped_within_the_budget_and_stop_training_beyond_it(corpus, tmp_path, monkeypatch):
    extra = ("train.max_steps=6", "train.checkpoint_interval=1", "train.keep_checkpoints=10")
    trainer = Trainer(small_run("tiny-deepseek", corpus, *extra, "train.max_skipped_steps=1"), tmp_path / "skip",
                      progress=False)
    _nan_at_step(trainer, monkeypatch, {3})
    result = trainer.train()
    assert result.step == 6 and not result.interrupted
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "skip"] == [3]
    assert "the loss is nan" in next(r["reason"] for r in records if r["kind"] == "skip")
    step = {c.step: ckpt.read_model_state(c.path) for c in ckpt.checkpoint_candidates(tmp_path / "skip")}
    _assert_same(step[2], step[3])  # the skipped step changed no weight, nor the selection bias
    assert any(not torch.equal(step[3][n], step[4][n]) for n in step[3])  # the next one did

    monkeypatch.undo()
    strict = Trainer(small_run("tiny-deepseek", corpus, *extra), tmp_path / "strict", progress=False)
    _nan_at_step(strict, monkeypatch, {3, 5})
    with pytest.raises(NonFiniteTraining, match=r"at step 3 the loss is nan.*the last checkpoint \(step 2\) is kept"):
        strict.train()
    assert [c.step for c in ckpt.checkpoint_candidates(tmp_path / "strict")] == [2, 1]


def test_no_checkpoint_is_written_from_non_finite_weights(corpus, tmp_path):
    trainer = Trainer(small_run("dense", corpus, "train.max_steps=4", "train.checkpoint_interval=2"),
                      tmp_path / "run", progress=False)
    trainer.train(stop_at=2)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))  # an update that overflowed with finite gradients
    with pytest.raises(NonFiniteTraining, match=r"weight .* is not finite after step 2"):
        trainer.save()
    assert [c.step for c in ckpt.checkpoint_candidates(tmp_path / "run")] == [2]
    for tensor in ckpt.read_model_state(ckpt.find_checkpoint(tmp_path / "run")).values():
        assert torch.isfinite(tensor).all()


# ---------------------------------------------------------------------------------- full and read-only disks
def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                           "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return done.returncode == 0


def _in_tmpfs(directory: Path, size: str, command: list[str], read_only: bool = False) -> subprocess.CompletedProcess:
    """Run `command` with a fresh tmpfs of `size` mounted on `directory` (a private mount namespace)."""
    import shlex

    remount = f" && mount -o remount,ro {shlex.quote(str(directory))}" if read_only else ""
    script = (f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(directory))}{remount} && "
              + " ".join(shlex.quote(part) for part in command))
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _with_file_size_limit(limit: int, command: list[str]) -> subprocess.CompletedProcess:
    import resource

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, preexec_fn=limit_files)


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("moekit train: error: "), done.stderr
    return lines[0]


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_stops_with_one_line_and_keeps_the_previous_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *[f"--set={s}" for s in SMALL],
                 f"--set=train.data={corpus}", "--set=train.max_steps=2", "--set=train.checkpoint_interval=2"]) == 0
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    state_size = (ckpt.find_checkpoint(run_dir, need="all") / "state.pt").stat().st_size
    resume = [sys.executable, "-m", "moekit", "train", "--resume", str(run_dir), "--no-progress", "--max-steps", "4",
              "--extend-schedule"]
    done = _with_file_size_limit(state_size // 2, resume)  # the new checkpoint's state file cannot be written
    line = _one_line_error(done)
    assert "the file size limit was reached writing the checkpoint" in line and "checkpoints/step-00000004" in line
    assert "it needs" in line
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folder left
    for relative, data in before.items():  # the old checkpoint (and everything else) untouched
        if relative.parts[0] == "checkpoints":
            assert (run_dir / relative).read_bytes() == data, relative
    assert ckpt.read_meta(ckpt.find_checkpoint(run_dir, need="all"))["step"] == 2
    again = subprocess.run(resume, capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr  # space is back: the run continues from step 2


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user namespaces) to mount a small tmpfs")
def test_a_really_full_disk_stops_with_one_line_naming_the_space(corpus, tmp_path):
    extra = ("train.max_steps=4", "train.checkpoint_interval=2", "train.eval_interval=100")
    probe = tmp_path / "probe"  # how much one checkpoint and the rest of a run take
    assert subprocess.run(_train_command(probe, corpus, *extra, "train.max_steps=2"), env=_env(),
                          capture_output=True).returncode == 0
    checkpoint = sum(p.stat().st_size for p in ckpt.find_checkpoint(probe).iterdir())
    everything = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for the run's first files and one checkpoint, not for a second one next to it
    size = (everything + checkpoint // 2) // 1024 + 64
    done = _in_tmpfs(disk, f"{size}k", _train_command(disk / "run", corpus, *extra))
    line = _one_line_error(done)
    assert "no space left" in line and "checkpoint" in line and "it needs" in line, line


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user namespaces) to mount a read-only tmpfs")
def test_a_read_only_destination_is_one_clear_line(corpus, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    done = _in_tmpfs(disk, "1m", _train_command(disk / "run", corpus, "train.max_steps=2"), read_only=True)
    line = _one_line_error(done)
    assert "read-only" in line and str(disk / "run") in line, line


# ---------------------------------------------------------------------------------- two processes, one run
@pytest.mark.slow
def test_a_second_process_is_refused_while_a_run_trains_and_a_dead_ones_lock_is_recovered(corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(_train_command(run_dir, corpus, "train.max_steps=100000", "train.checkpoint_interval=2",
                                            "train.eval_interval=100000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for_steps(run_dir, 3, first)
        for argv in (["train", "--resume", str(run_dir), "--no-progress"],
                     ["train", "--out", str(run_dir), "--overwrite", "--no-progress", *[f"--set={s}" for s in SMALL],
                      f"--set=train.data={corpus}"]):
            done = subprocess.run([sys.executable, "-m", "moekit", *argv], capture_output=True, text=True,
                                  env=_env(), timeout=120)
            assert done.returncode == 2 and f"run in use by pid {first.pid}" in done.stderr, done.stderr
    finally:
        first.kill()  # kill -9: its lock must not outlive it
        first.communicate()
    resumed = subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(run_dir), "--no-progress",
                              "--stop-at", str(ckpt.read_meta(ckpt.find_checkpoint(run_dir, need="all"))["step"] + 3)],
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)), steps  # no step twice, though the killed run logged past its checkpoint


# ---------------------------------------------------------------------------------- --overwrite and run names
def _train(out: Path, corpus: Path, *extra: str, overwrite: bool = False) -> int:
    return main(["train", "--out", str(out), "--no-progress", *(["--overwrite"] if overwrite else []),
                 *[f"--set={s}" for s in SMALL], f"--set=train.data={corpus}", "--set=train.max_steps=1",
                 *[f"--set={e}" for e in extra]])


def test_run_names_must_be_plain_file_names_so_overwrite_cannot_escape_runs(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src.py").write_text("precious = True\n")
    assert main(["train", "--no-progress", *[f"--set={s}" for s in SMALL], f"--set=train.data={corpus}",
                 "--set=train.max_steps=1", "--set=name=keep"]) == 0  # runs/keep: another run
    for name in ("", "..", ".", str(tmp_path), "a/b", "../x"):
        code = main(["train", "--overwrite", "--no-progress", *[f"--set={s}" for s in SMALL],
                     f"--set=train.data={corpus}", "--set=train.max_steps=1", f"--set=name={name}"])
        assert code == 2 and "name" in capsys.readouterr().err, name
    assert (tmp_path / "src.py").read_text() == "precious = True\n"
    assert ckpt.find_checkpoint(tmp_path / "runs" / "keep")  # the other run survived every attempt


def test_overwrite_replaces_only_a_moekit_run_holding_nothing_else(corpus, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert _train(folder, corpus, overwrite=True) == 2
    assert "it is not a moekit training run" in capsys.readouterr().err
    assert (folder / "thesis.tex").read_text() == "years of work"

    run_dir = tmp_path / "run"
    assert _train(run_dir, corpus) == 0
    (run_dir / "analysis.ipynb").write_text("{}")
    assert _train(run_dir, corpus, overwrite=True) == 2
    assert "it holds 'analysis.ipynb'" in capsys.readouterr().err
    assert (run_dir / "analysis.ipynb").exists() and ckpt.find_checkpoint(run_dir)

    (run_dir / "analysis.ipynb").unlink()
    old_config = (run_dir / "config.json").read_text()
    assert _train(run_dir, corpus, "train.seed=7", overwrite=True) == 0  # a run holding only its own files
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 7 != json.loads(old_config)[
        "train"]["seed"]


def test_a_run_directory_may_not_overlap_its_own_corpus(corpus, tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(TEXT)
    for out in (texts / "run", tmp_path):  # inside the corpus folder, or holding it
        assert main(["train", "--out", str(out), "--overwrite", "--no-progress", *[f"--set={s}" for s in SMALL],
                     f"--set=train.data={texts}", "--set=train.max_steps=1"]) == 2
        assert "overlaps the run's own input" in capsys.readouterr().err
    assert sorted(p.name for p in texts.iterdir()) == ["a.txt"]


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir, corpus) == 0
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert _train(run_dir, tmp_path / "missing-corpus", overwrite=True) == 2  # bad input: refused before writing
    assert "missing-corpus" in capsys.readouterr().err
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------- bad input writes nothing
def test_bad_input_writes_nothing_and_the_corrected_rerun_needs_no_overwrite(corpus, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    bad_gz = tmp_path / "corpus.txt.gz"
    bad_gz.write_text(TEXT)
    cases = [
        (["train.data=" + str(tmp_path / "nope")], "does not exist"),
        (["train.data=" + str(empty)], "has no text files"),
        (["train.data=" + str(tiny)], "too few"),
        (["train.data=" + str(fifo)], "not a regular file"),
        (["train.data=" + str(bad_gz)], "not a gzip file"),
        (["train.tokenizer=bpe", f"train.data={corpus}"], "model.vocab_size=257 is smaller than the tokenizer's"),
        (["model.rms_norm_eps=0", f"train.data={corpus}"], "rms_norm_eps"),
        (["train.lr=fast", f"train.data={corpus}"], "TrainConfig.lr='fast'"),
        (["model.moe.norm_topk_prob=maybe", f"train.data={corpus}"], "norm_topk_prob"),
        (["allow_token_mixing=abc", f"train.data={corpus}"], "allow_token_mixing"),
    ]
    out = tmp_path / "run"
    for overrides, message in cases:
        argv = ["train", "--out", str(out), "--no-progress", *[f"--set={s}" for s in SMALL],
                "--set=train.max_steps=1", *[f"--set={o}" for o in overrides]]
        assert main(argv) == 2, overrides
        err = capsys.readouterr().err
        assert message in err, (overrides, err)
        assert not out.exists(), overrides  # not even an empty folder
    assert _train(out, corpus) == 0  # the corrected command, no --overwrite needed


def test_missing_extras_are_named_together_before_anything_is_written(tmp_path):
    blocked = ("import sys\nfor name in ('yaml', 'safetensors'):\n    sys.modules[name] = None\n"
               "from moekit.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", blocked, "train", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs PyYAML, safetensors, which are not installed: pip install \"moekit[train]\"" in done.stderr
    assert not (tmp_path / "run").exists()
    blocked = blocked.replace("('yaml', 'safetensors')", "('transformers',)")
    done = subprocess.run([sys.executable, "-c", blocked, "upcycle", str(tmp_path), str(tmp_path / "out")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 2 and "needs transformers, which is not installed: pip install \"moekit[merge]\"" \
        in done.stderr, done.stderr


def test_generate_refuses_a_nan_temperature_in_one_line(corpus, tmp_path, capsys):
    assert _train(tmp_path / "run", corpus) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "To", "--temperature", "nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "temperature" in err, err


# ---------------------------------------------------------------------------------- honest throughput
def test_the_report_gives_wall_clock_throughput(corpus, tmp_path, monkeypatch):
    from moekit.train.report import write_report

    run_dir = tmp_path / "run"
    trainer = Trainer(small_run("tiny-mixtral", corpus, "train.max_steps=6", "train.eval_interval=2"), run_dir,
                      progress=False)
    real_evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda: (time.sleep(0.3), real_evaluate())[1])  # slow evaluation
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    elapsed = train[-1]["elapsed_s"]
    step_time = sum(trainer.run.train.batch_size * trainer.run.train.block_size / r["tokens_per_s"] for r in train)
    assert step_time + 0.6 <= elapsed <= wall  # the two evaluations before the last step are inside it
    text = write_report(run_dir).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| tokens/s (wall clock"))
    assert row.endswith(f"| {train[-1]['tokens'] / elapsed:,.0f} |"), row


# ---------------------------------------------------------------------------------- what resume may change
def test_resume_refuses_changes_it_cannot_honour_and_records_those_it_does(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir, corpus, "train.max_steps=4") == 0
    before = (run_dir / "config.json").read_text()
    for argv, message in [
        (["--set", "train.lr=1e-3"], "--resume cannot change train.lr (0.01 -> 0.001)"),
        (["--set", "train.weight_decay=0.3"], "--resume cannot change train.weight_decay"),
        (["--set", "train.beta1=0.8"], "--resume cannot change train.beta1"),
        (["--preset", "tiny-deepseek"], "--preset cannot be combined with --resume"),
        (["--config", str(tmp_path / "x.yaml")], "--config cannot be combined with --resume"),
        (["--set", "model.intermediate_size=96"], "the model config differs"),
        (["--max-steps", "8"], "--resume cannot change train.max_steps from 4 to 8 silently"),
    ]:
        assert main(["train", "--resume", str(run_dir), "--no-progress", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert (run_dir / "config.json").read_text() == before  # nothing claimed that did not happen
    assert main(["train", "--resume", str(run_dir), "--no-progress", "--set", "train.log_interval=2",
                 "--set", "train.keep_checkpoints=3"]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["log_interval"] == 2 and saved["train"]["keep_checkpoints"] == 3
    assert saved["history"] == [{"step": 4, "changed": {"train.keep_checkpoints": [2, 3],
                                                        "train.log_interval": [1, 2]}}]


def test_stop_at_then_resume_equals_a_straight_run_and_extend_schedule_is_explicit(corpus, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(["train", "--out", str(straight), "--no-progress", *[f"--set={s}" for s in SMALL],
                 f"--set=train.data={corpus}", "--set=train.max_steps=10"]) == 0
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *[f"--set={s}" for s in SMALL],
                 f"--set=train.data={corpus}", "--set=train.max_steps=10", "--stop-at", "4"]) == 0
    assert ckpt.read_meta(ckpt.find_checkpoint(run_dir))["step"] == 4
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    _assert_same(_loaded(straight), _loaded(run_dir))

    # extending on purpose: from step 10 the cosine is planned over 16 steps; the earlier rates are kept
    assert main(["train", "--resume", str(run_dir), "--no-progress", "--max-steps", "16", "--extend-schedule"]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["max_steps"] == 16
    assert config["history"] == [{"step": 10, "changed": {"train.max_steps": [10, 16]}}]
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"}
    t = small_run("tiny-mixtral", corpus).train
    for step, lr in lrs.items():  # the rate logged after step s is the one scheduled for step index s
        total = 10 if step <= 10 else 16  # the first update after the resume still used the rate planned before
        assert math.isclose(lr, t.lr * loop_module.lr_factor(step, t.warmup_steps, total, t.min_lr_ratio),
                            rel_tol=1e-9), step


def test_a_resume_on_another_number_of_ranks_must_keep_the_micro_batches_per_step(corpus, tmp_path):
    from moekit.train.resume import check_resume_changes

    with pytest.raises(ValueError, match=r"would draw 2 micro-batches per step, but the run drew 4.*grad_accum=4"):
        check_resume_changes({}, 3, False, grad_accum=(2, 2), world_size=(2, 1))
    check_resume_changes({"train.grad_accum": (2, 4)}, 3, False, grad_accum=(2, 4), world_size=(2, 1))


# ---------------------------------------------------------------------------------- kill -9, many times
@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_run_that_finishes_bit_equal(corpus, tmp_path):
    import random

    steps = 1000  # long enough that six kills land before the end on a quiet machine too (300 ran out there)
    extra = (f"train.max_steps={steps}", "train.checkpoint_interval=1", "train.eval_interval=50")
    run_dir = tmp_path / "run"
    chance = random.Random(13)
    kills = 0
    command = _train_command(run_dir, corpus, *extra)
    while kills < 6:
        logged = _train_lines(run_dir)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=_env())
        # startup takes seconds, more on a loaded machine: from the first step it logs, a kill lands in steps and
        # checkpoint writes (a process killed earlier still dies, at a point the next round covers)
        deadline = time.monotonic() + 60
        while _train_lines(run_dir) <= logged and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(chance.uniform(0.0, 1.5))
        if process.poll() is not None:
            break  # it finished before the kill
        process.kill()
        process.communicate()
        kills += 1
        try:
            ckpt.find_checkpoint(run_dir, need="all")
        except FileNotFoundError:  # killed before its first checkpoint: start again over what it left
            command = [*_train_command(run_dir, corpus, *extra), "--overwrite"]
            continue
        command = [sys.executable, "-m", "moekit", "train", "--resume", str(run_dir), "--no-progress"]
    if (run_dir / "config.json").is_file() and ckpt.checkpoint_candidates(run_dir):
        final = subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(run_dir), "--no-progress"],
                               capture_output=True, text=True, env=_env(), timeout=300)
        assert final.returncode == 0, final.stderr
    assert kills == 6
    straight = Trainer(small_run("tiny-mixtral", corpus, *extra), tmp_path / "straight", progress=False)
    _train_as_the_subprocesses(straight)
    _assert_same(weights(straight.model), _loaded(run_dir))
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if line.strip() and '"train"' in line]
    assert steps_logged == list(range(1, steps + 1))


# ---------------------------------------------------------------------------------- random --set through the CLI
def test_random_overrides_through_the_cli_give_a_clear_error_or_a_finite_run(corpus, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fields = ["train.lr", "train.weight_decay", "train.grad_clip", "train.beta1", "train.warmup_steps",
              "train.min_lr_ratio", "model.rms_norm_eps", "model.rope_theta", "model.initializer_range",
              "model.moe.capacity_factor", "model.moe.routed_scaling_factor", "model.moe.router_z_loss_coef",
              "model.moe.router_aux_loss_coef", "model.moe.norm_topk_prob", "model.moe.router_jitter_noise",
              "model.moe.num_experts_per_tok", "model.moe.router", "allow_token_mixing", "train.keep_checkpoints"]
    values = st.sampled_from(["0", "-1", "1", "2", "1e-3", "0.5", "nan", "inf", "-inf", "1e30", "true", "false",
                              "abc", "null", "soft", "topk", "switch", "[]", "3"])

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(st.tuples(st.sampled_from(fields), values), min_size=1, max_size=3))
    def check(overrides):
        out = tmp_path_factory.mktemp("fuzz") / "run"
        argv = ["train", "--out", str(out), "--no-progress", *[f"--set={s}" for s in SMALL],
                f"--set=train.data={corpus}", "--set=train.max_steps=2", "--set=train.eval_interval=2",
                *[f"--set={key}={value}" for key, value in overrides]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(argv)  # an unexpected exception fails the test with its traceback
        assert code in (0, 2), overrides
        if code == 2:
            assert not out.exists(), overrides  # refused before anything was written
            return
        for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
            for key in ("loss", "val_loss", "grad_norm"):
                if key in record:
                    assert math.isfinite(record[key]), (overrides, record)

    check()
