"""The DICOM node's job queue on sqlite (one node) and on PostgreSQL (several nodes), each queue object standing
for a node of its own (its own connection): claims exactly once under concurrent workers, leases that expire
and are re-claimed while the old owner can no longer write, heartbeats that keep a lease, expiry with no
attempts left, start-up recovery that leaves a live node's series alone, concurrent receivers of one series;
then nodes that only receive or only work sharing one PostgreSQL queue and one spool, without Triton."""

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from clients.dicom_io import read_series
from clients.dicom_node import DicomNode, NodeConfig, seg_uid_for
from clients.job_queue import PostgresJobQueue, SqliteJobQueue, open_queue
from serving.serve import free_port
from tests.clients.test_dicom_node_reliability import OLD_SCHEMA, _http, _metric, _send, _series, _wait

LEASE_S = 0.8                                   # short leases: expiry within a test's second


def _pg_database(postgres_url: str):
    """A fresh database on the session's server: (its URL, a function that drops it)."""
    import psycopg

    name = f"queue_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")

    def drop():
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute(f"DROP DATABASE {name} WITH (FORCE)")

    return postgres_url.rsplit("/", 1)[0] + "/" + name, drop


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'queue.sqlite'}"          # an absolute path: sqlite:////tmp/...
        return
    url, drop = _pg_database(request.getfixturevalue("postgres_url"))
    yield url
    drop()


@pytest.fixture
def pg_url(postgres_url):
    url, drop = _pg_database(postgres_url)
    yield url
    drop()


@pytest.fixture
def node_queue(queue_url, tmp_path):
    """Opens one more queue on the same URL: one node's (closed at the end)."""
    opened = []

    def open_one():
        opened.append(open_queue(queue_url, tmp_path))
        return opened[-1]

    yield open_one
    for q in opened:
        q.close()


def _record(queue, series_uid: str, sops, folder: Path | None = None) -> None:
    folder = folder or Path("/spool") / series_uid
    for sop in sops:
        queue.record_instance(f"{series_uid}.{sop}", series_uid, "1.2.5", "TESTSCU", folder,
                              folder / f"{series_uid}.{sop}.dcm")


def _row(queue, series_uid: str) -> dict:
    return {r["series_uid"]: r for r in queue.series()}[series_uid]


# ---- claims, leases, expiry ---------------------------------------------------------------------
def test_each_series_is_claimed_exactly_once_by_concurrent_nodes(node_queue):
    nodes = [node_queue() for _ in range(4)]
    uids = [f"1.2.3.{i}" for i in range(40)]
    for uid in uids:
        _record(nodes[0], uid, [1, 2])
    claimed, errors, barrier = [], [], threading.Barrier(len(nodes))

    def work(k, queue):
        try:
            barrier.wait()
            while (job := queue.claim(0.0, owner=f"node{k}/worker-0", lease_s=60)) is not None:
                claimed.append(job["series_uid"])
                assert job["attempts"] == 1 and job["owner"] == f"node{k}/worker-0"
                assert queue.finish(job["series_uid"], "done", owner=job["owner"], seg_uid="1.2.9")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k, q)) for k, q in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(claimed) == sorted(uids)                          # each exactly once, none lost
    rows = nodes[1].series()
    assert len(rows) == 40 and {(r["status"], r["attempts"], r["instances"]) for r in rows} == {("done", 1, 2)}
    assert nodes[2].depth() == 0


def test_an_expired_lease_is_reclaimed_and_the_old_owner_cannot_overwrite(node_queue):
    a, b = node_queue(), node_queue()
    _record(a, "1.2.3", [1])
    job = a.claim(0.0, owner="a/worker-0", lease_s=LEASE_S)
    assert job["attempts"] == 1 and a.heartbeat("1.2.3", "a/worker-0", LEASE_S)
    assert b.claim(0.0, owner="b/worker-0", lease_s=60) is None      # held
    assert b.requeue_expired(3) == (0, [])                           # not expired yet
    time.sleep(LEASE_S + 0.1)                                        # a stops heartbeating
    assert b.requeue_expired(3) == (1, [])
    again = b.claim(0.0, owner="b/worker-0", lease_s=60)
    assert again["series_uid"] == "1.2.3" and again["attempts"] == 2
    # a wakes up: its heartbeat and its finish change nothing
    assert not a.heartbeat("1.2.3", "a/worker-0", LEASE_S)
    assert not a.finish("1.2.3", "done", owner="a/worker-0", seg_uid="1.2.9.9")
    assert not a.finish("1.2.3", "receiving", owner="a/worker-0", error="timeout", retry_in_s=1)
    row = _row(a, "1.2.3")
    assert (row["status"], row["owner"], row["seg_uid"], row["attempts"]) == ("processing", "b/worker-0", None, 2)
    assert b.finish("1.2.3", "done", owner="b/worker-0", seg_uid="1.2.9")
    row = _row(a, "1.2.3")
    assert (row["status"], row["seg_uid"], row["lease_until"]) == ("done", "1.2.9", None)
    assert not a.finish("1.2.3", "failed", owner="a/worker-0", error="late")    # not after done either
    assert _row(b, "1.2.3")["status"] == "done"


