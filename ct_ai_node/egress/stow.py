"""``StowDestination``: DICOMweb STOW-RS (``POST {url}/studies``, multipart/related).

The multipart body is built here (a few lines; no dicomweb-client dependency).
Files go in batches of at most ``batch_mb`` so a big series never sits in memory
twice. Each part is the file's bytes unchanged (same SOP Instance UID), so a
re-send is idempotent at the server.

Error classification (``DestinationError.retryable``):

- connection error, timeout, 5xx, 408 and 429: **retryable**;
- any other 4xx (400 bad request, 401/403 credentials, 404 wrong URL, 413 ...):
  **not retryable**;
- 200: all stored; 202 (some failed) and 409 (all failed): failed instances are
  classified by their FailureReason (0008,1197) like C-STORE statuses - 0xA7xx,
  0x0110, 0x0213 retryable, everything else not; 0x0111 (duplicate) counts as
  already present.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import httpx

from ct_ai_node.egress.base import DestinationError, SendReport, classify_status

log = logging.getLogger(__name__)

_REFERENCED = "00081199"  # ReferencedSOPSequence
_FAILED = "00081198"  # FailedSOPSequence
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def multipart_related(parts: list[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """(body, content-type) for a multipart/related; type="application/dicom" request."""
    boundary = boundary or f"ctai-{uuid.uuid4().hex}"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunks = []
    for part in parts:
        chunks += [head, part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


def _batches(paths: list[Path], max_bytes: int) -> list[list[Path]]:
    batches: list[list[Path]] = [[]]
    size = 0
    for p in paths:
        n = p.stat().st_size
        if batches[-1] and size + n > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(p)
        size += n
    return [b for b in batches if b]


def _values(doc: dict, tag: str) -> list:
    return (doc.get(tag) or {}).get("Value") or []


def _reason(item: dict, tag: str) -> int | None:
    vals = _values(item, tag)
    try:
        return int(vals[0]) if vals else None
    except (TypeError, ValueError):
        return None


class StowDestination:
    def __init__(self, name: str, url: str, username: str | None = None, password: str | None = None,
                 timeout_s: float = 60, batch_mb: float = 64):
        self.name = name
        self.url = url.rstrip("/")
        self.auth = (username, password) if username else None
        self.timeout_s = timeout_s
        self.batch_bytes = int(batch_mb * 1024 * 1024)

    def __repr__(self) -> str:
        return f"StowDestination({self.name!r}, {self.url})"

    def _error(self, message: str, retryable: bool) -> DestinationError:
        return DestinationError(message, retryable=retryable, destination=self.name)

    def _post(self, client: httpx.Client, batch: list[Path]) -> httpx.Response:
        try:
            body, content_type = multipart_related([p.read_bytes() for p in batch])
        except OSError as exc:
            raise self._error(f"cannot read a file to send: {exc}", retryable=False) from exc
        try:
            return client.post(f"{self.url}/studies", content=body,
                               headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
        except httpx.TimeoutException as exc:
            raise self._error(f"STOW-RS to {self.url} timed out after {self.timeout_s:g} s", True) from exc
        except httpx.HTTPError as exc:
            raise self._error(f"STOW-RS to {self.url} failed: {type(exc).__name__}: {exc}", True) from exc

    def _outcome(self, rsp: httpx.Response, batch: list[Path]) -> tuple[int, int, int]:
        """(stored, already present, warnings) for one batch, or raise."""
        status = rsp.status_code
        if status >= 500 or status in (408, 429):
            raise self._error(f"STOW-RS to {self.url}: HTTP {status}", retryable=True)
        if status >= 400 and status != 409:
            raise self._error(f"STOW-RS to {self.url}: HTTP {status}", retryable=False)
        try:
            doc = rsp.json() if rsp.content else {}
        except ValueError:
            doc = {}
        if isinstance(doc, list):  # some servers wrap the one data set in a list
            doc = doc[0] if doc else {}
        referenced, failed = _values(doc, _REFERENCED), _values(doc, _FAILED)
        if status in (200, 202) and not failed and not referenced:
            return len(batch), 0, 0  # a terse server: 200 without a body means all stored
        warnings = sum(1 for r in referenced if _reason(r, _WARNING_REASON) is not None)
        already, fatal, retry = 0, [], []
        for item in failed:
            code = _reason(item, _FAILURE_REASON)
            kind = classify_status(code) if code is not None else "fatal"
            if kind == "already":
                already += 1
            elif kind == "retry":
                retry.append(code)
            elif kind == "fatal":
                fatal.append(code)
        if fatal or retry or (status == 409 and not already):
            # retry only when every failure names a transient reason; 409 without one is final
            n_failed = len(fatal) + len(retry) or len(batch)
            codes = ", ".join(f"0x{c:04X}" if c is not None else "?" for c in (fatal + retry)) or "none given"
            raise self._error(f"STOW-RS to {self.url}: HTTP {status}, {n_failed} of {len(batch)} "
                              f"instance(s) failed (reasons {codes})", retryable=bool(retry) and not fatal)
        return len(referenced), already, warnings

    def send(self, paths: list[Path]) -> SendReport:
        started = time.monotonic()
        paths = [Path(p) for p in paths]
        stored = already = warnings = 0
        try:
            batches = _batches(paths, self.batch_bytes)
        except OSError as exc:
            raise self._error(f"cannot read a file to send: {exc}", retryable=False) from exc
        with httpx.Client(auth=self.auth, timeout=self.timeout_s) as client:
            for batch in batches:
                s, a, w = self._outcome(self._post(client, batch), batch)
                stored, already, warnings = stored + s, already + a, warnings + w
        seconds = time.monotonic() - started
        report = SendReport(sent=stored, already_present=already, warnings=warnings, seconds=seconds,
                            bytes_sent=sum(p.stat().st_size for p in paths), destination=self.name)
        log.info("%s: %d instance(s) stored via STOW-RS in %.2f s", self.name, report.total, seconds)
        return report
