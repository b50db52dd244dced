"""Issue 16: per-lobe involvement, the CT severity score (Pan et al. 2020) and the
CO-RADS / RSNA category suggestion. Pure logic, exact inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ct_ai_node.pipeline.category import suggest_category
from ct_ai_node.pipeline.severity import ct_severity_score, lobe_involvement, lobe_severity
from ct_ai_node.pipeline.types import LOBES, LobeInvolvement


@pytest.mark.parametrize("percent,grade", [
    (0.0, 0), (0.001, 1), (4.999, 1), (5.0, 2), (25.0, 2), (25.001, 3), (50.0, 3), (50.5, 4), (75.0, 4),
    (75.001, 5), (100.0, 5),
])
def test_lobe_grade_boundaries(percent, grade):
    assert lobe_severity(percent) == grade


def test_a_speck_of_opacity_grades_zero():
    assert lobe_severity(3.0, opacity_ml=0.99) == 0 and lobe_severity(3.0, opacity_ml=1.0) == 1
    assert lobe_severity(3.0) == 1  # no volume given: the share alone


@pytest.mark.parametrize("bad", [-0.1, 100.1, math.nan])
def test_lobe_grade_refuses_impossible_shares(bad):
    with pytest.raises(ValueError, match="involvement_percent"):
        lobe_severity(bad)


def test_lobe_involvement_counts_each_lobe_and_splits_ggo_from_consolidation():
    lobes = np.zeros((4, 10, 10), np.uint8)
    for i in range(5):  # lobe i+1 fills two rows: 4 x 2 x 10 = 80 voxels
        lobes[:, 2 * i: 2 * i + 2, :] = i + 1
    opacity = np.zeros(lobes.shape, bool)
    cons = np.zeros(lobes.shape, bool)
    opacity[:, 0:2, :1] = True  # right upper: 8 of 80 = 10 % -> grade 2
    opacity[:, 4:6, :] = True  # right lower: all -> grade 5
    cons[:, 4:6, :5] = True  # half of it consolidation
    cons[0, 9, 9] = True  # consolidation outside the opacity does not count
    opacity[0, 0, 5] = False
    opacity[0, 6, 0] = True  # left upper: one voxel, 1/80 = 1.25 %, but 0.5 ml: a speck, grade 0
    got = lobe_involvement(lobes, opacity, cons, (10.0, 10.0, 5.0))  # 0.5 ml voxels
    assert [g.name for g in got] == list(LOBES)
    rul, rml, rll, lul, lll = got
    assert rul.volume_ml == pytest.approx(40.0) and rul.involvement_percent == pytest.approx(10.0)
    assert rul.severity == 2 and rul.consolidation_ml == 0.0 and rul.ggo_ml == pytest.approx(4.0)
    assert rml.severity == 0 and rml.involvement_percent == 0.0
    assert rll.severity == 5 and rll.ggo_ml == pytest.approx(20.0) and rll.consolidation_ml == pytest.approx(20.0)
    assert lul.involvement_percent == pytest.approx(1.25) and lul.severity == 0
    assert ct_severity_score(got) == 7
    # a lobe the segmentation did not find: volume 0, grade 0
    lobes[lobes == 4] = 0
    assert lobe_involvement(lobes, opacity, None, (1, 1, 1))[3].volume_ml == 0.0
    with pytest.raises(ValueError, match="all 5 lobes"):
        ct_severity_score(got[:4])
    with pytest.raises(ValueError, match="shape"):
        lobe_involvement(lobes, opacity[:2], None, (1, 1, 1))


COVID = {"covid_like": 0.9, "other_pneumonia": 0.05, "no_pneumonia": 0.05}
CAP = {"covid_like": 0.1, "other_pneumonia": 0.8, "no_pneumonia": 0.1}


def features(**kw) -> dict[str, float]:
    base = {"extent": 1.0, "bilateral": 0.4, "peripheral": 0.7, "lower": 0.7, "posterior": 0.65,
            "consolidation": 0.2, "foci": math.log1p(6), "largest": 0.3}
    base.update(kw)
    return base


def lobe(name: str, ggo: float, cons: float = 0.0) -> LobeInvolvement:
    return LobeInvolvement(name, 500.0, ggo, cons, 100 * (ggo + cons) / 500.0, 1)


def test_no_opacity_is_negative():
    got = suggest_category("no_pneumonia", {}, features(), lesion_ml=0.4, involvement_percent=0.01)
    assert (got.co_rads, got.rsna) == (1, "negative") and "no relevant opacity" in got.features[0]


def test_typical_pattern_with_a_covid_like_result_is_co_rads_5():
    got = suggest_category("covid_like", COVID, features(), lesion_ml=300, involvement_percent=8)
    assert (got.co_rads, got.rsna) == (5, "typical")
    for said in ("bilateral", "peripheral predominant", "multifocal (6 foci)", "lower zones predominant",
                 "posterior predominant"):
        assert said in got.features
    # the same pattern while the three-class result says otherwise: 4, never 5
    assert suggest_category("other_pneumonia", CAP, features(), 300, 8).co_rads == 4
    assert suggest_category(None, {}, features(), 300, 8).co_rads == 4


def test_lobar_consolidation_is_atypical():
    lobes = [lobe("right_upper", 2), lobe("right_middle", 0), lobe("right_lower", 20, 160),
             lobe("left_upper", 0), lobe("left_lower", 0)]
    got = suggest_category("other_pneumonia", CAP, features(bilateral=0.0, consolidation=0.85, foci=math.log1p(2),
                                                             largest=0.6, peripheral=0.4), 182, 4, lobes)
    assert (got.co_rads, got.rsna) == (2, "atypical")
    assert "consolidation predominant (85 %)" in got.features and "one-sided" in got.features
    assert any("right lower lobe" in f for f in got.features)


def test_covid_like_short_of_one_typical_feature_is_co_rads_4():
    got = suggest_category("covid_like", COVID, features(bilateral=0.02), 120, 3)  # one-sided
    assert (got.co_rads, got.rsna) == (4, "indeterminate")


def test_unifocal_central_ground_glass_is_indeterminate():
    got = suggest_category("covid_like", COVID, features(bilateral=0.0, peripheral=0.2, foci=math.log1p(1),
                                                         largest=1.0), 15, 0.4)
    assert (got.co_rads, got.rsna) == (3, "indeterminate")
