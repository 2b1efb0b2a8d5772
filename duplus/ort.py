"""ONNX Runtime sessions, torch-free: the python-backend stubs of the ONNX Runtime units, the export's parity
check and the prognosis evaluation all open their sessions here."""

from __future__ import annotations

from pathlib import Path


def ort_session(path: Path, *, threads: int = 0, providers: list[str] | None = None,
                optimization: str = "all"):
    """An ONNX Runtime session (CUDA first where available). Kept in this light module: the python-backend
    stubs of the ONNX Runtime units import it without torch, MONAI or transformers (importing those three took
    about 5 s and raised a process's peak memory from 46 MB to 515 MB, measured on 2 CPU cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
