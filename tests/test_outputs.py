"""export / merge / upcycle outputs: nothing lost, nothing silently wrong.

`--overwrite` replaces only a folder moekit wrote (`moekit_output.json` and the files it lists), never a training
run, a folder holding anything else, or the command's own input. A full disk or a read-only destination is one
clear line, leaves no temporary folder and keeps the previous output; a killed writer's temporary folder is
removed by the next write; an expert with another vocabulary is merged with a warning.

Storage faults are real ones: a size-limited tmpfs (or a read-only remount of one) in a private mount namespace
(`unshare -rm`); without unshare, a file-size limit (RLIMIT_FSIZE) in the child and a chmod 0o555 folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

from moekit._files import temp_sibling  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.config import ModelConfig, MoEConfig  # noqa: E402
from moekit.interop import export_hf, load_hf  # noqa: E402
from moekit.interop.merge import merge  # noqa: E402
from moekit.interop.outputs import MARKER_NAME, check_output, read_marker  # noqa: E402
from moekit.interop.upcycle import upcycle  # noqa: E402

from .merge_fixtures import load_checked, make_dense_model  # noqa: E402
from .run_helpers import SMALL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# a child process that runs one moekit command and reports what it left on the (faulty) disk
DRIVER = r'''
import contextlib, hashlib, io, json, os, sys

job = json.loads(sys.argv[1])
result = {"rc": None, "exception": None}
captured = io.StringIO()
try:
    from moekit.cli import main
    with contextlib.redirect_stderr(captured):
        result["rc"] = main(job["argv"])
except BaseException as error:
    result["exception"] = [type(error).__name__, str(error)]
result["stderr"] = captured.getvalue()
disk = job["disk"]
out = os.path.join(disk, "out")
result["listing"] = sorted(os.listdir(disk))
if os.path.isdir(out):
    result["files"] = {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
                       for name in sorted(os.listdir(out))}
print("RESULT " + json.dumps(result))
'''

# a child process exporting a ~50 MB model in 1 MB shards, slow enough to be killed mid-write
SLOW_WRITER = r'''
import sys
from moekit.config import ModelConfig, MoEConfig
from moekit.interop import export_hf
from moekit.model import MoETransformer

moe = MoEConfig(hidden_size=256, moe_intermediate_size=512, num_local_experts=8, num_experts_per_tok=2)
config = ModelConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=64, moe=moe)
export_hf(MoETransformer(config), sys.argv[1], max_shard_bytes=1_000_000)
'''


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _quiet(quiet_transformers):
    """Every test here runs with transformers' log quiet (conftest's `quiet_transformers`)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny-mixtral training run (byte tokenizer)."""
    path = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--out", str(path), "--max-steps", "2", "--no-progress", *[f"--set={s}" for s in SMALL]]) == 0
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny llama base and two expert sources of the same vocabulary."""
    root = tmp_path_factory.mktemp("dense")
    base = make_dense_model(root / "base", "llama", seed=0)
    return base, [make_dense_model(root / f"src{i}", "llama", seed=i + 1) for i in range(2)]


