"""Benchmarks: `python -m tools.bench engine|serve`. Figures are printed as ratios to
baselines measured in the same run; nothing here is a test."""
