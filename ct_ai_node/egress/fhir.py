"""``FhirDestination``: the analysis as a FHIR DiagnosticReport (JSON) POSTed to a FHIR
server, for sites that take results into their EHR that way (``kind: fhir``).

Of the files a ``deliver`` job lists, only the result SR is read: ``sr.dcm`` (or else the
first file whose Modality is SR) and ``result.json`` in the same folder, which
``writers.fhir_report.diagnostic_report`` turns into the report. It goes out as a FHIR
conditional create, ``POST {url}/DiagnosticReport`` with ``If-None-Exist:
identifier=urn:dicom:uid|urn:oid:<SR SOP Instance UID>``: a re-send (a retry after a lost
reply, an admin's re-send) finds the report already there and creates nothing (200), a first
send creates it (201).

A not-analysed notice is not reported: when ``result.json`` is missing or its status is not
``done`` (rejected, failed), or no SR is among the files, nothing is sent and the delivery
succeeds with ``sent=0`` (one log line says why).

Error classification (``DestinationError.retryable``): connection error, timeout, 5xx, 408
and 429: **retryable**; other 4xx (400/422 the server refuses the resource, 401/403
credentials, 404 wrong base URL, 412 several reports already carry the identifier):
**not retryable**, with the server's first OperationOutcome message on one line. A result
that cannot be read (damaged result.json or SR) is not retryable either.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx

from ct_ai_node.egress.base import DestinationError, SendReport

log = logging.getLogger(__name__)

SR_FILE = "sr.dcm"
RESULT_FILE = "result.json"
FHIR_JSON = "application/fhir+json"
_RETRYABLE_HTTP = frozenset({408, 429})
#: the most characters of a server's message kept in an error (one line)
_MESSAGE_CHARS = 200


def _is_sr(path: Path) -> bool:
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        return str(header.get("Modality", "")) == "SR"
    except Exception:  # noqa: BLE001 - not DICOM, damaged: not the SR
        return False


def find_sr(paths: list[Path]) -> Path | None:
    """``sr.dcm`` among ``paths``, else the first file whose Modality is SR, else None."""
    for path in paths:
        if path.name == SR_FILE:
            return path
    return next((p for p in paths if p.suffix.lower() == ".dcm" and _is_sr(p)), None)


def server_message(rsp: httpx.Response) -> str:
    """The server's own words, short and on one line: the first OperationOutcome issue's
    diagnostics or details, else the start of the body."""
    text = ""
    try:
        doc = rsp.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        for issue in doc.get("issue") or []:
            if isinstance(issue, dict):
                text = str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")
                if text:
                    break
    if not text and doc is None:
        text = rsp.text
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS - 3] + "..."


class FhirDestination:
    def __init__(self, name: str, url: str, username: str | None = None, password: str | None = None,
                 token: str | None = None, timeout_s: float = 60):
        self.name = name
        self.url = url.rstrip("/")
        self.auth = (username, password) if username else None
        self.token = token
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"FhirDestination({self.name!r}, {self.url})"

    def _error(self, message: str, retryable: bool) -> DestinationError:
        return DestinationError(message, retryable=retryable, destination=self.name)

    def _skip(self, started: float, why: str) -> SendReport:
        log.info("%s: no DiagnosticReport sent: %s", self.name, why)
        return SendReport(sent=0, seconds=time.monotonic() - started, destination=self.name)

    def build(self, paths: list[Path]) -> dict | None:
        """The DiagnosticReport for these result files; None when there is nothing to report
        (no SR, no result.json, an analysis that is not done). Raises DestinationError
        (not retryable) when the result cannot be read."""
        import pydicom

        from ct_ai_node.writers.fhir_report import diagnostic_report

        sr = find_sr(paths)
        if sr is None:
            return None
        try:
            result = json.loads((sr.parent / RESULT_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise self._error(f"{RESULT_FILE} cannot be read ({type(exc).__name__})", retryable=False) from exc
        if not isinstance(result, dict) or result.get("status") != "done":
            return None
        try:
            header = pydicom.dcmread(sr, stop_before_pixels=True)
            return diagnostic_report(result, header)
        except Exception as exc:  # noqa: BLE001 - a damaged SR or result: the same next time
            raise self._error(f"no DiagnosticReport from {sr.name} and {RESULT_FILE} ({type(exc).__name__}: "
                              f"{exc})", retryable=False) from exc

    def send(self, paths: list[Path]) -> SendReport:
        started = time.monotonic()
        report = self.build([Path(p) for p in paths])
        if report is None:
            return self._skip(started, "no analysis result among the files (a not-analysed notice, or no SR)")
        ident = report["identifier"][0]
        body = json.dumps(report, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON,
                   "If-None-Exist": f"identifier={ident['system']}|{ident['value']}",
                   "Prefer": "return=minimal"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        target = f"{self.url}/DiagnosticReport"
        try:
            with httpx.Client(auth=self.auth, timeout=self.timeout_s, follow_redirects=False) as client:
                rsp = client.post(target, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise self._error(f"FHIR POST to {target} timed out after {self.timeout_s:g} s", True) from exc
        except httpx.HTTPError as exc:
            raise self._error(f"FHIR POST to {target} failed: {type(exc).__name__}: {exc}", True) from exc
        status = rsp.status_code
        if status >= 500 or status in _RETRYABLE_HTTP:
            raise self._error(f"FHIR POST to {target}: HTTP {status} {server_message(rsp)}".strip(), retryable=True)
        if status >= 300:
            raise self._error(f"FHIR POST to {target}: HTTP {status} {server_message(rsp)}".strip(), retryable=False)
        seconds = time.monotonic() - started
        # conditional create: 201 created; 200 a report with this identifier was there already
        already = status == 200
        out = SendReport(sent=0 if already else 1, already_present=1 if already else 0, seconds=seconds,
                         bytes_sent=len(body), destination=self.name)
        log.info("%s: DiagnosticReport %s at %s in %.2f s", self.name,
                 "already present" if already else "created", self.url, seconds)
        return out
