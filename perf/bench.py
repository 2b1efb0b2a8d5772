"""Side-by-side benchmark: PyTorch eager vs the exported units (ONNX Runtime) vs Triton, same volumes.

    python -m perf.bench --label cpu-2core --repository model_repository

Per path, on the same phantom volumes: whole-volume latency (median of ``--repeats`` after
``--warmup``) and volumes per second; per unit: 96x96x96 patch latency of the segmenter called
directly (eager, ONNX Runtime, Triton ``segmenter`` over gRPC) and the Triton overhead ratio;
text-prompt cost through Triton with fresh prompts (uncached) vs repeated ones (response cache);
Triton throughput vs client concurrency; GPU utilisation over the whole run (pynvml, where NVML
exists). On a GPU also fp32 vs bfloat16-autocast eager and a 512x512 CT end to end.

Writes ``perf/results/<label>/``: ``raw.json`` (every timing), ``report.md`` (tables of figures
and ratios, the machine), ``summary.json`` (the same, machine-readable), ``latency_by_path.png``,
``throughput_vs_concurrency.png``, ``gpu.png`` / ``gpu.csv`` where a GPU was monitored.
``--report-only`` measures nothing and rebuilds the report from ``raw.json`` and the perf_analyzer /
locust CSVs next to it. (Volumes: perf/volumes.py; measuring: perf/measure.py; report: perf/report.py.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from perf.measure import BenchConfig, run
from perf.report import report_only, write_report
from perf.volumes import VOLUMES


def default_label() -> str:
    """The GPU's name where there is one, else cpu-<cores>core."""
    import torch

    return (torch.cuda.get_device_name(0).replace(" ", "-").lower() if torch.cuda.is_available()
            else f"cpu-{os.cpu_count()}core")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default=None,
                    help="machine label: results go to perf/results/<label>/ (default: cpu-<cores>core or the GPU)")
    ap.add_argument("--checkpoint", default=str(BenchConfig.checkpoint), help="checkpoint the repository was built from")
    ap.add_argument("--repository", default=str(BenchConfig.repository),
                    help="model repository built by export/build_engines.py (embedded flavour)")
    ap.add_argument("--volumes", nargs="+", default=list(BenchConfig.volumes), choices=sorted(VOLUMES),
                    help="phantom volumes to run every path on (perf/volumes.py)")
    ap.add_argument("--warmup", type=int, default=BenchConfig.warmup, help="untimed runs per path and volume")
    ap.add_argument("--repeats", type=int, default=BenchConfig.repeats, help="timed runs per path and volume")
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(BenchConfig.concurrency),
                    help="concurrent gRPC clients for the throughput sweep")
    ap.add_argument("--requests-per-level", type=int, default=BenchConfig.requests_per_level,
                    help="segment_volume requests per concurrency level")
    ap.add_argument("--out-root", default=str(BenchConfig.out_root), help="results folder root")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite report.md from raw.json and the perf_analyzer / locust CSVs")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = BenchConfig(label=args.label or default_label(), checkpoint=Path(args.checkpoint),
                      repository=Path(args.repository), out_root=Path(args.out_root), volumes=tuple(args.volumes),
                      warmup=args.warmup, repeats=args.repeats, concurrency=tuple(args.concurrency),
                      requests_per_level=args.requests_per_level)
    if args.report_only:
        report = report_only(cfg.out, cfg.label)
    else:
        report = write_report(run(cfg), cfg.out, cfg.label)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
