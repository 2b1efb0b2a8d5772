"""The DICOM node's durable job queue: one row per series, with claims, leases and retries.

    open_queue(None, workdir)                              # sqlite at workdir/queue.sqlite (the default)
    open_queue("sqlite:////var/lib/duplus/queue.sqlite", workdir)
    open_queue("postgresql://duplus@db.example:5432/duplus", workdir)

Two back-ends behind one interface (``JobQueue``):

- ``SqliteJobQueue``: one file in WAL mode, **one node** (one process on one machine: sqlite's locks do not
  work over a network file system). At start-up every series left 'processing' is a crash of this node and
  goes back to the queue at once.
- ``PostgresJobQueue``: a PostgreSQL database shared by **several nodes**, receivers and workers in separate
  processes or machines. Claims are ``SELECT ... FOR UPDATE SKIP LOCKED`` (one row, never twice), every state
  change is one transaction, and a series being processed is held by a **lease**: its owner (``<node
  id>/worker-<n>``) extends ``lease_until`` by heartbeats; a lease that runs out (the node died, hung or lost
  the network) is moved back to the queue by any other node (``requeue_expired``), or failed when the series
  used all its attempts. Start-up takes back only expired leases and the node's own (same ``node_id`` as a
  previous run): never a series that a live node holds.

**Time.** Times are epoch seconds (REAL / double precision). PostgreSQL computes every time it stores or
compares (``last_received``, the quiet period, ``next_attempt``, ``lease_until``) from its own clock,
``now()`` of the transaction (each transaction is a single short statement or two), so nodes on machines
with skewed clocks agree; callers pass durations (``quiet_period_s``, ``lease_s``, ``retry_in_s``), never
times. sqlite uses the clock of its one machine.

**Ownership.** ``heartbeat`` and ``finish`` change a row only where it is still 'processing' for that owner:
a worker whose lease expired and whose series another worker re-claimed gets False and changes nothing.
The SEG such a worker may already have sent is harmless: its UIDs derive from the source series
(``clients.dicom_seg.seg_uids``), so the PACS receives the same instance twice, not two SEGs.

**What a deployment with several nodes must provide**: one PostgreSQL database (the tables are created at
first use; the password comes from libpq's ``PGPASSWORD`` or ``~/.pgpass``, never from the node's
configuration) and one **shared POSIX directory with atomic rename** (NFS, CephFS, EFS) mounted at **the
same path on every node** as the node's ``workdir``: the spool (a folder per series UID, a file per SOP
Instance UID, written to a temporary name, fsynced and renamed, so receivers on several machines can write
the same series), the outbox and the quarantine. The queue stores each series' folder as an absolute path.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("dicom_node.queue")

try:                                        # a dependency of the package; the sqlite queue works without it
    import psycopg
    QUEUE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, psycopg.Error)
except ImportError:  # pragma: no cover - psycopg missing
    psycopg = None
    QUEUE_ERRORS = (sqlite3.Error,)

FINISHED = ("done", "failed")
STATUSES = ("receiving", "processing", *FINISHED)
_RECORDED = ("series_uid", "folder", "attempts", "status")


class JobQueue(ABC):
    """The durable state of the node's series; every method is one transaction.

    A series is 'receiving' (instances arrive, or it waits for a retry), 'processing' (claimed by one
    worker under a lease), 'done' or 'failed'. New instances make a finished series a new job."""

    backend: str = ""

    @abstractmethod
    def record_instance(self, sop_uid: str, series_uid: str, study_uid: str, calling_ae: str,
                        folder: str | Path, path: str | Path) -> None:
        """Record one stored instance; a duplicate SOP Instance UID is ignored (safe under concurrent receivers)."""

    @abstractmethod
    def claim(self, quiet_period_s: float, *, owner: str, lease_s: float) -> dict | None:
        """The oldest series that is complete (no instance for ``quiet_period_s``) and due (its backoff passed),
        now 'processing' for ``owner`` with ``attempts + 1`` and a lease of ``lease_s``; or None.

        Returns {series_uid, folder, attempts (this attempt, 1-based), last_received, owner}."""

    @abstractmethod
    def heartbeat(self, series_uid: str, owner: str, lease_s: float) -> bool:
        """Extend the lease to now + ``lease_s``; False when ``owner`` no longer holds the series."""

    @abstractmethod
    def finish(self, series_uid: str, status: str, *, owner: str, seg_uid: str | None = None,
               error: str | None = None, retry_in_s: float | None = None, note: str | None = None) -> bool:
        """Record the outcome of ``owner``'s attempt: 'done', 'failed', or 'receiving' (a retry, due in
        ``retry_in_s``), with an optional ``note`` (what the context classifier said of the series: a T1 it filled
        in, a header that contradicts the image). False, and nothing changed, when ``owner`` no longer holds the
        series."""

    @abstractmethod
    def requeue_expired(self, max_attempts: int) -> tuple[int, list[dict]]:
        """Series whose lease expired go back to the queue, or fail when they used ``max_attempts``.

        Returns (series requeued, [{series_uid, folder, attempts, status}] of those failed)."""

    @abstractmethod
    def recover(self, max_attempts: int, node_id: str) -> tuple[int, list[dict]]:
        """Start-up recovery of node ``node_id``: like ``requeue_expired``, for the series a previous run
        of this node left 'processing' (sqlite: all of them; PostgreSQL: expired leases and ``node_id``'s own)."""

    @abstractmethod
    def depth(self) -> int:
        """Series not finished: receiving (including those waiting for a retry) or processing."""

    @abstractmethod
    def series(self) -> list[dict]:
        """Every series row, oldest last_received first."""

    @abstractmethod
    def close(self) -> None:
        ...

    @staticmethod
    def _check_finish(status: str, retry_in_s: float | None) -> None:
        if status not in ("receiving", *FINISHED):
            raise ValueError(f"status must be 'receiving', 'done' or 'failed', got {status!r}")
        if retry_in_s is not None and retry_in_s < 0:
            raise ValueError(f"retry_in_s must be >= 0, got {retry_in_s}")


# ---- sqlite: one node ----------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT, calling_ae TEXT, folder TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'receiving',          -- receiving | processing | done | failed
    instances INTEGER NOT NULL DEFAULT 0, last_received REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    seg_uid TEXT, error TEXT, updated REAL, next_attempt REAL, owner TEXT, lease_until REAL, note TEXT);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, path TEXT NOT NULL, received REAL NOT NULL);
