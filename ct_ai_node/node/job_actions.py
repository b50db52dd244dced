"""What an administrator may do to a job: re-run, re-send, requeue, cancel.

One implementation for ``ct-ai-node jobs`` and the web app. Pure logic over the job queue
protocol and the spool (no HTTP, no printing): each action returns a one-line summary or
raises :class:`~ct_ai_node.jobqueue.JobStateError` / :class:`~ct_ai_node.jobqueue.JobNotFound`
with a reason an administrator can act on.
"""

from __future__ import annotations

import time
from pathlib import Path

from ct_ai_node.jobqueue import (
    FINAL_STATES,
    LEASED_STATES,
    PARENT_KINDS,
    Job,
    JobNotFound,
    JobQueue,
    JobState,
    JobStateError,
)

ACTIONS = ("rerun", "resend", "requeue", "cancel")


def _job(queue: JobQueue, job_id: int) -> Job:
    job = queue.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def result_deliveries(queue: JobQueue, job_id: int) -> list[Job]:
    """The deliveries of a job's results (not of a "not analysed" notice)."""
    return [c for c in queue.children(job_id) if c.kind == "deliver" and not c.payload.get("notice")]


def requeue(queue: JobQueue, job_id: int) -> str:
    """Run a failed or dead job again (attempts from zero). A parent whose results exist
    re-sends only its deliveries that did not arrive (a job with only "not analysed"
    notices was never analysed: it runs again whole)."""
    job = _job(queue, job_id)
    if job.state not in (JobState.FAILED, JobState.DEAD):
        raise JobStateError(f"job {job_id} is {job.state}; only a failed or dead job is requeued "
                            "(re-run or re-send a finished one)")
    results = result_deliveries(queue, job_id) if job.kind in PARENT_KINDS else []
    if results:
        redo = [c for c in results if c.state in (JobState.DEAD, JobState.FAILED)]
        for child in redo:
            queue.requeue(child.id)
        queue.set_state(job_id, JobState.SENDING)
        return f"job {job_id}: {len(redo)} delivery job(s) queued again"
    queue.requeue(job_id)
    return f"job {job_id} queued again"


def resend(queue: JobQueue, job_id: int) -> str:
    """Send a finished job's results again to every destination (e.g. the PACS lost them):
    the same files, so the same SOP Instance UIDs."""
    job = _job(queue, job_id)
    if job.kind not in PARENT_KINDS:
        raise JobStateError(f"job {job_id} is a {job.kind} job; re-send its {'/'.join(PARENT_KINDS)} job")
    if job.state not in FINAL_STATES:
        raise JobStateError(f"job {job_id} is {job.state}; re-send once it has finished")
    results = result_deliveries(queue, job_id)
    if not results:
        raise JobStateError(f"job {job_id} has no results to send (it was not analysed or has no destination)")
    missing = [c for c in results if not all(Path(f).is_file() for f in c.payload.get("files", []))]
    if missing:
        raise JobStateError(f"job {job_id}: its result files were removed (retention); re-run it instead")
    busy = [c for c in results if c.state in LEASED_STATES]
    if busy:
        raise JobStateError(f"job {job_id}: delivery job {busy[0].id} is being sent right now")
    for child in results:
        if child.state is not JobState.QUEUED:
            queue.requeue(child.id)
    queue.set_state(job_id, JobState.SENDING)
    return f"job {job_id}: {len(results)} delivery job(s) queued again"


def rerun(queue: JobQueue, spool, job_id: int, requested_by: str, clock=time.time) -> int:
    """Analyse (or forward) the job's series again as a new job with the same rule, pipeline
    and destinations; the same instances give the same revision (same result UIDs), so the
    PACS gets the results replaced, not doubled. Returns the new job's id."""
    job = _job(queue, job_id)
    if job.kind not in PARENT_KINDS:
        raise JobStateError(f"job {job_id} is a {job.kind} job; re-run its {'/'.join(PARENT_KINDS)} job")
    if job.state not in FINAL_STATES:
        raise JobStateError(f"job {job_id} is {job.state}; re-run once it has finished")
    key = job.payload.get("series_key")
    series = spool.get_series(key) if key else None
    if series is None or not spool.instance_paths(key):
        raise JobStateError(f"job {job_id}: the series' images are no longer in the spool (retention); "
                            "send the series again from the PACS")
    for other in queue.for_series([key], kinds=(job.kind,)):
        if other.payload.get("rerun_of") == job_id and other.state not in FINAL_STATES:
            raise JobStateError(f"job {job_id}: its re-run (job {other.id}) is {other.state}")
    payload = {**job.payload, "rerun_of": job_id, "requested_by": requested_by,
               "study_uid": series.study_instance_uid, "series_uid": series.series_instance_uid}
    return queue.enqueue(job.kind, payload, key=f"rerun:{job_id}:{clock():.6f}", max_attempts=job.max_attempts,
                         priority=job.priority)


def cancel(queue: JobQueue, job_id: int, requested_by: str) -> str:
    """Stop a job that is waiting (queued): it ends dead with who cancelled it; a job a
    worker is running is not taken from it."""
    job = _job(queue, job_id)
    if job.state in LEASED_STATES:
        raise JobStateError(f"job {job_id} is {job.state} by a worker; it cannot be cancelled now")
    queue.cancel(job_id, f"cancelled by {requested_by}")
    return f"job {job_id} cancelled"


def requeue_dead(queue: JobQueue, limit: int = 1000) -> list[str]:
    """:func:`requeue` every dead parent job (deliveries through their parents) and every
    dead delivery whose parent is not dead itself. One summary line per job."""
    done: list[str] = []
    for job in queue.list(state=JobState.DEAD, limit=limit):
        if job.parent_id is not None:
            parent = queue.get(job.parent_id)
            if parent is not None and parent.state in (JobState.DEAD, JobState.FAILED):
                continue  # the parent's requeue takes it along
            queue.requeue(job.id)
            done.append(f"job {job.id} queued again")
            continue
        done.append(requeue(queue, job.id))
    return done
