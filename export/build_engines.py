"""Build the deployable units of a DuPLUS checkpoint into a Triton model repository.

    python export/build_engines.py --checkpoint checkpoints/duplus_demo.pt --output model_repository

checkpoint -> merge LoRA/DoRA adapters (checked numerically) -> per unit (``export/stages.py``, one helper
for every unit): ONNX (named I/O, dynamic axes) -> onnx.checker + shape inference + contract check -> parity
against PyTorch on fresh random inputs -> TensorRT engine + parity against ONNX Runtime (over tolerance:
error, non-zero exit) -> the Triton repository (``export/repository.py``):

    <output>/manifest.json                 checkpoint hash, options, model config, vocabulary, unit I/O + files
    <output>/instructions/1/               model.py (python backend) + generator.yaml (Zeus's instruction generator)
    <output>/tokenizer/1/                  model.py (python backend) + the saved tokenizer
    <output>/text_encoder|conditioning|segmenter/1/model.onnx (+ model.plan with TensorRT)
    <output>/encode_prompts, encode_instructions, segment_patch  ensembles
    <output>/segment_volume/1/             model.py (BLS) + known_targets.npz
    <output>/image_features|text_encoder_ehr|prognosis/1/model.onnx   with a prognosis checkpoint (LoRA merged)
    <output>/prognose/1/                   model.py (BLS) + the EHR tokenizer
    <output>/pemma_segmenter/1/model.onnx  with a PEMMA checkpoint (adapters merged, checked): CT and/or PET windows
    <output>/segment_petct/1/              model.py (BLS): CT, PET or both in their own geometry -> labels
    <output>/context_classifier/1/model.onnx  with a context checkpoint (Biomed-DPT): three views -> probabilities
    <output>/classify_context/1/           model.py (BLS): volume + affine [+ T1] -> context, its T1, the T1 verdict
    <output>/<model>/config.pbtxt          generated from typed objects (export/triton_config.py)

Engines: TensorRT where it imports and a GPU exists; else ONNX Runtime (CUDA provider when
present); or PyTorch (CUDA on a GPU without TensorRT). The torch engine's units run from
<output>/checkpoint.pt (and prognosis_checkpoint.pt): no ONNX file is written for them, their manifest
entries name the checkpoint and its sha256 (pemma_checkpoint.pt for the PEMMA unit, context_checkpoint.pt for
the context classifier). ``--target embedded`` (default) serves the units from
python-backend models on the Triton server of the nvidia-pytriton wheel; ``--target ngc`` writes native
onnxruntime_onnx / tensorrt_plan models for the NGC container.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import torch  # noqa: E402

from duplus.checkpoint import load_checkpoint  # noqa: E402
from duplus.contract import ServingLimits, contracts, prognosis_contracts  # noqa: E402
from duplus.files import file_sha256  # noqa: E402
from duplus.models.duplus import DuPLUS, DuPLUSConfig  # noqa: E402
from duplus.models.units import (  # noqa: E402
    ConditioningUnit,
    PrognosisHeadUnit,
    SegmenterUnit,
    TextEncoderUnit,
    example_inputs,
)
from duplus.text_encoder import TextEncoder  # noqa: E402
from export.adapters import merge_adapters  # noqa: E402
from export.calibration import PhantomCalibration  # noqa: E402
from export.onnx_export import ContractError, ParityError  # noqa: E402
from export.repository import (  # noqa: E402
    CHECKPOINT,
    CONTEXT_CHECKPOINT,
    PEMMA_CHECKPOINT,
    PROGNOSIS_CHECKPOINT,
    SOURCE_REPOSITORY,
    copy_checkpoint,
    save_prognosis_tokenizer,
    write_triton_repository,
)
from export.stages import (  # noqa: E402
    INT8_UNITS,
    export_unit,
    fresh_inputs,
    parity_failures,
    profile_inputs,
    tracing_example,
    unit_profile,
)
from export.tensorrt_engine import PRECISIONS, tensorrt_available  # noqa: E402
from export.triton_config import RepositoryOptions  # noqa: E402

log = logging.getLogger("build_engines")

#: the shipped prognosis checkpoint; built into the repository when present
DEFAULT_PROGNOSIS = "checkpoints/duplus_prognosis.pt"
#: the shipped PEMMA checkpoint (PET/CT head-and-neck segmenter); built into the repository when present
DEFAULT_PEMMA = "checkpoints/pemma_lora_ms.pt"
#: the shipped context classifier (Biomed-DPT, python -m training.train_context); built into the repository when
#: present: the classify_context model and segment_volume's T1 guard
DEFAULT_CONTEXT = "checkpoints/context_dpt.pt"
__all__ = ["SOURCE_REPOSITORY", "build", "default_max_batch_size", "main", "resolve_engine"]


def default_max_batch_size(engine: str, device: str) -> int:
    """Windows per segmenter call in segment_volume when ``--max-batch-size`` is not given: one for PyTorch units on
    CPU (``duplus.models.fastpaths.windows_per_pass``), four otherwise (ONNX Runtime is batch-insensitive on CPU,
    461-485 ms per window for 1, 2 and 4 on the 2-core Xeon; TensorRT and a GPU want batches)."""
    from duplus.models.fastpaths import windows_per_pass

    return windows_per_pass(device, 4) if engine == "torch" else 4


def resolve_engine(engine: str, flavour: str) -> tuple[str, str]:
    """(engine, device) for ``--engine``; auto prefers TensorRT, then a GPU, then ONNX Runtime on CPU."""
    import onnxruntime as ort

    gpu = torch.cuda.is_available()
    if engine == "auto":
        if tensorrt_available()[0]:
            return "tensorrt", "gpu"
        if gpu and ("CUDAExecutionProvider" in ort.get_available_providers() or flavour == "ngc"):
            return "onnxruntime", "gpu"
        if gpu:
            return "torch", "gpu"
        return "onnxruntime", "cpu"
    if engine == "tensorrt":
        ok, why = tensorrt_available()
        if not ok:
            raise RuntimeError(f"--engine tensorrt: {why}")
        return "tensorrt", "gpu"
    if engine == "torch" and flavour == "ngc":
        raise ValueError("--engine torch cannot be served by the ngc flavour (native onnxruntime/tensorrt models)")
    return engine, "gpu" if gpu else "cpu"


def _vocab_size(module) -> int | None:
    """Rows of a Hugging Face text model's token embedding: the token ids a text unit accepts."""
    config = getattr(getattr(module, "model", None), "config", None)
    return getattr(config, "vocab_size", None)


