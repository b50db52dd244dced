"""Sending files out: C-STORE SCU, STOW-RS, Orthanc REST and a FHIR DiagnosticReport behind
one ``Destination`` protocol. Errors are ``DestinationError`` with ``retryable`` for the job queue."""

from ct_ai_node.egress.base import Destination, DestinationError, SendReport, classify_status
from ct_ai_node.egress.dicom import DicomDestination
from ct_ai_node.egress.factory import destination_from_config
from ct_ai_node.egress.fhir import FhirDestination
from ct_ai_node.egress.orthanc import OrthancDestination
from ct_ai_node.egress.stow import StowDestination

__all__ = [
    "Destination", "DestinationError", "DicomDestination", "FhirDestination", "OrthancDestination", "SendReport",
    "StowDestination", "classify_status", "destination_from_config",
]
