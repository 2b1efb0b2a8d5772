"""A DICOM node next to the PACS: C-STORE SCP -> durable job queue -> Triton -> DICOM SEG -> C-STORE.

    python -m clients dicom-node --config configs/dicom_node.yaml

- **Receive** (pynetdicom Storage SCP + Verification) under a configured AE title and port, from
  calling AE titles on an allow-list only. Each instance is written to the spool (temporary file,
  fsync, rename) and recorded in the sqlite job queue (WAL, one transaction) **before** the C-STORE
  is acknowledged: an acknowledged instance is never lost.
- **Refuse** what it cannot use with a DIMSE failure status, keeping a copy in the quarantine:
  0xC210 (cannot understand: not parseable), 0xA900 (no pixel data / no geometry / no UIDs).
- **Complete** a series when no instance arrived for ``quiet_period_s``.
- **Segment** it (``clients.dicom_io.read_series`` -> T1 from the header or the config ->
  ``segment_volume`` over gRPC with retries) and **send** the DICOM SEG by C-STORE to the
  destination. A series that cannot be segmented (missing slice, mixed orientations, ...) is
  marked failed with the reason and its files are quarantined.
- **Restart-safe, exactly once**: the state of every series lives in sqlite; at start-up a series
  left 'processing' by a crash goes back to the queue. The SEG's SOP Instance UID is derived from
  the source series UID, so a SEG re-sent after a crash between "sent" and "recorded" is the same
  instance at the PACS, not a second one.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dicom_node")

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT, calling_ae TEXT, folder TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'receiving',          -- receiving | processing | done | failed
    instances INTEGER NOT NULL DEFAULT 0, last_received REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    seg_uid TEXT, error TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, path TEXT NOT NULL, received REAL NOT NULL);
"""


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
    destination: Destination | None = None
    targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "CT|abdomen": ("liver", "spleen", "left kidney", "right kidney"),
        "CT|head_neck": ("primary tumour", "lymph node"), "PET|head_neck": ("primary tumour", "lymph node"),
        "MR|abdomen": ("liver", "spleen", "left kidney", "right kidney")})
    t1: str | None = None                               # override the header-derived context prompt
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16:
            raise ValueError(f"ae_title must be 1-16 characters, got {self.ae_title!r}")
        if self.quiet_period_s <= 0 or self.poll_s <= 0:
            raise ValueError("quiet_period_s and poll_s must be > 0")
        object.__setattr__(self, "workdir", Path(self.workdir))

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

    def record_instance(self, sop_uid, series_uid, study_uid, calling_ae, folder, path) -> None:
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                new = self.db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?)",
                                      (sop_uid, series_uid, str(path), now)).rowcount
                self.db.execute(
                    "INSERT INTO series (series_uid, study_uid, calling_ae, folder, instances, last_received, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(series_uid) DO UPDATE SET "
                    "instances = instances + excluded.instances, last_received = excluded.last_received, "
                    "updated = excluded.updated, "
                    "status = CASE WHEN status IN ('done', 'failed') AND excluded.instances > 0 THEN 'receiving' "
                    "ELSE status END",
                    (series_uid, study_uid, calling_ae, str(folder), new, now, now))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def recover(self) -> int:
        """Series a crash left 'processing' go back to the queue."""
        with self._lock:
            return self.db.execute("UPDATE series SET status = 'receiving' WHERE status = 'processing'").rowcount

    def claim_complete(self, quiet_period_s: float) -> dict | None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute(
                "SELECT series_uid, folder, attempts FROM series WHERE status = 'receiving' AND last_received < ? "
                "ORDER BY last_received LIMIT 1", (time.time() - quiet_period_s,)).fetchone()
            if row:
                self.db.execute("UPDATE series SET status = 'processing', attempts = attempts + 1, updated = ? "
                                "WHERE series_uid = ?", (time.time(), row[0]))
            self.db.execute("COMMIT")
        return {"series_uid": row[0], "folder": row[1], "attempts": row[2] + 1} if row else None

    def finish(self, series_uid: str, status: str, *, seg_uid: str | None = None, error: str | None = None) -> None:
        with self._lock:
            self.db.execute("UPDATE series SET status = ?, seg_uid = ?, error = ?, updated = ? WHERE series_uid = ?",
                            (status, seg_uid, error, time.time(), series_uid))

    def series(self) -> list[dict]:
        with self._lock:
            cur = self.db.execute("SELECT * FROM series ORDER BY last_received")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]


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
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["duplus-seg", series_uid])


