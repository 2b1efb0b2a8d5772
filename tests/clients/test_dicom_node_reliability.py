"""The DICOM node's reliability with real peers on loopback and no segmentation model: UIDs that try to
name a path are refused and quarantined, transient failures are retried with backoff and deterministic
ones fail at once, a pool of workers never shares a series, and /metrics and /healthz tell the truth.

Segmentation itself is tested end to end in test_dicom_node.py; here Triton is a closed port (a real
transient failure) or ``segment_series`` is replaced by one that reads the series for real (a broken
series fails as in production) and skips the model, so every test runs in seconds."""

import json
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from clients.dicom_io import read_series, write_series
from clients.dicom_node import (
    Destination,
    DicomNode,
    NodeConfig,
    PacsRefused,
    is_transient_failure,
    seg_uid_for,
    valid_uid,
)
from clients.job_queue import SqliteJobQueue
from serving.serve import free_port

STORESCU = shutil.which("storescu")
# pydicom warns (from the node's threads too) about the invalid UIDs these tests send on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning",
                                        "ignore:The value length .* exceeds the maximum length of 64:UserWarning")


# ---- helpers ----------------------------------------------------------------------------------
def _series(folder: Path, slices: int = 5, seed: int = 0) -> str:
    """A small CT abdomen series (16x16 pixels, 2 mm); returns its SeriesInstanceUID."""
    rng = np.random.default_rng(seed)
    write_series(rng.normal(0, 100, (16, 16, slices)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), folder)
    return str(pydicom.dcmread(next(folder.glob("*.dcm"))).SeriesInstanceUID)


def _node(tmp_path: Path, **kw) -> DicomNode:
    cfg = dict(ae_title="DUPLUS", port=free_port(), allowed_calling_aes=("TESTSCU", "STORESCU"),
               workdir=tmp_path / "node", quiet_period_s=0.4, poll_s=0.05,
               triton_url=f"127.0.0.1:{free_port()}", triton_retry_s=0.0)   # nobody listens there
    cfg.update(kw)
    return DicomNode(NodeConfig(**cfg))


def _send(port: int, datasets, aet: str = "TESTSCU") -> list[int]:
    """C-STORE every dataset (or file) in one association; the status of each."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DUPLUS")
    assert assoc.is_established
    try:
        with warnings.catch_warnings():                 # pydicom warns about the invalid UIDs sent on purpose
            warnings.simplefilter("ignore", UserWarning)
            return [assoc.send_c_store(d).Status for d in datasets]
    finally:
        assoc.release()


def _wait(predicate, timeout: float = 30.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _finished(node: DicomNode, n: int):
    rows = node.queue.series()
    return rows if len(rows) == n and all(r["status"] in ("done", "failed") for r in rows) else None


def _http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _metric(text: str, name: str) -> float:
    """The value of one sample ('name{labels}' exactly) in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


# ---- point 5: no path from a UID --------------------------------------------------------------
@pytest.mark.parametrize("uid, ok", [
    ("1.2.840.10008.5.1.4.1.1.2", True), ("0.1", True), ("1.2.0.3", True), ("1." + "1" * 62, True),
    ("1." + "1" * 63, False),                   # 65 characters
    ("../../x", False), ("/tmp/x", False), ("1.2.abc", False), ("1.02.3", False), ("1..2", False),
    ("1.2.", False), ("", False), ("1.2.3\n", False), ("1.2 .3", False), ("1.2.3/..", False),
])
def test_uid_grammar(uid, ok):
    assert valid_uid(uid) is ok


