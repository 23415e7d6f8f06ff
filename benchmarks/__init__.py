"""Benchmarks of hypergrad against torchopt and higher (see benchmarks/RESULTS.md).

``pytest benchmarks/ --benchmark-only`` times every method with pytest-benchmark;
``python -m benchmarks.report`` prints one table of ratios and writes plots and JSON.
"""