def test_heartbeats_keep_a_lease_alive_past_lease_s(node_queue):
    a, b = node_queue(), node_queue()
    _record(a, "1.2.3", [1])
    a.claim(0.0, owner="a/worker-0", lease_s=LEASE_S)
    deadline = time.monotonic() + 2 * LEASE_S
    while time.monotonic() < deadline:
        time.sleep(LEASE_S / 3)
        assert a.heartbeat("1.2.3", "a/worker-0", LEASE_S)
        assert b.requeue_expired(3) == (0, [])
        assert b.claim(0.0, owner="b/worker-0", lease_s=60) is None
    assert a.finish("1.2.3", "receiving", owner="a/worker-0", error="PACS refused", retry_in_s=0.0)
    row = _row(b, "1.2.3")
    assert (row["status"], row["attempts"], row["error"]) == ("receiving", 1, "PACS refused")
    assert row["next_attempt"] is not None and row["lease_until"] is None


def test_expiry_with_no_attempts_left_fails_the_series(node_queue):
    a, b = node_queue(), node_queue()
    _record(a, "1.2.3", [1], folder=Path("/spool/1.2.3"))
    for attempt in (1, 2):
        assert a.claim(0.0, owner="a/worker-0", lease_s=0.2)["attempts"] == attempt
        time.sleep(0.3)
        expected = (1, []) if attempt == 1 else (0, [{"series_uid": "1.2.3", "folder": "/spool/1.2.3",
                                                      "attempts": 2, "status": "failed"}])
        assert b.requeue_expired(2) == expected
    row = _row(b, "1.2.3")
    assert row["status"] == "failed" and "lease expired during 2 attempts" in row["error"], row
    assert b.claim(0.0, owner="b/worker-0", lease_s=60) is None and b.depth() == 0
    _record(b, "1.2.3", [2])                                        # new instances: a new job, fresh attempts
    row = _row(a, "1.2.3")
    assert (row["status"], row["attempts"], row["instances"]) == ("receiving", 0, 2)


def test_startup_recovery(node_queue, queue_url):
    """PostgreSQL: a starting node takes back expired leases and its own (a previous run under the same
    node_id), never a live node's. sqlite (one node): everything left 'processing' goes back, as before."""
    live, dead, me = node_queue(), node_queue(), node_queue()
    for uid in ("1.2.1", "1.2.2", "1.2.3", "1.2.4"):
        _record(live, uid, [1])
    live.claim(0.0, owner="live/worker-0", lease_s=60)              # 1.2.1
    dead.claim(0.0, owner="dead/worker-0", lease_s=0.1)             # 1.2.2, expires
    me.claim(0.0, owner="me/worker-0", lease_s=60)                  # 1.2.3, a previous run of node 'me'
    me.claim(0.0, owner="me-too/worker-0", lease_s=60)              # 1.2.4: 'me' is only a prefix of this one
    time.sleep(0.2)
    requeued, failed = me.recover(3, "me")
    status = {r["series_uid"]: r["status"] for r in me.series()}
    if queue_url.startswith("sqlite"):
        assert (requeued, failed) == (4, [])
        assert set(status.values()) == {"receiving"}
    else:
        assert (requeued, failed) == (2, [])
        assert status == {"1.2.1": "processing", "1.2.2": "receiving", "1.2.3": "receiving", "1.2.4": "processing"}
        assert live.heartbeat("1.2.1", "live/worker-0", 60)       # still live's


def test_two_receivers_record_one_series(node_queue):
    a, b = node_queue(), node_queue()
    errors = []

    def receive(queue, sops):
        try:
            _record(queue, "1.2.3", sops)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(a, range(0, 30))),
               threading.Thread(target=receive, args=(b, range(15, 45)))]     # 15 duplicates
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = a.series()
    assert len(rows) == 1 and rows[0]["instances"] == 45 and rows[0]["status"] == "receiving"
    _record(b, "1.2.3", [3, 40])                                    # re-sent: ignored
    assert _row(a, "1.2.3")["instances"] == 45
    job = a.claim(0.0, owner="a/worker-0", lease_s=60)
    assert a.finish(job["series_uid"], "done", owner="a/worker-0", seg_uid="1.2.9")
    _record(b, "1.2.3", [7])                                        # a duplicate does not reopen a done series
    assert _row(a, "1.2.3")["status"] == "done"