def test_uids_that_name_paths_are_refused_quarantined_and_never_written(tmp_path):
    src = tmp_path / "src"
    series_uid = _series(src, slices=3)
    files = sorted(src.glob("*.dcm"))
    escape = f"/tmp/duplus-escape-{uuid.uuid4().hex[:8]}"         # an absolute 'UID' would replace the spool
    cases = [("SeriesInstanceUID", "../../x"), ("SOPInstanceUID", "../../../escape"),
             ("StudyInstanceUID", "1." + "2" * 63), ("SeriesInstanceUID", "1.2.abc"),
             ("SOPInstanceUID", "1.02.3"), ("SeriesInstanceUID", escape)]
    bad = []
    for keyword, value in cases:
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        setattr(ds, keyword, value)
        bad.append(ds)
    before_parent = {p.name for p in tmp_path.parent.iterdir()}
    node = _node(tmp_path).start()
    try:
        statuses = _send(node.cfg.port, [*bad, pydicom.dcmread(files[1])])
        if STORESCU:                                             # the same refusal for dcmtk's storescu
            evil = tmp_path / "storescu" / "evil.dcm"
            evil.parent.mkdir()
            ds = pydicom.dcmread(files[2])
            ds.SeriesInstanceUID = "../../../storescu-x"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ds.save_as(evil)
            proc = subprocess.run([STORESCU, "-v", "-aet", "STORESCU", "-aec", "DUPLUS", "127.0.0.1", str(node.cfg.port),
                                   str(evil)], capture_output=True, text=True, timeout=60)
            assert "Error: DataSetDoesNotMatchSOPClass" in proc.stderr, proc.stdout + proc.stderr   # 0xA900
    finally:
        node.stop()
    assert statuses == [0xA900] * len(cases) + [0x0000]          # 0xA900: data set does not match the SOP class
    reasons = [p.read_text() for p in node.quarantine.glob("*.txt")]
    assert len(reasons) == len(cases) + bool(STORESCU), reasons
    assert all("invalid UID" in r for r in reasons), reasons
    assert all(re.fullmatch(r"[0-9]+-[0-9a-f]{8}\.dcm", p.name) for p in node.quarantine.glob("*.dcm"))  # node's names
    # only the valid instance reached the spool and the queue
    assert [p.name for p in node.spool.iterdir()] == [series_uid]
    assert [r["series_uid"] for r in node.queue.series()] == [series_uid]
    # nothing outside the node's workdir: the tmp tree holds the sources and the workdir only
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    outside = [p for p in written if node.cfg.workdir not in p.parents and src not in p.parents
               and p.parent != tmp_path / "storescu"]
    assert not outside, outside
    assert {p.name for p in tmp_path.parent.iterdir()} == before_parent
    assert not Path(escape).exists() and not (tmp_path / "x").exists()


