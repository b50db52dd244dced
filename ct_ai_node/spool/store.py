"""The spool: received instances on disk, durable before they are acknowledged,
with an SQLite index of instances and series.

Layout of the spool directory (``Spool(spool_dir, db_path)``)::

    <series key>/series.json          who sent the series (written before any instance)
    <series key>/<SOPInstanceUID>.dcm the Part-10 bytes exactly as received
    <series key>/.<name>.<rand>.tmp   a write in progress (removed by ``recover``)
    .<series key>.<rand>.removing     a series being removed (finished by ``recover``)
    .quarantine/                      files ``recover`` could not read

Order of a store: tmp file, fsync, rename, fsync directory, and only then the
index row. A SIGKILL (or power cut) at any point leaves either a tmp file
(dropped on recover; the sender got no success), or a complete file with or
without its index row (indexed on recover from its header and ``series.json``).
The disk is the truth; the index can always be rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ct_ai_node.logs import series_ref

from .dicomfile import BadInstance, read_header

log = logging.getLogger(__name__)

#: ``failed``: the dispatcher could not route it (unreadable, implausible or too slow a header);
#: ``reason`` says why, and it is tried again only when new instances arrive
STATES = ("receiving", "complete", "routed", "discarded", "failed")
SIDECAR = "series.json"
_UID_NAME = re.compile(r"^[0-9][0-9.]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    caller_host TEXT NOT NULL,
    modality TEXT NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    released_at REAL,
    release_carried INTEGER,
    state TEXT NOT NULL DEFAULT 'receiving',
    updated_at REAL NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE TABLE IF NOT EXISTS instances (
    series_key TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (series_key, sop_instance_uid)
);
"""


@dataclass(frozen=True)
class InstanceMeta:
    """What the spool needs to know about one received instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    calling_ae: str
    called_ae: str
    caller_host: str
    transfer_syntax: str


@dataclass(frozen=True)
class StoredInstance:
    series_key: str
    sop_instance_uid: str
    path: Path
    size: int
    received_at: float
    replaced: bool  # the same instance was already in the spool (a re-send)


@dataclass(frozen=True)
class SeriesRecord:
    """One row of the series table; times are Unix epoch seconds. ``updated_at`` is the
    last instance arrival or state change (a release sets only ``released_at``), so
    ``last_received_at >= updated_at`` on a routed series means instances came after routing."""

    key: str
    path: Path
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    called_ae: str
    caller_host: str
    modality: str
    first_received_at: float
    last_received_at: float
    instance_count: int
    released_at: float | None
    state: str
    updated_at: float
    reason: str | None = None  # why the series is ``failed``
    #: how many of the series' instances the released association carried; None when another
    #: association was still storing into the series (or the sender did not say)
    release_carried: int | None = None


@dataclass
class RecoveryReport:
    tmp_removed: int = 0
    indexed: int = 0  # files on disk that were missing from the index
    rows_dropped: int = 0  # index rows whose file was gone
    series_removed: int = 0  # interrupted remove_series finished
    quarantined: list[Path] = field(default_factory=list)  # unreadable files moved aside

    def __str__(self) -> str:
        return (f"recovery: {self.indexed} file(s) indexed, {self.tmp_removed} tmp file(s) removed, "
                f"{self.rows_dropped} stale row(s) dropped, {self.series_removed} removal(s) finished, "
                f"{len(self.quarantined)} unreadable file(s) quarantined")


def series_key(calling_ae: str, study_uid: str, series_uid: str) -> str:
    """Deterministic, filesystem-safe: readable AE + series UID tail, plus a hash of all three."""
    digest = hashlib.sha1(f"{calling_ae}\\{study_uid}\\{series_uid}".encode()).hexdigest()[:16]
    ae = re.sub(r"[^A-Za-z0-9_-]", "_", calling_ae.strip())[:16] or "_"
    tail = re.sub(r"[^0-9.]", "", series_uid)[-12:].strip(".") or "x"
    return f"{ae}-{tail}-{digest}"


def instance_file_name(sop_instance_uid: str) -> str:
    # a UID is digits and dots; anything else (a broken or hostile sender) gets a hashed name
    if _UID_NAME.match(sop_instance_uid):
        return f"{sop_instance_uid}.dcm"
    return f"x{hashlib.sha1(sop_instance_uid.encode()).hexdigest()}.dcm"


def duplicate_key(sop_instance_uid: str, encoded: bytes) -> str:
    """The index key of an image that shares its SOP Instance UID with another one in the
    series: the UID plus a digest of its bytes (its file gets a hashed name)."""
    return f"{sop_instance_uid}#{hashlib.sha256(encoded).hexdigest()[:16]}"


def _same_bytes(path: Path, encoded: bytes) -> bool:
    try:
        return path.stat().st_size == len(encoded) and path.read_bytes() == encoded
    except OSError:  # removed meanwhile: nothing to keep apart
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """tmp file in the same directory, fsync, rename over ``path``, fsync the directory.
    Without ``fsync`` the file still appears whole or not at all (a crash of the node
    cannot leave half a file under its name), but a power cut may lose it."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


