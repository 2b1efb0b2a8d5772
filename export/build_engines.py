"""Build the deployable units of a DuPLUS checkpoint.

    python export/build_engines.py --checkpoint checkpoints/duplus_demo.pt --output model_repository

checkpoint -> merge LoRA/DoRA adapters (checked numerically) -> ONNX per unit (named I/O, dynamic
axes) -> onnx.checker + shape inference + contract check -> parity against PyTorch on fresh random
inputs (over tolerance: error, non-zero exit) -> engines -> a Triton model repository:

    <output>/manifest.json                 checkpoint hash, options, model config, vocabulary, unit I/O
    <output>/tokenizer/1/                  model.py (python backend) + the saved tokenizer
    <output>/text_encoder|conditioning|segmenter/1/model.onnx (+ model.plan with TensorRT)
    <output>/encode_prompts, segment_patch  ensembles
    <output>/segment_volume/1/             model.py (BLS) + known_targets.npz
    <output>/image_features|text_encoder_ehr|prognosis/1/model.onnx   with a prognosis checkpoint (LoRA merged)
    <output>/prognose/1/                   model.py (BLS) + the EHR tokenizer
    <output>/<model>/config.pbtxt          generated from typed objects (export/triton_config.py)

Engines: TensorRT where it imports and a GPU exists; else ONNX Runtime (CUDA provider when
present); or PyTorch (CUDA on a GPU without TensorRT). ``--target embedded`` (default) serves the
units from python-backend models on the Triton server of the nvidia-pytriton wheel;
``--target ngc`` writes native onnxruntime_onnx / tensorrt_plan models for the NGC container.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from duplus.contract import KNOWN_TARGETS, ServingLimits, contracts, prognosis_contracts  # noqa: E402
from duplus.files import file_sha256  # noqa: E402
from duplus.inference import load_checkpoint  # noqa: E402
from duplus.models.duplus import DuPLUS, DuPLUSConfig  # noqa: E402
from duplus.models.units import (  # noqa: E402
    ConditioningUnit,
    PrognosisHeadUnit,
    SegmenterUnit,
    TextEncoderUnit,
    example_inputs,
    prognosis_example_inputs,
)
from duplus.ort import ort_session  # noqa: E402
from duplus.text_encoder import TextEncoder  # noqa: E402
from export.adapters import merge_adapters  # noqa: E402
from export.onnx_export import ContractError, ParityError, check_onnx, export_onnx, parity  # noqa: E402
from export.tensorrt_engine import ShapeProfile, build_engine, tensorrt_available  # noqa: E402
from export.triton_config import RepositoryOptions, parse_pbtxt, repository_models  # noqa: E402

log = logging.getLogger("build_engines")

# max abs / max relative tolerances per unit for fp32 ONNX Runtime vs PyTorch eager
TOLERANCES = {"text_encoder": (1e-4, 1e-3), "conditioning": (1e-4, 1e-3), "segmenter": (2e-3, 1e-2),
              "image_features": (2e-3, 1e-2), "text_encoder_ehr": (1e-4, 1e-3), "prognosis": (1e-4, 1e-3)}
#: the shipped prognosis checkpoint; built into the repository when present
DEFAULT_PROGNOSIS = "checkpoints/duplus_prognosis.pt"


SOURCE_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def resolve_engine(engine: str, flavour: str) -> tuple[str, str]:
    """(engine, device) for ``--engine``; auto prefers TensorRT, then a GPU, then ONNX Runtime on CPU."""
    import onnxruntime as ort
    import torch

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


def build(checkpoint: Path, output: Path, *, target: str = "embedded", engine: str = "auto",
          precision: str = "fp32", patch_size: tuple[int, int, int] | None = None, max_batch_size: int = 4,
          max_targets: int = 16, instances: int = 1, threads: int = 0, ort_optimization: str = "all",
          units: tuple[str, ...] = ("text_encoder", "conditioning", "segmenter"), parity_runs: int = 2,
          prognosis_checkpoint: Path | None = None) -> dict:
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    cfg = DuPLUSConfig.from_dict(ckpt["model_config"])
    patch = tuple(patch_size or cfg.patch_size)
    factor = 2 ** (len(cfg.channels) - 1)
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
    spec = contracts(cfg)
    engine, device = resolve_engine(engine, target)
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
    failures = []
    for name in tqdm(units, desc="export units", unit="unit", disable=None):
        contract = spec[name]
        for kind, tensors in (("input", contract.inputs), ("output", contract.outputs)):
            for t in tensors:
                log.info("  %s %s %s %s %s", name, kind, t.name, t.dtype, t.shape)
        onnx_path = output / name / "1" / "model.onnx"
        example = example_inputs(name, cfg, batch=2, k=3, spatial=patch, seed=0)
        export_onnx(modules[name], contract, example, onnx_path)
        check_onnx(onnx_path, contract)
        session = ort_session(onnx_path)
        # fresh inputs with other dynamic sizes than the tracing example
        fresh = [example_inputs(name, cfg, batch=1 + (i % 2), k=1 + 2 * i, tokens=7 + 5 * i,
                                spatial=tuple(p if i == 0 else p + factor for p in patch[:2]) + (patch[2],),
                                seed=1000 + i) for i in range(parity_runs)]
        atol, rtol = TOLERANCES[name]
        results = parity(modules[name], onnx_path, contract, fresh, atol=atol, rtol=rtol, session=session)
        failures += [str(r) for r in results if not r.ok]
        entry = _unit_entry(output, onnx_path, contract, results)
        if engine == "tensorrt":
            profile = _profile(name, cfg, patch, max_batch_size, max_targets)
            plan = build_engine(onnx_path, output / name / "1" / "model.plan", contract, profile,
                                precision=precision, timing_cache=output / ".timing.cache")
            entry["plan"] = str(plan.relative_to(output))
        manifest["units"][name] = entry
        log.info("built %s: %s", name, entry.get("plan", entry["onnx"]))
    if failures:
        raise ParityError("parity over tolerance: " + "; ".join(failures))
    if prognosis_checkpoint is not None:
        spec = dict(spec, **_build_prognosis(Path(prognosis_checkpoint), model, cfg, output, manifest, engine,
                                             precision, parity_runs))
    manifest["models"] = [m.name for m in repository_models(spec, opts)]
    _write_triton_repository(output, opts, spec, encoder, model, ckpt, checkpoint)
    if prognosis_checkpoint is not None:
        _save_prognosis_files(Path(prognosis_checkpoint), output, engine)
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("built the %s repository (%s) in %.0f s", target, engine, manifest["seconds"])
    return manifest


def _unit_entry(output: Path, onnx_path: Path, contract, results) -> dict:
    """The manifest's record of one exported unit: file, hash, I/O and parity figures."""
    return {"onnx": str(onnx_path.relative_to(output)), "sha256": file_sha256(onnx_path),
            "inputs": [[t.name, t.dtype, list(t.shape)] for t in contract.inputs],
            "outputs": [[t.name, t.dtype, list(t.shape)] for t in contract.outputs],
            "parity": [{"output": r.output, "max_abs": r.max_abs, "max_rel": r.max_rel, "atol": r.atol,
                        "rtol": r.rtol} for r in results]}


