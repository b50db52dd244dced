"""Each job's own log lines and result summary, for its page in the web app.

A worker process attaches :class:`JobLogHandler` to the ``ct_ai_node`` logger; while it runs
a job, the INFO and higher records of any of its threads are kept in the ``job_log`` table
beside the job queue (the node's SQLite file, or the PostgreSQL database the hosts share, so
the ingress node's web app shows the lines of a worker on another host), at most
:data:`MAX_LINES` per job. While that database is unreachable the lines are dropped (the
node's own log still has them): a log line must never wait for a database. Log lines above
DEBUG carry no patient data (docs/node.md, "Logs and secrets"), so neither do these.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ct_ai_node.jobqueue import shared_db
from ct_ai_node.jobqueue.shared_db import SqlTable

MAX_LINES = 200
#: the lines about the database itself are not kept in it
_DB_LOGGER = shared_db.__name__
_COLUMNS = """
    job_id  BIGINT  NOT NULL,
    at      DOUBLE PRECISION NOT NULL,
    level   TEXT    NOT NULL,
    process TEXT    NOT NULL,
    message TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS job_log_job ON job_log(job_id);
"""
_SUMMARY = """;
CREATE TABLE IF NOT EXISTS job_summary (
    job_id  BIGINT  PRIMARY KEY,
    summary TEXT    NOT NULL,
    at      DOUBLE PRECISION NOT NULL
)
"""
_SCHEMA = {"sqlite": "CREATE TABLE IF NOT EXISTS job_log (id INTEGER PRIMARY KEY AUTOINCREMENT," + _COLUMNS + _SUMMARY,
           "postgres": "CREATE TABLE IF NOT EXISTS job_log (id BIGSERIAL PRIMARY KEY," + _COLUMNS + _SUMMARY}


class JobLog:
    """``target``: the node's SQLite file or the shared PostgreSQL URL."""

    def __init__(self, target: str | os.PathLike):
        self._lock = threading.Lock()
        self._db = SqlTable(target, _SCHEMA)
        self._counts: dict[int, int] = {}

    def add(self, job_id: int, level: str, process: str, message: str, at: float | None = None) -> None:
        """One line; one try at the database (``DatabaseUnavailable`` when it is away). The
        lock guards the counts only: a slow database never holds up another thread here."""
        with self._lock:
            n = self._counts.get(job_id)
        if n is None:
            (n,), = self._db.execute("SELECT COUNT(*) FROM job_log WHERE job_id = ?", (job_id,), reconnect_s=0)
        if n >= MAX_LINES:
            return
        if n == MAX_LINES - 1:
            level, message = "WARNING", f"(more than {MAX_LINES} lines: the rest is in the node's log)"
        self._db.execute("INSERT INTO job_log (job_id, at, level, process, message) VALUES (?, ?, ?, ?, ?)",
                         (job_id, at or time.time(), level, process, message[:1000]), reconnect_s=0)
        with self._lock:
            if len(self._counts) > 1000:
                self._counts.clear()
            self._counts[job_id] = n + 1

    def lines(self, job_id: int) -> list[dict]:
        rows = self._db.execute("SELECT at, level, process, message FROM job_log WHERE job_id = ? ORDER BY id",
                                (job_id,), reconnect_s=5)
        return [{"at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}",
                 "level": level, "process": process, "message": message} for at, level, process, message in rows]

    def set_summary(self, job_id: int, summary: dict) -> None:
        """Keep ``summary`` (``result.summarize_result``) as the job's result."""
        import json

        self._db.execute("INSERT INTO job_summary (job_id, summary, at) VALUES (?, ?, ?) ON CONFLICT (job_id)"
                         " DO UPDATE SET summary = excluded.summary, at = excluded.at",
                         (job_id, json.dumps(summary), time.time()))

    def summaries(self, job_ids) -> dict[int, dict]:
        """Job id -> its kept result summary, for those of ``job_ids`` that have one."""
        import json

        ids = sorted({int(i) for i in job_ids})
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT job_id, summary FROM job_summary WHERE job_id IN ({marks})",
                                tuple(ids), reconnect_s=5)
        return {job_id: json.loads(text) for job_id, text in rows}

    def close(self) -> None:
        self._db.close()


class JobLogHandler(logging.Handler):
    """Keeps the records logged while ``job_id`` is set (INFO and above)."""

    def __init__(self, log: JobLog, process: str):
        super().__init__(logging.INFO)
        self.log, self.process = log, process
        self.job_id: int | None = None
        self._inside = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        job_id = self.job_id
        # not the lines about the database itself, nor one logged while a line is being kept
        # (keeping it talks to that database, which may log): no recursion, no waiting
        if job_id is None or record.name == _DB_LOGGER or getattr(self._inside, "busy", False):
            return
        self._inside.busy = True
        try:
            self.log.add(job_id, record.levelname, self.process, record.getMessage(), record.created)
        except Exception:  # noqa: BLE001 - the database is away: the line stays in the node's log only
            pass
        finally:
            self._inside.busy = False
