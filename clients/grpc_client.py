"""Triton gRPC client for the DuPLUS models (tritonclient.grpc), synchronous and asyncio.

    with SegmentationClient("127.0.0.1:8001", shared_memory="system") as client:
        client.check_ready()                       # server up, models ready, contract as expected
        result = client.segment_volume(volume, affine, "CT", "CT of the abdomen", ["liver", "spleen"])
    result.labels                                  # uint8 on the volume's own grid; value i = targets[i-1]

- **Contract check**: ``check_ready`` compares the server's model metadata of ``segment_volume``
  with what this client sends and expects, and raises ``ServerMismatchError`` naming every difference.
- **Timeouts**: per request (``timeout_s``); a deadline surfaces as ``RequestTimeout``.
- **Retries**: only on UNAVAILABLE (server restarting, connection refused; ``segment_volume``
  answers UNAVAILABLE when the server stops under it) and on a model with "no available versions"
  (unloading at shutdown), with exponential backoff up to ``retry_deadline_s``; INVALID_ARGUMENT and
  everything else is raised at once.
- **Large tensors**: gRPC message limits are raised for whole volumes; with
  ``shared_memory="system"`` the volume and the label map travel through POSIX shared memory
  registered with the server (client and server on one host).
- **asyncio**: ``AsyncSegmentationClient`` has the same API with ``await``; cancelling the task
  cancels the gRPC call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

EXPECTED_MODELS = ("tokenizer", "text_encoder", "conditioning", "segmenter", "encode_prompts", "segment_patch",
                   "segment_volume")
# segment_volume's contract as this client uses it: name -> (datatype, rank)
VOLUME_INPUTS = {"VOLUME": ("FP32", 3), "AFFINE": ("FP64", 2), "MODALITY": ("BYTES", 1), "T1": ("BYTES", 1),
                 "TARGETS": ("BYTES", 1)}
VOLUME_OUTPUTS = {"LABELS": ("UINT8", 3), "RESOLVED_TARGETS": ("BYTES", 1), "SIMILARITY": ("FP32", 1),
                  "STEM": ("BYTES", 1)}


PROGNOSE_INPUTS = {"VOLUME": ("FP32", 3), "AFFINE": ("FP64", 2), "MODALITY": ("BYTES", 1), "T1": ("BYTES", 1),
                   "EHR": ("BYTES", 1)}
PROGNOSE_OUTPUTS = {"RISK": ("FP32", 1), "IMAGE_FEATURES": ("FP32", 1), "FEATURE_NAMES": ("BYTES", 1)}


class ServerMismatchError(RuntimeError):
    """The server's models are not the ones this client was written for."""


class RequestTimeout(TimeoutError):
    """The server did not answer within the request's timeout."""


@dataclass(frozen=True)
class VolumeResult:
    labels: np.ndarray            # uint8, the input's own grid
    affine: np.ndarray            # the input's affine
    targets: tuple[str, ...]      # the prompts as sent
    resolved: tuple[str, ...]     # the canonical target each prompt matched
    similarity: tuple[float, ...]
    stem: str = ""                # the stem the volume ran through: the modality T1 names, else MODALITY


def _strings(values) -> np.ndarray:
    return np.array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values], dtype=np.object_)


def _status(exc) -> str:
    return str(exc.status()) if hasattr(exc, "status") and exc.status() else ""


@dataclass(frozen=True)
class PrognosisResult:
    risk: float                   # log hazard ratio (higher = worse prognosis); comparable across patients
    features: dict[str, float]    # the image features the risk used: radiomics of the predicted lesions + pooled


def _check_metadata(meta: dict, model: str = "segment_volume", inputs=VOLUME_INPUTS, outputs=VOLUME_OUTPUTS) -> None:
    problems = []
    for kind, expected in (("inputs", inputs), ("outputs", outputs)):
        served = {t["name"]: (t["datatype"], len(t["shape"])) for t in meta.get(kind, [])}
        for name, (dtype, rank) in expected.items():
            if name not in served:
                problems.append(f"{kind[:-1]} {name} missing")
            elif served[name] != (dtype, rank):
                problems.append(f"{kind[:-1]} {name} is {served[name][0]} rank {served[name][1]}, "
                                f"expected {dtype} rank {rank}")
    if problems:
        raise ServerMismatchError(f"{model} on the server does not match this client: " + "; ".join(problems))


