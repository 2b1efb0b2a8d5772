"""Timing the paths side by side on the same volumes: PyTorch eager vs the exported units on ONNX Runtime vs Triton.

Per path, on the same benchmark volumes (:mod:`perf.volumes`): whole-volume latency (every timed
run of ``repeats`` after ``warmup``); per unit: one 96³ patch through the segmenter called directly
(eager, ONNX Runtime, Triton ``segmenter`` over gRPC) and through the ``segment_patch`` ensemble;
text-prompt cost through Triton with fresh prompts (uncached) vs repeated ones (response cache);
Triton throughput vs client concurrency; GPU utilisation over the whole run (pynvml, where NVML
exists). On a GPU also fp32 vs bfloat16-autocast eager and ``ct_512x300`` (a 512x512x300 CT) end to end.

:func:`run` returns the :class:`perf.raw.Results` and writes ``raw.json`` (and ``gpu.csv`` /
``gpu.png`` where a GPU was monitored); :mod:`perf.report` makes the report from them.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from perf.raw import Results, write_raw
from perf.volumes import PATCH, TARGETS, VOLUMES, make_volume, phantom_patch, t1_prompt

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]


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

    @property
    def out(self) -> Path:
        """perf/results/<label>/"""
        return self.out_root / self.label


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


def time_calls(fn, warmup: int, repeats: int, desc: str) -> tuple[list[float], object]:
    """``warmup`` untimed calls, then ``repeats`` timed ones: (seconds per call, the last result)."""
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
    from duplus.contract import KNOWN_TARGETS, EncodedPrompts, ServingLimits, UnitContract
    from serving.pipelines import VolumeSegmenter
    from serving.requests import PromptTokenizer, read_manifest
    from serving.runtime import make_runner

    manifest = read_manifest(repository)
    if any("onnx" not in manifest["units"][u] for u in ("text_encoder", "conditioning", "segmenter")):
        raise ValueError(f"{repository} was built with --engine {manifest.get('engine')}, without ONNX units; the "
                         "ONNX Runtime column needs a repository built with --engine onnxruntime or tensorrt")
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
    # as in the server's segment_volume: prompts are checked with the tokenizer model's rules
    return (VolumeSegmenter(manifest, known, encode, segment, limits, count_tokens=tokenizer.count_tokens),
            runners["segmenter"])


@dataclass(frozen=True)
class _Case:
    """One benchmark volume as every path gets it."""

    image: np.ndarray
    affine: np.ndarray
    modality: str
    t1: str
    targets: list[str]

    def args(self) -> tuple:
        return self.image, self.affine, self.modality, self.t1, self.targets


def _case(name: str) -> _Case:
    return case_of(name, make_volume(name))


def case_of(name: str, ph) -> _Case:
    """The benchmark case of volume ``name`` from its generated phantom ``ph`` (perf.volumes.make_volume)."""
    log.info("volume %s: %s voxels, spacing %s mm", name, ph.image.shape, np.round(ph.spacing, 2).tolist())
    return _Case(ph.image, ph.affine, ph.modality, t1_prompt(name, ph.sequence), VOLUMES[name].targets)


def run(cfg: BenchConfig) -> Results:
    """Measure every path; writes raw.json (and the GPU monitor's gpu.csv / gpu.png) to ``cfg.out``."""
    import torch

    from clients.grpc_client import SegmentationClient
    from duplus.inference import Predictor
    from duplus.metrics import dice
    from duplus.models.fastpaths import pytorch_kernels
    from perf.gpu_monitor import GpuMonitor
    from serving.serve import RepositoryError, TritonServer, check_repository

    out = cfg.out
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

    cases = {name: _case(name) for name in cfg.volumes}

    def per_volume(path: str, fn) -> dict:
        """Time ``fn(*case.args())`` on every volume under ``path``; the last result per volume."""
        last = {}
        for name, case in cases.items():
            times, last[name] = time_calls(partial(fn, *case.args()), cfg.warmup, cfg.repeats, f"{path} {name}")
            res.volume_latency_s.setdefault(path, {})[name] = times
        return last

    with GpuMonitor() as monitor:
        mark("eager")
        # each device's best window batch: one on CPU (the Predictor's default there), four on a GPU
        predictor = Predictor.from_checkpoint(cfg.checkpoint, device=device, sw_batch_size=4 if device == "cuda" else None)
        eager_labels = {name: p.labels for name, p in per_volume("pytorch_eager", predictor.predict_array).items()}
        if device == "cpu":   # the same model on PyTorch's own kernels: what duplus.models.fastpaths gains
            mark("eager, PyTorch's kernels")
            with pytorch_kernels():
                for name, p in per_volume("pytorch_eager_stock", predictor.predict_array).items():
                    res.extra.setdefault("fast_paths_vs_stock_dice", {})[name] = {
                        t: round(dice(p.labels == k + 1, eager_labels[name] == k + 1), 4)
                        for k, t in enumerate(cases[name].targets)}
        if device == "cuda":
            mark("eager bf16")
            half = Predictor.from_checkpoint(cfg.checkpoint, device=device, sw_batch_size=4, bf16=True)
            per_volume("pytorch_eager_bf16", half.predict_array)

        mark("onnxruntime")
        ort_volume, ort_segmenter = onnxruntime_segmenter(cfg.repository)
        per_volume("onnxruntime", ort_volume)

        mark("triton")
        with TritonServer(cfg.repository, checkpoint=cfg.checkpoint, log_file=out / "triton.log") as server, \
                SegmentationClient(server.grpc_url) as client:
            client.check_ready()
            for name, served in per_volume("triton", client.segment_volume).items():
                res.agreement[name] = {t: round(dice(served.labels == k + 1, eager_labels[name] == k + 1), 4)
                                       for k, t in enumerate(cases[name].targets)}

            mark("patch")
            _patch_latency(cfg, res, predictor, ort_segmenter, server, device)
            mark("prompts")
            _prompt_latency(cfg, res, server)
            mark("concurrency")
            _throughput(cfg, res, server, cases[cfg.volumes[0]])
        if device == "cuda" and cfg.ct512:
            mark("ct512")
            res.extra["ct512_end_to_end_s"] = _ct512(predictor)
        mark("end")
    monitor.write_csv(out / "gpu.csv")
    monitor.plot(out / "gpu.png", marks)
    res.extra["gpu_monitor"] = "pynvml" if monitor.available else f"not available ({monitor.reason})"
    write_raw(res, out)
    return res


def _triton_inputs(arrays: dict[str, np.ndarray]) -> list:
    import tritonclient.grpc as grpcclient

    dtypes = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.object_): "BYTES"}
    inputs = []
    for k, v in arrays.items():
        t = grpcclient.InferInput(k, list(v.shape), dtypes[v.dtype])
        t.set_data_from_numpy(v)
        inputs.append(t)
    return inputs


