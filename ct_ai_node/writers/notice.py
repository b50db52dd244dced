"""The "AI analysis not performed" notice: one Secondary Capture and one Basic Text SR
that go to the PACS, in the source's study, when a routed series is refused or its
analysis fails for good. Without them the radiologist cannot tell "normal" from "never
analysed".

Pure: a source header dataset + reason + algorithm in, two pydicom datasets out.

The source header comes from the wild and may be damaged (no PatientName, an unknown
character set, invalid dates or UIDs). Every attribute copied from it is checked and
cleaned one by one: a bad type 2 attribute is written empty, a bad optional one left out,
an invalid Study Instance UID replaced by one derived from it (the notice then lands in a
study of its own, but is still valid DICOM). Nothing the source holds can make the
build fail. Text is written in UTF-8 (ISO_IR 192) when anything is not ASCII.

UIDs come from :class:`common.ResultUids` of (source series, pipeline, algorithm version)
and the reason: building the same notice twice gives the same SOP Instance UIDs, so a
re-sent notice replaces (or is ignored by) the PACS instead of duplicating.
"""

from __future__ import annotations

import datetime
import logging
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ct_ai_node.pipeline.types import AlgorithmInfo
from ct_ai_node.volume.identity import is_valid_uid, uuid_as_uid
from ct_ai_node.writers import common
from ct_ai_node.writers.heatmap import burn_caption

logger = logging.getLogger(__name__)

SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

#: file names in the job's outbox folder
SC_FILE = "notice_sc.dcm"
SR_FILE = "notice_sr.dcm"

#: the notice image: black, text only
IMAGE_SIZE = 512
#: characters per burned-in line before wrapping (fits 512 columns at the caption's font size)
_WRAP = 60

HEADLINE = "AI analysis not performed"


@dataclass(frozen=True)
class Notice:
    """The two notice objects."""

    sc: Dataset
    sr: Dataset

    def named(self) -> Iterator[tuple[str, Dataset]]:
        yield SC_FILE, self.sc
        yield SR_FILE, self.sr

    def sop_classes(self) -> dict[str, str]:
        return {name: str(ds.SOPClassUID) for name, ds in self.named()}


def algorithm_for_pipeline(pipeline: str, version: str = common.SOFTWARE_VERSION) -> AlgorithmInfo:
    """The algorithm a notice names when no model was loaded (the analysis stopped before,
    or the model could not be loaded): the pipeline and the node's version."""
    return AlgorithmInfo(name=f"{common.MANUFACTURER} {common.method_label(pipeline)} pipeline", version=version)


def notice_text(reason: str) -> str:
    """``AI analysis not performed: <reason>``"""
    reason = " ".join(str(reason or "").split()) or "unknown reason"
    return f"{HEADLINE}: {reason}"


# --- cleaning what the source holds ------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def _get(source: Dataset, keyword: str) -> object | None:
    """The value of ``keyword``, or None when absent, empty or unreadable."""
    try:
        if keyword not in source:
            return None
        value = source[keyword].value
    except Exception:  # noqa: BLE001 - a damaged element (bad length, undecodable) counts as absent
        logger.debug("source %s unreadable", keyword, exc_info=True)
        return None
    if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
        return None
    return value


def _text(value: object | None, max_len: int) -> str:
    """One line of text: no control characters or backslashes, at most ``max_len``."""
    if value is None:
        return ""
    try:
        text = str(value)
    except Exception:  # noqa: BLE001
        return ""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text[:max_len]


def _person_name(value: object | None) -> str:
    """PN: up to five components, each at most 64 characters; no ideographic groups
    (their escape sequences belong to the source's character set)."""
    if value is None:
        return ""
    try:
        text = str(value).split("=")[0]
    except Exception:  # noqa: BLE001
        return ""
    parts = [" ".join(_CONTROL.sub(" ", p).split())[:64] for p in text.split("^")[:5]]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def _date(value: object | None) -> str:
    text = _text(value, 8)
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return ""
    return text


