"""Benchmarks and the chaos run."""
