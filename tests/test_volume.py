"""Folder -> series -> selection -> HU volume, on synthetic CT series written to disk."""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pydicom.fileset
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from ct_ai_node.errors import InputRejected
from ct_ai_node.rules.selection import SelectionPolicy
from ct_ai_node.volume import load_series_from_folder, load_volume, scan_folder, summarise
from ct_ai_node.volume.geometry import Orientation
from helpers_dicom import (
    stored_pattern,
    write_ct_series,
    write_enhanced_ct,
    write_mr_series,
)


def shuffled(paths, seed=3):
    paths = list(paths)
    random.Random(seed).shuffle(paths)
    return paths


# --- sorting, rescale, spacing -------------------------------------------------------


def test_sorts_by_position_not_instance_number_or_file_name(tmp_path):
    written = write_ct_series(tmp_path, n=30, shuffle_names=True)
    volume = load_volume(shuffled(written.paths))
    assert volume.shape == (30, 64, 64)
    np.testing.assert_array_equal(volume.hu, written.hu)
    assert [s.sop_instance_uid for s in volume.slices] == written.sop_instance_uids
    assert [s.instance_number for s in volume.slices] == written.instance_numbers
    z = [s.position[2] for s in volume.slices]
    assert z == sorted(z)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert volume.orientation == pytest.approx((1, 0, 0, 0, 1, 0))
    assert volume.hu.dtype == np.float32
    assert volume.series_instance_uid == written.series_instance_uid
    assert volume.study_instance_uid == written.study_instance_uid
    assert volume.frame_of_reference_uid == written.frame_of_reference_uid
    assert volume.warnings == []


def test_feet_first_orientation_sorts_along_the_normal(tmp_path):
    written = write_ct_series(tmp_path, n=25, feet_first=True)
    volume = load_volume(shuffled(written.paths))
    np.testing.assert_array_equal(volume.hu, written.hu)
    # normal is -z: positions descend in patient z as the volume index rises
    z = [s.position[2] for s in volume.slices]
    assert z == sorted(z, reverse=True)
    assert volume.spacing[0] == pytest.approx(2.5)


def test_rescale_slope_and_intercept(tmp_path):
    written = write_ct_series(tmp_path, n=22, slope=2.0, intercept=-1024.0)
    volume = load_volume(written.paths)
    np.testing.assert_allclose(volume.hu, written.hu)
    stored = stored_pattern(22, 64, 64).astype(np.float32)
    np.testing.assert_allclose(volume.hu, stored * 2 - 1024)


def test_spacing_from_positions_when_slice_thickness_lies(tmp_path):
    written = write_ct_series(tmp_path, n=24, spacing=(1.25, 0.6, 0.6), thickness=5.0)
    volume = load_volume(written.paths)
    assert volume.spacing[0] == pytest.approx(1.25)
    assert volume.slice_thickness == pytest.approx(5.0)
    assert volume.voxel_volume_ml == pytest.approx(1.25 * 0.6 * 0.6 / 1000)


# --- stack problems ------------------------------------------------------------------


def test_missing_slice_is_rejected(tmp_path):
    written = write_ct_series(tmp_path, n=30, skip=[12], z0=0.0)
    with pytest.raises(InputRejected) as info:
        load_volume(written.paths)
    assert str(info.value) == (
        "missing slices: gap of 5.0 mm between positions 27.5 and 32.5 mm (expected 2.5 mm)"
    )
    with pytest.raises(InputRejected, match="missing slices: gap of 5.0 mm"):
        load_series_from_folder(tmp_path)


def test_small_spacing_variation_warns(tmp_path):
    written = write_ct_series(tmp_path, n=30, offsets={10: 0.1})
    volume = load_volume(written.paths)
    assert volume.shape[0] == 30
    assert any(w.startswith("uneven slice spacing") for w in volume.warnings)
    assert volume.spacing[0] == pytest.approx(2.5)


def test_large_spacing_variation_is_rejected(tmp_path):
    written = write_ct_series(tmp_path, n=30, offsets={10: 0.8})
    with pytest.raises(InputRejected) as info:
        load_volume(written.paths)
    assert str(info.value) == (
        "uneven slice spacing: step of 3.3 mm between positions -327.5 and -324.2 mm "
        "(median 2.5 mm, 32% off)"
    )


def test_gantry_tilt_warns_with_the_angle(tmp_path):
    written = write_ct_series(tmp_path, n=30, tilt_deg=12.0)
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert selection.chosen is not None
    assert any("gantry tilt 12.0 deg" in w for w in volume.warnings)
    assert volume.spacing[0] == pytest.approx(2.5, abs=1e-3)
    np.testing.assert_array_equal(volume.hu, written.hu)


