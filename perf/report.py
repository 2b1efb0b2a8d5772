"""The benchmark report, built from saved raw results only: nothing is measured here.

    python -m perf.bench --report-only          # = report_only(perf/results/<label>)

From ``raw.json`` (:mod:`perf.raw`) and the perf_analyzer / locust CSVs found next to it, writes
``report.md`` (tables of figures and ratios, the machine), ``summary.json`` (the same,
machine-readable), ``latency_by_path.png`` and ``throughput_vs_concurrency.png``; links
``gpu.png`` where the run monitored a GPU.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

import numpy as np

from perf.raw import Results, read_raw

log = logging.getLogger("bench")


def _median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarise(res: Results) -> dict:
    lat = {p: {v: round(_median(t), 4) for v, t in per.items()} for p, per in res.volume_latency_s.items()}

    def mean_over_volumes(path):
        return float(np.mean(list(lat[path].values()))) if path in lat else float("nan")

    patch = {p: round(_median(t), 3) for p, t in res.patch_latency_ms.items()}
    prompts = {k: round(_median(v), 3) for k, v in res.prompt_latency_ms.items()}
    summary = {
        "volume_latency_median_s": lat,
        "volumes_per_s": {p: round(1.0 / mean_over_volumes(p), 4) for p in lat},
        "patch_latency_median_ms": patch,
        "prompt_latency_median_ms": prompts,
        "speedup_vs_pytorch_eager": round(mean_over_volumes("pytorch_eager") / mean_over_volumes("triton"), 3),
        "onnxruntime_speedup_vs_pytorch_eager": round(mean_over_volumes("pytorch_eager")
                                                      / mean_over_volumes("onnxruntime"), 3),
        "triton_overhead_ratio": round(patch["triton_ensemble"] / patch["onnxruntime"], 3),
        "triton_unit_overhead_ratio": round(patch["triton"] / patch["onnxruntime"], 3),
        "triton_volume_overhead_ratio": round(mean_over_volumes("triton") / mean_over_volumes("onnxruntime"), 3),
        "prompt_cache_speedup": round(prompts["uncached"] / prompts["cached"], 3),
        "throughput": res.throughput,
        "served_vs_eager_dice": res.agreement,
        "machine": res.machine,
        **res.extra,
    }
    if "pytorch_eager_stock" in lat:
        summary["fast_paths_speedup"] = round(mean_over_volumes("pytorch_eager_stock")
                                              / mean_over_volumes("pytorch_eager"), 3)
    if "pytorch_eager_bf16" in lat:
        summary["half_vs_fp32_eager"] = round(mean_over_volumes("pytorch_eager")
                                              / mean_over_volumes("pytorch_eager_bf16"), 3)
    return summary


def _plots(label: str, res: Results, s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = res.volumes
    paths = list(s["volume_latency_median_s"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(volumes))
    for i, v in enumerate(volumes):
        ax.bar(np.arange(len(paths)) + i * width, [s["volume_latency_median_s"][p][v] for p in paths], width, label=v)
    ax.set_xticks(np.arange(len(paths)) + width * (len(volumes) - 1) / 2, paths)
    ax.set_ylabel("whole-volume latency, median (s)")
    ax.set_title(f"{label}: {res.machine['cpu']}" + (f" + {res.machine['gpu']}" if res.machine["gpu"] else ""),
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_by_path.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    c = [r["concurrency"] for r in res.throughput]
    ax.plot(c, [r["volumes_per_s"] for r in res.throughput], "o-", label="volumes/s")
    ax.set_xlabel("concurrent gRPC clients")
    ax.set_ylabel("Triton segment_volume throughput (volumes/s)")
    ax2 = ax.twinx()
    ax2.plot(c, [r["p95_s"] for r in res.throughput], "s--", color="tab:red", label="p95 latency (s)")
    ax2.set_ylabel("p95 latency (s)")
    ax.set_xticks(c)
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=110)
    plt.close(fig)


def write_report(res: Results, out: Path, label: str) -> Path:
    """summary.json, the two PNGs and report.md in ``out`` from ``res``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = summarise(res)
    (out / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    _plots(label, res, s, out)

    volumes, concurrency = res.volumes, res.concurrency or (1,)
    paths = list(s["volume_latency_median_s"])
    m = res.machine
    lines = [f"# Benchmark `{label}`", "",
             f"Command: `python -m perf.bench --label {label} --volumes {' '.join(volumes)} "
             f"--repeats {res.repeats} --concurrency {' '.join(map(str, concurrency))}"
             + (f" --requests-per-level {res.throughput[0]['requests']}" if res.throughput else "") + "`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; Python {m['python']}, "
             f"torch {m['torch']}, ONNX Runtime {m['onnxruntime']} ({', '.join(m['onnxruntime_providers'])}), "
             f"Triton {m['triton_server']}; {m['created']}.", "",
             "## Whole volume (median of repeats after warm-up)", "",
             "| path | " + " | ".join(f"{v} (s)" for v in volumes) + " | volumes/s |",
             "|---|" + "---|" * (len(volumes) + 1)]
    for p in paths:
        lines.append(f"| {p} | " + " | ".join(f"{s['volume_latency_median_s'][p][v]:.2f}" for v in volumes)
                     + f" | {s['volumes_per_s'][p]:.3f} |")
    lines += ["", "## Ratios", "", "| figure | value | meaning |", "|---|---|---|",
              f"| speedup_vs_pytorch_eager | {s['speedup_vs_pytorch_eager']:.2f} | eager latency / Triton latency, "
              "whole volume |",
              f"| onnxruntime_speedup_vs_pytorch_eager | {s['onnxruntime_speedup_vs_pytorch_eager']:.2f} | eager / "
              "the same pipeline on ONNX Runtime in-process |",
              f"| triton_overhead_ratio | {s['triton_overhead_ratio']:.2f} | 96³ patch through the segment_patch "
              "ensemble over gRPC (prompts cached) / the ONNX Runtime segmenter called directly |",
              f"| triton_unit_overhead_ratio | {s['triton_unit_overhead_ratio']:.2f} | 96³ patch through the "
              "segmenter model over gRPC / ONNX Runtime direct |",
              f"| triton_volume_overhead_ratio | {s['triton_volume_overhead_ratio']:.2f} | Triton segment_volume / "
              "ONNX Runtime in-process, whole volume |",
              f"| prompt_cache_speedup | {s['prompt_cache_speedup']:.2f} | encode_prompts with fresh prompts / "
              "repeated prompts (response cache) |"]
    if "fast_paths_speedup" in s:
        lines.append(f"| fast_paths_speedup | {s['fast_paths_speedup']:.2f} | eager on PyTorch's own kernels / eager "
                     "with duplus.models.fastpaths (CPU), whole volume |")
    if "half_vs_fp32_eager" in s:
        lines.append(f"| half_vs_fp32_eager | {s['half_vs_fp32_eager']:.2f} | eager fp32 / eager bf16 autocast |")
    if "ct512_end_to_end_s" in s:
        lines.append(f"| ct512_end_to_end_s | {s['ct512_end_to_end_s']:.2f} | 512x512x300 CT (ct_512x300), eager, end to end |")
    lines += ["", "## One 96³ patch, median ms", "", "| path | ms |", "|---|---|"]
    lines += [f"| {p} | {v:.1f} |" for p, v in s["patch_latency_median_ms"].items()]
    lines += ["", "## Prompt encoding through Triton (encode_prompts), median ms", "", "| prompts | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["prompt_latency_median_ms"].items()]
    lines += ["", f"## Triton throughput vs concurrency ({volumes[0]})", "",
              "| clients | requests | volumes/s | p50 s | p95 s |", "|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['volumes_per_s']:.3f} | {r['p50_s']:.2f} | "
              f"{r['p95_s']:.2f} |" for r in res.throughput]
    lines += _tool_sections(out)
    if not m.get("gpu"):
        lines += ["", "## GPU figures", "", "Not measured in this report: the machine has no GPU "
                  "(`half_vs_fp32_eager`, `ct512_end_to_end_s` and the GPU utilisation plot need one; the same "
                  "command records them on a GPU). TensorRT cannot be installed on these machines (DESIGN.md), so "
                  "no TensorRT engine path is timed here either."]
    lines += ["", "## Served vs eager labels (Dice per target)", "", "```", json.dumps(res.agreement, indent=1), "```",
              ""]
    if "fast_paths_vs_stock_dice" in s:
        lines += ["## Eager with the fast paths vs PyTorch's own kernels (labels, Dice per target)", "", "```",
                  json.dumps(s["fast_paths_vs_stock_dice"], indent=1), "```", ""]
    lines += [f"GPU monitor: {s['gpu_monitor']}.", "", "![latency](latency_by_path.png)",
              "![throughput](throughput_vs_concurrency.png)"]
    if (out / "gpu.png").exists():
        lines.append("![gpu](gpu.png)")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", report)
    return report


def _tool_sections(out: Path) -> list[str]:
    """perf_analyzer and locust results found next to the report (python -m perf.perf_analyzer / perf.load)."""
    lines = []
    pa = sorted(out.glob("perf_analyzer_*.csv"))
    if pa:
        lines += ["", "## perf_analyzer (gRPC, phantom input data)", "",
                  "Command: `python -m perf.perf_analyzer --model segment_patch segmenter --concurrency 1 2 "
                  "--shared-memory none system` (and `--request-rate 1 2` for the rate rows)", "",
                  "| run | concurrency / rate | inferences/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for path in pa:
            with open(path) as f:
                for r in csv.DictReader(f):
                    level = r.get("Concurrency") or r.get("Request Rate") or "?"
                    lines.append(f"| {path.stem.removeprefix('perf_analyzer_')} | {level} | "
                                 f"{float(r['Inferences/Second']):.2f} | {float(r['p50 latency']) / 1000:.0f} | "
                                 f"{float(r['p95 latency']) / 1000:.0f} | {float(r['p99 latency']) / 1000:.0f} |")
    loc = out / "locust_summary.csv"
    if loc.is_file():
        with open(loc) as f:
            rows = list(csv.DictReader(f))
        if rows:
            lines += ["", "## locust (headless, gRPC users, whole volumes)", "",
                      f"Command: `python -m perf.load --users {rows[0]['users']} --spawn-rate {rows[0]['spawn_rate']} "
                      f"--duration {rows[0]['duration_s']} --volumes ct_head_neck ct_abdomen`", "",
                      "| request | n | failures | p50 ms | p95 ms | p99 ms | requests/s |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {r['requests']} | {r['failures']} | {float(r['p50_ms']):.0f} | "
                      f"{float(r['p95_ms']):.0f} | {float(r['p99_ms']):.0f} | {float(r['requests_per_s']):.3f} |"
                      for r in rows]
    return lines


def report_only(out: Path, label: str | None = None) -> Path:
    """Rewrite the report in ``out`` from its raw.json and the tool CSVs of an earlier run (after perf_analyzer /
    locust); raw.json itself is left as it is."""
    out = Path(out)
    return write_report(read_raw(out), out, label or out.name)
