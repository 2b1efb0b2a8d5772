"""Triton gRPC client for the DuPLUS models (tritonclient.grpc), synchronous and asyncio.

    with SegmentationClient("127.0.0.1:8001", shared_memory="system") as client:
        client.check_ready()                       # server up, models ready, contract as expected
        result = client.segment_volume(volume, affine, "CT", "CT of the abdomen", ["liver", "spleen"])
    result.labels                                  # uint8 on the volume's own grid; value i = targets[i-1]

- **Other models**: ``prognose(volume, affine, modality, t1, ehr)`` (risk), ``segment_petct(ct, ct_affine,
  pet, pet_affine)`` (PEMMA: a CT, a PET or both of one patient, labels on the CT's grid) and
  ``classify_context(volume, affine, t1=None)`` (Biomed-DPT: what the image looks like, a T1 prompt for it and
  whether ``t1`` agrees); each checks its model's served contract on first use.
- **T1 guard**: every ``segment_volume`` result carries ``context_verdict`` (the request's T1 against what the
  image looks like; ``agrees`` None when the repository has no context classifier); ``strict_context=True`` makes
  the server refuse a contradicting T1 (INVALID_ARGUMENT naming both).
- **Contract check**: ``check_ready`` compares the server's model metadata of ``segment_volume``
  with what this client sends and expects, and raises ``ServerMismatchError`` naming every difference.
- **Timeouts**: per request (``timeout_s``); a deadline surfaces as ``RequestTimeout``.
- **Retries**: only on UNAVAILABLE (server restarting, connection refused; ``segment_volume``
  answers UNAVAILABLE when the server stops under it) and on a model with "no available versions"
  (unloading at shutdown), with exponential backoff (``backoff_s`` doubling, capped at ``max_backoff_s``)
  up to ``retry_deadline_s``; INVALID_ARGUMENT and everything else is raised at once.
- **Large tensors**: gRPC message limits are raised for whole volumes; with
  ``shared_memory="system"`` the volume and the label map travel through POSIX shared memory
  registered with the server (client and server on one host).
- **asyncio**: ``AsyncSegmentationClient`` has the same API with ``await``; cancelling the task
  cancels the gRPC call.
- **Replicas**: ``url`` may be a list of servers (``["10.0.0.5:8001", "10.0.0.6:8001"]``) or one
  comma-separated string. Requests go round robin over the replicas that are up; a transient failure
  (a replica killed mid-request, restarting, a stub being reloaded) marks that replica down for
  ``down_s`` and the same request goes at once to the next one (``segment_volume`` and ``prognose``
  are pure functions: resending is safe); only when every replica failed does the client back off.
  A replica marked down is used again after a ``ServerReady`` check. ``replica_stats()`` counts
  requests and failures per replica; a new client starts at a random replica. A gRPC name that resolves to several addresses
  (``dns:///triton-headless:8001`` in Kubernetes) gets gRPC's own ``round_robin`` policy on one channel.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

EXPECTED_MODELS = ("tokenizer", "text_encoder", "conditioning", "segmenter", "encode_prompts", "segment_patch",
                   "segment_volume")
# segment_volume's contract as this client uses it: name -> (datatype, rank)
VOLUME_INPUTS = {"VOLUME": ("FP32", 3), "AFFINE": ("FP64", 2), "MODALITY": ("BYTES", 1), "T1": ("BYTES", 1),
                 "TARGETS": ("BYTES", 1)}
VOLUME_OUTPUTS = {"LABELS": ("UINT8", 3), "RESOLVED_TARGETS": ("BYTES", 1), "SIMILARITY": ("FP32", 1),
                  "STEM": ("BYTES", 1), "CONDITIONING_TEXTS": ("BYTES", 1), "CONTEXT_VERDICT": ("BYTES", 1)}


PROGNOSE_INPUTS = {"VOLUME": ("FP32", 3), "AFFINE": ("FP64", 2), "MODALITY": ("BYTES", 1), "T1": ("BYTES", 1),
                   "EHR": ("BYTES", 1)}
PROGNOSE_OUTPUTS = {"RISK": ("FP32", 1), "IMAGE_FEATURES": ("FP32", 1), "FEATURE_NAMES": ("BYTES", 1)}

#: segment_petct (PEMMA): every input optional, at least one image with its affine
PETCT_INPUTS = {"CT": ("FP32", 3), "CT_AFFINE": ("FP64", 2), "PET": ("FP32", 3), "PET_AFFINE": ("FP64", 2)}
PETCT_OUTPUTS = {"LABELS": ("UINT8", 3), "MODE": ("BYTES", 1), "LABEL_NAMES": ("BYTES", 1)}

#: classify_context (Biomed-DPT): a volume [+ a T1 prompt to check] -> what it looks like
CONTEXT_INPUTS = {"VOLUME": ("FP32", 3), "AFFINE": ("FP64", 2), "T1": ("BYTES", 1)}
CONTEXT_OUTPUTS = {"PROBABILITIES": ("FP32", 1), "CLASSES": ("BYTES", 1), "CONTEXT": ("BYTES", 1),
                   "CONTEXT_T1": ("BYTES", 1), "VERDICT": ("BYTES", 1)}


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
    conditioned_by: tuple[str, ...] = ()  # the text that conditioned each target: its name or its instruction
    # the T1 guard: {"looks_like", "probability", "t1", "agrees", "reason", "alpha"} (duplus.context.guard.
    # ContextVerdict; alpha is the guard's threshold, absent when the server has no context classifier);
    # agrees None when the T1 names neither modality nor region, or the server has no context classifier
    context_verdict: dict | None = None


def instruction_inputs(instructions: str | None, context) -> tuple[tuple[str, str], ...]:
    """segment_volume's optional INSTRUCTIONS and CONTEXT inputs: ``instructions`` 'auto' has the server's
    generator write each target's instruction for the image's ``context`` (a mapping of
    ``duplus.instructions.ImageContext`` fields, e.g. from a DICOM header, or its JSON); None sends neither."""
    import json

    extra = []
    if instructions is not None:
        extra.append(("INSTRUCTIONS", str(instructions)))
    if context is not None:
        extra.append(("CONTEXT", context if isinstance(context, str) else json.dumps(dict(context), sort_keys=True)))
    return tuple(extra)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strings(values) -> np.ndarray:
    return np.array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values], dtype=np.object_)


def _status(exc) -> str:
    return str(exc.status()) if hasattr(exc, "status") and exc.status() else ""


@dataclass(frozen=True)
class PrognosisResult:
    risk: float                   # log hazard ratio (higher = worse prognosis); comparable across patients
    features: dict[str, float]    # the image features the risk used: radiomics of the predicted lesions + pooled


@dataclass(frozen=True)
class ContextResult:
    probabilities: dict[str, float]   # per context key ('CT|abdomen', 'MR:T1|head_neck', ...)
    context: str                      # the most probable key
    t1: str                           # that context as a T1 prompt ('CT of the abdomen')
    verdict: dict                     # the request's T1 against the image (agrees None without a T1)


@dataclass(frozen=True)
class PetCtResult:
    labels: np.ndarray            # uint8 on the CT's grid (the PET's without a CT); value i = label_names[i]
    affine: np.ndarray            # the affine of that grid
    mode: str                     # "ct+pet", "ct" or "pet": what the server ran
    label_names: tuple[str, ...]  # ("background", "primary tumour", "lymph node")


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


def replica_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """The replica addresses of ``url``: a list, or one string with commas; a gRPC resolver name
    (``dns:///host:port``, ``ipv4:a:p,b:p``) stays one address that gRPC balances itself."""
    if isinstance(url, str):
        urls = (url,) if url.startswith(("dns:", "ipv4:", "ipv6:", "unix:")) else tuple(url.split(","))
    else:
        urls = tuple(url)
    urls = tuple(u.strip() for u in urls if u and u.strip())
    if not urls:
        raise ValueError(f"no Triton address in {url!r}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"a replica is listed twice in {list(urls)}")
    return urls


@dataclass
class ReplicaStats:
    requests: int = 0             # requests sent to this replica (each attempt counts)
    failures: int = 0             # of those, transient failures (the request then went elsewhere or was retried)
    down_until: float = 0.0       # time.monotonic() until which the replica is skipped
    last_error: str = ""


@dataclass
class _Replicas:
    """Round robin over the replicas that are up; a replica that failed is skipped for ``down_s``."""

    urls: tuple[str, ...]
    down_s: float = 5.0
    stats: dict[str, ReplicaStats] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next: int = 0

    def __post_init__(self):
        self.stats = {u: ReplicaStats() for u in self.urls}
        # a random first replica (as gRPC's round_robin does): many short-lived clients, one per series in the
        # DICOM node's workers, spread over the replicas instead of all starting with the first
        self.next = random.randrange(len(self.urls))

    def pick(self, exclude: set[int]) -> tuple[int, bool]:
        """(replica index, whether it was down and wants a ready check first). Up replicas first, in turn."""
        with self.lock:
            now, n = time.monotonic(), len(self.urls)
            order = [(self.next + k) % n for k in range(n)]
            candidates = [i for i in order if i not in exclude] or order
            up = [i for i in candidates if self.stats[self.urls[i]].down_until <= now]
            i = up[0] if up else min(candidates, key=lambda j: self.stats[self.urls[j]].down_until)
            self.next = (i + 1) % n
            was_down = self.stats[self.urls[i]].down_until > 0
            self.stats[self.urls[i]].requests += 1
            return i, was_down

    def failed(self, i: int, exc: BaseException) -> None:
        with self.lock:
            st = self.stats[self.urls[i]]
            st.failures += 1
            st.down_until = time.monotonic() + self.down_s
            st.last_error = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__

    def succeeded(self, i: int) -> None:
        with self.lock:
            self.stats[self.urls[i]].down_until = 0.0


class _Common:
    def __init__(self, url: str | Sequence[str], *, timeout_s: float, retry_deadline_s: float, backoff_s: float,
                 shared_memory: str, max_message_mb: int, down_s: float = 5.0,
                 observer: Callable[[str, str, float], None] | None = None, max_backoff_s: float = 10.0):
        if not 0 <= backoff_s <= max_backoff_s:
            raise ValueError(f"backoff_s must be >= 0 and <= max_backoff_s, got backoff_s={backoff_s}, "
                             f"max_backoff_s={max_backoff_s}")
        if shared_memory not in ("none", "system", "cuda"):
            raise ValueError(f"shared_memory must be 'none', 'system' or 'cuda', got {shared_memory!r}")
        urls = replica_urls(url)
        for u in urls:
            host = u.split("://")[-1].split(":")[0]
            if shared_memory != "none" and host not in ("127.0.0.1", "localhost"):
                raise ValueError(f"{shared_memory} shared memory needs the server on this host, not {u!r}")
        if shared_memory == "cuda":
            try:
                import tritonclient.utils.cuda_shared_memory  # noqa: F401 - needs cuda-python and a CUDA driver
            except (ImportError, RuntimeError) as exc:
                raise ValueError(f"shared_memory='cuda' needs tritonclient[cuda] (cuda-python) and a GPU: {exc}") from None
        self.urls, self.url, self.timeout_s = urls, ",".join(urls), timeout_s
        self.retry_deadline_s, self.backoff_s, self.max_backoff_s = retry_deadline_s, backoff_s, max_backoff_s
        self.shared_memory = shared_memory
        self.replicas = _Replicas(urls, down_s=down_s)
        self.observer = observer       # observer(replica, "ok" | "failed" | "error", seconds) after every attempt
        limit = max_message_mb * 1024 * 1024
        self.channel_args = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        if len(urls) == 1 and urls[0].startswith(("dns:", "ipv4:", "ipv6:")):
            self.channel_args.append(("grpc.lb_policy_name", "round_robin"))   # gRPC balances one name's addresses

    def replica_stats(self) -> dict[str, ReplicaStats]:
        """Requests and failures per replica so far (copies)."""
        with self.replicas.lock:
            return {u: ReplicaStats(**vars(st)) for u, st in self.replicas.stats.items()}

    def _observe(self, i: int, outcome: str, started: float) -> None:
        if self.observer is not None:
            try:
                self.observer(self.urls[i], outcome, time.monotonic() - started)
            except Exception:  # noqa: BLE001 - a metrics hook never fails a request
                log.exception("the request observer failed")

    def _after_failure(self, i: int, exc, tried: set[int], started: float, attempt: int) -> tuple[bool, float | None]:
        """A transient failure of replica i: (go to another replica now?, else seconds to back off or None)."""
        self.replicas.failed(i, exc)
        if len(tried | {i}) < len(self.urls):
            log.warning("replica %s failed (%s); the request goes to another replica", self.urls[i],
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return True, None
        return False, self._retryable(exc, started, attempt)

    def _inputs(self, g, volume, affine, modality, t1, targets, region=None, extra=()):
        """segment_volume's inputs; ``extra``: (name, value) of the optional ones, a bool sent as BOOL [1]."""
        inputs = []
        for name, arr, dtype in (("VOLUME", volume, "FP32"), ("AFFINE", affine, "FP64"),
                                 ("MODALITY", _strings([modality]), "BYTES"), ("T1", _strings([t1]), "BYTES"),
                                 ("TARGETS", _strings(targets), "BYTES"),
                                 *((n, np.array([v], dtype=np.bool_), "BOOL") if isinstance(v, bool) else
                                   (n, _strings([v]), "BYTES") for n, v in extra)):
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
                g.InferRequestedOutput("STEM"), g.InferRequestedOutput("CONDITIONING_TEXTS"),
                g.InferRequestedOutput("CONTEXT_VERDICT")]

    @staticmethod
    def _result(res, affine, targets, labels=None) -> VolumeResult:
        labels = res.as_numpy("LABELS") if labels is None else labels
        resolved = tuple(b.decode() if isinstance(b, bytes) else str(b) for b in res.as_numpy("RESOLVED_TARGETS"))
        stem = res.as_numpy("STEM").reshape(-1)[0]
        texts = tuple(b.decode() if isinstance(b, bytes) else str(b) for b in res.as_numpy("CONDITIONING_TEXTS"))
        verdict = res.as_numpy("CONTEXT_VERDICT")
        return VolumeResult(labels, affine, tuple(targets), resolved,
                            tuple(float(s) for s in res.as_numpy("SIMILARITY")),
                            stem.decode() if isinstance(stem, bytes) else str(stem), texts,
                            None if verdict is None else json.loads(_text(verdict.reshape(-1)[0])))

    def _retryable(self, exc, started: float, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to raise."""
        if not is_transient(exc):
            return None
        if time.monotonic() - started > self.retry_deadline_s:
            return None
        wait = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
        log.warning("server unavailable (%s); retry %d in %.1f s", str(exc).splitlines()[0] if str(exc) else
                    type(exc).__name__, attempt + 1, wait)
        return wait

    def _timeout_error(self, exc) -> RequestTimeout | None:
        if "DEADLINE_EXCEEDED" in _status(exc) or "Deadline Exceeded" in str(exc):
            return RequestTimeout(f"segment_volume did not answer within {self.timeout_s:.1f} s (timeout_s)")
        return None


class SegmentationClient(_Common):
    def __init__(self, url: str | Sequence[str] = "127.0.0.1:8001", *, timeout_s: float = 600.0,
                 retry_deadline_s: float = 120.0, backoff_s: float = 0.5, shared_memory: str = "none",
                 max_message_mb: int = 1024, cuda_device: int = 0, down_s: float = 5.0,
                 observer: Callable[[str, str, float], None] | None = None, max_backoff_s: float = 10.0):
        super().__init__(url, timeout_s=timeout_s, retry_deadline_s=retry_deadline_s, backoff_s=backoff_s,
                         shared_memory=shared_memory, max_message_mb=max_message_mb, down_s=down_s,
                         observer=observer, max_backoff_s=max_backoff_s)
        import tritonclient.grpc as grpcclient

        self.cuda_device = cuda_device

        self._grpc = grpcclient
        self.clients = [grpcclient.InferenceServerClient(u, channel_args=self.channel_args) for u in self.urls]
        self.client = self.clients[0]

    def check_ready(self, models=EXPECTED_MODELS) -> None:
        """Every replica up, with the models ready and the contract this client expects."""
        from tritonclient.utils import InferenceServerException

        for url, client in zip(self.urls, self.clients):
            try:
                ready = client.is_server_ready(client_timeout=10)
            except InferenceServerException as exc:
                raise ConnectionError(f"no Triton server at {url}: {exc}") from None
            if not ready:
                raise ConnectionError(f"Triton at {url} is not ready")
            missing = [m for m in models if not client.is_model_ready(m)]
            if missing:
                raise ServerMismatchError(f"models not ready on {url}: {missing}")
            _check_metadata(client.get_model_metadata("segment_volume", as_json=True))

    def segment_volume(self, volume: np.ndarray, affine: np.ndarray, modality: str, t1: str,
                       targets: list[str] | tuple[str, ...], *, instructions: str | None = None,
                       context=None, strict_context: bool = False) -> VolumeResult:
        """``instructions='auto'``: each target is conditioned by the instruction the server's generator writes for
        it and ``context`` (see ``instruction_inputs``); the result's ``conditioned_by`` holds them.
        ``strict_context``: a T1 that contradicts what the image looks like is refused (INVALID_ARGUMENT naming
        both) instead of only reported in ``context_verdict``."""
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        extra = instruction_inputs(instructions, context) + ((("STRICT_CONTEXT", True),) if strict_context else ())

        def call(client) -> VolumeResult:
            if self.shared_memory == "system":
                return self._segment_shm(client, volume, affine, modality, t1, targets, extra)
            if self.shared_memory == "cuda":
                return self._segment_cuda_shm(client, volume, affine, modality, t1, targets, extra)
            res = client.infer("segment_volume",
                               self._inputs(self._grpc, volume, affine, modality, t1, targets, extra=extra),
                               outputs=self._outputs(self._grpc), client_timeout=self.timeout_s)
            return self._result(res, affine, targets)

        return self._with_retries(call)

    def _ready(self, i: int) -> bool:
        """A replica that was down answers ServerReady again (a quick check before a whole volume goes to it)."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self.clients[i].is_server_ready(client_timeout=2))
        except InferenceServerException:
            return False

    def _with_retries(self, call, only: int | None = None):
        """``call(client)`` on a replica that is up; a transient failure sends it to the next replica at once, and
        only when every replica failed does it back off (up to ``retry_deadline_s``); a timeout becomes
        RequestTimeout. ``only``: that replica alone (retried with backoff)."""
        from tritonclient.utils import InferenceServerException

        started, attempt, tried = time.monotonic(), 0, set()
        others = set(range(len(self.urls))) - {only} if only is not None else set()
        while True:
            i, was_down = self.replicas.pick(tried | others)
            t0 = time.monotonic()
            try:
                if was_down and len(self.urls) > 1 and not self._ready(i):
                    raise InferenceServerException(f"replica {self.urls[i]} is not ready",
                                                   status="StatusCode.UNAVAILABLE")
                out = call(self.clients[i])
            except InferenceServerException as exc:
                timeout = self._timeout_error(exc)
                if timeout is not None or not is_transient(exc):
                    self._observe(i, "error", t0)
                    if timeout is not None:
                        raise timeout from None
                    raise
                self._observe(i, "failed", t0)
                now, wait = self._after_failure(i, exc, tried | others, started, attempt)
                tried.add(i)
                if now:
                    continue
                if wait is None:
                    raise
                time.sleep(wait)
                attempt += 1
                tried.clear()                    # after the back-off every replica is worth a new try
            else:
                self.replicas.succeeded(i)
                self._observe(i, "ok", t0)
                return out

    def _segment_shm(self, client, volume, affine, modality, t1, targets, extra=()) -> VolumeResult:
        import tritonclient.utils.shared_memory as shm

        tag = uuid.uuid4().hex[:12]
        names = {"in": f"duplus_in_{tag}", "out": f"duplus_out_{tag}"}
        out_bytes = int(np.prod(volume.shape))
        handles = {"in": shm.create_shared_memory_region(names["in"], f"/{names['in']}", volume.nbytes),
                   "out": shm.create_shared_memory_region(names["out"], f"/{names['out']}", out_bytes)}
        registered = []
        try:
            shm.set_shared_memory_region(handles["in"], [volume])
            client.register_system_shared_memory(names["in"], f"/{names['in']}", volume.nbytes)
            registered.append(names["in"])
            client.register_system_shared_memory(names["out"], f"/{names['out']}", out_bytes)
            registered.append(names["out"])
            res = client.infer("segment_volume",
                                    self._inputs(self._grpc, volume, affine, modality, t1, targets, names["in"], extra),
                                    outputs=self._outputs(self._grpc, names["out"], out_bytes),
                                    client_timeout=self.timeout_s)
            labels = shm.get_contents_as_numpy(handles["out"], np.uint8, volume.shape).copy()
            return self._result(res, affine, targets, labels)
        finally:
            for name in registered:
                try:
                    client.unregister_system_shared_memory(name)
                except Exception:  # noqa: BLE001 - the server may be gone; the region is ours to free
                    pass
            for h in handles.values():
                shm.destroy_shared_memory_region(h)

    def prognose(self, volume: np.ndarray, affine: np.ndarray, modality: str, t1: str, ehr: str | bytes
                 ) -> PrognosisResult:
        """Risk from a (PET) volume in its own geometry, its T1 prompt and the patient's EHR note."""

        if not getattr(self, "_prognose_checked", False):
            for i in range(len(self.clients)):          # every replica serves prognose as this client expects
                self._with_retries(self._check_prognose, only=i)
            self._prognose_checked = True
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        g = self._grpc

        def call(client) -> PrognosisResult:
            inputs = []
            for name, arr, dtype in (("VOLUME", volume, "FP32"), ("AFFINE", affine, "FP64"),
                                     ("MODALITY", _strings([modality]), "BYTES"), ("T1", _strings([t1]), "BYTES"),
                                     ("EHR", _strings([ehr]), "BYTES")):
                t = g.InferInput(name, list(arr.shape), dtype)
                t.set_data_from_numpy(arr)
                inputs.append(t)
            res = client.infer("prognose", inputs, outputs=[g.InferRequestedOutput(n) for n in PROGNOSE_OUTPUTS],
                                    client_timeout=self.timeout_s)
            names = [b.decode() if isinstance(b, bytes) else str(b) for b in res.as_numpy("FEATURE_NAMES")]
            return PrognosisResult(float(res.as_numpy("RISK")[0]),
                                   dict(zip(names, (float(v) for v in res.as_numpy("IMAGE_FEATURES")))))

        return self._with_retries(call)

    def segment_petct(self, ct: np.ndarray | None = None, ct_affine: np.ndarray | None = None,
                      pet: np.ndarray | None = None, pet_affine: np.ndarray | None = None) -> PetCtResult:
        """Head-and-neck tumour and node labels (PEMMA) from a CT, a PET or both of one patient, each in its own
        geometry (the two must share the frame of reference); labels come back on the CT's grid, the PET's
        without a CT.  A request the server refuses (neither image, no overlap, an image without its affine)
        raises at once with the server's INVALID_ARGUMENT message."""
        self._check_optional_once("segment_petct", PETCT_INPUTS, PETCT_OUTPUTS, "--pemma-checkpoint")
        g = self._grpc
        sent = [(name, np.ascontiguousarray(arr, dtype=dtype), wire) for name, arr, dtype, wire in (
            ("CT", ct, np.float32, "FP32"), ("CT_AFFINE", ct_affine, np.float64, "FP64"),
            ("PET", pet, np.float32, "FP32"), ("PET_AFFINE", pet_affine, np.float64, "FP64")) if arr is not None]
        reference = ct_affine if ct is not None else pet_affine

        def call(client) -> PetCtResult:
            inputs = self._infer_inputs(sent)
            res = client.infer("segment_petct", inputs, outputs=[g.InferRequestedOutput(n) for n in PETCT_OUTPUTS],
                               client_timeout=self.timeout_s)
            mode = res.as_numpy("MODE").reshape(-1)[0]
            names = tuple(b.decode() if isinstance(b, bytes) else str(b) for b in res.as_numpy("LABEL_NAMES"))
            return PetCtResult(res.as_numpy("LABELS"), None if reference is None else np.asarray(reference),
                               mode.decode() if isinstance(mode, bytes) else str(mode), names)

        return self._with_retries(call)

    def classify_context(self, volume: np.ndarray, affine: np.ndarray, t1: str | None = None) -> ContextResult:
        """What a volume looks like (the context classifier, Biomed-DPT): probabilities per context, the most
        probable one and a T1 prompt for it; with ``t1``, whether that prompt agrees (``verdict['agrees']``)."""
        self._check_optional_once("classify_context", CONTEXT_INPUTS, CONTEXT_OUTPUTS, "--context-checkpoint")
        g = self._grpc
        sent = [("VOLUME", np.ascontiguousarray(volume, dtype=np.float32), "FP32"),
                ("AFFINE", np.ascontiguousarray(affine, dtype=np.float64), "FP64")]
        if t1 is not None:
            sent.append(("T1", _strings([t1]), "BYTES"))

        def call(client) -> ContextResult:
            inputs = self._infer_inputs(sent)
            res = client.infer("classify_context", inputs,
                               outputs=[g.InferRequestedOutput(n) for n in CONTEXT_OUTPUTS], client_timeout=self.timeout_s)
            keys = [_text(k) for k in res.as_numpy("CLASSES")]
            return ContextResult(dict(zip(keys, (float(p) for p in res.as_numpy("PROBABILITIES")))),
                                 _text(res.as_numpy("CONTEXT").reshape(-1)[0]),
                                 _text(res.as_numpy("CONTEXT_T1").reshape(-1)[0]),
                                 json.loads(_text(res.as_numpy("VERDICT").reshape(-1)[0])))

        return self._with_retries(call)

    def _check_optional_once(self, model: str, inputs: dict, outputs: dict, build_flag: str) -> None:
        """:meth:`_check_optional_model` on every replica, the first time ``model`` is asked for."""
        checked = self.__dict__.setdefault("_optional_checked", set())
        if model in checked:
            return
        for i in range(len(self.clients)):
            self._with_retries(lambda client: self._check_optional_model(client, model, inputs, outputs, build_flag),
                               only=i)
        checked.add(model)

    def _infer_inputs(self, sent: list[tuple[str, np.ndarray, str]]) -> list:
        """Triton InferInputs of (name, array, wire dtype) triples."""
        inputs = []
        for name, arr, wire in sent:
            t = self._grpc.InferInput(name, list(arr.shape), wire)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        return inputs

    def _check_optional_model(self, client, model: str, inputs: dict, outputs: dict, build_flag: str) -> None:
        """``model`` is served and matches this client; one being reloaded (its stub died) is retried."""
        from tritonclient.utils import InferenceServerException

        if not client.is_model_ready(model):
            index = client.get_model_repository_index(as_json=True).get("models", [])
            # loading, unloading or unloaded by the server's watchdog to be loaded again: transient; a model the
            # server never loaded has no state
            if any(m.get("name") == model and (m.get("state") in ("LOADING", "UNLOADING")
                                               or m.get("reason") == "unloaded") for m in index):
                raise InferenceServerException(f"{model} is not ready (reloading)", status="StatusCode.UNAVAILABLE")
            raise ServerMismatchError(f"the server at {self.url} has no {model} model: build the repository "
                                      f"with export/build_engines.py {build_flag}")
        _check_metadata(client.get_model_metadata(model, as_json=True), model, inputs, outputs)

    def _check_prognose(self, client) -> None:
        """prognose is served and matches this client; a prognose being reloaded (its stub died) is retried."""
        self._check_optional_model(client, "prognose", PROGNOSE_INPUTS, PROGNOSE_OUTPUTS,
                                   "--prognosis-checkpoint (a prognosis checkpoint)")

    def _segment_cuda_shm(self, client, volume, affine, modality, t1, targets, extra=()) -> VolumeResult:
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
                client.register_cuda_shared_memory(names[key], cshm.get_raw_handle(handles[key]), dev, size)
                registered.append(names[key])
            res = client.infer("segment_volume",
                                    self._inputs(self._grpc, volume, affine, modality, t1, targets, names["in"], extra),
                                    outputs=self._outputs(self._grpc, names["out"], out_bytes),
                                    client_timeout=self.timeout_s)
            labels = cshm.get_contents_as_numpy(handles["out"], np.uint8, volume.shape).copy()
            return self._result(res, affine, targets, labels)
        finally:
            for name in registered:
                try:
                    client.unregister_cuda_shared_memory(name)
                except Exception:  # noqa: BLE001 - the server may be gone; the region is ours to free
                    pass
            for h in handles.values():
                cshm.destroy_shared_memory_region(h)

    def model_statistics(self, model: str, replica: int = 0) -> dict:
        stats = self.clients[replica].get_inference_statistics(model, as_json=True)
        return stats["model_stats"][0] if stats.get("model_stats") else {}

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSegmentationClient(_Common):
    """asyncio twin of SegmentationClient (plain gRPC; cancelling the awaiting task cancels the call)."""

    def __init__(self, url: str | Sequence[str] = "127.0.0.1:8001", *, timeout_s: float = 600.0,
                 retry_deadline_s: float = 120.0, backoff_s: float = 0.5, max_message_mb: int = 1024,
                 down_s: float = 5.0, observer: Callable[[str, str, float], None] | None = None,
                 max_backoff_s: float = 10.0):
        super().__init__(url, timeout_s=timeout_s, retry_deadline_s=retry_deadline_s, backoff_s=backoff_s,
                         shared_memory="none", max_message_mb=max_message_mb, down_s=down_s, observer=observer,
                         max_backoff_s=max_backoff_s)
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aio

        self._grpc = grpcclient
        self.clients = [aio.InferenceServerClient(u, channel_args=self.channel_args) for u in self.urls]
        self.client = self.clients[0]

    async def check_ready(self, models=EXPECTED_MODELS) -> None:
        for url, client in zip(self.urls, self.clients):
            if not await client.is_server_ready():
                raise ConnectionError(f"Triton at {url} is not ready")
            missing = [m for m in models if not await client.is_model_ready(m)]
            if missing:
                raise ServerMismatchError(f"models not ready on {url}: {missing}")
            _check_metadata(await client.get_model_metadata("segment_volume", as_json=True))

    async def segment_volume(self, volume, affine, modality: str, t1: str, targets, *, instructions: str | None = None,
                             context=None, strict_context: bool = False) -> VolumeResult:
        from tritonclient.utils import InferenceServerException

        extra = instruction_inputs(instructions, context) + ((("STRICT_CONTEXT", True),) if strict_context else ())
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        started, attempt, tried = time.monotonic(), 0, set()
        while True:
            i, was_down = self.replicas.pick(tried)
            t0 = time.monotonic()
            try:
                if was_down and len(self.urls) > 1 and not await self._ready(i):
                    raise InferenceServerException(f"replica {self.urls[i]} is not ready",
                                                   status="StatusCode.UNAVAILABLE")
                res = await self.clients[i].infer("segment_volume",
                                                  self._inputs(self._grpc, volume, affine, modality, t1, targets,
                                                               extra=extra),
                                                  outputs=self._outputs(self._grpc), client_timeout=self.timeout_s)
            except InferenceServerException as exc:
                timeout = self._timeout_error(exc)
                if timeout is not None or not is_transient(exc):
                    self._observe(i, "error", t0)
                    if timeout is not None:
                        raise timeout from None
                    raise
                self._observe(i, "failed", t0)
                now, wait = self._after_failure(i, exc, tried, started, attempt)
                tried.add(i)
                if now:
                    continue
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                attempt += 1
                tried.clear()
            else:
                self.replicas.succeeded(i)
                self._observe(i, "ok", t0)
                return self._result(res, affine, targets)

    async def _ready(self, i: int) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self.clients[i].is_server_ready(client_timeout=2))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def __aenter__(self) -> AsyncSegmentationClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