def test_sheared_stack_warns(tmp_path):
    write_ct_series(tmp_path, n=30, shear_deg=6.0)
    volume, _, _ = load_series_from_folder(tmp_path)
    assert any("gantry tilt 6.0 deg" in w for w in volume.warnings)


def test_strong_tilt_is_rejected(tmp_path):
    written = write_ct_series(tmp_path, n=30, shear_deg=40.0)
    with pytest.raises(InputRejected, match=r"gantry tilt 40.0 deg .* > 30 deg"):
        load_volume(written.paths)


def test_duplicate_file_of_one_instance_is_dropped(tmp_path):
    written = write_ct_series(tmp_path, n=25)
    copy = tmp_path / "copy_of_one"
    shutil.copy(written.paths[7], copy)
    volume = load_volume([*written.paths, copy])
    assert volume.shape[0] == 25
    assert any("duplicate copy" in w and "copy_of_one" in w for w in volume.warnings)
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert volume.shape[0] == 25 and selection.chosen.n_files == 26


def test_two_images_at_the_same_position_are_rejected(tmp_path):
    written = write_ct_series(tmp_path, n=25, offsets={5: -2.5})
    with pytest.raises(InputRejected, match="two images at the same position"):
        load_volume(written.paths)
    with pytest.raises(InputRejected, match="two images at the same position"):
        load_series_from_folder(tmp_path)


def test_mixed_sizes_in_one_series_load_the_largest_stack(tmp_path):
    # issue 11: two acquisitions with different matrices in one series used to be
    # refused; the largest stack is loaded and the rest named in a warning
    uid, study = generate_uid(), generate_uid()
    a = write_ct_series(tmp_path / "a", n=20, series_uid=uid, study_uid=study)
    b = write_ct_series(tmp_path / "b", n=5, rows=32, cols=32, series_uid=uid, study_uid=study,
                        z0=-350 + 20 * 2.5)
    volume = load_volume([*a.paths, *b.paths])
    np.testing.assert_array_equal(volume.hu, a.hu)
    assert len(volume.datasets) == 20 and {ds.Rows for ds in volume.datasets} == {64}
    assert any("5 of 25 images left out" in w and "5 images of 32x32" in w for w in volume.warnings)
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert volume.shape == (20, 64, 64) and selection.chosen.n_frames == 20


def test_mixed_pixel_spacing_is_rejected(tmp_path):
    uid = generate_uid()
    a = write_ct_series(tmp_path, n=20, series_uid=uid, name_prefix="a")
    b = write_ct_series(tmp_path, n=3, series_uid=uid, spacing=(2.5, 0.8, 0.8), z0=-300,
                        name_prefix="b")
    with pytest.raises(InputRejected, match="mixed pixel spacing"):
        load_volume([*a.paths, *b.paths])


def test_mixed_orientations_load_the_largest_stack(tmp_path):
    # issue 11: a few images in another orientation no longer refuse the series
    uid = generate_uid()
    a = write_ct_series(tmp_path, n=20, series_uid=uid, name_prefix="a")
    b = write_ct_series(tmp_path, n=2, series_uid=uid, iop=(1, 0, 0, 0, 0, -1), name_prefix="b")
    volume = load_volume([*a.paths, *b.paths])
    np.testing.assert_array_equal(volume.hu, a.hu)
    assert volume.orientation == pytest.approx((1, 0, 0, 0, 1, 0))
    assert any("2 images in another orientation" in w for w in volume.warnings)


# --- folders with several series, no series, bad files --------------------------------


def test_two_series_in_one_folder_choose_one_and_report_the_other(tmp_path):
    study = generate_uid()
    thick = write_ct_series(tmp_path, n=40, spacing=(2.5, 0.7, 0.7), study_uid=study,
                            series_number=2, description="Thorax 2.5", seed=1)
    thin = write_ct_series(tmp_path, n=60, spacing=(1.25, 0.7, 0.7), study_uid=study,
                           series_number=3, description="Thorax 1.25", seed=2)
    (tmp_path / "notes.txt").write_text("not an image\n")
    volume, selection, report = load_series_from_folder(tmp_path)
    assert volume.series_instance_uid == thin.series_instance_uid
    np.testing.assert_array_equal(volume.hu, thin.hu)
    assert selection.chosen.series_number == 3
    skipped = dict(selection.skipped)
    assert skipped[thick.series_instance_uid] == (
        "series 2 (Thorax 2.5): series 3 (Thorax 1.25) preferred: thinner slices "
        "(1.25 mm < 2.5 mm)"
    )
    assert report.n_files == 101 and report.n_dicom == 100
    assert report.skipped_files == [("notes.txt", "not DICOM")]
    assert {s.series_number for s in report.series} == {2, 3}