def _build_prognosis(path: Path, model: DuPLUS, cfg: DuPLUSConfig, output: Path, manifest: dict, engine: str,
                     precision: str, parity_runs: int) -> dict:
    """Export image_features, text_encoder_ehr (LoRA merged, merge checked) and prognosis; fill manifest."""
    import torch

    from duplus.models.prognosis import (
        MAX_EHR_CHARS,
        PROGNOSIS_TARGETS,
        ImageFeatureUnit,
        feature_names,
        load_prognosis_checkpoint,
    )

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
    spec = prognosis_contracts(cfg, image_dim, text_dim)
    modules = {"image_features": ImageFeatureUnit(model.segmenter).eval(), "text_encoder_ehr": merged,
               "prognosis": PrognosisHeadUnit(prog.head).eval()}
    failures = []
    for name in tqdm(spec, desc="export prognosis units", unit="unit", disable=None):
        contract = spec[name]
        onnx_path = output / name / "1" / "model.onnx"
        export_onnx(modules[name], contract, prognosis_example_inputs(name, cfg, image_dim, text_dim), onnx_path)
        check_onnx(onnx_path, contract)
        fresh = [prognosis_example_inputs(name, cfg, image_dim, text_dim, n=1 + i, tokens=20 + 30 * i,
                                          spatial=(64, 48 + 16 * i, 48), seed=2000 + i) for i in range(parity_runs)]
        atol, rtol = TOLERANCES[name]
        results = parity(modules[name], onnx_path, contract, fresh, atol=atol, rtol=rtol)
        failures += [str(r) for r in results if not r.ok]
        entry = _unit_entry(output, onnx_path, contract, results)
        if engine == "tensorrt":
            plan = build_engine(onnx_path, output / name / "1" / "model.plan", contract,
                                _prognosis_profile(name, cfg, image_dim), precision=precision,
                                timing_cache=output / ".timing.cache")
            entry["plan"] = str(plan.relative_to(output))
        manifest["units"][name] = entry
        log.info("built %s: %s", name, entry.get("plan", entry["onnx"]))
    if failures:
        raise ParityError("prognosis parity over tolerance: " + "; ".join(failures))
    manifest["prognosis"] = {
        "checkpoint": path.name, "source": str(path), "checkpoint_sha256": file_sha256(path),
        "modality": prog.cfg.modality, "t1": prog.cfg.t1, "targets": list(PROGNOSIS_TARGETS),
        "feature_names": meta.get("feature_names") or feature_names((image_dim - 5) // 3),
        "image_dim": image_dim, "text_dim": text_dim, "max_ehr_tokens": prog.cfg.max_ehr_tokens,
        "max_ehr_chars": MAX_EHR_CHARS, "lora_merge_max_abs": diff, "val_c_index": meta.get("val_c_index")}
    return spec


def _save_prognosis_files(path: Path, output: Path, engine: str) -> None:
    from duplus.models.prognosis import load_prognosis_checkpoint

    prog, _ = load_prognosis_checkpoint(path)
    prog.ehr.tokenizer.save_pretrained(str(output / "prognose" / "1" / "tokenizer"))
    if engine == "torch":
        shutil.copyfile(path, output / "prognosis_checkpoint.pt")


def _prognosis_profile(name: str, cfg: DuPLUSConfig, image_dim: int) -> ShapeProfile:
    if name == "image_features":
        lo, opt, hi = (1, 1, 16, 16, 16), (1, 1, 128, 112, 112), (1, 1, 192, 192, 192)
        return ShapeProfile({"image": (lo, opt, hi), "modality": ((1,),) * 3,
                             "film": ((1, cfg.film_size),) * 3, "head_params": ((2, cfg.head_params),) * 3})
    if name == "text_encoder_ehr":
        return ShapeProfile({"input_ids": ((1, 1), (1, 96), (8, 256)), "attention_mask": ((1, 1), (1, 96), (8, 256))})
    return ShapeProfile({"image_features": ((1, image_dim), (1, image_dim), (64, image_dim)),
                         "ehr_embedding": ((1, cfg.text_dim), (1, cfg.text_dim), (64, cfg.text_dim))})


def _write_triton_repository(output: Path, opts: RepositoryOptions, spec, encoder: TextEncoder, model: DuPLUS,
                             ckpt: dict, checkpoint: Path) -> None:
    """config.pbtxt for every model, python-backend sources, tokenizer files and known-target embeddings."""
    from duplus.inference import Predictor
    from duplus.vocabulary import PromptVocabulary

    for m in repository_models(spec, opts):
        folder = output / m.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        text = m.pbtxt()
        parse_pbtxt(text)  # Triton's own schema
        (folder / "config.pbtxt").write_text(text)
        if m.name in opts.python_models:
            source = SOURCE_REPOSITORY / m.name / "1" / "model.py"
            if (folder / "1" / "model.py").resolve() != source.resolve():
                shutil.copyfile(source, folder / "1" / "model.py")
        elif (folder / "1" / "model.py").exists() and folder.resolve().parent != SOURCE_REPOSITORY.resolve():
            (folder / "1" / "model.py").unlink()   # a native model of the ngc flavour
        log.info("wrote %s/config.pbtxt (%s)", m.name, m.backend or m.platform)
    encoder.tokenizer.save_pretrained(str(output / "tokenizer" / "1" / "tokenizer"))
    predictor = Predictor(model, PromptVocabulary.from_dict(ckpt["vocabulary"]), encoder)
    names, emb = predictor.known_target_embeddings()
    np.savez(output / "segment_volume" / "1" / KNOWN_TARGETS, names=np.array(names), embeddings=emb.numpy())
    if opts.engine == "torch":
        shutil.copyfile(checkpoint, output / "checkpoint.pt")


def _profile(name: str, cfg: DuPLUSConfig, patch, max_batch: int, max_targets: int) -> ShapeProfile:
    e = cfg.text_dim
    if name == "text_encoder":
        return ShapeProfile({"input_ids": ((1, 1), (8, 16), (64, 64)), "attention_mask": ((1, 1), (8, 16), (64, 64))})
    if name == "conditioning":
        return ShapeProfile({"t1_embedding": ((1, e), (1, e), (max_batch, e)),
                             "t2_embedding": ((1, e), (4, e), (max_targets, e))})
    p = tuple(patch)
    return ShapeProfile({"image": ((1, 1) + p, (max_batch, 1) + p, (max_batch, 1) + p),
                         "modality": ((1,), (max_batch,), (max_batch,)),
                         "film": ((1, cfg.film_size), (max_batch, cfg.film_size), (max_batch, cfg.film_size)),
                         "head_params": ((1, cfg.head_params), (4, cfg.head_params),
                                         (max_targets, cfg.head_params))})


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
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                    help="TensorRT precision (ONNX Runtime and PyTorch units stay fp32)")
    ap.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="sliding-window patch; default: the checkpoint's training patch")
    ap.add_argument("--max-batch-size", type=int, default=4,
                    help="windows per segmenter call in segment_volume, and the TensorRT profile's largest batch")
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
    try:
        build(Path(args.checkpoint), output, target=args.target, engine=args.engine, precision=args.precision,
              patch_size=tuple(args.patch_size) if args.patch_size else None, max_batch_size=args.max_batch_size,
              max_targets=args.max_targets, instances=args.instances, threads=args.threads,
              ort_optimization=args.ort_optimization, units=tuple(args.units), prognosis_checkpoint=prognosis)
    except (ContractError, ParityError, ValueError, RuntimeError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
