"""``SqliteJobQueue``: the ``JobQueue`` protocol on one SQLite file.

Safe for several processes on the same file (workers are separate processes):
WAL journal, ``synchronous=FULL`` (a job acknowledged is a job on disk), a busy
timeout, and every read-modify-write inside ``BEGIN IMMEDIATE`` so two claimers
serialise on SQLite's write lock and never get the same job. Each process must
open its own queue; a connection inherited through ``fork`` is reopened on first use.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ct_ai_node.jobqueue.base import (
    LEASED_STATES,
    NORMAL,
    Job,
    JobNotFound,
    JobState,
    JobStateError,
    after_failure,
    check_lease,
    claim_rank_sql,
    crash_loop_reason,
)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    key          TEXT    UNIQUE,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    next_run_at  REAL    NOT NULL,
    lease_owner  TEXT,
    lease_until  REAL,
    parent_id    INTEGER REFERENCES jobs(id),
    last_error   TEXT,
    created_at   REAL    NOT NULL,
    updated_at   REAL    NOT NULL,
    priority     INTEGER NOT NULL DEFAULT 1,
    lane         TEXT
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_run_at);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent_id);
"""

JOB_COLUMNS = ("id, kind, payload, key, state, attempts, max_attempts, next_run_at, lease_owner, "
            "lease_until, parent_id, last_error, created_at, updated_at, priority, lane")