def test_localizer_and_thick_series_are_skipped(tmp_path):
    write_ct_series(tmp_path / "scout", n=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    series_number=1, description="Topogram")
    write_ct_series(tmp_path / "thick", n=30, spacing=(8.0, 0.7, 0.7), series_number=5,
                    description="Thorax 8.0")
    with pytest.raises(InputRejected) as info:
        load_series_from_folder(tmp_path)
    assert str(info.value) == (
        "series 5 (Thorax 8.0): slice thickness 8.0 mm > 5.0 mm (and 1 other series skipped)"
    )
    volume, selection, _ = load_series_from_folder(tmp_path, SelectionPolicy(max_thickness_mm=10,
                                                                             max_spacing_mm=10))
    assert volume.shape[0] == 30
    assert dict(selection.skipped).popitem()[1] == "series 1 (Topogram): localizer image"


def test_empty_folder(tmp_path):
    with pytest.raises(InputRejected, match=f"^no files in {tmp_path}$"):
        load_series_from_folder(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(InputRejected, match="input not found"):
        load_series_from_folder(tmp_path / "nope")


def test_non_dicom_files_only(tmp_path):
    (tmp_path / "readme.txt").write_text("hello\n")
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    # starts like a raw DICOM stream (group 0008) but is garbage
    (tmp_path / "fake").write_bytes(b"\x08\x00\x05\x00" + os.urandom(2000))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "empty.dcm").write_bytes(b"")
    with pytest.raises(InputRejected, match="^no DICOM files among 4 files$"):
        load_series_from_folder(tmp_path)
    reasons = {p.path.name: p.reason for p in scan_folder(tmp_path).skipped}
    assert reasons == {"readme.txt": "not DICOM", "random.bin": "not DICOM",
                       "fake": "not DICOM", "empty.dcm": "empty file"}


def test_dicom_without_preamble_is_read(tmp_path):
    written = write_ct_series(tmp_path, n=20, shuffle_names=False)
    ds = pydicom.dcmread(written.paths[3])
    raw = tmp_path / "raw_no_preamble"
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)  # no preamble, no meta
    written.paths[3].unlink()
    scan = scan_folder(tmp_path)
    assert scan.n_dicom == 20 and not scan.skipped
    volume, _, _ = load_series_from_folder(tmp_path)
    np.testing.assert_array_equal(volume.hu, written.hu)


def test_dicomdir_is_skipped(tmp_path):
    written = write_ct_series(tmp_path / "IMG", n=20)
    fs = pydicom.fileset.FileSet()
    for p in written.paths:
        fs.add(pydicom.dcmread(p))
    out = tmp_path / "media"
    fs.write(out)
    scan = scan_folder(out)
    assert [(s.path.name, s.reason) for s in scan.skipped] == [
        ("DICOMDIR", "DICOMDIR (media index, not an image)")
    ]
    assert scan.n_dicom == 20


def test_non_ct_only(tmp_path):
    write_mr_series(tmp_path)
    with pytest.raises(InputRejected, match=r"^no CT series: found MR \(1 series\)$"):
        load_series_from_folder(tmp_path)


def test_single_slice(tmp_path):
    write_ct_series(tmp_path, n=1, series_number=4, description="Lone")
    with pytest.raises(InputRejected, match=r"^series 4 \(Lone\): single slice$"):
        load_series_from_folder(tmp_path)


def test_corrupt_pixel_data_names_the_file(tmp_path):
    written = write_ct_series(tmp_path, n=24)
    bad = written.paths[9]
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[: 64 * 64]  # half of Rows*Cols*2
    ds.save_as(bad)
    with pytest.raises(InputRejected) as info:
        load_series_from_folder(tmp_path)
    assert bad.name in str(info.value) and "corrupt pixel data" in str(info.value)
    with pytest.raises(InputRejected, match=f"file {bad.name}: pixel data too short"):
        load_volume(written.paths)


def test_truncated_file_names_the_file(tmp_path):
    written = write_ct_series(tmp_path, n=24)
    bad = written.paths[5]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputRejected) as info:
        load_series_from_folder(tmp_path)
    assert f"file {bad.name}: truncated" in str(info.value)
    with pytest.raises(InputRejected, match=f"file {bad.name}: pixel data too short"):
        load_volume(written.paths)


