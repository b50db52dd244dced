"""Pure tests of the series selection rules on hand-built summaries."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ct_ai_node.rules.selection import Selection, SelectionPolicy, select_series
from ct_ai_node.volume.geometry import Orientation, StackStats
from ct_ai_node.volume.series import SeriesSummary

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def summary(key: str = "1.2.3.1", **kw) -> SeriesSummary:
    n = kw.pop("n_frames", 120)
    thickness = kw.pop("slice_thickness", 2.5)
    spacing = kw.pop("spacing_mm", thickness)
    stack = kw.pop(
        "stack",
        StackStats(
            n_positions=n,
            spacing_mm=spacing,
            first_mm=0.0,
            last_mm=spacing * (n - 1),
            largest_step=(0.0, spacing, spacing),
            max_deviation=0.0,
            tilt_deg=0.0,
        )
        if n > 1
        else StackStats(n_positions=1, first_mm=0.0, last_mm=0.0),
    )
    fields = dict(
        key=key,
        series_instance_uid=key,
        study_instance_uid="1.2.3",
        modality="CT",
        sop_class_uid=CT,
        sop_class_uids=(CT,),
        n_instances=n,
        n_files=n,
        n_frames=n,
        rows=512,
        columns=512,
        pixel_spacing=(0.7, 0.7),
        iop=AXIAL,
        orientation=Orientation.AXIAL,
        axial_deviation_deg=0.0,
        slice_thickness=thickness,
        spacing_mm=spacing,
        stack=stack,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        series_description="Thorax",
        series_number=int(key.rsplit(".", 1)[-1]),
    )
    fields.update(kw)
    return SeriesSummary(**fields)


def reasons(selection: Selection) -> dict[str, str]:
    return dict(selection.skipped)


def test_single_good_series_is_chosen():
    s = summary()
    selection = select_series([s])
    assert selection.chosen == s
    assert selection.reason is None
    assert selection.skipped == []


def test_localizer_is_skipped_with_reason():
    scout = summary("1.2.3.1", n_frames=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    series_description="SCOUT")
    good = summary("1.2.3.2")
    selection = select_series([scout, good])
    assert selection.chosen == good
    assert reasons(selection)["1.2.3.1"] == "series 1 (SCOUT): localizer image"


def test_thick_series_is_skipped_with_reason():
    thick = summary("1.2.3.5", slice_thickness=8.0)
    selection = select_series([thick])
    assert selection.chosen is None
    assert selection.reason == "series 5 (Thorax): slice thickness 8.0 mm > 5.0 mm"
    assert reasons(selection)["1.2.3.5"] == "series 5 (Thorax): slice thickness 8.0 mm > 5.0 mm"


def test_thin_slices_with_wide_spacing_are_skipped():
    sparse = summary("1.2.3.4", slice_thickness=1.0, spacing_mm=10.0)
    selection = select_series([sparse])
    assert selection.reason == "series 4 (Thorax): slice spacing 10.0 mm > 5.0 mm"


def test_coronal_series_is_skipped():
    coronal = summary("1.2.3.3", iop=CORONAL, orientation=Orientation.CORONAL,
                      axial_deviation_deg=90.0)
    selection = select_series([coronal])
    assert selection.chosen is None
    assert selection.reason == "series 3 (Thorax): coronal images, not axial"


def test_oblique_series_is_skipped_but_small_deviation_is_axial():
    oblique = summary("1.2.3.3", orientation=Orientation.OBLIQUE, axial_deviation_deg=35.0)
    slightly = summary("1.2.3.4", axial_deviation_deg=8.0)
    selection = select_series([oblique, slightly])
    assert selection.chosen == slightly
    assert "oblique images (35 deg from axial)" in reasons(selection)["1.2.3.3"]


def test_tilted_gantry_is_accepted_up_to_the_limit_and_reported():
    n = 100
    tilted = summary(
        "1.2.3.6", orientation=Orientation.OBLIQUE, axial_deviation_deg=15.0,
        stack=StackStats(n_positions=n, spacing_mm=2.5, first_mm=0, last_mm=247.5,
                         largest_step=(0, 2.5, 2.5), tilt_deg=15.0),
    )
    selection = select_series([tilted])
    assert selection.chosen == tilted
    assert any("gantry tilt 15.0 deg" in w for w in selection.warnings)

    strict = SelectionPolicy(max_gantry_tilt_deg=10.0)
    selection = select_series([tilted], strict)
    assert selection.chosen is None
    assert "not axial" in selection.reason


def test_single_slice_is_rejected_as_single_slice():
    lone = summary("1.2.3.9", n_frames=1)
    selection = select_series([lone])
    assert selection.chosen is None
    assert selection.reason == "series 9 (Thorax): single slice"


def test_too_few_slices():
    few = summary("1.2.3.4", n_frames=12)
    selection = select_series([few])
    assert selection.reason == "series 4 (Thorax): only 12 slices (< 20)"
    assert select_series([few], SelectionPolicy(min_slices=10)).chosen == few


def test_prefers_thinnest_slices():
    thick = summary("1.2.3.2", slice_thickness=5.0, n_frames=60)
    thin = summary("1.2.3.3", slice_thickness=1.0, n_frames=300)
    mid = summary("1.2.3.4", slice_thickness=2.0, n_frames=150)
    selection = select_series([thick, thin, mid])
    assert selection.chosen == thin
    assert reasons(selection)["1.2.3.2"] == (
        "series 2 (Thorax): series 3 (Thorax) preferred: thinner slices (1.0 mm < 5.0 mm)"
    )


def test_prefers_most_instances_at_equal_thickness():
    short = summary("1.2.3.2", n_frames=80)
    long = summary("1.2.3.3", n_frames=130)
    selection = select_series([short, long])
    assert selection.chosen == long
    assert "more slices (130 > 80)" in reasons(selection)["1.2.3.2"]


def test_prefers_original_primary_over_derived():
    derived = summary("1.2.3.2", slice_thickness=1.0,
                      image_type=("DERIVED", "SECONDARY", "REFORMATTED"))
    original = summary("1.2.3.3", slice_thickness=2.0)
    selection = select_series([derived, original])
    assert selection.chosen == original
    assert "ORIGINAL\\PRIMARY" in reasons(selection)["1.2.3.2"]
    # alone, a derived axial series is still used, with a warning
    alone = select_series([derived])
    assert alone.chosen == derived
    assert alone.warnings and "DERIVED" in alone.warnings[0]
    assert select_series([derived], SelectionPolicy(require_original=True)).chosen is None


def test_no_ct_series_reason_names_what_was_found():
    mr = summary("1.2.3.4", modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                 sop_class_uids=("1.2.840.10008.5.1.4.1.1.4",))
    selection = select_series([mr])
    assert selection.reason == "no CT series: found MR (1 series)"
    sr = summary("1.2.3.5", modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22")
    assert select_series([mr, sr]).reason == "no CT series: found MR (1 series), SR (1 series)"


def test_ct_secondary_capture_is_not_a_ct_image():
    sc = summary("1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                 sop_class_uids=("1.2.840.10008.5.1.4.1.1.7",))
    selection = select_series([sc])
    assert selection.reason == (
        "series 4 (Thorax): Secondary Capture Image Storage is not a CT image SOP class"
    )


def test_enhanced_ct_qualifies():
    enhanced = summary("1.2.3.4", sop_class_uid=ENHANCED_CT, sop_class_uids=(ENHANCED_CT,),
                       n_instances=1, n_files=1)
    assert select_series([enhanced]).chosen == enhanced


def test_stack_problems_skip_the_series():
    gappy = summary(
        "1.2.3.4",
        stack=StackStats(n_positions=100, spacing_mm=2.5, first_mm=0.0, last_mm=255.0,
                         largest_step=(100.0, 107.5, 7.5)),
    )
    selection = select_series([gappy])
    assert selection.reason == (
        "series 4 (Thorax): missing slices: gap of 7.5 mm between positions 100.0 and "
        "107.5 mm (expected 2.5 mm)"
    )
    mixed = summary("1.2.3.5", problems=("mixed image sizes in one series (512x512, 256x256)",))
    assert "mixed image sizes" in select_series([mixed]).reason


def test_best_candidate_reason_when_nothing_qualifies():
    scout = summary("1.2.3.1", n_frames=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    series_description="SCOUT")
    thick = summary("1.2.3.5", slice_thickness=8.0)
    selection = select_series([scout, thick])
    assert selection.chosen is None
    assert selection.reason == (
        "series 5 (Thorax): slice thickness 8.0 mm > 5.0 mm (and 1 other series skipped)"
    )
    assert len(selection.skipped) == 2


def test_every_reason_is_one_line():
    cases = [
        summary("1.2.3.1", n_frames=1, series_description="line one\nline two"),
        summary("1.2.3.2", slice_thickness=8.0),
        summary("1.2.3.3", iop=CORONAL, orientation=Orientation.CORONAL, axial_deviation_deg=90.0),
        summary("1.2.3.4", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        summary("1.2.3.5", modality="MR"),
        summary("1.2.3.6", n_frames=5),
    ]
    selection = select_series(cases)
    assert len(selection.skipped) == len(cases)
    for _, reason in selection.skipped:
        assert "\n" not in reason and reason.strip() == reason
    assert "\n" not in selection.reason


def test_empty_input():
    selection = select_series([])
    assert selection.chosen is None and selection.reason == "no series"


@pytest.mark.parametrize(
    "field, value",
    [("min_slices", 0), ("max_thickness_mm", -1.0), ("max_axial_deviation_deg", 90.0),
     ("modalities", ()), ("sop_classes", ("not-a-uid",)), ("unknown_field", 1)],
)
def test_policy_errors_name_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        SelectionPolicy(**{field: value})
    assert field in str(info.value)


def test_policy_is_validated_as_a_whole():
    with pytest.raises(ValidationError, match="max_spacing_deviation"):
        SelectionPolicy(gap_factor=1.1, max_spacing_deviation=0.3)


def test_policy_rejects_wrong_type():
    with pytest.raises(TypeError, match="policy"):
        select_series([summary()], policy={"min_slices": 3})  # type: ignore[arg-type]
