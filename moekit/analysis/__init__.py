"""Analysis of what routers do (issue 17, in progress): routing recorded by hooks, and the routing metrics."""

from .metrics import *  # noqa: F403
from .metrics import __all__ as _metrics_all
from .record import RecordedRouting, RoutingRecorder

__all__ = [*_metrics_all, "RecordedRouting", "RoutingRecorder"]
