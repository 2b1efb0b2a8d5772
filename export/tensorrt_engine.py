"""TensorRT engines from the ONNX units (only where the ``tensorrt`` package imports).

Real builder code: explicit-batch network from the ONNX parser (every parser error logged,
then a non-zero exit), one optimisation profile with min/opt/max shapes per dynamic input,
fp16 / bf16 / int8 flags (int8 with an entropy calibrator fed by real patches), a timing
cache reused across builds, and the engine's I/O checked against the unit's contract.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duplus.contract import UnitContract
from export.onnx_export import ContractError

log = logging.getLogger(__name__)


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


class _Calibrator:  # built lazily so that importing this module never needs tensorrt
    @staticmethod
    def make(batches: list[dict[str, np.ndarray]], cache_path: Path):
        import tensorrt as trt
        import torch

        class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self):
                super().__init__()
                self.batches = batches
                self.index = 0
                self.device = {}

            def get_batch_size(self):
                return 1

            def get_batch(self, names):
                if self.index >= len(self.batches):
                    return None
                feed = self.batches[self.index]
                self.index += 1
                ptrs = []
                for n in names:
                    self.device[n] = torch.from_numpy(np.ascontiguousarray(feed[n])).cuda()
                    ptrs.append(int(self.device[n].data_ptr()))
                return ptrs

            def read_calibration_cache(self):
                return cache_path.read_bytes() if cache_path.is_file() else None

            def write_calibration_cache(self, cache):
                cache_path.write_bytes(bytes(cache))

        return EntropyCalibrator()


def build_engine(onnx_path: Path, engine_path: Path, contract: UnitContract, profile: ShapeProfile, *,
                 precision: str = "fp16", workspace_gb: float = 4.0, timing_cache: Path | None = None,
                 calibration: list[dict[str, np.ndarray]] | None = None) -> Path:
    """Build and serialise a TensorRT engine for one unit; raises on any parser or contract error."""
    ok, why = tensorrt_available()
    if not ok:
        raise RuntimeError(f"TensorRT engine requested but unavailable: {why}")
    import tensorrt as trt

    if precision not in ("fp32", "fp16", "bf16", "int8"):
        raise ValueError(f"precision must be fp32, fp16, bf16 or int8, got {precision!r}")
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
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":
        if not calibration:
            raise ValueError("int8 needs calibration batches (real phantom patches)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
        config.int8_calibrator = _Calibrator.make(calibration, engine_path.with_suffix(".calib"))
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
    serialized = builder.build_serialized_network(network, config)
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
