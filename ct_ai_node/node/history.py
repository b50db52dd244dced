"""The node's own history of what it found per patient, for the comparison with a prior study.

One row per (patient key, study, series, pipeline): the study's date and time and the
findings a comparison needs (``pipeline.types.StudyFindings``). Rows live beside the job
queue, in the node's SQLite file or in the PostgreSQL database the hosts share, so a worker
on any host sees the studies every other worker analysed.

No patient data is stored: patients are keyed by a SHA-256 of the PatientID and its issuer
(IssuerOfPatientID), with ``priors.patient_key_salt`` mixed in when the site sets one (without
it, anyone holding the table could test candidate IDs). Rows older than
``priors.history_days`` are deleted by the retention loop.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime

from ct_ai_node.jobqueue.shared_db import SqlTable
from ct_ai_node.pipeline.types import StudyFindings

_TABLE = """
CREATE TABLE IF NOT EXISTS patient_history (
    patient_key   TEXT    NOT NULL,
    study_uid     TEXT    NOT NULL,
    series_uid    TEXT    NOT NULL,
    pipeline      TEXT    NOT NULL,
    study_datetime TEXT,
    involvement_percent DOUBLE PRECISION NOT NULL,
    lesion_volume_ml DOUBLE PRECISION NOT NULL,
    ct_severity_score INTEGER,
    case_class    TEXT,
    lobe_severities TEXT NOT NULL,
    source        TEXT    NOT NULL,
    job_id        BIGINT,
    analysed_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (patient_key, study_uid, series_uid, pipeline)
);
"""
_SCHEMA = {"sqlite": _TABLE, "postgres": _TABLE}


def patient_key(patient_id: str | None, issuer: str | None = None, salt: str = "") -> str | None:
    """The history's key of a patient; None without a PatientID (nothing to key on)."""
    pid = str(patient_id or "").strip()
    if not pid:
        return None
    text = "\x00".join((salt, str(issuer or "").strip(), pid))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PatientHistory:
    """The studies analysed per patient key, in ``target`` (the node's SQLite file or the
    shared PostgreSQL URL: ``jobqueue.factory.shared_target``)."""

    def __init__(self, target: str | os.PathLike, reconnect_s: float = 300.0):
        self._db = SqlTable(target, _SCHEMA, reconnect_s=reconnect_s)

    def record(self, key: str, series_uid: str, pipeline: str, findings: StudyFindings, source: str,
               job_id: int | None = None) -> None:
        """Remember a study's findings (a second analysis of the same series replaces them)."""
        when = findings.study_datetime.isoformat() if findings.study_datetime else None
        self._db.execute(
            "INSERT INTO patient_history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (patient_key, study_uid, series_uid, pipeline) DO UPDATE SET"
            " study_datetime = excluded.study_datetime, involvement_percent = excluded.involvement_percent,"
            " lesion_volume_ml = excluded.lesion_volume_ml, ct_severity_score = excluded.ct_severity_score,"
            " case_class = excluded.case_class, lobe_severities = excluded.lobe_severities,"
            " source = excluded.source, job_id = excluded.job_id, analysed_at = excluded.analysed_at",
            (key, findings.study_instance_uid, series_uid, pipeline, when, float(findings.involvement_percent),
             float(findings.lesion_volume_ml), findings.ct_severity_score, findings.case_class,
             ",".join(str(s) for s in findings.lobe_severities), source, job_id, time.time()),
        )

    def studies(self, key: str, pipeline: str) -> list[StudyFindings]:
        """The patient's analysed studies for ``pipeline``, one per study: the series analysed
        last stands for its study."""
        rows = self._db.execute(
            "SELECT study_uid, study_datetime, involvement_percent, lesion_volume_ml, ct_severity_score,"
            " case_class, lobe_severities, analysed_at FROM patient_history"
            " WHERE patient_key = ? AND pipeline = ? ORDER BY analysed_at",
            (key, pipeline),
        )
        latest: dict[str, StudyFindings] = {}
        for study, when, involvement, lesion, score, case_class, lobes, _at in rows:
            latest[study] = StudyFindings(
                study_instance_uid=study, study_datetime=datetime.fromisoformat(when) if when else None,
                involvement_percent=float(involvement), lesion_volume_ml=float(lesion),
                ct_severity_score=None if score is None else int(score), case_class=case_class,
                lobe_severities=tuple(int(s) for s in lobes.split(",") if s))
        return list(latest.values())

    def sources(self, key: str, study_uid: str) -> list[str]:
        """How each analysis of a study came to the node ("spool", "pacs"), oldest first."""
        rows = self._db.execute("SELECT source FROM patient_history WHERE patient_key = ? AND study_uid = ?"
                                " ORDER BY analysed_at", (key, study_uid))
        return [r[0] for r in rows]

    def forget_older_than(self, seconds: float, now: float | None = None) -> int:
        """Delete rows analysed more than ``seconds`` ago; returns how many."""
        cutoff = (time.time() if now is None else now) - seconds
        before = self._db.execute("SELECT COUNT(*) FROM patient_history WHERE analysed_at < ?", (cutoff,))
        self._db.execute("DELETE FROM patient_history WHERE analysed_at < ?", (cutoff,))
        return int(before[0][0]) if before else 0