def test_a_symlink_planted_in_the_spool_is_not_followed(tmp_path):
    uid = _series(tmp_path / "src", slices=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    node = _node(tmp_path)
    (node.spool / uid).symlink_to(elsewhere)                         # valid UID, but its folder leaves the spool
    node.start()
    try:
        statuses = _send(node.cfg.port, sorted((tmp_path / "src").glob("*.dcm")))
    finally:
        node.stop()
    assert statuses == [0xA900, 0xA900] and not any(elsewhere.iterdir())
    assert all("unsafe path" in p.read_text() for p in node.quarantine.glob("*.txt"))
    assert node.queue.series() == []


# ---- point 8: deterministic vs transient failures ---------------------------------------------
def _grpc_error(msg, status):
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(msg, status=status)


@pytest.mark.parametrize("make_exc, transient", [
    (lambda: ConnectionRefusedError(111, "Connection refused"), True),
    (lambda: TimeoutError("timed out"), True),
    (lambda: __import__("clients.grpc_client", fromlist=["RequestTimeout"]).RequestTimeout("600 s"), True),
    (lambda: PacsRefused("ORTHANC refused the SEG: status 0xa700"), True),
    (lambda: OSError(113, "No route to host"), True),
    (lambda: _grpc_error("failed to connect to all addresses", "StatusCode.UNAVAILABLE"), True),
    (lambda: _grpc_error("Stub process 'segment_volume_0_0' is not healthy.", "StatusCode.INTERNAL"), True),
    (lambda: _grpc_error("Request for unknown model: 'segment_volume' has no available versions",
                         "StatusCode.NOT_FOUND"), True),
    (lambda: _grpc_error("TARGETS: expected a 1-D BYTES tensor", "StatusCode.INVALID_ARGUMENT"), False),
    (lambda: __import__("clients.dicom_io", fromlist=["DicomSeriesError"]).DicomSeriesError("missing slice"), False),
    (lambda: ValueError("no targets configured for CT|pelvis"), False),
    (lambda: FileNotFoundError(2, "No such file or directory"), False),
    (lambda: RuntimeError("highdicom: cannot encode"), False),
], ids=["connection refused", "timeout", "RequestTimeout", "PACS refused", "no route to host", "gRPC UNAVAILABLE",
        "stub not healthy", "model reloading", "gRPC INVALID_ARGUMENT", "missing slice", "no targets",
        "file not found", "SEG writer bug"])
def test_failure_classification(make_exc, transient):
    assert is_transient_failure(make_exc()) is transient


def test_pacs_that_refuses_the_association_is_a_transient_failure(tmp_path):
    node = _node(tmp_path, destination=Destination("ORTHANC", "127.0.0.1", free_port()), pacs_timeout_s=5)
    seg = tmp_path / "seg.dcm"
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.66.4", pydicom.uid.generate_uid()
    ds.save_as(seg, implicit_vr=False, little_endian=True)
    with pytest.raises(PacsRefused) as info:
        node.send(seg)
    assert is_transient_failure(info.value)


def test_unreachable_triton_is_retried_with_backoff_then_failed_and_quarantined(tmp_path, caplog):
    node = _node(tmp_path, max_attempts=3, retry_backoff_s=0.3, retry_backoff_max_s=0.5, workers=1)
    uid = _series(tmp_path / "src")
    caplog.set_level("WARNING", logger="dicom_node")
    node.start()
    try:
        assert _send(node.cfg.port, sorted((tmp_path / "src").glob("*.dcm"))) == [0] * 5
        rows = _wait(lambda: _finished(node, 1), what="the series to fail")
    finally:
        node.stop()
    row = rows[0]
    assert row["status"] == "failed" and row["attempts"] == 3, row
    assert "transient, no attempts left" in row["error"] and "attempt 3/3" in row["error"], row
    assert "UNAVAILABLE" in row["error"], row                     # gRPC's own error for a closed port
    retries = [r for r in caplog.records if "transient, retry in" in r.getMessage()]
    assert [r.getMessage().split("retry in ")[1] for r in retries] == ["0.3 s", "0.5 s"]   # 0.6 capped at 0.5
    failed = [r for r in caplog.records if "failed:" in r.getMessage() and r.levelname == "ERROR"]
    assert retries[1].created - retries[0].created >= 0.3 and failed[-1].created - retries[1].created >= 0.5
    assert sorted(p.name for p in (node.quarantine / uid).iterdir()) == \
        sorted(p.name for p in (node.spool / uid).iterdir())
    assert "attempt 3/3" in (node.quarantine / f"{uid}.txt").read_text()
    assert _metric_text(node, "dicom_node_retries_total") == 2


def _metric_text(node: DicomNode, name: str) -> float:
    from prometheus_client import generate_latest

    return _metric(generate_latest(node.metrics.registry).decode(), name)


# ---- the queue: claims, migration, recovery ---------------------------------------------------
def test_concurrent_claims_never_give_a_series_twice(tmp_path):
    queue = SqliteJobQueue(tmp_path / "queue.sqlite")
    uids = [f"1.2.3.{i}" for i in range(60)]
    for i, uid in enumerate(uids):
        queue.record_instance(f"1.2.4.{i}", uid, "1.2.5", "TESTSCU", tmp_path / uid, tmp_path / uid / "a.dcm")
    claimed, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        while (job := queue.claim(0.0, owner="test/worker-0", lease_s=60)) is not None:
            claimed.append(job["series_uid"])

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(uids)                        # each exactly once
    assert {r["status"] for r in queue.series()} == {"processing"}


OLD_SCHEMA = """
CREATE TABLE series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT, calling_ae TEXT, folder TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'receiving', instances INTEGER NOT NULL DEFAULT 0, last_received REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, seg_uid TEXT, error TEXT, updated REAL);
CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, path TEXT NOT NULL, received REAL NOT NULL);
"""


def test_an_old_queue_is_migrated_and_a_series_that_keeps_killing_the_node_fails(tmp_path):
    workdir = tmp_path / "node"
    (workdir / "spool" / "1.2.3").mkdir(parents=True)
    (workdir / "spool" / "1.2.3" / "1.2.3.1.dcm").write_bytes(b"x")
    with sqlite3.connect(workdir / "queue.sqlite") as db:             # a queue.sqlite of the previous release
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO series (series_uid, folder, status, instances, last_received, attempts) "
                   "VALUES ('1.2.3', ?, 'processing', 1, 0, 3)", (str(workdir / "spool" / "1.2.3"),))
        db.execute("INSERT INTO series (series_uid, folder, status, instances, last_received, attempts) "
                   "VALUES ('1.2.4', ?, 'processing', 1, ?, 1)", (str(workdir / "spool" / "1.2.4"), time.time()))
    node = _node(tmp_path, max_attempts=3, workers=1, quiet_period_s=3600)   # 1.2.4 is not claimed again
    assert "next_attempt" in {r[1] for r in node.queue.db.execute("PRAGMA table_info(series)")}
    node.start()
    node.stop()
    rows = {r["series_uid"]: r for r in node.queue.series()}
    assert rows["1.2.3"]["status"] == "failed" and "stopped during 3 attempts" in rows["1.2.3"]["error"]
    assert (node.quarantine / "1.2.3" / "1.2.3.1.dcm").read_bytes() == b"x"
    assert rows["1.2.4"]["status"] == "receiving" and rows["1.2.4"]["next_attempt"] is None
    SqliteJobQueue(workdir / "queue.sqlite")                           # opening again: nothing to migrate