# ---- URLs, configuration, migration -------------------------------------------------------------
def test_open_queue_urls_and_node_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    q = open_queue(None, tmp_path / "node")
    assert isinstance(q, SqliteJobQueue) and q.path == tmp_path / "node" / "queue.sqlite"
    assert open_queue("sqlite:///rel/q.sqlite", tmp_path / "node").path == Path("rel/q.sqlite")    # SQLAlchemy's
    assert open_queue(f"sqlite:///{tmp_path}/abs.sqlite", "x").path == tmp_path / "abs.sqlite"
    assert (tmp_path / "rel" / "q.sqlite").is_file() and (tmp_path / "abs.sqlite").is_file()
    for url, match in [("postgresql://duplus:secret@db/duplus", "password"),
                       ("postgresql://duplus@db/duplus?password=secret", "password"),
                       ("mysql://db/duplus", "scheme"), ("sqlite://q.sqlite", "sqlite"), ("", "non-empty")]:
        with pytest.raises(ValueError, match=match):
            open_queue(url, tmp_path)
        with pytest.raises(ValueError, match=match):
            NodeConfig(queue_url=url)
    for kw, field_name in [({"lease_s": 0}, "lease_s"), ({"lease_s": -1.0}, "lease_s"),
                           ({"node_id": "a/b"}, "node_id"), ({"node_id": ""}, "node_id"),
                           ({"workers": -1}, "workers"), ({"receive": False, "workers": 0}, "workers"),
                           ({"receive": "no"}, "receive"), ({"triton_url": ()}, "triton_url"),
                           ({"triton_url": ("a:1", "")}, "triton_url")]:
        with pytest.raises(ValueError, match=field_name):
            NodeConfig(**kw)
    assert NodeConfig(workers=0).workers == 0                       # a receive-only node
    (tmp_path / "n.yaml").write_text("triton_url: [10.0.0.1:8001, 10.0.0.2:8001]\nqueue_url: postgresql://duplus@db/q\n"
                                     "lease_s: 30\nreceive: false\nworkers: 4\nnode_id: gpu-1\n")
    cfg = NodeConfig.from_yaml(tmp_path / "n.yaml")
    assert cfg.triton_url == ("10.0.0.1:8001", "10.0.0.2:8001") and cfg.queue_url == "postgresql://duplus@db/q"
    assert (cfg.lease_s, cfg.receive, cfg.workers, cfg.node_id) == (30, False, 4, "gpu-1")


def test_an_old_sqlite_queue_gains_leases(tmp_path):
    with sqlite3.connect(tmp_path / "queue.sqlite") as db:          # a queue.sqlite of the first release
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO series (series_uid, folder, status, instances, last_received, attempts) "
                   "VALUES ('1.2.3', '/spool/1.2.3', 'processing', 1, 0, 1)")
    q = SqliteJobQueue(tmp_path / "queue.sqlite")
    assert {"next_attempt", "owner", "lease_until"} <= {r[1] for r in q.db.execute("PRAGMA table_info(series)")}
    assert q.requeue_expired(3) == (1, [])                          # processing without a lease: expired
    assert q.claim(0.0, owner="n/worker-0", lease_s=60)["attempts"] == 2


def test_a_postgres_connection_lost_to_a_server_restart_is_replaced(pg_url, caplog):
    import psycopg

    q = PostgresJobQueue(pg_url)
    try:
        _record(q, "1.2.3", [1])
        with psycopg.connect(pg_url, autocommit=True) as admin:     # what a restart does to the pooled connections
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert killed >= 1
        _record(q, "1.2.3", [2])                                    # tried once more on a new connection
        assert any("connection lost" in r.getMessage() for r in caplog.records)
        assert q.depth() == 1 and _row(q, "1.2.3")["instances"] == 2
    finally:
        q.close()


# ---- nodes on a shared queue, without Triton ----------------------------------------------------
def _fake_segmentation(node: DicomNode, calls: list, seconds: float = 0.0):
    """``segment_series`` that reads the series for real and writes a stand-in SEG (no model)."""
    def segment_series(folder, series_uid):
        calls.append(series_uid)
        read_series(folder, series_uid)
        time.sleep(seconds)
        path = node.outbox / f"{series_uid}.seg.dcm"
        path.write_bytes(b"SEG")
        return path, seg_uid_for(series_uid)

    return segment_series


