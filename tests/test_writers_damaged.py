"""Writers on damaged source headers the loader accepts (issue 11).

Each case damages the headers of a small phantom series the way real exports do
(de-identified without type 2 attributes, unknown character set, ``yesterday`` as a
date, a person name with another VR, orientation noise, missing Slice Thickness,
multi-valued or UUID-style UIDs, ...). ``build_outputs`` must still build every object,
dciodvfy must find no error in any of them, and the repair must be named in the
warnings. A writer that fails loses only its own object (and what references it)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

import ct_ai_node.output_folder as output_folder
import ct_ai_node.writers as writers
from ct_ai_node.errors import OutputError
from ct_ai_node.writers import build_outputs
from ct_ai_node.writers.source_header import is_valid_uid, sanitise_volume
from helpers_writers import dciodvfy_errors, make_ct_series, make_result, make_volume

N, ROWS, COLS = 16, 64, 64


def _deidentify(dss):
    for ds in dss:
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "StudyID", "AccessionNumber", "ReferringPhysicianName", "SeriesNumber"):
            delattr(ds, kw)


def _unknown_charset(dss):
    for ds in dss:
        ds.SpecificCharacterSet = "ISO_IR 999"
        # Latin-1 bytes under a charset nobody knows
        tag = pydicom.datadict.tag_for_keyword("InstitutionName")
        ds[tag] = DataElement(tag, "LO", "Kantonsspital Zürich".encode("latin-1"))


def _empty_charset(dss):
    for ds in dss:
        ds.SpecificCharacterSet = ""


def _bad_dates(dss):
    for ds in dss:
        ds.StudyDate = "yesterday"
        ds.StudyTime = "noon"
        ds.PatientBirthDate = "19601301"  # month 13
        ds.SeriesDate = "2024.01.02"  # legacy form: normalised


def _person_name_wrong_vr(dss):
    tag = pydicom.datadict.tag_for_keyword("PatientName")
    ref = pydicom.datadict.tag_for_keyword("ReferringPhysicianName")
    for ds in dss:
        ds[tag] = DataElement(tag, "LO", "Doe^John^^^^extra^parts")
        ds[ref] = DataElement(ref, "PN", "X" * 80)


def _no_slice_thickness(dss):
    for ds in dss:
        del ds.SliceThickness


def _orientation_noise(dss):
    for i, ds in enumerate(dss):
        e = 1e-5 * (i % 3)
        ds.ImageOrientationPatient = [1.0, e, 0.0, -e, 1.0, 0.0]
        ds.PixelSpacing = [0.7 + 1e-5 * (i % 2), 0.7]


def _multi_valued(dss):
    for ds in dss:
        ds.SOPInstanceUID = [ds.SOPInstanceUID, generate_uid()]
        ds.PatientID = ["A1", "B2"]
        ds.StudyID = ["1", "2"]


def _long_and_odd_strings(dss):
    for ds in dss:
        ds.StudyDescription = "CT chest " * 20
        ds.InstitutionName = "Hospital " * 12
        ds.BodyPartExamined = "chest-abd"
        ds.PatientSex = "male"
        ds.LossyImageCompression = "yes"


def _uuid_uids(dss):
    study, series = str(uuid.uuid4()), str(uuid.uuid4())
    for ds in dss:
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = ""


def _empty_sop_uids(dss):
    for ds in dss:
        ds.SOPInstanceUID = ""


#: case -> (damage, a text every repair note list must contain)
CASES = {
    "deidentified": (_deidentify, "PatientName: missing: written empty"),
    "unknown_charset": (_unknown_charset, "SpecificCharacterSet: 'ISO_IR 999' unknown"),
    "empty_charset": (_empty_charset, "SpecificCharacterSet: '' empty"),
    "bad_dates": (_bad_dates, "StudyDate: not a valid DA: written empty"),
    "person_name_wrong_vr": (_person_name_wrong_vr, "PatientName: had VR LO: written as PN"),
    "no_slice_thickness": (_no_slice_thickness, "SliceThickness: missing or invalid"),
    "orientation_noise": (_orientation_noise, "ImageOrientationPatient: differed by float noise"),
    "multi_valued": (_multi_valued, "PatientID: held several values"),
    "long_and_odd_strings": (_long_and_odd_strings, "StudyDescription: longer than 64 characters"),
    "uuid_uids": (_uuid_uids, "StudyInstanceUID not a valid UID after loading"),
    "empty_sop_uids": (_empty_sop_uids, "SOPInstanceUID: not a valid or unique UID after loading"),
}


def damaged_volume(case: str):
    dss = make_ct_series(N, ROWS, COLS)
    damage, _ = CASES[case]
    if case == "no_slice_thickness":  # the loader gives no thickness then
        volume = make_volume(dss)
        damage(dss)
        volume.slice_thickness = None
        return volume
    damage(dss)
    # what the loader hands over: the damaged headers; it takes the slices' identity as
    # the headers give it (a multi-valued or empty UID included: the writers must cope)
    return make_volume(dss)


def assert_all_valid(objects, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH: IOD validation skipped")
    bad = {}
    for name, ds in objects:
        errors, _ = dciodvfy_errors(ds)
        if errors:
            bad[name] = errors[:5]
    assert not bad, bad


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_headers_give_valid_outputs_and_name_the_repair(case, tmp_path):
    volume = damaged_volume(case)
    result = make_result(volume)
    out = build_outputs(volume, result)
    names = [name for name, _ in out.named()]
    assert "seg.dcm" in names and "sr.dcm" in names and "ko.dcm" in names and "key_0001.dcm" in names
    assert any(n.startswith("heatmap_") for n in names) and "report_pdf.dcm" in names
    assert not [w for w in out.warnings if "not written" in w], out.warnings
    expected = CASES[case][1]
    assert any(expected in w for w in out.warnings), (expected, out.warnings)
    assert all("\n" not in w for w in out.warnings)
    assert_all_valid(out.named(), tmp_path)
    # every object belongs to the (repaired) study and references valid source UIDs
    for _, ds in out.named():
        assert is_valid_uid(str(ds.StudyInstanceUID))
        assert "PatientName" in ds and "PatientID" in ds and "StudyDate" in ds


def test_repairs_reach_the_outputs_and_leave_the_source_alone():
    volume = damaged_volume("bad_dates")
    _person_name_wrong_vr(volume.datasets)
    _unknown_charset(volume.datasets)
    before = [(ds.StudyDate, ds["PatientName"].VR, ds.SpecificCharacterSet) for ds in volume.datasets]
    out = build_outputs(volume, make_result(volume))
    seg = out.seg
    assert seg.StudyDate == "" and seg.PatientBirthDate == ""
    assert str(seg.PatientName).split("^")[:2] == ["Doe", "John"]
    # the Latin-1 text was re-decoded, not mangled, and is written as UTF-8
    assert out.sr.SpecificCharacterSet == "ISO_IR 192"
    assert [(ds.StudyDate, ds["PatientName"].VR, ds.SpecificCharacterSet) for ds in volume.datasets] == before


def test_uuid_and_empty_uids_are_replaced_deterministically():
    dss = make_ct_series(N, ROWS, COLS)
    _uuid_uids(dss)
    _empty_sop_uids(dss)
    volume = make_volume(dss)
    first, second = sanitise_volume(volume), sanitise_volume(volume)
    assert first.volume.study_instance_uid == second.volume.study_instance_uid
    assert [r.sop_instance_uid for r in first.volume.slices] == [r.sop_instance_uid for r in second.volume.slices]
    uids = [r.sop_instance_uid for r in first.volume.slices]
    assert len(set(uids)) == N and all(is_valid_uid(u) for u in uids)
    # each header carries its own slice's UID (paired by position)
    for ref, ds in zip(first.volume.slices, first.volume.datasets):
        assert ds.SOPInstanceUID == ref.sop_instance_uid
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(ref.position)
        assert ds.FrameOfReferenceUID == first.volume.frame_of_reference_uid


def test_headers_of_another_matrix_are_left_out():
    """Two acquisitions with different matrices in one series: the loader analyses one
    stack; headers of the other must not reach the SEG's source images."""
    volume = damaged_volume("deidentified")
    other = make_ct_series(4, 32, 32)
    for ds in other:
        ds.SeriesInstanceUID = volume.series_instance_uid
        ds.StudyInstanceUID = volume.study_instance_uid
    volume.datasets = [*volume.datasets, *other]
    out = build_outputs(volume, make_result(volume))
    assert out.seg is not None and not [w for w in out.warnings if "not written" in w], out.warnings
    assert any("outside the analysed stack" in w for w in out.warnings), out.warnings
    refs = {item.ReferencedSOPInstanceUID for s in out.seg.ReferencedSeriesSequence
            for item in s.ReferencedInstanceSequence}
    assert not refs & {ds.SOPInstanceUID for ds in other}