def _conditioner(encoder: TextEncoder, model: DuPLUS):
    """(T1, targets) -> (film [F], head_params [K, P]) as the served encode_prompts computes them."""
    def condition(t1: str, targets: list[str]):
        with torch.no_grad():
            film, head = model.conditioning(encoder.encode([t1]), encoder.encode(list(targets)))
        return film[0].numpy(), head.numpy()

    return condition


class _Units:
    """What every unit of one build shares: the stage options, the repository and the manifest being filled."""

    def __init__(self, cfg: DuPLUSConfig, output: Path, manifest: dict, *, engine: str, precision: str, patch,
                 max_batch_size: int, max_targets: int, parity_runs: int):
        self.cfg, self.output, self.manifest = cfg, output, manifest
        self.engine, self.precision, self.patch = engine, precision, tuple(patch)
        self.max_batch_size, self.max_targets, self.parity_runs = max_batch_size, max_targets, parity_runs

    def build(self, name: str, module, contract, *, checkpoint: Path | None = None, image_dim: int | None = None,
              text_dim: int | None = None, calibration: PhantomCalibration | None = None) -> list[str]:
        """``export_unit`` with this build's options; records the entry, returns its parity failures."""
        cfg, dims = self.cfg, {"image_dim": image_dim, "text_dim": text_dim}
        onnx = self.engine != "torch"
        profile = None
        if self.engine == "tensorrt":
            profile = unit_profile(name, cfg, self.patch, max_batch=self.max_batch_size,
                                   max_targets=self.max_targets, image_dim=image_dim)
        entry = export_unit(
            name, module, contract, self.output, engine=self.engine, precision=self.precision,
            example=tracing_example(name, cfg, self.patch, **dims) if onnx else None,
            fresh=fresh_inputs(name, cfg, self.patch, self.parity_runs, **dims) if onnx else (),
            profile=profile, engine_inputs=profile_inputs(name, cfg, profile, **dims) if profile else (),
            checkpoint=checkpoint, timing_cache=self.output / ".timing.cache",
            calibration=calibration if self.precision == "int8" and name in INT8_UNITS else None)
        self.manifest["units"][name] = entry
        return parity_failures(name, entry)


