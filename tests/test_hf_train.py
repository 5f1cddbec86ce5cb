"""Fine-tuning transformers' own MoE classes with `moekit train --init-from DIR` (`train.backend=transformers`).

Each family is a tiny random HF folder (transformers' own class, saved by transformers) with a small BPE
tokenizer built here. References: the folder's own weights (frozen routers stay bit-identical), the family's
selection-bias buffer, a straight run of N+M steps (resume), and transformers loading the written folder.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="moekit.hf needs transformers >= 5 (ExpertsInterface)")
pytest.importorskip("tokenizers")

from moekit.cli import main
from moekit.train.config import RunConfig
from moekit.train.init_from import init_from_values
from moekit.train.loop import Trainer

from .hf_zoo import tiny_model
from .merge_fixtures import VOCAB_SIZE, WORDS, make_tokenizer, write_words_corpus

FAMILIES = ["qwen3_moe", "olmoe", "gpt_oss", "llama4", "granitemoe", "phimoe", "dbrx", "deepseek_v2", "deepseek_v3",
            "minimax", "qwen3_next", "jamba"]
#: families whose router carries a selection bias (`e_score_correction_bias`) in transformers 5.25
WITH_SELECTION_BIAS = {"deepseek_v3"}
SETTINGS = ["train.block_size=16", "train.batch_size=4", "train.seed=0", "train.eval_batches=1",
            "train.eval_interval=100", "train.log_interval=1", "train.checkpoint_interval=100", "train.warmup_steps=0",
            "train.lr=0.01", "train.max_steps=5", "train.backend=transformers"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_words_corpus(tmp_path_factory.mktemp("corpus") / "words.txt")


def make_folder(root: Path, model_type: str, **overrides) -> Path:
    folder = root / model_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model(model_type, vocab_size=VOCAB_SIZE, **overrides).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def run_config(folder: Path, corpus: Path, *extra: str) -> RunConfig:
    values = init_from_values({"train": {}}, [f"train.init_from={folder}", f"train.data={corpus}", *SETTINGS,
                                              *extra])
    return RunConfig.from_dict(values)


def routers(model) -> dict[str, torch.Tensor]:
    names = set(model.router_parameter_names())
    return {name: p.detach().clone() for name, p in model.named_parameters() if name in names}


def selection_biases(model) -> dict[int, torch.Tensor]:
    return {number: bias.clone() for number, bias in model.biases.items()}


def fixed_batch_loss(model, batch: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        out = model(batch[:, :-1], targets=batch[:, 1:])
    model.train()
    return float(out.loss)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fine_tune_resume_and_export(model_type, corpus, tmp_path, quiet_transformers):
    folder = make_folder(tmp_path, model_type)
    run = run_config(folder, corpus, "train.freeze_router=true", "model.router_aux_loss_coef=0.01")
    assert run.uses_transformers and run.model.hf_config["model_type"] == json.loads(
        (folder / "config.json").read_text())["model_type"]
    assert run.model.hf_config.get("output_router_logits", False) is False  # the aux loss is moekit's, not this flag

    straight = Trainer(run, tmp_path / "straight", progress=False)
    model = straight.model
    routers_before, biases_before = routers(model), selection_biases(model)
    assert routers_before and all(not p.requires_grad for n, p in model.named_parameters() if n in routers_before)
    drawn = straight.sampler.state_dict()
    inputs, targets = straight.sampler.next_batch()  # a fixed batch: the first one training will see
    batch = torch.cat([inputs, targets[:, -1:]], dim=1)
    straight.sampler.load_state_dict(drawn)
    loss_before = fixed_batch_loss(model, batch)
    result = straight.train()
    assert result.step == 5
    assert fixed_batch_loss(model, batch) < loss_before  # training lowers the loss on a fixed batch
    for name, before in routers_before.items():  # freeze_router: the routers' weights are bit-identical
        assert torch.equal(dict(model.named_parameters())[name], before), name
    biases_after = selection_biases(model)
    if model_type in WITH_SELECTION_BIAS:
        assert biases_after and all(not torch.equal(biases_after[k], biases_before[k]) for k in biases_before)
    else:
        assert biases_after == {}
    train_records = [r for r in records(tmp_path / "straight") if r["kind"] == "train"]
    assert all(r["aux_loss"] > 0 for r in train_records)  # on with its coefficient, output_router_logits False
    assert all(len(r["load"]) >= 1 and r["max_violation"] >= 0 for r in train_records)

    # resume: 3 steps, stop, 2 more == 5 straight, bit for bit
    first = Trainer(run, tmp_path / "resumed", progress=False)
    assert first.train(stop_at=3).step == 3
    second = Trainer(run, tmp_path / "resumed", resume=True, progress=False)
    assert second.step == 3 and second.train().step == 5
    straight_state, resumed_state = straight.model.state_dict(), second.model.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for name, tensor in straight_state.items():
        assert torch.equal(tensor, resumed_state[name]), name

    # the trained model as an HF folder that transformers loads with the same logits
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "straight"), str(out)]) == 0
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=batch).logits
        model.eval()
        mine = model(batch).logits
    assert torch.allclose(theirs, mine, atol=1e-5, rtol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_aux_loss_trains_the_router_and_is_zero_when_off(corpus, tmp_path, quiet_transformers):
    folder = make_folder(tmp_path, "olmoe")
    on = Trainer(run_config(folder, corpus, "model.router_aux_loss_coef=0.5", "train.max_steps=2"),
                 tmp_path / "on", progress=False)
    out = on.model(torch.randint(0, 300, (2, 9)), targets=torch.randint(0, 300, (2, 9)))
    assert float(out.aux_loss) > 0
    out.aux_loss.backward()  # the balancing loss alone reaches the router
    gate = on.model.model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0
    off = Trainer(run_config(folder, corpus, "model.router_aux_loss_coef=0", "train.max_steps=2"),
                  tmp_path / "off", progress=False)
    assert float(off.model(torch.randint(0, 300, (2, 9))).aux_loss) == 0.0


def test_switch_aux_loss_equals_a_hand_computation(corpus, tmp_path, quiet_transformers):
    """E * sum_i f_i P_i from transformers' own router logits and top-k choice, padding left out."""
    folder = make_folder(tmp_path, "qwen3_moe")
    trainer = Trainer(run_config(folder, corpus, "model.router_aux_loss_coef=1.0"), tmp_path / "run",
                      progress=False)
    model = trainer.model
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    out = model(ids, attention_mask=mask)
    with torch.no_grad():
        reference = model.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    expected = 0.0
    keep = mask.reshape(-1).bool()
    for logits in reference.router_logits:
        probs = logits.float().softmax(-1)[keep]
        top = probs.topk(2, dim=-1).indices  # the tiny Qwen3-MoE routes top-2 of the softmax
        experts = probs.shape[-1]
        fraction = torch.bincount(top.reshape(-1), minlength=experts).float() / top.numel()
        expected += experts * float((fraction * probs.mean(0)).sum())
    assert float(out.aux_loss) == pytest.approx(expected, rel=1e-5)


