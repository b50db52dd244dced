"""Retention: the node deletes what it no longer needs, and never undelivered work.

A series in the spool, its jobs (``analyse`` / ``forward`` parents; a parent is ``done``
only once every destination acknowledged its results) and their ``outbox/job-<id>``
folders go together, as one unit:

* delivered (every job of the series ``done``) or discarded (no rule wanted it): deleted
  ``retention.delivered_grace_h`` after the last of that happened;
* undelivered: a job ``failed`` or ``dead`` (or the series could not be routed): kept
  until a requeue delivers it, or ``retention.max_age_days`` after its last activity;
* still at work (receiving, instances since routing, a job queued / running / sending):
  never touched.

When the SCP would answer 0xA700 (too little free disk or the spool quota reached), it
first asks :meth:`Retention.make_room`: the oldest delivered or discarded series go, grace
period or not, until the new instance fits; then it looks again.

:func:`plan_retention` is the pure decision (records in, a plan out); :class:`Retention`
reads the records, deletes and logs. Logs name series keys (calling AE, the tail of the
series UID and a hash), job ids and sizes; nothing from the headers.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ct_ai_node.config import RetentionSection
from ct_ai_node.jobqueue import FINAL_STATES, PARENT_KINDS, Job, JobState
from ct_ai_node.logs import series_ref
from ct_ai_node.spool import SeriesRecord

logger = logging.getLogger(__name__)

#: after a make_room that found nothing it may delete, C-STOREs are refused at once for this long
#: (no planning per refused instance while the disk is full of undelivered work)
NOTHING_TO_FREE_S = 2.0


@dataclass(frozen=True)
class Removal:
    """One series to delete, with the outbox folders of its jobs."""

    key: str
    reason: str  # "delivered", "discarded" or "expired" (undelivered past max_age_days)
    job_ids: tuple[int, ...]
    finished_at: float  # last activity: arrival, routing, a job's last change
    received_at: float  # the series' last_received_at when planned (remove_series checks it)
    files: int
    bytes: int  # spool bytes (index); the outbox folders come on top
    due: bool  # past its grace period / max age; False: taken only to make room


@dataclass
class RetentionPlan:
    removals: list[Removal] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # series key -> why it stays

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)


def _active(rec: SeriesRecord) -> str | None:
    if rec.state in ("receiving", "complete"):
        return f"still {rec.state}"
    if rec.last_received_at >= rec.updated_at:
        return "instances arrived after routing"
    return None


def plan_retention(series: Sequence[SeriesRecord], jobs: Iterable[Job], now: float, policy: RetentionSection,
                   *, sizes: Mapping[str, tuple[int, int]] | None = None,
                   bytes_needed: int | None = None) -> RetentionPlan:
    """What to delete now. Pure: ``series`` (spool rows), ``jobs`` (any jobs; parents of kinds
    ``analyse``/``forward`` count, matched by ``payload["series_key"]``), ``sizes`` (key ->
    (files, bytes)) and ``now`` in; the plan out, oldest first.

    Without ``bytes_needed``: every unit that is due. With it (space is short by that many
    bytes): due units, then delivered or discarded ones still in their grace period, oldest
    first, until their spool bytes reach ``bytes_needed``. Undelivered work is never taken to
    make room, and work in progress never at all.
    """
    sizes = sizes or {}
    by_series: dict[str, list[Job]] = {}
    for job in jobs:
        key = job.payload.get("series_key") if isinstance(job.payload, dict) else None
        if job.kind in PARENT_KINDS and key:
            by_series.setdefault(key, []).append(job)
    plan = RetentionPlan()
    due: list[Removal] = []
    spare: list[Removal] = []  # delivered, in grace: only to make room
    grace_s = policy.delivered_grace_h * 3600
    max_age_s = None if policy.max_age_days is None else policy.max_age_days * 86400
    for rec in series:
        why = _active(rec)
        own = sorted(by_series.get(rec.key, []), key=lambda j: j.id)
        pending = [j for j in own if j.state not in FINAL_STATES]
        if why is None and pending:
            why = f"job {pending[0].id} is {pending[0].state}"
        if why is not None:
            plan.kept[rec.key] = why
            continue
        finished = max([rec.updated_at, rec.last_received_at, *(j.updated_at for j in own)])
        files, size = sizes.get(rec.key, (rec.instance_count, 0))
        undelivered = [j for j in own if j.state != JobState.DONE]
        if undelivered:
            problem = f"job {undelivered[0].id} {undelivered[0].state}"
        elif rec.state == "routed" and not own:
            problem = "routed, but no job found"
        elif rec.state not in ("routed", "discarded"):
            problem = f"series {rec.state}"  # e.g. could not be routed
        else:
            problem = None
        removal = Removal(rec.key, "delivered" if own else "discarded", tuple(j.id for j in own), finished,
                          rec.last_received_at, files, size, due=False)
        if problem is not None:
            if max_age_s is not None and now - finished >= max_age_s:
                due.append(replace(removal, reason="expired", due=True))
            else:
                left = "" if max_age_s is None else f", {(max_age_s - (now - finished)) / 86400:.1f} days left"
                plan.kept[rec.key] = f"undelivered ({problem}){left}"
        elif now - finished >= grace_s:
            due.append(replace(removal, due=True))
        elif bytes_needed is not None:
            spare.append(removal)
        else:
            plan.kept[rec.key] = f"{removal.reason}, in its grace period"
    due.sort(key=lambda r: r.finished_at)
    spare.sort(key=lambda r: r.finished_at)
    if bytes_needed is None:
        plan.removals = due
        return plan
    total = 0
    for removal in due + spare:
        if total >= bytes_needed:
            plan.kept.setdefault(removal.key, "not needed to make room")
            continue
        plan.removals.append(removal)
        total += removal.bytes
    return plan


# -- the executor ----------------------------------------------------------------


@dataclass
class RetentionReport:
    removed: list[str] = field(default_factory=list)  # series keys
    skipped: list[str] = field(default_factory=list)  # in use meanwhile, or a folder would not go
    spool_bytes: int = 0
    outbox_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.spool_bytes + self.outbox_bytes


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Retention:
    """Runs the plan against the spool, the queue and the outbox. Thread-safe: the node's
    scheduler calls :meth:`run_once`, SCP association threads call :meth:`make_room`; one
    lock makes them take turns."""

    def __init__(self, policy: RetentionSection, spool, queue, outbox_dir: Path,
                 clock: Callable[[], float] = time.time):
        self.policy = policy
        self.spool = spool
        self.queue = queue
        self.outbox_dir = Path(outbox_dir)
        self.clock = clock
        self._lock = threading.Lock()
        self._nothing_until = 0.0  # monotonic time; see NOTHING_TO_FREE_S

    def plan(self, bytes_needed: int | None = None) -> RetentionPlan:
        # series first, then jobs: a series seen routed has its jobs enqueued already
        series = self.spool.series()
        sizes = self.spool.series_sizes()
        jobs = self.queue.for_series([s.key for s in series], PARENT_KINDS) if series else []
        return plan_retention(series, jobs, self.clock(), self.policy, sizes=sizes, bytes_needed=bytes_needed)

    def run_once(self) -> RetentionReport:
        """The periodic pass: delete every unit that is due."""
        if not self.policy.enabled:
            return RetentionReport()
        with self._lock:
            plan = self.plan()
            for key, why in plan.kept.items():
                logger.debug("retention: series %s kept: %s", key, why)
            report = self._execute(plan.removals)
        if report.removed:
            logger.info("retention: %d series removed, %.1f MB freed", len(report.removed), report.bytes / 2**20)
        return report

    def make_room(self, shortfall: Callable[[], int]) -> RetentionReport:
        """Delete the oldest delivered or discarded series until ``shortfall()`` (bytes still
        missing) is <= 0, or nothing more may go. Returns what was deleted."""
        report = RetentionReport()
        if not (self.policy.enabled and self.policy.free_space_first):
            return report
        with self._lock:  # a thread that waited here often finds the space already made
            while (need := shortfall()) > 0 and time.monotonic() >= self._nothing_until:
                plan = self.plan(bytes_needed=need)
                step = self._execute(plan.removals)
                report.removed += step.removed
                report.skipped += step.skipped
                report.spool_bytes += step.spool_bytes
                report.outbox_bytes += step.outbox_bytes
                if not step.removed:
                    self._nothing_until = time.monotonic() + NOTHING_TO_FREE_S
                    logger.warning("spool short of %.1f MB and no delivered series left to remove; "
                                   "undelivered work is kept", need / 2**20)
        if report.removed:
            logger.info("made room: %d delivered series removed, %.1f MB freed", len(report.removed),
                        report.bytes / 2**20)
        return report

    def _execute(self, removals: Sequence[Removal]) -> RetentionReport:
        report = RetentionReport()
        for removal in removals:
            try:
                outbox = self._remove_outboxes(removal)
                if outbox is None or not self.spool.remove_series(removal.key,
                                                                  unless_received_after=removal.received_at):
                    report.skipped.append(removal.key)
                    logger.debug("retention: series %s left for now (in use, or an outbox would not go)",
                                 removal.key)
                    continue
            except OSError as exc:
                report.skipped.append(removal.key)
                logger.warning("retention: series %s could not be removed (%s)", series_ref(removal.key),
                               type(exc).__name__)
                logger.debug("retention: series %s could not be removed: %s", removal.key, exc)
                continue
            report.removed.append(removal.key)
            report.spool_bytes += removal.bytes
            report.outbox_bytes += outbox
            level = logging.WARNING if removal.reason == "expired" else logging.INFO
            logger.log(level, "series %s removed (%s; %d files, %.1f MB; outbox of job(s) %s, %.1f MB)",
                       series_ref(removal.key), "undelivered past max_age_days" if removal.reason == "expired"
                       else removal.reason + ("" if removal.due else ", early to make room"),
                       removal.files, removal.bytes / 2**20, ",".join(map(str, removal.job_ids)) or "-",
                       outbox / 2**20)
        return report

    def _remove_outboxes(self, removal: Removal) -> int | None:
        """Delete ``outbox/job-<id>`` of each job first: a crash before the series goes leaves
        the series, and the next pass finishes. None if a folder would not go (the series stays,
        else the folder would be left with nothing pointing at it)."""
        freed = 0
        for job_id in removal.job_ids:
            folder = self.outbox_dir / f"job-{job_id}"
            if not folder.exists():
                continue
            size = _tree_bytes(folder)
            errors: list[str] = []
            shutil.rmtree(folder, onerror=lambda _f, path, exc: errors.append(f"{path}: {exc[1]}"))
            if errors:
                logger.warning("retention: outbox of job %d not fully removed: %s", job_id, errors[0])
                return None
            freed += size
        return freed


# -- a worker host's outbox -------------------------------------------------------

def plan_outbox_pruning(folders: Mapping[int, float], jobs: Mapping[int, Job | None], now: float,
                        policy: RetentionSection) -> list[int]:
    """Which ``outbox/job-<id>`` folders of a worker host go (pure). A worker host has no spool;
    its folders follow their jobs (``folders``: job id -> the folder's modification time;
    ``jobs``: job id -> the job, None when the queue no longer has it): a ``done`` job's folder
    ``delivered_grace_h`` after the job's last change, a ``failed``/``dead`` one (or one whose
    job is gone) after ``max_age_days``; a job still at work keeps its folder."""
    grace_s = policy.delivered_grace_h * 3600
    max_age_s = None if policy.max_age_days is None else policy.max_age_days * 86400
    out = []
    for job_id, mtime in sorted(folders.items()):
        job = jobs.get(job_id)
        if job is not None and job.state not in FINAL_STATES:
            continue
        if job is not None and job.state == JobState.DONE:
            if now - job.updated_at >= grace_s:
                out.append(job_id)
        elif max_age_s is not None and now - (job.updated_at if job is not None else mtime) >= max_age_s:
            out.append(job_id)
    return out


def prune_worker_outbox(outbox_dir: Path, queue, policy: RetentionSection, now: float | None = None) -> list[int]:
    """Delete what ``plan_outbox_pruning`` says of a worker host's outbox (``job-<id>`` and
    left-over ``fetched-<id>`` folders); returns the job ids whose folders went."""
    outbox_dir = Path(outbox_dir)
    if not policy.enabled or not outbox_dir.is_dir():
        return []
    now = time.time() if now is None else now
    folders: dict[int, float] = {}
    for folder in outbox_dir.iterdir():
        prefix, _, number = folder.name.partition("-")
        if prefix in ("job", "fetched") and number.isdigit() and folder.is_dir():
            job_id = int(number)
            folders[job_id] = max(folders.get(job_id, 0.0), folder.stat().st_mtime)
    jobs = {job_id: queue.get(job_id) for job_id in folders}
    gone = plan_outbox_pruning(folders, jobs, now, policy)
    for job_id in gone:
        for name in (f"job-{job_id}", f"fetched-{job_id}"):
            shutil.rmtree(outbox_dir / name, ignore_errors=True)
    if gone:
        logger.info("retention: outbox folders of %d job(s) removed on this worker host", len(gone))
    return gone
