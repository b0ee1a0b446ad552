"""Benchmarks against torchtune's own recipes (see throughput.py, quality.py)."""
