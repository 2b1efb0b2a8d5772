"""perf_analyzer against the served models, with real input data.

    make perf-tools                      # once: the tool environment (.venv-perf) and libb64
    python -m perf.perf_analyzer --model segment_patch --concurrency 1 2 --shared-memory none system

The binary comes from the ``tritonclient==2.51.0`` manylinux wheel, installed with ``--no-deps``
into its own tool environment ``.venv-perf`` (that wheel pins numpy<2 and protobuf<5, which
conflict with the project's); it needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (from
``nvidia-cuda-runtime-cu12`` in the same tool environment, put on LD_LIBRARY_PATH here).

Input data is a perf_analyzer JSON file made from the benchmark volumes (perf/volumes.py), never
random bytes: a 96x96x64 patch of the held-out CT phantom ``ct_abdomen`` in model space (around the
liver) with the prompts "CT", "CT of the abdomen", ["liver", "spleen"]; for ``segmenter`` the
conditioning those prompts give; for ``segment_volume`` the whole head-and-neck CT ``ct_head_neck``
with its affine and prompts. Results go to CSV (perf_analyzer's own ``-f`` format, one file per
model and shared-memory mode).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from perf import volumes

log = logging.getLogger("perf_analyzer")

ROOT = Path(__file__).resolve().parents[1]
TOOL_ENV = ROOT / ".venv-perf"
MODELS = ("segment_patch", "segmenter", "encode_prompts", "segment_volume")
# benchmark volumes (perf/volumes.py): the patch models get a patch of PATCH_VOLUME with PROMPTS,
# segment_volume the whole WHOLE_VOLUME with its own prompts
PATCH_VOLUME, WHOLE_VOLUME = "ct_abdomen", "ct_head_neck"
PROMPTS = {"MODALITY": ["CT"], "T1": ["CT of the abdomen"], "TARGETS": ["liver", "spleen"]}


class PerfAnalyzerUnavailable(RuntimeError):
    """The perf_analyzer binary is missing or cannot run here; the message says how to install it."""


def tool_paths() -> tuple[Path, dict]:
    binary = TOOL_ENV / "bin" / "perf_analyzer"
    if not binary.is_file():
        raise PerfAnalyzerUnavailable(f"{binary} is missing: run `make perf-tools`")
    env = dict(os.environ)
    cudart = sorted(TOOL_ENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    if cudart:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(cudart[0]), env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    probe = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True)
    if "error while loading shared libraries" in probe.stderr:
        raise PerfAnalyzerUnavailable(f"perf_analyzer cannot start: {probe.stderr.strip()} "
                                      "(run `make perf-tools`: it installs libb64-0d and nvidia-cuda-runtime-cu12)")
    return binary, env


def _tensor(arr: np.ndarray) -> dict:
    arr = np.ascontiguousarray(arr)
    return {"b64": base64.b64encode(arr.tobytes()).decode("ascii"), "shape": list(arr.shape)}


def _strings(values: list[str]) -> dict:
    return {"content": list(values), "shape": [len(values)]}


def phantom_patch(checkpoint: Path | None = None) -> tuple[np.ndarray, dict]:
    """A real 96x96x64 model-space patch around the liver of PATCH_VOLUME (+ the conditioning of PROMPTS)."""
    patch = volumes.phantom_patch(PATCH_VOLUME, (96, 96, 64), around="liver")
    cond = {}
    if checkpoint is not None:
        from duplus.inference import Predictor

        c = Predictor.from_checkpoint(checkpoint).condition(PROMPTS["T1"][0], PROMPTS["TARGETS"])
        cond = {"film": c.film.numpy().astype(np.float32), "head_params": c.head_params.numpy().astype(np.float32)}
    return patch, cond


def input_data(model: str, checkpoint: Path) -> dict:
    """perf_analyzer's --input-data JSON for one model."""
    if model == "segment_volume":
        ph = volumes.make_volume(WHOLE_VOLUME)
        entry = {"VOLUME": _tensor(ph.image.astype(np.float32)), "AFFINE": _tensor(ph.affine.astype(np.float64)),
                 "MODALITY": _strings([ph.modality]), "T1": _strings([volumes.t1_prompt(WHOLE_VOLUME, ph.sequence)]),
                 "TARGETS": _strings(volumes.VOLUMES[WHOLE_VOLUME].targets)}
    elif model == "encode_prompts":
        entry = {k: _strings(v) for k, v in PROMPTS.items()}
    elif model == "segment_patch":
        patch, _ = phantom_patch()
        entry = {"IMAGE": _tensor(patch), **{k: _strings(v) for k, v in PROMPTS.items()}}
    elif model == "segmenter":
        patch, cond = phantom_patch(checkpoint)
        entry = {"image": _tensor(patch), "modality": _tensor(np.zeros(1, dtype=np.int64)),
                 "film": _tensor(cond["film"]), "head_params": _tensor(cond["head_params"])}
    else:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    return {"data": [entry]}


