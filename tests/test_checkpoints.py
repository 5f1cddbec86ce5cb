"""Checkpoints under crashes and damage: any crash sequence leaves the newest complete checkpoint loadable,
damage is detected by checksums, a damaged newest checkpoint falls back to the previous one with a warning,
weights-only readers need only the weights, and every file moekit writes is written atomically."""

import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from moekit import _files
from moekit.cli import main
from moekit.train import checkpoint as ckpt
from moekit.train.loop import Trainer

from .run_helpers import small_run, weights

PACKAGE = Path(__file__).resolve().parents[1] / "moekit"


# ---------------------------------------------------------------------------------------- crash sequences
class Crash(BaseException):
    """A simulated kill -9: once raised, the process does nothing more to the file system."""


class CrashingFileSystem:
    """Counts the file-system mutations of checkpoint saves and 'kills' the process at the n-th one.

    After the crash every later mutation of that process is dropped (a dead process cleans nothing up), until
    `restart()` starts the next process.
    """

    def __init__(self, monkeypatch, crash_at: int) -> None:
        self.count, self.crash_at, self.dead = 0, crash_at, False
        self.published: list[int] = []  # steps whose folder reached its final name
        real_replace, real_rmtree, real_write = os.replace, shutil.rmtree, ckpt._write_file

        def step(name: str) -> None:
            if self.dead:
                raise Crash(name)
            self.count += 1
            if self.count == self.crash_at:
                self.dead = True
                raise Crash(name)

        def replace(src, dst):
            step("replace")
            real_replace(src, dst)
            if re.fullmatch(r"step-\d+", Path(dst).name):
                self.published.append(int(Path(dst).name.split("-")[1]))

        def rmtree(path, ignore_errors=False, **kwargs):
            if self.dead:
                return None  # the cleanup of a dead process never runs
            step("rmtree")
            return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

        def write(path, data):
            step("write")
            return real_write(path, data)

        monkeypatch.setattr(ckpt.os, "replace", replace)
        monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
        monkeypatch.setattr(ckpt, "_write_file", write)

    def restart(self) -> None:
        self.dead = False


def _save(run_dir: Path, step: int, keep: int) -> None:
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    ckpt.save_checkpoint(run_dir, model, {"m": 1}, {"step": step, "blob": torch.full((8,), float(step))},
                         {"step": step, "tokens": step}, keep=keep)


def _expected_weight(step: int) -> torch.Tensor:
    torch.manual_seed(step)
    return torch.nn.Linear(4, 3).weight.detach()


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1, 2])
def test_any_sequence_of_crashes_leaves_the_newest_complete_checkpoint_loadable(tmp_path, monkeypatch, keep):
    # saves of steps 1, 2, 2 (a replace of the same step), 3 and 4; one crash at every possible point of them,
    # and after each crash a second crash at every point of the next save
    sequence = [1, 2, 2, 3, 4]
    total = 60  # more mutations than the sequence makes: the last iterations run it without a crash
    for first in range(1, total):
        for second in (0, 1, 3, 5):
            run_dir = tmp_path / f"k{keep}-{first}-{second}"
            fs = CrashingFileSystem(monkeypatch, first)
            crashes = 0
            for step in sequence:
                try:
                    _save(run_dir, step, keep)
                except Crash:
                    crashes += 1
                    fs.restart()
                    if crashes == 1 and second:
                        fs.crash_at = fs.count + second  # the next process dies too, `second` mutations in
                if not fs.published:
                    continue
                newest = max(fs.published)
                path = ckpt.find_checkpoint(run_dir, need="all")  # must never raise once something was published
                meta = ckpt.verify_checkpoint(path, "all")
                assert meta["step"] == newest, (first, second, step, path)
                state = ckpt.read_model_state(path)
                assert torch.equal(state["weight"], _expected_weight(newest))
            monkeypatch.undo()


