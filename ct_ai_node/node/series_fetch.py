"""Where a worker finds a job's series: the spool on its own disk, or the ingress node over HTTP.

A worker on the ingress host reads the spool directly. A worker on another host
(``workers.fetch_from``) retrieves the series with WADO-RS from the ingress node's own
DICOMweb endpoint (``GET /dicomweb/spool/<key>/studies/<study>/series/<series>``, one
``multipart/related; type="application/dicom"`` answer, the instances byte for byte as they
were received) into a folder of its own, so it needs no disk shared with the ingress host.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

from ct_ai_node.config import NodeConfig
from ct_ai_node.errors import CtAiNodeError
from ct_ai_node.logs import series_ref

logger = logging.getLogger(__name__)

#: a series of 600 slices of 512 x 512 is about 300 MB: allow a slow network its time
FETCH_TIMEOUT_S = 600.0


class FetchError(CtAiNodeError):
    """The series could not be fetched; ``retryable`` false when asking again cannot help."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def spool_series_path(series_key: str, study_uid: str, series_uid: str) -> str:
    """The WADO-RS path, below the node's web root, of one spool series."""
    return f"/dicomweb/spool/{series_key}/studies/{study_uid}/series/{series_uid}"


class SeriesSource:
    """The series of a job's payload as files in a folder: ``open(payload, scratch)`` returns
    (folder, files, SOP Instance UIDs). ``scratch`` is where a fetched copy goes; a spool
    series is used where it lies."""

    def __init__(self, config: NodeConfig, spool=None):
        self.fetch_from = config.workers.fetch_from
        token = config.workers.fetch_token
        self.headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
        self.spool = spool
        if self.fetch_from is None and spool is None:
            from ct_ai_node.spool import Spool

            st = config.storage
            self.spool = Spool(st.spool_dir, st.db_path, fsync=st.fsync)

    @property
    def remote(self) -> bool:
        return self.fetch_from is not None

    def open(self, payload: dict, scratch: Path) -> tuple[Path, list[Path], list[str]]:
        key = payload["series_key"]
        if self.spool is not None:
            return self.spool.series_dir(key), self.spool.instance_paths(key), self.spool.instance_uids(key)
        study, series = payload.get("study_uid"), payload.get("series_uid")
        if not study or not series:
            raise FetchError("the job names no study and series UID (queued by an older node): re-run it",
                             retryable=False)
        files, uids = self._fetch(key, study, series, scratch)
        return scratch, files, uids

    def _fetch(self, key: str, study: str, series: str, into: Path) -> tuple[list[Path], list[str]]:
        import httpx
        import pydicom

        from ct_ai_node.ingress.stow import StowRequestError, parse_multipart_related

        url = self.fetch_from + spool_series_path(key, study, series)
        try:
            with httpx.Client(timeout=httpx.Timeout(FETCH_TIMEOUT_S, connect=10.0), headers=self.headers) as client:
                answer = client.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        except httpx.HTTPError as exc:
            raise FetchError(f"fetching the series from {self.fetch_from} failed: {type(exc).__name__}: {exc}") from exc
        if answer.status_code == 404:
            raise FetchError(f"the ingress node {self.fetch_from} no longer holds the series (404)", retryable=False)
        if answer.status_code in (401, 403):
            raise FetchError(f"the ingress node {self.fetch_from} refused the worker ({answer.status_code}): "
                             "set workers.fetch_token to a token with role worker", retryable=False)
        if answer.status_code != 200:
            raise FetchError(f"the ingress node {self.fetch_from} answered {answer.status_code}")
        try:
            parts = parse_multipart_related(answer.headers.get("content-type", ""), answer.content)
        except StowRequestError as exc:
            raise FetchError(f"the ingress node's answer is not a DICOM multipart: {exc}") from exc
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        files, uids = [], []
        for i, (_, data) in enumerate(parts):
            path = into / f"{i:06d}.dcm"
            path.write_bytes(data)
            files.append(path)
            try:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                uids.append(str(ds.SOPInstanceUID))
            except Exception:  # noqa: BLE001 - the analysis says what is wrong with the file
                uids.append(f"unreadable-{i}")
        logger.info("series %s: %d instance(s) fetched from %s", series_ref(key), len(files), self.fetch_from)
        return files, uids