def _time(value: object | None) -> str:
    text = _text(value, 16)
    if not re.fullmatch(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?", text):
        return ""
    return text


def _study_uid(source: Dataset, series_uid: str) -> str:
    found = _get(source, "StudyInstanceUID")
    text = _text(found, 200)
    if is_valid_uid(text):
        return text
    converted = uuid_as_uid(text)  # a UUID: its UID form (PS3.5 B.2), as the loader repairs it
    if converted is not None:
        return converted
    # no usable study: a stable new one, derived from what is there
    logger.warning("source Study Instance UID is %s: the notice gets a study of its own",
                   "missing" if found is None else "invalid")
    return str(generate_uid(entropy_srcs=[common.MANUFACTURER, "notice-study", _text(found, 200), series_uid]))


def _series_uid(source: Dataset) -> str:
    """The source series as the ResultUids key: its UID as written (valid or not), else
    the study UID, else a constant (the UIDs then depend on the reason only)."""
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID"):
        text = _text(_get(source, keyword), 200)
        if text:
            return text
    return "unknown-series"


def _series_label(source: Dataset) -> str:
    """``series 3 "Chest 2.5mm"``, which series was not analysed, for the text."""
    number = _text(_get(source, "SeriesNumber"), 12)
    description = _text(_get(source, "SeriesDescription"), 64)
    label = "series " + number if number else "series"
    if description:
        label += f' "{description}"'
    return label


# --- the two objects -----------------------------------------------------------------------


def _common_attributes(ds: Dataset, source: Dataset, study_uid: str, institution_name: str | None,
                       when: datetime.datetime) -> None:
    """Patient, General Study, Patient Study, General Equipment; type 2 empty when missing."""
    ds.PatientName = _person_name(_get(source, "PatientName"))
    ds.PatientID = _text(_get(source, "PatientID"), 64)
    issuer = _text(_get(source, "IssuerOfPatientID"), 64)
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = _date(_get(source, "PatientBirthDate"))
    sex = _text(_get(source, "PatientSex"), 16).upper()
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    age = _text(_get(source, "PatientAge"), 4)
    if re.fullmatch(r"\d{3}[DWMY]", age):
        ds.PatientAge = age

    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _date(_get(source, "StudyDate"))
    ds.StudyTime = _time(_get(source, "StudyTime"))
    ds.ReferringPhysicianName = _person_name(_get(source, "ReferringPhysicianName"))
    ds.StudyID = _text(_get(source, "StudyID"), 16)
    ds.AccessionNumber = _text(_get(source, "AccessionNumber"), 16)
    description = _text(_get(source, "StudyDescription"), 64)
    if description:
        ds.StudyDescription = description

    ds.Manufacturer = common.MANUFACTURER
    ds.ManufacturerModelName = common.MODEL_NAME
    ds.SoftwareVersions = common.lo(common.SOFTWARE_VERSION)
    ds.DeviceSerialNumber = common.lo(common.DEVICE_SERIAL_NUMBER)
    if institution_name:
        ds.InstitutionName = common.lo(institution_name)

    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")


def _file_meta(ds: Dataset) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _charset(ds: Dataset) -> None:
    """(0008,0005): UTF-8 when any text is not ASCII, else the default repertoire."""
    for elem in ds.iterall():
        if isinstance(elem.value, str) and not elem.value.isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"
            return
        if elem.VR == "PN" and elem.value is not None and not str(elem.value).isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"
            return


def _caption(reason: str, algorithm: AlgorithmInfo, series: str) -> common.Caption:
    top = textwrap.wrap(notice_text(reason), _WRAP)[:12]
    top += textwrap.wrap(f"for {series}", _WRAP)[:2]
    bottom = [f"{algorithm.name}", f"version {algorithm.version}"]
    if common.needs_disclaimer(algorithm):
        bottom.append(common.NOT_FOR_DIAGNOSTIC_USE)
    return common.Caption(tuple(top), tuple(_text(line, 200) for line in bottom))


def _description(algorithm: AlgorithmInfo, what: str) -> str:
    suffix = f" {common.NOT_FOR_DIAGNOSTIC_USE}" if common.needs_disclaimer(algorithm) else ""
    return common.lo(f"{what}{suffix}")


def build_notice_sc(source: Dataset, reason: str, algorithm: AlgorithmInfo, pipeline: str, *,
                    series_number: int = common.SeriesNumbers().notice_sc, institution_name: str | None = None,
                    when: datetime.datetime | None = None, uids: common.ResultUids | None = None) -> Dataset:
    """An RGB Secondary Capture: black, with ``AI analysis not performed: <reason>``, the
    series concerned, the algorithm and its version (and NOT FOR DIAGNOSTIC USE for an
    algorithm not clinically validated) burned in."""
    when = when or common.now()
    uids = uids or notice_uids(source, pipeline, algorithm)
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.SOPInstanceUID = uids.uid("notice", "sc", "instance", notice_text(reason))
    _common_attributes(ds, source, _study_uid(source, uids.source_series_uid), institution_name, when)
    ds.Modality = "OT"
    ds.SeriesInstanceUID = uids.uid("notice", "sc", "series", notice_text(reason))
    ds.SeriesNumber = series_number
    ds.SeriesDescription = _description(algorithm, HEADLINE)
    ds.Laterality = ""  # type 2C, unknown: the notice shows no body part (dciodvfy needs it)
    ds.ConversionType = "SYN"  # synthetic: drawn by the node, not captured
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"  # the text names no patient and no date
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.DateOfSecondaryCapture = when.strftime("%Y%m%d")
    ds.TimeOfSecondaryCapture = when.strftime("%H%M%S")
    ds.ImageComments = common.lo(notice_text(reason))
    ds.DerivationDescription = _text(f"{notice_text(reason)}; {algorithm.name} {algorithm.version}", 1024)

    rgb = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    burn_caption(rgb, _caption(reason, algorithm, _series_label(source)))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    _charset(ds)
    _file_meta(ds)
    return ds


def _code(code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _item(relationship: str, value_type: str, name, value: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(name)]
    if value_type == "TEXT":
        item.TextValue = str(value)
    elif value_type == "CODE":
        item.ConceptCodeSequence = [_code(value)]
    elif value_type == "UIDREF":
        item.UID = str(value)
    else:  # pragma: no cover - only the three above are built here
        raise ValueError(f"value type {value_type!r} is not built by the notice")
    return item


def build_notice_sr(source: Dataset, reason: str, algorithm: AlgorithmInfo, pipeline: str, *,
                    series_number: int = common.SeriesNumbers().notice_sr, institution_name: str | None = None,
                    when: datetime.datetime | None = None, uids: common.ResultUids | None = None) -> Dataset:
    """A Basic Text SR: "Diagnostic Imaging Report" with the algorithm as observer device
    and text items for the notice, the reason, the algorithm and its version."""
    when = when or common.now()
    uids = uids or notice_uids(source, pipeline, algorithm)
    text = notice_text(reason)
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = uids.uid("notice", "sr", "instance", text)
    _common_attributes(ds, source, _study_uid(source, uids.source_series_uid), institution_name, when)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = uids.uid("notice", "sr", "series", text)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = _description(algorithm, f"{HEADLINE} (report)")
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(codes.LN.DiagnosticImagingReport)]
    ds.ContinuityOfContent = "SEPARATE"
    device = codes.DCM
    content = [
        _item("HAS OBS CONTEXT", "CODE", device.ObserverType, device.Device),
        # the same algorithm version is the same device, run after run (as in sr.py)
        _item("HAS OBS CONTEXT", "UIDREF", device.DeviceObserverUID,
              generate_uid(entropy_srcs=[common.MANUFACTURER, algorithm.name, algorithm.version])),
        _item("HAS OBS CONTEXT", "TEXT", device.DeviceObserverName, common.lo(algorithm.name)),
        _item("HAS OBS CONTEXT", "TEXT", device.DeviceObserverManufacturer, common.MANUFACTURER),
        _item("HAS OBS CONTEXT", "TEXT", device.DeviceObserverModelName,
              common.lo(f"{common.method_label(pipeline)} {algorithm.version}")),
        _item("CONTAINS", "TEXT", codes.DCM.Finding, f"{text} ({_series_label(source)})"),
        _item("CONTAINS", "TEXT", codes.DCM.AlgorithmName, algorithm.name),
        _item("CONTAINS", "TEXT", codes.DCM.AlgorithmVersion, algorithm.version),
    ]
    comment = "The series was not analysed by the AI: no AI result exists for it."
    if common.needs_disclaimer(algorithm):
        comment += f" {common.NOT_FOR_DIAGNOSTIC_USE}: trained on {algorithm.trained_on}."
    content.append(_item("CONTAINS", "TEXT", codes.DCM.Comment, comment))
    ds.ContentSequence = content
    _charset(ds)
    _file_meta(ds)
    return ds


def notice_uids(source: Dataset, pipeline: str, algorithm: AlgorithmInfo) -> common.ResultUids:
    return common.ResultUids(_series_uid(source), str(pipeline), (("algorithm", str(algorithm.version)),))


def build_notice(source: Dataset, reason: str, algorithm: AlgorithmInfo, pipeline: str, *,
                 series_number_base: int = 900, institution_name: str | None = None,
                 when: datetime.datetime | None = None) -> Notice:
    """Both notice objects for a series not analysed because of ``reason``.

    ``source``: a header of the series (pixel data not needed), as received; it may be
    damaged. ``algorithm``: what would have analysed it (``algorithm_for_pipeline``)."""
    when = when or common.now()
    uids = notice_uids(source, pipeline, algorithm)
    numbers = common.SeriesNumbers(series_number_base)
    kwargs = {"institution_name": institution_name, "when": when, "uids": uids}
    return Notice(
        sc=build_notice_sc(source, reason, algorithm, pipeline,
                           series_number=numbers.notice_sc, **kwargs),
        sr=build_notice_sr(source, reason, algorithm, pipeline,
                           series_number=numbers.notice_sr, **kwargs),
    )
