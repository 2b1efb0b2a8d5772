"""One TensorRT engine as a callable: dict of numpy inputs -> dict of numpy outputs (torch-free at import; needs
``tensorrt``, torch and a CUDA GPU when built). The served unit runner (``serving.runtime.TensorRTRunner``) and
the build's engine parity check (``export.tensorrt_engine.engine_parity``) both run engines through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duplus.contract import InvalidRequest, UnitContract


class TensorRTEngine:
    """A TensorRT engine with dynamic shapes; buffers are torch CUDA tensors on the runner's stream."""

    def __init__(self, path: Path, contract: UnitContract, *, device_id: int = 0):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_id)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialise TensorRT engine {path}")
        self.context = self.engine.create_execution_context()
        self.contract = contract
        self.stream = torch.cuda.Stream(device=self.device)
        self._dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
                        "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}

    def _refused(self, name: str, shape: tuple[int, ...]) -> str:
        """Why ``context.set_input_shape(name, shape)`` failed, naming the tensor, the shape and the profile."""
        try:
            lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
            allowed = f"the engine's optimisation profile allows {lo} to {hi}"
        except Exception:  # noqa: BLE001 - the message only
            allowed = "it is outside the engine's optimisation profile"
        return (f"{self.contract.name}: TensorRT refused input {name} of shape {shape}: {allowed}; rebuild the "
                "engine for this shape (export/build_engines.py --patch-size / --max-batch-size / --max-targets)")

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        keep = []
        with torch.cuda.stream(self.stream):   # copies, outputs and the engine on one stream: no cross-stream race
            for spec in self.contract.inputs:
                x = torch.from_numpy(np.ascontiguousarray(feed[spec.name])).to(self.device)
                keep.append(x)
                shape = tuple(x.shape)
                if not self.context.set_input_shape(spec.name, shape):
                    raise InvalidRequest(self._refused(spec.name, shape))
                self.context.set_tensor_address(spec.name, x.data_ptr())
            outs = {}
            for spec in self.contract.outputs:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                y = torch.empty(shape, dtype=self._dtypes[spec.dtype], device=self.device)
                outs[spec.name] = y
                self.context.set_tensor_address(spec.name, y.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.contract.name}: TensorRT execution failed")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}