def build(checkpoint: Path, output: Path, *, target: str = "embedded", engine: str = "auto",
          precision: str = "fp32", patch_size: tuple[int, int, int] | None = None, max_batch_size: int | None = None,
          max_targets: int = 16, instances: int = 1, threads: int = 0, ort_optimization: str = "all",
          units: tuple[str, ...] = ("text_encoder", "conditioning", "segmenter"), parity_runs: int = 2,
          prognosis_checkpoint: Path | None = None, generator_config: Path | None = None,
          pemma_checkpoint: Path | None = None, context_checkpoint: Path | None = None) -> dict:
    """Build the repository at ``output`` from ``checkpoint``; returns the manifest (also written to
    ``output/manifest.json``). Raises ``ParityError`` when a unit is over its tolerances (after building all)."""
    from duplus.inference import Predictor
    from duplus.vocabulary import PromptVocabulary

    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    ckpt = load_checkpoint(checkpoint)
    cfg = DuPLUSConfig.from_dict(ckpt["model_config"])
    patch = tuple(patch_size or cfg.patch_size)
    factor = cfg.level_factor
    if any(p % factor for p in patch):
        raise ValueError(f"--patch-size {patch} must be multiples of {factor}")
    if output.resolve() == SOURCE_REPOSITORY.resolve() and target == "ngc":
        raise ValueError(f"the ngc flavour must go to another folder than {SOURCE_REPOSITORY} (use --output)")
    model = DuPLUS(cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    encoder = TextEncoder(cfg.text_encoder)

    def run_text(m):
        feed = example_inputs("text_encoder", cfg, seed=123)
        return m(feed["input_ids"], feed["attention_mask"])

    encoder = merge_adapters(encoder, run_text)
    modules = {"text_encoder": TextEncoderUnit(encoder), "conditioning": ConditioningUnit(model),
               "segmenter": SegmenterUnit(model)}
    spec = contracts(cfg, vocab_size=_vocab_size(encoder))
    engine, device = resolve_engine(engine, target)
    if max_batch_size is None:
        max_batch_size = default_max_batch_size(engine, device)
    if precision != "fp32" and engine != "tensorrt":
        log.info("--precision %s applies to TensorRT engines; the %s units stay fp32", precision, engine)
    limits = ServingLimits(max_targets=max_targets, sw_batch_size=max_batch_size)
    opts = RepositoryOptions(flavour=target, engine=engine, device=device, segmenter_instances=instances,
                             threads=threads, ort_optimization=ort_optimization, patch_size=patch, limits=limits)
    log.info("building the %s repository in %s: engine %s on %s, precision %s, patch %s", target, output, engine,
             device, precision, patch)
    output.mkdir(parents=True, exist_ok=True)
    manifest = {"checkpoint": checkpoint.name, "checkpoint_sha256": file_sha256(checkpoint), "target": target,
                "engine": engine, "device": device, "precision": precision, "patch_size": list(patch),
                "max_batch_size": max_batch_size, "max_targets": max_targets,
                "model_config": cfg.to_dict(), "vocabulary": ckpt["vocabulary"], "units": {}}
    stage = _Units(cfg, output, manifest, engine=engine, precision=precision, patch=patch,
                   max_batch_size=max_batch_size, max_targets=max_targets, parity_runs=parity_runs)
    torch_checkpoint = copy_checkpoint(checkpoint, output, CHECKPOINT) if engine == "torch" else None
    calibration = PhantomCalibration(cfg, _conditioner(encoder, model))
    failures = []
    for name in tqdm(units, desc="export units", unit="unit", disable=None):
        failures += stage.build(name, modules[name], spec[name], checkpoint=torch_checkpoint, calibration=calibration)
    if failures:
        raise ParityError("parity over tolerance: " + "; ".join(failures))
    prognosis = None
    if prognosis_checkpoint is not None:
        prognosis = _build_prognosis(Path(prognosis_checkpoint), model, encoder, stage, torch_checkpoint)
        spec = dict(spec, **prognosis["spec"])
    if pemma_checkpoint is not None:
        spec = dict(spec, **_build_pemma(Path(pemma_checkpoint), stage))
    if context_checkpoint is not None:
        spec = dict(spec, **_build_context(Path(context_checkpoint), stage))
    predictor = Predictor(model, PromptVocabulary.from_dict(ckpt["vocabulary"]), encoder)
    manifest["models"] = write_triton_repository(output, opts, spec, encoder, predictor, generator_config)
    if prognosis is not None:
        save_prognosis_tokenizer(prognosis["tokenizer"], output)
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("built the %s repository (%s) in %.0f s", target, engine, manifest["seconds"])
    return manifest


def _build_prognosis(path: Path, model: DuPLUS, encoder: TextEncoder, stage: _Units,
                     torch_checkpoint: Path | None) -> dict:
    """image_features, text_encoder_ehr (LoRA merged, merge checked for every engine) and prognosis; fills the
    manifest's units and ``prognosis`` record; returns their contracts and the EHR tokenizer."""
    from duplus.models.prognosis import (
        MAX_EHR_CHARS,
        PROGNOSIS_TARGETS,
        ImageFeatureUnit,
        feature_names,
        load_prognosis_checkpoint,
    )

    cfg, manifest = stage.cfg, stage.manifest
    prog, meta = load_prognosis_checkpoint(path)
    if meta.get("segmentation_sha256") != manifest["checkpoint_sha256"]:
        raise ValueError(f"{path} was trained on the image features of another segmentation checkpoint "
                         f"({meta.get('segmentation_checkpoint')}); retrain it with python -m training.train_prognosis "
                         "or build with --prognosis-checkpoint none")
    merged = prog.ehr.merged()
    feed = example_inputs("text_encoder", cfg, batch=3, tokens=48, seed=321)
    with torch.no_grad():
        diff = float((prog.ehr(feed["input_ids"], feed["attention_mask"]) -
                      merged(feed["input_ids"], feed["attention_mask"])).abs().max())
    if diff > 1e-5:
        raise ParityError(f"LoRA merge changed the EHR embedding by {diff:.2e} (> 1e-5)")
    log.info("LoRA adapters merged into text_encoder_ehr (max abs change %.1e)", diff)
    image_dim, text_dim = prog.image_dim, prog.ehr.dim
    spec = prognosis_contracts(cfg, image_dim, text_dim, vocab_size=_vocab_size(merged))
    modules = {"image_features": ImageFeatureUnit(model.segmenter).eval(), "text_encoder_ehr": merged,
               "prognosis": PrognosisHeadUnit(prog.head).eval()}
    # the torch engine: image_features runs from checkpoint.pt, the EHR encoder and the head from the prognosis one
    prog_checkpoint = copy_checkpoint(path, stage.output, PROGNOSIS_CHECKPOINT) if stage.engine == "torch" else None
    sources = {"image_features": torch_checkpoint, "text_encoder_ehr": prog_checkpoint, "prognosis": prog_checkpoint}
    calibration = PhantomCalibration(cfg, _conditioner(encoder, model), contexts=(("head_neck", prog.cfg.modality),),
                                     targets=tuple(PROGNOSIS_TARGETS), t1=prog.cfg.t1)
    failures = []
    for name in tqdm(spec, desc="export prognosis units", unit="unit", disable=None):
        failures += stage.build(name, modules[name], spec[name], checkpoint=sources[name], image_dim=image_dim,
                                text_dim=text_dim, calibration=calibration)
    if failures:
        raise ParityError("prognosis parity over tolerance: " + "; ".join(failures))
    manifest["prognosis"] = {
        "checkpoint": path.name, "source": str(path), "checkpoint_sha256": file_sha256(path),
        "modality": prog.cfg.modality, "t1": prog.cfg.t1, "targets": list(PROGNOSIS_TARGETS),
        "feature_names": meta.get("feature_names") or feature_names((image_dim - 5) // 3),
        "image_dim": image_dim, "text_dim": text_dim, "max_ehr_tokens": prog.cfg.max_ehr_tokens,
        "max_ehr_chars": MAX_EHR_CHARS, "lora_merge_max_abs": diff, "val_c_index": meta.get("val_c_index")}
    return {"spec": spec, "tokenizer": prog.ehr.tokenizer}


def _build_pemma(path: Path, stage: _Units) -> dict:
    """The PEMMA unit: adapters merged (checked to 1e-5 in every input mode), exported as one graph for CT-only,
    PET-only and CT+PET; fills the manifest's unit and ``pemma`` record; returns its contract."""
    from duplus.contract import PETCT_LABELS, PETCT_MODES, pemma_contracts
    from duplus.models.pemma import load_pemma_checkpoint, merged_for_export, parameter_counts
    from duplus.models.units import PemmaSegmenterUnit, pemma_example_inputs
    from export.tensorrt_engine import ShapeProfile

    model, record = load_pemma_checkpoint(path)
    adapter = (record["model"].get("adapter") or {}).get("kind")
    merged, diff = merged_for_export(model)
    log.info("PEMMA %s: %s adapters merged (on a CT+PET window: transformer outputs %.1e apart in float64, logits "
             "%.1e in float32)", path.name, adapter or "no", diff["max_abs"], diff["max_abs_float32"])
    crop = model.cfg.crop
    spec = pemma_contracts(crop)
    name, unit = "pemma_segmenter", PemmaSegmenterUnit(merged).eval()
    onnx = stage.engine != "torch"
    profile = engine_inputs = None
    if stage.engine == "tensorrt":
        window = (2, crop, crop, crop)
        profile = ShapeProfile({"image": ((1,) + window, (stage.max_batch_size,) + window,
                                          (stage.max_batch_size,) + window), "mode": ((1,),) * 3})
        engine_inputs = [pemma_example_inputs(crop, batch=1, mode=1, seed=3000),
                         pemma_example_inputs(crop, batch=stage.max_batch_size, mode=0, seed=3001)]
    checkpoint = copy_checkpoint(path, stage.output, PEMMA_CHECKPOINT) if stage.engine == "torch" else None
    entry = export_unit(
        name, unit, spec[name], stage.output, engine=stage.engine, precision=stage.precision,
        example=pemma_example_inputs(crop, batch=2, mode=0, seed=0) if onnx else None,
        # one parity input per mode (batch 1, traced at 2): the masked attention and the skip selection of each
        fresh=[pemma_example_inputs(crop, batch=1, mode=i, seed=1000 + i)
               for i in range(len(PETCT_MODES))] if onnx else (),
        profile=profile, engine_inputs=engine_inputs or (), checkpoint=checkpoint,
        timing_cache=stage.output / ".timing.cache")
    stage.manifest["units"][name] = entry
    failures = parity_failures(name, entry)
    if failures:
        raise ParityError("PEMMA parity over tolerance: " + "; ".join(failures))
    stage.manifest["pemma"] = {
        "checkpoint": path.name, "source": str(path), "checkpoint_sha256": file_sha256(path),
        "stage": record.get("stage"), "adapter": adapter, "merge_max_abs": diff["max_abs"],
        "merge_max_abs_float32": diff["max_abs_float32"], "crop": crop,
        "spacing": list(model.cfg.spacing), "labels": list(PETCT_LABELS), "modes": list(PETCT_MODES),
        "parameters": record.get("parameters")}
    # the merged model has exactly the adapted model's function with plain weights: its size is what is served
    stage.manifest["pemma"]["served_parameters"] = parameter_counts(merged)["total"]
    return spec


def _build_context(path: Path, stage: _Units) -> dict:
    """The context classifier unit (views -> probabilities over the checkpoint's classes), parity-checked like
    every unit; fills the manifest's unit and ``context`` record (classes, their T1 prompts, the view sampling, the
    guard's alpha, the checkpoint's meta, the parity); returns its contract."""
    from duplus.context.classes import parse_key
    from duplus.context.guard import DEFAULT_ALPHA
    from duplus.context.model import load_classifier
    from duplus.context.views import VIEW_SIZE, VIEW_SLAB, VIEW_SPACING_MM
    from duplus.contract import CONTEXT_VIEWS, context_contracts
    from duplus.models.units import context_example_inputs
    from export.tensorrt_engine import ShapeProfile

    model, meta = load_classifier(path)
    size = model.cfg.image_size
    if size != VIEW_SIZE or model.cfg.channels != CONTEXT_VIEWS:
        raise ValueError(f"{path}: the classifier reads {model.cfg.channels} views of {size} px; the served views "
                         f"are {CONTEXT_VIEWS} of {VIEW_SIZE} px (duplus.context.views)")
    keys = list(model.keys)
    names = [parse_key(k).name for k in keys]      # an unknown key fails the build, not a request
    spec = context_contracts(keys, size)
    name = "context_classifier"
    onnx = stage.engine != "torch"
    profile = engine_inputs = None
    if stage.engine == "tensorrt":
        view = (CONTEXT_VIEWS, size, size)
        profile = ShapeProfile({"views": ((1,) + view, (1,) + view, (stage.max_batch_size,) + view)})
        engine_inputs = [context_example_inputs(size, batch=1, seed=3000),
                         context_example_inputs(size, batch=stage.max_batch_size, seed=3001)]
    checkpoint = copy_checkpoint(path, stage.output, CONTEXT_CHECKPOINT) if stage.engine == "torch" else None
    entry = export_unit(
        name, model, spec[name], stage.output, engine=stage.engine, precision=stage.precision,
        example=context_example_inputs(size, batch=2, seed=0) if onnx else None,
        fresh=[context_example_inputs(size, batch=1 + 2 * i, seed=1000 + i) for i in range(stage.parity_runs)]
        if onnx else (),
        profile=profile, engine_inputs=engine_inputs or (), checkpoint=checkpoint,
        timing_cache=stage.output / ".timing.cache")
    stage.manifest["units"][name] = entry
    failures = parity_failures(name, entry)
    if failures:
        raise ParityError("context classifier parity over tolerance: " + "; ".join(failures))
    rows = entry.get("parity", [])
    stage.manifest["context"] = {
        "checkpoint": path.name, "source": str(path), "checkpoint_sha256": file_sha256(path),
        "keys": keys, "t1": names, "config": model.cfg.to_dict(), "alpha": float(meta.get("guard_alpha", DEFAULT_ALPHA)),
        "views": {"size": VIEW_SIZE, "spacing_mm": VIEW_SPACING_MM, "slab": VIEW_SLAB},
        # JSON-safe copy of the training metadata (validation accuracy, minutes, steps)
        "meta": json.loads(json.dumps(meta, default=str)),
        "parity_max_abs": max((r["max_abs"] for r in rows), default=None)}
    log.info("context classifier %s: %d classes, ONNX Runtime vs PyTorch max abs %s", path.name, len(keys),
             stage.manifest["context"]["parity_max_abs"])
    return spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python export/build_engines.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/duplus_demo.pt", help="DuPLUS checkpoint to export")
    ap.add_argument("--output", default=None,
                    help="model repository to write (default: model_repository for embedded, "
                         "model_repository_ngc for ngc)")
    ap.add_argument("--target", choices=("embedded", "ngc"), default="embedded",
                    help="embedded: python-backend models on the nvidia-pytriton server (what tests and the demo "
                         "use); ngc: native onnxruntime_onnx / tensorrt_plan models for the full Triton container")
    ap.add_argument("--engine", choices=("auto", "tensorrt", "onnxruntime", "torch"), default="auto",
                    help="auto: TensorRT where it imports and a GPU exists, else ONNX Runtime (CUDA provider when "
                         "present), else PyTorch CUDA on a GPU, else ONNX Runtime on CPU")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="TensorRT precision (ONNX Runtime and PyTorch units stay fp32); int8 quantises the image "
                         "units (segmenter, image_features) with an entropy calibrator fed by phantom patches "
                         "(table cached in <output>/.<unit>.int8-calibration), the text units are built in fp16")
    ap.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="sliding-window patch; default: the checkpoint's training patch")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="windows per segmenter call in segment_volume, and the TensorRT profile's largest batch "
                         "(default 4; 1 for PyTorch units on CPU, the fastest there)")
    ap.add_argument("--max-targets", type=int, default=16, help="largest number of target prompts K per request")
    ap.add_argument("--instances", type=int, default=1, help="segmenter instances (2 helps on a GPU)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance (0: all cores)")
    ap.add_argument("--ort-optimization", choices=("disable", "basic", "extended", "all"), default="all",
                    help="ONNX Runtime graph optimisation level of the served units")
    ap.add_argument("--units", nargs="+", default=["text_encoder", "conditioning", "segmenter"],
                    choices=("text_encoder", "conditioning", "segmenter"), help="which units to export")
    ap.add_argument("--prognosis-checkpoint", default=DEFAULT_PROGNOSIS,
                    help="prognosis checkpoint (python -m training.train_prognosis) whose units and `prognose` model "
                         "are added to the repository; skipped with a log line when the default is absent; "
                         "'none' to leave prognosis out")
    ap.add_argument("--pemma-checkpoint", default=DEFAULT_PEMMA,
                    help="PEMMA checkpoint (python -m training.train_pemma) whose unit and `segment_petct` model are "
                         "added to the repository; skipped with a log line when the default is absent; 'none' to "
                         "leave PET/CT segmentation out")
    ap.add_argument("--context-checkpoint", default=DEFAULT_CONTEXT,
                    help="context classifier checkpoint (python -m training.train_context) whose unit and "
                         "`classify_context` model are added to the repository, with segment_volume's T1 guard; "
                         "skipped with a log line when the default is absent; 'none' to leave them out")
    ap.add_argument("--instruction-generator", type=Path, default=None, metavar="YAML",
                    help="duplus.instructions.GeneratorConfig of the served instruction generator (INSTRUCTIONS auto; "
                         "copied to instructions/1/generator.yaml); default: the offline knowledge base")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output or ("model_repository" if args.target == "embedded" else "model_repository_ngc"))
    prognosis = None if args.prognosis_checkpoint.lower() == "none" else Path(args.prognosis_checkpoint)
    if prognosis is not None and not prognosis.is_file():
        if args.prognosis_checkpoint != DEFAULT_PROGNOSIS:
            log.error("--prognosis-checkpoint %s does not exist", prognosis)
            return 1
        log.info("no %s: the repository is built without prognosis", prognosis)
        prognosis = None
    pemma = None if args.pemma_checkpoint.lower() == "none" else Path(args.pemma_checkpoint)
    if pemma is not None and not pemma.is_file():
        if args.pemma_checkpoint != DEFAULT_PEMMA:
            log.error("--pemma-checkpoint %s does not exist", pemma)
            return 1
        log.info("no %s: the repository is built without segment_petct", pemma)
        pemma = None
    context = None if args.context_checkpoint.lower() == "none" else Path(args.context_checkpoint)
    if context is not None and not context.is_file():
        if args.context_checkpoint != DEFAULT_CONTEXT:
            log.error("--context-checkpoint %s does not exist", context)
            return 1
        log.info("no %s: the repository is built without classify_context (segment_volume's T1 guard says so)",
                 context)
        context = None
    try:
        build(Path(args.checkpoint), output, target=args.target, engine=args.engine, precision=args.precision,
              patch_size=tuple(args.patch_size) if args.patch_size else None, max_batch_size=args.max_batch_size,
              max_targets=args.max_targets, instances=args.instances, threads=args.threads,
              ort_optimization=args.ort_optimization, units=tuple(args.units), prognosis_checkpoint=prognosis,
              generator_config=args.instruction_generator, pemma_checkpoint=pemma,
              context_checkpoint=context)
    except (ContractError, ParityError, ValueError, RuntimeError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