def test_train_only_router_and_freeze_patterns(corpus, tmp_path, quiet_transformers):
    folder = make_folder(tmp_path, "granitemoe")
    trainer = Trainer(run_config(folder, corpus, "train.train_only_router=true", "train.max_steps=2"),
                      tmp_path / "router-only", progress=False)
    router_names = set(trainer.model.router_parameter_names())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) == (name not in router_names), name
    assert trainer.num_trainable == sum(before[n].numel() for n in router_names)

    frozen = Trainer(run_config(folder, corpus, r"train.freeze=experts,embed_tokens", "train.max_steps=1"),
                     tmp_path / "patterns", progress=False)
    assert frozen.frozen and all("experts" in n or "embed_tokens" in n for n in frozen.frozen)
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(run_config(folder, corpus, "train.freeze=no_such_weight"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_auto_backend_picks_transformers_for_families_moekit_does_not_convert(corpus, tmp_path, quiet_transformers):
    native = make_folder(tmp_path, "qwen3_moe")
    other = make_folder(tmp_path, "granitemoe")
    auto = {"train.backend=transformers"}
    settings = [s for s in SETTINGS if s not in auto]
    for folder, backend in ((native, "moekit"), (other, "transformers")):
        values = init_from_values({"train": {}}, [f"train.init_from={folder}", f"train.data={corpus}", *settings])
        assert values["train"]["backend"] == backend
    with pytest.raises(ValueError, match="aux_free_bias_update_rate"):
        Trainer(run_config(other, corpus, "model.aux_free_bias_update_rate=0.01"), tmp_path / "no-bias",
                progress=False)


def test_cli_train_generate_eval_info_on_a_transformers_run(corpus, tmp_path, capsys, quiet_transformers):
    folder = make_folder(tmp_path, "phimoe")
    run_dir = tmp_path / "run"
    args = ["train", "--init-from", str(folder), "--out", str(run_dir), "--no-progress", "--set",
            f"train.data={corpus}"]
    for item in [s for s in SETTINGS if not s.startswith("train.max_steps")] + ["train.max_steps=2"]:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "PhimoeForCausalLM" in printed and "experts_implementation='moekit'" in printed
    report = (run_dir / "report.md").read_text()
    assert "transformers' own phimoe class" in report and "expert" in report.lower()
    assert main(["generate", str(run_dir), "--prompt", "cook bread", "--max-new-tokens", "4", "--temperature",
                 "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0
    assert "val loss" in capsys.readouterr().out
    assert main(["info", str(run_dir)]) == 0
    assert "parameters" in capsys.readouterr().out


@pytest.mark.parametrize("model_type", ["granitemoe", "llama4", "dbrx", "jamba"])
def test_info_counts_agree_with_the_measured_model(model_type, corpus, tmp_path, quiet_transformers):
    """`moekit info` on a folder moekit does not convert (meta-device count, k from the config) against the
    trained model's own count (k measured from a forward)."""
    from moekit.info import load_info_source

    folder = make_folder(tmp_path, model_type)
    info = load_info_source(folder)
    model = Trainer(run_config(folder, corpus, "train.max_steps=1"), tmp_path / "run", progress=False).model
    assert info.total_params == model.num_parameters()
    assert info.active_params == model.num_parameters(active=True) < info.total_params


CHAT_TEMPLATE = ("{% for message in messages %}{{ '<s>' + message['role'] + '\\n' }}"
                 "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '</s>' }}"
                 "{% endgeneration %}{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")


def chat_folder(tmp_path: Path) -> tuple[Path, Path, list[list[dict]]]:
    folder = make_folder(tmp_path, "olmoe")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    rng = random.Random(1)
    conversations = []
    for _ in range(40):
        turns = [{"role": "system", "content": "give short answers"}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 2)):
            turns.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(5))})
            turns.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(6))})
        conversations.append(turns)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in conversations) + "\n")
    return folder, data, conversations


