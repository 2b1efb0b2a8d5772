"""A DICOM node next to the PACS: C-STORE SCP -> durable job queue -> a pool of workers -> Triton -> DICOM SEG -> C-STORE.

    python -m clients dicom-node --config configs/dicom_node.yaml

- **Receive** (pynetdicom Storage SCP + Verification) under a configured AE title and port, from
  calling AE titles on an allow-list only. Each instance is written to the spool (temporary file,
  fsync, rename) and recorded in the sqlite job queue (WAL, one transaction) **before** the C-STORE
  is acknowledged: an acknowledged instance is never lost.
- **Refuse** what it cannot use with a DIMSE failure status, keeping a copy in the quarantine under a
  node-generated name: 0xC210 (cannot understand: not parseable), 0xA900 (data set does not match the
  SOP class: no pixel data, no geometry, a missing UID, or a Study/Series/SOP Instance UID that breaks
  the UI grammar of PS3.5 9.1, e.g. ``../../x``). Only a valid UID ever becomes part of a path, and
  every path is checked to lie inside the node's workdir.
- **Complete** a series when no instance arrived for ``quiet_period_s``.
- **Segment** it in one of ``workers`` threads (``clients.dicom_io.read_series`` -> T1 from the header
  or the config -> ``segment_volume`` over gRPC) and **send** the DICOM SEG by C-STORE to the
  destination. Claiming a series is one sqlite transaction: two workers never take the same series.
- **Deterministic failures** (unreadable or mixed series, no region or targets, a SEG that cannot be
  written: anything that fails again on the same input) mark the series failed at once and copy its
  files to ``quarantine/<series uid>`` with the reason in ``quarantine/<series uid>.txt``.
  **Transient failures** (Triton unreachable or restarting, a crashed model stub being reloaded, a
  timeout, the PACS refusing the association or the C-STORE) are retried after
  ``retry_backoff_s`` x 2^(attempt-1), capped at ``retry_backoff_max_s``, up to ``max_attempts``
  attempts; then the series is failed and quarantined the same way.
- **Restart-safe, exactly once**: the state of every series lives in sqlite; at start-up a series
  left 'processing' by a crash goes back to the queue (or fails when it has used all its attempts:
  a series that kills the node does not kill it forever). The SEG's UIDs are derived from the source
  series UID and the model (``clients.dicom_seg.seg_uids``), so a SEG re-sent after a crash between
  "sent" and "recorded" is the same instance at the PACS, not a second one.
- **Observable**: with ``metrics_port`` set, ``GET /metrics`` (Prometheus text format, one registry
  per node) and ``GET /healthz`` (200 with a small JSON while the SCP listens and every worker is
  alive, 503 otherwise; the endpoint closes with ``stop()``) on the node's host.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dicom_node")

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT, calling_ae TEXT, folder TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'receiving',          -- receiving | processing | done | failed
    instances INTEGER NOT NULL DEFAULT 0, last_received REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    seg_uid TEXT, error TEXT, updated REAL, next_attempt REAL);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, path TEXT NOT NULL, received REAL NOT NULL);
"""
# columns added after the first release: (name, declaration), added to an existing queue.sqlite at open
MIGRATIONS = (("next_attempt", "REAL"),)

# PS3.5 9.1: components of digits separated by '.', no leading zero in a multi-digit component, <= 64 chars.
# fullmatch, not re.match(...$): '$' would also accept a trailing newline.
_UID_GRAMMAR = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

# the SEG's Algorithm Identification and the key of its deterministic UIDs (clients.dicom_seg.seg_uids)
MODEL_NAME, MODEL_VERSION = "DuPLUS", "0.1.0"


def valid_uid(uid: str) -> bool:
    """True when ``uid`` follows DICOM's UI grammar (PS3.5 9.1); only such a UID may name a file or folder."""
    return isinstance(uid, str) and len(uid) <= 64 and _UID_GRAMMAR.fullmatch(uid) is not None


