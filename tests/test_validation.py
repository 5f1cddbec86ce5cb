"""Every config field is type- and range-checked: a bad value is refused naming the field, or it works.

The fuzz tests replace ONE field of a valid base config with a value from a mixed strategy (small and negative
ints, NaN/inf/huge/tiny floats, bools, None, strings, lists, dicts) and accept exactly two outcomes: a
`ValueError` whose message names the field, or a config that runs and gives finite numbers (an MoE layer's
forward and backward, a model's logits, an optimiser step). Any other exception fails the test. They iterate over
`dataclasses.fields`, so a new field is fuzzed without touching this file.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, MoELayer
from moekit import config as config_module
from moekit.config import ModelConfig
from moekit.interop.merge_config import ExpertSpec, MergeConfig, load_merge_config
from moekit.model import MoETransformer
from moekit.model.generate import generate
from moekit.train.config import RunConfig, TrainConfig, apply_overrides
from moekit.train.optim import build_optimizer
from moekit.train.resume import lr_factor

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Thousands of tiny forwards: one intra-op thread is faster and keeps the file quick when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FLOATS = [NAN, INF, -INF, 0.0, -0.0, 1e300, -1e300, 1e-300, 5e-324, 3.5e38, 1e30, 1e6, 0.5, 0.999, 1.5, 2.5,
          -0.5, 0.01, 1e-3]
STRINGS = ["abc", "false", "true", "1e-3", "", " ", "nan", "none", "topk", "soft", "sigmoid", "gelu", "loop",
           "grouped_mm", "cpu", "float32", "bfloat16", "byte", "bpe", "hf", "silu", "random", "mixtral", "run", "../x"]


def values(big_ints: bool = False) -> st.SearchStrategy[Any]:
    """The mixed strategy. Ints stay small (<= 64) unless `big_ints`, so accepted sizes build quickly."""
    ints = st.integers(-3, 64)
    if big_ints:
        ints = st.one_of(ints, st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, -(2**63), 10**400]))
    return st.one_of(
        ints,
        st.sampled_from(FLOATS),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=0.0, max_value=1e6),
        st.booleans(),
        st.none(),
        st.sampled_from(STRINGS),
        st.lists(st.integers(0, 3), max_size=2),
        st.dictionaries(st.sampled_from(["a", "hidden_size"]), st.integers(0, 16), max_size=1),
    )


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: values every fuzzed field also gets (on every base config), whatever the random draws
ALWAYS = [NAN, INF, -INF, -0.0, 1e300, 3.5e38, 1e30, 1e-300, 5e-324, -1, 0, True, None, "false", "1e-3", [1]]


def with_always(bases: list[dict[str, Any]] | None = None, **fixed: Any) -> Any:
    """Decorator: run `ALWAYS` as explicit examples (on each of `bases`, if given), besides the random draws."""
    def wrap(test: Any) -> Any:
        for base in bases or [None]:
            for value in ALWAYS:
                arguments = {**fixed, "value": value} if base is None else {**fixed, "base": base, "value": value}
                test = example(**arguments)(test)
        return test
    return wrap


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return [t for name in ("hidden_states", "logits") if isinstance(t := getattr(value, name, None), torch.Tensor)]


def watch_finite(model: torch.nn.Module) -> list[str]:
    """Hooks recording every submodule whose forward output holds a NaN or inf (a finite end can hide one)."""
    bad: list[str] = []
    for name, module in model.named_modules():
        def hook(_module: Any, _inputs: Any, output: Any, name: str = name) -> None:
            if not all(finite(t) for t in _tensors(output) if t.is_floating_point()):
                bad.append(name or type(_module).__name__)
        module.register_forward_hook(hook)
    return bad


def assert_names(error: ValueError, field: str) -> None:
    message = str(error)
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", message), \
        f"the error for {field} does not name it: {message}"


def finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor.detach().float()).all())


# ------------------------------------------------------------------------------------------------- MoEConfig
MOE_BASES: list[dict[str, Any]] = [
    {"hidden_size": 16, "moe_intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
     "router": "topk", "router_aux_loss_coef": 0.01, "router_z_loss_coef": 1e-3},
    {"hidden_size": 16, "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
     "router": "topk", "n_shared_experts": 1, "shared_expert_gate": True, "expert_devices": 2,
     "max_devices_per_token": 1, "aux_free_bias_update_rate": 1e-3},
    {"hidden_size": 8, "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 1,
     "router": "switch", "capacity_factor": 1.25, "router_aux_loss_coef": 0.01},
    {"hidden_size": 16, "moe_intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
     "router": "deepseek_v3", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
     "aux_free_bias_update_rate": 1e-3, "seq_aux_loss_coef": 1e-3, "routed_scaling_factor": 2.5},
    {"hidden_size": 8, "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
     "router": "noisy_topk", "load_loss_coef": 0.01, "importance_loss_coef": 0.01},
    {"hidden_size": 8, "moe_intermediate_size": 16, "num_local_experts": 4, "router": "expert_choice",
     "capacity_factor": 2.0, "router_z_loss_coef": 1e-3},
    {"hidden_size": 8, "moe_intermediate_size": 16, "num_local_experts": 4, "router": "soft", "slots_per_expert": 2},
    {"hidden_size": 16, "moe_intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
     "router": "hierarchical", "n_group": 2, "topk_group": 2, "router_jitter_noise": 0.01},
]


def check_moe_outcome(fields: dict[str, Any], field: str) -> None:
    try:
        cfg = MoEConfig(**fields)
    except ValueError as error:
        assert_names(error, field)
        return
    torch.manual_seed(0)
    layer = MoELayer(cfg).train()
    bad = watch_finite(layer)
    x = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    out = layer(x)
    assert not bad, f"{field}={fields[field]!r}: non-finite outputs inside {bad}"
    assert finite(out.hidden_states) and finite(out.aux_loss), f"{field}={fields[field]!r}: non-finite forward"
    (out.hidden_states.square().mean() + out.aux_loss).backward()
    assert x.grad is not None and finite(x.grad), f"{field}={fields[field]!r}: non-finite input gradient"
    for name, param in layer.named_parameters():
        assert param.grad is None or finite(param.grad), f"{field}={fields[field]!r}: non-finite grad of {name}"
    layer.update_router_bias()
    assert finite(layer.eval()(x).hidden_states), f"{field}={fields[field]!r}: non-finite after a bias update"


def test_moe_bases_are_valid_and_cover_every_router():
    assert {base["router"] for base in MOE_BASES} == set(config_module.ROUTER_NAMES)
    for base in MOE_BASES:
        check_moe_outcome(base, "router")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(MoEConfig)])
@FUZZ
@with_always(MOE_BASES)
@given(base=st.sampled_from(MOE_BASES), value=values())
def test_fuzz_moe_config_field(field: str, base: dict[str, Any], value: Any) -> None:
    check_moe_outcome({**base, field: value}, field)


# ------------------------------------------------------------------------------------------------ ModelConfig
_TINY_MOE = {"hidden_size": 16, "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2}
MODEL_BASES: list[dict[str, Any]] = [
    {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 32,
     "max_position_embeddings": 16},
    {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
     "intermediate_size": 32, "max_position_embeddings": 16, "tie_word_embeddings": True,
     "first_k_dense_replace": 1, "moe": {**_TINY_MOE, "router_aux_loss_coef": 0.01}},
    {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
     "max_position_embeddings": 16, "moe_layer_freq": 2,
     "moe": {**_TINY_MOE, "num_local_experts": 8, "router": "deepseek_v3", "scoring_func": "sigmoid", "n_group": 2,
             "topk_group": 1, "n_shared_experts": 1}},
]


def check_model_outcome(fields: dict[str, Any], field: str) -> None:
    try:
        cfg = ModelConfig(**fields)
    except ValueError as error:
        assert_names(error, field)
        return
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    bad = watch_finite(model)
    seq = min(4, cfg.max_position_embeddings)
    ids = torch.randint(0, cfg.vocab_size, (2, seq))
    out = model(ids, targets=ids)
    assert finite(out.logits), f"{field}={fields[field]!r}: non-finite logits"
    assert not bad, f"{field}={fields[field]!r}: non-finite outputs inside {bad}"
    cos, sin = model.rotary_tables(torch.arange(cfg.max_position_embeddings))
    assert finite(cos) and finite(sin), f"{field}={fields[field]!r}: non-finite RoPE tables"
    assert out.loss is not None and finite(out.loss) and finite(out.aux_loss), f"{field}={fields[field]!r}"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ModelConfig)])
@FUZZ
@with_always(MODEL_BASES)
@given(base=st.sampled_from(MODEL_BASES), value=values())
def test_fuzz_model_config_field(field: str, base: dict[str, Any], value: Any) -> None:
    check_model_outcome({**base, field: value}, field)


# ------------------------------------------------------------------------------------------------ TrainConfig
TRAIN_BASES: list[dict[str, Any]] = [
    {"max_steps": 20, "warmup_steps": 3, "lr": 1e-2},
    {"max_steps": 5, "warmup_steps": 0, "lr": 3e-3, "min_lr_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 0.5},
    {"max_steps": 50, "warmup_steps": 60, "lr": 0.1, "beta1": 0.0, "beta2": 0.5, "init_from": "some/folder"},
]
_TRAIN_MODEL = ModelConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=8, moe=MoEConfig(**_TINY_MOE))


def check_train_outcome(fields: dict[str, Any], field: str) -> None:
    try:
        cfg = TrainConfig(**fields)
    except ValueError as error:
        assert_names(error, field)
        return
    run = RunConfig(model=_TRAIN_MODEL, train=cfg)
    torch.manual_seed(0)
    model = MoETransformer(run.model)
    optimizer = build_optimizer(model, run)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    for step in (0, cfg.warmup_steps, cfg.max_steps // 2, cfg.max_steps):
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        assert math.isfinite(factor) and 0 <= factor <= 1, f"{field}={fields[field]!r}: lr factor {factor}"
    ids = torch.randint(0, 32, (2, 6))
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    schedule.step()
    for name, param in model.named_parameters():
        assert finite(param), f"{field}={fields[field]!r}: non-finite {name} after one step"
    assert datetime.timedelta(seconds=cfg.collective_timeout_s) > datetime.timedelta(0)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
@FUZZ
@with_always(TRAIN_BASES)
@given(base=st.sampled_from(TRAIN_BASES), value=values(big_ints=True))
def test_fuzz_train_config_field(field: str, base: dict[str, Any], value: Any) -> None:
    check_train_outcome({**base, field: value}, field)


# ------------------------------------------------------------------------------------------------ MergeConfig
def _merge_base() -> dict[str, Any]:
    return {"base_model": "./base", "gate_mode": "hidden", "seed": 3, "experts_per_token": 2,
            "experts": [{"source_model": "./code", "positive_prompts": ["write code"], "noise_scale": 0.01},
                        {"source_model": "./math", "positive_prompts": ["solve"], "residual_scale": 0.5}]}


def _scalar_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is not list]


def check_merge_outcome(data: dict[str, Any], key: str) -> None:
    try:
        config = load_merge_config(data)
    except ValueError as error:
        assert_names(error, key)
        return
    for spec in [*config.experts, *config.shared_experts]:
        for scale in (spec.noise_scale, spec.residual_scale):
            assert scale is None or (isinstance(scale, float) and math.isfinite(scale) and scale >= 0), scale
        assert isinstance(spec.source_model, str) and spec.source_model
    assert isinstance(config.seed, int) and not isinstance(config.seed, bool) and 0 <= config.seed < 2**32
    assert isinstance(config.experts_per_token, int) and 1 <= config.experts_per_token <= len(config.experts)
    assert isinstance(config.for_further_training, bool)
    for name in ("gate_mode", "gate_dtype", "base_model"):
        assert isinstance(getattr(config, name), str)
    for name in ("dtype", "architecture", "tokenizer_source"):
        assert getattr(config, name) is None or isinstance(getattr(config, name), str)


@pytest.mark.parametrize("key", _scalar_fields(MergeConfig))
@FUZZ
@with_always()
@given(value=values(big_ints=True))
def test_fuzz_merge_config_key(key: str, value: Any) -> None:
    check_merge_outcome({**_merge_base(), key: value}, key)


@pytest.mark.parametrize("key", _scalar_fields(ExpertSpec))
@FUZZ
@with_always(index=0)
@given(value=values(big_ints=True), index=st.sampled_from([0, 1]))
def test_fuzz_merge_expert_key(key: str, value: Any, index: int) -> None:
    data = _merge_base()
    data["experts"][index] = {**data["experts"][index], key: value}
    check_merge_outcome(data, key)


# ---------------------------------------------------------------------------- every field has a range rule
@pytest.mark.parametrize(("cls", "rules"), [(MoEConfig, "_MOE_RULES"), (ModelConfig, "_MODEL_RULES"),
                                            (TrainConfig, "_TRAIN_RULES"), (RunConfig, "_RUN_RULES")])
def test_every_non_bool_field_has_a_range_rule(cls: type, rules: str) -> None:
    hints = typing.get_type_hints(cls)
    table = getattr(sys.modules[cls.__module__], rules)  # the table beside the class
    missing = [f.name for f in dataclasses.fields(cls) if hints[f.name] is not bool and f.name not in table]
    assert not missing, f"{cls.__name__} fields without a range rule: {missing}"
    assert set(table) <= {f.name for f in dataclasses.fields(cls)}


# ------------------------------------------------------------------------------ the regressions of the issue
@pytest.mark.parametrize(("cls", "field", "value"), [
    (TrainConfig, "grad_clip", 0.0), (TrainConfig, "grad_clip", -1.0), (TrainConfig, "weight_decay", -0.1),
    (TrainConfig, "weight_decay", "abc"), (TrainConfig, "lr", "fast"), (TrainConfig, "lr", NAN),
    (TrainConfig, "beta1", 1.0), (TrainConfig, "beta2", -0.1), (TrainConfig, "min_lr_ratio", 1.5),
    (TrainConfig, "seed", -1), (TrainConfig, "seed", 2**63), (TrainConfig, "bpe_vocab_size", 257),
    (TrainConfig, "warmup_steps", -1), (TrainConfig, "val_fraction", NAN), (TrainConfig, "max_steps", True),
    (TrainConfig, "keep_checkpoints", 0), (TrainConfig, "max_skipped_steps", -1),
    (TrainConfig, "collective_timeout_s", 0.0), (TrainConfig, "collective_timeout_s", INF),
    (TrainConfig, "collective_timeout_s", NAN),
    (ModelConfig, "rms_norm_eps", 0.0), (ModelConfig, "rms_norm_eps", -1e-5), (ModelConfig, "rope_theta", 0.0),
    (ModelConfig, "rope_theta", NAN), (ModelConfig, "initializer_range", 0.0),
    (ModelConfig, "tie_word_embeddings", "false"),
    (ModelConfig, "first_k_dense_replace", -1), (ModelConfig, "num_key_value_heads", 0),
    (ModelConfig, "num_key_value_heads", 2.0),
    (MoEConfig, "routed_scaling_factor", INF), (MoEConfig, "capacity_factor", INF),
    (MoEConfig, "capacity_factor", -INF), (MoEConfig, "router_z_loss_coef", NAN),
    (MoEConfig, "router_aux_loss_coef", INF), (MoEConfig, "aux_free_bias_update_rate", NAN),
    (MoEConfig, "router_jitter_noise", NAN), (MoEConfig, "norm_topk_prob", "false"),
    (MoEConfig, "shared_expert_gate", "true"), (MoEConfig, "hidden_size", True), (MoEConfig, "router", ["topk"]),
])
def test_named_bad_value_is_refused_naming_the_field(cls: type, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field}=") as caught:
        cls(**{field: value})
    assert "is not allowed" in str(caught.value)


def test_bools_given_as_strings_are_refused_with_the_yaml_hint():
    with pytest.raises(ValueError, match=r"RunConfig\.allow_token_mixing='abc' .*write true or false unquoted"):
        RunConfig.from_dict({"allow_token_mixing": "abc"})
    with pytest.raises(ValueError, match=r"MoEConfig\.norm_topk_prob='false' .*unquoted"):
        MoEConfig(norm_topk_prob="false")
    with pytest.raises(ValueError, match=r"allow_token_mixing='false'"):
        RunConfig.from_dict({"allow_token_mixing": "false"})
    assert RunConfig.from_dict(apply_overrides({}, ["allow_token_mixing=false"])).allow_token_mixing is False
    assert RunConfig.from_dict(apply_overrides({}, ["allow_token_mixing=true"])).allow_token_mixing is True


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=fast", r"TrainConfig\.lr='fast' is not allowed"),
    ("train.weight_decay=abc", r"TrainConfig\.weight_decay='abc' is not allowed"),
    ("allow_token_mixing=abc", r"RunConfig\.allow_token_mixing='abc' is not allowed"),
    ("model.rope_theta=nan", r"ModelConfig\.rope_theta=nan is not allowed"),
    ("model.moe.capacity_factor=inf", r"MoEConfig\.capacity_factor=inf is not allowed"),
    ("train.grad_clip=0", r"TrainConfig\.grad_clip=0 is not allowed"),
])
def test_set_overrides_with_bad_values_are_refused(override: str, message: str) -> None:
    values = {"model": {"hidden_size": 16, "num_attention_heads": 2, "moe": {"hidden_size": 16}}}
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(apply_overrides(values, [override]))


def test_exponent_numbers_quoted_by_yaml_get_a_hint():
    with pytest.raises(ValueError, match=r"TrainConfig\.lr='1e-3' .*write 1\.0e-3"):
        TrainConfig(lr="1e-3")


def test_lr_times_weight_decay_above_one_is_refused():
    with pytest.raises(ValueError, match=r"TrainConfig\.weight_decay=20\.0 .*lr=0\.1"):
        TrainConfig(lr=0.1, weight_decay=20)
    assert TrainConfig(lr=0.1, weight_decay=10).weight_decay == 10


def test_new_train_fields_have_their_defaults_and_round_trip():
    t = TrainConfig()
    assert (t.keep_checkpoints, t.max_skipped_steps, t.collective_timeout_s) == (2, 0, 300.0)
    changed = TrainConfig(keep_checkpoints=5, max_skipped_steps=3, collective_timeout_s=12.5)
    assert TrainConfig.from_dict(changed.to_dict()) == changed


def test_huge_capacity_factor_drops_nothing_instead_of_overflowing():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    for router, k in (("switch", 1), ("topk", 2), ("expert_choice", 2)):
        fields = {"hidden_size": 8, "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": k,
                  "router": router}
        huge = MoELayer(MoEConfig(**fields, capacity_factor=1e300)).eval()
        exact = MoELayer(MoEConfig(**fields, capacity_factor=4.0)).eval()  # = E: every assignment fits
        exact.load_state_dict(huge.state_dict())
        a, b = huge(x), exact(x)
        assert torch.equal(a.hidden_states, b.hidden_states)
        assert float(a.stats["dropped_fraction"]) == 0.0


# ------------------------------------------------------------------------------------------------- RunConfig
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "/abs", "../up", " x", "x ", "x\0y", "C:run", 3,
                                  None])
def test_run_name_must_be_a_plain_file_name(name: Any) -> None:
    with pytest.raises(ValueError, match=r"RunConfig\.name=.* is not allowed: a plain file name"):
        RunConfig(name=name)
    with pytest.raises(ValueError, match=r"RunConfig\.name="):
        RunConfig.from_dict({"name": name})


def test_run_names_that_are_plain_file_names_are_kept():
    for name in ("run", "tiny-mixtral", "exp_1.2", "a b"):
        assert RunConfig.from_dict({"name": name}).name == name


def test_history_round_trips_and_must_be_a_list_of_mappings():
    run = RunConfig(history=[{"step": 10, "changed": {"train.max_steps": [100, 200]}}])
    again = RunConfig.from_dict(run.to_dict())
    assert again.history == run.history and again == run
    assert RunConfig.from_dict({}).history == []
    for bad in ([1], "abc", {"a": 1}, [{"a": 1}, "b"], None):
        with pytest.raises(ValueError, match=r"RunConfig\.history="):
            RunConfig.from_dict({"history": bad})


def test_run_config_checks_direct_construction_and_sections():
    with pytest.raises(ValueError, match=r"RunConfig\.allow_token_mixing=1 "):
        RunConfig(allow_token_mixing=1)
    with pytest.raises(ValueError, match=r"RunConfig\.model=\{\} is not allowed"):
        RunConfig(model={})
    with pytest.raises(ValueError, match=r"RunConfig\.train=\[\] is not allowed"):
        RunConfig.from_dict({"train": []})
    with pytest.raises(ValueError, match=r"run config has no section 'trian'"):
        RunConfig.from_dict({"trian": {}})


def test_model_moe_section_errors_name_the_section():
    with pytest.raises(ValueError, match=r"ModelConfig\.moe: MoEConfig has no field 'num_experts'"):
        ModelConfig(moe={"num_experts": 4})
    with pytest.raises(ValueError, match=r"ModelConfig\.moe=3 is not allowed"):
        ModelConfig(moe=3)


# ----------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize(("key", "text", "message"), [
    ("noise_scale", ".nan", r"experts\[0\]\.noise_scale=nan is not allowed"),
    ("noise_scale", "-0.1", r"experts\[0\]\.noise_scale=-0.1 is not allowed"),
    ("residual_scale", ".inf", r"experts\[0\]\.residual_scale=inf is not allowed"),
    ("residual_scale", "0", r"experts\[0\]\.residual_scale=0 is not allowed"),
    ("noise_scale", "'0.1'", r"experts\[0\]\.noise_scale='0.1' is not allowed"),
])
def test_merge_yaml_non_finite_scales_are_refused(tmp_path: Path, key: str, text: str, message: str) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base_model: ./base\ngate_mode: random\nexperts:\n"
                    f"  - source_model: ./a\n    {key}: {text}\n  - source_model: ./b\n")
    with pytest.raises(ValueError, match=message):
        load_merge_config(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"seed": -1}, r"seed=-1 is not allowed: an integer in \[0, 2\*\*32\)"),
    ({"seed": 2**40}, r"seed=1099511627776 is not allowed"),
    ({"gate_dtype": None}, r"gate_dtype=None is not allowed"),
    ({"architecture": 5}, r"architecture=5 is not allowed"),
    ({"for_further_training": "true"}, r"for_further_training='true' must be true or false"),
    ({"base_model": ""}, r"base_model must be a path"),
])
def test_merge_top_level_values_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_merge_config({**_merge_base(), **change})


def test_merge_config_checks_direct_construction():
    good = [ExpertSpec("./a", ["x"]), ExpertSpec("./b", ["y"])]
    with pytest.raises(ValueError, match=r"expert\.noise_scale=nan"):
        ExpertSpec("./a", noise_scale=NAN)
    with pytest.raises(ValueError, match=r"seed=True is not allowed"):
        MergeConfig("./base", good, seed=True)
    with pytest.raises(ValueError, match=r"for_further_training='yes' is not allowed"):
        MergeConfig("./base", good, for_further_training="yes")
    spec = ExpertSpec("./a", ["x"])
    spec.residual_scale = INF
    with pytest.raises(ValueError, match=r"experts\[0\]\.residual_scale=inf"):
        MergeConfig("./base", [spec, good[1]])


# -------------------------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def tiny_model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(_TRAIN_MODEL).eval()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"temperature": NAN}, r"temperature=nan is not allowed"),
    ({"temperature": INF}, r"temperature=inf is not allowed"),
    ({"temperature": -1.0}, r"temperature=-1.0 is not allowed"),
    ({"temperature": "hot"}, r"temperature='hot' is not allowed"),
    ({"top_k": 0}, r"top_k=0 is not allowed"),
    ({"top_k": 2.5}, r"top_k=2.5 is not allowed"),
    ({"top_p": 0.0}, r"top_p=0.0 is not allowed"),
    ({"top_p": 1.5}, r"top_p=1.5 is not allowed"),
    ({"top_p": NAN}, r"top_p=nan is not allowed"),
    ({"max_new_tokens": -1}, r"max_new_tokens=-1 is not allowed"),
    ({"max_new_tokens": 2.0}, r"max_new_tokens=2.0 is not allowed"),
    ({"seed": "x"}, r"seed='x' is not allowed"),
    ({"seed": 2**64}, r"seed=18446744073709551616 is not allowed"),
])
def test_generate_refuses_bad_sampling_arguments(tiny_model: MoETransformer, arguments: dict[str, Any],
                                                 message: str) -> None:
    call = {"max_new_tokens": 2, **arguments}
    with pytest.raises(ValueError, match=rf"^generate: {message}"):
        generate(tiny_model, torch.tensor([[1, 2, 3]]), **call)


def test_generate_accepts_the_edges_of_each_range(tiny_model: MoETransformer) -> None:
    prompt = torch.tensor([[1, 2, 3]])
    assert generate(tiny_model, prompt, 0).shape == (1, 3)
    greedy = generate(tiny_model, prompt, 3, temperature=0)
    assert greedy.shape == (1, 6)
    assert torch.equal(generate(tiny_model, prompt, 3, temperature=1.0, top_k=1, seed=0), greedy)
    assert generate(tiny_model, prompt, 2, temperature=0.5, top_p=1.0, seed=2**63).shape == (1, 5)


# ------------------------------------------------------------------------------------------------ MoELayer input
def _layer(**fields: Any) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(**{"hidden_size": 16, "moe_intermediate_size": 32, "num_local_experts": 4, **fields}))


def test_input_of_another_dtype_gets_a_clear_error():
    layer = _layer()
    with pytest.raises(ValueError, match=r"x of dtype torch\.float64 but its weights are torch\.float32.*"
                                         r"layer\.double\(\).*x\.float\(\)"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"floating-point x .*torch\.int64"):
        layer(torch.ones(2, 3, 16, dtype=torch.long))
    out = layer.double()(torch.randn(2, 3, 16, dtype=torch.float64))  # the fix the message names works
    assert out.hidden_states.dtype == torch.float64


def test_autocast_inputs_are_not_refused():
    layer = _layer()
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fp32_in = layer(x)
        out_bf16_in = layer(x.bfloat16())
    assert finite(out_fp32_in.hidden_states) and finite(out_bf16_in.hidden_states)
    assert out_fp32_in.hidden_states.shape == x.shape


def test_wrong_rank_or_width_names_the_problem():
    layer = _layer()
    with pytest.raises(ValueError, match=r"got \(2, 3, 8\): last dimension 8, but the layer's hidden_size is 16"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"got \(1, 2, 3, 16\): a 4-D tensor"):
        layer(torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match=r"got \(16,\): a 1-D tensor"):
        layer(torch.randn(16))
    with pytest.raises(TypeError, match=r"torch\.Tensor .*got list"):
        layer([[0.0] * 16])


# ---------------------------------------------------------------------------------------- Soft MoE NaN isolation
@pytest.mark.parametrize("padded", [False, True])
def test_soft_moe_nan_stays_in_its_own_sequence(padded: bool) -> None:
    layer = _layer(router="soft", slots_per_expert=2).eval()
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16)
    x[0, 2, 3] = NAN
    x = x.requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]) if padded else None
    out = layer(x, attention_mask=mask).hidden_states
    length = 4 if padded else 5
    alone_x = x.detach()[1:2, :length].clone().requires_grad_()
    alone = layer(alone_x).hidden_states
    assert finite(out[1:]), "a NaN in sequence 0 reached another sequence"
    assert torch.allclose(out[1, :length], alone[0], atol=1e-6, rtol=1e-5)
    assert torch.isnan(out[0, :length]).any()  # Soft MoE mixes a sequence: the NaN may spread inside it
    out[1, :length].square().sum().backward()
    alone.square().sum().backward()
    assert x.grad is not None and finite(x.grad[1:])
    assert torch.allclose(x.grad[1, :length], alone_x.grad[0], atol=1e-6, rtol=1e-5)
