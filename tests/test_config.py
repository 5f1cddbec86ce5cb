"""MoEConfig: every impossible combination is refused with a message naming field, value and what is allowed."""

import pytest

from moekit import MoEConfig, fine_grained


def test_defaults_are_a_mixtral_like_layer():
    cfg = MoEConfig()
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.router, cfg.hidden_act) == (8, 2, "topk", "silu")
    assert cfg.resolved_norm_topk_prob is True
    assert cfg.capacity_factor is None  # dropless


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok=9 .*at most num_local_experts=8"),
        ({"num_local_experts": 0}, r"num_local_experts=0 .*positive integer"),
        ({"hidden_size": 2.5}, r"hidden_size=2.5 .*positive integer"),
        ({"moe_intermediate_size": -1}, r"moe_intermediate_size=-1"),
        ({"router": "topK"}, r"router='topK' .*one of topk, noisy_topk.*did you mean 'topk'"),
        ({"hidden_act": "relu"}, r"hidden_act='relu' .*'silu'.*'gelu'"),
        ({"scoring_func": "tanh"}, r"scoring_func='tanh' .*'softmax' or 'sigmoid'"),
        ({"router": "noisy_topk", "scoring_func": "sigmoid"}, r"scoring_func='sigmoid' .*needs 'softmax'"),
        ({"router": "deepseek_v3", "n_group": 3}, r"n_group=3 .*divisor of num_local_experts=8"),
        ({"router": "deepseek_v3", "n_group": 2, "topk_group": 3}, r"topk_group=3 .*at most n_group=2"),
        ({"router": "deepseek_v3", "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3},
         r"num_experts_per_tok=3 .*at most topk_group \* experts per group = 2"),
        ({"router": "topk", "n_group": 2}, r"n_group=2 .*groups are used by 'deepseek_v3' and 'hierarchical'"),
        ({"router": "hierarchical", "n_group": 2, "topk_group": 2, "num_experts_per_tok": 3},
         r"num_experts_per_tok=3 .*multiple of topk_group=2"),
        ({"router": "hierarchical", "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3},
         r"num_experts_per_tok=3 .*at most topk_group \* experts per group = 2"),
        ({"router": "switch"}, r"num_experts_per_tok=2 .*1 for router='switch'"),
        ({"router": "switch", "num_experts_per_tok": 1, "norm_topk_prob": True}, r"norm_topk_prob=True .*no gradient"),
        ({"router": "expert_choice"}, r"capacity_factor=None .*number > 0 for router='expert_choice'"),
        ({"router": "soft", "capacity_factor": 1.0}, r"capacity_factor=1.0 .*None for router='soft'"),
        ({"capacity_factor": 0.0}, r"capacity_factor=0.0 .*number > 0, or None"),
        ({"router_aux_loss_coef": -0.1}, r"router_aux_loss_coef=-0.1 .*finite number >= 0"),
        ({"router_z_loss_coef": float("nan")}, r"router_z_loss_coef=nan"),
        ({"router": "expert_choice", "capacity_factor": 2.0, "router_aux_loss_coef": 0.01},
         r"router_aux_loss_coef=0.01 .*balances by construction"),
        ({"router": "soft", "seq_aux_loss_coef": 0.01}, r"seq_aux_loss_coef=0.01 .*balances by construction"),
        ({"load_loss_coef": 0.01}, r"load_loss_coef=0.01 .*unless router='noisy_topk'"),
        ({"router": "hierarchical", "n_group": 2, "aux_free_bias_update_rate": 1e-3},
         r"aux_free_bias_update_rate=0.001 .*bias acts on top-k selection"),
        ({"routed_scaling_factor": 0}, r"routed_scaling_factor=0 .*> 0"),
        ({"router_jitter_noise": 1.5}, r"router_jitter_noise=1.5 .*\[0, 1\)"),
        ({"n_shared_experts": -1}, r"n_shared_experts=-1 .*>= 0"),
        ({"shared_expert_gate": True}, r"shared_expert_gate=True .*n_shared_experts >= 1"),
        ({"n_shared_experts": 1, "shared_expert_intermediate_size": 0}, r"shared_expert_intermediate_size=0"),
        ({"slots_per_expert": 0}, r"slots_per_expert=0 .*positive integer"),
        ({"expert_backend": "cuda"}, r"expert_backend='cuda' .*auto, loop, bmm, grouped_mm"),
    ],
)
def test_impossible_combination_names_field_value_and_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields)


def test_from_dict_refuses_unknown_key_with_suggestion():
    with pytest.raises(ValueError, match=r"no field 'num_experts'; did you mean 'num_local_experts'\?"):
        MoEConfig.from_dict({"num_experts": 8})


def test_dict_round_trip():
    cfg = MoEConfig(router="deepseek_v3", scoring_func="sigmoid", n_group=4, topk_group=2, n_shared_experts=1)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg


def test_router_conventions_for_norm_topk_prob():
    assert MoEConfig(router="switch", num_experts_per_tok=1).resolved_norm_topk_prob is False
    assert MoEConfig(router="deepseek_v3").resolved_norm_topk_prob is True
    assert MoEConfig(norm_topk_prob=False).resolved_norm_topk_prob is False


def test_token_mixing_routers_are_flagged():
    assert MoEConfig(router="expert_choice", capacity_factor=2.0).mixes_tokens
    assert MoEConfig(router="soft").mixes_tokens
    assert not MoEConfig().mixes_tokens


def test_fine_grained_keeps_active_parameters():
    cfg = MoEConfig(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=1024, n_shared_experts=1)
    fine = fine_grained(cfg, 4)
    assert (fine.num_local_experts, fine.num_experts_per_tok, fine.moe_intermediate_size) == (32, 8, 256)
    active = cfg.num_experts_per_tok * cfg.moe_intermediate_size
    assert fine.num_experts_per_tok * fine.moe_intermediate_size == active
    assert fine.resolved_shared_intermediate_size == 1024  # the shared expert keeps its width


def test_fine_grained_refuses_a_width_it_cannot_split():
    with pytest.raises(ValueError, match=r"moe_intermediate_size=1000 is not divisible by m=3"):
        fine_grained(MoEConfig(moe_intermediate_size=1000), 3)
