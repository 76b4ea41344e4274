"""Benchmarks: each prints a table, writes --json, and measures its own baseline in the same run."""
