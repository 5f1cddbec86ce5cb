"""The one check that transformers is new enough for `moekit.hf` (its `ExpertsInterface` came with 5.0)."""

from __future__ import annotations


def require_experts_interface() -> None:
    """Raise ImportError naming the fix when transformers is missing or has no `ExpertsInterface`."""
    try:
        import transformers
    except ImportError:
        raise ImportError('moekit.hf needs transformers >= 5: pip install "moekit[hf]"') from None
    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401
    except ImportError:
        raise ImportError(f"moekit.hf needs transformers >= 5 (its ExpertsInterface registry); this is "
                          f"transformers {transformers.__version__}: pip install -U \"transformers>=5\"") from None
