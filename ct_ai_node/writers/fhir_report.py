"""The analysis as a FHIR R4 ``DiagnosticReport`` (JSON), for sites that take results
into their EHR that way (``kind: fhir`` destinations, ``egress/fhir.py``).

Pure: ``result.json``'s document and the result SR's header in, a plain dict out; no
network, no disk, nothing logged (the header holds patient data).

- ``status`` ``preliminary``: an AI result nobody has verified;
- ``category`` imaging (HL7 v2-0074 ``RAD``, with the LOINC part LP29684-5 "Radiology");
- ``code`` LOINC 24627-2 "CT Chest", the study reported (the SR names the same code as
  its procedure reported);
- ``identifier`` the SR's SOP Instance UID (``urn:dicom:uid``, ``urn:oid:...``): the same
  analysis sent again is the same report (the destination's conditional create relies on it);
- ``subject``, ``imagingStudy`` and ``basedOn`` are logical references by identifier
  (PatientID, StudyInstanceUID, AccessionNumber): the node knows no FHIR resource ids;
- ``conclusion``: readable text beginning "AI suggestion, NOT FOR DIAGNOSTIC USE (trained
  on ...)"; ``conclusionCode`` the suggested CO-RADS category (local code);
- ``result``: contained ``Observation``\\ s (CT severity score, total and per lobe; share of
  the lungs involved; volumes in mL; probability), each ``preliminary`` too.

Dates: FHIR wants a time zone with a time of day. The SR's TimezoneOffsetFromUTC is used when
present, otherwise the node's local time zone (the node stands in the hospital whose
scanners wrote the study times).
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from pydicom.dataset import Dataset

from ct_ai_node.pipeline.types import LOBE_TEXT
from ct_ai_node.writers.common import NOT_FOR_DIAGNOSTIC_USE
from ct_ai_node.writers.seg import LOBE_CODES
from ct_ai_node.writers.sr import (
    CLASS_PROBABILITY_CODES,
    CO_RADS,
    CT_CHEST,
    CT_SEVERITY,
    LOBE_INVOLVEMENT,
    LOBE_SEVERITY,
    LUNG_INVOLVEMENT,
)

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
#: the SR's local coding scheme (99CTAI, writers/common.py) as a URI: no public
#: terminology has these concepts (CT severity score, AI CO-RADS suggestion ...)
LOCAL_SYSTEM = "urn:ct-ai-node:99CTAI"

#: LOINC 24627-2 "CT Chest" (Multisection, Chest, CT; a document-level radiology code),
#: the code the SR's procedure reported already uses (writers/sr.py CT_CHEST)
REPORT_CODE = {"system": LOINC, "code": CT_CHEST.value, "display": CT_CHEST.meaning}
CATEGORY = {"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"},
                       {"system": LOINC, "code": "LP29684-5", "display": "Radiology"}]}
_IMAGING = [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}]

#: volumes of the whole lungs (the SR has them per lobe only, "... in lobe")
_INFECTION_VOLUME = ("INFECTION-VOL", "Volume of suspected infection")
_GGO_VOLUME = ("GGO-VOL-LUNGS", "Volume of ground-glass opacity")
_CONSOLIDATION_VOLUME = ("CONS-VOL-LUNGS", "Volume of consolidation")


def _local(code: str, display: str) -> dict:
    return {"system": LOCAL_SYSTEM, "code": code, "display": display}


def _concept(coded: Any) -> tuple[str, str]:
    """(code value, meaning) of a highdicom CodedConcept."""
    return str(coded.value), str(coded.meaning)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _uid_value(uid: str) -> str:
    return f"urn:oid:{uid}"


def _tz(offset: str) -> timezone | None:
    """A DICOM TimezoneOffsetFromUTC ("+0100", "-0500") as a timezone."""
    m = re.fullmatch(r"([+-])(\d{2})(\d{2})", offset.strip())
    if not m:
        return None
    delta = timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
    return timezone(-delta if m.group(1) == "-" else delta)


def fhir_datetime(date: str, time: str = "", offset: str = "") -> str | None:
    """A DICOM DA (+ TM, + TimezoneOffsetFromUTC) as a FHIR dateTime: ``YYYY-MM-DD`` without
    a time, else with seconds and a time zone (the offset given, or the local one). None when
    the date is missing or not a date."""
    d = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", (date or "").strip())
    if not d:
        return None
    year, month, day = (int(x) for x in d.groups())
    t = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.\d*)?", (time or "").strip())
    try:
        if not t:
            return datetime(year, month, day).date().isoformat()
        naive = datetime(year, month, day, int(t.group(1)), int(t.group(2) or 0), int(t.group(3) or 0))
    except ValueError:
        return None
    tz = _tz(offset) if offset else None
    aware = naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()
    return aware.isoformat(timespec="seconds")


def _instant(date: str, time: str, offset: str) -> str | None:
    """A FHIR instant (a dateTime with a time of day and a zone), or None."""
    value = fhir_datetime(date, time, offset)
    return value if value is not None and "T" in value else None


def _patient_identifier(header: Dataset) -> dict | None:
    """PatientID with its issuer as ``system`` (an OID as ``urn:oid:``, a URI as it is); an
    issuer that is neither (a bare "HOSP") cannot be a FHIR system and is named as assigner."""
    patient_id = _text(header, "PatientID")
    if not patient_id:
        return None
    out: dict[str, Any] = {"type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]},
                           "value": patient_id}
    issuer = _text(header, "IssuerOfPatientID")
    if re.fullmatch(r"[0-2](\.(0|[1-9]\d*))+", issuer):
        out["system"] = _uid_value(issuer)
    elif re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", issuer):
        out["system"] = issuer
    elif issuer:
        out["assigner"] = {"display": issuer}
    return out


def _quantity(value: float, unit: str, code: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _lobe_text(name: str) -> str:
    return LOBE_TEXT.get(name, name.replace("_", " "))


def _observations(result: dict, subject: dict | None, effective: str | None) -> list[dict]:
    obs: list[dict] = []

    def add(ident: str, coding: dict, value: dict, body_site: dict | None = None) -> None:
        text = coding["display"] if body_site is None else f"{coding['display']}: {body_site['text']}"
        item: dict[str, Any] = {"resourceType": "Observation", "id": ident, "status": "preliminary",
                                "category": _IMAGING, "code": {"coding": [coding], "text": text}}
        if subject is not None:
            item["subject"] = subject
        if effective is not None:
            item["effectiveDateTime"] = effective
        if body_site is not None:
            item["bodySite"] = body_site
        item.update(value)
        obs.append(item)

    score = result.get("ct_severity_score")
    if score is not None:
        add("ct-severity", _local(*_concept(CT_SEVERITY)), {"valueInteger": int(score)})
    for lobe in result.get("lobes") or []:
        name = str(lobe.get("name"))
        site = LOBE_CODES.get(name)
        body_site = ({"coding": [{"system": SNOMED, "code": str(site.value), "display": str(site.meaning)}],
                      "text": _lobe_text(name)} if site is not None else {"text": _lobe_text(name)})
        if lobe.get("severity") is not None:
            add(f"severity-{name.replace('_', '-')}", _local(*_concept(LOBE_SEVERITY)),
                {"valueInteger": int(lobe["severity"])}, body_site)
        if lobe.get("involvement_percent") is not None:
            add(f"involvement-{name.replace('_', '-')}", _local(*_concept(LOBE_INVOLVEMENT)),
                {"valueQuantity": _quantity(float(lobe["involvement_percent"]), "%", "%")}, body_site)
    if result.get("involvement_percent") is not None:
        add("involvement", _local(*_concept(LUNG_INVOLVEMENT)),
            {"valueQuantity": _quantity(float(result["involvement_percent"]), "%", "%")})
    for key, (code, display), ident in (("lesion_volume_ml", _INFECTION_VOLUME, "infection-volume"),
                                        ("ggo_volume_ml", _GGO_VOLUME, "ggo-volume"),
                                        ("consolidation_volume_ml", _CONSOLIDATION_VOLUME, "consolidation-volume")):
        if result.get(key) is not None:
            add(ident, _local(code, display), {"valueQuantity": _quantity(float(result[key]), "mL", "mL")})
    if result.get("probability") is not None:
        add("probability", _local(*_concept(CLASS_PROBABILITY_CODES["covid_like"])),
            {"valueQuantity": _quantity(float(result["probability"]), "probability", "{probability}")})
    return obs


def conclusion_text(result: dict) -> str:
    """The report's readable text: the disclaimer first, then result, volumes, CT severity
    score, category suggestion and the comparison with the prior study (one line each)."""
    trained_on = result.get("trained_on") or "a data set not stated"
    lines = [f"AI suggestion, {NOT_FOR_DIAGNOSTIC_USE} (trained on {trained_on})."]
    finding = result.get("case_class_text") or result.get("label")
    if finding:
        p = result.get("probability")
        lines.append(f"Result: {finding}" + (f" (probability {float(p):.2f})." if p is not None else "."))
    lesion, share = result.get("lesion_volume_ml"), result.get("involvement_percent")
    if lesion is not None:
        line = f"Suspected infection: {float(lesion):.1f} mL"
        if share is not None:
            line += f", {float(share):.1f} % of the lung volume"
        ggo, cons = result.get("ggo_volume_ml"), result.get("consolidation_volume_ml")
        if ggo is not None and cons is not None:
            line += f" (ground-glass opacity {float(ggo):.1f} mL, consolidation {float(cons):.1f} mL)"
        lines.append(line + ".")
    score = result.get("ct_severity_score")
    if score is not None:
        lobes = [f"{_lobe_text(str(lobe.get('name')))} {lobe.get('severity')}" for lobe in result.get("lobes") or []
                 if lobe.get("severity") is not None]
        lines.append(f"CT severity score: {int(score)}/25" + (f" ({', '.join(lobes)})." if lobes else "."))
    category = result.get("category_suggestion") or {}
    if category.get("co_rads") is not None:
        line = f"Category suggestion: CO-RADS {category['co_rads']}"
        if category.get("rsna"):
            line += f", RSNA {category['rsna']}"
        features = [str(f) for f in category.get("features") or []]
        lines.append(line + (f" ({'; '.join(features)})." if features else "."))
    comparison = result.get("comparison")
    if isinstance(comparison, dict) and comparison.get("text"):
        lines.append(f"Comparison: {str(comparison['text']).strip()}")
    if result.get("algorithm"):
        lines.append(f"Algorithm: {result['algorithm']}.")
    return "\n".join(lines)


def report_identifier(header: Dataset) -> dict:
    """The report's identifier: the result SR's SOP Instance UID."""
    return {"system": DICOM_UID, "value": _uid_value(_text(header, "SOPInstanceUID"))}


def diagnostic_report(result: dict, header: Dataset) -> dict:
    """A FHIR R4 DiagnosticReport (JSON-ready dict) for one analysis: ``result`` is its
    ``result.json`` document, ``header`` the result SR (``sr.dcm``), pixel data not needed.

    Raises ValueError when the SR has no SOP Instance UID or the result is not ``done``
    (a not-analysed notice is not a report)."""
    if result.get("status") != "done":
        raise ValueError(f"result status {result.get('status')!r}: only an analysis that is done is reported")
    if not _text(header, "SOPInstanceUID"):
        raise ValueError("the result SR has no SOP Instance UID")
    offset = _text(header, "TimezoneOffsetFromUTC")
    effective = fhir_datetime(_text(header, "StudyDate"), _text(header, "StudyTime"), offset)
    issued = _instant(_text(header, "ContentDate"), _text(header, "ContentTime"), offset)

    patient = _patient_identifier(header)
    subject = {"type": "Patient", "identifier": patient} if patient is not None else None
    conclusion = conclusion_text(result)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "text": {"status": "generated",
                 "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                        + "".join(f"<p>{html.escape(line)}</p>" for line in conclusion.splitlines()) + "</div>"},
        "identifier": [report_identifier(header)],
        "status": "preliminary",
        "category": [CATEGORY],
        "code": {"coding": [REPORT_CODE], "text": f"CT Chest: AI analysis ({NOT_FOR_DIAGNOSTIC_USE.lower()})"},
    }
    accession = _text(header, "AccessionNumber")
    if accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]},
            "value": accession}}]
    if subject is not None:
        report["subject"] = subject
    if effective is not None:
        report["effectiveDateTime"] = effective
    if issued is not None:
        report["issued"] = issued
    study_uid = _text(header, "StudyInstanceUID") or str(result.get("study_instance_uid") or "")
    if study_uid:
        report["imagingStudy"] = [{"type": "ImagingStudy",
                                   "identifier": {"system": DICOM_UID, "value": _uid_value(study_uid)}}]
    observations = _observations(result, subject, effective)
    if observations:
        report["contained"] = observations
        report["result"] = [{"reference": f"#{o['id']}", "display": o["code"]["text"]} for o in observations]
    report["conclusion"] = conclusion
    category = result.get("category_suggestion") or {}
    if category.get("co_rads") is not None:
        _, meaning = _concept(CO_RADS)
        report["conclusionCode"] = [{"coding": [_local(f"CO-RADS-{int(category['co_rads'])}",
                                                       f"CO-RADS {int(category['co_rads'])}")],
                                     "text": f"{meaning}: CO-RADS {int(category['co_rads'])}"}]
    # "contained" belongs before the other elements in FHIR's JSON order; keys in a sensible order
    order = ["resourceType", "text", "contained", "identifier", "basedOn", "status", "category", "code", "subject",
             "effectiveDateTime", "issued", "result", "imagingStudy", "conclusion", "conclusionCode"]
    return {k: report[k] for k in order if k in report}
