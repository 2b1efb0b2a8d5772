"""Benchmarks: perf_analyzer, locust and pynvml, with side-by-side reports.

``volumes`` (the one table of benchmark volumes), ``measure`` (timing the paths side by side), ``raw``
(raw.json), ``report`` (report.md, summary.json, PNGs from raw results), ``bench`` (the CLI over both),
``perf_analyzer``, ``load`` + ``locustfile``, ``gpu_monitor``."""
