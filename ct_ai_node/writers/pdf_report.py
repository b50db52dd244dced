"""The PDF report (:mod:`pdf_page`) as a DICOM Encapsulated PDF (PS3.3 A.45.1), Modality
DOC, in the source's study: PACS and viewers list it beside the images, and every
workstation can open a PDF.

highdicom has no encapsulated-document class; its :class:`highdicom.SOPClass` builds
the Patient, General Study, General Equipment and SOP Common attributes the other
writers get from it (same validation of the copied source values), and the
Encapsulated Document Series, SC Equipment and Encapsulated Document modules are added
here. Pure: no disk, no network.
"""

from __future__ import annotations

import copy
import datetime
import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from ct_ai_node.pipeline.types import AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers import common
from ct_ai_node.writers.heatmap import HeatStyle
from ct_ai_node.writers.pdf_page import TITLE, build_pdf

logger = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: (0040,A043) Concept Name Code Sequence: LOINC "Diagnostic imaging report"
REPORT_CONCEPT = ("18748-4", "LN", "Diagnostic imaging report")

__all__ = ["ENCAPSULATED_PDF_STORAGE", "build_pdf", "build_pdf_report", "encapsulated_pdf"]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _source_instances(volume: Volume) -> list[Dataset]:
    """(0042,0013) Source Instance Sequence: every source instance once (the report is
    derived from the whole series; a multi-frame source is one item)."""
    items = []
    for ref in dict.fromkeys((s.sop_class_uid, s.sop_instance_uid) for s in volume.slices):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ref
        items.append(item)
    return items


def encapsulated_pdf(pdf: bytes, volume: Volume, result: AnalysisResult, series_number: int, *,
                     uids: common.ResultUids, institution_name: str | None = None,
                     when: datetime.datetime | None = None) -> hd.SOPClass:
    """``pdf`` wrapped as an Encapsulated PDF instance; UIDs ``uids.uid("pdf_report", ...)``."""
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("pdf does not start with %PDF-: not a PDF document")
    when = when or common.now()
    first = volume.datasets[0]
    try:
        equipment = [copy.deepcopy(hd.ContributingEquipment.for_image_acquisition(first))]
    except (ValueError, AttributeError):  # no Manufacturer in the source: nothing to credit
        equipment = []
    ds = hd.SOPClass(
        series_instance_uid=uids.uid("pdf_report", "series"),
        series_number=series_number,
        sop_instance_uid=uids.uid("pdf_report", "instance"),
        sop_class_uid=ENCAPSULATED_PDF_STORAGE,
        instance_number=1,
        modality="DOC",
        manufacturer=common.MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=common.series_description("AI report (PDF)", result, uids.revision),
        manufacturer_model_name=common.MODEL_NAME,
        software_versions=common.SOFTWARE_VERSION,
        device_serial_number=common.DEVICE_SERIAL_NUMBER,
        institution_name=institution_name,
        content_date=when.date(),
        content_time=when.time().replace(microsecond=0),
        **common.patient_study(first),
    )
    for keyword in ("PatientAge", "StudyDescription"):  # Patient Study / General Study, as the SCs
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    if equipment:
        ds.ContributingEquipmentSequence = equipment
    # SC Equipment: a workstation made it
    ds.ConversionType = "WSD"
    # Encapsulated Document
    ds.AcquisitionDateTime = when.replace(microsecond=0).strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the page names the patient
    ds.RecognizableVisualFeatures = "NO"
    ds.SourceInstanceSequence = _source_instances(volume)
    ds.DocumentTitle = common.lo(
        TITLE + (f" {common.NOT_FOR_DIAGNOSTIC_USE}" if common.needs_disclaimer(result.algorithm) else ""))
    ds.ConceptNameCodeSequence = [_code(*REPORT_CONCEPT)]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)  # the PDF's own length: the value below may be padded
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)  # OB values have even length
    return ds


def build_pdf_report(
    volume: Volume,
    result: AnalysisResult,
    series_number: int = common.SeriesNumbers().pdf_report,
    *,
    institution_name: str | None = None,
    uids: common.ResultUids | None = None,
    style: HeatStyle = HeatStyle(),
) -> hd.SOPClass:
    """The one-page PDF report of the analysis as an Encapsulated PDF instance."""
    uids = uids or common.ResultUids.for_analysis(volume, result)
    when = common.now()
    with common.building("PDF report"):
        pdf = build_pdf(volume, result, uids, when=when, style=style)
        return encapsulated_pdf(pdf, volume, result, series_number, uids=uids, institution_name=institution_name,
                                when=when)
