"""Every native family against transformers' own classes: load, export, round trip, KV cache, info, refusals.

Each case of `family_cases.CASES` is a tiny checkpoint saved by transformers (`save_pretrained`) with the family's
features on and weights the way trained checkpoints have them. `load_hf` must give logits equal to transformers'
(fp32, 1e-4); `export_hf` must write a folder transformers loads with the same logits, and which `load_hf` reads
back bit for bit; incremental decoding with moekit's KV cache must give the full forward's logits (sliding windows,
sinks and latent attention included); `moekit info` must count exactly the parameters transformers builds. Every
transformers MoE block class (`hf_zoo`) is either computed exactly by `MoELayer.from_hf` or refused with a
ValueError naming the class: no third outcome.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moekit import MoELayer  # noqa: E402
from moekit.families import FAMILIES, MOE_FAMILIES  # noqa: E402
from moekit.info import load_info_source  # noqa: E402
from moekit.interop import export_hf, load_hf  # noqa: E402

from .family_cases import CASES, FAMILY_CASE, hf_model, save_case, token_ids  # noqa: E402

ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.fixture(autouse=True)
def _quiet(quiet_transformers):
    """Every test here runs with transformers' log quiet (conftest's `quiet_transformers`)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_case(name, root / name) for name in CASES}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits


# ---------------------------------------------------------------------------------------------- the families' data
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_defaults_and_aliases_are_transformers(model_type: str) -> None:
    # a config.json may leave keys out; moekit reads them with the values transformers' config class uses
    family = FAMILIES[model_type]
    cls = transformers.CONFIG_MAPPING[model_type]
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in family.defaults.items():
        expected = getattr(cls, "default_theta", 10000.0) if key == "rope_theta" else fields[key]
        assert value == expected, f"{model_type}: default {key}={value!r}, transformers {expected!r}"
    assert family.aliases == dict(cls.attribute_map)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == family.architecture


