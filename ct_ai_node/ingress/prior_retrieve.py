"""Finding and retrieving a patient's prior CT study from a PACS: C-FIND, then C-GET.

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


class PacsQuery:
    """C-FIND / C-GET against one DICOM peer (a ``destinations`` entry of kind dicom)."""

    def __init__(self, host: str, port: int, ae_title: str, calling_ae_title: str, timeout_s: float = 60.0,
                 tls=None):
        self.host, self.port, self.ae_title = host, int(port), ae_title
        self.calling_ae_title, self.timeout_s, self.tls = calling_ae_title, float(timeout_s), tls

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        return ae

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
        return [StudyMatch(str(d.get("StudyInstanceUID", "")), str(d.get("StudyDate", "") or ""),
                           str(d.get("StudyTime", "") or ""), str(d.get("IssuerOfPatientID", "") or ""))
                for d in self._find(query) if d.get("StudyInstanceUID")]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        """The CT series of one study."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = "CT"
        query.SeriesDescription = ""
        query.NumberOfSeriesRelatedInstances = ""
        out = []
        for d in self._find(query):
            if not d.get("SeriesInstanceUID"):
                continue
            try:
                count = int(d.get("NumberOfSeriesRelatedInstances"))
            except (TypeError, ValueError):
                count = None
            out.append(SeriesMatch(str(d.SeriesInstanceUID), str(d.get("Modality", "") or ""), count,
                                   str(d.get("SeriesDescription", "") or "")))
        return out

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
