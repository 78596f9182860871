"""Benchmarks: numbers to compare a change against, measured in one run (never in the tests)."""