class PacsRefused(ConnectionError):
    """The destination refused the association or the C-STORE (or did not answer): retried later."""


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
    workdir: Path = Path("dicom_node")                  # spool/, quarantine/, outbox/, queue.sqlite
    quiet_period_s: float = 10.0
    poll_s: float = 1.0
    triton_url: str = "127.0.0.1:8001"
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

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16:
            raise ValueError(f"ae_title must be 1-16 characters, got {self.ae_title!r}")
        if self.quiet_period_s <= 0 or self.poll_s <= 0:
            raise ValueError("quiet_period_s and poll_s must be > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be an integer 1-64, got {self.workers!r}")
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
        return cls(**raw)


class JobQueue:
    """The durable state: one sqlite file in WAL mode; every method is one transaction."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(series)")}
        for name, decl in MIGRATIONS:                     # a queue.sqlite written by an older node
            if name not in have:
                self.db.execute(f"ALTER TABLE series ADD COLUMN {name} {decl}")
                log.info("queue %s: added column series.%s", path, name)

    def record_instance(self, sop_uid, series_uid, study_uid, calling_ae, folder, path) -> None:
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                new = self.db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?)",
                                      (sop_uid, series_uid, str(path), now)).rowcount
                # a finished series that receives new instances is a new job: fresh attempts, no pending backoff
                self.db.execute(
                    "INSERT INTO series (series_uid, study_uid, calling_ae, folder, instances, last_received, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(series_uid) DO UPDATE SET "
                    "instances = instances + excluded.instances, last_received = excluded.last_received, "
                    "updated = excluded.updated, "
                    "attempts = CASE WHEN status IN ('done', 'failed') AND excluded.instances > 0 THEN 0 "
                    "ELSE attempts END, "
                    "next_attempt = CASE WHEN status IN ('done', 'failed') AND excluded.instances > 0 THEN NULL "
                    "ELSE next_attempt END, "
                    "status = CASE WHEN status IN ('done', 'failed') AND excluded.instances > 0 THEN 'receiving' "
                    "ELSE status END",
                    (series_uid, study_uid, calling_ae, str(folder), new, now, now))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def recover(self, max_attempts: int) -> tuple[int, list[dict]]:
        """Series a crash left 'processing' go back to the queue, or fail when they used all their attempts.

        Returns (series requeued, [{series_uid, folder, attempts}] of those failed)."""
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            failed = [dict(zip(("series_uid", "folder", "attempts"), r)) for r in self.db.execute(
                "SELECT series_uid, folder, attempts FROM series WHERE status = 'processing' AND attempts >= ?",
                (max_attempts,)).fetchall()]
            self.db.execute("UPDATE series SET status = 'failed', updated = ?, error = 'the node stopped during ' "
                            "|| attempts || ' attempts' WHERE status = 'processing' AND attempts >= ?",
                            (now, max_attempts))
            requeued = self.db.execute("UPDATE series SET status = 'receiving', updated = ? "
                                       "WHERE status = 'processing'", (now,)).rowcount
            self.db.execute("COMMIT")
        return requeued, failed

    def claim_complete(self, quiet_period_s: float) -> dict | None:
        """The oldest series that is complete (quiet) and due (its backoff passed), now 'processing'; or None."""
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute(
                    "SELECT series_uid, folder, attempts, last_received FROM series WHERE status = 'receiving' "
                    "AND last_received < ? AND (next_attempt IS NULL OR next_attempt <= ?) "
                    "ORDER BY COALESCE(next_attempt, last_received) LIMIT 1", (now - quiet_period_s, now)).fetchone()
                if row:
                    self.db.execute("UPDATE series SET status = 'processing', attempts = attempts + 1, updated = ? "
                                    "WHERE series_uid = ?", (now, row[0]))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        if row is None:
            return None
        return {"series_uid": row[0], "folder": row[1], "attempts": row[2] + 1, "last_received": row[3]}

    def finish(self, series_uid: str, status: str, *, seg_uid: str | None = None, error: str | None = None,
               next_attempt: float | None = None) -> None:
        with self._lock:
            self.db.execute("UPDATE series SET status = ?, seg_uid = ?, error = ?, next_attempt = ?, updated = ? "
                            "WHERE series_uid = ?", (status, seg_uid, error, next_attempt, time.time(), series_uid))

    def depth(self) -> int:
        """Series not finished: receiving (including those waiting for a retry) or processing."""
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM series WHERE status IN ('receiving', 'processing')"
                                   ).fetchone()[0]

    def series(self) -> list[dict]:
        with self._lock:
            cur = self.db.execute("SELECT * FROM series ORDER BY last_received")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self.db.close()


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
        self.depth.set_function(node.queue.depth)
        self.alive = Gauge("dicom_node_workers_alive", "Worker threads alive", registry=r)
        self.alive.set_function(node.workers_alive)
        self.seconds = Histogram("dicom_node_series_seconds", "Seconds per processing attempt of a series",
                                 buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        for outcome in ("stored", "refused"):
            self.instances.labels(outcome)
        for status in ("done", "failed"):
            self.series.labels(status)


class DicomNode:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.spool = cfg.workdir / "spool"
        self.quarantine = cfg.workdir / "quarantine"
        self.outbox = cfg.workdir / "outbox"
        for d in (self.spool, self.quarantine, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self.queue = JobQueue(cfg.workdir / "queue.sqlite")
        self.metrics = NodeMetrics(self)
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._server = None
        self._workers: list[threading.Thread] = []
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
        except (OSError, sqlite3.Error) as exc:   # disk full, read-only spool: not acknowledged, the peer may retry
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

        requeued, failed = self.queue.recover(self.cfg.max_attempts)
        if requeued:
            log.info("recovered %d series left in processing by a previous run", requeued)
        for job in failed:
            self._fail(job["series_uid"], job["folder"], f"the node stopped during {job['attempts']} attempts")
        ae = AE(ae_title=self.cfg.ae_title)
        # every storage class in the uncompressed syntaxes and in the compressed ones PACS send (JPEG baseline,
        # JPEG lossless, JPEG-LS, JPEG 2000, RLE): pydicom decodes them with the pylibjpeg plugins
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.cfg.allowed_calling_aes) or ["\x00NOBODY"]
        self._server = ae.start_server((self.cfg.host, self.cfg.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        self._workers = [threading.Thread(target=self._work, name=f"dicom-node-worker-{i}", daemon=True)
                         for i in range(self.cfg.workers)]
        for t in self._workers:
            t.start()
        if self.cfg.metrics_port:
            self._start_http()
        log.info("DICOM node %s listening on %s:%d with %d workers", self.cfg.ae_title, self.cfg.host,
                 self.cfg.port, self.cfg.workers)
        return self

    def stop(self) -> None:
        """Stop receiving, let every worker finish its series (up to 60 s each), then close /metrics and /healthz."""
        self._stop.set()                         # from here /healthz answers 503 'stopping'
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + 60
        for t in self._workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s still busy after 60 s; left running as a daemon thread", t.name)
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

    def health(self) -> tuple[bool, dict]:
        alive, listening = self.workers_alive(), self.listening()
        ok = listening and alive == self.cfg.workers
        status = "stopping" if self._stop.is_set() else "ok" if ok else "unhealthy"
        try:
            depth = self.queue.depth()
        except sqlite3.Error as exc:
            ok, status, depth = False, "unhealthy", None
            self.last_error = f"queue: {exc}"
        return ok, {"status": status, "listening": listening, "workers": self.cfg.workers, "workers_alive": alive,
                    "queue_depth": depth, "last_error": self.last_error}

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
    def _work(self) -> None:
        """Claim a complete series, process it, repeat. ``process`` classifies every failure of a series; what
        escapes it is the queue itself failing (sqlite: disk I/O, full disk): the worker ends and /healthz says 503,
        so that whoever supervises the node restarts it rather than have it spin."""
        name = threading.current_thread().name
        try:
            while not self._stop.is_set():
                job = self.queue.claim_complete(self.cfg.quiet_period_s)
                if job is None:
                    self._stop.wait(self.cfg.poll_s)
                    continue
                self.metrics.busy.inc()
                try:
                    self.process(job)
                finally:
                    self.metrics.busy.dec()
        except Exception as exc:  # noqa: BLE001 - logged, and visible in /healthz
            self.last_error = f"{name}: queue: {type(exc).__name__}: {exc}"
            log.exception("worker %s stops: the job queue failed", name)

    def process(self, job: dict) -> None:
        uid, attempt, started = job["series_uid"], job["attempts"], time.monotonic()
        try:
            seg_path = self.outbox / f"{uid}.seg.dcm"
            if attempt > 1 and seg_path.exists() and seg_path.stat().st_mtime > job.get("last_received", 0):
                seg_uid = seg_uid_for(uid)       # an earlier attempt segmented the same instances: only send again
                log.info("series %s: attempt %d re-sends the SEG already written", uid, attempt)
            else:
                seg_path, seg_uid = self.segment_series(Path(job["folder"]), uid)
            self.send(seg_path)
        except Exception as exc:  # noqa: BLE001 - every failure is classified: retried later or failed for good
            reason = f"{type(exc).__name__}: {exc}"
            self.last_error = f"series {uid}: {reason}"
            if is_transient_failure(exc) and attempt < self.cfg.max_attempts:
                wait = self.cfg.backoff_s(attempt)
                self.queue.finish(uid, "receiving", error=reason, next_attempt=time.time() + wait)
                self.metrics.retries.inc()
                log.warning("series %s: attempt %d/%d failed (%s); transient, retry in %.1f s", uid, attempt,
                            self.cfg.max_attempts, reason, wait)
            else:
                kind = "transient, no attempts left" if is_transient_failure(exc) else "deterministic"
                self._fail(uid, job["folder"], f"{reason} ({kind}, attempt {attempt}/{self.cfg.max_attempts})")
        else:
            self.queue.finish(uid, "done", seg_uid=seg_uid)
            self.metrics.series.labels("done").inc()
            log.info("series %s: SEG %s sent", uid, seg_uid)
        finally:
            self.metrics.seconds.observe(time.monotonic() - started)

    def _fail(self, uid: str, folder: str | Path, reason: str) -> None:
        """Mark the series failed and copy its files to quarantine/<uid> (a new name if that exists), reason beside."""
        self.queue.finish(uid, "failed", error=reason)
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
        from clients.dicom_io import read_series
        from clients.dicom_seg import derive_region, derive_t1, seg_uids, write_seg
        from clients.grpc_client import SegmentationClient

        series = read_series(folder, series_uid, pet_units=self.cfg.pet_units)
        t1, modality, _ = derive_t1(series.datasets[0])
        t1 = self.cfg.t1 or t1
        key = f"{modality}|{derive_region(series.datasets[0])}"
        if key not in self.cfg.targets:
            raise ValueError(f"no targets configured for {key} (T1 {t1!r})")
        targets = list(self.cfg.targets[key])
        with SegmentationClient(self.cfg.triton_url, timeout_s=self.cfg.triton_timeout_s,
                                retry_deadline_s=self.cfg.triton_retry_s) as client:
            res = client.segment_volume(series.volume, series.affine, modality, t1, targets)
        _, seg_uid = seg_uids(series_uid, MODEL_NAME, MODEL_VERSION)
        path = _inside(self.outbox, self.outbox / f"{series_uid}.seg.dcm")
        tmp = self.outbox / f".{series_uid}.{uuid.uuid4().hex[:8]}.part"
        write_seg(series, res.labels, targets, list(res.resolved), tmp, model_name=MODEL_NAME,
                  model_version=MODEL_VERSION, sop_instance_uid=seg_uid)
        os.replace(tmp, path)                    # a SEG in the outbox is always whole: a retry may re-send it as is
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