def _merge_config(base: Path, sources: list[Path], **extra: object) -> dict:
    experts = [{"source_model": str(s), "positive_prompts": [f"prompt {i}"]} for i, s in enumerate(sources)]
    return {"base_model": str(base), "gate_mode": "random", "experts": experts, **extra}


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _footprint(path: Path) -> int:
    """Bytes the folder's files take on a page-granular file system such as tmpfs."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.iterdir()) + 4096


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@functools.cache
def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def _faulty_run(tmp_path: Path, argv, previous: Path, fault: str, *, tmpfs_bytes: int = 0,
                file_limit: int = 0) -> tuple[dict, str]:
    """Run `moekit argv(OUT)` in a child where OUT = DISK/out is a copy of `previous` on a faulty DISK.

    fault="full": DISK is a tmpfs of `tmpfs_bytes` (or, without unshare, the child's files may not exceed
    `file_limit` bytes); fault="read-only": DISK is a read-only tmpfs (without unshare: a chmod 0o555 folder).
    Returns the child's report and the words its error must contain.
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    job = json.dumps({"argv": [str(a) for a in argv(out)], "disk": str(disk)})
    child = [sys.executable, str(driver), job]
    env = {**_child_env(), "PYTHONWARNINGS": "ignore"}
    preexec = None
    if _unshare_works():
        size = tmpfs_bytes if fault == "full" else 16 * 2**20
        steps = [f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))}",
                 f"cp -r {shlex.quote(str(previous))} {shlex.quote(str(out))}"]
        if fault == "read-only":
            steps.append(f"mount -o remount,ro {shlex.quote(str(disk))}")
        steps.append("exec " + " ".join(shlex.quote(part) for part in child))
        command = ["unshare", "-rm", "sh", "-c", " && ".join(steps)]
        words = "no space left" if fault == "full" else "read-only"
    else:
        shutil.copytree(previous, out)
        command = child
        if fault == "full":
            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            words = "file size limit"
        else:
            if os.geteuid() == 0:
                pytest.skip("no working unshare, and chmod cannot make a folder read-only for root")
            os.chmod(disk, 0o555)
            words = "permission denied"
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, preexec_fn=preexec,
                              timeout=300)
    finally:
        os.chmod(disk, 0o755)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the child reported nothing (rc {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT ")), words


def _one_line_error(result: dict, command: str) -> str:
    """The child's error message, checked to be one `moekit <command>: error:` line on stderr with rc 2."""
    assert result["exception"] is None, f"moekit {command} raised instead of reporting: {result['exception']}"
    assert result["rc"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moekit {command}: error: "), result["stderr"]
    return lines[0]


# ---------------------------------------------------------------------------------------------- --overwrite
def test_export_into_its_own_run_is_refused_and_the_run_is_intact(run, capsys):
    before = _tree(run)
    siblings = sorted(p.name for p in run.parent.iterdir())
    assert main(["export", str(run), str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"'{run}' is '{run}', which this command reads" in err and "choose another out_dir" in err
    assert main(["export", str(run), str(run / "hf")]) == 2  # inside the run
    assert "lies inside" in capsys.readouterr().err
    assert main(["export", str(run), str(run.parent), "--overwrite"]) == 2  # around the run
    assert "contains" in capsys.readouterr().err
    assert _tree(run) == before and sorted(p.name for p in run.parent.iterdir()) == siblings
    # through the API, and a training run is never replaced even when it is not this command's input
    model = _tiny_model()
    with pytest.raises(ValueError, match="which this command reads"):
        export_hf(model, run, overwrite=True, inputs=[run])
    with pytest.raises(FileExistsError, match=r"is a moekit training run.*even with overwrite=True"):
        export_hf(model, run, overwrite=True)
    assert _tree(run) == before


def test_overwrite_refuses_a_folder_holding_what_moekit_did_not_write(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert main(["export", str(run), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"'{out}'" in err and "'notes.txt', which its moekit_output.json does not list" in err
    assert "delete it by hand or choose another out_dir" in err
    plain = tmp_path / "plain"  # no marker at all
    plain.mkdir()
    (plain / "data.bin").write_bytes(b"\x00" * 10)
    assert main(["export", str(run), str(plain), "--overwrite"]) == 2
    assert "'data.bin' and no moekit_output.json: moekit did not write it" in capsys.readouterr().err
    assert _tree(out) == before and _tree(plain) == {"data.bin": b"\x00" * 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "plain"]


def test_overwrite_replaces_a_previous_export_that_still_loads(run, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert main(["export", str(run), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert json.loads((out / MARKER_NAME).read_text()) == {
        "written_by": "moekit", "command": "export", "files": [n for n in names if n != MARKER_NAME]}
    assert names == ["config.json", "generation_config.json", "model.safetensors", MARKER_NAME]
    assert load_checked(out).model.embed_tokens.weight.shape[1] == 32  # transformers ignores the marker
    assert load_hf(out).embed_tokens.weight.dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_merge_and_upcycle_refuse_to_write_over_their_inputs(dense, tmp_path, capsys):
    base, sources = dense
    before = {path: _tree(path) for path in (base, *sources)}
    siblings = sorted(p.name for p in base.parent.iterdir())
    config = _merge_config(base, sources)
    for out, relation in ((base, "is"), (sources[1], "is"), (base.parent, "contains"), (base / "moe", "lies inside")):
        with pytest.raises(ValueError, match=f"{relation} '.*', which this command reads"):
            merge(config, out, overwrite=True, progress=False)
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    shutil.copyfile(base / "tokenizer.json", tokenizer / "tokenizer.json")
    with pytest.raises(ValueError, match=f"'{tokenizer}' is '{tokenizer}', which this command reads"):
        merge({**config, "tokenizer_source": str(tokenizer)}, tokenizer, overwrite=True, progress=False)
    assert [p.name for p in tokenizer.iterdir()] == ["tokenizer.json"]
    with pytest.raises(ValueError, match=f"'{base}' is '{base}', which this command reads"):
        upcycle(base, base, 4, 2, overwrite=True, progress=False)
    assert main(["upcycle", str(base), str(base), "--overwrite", "--no-progress"]) == 2
    assert "which this command reads" in capsys.readouterr().err
    assert {path: _tree(path) for path in (base, *sources)} == before
    assert sorted(p.name for p in base.parent.iterdir()) == siblings


# ---------------------------------------------------------------------------------------------- storage faults
def test_disk_full_during_export_is_one_line_and_keeps_the_previous_export(run, tmp_path):
    previous = tmp_path / "previous"
    assert main(["export", str(run), str(previous), "--dtype", "bfloat16"]) == 0
    weights = (previous / "model.safetensors").stat().st_size  # the float32 export needs twice that
    result, words = _faulty_run(tmp_path, lambda out: ["export", run, out, "--overwrite", "--dtype", "float32"],
                                previous, "full", tmpfs_bytes=_footprint(previous) + weights,
                                file_limit=weights * 3 // 2)
    line = _one_line_error(result, "export")
    assert words in line and str(tmp_path / "disk" / "out") in line and "needs" in line
    assert result["listing"] == ["out"]  # no temporary folder left
    assert result["files"] == _hashes(previous)  # the previous export untouched


def test_disk_full_during_merge_is_one_line_and_keeps_the_previous_output(dense, tmp_path):
    base, sources = dense
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_merge_config(base, sources, dtype="bfloat16")))
    previous = merge(config, tmp_path / "previous", progress=False).out
    weights = (previous / "model.safetensors").stat().st_size
    config.write_text(yaml.safe_dump(_merge_config(base, sources, dtype="float32")))
    result, words = _faulty_run(tmp_path, lambda out: ["merge", config, out, "--overwrite", "--no-progress"],
                                previous, "full", tmpfs_bytes=_footprint(previous) + weights,
                                file_limit=weights * 3 // 2)
    line = _one_line_error(result, "merge")
    assert words in line and "merged model" in line and str(tmp_path / "disk" / "out") in line
    assert result["listing"] == ["out"]
    assert result["files"] == _hashes(previous)


def test_read_only_destination_is_one_clear_line(run, tmp_path):
    previous = tmp_path / "previous"
    assert main(["export", str(run), str(previous)]) == 0
    result, words = _faulty_run(tmp_path, lambda out: ["export", run, out, "--overwrite"], previous, "read-only")
    line = _one_line_error(result, "export")
    assert words in line and str(tmp_path / "disk" / "out") in line and "choose a" in line
    assert result["listing"] == ["out"] and result["files"] == _hashes(previous)


# ---------------------------------------------------------------------------------------------- temp folders
def _tiny_model():
    from moekit.model import MoETransformer

    moe = MoEConfig(hidden_size=32, moe_intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64, moe=moe)).eval()


def test_a_killed_writers_temp_folder_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "hf"
    script = tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    env = _child_env()
    child = subprocess.Popen([sys.executable, str(script), str(out)], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    leftover = None
    try:
        deadline = time.monotonic() + 120
        while leftover is None and time.monotonic() < deadline and child.poll() is None:
            for candidate in tmp_path.glob(".hf.tmp-*"):
                if any(candidate.iterdir()):  # it has started writing shards
                    leftover = candidate
            time.sleep(0.002)
    finally:
        child.kill()  # SIGKILL: no cleanup runs
        stderr = child.communicate()[1]
    assert leftover is not None, f"the writer never wrote (rc {child.returncode}): {stderr[-2000:]!r}"
    assert child.returncode == -signal.SIGKILL and leftover.is_dir() and f"-{child.pid}-" in leftover.name
    assert not out.exists()
    live = temp_sibling(out)  # a writer that is still running (this process) keeps its folder
    live.mkdir()
    export_hf(_tiny_model(), out)
    assert not leftover.exists() and live.is_dir() and read_marker(out)["command"] == "export"
    live.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "slow_writer.py"]


# ---------------------------------------------------------------------------------------------- vocabulary
def test_an_expert_with_another_vocabulary_warns(dense, tmp_path):
    base, sources = dense
    rows = make_dense_model(tmp_path / "rows", "llama", seed=5, vocab_size=352)  # another embedding size
    renumbered = make_dense_model(tmp_path / "renumbered", "llama", seed=6, tokenizer=False)
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two tokens swap ids: same size, other meaning
    (renumbered / "tokenizer.json").write_text(json.dumps(tokenizer))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(_merge_config(base, sources), tmp_path / "same", dry_run=True, progress=False)
    assert not [w for w in caught if "vocabulary" in str(w.message)]
    with pytest.warns(UserWarning, match=rf"expert model {rows} has a different vocabulary from the base model "
                                         rf"{base}: its config's vocab_size is 352, the base's 320\. The merged model "
                                         "uses the base's embeddings and tokenizer"):
        merge(_merge_config(base, [sources[0], rows]), tmp_path / "out", dry_run=True, progress=False)
    with pytest.warns(UserWarning, match=rf"expert model {renumbered} .*2 token\(s\) differ, first "
                                         rf"{re.escape(repr(first))} is id 11 there and 10 in the base.*uses the "
                                         "base's embeddings and tokenizer"):
        merge(_merge_config(base, [renumbered, sources[1]]), tmp_path / "out", dry_run=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_check_output_allows_only_moekit_outputs(tmp_path):
    out = tmp_path / "o"
    assert check_output(out, overwrite=False, caller="t") == out  # missing: fine
    out.mkdir()
    assert check_output(out, overwrite=False, caller="t") == out  # empty: fine
    (out / "config.json").write_text("{}")
    (out / MARKER_NAME).write_text(json.dumps({"written_by": "moekit", "command": "merge", "files": ["config.json"]}))
    check_output(out, overwrite=True, caller="t")  # moekit's: replaceable
    (out / MARKER_NAME).write_text("{not json")
    with pytest.raises(FileExistsError, match=r"moekit_output\.json is not one moekit wrote"):
        check_output(out, overwrite=True, caller="t")
    (out / MARKER_NAME).unlink()
    (out / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    with pytest.raises(FileExistsError, match="is a moekit training run"):
        check_output(out, overwrite=True, caller="t")
