"""One unit through the build stages, the same for every unit (``export_unit``):

    ONNX export -> onnx.checker + shape inference + contract check -> parity ONNX Runtime vs PyTorch
    -> (tensorrt) engine at a shape profile, int8 calibrated on phantom patches -> parity TensorRT vs ONNX Runtime

With the torch engine a unit runs PyTorch from the repository's checkpoint and needs no ONNX file: nothing is
exported and the manifest entry names the checkpoint it runs from, with its sha256.

Also here: each unit's tracing example, fresh parity inputs, TensorRT shape profile and the inputs inside
that profile on which an engine is checked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from duplus.contract import UnitContract
from duplus.files import file_sha256
from duplus.models.units import example_inputs, prognosis_example_inputs
from duplus.ort import ort_session
from export.calibration import CalibrationCache, CalibrationStream, PhantomCalibration
from export.onnx_export import ParityResult, check_onnx, export_onnx, parity
from export.tensorrt_engine import Calibration, ShapeProfile, build_engine, engine_parity
from export.triton_config import PROGNOSIS_UNITS

log = logging.getLogger(__name__)

#: max abs / max relative tolerances per unit for fp32 ONNX Runtime vs PyTorch eager
TOLERANCES = {"text_encoder": (1e-4, 1e-3), "conditioning": (1e-4, 1e-3), "segmenter": (2e-3, 1e-2),
              "image_features": (2e-3, 1e-2), "text_encoder_ehr": (1e-4, 1e-3), "prognosis": (1e-4, 1e-3),
              "pemma_segmenter": (2e-3, 1e-2), "context_classifier": (1e-4, 1e-3)}
#: TensorRT vs ONNX Runtime: at least these per precision (fp32 engines use TF32 where the GPU has it; fp16,
#: bf16 and int8 round much more). An output passes when its max abs OR its max relative error is within.
ENGINE_TOLERANCES = {"fp32": (1e-3, 1e-2), "fp16": (5e-2, 5e-2), "bf16": (1e-1, 1e-1), "int8": (2.5e-1, 2.5e-1)}
#: the units ``--precision int8`` quantises (convolutions on images, entropy-calibrated on phantom patches);
#: the text and fusion units (token ids, unit-norm embeddings, a small MLP) are built in fp16 then
INT8_UNITS = ("segmenter", "image_features")
#: files of a unit's version folder that an engine produces; a build removes those its engine does not write
UNIT_FILES = {"onnxruntime": ("model.onnx",), "tensorrt": ("model.onnx", "model.plan"), "torch": ()}


def unit_precision(name: str, precision: str) -> str:
    """The precision TensorRT builds ``name`` in for ``--precision precision``."""
    return "fp16" if precision == "int8" and name not in INT8_UNITS else precision


def engine_tolerances(name: str, precision: str) -> tuple[float, float]:
    atol, rtol = TOLERANCES[name]
    e_atol, e_rtol = ENGINE_TOLERANCES[precision]
    return max(atol, e_atol), max(rtol, e_rtol)


# ---- inputs --------------------------------------------------------------------------------------------------

def _example(name: str, cfg, image_dim: int | None, text_dim: int | None, **kw):
    if name in PROGNOSIS_UNITS:
        return prognosis_example_inputs(name, cfg, image_dim, text_dim, **kw)
    return example_inputs(name, cfg, **kw)


def tracing_example(name: str, cfg, patch, *, image_dim: int | None = None, text_dim: int | None = None) -> dict:
    """The inputs ``name`` is traced with for ONNX."""
    if name in PROGNOSIS_UNITS:
        return _example(name, cfg, image_dim, text_dim)
    return example_inputs(name, cfg, batch=2, k=3, spatial=tuple(patch), seed=0)


def fresh_inputs(name: str, cfg, patch, runs: int, *, image_dim: int | None = None,
                 text_dim: int | None = None) -> list[dict]:
    """``runs`` inputs with other dynamic sizes (batch, K, tokens, spatial) than the tracing example."""
    if name in PROGNOSIS_UNITS:
        return [_example(name, cfg, image_dim, text_dim, n=1 + i, tokens=20 + 30 * i, spatial=(64, 48 + 16 * i, 48),
                         seed=2000 + i) for i in range(runs)]
    # other than the traced (2, patch): batch 1 at the patch, then batch 2 one level factor smaller in-plane
    # (smaller rather than larger: the same check of the dynamic axes at half the voxels of a larger window)
    factor = cfg.level_factor
    return [example_inputs(name, cfg, batch=1 + (i % 2), k=1 + 2 * i, tokens=7 + 5 * i,
                           spatial=tuple(p if i == 0 else max(factor, p - factor * i) for p in patch[:2])
                           + (patch[2],), seed=1000 + i) for i in range(runs)]


def inputs_for_shapes(name: str, cfg, shapes: dict[str, tuple[int, ...]], *, seed: int,
                      image_dim: int | None = None, text_dim: int | None = None) -> dict:
    """Random inputs of ``name`` at exactly ``shapes`` (a profile's min/opt/max), every prompt with a token."""
    if name in ("text_encoder", "text_encoder_ehr"):
        n, tokens = shapes["input_ids"]
        feed = example_inputs("text_encoder", cfg, batch=n, tokens=tokens, seed=seed)
        feed["attention_mask"][:, 0] = 1   # an all-padding prompt never reaches a unit
        return feed
    if name == "conditioning":
        return example_inputs(name, cfg, batch=shapes["t1_embedding"][0], k=shapes["t2_embedding"][0], seed=seed)
    if name in ("segmenter", "image_features"):
        b, _, *spatial = shapes["image"]
        return example_inputs("segmenter", cfg, batch=b, k=shapes["head_params"][0], spatial=tuple(spatial),
                              seed=seed)
    if name == "prognosis":
        return prognosis_example_inputs(name, cfg, image_dim, text_dim, n=shapes["image_features"][0], seed=seed)
    raise ValueError(f"unknown unit {name!r}")


def profile_inputs(name: str, cfg, profile: ShapeProfile, *, image_dim: int | None = None,
                   text_dim: int | None = None, seed: int = 3000) -> list[dict]:
    """Inputs at the profile's min and opt shapes (every one inside the profile): an engine's parity inputs."""
    feeds = []
    for i, which in enumerate(("min", "opt")):
        shapes = {t: s for t, s in profile.at(which).items()}
        feed = inputs_for_shapes(name, cfg, shapes, seed=seed + i, image_dim=image_dim, text_dim=text_dim)
        if not profile.admits({k: tuple(v.shape) for k, v in feed.items()}):
            raise ValueError(f"{name}: parity inputs {({k: tuple(v.shape) for k, v in feed.items()})} lie outside "
                             f"the profile {profile.shapes}")
        feeds.append(feed)
    return feeds


def unit_profile(name: str, cfg, patch, *, max_batch: int, max_targets: int,
                 image_dim: int | None = None) -> ShapeProfile:
    """The TensorRT optimisation profile (min/opt/max shape per input) of ``name``."""
    e, f, h = cfg.text_dim, cfg.film_size, cfg.head_params
    k_opt = min(4, max_targets)
    if name == "text_encoder":
        return ShapeProfile({"input_ids": ((1, 1), (8, 16), (64, 64)), "attention_mask": ((1, 1), (8, 16), (64, 64))})
    if name == "conditioning":
        return ShapeProfile({"t1_embedding": ((1, e), (1, e), (max_batch, e)),
                             "t2_embedding": ((1, e), (k_opt, e), (max_targets, e))})
    if name == "segmenter":
        p = tuple(patch)
        return ShapeProfile({"image": ((1, 1) + p, (max_batch, 1) + p, (max_batch, 1) + p),
                             "modality": ((1,), (max_batch,), (max_batch,)),
                             "film": ((1, f), (max_batch, f), (max_batch, f)),
                             "head_params": ((1, h), (k_opt, h), (max_targets, h))})
    if name == "image_features":   # one whole volume at model spacing, K = 2 (tumour, node)
        lo, opt, hi = (1, 1, 16, 16, 16), (1, 1, 128, 112, 112), (1, 1, 192, 192, 192)
        return ShapeProfile({"image": (lo, opt, hi), "modality": ((1,),) * 3, "film": ((1, f),) * 3,
                             "head_params": ((2, h),) * 3})
    if name == "text_encoder_ehr":
        return ShapeProfile({"input_ids": ((1, 1), (1, 96), (8, 256)), "attention_mask": ((1, 1), (1, 96), (8, 256))})
    if name == "prognosis":
        return ShapeProfile({"image_features": ((1, image_dim), (1, image_dim), (64, image_dim)),
                             "ehr_embedding": ((1, e), (1, e), (64, e))})
    raise ValueError(f"unknown unit {name!r}")


# ---- the stages ----------------------------------------------------------------------------------------------

def export_unit(name: str, module: nn.Module, contract: UnitContract, output: Path, *, engine: str,
                example: dict | None = None, fresh: list[dict] = (), tolerances: tuple[float, float] | None = None,
                precision: str = "fp32", profile: ShapeProfile | None = None, engine_inputs: list[dict] = (),
                checkpoint: Path | None = None, timing_cache: Path | None = None,
                calibration: PhantomCalibration | None = None) -> dict:
    """Build unit ``name`` into ``output/name/1/`` and return its manifest entry.

    ``engine`` torch: no file is written; ``checkpoint`` (a file inside ``output``: checkpoint.pt or
    prognosis_checkpoint.pt) is what the unit runs from, recorded with its sha256.
    onnxruntime / tensorrt: ``module`` is traced with ``example`` to model.onnx, checked against ``contract``
    and compared with PyTorch on ``fresh`` within ``tolerances`` (default ``TOLERANCES[name]``).
    tensorrt also: model.plan at ``profile`` in ``unit_precision(name, precision)`` (int8: calibrated on
    ``calibration``), compared with ONNX Runtime on ``engine_inputs`` (inside the profile: ``profile_inputs``)
    within ``engine_tolerances``.
    Parity results go into the entry (``parity``, ``plan_parity``); ``parity_failures`` lists those over
    tolerance, so that every unit is built and reported before the build fails.
    """
    version = output / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    for stale in {"model.onnx", "model.plan"} - set(UNIT_FILES[engine]):   # left by a build with another engine
        (version / stale).unlink(missing_ok=True)
    for kind, tensors in (("input", contract.inputs), ("output", contract.outputs)):
        for t in tensors:
            log.info("  %s %s %s %s %s", name, kind, t.name, t.dtype, t.shape)
    entry = contract.to_manifest()
    if engine == "torch":
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{name}: the torch engine runs the unit from a checkpoint in the repository, "
                                    f"not found: {checkpoint}")
        entry.update(checkpoint=str(Path(checkpoint).relative_to(output)), sha256=file_sha256(checkpoint))
        log.info("built %s: PyTorch from %s (no ONNX)", name, entry["checkpoint"])
        return entry
    if example is None:
        raise ValueError(f"{name}: the {engine} engine needs an example to trace")
    onnx_path = export_onnx(module, contract, example, version / "model.onnx")
    check_onnx(onnx_path, contract)
    atol, rtol = tolerances or TOLERANCES[name]
    results = parity(module, onnx_path, contract, list(fresh), atol=atol, rtol=rtol, session=ort_session(onnx_path))
    sha = file_sha256(onnx_path)
    entry.update(onnx=str(onnx_path.relative_to(output)), sha256=sha, parity=[r.row() for r in results])
    if engine == "tensorrt":
        if profile is None or not engine_inputs:
            raise ValueError(f"{name}: a TensorRT engine needs a shape profile and parity inputs inside it")
        unit_prec = unit_precision(name, precision)
        cal = None
        if unit_prec == "int8":
            if calibration is None:
                raise ValueError(f"{name}: int8 needs calibration data")
            shapes = profile.at("opt")
            cal = Calibration(CalibrationStream(lambda: calibration.batches(shapes), shapes),
                              CalibrationCache(output / f".{name}.int8-calibration", f"{sha} {calibration.key(shapes)}"))
        plan = build_engine(onnx_path, version / "model.plan", contract, profile, precision=unit_prec,
                            timing_cache=timing_cache, calibration=cal)
        e_atol, e_rtol = engine_tolerances(name, unit_prec)
        engine_results = engine_parity(plan, onnx_path, contract, list(engine_inputs), atol=e_atol, rtol=e_rtol,
                                       precision=unit_prec)
        entry.update(plan=str(plan.relative_to(output)), plan_sha256=file_sha256(plan), precision=unit_prec,
                     plan_parity=[r.row() for r in engine_results])
    log.info("built %s: %s", name, entry.get("plan", entry["onnx"]))
    return entry


def parity_failures(name: str, entry: dict) -> list[str]:
    """The outputs of ``entry`` (from ``export_unit``) over tolerance, as messages."""
    out = []
    for key, against in (("parity", "ONNX Runtime vs PyTorch"), ("plan_parity", f"TensorRT {entry.get('precision')} vs ONNX Runtime")):
        for row in entry.get(key, ()):
            res = ParityResult(name, row["output"], row["max_abs"], row["max_rel"], row["atol"], row["rtol"], against)
            if not res.ok:
                out.append(str(res))
    return out
