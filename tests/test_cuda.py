"""moekit's CUDA paths against its CPU ones, for `scripts/gpu_check.sh` on a machine with a GPU (CI has none).

Every test here is marked `cuda` and skipped where no CUDA device is visible. `MOEKIT_TEST_DEVICE=cpu` runs the same
checks with the CPU as the second device (then both sides run on the CPU), which proves the checks themselves on a
machine without a GPU: `MOEKIT_TEST_DEVICE=cpu python -m pytest -q -m cuda`.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from moekit.model import MoETransformer
from moekit.model.generate import generate

from .run_helpers import small_run

DEVICE = os.environ.get("MOEKIT_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (scripts/gpu_check.sh runs these where one is lent)"),
]

#: every preset with a router of its own kind, and the dense baseline
PRESETS = ["tiny-mixtral", "tiny-deepseek", "tiny-deepseek-v3", "switch", "expert-choice", "hierarchical", "dense"]
BACKENDS = ["loop", "bmm", "grouped_mm"]


def _model(preset: str, corpus, *extra: str) -> tuple[MoETransformer, object]:
    run = small_run(preset, corpus, *extra)
    torch.manual_seed(0)
    return MoETransformer(run.model), run


def _cases() -> list[tuple[str, str | None]]:
    return [(p, None) if p == "dense" else (p, b) for p in PRESETS for b in (BACKENDS if p != "dense" else [None])]


@pytest.mark.parametrize(("preset", "backend"), _cases())
def test_fp32_forward_and_gradients_equal_the_cpu(preset, backend, corpus):
    """The same weights and tokens in fp32: logits, loss and every gradient as on the CPU (TF32 off)."""
    extra = [f"model.moe.expert_backend={backend}"] if backend else []
    model, run = _model(preset, corpus, *extra)
    model.train()
    other = copy.deepcopy(model).to(DEVICE)
    ids = torch.randint(0, run.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        expected = model(ids, targets=ids)
        got = other(ids.to(DEVICE), targets=ids.to(DEVICE))
        (expected.loss + expected.aux_loss).backward()
        (got.loss + got.aux_loss).backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(got.logits.cpu(), expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.aux_loss.cpu(), expected.aux_loss, atol=1e-5, rtol=1e-5)
    grads = dict(other.named_parameters())
    for name, param in model.named_parameters():
        if param.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(grads[name].grad.cpu(), param.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-deepseek"])
def test_bf16_forward_stays_close_to_fp32(preset, corpus):
    """bf16 weights on the device: logits within bf16's precision of the fp32 CPU model."""
    model, run = _model(preset, corpus)
    model.eval()
    ids = torch.randint(0, run.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        got = copy.deepcopy(model).to(DEVICE, torch.bfloat16)(ids.to(DEVICE)).logits.float().cpu()
    assert torch.isfinite(got).all()
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) < 0.05 * scale + 0.05


def test_greedy_generation_with_the_kv_cache_equals_the_cpu(corpus):
    model, run = _model("tiny-mixtral", corpus)
    model.eval()
    prompt = torch.randint(0, run.model.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    got = generate(copy.deepcopy(model).to(DEVICE), prompt.to(DEVICE), max_new_tokens=8, temperature=0.0)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moekit_train_on_the_device(dtype, corpus, tmp_path):
    """`moekit train` on the device: 4 steps with finite losses and an eval, and 2 + 2 resumed equal to 4 straight."""
    from moekit.cli import main
    from moekit.train.load import load_run

    out = tmp_path / "run"
    common = ["--preset", "tiny-mixtral", "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=2",
              "--set", "model.num_attention_heads=2", "--set", "model.moe.hidden_size=32",
              "--set", "model.moe.moe_intermediate_size=32", "--set", "train.block_size=32",
              "--set", "train.batch_size=4", "--set", f"train.data={corpus}", "--set", f"train.device={DEVICE}",
              "--set", f"train.dtype={dtype}", "--set", "train.eval_interval=4", "--set", "train.eval_batches=2",
              "--set", "train.checkpoint_interval=2", "--set", "train.log_interval=1", "--no-progress"]
    assert main(["train", *common, "--max-steps", "4", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert any(r["kind"] == "eval" for r in records)
    # 2 steps, then --resume to 4: the same weights as the straight run, bit for bit
    split = tmp_path / "split"
    assert main(["train", *common, "--max-steps", "4", "--stop-at", "2", "--out", str(split)]) == 0
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0
    straight, resumed = (load_run(str(d))[1].state_dict() for d in (out, split))
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_transformers_model_with_moekit_experts_equals_eager_on_the_device(model_type):
    """transformers' own model on the device: `experts_implementation="moekit"` against its `eager` experts, fp32."""
    pytest.importorskip("transformers.integrations.moe", reason="moekit.hf needs transformers >= 5")
    import moekit.hf  # noqa: F401  (registers the experts implementations)

    from .hf_zoo import tiny_model

    model = tiny_model(model_type).to(DEVICE).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = {}
    for implementation in ("eager", "moekit"):
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[implementation] = (out.logits.detach().cpu(),
                                   {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    (eager_logits, eager_grads), (ours_logits, ours_grads) = results["eager"], results["moekit"]
    torch.testing.assert_close(ours_logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert ours_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