#: columns added after the first release: (name, definition) for ALTER TABLE on older files
_ADDED_COLUMNS = (("priority", "INTEGER NOT NULL DEFAULT 1"), ("lane", "TEXT"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def row_to_job(row: tuple) -> Job:
    """A ``Job`` from a row of ``JOB_COLUMNS`` (payload as JSON text or already decoded)."""
    (id_, kind, payload, key, state, attempts, max_attempts, next_run_at, lease_owner,
     lease_until, parent_id, last_error, created_at, updated_at, priority, lane) = row
    return Job(id=id_, kind=kind, payload=json.loads(payload) if isinstance(payload, str) else payload,
               key=key, state=JobState(state), attempts=attempts, max_attempts=max_attempts,
               next_run_at=next_run_at, lease_owner=lease_owner, lease_until=lease_until,
               parent_id=parent_id, last_error=last_error, created_at=created_at, updated_at=updated_at,
               priority=priority, lane=lane)


class SqliteJobQueue:
    """Durable job queue in ``db_path`` (the file may be shared with other tables)."""

    def __init__(self, db_path: str | os.PathLike, backoff_initial_s: float = 5,
                 backoff_max_s: float = 300, clock: Callable[[], float] = time.time,
                 priority_aging_s: float = 600.0):
        self.db_path = Path(db_path)
        self.priority_aging_s = float(priority_aging_s)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        # the scheduler may call from several threads; one connection, one lock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        with self._lock:
            self._connect()  # creates the schema; fails early on a bad path

    # -- connection -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # a connection must never cross a fork: drop the inherited one without closing
        # it (closing could touch the parent's locks) and open our own
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(stmt)
            have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            for name, definition in _ADDED_COLUMNS:
                if name not in have:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so a
        read-then-update cannot interleave with another process."""
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> "SqliteJobQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------

    def _load(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        return row_to_job(row)

    # -- protocol ---------------------------------------------------------------------

    def enqueue(self, kind: str, payload: dict[str, Any], *, key: str | None = None,
                max_attempts: int = 5, parent_id: int | None = None,
                run_at: float | None = None, priority: int = NORMAL, lane: str | None = None) -> int:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        body = json.dumps(payload, sort_keys=True)  # fails early on non-JSON payloads
        now = self.clock()
        with self._tx() as db:
            if key is not None:
                row = db.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    return row[0]
            cur = db.execute(
                "INSERT INTO jobs (kind, payload, key, state, attempts, max_attempts, next_run_at,"
                " parent_id, created_at, updated_at, priority, lane) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)",
                (kind, body, key, JobState.QUEUED.value, max_attempts,
                 now if run_at is None else run_at, parent_id, now, now, int(priority), lane))
            job_id = cur.lastrowid
        log.info("job %d enqueued: %s", job_id, kind)
        return job_id

    def claim(self, kinds: Iterable[str], owner: str, lease_s: float,
              lanes: Iterable[str] = ()) -> Job | None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        lanes = [lanes] if isinstance(lanes, str) else list(lanes)
        if not kinds:
            return None
        marks = ",".join("?" * len(kinds))
        lane_marks = ",".join("?" * len(lanes))
        in_lane = f"(lane IS NULL OR lane IN ({lane_marks}))" if lanes else "lane IS NULL"
        with self._tx() as db:
            while True:
                now = self.clock()
                row = db.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE kind IN ({marks}) AND {in_lane} AND ("
                    " (state = 'queued' AND next_run_at <= ?)"
                    " OR (state IN ('running', 'sending') AND lease_until < ?))"
                    f" ORDER BY {claim_rank_sql('?', '?')}, id LIMIT 1",
                    (*kinds, *lanes, now, now, now, self.priority_aging_s)).fetchone()
                if row is None:
                    return None
                job = row_to_job(row)
                reason = crash_loop_reason(job)  # a job that kills its worker every time must not loop
                if reason is not None:
                    db.execute("UPDATE jobs SET state = 'dead', lease_owner = NULL, lease_until = NULL,"
                               " last_error = ?, updated_at = ? WHERE id = ?", (reason, now, job.id))
                    log.warning("job %d dead: %s", job.id, reason)
                    continue
                if job.state in LEASED_STATES:
                    log.warning("job %d: lease of %s expired, reclaimed by %s",
                                job.id, job.lease_owner, owner)
                db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?,"
                           " lease_until = ?, updated_at = ? WHERE id = ?",
                           (owner, now + lease_s, now, job.id))
                return self._load(db, job.id)

    def renew(self, job_id: int, owner: str, lease_s: float) -> bool:
        with self._tx() as db:
            now = self.clock()
            cur = db.execute("UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ?"
                             " AND lease_owner = ? AND state IN ('running', 'sending')",
                             (now + lease_s, now, job_id, owner))
            return cur.rowcount == 1

    def set_state(self, job_id: int, state: JobState | str, owner: str | None = None) -> None:
        state = JobState(state)
        with self._tx() as db:
            job = self._load(db, job_id)
            check_lease(job, owner)
            now = self.clock()
            if state in LEASED_STATES:
                # e.g. running -> sending: the lease stays with whoever holds it
                db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?",
                           (state.value, now, job_id))
            else:
                db.execute("UPDATE jobs SET state = ?, lease_owner = NULL, lease_until = NULL,"
                           " next_run_at = CASE WHEN ? = 'queued' THEN ? ELSE next_run_at END,"
                           " updated_at = ? WHERE id = ?", (state.value, state.value, now, now, job_id))
        log.info("job %d -> %s", job_id, state)

    def complete(self, job_id: int, owner: str | None = None) -> None:
        self.set_state(job_id, JobState.DONE, owner)

    def fail(self, job_id: int, reason: str, *, retryable: bool = True,
             owner: str | None = None) -> str:
        reason = _one_line(reason)
        with self._tx() as db:
            job = self._load(db, job_id)
            check_lease(job, owner)
            now = self.clock()
            state, next_run_at = after_failure(job, retryable, now, self.backoff_initial_s, self.backoff_max_s)
            db.execute("UPDATE jobs SET state = ?, next_run_at = ?, lease_owner = NULL,"
                       " lease_until = NULL, last_error = ?, updated_at = ? WHERE id = ?",
                       (state.value, next_run_at, reason, now, job_id))
        if state is JobState.DEAD:
            log.warning("job %d dead after %d attempt(s): %s", job_id, job.attempts, reason)
        else:
            log.info("job %d attempt %d failed, retry in %.0f s: %s",
                     job_id, job.attempts, next_run_at - now, reason)
        return state.value

    def mark_failed(self, job_id: int, reason: str) -> None:
        reason = _one_line(reason)
        with self._tx() as db:
            self._load(db, job_id)
            db.execute("UPDATE jobs SET state = 'failed', lease_owner = NULL, lease_until = NULL,"
                       " last_error = ?, updated_at = ? WHERE id = ?", (reason, self.clock(), job_id))
        log.warning("job %d failed: %s", job_id, reason)

    def requeue(self, job_id: int) -> None:
        """Admin re-run: attempts start again from 0, due now. ``last_error`` is kept as
        history until the next failure replaces it."""
        with self._tx() as db:
            job = self._load(db, job_id)
            if job.state in LEASED_STATES:
                raise JobStateError(f"job {job_id} is {job.state} (leased by {job.lease_owner}); "
                                    "requeue it once it has stopped")
            now = self.clock()
            db.execute("UPDATE jobs SET state = 'queued', attempts = 0, next_run_at = ?,"
                       " lease_owner = NULL, lease_until = NULL, updated_at = ? WHERE id = ?",
                       (now, now, job_id))
        log.info("job %d requeued", job_id)

    def cancel(self, job_id: int, reason: str) -> None:
        """Admin cancel of a job that waits (``queued``): it ends ``dead`` with ``reason``.
        A job a worker holds cannot be taken from it (JobStateError); a final one stays."""
        reason = _one_line(reason)
        with self._tx() as db:
            job = self._load(db, job_id)
            if job.state is not JobState.QUEUED:
                raise JobStateError(f"job {job_id} is {job.state}; only a queued job can be cancelled")
            db.execute("UPDATE jobs SET state = 'dead', last_error = ?, updated_at = ? WHERE id = ?",
                       (reason, self.clock(), job_id))
        log.info("job %d cancelled", job_id)

    # -- reads ------------------------------------------------------------------------

    def _select(self, where: str, args: tuple, order: str, limit: int | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY {order}"
        if limit is not None:
            sql, args = sql + " LIMIT ?", (*args, limit)
        with self._lock:
            return [row_to_job(r) for r in self._connect().execute(sql, args).fetchall()]

    def get(self, job_id: int) -> Job | None:
        found = self._select("WHERE id = ?", (job_id,), "id")
        return found[0] if found else None

    def list(self, state: JobState | str | None = None, kind: str | None = None,
             limit: int = 100) -> list[Job]:
        """Newest first."""
        conds, args = [], []
        if state is not None:
            conds.append("state = ?")
            args.append(JobState(state).value)
        if kind is not None:
            conds.append("kind = ?")
            args.append(kind)
        where = ("WHERE " + " AND ".join(conds)) if conds else ""
        return self._select(where, tuple(args), "id DESC", limit)

    def children(self, parent_id: int) -> list[Job]:
        return self._select("WHERE parent_id = ?", (parent_id,), "id")

    def for_series(self, series_keys: Iterable[str],
                   kinds: Iterable[str] = ("analyse", "forward")) -> list[Job]:
        """Jobs of ``kinds`` whose payload names one of ``series_keys``, oldest first. By default
        the parents: a parent is ``done`` only once every delivery of its results is."""
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not kinds:
            return []
        marks = ",".join("?" * len(kinds))
        # one JSON array parameter: any number of keys, no SQLite variable limit
        return self._select(f"WHERE kind IN ({marks}) AND json_extract(payload, '$.series_key')"
                            " IN (SELECT value FROM json_each(?))",
                            (*kinds, json.dumps(sorted(set(series_keys)))), "id")

    def changed_since(self, since: float, kinds: Iterable[str], limit: int = 1000) -> list[Job]:
        """Jobs of ``kinds`` last changed after ``since``, oldest change first."""
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not kinds:
            return []
        marks = ",".join("?" * len(kinds))
        return self._select(f"WHERE kind IN ({marks}) AND updated_at > ?", (*kinds, since), "updated_at, id", limit)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._connect().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = dict(rows)
        return {s.value: found.get(s.value, 0) for s in JobState}

