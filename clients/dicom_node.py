"""A DICOM node next to the PACS: C-STORE SCP -> durable job queue -> a pool of workers -> Triton -> DICOM SEG -> C-STORE.

    python -m clients dicom-node --config configs/dicom_node.yaml

- **Receive** (pynetdicom Storage SCP + Verification) under a configured AE title and port, from
  calling AE titles on an allow-list only. Each instance is written to the spool (a folder per Series
  Instance UID, a file per SOP Instance UID; temporary file, fsync, rename) and recorded in the job queue
  (one transaction) **before** the C-STORE is acknowledged: an acknowledged instance is never lost.
- **Refuse** what it cannot use with a DIMSE failure status, keeping a copy in the quarantine under a
  node-generated name: 0xC210 (cannot understand: not parseable), 0xA900 (data set does not match the
  SOP class: no pixel data, no geometry, a missing UID, or a Study/Series/SOP Instance UID that breaks
  the UI grammar of PS3.5 9.1, e.g. ``../../x``). Only a valid UID ever becomes part of a path, and
  every path is checked to lie inside the node's workdir.
- **Complete** a series when no instance arrived for ``quiet_period_s``.
- **PET/CT** (``petct: true``): a head-and-neck PET series goes to ``segment_petct`` (PEMMA) together with the CT
  series of its study that shares its Frame of Reference (waiting, as a transient retry, while that CT is still
  arriving); the SEG lies on the CT's grid and references both series. Without such a CT the PET goes alone. The
  CT series is segmented by itself as well, like any CT.
- **Segment** it in one of ``workers`` threads (``clients.dicom_io.read_series`` -> T1 from the header
  or the config -> ``segment_volume`` over gRPC) and **send** the DICOM SEG by C-STORE to the
  destination. Claiming a series is one transaction: two workers never take the same series.
- **Deterministic failures** (unreadable or mixed series, no region or targets, a SEG that cannot be
  written: anything that fails again on the same input) mark the series failed at once and copy its
  files to ``quarantine/<series uid>`` with the reason in ``quarantine/<series uid>.txt``.
  **Transient failures** (Triton unreachable or restarting, a crashed model stub being reloaded, a
  timeout, the PACS refusing the association or the C-STORE) are retried after
  ``retry_backoff_s`` x 2^(attempt-1), capped at ``retry_backoff_max_s``, up to ``max_attempts``
  attempts; then the series is failed and quarantined the same way.
- **Restart-safe, exactly once**: the state of every series lives in the job queue
  (``clients.job_queue``); at start-up a series left 'processing' by a crash goes back to the queue (or
  fails when it has used all its attempts: a series that kills the node does not kill it forever). The
  SEG's UIDs are derived from the source series UID and the model (``clients.dicom_seg.seg_uids``), so a
  SEG re-sent after a crash between "sent" and "recorded" is the same instance at the PACS, not a second one.
- **One node or several**: without ``queue_url`` the queue is ``workdir/queue.sqlite`` and the node is
  alone. With ``queue_url: postgresql://...`` receivers (``workers: 0``), workers (``receive: false``) and
  full nodes in separate processes or machines share one queue and one ``workdir`` (a shared POSIX
  directory with atomic rename, at the same path on every node: see ``clients.job_queue``). A worker holds
  its series under a lease of ``lease_s`` that the node's lease keeper renews every ``lease_s``/3; the
  keeper also moves series whose lease expired (a node died or hung) back to the queue, or fails and
  quarantines them when they used all their attempts.
- **Observable**: with ``metrics_port`` set, ``GET /metrics`` (Prometheus text format, one registry
  per node) and ``GET /healthz`` (200 with a small JSON, naming the queue back-end and the node id, while
  the SCP listens (if the node receives), every worker and the lease keeper are alive (if it has workers)
  and the queue answers; 503 otherwise; the endpoint closes with ``stop()``) on the node's host.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from clients.job_queue import QUEUE_ERRORS, JobQueue, check_queue_url, open_queue

log = logging.getLogger("dicom_node")

# PS3.5 9.1: components of digits separated by '.', no leading zero in a multi-digit component, <= 64 chars.
# fullmatch, not re.match(...$): '$' would also accept a trailing newline.
_UID_GRAMMAR = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# the SEG's Algorithm Identification and the key of its deterministic UIDs (clients.dicom_seg.seg_uids)
MODEL_NAME, MODEL_VERSION = "DuPLUS", "0.1.0"

# a node id names the owner of a lease ('<node id>/worker-<n>'): no '/', nothing a log line would mangle
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")


def default_node_id() -> str:
    """host-pid-random: unique per process, so a restarted node never mistakes another's leases for its own."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def valid_uid(uid: str) -> bool:
    """True when ``uid`` follows DICOM's UI grammar (PS3.5 9.1); only such a UID may name a file or folder."""
    return isinstance(uid, str) and len(uid) <= 64 and _UID_GRAMMAR.fullmatch(uid) is not None


