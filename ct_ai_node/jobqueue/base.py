"""The job queue contract: ``Job``, ``JobState``, the ``JobQueue`` protocol, ``backoff_delay``.

The protocol is deliberately small and engine-neutral: nothing in it names SQLite,
so a Celery/Redis (or any broker) implementation can sit behind it later. Callers
only rely on: durable jobs with an idempotency key, exclusive time-bounded leases
(``claim`` / ``renew``), and retry bookkeeping (``fail`` with backoff, ``dead`` after
``max_attempts``). Times are seconds since the epoch, from the queue's clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

from ct_ai_node.errors import CtAiNodeError


class JobState(str, enum.Enum):
    """Where a job is. ``done``, ``failed`` and ``dead`` are final (until ``requeue``)."""

    QUEUED = "queued"  # waiting for next_run_at
    RUNNING = "running"  # leased by a worker
    SENDING = "sending"  # a parent whose deliver children are on their way (still leased)
    DONE = "done"
    FAILED = "failed"  # a parent whose child ended dead (mark_failed)
    DEAD = "dead"  # out of attempts, or a non-retryable error

    def __str__(self) -> str:  # "queued", not "JobState.QUEUED", in logs and f-strings
        return self.value


#: priority ranks (lower goes first); ``config.PRIORITIES`` maps the rules' names onto them
URGENT, NORMAL, BACKGROUND = 0, 1, 2

#: the kinds of job that stand for a series (their deliveries are children)
PARENT_KINDS = ("analyse", "forward")

#: states a worker holds a lease in
LEASED_STATES = frozenset({JobState.RUNNING, JobState.SENDING})
#: states nothing will move on its own
FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.DEAD})


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    key: str | None
    state: JobState
    attempts: int
    max_attempts: int
    next_run_at: float
    lease_owner: str | None
    lease_until: float | None
    parent_id: int | None
    last_error: str | None
    created_at: float
    updated_at: float = field(compare=False)
    #: 0 urgent, 1 normal, 2 background
    priority: int = NORMAL
    #: None: any worker may take the job; else only workers that serve this lane (deliveries
    #: of result files that lie on one worker host's disk)
    lane: str | None = None


class JobQueueError(CtAiNodeError):
    """Base of the queue's own errors."""


class JobNotFound(JobQueueError, KeyError):
    def __str__(self) -> str:  # KeyError would print the repr of the argument
        return str(self.args[0]) if self.args else "job not found"


class LeaseLost(JobQueueError):
    """The caller named itself as owner but the job's lease now belongs to someone else
    (it expired and another worker claimed the job): the stale worker must stop."""


class JobStateError(JobQueueError):
    """The requested change does not fit the job's current state."""


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): exponential,
    ``initial_s * 2**(attempt-1)``, capped at ``max_s``. No jitter, so the schedule is
    predictable and testable; workers poll, so there is no thundering herd to spread."""
    if attempt < 1:
        return 0.0
    # cap the exponent first: 2**big would overflow a float long before it matters
    return float(min(max_s, initial_s * (2 ** min(attempt - 1, 62))))


def claim_rank_sql(now: str, aging_s: str) -> str:
    """The claim order's SQL expression (SQLite and PostgreSQL alike): the priority rank less
    one level per ``aging_s`` waited since the job became due (or its lease ran out), so
    urgent work goes first and waiting work is never starved. ``now``/``aging_s`` are the
    placeholders of those values."""
    return (f"(priority - ({now} - CASE WHEN state = 'queued' THEN next_run_at ELSE lease_until END)"
            f" / {aging_s})")


def check_lease(job: Job, owner: str | None) -> None:
    """``LeaseLost`` unless ``owner`` (when given) holds ``job``'s lease."""
    if owner is not None and (job.lease_owner != owner or job.state not in LEASED_STATES):
        raise LeaseLost(f"job {job.id} is no longer leased by {owner} "
                        f"(state {job.state}, owner {job.lease_owner})")


def crash_loop_reason(job: Job) -> str | None:
    """Why a job whose lease expired must not be claimed again (its worker died on it on
    every attempt: it ends ``dead``), or None."""
    if job.state in LEASED_STATES and job.attempts >= job.max_attempts:
        return (f"lease of {job.lease_owner} expired on attempt {job.attempts} of "
                f"{job.max_attempts} (worker crashed or hung)")
    return None


def after_failure(job: Job, retryable: bool, now: float, initial_s: float, max_s: float) -> tuple[JobState, float]:
    """(state, next_run_at) of ``job`` after a failed attempt: ``queued`` after the backoff
    while attempts remain and the error is retryable, else ``dead``."""
    if retryable and job.attempts < job.max_attempts:
        return JobState.QUEUED, now + backoff_delay(max(job.attempts, 1), initial_s, max_s)
    return JobState.DEAD, job.next_run_at


@runtime_checkable
class JobQueue(Protocol):
    """Durable jobs with idempotency keys, exclusive leases and retries with backoff.

    Engine-neutral on purpose (SQLite now, a broker later). Semantics every
    implementation keeps:

    - ``enqueue`` with a ``key`` that exists returns the existing job's id.
    - ``claim`` is atomic: one job goes to one owner. It takes a due ``queued`` job, or a
      ``running``/``sending`` job whose lease expired (its worker crashed), of the given
      kinds, in no lane or in one of ``lanes``; it counts an attempt and sets ``running``.
      Order: ``claim_rank`` (priority, raised by waiting), then the oldest.
    - ``owner`` arguments, when given, must hold the lease, else ``LeaseLost``.
    - ``fail`` returns the new state: ``queued`` (retry after backoff) or ``dead``.
    """

    def enqueue(self, kind: str, payload: dict[str, Any], *, key: str | None = None,
                max_attempts: int = 5, parent_id: int | None = None,
                run_at: float | None = None, priority: int = NORMAL, lane: str | None = None) -> int: ...

    def claim(self, kinds: Iterable[str], owner: str, lease_s: float,
              lanes: Iterable[str] = ()) -> Job | None: ...

    def renew(self, job_id: int, owner: str, lease_s: float) -> bool: ...

    def set_state(self, job_id: int, state: JobState | str, owner: str | None = None) -> None: ...

    def complete(self, job_id: int, owner: str | None = None) -> None: ...

    def fail(self, job_id: int, reason: str, *, retryable: bool = True,
             owner: str | None = None) -> str: ...

    def mark_failed(self, job_id: int, reason: str) -> None: ...

    def requeue(self, job_id: int) -> None: ...

    def cancel(self, job_id: int, reason: str) -> None: ...

    def get(self, job_id: int) -> Job | None: ...

    def list(self, state: JobState | str | None = None, kind: str | None = None,
             limit: int = 100) -> list[Job]: ...

    def children(self, parent_id: int) -> list[Job]: ...

    def for_series(self, series_keys: Iterable[str],
                   kinds: Iterable[str] = ("analyse", "forward")) -> list[Job]: ...

    def changed_since(self, since: float, kinds: Iterable[str], limit: int = 1000) -> list[Job]: ...

    def counts(self) -> dict[str, int]: ...