class DicomNode:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.spool = cfg.workdir / "spool"
        self.quarantine = cfg.workdir / "quarantine"
        self.outbox = cfg.workdir / "outbox"
        for d in (self.spool, self.quarantine, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self.queue = JobQueue(cfg.workdir / "queue.sqlite")
        self._stop = threading.Event()
        self._server = None
        self._worker: threading.Thread | None = None

    # ---- receiving --------------------------------------------------------------------------
    def _quarantine(self, data: bytes, reason: str) -> Path:
        path = self.quarantine / f"{time.time_ns()}.dcm"
        path.write_bytes(data)
        path.with_suffix(".txt").write_text(reason + "\n")
        log.warning("quarantined %s: %s", path.name, reason)
        return path

    def handle_store(self, event) -> int:
        from pydicom import dcmread
        from pydicom.filebase import DicomBytesIO

        raw = b""
        try:
            raw = event.encoded_dataset(include_meta=True)
            ds = dcmread(DicomBytesIO(raw), force=True)
        except Exception as exc:  # noqa: BLE001 - whatever the peer sent, the node stays up
            self._quarantine(raw, f"cannot parse: {exc}")
            return 0xC210
        missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
                               "ImageOrientationPatient", "PixelData") if k not in ds]
        if missing:
            self._quarantine(raw, f"missing {missing}")
            return 0xA900
        truncated = _truncated_pixel_data(ds)
        if truncated:
            self._quarantine(raw, truncated)
            return 0xA900
        series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        folder = self.spool / series_uid
        folder.mkdir(exist_ok=True)
        final = folder / f"{sop_uid}.dcm"
        tmp = folder / f".{sop_uid}.part"
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.queue.record_instance(sop_uid, series_uid, str(ds.get("StudyInstanceUID", "")),
                                   event.assoc.requestor.ae_title, folder, final)
        return 0x0000

    def start(self) -> DicomNode:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        recovered = self.queue.recover()
        if recovered:
            log.info("recovered %d series left in processing by a previous run", recovered)
        ae = AE(ae_title=self.cfg.ae_title)
        # every storage class in the uncompressed syntaxes and in the compressed ones PACS send (JPEG baseline,
        # JPEG lossless, JPEG-LS, JPEG 2000, RLE): pydicom decodes them with the pylibjpeg plugins
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.cfg.allowed_calling_aes) or ["\x00NOBODY"]
        self._server = ae.start_server((self.cfg.host, self.cfg.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        self._worker = threading.Thread(target=self._work, name="dicom-node-worker", daemon=True)
        self._worker.start()
        log.info("DICOM node %s listening on %s:%d", self.cfg.ae_title, self.cfg.host, self.cfg.port)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._worker is not None:
            self._worker.join(timeout=60)

    # ---- processing -------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            job = self.queue.claim_complete(self.cfg.quiet_period_s)
            if job is None:
                self._stop.wait(self.cfg.poll_s)
                continue
            self.process(job)

    def process(self, job: dict) -> None:
        from clients.dicom_io import DicomSeriesError

        uid = job["series_uid"]
        try:
            seg_path, seg_uid = self.segment_series(Path(job["folder"]), uid)
            self.send(seg_path)
            self.queue.finish(uid, "done", seg_uid=seg_uid)
            log.info("series %s: SEG %s sent", uid, seg_uid)
        except (DicomSeriesError, ValueError) as exc:
            self.queue.finish(uid, "failed", error=str(exc))
            target = self.quarantine / uid
            if Path(job["folder"]).exists() and not target.exists():
                shutil.copytree(job["folder"], target)
            log.error("series %s failed: %s", uid, exc)
        except Exception as exc:  # noqa: BLE001 - server or PACS down: retry later, up to max_attempts
            status = "receiving" if job["attempts"] < self.cfg.max_attempts else "failed"
            self.queue.finish(uid, status, error=f"{type(exc).__name__}: {exc}")
            log.error("series %s: attempt %d failed (%s); %s", uid, job["attempts"], exc,
                      "will retry" if status == "receiving" else "giving up")

    def segment_series(self, folder: Path, series_uid: str) -> tuple[Path, str]:
        from clients.dicom_io import read_series
        from clients.dicom_seg import derive_region, derive_t1, write_seg
        from clients.grpc_client import SegmentationClient

        series = read_series(folder, series_uid)
        t1, modality, _ = derive_t1(series.datasets[0])
        t1 = self.cfg.t1 or t1
        key = f"{modality}|{derive_region(series.datasets[0])}"
        if key not in self.cfg.targets:
            raise ValueError(f"no targets configured for {key} (T1 {t1!r})")
        targets = list(self.cfg.targets[key])
        with SegmentationClient(self.cfg.triton_url) as client:
            res = client.segment_volume(series.volume, series.affine, modality, t1, targets)
        seg_uid = seg_uid_for(series_uid)
        path = self.outbox / f"{series_uid}.seg.dcm"
        write_seg(series, res.labels, targets, list(res.resolved), path, sop_instance_uid=seg_uid)
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
        ae.add_requested_context(SegmentationStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"cannot associate with {dest.ae_title}@{dest.host}:{dest.port}")
        try:
            status = assoc.send_c_store(dcmread(path))
        finally:
            assoc.release()
        if not status or status.Status != 0x0000:
            raise ConnectionError(f"{dest.ae_title} refused the SEG: status {getattr(status, 'Status', None)}")
