"""The one-page PDF report and its Encapsulated PDF: the page's text read back with
poppler's pdftotext, the page rendered with pdftoppm, the DICOM object validated with
dciodvfy and stored in a real Orthanc over C-STORE."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from ct_ai_node import peers
from ct_ai_node.egress import DicomDestination
from ct_ai_node.output_folder import write_outputs
from ct_ai_node.pipeline.types import LOBES, CategorySuggestion, LobeInvolvement
from ct_ai_node.writers import build_outputs
from ct_ai_node.writers.common import ResultUids
from ct_ai_node.writers.pdf_page import build_pdf, pdf_text, person_name
from ct_ai_node.writers.pdf_report import ENCAPSULATED_PDF_STORAGE, build_pdf_report
from ct_ai_node.writers.source_header import sanitise_volume

from helpers_writers import dciodvfy_errors, make_ct_series, make_multiframe_volume, make_result, make_volume, roundtrip

needs_poppler = pytest.mark.skipif(not shutil.which("pdftotext") or not shutil.which("pdftoppm"),
                                   reason="poppler-utils (pdftotext, pdftoppm) not installed: run `make test`")
needs_dciodvfy = pytest.mark.skipif(not shutil.which("dciodvfy"),
                                    reason="dciodvfy (dicom3tools) not installed: run `make test`")
needs_orthanc = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists() and not peers.tool_available("Orthanc"),
                                   reason="Orthanc not installed: run `make test`")


@pytest.fixture(scope="module")
def volume():
    return sanitise_volume(make_volume(make_ct_series())).volume


@pytest.fixture(scope="module")
def result(volume):
    return make_result(volume)


def with_lobes(result):
    """A result as the lobe and category stages will give it (they are not wired in yet)."""
    lobes = [LobeInvolvement(name, 900.0 + 100 * i, 10.0 * i, 2.0 * i, 1.5 * i * i, min(i, 5))
             for i, name in enumerate(LOBES)]
    return dataclasses.replace(
        result, lobes=lobes, ct_severity_score=sum(lobe.severity for lobe in lobes),
        case_class="covid_like", class_probabilities={"covid_like": 0.8, "other_pneumonia": 0.15, "no_pneumonia": 0.05},
        ggo_volume_ml=120.0, consolidation_volume_ml=15.5,
        category=CategorySuggestion(4, "typical", ("bilateral", "peripheral ground glass", "lower zones", "posterior",
                                                   "multifocal", "rounded", "seventh feature, not listed")))


def page_text(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    out = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return " ".join(out.split())


def pages(pdf: bytes, tmp_path: Path) -> int:
    path = tmp_path / "count.pdf"
    path.write_bytes(pdf)
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    return int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))


def uids_for(volume, result):
    return ResultUids.for_analysis(volume, result)


# --- the page ------------------------------------------------------------------------------


@needs_poppler
def test_page_has_warning_patient_result_and_model_but_no_lobes_without_them(volume, result, tmp_path):
    pdf = build_pdf(volume, result, uids_for(volume, result))
    assert pdf.startswith(b"%PDF-") and pages(pdf, tmp_path) == 1
    text = page_text(pdf, tmp_path)
    assert text.startswith("AI chest CT analysis \u2014 NOT FOR DIAGNOSTIC USE")
    for expected in ("Phantom, Pat", "PAT001", "2024-01-02", "ACC0001", "COVID-19-like pneumonia",
                     "P(COVID-19-like) 0.87", f"Lung volume {result.lung_volume_ml:.0f} ml",
                     f"({result.involvement_percent:.1f}% of the lungs)", "Key image 1/5",
                     "synthetic chest-CT phantoms only", "0.1.0+phantom-a1b2c3d4", "Analysed"):
        assert expected in text, expected
    for absent in ("Lobes", "CT severity score", "AI suggestion", "Class probabilities", "Ground-glass"):
        assert absent not in text, absent


@needs_poppler
def test_page_has_lobe_table_severity_and_suggestion_when_given(volume, result, tmp_path):
    full = with_lobes(result)
    pdf = build_pdf(volume, full, uids_for(volume, full))
    assert pages(pdf, tmp_path) == 1  # everything still fits one page
    text = page_text(pdf, tmp_path)
    assert "Lobe Volume (ml) Involvement (%) Severity (0-5)" in text
    assert "Right upper lobe 900 0.0 0" in text and "Left lower lobe 1300 24.0 4" in text
    assert "Right middle lobe" in text and "Left upper lobe" in text
    assert "CT severity score 10 / 25" in text
    assert "AI suggestion for the radiologist: CO-RADS 4; RSNA: typical" in text
    assert "- peripheral ground glass" in text and "- rounded" in text and "seventh" not in text
    assert "Class probabilities: COVID-19-like pneumonia 0.80; Other pneumonia (not COVID-19-like) 0.15" in text
    assert "Ground-glass opacity 120 ml" in text and "Consolidation 16 ml" in text


@needs_poppler
def test_non_latin1_patient_name_never_breaks_the_page(tmp_path):
    series = make_ct_series()
    for ds in series:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Łęcka\x07^Zoë=山田^花子"
    volume = sanitise_volume(make_volume(series)).volume
    result = make_result(volume)
    text = page_text(build_pdf(volume, result, uids_for(volume, result)), tmp_path)
    assert "?ecka, Zoë" in text  # ę -> e, Ł has no base letter: ?, ë is printable, the bell is gone
    assert pdf_text("山田 Ａ\u200b") == "?? A "  # full-width A decomposes, kanji do not
    assert person_name("山田^花子") == "山田, 花子" and person_name("=山田^花子") == "山田, 花子"
    assert person_name("Doe^John^Q^Dr^Jr") == "Dr Doe, John Q Jr"


@needs_poppler
def test_deidentified_source_prints_what_exists(tmp_path):
    series = make_ct_series()
    for ds in series:
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyDate"):
            delattr(ds, keyword)
    volume = sanitise_volume(make_volume(series)).volume
    result = make_result(volume)
    text = page_text(build_pdf(volume, result, uids_for(volume, result)), tmp_path)
    assert "No patient or study identification in the source" in text
    assert "Patient name" not in text and "COVID-19-like pneumonia" in text


@needs_poppler
def test_page_renders_as_png(volume, result, tmp_path):
    """poppler renders page 1; the PNG stays in tmp_path as the test's artefact."""
    ds = build_pdf_report(volume, with_lobes(result))
    pdf = bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]
    (tmp_path / "report.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "1", str(tmp_path / "report.pdf"),
                    str(tmp_path / "page")], check=True, timeout=60, capture_output=True)
    (png,) = tmp_path.glob("page*.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    from PIL import Image

    with Image.open(png) as image:
        assert abs(image.width - 496) <= 2 and abs(image.height - 702) <= 2  # A4 portrait at 60 dpi
        rgb = np.asarray(image.convert("RGB"))
    assert (rgb[..., 0] > 150).sum() > 0 and (rgb[..., 2] > 150).sum() > 0  # the red warning, the heat map


# --- the DICOM object --------------------------------------------------------------------------


@pytest.mark.parametrize("frames", ["single-frame", "multi-frame"])
def test_encapsulated_pdf_attributes_and_dciodvfy(frames):
    series = make_ct_series()
    volume = sanitise_volume(make_volume(series) if frames == "single-frame" else make_multiframe_volume(series)).volume
    result = make_result(volume)
    ds = roundtrip(build_pdf_report(volume, result, 909, institution_name="Test Hospital"))
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE and ds.Modality == "DOC" and ds.SeriesNumber == 909
    assert ds.StudyInstanceUID == volume.study_instance_uid and ds.PatientID == "PAT001"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and ds.BurnedInAnnotation == "YES"
    assert ds.ConversionType == "WSD" and ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert "NOT FOR DIAGNOSTIC USE" in ds.DocumentTitle and "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    doc = bytes(ds.EncapsulatedDocument)
    assert len(doc) % 2 == 0 and ds.EncapsulatedDocumentLength in (len(doc), len(doc) - 1)
    assert doc[: ds.EncapsulatedDocumentLength].rstrip().endswith(b"%%EOF")
    assert {i.ReferencedSOPInstanceUID for i in ds.SourceInstanceSequence} == {s.sop_instance_uid
                                                                               for s in volume.slices}
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "Phantom Scanners"
    again = build_pdf_report(volume, result, 909)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    rev2 = build_pdf_report(volume, result, 909, uids=ResultUids.for_analysis(volume, result, 2))
    assert rev2.SOPInstanceUID != ds.SOPInstanceUID and "rev 2" in rev2.SeriesDescription
    if shutil.which("dciodvfy"):
        errors, _ = dciodvfy_errors(ds)
        assert errors == [], "\n".join(errors)


@needs_dciodvfy
def test_deidentified_and_non_latin1_sources_give_valid_objects():
    series = make_ct_series()
    for ds in series:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Łęcka^Zoë=山田^花子"
        for keyword in ("PatientID", "AccessionNumber", "StudyDate", "Manufacturer"):
            delattr(ds, keyword)
    volume = sanitise_volume(make_volume(series)).volume
    ds = build_pdf_report(volume, make_result(volume))
    assert "ContributingEquipmentSequence" not in ds
    errors, _ = dciodvfy_errors(ds)
    assert errors == [], "\n".join(errors)


def test_build_outputs_lists_the_pdf_and_keeps_the_others_when_it_fails(volume, result, monkeypatch):
    import ct_ai_node.writers as writers

    out = build_outputs(volume, result)
    names = [name for name, _ in out.named()]
    assert names[-1] == "report_pdf.dcm" and out.sop_classes()["report_pdf.dcm"] == ENCAPSULATED_PDF_STORAGE
    assert "pdf_report" in out.timings_s
    # the page cannot be set: everything else is kept
    def broken_page(*args, **kwargs):
        raise ValueError("page cannot be set")

    monkeypatch.setattr(writers.pdf_report, "build_pdf", broken_page)
    broken = build_outputs(volume, result)
    assert broken.pdf_report is None
    assert [n for n, _ in broken.named()] == names[:-1]
    assert any(w.startswith("PDF report not written: ") for w in broken.warnings), broken.warnings


# --- a real PACS -------------------------------------------------------------------------------


@needs_orthanc
def test_orthanc_stores_and_lists_the_pdf(volume, result, tmp_path):
    written = write_outputs(volume, result, tmp_path / "out", parallel=False)
    assert "report_pdf.dcm" in written.outputs
    files = [tmp_path / "out" / name for name in written.outputs]
    pdf_ds = pydicom.dcmread(tmp_path / "out" / "report_pdf.dcm")
    with peers.Orthanc(tmp_path / "orthanc").start() as orthanc:
        report = DicomDestination("pacs", "127.0.0.1", orthanc.dicom_port, orthanc.ae_title).send(files)
        assert report.sent == len(files)
        (study,) = httpx.get(f"{orthanc.url}/studies", timeout=10).json()
        series = httpx.get(f"{orthanc.url}/studies/{study}/series", timeout=10).json()
        docs = [s for s in series if s["MainDicomTags"].get("Modality") == "DOC"]
        assert len(docs) == 1 and docs[0]["MainDicomTags"]["SeriesInstanceUID"] == pdf_ds.SeriesInstanceUID
        (instance,) = docs[0]["Instances"]
        tags = httpx.get(f"{orthanc.url}/instances/{instance}/simplified-tags", timeout=10).json()
        assert tags["SOPClassUID"] == ENCAPSULATED_PDF_STORAGE
        assert tags["MIMETypeOfEncapsulatedDocument"] == "application/pdf"
        pdf = httpx.get(f"{orthanc.url}/instances/{instance}/pdf", timeout=10)
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
