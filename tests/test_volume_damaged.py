"""The loader on real-world and damaged DICOM (issue 11): loaded with a warning that
names the repair, or refused with the true one-line reason.

Each case damages a small synthetic series (30 slices of 64x64) written to tmp_path;
the last one de-identifies a real series in tmp_path the way a PS3.15 Basic
Profile tool does.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

from ct_ai_node.errors import InputRejected
from ct_ai_node.rules.routing import _orientation
from ct_ai_node.volume import load_series_from_folder, load_volume, scan_folder
from ct_ai_node.volume.frames import frame_headers
from helpers_dicom import REAL_DATA, write_ct_series, write_enhanced_ct

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LIDC = REAL_DATA / "lidc_idri_0001"


def rewrite(paths, edit, *, enforce: bool = True) -> None:
    """Apply ``edit(ds, index)`` to each file and save it again."""
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(ds, i)
        ds.save_as(path, enforce_file_format=enforce)


def with_meta_syntax(path: Path, data_syntax: str, meta_syntax: str) -> None:
    """Encode the data set in ``data_syntax`` behind a file meta that says ``meta_syntax``."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = data_syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    ds.file_meta.TransferSyntaxUID = meta_syntax
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + raw[meta_end:])


def assert_writer_ready(volume) -> None:
    """Every UID valid and consistent between datasets and slice refs; one shared
    identity and orientation (what highdicom checks on source images)."""
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    assert all(isinstance(u, str) and UID_RE.match(u) and len(u) <= 64 for u in uids)
    assert len(set(uids)) == len(uids)
    assert [s.sop_instance_uid for s in volume.slices] == uids or volume.is_multiframe
    for ds in volume.datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for value in (volume.study_instance_uid, volume.series_instance_uid,
                  volume.frame_of_reference_uid):
        assert UID_RE.match(value) and len(value) <= 64
    shared = {(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Rows, ds.Columns,
               ds.FrameOfReferenceUID) for ds in volume.datasets}
    assert shared == {(volume.study_instance_uid, volume.series_instance_uid,
                       volume.shape[1], volume.shape[2], volume.frame_of_reference_uid)}
    assert len({tuple(ds.ImageOrientationPatient) for ds in volume.datasets}) == 1
    for z in range(volume.shape[0]):
        assert volume.dataset_for(z).SOPInstanceUID == volume.slices[z].sop_instance_uid


def warning(volume, *parts: str) -> str:
    found = [w for w in volume.warnings if all(p in w for p in parts)]
    assert len(found) == 1, (parts, volume.warnings)
    return found[0]


# --- identity: empty, UUID, shared, multi-valued UIDs -----------------------------------