def is_transient(exc: BaseException) -> bool:
    """True for a failure that may pass if the same request is sent again later.

    The server is restarting or unreachable (UNAVAILABLE, connection refused), a model is unloading or
    not loaded yet ("has no available versions"), or a python-backend stub crashed and is being
    reloaded by the server's watchdog ("Stub process ... is not healthy"). Everything else (bad input,
    a contract mismatch, a timeout) is not.
    """
    if isinstance(exc, (ConnectionError,)):
        return True
    status, text = _status(exc), str(exc)
    return ("UNAVAILABLE" in status or "failed to connect" in text.lower()
            or ("NOT_FOUND" in status and "has no available versions" in text)
            or ("is not healthy" in text and "Stub process" in text))


class _Common:
    def __init__(self, url: str, *, timeout_s: float, retry_deadline_s: float, backoff_s: float,
                 shared_memory: str, max_message_mb: int):
        if shared_memory not in ("none", "system", "cuda"):
            raise ValueError(f"shared_memory must be 'none', 'system' or 'cuda', got {shared_memory!r}")
        host = url.split("://")[-1].split(":")[0]
        if shared_memory != "none" and host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"{shared_memory} shared memory needs the server on this host, not {url!r}")
        if shared_memory == "cuda":
            try:
                import tritonclient.utils.cuda_shared_memory  # noqa: F401 - needs cuda-python and a CUDA driver
            except (ImportError, RuntimeError) as exc:
                raise ValueError(f"shared_memory='cuda' needs tritonclient[cuda] (cuda-python) and a GPU: {exc}") from None
        self.url, self.timeout_s = url, timeout_s
        self.retry_deadline_s, self.backoff_s = retry_deadline_s, backoff_s
        self.shared_memory = shared_memory
        limit = max_message_mb * 1024 * 1024
        self.channel_args = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]

    def _inputs(self, g, volume, affine, modality, t1, targets, region=None):
        inputs = []
        for name, arr, dtype in (("VOLUME", volume, "FP32"), ("AFFINE", affine, "FP64"),
                                 ("MODALITY", _strings([modality]), "BYTES"), ("T1", _strings([t1]), "BYTES"),
                                 ("TARGETS", _strings(targets), "BYTES")):
            t = g.InferInput(name, list(arr.shape), dtype)
            if name == "VOLUME" and region is not None:
                t.set_shared_memory(region, arr.nbytes)
            else:
                t.set_data_from_numpy(arr)
            inputs.append(t)
        return inputs

    def _outputs(self, g, region=None, nbytes=0):
        labels = g.InferRequestedOutput("LABELS")
        if region is not None:
            labels.set_shared_memory(region, nbytes)
        return [labels, g.InferRequestedOutput("RESOLVED_TARGETS"), g.InferRequestedOutput("SIMILARITY"),
                g.InferRequestedOutput("STEM")]

    @staticmethod
    def _result(res, affine, targets, labels=None) -> VolumeResult:
        labels = res.as_numpy("LABELS") if labels is None else labels
        resolved = tuple(b.decode() if isinstance(b, bytes) else str(b) for b in res.as_numpy("RESOLVED_TARGETS"))
        stem = res.as_numpy("STEM").reshape(-1)[0]
        return VolumeResult(labels, affine, tuple(targets), resolved,
                            tuple(float(s) for s in res.as_numpy("SIMILARITY")),
                            stem.decode() if isinstance(stem, bytes) else str(stem))

    def _retryable(self, exc, started: float, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to raise."""
        if not is_transient(exc):
            return None
        if time.monotonic() - started > self.retry_deadline_s:
            return None
        wait = min(self.backoff_s * 2 ** attempt, 10.0)
        log.warning("server unavailable (%s); retry %d in %.1f s", str(exc).splitlines()[0], attempt + 1, wait)
        return wait

    def _timeout_error(self, exc) -> RequestTimeout | None:
        if "DEADLINE_EXCEEDED" in _status(exc) or "Deadline Exceeded" in str(exc):
            return RequestTimeout(f"segment_volume did not answer within {self.timeout_s:.1f} s (timeout_s)")
        return None


class SegmentationClient(_Common):
    def __init__(self, url: str = "127.0.0.1:8001", *, timeout_s: float = 600.0, retry_deadline_s: float = 120.0,
                 backoff_s: float = 0.5, shared_memory: str = "none", max_message_mb: int = 1024,
                 cuda_device: int = 0):
        super().__init__(url, timeout_s=timeout_s, retry_deadline_s=retry_deadline_s, backoff_s=backoff_s,
                         shared_memory=shared_memory, max_message_mb=max_message_mb)
        import tritonclient.grpc as grpcclient

        self.cuda_device = cuda_device

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url, channel_args=self.channel_args)

    def check_ready(self, models=EXPECTED_MODELS) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            ready = self.client.is_server_ready(client_timeout=10)
        except InferenceServerException as exc:
            raise ConnectionError(f"no Triton server at {self.url}: {exc}") from None
        if not ready:
            raise ConnectionError(f"Triton at {self.url} is not ready")
        missing = [m for m in models if not self.client.is_model_ready(m)]
        if missing:
            raise ServerMismatchError(f"models not ready on {self.url}: {missing}")
        _check_metadata(self.client.get_model_metadata("segment_volume", as_json=True))

    def segment_volume(self, volume: np.ndarray, affine: np.ndarray, modality: str, t1: str,
                       targets: list[str] | tuple[str, ...]) -> VolumeResult:
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)

        def call() -> VolumeResult:
            if self.shared_memory == "system":
                return self._segment_shm(volume, affine, modality, t1, targets)
            if self.shared_memory == "cuda":
                return self._segment_cuda_shm(volume, affine, modality, t1, targets)
            res = self.client.infer("segment_volume", self._inputs(self._grpc, volume, affine, modality, t1, targets),
                                    outputs=self._outputs(self._grpc), client_timeout=self.timeout_s)
            return self._result(res, affine, targets)

        return self._with_retries(call)

    def _with_retries(self, call):
        """``call()``, retried with backoff while the server is UNAVAILABLE; a timeout becomes RequestTimeout."""
        from tritonclient.utils import InferenceServerException

        started, attempt = time.monotonic(), 0
        while True:
            try:
                return call()
            except InferenceServerException as exc:
                timeout = self._timeout_error(exc)
                if timeout is not None:
                    raise timeout from None
                wait = self._retryable(exc, started, attempt)
                if wait is None:
                    raise
                time.sleep(wait)
                attempt += 1

    def _segment_shm(self, volume, affine, modality, t1, targets) -> VolumeResult:
        import tritonclient.utils.shared_memory as shm

        tag = uuid.uuid4().hex[:12]
        names = {"in": f"duplus_in_{tag}", "out": f"duplus_out_{tag}"}
        out_bytes = int(np.prod(volume.shape))
        handles = {"in": shm.create_shared_memory_region(names["in"], f"/{names['in']}", volume.nbytes),
                   "out": shm.create_shared_memory_region(names["out"], f"/{names['out']}", out_bytes)}
        registered = []
        try:
            shm.set_shared_memory_region(handles["in"], [volume])
            self.client.register_system_shared_memory(names["in"], f"/{names['in']}", volume.nbytes)
            registered.append(names["in"])
            self.client.register_system_shared_memory(names["out"], f"/{names['out']}", out_bytes)
            registered.append(names["out"])
            res = self.client.infer("segment_volume",
                                    self._inputs(self._grpc, volume, affine, modality, t1, targets, names["in"]),
                                    outputs=self._outputs(self._grpc, names["out"], out_bytes),
                                    client_timeout=self.timeout_s)
            labels = shm.get_contents_as_numpy(handles["out"], np.uint8, volume.shape).copy()
            return self._result(res, affine, targets, labels)
        finally:
            for name in registered:
                try:
                    self.client.unregister_system_shared_memory(name)
                except Exception:  # noqa: BLE001 - the server may be gone; the region is ours to free
                    pass
            for h in handles.values():
                shm.destroy_shared_memory_region(h)

    def prognose(self, volume: np.ndarray, affine: np.ndarray, modality: str, t1: str, ehr: str | bytes
                 ) -> PrognosisResult:
        """Risk from a (PET) volume in its own geometry, its T1 prompt and the patient's EHR note."""

        if not getattr(self, "_prognose_checked", False):
            self._with_retries(self._check_prognose)
            self._prognose_checked = True
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        g = self._grpc

        def call() -> PrognosisResult:
            inputs = []
            for name, arr, dtype in (("VOLUME", volume, "FP32"), ("AFFINE", affine, "FP64"),
                                     ("MODALITY", _strings([modality]), "BYTES"), ("T1", _strings([t1]), "BYTES"),
                                     ("EHR", _strings([ehr]), "BYTES")):
                t = g.InferInput(name, list(arr.shape), dtype)
                t.set_data_from_numpy(arr)
                inputs.append(t)
            res = self.client.infer("prognose", inputs, outputs=[g.InferRequestedOutput(n) for n in PROGNOSE_OUTPUTS],
                                    client_timeout=self.timeout_s)
            names = [b.decode() if isinstance(b, bytes) else str(b) for b in res.as_numpy("FEATURE_NAMES")]
            return PrognosisResult(float(res.as_numpy("RISK")[0]),
                                   dict(zip(names, (float(v) for v in res.as_numpy("IMAGE_FEATURES")))))

        return self._with_retries(call)

    def _check_prognose(self) -> None:
        """prognose is served and matches this client; a prognose being reloaded (its stub died) is retried."""
        from tritonclient.utils import InferenceServerException

        if not self.client.is_model_ready("prognose"):
            index = self.client.get_model_repository_index(as_json=True).get("models", [])
            # loading, unloading or unloaded by the server's watchdog to be loaded again: transient; a model the
            # server never loaded has no state
            if any(m.get("name") == "prognose" and (m.get("state") in ("LOADING", "UNLOADING")
                                                    or m.get("reason") == "unloaded") for m in index):
                raise InferenceServerException("prognose is not ready (reloading)", status="StatusCode.UNAVAILABLE")
            raise ServerMismatchError(f"the server at {self.url} has no prognose model: build the repository "
                                      "with a prognosis checkpoint (export/build_engines.py --prognosis-checkpoint)")
        _check_metadata(self.client.get_model_metadata("prognose", as_json=True), "prognose", PROGNOSE_INPUTS,
                        PROGNOSE_OUTPUTS)

    def _segment_cuda_shm(self, volume, affine, modality, t1, targets) -> VolumeResult:
        """Volume in and labels out through CUDA shared memory on ``cuda_device`` (client and server share the GPU)."""
        import tritonclient.utils.cuda_shared_memory as cshm

        tag = uuid.uuid4().hex[:12]
        names = {"in": f"duplus_cin_{tag}", "out": f"duplus_cout_{tag}"}
        out_bytes = int(np.prod(volume.shape))
        dev = self.cuda_device
        handles = {"in": cshm.create_shared_memory_region(names["in"], volume.nbytes, dev),
                   "out": cshm.create_shared_memory_region(names["out"], out_bytes, dev)}
        registered = []
        try:
            cshm.set_shared_memory_region(handles["in"], [volume])
            for key, size in (("in", volume.nbytes), ("out", out_bytes)):
                self.client.register_cuda_shared_memory(names[key], cshm.get_raw_handle(handles[key]), dev, size)
                registered.append(names[key])
            res = self.client.infer("segment_volume",
                                    self._inputs(self._grpc, volume, affine, modality, t1, targets, names["in"]),
                                    outputs=self._outputs(self._grpc, names["out"], out_bytes),
                                    client_timeout=self.timeout_s)
            labels = cshm.get_contents_as_numpy(handles["out"], np.uint8, volume.shape).copy()
            return self._result(res, affine, targets, labels)
        finally:
            for name in registered:
                try:
                    self.client.unregister_cuda_shared_memory(name)
                except Exception:  # noqa: BLE001 - the server may be gone; the region is ours to free
                    pass
            for h in handles.values():
                cshm.destroy_shared_memory_region(h)

    def model_statistics(self, model: str) -> dict:
        stats = self.client.get_inference_statistics(model, as_json=True)
        return stats["model_stats"][0] if stats.get("model_stats") else {}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSegmentationClient(_Common):
    """asyncio twin of SegmentationClient (plain gRPC; cancelling the awaiting task cancels the call)."""

    def __init__(self, url: str = "127.0.0.1:8001", *, timeout_s: float = 600.0, retry_deadline_s: float = 120.0,
                 backoff_s: float = 0.5, max_message_mb: int = 1024):
        super().__init__(url, timeout_s=timeout_s, retry_deadline_s=retry_deadline_s, backoff_s=backoff_s,
                         shared_memory="none", max_message_mb=max_message_mb)
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aio

        self._grpc = grpcclient
        self.client = aio.InferenceServerClient(url, channel_args=self.channel_args)

    async def check_ready(self, models=EXPECTED_MODELS) -> None:
        if not await self.client.is_server_ready():
            raise ConnectionError(f"Triton at {self.url} is not ready")
        missing = [m for m in models if not await self.client.is_model_ready(m)]
        if missing:
            raise ServerMismatchError(f"models not ready on {self.url}: {missing}")
        _check_metadata(await self.client.get_model_metadata("segment_volume", as_json=True))

    async def segment_volume(self, volume, affine, modality: str, t1: str, targets) -> VolumeResult:
        from tritonclient.utils import InferenceServerException

        volume = np.ascontiguousarray(volume, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        started, attempt = time.monotonic(), 0
        while True:
            try:
                res = await self.client.infer("segment_volume",
                                              self._inputs(self._grpc, volume, affine, modality, t1, targets),
                                              outputs=self._outputs(self._grpc), client_timeout=self.timeout_s)
                return self._result(res, affine, targets)
            except InferenceServerException as exc:
                timeout = self._timeout_error(exc)
                if timeout is not None:
                    raise timeout from None
                wait = self._retryable(exc, started, attempt)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                attempt += 1

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> AsyncSegmentationClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