def test_keep_checkpoints_keeps_the_newest_n(corpus, tmp_path):
    for keep in (1, 3):
        run = small_run("dense", corpus, "train.max_steps=10", "train.checkpoint_interval=2",
                        f"train.keep_checkpoints={keep}")
        Trainer(run, tmp_path / f"k{keep}", progress=False).train()
        names = sorted(p.name for p in (tmp_path / f"k{keep}" / "checkpoints").iterdir())
        assert names == [f"step-{s:08d}" for s in range(10 - 2 * (keep - 1), 11, 2)]


# ---------------------------------------------------------------------------------------- damage and fallback
def _flip_a_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(corpus, tmp_path):
    extra = ("train.max_steps=8", "train.checkpoint_interval=2")
    straight = Trainer(small_run("tiny-deepseek", corpus, *extra), tmp_path / "a", progress=False)
    straight.train()
    first = Trainer(small_run("tiny-deepseek", corpus, *extra), tmp_path / "b", progress=False)
    first.train(stop_at=6)
    newest = tmp_path / "b" / "checkpoints" / "step-00000006"
    _flip_a_bit(newest / "model.safetensors")
    with pytest.warns(UserWarning) as caught:
        resumed = Trainer(small_run("tiny-deepseek", corpus, *extra), tmp_path / "b", resume=True, progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert str(newest) in text and "step-00000004" in text and "sha256" in text  # names both and the problem
    assert resumed.step == 4
    resumed.train()
    for name, value in weights(straight.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name


def test_a_bit_flip_in_the_weights_is_refused_naming_the_file(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    Trainer(small_run("dense", corpus, "train.max_steps=2", "train.keep_checkpoints=1"), run_dir,
            progress=False).train()
    _flip_a_bit(run_dir / "checkpoints" / "step-00000002" / "model.safetensors")
    for argv in (["eval", str(run_dir), "--batches", "1"], ["generate", str(run_dir), "--prompt", "To"],
                 ["train", "--resume", str(run_dir), "--no-progress"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "model.safetensors does not match its sha256 checksum" in err, err


def test_checkpoint_damage_of_every_kind_has_a_clear_error(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    Trainer(small_run("dense", corpus, "train.max_steps=2", "train.keep_checkpoints=1"), run_dir,
            progress=False).train()
    folder = run_dir / "checkpoints" / "step-00000002"
    meta = (folder / "meta.json").read_text()
    cases = [
        (lambda: (folder / "meta.json").write_text("[1, 2]"), "meta.json holds a list, not a checkpoint record"),
        (lambda: (folder / "meta.json").unlink(), "meta.json is missing (the checkpoint was not completed)"),
        (lambda: (folder / "meta.json").write_text("{"), "meta.json is not valid JSON"),
        (lambda: (folder / "model.safetensors").write_bytes(b""), "model.safetensors has 0 bytes"),
    ]
    for damage, message in cases:
        (folder / "meta.json").write_text(meta)
        weights_file = run_dir / "model.bak"
        shutil.copyfile(folder / "model.safetensors", weights_file)
        damage()
        assert main(["eval", str(run_dir), "--batches", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and "train first" not in err, err
        shutil.copyfile(weights_file, folder / "model.safetensors")
    (folder / "meta.json").write_text(meta)
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0  # repaired: it loads again


def test_weights_only_commands_need_only_the_weights(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    Trainer(small_run("dense", corpus, "train.max_steps=2", "train.keep_checkpoints=1"), run_dir,
            progress=False).train()
    (run_dir / "checkpoints" / "step-00000002" / "state.pt").write_bytes(b"damaged optimiser state")
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0
    assert main(["generate", str(run_dir), "--prompt", "To", "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2  # a resume needs the optimiser state
    assert "state.pt has 23 bytes, meta.json records" in capsys.readouterr().err


def test_eval_writes_nothing_into_the_run(corpus, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(small_run("tiny-mixtral", corpus, "train.max_steps=2"), run_dir, progress=False).train()
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


# ---------------------------------------------------------------------------------------- atomic writes
def test_config_json_survives_a_crash_while_it_is_rewritten(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    Trainer(small_run("dense", corpus, "train.max_steps=2"), run_dir, progress=False).train()
    before = (run_dir / "config.json").read_bytes()
    real_fsync = os.fsync

    def crash_while_writing(fd):
        raise Crash("power cut while config.json is written")

    monkeypatch.setattr(_files.os, "fsync", crash_while_writing)
    with pytest.raises(Crash):  # a resume that records an honoured change rewrites config.json
        Trainer(small_run("dense", corpus, "train.max_steps=2", "train.log_interval=3"), run_dir, resume=True,
                progress=False)
    monkeypatch.setattr(_files.os, "fsync", real_fsync)
    assert (run_dir / "config.json").read_bytes() == before  # the old config, whole
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0


# Files written outside moekit/_files.py, each inside a temporary folder that is published by one rename
# (so the folder, not the file, is the atomic unit), or by a library that writes into such a folder.
ATOMIC_BY_FOLDER = {
    "train/checkpoint.py": "checkpoint files land in checkpoints/.step-N.tmp-*/, published by a rename",
    "interop/writer.py": "shards are streamed into the output's temporary folder, published by a rename",
    "interop/merge.py": "tokenizer files and extra files go into the output's temporary folder",
    "interop/hf.py": "shards and copied tokenizer files go into the output's temporary folder",
    "hf/export.py": "save_pretrained and the tokenizer files write into write_atomically's temporary folder",
    "train/data.py": "tokens.bin is streamed to a temporary file, fsynced and renamed (too large to buffer)",
    "analysis/prune.py": "the pruned run's files go into the output's temporary folder, published by a rename",
    "analysis/trace.py": "spill files in a temporary folder; the trace is assembled in a temp file and renamed",
}
WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wa]b?['\"]|\.savefig\(\s*[^b]|torch\.save\("
                    r"[^,]+,\s*(?!buffer)|save_file\(|copyfile\(|\.save_pretrained\(")


def test_every_file_moekit_writes_goes_through_the_atomic_helpers():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "_files.py" or relative.startswith("bench/") or relative in ATOMIC_BY_FOLDER:
            continue  # bench/ writes only the --json report a user asks for
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.strip()
            if WRITES.search(code) and not code.startswith(("#", '"', "'", 'f"', "f'")):  # not comments, messages
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "writes that bypass moekit._files:\n" + "\n".join(offenders)


def test_checkpoint_files_are_durable_before_they_are_published(corpus, tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (order.append(f"replace {Path(b).name}"),
                                                          real_replace(a, b))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(small_run("dense", corpus, "train.max_steps=1"), tmp_path / "run", progress=False).train()
    publish = order.index("replace step-00000001")
    assert order[:publish].count("fsync") >= 3  # weights, state and meta.json synced before the rename


def test_the_checkpoint_hash_covers_every_model_field_and_init_from(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run = small_run("tiny-mixtral", corpus, "train.max_steps=4", "train.checkpoint_interval=1")
    Trainer(run, run_dir, progress=False).train(stop_at=2)
    model = run.model.to_dict()
    saved = ckpt.read_meta(ckpt.find_checkpoint(run_dir))["config_hash"]
    assert saved == ckpt.config_hash({**model, "init_from": None})  # the model config as it is, nothing left out
    for changed in ({**model, "qk_norm": "rms"}, {**model, "moe": {**model["moe"], "expert_devices": 2}},
                    {**model, "init_from": "elsewhere"}):
        assert ckpt.config_hash({"init_from": None, **changed}) != saved
    Trainer(run, run_dir, progress=False, resume=True).train()
    assert ckpt.read_meta(ckpt.find_checkpoint(run_dir))["step"] == 4
