"""The sparse MoE layer: routers decide, dispatch moves, experts compute, balancing watches."""

from .balance import aux_free_bias_update
from .dispatch import DispatchPlan, LocalDispatcher, TokenDispatcher, expert_capacity, plan_dispatch
from .experts import GroupedExperts, SharedExperts
from .moe import MoELayer, MoEOutput, update_aux_free_biases
from .routers import ROUTERS, Router, Routing, build_router

__all__ = [
    "ROUTERS",
    "DispatchPlan",
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "MoEOutput",
    "Router",
    "Routing",
    "SharedExperts",
    "TokenDispatcher",
    "aux_free_bias_update",
    "build_router",
    "expert_capacity",
    "plan_dispatch",
    "update_aux_free_biases",
]
