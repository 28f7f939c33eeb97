"""Experiments built from the other wings: the paper's reproduction (runs and report) and speed benchmarks."""
