"""Writers: every result object is written to bytes, read back with pydicom and
highdicom, checked against the input masks and numbers, and validated with dciodvfy."""

from __future__ import annotations

import io
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import LEFT_LUNG, RIGHT_LUNG, AlgorithmInfo
from ct_ai_node.writers import OutputSet, build_all, build_outputs
from ct_ai_node.writers.common import ResultUids, caption_for, series_description
from ct_ai_node.writers.heatmap import render_slice
from ct_ai_node.writers.secondary_capture import (
    build_heatmap_series,
    build_key_image_series,
    build_key_object_selection,
)
from ct_ai_node.writers.seg import build_seg
from ct_ai_node.writers.sr import (
    COVID_19,
    CORONA_SCORE,
    LUNG_INVOLVEMENT,
    POSITIVE_SLICE_RATIO,
    build_display_sr,
    build_sr,
)

from helpers_writers import (
    dciodvfy_errors,
    make_ct_series,
    make_multiframe_volume,
    make_result,
    make_volume,
    roundtrip,
    to_bytes,
)

# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series():
    return make_ct_series()


@pytest.fixture(scope="module")
def volume(series):
    return make_volume(series)


@pytest.fixture(scope="module")
def mf_volume(series):
    return make_multiframe_volume(series)


@pytest.fixture(scope="module", params=["single-frame", "multi-frame"])
def any_volume(request, volume, mf_volume):
    return volume if request.param == "single-frame" else mf_volume


@pytest.fixture(scope="module")
def result(volume):
    return make_result(volume)