def _strings(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def _patch_latency(cfg, res, predictor, ort_segmenter, server, device) -> None:
    import torch
    import tritonclient.grpc as grpcclient

    from duplus.models.fastpaths import pytorch_kernels

    patch = phantom_patch("ct_abdomen", PATCH)
    t1, targets = t1_prompt("ct_abdomen"), TARGETS["abdomen"]
    cond = predictor.condition(t1, targets)
    film, head = cond.film.cpu().numpy(), cond.head_params.cpu().numpy()
    x = torch.from_numpy(patch).to(device)

    def eager():
        out = predictor.patch_logits(x, "CT", cond)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    feed = {"image": patch, "modality": np.zeros(1, dtype=np.int64), "film": film, "head_params": head}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs, outputs = _triton_inputs(feed), [grpcclient.InferRequestedOutput("logits")]
    ens_inputs = _triton_inputs({"IMAGE": patch, "MODALITY": _strings(["CT"]), "T1": _strings([t1]),
                                 "TARGETS": _strings(targets)})
    ens_outputs = [grpcclient.InferRequestedOutput("LOGITS")]
    def stock():
        with pytorch_kernels():
            return eager()

    paths = [("pytorch_eager", eager)] + ([("pytorch_eager_stock", stock)] if device == "cpu" else [])
    paths += [("onnxruntime", lambda: ort_segmenter(feed)),
              ("triton", lambda: client.infer("segmenter", inputs, outputs=outputs)),
              ("triton_ensemble", lambda: client.infer("segment_patch", ens_inputs, outputs=ens_outputs))]
    for path, fn in paths:
        times, _ = time_calls(fn, 1, cfg.patch_repeats, f"patch {path}")
        res.patch_latency_ms[path] = [t * 1000 for t in times]


def _prompt_latency(cfg, res, server) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    t1, targets = t1_prompt("ct_abdomen"), TARGETS["abdomen"]

    def request(t1, suffix=""):
        inputs = _triton_inputs({"MODALITY": _strings(["CT"]), "T1": _strings([t1]),
                                 "TARGETS": _strings([f"{t}{suffix}" for t in targets])})
        t0 = time.perf_counter()
        client.infer("encode_prompts", inputs)
        return (time.perf_counter() - t0) * 1000

    stamp = time.time_ns()
    # fresh T1 and target texts every time: nothing can come from the response cache
    res.prompt_latency_ms["uncached"] = [request(f"{t1}, benchmark series {stamp}-{i}", f" {stamp}-{i}")
                                         for i in range(cfg.prompt_repeats)]
    request(t1)
    res.prompt_latency_ms["cached"] = [request(t1) for _ in range(cfg.prompt_repeats)]


def _throughput(cfg, res, server, case: _Case) -> None:
    """segment_volume requests from ``c`` concurrent gRPC clients, per concurrency level."""
    from clients.grpc_client import SegmentationClient

    for c in cfg.concurrency:
        lat = []

        def one(_, lat=lat):
            t0 = time.perf_counter()
            with SegmentationClient(server.grpc_url) as cl:
                cl.segment_volume(*case.args())
            lat.append(time.perf_counter() - t0)

        n = max(cfg.requests_per_level, c)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            list(tqdm(pool.map(one, range(n)), total=n, desc=f"concurrency {c}", leave=False, disable=None))
        wall = time.perf_counter() - t0
        res.throughput.append({"concurrency": c, "requests": n, "volumes_per_s": round(n / wall, 4),
                               "p50_s": round(float(np.percentile(lat, 50)), 3),
                               "p95_s": round(float(np.percentile(lat, 95)), 3)})


def _ct512(predictor) -> float:
    case = _case("ct_512x300")
    times, _ = time_calls(lambda: predictor.predict_array(*case.args()), 1, 1, "ct512")
    return round(times[0], 3)
