"""The job queue and shared tables a configuration names (``queue:`` in the node's file)."""

from __future__ import annotations

from pathlib import Path

from ct_ai_node.config import NodeConfig
from ct_ai_node.jobqueue.base import JobQueue


def shared_target(config: NodeConfig) -> str | Path:
    """Where the tables every host must see live (jobs, revisions, job logs): the PostgreSQL
    URL, or the node's own SQLite file."""
    q = config.queue
    if q.kind == "postgres":
        return q.url.get_secret_value()
    return config.storage.db_path


def open_queue(config: NodeConfig, *, reconnect_s: float | None = None) -> JobQueue:
    """This process's queue. ``reconnect_s``: how long calls wait for a PostgreSQL server that
    went away (default ``queue.reconnect_s``; the web app asks for less)."""
    q, retry = config.queue, config.retry
    if q.kind == "postgres":
        from ct_ai_node.jobqueue.postgres import PostgresJobQueue

        return PostgresJobQueue(q.url.get_secret_value(), backoff_initial_s=retry.backoff_initial_s,
                                backoff_max_s=retry.backoff_max_s, priority_aging_s=q.priority_aging_s,
                                reconnect_s=q.reconnect_s if reconnect_s is None else reconnect_s)
    from ct_ai_node.jobqueue.sqlite import SqliteJobQueue

    return SqliteJobQueue(config.storage.db_path, backoff_initial_s=retry.backoff_initial_s,
                          backoff_max_s=retry.backoff_max_s, priority_aging_s=q.priority_aging_s)