def assert_valid(ds) -> None:
    """dciodvfy reports no error for ``ds``."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH: IOD validation skipped")
    errors, _ = dciodvfy_errors(ds)
    assert errors == [], "\n".join(errors)


def slice_of(volume, uid: str, frame: int | None) -> int:
    for z, ref in enumerate(volume.slices):
        if ref.sop_instance_uid == uid and ref.frame_number == (int(frame) if frame is not None else None):
            return z
    raise AssertionError(f"no source slice for {uid} frame {frame}")


def expected_masks(result) -> list[np.ndarray]:
    return [result.lung_labels == RIGHT_LUNG, result.lung_labels == LEFT_LUNG, result.infection_mask]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# --- SEG ---------------------------------------------------------------------------------


def test_seg_roundtrip_matches_masks_on_the_right_slices(any_volume):
    volume = any_volume
    result = make_result(volume)
    seg = build_seg(volume, result, 901)
    data = to_bytes(seg)
    plain = pydicom.dcmread(io.BytesIO(data))
    assert plain.SOPClassUID == SegmentationStorage
    assert plain.SegmentationType == "BINARY"
    assert plain.StudyInstanceUID == volume.study_instance_uid
    assert plain.SeriesInstanceUID != volume.series_instance_uid
    assert plain.SeriesNumber == 901 and plain.InstanceNumber == 1
    assert plain.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert plain.PatientID == volume.datasets[0].PatientID
    assert "NOT FOR DIAGNOSTIC USE" in plain.SeriesDescription
    assert plain.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    assert plain.Manufacturer == "ct-ai-node"

    # independent of highdicom's decoder: every stored frame, by its own source
    # reference, equals the input mask of that slice
    masks = expected_masks(result)
    frames = plain.pixel_array.reshape(int(plain.NumberOfFrames), plain.Rows, plain.Columns)
    seen = set()
    for i, item in enumerate(plain.PerFrameFunctionalGroupsSequence):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        z = slice_of(volume, src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber"))
        np.testing.assert_array_equal(frames[i].astype(bool), masks[number - 1][z])
        seen.add((number, z))
    for s, mask in enumerate(masks, start=1):  # no frame with content is missing
        assert {z for z in np.flatnonzero(mask.any(axis=(1, 2)))} == {z for n, z in seen if n == s}

    # and through highdicom, Dice 1.0 per segment
    back = hd.seg.segread(io.BytesIO(data))
    if volume.is_multiframe:
        arr = back.get_pixels_by_source_frame(
            volume.slices[0].sop_instance_uid,
            source_frame_numbers=[ref.frame_number for ref in volume.slices],
            segment_numbers=[1, 2, 3],
            assert_missing_frames_are_empty=True,
        )
    else:
        arr = back.get_pixels_by_source_instance(
            [ref.sop_instance_uid for ref in volume.slices],
            segment_numbers=[1, 2, 3],
            assert_missing_frames_are_empty=True,
        )
    for s, mask in enumerate(masks):
        assert dice(arr[..., s], mask) == 1.0
    assert_valid(seg)


def test_seg_segments_codes_and_algorithm(volume, result):
    seg = roundtrip(build_seg(volume, result, 901))
    items = seg.SegmentSequence
    assert [i.SegmentLabel for i in items] == ["Right lung", "Left lung", "Suspected infection"]
    assert [i.SegmentNumber for i in items] == [1, 2, 3]
    for item, laterality in zip(items[:2], ("24028007", "7771000")):
        cat = item.SegmentedPropertyCategoryCodeSequence[0]
        typ = item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodingSchemeDesignator, cat.CodeValue) == ("SCT", "91723000")
        assert (typ.CodingSchemeDesignator, typ.CodeValue) == ("SCT", "39607008")
        assert typ.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == laterality
    infection = items[2]
    assert infection.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert infection.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    for item in items:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == result.algorithm.name
        assert algo.AlgorithmVersion == result.algorithm.version
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


def test_seg_omits_empty_infection_segment(volume):
    result = make_result(volume, with_infection=False)
    seg = roundtrip(build_seg(volume, result, 901))
    assert [i.SegmentLabel for i in seg.SegmentSequence] == ["Right lung", "Left lung"]
    assert_valid(seg)


def test_seg_all_empty_raises(volume):
    result = make_result(volume, with_infection=False)
    result.lung_labels = np.zeros_like(result.lung_labels)
    with pytest.raises(OutputError):
        build_seg(volume, result, 901)


def test_seg_same_analysis_same_uids_new_revision_new_uids(volume, result):
    a, b = build_seg(volume, result, 901), build_seg(volume, result, 901)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.StudyInstanceUID == b.StudyInstanceUID == volume.study_instance_uid
    second = build_seg(volume, result, 901, uids=ResultUids.for_analysis(volume, result, revision=2))
    assert second.SOPInstanceUID != a.SOPInstanceUID
    assert second.SeriesInstanceUID != a.SeriesInstanceUID


def test_result_uids_are_valid_distinct_and_repeatable(volume, result):
    """Every object of one output set has its own valid UIDs; building again gives the same
    ones; another pipeline, model version or revision gives others."""
    from pydicom.uid import UID

    def uids_of(outputs):
        return [(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) for ds in outputs]

    first = uids_of(build_all(volume, result))
    assert first == uids_of(build_all(volume, result))
    instances = [sop for _, sop in first]
    assert len(set(instances)) == len(instances)
    assert all(UID(sop).is_valid for sop in instances)
    assert len({series for series, _ in first}) == 7  # SEG, heat maps, key images, SR, KOS, display SR, PDF
    base = ResultUids.for_analysis(volume, result)
    others = [ResultUids.for_analysis(volume, result, revision=2),
              ResultUids(base.source_series_uid, "ctnet", base.model_versions),
              ResultUids(base.source_series_uid, base.pipeline, (("algorithm", "other"),))]
    for other in others:
        assert other.uid("sr", "instance") != base.uid("sr", "instance")
    with pytest.raises(ValueError, match="revision"):
        ResultUids("1.2.3", "radlogics", revision=0)


def test_seg_rejects_mismatched_masks(volume, result):
    bad = make_result(volume)
    bad.infection_mask = bad.infection_mask[:-1]
    with pytest.raises(ValueError, match="infection_mask"):
        build_seg(volume, bad, 901)


# --- secondary captures ------------------------------------------------------------------


def test_heatmap_series(any_volume):
    volume = any_volume
    result = make_result(volume)
    images = build_heatmap_series(volume, result, 902)
    assert len(images) == len(result.lung_slices)
    assert len({im.SeriesInstanceUID for im in images}) == 1
    assert [int(im.InstanceNumber) for im in images] == list(range(1, len(images) + 1))
    lung = result.lung_labels > 0
    for im in images[:: max(1, len(images) // 4)]:
        back = roundtrip(im)
        assert back.SOPClassUID == SecondaryCaptureImageStorage
        assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
        assert (back.Rows, back.Columns) == volume.shape[1:]
        assert back.BurnedInAnnotation == "YES"
        assert back.StudyInstanceUID == volume.study_instance_uid
        assert back.PatientName == volume.datasets[0].PatientName
        assert back.SeriesNumber == 902
        assert back.SeriesDescription == series_description("AI heat map", result)
        assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
        src = back.SourceImageSequence[0]
        z = slice_of(volume, src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber"))
        # the pixels are this slice's rendering: the reference points at the right slice
        expected = render_slice(volume.hu[z], result.heatmap[z], lung[z], caption_for(result, z))
        np.testing.assert_array_equal(back.pixel_array, expected)
        # the caption is burned in: the top rows differ from the uncaptioned rendering
        plain = render_slice(volume.hu[z], result.heatmap[z], lung[z], None)
        assert not np.array_equal(back.pixel_array[:8], plain[:8])
        assert not np.array_equal(back.pixel_array[-8:], plain[-8:])
    assert_valid(images[0])


def test_heatmap_blends_only_inside_lungs(volume, result):
    z = result.key_slices[0]
    lung = result.lung_labels[z] > 0
    rgb = render_slice(volume.hu[z], result.heatmap[z], lung, None)
    grey = rgb[~lung]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    hot = lung & (result.heatmap[z] > 0.5)
    assert hot.any() and (rgb[hot][:, 0] != rgb[hot][:, 2]).any()


def test_key_image_series_and_selection(any_volume):
    volume = any_volume
    result = make_result(volume)
    keys = build_key_image_series(volume, result, 903)
    assert len(keys) == min(5, len(result.key_slices))
    maps = {
        (im.SourceImageSequence[0].ReferencedSOPInstanceUID, im.SourceImageSequence[0].get("ReferencedFrameNumber")): im
        for im in build_heatmap_series(volume, result, 902)
    }
    for k, (im, z) in enumerate(zip(keys, result.key_slices), start=1):
        back = roundtrip(im)
        assert back.InstanceNumber == k and back.SeriesNumber == 903
        src = back.SourceImageSequence[0]
        assert slice_of(volume, src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber")) == z
        # the key-image caption line makes it differ from the heat map of the same slice
        twin = maps[(src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber"))]
        assert not np.array_equal(back.pixel_array, twin.pixel_array)
    assert_valid(keys[0])
    ko = build_key_object_selection(keys, 905, result=result)
    back = roundtrip(ko)
    refs = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in back.ContentSequence
        if item.ValueType == "IMAGE"
    }
    assert refs == {im.SOPInstanceUID for im in keys}
    assert_valid(ko)


def test_no_key_slices_gives_no_key_series(volume):
    result = make_result(volume)
    result.key_slices = []
    assert build_key_image_series(volume, result, 903) == []


# --- SR ------------------------------------------------------------------------------------


def _measurement(group, name) -> float:
    found = group.get_measurements(name=name)
    assert len(found) == 1, name
    return found[0].value


def test_sr_content(any_volume):
    volume = any_volume
    result = make_result(volume)
    seg = build_seg(volume, result, 901)
    keys = build_key_image_series(volume, result, 903)
    sr = build_sr(volume, result, seg, keys, 904)
    data = to_bytes(sr)
    back = hd.sr.srread(io.BytesIO(data))
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    assert back.SeriesNumber == 904
    assert back.StudyInstanceUID == volume.study_instance_uid
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
    report = back.content
    assert isinstance(report, hd.sr.MeasurementReport)

    device = report.get_observer_contexts(observer_type=codes.DCM.Device)
    assert device, "observer context names the algorithm as device"

    volumetric = report.get_volumetric_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in volumetric}
    voxel_ml = volume.voxel_volume_ml
    right = by_id["Right lung (AI segmentation)"]
    left = by_id["Left lung (AI segmentation)"]
    infection = by_id["Suspected infection (AI segmentation)"]
    assert _measurement(right, codes.SCT.Volume) == pytest.approx((result.lung_labels == 1).sum() * voxel_ml)
    assert _measurement(left, codes.SCT.Volume) == pytest.approx((result.lung_labels == 2).sum() * voxel_ml)
    assert _measurement(infection, codes.SCT.Volume) == pytest.approx(result.lesion_volume_ml)
    assert _measurement(infection, LUNG_INVOLVEMENT) == pytest.approx(result.involvement_percent)
    for group, number in ((right, 1), (left, 2), (infection, 3)):
        ref = group.referenced_segment
        item = ref[0].ReferencedSOPSequence[0]
        assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert item.ReferencedSegmentNumber == number

    others = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    lungs = others["Both lungs (AI segmentation)"]
    assert _measurement(lungs, codes.SCT.Volume) == pytest.approx(result.lung_volume_ml)
    (classification,) = [g for g in others.values() if g.finding_type == COVID_19]
    assert _measurement(classification, codes.DCM.Probability) == pytest.approx(result.probability)
    assert _measurement(classification, CORONA_SCORE) == pytest.approx(result.corona_score_ml)
    assert _measurement(classification, POSITIVE_SLICE_RATIO) == pytest.approx(result.positive_slice_ratio)
    (presence,) = classification.get_qualitative_evaluations(name=COVID_19)
    assert presence.value == codes.SCT.Present

    (planar,) = report.get_planar_roi_measurement_groups()
    roi = planar.roi
    assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    points = roi.value
    assert len(points) >= 4 and np.array_equal(points[0], points[-1])
    src = roi.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM: source image
    z = slice_of(volume, src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber"))
    assert result.infection_mask[z].any()
    assert z == result.key_slices[0] or not result.infection_mask[result.key_slices[0]].any()
    area = _measurement(planar, codes.SCT.Area)
    assert 0 < area <= result.infection_mask[z].sum() * volume.spacing[1] * volume.spacing[2] + 1e-6
    assert "infection" in planar.tracking_identifier

    evidence = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {ref.sop_instance_uid for ref in volume.slices} <= evidence
    assert {im.SOPInstanceUID for im in keys} <= evidence
    assert_valid(sr)


def test_sr_without_infection_outlines_right_lung(volume):
    result = make_result(volume, with_infection=False, probability=0.1)
    seg = build_seg(volume, result, 901)
    back = hd.sr.srread(io.BytesIO(to_bytes(build_sr(volume, result, seg, [], 904))))
    report = back.content
    ids = [g.tracking_identifier for g in report.get_volumetric_roi_measurement_groups()]
    assert not any("infection" in i.lower() for i in ids)
    (planar,) = report.get_planar_roi_measurement_groups()
    assert planar.tracking_identifier.startswith("No infection found: outline of the right lung")
    classification = [g for g in report.get_image_measurement_groups() if g.finding_type == COVID_19][0]
    assert classification.get_qualitative_evaluations(name=COVID_19)[0].value == codes.SCT.Absent
    assert_valid(back)


def test_sr_requires_the_seg(volume, result):
    with pytest.raises(ValueError, match="seg_dataset"):
        build_sr(volume, result, volume.datasets[0], [], 904)


def test_display_sr_holds_only_the_drawable_region(any_volume):
    """The display SR: TID 1500 with the full report's planar group alone (same tracking
    UID), every group with a SCOORD on a source image (what OHIF v3 needs to draw it)."""
    volume = any_volume
    result = make_result(volume)
    seg = build_seg(volume, result, 901)
    full = hd.sr.srread(io.BytesIO(to_bytes(build_sr(volume, result, seg, [], 904))))
    display = build_display_sr(volume, result, 908)
    back = hd.sr.srread(io.BytesIO(to_bytes(display)))
    assert isinstance(back, hd.sr.Comprehensive3DSR) and back.SeriesNumber == 908
    assert back.StudyInstanceUID == volume.study_instance_uid
    assert back.SeriesInstanceUID != full.SeriesInstanceUID and back.SOPInstanceUID != full.SOPInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
    report = back.content
    assert not report.get_volumetric_roi_measurement_groups() and not report.get_image_measurement_groups()
    (planar,) = report.get_planar_roi_measurement_groups()
    (full_planar,) = full.content.get_planar_roi_measurement_groups()
    assert planar.tracking_uid == full_planar.tracking_uid
    assert planar.tracking_identifier == full_planar.tracking_identifier
    assert np.array_equal(planar.roi.value, full_planar.roi.value)
    assert _measurement(planar, codes.SCT.Area) == pytest.approx(_measurement(full_planar, codes.SCT.Area))
    src = planar.roi.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM: the CT image
    full_src = full_planar.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert src.ReferencedSOPInstanceUID == full_src.ReferencedSOPInstanceUID
    z = slice_of(volume, src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber"))
    assert result.infection_mask[z].any()
    if not volume.is_multiframe:  # the image number a viewer shows for that slice
        assert f"instance {volume.slices[z].instance_number}" in planar.tracking_identifier
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {ref.sop_instance_uid for ref in volume.slices} == evidence
    assert display.SOPInstanceUID == build_display_sr(volume, result, 908).SOPInstanceUID  # repeatable
    assert_valid(display)


# --- everything together ------------------------------------------------------------------


def test_build_outputs_names_series_and_uids(volume, result):
    out = build_outputs(volume, result, series_number_base=900, institution_name="Test Hospital")
    assert isinstance(out, OutputSet)
    named = list(out.named())
    names = [n for n, _ in named]
    assert names[0] == "seg.dcm" and "sr.dcm" in names and "ko.dcm" in names
    assert "heatmap_0001.dcm" in names and "key_0001.dcm" in names
    assert len(set(names)) == len(names)
    numbers = {n.removesuffix(".dcm").rstrip("_0123456789"): int(ds.SeriesNumber) for n, ds in named}
    assert numbers == {"seg": 901, "heatmap": 902, "key": 903, "sr": 904, "ko": 905, "sr_display": 908,
                       "report_pdf": 909}
    datasets = [ds for _, ds in named]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert {ds.StudyInstanceUID for ds in datasets} == {volume.study_instance_uid}
    series_uids = {}
    for name, ds in named:
        series_uids.setdefault(name.removesuffix(".dcm").rstrip("_0123456789"), set()).add(ds.SeriesInstanceUID)
    assert all(len(v) == 1 for v in series_uids.values())
    assert len(set().union(*series_uids.values())) == 7
    assert volume.series_instance_uid not in set().union(*series_uids.values())
    for ds in datasets:
        assert ds.Manufacturer == "ct-ai-node"
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    assert out.sop_classes()["seg.dcm"] == SegmentationStorage
    assert out.sop_classes()["report_pdf.dcm"] == "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF
    assert len(build_all(volume, result)) == len(datasets)


def test_validated_model_drops_disclaimer(volume):
    algo = AlgorithmInfo(name="validated model", version="2.0", clinically_validated=True)
    result = make_result(volume, algorithm=algo)
    seg = build_seg(volume, result, 901)
    assert "NOT FOR DIAGNOSTIC USE" not in seg.SeriesDescription
    assert "NOT FOR DIAGNOSTIC USE" not in caption_for(result, 0).bottom


def test_seg_and_sc_follow_uids_not_dataset_order(volume, result):
    """Source datasets in another order than the slices: frames still land by UID."""
    from dataclasses import replace

    shuffled = replace(volume, datasets=list(reversed(volume.datasets)))
    seg = hd.seg.segread(io.BytesIO(to_bytes(build_seg(shuffled, result, 901))))
    arr = seg.get_pixels_by_source_instance(
        [ref.sop_instance_uid for ref in volume.slices],
        segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True,
    )
    for s, mask in enumerate(expected_masks(result)):
        assert dice(arr[..., s], mask) == 1.0
    (key,) = build_key_image_series(shuffled, result, 903, max_images=1)
    z = result.key_slices[0]
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == volume.slices[z].sop_instance_uid
