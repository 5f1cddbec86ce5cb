"""Benchmark harnesses behind `moekit bench` (transformers, when a harness compares against it, is imported lazily)."""

from .layer import CONFIGS, run_layer_benchmark

__all__ = ["CONFIGS", "run_layer_benchmark"]
