"""End to end: `ct-ai-node analyze` on the bundled COVID-19-like phantom series.

Every output passes dciodvfy (no line with "Error"), reads back with pydicom and
highdicom, and the decoded SEG lands on the right source slices (lung Dice against
the phantom's ground truth >= 0.95)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ct_ai_node.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_series" / "covid_like"
TRUTH = ROOT / "sample_series" / "covid_like_truth" / "truth.npz"
SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SC_UID = "1.2.840.10008.5.1.4.1.1.7"
SR_UID = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "out"
    res = CliRunner().invoke(app, ["analyze", str(SAMPLE), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def source():
    """Source datasets sorted from inferior to superior (the truth arrays' z order)."""
    dss = [pydicom.dcmread(p) for p in SAMPLE.rglob("*.dcm")]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return dss


def test_result_json_contract(analysed, source):
    out, doc = analysed
    assert doc["status"] == "done"
    for key in ("study_instance_uid", "series_instance_uid", "pipeline", "model_versions", "probability", "label",
                "positive_slice_ratio", "positive_slices", "lung_volume_ml", "lesion_volume_ml",
                "involvement_percent", "corona_score_ml", "outputs", "timings_s", "warnings", "slice_scores"):
        assert key in doc, key
    assert 0.0 <= doc["probability"] <= 1.0
    assert doc["study_instance_uid"] == source[0].StudyInstanceUID
    assert {s["sop_instance_uid"] for s in doc["slice_scores"]} == {d.SOPInstanceUID for d in source}
    numbers = {d.SOPInstanceUID: int(d.InstanceNumber) for d in source}
    assert all(numbers[s["sop_instance_uid"]] == s["instance_number"] for s in doc["slice_scores"])
    kinds = sorted(set(doc["outputs"].values()))
    assert SEG_UID in kinds and SC_UID in kinds and SR_UID in kinds
    assert sorted(p.name for p in out.glob("*.dcm")) == sorted(doc["outputs"])


def test_covid_like_sample_is_called_positive(analysed):
    _, doc = analysed
    assert doc["label"] == "COVID-19-like pneumonia", doc["probability"]
    assert doc["lesion_volume_ml"] > 0 and doc["corona_score_ml"] > 0
    assert doc["positive_slices"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed: run `make test`")
def test_every_output_passes_dciodvfy(analysed):
    out, doc = analysed
    bad = {}
    for name in doc["outputs"]:
        proc = subprocess.run(["dciodvfy", str(out / name)], capture_output=True, text=True, timeout=120)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln]
        if errors:
            bad[name] = errors[:5]
    assert not bad, bad


def test_outputs_read_back_and_reference_the_source(analysed, source):
    out, doc = analysed
    source_uids = {d.SOPInstanceUID for d in source}
    series = set()
    for name, sop_class in doc["outputs"].items():
        ds = pydicom.dcmread(out / name)
        assert ds.SOPClassUID == sop_class
        assert ds.StudyInstanceUID == source[0].StudyInstanceUID
        assert ds.SeriesInstanceUID != source[0].SeriesInstanceUID
        assert ds.SOPInstanceUID not in source_uids
        series.add((ds.SeriesInstanceUID, ds.SOPClassUID, getattr(ds, "SeriesDescription", "")))
        if sop_class == SC_UID:
            assert ds.SamplesPerPixel == 3 and ds.BurnedInAnnotation == "YES"
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
    sr = hd.sr.srread(out / "sr.dcm")
    assert sr.SOPClassUID == SR_UID
    meanings = set()

    def walk(items):
        for item in items:
            if "ConceptNameCodeSequence" in item:
                meanings.add(item.ConceptNameCodeSequence[0].CodeMeaning)
            if "TextValue" in item:
                meanings.add(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    text = " ".join(meanings).lower()
    assert "volume" in text and "probability" in text, sorted(meanings)
    # the SR's findings reference the SEG written beside it
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.SOPInstanceUID in str(sr.CurrentRequestedProcedureEvidenceSequence) or seg.SOPInstanceUID in str(sr)
    # at least one drawable region (SCOORD) for viewers such as OHIF
    assert "SCOORD" in {str(i.ValueType) for i in sr.ContentSequence[-1].ContentSequence} or "SCOORD" in str(sr)
    # one new series per kind of output
    assert len({s[0] for s in series}) >= 4


def test_seg_lands_on_the_right_slices(analysed, source):
    out, _ = analysed
    truth = np.load(TRUTH)
    lungs_true = truth["lung_labels"]
    assert lungs_true.shape[0] == len(source)
    z_of = {d.SOPInstanceUID: z for z, d in enumerate(source)}
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.SegmentationType == "BINARY"
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    decoded = {label: np.zeros(lungs_true.shape, bool) for label in names.values()}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        decoded[names[number]][z_of[ref]] |= frames[i].astype(bool)
    right = decoded["Right lung"]
    left = decoded["Left lung"]
    both_true = lungs_true > 0

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(right | left, both_true) >= 0.95
    assert dice(right, lungs_true == 1) >= 0.9
    assert dice(left, lungs_true == 2) >= 0.9
    if "Suspected infection" in decoded:
        inf = decoded["Suspected infection"]
        assert not (inf & ~(right | left)).any(), "infection lies inside the lungs"


def _decode_seg(path: Path, source) -> dict[str, np.ndarray]:
    z_of = {d.SOPInstanceUID: z for z, d in enumerate(source)}
    shape = (len(source), int(source[0].Rows), int(source[0].Columns))
    seg = hd.seg.segread(path)
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    decoded = {label: np.zeros(shape, bool) for label in names.values()}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        decoded[names[number]][z_of[ref]] |= frames[i].astype(bool)
    return decoded


def test_infection_unet_gives_the_seg_infection_segment(tmp_path, source):
    """--infection unet: the SEG's suspected-infection segment comes from the infection U-Net;
    on this phantom it overlaps the true lesions (Dice >= 0.6) and passes dciodvfy."""
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(SAMPLE), "--out", str(out), "--infection", "unet"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["model_versions"]["infection"].startswith("infection_unet/")
    decoded = _decode_seg(out / "seg.dcm", source)
    truth = np.load(TRUTH)["lesion_mask"]
    inf = decoded["Suspected infection"]
    dice = 2 * (inf & truth).sum() / (inf.sum() + truth.sum())
    assert dice >= 0.6, dice
    if shutil.which("dciodvfy"):
        proc = subprocess.run(["dciodvfy", str(out / "seg.dcm")], capture_output=True, text=True, timeout=120)
        assert not [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln]