def test_a_failing_heatmap_writer_keeps_the_other_outputs(monkeypatch):
    volume = damaged_volume("deidentified")
    result = make_result(volume)

    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(writers, "build_heatmap_series", broken)
    out = build_outputs(volume, result)
    names = [n for n, _ in out.named()]
    assert not any(n.startswith("heatmap_") for n in names)
    assert {"seg.dcm", "sr.dcm", "ko.dcm", "key_0001.dcm", "report_pdf.dcm"} <= set(names)
    failed = [w for w in out.warnings if "not written" in w]
    assert failed == ["heat-map series not written: RuntimeError: renderer exploded"]


def test_a_failing_seg_drops_the_sr_that_references_it(monkeypatch):
    volume = damaged_volume("deidentified")

    def broken(*args, **kwargs):
        raise OutputError("SEG: highdicom refused the source images")

    monkeypatch.setattr(writers, "build_seg", broken)
    out = build_outputs(volume, make_result(volume))
    names = [n for n, _ in out.named()]
    assert "seg.dcm" not in names and "sr.dcm" not in names
    assert any(n.startswith("heatmap_") for n in names) and "ko.dcm" in names
    assert "SEG not written: SEG: highdicom refused the source images" in out.warnings
    assert any(w.startswith("SR not written: it references the SEG") for w in out.warnings)


