"""Durable jobs between the scheduler and the worker processes.

``JobQueue`` is the engine-neutral protocol; ``SqliteJobQueue`` the implementation
used now (one SQLite file shared by the node's processes).
"""

from ct_ai_node.jobqueue.base import (
    FINAL_STATES,
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
    "FINAL_STATES", "LEASED_STATES", "PARENT_KINDS", "Job", "JobNotFound", "JobQueue", "JobQueueError", "JobState",
    "JobStateError", "LeaseLost", "SqliteJobQueue", "backoff_delay",
]
