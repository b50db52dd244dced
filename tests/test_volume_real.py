"""The loader on real vendor DICOM from ../shared/data/real (see its READMEs).

Sources: TCIA Lung-PET-CT-Dx (Siemens, 8 mm), TCIA COVID-19-NY-SBU single slices
(GE, padding -2000), TotalSegmentator test DICOM (Siemens, JPEG 2000 lossless,
empty UIDs), lungmask test slices (stripped headers, -2048 outside the FOV).
Skipped, with the reason shown, when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from ct_ai_node.errors import InputRejected
from ct_ai_node.rules.selection import SelectionPolicy, select_series
from ct_ai_node.volume import load_series_from_folder, load_volume, scan_folder
from ct_ai_node.volume.geometry import Orientation
from helpers_dicom import REAL_DATA

pytestmark = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real DICOM samples not found at {REAL_DATA}"
)

LUNG_DX = REAL_DATA / "lung_pet_ct_dx_sample" / "Lung_Dx-A0002"
COVID = REAL_DATA / "covid19_ny_sbu_single_slices" / "data-sample"
TOTALSEG = REAL_DATA / "totalsegmentator_testfiles" / "example_ct_dicom_upperabdomen_20slices"
LUNGMASK = REAL_DATA / "lungmask_testdata"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real sample missing: {path}")
    return path


def test_jpeg2000_lossless_series_decodes():
    folder = need(TOTALSEG)
    volume, selection, report = load_series_from_folder(folder)
    assert report.series[0].transfer_syntax_uids == ("1.2.840.10008.1.2.4.90",)
    assert volume.shape == (20, 512, 512)
    # SliceThickness says 3 mm, the positions are 2 mm apart (overlapping recon)
    assert volume.slice_thickness == pytest.approx(3.0)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    z = [s.position[2] for s in volume.slices]
    assert z == sorted(z) and z[0] == pytest.approx(-804.5)
    # Siemens 12-bit unsigned, intercept -1024: air to bone, upper abdomen
    assert volume.hu.min() == -1024 and 1000 < volume.hu.max() < 3100
    soft = np.mean((volume.hu > -100) & (volume.hu < 100))
    assert soft > 0.2
    # the decoded values are the stored values rescaled
    ds = pydicom.dcmread(folder / Path(volume.datasets[0].filename).name)
    np.testing.assert_array_equal(volume.hu[0], ds.pixel_array.astype(np.float32) - 1024)
    # the files carry empty SOP/Series/Study UIDs: repaired from the file meta, reported
    assert volume.slices[0].sop_instance_uid == ds.file_meta.MediaStorageSOPInstanceUID
    assert volume.series_instance_uid and volume.study_instance_uid
    assert any("SeriesInstanceUID missing" in w for w in volume.warnings)


def test_lung_pet_ct_dx_two_series_load_sorted():
    folder = need(LUNG_DX)
    scan = scan_folder(folder)
    assert len(scan.series) == 2
    assert all(reason == "not DICOM" for _, reason in scan.report().skipped_files)  # png, gif
    for key in scan.series:
        volume = load_volume(scan.paths(key))
        assert volume.shape == (30, 512, 512)
        assert volume.spacing == pytest.approx((8.0, 0.646484375, 0.646484375))
        assert [s.position[2] for s in volume.slices] == [80.0 + 8 * i for i in range(30)]
        # InstanceNumber 1 is the top slice: sorting by position reverses it
        assert [s.instance_number for s in volume.slices] == list(range(30, 0, -1))
        assert volume.hu.min() == -1024 and volume.hu.max() < 3100
        lung = np.mean(volume.hu[10:20] < -500)
        assert lung > 0.3  # chest: lungs and outside air
        assert volume.warnings == []


def test_lung_pet_ct_dx_8mm_series_skipped_by_default_policy():
    folder = need(LUNG_DX)
    summaries = scan_folder(folder).summaries()
    assert sorted(s.kernel for s in summaries) == ["B40f", "B70f"]
    assert all(s.slice_thickness == 8.0 and s.spacing_mm == 8.0 for s in summaries)
    selection = select_series(summaries)
    assert selection.chosen is None
    for _, reason in selection.skipped:
        assert reason.endswith("slice thickness 8.0 mm > 5.0 mm")
    with pytest.raises(InputRejected, match=r"slice thickness 8\.0 mm > 5\.0 mm"):
        load_series_from_folder(folder)
    relaxed = SelectionPolicy(max_thickness_mm=10.0, max_spacing_mm=10.0)
    volume, selection, _ = load_series_from_folder(folder, relaxed)
    assert volume.shape == (30, 512, 512)
    assert len(selection.skipped) == 1


def test_covid_single_slices_are_rejected_and_orientations_identified():
    folder = need(COVID)
    patient = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    for plane in ("axial", "coronal", "sagittal"):
        summaries = scan_folder(patient / plane).summaries()
        assert summaries and all(s.n_frames == 1 for s in summaries)
        assert {s.orientation for s in summaries} == {Orientation(plane)}
        with pytest.raises(InputRejected, match=r": single slice"):
            load_series_from_folder(patient / plane)


def test_covid_padding_value_becomes_air():
    folder = need(COVID)
    path = sorted(folder.glob("*/axial/*.dcm"))[0]
    ds = pydicom.dcmread(path)
    assert int(ds.PixelPaddingValue) == -2000 and (ds.pixel_array == -2000).any()
    volume = load_volume([path])
    assert volume.shape == (1, 512, 512)
    assert volume.hu.min() >= -1024
    assert any("padding voxels" in w for w in volume.warnings)
    padded = ds.pixel_array == -2000
    assert (volume.hu[0][padded] == -1024).all()


def test_lungmask_slices_outside_fov_minus_2048():
    folder = need(LUNGMASK)
    paths = sorted(folder.glob("*.dcm"))
    raw = pydicom.dcmread(paths[0]).pixel_array
    assert raw.min() == -2048
    volume = load_volume(paths)
    assert volume.shape == (2, 512, 512)
    assert volume.spacing == pytest.approx((1.0, 0.625, 0.625))
    assert -1200 < volume.hu.min() and (volume.hu[0][raw == -2048] == -1024).all()
    assert sum("padding voxels" in w for w in volume.warnings) == 1
    [summary] = scan_folder(folder).summaries()
    assert summary.modality == "CT"  # no Modality tag: inferred from CT Image Storage
    assert summary.n_frames == 2
