"""`moekit train` end to end: presets, exact resume, Ctrl-C, generation, reports and bad input."""

import json
import warnings

import pytest
import torch

from moekit.cli import load_run_dict, main, preset_names
from moekit.train import loop as loop_module
from moekit.train.config import RunConfig
from moekit.train.loop import Trainer

from .run_helpers import SMALL, small_run, weights


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_trains_with_finite_falling_loss(preset, corpus, tmp_path):
    run = small_run(preset, corpus, "train.max_steps=25")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice warns that it leaks the future; tested below
        result = Trainer(run, tmp_path / preset, progress=False).train()
    records = [json.loads(line) for line in (tmp_path / preset / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert result.step == 25 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    assert result.val_loss is not None and result.val_loss < losses[0]


def test_resume_continues_exactly(corpus, tmp_path):
    straight = Trainer(small_run("tiny-deepseek", corpus, "train.max_steps=20"), tmp_path / "a", progress=False)
    straight.train()
    first = Trainer(small_run("tiny-deepseek", corpus, "train.max_steps=20"), tmp_path / "b", progress=False)
    assert first.train(stop_at=10).step == 10
    resumed = Trainer(small_run("tiny-deepseek", corpus, "train.max_steps=20"), tmp_path / "b", resume=True,
                      progress=False)
    assert resumed.step == 10
    resumed.train()
    a, b = weights(straight.model), weights(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit, the aux-free router bias included


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(corpus, tmp_path, monkeypatch):
    straight = Trainer(small_run("tiny-mixtral", corpus, "train.max_steps=8"), tmp_path / "a", progress=False)
    straight.train()
    run = small_run("tiny-mixtral", corpus, "train.max_steps=8")
    trainer = Trainer(run, tmp_path / "b", progress=False)
    calls = {"n": 0}
    real_next = trainer.sampler.next_batch

    def interrupting_next():
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th batch: Ctrl-C in the middle of step 6
            raise KeyboardInterrupt
        return real_next()

    monkeypatch.setattr(trainer.sampler, "next_batch", interrupting_next)
    result = trainer.train()
    assert result.interrupted and result.step == 5
    resumed = Trainer(run, tmp_path / "b", resume=True, progress=False)
    resumed.train()
    for name, value in weights(straight.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name


def test_default_cli_path_trains_reports_generates_and_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--max-steps", "3", "--no-progress", *[f"--set={s}" for s in SMALL]])
    assert code == 0
    for name in ("config.json", "metrics.jsonl", "report.md", "checkpoints/step-00000003/model.safetensors",
                 "tokenizer"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["name"] == "tiny-mixtral"
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ROMEO:")
    assert main(["eval", str(out), "--batches", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_python_dash_m_moekit_is_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "moekit", "presets"], capture_output=True, text=True, check=True)
    assert done.stdout.split() == preset_names()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "tiny-mixtrall"], r"unknown preset 'tiny-mixtrall'; available: dense"),
        (["train", "--set", "train.learning_rate=1"], r"TrainConfig has no field 'learning_rate'; did you mean 'lr'"),
        (["train", "--set", "model.moe.num_experts_per_tok=99"], r"num_experts_per_tok=99 .*at most num_local_experts"),
        (["train", "--set", "oops"], r"override 'oops' is not KEY=VALUE"),
        (["train", "--set", "train.data=/nonexistent/corpus"], r"/nonexistent/corpus"),
        (["train", "--resume", "/nonexistent/run"], r"cannot resume: .*config.json not found"),
        (["generate", "/nonexistent/run", "--prompt", "x"], r"config.json not found"),
    ],
)
def test_bad_input_names_the_problem(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    import re

    assert re.search(message, capsys.readouterr().err), capsys.readouterr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("model.safetensors"))


def test_empty_data_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        Trainer(small_run("dense", tmp_path / "empty"), tmp_path / "run", progress=False)


def test_existing_run_dir_is_not_overwritten_without_the_flag(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        Trainer(small_run("dense", corpus), run_dir, progress=False)
    assert (run_dir / "keep.txt").read_text() == "precious"


def test_resume_refuses_a_changed_model(corpus, tmp_path):
    Trainer(small_run("dense", corpus, "train.max_steps=2"), tmp_path / "run", progress=False).train()
    changed = small_run("dense", corpus, "train.max_steps=4", "model.intermediate_size=96")
    with pytest.raises(ValueError, match="model config differs"):
        Trainer(changed, tmp_path / "run", resume=True, progress=False)


def test_corrupt_checkpoint_is_refused_clearly(corpus, tmp_path):
    Trainer(small_run("dense", corpus, "train.max_steps=2"), tmp_path / "run", progress=False).train()
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(small_run("dense", corpus, "train.max_steps=4"), tmp_path / "run", resume=True, progress=False)


def test_soft_moe_needs_an_explicit_opt_in_and_expert_choice_warns(corpus, tmp_path):
    with pytest.raises(ValueError, match="allow_token_mixing"):
        Trainer(small_run("tiny-mixtral", corpus, "model.moe.router=soft", "model.moe.router_aux_loss_coef=0"),
                tmp_path / "soft", progress=False)
    with pytest.warns(UserWarning, match="leaks the future"):
        Trainer(small_run("expert-choice", corpus), tmp_path / "ec", progress=False)


def test_checkpoint_swap_leaves_no_temporary_directories(corpus, tmp_path):
    Trainer(small_run("dense", corpus, "train.max_steps=10"), tmp_path / "run", progress=False).train()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000005", "step-00000010"]  # the newest two (train.keep_checkpoints), nothing else


def test_optimizer_is_the_fused_adamw_and_steps_like_the_plain_one():
    # the fused kernel is an implementation choice: its updates must equal the default AdamW's
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    run = RunConfig()
    fused = loop_module.build_optimizer(model, run)
    assert fused.defaults["fused"] is True  # the torch these tests run on has the CPU kernel
    t = run.train
    matrices = [p for p in twin.parameters() if p.dim() >= 2]
    vectors = [p for p in twin.parameters() if p.dim() < 2]
    plain = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay},
                               {"params": vectors, "weight_decay": 0.0}], lr=t.lr, betas=(t.beta1, t.beta2),
                              foreach=False)
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, fused), (twin, plain)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for got, want in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert loop_module.lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert loop_module.lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert loop_module.lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert loop_module.lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_compare_puts_runs_side_by_side_and_flags_leaking_routers(corpus, tmp_path, capsys):
    Trainer(small_run("dense", corpus, "train.max_steps=5"), tmp_path / "dense", progress=False).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(small_run("expert-choice", corpus, "train.max_steps=5"), tmp_path / "ec", progress=False).train()
    assert main(["compare", str(tmp_path / "dense"), str(tmp_path / "ec"), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| dense") or line.startswith("| expert-choice")]
    assert len(rows) == 2
    assert "leaks future: not comparable" in rows[1] and "leaks" not in rows[0]
    assert (tmp_path / "cmp" / "compare.md").is_file() and (tmp_path / "cmp" / "compare.png").is_file()


def test_info_of_a_preset_matches_the_instantiated_model(capsys):
    from moekit.model import MoETransformer

    assert main(["info", "tiny-mixtral"]) == 0
    text = capsys.readouterr().out
    model = MoETransformer(RunConfig.from_dict(load_run_dict("tiny-mixtral", None)).model)
    total_m = model.num_parameters() / 1e6
    assert f"{total_m:.2f} M" in text


def test_export_cli_writes_a_checkpoint_transformers_loads_with_the_same_logits(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from moekit.interop import load_hf

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "2", "--no-progress", *[f"--set={s}" for s in SMALL]]) == 0
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ours = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 2  # exists: refused
    assert "overwrite" in capsys.readouterr().err


def test_tiny_deepseek_v3_trains_and_exports_as_deepseek_v3(corpus, tmp_path):
    # the preset with DeepSeek-V3's latent attention: trained, exported, and computed alike by transformers' own class
    transformers = pytest.importorskip("transformers")
    from moekit.train.load import load_run

    from .run_helpers import small_overrides

    run = tmp_path / "run"
    sets = small_overrides("tiny-deepseek-v3", corpus, "train.max_steps=3")
    assert main(["train", "--preset", "tiny-deepseek-v3", "--out", str(run), "--no-progress",
                 *[f"--set={s}" for s in sets]]) == 0
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    _, ours, _ = load_run(str(run))
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
