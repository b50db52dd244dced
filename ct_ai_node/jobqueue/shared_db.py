"""The connection to the database that the node's hosts share, and riding out its outages.

With ``queue: {kind: postgres}`` the job queue, the revision log and the job log live in one
PostgreSQL database that ingress nodes and workers on other hosts reach over the network.
:class:`PgConnection` is one process's connection to it: reopened after a ``fork``, one
statement or transaction at a time (a lock), and, when the server goes away (a restart, a
fail-over, a network cut), each call waits for it to come back for up to ``reconnect_s``
instead of failing the job it was made for. Errors that waiting cannot cure (a wrong
password, a missing database, bad SQL) fail at once.

:class:`SqlTable` is the small helper the revision and job logs use so that the same code runs
on the node's SQLite file (one host) or on that PostgreSQL database.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLSTATE classes that waiting does not cure: 28 authorisation, 3D no such database,
#: 42 syntax or access rule; anything else with a lost connection is worth retrying
_FATAL_CLASSES = ("28", "3D", "42")


def _redacted(url: str) -> str:
    """The URL without its password, for log lines and messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class DatabaseUnavailable(ConnectionError):
    """The shared database stayed unreachable for longer than ``reconnect_s``."""


class PgConnection:
    """One process's connection to the shared PostgreSQL database (autocommit; a ``work``
    given to :meth:`run` opens its own transaction when it needs one)."""

    def __init__(self, url: str, reconnect_s: float = 300.0, connect_timeout_s: float = 10.0):
        self.url = url
        self.reconnect_s = float(reconnect_s)
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.RLock()
        self._conn = None
        self._pid = -1

    @property
    def where(self) -> str:
        return _redacted(self.url)

    def _connect(self):
        import psycopg

        if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
            return self._conn
        # never use a connection across a fork: the parent's socket is not ours to talk on
        self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=int(self.connect_timeout_s))
        self._pid = os.getpid()
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass

    def run(self, work: Callable[[Any], T], reconnect_s: float | None = None) -> T:
        """``work(connection)``, again on a fresh connection while the server is unreachable,
        for up to ``reconnect_s`` (default the connection's). ``work`` must be safe to repeat:
        one transaction, or statements that are idempotent."""
        import psycopg

        limit = self.reconnect_s if reconnect_s is None else reconnect_s
        deadline = time.monotonic() + limit
        delay, warned = 0.5, False
        while True:
            try:
                with self._lock:  # one statement at a time; never held while waiting below
                    result = work(self._connect())
                if warned:
                    log.warning("database %s reachable again", self.where)
                return result
            except psycopg.OperationalError as exc:
                state = getattr(exc, "sqlstate", None) or ""
                if state[:2] in _FATAL_CLASSES:
                    raise
                with self._lock:
                    self._drop()
                if time.monotonic() + delay > deadline:
                    raise DatabaseUnavailable(f"database {self.where} unreachable for {limit:g} s: "
                                              f"{' '.join(str(exc).split())[:200]}") from exc
                if not warned:
                    log.warning("database %s unreachable (%s); waiting up to %g s", self.where,
                                " ".join(str(exc).split())[:120], limit)
                    warned = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def create_schema(self, ddl: str, lock_id: int) -> None:
        """Run the ``;``-separated CREATE statements of ``ddl`` in one transaction, under the
        advisory lock ``lock_id``: processes starting at once would otherwise collide in
        PostgreSQL's catalogue (``CREATE ... IF NOT EXISTS`` is not safe against that)."""
        statements = [s for s in ddl.split(";") if s.strip()]

        def create(conn):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
                for stmt in statements:
                    conn.execute(stmt)

        self.run(create)

    def execute(self, sql: str, args: tuple = (), reconnect_s: float | None = None) -> list[tuple]:
        """One statement (``%s`` placeholders), committed; its rows (empty without any)."""
        def work(conn):
            cur = conn.execute(sql, args)
            return cur.fetchall() if cur.description is not None else []

        return self.run(work, reconnect_s)

    def close(self) -> None:
        with self._lock:
            self._drop()


class SqlTable:
    """Statements on the node's SQLite file or on the shared PostgreSQL database, written
    once with ``?`` placeholders and portable SQL (``INSERT ... ON CONFLICT ... DO UPDATE``
    works in both). ``schema`` maps ``sqlite``/``postgres`` to the CREATE statements."""

    def __init__(self, target: str | os.PathLike, schema: dict[str, str], *, reconnect_s: float = 300.0,
                 busy_timeout_s: float = 30.0):
        self.postgres = isinstance(target, str) and target.startswith(("postgres://", "postgresql://"))
        self._local = threading.local()
        self._busy_timeout_s = busy_timeout_s
        if self.postgres:
            self._pg = PgConnection(str(target), reconnect_s)
            self._pg.create_schema(schema["postgres"], lock_id=4242001)
        else:
            self.db_path = Path(target)
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._sqlite().executescript(schema["sqlite"])

    def _sqlite(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            con = sqlite3.connect(self.db_path, timeout=self._busy_timeout_s, isolation_level=None)
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def execute(self, sql: str, args: tuple = (), reconnect_s: float | None = None) -> list[tuple]:
        """One statement, committed; its rows. ``reconnect_s`` (PostgreSQL): how long to wait
        for the server this time (0: one try)."""
        if self.postgres:
            return self._pg.execute(sql.replace("?", "%s"), args, reconnect_s)
        return self._sqlite().execute(sql, args).fetchall()

    def close(self) -> None:
        if self.postgres:
            self._pg.close()
        else:
            con = getattr(self._local, "con", None)
            if con is not None and getattr(self._local, "pid", None) == os.getpid():
                con.close()
            self._local.con = None
