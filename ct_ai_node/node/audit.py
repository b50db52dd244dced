"""The audit log: who did what to the node, when (web app and API actions).

One table in the node's database. Entries are never edited or deleted by the node; they
name a user (or API token), an action, the job it was about and a one-line detail
without patient data (job ids, destination and rule names, outcomes).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL    NOT NULL,
    user    TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    job_id  INTEGER,
    outcome TEXT    NOT NULL,
    detail  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_job ON audit(job_id);
"""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    user: str
    action: str
    job_id: int | None
    outcome: str  # "ok" or "refused"
    detail: str

    def as_dict(self) -> dict:
        return {"id": self.id, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at)),
                "user": self.user, "action": self.action, "job_id": self.job_id, "outcome": self.outcome,
                "detail": self.detail}


class AuditLog:
    def __init__(self, db_path: str | os.PathLike, busy_timeout_s: float = 30.0, clock=time.time):
        self.db_path = Path(db_path)
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, timeout=busy_timeout_s, check_same_thread=False,
                                   isolation_level=None)
        self._db.executescript(_SCHEMA)

    def record(self, user: str, action: str, outcome: str, detail: str, job_id: int | None = None) -> None:
        detail = " ".join(str(detail).split())[:500]
        with self._lock:
            self._db.execute("INSERT INTO audit (at, user, action, job_id, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
                             (self.clock(), user, action, job_id, outcome, detail))

    def entries(self, job_id: int | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first; those about ``job_id`` only when given."""
        where, args = ("WHERE job_id = ?", (job_id,)) if job_id is not None else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT id, at, user, action, job_id, outcome, detail FROM audit {where} "
                                    "ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [AuditEntry(*r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
