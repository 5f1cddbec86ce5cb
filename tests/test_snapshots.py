"""`train.snapshot_interval`: weights-only snapshots at fixed steps, written atomically, never pruned, and the same
files whether a run trains straight through or stops and resumes."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.train import checkpoint as ckpt
from moekit.train import snapshots
from moekit.train.config import RunConfig, TrainConfig
from moekit.train.loop import Trainer
from moekit.train.policy import CheckpointPolicy
from moekit.train.rundir import check_replaceable
from moekit.train.snapshots import find_snapshots

from .run_helpers import SMALL, small_run, weights

EXTRA = ("train.max_steps=6", "train.snapshot_interval=2", "train.checkpoint_interval=2", "train.keep_checkpoints=1")
NAMES = ["step-00000002", "step-00000004", "step-00000006"]


def _snapshot_files(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "snapshots"
    return {f"{d.name}/{f.name}": f.read_bytes() for d in sorted(root.iterdir()) for f in sorted(d.iterdir())}


def test_snapshots_are_written_at_each_interval_and_survive_checkpoint_pruning(corpus, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(small_run("tiny-mixtral", corpus, *EXTRA), run_dir, progress=False)
    trainer.train()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000006"]  # keep_checkpoints=1
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == NAMES  # all kept, no temporary folder left
    tokens_per_step = 4 * 32  # batch_size x block_size of SMALL
    for name in NAMES:
        folder = run_dir / "snapshots" / name
        assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors"]
        meta = json.loads((folder / "meta.json").read_text())
        step = int(name.split("-")[1])
        assert (meta["step"], meta["tokens"]) == (step, step * tokens_per_step)
        data = (folder / "model.safetensors").read_bytes()
        assert meta["files"]["model.safetensors"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert [(s.step, s.path.name) for s in find_snapshots(run_dir)] == [(2, NAMES[0]), (4, NAMES[1]), (6, NAMES[2])]
    last = load_file(str(run_dir / "snapshots" / NAMES[-1] / "model.safetensors"))
    final = weights(trainer.model)
    for name, tensor in last.items():
        assert torch.equal(tensor, final[name]), name  # the last snapshot is the trained model
    first = load_file(str(run_dir / "snapshots" / NAMES[0] / "model.safetensors"))
    assert not torch.equal(first["layers.0.mlp.router.weight"], last["layers.0.mlp.router.weight"])  # it trained


def test_a_resumed_run_writes_the_same_snapshots_and_weights_as_a_straight_run(corpus, tmp_path):
    straight = Trainer(small_run("tiny-mixtral", corpus, *EXTRA), tmp_path / "a", progress=False)
    straight.train()
    first = Trainer(small_run("tiny-mixtral", corpus, *EXTRA), tmp_path / "b", progress=False)
    assert first.train(stop_at=3).step == 3
    assert sorted(p.name for p in (tmp_path / "b" / "snapshots").iterdir()) == NAMES[:1]  # no snapshot at stop_at
    # a snapshot of a later step already there (a crash after it, before its checkpoint): it is replaced
    stale = tmp_path / "b" / "snapshots" / NAMES[1]
    shutil.copytree(tmp_path / "b" / "snapshots" / NAMES[0], stale)
    resumed = Trainer(small_run("tiny-mixtral", corpus, *EXTRA), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 3
    resumed.train()
    a, b = weights(straight.model), weights(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _snapshot_files(tmp_path / "a") == _snapshot_files(tmp_path / "b")  # bit for bit, meta.json included
    assert sorted(p.name for p in (tmp_path / "b" / "snapshots").iterdir()) == NAMES


def test_a_failed_snapshot_write_leaves_nothing_and_keeps_the_earlier_ones(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = Trainer(small_run("tiny-mixtral", corpus, *EXTRA), run_dir, progress=False)
    trainer.train(stop_at=2)
    before = _snapshot_files(run_dir)
    real_write = snapshots._write_file

    def failing(path, data):
        if path.name == "meta.json":
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(snapshots, "_write_file", failing)
    trainer.step = 4  # as if step 4 were reached
    with pytest.raises(OSError, match="no space left on the device writing the snapshot"):
        trainer.snapshot()
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == NAMES[:1]  # no temporary folder left
    assert _snapshot_files(run_dir) == before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the synced files through /proc (Linux)")
def test_snapshots_are_published_by_one_rename_after_their_files_are_durable(corpus, tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = ckpt.os.fsync, ckpt.os.replace

    def fsync(fd):
        order.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        order.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    run = small_run("dense", corpus, "train.max_steps=1", "train.snapshot_interval=1")
    Trainer(run, tmp_path / "run", progress=False).train()
    root = str((tmp_path / "run" / "snapshots").resolve())
    publish = [i for i, entry in enumerate(order) if entry[0] == "replace" and entry[2] == f"{root}/step-00000001"]
    assert len(publish) == 1  # one rename publishes it
    tmp = order[publish[0]][1]
    assert Path(tmp).parent == Path(root) and Path(tmp).name.startswith(".step-00000001.tmp-")
    synced = [entry[1] for entry in order[:publish[0]] if entry[0] == "fsync"]
    assert {f"{tmp}/model.safetensors", f"{tmp}/meta.json", tmp} <= set(synced)  # files and folder, before it
    assert ("fsync", root) in order[publish[0]:]  # and the rename itself made durable


def test_snapshot_steps_do_not_depend_on_where_a_session_stops():
    train = TrainConfig(max_steps=7, snapshot_interval=3)
    for last in (2, 4, 7):
        policy = CheckpointPolicy(train, last)
        assert [s for s in range(1, 8) if policy.snapshot_now(s)] == [3, 6, 7]
    off = CheckpointPolicy(TrainConfig(max_steps=7), 7)
    assert not any(off.snapshot_now(s) for s in range(1, 8))


@pytest.mark.parametrize("value, words", [(-1, "an integer >= 0"), ("abc", "snapshot_interval"),
                                          (1.5, "snapshot_interval"), (True, "snapshot_interval")])
def test_a_bad_snapshot_interval_is_refused_clearly(value, words):
    with pytest.raises(ValueError, match="snapshot_interval") as error:
        TrainConfig(snapshot_interval=value)
    assert words in str(error.value)


def test_snapshots_with_expert_parallelism_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"snapshot_interval=2 is not allowed: 0 with expert_parallel=2.*--ep 1"):
        TrainConfig(snapshot_interval=2, expert_parallel=2)
    TrainConfig(snapshot_interval=2, expert_parallel=1)
    TrainConfig(snapshot_interval=0, expert_parallel=2)


def test_a_bad_snapshot_interval_on_the_command_line_writes_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--no-progress", *[f"--set={s}" for s in SMALL],
                 f"--set=train.data={corpus}", "--set=train.snapshot_interval=-2"])
    assert code == 2
    assert "TrainConfig.snapshot_interval=-2 is not allowed" in capsys.readouterr().err
    assert not out.exists()


def test_resume_may_turn_snapshots_on_and_a_config_without_the_field_resumes_unchanged(corpus, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(small_run("dense", corpus, "train.max_steps=4"), run_dir, progress=False).train(stop_at=2)
    config = json.loads((run_dir / "config.json").read_text())
    del config["train"]["snapshot_interval"]  # a run written before the field existed
    (run_dir / "config.json").write_text(json.dumps(config))
    resumed = Trainer(RunConfig.from_dict(config), run_dir, resume=True, progress=False)
    assert resumed.run.history == []  # nothing changed: the missing field is its default, 0
    resumed.train(stop_at=3)
    assert not (run_dir / "snapshots").exists()
    turned_on = Trainer(small_run("dense", corpus, "train.max_steps=4", "train.snapshot_interval=1"), run_dir,
                        resume=True, progress=False)
    turned_on.train()
    assert turned_on.run.history == [{"step": 3, "changed": {"train.snapshot_interval": [0, 1]}}]
    assert [s.step for s in find_snapshots(run_dir)] == [4]
    check_replaceable(run_dir)  # a run with snapshots is still a run that --overwrite may replace


@pytest.mark.slow  # 26 s on 2 busy cores: two spawned ranks and a single-process reference
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no torch.distributed gloo backend")
def test_data_parallel_ranks_write_one_set_of_snapshots_of_the_single_process_weights(tmp_path):
    from moekit.config import ModelConfig, MoEConfig

    from .dist_workers import spawn, train_worker

    moe = MoEConfig(hidden_size=32, moe_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    model = ModelConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, moe=moe)

    def run_dict(grad_accum: int) -> dict:
        train = {"seed": 3, "block_size": 16, "batch_size": 2, "grad_accum": grad_accum, "max_steps": 2,
                 "warmup_steps": 1, "eval_interval": 100, "eval_batches": 1, "log_interval": 1,
                 "checkpoint_interval": 100, "device": "cpu", "dtype": "float32", "snapshot_interval": 1}
        return {"name": "dp-snapshots", "model": model.to_dict(), "train": train}

    spawn(train_worker, 2, run_dict(1), str(tmp_path / "dp2"), False)  # 2 data-parallel ranks, --ep 1
    Trainer(RunConfig.from_dict(run_dict(2)), tmp_path / "one", progress=False).train()
    assert sorted(p.name for p in (tmp_path / "dp2" / "snapshots").iterdir()) == ["step-00000001", "step-00000002"]
    for snapshot in find_snapshots(tmp_path / "dp2"):
        mine = load_file(str(snapshot.path / "model.safetensors"))
        single = load_file(str(tmp_path / "one" / "snapshots" / snapshot.path.name / "model.safetensors"))
        assert mine.keys() == single.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], single[name], atol=1e-5, rtol=1e-5, msg=name)