def test_file_truncated_in_the_header_is_reported(tmp_path):
    written = write_ct_series(tmp_path, n=24)
    bad = written.paths[5]
    bad.write_bytes(bad.read_bytes()[:900])
    with pytest.raises(InputRejected) as info:
        load_series_from_folder(tmp_path)
    assert bad.name in str(info.value)
    with pytest.raises(InputRejected, match=f"file {bad.name}"):
        load_volume(written.paths)


def test_only_damaged_dicom_files(tmp_path):
    written = write_ct_series(tmp_path, n=3, shuffle_names=False)
    for p in written.paths:
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(InputRejected) as info:
        load_series_from_folder(tmp_path)
    assert str(info.value) == (
        "no DICOM files among 3 files; damaged DICOM file 0000 and 2 more skipped "
        "(truncated in the preamble)"
    )


def test_another_good_series_is_used_when_one_is_damaged(tmp_path):
    study = generate_uid()
    damaged = write_ct_series(tmp_path, n=40, spacing=(1.0, 0.7, 0.7), study_uid=study,
                              series_number=3, seed=4)
    good = write_ct_series(tmp_path, n=30, spacing=(2.5, 0.7, 0.7), study_uid=study,
                           series_number=2, seed=5)
    bad = damaged.paths[0]
    bad.write_bytes(bad.read_bytes()[:-100])
    volume, selection, _ = load_series_from_folder(tmp_path)
    assert volume.series_instance_uid == good.series_instance_uid
    assert f"file {bad.name}: truncated" in dict(selection.skipped)[damaged.series_instance_uid]


# --- padding -------------------------------------------------------------------------


def test_pixel_padding_value_and_out_of_fov_values_become_air(tmp_path):
    stored = stored_pattern(20, 32, 32)
    stored[:, :4, :] = -2000  # PixelPaddingValue, HU -3024
    stored[:, -2:, :] = -1024  # HU -2048 without a padding value
    written = write_ct_series(tmp_path, n=20, rows=32, cols=32, stored=stored,
                              pixel_padding_value=-2000)
    volume = load_volume(written.paths)
    assert (volume.hu[:, :4, :] == -1024).all()
    assert (volume.hu[:, -2:, :] == -1024).all()
    np.testing.assert_array_equal(volume.hu[:, 4:-2], written.hu[:, 4:-2])
    padding = [w for w in volume.warnings if "padding" in w]
    assert len(padding) == 1 and padding[0].startswith(f"{20 * 6 * 32} padding voxels")


