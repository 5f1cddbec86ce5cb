"""moekit inside transformers' own MoE models: experts implementations, routing capture, balancing.

Importing this package registers moekit's experts implementations in transformers' `ExpertsInterface`
(`register()` does it again, idempotently), so any family whose experts use transformers'
`use_experts_implementation` runs moekit's backends::

    import moekit.hf
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moekit")

    with moekit.hf.RoutingCapture(model, attention_mask=mask) as routing:
        model(input_ids, attention_mask=mask)
    routing.layers[0].expert_index   # [tokens, k] of the first MoE layer, padding removed

It needs transformers >= 5 (the `ExpertsInterface` registry); moekit's core never imports this package.
"""

from __future__ import annotations

from .._hf_version import require_experts_interface

require_experts_interface()

from .capture import SCORE_ROUTERS, LayerRouting, RoutingCapture, RoutingRecord, routing_layers  # noqa: E402
from .experts import IMPLEMENTATIONS, experts_forward, is_interface_experts, register, stacked_kind  # noqa: E402
from .load import load_model, unserved_experts  # noqa: E402

register()

__all__ = ["IMPLEMENTATIONS", "SCORE_ROUTERS", "LayerRouting", "RoutingCapture", "RoutingRecord", "experts_forward",
           "is_interface_experts", "load_model", "register", "routing_layers", "stacked_kind", "unserved_experts"]
