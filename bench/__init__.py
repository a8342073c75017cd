"""Benchmarks (`make bench`): figures written to bench/results.md. They report; they never fail."""