def test_config_validation():
    for kw, field_name in [({"workers": 0, "receive": False}, "workers"), ({"workers": 1.5}, "workers"),
                           ({"max_attempts": 0}, "max_attempts"), ({"retry_backoff_s": -1}, "retry_backoff_s"),
                           ({"retry_backoff_s": 10, "retry_backoff_max_s": 5}, "retry_backoff_max_s"),
                           ({"metrics_port": 70000}, "metrics_port"), ({"pacs_timeout_s": 0}, "pacs_timeout_s"),
                           ({"triton_retry_s": -1}, "triton_retry_s")]:
        with pytest.raises(ValueError, match=field_name):
            NodeConfig(**kw)
    cfg = NodeConfig(retry_backoff_s=2, retry_backoff_max_s=10)
    assert [cfg.backoff_s(a) for a in (1, 2, 3, 4)] == [2, 4, 8, 10]


# ---- point 3 + 4: a pool of workers, concurrent peers, /metrics and /healthz --------------------
def test_concurrent_peers_a_pool_of_workers_metrics_and_health(tmp_path, monkeypatch):
    good = [_series(tmp_path / f"s{i}", slices=5, seed=i) for i in range(4)]
    gap_uid = _series(tmp_path / "gap", slices=6, seed=9)
    (sorted((tmp_path / "gap").glob("*.dcm"))[3]).unlink()             # a missing slice: deterministic failure
    flaky = good[0]                                                   # Triton 'restarts' during its first attempt
    node = _node(tmp_path, workers=3, retry_backoff_s=0.2, metrics_port=free_port())
    calls, in_flight, overlaps, threads, lock = Counter(), set(), [], set(), threading.Lock()

    def segment_series(folder, series_uid):
        with lock:
            calls[series_uid] += 1
            if series_uid in in_flight:
                overlaps.append(series_uid)
            in_flight.add(series_uid)
            threads.add(threading.current_thread().name)
            first = calls[series_uid] == 1
        try:
            read_series(folder, series_uid)                           # the real reader: the gap series fails here
            time.sleep(0.3)                                           # the model's time, so that workers overlap
            if series_uid == flaky and first:
                raise ConnectionError("Triton at 127.0.0.1:8001 is restarting")
            path = node.outbox / f"{series_uid}.seg.dcm"
            path.write_bytes(b"SEG")
            return path, seg_uid_for(series_uid)
        finally:
            with lock:
                in_flight.discard(series_uid)

    monkeypatch.setattr(node, "segment_series", segment_series)
    node.start()
    base = f"http://127.0.0.1:{node.cfg.metrics_port}"
    try:
        code, body = _http(base + "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok", body
        bad_uid = pydicom.dcmread(next((tmp_path / "s1").glob("*.dcm")))
        bad_uid.SeriesInstanceUID = "../../x"
        jobs = [lambda: _send(node.cfg.port, sorted((tmp_path / "s0").glob("*.dcm"))),
                lambda: _send(node.cfg.port, sorted((tmp_path / "s1").glob("*.dcm")) + [bad_uid]),
                lambda: _send(node.cfg.port, sorted((tmp_path / "gap").glob("*.dcm")))]
        if STORESCU:
            jobs += [lambda i=i: subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", "+sd", "127.0.0.1",
                                             str(node.cfg.port), str(tmp_path / f"s{i}")], check=True,
                                            capture_output=True, timeout=60) for i in (2, 3)]
        else:
            jobs += [lambda i=i: _send(node.cfg.port, sorted((tmp_path / f"s{i}").glob("*.dcm"))) for i in (2, 3)]
        errors = []

        def run(job):
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        peers = [threading.Thread(target=run, args=(j,)) for j in jobs]   # five peers at the same time
        for p in peers:
            p.start()
        for p in peers:
            p.join()
        assert not errors, errors
        rows = {r["series_uid"]: r for r in _wait(lambda: _finished(node, 5), what="five series")}
        code, body = _http(base + "/metrics")
        metrics = body.decode()
        code_h, health = _http(base + "/healthz")
        assert code == 200 and code_h == 200, health
        assert {u: rows[u]["instances"] for u in rows} == {**{u: 5 for u in good}, gap_uid: 5}
        assert all(rows[u]["status"] == "done" and rows[u]["seg_uid"] == seg_uid_for(u) for u in good), rows
        assert rows[gap_uid]["status"] == "failed" and rows[gap_uid]["attempts"] == 1       # at once, no retry
        assert "deterministic" in rows[gap_uid]["error"] and (node.quarantine / gap_uid).is_dir()
        assert rows[flaky]["attempts"] == 2
        assert calls == Counter({**{u: 1 for u in good}, flaky: 2, gap_uid: 1}) and not overlaps
        assert len(threads) >= 2, threads                           # the pool was used
        for name, value in [('dicom_node_instances_received_total{outcome="stored"}', 25),
                            ('dicom_node_instances_received_total{outcome="refused"}', 1),
                            ('dicom_node_series_finished_total{status="done"}', 4),
                            ('dicom_node_series_finished_total{status="failed"}', 1),
                            ("dicom_node_retries_total", 1), ("dicom_node_series_seconds_count", 6),
                            ("dicom_node_queue_depth", 0), ("dicom_node_busy_workers", 0),
                            ("dicom_node_workers_alive", 3)]:
            assert _metric(metrics, name) == value, name
        assert _metric(metrics, "dicom_node_series_seconds_sum") >= 6 * 0.3 - 0.3   # the gap series fails fast
        info = json.loads(health)
        assert info["status"] == "ok" and info["workers_alive"] == 3 and info["queue_depth"] == 0
        assert flaky in info["last_error"] or gap_uid in info["last_error"]
        # the queue breaks under the workers: each stops, /healthz says so
        def broken(*_args, **_kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(node.queue, "claim", broken)
        _wait(lambda: node.workers_alive() == 0, timeout=5, what="the workers to stop")
        code, body = _http(base + "/healthz")
        info = json.loads(body)
        assert code == 503 and info["status"] == "unhealthy" and info["workers_alive"] == 0, info
        assert "disk I/O error" in info["last_error"]
    finally:
        node.stop()
    with pytest.raises(urllib.error.URLError):                       # stop() closes the endpoint
        urllib.request.urlopen(base + "/healthz", timeout=2)
