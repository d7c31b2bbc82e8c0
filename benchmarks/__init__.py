"""Benchmarks: one script per capability, following ../shared/BENCHMARKS.md."""
