"""Side-by-side benchmark: PyTorch eager vs the exported units (ONNX Runtime) vs Triton, same volumes.

    python -m perf.bench --label cpu-2core --repository model_repository

Per path, on the same phantom volumes: whole-volume latency (median of ``--repeats`` after
``--warmup``) and volumes per second; per unit: 96x96x64 patch latency of the segmenter called
directly (eager, ONNX Runtime, Triton ``segmenter`` over gRPC) and the Triton overhead ratio;
text-prompt cost through Triton with fresh prompts (uncached) vs repeated ones (response cache);
Triton throughput vs client concurrency; GPU utilisation over the whole run (pynvml, where NVML
exists). On a GPU also fp32 vs bfloat16-autocast eager and a 512x512 CT end to end.

Writes ``perf/results/<label>/``: ``report.md`` (tables of figures and ratios, the machine),
``summary.json`` (the same, machine-readable), ``latency_by_path.png``,
``throughput_vs_concurrency.png``, ``gpu.png`` / ``gpu.csv`` where a GPU was monitored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]

# (name, region, modality, seed): held-out phantom seeds (the demo's); ct_256 is an abdomen phantom
# acquired at 1.5 mm and centred in a 256x256x160 air field of view, the whole-CT size
VOLUMES = {"ct_256": ("abdomen", "CT", 515151), "ct_abdomen": ("abdomen", "CT", 424242),
           "ct_head_neck": ("head_neck", "CT", 444444)}
PATCH = (96, 96, 96)


def make_volume(name: str):
    """(image, affine, label, label_names, sequence) of one benchmark volume."""
    from duplus.synth.phantoms import AcquisitionSpec, generate_phantom

    region, modality, seed = VOLUMES[name]
    if name != "ct_256":
        ph = generate_phantom(region, modality, seed)
        return ph.image, ph.affine, ph.label, ph.label_names, ph.sequence
    acq = AcquisitionSpec(spacing=(1.5, 1.5, 1.5), axis_order=(0, 1, 2), flips=(True, True, False), noise=1.0)
    ph = generate_phantom(region, modality, seed, acquisition=acq)
    fov = np.array([256, 256, 160])
    shape = np.array(ph.image.shape)
    if (shape > fov).any():
        raise ValueError(f"ct_256: phantom {tuple(shape)} does not fit {tuple(fov)}")
    lo = (fov - shape) // 2
    image = np.full(fov, -1000.0, dtype=np.float32)   # air around the body, as in a real CT
    label = np.zeros(fov, dtype=ph.label.dtype)
    sl = tuple(slice(a, a + n) for a, n in zip(lo, shape))
    image[sl], label[sl] = ph.image, ph.label
    affine = ph.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ lo
    return image, affine, label, ph.label_names, ph.sequence
TARGETS = {"abdomen": ["liver", "spleen", "left kidney", "right kidney"], "head_neck": ["primary tumour", "lymph node"]}


@dataclass(frozen=True)
class BenchConfig:
    label: str
    checkpoint: Path = ROOT / "checkpoints" / "duplus_demo.pt"
    repository: Path = ROOT / "model_repository"
    out_root: Path = ROOT / "perf" / "results"
    volumes: tuple[str, ...] = ("ct_256",)
    warmup: int = 1
    repeats: int = 3
    concurrency: tuple[int, ...] = (1, 2, 4)
    requests_per_level: int = 4
    prompt_repeats: int = 10
    patch_repeats: int = 5
    ct512: bool = True             # only on a GPU

    def __post_init__(self) -> None:
        unknown = set(self.volumes) - set(VOLUMES)
        if unknown:
            raise ValueError(f"unknown volumes {sorted(unknown)}; choose from {sorted(VOLUMES)}")
        if self.repeats < 1 or self.warmup < 0 or not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("repeats >= 1, warmup >= 0 and concurrency levels >= 1 are required")


@dataclass
class Results:
    machine: dict = field(default_factory=dict)
    volume_latency_s: dict = field(default_factory=dict)      # path -> volume -> [seconds]
    patch_latency_ms: dict = field(default_factory=dict)      # path -> [ms]
    prompt_latency_ms: dict = field(default_factory=dict)     # uncached / cached -> [ms]
    throughput: list = field(default_factory=list)            # [{concurrency, volumes_per_s, p50_s, p95_s}]
    agreement: dict = field(default_factory=dict)             # volume -> Dice(triton, eager) per target
    extra: dict = field(default_factory=dict)


def machine_info() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_providers": onnxruntime.get_available_providers(), "triton_server": "2.51.0 (nvidia-pytriton)",
            "platform": platform.platform(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _time(fn, warmup: int, repeats: int, desc: str) -> tuple[list[float], object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=None):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def onnxruntime_segmenter(repository: Path, limits=None):
    """The served pipeline without Triton: same VolumeSegmenter, units on ONNX Runtime in this process."""
    from duplus.contract import ServingLimits, UnitContract
    from serving.pipelines import KNOWN_TARGETS, EncodedPrompts, PromptTokenizer, VolumeSegmenter, read_manifest
    from serving.runtime import make_runner

    manifest = read_manifest(repository)
    limits = limits or ServingLimits(sw_batch_size=manifest.get("max_batch_size", 4))
    gpu = manifest.get("device") == "gpu"
    runners = {u: make_runner(u, repository / u / "1", UnitContract.from_manifest(u, manifest["units"][u]),
                              "onnxruntime", gpu=gpu) for u in ("text_encoder", "conditioning", "segmenter")}
    tokenizer = PromptTokenizer(repository / "tokenizer" / "1" / "tokenizer", manifest["model_config"]["modalities"],
                                limits)

    def encode(modality, t1, targets):
        tok = tokenizer(modality, t1, targets)
        t1e = runners["text_encoder"]({"input_ids": tok["t1_input_ids"], "attention_mask": tok["t1_attention_mask"]})
        t2e = runners["text_encoder"]({"input_ids": tok["t2_input_ids"], "attention_mask": tok["t2_attention_mask"]})
        cond = runners["conditioning"]({"t1_embedding": t1e["embedding"], "t2_embedding": t2e["embedding"]})
        return EncodedPrompts(int(tok["modality"][0]), cond["film"], cond["head_params"], t2e["embedding"])

    def segment(image, modality, film, head):
        return runners["segmenter"]({"image": image, "modality": modality, "film": film, "head_params": head})["logits"]

    known = VolumeSegmenter.load_known_targets(repository / "segment_volume" / "1" / KNOWN_TARGETS)
    return VolumeSegmenter(manifest, known, encode, segment, limits), runners["segmenter"]


def run(cfg: BenchConfig) -> Path:
    import torch

    from clients.grpc_client import SegmentationClient
    from duplus.inference import Predictor, dice
    from duplus.vocabulary import canonical_t1
    from perf.gpu_monitor import GpuMonitor
    from serving.serve import RepositoryError, TritonServer, check_repository

    out = cfg.out_root / cfg.label
    out.mkdir(parents=True, exist_ok=True)
    try:
        check_repository(cfg.repository, cfg.checkpoint)
    except RepositoryError as exc:
        raise SystemExit(f"{exc}\n(the benchmark serves the repository as built; build it first)") from None
    res = Results(machine=machine_info())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    marks: list[tuple[float, str]] = []
    t_start = time.perf_counter()

    def mark(text):
        marks.append((time.perf_counter() - t_start, text))
        log.info("== %s", text)

    volumes = {}
    for name in cfg.volumes:
        region, modality, _ = VOLUMES[name]
        image, affine, _, _, sequence = make_volume(name)
        ph = SimpleNamespace(image=image, affine=affine)
        volumes[name] = (ph, modality, canonical_t1(modality, region, sequence), TARGETS[region])
        log.info("volume %s: %s voxels, spacing %s mm", name, image.shape,
                 np.round(np.linalg.norm(affine[:3, :3], axis=0), 2).tolist())

    with GpuMonitor() as monitor:
        mark("eager")
        predictor = Predictor.from_checkpoint(cfg.checkpoint, device=device, sw_batch_size=4)
        eager_labels = {}
        for name, (ph, modality, t1, targets) in volumes.items():
            times, pred = _time(partial(predictor.predict_array, ph.image, ph.affine, modality, t1, targets),
                                cfg.warmup, cfg.repeats, f"eager {name}")
            res.volume_latency_s.setdefault("pytorch_eager", {})[name] = times
            eager_labels[name] = pred.labels
        if device == "cuda":
            mark("eager bf16")
            half = Predictor.from_checkpoint(cfg.checkpoint, device=device, sw_batch_size=4, bf16=True)
            for name, (ph, modality, t1, targets) in volumes.items():
                times, _ = _time(partial(half.predict_array, ph.image, ph.affine, modality, t1, targets),
                                 cfg.warmup, cfg.repeats, f"eager bf16 {name}")
                res.volume_latency_s.setdefault("pytorch_eager_bf16", {})[name] = times

        mark("onnxruntime")
        ort_volume, ort_segmenter = onnxruntime_segmenter(cfg.repository)
        for name, (ph, modality, t1, targets) in volumes.items():
            times, _ = _time(partial(ort_volume, ph.image, ph.affine, modality, t1, targets),
                             cfg.warmup, cfg.repeats, f"onnxruntime {name}")
            res.volume_latency_s.setdefault("onnxruntime", {})[name] = times

        mark("triton")
        with TritonServer(cfg.repository, checkpoint=cfg.checkpoint, log_file=out / "triton.log") as server, \
                SegmentationClient(server.grpc_url) as client:
            client.check_ready()
            for name, (ph, modality, t1, targets) in volumes.items():
                times, served = _time(partial(client.segment_volume, ph.image, ph.affine, modality, t1, targets),
                                      cfg.warmup, cfg.repeats, f"triton {name}")
                res.volume_latency_s.setdefault("triton", {})[name] = times
                res.agreement[name] = {t: round(dice(served.labels == k + 1, eager_labels[name] == k + 1), 4)
                                       for k, t in enumerate(targets)}

            mark("patch")
            _patch_latency(cfg, res, predictor, ort_segmenter, server, device)
            mark("prompts")
            _prompt_latency(cfg, res, server)
            mark("concurrency")
            name = cfg.volumes[0]
            ph, modality, t1, targets = volumes[name]
            for c in cfg.concurrency:
                lat = []

                def one(_, lat=lat):
                    t0 = time.perf_counter()
                    with SegmentationClient(server.grpc_url) as cl:
                        cl.segment_volume(ph.image, ph.affine, modality, t1, targets)
                    lat.append(time.perf_counter() - t0)

                n = max(cfg.requests_per_level, c)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    list(tqdm(pool.map(one, range(n)), total=n, desc=f"concurrency {c}", leave=False, disable=None))
                wall = time.perf_counter() - t0
                res.throughput.append({"concurrency": c, "requests": n, "volumes_per_s": round(n / wall, 4),
                                       "p50_s": round(float(np.percentile(lat, 50)), 3),
                                       "p95_s": round(float(np.percentile(lat, 95)), 3)})
        if device == "cuda" and cfg.ct512:
            mark("ct512")
            res.extra["ct512_end_to_end_s"] = _ct512(cfg, predictor)
        mark("end")
    monitor.write_csv(out / "gpu.csv")
    monitor.plot(out / "gpu.png", marks)
    res.extra["gpu_monitor"] = "pynvml" if monitor.available else f"not available ({monitor.reason})"
    return write_report(cfg, res, out)


def _patch_latency(cfg, res, predictor, ort_segmenter, server, device) -> None:
    import torch
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    patch = rng.normal(0, 0.5, (1, 1, *PATCH)).astype(np.float32)
    cond = predictor.condition("CT of the abdomen", TARGETS["abdomen"])
    film, head = cond.film.cpu().numpy(), cond.head_params.cpu().numpy()
    mod = np.zeros(1, dtype=np.int64)
    x = torch.from_numpy(patch).to(device)

    def eager():
        out = predictor.patch_logits(x, "CT", cond)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    feed = {"image": patch, "modality": mod, "film": film, "head_params": head}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for k, v in feed.items():
        t = grpcclient.InferInput(k, list(v.shape), "INT64" if v.dtype == np.int64 else "FP32")
        t.set_data_from_numpy(v)
        inputs.append(t)
    outputs = [grpcclient.InferRequestedOutput("logits")]
    ens_inputs = [grpcclient.InferInput("IMAGE", list(patch.shape), "FP32")]
    ens_inputs[0].set_data_from_numpy(patch)
    for name, values in (("MODALITY", ["CT"]), ("T1", ["CT of the abdomen"]), ("TARGETS", TARGETS["abdomen"])):
        t = grpcclient.InferInput(name, [len(values)], "BYTES")
        t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
        ens_inputs.append(t)
    ens_outputs = [grpcclient.InferRequestedOutput("LOGITS")]
    for path, fn in (("pytorch_eager", eager), ("onnxruntime", lambda: ort_segmenter(feed)),
                     ("triton", lambda: client.infer("segmenter", inputs, outputs=outputs)),
                     ("triton_ensemble", lambda: client.infer("segment_patch", ens_inputs, outputs=ens_outputs))):
        times, _ = _time(fn, 1, cfg.patch_repeats, f"patch {path}")
        res.patch_latency_ms[path] = [t * 1000 for t in times]


def _prompt_latency(cfg, res, server) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)

    def request(t1, suffix=""):
        arrays = {"MODALITY": np.array([b"CT"], dtype=np.object_), "T1": np.array([t1.encode()], dtype=np.object_),
                  "TARGETS": np.array([f"{t}{suffix}".encode() for t in TARGETS["abdomen"]], dtype=np.object_)}
        inputs = []
        for k, v in arrays.items():
            t = grpcclient.InferInput(k, list(v.shape), "BYTES")
            t.set_data_from_numpy(v)
            inputs.append(t)
        t0 = time.perf_counter()
        client.infer("encode_prompts", inputs)
        return (time.perf_counter() - t0) * 1000

    stamp = time.time_ns()
    # fresh T1 and target texts every time: nothing can come from the response cache
    res.prompt_latency_ms["uncached"] = [request(f"CT of the abdomen, benchmark series {stamp}-{i}", f" {stamp}-{i}")
                                         for i in range(cfg.prompt_repeats)]
    request("CT of the abdomen")
    res.prompt_latency_ms["cached"] = [request("CT of the abdomen") for _ in range(cfg.prompt_repeats)]


def _ct512(cfg, predictor) -> float:
    from duplus.synth.phantoms import AcquisitionSpec, generate_phantom

    acq = AcquisitionSpec(spacing=(0.78, 0.78, 1.5), axis_order=(0, 1, 2), flips=(True, True, False), noise=1.0)
    ph = generate_phantom("abdomen", "CT", 515151, acquisition=acq)
    log.info("ct512 volume %s", ph.image.shape)
    times, _ = _time(lambda: predictor.predict_array(ph.image, ph.affine, "CT", "CT of the abdomen",
                                                     TARGETS["abdomen"]), 1, 1, "ct512")
    return round(times[0], 3)


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
    if "pytorch_eager_bf16" in lat:
        summary["half_vs_fp32_eager"] = round(mean_over_volumes("pytorch_eager")
                                              / mean_over_volumes("pytorch_eager_bf16"), 3)
    return summary


def write_report(cfg: BenchConfig, res: Results, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(res)
    (out / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    (out / "raw.json").write_text(json.dumps(asdict(res), indent=2, default=str))

    paths = list(s["volume_latency_median_s"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(cfg.volumes))
    for i, v in enumerate(cfg.volumes):
        ax.bar(np.arange(len(paths)) + i * width, [s["volume_latency_median_s"][p][v] for p in paths], width, label=v)
    ax.set_xticks(np.arange(len(paths)) + width * (len(cfg.volumes) - 1) / 2, paths)
    ax.set_ylabel("whole-volume latency, median (s)")
    ax.set_title(f"{cfg.label}: {res.machine['cpu']}" + (f" + {res.machine['gpu']}" if res.machine["gpu"] else ""),
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

    m = res.machine
    lines = [f"# Benchmark `{cfg.label}`", "",
             f"Command: `python -m perf.bench --label {cfg.label} --volumes {' '.join(cfg.volumes)} "
             f"--repeats {cfg.repeats} --concurrency {' '.join(map(str, cfg.concurrency))}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; Python {m['python']}, "
             f"torch {m['torch']}, ONNX Runtime {m['onnxruntime']} ({', '.join(m['onnxruntime_providers'])}), "
             f"Triton {m['triton_server']}; {m['created']}.", "",
             "## Whole volume (median of repeats after warm-up)", "",
             "| path | " + " | ".join(f"{v} (s)" for v in cfg.volumes) + " | volumes/s |",
             "|---|" + "---|" * (len(cfg.volumes) + 1)]
    for p in paths:
        lines.append(f"| {p} | " + " | ".join(f"{s['volume_latency_median_s'][p][v]:.2f}" for v in cfg.volumes)
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
    if "half_vs_fp32_eager" in s:
        lines.append(f"| half_vs_fp32_eager | {s['half_vs_fp32_eager']:.2f} | eager fp32 / eager bf16 autocast |")
    if "ct512_end_to_end_s" in s:
        lines.append(f"| ct512_end_to_end_s | {s['ct512_end_to_end_s']:.2f} | 512x512 CT, eager, end to end |")
    lines += ["", "## One 96³ patch, median ms", "", "| path | ms |", "|---|---|"]
    lines += [f"| {p} | {v:.1f} |" for p, v in s["patch_latency_median_ms"].items()]
    lines += ["", "## Prompt encoding through Triton (encode_prompts), median ms", "", "| prompts | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["prompt_latency_median_ms"].items()]
    lines += ["", f"## Triton throughput vs concurrency ({cfg.volumes[0]})", "",
              "| clients | requests | volumes/s | p50 s | p95 s |", "|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['volumes_per_s']:.3f} | {r['p50_s']:.2f} | "
              f"{r['p95_s']:.2f} |" for r in res.throughput]
    lines += _tool_sections(out)
    if not res.machine.get("gpu"):
        lines += ["", "## GPU figures", "", "Not measured in this report: the machine has no GPU "
                  "(`half_vs_fp32_eager`, `ct512_end_to_end_s` and the GPU utilisation plot need one; the same "
                  "command records them on a GPU). TensorRT cannot be installed on these machines (DESIGN.md), so "
                  "no TensorRT engine path is timed here either."]
    lines += ["", "## Served vs eager labels (Dice per target)", "", "```", json.dumps(res.agreement, indent=1), "```",
              "", f"GPU monitor: {s['gpu_monitor']}.", "", "![latency](latency_by_path.png)",
              "![throughput](throughput_vs_concurrency.png)"]
    if (out / "gpu.png").exists():
        lines.append("![gpu](gpu.png)")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", report)
    return report


def _tool_sections(out: Path) -> list[str]:
    """perf_analyzer and locust results found next to the report (python -m perf.perf_analyzer / perf.load)."""
    import csv

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


def report_only(cfg: BenchConfig) -> Path:
    """Rewrite report.md from raw.json and the tool CSVs of an earlier run (after perf_analyzer / locust)."""
    out = cfg.out_root / cfg.label
    raw = json.loads((out / "raw.json").read_text())
    res = Results(**raw)
    from dataclasses import replace

    first = next(iter(res.volume_latency_s.values()))
    cfg = replace(cfg, volumes=tuple(first), concurrency=tuple(r["concurrency"] for r in res.throughput) or (1,),
                  repeats=len(next(iter(first.values()))))
    return write_report(cfg, res, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default=None,
                    help="machine label: results go to perf/results/<label>/ (default: cpu-<cores>core or the GPU)")
    ap.add_argument("--checkpoint", default=str(BenchConfig.checkpoint), help="checkpoint the repository was built from")
    ap.add_argument("--repository", default=str(BenchConfig.repository),
                    help="model repository built by export/build_engines.py (embedded flavour)")
    ap.add_argument("--volumes", nargs="+", default=list(BenchConfig.volumes), choices=sorted(VOLUMES),
                    help="phantom volumes to run every path on")
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
    import torch

    label = args.label or (torch.cuda.get_device_name(0).replace(" ", "-").lower() if torch.cuda.is_available()
                           else f"cpu-{os.cpu_count()}core")
    cfg = BenchConfig(label=label, checkpoint=Path(args.checkpoint), repository=Path(args.repository),
                      out_root=Path(args.out_root), volumes=tuple(args.volumes), warmup=args.warmup,
                      repeats=args.repeats, concurrency=tuple(args.concurrency),
                      requests_per_level=args.requests_per_level)
    report = report_only(cfg) if args.report_only else run(cfg)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
