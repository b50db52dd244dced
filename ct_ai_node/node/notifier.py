"""Notifications: a webhook (JSON POST) or an e-mail when a job ends.

The node's scheduler calls :meth:`Notifier.tick`: every analyse/forward job that became
final since the last tick and matches a configured notification gets one ``notify`` job
per notification (key ``notify:<job>:<event>:<notification>:<when>``, so a tick seen twice
adds nothing, and a re-run that ends again notifies again). The workers send them, retried
with backoff and dead-lettered like deliveries. Messages carry no patient data unless the
administrator's template names it (``{patient_name}``, ``{patient_id}``,
``{accession_number}``, ``{study_date}``); the text is built when the job ends.
"""

from __future__ import annotations

import logging
import os
import smtplib
import sqlite3
import re
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Callable

import httpx

from ct_ai_node.config import NodeConfig, Notification
from ct_ai_node.jobqueue import PARENT_KINDS, Job, JobQueue, JobState
from ct_ai_node.logs import series_ref
from ct_ai_node.result import read_result, result_line

logger = logging.getLogger(__name__)

EVENT_TEXT = {"delivered": "results delivered", "not_analysed": "not analysed", "failed": "failed",
              "dead": "failed for good (dead letter)", "test": "test message"}
DEFAULT_TEMPLATE = ("{node}: job {job_id} ({kind}, rule {rule}) {event_text}. Series {series}. "
                    "{result}{reason}{link}")
#: placeholders that read the series' header: only when a template names them
PATIENT_FIELDS = {"patient_name": "PatientName", "patient_id": "PatientID",
                  "accession_number": "AccessionNumber", "study_date": "StudyDate"}
#: without notifications the watermark is moved at most this often (seconds)
IDLE_WATERMARK_S = 60.0


def event_of(job: Job) -> str | None:
    """The notification event of a final analyse/forward job (None while it is not final)."""
    if job.state is JobState.DONE:
        return "delivered"
    if job.state is JobState.FAILED:
        return "not_analysed" if (job.last_error or "").startswith("not analysed") else "failed"
    if job.state is JobState.DEAD:
        return "dead"
    return None


def wanted(note: Notification, event: str, job: Job) -> bool:
    return event in note.events and (not note.rules or job.payload.get("rule") in note.rules)


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def template_fields(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def render(template: str, fields: dict) -> str:
    """``template`` with each ``{name}`` of ``fields`` filled in; anything else (an unknown
    name, a stray brace) stays as written."""
    return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


def job_fields(config: NodeConfig, job: Job, event: str, base_url: str | None = None) -> dict:
    """The fields a message may use (no patient data here)."""
    summary = read_result(config.storage.outbox_dir, job.id) if job.kind == "analyse" else None
    line = result_line(summary)
    return {
        "node": config.node.ae_title, "event": event, "event_text": EVENT_TEXT.get(event, event), "job_id": job.id,
        "kind": job.kind, "rule": job.payload.get("rule") or "-", "pipeline": job.payload.get("pipeline") or "",
        "destinations": ", ".join(job.payload.get("destinations") or []) or "-",
        "series": series_ref(job.payload["series_key"]) if job.payload.get("series_key") else "-",
        "result": f"Result: {line}. " if line and event == "delivered" else "",
        "reason": f"Reason: {job.last_error}. " if job.last_error and event != "delivered" else "",
        "link": f"{base_url}/jobs/{job.id}" if base_url else "",
    }


def patient_fields(spool, series_key: str | None, names: set[str]) -> dict:
    """The patient placeholders a template names, from the series' first instance header."""
    wanted_fields = {k: v for k, v in PATIENT_FIELDS.items() if k in names}
    if not wanted_fields or not series_key:
        return {}
    import pydicom

    paths = spool.instance_paths(series_key)
    if not paths:
        return {k: "" for k in wanted_fields}
    try:
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True, specific_tags=list(wanted_fields.values()))
    except Exception:  # noqa: BLE001 - a damaged header: empty fields, the message still goes
        return {k: "" for k in wanted_fields}
    return {k: str(ds.get(kw, "") or "") for k, kw in wanted_fields.items()}


def message_of(note: Notification, fields: dict) -> tuple[str, str]:
    """(subject, text) of a notification."""
    return render(note.subject, fields), render(note.template or DEFAULT_TEMPLATE, fields).strip()


