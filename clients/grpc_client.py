"""A minimal Triton gRPC client for the DuPLUS models (tritonclient.grpc).

    client = SegmentationClient("127.0.0.1:8001")
    result = client.segment_volume(volume, affine, "CT", "CT of the abdomen", ["liver", "spleen"])
    result.labels  # uint8 on the volume's own grid; value i is targets[i-1]

Whole volumes travel in one message: the channel's message limits are raised to ``max_message_mb``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

EXPECTED_MODELS = ("tokenizer", "text_encoder", "conditioning", "segmenter", "encode_prompts", "segment_patch",
                   "segment_volume")


@dataclass(frozen=True)
class VolumeResult:
    labels: np.ndarray            # uint8, the input's own grid
    affine: np.ndarray            # the input's affine
    targets: tuple[str, ...]      # the prompts as sent
    resolved: tuple[str, ...]     # the canonical target each prompt matched
    similarity: tuple[float, ...]


def _strings(values) -> np.ndarray:
    return np.array([str(v).encode("utf-8") for v in values], dtype=np.object_)


class SegmentationClient:
    def __init__(self, url: str = "127.0.0.1:8001", *, max_message_mb: int = 1024, timeout_s: float = 600.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        limit = max_message_mb * 1024 * 1024
        self.client = grpcclient.InferenceServerClient(
            url, channel_args=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
        self.timeout_s = timeout_s

    def check_ready(self, models=EXPECTED_MODELS) -> None:
        if not self.client.is_server_ready():
            raise ConnectionError("Triton server is not ready")
        missing = [m for m in models if not self.client.is_model_ready(m)]
        if missing:
            raise RuntimeError(f"models not ready on the server: {missing}")

    def segment_volume(self, volume: np.ndarray, affine: np.ndarray, modality: str, t1: str,
                       targets: list[str] | tuple[str, ...]) -> VolumeResult:
        g = self._grpc
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        inputs = []
        for name, arr, dtype in (("VOLUME", volume, "FP32"), ("AFFINE", affine, "FP64"),
                                 ("MODALITY", _strings([modality]), "BYTES"), ("T1", _strings([t1]), "BYTES"),
                                 ("TARGETS", _strings(targets), "BYTES")):
            t = g.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        outputs = [g.InferRequestedOutput(n) for n in ("LABELS", "RESOLVED_TARGETS", "SIMILARITY")]
        res = self.client.infer("segment_volume", inputs, outputs=outputs, client_timeout=self.timeout_s)
        resolved = tuple(b.decode() if isinstance(b, bytes) else str(b) for b in res.as_numpy("RESOLVED_TARGETS"))
        return VolumeResult(res.as_numpy("LABELS"), affine, tuple(targets), resolved,
                            tuple(float(s) for s in res.as_numpy("SIMILARITY")))

    def model_statistics(self, model: str) -> dict:
        stats = self.client.get_inference_statistics(model, as_json=True)
        return stats["model_stats"][0] if stats.get("model_stats") else {}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
