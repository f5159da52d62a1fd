"""Helpers for the tests, the demo and the benchmarks; not installed."""