def send(note: Notification, subject: str, text: str, fields: dict, timeout_s: float = 15.0) -> str:
    """Send one message; raises on failure (the notify job is then retried). Returns what
    happened, in a few words."""
    if note.kind == "webhook":
        body = {"event": fields.get("event"), "subject": subject, "text": text,
                **{k: fields[k] for k in ("node", "job_id", "kind", "rule", "pipeline", "series") if k in fields}}
        rsp = httpx.post(note.url, json=body, timeout=timeout_s)
        if rsp.status_code >= 400:
            raise RuntimeError(f"webhook {note.url} answered HTTP {rsp.status_code}")
        return f"webhook answered HTTP {rsp.status_code}"
    smtp = note.smtp
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, note.sender, ", ".join(note.to)
    msg.set_content(text)
    cls = smtplib.SMTP_SSL if smtp.ssl else smtplib.SMTP
    with cls(smtp.host, smtp.port, timeout=timeout_s) as server:
        if smtp.starttls:
            server.starttls()
        if smtp.username:
            server.login(smtp.username, smtp.password.get_secret_value())
        server.send_message(msg)
    return f"mail handed to {smtp.host}:{smtp.port} for {len(note.to)} address(es)"


class Notifier:
    """Turns jobs that ended into ``notify`` jobs. The watermark (the last change seen) is
    kept in the node's database, so nothing is missed across a restart, and a node's first
    start does not notify about its history."""

    def __init__(self, config_source: Callable[[], NodeConfig], queue: JobQueue, spool, db_path: str | os.PathLike,
                 clock=time.time):
        self.config_source, self.queue, self.spool, self.clock = config_source, queue, spool, clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(Path(db_path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS notifier (id INTEGER PRIMARY KEY CHECK (id = 1), since REAL)")
        self._db.execute("INSERT OR IGNORE INTO notifier (id, since) VALUES (1, ?)", (self.clock(),))

    def tick(self, base_url: str | None = None) -> list[int]:
        """Queue the notifications of jobs that ended since the last tick; their ids."""
        config = self.config_source()
        with self._lock:
            (since,) = self._db.execute("SELECT since FROM notifier WHERE id = 1").fetchone()
            if not config.notifications:
                # nothing to send: keep the watermark near now (notifications added later do
                # not announce the past), without a write on every tick
                now = self.clock()
                if now - since > IDLE_WATERMARK_S:
                    self._db.execute("UPDATE notifier SET since = ? WHERE id = 1", (now - 1,))
                return []
            made: list[int] = []
            newest = since
            for job in self.queue.changed_since(since, PARENT_KINDS):
                newest = max(newest, job.updated_at)
                event = event_of(job)
                if event is None:
                    continue
                for note in config.notifications:
                    if wanted(note, event, job):
                        made.append(self._enqueue(config, note, job, event, base_url))
            self._db.execute("UPDATE notifier SET since = ? WHERE id = 1", (newest,))
        return made

    def _enqueue(self, config: NodeConfig, note: Notification, job: Job, event: str, base_url: str | None) -> int:
        fields = job_fields(config, job, event, base_url)
        names = template_fields(note.template or "") | template_fields(note.subject)
        fields.update(patient_fields(self.spool, job.payload.get("series_key"), names))
        subject, text = message_of(note, fields)
        return self.queue.enqueue("notify", {"notification": note.name, "event": event, "about_job": job.id,
                                             "subject": subject, "text": text, "fields": fields,
                                             "series_key": job.payload.get("series_key")},
                                  key=f"notify:{job.id}:{event}:{note.name}:{job.updated_at:.6f}",
                                  max_attempts=config.retry.max_attempts)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def send_test_message(config: NodeConfig, name: str, base_url: str | None = None) -> tuple[bool, str]:
    """The Test button: send a sample message now (no patient data); (ok, what happened)."""
    note = config.notification(name)
    fields = {"node": config.node.ae_title, "event": "test", "event_text": EVENT_TEXT["test"], "job_id": 0,
              "kind": "test", "rule": "-", "pipeline": "", "destinations": "-", "series": "-",
              "result": "This is a test message from the configuration page. ", "reason": "",
              "link": base_url or ""}
    subject, text = message_of(note, fields)
    try:
        return True, send(note, subject, text, fields)
    except Exception as exc:  # noqa: BLE001 - said in plain words on the page
        return False, f"{type(exc).__name__}: {exc}"
