"""TensorRT engines from the ONNX units (only where the ``tensorrt`` package imports and a GPU exists).

Real builder code: explicit-batch network from the ONNX parser (every parser error logged, then an error),
one optimisation profile with min/opt/max shapes per dynamic input, fp16 / bf16 / int8 flags, a timing cache
reused across builds, and the engine's I/O checked against the unit's contract. ``engine_parity`` then runs
the engine against ONNX Runtime on inputs inside the profile, with the same comparison as ONNX Runtime vs
PyTorch (``export.onnx_export.compare_outputs``).

int8 is implicit quantisation with an ``IInt8EntropyCalibrator2``: the batches come from
``export.calibration`` (phantom patches in model space with the conditioning of real prompts, at the
calibration profile's opt shapes) and the calibration table is cached in a file keyed by the ONNX file and
the calibration data, so a rebuild of the same unit does not calibrate again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duplus.contract import UnitContract
from export.calibration import CalibrationCache, CalibrationStream
from export.onnx_export import ContractError, ParityResult, compare_outputs, session_outputs

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def tensorrt_available() -> tuple[bool, str]:
    """(available, reason). TensorRT needs both the Python package and a CUDA GPU."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install '.[tensorrt]' on a machine with NVIDIA's index)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:  # pragma: no cover
        return False, "torch is not installed"
    return True, "ok"


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max shape of each dynamic input of one unit."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def __post_init__(self) -> None:
        for name, (lo, opt, hi) in self.shapes.items():
            if not (len(lo) == len(opt) == len(hi)):
                raise ValueError(f"profile {name}: min/opt/max ranks differ")
            if any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi)):
                raise ValueError(f"profile {name}: need min <= opt <= max per axis, got {lo}, {opt}, {hi}")

    def at(self, which: str) -> dict[str, tuple[int, ...]]:
        """Every input's ``"min"``, ``"opt"`` or ``"max"`` shape."""
        i = ("min", "opt", "max").index(which)
        return {name: tuple(s[i]) for name, s in self.shapes.items()}

    def admits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether every profiled input of ``shapes`` lies within min..max (what the engine accepts)."""
        for name, (lo, _, hi) in self.shapes.items():
            s = tuple(shapes.get(name, ()))
            if len(s) != len(lo) or any(not (a <= v <= c) for a, v, c in zip(lo, s, hi)):
                return False
        return True


@dataclass(frozen=True)
class Calibration:
    """What an int8 build calibrates on: the batches (made on the first request, at ``shapes``, the
    calibration profile's opt shapes) and the cache of the calibration table."""

    stream: CalibrationStream
    cache: CalibrationCache


def _entropy_calibrator(calibration: Calibration):
    """An ``IInt8EntropyCalibrator2`` over ``calibration`` (built here so that importing this module never needs
    tensorrt). A failure inside a callback is kept in ``.error`` (TensorRT swallows Python exceptions) and
    raised by ``build_engine`` after the build."""
    import tensorrt as trt
    import torch

    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise RuntimeError(f"TensorRT {trt.__version__} has no IInt8EntropyCalibrator2 (implicit int8 quantisation "
                           "was removed); build with --precision fp16 or bf16")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.error: BaseException | None = None
            self.device: list = []   # the current batch on the GPU, alive until the next get_batch

        def get_batch_size(self):
            return 1  # explicit batch: the batch axis is part of each input's shape

        def get_batch(self, names):
            try:
                arrays = calibration.stream.next(list(names))
                if arrays is None:
                    return None
                self.device = [torch.from_numpy(a).cuda() for a in arrays]
                return [int(t.data_ptr()) for t in self.device]
            except Exception as exc:  # noqa: BLE001 - kept and raised after the build
                self.error = exc
                return None

        def read_calibration_cache(self):
            return calibration.cache.read()

        def write_calibration_cache(self, cache):
            try:
                calibration.cache.write(bytes(cache))
            except Exception as exc:  # noqa: BLE001
                self.error = exc

    return EntropyCalibrator()


def build_engine(onnx_path: Path, engine_path: Path, contract: UnitContract, profile: ShapeProfile, *,
                 precision: str = "fp16", workspace_gb: float = 4.0, timing_cache: Path | None = None,
                 calibration: Calibration | None = None) -> Path:
    """Build and serialise a TensorRT engine for one unit; raises on any parser, calibration or contract error."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8":
        if calibration is None:
            raise ValueError(f"{contract.name}: int8 needs calibration data (export.calibration)")
        if dict(calibration.stream.shapes) != profile.at("opt"):
            raise ValueError(f"{contract.name}: calibration shapes {calibration.stream.shapes} are not the profile's "
                             f"opt shapes {profile.at('opt')}")
    ok, why = tensorrt_available()
    if not ok:
        raise RuntimeError(f"TensorRT engine requested but unavailable: {why}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        for i in range(parser.num_errors):
            log.error("ONNX parser: %s", parser.get_error(i))
        raise RuntimeError(f"TensorRT could not parse {onnx_path} ({parser.num_errors} errors)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    calibrator = None
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers without an int8 kernel fall back to fp16, not fp32
        calibrator = _entropy_calibrator(calibration)
        config.int8_calibrator = calibrator
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in profile.shapes:
            lo, opt, hi = profile.shapes[tensor.name]
            opt_profile.set_shape(tensor.name, lo, opt, hi)
            log.info("profile %s: min %s opt %s max %s", tensor.name, lo, opt, hi)
        elif any(d < 0 for d in tensor.shape):
            raise ValueError(f"dynamic input {tensor.name} {tuple(tensor.shape)} has no min/opt/max profile")
    config.add_optimization_profile(opt_profile)
    if calibrator is not None:
        config.set_calibration_profile(opt_profile)  # calibration batches have its opt shapes
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.error is not None:
        raise RuntimeError(f"{contract.name}: int8 calibration failed: {calibrator.error}") from calibrator.error
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {engine_path.name}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None and timing_cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    check_engine(engine_path, contract)
    return engine_path


def check_engine(engine_path: Path, contract: UnitContract) -> None:
    """Engine I/O names, modes and dtypes against the contract."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"could not deserialise {engine_path}")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != [t.name for t in contract.inputs] or outputs != [t.name for t in contract.outputs]:
        raise ContractError(f"{contract.name}: engine I/O {inputs} -> {outputs} differs from the contract")
    np_names = {trt.float32: "float32", trt.float16: "float16", trt.int64: "int64", trt.int32: "int32",
                trt.uint8: "uint8", trt.bool: "bool"}
    for spec in contract.inputs + contract.outputs:
        dtype = np_names.get(engine.get_tensor_dtype(spec.name))
        if dtype != spec.dtype:
            raise ContractError(f"{contract.name}.{spec.name}: engine dtype {dtype} != contract {spec.dtype}")
        log.info("  engine %s %s %s %s", contract.name, spec.name, dtype, tuple(engine.get_tensor_shape(spec.name)))


def engine_parity(engine_path: Path, onnx_path: Path, contract: UnitContract, inputs: list[dict], *, atol: float,
                  rtol: float, precision: str) -> list[ParityResult]:
    """The engine against ONNX Runtime on the same ONNX file, on ``inputs`` (inside the engine's profile)."""
    from duplus.ort import ort_session
    from duplus.trt import TensorRTEngine

    engine = TensorRTEngine(engine_path, contract)

    def engine_outputs(feed: dict) -> list[np.ndarray]:
        out = engine(feed)
        return [out[t.name].astype(np.float32) if out[t.name].dtype == np.float16 else out[t.name]
                for t in contract.outputs]

    return compare_outputs(contract, inputs, session_outputs(ort_session(onnx_path), contract), engine_outputs,
                           atol=atol, rtol=rtol,
                           names=("ONNX Runtime", f"TensorRT {precision}"))
