"""moekit: Mixture-of-Experts layers, training and merging on PyTorch."""

from .config import MoEConfig, fine_grained
from .layer import GroupedExperts, MoELayer, MoEOutput, Routing, SharedExperts, update_aux_free_biases

__version__ = "0.1.0"

__all__ = [
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Routing",
    "SharedExperts",
    "__version__",
    "fine_grained",
    "update_aux_free_biases",
]