def test_nothing_built_is_an_output_error(monkeypatch):
    volume = damaged_volume("deidentified")

    def broken(*args, **kwargs):
        raise RuntimeError("broken")

    for name in ("build_seg", "build_heatmap_series", "build_key_image_series", "build_display_sr",
                 "build_pdf_report"):
        if hasattr(writers, name):
            monkeypatch.setattr(writers, name, broken)
    with pytest.raises(OutputError, match="no result object could be built"):
        build_outputs(volume, make_result(volume))


@pytest.mark.parametrize("parallel", [True, False], ids=["forked", "in-process"])
def test_write_outputs_keeps_files_when_the_heatmap_series_fails(monkeypatch, tmp_path, parallel):
    volume = damaged_volume("deidentified")
    result = make_result(volume)

    real = output_folder.iter_heatmap_series

    def broken(*args, **kwargs):  # two images built (and stored), then the third fails
        images = real(*args, **kwargs)
        yield next(images)
        yield next(images)
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(output_folder, "iter_heatmap_series", broken)  # the forked child inherits it
    written = output_folder.write_outputs(volume, result, tmp_path, parallel=parallel)
    files = sorted(p.name for p in tmp_path.glob("*.dcm"))
    assert files == sorted(written.outputs)
    assert "seg.dcm" in files and "sr.dcm" in files and not any(f.startswith("heatmap_") for f in files)
    assert "heat-map series not written: RuntimeError: renderer exploded" in written.warnings
    assert any("PatientName: missing" in w for w in written.warnings)
    assert np.all([pydicom.dcmread(tmp_path / f).StudyInstanceUID == volume.study_instance_uid for f in files])


def test_clean_headers_need_no_repair_and_are_shared_not_copied():
    volume = make_volume(make_ct_series(N, ROWS, COLS))
    source = sanitise_volume(volume)
    assert source.notes == ()
    assert source.volume.hu is volume.hu
    for original, copy in zip(volume.datasets, source.volume.datasets):
        assert copy is not original
        # pixel data is the same element object: shared, not copied
        assert copy.get_item("PixelData") is original.get_item("PixelData")
