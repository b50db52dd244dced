"""Which revision of a series' results an analysis makes, and which report it replaces.

A series can reach the node more than once: re-sent as it was (a PACS retry, an admin's
re-send), or completed late (instances arriving after the quiet time). Result UIDs are
derived from (source series, pipeline, model versions, revision) (``writers.common.
ResultUids``), so:

* the same instances analysed again -> the same revision -> the same SOP Instance UIDs:
  the PACS ends up with one set of results, not two;
* a different set of instances -> the next revision -> new UIDs, and its SR names the
  last revision's SR in (0040,A360) Predecessor Documents Sequence.

``plan_revision`` is the pure rule; ``RevisionLog`` keeps one row per (series, pipeline,
revision) beside the job queue: in the node's SQLite file, or in the PostgreSQL database
that the hosts share (``queue: {kind: postgres}``), so that a worker on any host plans the
same revision.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ct_ai_node.jobqueue.shared_db import SqlTable
from ct_ai_node.writers.common import ReportRef

_TABLE = """
CREATE TABLE IF NOT EXISTS analyses (
    series_key   TEXT    NOT NULL,
    pipeline     TEXT    NOT NULL,
    revision     INTEGER NOT NULL,
    fingerprint  TEXT    NOT NULL,
    study_uid    TEXT    NOT NULL,
    sr_series_uid TEXT   NOT NULL,
    sr_sop_class_uid TEXT NOT NULL,
    sr_sop_instance_uid TEXT NOT NULL,
    job_id       BIGINT,
    created_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (series_key, pipeline, revision)
);
"""
_SCHEMA = {"sqlite": _TABLE, "postgres": _TABLE}


@dataclass(frozen=True)
class AnalysisRecord:
    """One revision of one series' results for one pipeline."""

    revision: int
    #: ``instance_fingerprint`` of the instances analysed
    fingerprint: str
    #: its main SR; None when that revision wrote no SR
    report: ReportRef | None


@dataclass(frozen=True)
class RevisionPlan:
    revision: int
    #: the SR this revision replaces (None for revision 1)
    predecessor: ReportRef | None


def instance_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """A digest of the set of instances (order and repeats do not matter)."""
    digest = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        digest.update(uid.encode() + b"\n")
    return digest.hexdigest()


def plan_revision(previous: Sequence[AnalysisRecord], fingerprint: str) -> RevisionPlan:
    """The revision for analysing instances with ``fingerprint``, given the revisions
    already made for the same series and pipeline.

    The same instances as an earlier revision: that revision again (same UIDs, same
    predecessor as then). Otherwise the next revision after the newest, replacing it.
    """
    by_revision = {r.revision: r for r in previous}
    for record in previous:
        if record.fingerprint == fingerprint:
            before = by_revision.get(record.revision - 1)
            return RevisionPlan(record.revision, before.report if before else None)
    if not previous:
        return RevisionPlan(1, None)
    newest = max(previous, key=lambda r: r.revision)
    return RevisionPlan(newest.revision + 1, newest.report)


class RevisionLog:
    """The analyses made per (series key, pipeline), in ``target``: the node's SQLite file or
    the shared PostgreSQL URL (``jobqueue.factory.shared_target``)."""

    def __init__(self, target: str | os.PathLike, reconnect_s: float = 300.0):
        self._db = SqlTable(target, _SCHEMA, reconnect_s=reconnect_s)

    def records(self, series_key: str, pipeline: str) -> list[AnalysisRecord]:
        rows = self._db.execute(
            "SELECT revision, fingerprint, study_uid, sr_series_uid, sr_sop_class_uid, sr_sop_instance_uid "
            "FROM analyses WHERE series_key = ? AND pipeline = ? ORDER BY revision",
            (series_key, pipeline),
        )
        return [AnalysisRecord(rev, fp, ReportRef(study, series, cls, sop) if sop else None)
                for rev, fp, study, series, cls, sop in rows]

    def plan(self, series_key: str, pipeline: str, fingerprint: str) -> RevisionPlan:
        return plan_revision(self.records(series_key, pipeline), fingerprint)

    def record(self, series_key: str, pipeline: str, revision: int, fingerprint: str,
               report: ReportRef | None, job_id: int | None = None) -> None:
        """Remember that ``revision`` was made (a re-run of the same revision replaces its row)."""
        ref = report or ReportRef("", "", "", "")
        self._db.execute(
            "INSERT INTO analyses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (series_key, pipeline, revision) DO UPDATE SET fingerprint = excluded.fingerprint,"
            " study_uid = excluded.study_uid, sr_series_uid = excluded.sr_series_uid,"
            " sr_sop_class_uid = excluded.sr_sop_class_uid, sr_sop_instance_uid = excluded.sr_sop_instance_uid,"
            " job_id = excluded.job_id, created_at = excluded.created_at",
            (series_key, pipeline, revision, fingerprint, ref.study_uid, ref.series_uid,
             ref.sop_class_uid, ref.sop_instance_uid, job_id, time.time()),
        )
