"""`moekit train` starting from a merged or upcycled Hugging Face MoE folder (`train.init_from`).

The checkpoints are tiny dense Llamas from `merge_fixtures`, upcycled with moekit's own `upcycle` (noise on, so the
experts differ). The reference for the first training step is transformers' own model on the same checkpoint
folder, fed batches drawn here from the `tokenizers` library's own encoding of the corpus.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from moekit.cli import load_run_dict, main
from moekit.interop import load_hf
from moekit.interop.upcycle import upcycle
from moekit.train.checkpoint import find_checkpoint
from moekit.train.config import RunConfig, TrainConfig
from moekit.train.data import TokenDataset
from moekit.train.init_from import init_from_values
from moekit.train.loop import Trainer
from moekit.train.tokenizers import BPETokenizer, HFTokenizer, load_tokenizer

from .merge_fixtures import load_checked, make_dense_model, write_words_corpus

BLOCK, BATCH, SEED = 16, 4, 0
TRAIN_SETTINGS = [f"train.block_size={BLOCK}", f"train.batch_size={BATCH}", f"train.seed={SEED}",
                  "train.eval_batches=2", "train.eval_interval=100", "train.log_interval=1",
                  "train.checkpoint_interval=100", "train.warmup_steps=1", "train.lr=0.001"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dense Llama and three MoEs upcycled from it (Mixtral, Qwen2-MoE with a shared expert, GLM4-MoE)."""
    root = tmp_path_factory.mktemp("init_from")
    dense = make_dense_model(root / "dense", "llama")
    out = {"llama": dense}
    for arch, shared in (("mixtral", 0), ("qwen2_moe", 1), ("deepseek_v3", 1)):
        upcycle(dense, root / arch, num_experts=4, top_k=2, shared_experts=shared, noise=0.1, architecture=arch,
                progress=False)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_words_corpus(tmp_path_factory.mktemp("corpus") / "words.txt")


