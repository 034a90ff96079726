"""Continual-learning benchmark and speed benchmarks."""
