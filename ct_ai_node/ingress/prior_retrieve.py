"""Finding and retrieving a patient's prior CT study from a PACS: C-FIND, then C-GET
(``PacsQuery``), or QIDO-RS, then WADO-RS (``DicomwebQuery``, a DICOMweb archive).

Study Root Query/Retrieve. C-GET, not C-MOVE: the instances come back on the node's own
association, so the PACS needs no route to the node's listener and the prior never enters
the spool (where the rules would analyse and send it as if it were new). The PACS must let
the node's AE title query and retrieve (Orthanc: list it in ``DicomModalities``, or set
``DicomAlwaysAllowFind`` / ``DicomAlwaysAllowGet``; docs/reporting.md).

Matching keys are the ones every PACS indexes (PatientID, StudyDate range, ModalitiesInStudy);
IssuerOfPatientID is asked back and checked here, since many archives cannot match on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from ct_ai_node.errors import CtAiNodeError

logger = logging.getLogger(__name__)

#: the image storage classes a prior series may come in (what the loader reads)
CT_STORAGE = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
_PENDING = (0xFF00, 0xFF01)


class PriorQueryError(CtAiNodeError):
    """The PACS could not be asked, or refused: one line, no patient data."""


@dataclass(frozen=True)
class StudyMatch:
    study_instance_uid: str
    study_date: str
    study_time: str
    issuer: str


@dataclass(frozen=True)
class SeriesMatch:
    series_instance_uid: str
    modality: str
    #: NumberOfSeriesRelatedInstances; None when the PACS did not say
    instances: int | None
    description: str


def _study_matches(found: list[Dataset]) -> list[StudyMatch]:
    return [StudyMatch(str(d.get("StudyInstanceUID", "")), str(d.get("StudyDate", "") or ""),
                       str(d.get("StudyTime", "") or ""), str(d.get("IssuerOfPatientID", "") or ""))
            for d in found if d.get("StudyInstanceUID")]


def _series_matches(found: list[Dataset]) -> list[SeriesMatch]:
    out = []
    for d in found:
        if not d.get("SeriesInstanceUID"):
            continue
        try:
            count = int(d.get("NumberOfSeriesRelatedInstances"))
        except (TypeError, ValueError):
            count = None
        out.append(SeriesMatch(str(d.SeriesInstanceUID), str(d.get("Modality", "") or ""), count,
                               str(d.get("SeriesDescription", "") or "")))
    return out


class PacsQuery:
    """C-FIND / C-GET against one DICOM peer (a ``destinations`` entry of kind dicom)."""

    def __init__(self, host: str, port: int, ae_title: str, calling_ae_title: str, timeout_s: float = 60.0,
                 tls=None):
        self.host, self.port, self.ae_title = host, int(port), ae_title
        self.calling_ae_title, self.timeout_s, self.tls = calling_ae_title, float(timeout_s), tls

    def _ae(self) -> AE:
        from ct_ai_node.egress.dicom import client_ae

        return client_ae(self.calling_ae_title, self.timeout_s)

    def _associate(self, ae: AE, **kwargs):
        tls_args = (self.tls, self.host) if self.tls is not None else None
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args, **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise PriorQueryError(f"association with {self.ae_title}@{self.host}:{self.port} {why}")
        return assoc

    def _find(self, query: Dataset) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        found: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = getattr(status, "Status", None)
                if code is None:
                    raise PriorQueryError(f"C-FIND at {self.ae_title}: no answer (timeout or association lost)")
                if code in _PENDING:
                    if identifier is not None:
                        found.append(identifier)
                elif code != 0x0000:
                    raise PriorQueryError(f"C-FIND at {self.ae_title} failed with status 0x{code:04X}")
        finally:
            assoc.release()
        return found

    def find_studies(self, patient_id: str, up_to_date: str | None) -> list[StudyMatch]:
        """The patient's CT studies (StudyDate up to ``up_to_date``, ``YYYYMMDD``, when given)."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient_id
        query.IssuerOfPatientID = ""
        query.StudyInstanceUID = ""
        query.StudyDate = f"-{up_to_date}" if up_to_date else ""
        query.StudyTime = ""
        query.ModalitiesInStudy = "CT"
        return _study_matches(self._find(query))

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        """The CT series of one study."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = "CT"
        query.SeriesDescription = ""
        query.NumberOfSeriesRelatedInstances = ""
        return _series_matches(self._find(query))

    def get_series(self, study_uid: str, series_uid: str, into: Path) -> list[Path]:
        """C-GET one series into ``into`` (created), one Part-10 file per instance, as sent."""
        from ct_ai_node.ingress.scp import TRANSFER_SYNTAXES

        into.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []

        def on_store(event) -> int:
            path = into / f"{len(files):06d}.dcm"
            path.write_bytes(event.encoded_dataset())
            files.append(path)
            return 0x0000

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in CT_STORAGE:
            ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
        roles = [build_role(sop_class, scp_role=True) for sop_class in CT_STORAGE]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        last = None
        try:
            for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                last = getattr(status, "Status", None)
                if last is None:
                    raise PriorQueryError(f"C-GET at {self.ae_title}: no answer (timeout or association lost)")
        finally:
            assoc.release()
        if last not in (0x0000, 0xB000) or not files:
            raise PriorQueryError(f"C-GET at {self.ae_title} ended with status "
                                  f"{'none' if last is None else f'0x{last:04X}'} and {len(files)} instance(s)")
        logger.info("prior series: %d instance(s) retrieved from %s", len(files), self.ae_title)
        return files


class DicomwebQuery:
    """QIDO-RS / WADO-RS against a DICOMweb root (a ``destinations`` entry of kind stow: its
    ``url``, ``username``/``password``), for archives reached over HTTP only."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 timeout_s: float = 60.0):
        self.url, self.timeout_s = url.rstrip("/"), float(timeout_s)
        self.auth = (username, password or "") if username else None
        self.ae_title = self.url  # how messages name the archive

    def _get(self, path: str, params: dict | None = None, accept: str = "application/dicom+json"):
        import httpx

        try:
            with httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=10.0), auth=self.auth) as client:
                answer = client.get(self.url + path, params=params, headers={"Accept": accept})
        except httpx.HTTPError as exc:
            raise PriorQueryError(f"{self.url} cannot be reached ({type(exc).__name__})") from exc
        if answer.status_code == 204:
            return None
        if answer.status_code != 200:
            raise PriorQueryError(f"{self.url}{path.split('?')[0]} answered HTTP {answer.status_code}")
        return answer

    def _qido(self, path: str, params: dict) -> list[Dataset]:
        answer = self._get(path, params)
        if answer is None:
            return []
        try:
            return [Dataset.from_json(item) for item in answer.json()]
        except (ValueError, TypeError, KeyError) as exc:
            raise PriorQueryError(f"QIDO-RS at {self.url}: not a DICOM JSON answer ({type(exc).__name__})") from exc

    def find_studies(self, patient_id: str, up_to_date: str | None) -> list[StudyMatch]:
        params = {"PatientID": patient_id, "ModalitiesInStudy": "CT",
                  "includefield": ["00080020", "00080030", "00100021"]}
        if up_to_date:
            params["StudyDate"] = f"-{up_to_date}"
        return _study_matches(self._qido("/studies", params))

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        return _series_matches(self._qido(f"/studies/{study_uid}/series",
                                          {"Modality": "CT", "includefield": ["00201209", "0008103E"]}))

    def get_series(self, study_uid: str, series_uid: str, into: Path) -> list[Path]:
        """WADO-RS of one series into ``into`` (created), one Part-10 file per instance."""
        from ct_ai_node.ingress.stow import StowRequestError, parse_multipart_related

        answer = self._get(f"/studies/{study_uid}/series/{series_uid}",
                           accept='multipart/related; type="application/dicom"')
        if answer is None:
            raise PriorQueryError(f"WADO-RS at {self.url}: the series has no instances")
        try:
            parts = parse_multipart_related(answer.headers.get("content-type", ""), answer.content)
        except StowRequestError as exc:
            raise PriorQueryError(f"WADO-RS at {self.url}: not a DICOM multipart answer ({exc})") from exc
        into.mkdir(parents=True, exist_ok=True)
        files = []
        for i, (_, data) in enumerate(parts):
            path = into / f"{i:06d}.dcm"
            path.write_bytes(data)
            files.append(path)
        if not files:
            raise PriorQueryError(f"WADO-RS at {self.url}: the series has no instances")
        logger.info("prior series: %d instance(s) retrieved from %s", len(files), self.url)
        return files


def prior_source(peer, node_ae_title: str, timeout_s: float) -> PacsQuery | DicomwebQuery:
    """The query/retrieve side of a ``destinations`` entry (a rule's ``prior_source``): kind
    dicom -> ``PacsQuery`` (its calling AE title, TLS), kind stow -> ``DicomwebQuery``."""
    if peer.kind == "stow":
        return DicomwebQuery(peer.url, peer.username, peer.password.get_secret_value() if peer.password else None,
                             timeout_s)
    if peer.kind != "dicom":
        raise ValueError(f"destination {peer.name!r} (kind {peer.kind}) cannot be asked for priors")
    from ct_ai_node.egress.dicom import client_tls

    tls = None if peer.tls is None else client_tls(peer.tls.ca, peer.tls.cert, peer.tls.key, peer.tls.check_hostname)
    return PacsQuery(peer.host, peer.port, peer.ae_title, peer.calling_ae(node_ae_title), timeout_s, tls=tls)