def deidentify(ds: pydicom.Dataset, study: str, series: str) -> None:
    """What the de-identification tool of issue 11 wrote."""
    for keyword in ("PatientName", "PatientBirthDate", "SeriesNumber"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPInstanceUID = ""
    ds.file_meta.MediaStorageSOPInstanceUID = ""
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = ""


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_deidentified_export_empty_sop_uids_and_uuid_study_series(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    study, series = str(uuid.uuid4()), str(uuid.uuid4())
    rewrite(written.paths, lambda ds, i: deidentify(ds, study, series), enforce=False)
    before = {p: p.read_bytes() for p in written.paths}

    volume, selection, _ = load_series_from_folder(tmp_path)
    assert volume.shape == (30, 64, 64) and selection.chosen.n_frames == 30
    np.testing.assert_array_equal(volume.hu, written.hu)
    assert_writer_ready(volume)
    assert volume.study_instance_uid == "2.25." + str(uuid.UUID(study).int)
    assert volume.series_instance_uid == "2.25." + str(uuid.UUID(series).int)
    warning(volume, "SOPInstanceUID missing or empty on 30 of 30 images",
            "identified by position", "minted")
    warning(volume, "StudyInstanceUID not a valid UID", "UUID")
    warning(volume, "SeriesInstanceUID not a valid UID", "UUID")
    warning(volume, "FrameOfReferenceUID missing or empty on 30 of 30 images", "minted")
    # deterministic: the same files give the same UIDs; the files are untouched
    again, _, _ = load_series_from_folder(tmp_path)
    assert [s.sop_instance_uid for s in again.slices] == [s.sop_instance_uid for s in volume.slices]
    assert again.frame_of_reference_uid == volume.frame_of_reference_uid
    assert {p: p.read_bytes() for p in written.paths} == before
    # no patient attribute in any warning
    assert not any("Test" in w or "TEST123456" in w for w in volume.warnings)


def test_one_sop_uid_on_every_slice_is_not_a_single_slice(tmp_path):
    # issue 11: 167 slices refused as "single slice" (instances keyed by one UID)
    written = write_ct_series(tmp_path, n=30)

    def same_uid(ds, i):
        ds.SOPInstanceUID = "1.2.3.4"
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"

    rewrite(written.paths, same_uid)
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert volume.shape[0] == 30 and selection.chosen.n_instances == 30
    np.testing.assert_array_equal(volume.hu, written.hu)
    assert_writer_ready(volume)
    warning(volume, "SOPInstanceUID shared by several images on 30 of 30 images")


def test_empty_sop_uid_taken_from_the_file_meta(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    rewrite(written.paths, lambda ds, i: setattr(ds, "SOPInstanceUID", ""), enforce=False)
    volume, _, _ = load_series_from_folder(tmp_path)
    assert [s.sop_instance_uid for s in volume.slices] == written.sop_instance_uids
    assert_writer_ready(volume)
    warning(volume, "SOPInstanceUID empty in the data set of 30 images: taken from the file meta")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length")
def test_multivalued_and_invalid_sop_uids_are_replaced(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    bad = {0: ["1.2.3.4", "1.2.3.5"], 1: "1.2.03.4", 2: "1." + "2" * 70,
           3: str(uuid.uuid4())}

    def edit(ds, i):
        if i in bad:
            ds.SOPInstanceUID = bad[i]
            ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"

    rewrite(written.paths, edit, enforce=False)
    volume, _, _ = load_series_from_folder(tmp_path)
    assert volume.shape[0] == 30
    assert_writer_ready(volume)
    by_uid = {ds.SOPInstanceUID: ds for ds in volume.datasets}  # hashable everywhere
    assert len(by_uid) == 30
    kept = set(written.sop_instance_uids) - {written.sop_instance_uids[i] for i in bad}
    assert kept <= set(by_uid)  # valid UIDs stay as they were
    warning(volume, "SOPInstanceUID multi-valued on 1 of 30 images")
    warning(volume, "SOPInstanceUID not a valid UID on 3 of 30 images")


def test_copy_of_a_slice_without_uids_is_dropped(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    rewrite(written.paths, lambda ds, i: (setattr(ds, "SOPInstanceUID", ""),
                                          setattr(ds.file_meta, "MediaStorageSOPInstanceUID", "")),
            enforce=False)
    shutil.copy(written.paths[3], tmp_path / "copy")
    volume, _, _ = load_series_from_folder(tmp_path)
    assert volume.shape[0] == 30
    warning(volume, "duplicate copy of one image ignored")


# --- transfer syntax: deflated, and a file meta that lies --------------------------------


def test_deflated_explicit_vr_little_endian(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    rewrite(written.paths, lambda ds, i: setattr(ds.file_meta, "TransferSyntaxUID",
                                                 DeflatedExplicitVRLittleEndian))
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert selection.chosen.transfer_syntax_uids == (DeflatedExplicitVRLittleEndian,)
    np.testing.assert_array_equal(volume.hu, written.hu)


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_meta_says_explicit_vr_but_data_set_is_implicit(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    for p in written.paths:
        with_meta_syntax(p, ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    volume, _, _ = load_series_from_folder(tmp_path)
    np.testing.assert_array_equal(volume.hu, written.hu)
    text = warning(volume, "does not match the data set", "(30 of 30 images)")
    assert "implicit VR" in text
    assert all(ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian for ds in volume.datasets)


@pytest.mark.filterwarnings("ignore:The number of bytes of compressed pixel data")
def test_meta_says_jpeg_but_pixel_data_is_native(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    for p in written.paths[:10]:
        with_meta_syntax(p, ExplicitVRLittleEndian, JPEGLosslessSV1)
    volume, _, _ = load_series_from_folder(tmp_path)
    np.testing.assert_array_equal(volume.hu, written.hu)
    warning(volume, "JPEG Lossless", "not compressed", "(10 of 30 images)")


def test_compressed_pixel_data_behind_a_native_syntax_is_refused(tmp_path):
    written = write_ct_series(tmp_path, n=30, shuffle_names=False)
    bad = written.paths[4]
    ds = pydicom.dcmread(bad)
    ds.compress(pydicom.uid.RLELossless)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(bad, enforce_file_format=True)
    with pytest.raises(InputRejected, match=f"^file {bad.name}: pixel data is compressed"):
        load_volume(written.paths)


# --- absurd and inconsistent frame counts --------------------------------------------


def finish_within(seconds: float, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it is still running."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box, time.monotonic() - start


def test_absurd_number_of_frames_is_refused_at_once(tmp_path):
    written = write_enhanced_ct(tmp_path, n=24)
    rewrite(written.paths, lambda ds, i: setattr(ds, "NumberOfFrames", 2**31))
    box, _ = finish_within(10, lambda: load_series_from_folder(tmp_path))
    assert isinstance(box.get("error"), InputRejected), box
    assert "NumberOfFrames 2147483648 exceeds the limit of 10000 frames" in str(box["error"])
    ds = pydicom.dcmread(written.paths[0])
    box, _ = finish_within(10, lambda: load_volume(written.paths))
    assert str(box["error"]).startswith("file enhanced.dcm: NumberOfFrames 2147483648 exceeds")
    with pytest.raises(InputRejected, match="NumberOfFrames 2147483648 exceeds"):
        frame_headers(ds)
    box, _ = finish_within(10, lambda: _orientation(ds))  # the node's routing path
    assert box["value"] == "unknown"


def test_frame_count_that_disagrees_with_the_functional_groups(tmp_path):
    written = write_enhanced_ct(tmp_path, n=24)
    rewrite(written.paths, lambda ds, i: setattr(ds, "NumberOfFrames", 30))
    with pytest.raises(InputRejected, match="NumberOfFrames 30 but 24 frames described"):
        load_series_from_folder(tmp_path)


def test_frame_count_beyond_the_pixel_data(tmp_path):
    written = write_enhanced_ct(tmp_path, n=24)

    def edit(ds, i):
        ds.NumberOfFrames = 30
        ds.PerFrameFunctionalGroupsSequence.extend(
            [ds.PerFrameFunctionalGroupsSequence[0]] * 6)

    rewrite(written.paths, edit)
    with pytest.raises(InputRejected, match="NumberOfFrames 30 but the pixel data holds 24 frames"):
        load_series_from_folder(tmp_path)


def test_absurd_matrix_is_refused(tmp_path):
    written = write_ct_series(tmp_path, n=30, shuffle_names=False)
    rewrite(written.paths[:1], lambda ds, i: setattr(ds, "Rows", 40000))
    with pytest.raises(InputRejected, match="Rows 40000 exceeds the limit of 4096"):
        load_series_from_folder(tmp_path)
    with pytest.raises(InputRejected, match="Rows 40000 exceeds the limit of 4096"):
        load_volume(written.paths)


# --- one consistent stack ---------------------------------------------------------------


def test_orientation_rounding_noise_gives_one_orientation(tmp_path):
    written = write_ct_series(tmp_path, n=30)
    rng = random.Random(5)
    iop = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    rewrite(written.paths, lambda ds, i: setattr(
        ds, "ImageOrientationPatient", [f"{v + rng.uniform(-1e-4, 1e-4):.8f}" for v in iop]))
    volume, _, _ = load_series_from_folder(tmp_path)
    assert volume.shape[0] == 30
    assert volume.orientation == pytest.approx(iop, abs=2e-4)
    assert volume.orientation == tuple(float(v) for v in volume.datasets[0].ImageOrientationPatient)
    assert_writer_ready(volume)  # one IOP value on every dataset
    warning(volume, "ImageOrientationPatient differs by up to", "first slice's value")


def test_two_matrices_in_one_series_keep_only_the_larger_stack(tmp_path):
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    big = write_ct_series(tmp_path, n=30, series_uid=uid, study_uid=study, frame_uid=frame,
                          name_prefix="big")
    write_ct_series(tmp_path, n=20, rows=32, cols=32, spacing=(2.5, 1.4, 1.4), series_uid=uid,
                    study_uid=study, frame_uid=frame, name_prefix="small")
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert selection.chosen.n_frames == 30 and selection.chosen.rows == 64
    np.testing.assert_array_equal(volume.hu, big.hu)
    assert len(volume.datasets) == 30 and all(ds.Rows == 64 for ds in volume.datasets)
    assert_writer_ready(volume)
    assert "e.g. file small" in warning(volume, "20 of 50 images left out", "20 images of 32x32")


def test_two_acquisitions_over_the_same_positions_keep_the_larger(tmp_path):
    uid = generate_uid()
    first = write_ct_series(tmp_path, n=30, series_uid=uid, name_prefix="one")
    second = write_ct_series(tmp_path, n=20, series_uid=uid, name_prefix="two", seed=3)
    rewrite(second.paths, lambda ds, i: setattr(ds, "AcquisitionNumber", 2))
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert selection.chosen.n_frames == 30
    np.testing.assert_array_equal(volume.hu, first.hu)
    warning(volume, "20 images of acquisition 2 at the same positions")


# --- missing and odd attributes ------------------------------------------------------


def test_missing_slice_thickness_taken_from_spacing(tmp_path):
    written = write_ct_series(tmp_path, n=30, spacing=(1.25, 0.7, 0.7))
    rewrite(written.paths, lambda ds, i: delattr(ds, "SliceThickness"))
    volume, _, _ = load_series_from_folder(tmp_path)
    assert volume.slice_thickness == pytest.approx(1.25)
    warning(volume, "SliceThickness missing: taken as the slice spacing (1.25 mm)")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unknown_character_set_and_bad_dates_load_with_raw_values(tmp_path):
    written = write_ct_series(tmp_path, n=30)

    def edit(ds, i):
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.StudyDate = "2024-13-45"
        ds.StudyTime = "25:99"
        ds.PatientBirthDate = "unknown"
        ds["InstitutionName"].value = "Klinik K\xf6ln"

    rewrite(written.paths, edit)
    volume, _, _ = load_series_from_folder(tmp_path)
    np.testing.assert_array_equal(volume.hu, written.hu)
    ds = volume.datasets[0]
    assert ds.SpecificCharacterSet == "ISO_IR 999"
    assert (ds.StudyDate, ds.StudyTime, ds.PatientBirthDate) == ("2024-13-45", "25:99", "unknown")


def test_private_and_retired_attributes_do_not_matter(tmp_path):
    written = write_ct_series(tmp_path, n=30, shuffle_names=False)

    def edit(ds, i):
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        block.add_new(0x10, "OB", b"\x01\x02" * 500)
        ds.add_new(0x00091001, "UN", b"vendor blob")
        ds.add_new(0x00080010, "SH", "ACR-NEMA 2.0")  # retired Recognition Code
        ds.add_new(0x00280040, "CS", "RECT")  # retired Image Format
        ds.add_new(0x00091010, "LO", "PRIVATE")  # made unreadable below

    rewrite(written.paths, edit)
    for p in written.paths[:5]:  # a private element whose VR says FD but holds 8 bytes of text
        raw = p.read_bytes()
        at = raw.find(b"\x09\x00\x10\x10LO")
        rest = raw[at + 8 :].replace(b"PRIVATE\x20", b"PRIVATE", 1)
        p.write_bytes(raw[: at + 4] + b"FD\x07\x00" + rest)
    volume, _, _ = load_series_from_folder(tmp_path)
    np.testing.assert_array_equal(volume.hu, written.hu)
    warning(volume, "unreadable private or unused elements dropped (5 of 30 images)")


# --- a real series after PS3.15-like de-identification ---------------------------------


@pytest.mark.skipif(not LIDC.is_dir(), reason=f"real DICOM sample not found at {LIDC}")
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_real_series_after_basic_profile_deidentification(tmp_path):
    files = sorted(p for p in LIDC.rglob("*.dcm"))
    assert len(files) > 100
    study, series = str(uuid.uuid4()), str(uuid.uuid4())
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        deidentify(ds, study, series)
        ds.save_as(tmp_path / f"IMG{i:05d}", enforce_file_format=False)
    scan = scan_folder(tmp_path)
    assert len(scan.series) == 1

    volume, selection, _ = load_series_from_folder(tmp_path)
    n = selection.chosen.n_frames
    assert n > 100 and volume.shape == (n, 512, 512)
    assert_writer_ready(volume)
    assert volume.series_instance_uid == "2.25." + str(uuid.UUID(series).int)
    warning(volume, f"SOPInstanceUID missing or empty on {n} of {n} images", "minted")
    warning(volume, "StudyInstanceUID not a valid UID")
    warning(volume, "SeriesInstanceUID not a valid UID")
    warning(volume, "FrameOfReferenceUID missing or empty")
    z = [s.position[2] for s in volume.slices]
    assert z == sorted(z)