# --- compressed and multi-frame --------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_transfer_syntaxes(tmp_path, syntax):
    written = write_ct_series(tmp_path, n=20, rows=32, cols=32)
    for p in written.paths:
        ds = pydicom.dcmread(p)
        ds.compress(syntax)
        ds.save_as(p)
    volume = load_volume(shuffled(written.paths))
    np.testing.assert_array_equal(volume.hu, written.hu)


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk dcmcjpeg not installed")
def test_jpeg_lossless_from_dcmtk(tmp_path):
    written = write_ct_series(tmp_path / "src", n=20, rows=32, cols=32)
    out = tmp_path / "jpeg"
    out.mkdir()
    for p in written.paths:
        subprocess.run(["dcmcjpeg", "+e1", str(p), str(out / p.name)], check=True)
    ds = pydicom.dcmread(next(out.iterdir()), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    volume, _, _ = load_series_from_folder(out)
    np.testing.assert_array_equal(volume.hu, written.hu)


def test_corrupt_compressed_data_names_the_file(tmp_path):
    written = write_ct_series(tmp_path, n=20, rows=32, cols=32)
    bad = written.paths[4]
    ds = pydicom.dcmread(bad)
    ds.compress(JPEG2000Lossless)
    frag = bytearray(ds.PixelData)
    frag[40:] = os.urandom(len(frag) - 40)
    ds.PixelData = bytes(frag)
    ds.save_as(bad)
    with pytest.raises(InputRejected, match=f"^file {bad.name}: pixel data cannot be decoded"):
        load_volume(written.paths)


def test_enhanced_ct_multiframe(tmp_path):
    written = write_enhanced_ct(tmp_path, n=24)
    volume = load_volume(written.paths)
    np.testing.assert_array_equal(volume.hu, written.hu)
    assert volume.is_multiframe
    assert [s.frame_number for s in volume.slices] == written.extra["frame_of_z"]
    assert len(volume.datasets) == 1 and volume.dataset_for(3) is volume.datasets[0]
    assert volume.spacing == pytest.approx((1.5, 0.8, 0.8))
    assert volume.slice_thickness == pytest.approx(1.5)
    # the folder path sees one instance with 24 frames and selects it
    loaded, selection, _ = load_series_from_folder(tmp_path)
    assert selection.chosen.n_instances == 1 and selection.chosen.n_frames == 24
    np.testing.assert_array_equal(loaded.hu, written.hu)


def test_enhanced_ct_per_frame_rescale(tmp_path):
    written = write_enhanced_ct(tmp_path, n=20, per_frame_rescale=True)
    volume = load_volume(written.paths)
    np.testing.assert_array_equal(volume.hu, written.hu)


def test_legacy_converted_enhanced_ct_from_highdicom(tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    written = write_ct_series(tmp_path / "legacy", n=20, rows=32, cols=32)
    legacy = [pydicom.dcmread(p) for p in written.paths]
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1,
    )
    path = tmp_path / "enhanced" / "lce.dcm"
    path.parent.mkdir()
    enhanced.save_as(path)
    volume = load_volume([path])
    np.testing.assert_array_equal(volume.hu, written.hu)
    assert volume.is_multiframe and len(volume.slices) == 20
    summary = summarise([pydicom.dcmread(path, stop_before_pixels=True)])
    assert summary.n_frames == 20 and summary.orientation is Orientation.AXIAL
    assert summary.spacing_mm == pytest.approx(2.5)


# --- contract, reporting, privacy, speed -------------------------------------------------


def test_arguments_are_checked(tmp_path):
    with pytest.raises(TypeError, match="paths"):
        load_volume(tmp_path)  # a folder is not a list of files
    with pytest.raises(InputRejected, match="no files"):
        load_volume([])


def test_volume_datasets_hold_pixel_data_in_slice_order(tmp_path):
    written = write_ct_series(tmp_path, n=20)
    volume = load_volume(shuffled(written.paths))
    assert [ds.SOPInstanceUID for ds in volume.datasets] == written.sop_instance_uids
    assert all("PixelData" in ds for ds in volume.datasets)
    assert volume.dataset_for(7).SOPInstanceUID == volume.slices[7].sop_instance_uid


def test_summary_fields_from_headers(tmp_path):
    write_ct_series(tmp_path, n=25, spacing=(2.0, 0.7, 0.7), series_number=6,
                    description="Thorax 2.0 B40f")
    [summary] = scan_folder(tmp_path).summaries()
    assert summary.modality == "CT" and summary.n_instances == 25 and summary.n_frames == 25
    assert (summary.rows, summary.columns) == (64, 64)
    assert summary.orientation is Orientation.AXIAL
    assert summary.slice_thickness == pytest.approx(2.0)
    assert summary.spacing_mm == pytest.approx(2.0)
    assert summary.kernel == "B40f" and summary.body_part == "CHEST"
    assert summary.manufacturer == "SIEMENS" and summary.series_number == 6
    assert summary.is_original_primary and not summary.is_localizer
    assert summary.model_dump_json()  # serialisable for the status page


def test_no_patient_data_in_logs_or_reasons(tmp_path, caplog):
    patient_dir = tmp_path / "Test^Patient_TEST123456"
    write_ct_series(patient_dir, n=30)
    write_mr_series(patient_dir / "mr")
    with caplog.at_level(logging.INFO, logger="ct_ai_node"):
        volume, _, report = load_series_from_folder(patient_dir)
    text = caplog.text + " ".join(volume.warnings) + report.model_dump_json()
    for secret in ("Test^Patient", "TEST123456", "19600101"):
        assert secret not in text


def test_scan_of_300_files(tmp_path):
    write_ct_series(tmp_path, n=300, rows=16, cols=16, spacing=(1.0, 0.7, 0.7))
    scan = scan_folder(tmp_path)
    summaries = scan.summaries()
    assert scan.n_dicom == 300 and summaries[0].n_frames == 300


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the damaged values
def test_random_header_damage_never_escapes_as_a_traceback(tmp_path):
    """Bytes flipped in headers (and files cut short): a volume or InputRejected, nothing else."""
    source = write_ct_series(tmp_path / "src", n=20, rows=16, cols=16)
    rng = random.Random(11)
    outcomes = {"ok": 0, "rejected": 0}
    for iteration in range(30):
        folder = tmp_path / f"fuzz{iteration}"
        shutil.copytree(source.paths[0].parent, folder)
        for path in rng.sample(sorted(folder.iterdir()), rng.randint(1, 3)):
            data = bytearray(path.read_bytes())
            header_end = len(data) - 16 * 16 * 2
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(header_end)] = rng.randrange(256)
            if rng.random() < 0.2:
                data = data[: rng.randrange(len(data))]
            path.write_bytes(bytes(data))
        try:
            load_series_from_folder(folder)
            outcomes["ok"] += 1
        except InputRejected as exc:
            assert "\n" not in str(exc)
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0
