"""Durable jobs between the scheduler and the worker processes.

``JobQueue`` is the engine-neutral protocol; ``SqliteJobQueue`` keeps jobs in the node's
SQLite file (one host, the default), ``PostgresJobQueue`` (``jobqueue.postgres``) in a
PostgreSQL database that several hosts share; ``open_queue`` (``jobqueue.factory``) opens
the one a configuration names.
"""

from ct_ai_node.jobqueue.base import (
    BACKGROUND,
    FINAL_STATES,
    NORMAL,
    URGENT,
    LEASED_STATES,
    PARENT_KINDS,
    Job,
    JobNotFound,
    JobQueue,
    JobQueueError,
    JobState,
    JobStateError,
    LeaseLost,
    backoff_delay,
)
from ct_ai_node.jobqueue.sqlite import SqliteJobQueue

__all__ = [
    "BACKGROUND", "NORMAL", "URGENT", "FINAL_STATES", "LEASED_STATES", "PARENT_KINDS", "Job", "JobNotFound", "JobQueue", "JobQueueError", "JobState",
    "JobStateError", "LeaseLost", "SqliteJobQueue", "backoff_delay",
]
