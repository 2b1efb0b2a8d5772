"""Benchmarks: perf_analyzer, locust and pynvml, with side-by-side reports."""
