"""Analysis of what routers do: routing recorded by hooks, streamed into metrics, figures, a routing page, traces.

`analyze(model, ...)` is `moekit analyze`; `analyze_trace(path)` re-analyses a saved trace without the model.
"""

from .analyze import analyze
from .metrics import *  # noqa: F403
from .metrics import __all__ as _metrics_all
from .prune import expert_scores, prune_experts
from .record import RecordedRouting, RoutingRecorder
from .source import RoutedModel, open_routed_model
from .trace import analyze_trace, read_trace

__all__ = [*_metrics_all, "RecordedRouting", "RoutedModel", "RoutingRecorder", "analyze", "analyze_trace",
           "expert_scores", "open_routed_model", "prune_experts", "read_trace"]