"""
# columns added after the first release: (name, declaration), added to an existing queue.sqlite at open
MIGRATIONS = (("next_attempt", "REAL"), ("owner", "TEXT"), ("lease_until", "REAL"), ("note", "TEXT"))


class SqliteJobQueue(JobQueue):
    """One sqlite file in WAL mode for one node; one connection, serialised by a lock."""

    backend = "sqlite"

    def __init__(self, path: str | Path):
        path = Path(path)
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

    def __repr__(self) -> str:
        return f"SqliteJobQueue({str(self.path)!r})"

    def _transaction(self, work):
        """``work(db)`` inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error), under the lock."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self.db)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return result

    def record_instance(self, sop_uid, series_uid, study_uid, calling_ae, folder, path) -> None:
        now = time.time()

        def work(db):
            new = db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?)",
                             (sop_uid, series_uid, str(path), now)).rowcount
            # a finished series that receives new instances is a new job: fresh attempts, no pending backoff
            db.execute(
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

        self._transaction(work)

    def claim(self, quiet_period_s: float, *, owner: str, lease_s: float) -> dict | None:
        now = time.time()

        def work(db):
            row = db.execute(
                "SELECT series_uid, folder, attempts, last_received FROM series WHERE status = 'receiving' "
                "AND last_received < ? AND (next_attempt IS NULL OR next_attempt <= ?) "
                "ORDER BY COALESCE(next_attempt, last_received) LIMIT 1", (now - quiet_period_s, now)).fetchone()
            if row:
                db.execute("UPDATE series SET status = 'processing', attempts = attempts + 1, owner = ?, "
                           "lease_until = ?, updated = ? WHERE series_uid = ?", (owner, now + lease_s, now, row[0]))
            return row

        row = self._transaction(work)
        if row is None:
            return None
        return {"series_uid": row[0], "folder": row[1], "attempts": row[2] + 1, "last_received": row[3],
                "owner": owner}

    def heartbeat(self, series_uid: str, owner: str, lease_s: float) -> bool:
        now = time.time()
        with self._lock:
            return self.db.execute("UPDATE series SET lease_until = ? WHERE series_uid = ? AND owner = ? "
                                   "AND status = 'processing'", (now + lease_s, series_uid, owner)).rowcount == 1

    def finish(self, series_uid: str, status: str, *, owner: str, seg_uid: str | None = None,
               error: str | None = None, retry_in_s: float | None = None, note: str | None = None) -> bool:
        self._check_finish(status, retry_in_s)
        now = time.time()
        due = None if retry_in_s is None else now + retry_in_s
        with self._lock:
            return self.db.execute(
                "UPDATE series SET status = ?, seg_uid = ?, error = ?, next_attempt = ?, lease_until = NULL, "
                "updated = ?, note = COALESCE(?, note) WHERE series_uid = ? AND owner = ? AND status = 'processing'",
                (status, seg_uid, error, due, now, note, series_uid, owner)).rowcount == 1

    def _requeue(self, where: str, params: tuple, max_attempts: int, why: str) -> tuple[int, list[dict]]:
        """'processing' rows matching ``where``: failed when they used all attempts, else back to 'receiving'."""
        now = time.time()

        def work(db):
            rows = db.execute(f"SELECT series_uid, folder, attempts FROM series WHERE status = 'processing' "
                              f"AND ({where})", params).fetchall()
            failed = [{"series_uid": u, "folder": f, "attempts": a, "status": "failed"}
                      for u, f, a in rows if a >= max_attempts]
            for job in failed:
                db.execute("UPDATE series SET status = 'failed', lease_until = NULL, updated = ?, error = ? "
                           "WHERE series_uid = ?", (now, f"{why} during {job['attempts']} attempts",
                                                    job["series_uid"]))
            requeue = [(now, u) for u, _, a in rows if a < max_attempts]
            db.executemany("UPDATE series SET status = 'receiving', lease_until = NULL, updated = ? "
                           "WHERE series_uid = ?", requeue)
            return len(requeue), failed

        return self._transaction(work)

    def requeue_expired(self, max_attempts: int) -> tuple[int, list[dict]]:
        # NULL: a series a release without leases left processing
        return self._requeue("lease_until IS NULL OR lease_until < ?", (time.time(),), max_attempts,
                             "its worker's lease expired")

    def recover(self, max_attempts: int, node_id: str) -> tuple[int, list[dict]]:
        # one node per sqlite file: whatever is 'processing' at start-up was left by a crash of this node
        return self._requeue("1 = 1", (), max_attempts, "the node stopped")

    def depth(self) -> int:
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


# ---- PostgreSQL: several nodes -------------------------------------------------------------------
# the database's clock, in epoch seconds: the start of the (short) transaction
_NOW = "extract(epoch FROM now())::float8"
PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS series (
        series_uid text PRIMARY KEY, study_uid text, calling_ae text, folder text NOT NULL,
        status text NOT NULL DEFAULT 'receiving'
            CHECK (status IN ('receiving', 'processing', 'done', 'failed')),
        instances integer NOT NULL DEFAULT 0, last_received float8 NOT NULL, attempts integer NOT NULL DEFAULT 0,
        seg_uid text, error text, updated float8, next_attempt float8,
        owner text, lease_until float8, note text)""",        # owner: '<node id>/worker-<n>' that holds or held it
    "ALTER TABLE series ADD COLUMN IF NOT EXISTS note text",   # a database written before notes existed
    """CREATE TABLE IF NOT EXISTS instances (
        sop_uid text PRIMARY KEY, series_uid text NOT NULL, path text NOT NULL, received float8 NOT NULL)""",
    # the unfinished rows, for claims, expiry and depth (finished rows accumulate)
    """CREATE INDEX IF NOT EXISTS series_open ON series (status, last_received)
        WHERE status IN ('receiving', 'processing')""",
)
_SCHEMA_LOCK = 0x6475706C7573            # pg_advisory_xact_lock key: nodes starting together create the tables once


def _pg_requeue_sql(where: str) -> str:
    """Lock the 'processing' rows matching ``where`` that no other transaction holds (SKIP LOCKED: two nodes
    expiring at once neither deadlock nor touch a row twice), and fail or requeue each in one UPDATE."""
    return (
        f"WITH stale AS (SELECT series_uid FROM series WHERE status = 'processing' AND ({where}) "
        f"FOR UPDATE SKIP LOCKED) "
        f"UPDATE series s SET status = CASE WHEN s.attempts >= %(max)s THEN 'failed' ELSE 'receiving' END, "
        f"error = CASE WHEN s.attempts >= %(max)s THEN %(why)s || ' during ' || s.attempts || ' attempts' "
        f"ELSE s.error END, lease_until = NULL, updated = {_NOW} "
        f"FROM stale WHERE s.series_uid = stale.series_uid RETURNING s.series_uid, s.folder, s.attempts, s.status")


class PostgresJobQueue(JobQueue):
    """A PostgreSQL database shared by several nodes (psycopg 3; autocommit off, one transaction per method).

    Connections are kept in a small pool of idle ones (any thread takes one for one transaction: the SCP
    runs each association in a thread of its own); a connection broken by a server restart is replaced
    and the transaction tried once more."""

    backend = "postgresql"

    def __init__(self, url: str, *, max_idle: int = 16, connect_timeout_s: int = 10):
        if psycopg is None:  # pragma: no cover - psycopg missing
            raise RuntimeError("queue_url is a PostgreSQL URL but psycopg is not installed (pip install "
                               "'psycopg[binary]')")
        check_queue_url(url)
        self.url = url
        self._max_idle, self._connect_timeout_s = max_idle, connect_timeout_s
        self._idle: list = []
        self._lock = threading.Lock()
        self._closed = False

        def create(cur):
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in PG_SCHEMA:
                cur.execute(statement)

        self._run(create)

    def __repr__(self) -> str:
        return f"PostgresJobQueue({redact(self.url)!r})"

    # -- connections --
    def _connect(self):
        from psycopg.conninfo import conninfo_to_dict

        # TCP keepalives: a connection to a vanished server fails within about a minute instead of hanging
        # a worker (its lease then expires and another node takes the series); what the URL sets wins
        defaults = {"connect_timeout": self._connect_timeout_s, "application_name": "duplus-dicom-node",
                    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
        given = conninfo_to_dict(self.url)
        return psycopg.connect(self.url, autocommit=False, **{k: v for k, v in defaults.items() if k not in given})

    def _acquire(self):
        with self._lock:
            if self._closed:
                raise psycopg.InterfaceError("the job queue is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _release(self, conn) -> None:
        from psycopg.pq import TransactionStatus

        usable = not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE
        with self._lock:
            if usable and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _run(self, work):
        """``work(cursor)`` in one transaction: COMMIT, or ROLLBACK and raise. Tried once more on a fresh
        connection when the one taken from the pool turns out broken (the server restarted), or when
        PostgreSQL rolled the transaction back (a deadlock). A retried record_instance, heartbeat or
        requeue is idempotent; a claim whose COMMIT was lost with the connection is a lease that expires."""
        for attempt in (1, 2):
            conn = self._acquire()
            try:
                with conn.cursor() as cur:
                    result = work(cur)
                conn.commit()
            except BaseException as exc:
                broken = conn.broken or conn.closed
                if not broken:
                    try:
                        conn.rollback()
                    except psycopg.Error:
                        conn.close()
                self._release(conn)
                if attempt == 1 and (isinstance(exc, psycopg.errors.TransactionRollback)
                                     or (broken and isinstance(exc, psycopg.OperationalError))):
                    log.warning("queue %s: %s (%s); trying once more", redact(self.url),
                                "connection lost" if broken else "transaction rolled back", str(exc).strip())
                    continue
                raise
            self._release(conn)
            return result

    # -- the queue --
    def record_instance(self, sop_uid, series_uid, study_uid, calling_ae, folder, path) -> None:
        def work(cur):
            # a concurrent insert of the same SOP waits for the other transaction, then does nothing
            cur.execute(f"INSERT INTO instances (sop_uid, series_uid, path, received) VALUES (%s, %s, %s, {_NOW}) "
                        "ON CONFLICT (sop_uid) DO NOTHING", (sop_uid, series_uid, str(path)))
            new = cur.rowcount
            # one row per series whichever receiver comes first; a finished series with new instances is a new job
            cur.execute(
                "INSERT INTO series (series_uid, study_uid, calling_ae, folder, instances, last_received, updated) "
                f"VALUES (%s, %s, %s, %s, %s, {_NOW}, {_NOW}) ON CONFLICT (series_uid) DO UPDATE SET "
                "instances = series.instances + excluded.instances, last_received = excluded.last_received, "
                "updated = excluded.updated, "
                "attempts = CASE WHEN series.status IN ('done', 'failed') AND excluded.instances > 0 THEN 0 "
                "ELSE series.attempts END, "
                "next_attempt = CASE WHEN series.status IN ('done', 'failed') AND excluded.instances > 0 THEN NULL "
                "ELSE series.next_attempt END, "
                "status = CASE WHEN series.status IN ('done', 'failed') AND excluded.instances > 0 THEN 'receiving' "
                "ELSE series.status END",
                (series_uid, study_uid, calling_ae, str(folder), new))

        self._run(work)

    def claim(self, quiet_period_s: float, *, owner: str, lease_s: float) -> dict | None:
        def work(cur):
            cur.execute(
                "WITH job AS (SELECT series_uid FROM series WHERE status = 'receiving' "
                f"AND last_received < {_NOW} - %(quiet)s AND (next_attempt IS NULL OR next_attempt <= {_NOW}) "
                "ORDER BY COALESCE(next_attempt, last_received) LIMIT 1 FOR UPDATE SKIP LOCKED) "
                f"UPDATE series s SET status = 'processing', attempts = s.attempts + 1, owner = %(owner)s, "
                f"lease_until = {_NOW} + %(lease)s, updated = {_NOW} FROM job WHERE s.series_uid = job.series_uid "
                "RETURNING s.series_uid, s.folder, s.attempts, s.last_received",
                {"quiet": float(quiet_period_s), "owner": owner, "lease": float(lease_s)})
            return cur.fetchone()

        row = self._run(work)
        if row is None:
            return None
        return {"series_uid": row[0], "folder": row[1], "attempts": row[2], "last_received": row[3], "owner": owner}

    def heartbeat(self, series_uid: str, owner: str, lease_s: float) -> bool:
        def work(cur):
            cur.execute(f"UPDATE series SET lease_until = {_NOW} + %s WHERE series_uid = %s AND owner = %s "
                        "AND status = 'processing'", (float(lease_s), series_uid, owner))
            return cur.rowcount == 1

        return self._run(work)

    def finish(self, series_uid: str, status: str, *, owner: str, seg_uid: str | None = None,
               error: str | None = None, retry_in_s: float | None = None, note: str | None = None) -> bool:
        self._check_finish(status, retry_in_s)

        def work(cur):
            cur.execute(
                f"UPDATE series SET status = %(status)s, seg_uid = %(seg)s, error = %(error)s, "
                f"next_attempt = {_NOW} + %(retry)s::float8, lease_until = NULL, updated = {_NOW}, "
                "note = COALESCE(%(note)s, note) "
                "WHERE series_uid = %(uid)s AND owner = %(owner)s AND status = 'processing'",
                {"status": status, "seg": seg_uid, "error": error, "uid": series_uid, "owner": owner, "note": note,
                 "retry": None if retry_in_s is None else float(retry_in_s)})   # NULL + now: NULL, no backoff
            return cur.rowcount == 1

        return self._run(work)

    def _requeue(self, where: str, params: dict, max_attempts: int, why: str) -> tuple[int, list[dict]]:
        def work(cur):
            cur.execute(_pg_requeue_sql(where), {**params, "max": max_attempts, "why": why})
            return cur.fetchall()

        rows = [dict(zip(_RECORDED, r)) for r in self._run(work)]
        failed = [r for r in rows if r["status"] == "failed"]
        return len(rows) - len(failed), failed

    def requeue_expired(self, max_attempts: int) -> tuple[int, list[dict]]:
        return self._requeue(f"lease_until IS NULL OR lease_until < {_NOW}", {}, max_attempts,
                             "its worker's lease expired")

    def recover(self, max_attempts: int, node_id: str) -> tuple[int, list[dict]]:
        # never a live node's series: only expired leases, and those of a previous run under the same node_id
        return self._requeue(f"lease_until IS NULL OR lease_until < {_NOW} OR starts_with(owner, %(node)s)",
                             {"node": f"{node_id}/"}, max_attempts, "the node stopped")

    def depth(self) -> int:
        def work(cur):
            cur.execute("SELECT count(*) FROM series WHERE status IN ('receiving', 'processing')")
            return cur.fetchone()[0]

        return self._run(work)

    def series(self) -> list[dict]:
        def work(cur):
            cur.execute("SELECT * FROM series ORDER BY last_received")
            names = [d.name for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

        return self._run(work)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# ---- URLs ----------------------------------------------------------------------------------------
def check_queue_url(url: str) -> None:
    """ValueError unless ``url`` is sqlite:///<path> or postgresql://... without a password in it."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"queue_url must be a non-empty string, got {url!r}")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ValueError(f"queue_url: a sqlite URL is sqlite:///<relative path> or sqlite:////<absolute path>, "
                             f"got {url!r}")
    elif scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise ValueError("queue_url must not contain a password: give it to libpq in PGPASSWORD or ~/.pgpass "
                             f"(got {redact(url)!r})")
    else:
        raise ValueError(f"queue_url must be sqlite:///<path> or postgresql://user@host:port/dbname, got "
                         f"scheme {scheme!r}")


def redact(url: str) -> str:
    """``url`` with any password replaced by '***', for logs and /healthz."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def open_queue(url: str | None, workdir: str | Path) -> JobQueue:
    """The queue at ``url``: None → sqlite at ``workdir``/queue.sqlite; ``sqlite:///relative/path`` or
    ``sqlite:////absolute/path`` (SQLAlchemy's convention: a relative path is relative to the current
    directory); ``postgresql://user@host:port/dbname`` (libpq's URL; the password from ``PGPASSWORD`` or
    ``~/.pgpass``; ``?options=-csearch_path%3Dduplus`` selects a schema)."""
    if url is None:
        return SqliteJobQueue(Path(workdir) / "queue.sqlite")
    check_queue_url(url)
    if url.lower().startswith("sqlite:"):
        return SqliteJobQueue(Path(url[len("sqlite:///"):]))
    return PostgresJobQueue(url)
