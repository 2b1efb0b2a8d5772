"""The GPU figures in one short, prepared run on a lent CUDA machine (no Triton server there).

    python -m perf.gpu_session prepare --kit .whl/kit          # here, in the project's environment (CPU)
    python -m perf.gpu_session run --kit .whl/kit --out DIR    # there, on the GPU (a bare PyTorch-CUDA image)
    python -m perf.gpu_session report --raw DIR/gpu_raw.json [DIR2/gpu_raw.json] --out perf/results/nvidia-h200

Why a kit: a lent GPU machine holds PyTorch with CUDA but not this project's environment, and what travels
to it is limited (64 MiB with the repository). The packaged text encoder (83 MB of weights) does not fit, so
``prepare`` runs the real encoder here on every prompt text the run will use and stores those embeddings
with the tokenizer; ``run`` looks texts up there and refuses (KeyError naming the text) any it was not given.
The segmenter, conditioning and PEMMA weights are the shipped checkpoints themselves, and the ONNX units come
from the model repository built here by ``export/build_engines.py``.

``run`` measures, on the same seeded phantoms as ``perf.bench`` (perf/volumes.py), with the GPU monitored by
pynvml: the DuPLUS segmenter's 96^3 patch (fp32 and bfloat16 autocast; batch 1..16; the served ``torch``
engine's runner with its host copies; PyTorch and ONNX Runtime on the host's CPU cores for the ratio) and
its logits' parity GPU vs ONNX Runtime CPU; whole volumes end to end (fp32, bf16, CPU) with Dice against
the phantom's truth and label agreement between paths; ``ct_512`` end to end; the sliding-window batch on
``ct_256``; the PEMMA UNETR window (fp32, bf16, parity vs CPU). Each block is timed against ``--budget-s`` and
skipped, saying so, once the budget is spent; ``gpu_raw.json`` is rewritten after every block, so a run
stopped at its limit still returns what it measured. ``report`` turns the raw file into ``gpu_report.md`` and
``gpu_paths.png`` beside the monitor's ``gpu.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("perf.gpu_session")

#: the volumes of every whole-volume figure (perf/volumes.py); CPU end to end only for the first four
VOLUME_NAMES = ("small_ct_head_neck", "ct_abdomen", "ct_head_neck", "pet_head_neck", "ct_256", "ct_512", "ct_512x300")
CPU_VOLUMES = ("small_ct_head_neck", "ct_abdomen", "ct_head_neck", "pet_head_neck")
PATCH_BATCHES = (1, 2, 4, 8, 16)
SW_BATCHES = (4, 16, 32)
EMBEDDINGS = "embeddings.pt"
TOKENIZER = "tokenizer"
UNITS = ("segmenter",)
BLOCKS = ("patch", "engines", "volumes", "stages", "pemma", "sliding_window_batch")


# ---------------------------------------------------------------------------------------------- the kit --
class RecordingEncoder:
    """The real text encoder, remembering every text it encoded (``prepare``)."""

    def __init__(self, encoder):
        self.encoder, self.tokenizer, self.dim, self.name = encoder, encoder.tokenizer, encoder.dim, encoder.name
        self.seen: dict[str, object] = {}

    def encode(self, texts: list[str]):
        out = self.encoder.encode(texts)
        for t, e in zip(texts, out):
            self.seen[t] = e.clone()
        return out


class RecordedEncoder:
    """Embeddings computed by the real encoder in ``prepare``, looked up by text (``run``)."""

    def __init__(self, kit: Path):
        import torch
        from transformers import AutoTokenizer

        rec = torch.load(kit / EMBEDDINGS, map_location="cpu", weights_only=True)
        self.table = dict(zip(rec["texts"], rec["embeddings"]))
        self.name, self.dim = rec["name"], int(rec["embeddings"].shape[1])
        self.tokenizer = AutoTokenizer.from_pretrained(str(kit / TOKENIZER), local_files_only=True)

    def encode(self, texts: list[str]):
        import torch

        missing = [t for t in texts if t not in self.table]
        if missing:
            raise KeyError(f"text {missing[0]!r} was not encoded by `perf.gpu_session prepare`; add it there")
        return torch.stack([self.table[t] for t in texts])


def prepare(kit: Path, checkpoint: Path, repository: Path) -> None:
    """Encode every prompt text of the run with the real encoder; copy the tokenizer and the ONNX units."""
    import torch

    from duplus.inference import Predictor
    from duplus.text_encoder import resolve_text_encoder_path
    from perf.measure import _case
    from perf.volumes import PATCH, TARGETS, t1_prompt  # noqa: F401 - PATCH documents the patch of the run

    kit.mkdir(parents=True, exist_ok=True)
    probe = Predictor.from_checkpoint(checkpoint)      # builds the real encoder the checkpoint names
    rec = RecordingEncoder(probe.text_encoder)
    pred = Predictor(probe.model, probe.vocabulary, rec)
    pred.known_target_embeddings()
    prompts = [("CT", t1_prompt("ct_abdomen"), TARGETS["abdomen"])]
    for name in VOLUME_NAMES:
        case = _case(name)
        prompts.append((case.modality, case.t1, case.targets))
    for modality, t1, targets in prompts:
        pred.encode(modality, t1, list(targets))
        pred.condition(t1, list(targets))
    texts = sorted(rec.seen)
    torch.save({"name": rec.name, "texts": texts, "embeddings": torch.stack([rec.seen[t] for t in texts])},
               kit / EMBEDDINGS)
    src = Path(resolve_text_encoder_path(probe.cfg.text_encoder))
    tok = kit / TOKENIZER
    tok.mkdir(exist_ok=True)
    for f in src.iterdir():   # the tokenizer and the config it is typed by: no weights
        if f.is_file() and f.suffix not in (".bin", ".safetensors", ".onnx", ".h5", ".msgpack", ".ot"):
            shutil.copy2(f, tok / f.name)
    for unit in UNITS:
        shutil.copy2(repository / unit / "1" / "model.onnx", kit / f"{unit}.onnx")
    log.info("kit %s: %d texts, tokenizer (%d files), units %s", kit, len(texts), len(list(tok.iterdir())), UNITS)


# ----------------------------------------------------------------------------------------------- the run --
class Run:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
        self.raw: dict = {"blocks": {}, "skipped": {}, "errors": {}}
        self.marks: list[tuple[float, str]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.raw["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / "gpu_raw.json").write_text(json.dumps(self.raw, indent=1))

    def block(self, name: str, fn, *args) -> None:
        if self.elapsed() > self.budget_s:
            self.raw["skipped"][name] = f"budget of {self.budget_s:.0f} s spent at {self.elapsed():.0f} s"
            log.warning("skip %s: %s", name, self.raw["skipped"][name])
            self.save()
            return
        self.marks.append((self.elapsed(), name))
        log.info("== %s (%.0f s)", name, self.elapsed())
        t = time.perf_counter()
        try:
            self.raw["blocks"][name] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - one failed block must not cost the others
            log.exception("block %s failed", name)
            self.raw["errors"][name] = f"{type(exc).__name__}: {exc}"
        self.raw.setdefault("block_s", {})[name] = round(time.perf_counter() - t, 1)
        self.save()


def _timed(fn, warmup: int, repeats: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def _ms(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times) * 1000, 3), "min_ms": round(min(times) * 1000, 3),
            "n": len(times)}


def machine() -> dict:
    """perf.measure.machine_info (the CPU, Python, torch, ONNX Runtime) with the GPU's driver, CUDA, cuDNN and
    whether TF32 is on; no Triton server runs in this session."""
    import torch

    from perf.measure import machine_info

    info = machine_info()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        smi = f"nvidia-smi: {exc}"
    return {"gpu": info["gpu"], "nvidia_smi": smi, "cpu": info["cpu"], "cores": info["cores"],
            "python": info["python"], "torch": info["torch"], "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "onnxruntime": info["onnxruntime"],
            "ort_providers": info["onnxruntime_providers"], "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def run(kit: Path, out: Path, checkpoint: Path, pemma_checkpoint: Path, budget_s: float, quick: bool,
        blocks: tuple[str, ...] = BLOCKS) -> dict:
    import torch

    from duplus.contract import contracts
    from duplus.inference import Predictor
    from duplus.metrics import dice
    from perf.gpu_monitor import GpuMonitor
    from perf.volumes import PATCH, TARGETS, phantom_patch, t1_prompt
    from serving.runtime import OnnxRuntimeRunner, TorchRunner

    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    r = Run(out, budget_s)
    r.raw["machine"] = machine()
    r.raw["config"] = {"volumes": VOLUME_NAMES, "patch": PATCH, "quick": quick, "budget_s": budget_s}
    r.save()
    reps = 3 if quick else 20
    enc = RecordedEncoder(kit)
    probe = Predictor.from_checkpoint(checkpoint, text_encoder=enc)
    model, vocab = probe.model, probe.vocabulary
    gpu_pred = {bf: Predictor(model, vocab, enc, device=dev, sw_batch_size=4, bf16=bf) for bf in (False, True)}
    import copy

    cpu_pred = Predictor(copy.deepcopy(model).cpu(), vocab, enc, device="cpu", sw_batch_size=4)
    seg_contract = contracts(model.cfg)["segmenter"]

    patch = phantom_patch("ct_abdomen", PATCH)
    t1, targets = t1_prompt("ct_abdomen"), TARGETS["abdomen"]

    def patch_block():
        res = {}
        cond = gpu_pred[False].condition(t1, targets)
        for b in PATCH_BATCHES[:2] if quick else PATCH_BATCHES:
            x = torch.from_numpy(np.repeat(patch, b, axis=0)).to(dev)
            for bf in (False, True):
                def step(x=x, bf=bf):
                    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf):
                        return gpu_pred[False].patch_logits(x, "CT", cond)
                times = _timed(step, 3, reps, sync)
                res[f"{'bf16' if bf else 'fp32'}_b{b}"] = {**_ms(times), "patches_per_s":
                                                           round(b / statistics.median(times), 1)}
        return res

    def engines_block():
        """The served units' runners on this machine: torch on the GPU (host copies included) vs ONNX Runtime
        on the CPU cores, same feed; and PyTorch eager on the CPU."""
        cond = cpu_pred.condition(t1, targets)
        feed = {"image": patch, "modality": np.zeros(1, dtype=np.int64),
                "film": cond.film.float().numpy(), "head_params": cond.head_params.float().numpy()}
        torch_gpu = TorchRunner("segmenter", checkpoint, seg_contract, gpu=gpu)
        torch_cpu = TorchRunner("segmenter", checkpoint, seg_contract, gpu=False)
        ort_cpu = OnnxRuntimeRunner(kit / "segmenter.onnx", seg_contract, threads=os.cpu_count() or 0)
        name = seg_contract.outputs[0].name
        ref = ort_cpu(feed)[name]
        res = {"output": name}
        for path, runner, n in (("torch_gpu_runner", torch_gpu, reps), ("onnxruntime_cpu", ort_cpu, max(3, reps // 4)),
                                ("torch_cpu_runner", torch_cpu, max(3, reps // 4))):
            got = runner(feed)[name]
            times = _timed(lambda runner=runner: runner(feed), 2, n, sync)
            res[path] = {**_ms(times), "max_abs_vs_onnxruntime_cpu": float(np.abs(got - ref).max()),
                         "logit_range": float(np.abs(ref).max())}
        return res

    cases = {}

    def volumes_block():
        res = {}
        for name in VOLUME_NAMES[:3] if quick else VOLUME_NAMES:
            case, truth, truth_names = cases.setdefault(name, _volume_case(name))
            row = {"shape": list(case.image.shape)}
            labels = {}
            paths = [("gpu_fp32", gpu_pred[False]), ("gpu_bf16", gpu_pred[True])] if gpu else []
            if name in CPU_VOLUMES:
                paths.append(("cpu_fp32", cpu_pred))
            for path, pred in paths:
                n = 1 if path.startswith("cpu") else (1 if quick else 3)
                last = {}

                def call(pred=pred, last=last, case=case):
                    last["p"] = pred.predict_array(*case.args())
                times = _timed(call, 1 if path.startswith("gpu") else 0, n, sync)
                p = last["p"]
                labels[path] = p.labels
                row[path] = {"median_s": round(statistics.median(times), 3), "n": n,
                             "dice": {t: round(dice(p.labels == k + 1, truth == truth_names.index(r) + 1), 4)
                                      for k, (t, r) in enumerate(zip(p.targets, p.resolved))}}
            ref = labels.get("cpu_fp32", labels.get("gpu_fp32"))
            for path, lab in labels.items():
                if lab is not ref:
                    k_all = range(1, len(case.targets) + 1)
                    row[path]["agreement_vs_" + ("cpu_fp32" if "cpu_fp32" in labels else "gpu_fp32")] = \
                        round(float(np.mean([dice(lab == k, ref == k) for k in k_all])), 4)
            res[name] = row
            log.info("%s: %s", name, {k: v for k, v in row.items() if k != "shape"})
        return res

    def sw_block():
        res = {}
        name = "small_ct_head_neck" if quick else "ct_256"
        case = cases.setdefault(name, _volume_case(name))[0]
        res["volume"] = name
        for sw in SW_BATCHES[:2] if quick else SW_BATCHES:
            for bf in (False, True):
                pred = Predictor(model, vocab, enc, device=dev, sw_batch_size=sw, bf16=bf)
                times = _timed(lambda pred=pred: pred.predict_array(*case.args()), 1, 2 if quick else 3, sync)
                res[f"{'bf16' if bf else 'fp32'}_sw{sw}"] = {"median_s": round(statistics.median(times), 3)}
        return res

    def stages_block():
        """Where a whole volume's time goes on this machine: the pipeline's stages timed one by one (the order of
        ``SegmentationPipeline.__call__``), GPU fp32."""
        pipe = gpu_pred[False].pipeline
        res = {}
        for name in ("ct_abdomen", "ct_256", "ct_512", "ct_512x300"):
            case, _, _ = cases.setdefault(name, _volume_case(name))
            enc = pipe.encode_prompts(case.modality, case.t1, list(case.targets))
            resolved, _ = pipe.resolve(case.targets, enc.target_embedding)
            row, state = _stage_times(pipe, case, enc, resolved, sync)
            row["model_shape"] = list(state["x"].shape[1:])
            row["box"] = [[b.start, b.stop] for b in state["box"]] if state["box"] else None
            res[name] = row
            log.info("stages %s: %s", name, row)
        return res

    def pemma_block():
        from duplus.models.pemma import load_pemma_checkpoint, merged_for_export
        from duplus.models.units import PemmaSegmenterUnit, pemma_example_inputs

        pm, record = load_pemma_checkpoint(pemma_checkpoint)
        unit = PemmaSegmenterUnit(merged_for_export(pm, check=False)[0]).eval()
        crop = int(record["model"]["unetr"]["crop"])
        cpu_unit = copy.deepcopy(unit)
        unit = unit.to(dev)
        res = {"crop": crop}
        inp = pemma_example_inputs(crop, batch=1, mode=0, seed=1)
        with torch.no_grad():
            ref = cpu_unit(inp["image"], inp["mode"])[0]
            got = unit(inp["image"].to(dev), inp["mode"].to(dev))[0].float().cpu()
        res["max_abs_gpu_fp32_vs_cpu"] = float((got - ref).abs().max())
        res["logit_range"] = float(ref.abs().max())
        for b in (1,) if quick else (1, 4, 16):
            x = pemma_example_inputs(crop, batch=b, mode=0, seed=2)
            img, mode = x["image"].to(dev), x["mode"].to(dev)
            for bf in (False, True):
                def step(img=img, mode=mode, bf=bf):
                    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf):
                        return unit(img, mode)
                times = _timed(step, 3, reps, sync)
                res[f"{'bf16' if bf else 'fp32'}_b{b}"] = {**_ms(times), "windows_per_s":
                                                           round(b / statistics.median(times), 1)}
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
                half = unit(img, mode)[0].float()
            with torch.no_grad():
                full = unit(img, mode)[0].float()
            res[f"bf16_b{b}_max_abs_vs_fp32"] = float((half - full).abs().max())
            res[f"bf16_b{b}_argmax_agreement"] = float((half.argmax(1) == full.argmax(1)).float().mean())
        with torch.no_grad():
            x = pemma_example_inputs(crop, batch=1, mode=0, seed=3)
            times = _timed(lambda: cpu_unit(x["image"], x["mode"]), 1, 3, lambda: None)
        res["cpu_fp32_b1"] = _ms(times)
        return res

    chosen = {"patch": patch_block, "engines": engines_block, "volumes": volumes_block, "stages": stages_block,
              "pemma": pemma_block, "sliding_window_batch": sw_block}
    with GpuMonitor(interval_s=0.2) as mon:
        for name in blocks:
            r.block(name, chosen[name])
    mon.write_csv(out / "gpu.csv")
    mon.plot(out / "gpu.png", r.marks)
    r.raw["gpu_monitor"] = "pynvml" if mon.available else f"not available ({mon.reason})"
    if gpu:
        r.raw["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    r.save()
    return r.raw


def _stage_times(pipe, case, enc, resolved, sync) -> tuple[dict, dict]:
    """Seconds per stage of ``SegmentationPipeline.__call__`` on one case (the second of two passes)."""
    from duplus.preprocessing import body_box, fuse_labels, keep_largest_components, to_input_grid, to_model_space

    state: dict = {}
    steps = (
        ("to_model_space", lambda: state.update(x=to_model_space(case.image, case.affine, case.modality, pipe.spacing,
                                                                 check=False, device=pipe.resample_device)[0])),
        ("body_box", lambda: state.update(box=body_box(state["x"], case.modality))),
        ("sliding_window", lambda: state.update(p=pipe.probabilities_in_body(state["x"], case.modality, enc))),
        ("to_input_grid", lambda: state.update(pi=to_input_grid(state["p"].to(pipe.resample_device), state["x"].affine,
                                                                case.affine, tuple(case.image.shape)))),
        ("fuse_labels", lambda: state.update(lab=fuse_labels(state["pi"]).cpu().numpy().astype(np.uint8))),
        ("largest_components", lambda: keep_largest_components(state["lab"], resolved)),
    )
    row = {}
    for _ in range(2):            # the first pass warms up; the second is reported
        for step, fn in steps:
            t = time.perf_counter()
            fn()
            sync()
            row[step] = round(time.perf_counter() - t, 3)
    return row, state


def _volume_case(name: str):
    """(the benchmark case as perf.bench runs it, the phantom's truth labels, their names): one generation."""
    from perf.measure import case_of
    from perf.volumes import make_volume

    ph = make_volume(name)
    return case_of(name, ph), ph.label, list(ph.label_names)


# -------------------------------------------------------------------------------------------- the report --
def merge_raw(paths: list[Path]) -> dict:
    """Several runs' gpu_raw.json as one: a later run's blocks replace an earlier's (a rerun of some blocks)."""
    raw: dict = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        if not raw:
            raw = {**r, "runs": []}
        else:
            raw["machine"] = r["machine"]
            for key in ("blocks", "block_s", "errors", "skipped"):
                raw.setdefault(key, {}).update(r.get(key, {}))
            for name in r.get("blocks", {}):
                raw["errors"].pop(name, None)
                raw["skipped"].pop(name, None)
        for name in r.get("blocks", {}):
            raw.setdefault("block_run", {})[name] = len(raw["runs"]) + 1
        raw["runs"].append({"blocks": list(r.get("blocks", {})), "elapsed_s": r.get("elapsed_s"),
                            "peak_gib": r.get("max_memory_allocated_gib"),
                            "volumes": {n: {p: {"median_s": v["median_s"], "mean_dice": round(float(np.mean(
                                list(v["dice"].values()))), 4)} for p, v in row.items() if p != "shape"}
                                for n, row in r.get("blocks", {}).get("volumes", {}).items()}})
    return raw


def report(raw_paths: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """gpu_report.md and gpu_paths.png from one or more runs' gpu_raw.json (merged: later blocks win); ``labels``
    name what each run's code was (a table of the whole-volume figures run by run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = merge_raw(raw_paths)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_raw.json").write_text(json.dumps(raw, indent=1))
    m, b = raw["machine"], raw["blocks"]

    def run_of(block: str) -> str:
        k = raw.get("block_run", {}).get(block)
        return f" (run {k}{': ' + labels[k - 1] if labels and k <= len(labels) else ''})" if k else ""
    lines = ["# GPU figures (`python -m perf.gpu_session`)", "",
             f"Machine: {m['gpu']} ({m['nvidia_smi']}); host {m['cpu']}, {m['cores']} cores; Python {m['python']}, "
             f"torch {m['torch']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}), ONNX Runtime {m['onnxruntime']} "
             f"({', '.join(m['ort_providers'])}). fp32 convolutions run with cuDNN TF32 "
             f"{'allowed' if m['cudnn_allow_tf32'] else 'off'} (PyTorch's default); bf16 = bfloat16 autocast.",
             "", "No Triton server ran on this machine: the embedded server (the nvidia-pytriton wheel) and the "
             "packaged text encoder do not fit in what travels to a lent GPU machine, so the prompt embeddings were "
             "computed by the real encoder on the CPU machine (`prepare`) and looked up here. Every other number "
             "runs the shipped checkpoints, on the GPU or, where a column says CPU, on the host's cores. The "
             "monitor's utilisation is spiky because a run interleaves host work (phantoms, the CPU columns) with "
             "short GPU bursts.", ""]
    if "patch" in b:
        lines += ["## DuPLUS segmenter, one 96³ patch batch (GPU)" + run_of("patch"), "", "| batch | fp32 ms | bf16 ms | fp32 patches/s "
                  "| bf16 patches/s | bf16 speed-up |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for bs in PATCH_BATCHES:
            f, h = b["patch"].get(f"fp32_b{bs}"), b["patch"].get(f"bf16_b{bs}")
            if f and h:
                lines.append(f"| {bs} | {f['median_ms']:.2f} | {h['median_ms']:.2f} | {f['patches_per_s']:.0f} | "
                             f"{h['patches_per_s']:.0f} | {f['median_ms'] / h['median_ms']:.2f}× |")
        lines.append("")
    if "engines" in b:
        e = b["engines"]
        base = e["onnxruntime_cpu"]["median_ms"]
        lines += ["## The served segmenter unit's runners, one 96³ patch, same feed" + run_of("engines"), "",
                  "| runner | median ms | vs ONNX Runtime CPU | max abs diff of logits vs ONNX Runtime CPU |",
                  "| --- | ---: | ---: | ---: |"]
        for k in ("torch_gpu_runner", "onnxruntime_cpu", "torch_cpu_runner"):
            lines.append(f"| {k} | {e[k]['median_ms']:.2f} | {base / e[k]['median_ms']:.1f}× faster | "
                         f"{e[k]['max_abs_vs_onnxruntime_cpu']:.2e} |")
        lines += ["", f"(logits up to {e['onnxruntime_cpu']['logit_range']:.1f} in magnitude; the torch runner "
                  "times include the host-to-device and device-to-host copies the python backend pays.)", ""]
    if "volumes" in b:
        lines += ["## Whole volumes end to end (`Predictor.predict_array`: resampling, sliding window, back to the "
                  "input grid)" + run_of("volumes"), "", "| volume | shape | GPU fp32 s | GPU bf16 s | CPU fp32 s | GPU speed-up vs CPU | "
                  "Dice GPU fp32 (mean) | Dice GPU bf16 | label agreement GPU fp32 | label agreement bf16 |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in b["volumes"].items():
            g, h, c = row.get("gpu_fp32"), row.get("gpu_bf16"), row.get("cpu_fp32")

            def mean_dice(p):
                return f"{np.mean(list(p['dice'].values())):.3f}" if p else "–"
            speedup = f"{c['median_s'] / g['median_s']:.1f}×" if (c and g) else "–"
            agree = next((v for k, v in (h or {}).items() if k.startswith("agreement_vs_")), None)
            agree32 = (g or {}).get("agreement_vs_cpu_fp32", "–")
            lines.append(f"| {name} | {'×'.join(map(str, row['shape']))} | {g['median_s'] if g else '–'} | "
                         f"{h['median_s'] if h else '–'} | {c['median_s'] if c else '–'} | "
                         f"{speedup} | {mean_dice(g)} | "
                         f"{mean_dice(h)} | {agree32} | {agree if agree is not None else '–'} |")
        lines += ["", "Label agreement: mean Dice over targets between a GPU path's labels and the CPU fp32 labels "
                  "(bf16: against GPU fp32 where no CPU run). Per-target Dice against the phantom's truth is in gpu_raw.json.", ""]
    if "stages" in b:
        steps = ("to_model_space", "body_box", "sliding_window", "to_input_grid", "fuse_labels", "largest_components")
        lines += ["## Where a whole volume's time goes (GPU fp32, seconds per stage)" + run_of("stages"), "",
                  "| volume | model grid | body box | " + " | ".join(steps) + " |",
                  "| --- | --- | --- | " + " | ".join("---:" for _ in steps) + " |"]
        for name, row in b["stages"].items():
            box = "×".join(str(hi - lo) for lo, hi in row["box"]) if row["box"] else "whole"
            lines.append(f"| {name} | {'×'.join(map(str, row['model_shape']))} | {box} | "
                         + " | ".join(f"{row[s]:.3f}" for s in steps) + " |")
        lines.append("")
    if "sliding_window_batch" in b:
        s = b["sliding_window_batch"]
        lines += [f"## Sliding-window batch on `{s.get('volume', 'ct_256')}` (end to end seconds)" + run_of(
                      "sliding_window_batch"), "", "| sw_batch_size | fp32 s | "
                  "bf16 s |", "| ---: | ---: | ---: |"]
        for sw in SW_BATCHES:
            if f"fp32_sw{sw}" in s:
                lines.append(f"| {sw} | {s[f'fp32_sw{sw}']['median_s']} | {s[f'bf16_sw{sw}']['median_s']} |")
        lines.append("")
    if "pemma" in b:
        p = b["pemma"]
        lines += [f"## PEMMA UNETR (adapters merged), one {p['crop']}³ PET/CT window batch" + run_of("pemma"), "",
                  f"GPU fp32 vs CPU fp32 logits: max abs diff {p['max_abs_gpu_fp32_vs_cpu']:.2e} (logits up to "
                  f"{p['logit_range']:.1f}). CPU fp32 batch 1: {p['cpu_fp32_b1']['median_ms']:.1f} ms.", "",
                  "| batch | fp32 ms | bf16 ms | fp32 windows/s | bf16 windows/s | bf16 max abs vs fp32 | "
                  "bf16 argmax agreement |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for bs in (1, 4, 16):
            if f"fp32_b{bs}" in p:
                f, h = p[f"fp32_b{bs}"], p[f"bf16_b{bs}"]
                lines.append(f"| {bs} | {f['median_ms']:.2f} | {h['median_ms']:.2f} | {f['windows_per_s']:.0f} | "
                             f"{h['windows_per_s']:.0f} | {p[f'bf16_b{bs}_max_abs_vs_fp32']:.3f} | "
                             f"{p[f'bf16_b{bs}_argmax_agreement']:.4f} |")
        lines.append("")
    runs = [r for r in raw["runs"] if r["volumes"]]
    if len(runs) > 1:
        labels = labels or [f"run {i + 1}" for i in range(len(raw["runs"]))]
        named = [(labels[i], r) for i, r in enumerate(raw["runs"]) if r["volumes"]]
        lines += ["## Whole volumes run by run (GPU fp32 seconds, mean Dice against the phantom's truth)", "",
                  "| volume | " + " | ".join(n for n, _ in named) + " |", "| --- | " + " | ".join("---:" for _ in named)
                  + " |"]
        for name in runs[-1]["volumes"]:
            cells = []
            for _, r in named:
                v = r["volumes"].get(name, {}).get("gpu_fp32")
                cells.append(f"{v['median_s']:.3f} s ({v['mean_dice']:.3f})" if v else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        host = [r["volumes"].get("ct_abdomen", {}).get("cpu_fp32") for _, r in named]
        lines += ["| *host CPU: ct_abdomen on the CPU cores* | " + " | ".join(f"*{h['median_s']:.2f} s*" if h else "–"
                                                                         for h in host) + " |", "",
                  "Each run is a fresh lent machine: the host CPU row shows how much the machines differ from run to "
                  "run, which moves the GPU times of the CPU-bound stages too (a volume whose body box is the whole "
                  "field of view, ct_abdomen or ct_512, runs the same code in the first two runs).", ""]
    if raw.get("skipped") or raw.get("errors"):
        lines += ["## Not measured", ""] + [f"- {k}: skipped, {v}" for k, v in raw["skipped"].items()] + \
                 [f"- {k}: failed, {v}" for k, v in raw["errors"].items()] + [""]
    lines += ["Runs on the GPU machine: " + "; ".join(f"{r['elapsed_s']} s ({', '.join(r['blocks'])}; peak GPU memory "
                                                     f"{r['peak_gib']} GiB)" for r in raw["runs"])
              + f". Seconds per block: {raw.get('block_s')}. Monitor: {raw.get('gpu_monitor')}.", ""]
    if "volumes" in b:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        names = list(b["volumes"])
        w = 0.27
        for i, path in enumerate(("cpu_fp32", "gpu_fp32", "gpu_bf16")):
            vals = [b["volumes"][n].get(path, {}).get("median_s", np.nan) for n in names]
            ax.bar(np.arange(len(names)) + (i - 1) * w, vals, w, label=path)
        ax.set_xticks(np.arange(len(names)), names, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("end-to-end seconds (log)")
        ax.set_title(f"Whole volumes: {m['gpu']} vs its host's {m['cores']} CPU cores")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gpu_paths.png", dpi=110)
        plt.close(fig)
        lines.append("![paths](gpu_paths.png)")
    if (out / "gpu.png").exists():
        lines.append("![gpu](gpu.png)")
    path = out / "gpu_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.gpu_session", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="encode the run's prompts, copy the tokenizer and ONNX units (CPU machine)")
    p.add_argument("--kit", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/duplus_demo.pt"))
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    q = sub.add_parser("run", help="measure on the GPU machine")
    q.add_argument("--kit", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--checkpoint", type=Path, default=Path("checkpoints/duplus_demo.pt"))
    q.add_argument("--pemma-checkpoint", type=Path, default=Path("checkpoints/pemma_lora_ms.pt"))
    q.add_argument("--budget-s", type=float, default=300.0, help="start no block after this many seconds")
    q.add_argument("--quick", action="store_true", help="few repeats and three volumes (a rehearsal on a CPU)")
    q.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=BLOCKS, help="what to measure, in order")
    s = sub.add_parser("report", help="gpu_report.md + gpu_paths.png from gpu_raw.json")
    s.add_argument("--raw", type=Path, nargs="+", required=True, help="gpu_raw.json of one or more runs (later wins)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--labels", nargs="+", help="what each run's code was, in the order of --raw")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "prepare":
        prepare(args.kit, args.checkpoint, args.repository)
    elif args.cmd == "run":
        run(args.kit, args.out, args.checkpoint, args.pemma_checkpoint, args.budget_s, args.quick, tuple(args.blocks))
    else:
        print(report(args.raw, args.out, args.labels).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
