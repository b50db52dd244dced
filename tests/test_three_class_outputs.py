"""The three-class case result and the two opacity segments in every output:
result.json, the SR (full and display), the burned-in captions, the SEG and the CLI
summary. Objects are written to bytes, read back with pydicom/highdicom and validated
with dciodvfy."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import (
    CASE_CLASS_TEXT,
    CASE_CLASSES,
    LABEL_NEGATIVE,
    LABEL_POSITIVE,
    AnalysisResult,
)
from ct_ai_node.result import ResultDocument, result_document
from ct_ai_node.writers import build_outputs
from ct_ai_node.writers.common import caption_for, headline
from ct_ai_node.writers.heatmap import _line_size, font_size_for, render_slice
from ct_ai_node.writers.secondary_capture import build_heatmap_series, build_key_image_series
from ct_ai_node.writers.seg import build_seg
from ct_ai_node.writers.sr import (
    CASE_CLASS,
    CASE_CLASS_CODES,
    CLASS_PROBABILITY_CODES,
    COVID_19,
    PNEUMONIA,
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

SEGMENTS = ["Right lung", "Left lung", "Suspected infection", "Ground-glass opacity", "Consolidation"]


@pytest.fixture(scope="module")
def series():
    return make_ct_series()


@pytest.fixture(scope="module")
def volume(series):
    return make_volume(series)


@pytest.fixture(scope="module", params=["single-frame", "multi-frame"])
def any_volume(request, series, volume):
    return volume if request.param == "single-frame" else make_multiframe_volume(series)


def assert_valid(ds) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH: IOD validation skipped")
    errors, _ = dciodvfy_errors(ds)
    assert errors == [], "\n".join(errors)


def three_class(volume, case_class: str = "other_pneumonia", *, consolidation: str = "half",
                volumes: bool = True) -> AnalysisResult:
    """``make_result`` with a three-class result. ``consolidation``: "half" (the
    infection's lower half in z is consolidation), "empty" or "none" (no mask)."""
    probs = {"covid_like": 0.12, "other_pneumonia": 0.8, "no_pneumonia": 0.08}
    if case_class == "covid_like":
        probs = {"covid_like": 0.7, "other_pneumonia": 0.2, "no_pneumonia": 0.1}
    elif case_class == "no_pneumonia":
        probs = {"covid_like": 0.05, "other_pneumonia": 0.15, "no_pneumonia": 0.8}
    base = make_result(volume, probability=probs["covid_like"])
    infection = base.infection_mask
    mask = None
    if consolidation == "half":
        zs = np.flatnonzero(infection.any(axis=(1, 2)))
        mask = infection.copy()
        mask[: zs[len(zs) // 2]] = False
        assert mask.any() and (infection & ~mask).any()
    elif consolidation == "empty":
        mask = np.zeros_like(infection)
    voxel_ml = volume.voxel_volume_ml
    ggo_ml = cons_ml = None
    if volumes and mask is not None:
        cons_ml = float(mask.sum() * voxel_ml)
        ggo_ml = float((infection & ~mask).sum() * voxel_ml)
    return dataclasses.replace(
        base,
        label=LABEL_POSITIVE if case_class == "covid_like" else LABEL_NEGATIVE,
        case_class=case_class,
        class_probabilities=probs,
        consolidation_mask=mask,
        ggo_volume_ml=ggo_ml,
        consolidation_volume_ml=cons_ml,
    )


def _measurement(group, name) -> float:
    found = group.get_measurements(name=name)
    assert len(found) == 1, name
    return found[0].value


def _evaluation(group, name):
    found = group.get_qualitative_evaluations(name=name)
    assert len(found) == 1, name
    return found[0].value


# --- result.json -------------------------------------------------------------------------


def test_result_json_carries_class_probabilities_and_opacity_volumes(volume):
    result = three_class(volume)
    doc = result_document(volume, result, {}, {}, [], "test")
    data = json.loads(doc.model_dump_json())
    assert data["case_class"] == "other_pneumonia"
    assert data["case_class_text"] == "Other pneumonia (not COVID-19-like)"
    assert list(data["class_probabilities"]) == list(CASE_CLASSES)  # fixed order
    assert data["class_probabilities"] == {"covid_like": 0.12, "other_pneumonia": 0.8, "no_pneumonia": 0.08}
    assert data["probability"] == 0.12 and data["label"] == LABEL_NEGATIVE  # unchanged keys
    voxel_ml = volume.voxel_volume_ml
    assert data["consolidation_volume_ml"] == round(result.consolidation_mask.sum() * voxel_ml, 2)
    assert data["ggo_volume_ml"] == round((result.infection_mask & ~result.consolidation_mask).sum() * voxel_ml, 2)
    assert data["ggo_volume_ml"] + data["consolidation_volume_ml"] == pytest.approx(data["lesion_volume_ml"], abs=0.02)
    for key in ("lung_volume_ml", "corona_score_ml", "slice_scores", "positive_slices", "threshold"):
        assert key in data
    assert ResultDocument.model_validate(data).case_class == "other_pneumonia"


def test_result_json_volumes_from_the_mask_when_not_given(volume):
    result = three_class(volume, volumes=False)
    doc = result_document(volume, result, {}, {}, [], "test")
    assert doc.consolidation_volume_ml == round(result.consolidation_mask.sum() * volume.voxel_volume_ml, 2)
    assert doc.ggo_volume_ml > 0


def test_result_json_without_three_class_result(volume):
    doc = result_document(volume, make_result(volume), {}, {}, [], "test")
    assert doc.case_class is None and doc.case_class_text is None
    assert doc.class_probabilities == {}
    assert doc.ggo_volume_ml is None and doc.consolidation_volume_ml is None


# --- SEG -----------------------------------------------------------------------------------


def test_seg_adds_opacity_segments_that_split_the_infection(any_volume):
    volume = any_volume
    result = three_class(volume)
    seg = build_seg(volume, result, 901)
    data = to_bytes(seg)
    plain = pydicom.dcmread(io.BytesIO(data))
    items = plain.SegmentSequence
    assert [i.SegmentLabel for i in items] == SEGMENTS
    ggo_item, cons_item = items[3], items[4]
    ggo_type = ggo_item.SegmentedPropertyTypeCodeSequence[0]
    cons_type = cons_item.SegmentedPropertyTypeCodeSequence[0]
    assert (ggo_type.CodingSchemeDesignator, ggo_type.CodeValue) == ("DCM", "112120")
    assert (cons_type.CodingSchemeDesignator, cons_type.CodeValue) == ("SCT", "95436008")
    for item in (ggo_item, cons_item):
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
        assert item.AnatomicRegionSequence[0].CodeValue == "39607008"  # lung
    colours = [tuple(i.RecommendedDisplayCIELabValue) for i in items]
    assert len(set(colours)) == len(colours)
    assert len(plain.ContentDescription) <= 64 and "consolidation" in plain.ContentDescription

    back = hd.seg.segread(io.BytesIO(data))
    numbers = [1, 2, 3, 4, 5]
    if volume.is_multiframe:
        arr = back.get_pixels_by_source_frame(
            volume.slices[0].sop_instance_uid, source_frame_numbers=[ref.frame_number for ref in volume.slices],
            segment_numbers=numbers, assert_missing_frames_are_empty=True)
    else:
        arr = back.get_pixels_by_source_instance(
            [ref.sop_instance_uid for ref in volume.slices], segment_numbers=numbers,
            assert_missing_frames_are_empty=True)
    arr = arr.astype(bool)
    cons = result.consolidation_mask
    np.testing.assert_array_equal(arr[..., 2], result.infection_mask)  # the union segment stays as it was
    np.testing.assert_array_equal(arr[..., 3], result.infection_mask & ~cons)
    np.testing.assert_array_equal(arr[..., 4], cons)
    assert not (arr[..., 3] & arr[..., 4]).any()
    assert_valid(seg)


def test_seg_leaves_out_an_empty_consolidation_and_keeps_three_segments_without_mask(volume):
    seg = roundtrip(build_seg(volume, three_class(volume, consolidation="empty"), 901))
    assert [i.SegmentLabel for i in seg.SegmentSequence] == SEGMENTS[:4]
    assert_valid(seg)
    seg = roundtrip(build_seg(volume, three_class(volume, consolidation="none"), 901))
    assert [i.SegmentLabel for i in seg.SegmentSequence] == SEGMENTS[:3]


def test_seg_clips_consolidation_to_the_infection(volume):
    result = three_class(volume)
    stray = result.consolidation_mask | (result.lung_labels == 2)  # the whole left lung too
    seg = hd.seg.segread(io.BytesIO(to_bytes(build_seg(volume, dataclasses.replace(result, consolidation_mask=stray),
                                                          901))))
    arr = seg.get_pixels_by_source_instance([ref.sop_instance_uid for ref in volume.slices], segment_numbers=[5],
                                            assert_missing_frames_are_empty=True)[..., 0].astype(bool)
    np.testing.assert_array_equal(arr, result.consolidation_mask)


def test_consolidation_mask_of_the_wrong_shape_is_refused(volume):
    result = dataclasses.replace(three_class(volume), consolidation_mask=np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="consolidation_mask"):
        build_seg(volume, result, 901)


# --- SR ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_class", CASE_CLASSES)
def test_sr_classification_group_codes_the_class(volume, case_class):
    result = three_class(volume, case_class)
    seg = build_seg(volume, result, 901)
    sr = build_sr(volume, result, seg, [], 904)
    back = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    report = back.content
    (classification,) = [g for g in report.get_image_measurement_groups() if g.finding_type == COVID_19]
    assert CASE_CLASS_TEXT[case_class] in classification.tracking_identifier
    assert _evaluation(classification, CASE_CLASS) == CASE_CLASS_CODES[case_class]
    assert _evaluation(classification, PNEUMONIA) == (
        codes.SCT.Absent if case_class == "no_pneumonia" else codes.SCT.Present)
    assert _evaluation(classification, COVID_19) == (
        codes.SCT.Present if case_class == "covid_like" else codes.SCT.Absent)
    for name, p in result.class_probabilities.items():
        assert _measurement(classification, CLASS_PROBABILITY_CODES[name]) == pytest.approx(p)
    assert _measurement(classification, codes.DCM.Probability) == pytest.approx(result.probability)
    assert_valid(sr)


def test_sr_opacity_groups_reference_their_segments(any_volume):
    volume = any_volume
    result = three_class(volume)
    seg = build_seg(volume, result, 901)
    back = hd.sr.srread(io.BytesIO(to_bytes(build_sr(volume, result, seg, [], 904))))
    by_id = {g.tracking_identifier: g for g in back.content.get_volumetric_roi_measurement_groups()}
    numbers = {item.SegmentLabel: int(item.SegmentNumber) for item in seg.SegmentSequence}
    for label, finding, volume_ml in (
        ("Ground-glass opacity", codes.DCM.GroundGlassOpacity, result.ggo_volume_ml),
        ("Consolidation", hd.sr.CodedConcept("95436008", "SCT", "Lung consolidation"), result.consolidation_volume_ml),
    ):
        group = by_id[f"{label} (AI segmentation)"]
        assert group.finding_type == finding
        assert _measurement(group, codes.SCT.Volume) == pytest.approx(volume_ml)
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref.ReferencedSegmentNumber == numbers[label]
    # the union group is still there, with the whole lesion volume
    infection = by_id["Suspected infection (AI segmentation)"]
    assert _measurement(infection, codes.SCT.Volume) == pytest.approx(result.ggo_volume_ml + result.consolidation_volume_ml)
    assert_valid(back)


def test_sr_empty_consolidation_is_measured_without_a_segment(volume):
    result = three_class(volume, "no_pneumonia", consolidation="empty")
    seg = build_seg(volume, result, 901)
    back = hd.sr.srread(io.BytesIO(to_bytes(build_sr(volume, result, seg, [], 904))))
    volumetric = {g.tracking_identifier for g in back.content.get_volumetric_roi_measurement_groups()}
    assert "Ground-glass opacity (AI segmentation)" in volumetric
    assert "Consolidation (AI segmentation)" not in volumetric
    (cons,) = [g for g in back.content.get_image_measurement_groups()
               if g.tracking_identifier == "Consolidation (AI segmentation)"]
    assert _measurement(cons, codes.SCT.Volume) == 0.0
    assert_valid(back)


def test_sr_without_three_class_result_has_no_class_items(volume):
    result = make_result(volume)
    back = hd.sr.srread(io.BytesIO(to_bytes(build_sr(volume, result, build_seg(volume, result, 901), [], 904))))
    (classification,) = [g for g in back.content.get_image_measurement_groups() if g.finding_type == COVID_19]
    assert not classification.get_qualitative_evaluations(name=CASE_CLASS)
    assert not classification.get_qualitative_evaluations(name=PNEUMONIA)
    ids = [g.tracking_identifier for g in back.content.get_volumetric_roi_measurement_groups()]
    assert not any("opacity" in i or "Consolidation" in i for i in ids)
    (planar,) = back.content.get_planar_roi_measurement_groups()
    assert "case class" not in planar.tracking_identifier


def test_display_sr_says_the_class(any_volume):
    volume = any_volume
    result = three_class(volume)
    display = build_display_sr(volume, result, 908)
    back = hd.sr.srread(io.BytesIO(to_bytes(display)))
    (planar,) = back.content.get_planar_roi_measurement_groups()
    assert planar.tracking_identifier.endswith("AI case class: Other pneumonia (not COVID-19-like)")
    assert _evaluation(planar, CASE_CLASS) == CASE_CLASS_CODES["other_pneumonia"]
    # the same finding as the full report's planar group
    full = hd.sr.srread(io.BytesIO(to_bytes(build_sr(volume, result, build_seg(volume, result, 901), [], 904))))
    (full_planar,) = full.content.get_planar_roi_measurement_groups()
    assert (planar.tracking_uid, planar.tracking_identifier) == (full_planar.tracking_uid,
                                                                full_planar.tracking_identifier)
    assert_valid(display)


@pytest.mark.parametrize("change", [{"case_class": "viral"}, {"class_probabilities": {"covid": 1.0}}])
def test_sr_refuses_an_unknown_class(volume, change):
    result = dataclasses.replace(three_class(volume), **change)
    with pytest.raises(OutputError):
        build_sr(volume, result, build_seg(volume, three_class(volume), 901), [], 904)


# --- captions ------------------------------------------------------------------------------


def test_caption_shows_class_and_p_covid_like(volume):
    result = three_class(volume)
    z = result.key_slices[0]
    caption = caption_for(result, z, voxel_ml=volume.voxel_volume_ml)
    assert caption.top[0] == "AI: Other pneumonia (not COVID-19-like)  P(COVID-19-like)=0.12"
    assert caption.top[1].startswith(f"slice score {result.slice_scores[z]:.2f}  GGO ")
    cons = result.consolidation_volume_ml
    assert f"consolidation {cons:.0f} ml" in caption.top[1] or f"consolidation {cons:.1f} ml" in caption.top[1]
    assert caption.top[2].startswith("lesion ")
    # without the three-class result: today's caption
    old = make_result(volume)
    assert caption_for(old, z).top[0] == f"{headline(old)}  slice score {old.slice_scores[z]:.2f}"
    assert headline(old).startswith("AI: COVID-19-like pneumonia  p=0.87")


@pytest.mark.parametrize("case_class", CASE_CLASSES)
def test_caption_lines_fit_a_512_matrix_at_full_size(volume, case_class):
    result = dataclasses.replace(three_class(volume, case_class), ggo_volume_ml=1234.5, consolidation_volume_ml=987.6,
                                 lesion_volume_ml=2222.1, corona_score_ml=3456.7, involvement_percent=55.5)
    caption = caption_for(result, 0, key=(5, 5))
    margin = max(2, 512 // 128)
    for line in caption.top + caption.bottom:
        assert _line_size(line, 512, margin) == font_size_for(512), line


def test_heatmap_and_key_images_burn_the_class_caption(volume):
    result = three_class(volume)
    lung = result.lung_labels > 0
    old = dataclasses.replace(result, case_class=None, class_probabilities={})
    for images, key in ((build_heatmap_series(volume, result, 902), False),
                        (build_key_image_series(volume, result, 903), True)):
        back = roundtrip(images[0])
        z = next(i for i, ref in enumerate(volume.slices)
                 if ref.sop_instance_uid == back.SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = (1, len(images)) if key else None
        expected = render_slice(volume.hu[z], result.heatmap[z], lung[z],
                                caption_for(result, z, key=k, voxel_ml=volume.voxel_volume_ml))
        np.testing.assert_array_equal(back.pixel_array, expected)
        without_class = render_slice(volume.hu[z], result.heatmap[z], lung[z], caption_for(old, z, key=k))
        assert not np.array_equal(back.pixel_array, without_class)
    assert_valid(images[0])


# --- everything together -------------------------------------------------------------------


def test_build_outputs_with_three_class_result_builds_everything_valid(volume):
    result = three_class(volume, "covid_like")
    out = build_outputs(volume, result)
    assert out.warnings == []
    assert [i.SegmentLabel for i in out.seg.SegmentSequence] == SEGMENTS
    for ds in (out.seg, out.sr, out.display_sr, out.heatmaps[0], out.key_images[0], out.key_object_selection):
        assert_valid(ds)


def test_cli_summary_prints_class_and_opacities(volume, tmp_path, capsys):
    from ct_ai_node.cli import _print_summary

    result = three_class(volume)
    _print_summary(result_document(volume, result, {}, {"total": 1.0}, [], "test"), tmp_path)
    text = " ".join(capsys.readouterr().out.split())
    assert "Other pneumonia (not COVID-19-like)" in text
    assert "other_pneumonia 0.800" in text
    assert f"consolidation {result.consolidation_volume_ml:.1f} ml" in text
    _print_summary(result_document(volume, make_result(volume), {}, {"total": 1.0}, [], "test"), tmp_path)
    text = capsys.readouterr().out
    assert "case class" not in text and "opacities" not in text
