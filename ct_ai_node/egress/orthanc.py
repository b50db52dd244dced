"""``OrthancDestination``: upload through Orthanc's REST API (``POST /instances``) with
orthanc-api-client.

We call ``OrthancApiClient.post("instances", ...)``, which is exactly what its
``upload()`` does, because ``upload()`` takes no timeout and drops Orthanc's answer
``Status`` ("Success" / "AlreadyStored") that tells a re-send apart. Orthanc keeps
one copy per SOP Instance UID, so re-sends are idempotent.

Error classification (``DestinationError.retryable``): cannot connect, timeout, 5xx,
408, 429 and 409 (Orthanc's answer to the same instance uploaded twice at once):
**retryable**; other 4xx (400 not DICOM, 401/403 credentials, 404 wrong URL, 413):
**not retryable**.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as api_errors

from ct_ai_node.egress.base import DestinationError, SendReport

log = logging.getLogger(__name__)

_RETRYABLE_HTTP = frozenset({408, 409, 429})


class OrthancDestination:
    def __init__(self, name: str, url: str, username: str | None = None, password: str | None = None,
                 timeout_s: float = 60):
        self.name = name
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"OrthancDestination({self.name!r}, {self.url})"

    def _error(self, message: str, retryable: bool) -> DestinationError:
        return DestinationError(message, retryable=retryable, destination=self.name)

    def _upload(self, client: OrthancApiClient, path: Path) -> str:
        """Orthanc's Status for one file: 'Success' or 'AlreadyStored'."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise self._error(f"cannot read {path.name}: {exc}", retryable=False) from exc
        try:
            rsp = client.post("instances", data=data, timeout=self.timeout_s)
        except api_errors.HttpError as exc:
            code = exc.http_status_code or 0
            retryable = code >= 500 or code in _RETRYABLE_HTTP
            raise self._error(f"upload of {path.name} to {self.url}: HTTP {code} {exc.msg or ''}",
                              retryable=retryable) from exc
        except (api_errors.ConnectionError, api_errors.TimeoutError) as exc:
            raise self._error(f"cannot reach Orthanc at {self.url}: {exc.msg}", retryable=True) from exc
        except api_errors.OrthancApiException as exc:
            raise self._error(f"upload of {path.name} to {self.url}: {exc.msg}", retryable=True) from exc
        if rsp is None:  # the client swallows request errors it does not translate
            raise self._error(f"upload of {path.name} to {self.url}: no response", retryable=True)
        try:
            answer = rsp.json()
        except ValueError:
            answer = {}
        if isinstance(answer, list):  # a zip upload answers a list; we send single files
            answer = answer[0] if answer else {}
        return str(answer.get("Status", "Success"))

    def send(self, paths: list[Path]) -> SendReport:
        started = time.monotonic()
        paths = [Path(p) for p in paths]
        client = OrthancApiClient(self.url, user=self.username, pwd=self.password)
        statuses = {"Success": 0, "AlreadyStored": 0}
        try:
            for path in paths:
                status = self._upload(client, path)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            client.close()
        seconds = time.monotonic() - started
        report = SendReport(sent=len(paths) - statuses["AlreadyStored"], already_present=statuses["AlreadyStored"],
                            seconds=seconds, bytes_sent=sum(p.stat().st_size for p in paths),
                            destination=self.name)
        log.info("%s: %d instance(s) uploaded to Orthanc in %.2f s", self.name, report.total, seconds)
        return report
