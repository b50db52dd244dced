"""Issue 16 in the DICOM outputs: the lobe SEG (its own series; a label map, so segments never
overlap), the SR's per-lobe groups (finding site the lobe's SNOMED CT code, the CT severity
score, the suggested categories), dciodvfy-clean, for single- and multi-frame sources."""

from __future__ import annotations

import dataclasses
import shutil

import highdicom as hd
import numpy as np
import pytest

from ct_ai_node.pipeline.category import suggest_category
from ct_ai_node.pipeline.severity import ct_severity_score, lobe_involvement
from ct_ai_node.pipeline.types import LEFT_LUNG, LOBES, RIGHT_LUNG
from ct_ai_node.writers import build_outputs
from ct_ai_node.writers.seg import LOBE_CODES, build_lobe_seg, lobe_segment_number
from ct_ai_node.writers.sr import CO_RADS, CT_SEVERITY, LOBE_SEVERITY

from helpers_writers import dciodvfy_errors, make_ct_series, make_multiframe_volume, make_result, make_volume, roundtrip


def with_lobes(volume, drop: int | None = None):
    """make_result's lungs cut into lobes by height (right: upper / middle / lower thirds; left:
    upper / lower halves); ``drop`` leaves one lobe out."""
    result = make_result(volume)
    n = volume.shape[0]
    z = np.arange(n)[:, None, None]
    lobes = np.zeros(result.lung_labels.shape, np.uint8)
    right, left = result.lung_labels == RIGHT_LUNG, result.lung_labels == LEFT_LUNG
    lobes[right & (z < n / 3)] = 3
    lobes[right & (z >= n / 3) & (z < 2 * n / 3)] = 2
    lobes[right & (z >= 2 * n / 3)] = 1
    lobes[left & (z < n / 2)] = 5
    lobes[left & (z >= n / 2)] = 4
    if drop is not None:
        lobes[lobes == drop] = 0
    found = lobe_involvement(lobes, result.infection_mask, None, volume.spacing)
    category = suggest_category(None, {}, {"bilateral": 0.0, "peripheral": 0.2, "foci": 0.7, "largest": 1.0,
                                           "consolidation": 0.1}, result.lesion_volume_ml, result.involvement_percent,
                                found)
    return dataclasses.replace(result, lobe_labels=lobes, lobes=found, ct_severity_score=ct_severity_score(found),
                               category=category)


@pytest.fixture(scope="module")
def series():
    return make_ct_series()


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
def test_lobe_seg_holds_each_lobe_where_the_analysis_put_it(series, multiframe):
    volume = make_multiframe_volume(series) if multiframe else make_volume(series)
    result = with_lobes(volume)
    seg = roundtrip(build_lobe_seg(volume, result, 910))
    assert seg.Modality == "SEG" and int(seg.SeriesNumber) == 910
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [
        "Right upper lobe", "Right middle lobe", "Right lower lobe", "Left upper lobe", "Left lower lobe"]
    for name in LOBES:
        item = seg.SegmentSequence[lobe_segment_number(seg, name) - 1]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == LOBE_CODES[name].value
    if shutil.which("dciodvfy"):
        errors, _ = dciodvfy_errors(seg)
        assert not errors, errors


def test_lobe_seg_voxel_counts_match_the_lobes(series):
    volume = make_volume(series)
    result = with_lobes(volume)
    seg = hd.seg.Segmentation.from_dataset(roundtrip(build_lobe_seg(volume, result, 910)))
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    for label, name in enumerate(LOBES, start=1):
        number = lobe_segment_number(seg, name)
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number], ignore_spatial_locations=True,
                                                 assert_missing_frames_are_empty=True)[..., 0]
        assert int(mask.astype(bool).sum()) == int((result.lobe_labels == label).sum()), name


def test_a_lobe_not_found_is_left_out_and_numbers_stay_consecutive(series):
    volume = make_volume(series)
    seg = build_lobe_seg(volume, with_lobes(volume, drop=2), 910)
    assert [int(i.SegmentNumber) for i in seg.SegmentSequence] == [1, 2, 3, 4]
    assert lobe_segment_number(seg, "right_middle") is None and lobe_segment_number(seg, "left_lower") == 4


def test_outputs_with_lobes_have_the_lobe_seg_and_an_sr_with_lobe_groups(series):
    volume = make_volume(series)
    result = with_lobes(volume)
    out = build_outputs(volume, result, heatmaps=False, pdf_report=False)
    names = dict(out.named())
    assert "seg_lobes.dcm" in names and not out.warnings, out.warnings
    sr = roundtrip(names["sr.dcm"])
    used = code_values(sr)
    for name in LOBES:
        assert LOBE_CODES[name].value in used, name  # finding site of each lobe group
    assert {LOBE_SEVERITY.value, CT_SEVERITY.value, CO_RADS.value, f"CO-RADS-{result.category.co_rads}"} <= used
    # the SR names the lobe SEG among its evidence
    evidence = {item.SeriesInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for item in study.ReferencedSeriesSequence}
    assert names["seg_lobes.dcm"].SeriesInstanceUID in evidence
    if shutil.which("dciodvfy"):
        for name in ("sr.dcm", "seg_lobes.dcm"):
            errors, _ = dciodvfy_errors(names[name])
            assert not errors, (name, errors)
    # without lobes: no lobe SEG, and the SR has no lobe group
    plain = build_outputs(volume, make_result(volume), heatmaps=False, pdf_report=False)
    assert "seg_lobes.dcm" not in dict(plain.named())
    assert LOBE_SEVERITY.value not in code_values(dict(plain.named())["sr.dcm"])


def code_values(ds) -> set[str]:
    """Every code value in an SR's content tree (concept names and coded values)."""
    out = set()
    for item in getattr(ds, "ContentSequence", []):
        for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in getattr(item, seq, []):
                out.add(str(code.get("CodeValue", code.get("LongCodeValue", ""))))
        out |= code_values(item)
    return out
