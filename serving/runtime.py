"""Runners for one exported unit: dict of numpy inputs -> dict of numpy outputs.

Used by the python-backend unit models of the embedded flavour (and by the benchmarks):

- ``onnxruntime``: the unit's ``model.onnx`` (CUDA provider on a GPU instance where present);
- ``tensorrt``:    the unit's ``model.plan`` with shapes set per call (needs ``tensorrt`` + a GPU);
- ``torch``:       the unit rebuilt from the repository's ``checkpoint.pt`` in PyTorch, on CUDA
                   where available (for GPUs without TensorRT).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from duplus.contract import UnitContract
from duplus.ort import ort_session

log = logging.getLogger(__name__)

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class OnnxRuntimeRunner:
    def __init__(self, path: Path, contract: UnitContract, *, gpu: bool = False, device_id: int = 0, threads: int = 0,
                 optimization: str = "all"):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = ort_session(path, threads=threads, providers=providers, optimization=optimization)
        self.contract = contract
        self.output_names = [t.name for t in contract.outputs]
        log.info("%s: ONNX Runtime %s on %s", contract.name, ort.__version__, self.session.get_providers()[0])

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.session.run(self.output_names, {t.name: feed[t.name] for t in self.contract.inputs})
        return dict(zip(self.output_names, out))


class TensorRTRunner:
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
        from duplus.contract import InvalidRequest

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


class TorchRunner:
    """The unit in PyTorch eager (CUDA where available), rebuilt from the checkpoint."""

    def __init__(self, unit: str, checkpoint: Path, contract: UnitContract, *, gpu: bool = False, device_id: int = 0):
        import torch

        from duplus.inference import load_checkpoint
        from duplus.models.duplus import DuPLUS, DuPLUSConfig
        from duplus.models.units import ConditioningUnit, SegmenterUnit, TextEncoderUnit
        from duplus.text_encoder import TextEncoder

        self.torch = torch
        self.device = torch.device("cuda", device_id) if gpu and torch.cuda.is_available() else torch.device("cpu")
        if unit in ("text_encoder_ehr", "prognosis"):  # from the prognosis checkpoint beside checkpoint.pt
            from duplus.models.prognosis import load_prognosis_checkpoint
            from duplus.models.units import PrognosisHeadUnit

            prog, _ = load_prognosis_checkpoint(Path(checkpoint).parent / "prognosis_checkpoint.pt")
            module = prog.ehr.merged() if unit == "text_encoder_ehr" else PrognosisHeadUnit(prog.head)
            self.module = module.to(self.device).eval()
            self.contract = contract
            self.torch = torch
            log.info("%s: PyTorch %s on %s", unit, torch.__version__, self.device)
            return
        ckpt = load_checkpoint(checkpoint)
        cfg = DuPLUSConfig.from_dict(ckpt["model_config"])
        if unit == "text_encoder":
            module = TextEncoderUnit(TextEncoder(cfg.text_encoder))
        elif unit == "image_features":
            from duplus.models.prognosis import ImageFeatureUnit

            model = DuPLUS(cfg)
            model.load_state_dict(ckpt["state_dict"])
            module = ImageFeatureUnit(model.segmenter)
        else:
            model = DuPLUS(cfg)
            model.load_state_dict(ckpt["state_dict"])
            module = {"conditioning": ConditioningUnit, "segmenter": SegmenterUnit}[unit](model)
        self.module = module.to(self.device).eval()
        self.contract = contract
        log.info("%s: PyTorch %s on %s", unit, torch.__version__, self.device)

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            out = self.module(*[torch.from_numpy(np.ascontiguousarray(feed[t.name])).to(self.device)
                                for t in self.contract.inputs])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {t.name: o.float().cpu().numpy() if t.dtype == "float32" else o.cpu().numpy()
                for t, o in zip(self.contract.outputs, out)}


def make_runner(unit: str, version_dir: Path, contract: UnitContract, engine: str, *, gpu: bool = False,
                device_id: int = 0, threads: int = 0, optimization: str = "all", checkpoint: Path | None = None
                ) -> Runner:
    version_dir = Path(version_dir)
    if engine == "onnxruntime":
        return OnnxRuntimeRunner(version_dir / "model.onnx", contract, gpu=gpu, device_id=device_id, threads=threads,
                                 optimization=optimization)
    if engine == "tensorrt":
        return TensorRTRunner(version_dir / "model.plan", contract, device_id=device_id)
    if engine == "torch":
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"engine torch needs the repository's checkpoint.pt, not found: {checkpoint}")
        return TorchRunner(unit, Path(checkpoint), contract, gpu=gpu, device_id=device_id)
    raise ValueError(f"unknown engine {engine!r}; expected onnxruntime, tensorrt or torch")
