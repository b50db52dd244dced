"""Our results in a real OHIF v3 viewer: a real Orthanc (DICOMweb) holds a phantom CT
study and the node's results for it; the prebuilt OHIF app (npm ``@ohif/app``, installed
by ``make test`` into ``.ohif/``) is served on the same origin as an Orthanc proxy, and
headless Debian Chromium driven by ``playwright-core`` opens each result series in a
fresh page, as a PACS link would (``initialSeriesInstanceUID``).

The results are those of an analysis with everything a report holds: lobes, CT severity
score, category suggestion and the comparison with a prior study (analysed first).

Checked: the display SR opens on the CT image it references, with its region drawn and
its area label, and no error; the SEG overlay lands on the lesion slice with the pixel
counts and centroids of our SEG; both Secondary Capture series display; the PDF report
(Encapsulated PDF, DOC) is listed in the study's series panel. Screenshots go to
``out/test-artifacts/ohif/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from ct_ai_node.analyze import AnalyzeOptions, analyze_folder
from ct_ai_node.config import PriorsSection
from ct_ai_node.node.history import PatientHistory
from ct_ai_node.node.priors import PriorLookup
from ct_ai_node.peers import ORTHANC_PLUGIN_DIRS, Orthanc
from ct_ai_node.pipeline.methods import DEFAULT_PIPELINE
from ct_ai_node.synthetic import copy_as_new_study

from ohif.server import ViewerServer

REPO = Path(__file__).resolve().parent.parent
OHIF = REPO / ".ohif"
DIST = OHIF / "app" / "dist"
PLAYWRIGHT = OHIF / "node_modules" / "playwright-core"
INSPECT = Path(__file__).resolve().parent / "ohif" / "inspect_viewer.mjs"
SOURCE = REPO / "sample_series" / "covid_like"
PRIOR = REPO / "sample_series" / "normal"
ARTIFACTS = REPO / "out" / "test-artifacts" / "ohif"
PAGE_TIMEOUT_S = 90
#: what OHIF shows (toast or error page) when loading a series fails
ERROR_TEXTS = ("Something went wrong", "One or more of the requested studies are not available")


def _missing_peers() -> list[str]:
    missing = []
    if not shutil.which("chromium"):
        missing.append("chromium (Debian package 'chromium')")
    if not shutil.which("node"):
        missing.append("node")
    if not (DIST / "index.html").is_file():
        missing.append(f"the OHIF viewer ({DIST.relative_to(REPO)}; `make ohif-viewer`)")
    if not (PLAYWRIGHT / "index.mjs").is_file():
        missing.append(f"playwright-core ({PLAYWRIGHT.relative_to(REPO)}; `make ohif-viewer`)")
    if not (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists()):
        missing.append("Orthanc (Debian package 'orthanc')")
    if not any((Path(d) / "libOrthancDicomWeb.so").exists() for d in ORTHANC_PLUGIN_DIRS):
        missing.append("Orthanc DICOMweb plugin (Debian package 'orthanc-dicomweb')")
    return missing


@pytest.fixture(scope="module")
def peers_present():
    missing = _missing_peers()
    if missing:
        message = "OHIF viewer test: not installed: " + ", ".join(missing) + " (run `make test`)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(message)  # CI installs every peer: a missing one is a broken setup
        pytest.skip(message)


def _upload(orthanc: Orthanc, files: list[Path]) -> None:
    for path in files:
        req = urllib.request.Request(f"{orthanc.url}/instances", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200, f"Orthanc refused {path.name}: HTTP {resp.status}"


def _scoord_source_sop(ds: pydicom.Dataset) -> str | None:
    """SOP Instance UID of the image the first SCOORD of the SR is selected from."""
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "SCOORD":
            return str(item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        found = _scoord_source_sop(item)
        if found:
            return found
    return None


def _expected(out: Path) -> dict:
    """What the viewer should show, read from the files we wrote."""
    display = hd.sr.srread(out / "sr_display.dcm")
    (planar,) = display.content.get_planar_roi_measurement_groups()
    (area,) = planar.get_measurements(name=codes.SCT.Area)
    sop = _scoord_source_sop(display)
    seg = hd.seg.segread(out / "seg.dcm")
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    masks = seg.get_pixels_by_source_instance([sop], segment_numbers=numbers,
                                              assert_missing_frames_are_empty=True)[0]
    stats = {}
    for i, number in enumerate(numbers):
        rows, cols = np.nonzero(masks[..., i])
        if len(rows):
            stats[number] = {"count": int(len(rows)), "row": float(rows.mean()), "col": float(cols.mean())}
    series = {name: pydicom.dcmread(out / f, stop_before_pixels=True).SeriesInstanceUID
              for name, f in (("sr_display", "sr_display.dcm"), ("sr", "sr.dcm"), ("seg", "seg.dcm"),
                              ("heatmap", "heatmap_0001.dcm"), ("key_images", "key_0001.dcm"))}
    return {
        "study": str(display.StudyInstanceUID), "series": {k: str(v) for k, v in series.items()},
        "tracking_uid": str(planar.tracking_uid), "area_label": f"{area.value:.2f} mm2", "sop": sop,
        "segment_labels": {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence},
        "segment_stats": stats,
        "counts": {"heatmap": len(list(out.glob("heatmap_*.dcm"))), "key_images": len(list(out.glob("key_*.dcm")))},
        "pdf_report": pydicom.dcmread(out / "report_pdf.dcm", stop_before_pixels=True),
        "report_concepts": _concepts(pydicom.dcmread(out / "sr.dcm").ContentSequence, set()),
    }


def _concepts(items, found: set[str]) -> set[str]:
    """Every concept name code value in an SR content tree."""
    for item in items:
        if "ConceptNameCodeSequence" in item:
            found.add(str(item.ConceptNameCodeSequence[0].CodeValue))
        if "ContentSequence" in item:
            _concepts(item.ContentSequence, found)
    return found


@pytest.fixture(scope="module")
def viewer(peers_present, tmp_path_factory):
    """Analyse the phantom, load Orthanc, open each result series in OHIF; returns
    (page facts by name, expected values)."""
    work = tmp_path_factory.mktemp("ohif")
    out = work / "results"
    # a prior study of the same patient two weeks earlier, analysed first: the results then
    # carry everything a report can hold (lobes, scores, category and the comparison)
    history = PatientHistory(work / "history.db")
    header = pydicom.dcmread(sorted(SOURCE.glob("*.dcm"))[0], stop_before_pixels=True)
    copy_as_new_study(PRIOR, work / "prior", PatientID=header.PatientID, StudyDate="20210301")
    lookup = PriorLookup(history, PriorsSection(), DEFAULT_PIPELINE)
    prior = analyze_folder(work / "prior", work / "prior_out", AnalyzeOptions(device="cpu", findings_only=True,
                                                                             priors=lookup))
    assert prior.status == "done", f"analysis of the prior failed: {prior.reason}"
    doc = analyze_folder(SOURCE, out, AnalyzeOptions(device="cpu", priors=lookup))
    assert doc.status == "done", f"analysis of the phantom failed: {doc.reason}"
    assert doc.comparison is not None and doc.lobes and doc.category_suggestion is not None
    expected = _expected(out)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Orthanc(work / "orthanc").start() as orthanc, ViewerServer(DIST, orthanc.http_port) as server:
        _upload(orthanc, sorted(SOURCE.glob("*.dcm")) + sorted(out.glob("*.dcm")))
        base = f"{server.url}/viewer?StudyInstanceUIDs={expected['study']}&initialSeriesInstanceUID="
        s = expected["series"]
        spec = {
            "chromium": shutil.which("chromium"), "playwright": str(PLAYWRIGHT), "outDir": str(ARTIFACTS),
            "timeoutMs": PAGE_TIMEOUT_S * 1000,
            "pages": [
                {"name": "sr_display", "url": base + s["sr_display"], "waitFor": "annotation"},
                {"name": "seg", "url": base + s["seg"], "waitFor": "segmentation", "focusSop": expected["sop"]},
                {"name": "heatmap", "url": base + s["heatmap"], "waitFor": "image"},
                {"name": "key_images", "url": base + s["key_images"], "waitFor": "image"},
                {"name": "sr_full_report", "url": base + s["sr"], "waitFor": "annotation"},
            ],
        }
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        run = subprocess.run(["node", str(INSPECT), str(spec_path)], capture_output=True, text=True,
                             timeout=PAGE_TIMEOUT_S * len(spec["pages"]) + 60)
        assert run.returncode == 0, f"browser script failed ({run.returncode}):\n{run.stderr[-3000:]}"
        pages = {p["name"]: p for p in json.loads(run.stdout)}
        (ARTIFACTS / "pages.json").write_text(json.dumps(pages, indent=1))
        failed_requests = [r for r in server.requests if r[1] >= 400]
        assert not failed_requests, f"DICOMweb requests Orthanc refused: {failed_requests[:5]}"
    return pages, expected


def _errors(page: dict) -> list[str]:
    found = [t for t in ERROR_TEXTS if t in page["bodyText"]]
    found += [e for e in page["consoleErrors"] if "Error Boundary" in e or "Something went wrong" in e]
    return found + page["pageErrors"]


def _assert_opened(page: dict) -> None:
    where = f"{page['name']} ({page['screenshot']})"
    assert not _errors(page), f"{where}: OHIF reported errors: {_errors(page)}"
    assert not page["timedOut"], (f"{where}: nothing shown after {PAGE_TIMEOUT_S} s; viewports "
                                  f"{page['state'].get('viewports')}; console errors {page['consoleErrors'][:3]}")


def _on(image_id: str | None, sop: str) -> bool:
    return f"/instances/{sop}/" in str(image_id)


def test_display_sr_draws_the_region_on_its_ct_image(viewer):
    pages, exp = viewer
    page = pages["sr_display"]
    _assert_opened(page)
    drawn = [a for a in page["state"]["annotations"]
             if a["toolName"] == "DICOMSRDisplay" and a["uid"] == exp["tracking_uid"]]
    assert drawn, f"SR region not among the annotations: {page['state']['annotations']}"
    region = drawn[0]
    assert _on(region["referencedImageId"], exp["sop"]), "the region is not on the CT image the SR names"
    assert region["graphicType"] == "POLYLINE" and region["points"] >= 4
    assert {"label": "Area", "value": exp["area_label"]} in region["labels"]
    (vp,) = page["state"]["viewports"]
    assert _on(vp["imageId"], exp["sop"]) and vp["imageLoaded"], (
        f"the viewport shows {vp['imageId']}, not the SR's CT image {exp['sop']}")
    assert f"Area: {exp['area_label']}" in " ".join(page["svgTexts"]), (
        f"the area label is not drawn; SVG texts: {page['svgTexts']}")


def test_seg_overlay_lands_on_the_lesion_slice(viewer):
    pages, exp = viewer
    page = pages["seg"]
    _assert_opened(page)
    (seg,) = page["state"]["segmentations"]
    assert {s["index"]: s["label"] for s in seg["segments"]} == exp["segment_labels"]
    (vp,) = page["state"]["viewports"]
    assert _on(vp["imageId"], exp["sop"]), f"viewport not on the lesion slice: {vp['imageId']}"
    shown = {int(k): v for k, v in seg["focus"]["stats"].items()}
    assert set(shown) == set(exp["segment_stats"]), f"segments on the lesion slice: {shown} vs {exp['segment_stats']}"
    for number, want in exp["segment_stats"].items():
        got = shown[number]
        assert abs(got["count"] - want["count"]) <= 0.01 * want["count"], (number, got, want)
        assert abs(got["row"] - want["row"]) < 1.5 and abs(got["col"] - want["col"]) < 1.5, (number, got, want)


@pytest.mark.parametrize("name", ["heatmap", "key_images"])
def test_secondary_capture_series_display(viewer, name):
    pages, exp = viewer
    page = pages[name]
    _assert_opened(page)
    (vp,) = page["state"]["viewports"]
    assert f"/series/{exp['series'][name]}/" in str(vp["imageId"]), f"{name}: viewport shows {vp['imageId']}"
    assert vp["imageLoaded"] and vp["color"], f"{name}: no RGB image rendered: {vp}"
    assert vp["count"] == exp["counts"][name]


def test_pdf_report_is_listed_in_the_series_panel(viewer):
    """The series panel beside the heat maps lists the DOC series with its description
    and number (opening it is OHIF's PDF extension's job: not checked here)."""
    pages, exp = viewer
    pdf = exp["pdf_report"]
    panel = pages["heatmap"]["bodyText"].splitlines()
    assert "DOC" in " ".join(panel), f"no DOC modality in the study list: {panel[:8]}"
    at = panel.index(str(pdf.SeriesDescription)) if str(pdf.SeriesDescription) in panel else -1
    assert at > 0 and panel[at - 1] == "DOC" and panel[at + 1] == f"S:{pdf.SeriesNumber}", panel


def test_full_report_still_trips_ohif_3_13(viewer):
    """Control: the full TID 1500 report (volumetric SEG findings, classification, and here
    the lobes, the scores, the category and the comparison with the prior) is what OHIF
    3.13's SR loader throws on, which is why the display SR exists. It also shows that the
    error checks above see OHIF's errors. If a newer OHIF opens it, this fails: then the
    display SR may no longer be needed."""
    concepts = viewer[1]["report_concepts"]
    assert {"LOBE-SEVERITY", "CT-SEVERITY", "CO-RADS-AI", "RSNA-CAT-AI", "PRIOR-CHANGE", "PRIOR-SEVERITY"} <= concepts
    page = viewer[0]["sr_full_report"]
    assert _errors(page), (
        f"OHIF opened the full report without error ({page['screenshot']}): the pinned OHIF changed?")
