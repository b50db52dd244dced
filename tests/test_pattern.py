"""The opacity-pattern features and the three-class case model (pipeline/pattern.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ct_ai_node.pipeline.pattern import (
    CONSOLIDATION_HU,
    FEATURES,
    PatternModel,
    consolidation_mask,
    fit_pattern_model,
    pattern_features,
)
from ct_ai_node.pipeline.types import CASE_CLASSES, LEFT_LUNG, RIGHT_LUNG

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SPACING = (2.5, 1.0, 1.0)


def lungs() -> np.ndarray:
    """Two box lungs: z 5..34 (inferior -> superior), rows 10..53 (anterior -> posterior);
    columns 8..29 the right lung (patient right is image left), 34..55 the left."""
    lab = np.zeros((40, 64, 64), np.uint8)
    lab[5:35, 10:54, 8:30] = RIGHT_LUNG
    lab[5:35, 10:54, 34:56] = LEFT_LUNG
    return lab


def test_no_opacity_gives_zero_features_but_extent():
    lab = lungs()
    f = pattern_features(np.full(lab.shape, -850.0, np.float32), SPACING, AXIAL, lab, np.zeros(lab.shape, bool))
    assert set(f) == set(FEATURES)
    assert f["extent"] == pytest.approx(np.log10(0.01))
    assert all(f[k] == 0.0 for k in FEATURES if k != "extent")


def test_bilateral_peripheral_lower_posterior_ground_glass():
    lab = lungs()
    hu = np.full(lab.shape, -850.0, np.float32)
    inf = np.zeros(lab.shape, bool)
    inf[5:19, 48:54, 8:11] = True  # right: low, posterior, against the lateral pleura
    inf[5:19, 48:54, 53:56] = True  # left, the mirror image
    hu[inf] = -600.0
    f = pattern_features(hu, SPACING, AXIAL, lab, inf)
    assert f["bilateral"] == pytest.approx(0.5)
    assert f["lower"] == pytest.approx(1.0)
    assert f["posterior"] == pytest.approx(1.0)
    assert f["peripheral"] > 0.9
    assert f["consolidation"] == 0.0
    assert f["foci"] == pytest.approx(np.log1p(2))
    assert f["largest"] == pytest.approx(0.5, abs=0.05)


def test_one_sided_central_upper_anterior_consolidation():
    lab = lungs()
    hu = np.full(lab.shape, -850.0, np.float32)
    inf = np.zeros(lab.shape, bool)
    inf[26:34, 24:34, 15:24] = True  # right lung only, upper, anterior half, centre of the lung
    hu[inf] = 20.0
    f = pattern_features(hu, SPACING, AXIAL, lab, inf)
    assert f["bilateral"] == 0.0
    assert f["lower"] == 0.0
    assert f["posterior"] < 0.5
    assert f["peripheral"] < 0.5
    assert f["consolidation"] > 0.9  # the rim pixels average with the lung around
    assert f["largest"] == pytest.approx(1.0)


def test_flipped_slice_order_and_rows_keep_anatomical_meaning():
    """A volume whose z runs superior -> inferior and rows posterior -> anterior (normal
    and column direction reversed) gives the same lower/posterior shares."""
    lab = lungs()
    hu = np.full(lab.shape, -850.0, np.float32)
    inf = np.zeros(lab.shape, bool)
    inf[6:15, 46:54, 8:13] = True
    f = pattern_features(hu, SPACING, AXIAL, lab, inf)
    flipped = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # columns towards anterior: normal towards -z
    g = pattern_features(hu[::-1, ::-1], SPACING, flipped, lab[::-1, ::-1], inf[::-1, ::-1])
    assert g["lower"] == pytest.approx(f["lower"])
    assert g["posterior"] == pytest.approx(f["posterior"])


def test_consolidation_split_by_hu():
    hu = np.full((3, 20, 20), -850.0, np.float32)
    inf = np.zeros(hu.shape, bool)
    inf[1, 2:18, 2:18] = True
    hu[1, 2:18, 2:10] = -600.0  # ground glass
    hu[1, 2:18, 10:18] = 10.0  # consolidation
    cons = consolidation_mask(hu, inf)
    assert not cons[0].any() and not cons[2].any()
    assert cons[1, 5, 14] and not cons[1, 5, 5]
    assert not (cons & ~inf).any()
    assert -600.0 < CONSOLIDATION_HU < 10.0


def test_fit_separates_classes_and_round_trips():
    rng = np.random.default_rng(0)
    n = 60
    y = np.repeat(np.arange(3), n)
    X = rng.normal(size=(3 * n, len(FEATURES)))
    X[:, FEATURES.index("bilateral")] += np.where(y == 0, 2.0, 0.0)
    X[:, FEATURES.index("extent")] += np.where(y == 2, -3.0, 0.0)
    m = fit_pattern_model(X, y, l2=1.0)
    probs = np.array([[m.probabilities(dict(zip(FEATURES, x)))[c] for c in CASE_CLASSES] for x in X])
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == y).mean() > 0.85
    again = PatternModel.from_json(m.to_json())
    assert again == m
    # a model the fit did not see the classes of must not be trusted blindly: uniform at the mean
    flat = fit_pattern_model(X, y, l2=1e6)
    p = flat.probabilities(dict(zip(FEATURES, X.mean(axis=0))))
    assert max(p.values()) - min(p.values()) < 0.2


def test_slice_opacity_scores_half_at_the_slice_label_rule():
    from ct_ai_node.pipeline.pattern import SLICE_HALF_FRACTION, slice_opacity_scores

    lung = np.zeros((4, 100, 100), bool)
    lung[1:, 10:90, 10:90] = True  # 6400 mm² of lung per slice at 1 mm pixels
    inf = np.zeros(lung.shape, bool)
    h = int(SLICE_HALF_FRACTION * 6400)  # 32 px, below 40 mm²: the 40 mm² floor applies
    inf[2, 20, 20:60] = True  # 40 mm²
    inf[3, 20:40, 20:60] = True  # 800 mm²
    s = slice_opacity_scores(inf, lung, (2.5, 1.0, 1.0))
    assert s[0] == 0.0 and s[1] == 0.0  # no lung / no opacity
    assert s[2] == pytest.approx(0.5)
    assert s[3] == pytest.approx(800 / 840)
    assert h < 40
    # opacity outside the lungs does not count
    inf[1, 0:5, 0:5] = True
    assert slice_opacity_scores(inf, lung, (2.5, 1.0, 1.0))[1] == 0.0


def test_calibration_refits_from_stored_cases_and_leaves_out_too_little(tmp_path):
    """``ct-ai-node calibrate pattern --rows``: the shipped calibration cases refit into a
    copy of the bundled weights; COVID-19-like cases under 1 % involvement are left out
    of the fit; the segmenter then carries the new case model."""
    import shutil
    from pathlib import Path

    from ct_ai_node.models.weights import BUNDLED_WEIGHTS
    from ct_ai_node.pipeline.infection import create_infection_segmenter
    from ct_ai_node.training.calibrate_pattern import MIN_COVID_INVOLVEMENT, calibrate_pattern

    rows_file = Path(__file__).resolve().parents[1] / "docs" / "evaluation" / "pattern_calibration_cases.json"
    weights = tmp_path / "weights"
    shutil.copytree(BUNDLED_WEIGHTS, weights)
    out = calibrate_pattern(rows_file=rows_file, weights_dir=weights, out_dir=tmp_path / "out", log=lambda m: None)
    report = out["report"]
    import json

    rows = json.loads((tmp_path / "out" / "pattern_calibration_cases.json").read_text())
    small = [r for r in rows if r["class"] == "covid_like" and r["lesion_ml_true"] < MIN_COVID_INVOLVEMENT * r["lung_ml"]]
    assert report["left_out"] == len(small) > 0
    assert all("left_out" in r and "cv_probabilities" not in r for r in small)
    assert report["n"] == len(rows) - len(small)
    seg = create_infection_segmenter("cpu", weights)
    assert seg.case_model is not None and seg.case_model.weights == tuple(tuple(w) for w in report["weights"])
    # bilateral, lower-zone ground glass reads COVID-19-like; one-sided consolidation other pneumonia
    typical = {"extent": 1.0, "bilateral": 0.45, "peripheral": 0.6, "lower": 0.8, "posterior": 0.7,
               "consolidation": 0.05, "foci": 2.5, "largest": 0.4}
    lobar = {"extent": 1.0, "bilateral": 0.0, "peripheral": 0.3, "lower": 0.6, "posterior": 0.5,
             "consolidation": 0.8, "foci": 0.7, "largest": 0.95}
    assert max(seg.case_model.probabilities(typical).items(), key=lambda kv: kv[1])[0] == "covid_like"
    assert max(seg.case_model.probabilities(lobar).items(), key=lambda kv: kv[1])[0] == "other_pneumonia"


def test_segmentation_summary_per_source_and_kind():
    from ct_ai_node.training.calibrate_pattern import segmentation_summary

    rows = [
        {"source": "phantom", "kind": "covid", "lesion_dice": 0.8, "lesion_ml_true": 10.0, "lesion_ml_pred": 12.0},
        {"source": "phantom", "kind": "covid", "lesion_dice": 0.6, "lesion_ml_true": 20.0, "lesion_ml_pred": 10.0},
        {"source": "phantom", "kind": "normal", "lesion_dice": None, "lesion_ml_true": 0.0, "lesion_ml_pred": 3.5},
        {"source": "real background", "kind": "cap", "lesion_dice": 0.5, "lesion_ml_true": 100.0,
         "lesion_ml_pred": 50.0},
    ]
    s = segmentation_summary(rows)
    assert s["phantom covid lesion dice mean"] == pytest.approx(0.7)
    assert s["phantom covid volume error pct mean abs"] == pytest.approx(35.0)  # (20 % + 50 %) / 2
    assert s["phantom normal opacity ml"] == [3.5]
    assert s["real background cap lesion dice mean"] == pytest.approx(0.5)
    assert "phantom cap lesion dice mean" not in s


def test_lung_box_holds_every_lung_voxel_with_a_margin_on_the_coarse_phase():
    from ct_ai_node.pipeline.pattern import _lung_box

    lung = np.zeros((12, 60, 70), bool)
    lung[3:9, 17:40, 23:51] = True
    box = _lung_box(lung, 3, 4)
    assert lung[box].sum() == lung.sum()
    zs, ys, xs = box
    assert (zs.start, zs.stop) == (3, 9)
    assert ys.start % 3 == 0 and xs.start % 4 == 0  # the coarse grid samples the same pixels
    assert not lung[box][:, 0].any() and not lung[box][:, -1].any()  # lung never touches the box's edge
    assert not lung[box][:, :, 0].any() and not lung[box][:, :, -1].any()
    assert _lung_box(np.zeros((2, 5, 5), bool), 1, 1) is None