class Spool:
    """Received instances under ``spool_dir`` and their index in ``db_path``.

    Thread-safe: the SCP stores from one thread per association. File writes run
    in parallel; index updates share one SQLite connection under a lock (WAL,
    synchronous=NORMAL since recover() rebuilds the index from the files; busy_timeout
    for the other processes using the same file).
    """

    def __init__(self, spool_dir: Path, db_path: Path, *, busy_timeout_ms: int = 10_000,
                 synchronous: str | None = None, fsync: bool = True):
        # fsync=True: an acknowledged instance survives a power cut (file and directory entry
        # are on disk before success). fsync=False: it survives a crash or SIGKILL of the node
        # (the data is in the OS page cache; files appear atomically), like Orthanc's default.
        # The index is derived data either way: recover() rebuilds missing rows from the
        # files, so WAL with synchronous=NORMAL (no fsync per commit) loses nothing.
        synchronous = synchronous or "NORMAL"
        self.fsync = fsync
        if synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.spool_dir = Path(spool_dir)
        self.quarantine_dir = self.spool_dir / ".quarantine"
        self.db_path = Path(db_path)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._known_dirs: set[str] = set()  # series dirs whose sidecar is durable
        # retention removes series while the SCP stores: a series being stored into is not
        # removed, and a store into a series being removed waits until it is gone
        self._busy: dict[str, int] = {}  # series key -> stores in progress
        self._removing: set[str] = set()
        self._changed = threading.Condition(self._lock)
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout_ms / 1000)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(series)")}
            # databases from before the failed state, and before the released association's count
            for column, kind in (("reason", "TEXT"), ("release_carried", "INTEGER")):
                if column in columns:
                    continue
                try:
                    self._db.execute(f"ALTER TABLE series ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise
        self._used = self._indexed_bytes()  # kept up to date by store / remove_series / recover

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (one fsync of the WAL at commit), under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- storing -------------------------------------------------------------------------

    def series_dir(self, key: str) -> Path:
        return self.spool_dir / key

    def store(self, encoded: bytes, meta: InstanceMeta) -> StoredInstance:
        """Write one Part-10 instance durably, then index it. Returns only when both are done."""
        key = series_key(meta.calling_ae, meta.study_instance_uid, meta.series_instance_uid)
        with self._changed:
            self._changed.wait_for(lambda: key not in self._removing)
            self._busy[key] = self._busy.get(key, 0) + 1
        try:
            return self._store(key, encoded, meta)
        finally:
            with self._lock:
                self._busy[key] -= 1
                if not self._busy[key]:
                    del self._busy[key]

    def _store(self, key: str, encoded: bytes, meta: InstanceMeta) -> StoredInstance:
        folder = self.series_dir(key)
        path = folder / instance_file_name(meta.sop_instance_uid)
        if path.is_file() and not _same_bytes(path, encoded):
            # another image under a SOP Instance UID already here (exporters that reuse one UID
            # for every slice): kept beside it, never over it; the loader tells slices apart by
            # position. The same bytes again still replace their own file (idempotent re-send).
            meta = dataclasses.replace(meta, sop_instance_uid=duplicate_key(meta.sop_instance_uid, encoded))
            path = folder / instance_file_name(meta.sop_instance_uid)
            log.warning("series %s: a different image with a SOP Instance UID already received; kept as well",
                        series_ref(key))
        self._ensure_series_dir(folder, meta)
        try:
            _write_atomic(path, encoded, self.fsync)
        except FileNotFoundError:  # the series was removed meanwhile: start it again
            with self._lock:
                self._known_dirs.discard(key)
            self._ensure_series_dir(folder, meta)
            _write_atomic(path, encoded, self.fsync)
        now = time.time()
        replaced = self._index(key, meta, path, len(encoded), now)
        log.debug("stored %s in series %s (%d bytes)", meta.sop_instance_uid, key, len(encoded))
        return StoredInstance(key, meta.sop_instance_uid, path, len(encoded), now, replaced)

    def _ensure_series_dir(self, folder: Path, meta: InstanceMeta) -> None:
        # the sidecar is durable before the first instance lands, so recover() always knows the caller
        if folder.name in self._known_dirs:
            return
        if not (folder / SIDECAR).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.spool_dir)
            sidecar = {"calling_ae": meta.calling_ae, "called_ae": meta.called_ae,
                       "caller_host": meta.caller_host, "study_instance_uid": meta.study_instance_uid,
                       "series_instance_uid": meta.series_instance_uid}
            _write_atomic(folder / SIDECAR, json.dumps(sidecar, indent=1).encode())
        with self._lock:
            self._known_dirs.add(folder.name)

    def _index(self, key: str, meta: InstanceMeta, path: Path, size: int, now: float) -> bool:
        with self._tx():
            old = self._db.execute("SELECT size FROM instances WHERE series_key=? AND sop_instance_uid=?",
                                   (key, meta.sop_instance_uid)).fetchone()
            replaced = old is not None
            self._used += size - (old[0] if old else 0)
            self._db.execute(
                "INSERT INTO instances (series_key, sop_instance_uid, sop_class_uid, transfer_syntax, path, size,"
                " received_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(series_key, sop_instance_uid) DO UPDATE SET"
                " sop_class_uid=excluded.sop_class_uid, transfer_syntax=excluded.transfer_syntax,"
                " path=excluded.path, size=excluded.size, received_at=excluded.received_at",
                (key, meta.sop_instance_uid, meta.sop_class_uid, meta.transfer_syntax, str(path), size, now))
            self._upsert_series(key, meta, now, now, add=0 if replaced else 1)
        return replaced

    def _upsert_series(self, key: str, meta: InstanceMeta, received_at: float, now: float, add: int) -> None:
        # a new instance means a sender is (again) at work: not released, and a `complete`
        # series is receiving again; routed/discarded series keep their state (the caller decides)
        self._db.execute(
            "INSERT INTO series (key, study_instance_uid, series_instance_uid, calling_ae, called_ae, caller_host,"
            " modality, first_received_at, last_received_at, instance_count, released_at, state, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,NULL,'receiving',?) ON CONFLICT(key) DO UPDATE SET"
            " last_received_at=max(last_received_at, excluded.last_received_at),"
            " first_received_at=min(first_received_at, excluded.first_received_at),"
            " instance_count=instance_count+?, released_at=NULL, release_carried=NULL,"
            " state=CASE WHEN state='complete' THEN 'receiving' ELSE state END,"
            " modality=CASE WHEN modality='' THEN excluded.modality ELSE modality END, updated_at=excluded.updated_at",
            (key, meta.study_instance_uid, meta.series_instance_uid, meta.calling_ae, meta.called_ae,
             meta.caller_host, meta.modality, received_at, received_at, add, now, add))

    # ---- queries and state ---------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> SeriesRecord:
        d = dict(row)
        return SeriesRecord(path=self.series_dir(d["key"]), **d)

    def series(self, state: str | None = None) -> list[SeriesRecord]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM series ORDER BY first_received_at").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM series WHERE state=? ORDER BY first_received_at",
                                        (state,)).fetchall()
        return [self._record(r) for r in rows]

    def get_series(self, key: str) -> SeriesRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM series WHERE key=?", (key,)).fetchone()
        return self._record(row) if row else None

    def instance_paths(self, key: str) -> list[Path]:
        with self._lock:
            rows = self._db.execute("SELECT path FROM instances WHERE series_key=? ORDER BY path", (key,)).fetchall()
        return [Path(r[0]) for r in rows]

    def instance_uids(self, key: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT sop_instance_uid FROM instances WHERE series_key=?", (key,)).fetchall()
        return [r[0] for r in rows]

    def mark_released(self, calling_ae: str, host: str, keys: Iterable[str],
                      carried: Mapping[str, int] | None = None) -> None:
        """The association that stored into ``keys`` ended (release or abort). ``carried``:
        how many distinct instances of each series it stored, so that completeness can tell
        whether it carried the whole series (``rules.completeness.whole_series``); leave out
        a series that another open association is still storing into."""
        keys = sorted(set(keys))
        if not keys:
            return
        carried = carried or {}
        now = time.time()
        with self._tx():
            self._db.executemany("UPDATE series SET released_at=?, release_carried=? WHERE key=? AND calling_ae=?",
                                 [(now, carried.get(k), k, calling_ae) for k in keys])
        log.debug("association from %s@%s ended: %d series released", calling_ae, host, len(keys))

    def set_series_state(self, key: str, state: str, reason: str | None = None) -> None:
        """``reason``: one line saying why (kept for ``failed``; other states clear it)."""
        if state not in STATES:
            raise ValueError(f"unknown series state {state!r} (one of {', '.join(STATES)})")
        with self._tx():
            cur = self._db.execute("UPDATE series SET state=?, reason=?, updated_at=? WHERE key=?",
                                   (state, reason, time.time(), key))
        if cur.rowcount == 0:
            raise KeyError(key)

    def free_mb(self) -> float:
        return shutil.disk_usage(self.spool_dir).free / 2**20

    def used_bytes(self) -> int:
        """Bytes of the indexed instances (what ``storage.max_spool_mb`` limits); no I/O."""
        return self._used

    def _indexed_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0])

    def series_sizes(self) -> dict[str, tuple[int, int]]:
        """Series key -> (instances, bytes), from the index."""
        with self._lock:
            rows = self._db.execute("SELECT series_key, COUNT(*), COALESCE(SUM(size), 0) FROM instances"
                                    " GROUP BY series_key").fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def remove_series(self, key: str, *, unless_received_after: float | None = None) -> bool:
        """Delete a series' files and rows; False if there was nothing to delete, or the series is
        in use: being stored into, or (``unless_received_after``) received an instance after that
        time, so an acknowledged instance is never deleted on an old decision. A store that comes
        during the removal waits, then starts the series again. Crash-safe: the directory is
        first renamed to a tombstone that ``recover`` finishes removing."""
        folder = self.series_dir(key)
        tomb = self.spool_dir / f".{key}.{secrets.token_hex(4)}.removing"
        with self._lock:
            if key in self._busy or key in self._removing:
                return False
            if unless_received_after is not None:
                row = self._db.execute("SELECT last_received_at FROM series WHERE key=?", (key,)).fetchone()
                if row is not None and row[0] > unless_received_after:
                    return False
            self._removing.add(key)
            self._known_dirs.discard(key)
        try:
            moved = folder.is_dir()
            if moved:
                os.replace(folder, tomb)
                _fsync_dir(self.spool_dir)
            with self._tx():
                size = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM instances WHERE series_key=?",
                                        (key,)).fetchone()[0]
                self._db.execute("DELETE FROM instances WHERE series_key=?", (key,))
                cur = self._db.execute("DELETE FROM series WHERE key=?", (key,))
                self._used -= int(size)
        finally:
            with self._changed:
                self._removing.discard(key)
                self._changed.notify_all()
        if moved:
            shutil.rmtree(tomb, ignore_errors=True)
        return moved or cur.rowcount > 0

    # ---- recovery ------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Make the index match the disk after a crash. Call before the SCP starts."""
        report = RecoveryReport()
        for entry in sorted(self.spool_dir.iterdir()):
            if entry.name.endswith(".removing"):
                shutil.rmtree(entry, ignore_errors=True)
                report.series_removed += 1
            elif entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
                report.tmp_removed += 1
            elif entry.is_dir() and not entry.name.startswith("."):
                self._recover_series(entry, report)
        report.rows_dropped += self._drop_stale_rows()
        self._used = self._indexed_bytes()
        log.info("%s", report)
        return report

    def _recover_series(self, folder: Path, report: RecoveryReport) -> None:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            report.tmp_removed += 1
        key = folder.name
        with self._lock:
            indexed = {r[0] for r in self._db.execute("SELECT path FROM instances WHERE series_key=?", (key,))}
        missing = [p for p in sorted(folder.glob("*.dcm")) if str(p) not in indexed]
        if not missing:
            return
        sender = self._sender(folder)
        for path in missing:
            try:
                hdr = read_header(path)
            except BadInstance as exc:
                report.quarantined.append(self._quarantine(path))
                log.warning("spool recovery: unreadable file moved to quarantine (%s)", exc)
                continue
            uid = hdr["SOPInstanceUID"]
            if path.name != instance_file_name(uid):  # an image kept beside another of its UID
                uid = duplicate_key(uid, path.read_bytes())
            meta = InstanceMeta(uid, hdr["SOPClassUID"], hdr["StudyInstanceUID"],
                                hdr["SeriesInstanceUID"], hdr["Modality"], sender["calling_ae"],
                                sender["called_ae"], sender["caller_host"], hdr["TransferSyntaxUID"])
            with self._tx():
                # a file is named by its SOP UID; keep an existing row of that UID pointing at it
                self._db.execute("DELETE FROM instances WHERE series_key=? AND sop_instance_uid=?",
                                 (key, meta.sop_instance_uid))
                self._db.execute(
                    "INSERT INTO instances (series_key, sop_instance_uid, sop_class_uid, transfer_syntax, path,"
                    " size, received_at) VALUES (?,?,?,?,?,?,?)",
                    (key, meta.sop_instance_uid, meta.sop_class_uid, meta.transfer_syntax, str(path),
                     path.stat().st_size, path.stat().st_mtime))
                self._upsert_series(key, meta, path.stat().st_mtime, time.time(), add=0)
                self._recount(key)
            report.indexed += 1
        with self._lock:
            self._known_dirs.add(key)

    def _sender(self, folder: Path) -> dict[str, str]:
        try:
            data = json.loads((folder / SIDECAR).read_text())
            return {k: str(data.get(k, "")) for k in ("calling_ae", "called_ae", "caller_host")}
        except (OSError, ValueError):
            # cannot happen with the write order above; the key starts with the (sanitised) AE
            log.warning("spool recovery: %s has no readable %s; caller taken from the directory name",
                        folder.name, SIDECAR)
            return {"calling_ae": folder.name.split("-", 1)[0], "called_ae": "", "caller_host": ""}

    def _recount(self, key: str) -> None:
        self._db.execute("UPDATE series SET instance_count=(SELECT COUNT(*) FROM instances WHERE series_key=?)"
                         " WHERE key=?", (key, key))

    def _drop_stale_rows(self) -> int:
        with self._lock:
            rows = self._db.execute("SELECT series_key, sop_instance_uid, path FROM instances").fetchall()
        stale = [(r[0], r[1]) for r in rows if not os.path.exists(r[2])]
        with self._tx():
            self._db.executemany("DELETE FROM instances WHERE series_key=? AND sop_instance_uid=?", stale)
            for key in {k for k, _ in stale}:
                self._recount(key)
            # a series is born with its first instance; one without any left is gone
            self._db.execute("DELETE FROM series WHERE key NOT IN (SELECT DISTINCT series_key FROM instances)")
        return len(stale)

    def _quarantine(self, path: Path) -> Path:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{path.parent.name}-{path.name}"
        os.replace(path, target)
        return target