# ---------------------------------------------------------------------------------------------- load, export, cache
@pytest.mark.parametrize("name", sorted(CASES))
def test_load_hf_computes_what_transformers_computes(name: str, saved: dict[str, Path]) -> None:
    ids = token_ids()
    reference = hf_model(name)
    model = load_hf(saved[name])
    assert not model.training
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_loads_in_transformers_and_round_trips_exactly(name: str, saved: dict[str, Path],
                                                              tmp_path: Path) -> None:
    family = CASES[name][0]
    model = load_hf(saved[name])
    out = export_hf(model, tmp_path / "out", format=family)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [FAMILIES[family].architecture]
    ids = token_ids(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(hf_model(name), ids), atol=ATOL, rtol=0)
    back = load_hf(out)
    assert back.config == model.config
    mine, again = model.state_dict(), back.state_dict()
    assert mine.keys() == again.keys()
    for key in mine:
        assert torch.equal(mine[key], again[key]), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_kv_cache_decoding_gives_the_full_forward(name: str, saved: dict[str, Path]) -> None:
    # windows shorter than the sequence, sinks and latent attention all see the cache
    model = load_hf(saved[name])
    ids = token_ids(batch=2, seq=12, seed=7)
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(5, 12, 3):  # blocks of 3 new tokens after the cache, then single tokens
            chunk = ids[:, t:t + 3] if t < 8 else ids[:, t:t + 1]
            out = model(chunk, past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
            if t >= 8:
                break
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full[:, : incremental.shape[1]], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- info
def _active(model: torch.nn.Module, total: int) -> int:
    """Total minus the experts a token does not use, counted on transformers' modules."""
    idle = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if experts is None or not hasattr(experts, "num_experts"):
            continue
        config = model.config
        k = config.num_experts_per_tok
        per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
        idle += (experts.num_experts - k) * per_expert
    return total - idle


@pytest.mark.parametrize("name", sorted(CASES))
def test_info_counts_exactly_what_transformers_builds(name: str, saved: dict[str, Path]) -> None:
    reference = hf_model(name)
    total = sum(p.numel() for p in reference.parameters())
    info = load_info_source(saved[name])
    assert info.total_params == total
    assert info.active_params == _active(reference, total)
    assert info.num_moe_layers == sum(1 for m in reference.modules() if hasattr(getattr(m, "experts", None),
                                                                                  "num_experts"))


def test_info_reads_the_key_spellings_transformers_saves(tmp_path: Path) -> None:
    # transformers 5 writes qwen3_moe's expert count as num_local_experts; older checkpoints say num_experts
    config = json.loads((save_case("qwen3_moe", tmp_path / "q") / "config.json").read_text())
    assert "num_local_experts" in config and "num_experts" not in config
    old = {**{k: v for k, v in config.items() if k != "num_local_experts"}, "num_experts": config["num_local_experts"]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_info_source(tmp_path / "old.json").total_params == load_info_source(tmp_path / "q").total_params


# ---------------------------------------------------------------------------------------------- every block class
def test_every_transformers_moe_block_is_computed_exactly_or_refused() -> None:
    from . import hf_zoo
    zoo = hf_zoo.moe_block_classes()
    assert len(zoo) > 40
    computed, refused = [], []
    for entry in zoo:
        block = copy.deepcopy(entry.block).eval()
        try:
            layer = MoELayer.from_hf(block).eval()
        except ValueError as error:  # the only other outcome: a refusal naming the class and what is supported
            assert entry.cls.__name__ in str(error), str(error)
            assert any(text in str(error) for text in ("MixtralSparseMoeBlock", "has no place", "not supported"))
            refused.append(entry.cls.__name__)
            continue
        x = torch.randn(2, 5, entry.hidden_size, generator=torch.Generator().manual_seed(1))
        x_hf, x_mk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_hf = hf_zoo.call_block(block, x_hf)
        out_mk = layer(x_mk).hidden_states
        upstream = torch.randn(out_hf.shape, generator=torch.Generator().manual_seed(2))
        (out_hf * upstream).sum().backward()
        (out_mk * upstream).sum().backward()
        torch.testing.assert_close(out_mk, out_hf, atol=1e-5, rtol=0, msg=entry.cls.__name__)
        torch.testing.assert_close(x_mk.grad, x_hf.grad, atol=1e-5, rtol=0, msg=entry.cls.__name__)
        computed.append(entry.cls.__name__)
    native = {cls.rsplit(".", 1)[1] for family in MOE_FAMILIES for cls in FAMILIES[family].block_classes}
    assert native <= set(computed), native - set(computed)
    assert set(computed) <= native  # a look-alike of another family is never read as one of ours
    print(f"{len(computed)} computed exactly, {len(refused)} refused")


# ---------------------------------------------------------------------------------------------- refusals
def _edited(saved: Path, tmp_path: Path, **changes: object) -> Path:
    import shutil

    copy_dir = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(saved, copy_dir)
    config = json.loads((copy_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy_dir / "config.json").write_text(json.dumps(config))
    return copy_dir


@pytest.mark.parametrize(("name", "changes", "match"), [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     r"rope_type='dynamic' is not supported: .*linear, llama3 and yarn"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, r"rope_type='longrope'"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "shift": 1.0}},
     r"rope parameters \['shift'\]"),
    ("llama", {"mlp_bias": True}, r"mlp_bias=True is not supported"),
    ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ("gpt_oss", {"layer_types": ["chunked_attention"] * 3}, r"layer_types \['chunked_attention'\]"),
    ("olmoe", {"head_dim": 16}, r"head_dim=16 is not supported"),
    ("deepseek_v3", {"num_key_value_heads": 2}, r"num_key_value_heads=2 is not supported: its multi-head latent"),
    ("qwen2_moe", {"use_sliding_window": False}, r"use_sliding_window is false"),
    ("mixtral", {"model_type": "phimoe"}, r"model_type='phimoe' is not supported \(a transformers MoE family"),
])
def test_what_moekit_cannot_compute_is_refused_by_name(name: str, changes: dict, match: str, saved: dict[str, Path],
                                                       tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        load_hf(_edited(saved[name], tmp_path, **changes))


def test_a_window_no_sequence_can_reach_is_full_attention(saved: dict[str, Path], tmp_path: Path) -> None:
    # Mixtral configs carry sliding_window; one at least max_position_embeddings long changes nothing
    model = load_hf(_edited(saved["mixtral"], tmp_path, sliding_window=64))
    assert model.config.sliding_window is None
    reference = hf_model("mixtral")
    reference.config.sliding_window = 64
    ids = token_ids()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=ATOL, rtol=0)


def test_every_family_has_a_case() -> None:
    assert set(FAMILY_CASE) == set(FAMILIES)


def test_a_native_block_with_a_setting_moekit_lacks_is_refused_naming_it() -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"from_hf: Qwen3MoeSparseMoeBlock: the expert activation GELU\w* is not "
                                         r"supported; moekit's gated experts use SiLU"):
        MoELayer.from_hf(Qwen3MoeSparseMoeBlock(config))
