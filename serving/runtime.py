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
from duplus.trt import TensorRTEngine

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


class TensorRTRunner(TensorRTEngine):
    """A unit's ``model.plan`` (``duplus.trt.TensorRTEngine``: dynamic shapes, one CUDA stream, a refused shape is
    an InvalidRequest naming the tensor and the profile)."""


class TorchRunner:
    """The unit in PyTorch eager (CUDA where available), rebuilt from the checkpoint."""

    def __init__(self, unit: str, checkpoint: Path, contract: UnitContract, *, gpu: bool = False, device_id: int = 0):
        import torch

        from duplus.checkpoint import load_checkpoint
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
        if unit == "pemma_segmenter":   # from the PEMMA checkpoint beside checkpoint.pt, adapters merged
            from duplus.models.pemma import load_pemma_checkpoint, merged_for_export
            from duplus.models.units import PemmaSegmenterUnit

            model, _ = load_pemma_checkpoint(Path(checkpoint).parent / "pemma_checkpoint.pt")
            # the build checked this merge (manifest.json's pemma.merge_max_abs); the same code merges it here
            self.module = PemmaSegmenterUnit(merged_for_export(model, check=False)[0]).to(self.device).eval()
            self.contract = contract
            log.info("%s: PyTorch %s on %s", unit, torch.__version__, self.device)
            return
        if unit == "context_classifier":   # from the context classifier checkpoint beside checkpoint.pt
            from duplus.context.model import load_classifier

            self.module = load_classifier(Path(checkpoint).parent / "context_checkpoint.pt")[0].to(self.device).eval()
            self.contract = contract
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
        elif unit == "conditioning":   # the conditioning weights alone: this process never builds the segmenter
            from duplus.models.duplus import Conditioning

            cond = Conditioning(cfg)
            cond.load_state_dict({k.removeprefix("conditioning."): v for k, v in ckpt["state_dict"].items()
                                  if k.startswith("conditioning.")})
            module = ConditioningUnit(cond)
        else:
            model = DuPLUS(cfg)
            model.load_state_dict(ckpt["state_dict"])
            module = SegmenterUnit(model)
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
