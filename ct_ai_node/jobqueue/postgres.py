"""``PostgresJobQueue``: the ``JobQueue`` protocol on a PostgreSQL server that several hosts share.

Same table, states and semantics as ``SqliteJobQueue`` (docs/scale-out.md says why PostgreSQL):

- a claim is ``SELECT ... FOR UPDATE SKIP LOCKED`` then ``UPDATE`` in one transaction, so
  concurrent workers on any host never get the same job and never wait on each other's row;
- leases, not acknowledgements on a held connection: a long analysis keeps its job by
  renewing the lease, a worker that dies (kill -9, a lost host) stops renewing and another
  worker takes the job once the lease runs out; nothing depends on a consumer timeout;
- times come from the server's clock (``clock_timestamp()``), so hosts whose clocks drift
  apart still agree on when a lease ran out (a ``clock`` can be passed for tests);
- a lost connection is retried for ``reconnect_s`` (``shared_db.PgConnection``): a database
  restart pauses the workers instead of failing their jobs.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable

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
from ct_ai_node.jobqueue.shared_db import PgConnection
from ct_ai_node.jobqueue.sqlite import JOB_COLUMNS, _one_line, row_to_job

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           BIGSERIAL PRIMARY KEY,
    kind         TEXT    NOT NULL,
    payload      JSONB   NOT NULL,
    key          TEXT    UNIQUE,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    next_run_at  DOUBLE PRECISION NOT NULL,
    lease_owner  TEXT,
    lease_until  DOUBLE PRECISION,
    parent_id    BIGINT REFERENCES jobs(id),
    last_error   TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL,
    priority     INTEGER NOT NULL DEFAULT 1,
    lane         TEXT
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (state, next_run_at) WHERE state IN ('queued', 'running', 'sending');
CREATE INDEX IF NOT EXISTS jobs_parent ON jobs (parent_id);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs ((payload->>'series_key'))
"""

_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"