def _train_args(source: Path, out: Path, corpus: Path, *extra: str) -> list[str]:
    args = ["train", "--init-from", str(source), "--out", str(out), "--no-progress", "--set", f"train.data={corpus}"]
    for item in [*TRAIN_SETTINGS, *extra]:
        args += ["--set", item]
    return args


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _reference_first_batch(source: Path, corpus: Path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The first training batch, from the `tokenizers` library's encoding and the documented split and draws."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(source / "tokenizer.json")).encode(corpus.read_text(), add_special_tokens=False).ids
    n_val = max(math.ceil(len(ids) * 0.05), BLOCK + 1)  # val_fraction 0.05, at least one window
    train = torch.tensor(ids[: len(ids) - n_val])
    starts = torch.randint(0, train.numel() - BLOCK, (BATCH,), generator=torch.Generator().manual_seed(SEED))
    windows = torch.stack([train[s : s + BLOCK + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:], ids


def _run_config(source: Path, corpus: Path, *extra: str) -> RunConfig:
    overrides = [f"train.init_from={source}", f"train.data={corpus}", *TRAIN_SETTINGS, *extra]
    return RunConfig.from_dict(init_from_values(load_run_dict(None, None), overrides))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "llama"])
def test_first_step_loss_equals_transformers_and_training_changes_every_weight(arch, checkpoints, corpus, tmp_path):
    source, run_dir = checkpoints[arch], tmp_path / "run"
    extra = ["model.moe.router_aux_loss_coef=0.01"] if arch != "llama" else []  # balancing added on top
    with pytest.warns(UserWarning, match="dense model") if arch == "llama" else contextlib.nullcontext():
        Trainer(_run_config(source, corpus, "train.max_steps=3", *extra), run_dir, progress=False).train()

    inputs, targets, ids = _reference_first_batch(source, corpus)
    cached = torch.from_file(str(run_dir / "data" / "tokens.bin"), size=len(ids), dtype=torch.uint16)
    assert cached.tolist() == ids  # the run's token cache holds the checkpoint tokenizer's own ids

    hf = load_checked(source)
    with torch.no_grad():
        logits = hf(input_ids=inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    records = [r for r in _records(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert records[0]["init_from"] == str(source.resolve())
    if arch != "llama":
        assert records[0]["aux_loss"] > 0.005  # coefficient 0.01 times a balance term near 1

    config = json.loads((run_dir / "config.json").read_text())
    original = load_hf(source, dtype=torch.float32)
    expected_model = original.config.to_dict()
    if arch != "llama":
        expected_model["moe"]["router_aux_loss_coef"] = 0.01
    assert config["model"] == expected_model and config["name"] == source.name
    assert config["train"]["init_from"] == str(source.resolve()) and config["train"]["tokenizer"] == "hf"

    from safetensors.torch import load_file

    trained, before = load_file(str(find_checkpoint(run_dir) / "model.safetensors")), original.state_dict()
    assert trained.keys() == before.keys()
    for name, tensor in before.items():
        if name.endswith("e_score_correction_bias"):  # a buffer, and its update rate is 0 here
            assert torch.equal(trained[name], tensor), name
        else:
            assert trained[name].shape == tensor.shape and not torch.equal(trained[name], tensor), name


def test_resume_is_exact_and_never_reads_the_checkpoint_folder_again(checkpoints, corpus, tmp_path):
    source = tmp_path / "copy"
    shutil.copytree(checkpoints["mixtral"], source)
    straight = Trainer(_run_config(source, corpus, "train.max_steps=4"), tmp_path / "a", progress=False)
    straight.train()
    first = Trainer(_run_config(source, corpus, "train.max_steps=4"), tmp_path / "b", progress=False)
    assert first.train(stop_at=2).step == 2

    shutil.rmtree(source)  # resuming must use the run's own checkpoint and tokenizer, not the folder
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    resumed = Trainer(RunConfig.from_dict(saved), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 2 and isinstance(resumed.tokenizer, HFTokenizer)
    resumed.train()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    saved["train"]["init_from"] = str(tmp_path / "elsewhere")  # the config hash covers init_from
    with pytest.raises(ValueError, match="model config differs"):
        Trainer(RunConfig.from_dict(saved), tmp_path / "b", resume=True, progress=False)


def test_generate_eval_and_export_use_the_checkpoint_tokenizer(checkpoints, corpus, tmp_path, capsys):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    source, run_dir, out = checkpoints["mixtral"], tmp_path / "run", tmp_path / "hf"
    assert main(_train_args(source, run_dir, corpus, "train.max_steps=2")) == 0
    assert f"initialised from {source.resolve()}" in capsys.readouterr().out
    assert str(source.resolve()) in (run_dir / "report.md").read_text()

    assert main(["generate", str(run_dir), "--prompt", "the king and", "--max-new-tokens", "6", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the king and")
    assert main(["eval", str(run_dir), "--batches", "2"]) == 0
    assert "val loss" in capsys.readouterr().out

    reference = Tokenizer.from_file(str(source / "tokenizer.json"))
    run_tokenizer = load_tokenizer(run_dir / "tokenizer")
    assert run_tokenizer.encode_prompt("solve the equation") == reference.encode("solve the equation").ids
    assert run_tokenizer.encode_prompt("x")[0] == 1  # Llama's BOS, as transformers adds it to a prompt

    assert main(["export", str(run_dir), str(out)]) == 0
    exported = load_checked(out)
    assert AutoTokenizer.from_pretrained(str(out))("solve the equation").input_ids == \
        reference.encode("solve the equation").ids
    assert exported.config.eos_token_id == 2
    trained = load_hf(out, dtype=torch.float32)
    ids = torch.tensor([reference.encode("the dragon and the queen cook bread").ids])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, trained(ids).logits, atol=1e-5, rtol=1e-5)


def test_model_overrides_that_change_the_weights_are_refused(checkpoints, corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_train_args(checkpoints["mixtral"], run_dir, corpus, "model.hidden_size=32",
                            "model.moe.hidden_size=32")) == 2
    err = capsys.readouterr().err
    assert "model.hidden_size=32 (the checkpoint has 64)" in err and "router_aux_loss_coef" in err
    assert main(_train_args(checkpoints["mixtral"], run_dir, corpus, "model.moe.num_experts_per_tok=1")) == 2
    assert "model.moe.num_experts_per_tok=1 (the checkpoint has 2)" in capsys.readouterr().err
    assert not run_dir.exists()


def _without(source: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / f"no-{name}"
    shutil.copytree(source, copy)
    (copy / name).unlink()
    return copy


def test_bad_inputs_name_the_problem_and_write_nothing(checkpoints, corpus, tmp_path, capsys):
    from tokenizers import Tokenizer

    mixtral = checkpoints["mixtral"]
    big = tmp_path / "big-tokenizer"
    shutil.copytree(mixtral, big)
    tokenizer = Tokenizer.from_file(str(big / "tokenizer.json"))
    tokenizer.add_tokens([f"<extra{i}>" for i in range(30)])  # 330 ids for 320 embedding rows
    tokenizer.save(str(big / "tokenizer.json"))
    phimoe = tmp_path / "phimoe"  # Mixtral weights under another family's name: transformers' class does not fit
    shutil.copytree(mixtral, phimoe)
    config = json.loads((phimoe / "config.json").read_text())
    (phimoe / "config.json").write_text(json.dumps({**config, "model_type": "phimoe"}))
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a checkpoint")
    cases = [
        (tmp_path / "missing", [], "does not exist"),
        (a_file, [], "is a file, not a folder"),
        (_without(mixtral, tmp_path, "tokenizer.json"), [], "has no tokenizer.json"),
        (_without(mixtral, tmp_path, "config.json"), [], "has no config.json"),
        (big, [], "ids up to 329, but the model's embedding has only 320 rows"),
        (phimoe, [], "its weights do not fit transformers' PhimoeForCausalLM"),
        (mixtral, ["train.tokenizer=bpe"], "TrainConfig.tokenizer='bpe' is not allowed: 'hf' with init_from"),
    ]
    for source, extra, message in cases:
        run_dir = tmp_path / "run"
        assert main(_train_args(source, run_dir, corpus, *extra)) == 2, message
        err = capsys.readouterr().err
        assert message in err, err
        assert not run_dir.exists(), message

    assert main(["train", "--init-from", str(mixtral), "--resume", str(tmp_path / "run")]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_train_config_ties_the_hf_tokenizer_to_init_from():
    assert TrainConfig(init_from="models/merged").tokenizer == "hf"  # the default "byte" gives way
    with pytest.raises(ValueError, match=re.escape("'hf' is the tokenizer.json of train.init_from")):
        TrainConfig(tokenizer="hf")
    with pytest.raises(ValueError, match=re.escape("TrainConfig.init_from=''")):
        TrainConfig(init_from="")
    with pytest.raises(ValueError, match=re.escape("TrainConfig.init_from=3")):
        TrainConfig(init_from=3)


def test_hf_tokenizer_round_trips_and_never_shares_a_token_cache(checkpoints, tmp_path):
    from tokenizers import Tokenizer

    source = checkpoints["mixtral"]
    hf = HFTokenizer.from_model_dir(source)
    assert hf.vocab_size == 300 and hf.eos_token == "</s>" and hf.eos_id == 2
    reference = Tokenizer.from_file(str(source / "tokenizer.json"))
    first, second = "the king", "write a story"
    ids = hf.encode(f"{first}\n\n<|endoftext|>\n\n{second}")  # moekit's document separator becomes </s>
    assert ids == [*reference.encode(f"{first}\n\n", add_special_tokens=False).ids, 2,
                   *reference.encode(f"\n\n{second}", add_special_tokens=False).ids]

    hf.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, HFTokenizer) and again.fingerprint() == hf.fingerprint()
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (tmp_path / "tok" / "tokenizer_config.json").read_bytes() == \
        (source / "tokenizer_config.json").read_bytes()
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary of 300"):
        hf.decode([5, 300])

    # the same tokenizer.json wrapped as moekit's BPE kind encodes differently (no EOS mapping): its own cache
    bpe = BPETokenizer(Tokenizer.from_file(str(source / "tokenizer.json")))
    assert bpe.fingerprint() != hf.fingerprint()
    text = "the king\n\n<|endoftext|>\n\nthe queen " * 20
    built = TokenDataset.from_text(text, bpe, tmp_path / "cache", val_fraction=0.1)
    assert not built.reused
    mine = TokenDataset.from_text(text, hf, tmp_path / "cache", val_fraction=0.1)
    assert not mine.reused and mine.tokens.tolist() == hf.encode(text) != built.tokens.tolist()
    assert TokenDataset.from_text(text, hf, tmp_path / "cache", val_fraction=0.1).reused
