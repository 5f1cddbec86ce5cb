"""Analysis of what routers do (issue 17, in progress): the routing metrics, as functions of recorded routing."""

from .metrics import *  # noqa: F403
from .metrics import __all__  # noqa: F401
