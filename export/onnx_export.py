"""ONNX export of the units, structural checks, and PyTorch-vs-ONNX-Runtime parity."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from duplus.contract import UnitContract
from duplus.ort import ort_session

log = logging.getLogger(__name__)

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
               onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool"}


class ContractError(ValueError):
    """An exported file or engine does not match the unit's tensor contract."""


class ParityError(RuntimeError):
    """An exported unit's outputs differ from PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class ParityResult:
    unit: str
    output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol or self.max_rel <= self.rtol

    def __str__(self) -> str:
        return (f"{self.unit}.{self.output}: max abs {self.max_abs:.2e} (atol {self.atol:.0e}), "
                f"max rel {self.max_rel:.2e} (rtol {self.rtol:.0e}) {'ok' if self.ok else 'FAIL'}")


def export_onnx(module: nn.Module, contract: UnitContract, example: dict[str, torch.Tensor], path: Path,
                opset: int = 17) -> Path:
    """Trace ``module`` with named inputs/outputs and the contract's dynamic axes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    names_in = [t.name for t in contract.inputs]
    missing = [n for n in names_in if n not in example]
    if missing:
        raise ContractError(f"{contract.name}: example inputs lack {missing}")
    dynamic = {t.name: t.dynamic_axes for t in contract.inputs + contract.outputs if t.dynamic_axes}
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(module, tuple(example[n] for n in names_in), str(path), input_names=names_in,
                          output_names=[t.name for t in contract.outputs], dynamic_axes=dynamic,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    log.info("exported %s -> %s (%.1f MB, %.1f s)", contract.name, path, path.stat().st_size / 2**20,
             time.perf_counter() - t0)
    return path


def check_onnx(path: Path, contract: UnitContract) -> onnx.ModelProto:
    """onnx.checker, shape inference, and every input/output name, dtype and rank against the contract."""
    onnx.checker.check_model(str(path))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    for kind, declared, actual in (("input", contract.inputs, model.graph.input),
                                   ("output", contract.outputs, model.graph.output)):
        actual_by_name = {v.name: v for v in actual}
        if [v.name for v in actual] != [t.name for t in declared]:
            raise ContractError(f"{contract.name}: ONNX {kind}s {[v.name for v in actual]} != contract "
                                f"{[t.name for t in declared]}")
        for spec in declared:
            tt = actual_by_name[spec.name].type.tensor_type
            dtype = ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            if dtype != spec.dtype:
                raise ContractError(f"{contract.name}.{spec.name}: dtype {dtype} != contract {spec.dtype}")
            if len(dims) != len(spec.shape):
                raise ContractError(f"{contract.name}.{spec.name}: rank {len(dims)} != contract {len(spec.shape)}")
            for i, (d, s) in enumerate(zip(dims, spec.shape)):
                if isinstance(s, int) and d != s:
                    raise ContractError(f"{contract.name}.{spec.name}: axis {i} is {d}, contract says {s}")
                if isinstance(s, str) and isinstance(d, int) and d > 0:
                    raise ContractError(f"{contract.name}.{spec.name}: axis {i} ({s}) was exported as fixed {d}")
            log.info("  %s %-8s %-14s %-8s %s", contract.name, kind, spec.name, dtype, dims)
    return model


def parity(module: nn.Module, path: Path, contract: UnitContract, inputs: list[dict[str, torch.Tensor]], *,
           atol: float, rtol: float, session=None) -> list[ParityResult]:
    """PyTorch vs ONNX Runtime on fresh inputs; per output the worst abs and relative error over all inputs."""
    sess = session or ort_session(path)
    worst: dict[str, tuple[float, float]] = {}
    module = module.eval()
    for feed in inputs:
        with torch.no_grad():
            ref = module(*[feed[t.name] for t in contract.inputs])
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = sess.run([t.name for t in contract.outputs], {k: v.numpy() for k, v in feed.items()})
        for spec, r, g in zip(contract.outputs, ref, got):
            r = r.float().numpy()
            if r.shape != g.shape:
                raise ContractError(f"{contract.name}.{spec.name}: ONNX Runtime shape {g.shape} != PyTorch {r.shape}")
            diff = np.abs(r - g)
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = float((diff / (np.abs(r) + 1e-3)).max()) if diff.size else 0.0
            a, b = worst.get(spec.name, (0.0, 0.0))
            worst[spec.name] = (max(a, max_abs), max(b, max_rel))
    results = [ParityResult(contract.name, name, a, r, atol, rtol) for name, (a, r) in worst.items()]
    for res in results:
        (log.info if res.ok else log.error)("parity %s", res)
    return results