class PacsRefused(ConnectionError):
    """The destination refused the association or the C-STORE (or did not answer): retried later."""


class PartnerPending(TimeoutError):
    """A PET series whose CT of the same acquisition is still arriving (``petct``): retried after the backoff."""


# errno values of a network that may come back; other OSErrors (a missing file, a read-only disk) are not transient
_NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                   errno.ENETDOWN, errno.EHOSTDOWN, errno.ETIMEDOUT, errno.EPIPE}


def is_transient_failure(exc: BaseException) -> bool:
    """True for a failure that may pass if the series is tried again later; False when the same input fails again.

    Transient: Triton unreachable, restarting or reloading a crashed stub (``clients.grpc_client.is_transient``),
    a timeout (``RequestTimeout``, any ``TimeoutError``), the PACS refusing the association or the C-STORE
    (``PacsRefused``), a network OSError. Everything else (an unreadable or mixed series, no region or
    targets, a SEG that cannot be written, an unexpected bug) is deterministic.
    """
    from clients.grpc_client import is_transient

    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError, socket.gaierror)):
        return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    return is_transient(exc)


def _inside(base: Path, path: Path) -> Path:
    """``path``, after checking that it resolves to a place inside ``base`` (no '..', no symlink leaving it)."""
    resolved, root = path.resolve(), base.resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"{path} is outside {base}")
    return path


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "DUPLUS"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: tuple[str, ...] = ()          # empty: refuse everybody
    workdir: Path = Path("dicom_node")                  # spool/, quarantine/, outbox/, queue.sqlite; shared by nodes
    quiet_period_s: float = 10.0
    poll_s: float = 1.0
    triton_url: str | tuple[str, ...] = "127.0.0.1:8001"  # one address, or the replicas' (a YAML list)
    triton_timeout_s: float = 600.0                     # one segment_volume request
    triton_retry_s: float = 10.0                        # the client's own retries of a blip; longer outages requeue
    destination: Destination | None = None
    pacs_timeout_s: float = 60.0                        # association, DIMSE and network timeouts towards the PACS
    targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "CT|abdomen": ("liver", "spleen", "left kidney", "right kidney"),
        "CT|head_neck": ("primary tumour", "lymph node"), "PET|head_neck": ("primary tumour", "lymph node"),
        "MR|abdomen": ("liver", "spleen", "left kidney", "right kidney")})
    t1: str | None = None                               # override the header-derived context prompt
    pet_units: str | None = None                        # "SUV": PET values already SUV; None: SUVbw from the header
    workers: int = 2                                    # series segmented at the same time
    max_attempts: int = 3                               # attempts per series when failures are transient
    retry_backoff_s: float = 30.0                       # wait before the 2nd attempt; doubles for each next one ...
    retry_backoff_max_s: float = 600.0                  # ... up to this
    metrics_port: int | None = None                     # /metrics and /healthz on host:metrics_port; 0/None: off
    queue_url: str | None = None                        # None: workdir/queue.sqlite; sqlite:///path; postgresql://...
    lease_s: float = 120.0                              # a worker's hold on its series, renewed every lease_s/3
    receive: bool = True                                # False: a worker-only node (no C-STORE SCP)
    node_id: str | None = None                          # owner of this node's leases; None: host-pid-random
    instructions: str = "names"                         # "auto": the server's generator writes each target's
    #                                                     instruction from the header (Zeus); "names": the names
    petct: bool = False                                 # a head-and-neck PET series goes to segment_petct (PEMMA)
    #                                                     with its study's CT of the same Frame of Reference
    context_fill: bool = True                           # a header naming no body region: the server's context
    #                                                     classifier (Biomed-DPT) gives the T1; False: such a series fails

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16:
            raise ValueError(f"ae_title must be 1-16 characters, got {self.ae_title!r}")
        if self.quiet_period_s <= 0 or self.poll_s <= 0:
            raise ValueError("quiet_period_s and poll_s must be > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or not 0 <= self.workers <= 64:
            raise ValueError(f"workers must be an integer 0-64, got {self.workers!r}")
        if not isinstance(self.receive, bool):
            raise ValueError(f"receive must be true or false, got {self.receive!r}")
        if not isinstance(self.petct, bool):
            raise ValueError(f"petct must be true or false, got {self.petct!r}")
        if not isinstance(self.context_fill, bool):
            raise ValueError(f"context_fill must be true or false, got {self.context_fill!r}")
        if not self.receive and self.workers == 0:
            raise ValueError("a node that does not receive (receive: false) needs workers > 0, got workers=0")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if self.retry_backoff_s < 0 or self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError(f"retry_backoff_s must be >= 0 and <= retry_backoff_max_s, got "
                             f"retry_backoff_s={self.retry_backoff_s}, retry_backoff_max_s={self.retry_backoff_max_s}")
        for name in ("triton_timeout_s", "pacs_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.triton_retry_s < 0:
            raise ValueError(f"triton_retry_s must be >= 0, got {self.triton_retry_s}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0-65535 (0 or null: off), got {self.metrics_port}")
        if self.pet_units not in (None, "SUV"):
            raise ValueError(f"pet_units must be null (body-weight SUV from the header) or 'SUV', got {self.pet_units!r}")
        if not isinstance(self.lease_s, (int, float)) or isinstance(self.lease_s, bool) or not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s!r}")
        if self.queue_url is not None:
            check_queue_url(self.queue_url)
        from duplus.instructions import INSTRUCTION_MODES

        if self.instructions not in INSTRUCTION_MODES:
            raise ValueError(f"instructions must be one of {INSTRUCTION_MODES}, got {self.instructions!r}")
        if self.node_id is not None and not (isinstance(self.node_id, str) and _NODE_ID.fullmatch(self.node_id)):
            raise ValueError(f"node_id must be 1-64 characters of letters, digits and ._:@- (no '/'), "
                             f"got {self.node_id!r}")
        url = self.triton_url
        if isinstance(url, list):
            url = tuple(url)
        if not (isinstance(url, str) and url) and not (
                isinstance(url, tuple) and url and all(isinstance(u, str) and u for u in url)):
            raise ValueError(f"triton_url must be an address or a non-empty list of addresses, got {self.triton_url!r}")
        object.__setattr__(self, "triton_url", url)
        object.__setattr__(self, "workdir", Path(self.workdir))

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one."""
        return min(self.retry_backoff_s * 2 ** (attempt - 1), self.retry_backoff_max_s)

    @classmethod
    def from_yaml(cls, path: str | Path) -> NodeConfig:
        from duplus.config import read_yaml_config

        raw = read_yaml_config(path, cls)
        if raw.get("destination"):
            raw["destination"] = Destination(**raw["destination"])
        if "allowed_calling_aes" in raw:
            raw["allowed_calling_aes"] = tuple(raw["allowed_calling_aes"])
        if "targets" in raw:
            raw["targets"] = {k: tuple(v) for k, v in raw["targets"].items()}
        if isinstance(raw.get("triton_url"), list):
            raw["triton_url"] = tuple(raw["triton_url"])
        return cls(**raw)


# the transfer syntaxes the node accepts at association: native ones first (preferred), then compressed
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline (Process 1), lossy 8-bit
    "1.2.840.10008.1.2.4.51",   # JPEG Extended (Process 2 & 4), lossy 12-bit
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.5",      # RLE Lossless
]


def _truncated_pixel_data(ds) -> str | None:
    """A reason when native (uncompressed) PixelData is shorter than Rows x Columns x frames x samples x bits."""
    try:
        ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
        if ts is not None and ts.is_compressed:
            return None  # encapsulated: the decoder checks it when the series is read
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                    * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) + 7) // 8
        got = len(ds.PixelData)
    except Exception as exc:  # noqa: BLE001 - a malformed header is a reason too
        return f"cannot check PixelData: {exc}"
    if got < expected:
        return f"truncated PixelData: {got} bytes, {expected} expected for {ds.Rows}x{ds.Columns}"
    return None



def seg_uid_for(series_uid: str) -> str:
    """The SOP Instance UID of the node's SEG of a series (``clients.dicom_seg.seg_uids`` for the node's model)."""
    from clients.dicom_seg import seg_uids

    return seg_uids(series_uid, MODEL_NAME, MODEL_VERSION)[1]


class NodeMetrics:
    """The node's Prometheus metrics, in a registry of its own (several nodes in one process do not clash)."""

    def __init__(self, node: DicomNode):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.instances = Counter("dicom_node_instances_received", "C-STORE requests answered, by outcome",
                                 ["outcome"], registry=r)
        self.series = Counter("dicom_node_series_finished", "Series finished, by status", ["status"], registry=r)
        self.retries = Counter("dicom_node_retries", "Transient failures that sent a series back to the queue",
                               registry=r)
        self.busy = Gauge("dicom_node_busy_workers", "Workers processing a series now", registry=r)
        self.depth = Gauge("dicom_node_queue_depth", "Series receiving, waiting for a retry or processing",
                           registry=r)
        self.depth.set_function(node.queue_depth)
        self.alive = Gauge("dicom_node_workers_alive", "Worker threads alive", registry=r)
        self.alive.set_function(node.workers_alive)
        self.seconds = Histogram("dicom_node_series_seconds", "Seconds per processing attempt of a series",
                                 buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        # per Triton replica: every segment_volume attempt, by outcome (ok; failed: transient, went to another
        # replica or was retried; error: refused)
        self.triton = Counter("dicom_node_triton_requests", "segment_volume attempts per Triton replica, by outcome",
                              ["replica", "outcome"], registry=r)
        self.triton_seconds = Histogram("dicom_node_triton_seconds", "Seconds per segment_volume attempt",
                                        ["replica"], buckets=(0.5, 1, 2, 5, 10, 20, 60, 120, 300, 600), registry=r)
        for outcome in ("stored", "refused"):
            self.instances.labels(outcome)
        for status in ("done", "failed"):
            self.series.labels(status)


class DicomNode:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.node_id = cfg.node_id or default_node_id()
        # absolute: the queue stores each series' folder, and other nodes mount the workdir at the same path
        workdir = cfg.workdir.absolute()
        self.spool = workdir / "spool"
        self.quarantine = workdir / "quarantine"
        self.outbox = workdir / "outbox"
        for d in (self.spool, self.quarantine, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self.queue: JobQueue = open_queue(cfg.queue_url, workdir)
        self.metrics = NodeMetrics(self)
        self.last_error: str | None = None
        self._notes: dict[str, str | None] = {}      # series UID -> what the context classifier said (job record)
        self._stop = threading.Event()
        self._server = None
        self._workers: list[threading.Thread] = []
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._held: dict[str, dict] = {}            # series uid -> {"owner", "lost"}: what this node's workers hold
        self._held_lock = threading.Lock()
        self._http = None

    # ---- receiving --------------------------------------------------------------------------
    def _quarantine(self, data: bytes, reason: str) -> Path:
        path = self.quarantine / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.dcm"   # never a peer-supplied name
        path.write_bytes(data)
        path.with_suffix(".txt").write_text(reason + "\n")
        log.warning("quarantined %s: %s", path.name, reason)
        return path

    def _refuse(self, data: bytes, reason: str, status: int) -> int:
        try:
            self._quarantine(data, reason)
        except OSError as exc:
            log.error("cannot quarantine a refused instance (%s): %s", reason, exc)
        self.metrics.instances.labels("refused").inc()
        return status

    def handle_store(self, event) -> int:
        from pydicom import dcmread
        from pydicom.filebase import DicomBytesIO

        raw = b""
        try:
            raw = event.encoded_dataset(include_meta=True)
            ds = dcmread(DicomBytesIO(raw), force=True)
        except Exception as exc:  # noqa: BLE001 - whatever the peer sent, the node stays up
            return self._refuse(raw, f"cannot parse: {exc}", 0xC210)
        uid_keys = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        missing = [k for k in (*uid_keys, "ImagePositionPatient", "ImageOrientationPatient", "PixelData")
                   if k not in ds]
        if missing:
            return self._refuse(raw, f"missing {missing}", 0xA900)
        # a UID names a folder and a file: only one that follows the UI grammar may (no '../', no letters, <= 64)
        bad = [f"{k}={str(ds[k].value)[:80]!r}" for k in uid_keys if not valid_uid(str(ds[k].value))]
        if bad:
            return self._refuse(raw, f"invalid UID (PS3.5 9.1): {', '.join(bad)}", 0xA900)
        truncated = _truncated_pixel_data(ds)
        if truncated:
            return self._refuse(raw, truncated, 0xA900)
        series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        try:
            folder = _inside(self.spool, self.spool / series_uid)
            folder.mkdir(exist_ok=True)
            final = _inside(folder, folder / f"{sop_uid}.dcm")
            tmp = folder / f".{sop_uid}.{uuid.uuid4().hex[:8]}.part"
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            self.queue.record_instance(sop_uid, series_uid, str(ds.StudyInstanceUID),
                                       event.assoc.requestor.ae_title, folder, final)
        except ValueError as exc:                  # _inside: a path that would leave the spool (a planted symlink)
            return self._refuse(raw, f"unsafe path: {exc}", 0xA900)
        except (OSError, *QUEUE_ERRORS) as exc:   # disk full, read-only spool, queue down: not acknowledged, retry
            log.error("cannot store %s: %s", sop_uid, exc)
            self.last_error = f"store: {exc}"
            self.metrics.instances.labels("refused").inc()
            return 0xA700                       # Refused: Out of Resources
        self.metrics.instances.labels("stored").inc()
        return 0x0000

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> DicomNode:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        requeued, failed = self.queue.recover(self.cfg.max_attempts, self.node_id)
        if requeued:
            log.info("recovered %d series left in processing by a previous run", requeued)
        for job in failed:
            self._failed(job["series_uid"], job["folder"], f"the node stopped during {job['attempts']} attempts")
        if self.cfg.receive:
            ae = AE(ae_title=self.cfg.ae_title)
            # every storage class in the uncompressed syntaxes and in the compressed ones PACS send (JPEG baseline,
            # JPEG lossless, JPEG-LS, JPEG 2000, RLE): pydicom decodes them with the pylibjpeg plugins
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
            ae.add_supported_context(Verification)
            ae.require_calling_aet = list(self.cfg.allowed_calling_aes) or ["\x00NOBODY"]
            self._server = ae.start_server((self.cfg.host, self.cfg.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        self._workers = [threading.Thread(target=self._work, args=(f"{self.node_id}/worker-{i}",),
                                          name=f"dicom-node-worker-{i}", daemon=True)
                         for i in range(self.cfg.workers)]
        for t in self._workers:
            t.start()
        if self._workers:
            self._keeper = threading.Thread(target=self._keep_leases, name="dicom-node-leases", daemon=True)
            self._keeper.start()
        if self.cfg.metrics_port:
            self._start_http()
        log.info("DICOM node %s (%s, queue %r) %s with %d workers", self.cfg.ae_title, self.node_id, self.queue,
                 f"listening on {self.cfg.host}:{self.cfg.port}" if self.cfg.receive else "not receiving",
                 self.cfg.workers)
        return self

    def stop(self) -> None:
        """Stop receiving, let every worker finish its series (up to 60 s each; their leases are renewed
        meanwhile), then stop the lease keeper and close /metrics and /healthz."""
        self._stop.set()                         # from here /healthz answers 503 'stopping'
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + 60
        for t in self._workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s still busy after 60 s; left running as a daemon thread", t.name)
        self._keeper_stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=30)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # ---- health and metrics -----------------------------------------------------------------
    def listening(self) -> bool:
        srv = self._server
        if srv is None or self._stop.is_set():
            return False
        # socketserver sets this event when serve_forever returns (shutdown or a crash of the accept loop)
        shut_down = getattr(srv, "_BaseServer__is_shut_down", None)
        return srv.socket.fileno() != -1 and not (shut_down is not None and shut_down.is_set())

    def workers_alive(self) -> int:
        return sum(t.is_alive() for t in self._workers)

    def keeper_alive(self) -> bool:
        return self._keeper is not None and self._keeper.is_alive()

    def queue_depth(self) -> float:
        """The queue's depth for the gauge; NaN while the queue does not answer (/healthz says why)."""
        try:
            return self.queue.depth()
        except QUEUE_ERRORS:
            return float("nan")

    def health(self) -> tuple[bool, dict]:
        alive, listening = self.workers_alive(), self.listening()
        keeper = self.keeper_alive()
        ok = ((listening or not self.cfg.receive) and alive == self.cfg.workers
              and (keeper or self.cfg.workers == 0))
        status = "stopping" if self._stop.is_set() else "ok" if ok else "unhealthy"
        try:
            depth = self.queue.depth()
        except QUEUE_ERRORS as exc:
            ok, status, depth = False, "unhealthy", None
            self.last_error = f"queue: {exc}"
        return ok, {"status": status, "node_id": self.node_id, "queue": self.queue.backend,
                    "receive": self.cfg.receive, "listening": listening, "workers": self.cfg.workers,
                    "workers_alive": alive, "lease_keeper_alive": keeper, "queue_depth": depth,
                    "last_error": self.last_error}

    def _start_http(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        node = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?")[0]
                if path == "/metrics":
                    code, body, ctype = 200, generate_latest(node.metrics.registry), CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    ok, info = node.health()
                    code, body, ctype = (200 if ok else 503), json.dumps(info).encode(), "application/json"
                else:
                    code, body, ctype = 404, b"not found\n", "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("http: " + fmt, *args)

        self._http = ThreadingHTTPServer((self.cfg.host, self.cfg.metrics_port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="dicom-node-http", daemon=True).start()
        log.info("metrics and health on http://%s:%d/metrics, /healthz", self.cfg.host, self.cfg.metrics_port)

    # ---- processing -------------------------------------------------------------------------
    def _work(self, owner: str) -> None:
        """Claim a complete series as ``owner``, process it under a lease, repeat. ``process`` classifies every
        failure of a series; what escapes it is the queue itself failing (sqlite: disk I/O, full disk;
        PostgreSQL: unreachable): the worker ends and /healthz says 503, so that whoever supervises the node
        restarts it rather than have it spin."""
        name = threading.current_thread().name
        try:
            while not self._stop.is_set():
                job = self.queue.claim(self.cfg.quiet_period_s, owner=owner, lease_s=self.cfg.lease_s)
                if job is None:
                    self._stop.wait(self.cfg.poll_s)
                    continue
                held = {"owner": owner, "lost": False}
                with self._held_lock:
                    self._held[job["series_uid"]] = held
                self.metrics.busy.inc()
                try:
                    self.process(job)
                finally:
                    self.metrics.busy.dec()
                    with self._held_lock:
                        if self._held.get(job["series_uid"]) is held:
                            del self._held[job["series_uid"]]
        except Exception as exc:  # noqa: BLE001 - logged, and visible in /healthz
            self.last_error = f"{name}: queue: {type(exc).__name__}: {exc}"
            log.exception("worker %s stops: the job queue failed", name)

    def _keep_leases(self) -> None:
        """Every lease_s/3: renew the lease of each series this node's workers hold, then move the series whose
        lease expired (on any node) back to the queue, or fail and quarantine those that used all their
        attempts. Runs until the workers stopped; a queue error is logged and tried again at the next beat."""
        interval = self.cfg.lease_s / 3
        while not self._keeper_stop.wait(interval):
            try:
                with self._held_lock:
                    held = [(uid, h) for uid, h in self._held.items() if not h["lost"]]
                for uid, h in held:
                    if not self.queue.heartbeat(uid, h["owner"], self.cfg.lease_s):
                        h["lost"] = True
                        log.warning("series %s: %s lost its lease (it expired and the series went back to the "
                                    "queue); its result will not be recorded", uid, h["owner"])
                requeued, failed = self.queue.requeue_expired(self.cfg.max_attempts)
                if requeued:
                    log.warning("%d series whose worker's lease expired went back to the queue", requeued)
                for job in failed:
                    self._failed(job["series_uid"], job["folder"],
                                 f"its worker's lease expired during {job['attempts']} attempts")
            except Exception as exc:  # noqa: BLE001 - the keeper outlives a queue outage; /healthz shows it
                self.last_error = f"lease keeper: {type(exc).__name__}: {exc}"
                log.error("lease keeper: %s: %s", type(exc).__name__, exc)

    def process(self, job: dict) -> None:
        uid, attempt, owner, started = job["series_uid"], job["attempts"], job["owner"], time.monotonic()
        try:
            seg_path = self.outbox / f"{uid}.seg.dcm"
            if attempt > 1 and seg_path.exists() and seg_path.stat().st_mtime > job.get("last_received", 0):
                seg_uid = seg_uid_for(uid)       # an earlier attempt segmented the same instances: only send again
                log.info("series %s: attempt %d re-sends the SEG already written", uid, attempt)
            else:
                # a row written by another node: its folder must be in this node's spool (the same shared path)
                folder = _inside(self.spool, Path(job["folder"]))
                seg_path, seg_uid = self.segment_series(folder, uid)
            self.send(seg_path)
        except Exception as exc:  # noqa: BLE001 - every failure is classified: retried later or failed for good
            self._notes.pop(uid, None)
            reason = f"{type(exc).__name__}: {exc}"
            self.last_error = f"series {uid}: {reason}"
            if is_transient_failure(exc) and attempt < self.cfg.max_attempts:
                wait = self.cfg.backoff_s(attempt)
                if self.queue.finish(uid, "receiving", owner=owner, error=reason, retry_in_s=wait):
                    self.metrics.retries.inc()
                    log.warning("series %s: attempt %d/%d failed (%s); transient, retry in %.1f s", uid, attempt,
                                self.cfg.max_attempts, reason, wait)
                else:
                    self._lost(uid, owner, f"attempt {attempt} failed ({reason})")
            else:
                kind = "transient, no attempts left" if is_transient_failure(exc) else "deterministic"
                self._fail(job, f"{reason} ({kind}, attempt {attempt}/{self.cfg.max_attempts})")
        else:
            if self.queue.finish(uid, "done", owner=owner, seg_uid=seg_uid, note=self._notes.pop(uid, None)):
                self.metrics.series.labels("done").inc()
                log.info("series %s: SEG %s sent", uid, seg_uid)
            else:
                self._lost(uid, owner, f"SEG {seg_uid} sent")
        finally:
            self.metrics.seconds.observe(time.monotonic() - started)

    @staticmethod
    def _lost(uid: str, owner: str, what: str) -> None:
        # the SEG it may have sent is harmless: same UIDs as the new owner's, one instance at the PACS
        log.warning("series %s: %s, but %s no longer holds it (its lease expired and the series was requeued "
                    "or re-claimed): the outcome is not recorded", uid, what, owner)

    def _fail(self, job: dict, reason: str) -> None:
        """Record ``job``'s attempt as failed (if its worker still holds it), then quarantine it."""
        if not self.queue.finish(job["series_uid"], "failed", owner=job["owner"], error=reason):
            self._lost(job["series_uid"], job["owner"], f"failed ({reason})")
            return
        self._failed(job["series_uid"], job["folder"], reason)

    def _failed(self, uid: str, folder: str | Path, reason: str) -> None:
        """A series the queue records as failed: count, log, and copy its files to quarantine/<uid> (a new name
        if that exists) with the reason beside."""
        self.metrics.series.labels("failed").inc()
        self.last_error = f"series {uid}: {reason}"
        log.error("series %s failed: %s", uid, reason)
        try:
            target = _inside(self.quarantine, self.quarantine / uid)
            if target.exists():
                target = _inside(self.quarantine, self.quarantine / f"{uid}.{time.time_ns()}")
            source = Path(folder)
            if source.is_dir():
                shutil.copytree(_inside(self.spool, source), target, ignore=shutil.ignore_patterns("*.part"))
            else:
                target.mkdir()
            target.with_name(target.name + ".txt").write_text(reason + "\n")
        except (OSError, ValueError) as exc:
            log.error("series %s: cannot quarantine its files: %s", uid, exc)

    def segment_series(self, folder: Path, series_uid: str) -> tuple[Path, str]:
        """Segment one series and write its SEG to the outbox. The T1 comes from the header (or the configured
        ``t1``); a header that names no region gets the context classifier's (``context_fill``), and a T1 that the
        server's guard finds contradicting the image is logged; both are noted in the job's record."""
        from clients.dicom_io import read_series
        from clients.dicom_seg import (
            contradiction_note,
            derive_region,
            header_modality,
            seg_uids,
            t1_for_series,
            write_seg,
        )
        from clients.grpc_client import SegmentationClient

        series = read_series(folder, series_uid, pet_units=self.cfg.pet_units)
        head = series.datasets[0]
        with SegmentationClient(self.cfg.triton_url, observer=self._observe, timeout_s=self.cfg.triton_timeout_s,
                                retry_deadline_s=self.cfg.triton_retry_s) as client:
            if self.cfg.t1:
                from duplus.context.guard import t1_region

                t1, modality, note = self.cfg.t1, header_modality(head), None
                key = f"{modality}|{t1_region(t1) or derive_region(head)}"
            else:
                ctx = t1_for_series(head, (lambda: client.classify_context(series.volume, series.affine))
                                    if self.cfg.context_fill else None)
                t1, modality, note = ctx.t1, ctx.modality, ctx.note
                key = f"{modality}|{ctx.region}"
            if self.cfg.petct and key == "PET|head_neck":
                return self.segment_petct_series(series)
            if key not in self.cfg.targets:
                raise ValueError(f"no targets configured for {key} (T1 {t1!r})")
            targets = list(self.cfg.targets[key])
            instructions, context = None, None
            if self.cfg.instructions == "auto":       # the server's generator writes them from the header's fields
                from duplus.instructions import ImageContext

                instructions, context = "auto", ImageContext.from_dicom(head).request_fields()
            res = client.segment_volume(series.volume, series.affine, modality, t1, targets,
                                        instructions=instructions, context=context)
            if instructions:
                for target, text in zip(res.resolved, res.conditioned_by):
                    log.info("series %s: %s conditioned by %r", series_uid, target, text)
        contradiction = contradiction_note(t1, res.context_verdict)
        if contradiction:
            log.warning("series %s: %s", series_uid, contradiction)
        self._notes[series_uid] = "; ".join(n for n in (note, contradiction) if n) or None
        _, seg_uid = seg_uids(series_uid, MODEL_NAME, MODEL_VERSION)
        path = _inside(self.outbox, self.outbox / f"{series_uid}.seg.dcm")
        tmp = self.outbox / f".{series_uid}.{uuid.uuid4().hex[:8]}.part"
        write_seg(series, res.labels, targets, list(res.resolved), tmp, model_name=MODEL_NAME,
                  model_version=MODEL_VERSION, sop_instance_uid=seg_uid)
        os.replace(tmp, path)                    # a SEG in the outbox is always whole: a retry may re-send it as is
        return path, seg_uid

    def _observe(self, replica: str, outcome: str, seconds: float) -> None:
        """The client's per-replica outcome and latency, into the node's metrics."""
        self.metrics.triton.labels(replica, outcome).inc()
        self.metrics.triton_seconds.labels(replica).observe(seconds)

    def _petct_partner(self, pet) -> tuple[Path, str] | None:
        """(spool folder, series UID) of the CT series of ``pet``'s study that shares its Frame of Reference (one
        PET/CT acquisition), or None; ``PartnerPending`` while that CT is inside its quiet period."""
        import pydicom

        head = pet.datasets[0]
        study, frame = str(head.StudyInstanceUID), str(head.get("FrameOfReferenceUID", ""))
        if not frame:
            return None
        for row in self.queue.series():
            if row["study_uid"] != study or row["series_uid"] == pet.series_uid:
                continue
            folder = _inside(self.spool, Path(row["folder"]))
            first = next(iter(sorted(folder.glob("*.dcm"))), None)
            if first is None:
                continue
            ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["Modality", "FrameOfReferenceUID"])
            if ds.get("Modality") != "CT" or str(ds.get("FrameOfReferenceUID", "")) != frame:
                continue
            if time.time() - float(row["last_received"]) < self.cfg.quiet_period_s:
                raise PartnerPending(f"the CT series {row['series_uid']} of this PET/CT is still arriving")
            return folder, str(row["series_uid"])
        return None

    def segment_petct_series(self, pet) -> tuple[Path, str]:
        """``petct``: a head-and-neck PET series and its study's CT of the same Frame of Reference through
        ``segment_petct`` (PEMMA): a SEG on the CT's grid referencing both series; without such a CT, the PET alone
        (a SEG on its own grid).  The CT series is also segmented by itself, as any CT."""
        from clients.dicom_io import read_series
        from clients.dicom_seg import write_seg
        from clients.grpc_client import SegmentationClient

        partner = self._petct_partner(pet)
        ct = read_series(partner[0], partner[1]) if partner else None
        with SegmentationClient(self.cfg.triton_url, observer=self._observe, timeout_s=self.cfg.triton_timeout_s,
                                retry_deadline_s=self.cfg.triton_retry_s) as client:
            res = client.segment_petct(ct.volume if ct else None, ct.affine if ct else None, pet.volume, pet.affine)
        log.info("series %s: PET/CT (%s)%s", pet.series_uid, res.mode, f" with CT series {ct.series_uid}" if ct else "")
        seg_uid = seg_uid_for(pet.series_uid)
        path = _inside(self.outbox, self.outbox / f"{pet.series_uid}.seg.dcm")
        tmp = self.outbox / f".{pet.series_uid}.{uuid.uuid4().hex[:8]}.part"
        targets = list(res.label_names[1:])
        write_seg(ct or pet, res.labels, targets, targets, tmp, model_name="PEMMA", model_version=MODEL_VERSION,
                  sop_instance_uid=seg_uid, further_series=pet if ct else None)
        os.replace(tmp, path)
        return path, seg_uid

    def send(self, path: Path) -> None:
        from pydicom import dcmread
        from pynetdicom import AE
        from pynetdicom.sop_class import SegmentationStorage

        dest = self.cfg.destination
        if dest is None:
            log.info("no destination configured: SEG kept in %s", path)
            return
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.pacs_timeout_s
        ae.add_requested_context(SegmentationStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            raise PacsRefused(f"cannot associate with {dest.ae_title}@{dest.host}:{dest.port}")
        if not assoc.accepted_contexts:
            assoc.release()
            raise PacsRefused(f"{dest.ae_title} accepts no Segmentation Storage context")
        try:
            status = assoc.send_c_store(dcmread(path))
        finally:
            assoc.release()
        # 0xB000, 0xB006, 0xB007: stored with a warning (coercion, elements discarded): a success for C-STORE
        if not status or status.Status not in (0x0000, 0xB000, 0xB006, 0xB007):
            raise PacsRefused(f"{dest.ae_title} refused the SEG: status {getattr(status, 'Status', None)}")
