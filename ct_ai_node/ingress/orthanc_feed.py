"""Orthanc as the source without a plugin: follow Orthanc's ``/changes`` feed.

Each poll reads the changes after the remembered position (orthanc-api-client
``get_changes``). A ``StableSeries`` change of a wanted modality (CT, not the SEG/SR/SC the
node sends back) is pulled over REST, instance by instance, into the spool, exactly as if
Orthanc had sent it by C-STORE (filed as from ``orthanc_feed.calling_ae``) and marked
released, so the dispatcher routes it on its next tick. The position is saved in the node's
database *after* the series is on disk, so a crash or a restart in between reads that change
again (and misses none); a series the spool already holds whole is not pulled twice.

Results go back through any destination: ``kind: orthanc`` (REST) or ``kind: stow``
(DICOMweb) to the same Orthanc put them in the same study.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ct_ai_node.config import OrthancFeedSection
from ct_ai_node.logs import series_ref
from ct_ai_node.spool import Spool, series_key

log = logging.getLogger(__name__)

#: changes read per request, and instances stored per batch (memory stays bounded)
PAGE = 100
BATCH = 50

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orthanc_feed (
    url        TEXT PRIMARY KEY,
    last_seq   INTEGER NOT NULL,
    updated_at REAL    NOT NULL
)
"""


class FeedPaused(Exception):
    """The spool cannot take the series now (no space): the position stays, it is tried again."""


@dataclass
class FeedReport:
    changes: int = 0
    stored: list[str] = field(default_factory=list)  # spool keys of series pulled in
    skipped: list[str] = field(default_factory=list)  # one line each: which series, why
    position: int | None = None


class OrthancFeed:
    def __init__(self, section: OrthancFeedSection, spool: Spool, db_path: Path, *, called_ae: str,
                 min_free_mb: float, max_spool_mb: float | None, make_room=None):
        self.section = section
        self.spool = spool
        self.called_ae = called_ae
        self.min_free_mb, self.max_spool_mb, self.make_room = min_free_mb, max_spool_mb, make_room
        self.host = urlsplit(section.url).hostname or ""
        self._db = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()
        #: the last poll's error, one line (None: the last poll went through)
        self.last_error: str | None = None

    def _client(self):
        from orthanc_api_client import OrthancApiClient

        s = self.section
        return OrthancApiClient(s.url, user=s.username, pwd=s.password.get_secret_value() if s.password else None)

    # -- position ----------------------------------------------------------------------

    def position(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT last_seq FROM orthanc_feed WHERE url = ?", (self.section.url,)).fetchone()
        return row[0] if row else None

    def _save(self, seq: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO orthanc_feed (url, last_seq, updated_at) VALUES (?, ?, ?)"
                             " ON CONFLICT (url) DO UPDATE SET last_seq = excluded.last_seq,"
                             " updated_at = excluded.updated_at", (self.section.url, seq, time.time()))

    # -- one poll ----------------------------------------------------------------------

    def poll_once(self) -> FeedReport:
        """Read the feed up to its end; pull in the stable series. Network errors are raised
        (the caller logs them and polls again later); the position is kept."""
        client = self._client()
        report = FeedReport()
        pos = self.position()
        if pos is None:
            if self.section.start_at == "now":
                last = int(client.get_json("changes?last").get("Last", 0))
                self._save(last)
                log.info("Orthanc feed %s: starting at change %d (start_at: now)", self.section.url, last)
                report.position = last
                return report
            pos = 0
        while True:
            changes, last, done = client.get_changes(since=pos, limit=PAGE)
            for change in changes:
                report.changes += 1
                if str(change.change_type) == "StableSeries":
                    self._take_series(client, change.resource_id, report)
                pos = int(change.sequence_id)
                self._save(pos)  # only once the series is in the spool
            if not changes and last and int(last) > pos:
                pos = int(last)
                self._save(pos)
            if done or not changes:
                break
        report.position = pos
        self.last_error = None
        return report

    def _take_series(self, client, orthanc_id: str, report: FeedReport) -> None:
        from orthanc_api_client.exceptions import ResourceNotFound

        from ct_ai_node.ingress.stow import store_parts

        try:
            series = client.get_json(f"series/{orthanc_id}")
            study = client.get_json(f"studies/{series['ParentStudy']}")
        except ResourceNotFound:
            report.skipped.append(f"{orthanc_id}: deleted from Orthanc before it was read")
            return
        modality = series.get("MainDicomTags", {}).get("Modality", "")
        if modality not in self.section.modalities:
            report.skipped.append(f"{orthanc_id}: modality {modality or 'none'} is not taken")
            return
        instances = list(series.get("Instances", []))
        key = series_key(self.section.calling_ae, study["MainDicomTags"].get("StudyInstanceUID", ""),
                         series["MainDicomTags"].get("SeriesInstanceUID", ""))
        held = self.spool.get_series(key)
        if held is not None and held.instance_count >= len(instances):
            report.skipped.append(f"{orthanc_id}: already in the spool ({held.instance_count} instances)")
            return
        stored = refused = 0
        carried: dict[str, set[str]] = {}
        for start in range(0, len(instances), BATCH):
            parts = []
            for instance_id in instances[start:start + BATCH]:
                try:
                    parts.append(("application/dicom", client.instances.get_file(instance_id)))
                except ResourceNotFound:
                    refused += 1
            outcome = store_parts(parts, self.spool, calling_ae=self.section.calling_ae, called_ae=self.called_ae,
                                  host=self.host, min_free_mb=self.min_free_mb, max_spool_mb=self.max_spool_mb,
                                  make_room=self.make_room, release=False)
            if outcome.status == 507:
                raise FeedPaused(f"Orthanc feed paused: {outcome.message}")
            stored += len(outcome.stored)
            refused += len(outcome.failed)
            report.stored.extend(k for k in outcome.series_keys if k not in report.stored)
            for k, uids in outcome.carried.items():
                carried.setdefault(k, set()).update(uids)
        if carried:  # released once, whole: the dispatcher routes it after the short release wait
            self.spool.mark_released(self.section.calling_ae, self.host, sorted(carried),
                                     carried={k: len(v) for k, v in carried.items()})
        log.info("Orthanc feed: series %s pulled (%d instances, %d refused)", series_ref(key), stored, refused)

    def close(self) -> None:
        with self._lock:
            self._db.close()