def test_chat_jsonl_trains_on_the_assistant_tokens_only(tmp_path, quiet_transformers):
    """The token stream and its loss mask against transformers' own `return_assistant_tokens_mask`."""
    from transformers import AutoTokenizer

    from moekit.train.data import TokenDataset
    from moekit.train.tokenizers import HFTokenizer

    folder, data, conversations = chat_folder(tmp_path)
    reference = AutoTokenizer.from_pretrained(folder)
    ids, mask = [], []
    for messages in conversations:
        rendered = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        ids += rendered["input_ids"]
        mask += rendered["assistant_masks"]
    tokenizer = HFTokenizer.from_model_dir(folder)
    dataset = TokenDataset.prepare(data, tokenizer, tmp_path / "cache", block_size=16).write()
    vocab = tokenizer.vocab_size
    assert dataset.label_shift == vocab
    stored = dataset.tokens.long()
    assert (stored % vocab).tolist() == ids
    assert (stored < vocab).long().tolist() == mask
    assert 0 < sum(mask) < len(mask)

    run = run_config(folder, tmp_path, f"train.data={data}", "train.max_steps=2")
    trainer = Trainer(run, tmp_path / "run", progress=False)
    inputs, targets = trainer.sampler.next_batch()
    assert int(inputs.max()) < vocab and (targets == -100).any() and (targets >= 0).any()
    assert trainer.train().step == 2


def test_chat_jsonl_errors_name_the_line(tmp_path, quiet_transformers):
    from moekit.train.data import TokenDataset
    from moekit.train.tokenizers import HFTokenizer

    folder, data, _ = chat_folder(tmp_path)
    tokenizer = HFTokenizer.from_model_dir(folder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        TokenDataset.prepare(bad, tokenizer, tmp_path / "cache", block_size=4)
    only_users = tmp_path / "users.jsonl"
    only_users.write_text(json.dumps({"messages": [{"role": "user", "content": "cook bread"}]}) + "\n")
    with pytest.raises(ValueError, match="no assistant message"):
        TokenDataset.prepare(only_users, tokenizer, tmp_path / "cache", block_size=4)
    plain = make_folder(tmp_path / "plain", "olmoe")  # its tokenizer has no chat template
    with pytest.raises(ValueError, match="has no chat template"):
        TokenDataset.prepare(data, HFTokenizer.from_model_dir(plain), tmp_path / "cache", block_size=4)
    assert not (tmp_path / "cache").exists()


def test_model_overrides_of_a_transformers_run_are_its_balancing_only(corpus, tmp_path, quiet_transformers):
    folder = make_folder(tmp_path, "granitemoe")
    with pytest.raises(ValueError, match="no moe part; set its balancing directly"):
        run_config(folder, corpus, "model.moe.router_aux_loss_coef=0.1")
    with pytest.raises(ValueError, match="HFModelConfig has no field 'hidden_size'"):
        run_config(folder, corpus, "model.hidden_size=64")
    assert run_config(folder, corpus, "model.router_z_loss_coef=0.001").model.router_z_loss_coef == 0.001