def write_input_data(model: str, checkpoint: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(model, checkpoint)))
    return path


def run(model: str, url: str, data: Path, csv_path: Path, *, concurrency: tuple[int, ...] = (1,),
        request_rate: tuple[float, ...] | None = None, shared_memory: str = "none", output_shm_mb: int = 64,
        measurement_ms: int = 5000, count_windows: int | None = None, max_trials: int = 5,
        stability_pct: float = 25.0, timeout_s: float = 900) -> list[dict]:
    """One perf_analyzer sweep over gRPC; returns the CSV rows."""
    binary, env = tool_paths()
    if shared_memory not in ("none", "system", "cuda"):
        raise ValueError(f"shared_memory must be none, system or cuda, got {shared_memory!r}")
    cmd = [str(binary), "-m", model, "-u", url, "-i", "grpc", "--input-data", str(data), "-f", str(csv_path),
           "--shared-memory", shared_memory, "-r", str(max_trials), "-s", str(stability_pct)]
    if shared_memory != "none":
        cmd += ["--output-shared-memory-size", str(output_shm_mb * 1024 * 1024)]
    if count_windows:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(count_windows)]
    else:
        cmd += ["-p", str(measurement_ms)]
    if request_rate:
        lo, hi = min(request_rate), max(request_rate)
        step = (hi - lo) / (len(request_rate) - 1) if len(request_rate) > 1 else 1
        cmd += ["--request-rate-range", f"{lo}:{hi}:{step}"]
    else:
        lo, hi = min(concurrency), max(concurrency)
        step = (hi - lo) // (len(concurrency) - 1) if len(concurrency) > 1 else 1
        cmd += ["--concurrency-range", f"{lo}:{hi}:{max(step, 1)}"]
    log.info("%s", " ".join(cmd))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    (csv_path.with_suffix(".log")).write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.perf_analyzer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["segment_patch"], choices=MODELS, help="models to measure")
    ap.add_argument("--url", default=None, help="gRPC url of a running server (default: start one on --repository)")
    ap.add_argument("--repository", default=str(ROOT / "model_repository"), help="repository to serve when no --url")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "duplus_demo.pt"),
                    help="checkpoint the repository was built from (stale check, segmenter conditioning)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="concurrency levels (start..end)")
    ap.add_argument("--request-rate", type=float, nargs="+", default=None,
                    help="request-rate mode instead of concurrency: rates in requests/s (start..end)")
    ap.add_argument("--shared-memory", nargs="+", default=["none", "system"], choices=("none", "system", "cuda"),
                    help="gRPC with and/or without shared memory for the tensors")
    ap.add_argument("--measurement-ms", type=int, default=5000, help="measurement window (ms)")
    ap.add_argument("--label", default=f"cpu-{os.cpu_count()}core", help="results go to perf/results/<label>/")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = ROOT / "perf" / "results" / args.label
    try:
        tool_paths()
    except PerfAnalyzerUnavailable as exc:
        log.error("%s", exc)
        return 2

    def sweep(url: str) -> None:
        for model in args.model:
            data = write_input_data(model, Path(args.checkpoint), out / f"input_{model}.json")
            for shm in args.shared_memory:
                mode = "rate" if args.request_rate else "concurrency"
                rows = run(model, url, data, out / f"perf_analyzer_{model}_{mode}_{shm}.csv",
                           concurrency=tuple(args.concurrency),
                           request_rate=tuple(args.request_rate) if args.request_rate else None, shared_memory=shm,
                           measurement_ms=args.measurement_ms)
                for r in rows:
                    print(f"{model:15s} shm={shm:6s} " + " ".join(
                        f"{k}={r[k]}" for k in ("Concurrency", "Request Rate", "Inferences/Second", "p50 latency",
                                                "p95 latency", "p99 latency") if k in r))

    if args.url:
        sweep(args.url)
    else:
        from serving.serve import TritonServer

        with TritonServer(args.repository, checkpoint=args.checkpoint, log_file=out / "triton_pa.log") as server:
            sweep(server.grpc_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
