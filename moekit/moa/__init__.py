"""Mixture-of-Agents (Wang et al. 2024) over OpenAI-compatible endpoints: `run_moa`, `MoABackend`, `moekit moa`.

Needs httpx and PyYAML (`pip install "moekit[serve]"`); the core layer never imports this package.
"""

from .backend import MoABackend, load_moa_backend
from .client import CallError, MoAClient
from .config import DEFAULT_AGGREGATE_PROMPT, Agent, Endpoint, MoAConfig, MoAConfigError, load_config
from .mixture import MoAError, MoAResult, MoARun, run_moa, run_moa_sync
from .report import CallRecord, MoAReport

__all__ = ["DEFAULT_AGGREGATE_PROMPT", "Agent", "CallError", "CallRecord", "Endpoint", "MoABackend", "MoAClient",
           "MoAConfig", "MoAConfigError", "MoAError", "MoAReport", "MoAResult", "MoARun", "load_config",
           "load_moa_backend", "run_moa", "run_moa_sync"]