class PostgresJobQueue:
    """Durable job queue in the ``jobs`` table of the database at ``url``."""

    def __init__(self, url: str, backoff_initial_s: float = 5, backoff_max_s: float = 300,
                 clock: Callable[[], float] | None = None, priority_aging_s: float = 600.0,
                 reconnect_s: float = 300.0):
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.priority_aging_s = float(priority_aging_s)
        self.clock = clock
        self.db = PgConnection(url, reconnect_s)
        self.db.create_schema(_SCHEMA, lock_id=4242000)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "PostgresJobQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------

    def _now(self, conn) -> float:
        if self.clock is not None:
            return float(self.clock())
        return conn.execute(_NOW).fetchone()[0]

    def _tx(self, work: Callable[[Any], Any]) -> Any:
        """``work(conn)`` in one transaction, repeated on a new connection after a lost one."""
        def run(conn):
            with conn.transaction():
                return work(conn)

        return self.db.run(run)

    @staticmethod
    def _load(conn, job_id: int, lock: bool = False) -> Job:
        row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s{' FOR UPDATE' if lock else ''}",
                           (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        return row_to_job(row)

    # -- protocol ---------------------------------------------------------------------

    def enqueue(self, kind: str, payload: dict[str, Any], *, key: str | None = None,
                max_attempts: int = 5, parent_id: int | None = None,
                run_at: float | None = None, priority: int = NORMAL, lane: str | None = None) -> int:
        from psycopg.types.json import Jsonb

        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        json.dumps(payload)  # fails early on non-JSON payloads, as the SQLite queue does

        def work(conn):
            now = self._now(conn)
            row = conn.execute(
                "INSERT INTO jobs (kind, payload, key, state, attempts, max_attempts, next_run_at, parent_id,"
                " created_at, updated_at, priority, lane) VALUES (%s, %s, %s, 'queued', 0, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (key) DO NOTHING RETURNING id",
                (kind, Jsonb(payload), key, max_attempts, now if run_at is None else run_at, parent_id, now, now,
                 int(priority), lane)).fetchone()
            if row is not None:
                return row[0], True
            return conn.execute("SELECT id FROM jobs WHERE key = %s", (key,)).fetchone()[0], False

        job_id, made = self._tx(work)
        if made:
            log.info("job %d enqueued: %s", job_id, kind)
        return job_id

    def claim(self, kinds: Iterable[str], owner: str, lease_s: float,
              lanes: Iterable[str] = ()) -> Job | None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        lanes = [lanes] if isinstance(lanes, str) else list(lanes)
        if not kinds:
            return None

        def work(conn):
            while True:
                now = self._now(conn)
                row = conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE kind = ANY(%s) AND (lane IS NULL OR lane = ANY(%s)) AND ("
                    " (state = 'queued' AND next_run_at <= %s)"
                    " OR (state IN ('running', 'sending') AND lease_until < %s))"
                    f" ORDER BY {claim_rank_sql('%s', '%s')}, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                    (kinds, lanes, now, now, now, self.priority_aging_s)).fetchone()
                if row is None:
                    return None
                job = row_to_job(row)
                reason = crash_loop_reason(job)  # a job that kills its worker every time must not loop
                if reason is not None:
                    conn.execute("UPDATE jobs SET state = 'dead', lease_owner = NULL, lease_until = NULL,"
                                 " last_error = %s, updated_at = %s WHERE id = %s", (reason, now, job.id))
                    log.warning("job %d dead: %s", job.id, reason)
                    continue
                if job.state in LEASED_STATES:
                    log.warning("job %d: lease of %s expired, reclaimed by %s", job.id, job.lease_owner, owner)
                row = conn.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = %s,"
                    f" lease_until = %s, updated_at = %s WHERE id = %s RETURNING {JOB_COLUMNS}",
                    (owner, now + lease_s, now, job.id)).fetchone()
                return row_to_job(row)

        return self._tx(work)

    def renew(self, job_id: int, owner: str, lease_s: float) -> bool:
        def work(conn):
            now = self._now(conn)
            cur = conn.execute("UPDATE jobs SET lease_until = %s, updated_at = %s WHERE id = %s"
                               " AND lease_owner = %s AND state IN ('running', 'sending')",
                               (now + lease_s, now, job_id, owner))
            return cur.rowcount == 1

        return self._tx(work)

    def set_state(self, job_id: int, state: JobState | str, owner: str | None = None) -> None:
        state = JobState(state)

        def work(conn):
            job = self._load(conn, job_id, lock=True)
            check_lease(job, owner)
            now = self._now(conn)
            if state in LEASED_STATES:
                conn.execute("UPDATE jobs SET state = %s, updated_at = %s WHERE id = %s", (state.value, now, job_id))
            else:
                conn.execute("UPDATE jobs SET state = %s, lease_owner = NULL, lease_until = NULL,"
                             " next_run_at = CASE WHEN %s = 'queued' THEN %s ELSE next_run_at END,"
                             " updated_at = %s WHERE id = %s", (state.value, state.value, now, now, job_id))

        self._tx(work)
        log.info("job %d -> %s", job_id, state)

    def complete(self, job_id: int, owner: str | None = None) -> None:
        self.set_state(job_id, JobState.DONE, owner)

    def fail(self, job_id: int, reason: str, *, retryable: bool = True, owner: str | None = None) -> str:
        reason = _one_line(reason)

        def work(conn):
            job = self._load(conn, job_id, lock=True)
            check_lease(job, owner)
            now = self._now(conn)
            state, next_run_at = after_failure(job, retryable, now, self.backoff_initial_s, self.backoff_max_s)
            conn.execute("UPDATE jobs SET state = %s, next_run_at = %s, lease_owner = NULL, lease_until = NULL,"
                         " last_error = %s, updated_at = %s WHERE id = %s",
                         (state.value, next_run_at, reason, now, job_id))
            return job, state, next_run_at - now

        job, state, wait = self._tx(work)
        if state is JobState.DEAD:
            log.warning("job %d dead after %d attempt(s): %s", job_id, job.attempts, reason)
        else:
            log.info("job %d attempt %d failed, retry in %.0f s: %s", job_id, job.attempts, wait, reason)
        return state.value

    def mark_failed(self, job_id: int, reason: str) -> None:
        reason = _one_line(reason)

        def work(conn):
            self._load(conn, job_id, lock=True)
            conn.execute("UPDATE jobs SET state = 'failed', lease_owner = NULL, lease_until = NULL,"
                         " last_error = %s, updated_at = %s WHERE id = %s", (reason, self._now(conn), job_id))

        self._tx(work)
        log.warning("job %d failed: %s", job_id, reason)

    def requeue(self, job_id: int) -> None:
        def work(conn):
            job = self._load(conn, job_id, lock=True)
            if job.state in LEASED_STATES:
                raise JobStateError(f"job {job_id} is {job.state} (leased by {job.lease_owner}); "
                                    "requeue it once it has stopped")
            now = self._now(conn)
            conn.execute("UPDATE jobs SET state = 'queued', attempts = 0, next_run_at = %s,"
                         " lease_owner = NULL, lease_until = NULL, updated_at = %s WHERE id = %s", (now, now, job_id))

        self._tx(work)
        log.info("job %d requeued", job_id)

    def cancel(self, job_id: int, reason: str) -> None:
        reason = _one_line(reason)

        def work(conn):
            job = self._load(conn, job_id, lock=True)
            if job.state is not JobState.QUEUED:
                raise JobStateError(f"job {job_id} is {job.state}; only a queued job can be cancelled")
            conn.execute("UPDATE jobs SET state = 'dead', last_error = %s, updated_at = %s WHERE id = %s",
                         (reason, self._now(conn), job_id))

        self._tx(work)
        log.info("job %d cancelled", job_id)

    # -- reads ------------------------------------------------------------------------

    def _select(self, where: str, args: tuple, order: str, limit: int | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY {order}"
        if limit is not None:
            sql, args = sql + " LIMIT %s", (*args, limit)
        return [row_to_job(r) for r in self.db.execute(sql, args)]

    def get(self, job_id: int) -> Job | None:
        found = self._select("WHERE id = %s", (job_id,), "id")
        return found[0] if found else None

    def list(self, state: JobState | str | None = None, kind: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        conds, args = [], []
        if state is not None:
            conds.append("state = %s")
            args.append(JobState(state).value)
        if kind is not None:
            conds.append("kind = %s")
            args.append(kind)
        where = ("WHERE " + " AND ".join(conds)) if conds else ""
        return self._select(where, tuple(args), "id DESC", limit)

    def children(self, parent_id: int) -> list[Job]:
        return self._select("WHERE parent_id = %s", (parent_id,), "id")

    def for_series(self, series_keys: Iterable[str],
                   kinds: Iterable[str] = ("analyse", "forward")) -> list[Job]:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not kinds:
            return []
        return self._select("WHERE kind = ANY(%s) AND payload->>'series_key' = ANY(%s)",
                            (kinds, sorted(set(series_keys))), "id")

    def changed_since(self, since: float, kinds: Iterable[str], limit: int = 1000) -> list[Job]:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not kinds:
            return []
        return self._select("WHERE kind = ANY(%s) AND updated_at > %s", (kinds, since), "updated_at, id", limit)

    def counts(self) -> dict[str, int]:
        found = dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return {s.value: found.get(s.value, 0) for s in JobState}