def test_receive_only_and_worker_only_nodes_share_a_postgres_queue(pg_url, tmp_path, monkeypatch):
    shared = tmp_path / "shared"                                    # the workdir every node mounts at one path
    other = PostgresJobQueue(pg_url)                                # a live node elsewhere, holding a series
    _record(other, "1.2.840.99", [1])
    other.claim(0.0, owner="elsewhere/worker-0", lease_s=60)
    common = dict(queue_url=pg_url, workdir=shared, quiet_period_s=0.3, poll_s=0.05, ae_title="DUPLUS",
                  allowed_calling_aes=("TESTSCU",), triton_url=f"127.0.0.1:{free_port()}")
    receiver = DicomNode(NodeConfig(workers=0, port=free_port(), metrics_port=free_port(), node_id="receiver-1",
                                    **common))
    # a lease shorter than the segmentation: only the node's heartbeats keep it
    worker = DicomNode(NodeConfig(receive=False, workers=1, lease_s=0.6, metrics_port=free_port(),
                                  node_id="worker-1", **common))
    calls = []
    monkeypatch.setattr(worker, "segment_series", _fake_segmentation(worker, calls, seconds=1.5))
    uid = _series(tmp_path / "src", slices=4)
    receiver.start()
    worker.start()
    try:
        assert _send(receiver.cfg.port, sorted((tmp_path / "src").glob("*.dcm"))) == [0] * 4
        row = _wait(lambda: next((r for r in other.series() if r["series_uid"] == uid and r["status"] == "done"),
                                 None), timeout=20, what="the worker-only node to finish the series")
        assert row["attempts"] == 1 and row["owner"] == "worker-1/worker-0" and calls == [uid]
        assert row["folder"] == str(shared.absolute() / "spool" / uid) and row["instances"] == 4
        for node, expected in [(receiver, {"node_id": "receiver-1", "receive": True, "listening": True,
                                           "workers": 0, "workers_alive": 0, "lease_keeper_alive": False}),
                               (worker, {"node_id": "worker-1", "receive": False, "listening": False,
                                         "workers": 1, "workers_alive": 1, "lease_keeper_alive": True})]:
            code, body = _http(f"http://127.0.0.1:{node.cfg.metrics_port}/healthz")
            info = json.loads(body)
            assert code == 200 and info["status"] == "ok" and info["queue"] == "postgresql", info
            assert {k: info[k] for k in expected} == expected and info["queue_depth"] == 1   # elsewhere's
        code, body = _http(f"http://127.0.0.1:{receiver.cfg.metrics_port}/metrics")
        assert _metric(body.decode(), "dicom_node_queue_depth") == 1
        assert _metric(body.decode(), 'dicom_node_instances_received_total{outcome="stored"}') == 4
        # the other node's series: not stolen by the worker's start-up, still processing and still its own
        assert _row(other, "1.2.840.99")["owner"] == "elsewhere/worker-0"
        assert other.heartbeat("1.2.840.99", "elsewhere/worker-0", 60)
        receiver.queue.close()                                      # the queue stops answering: 503, depth NaN
        code, body = _http(f"http://127.0.0.1:{receiver.cfg.metrics_port}/healthz")
        assert code == 503 and "queue:" in json.loads(body)["last_error"], body
        code, body = _http(f"http://127.0.0.1:{receiver.cfg.metrics_port}/metrics")
        assert code == 200 and _metric(body.decode(), "dicom_node_queue_depth") != 0     # NaN
    finally:
        receiver.stop()
        worker.stop()
        other.close()
    assert worker.health()[1]["status"] == "stopping" and not receiver.health()[0]


def test_the_node_fails_and_quarantines_an_expired_series_with_no_attempts_left(queue_url, tmp_path):
    node = DicomNode(NodeConfig(receive=False, workers=1, queue_url=queue_url, workdir=tmp_path / "node",
                                quiet_period_s=3600, poll_s=0.05, max_attempts=1, lease_s=0.6,
                                triton_url=f"127.0.0.1:{free_port()}"))
    uid = _series(node.spool / "incoming", slices=2)
    (node.spool / "incoming").rename(node.spool / uid)
    ghost = open_queue(queue_url, tmp_path)                         # another worker, which will die
    node.start()
    try:
        for f in sorted((node.spool / uid).iterdir()):
            ghost.record_instance(f.stem, uid, "1.2.5", "TESTSCU", node.spool / uid, f)
        assert ghost.claim(0.0, owner="ghost/worker-0", lease_s=0.3)["attempts"] == 1
        row = _wait(lambda: next((r for r in node.queue.series() if r["status"] == "failed"), None), timeout=10,
                    what="the node to fail the expired series")
    finally:
        node.stop()
        ghost.close()
    assert "lease expired during 1 attempts" in row["error"], row
    assert sorted(p.name for p in (node.quarantine / uid).iterdir()) == sorted(p.name for p in
                                                                              (node.spool / uid).iterdir())
    assert "lease expired" in (node.quarantine / f"{uid}.txt").read_text()
    from prometheus_client import generate_latest

    assert _metric(generate_latest(node.metrics.registry).decode(),
                   'dicom_node_series_finished_total{status="failed"}') == 1
