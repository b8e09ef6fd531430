"""Benchmarks: one registry of cases (runner.OPS) and one runner; results/ holds the output."""
