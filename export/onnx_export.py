"""ONNX export of the units, structural checks, and PyTorch-vs-ONNX-Runtime parity."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
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
    against: str = ""    # "candidate vs reference", e.g. "TensorRT fp16 vs ONNX Runtime"

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol or self.max_rel <= self.rtol

    def row(self) -> dict:
        """The manifest's record of this result."""
        return {"output": self.output, "max_abs": self.max_abs, "max_rel": self.max_rel, "atol": self.atol,
                "rtol": self.rtol}

    def __str__(self) -> str:
        against = f" ({self.against})" if self.against else ""
        return (f"{self.unit}.{self.output}{against}: max abs {self.max_abs:.2e} (atol {self.atol:.0e}), "
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
    # nn.MultiheadAttention (the context classifier's ViT) takes a fused fast path under no_grad in eval mode, an
    # op ONNX does not have: trace the plain path (the same function)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(module, tuple(example[n] for n in names_in), str(path), input_names=names_in,
                              output_names=[t.name for t in contract.outputs], dynamic_axes=dynamic,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
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


Outputs = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]


def compare_outputs(contract: UnitContract, inputs: list[dict], reference: Outputs, candidate: Outputs, *,
                    atol: float, rtol: float, names: tuple[str, str] = ("PyTorch", "ONNX Runtime")
                    ) -> list[ParityResult]:
    """``candidate`` against ``reference`` on every feed of ``inputs`` (numpy arrays or torch tensors, keyed by
    the contract's input names); per output the worst abs and relative error over all inputs.

    Both callables take a dict of numpy arrays and return the outputs in contract order; ``names`` are
    (reference, candidate) for the messages. The one parity check of the build: ONNX Runtime vs PyTorch for
    every exported unit, TensorRT vs ONNX Runtime for every engine.
    """
    worst: dict[str, tuple[float, float]] = {}
    for feed in inputs:
        arrays = {t.name: np.ascontiguousarray(feed[t.name].numpy() if hasattr(feed[t.name], "numpy")
                                               else feed[t.name]) for t in contract.inputs}
        ref, got = reference(arrays), candidate(arrays)
        for spec, r, g in zip(contract.outputs, ref, got):
            r, g = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
            if r.shape != g.shape:
                raise ContractError(f"{contract.name}.{spec.name}: {names[1]} shape {g.shape} != {names[0]} {r.shape}")
            diff = np.abs(r - g)
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = float((diff / (np.abs(r) + 1e-3)).max()) if diff.size else 0.0
            a, b = worst.get(spec.name, (0.0, 0.0))
            worst[spec.name] = (max(a, max_abs), max(b, max_rel))
    against = f"{names[1]} vs {names[0]}"
    results = [ParityResult(contract.name, name, a, r, atol, rtol, against) for name, (a, r) in worst.items()]
    for res in results:
        (log.info if res.ok else log.error)("parity %s", res)
    return results


def torch_outputs(module: nn.Module, contract: UnitContract) -> Outputs:
    """``module`` in PyTorch eager as an :data:`Outputs` callable (no grad, float outputs as float32)."""
    module = module.eval()

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(feed[t.name]) for t in contract.inputs])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float().numpy() if o.is_floating_point() else o.numpy() for o in out]

    return run


def session_outputs(session, contract: UnitContract) -> Outputs:
    """An ONNX Runtime session as an :data:`Outputs` callable."""
    names = [t.name for t in contract.outputs]
    return lambda feed: session.run(names, feed)


def parity(module: nn.Module, path: Path, contract: UnitContract, inputs: list[dict[str, torch.Tensor]], *,
           atol: float, rtol: float, session=None) -> list[ParityResult]:
    """PyTorch vs ONNX Runtime on fresh inputs; per output the worst abs and relative error over all inputs."""
    return compare_outputs(contract, inputs, torch_outputs(module, contract),
                           session_outputs(session or ort_session(path), contract), atol=atol, rtol=rtol)
