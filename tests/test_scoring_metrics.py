"""Pure scoring and evaluation metrics on hand-made cases with known answers."""

import math

import numpy as np
import pytest

from ct_ai_node.pipeline import scoring
from ct_ai_node.training.metrics import confusion, dice, heat_in_lesion_fraction, pointing_game_hit, roc_auc


def test_roc_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # one inversion out of four pairs
    assert roc_auc([0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9]) == pytest.approx(0.75)
    # ties count one half
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_confusion_known_values():
    c = confusion([1, 1, 1, 0, 0], [1, 1, 0, 0, 1])
    assert (c["tp"], c["fn"], c["tn"], c["fp"]) == (2, 1, 1, 1)
    assert c["sensitivity"] == pytest.approx(2 / 3)
    assert c["specificity"] == pytest.approx(1 / 2)
    assert c["f1"] == pytest.approx(4 / 6)


def test_dice_and_localisation():
    a = np.zeros((4, 4), bool); a[:2] = True
    b = np.zeros((4, 4), bool); b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    heat = np.zeros((10, 10)); heat[7, 7] = 1.0; heat[2, 2] = 0.5
    lesion = np.zeros((10, 10), bool); lesion[6:9, 6:9] = True
    assert pointing_game_hit(heat, lesion)
    assert not pointing_game_hit(heat, np.roll(lesion, -5, axis=0))
    assert heat_in_lesion_fraction(heat, lesion) == pytest.approx(1 / 1.5)


def test_case_decision_ratio_and_probability():
    d = scoring.CaseDecision(slice_threshold=0.5, ratio_threshold=0.2, slope=20)
    scores = np.array([0.9, 0.1, 0.7, 0.2, 0.0, 0.99])
    lung = np.array([0, 1, 2, 3])  # slice 5 has no lung: never counted
    assert list(d.positive_slices(scores, lung)) == [0, 2]
    assert d.ratio(scores, lung) == pytest.approx(0.5)
    assert d.probability(0.2) == pytest.approx(0.5)
    assert d.probability(0.5) > 0.99 and d.probability(0.0) < 0.02
    assert d.is_positive(0.5) and not d.is_positive(0.2)
    assert d.ratio(scores, np.array([], int)) == 0.0


def test_volumes_and_corona_score():
    spacing = (2.0, 0.5, 0.5)  # 0.5 mm³ per voxel
    mask = np.zeros((3, 10, 10), bool); mask[1, :4, :5] = True  # 20 voxels = 10 mm³
    assert scoring.volume_ml(mask, spacing) == pytest.approx(0.01)
    assert scoring.involvement_percent(5.0, 200.0) == pytest.approx(2.5)
    assert scoring.involvement_percent(5.0, 0.0) == 0.0
    heat = np.zeros((3, 10, 10), np.float32); heat[1] = 0.5; heat[2] = 1.0
    # only positive slices count: slice 1 -> 100 voxels * 0.5 * 0.5 mm³ = 25 mm³
    assert scoring.corona_score_ml(heat, [1], spacing) == pytest.approx(0.025)
    assert scoring.corona_score_ml(heat, [], spacing) == 0.0


def test_infection_mask_stays_in_lung_and_above_ground_glass_density():
    hu = np.full((8, 32, 32), -850.0, np.float32)
    hu[3:5, 10:20, 10:20] = -500.0
    lung = np.zeros(hu.shape, bool); lung[:, 4:28, 4:28] = True
    heat = np.zeros(hu.shape, np.float32); heat[2:6, 6:24, 6:24] = 1.0
    m = scoring.infection_mask_from_heatmap(heat, lung, hu, (2.0, 1.0, 1.0), threshold=0.5, sigma_mm=1.0, min_component_ml=0)
    assert m.any()
    assert not (m & ~lung).any()
    assert (hu[m] >= -750).all()
    assert m[3:5, 10:20, 10:20].mean() > 0.9


def test_top_slices_best_first():
    assert scoring.top_slices(np.array([0.1, 0.9, 0.5, 0.7]), np.array([0, 2, 3]), 2) == [3, 2]
    assert scoring.top_slices(np.array([0.1]), np.array([], int), 3) == []


def test_strided_indices_keep_run_ends_and_fill_between_interpolates():
    from ct_ai_node.pipeline.geometry import fill_between, strided_indices

    idx = np.array([2, 3, 4, 5, 6, 7, 8, 20, 21, 30])
    chosen = strided_indices(idx, 3)
    # every run keeps both ends; nothing is chosen outside idx
    for end in (2, 8, 20, 21, 30):
        assert end in chosen
    assert set(chosen) <= set(idx)
    maps = {int(z): np.full((2, 2), float(z)) for z in chosen}
    filled = fill_between(maps, idx)
    assert set(filled) == set(idx.tolist())
    for z in idx:
        assert filled[int(z)][0, 0] == pytest.approx(float(z))  # linear in z
    assert list(strided_indices(idx, 1)) == list(idx)


def test_disk_dilation_matches_scipy():
    from scipy import ndimage as ndi

    from ct_ai_node.pipeline.geometry import dilate_slices

    rng = np.random.default_rng(0)
    mask = rng.random((3, 40, 50)) > 0.97
    for r in (1, 3, 6):
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disk = (yy * yy + xx * xx) <= r * r
        expected = ndi.binary_dilation(mask, structure=disk[None])
        assert np.array_equal(dilate_slices(mask, r), expected)


def test_fill_holes_per_slice_matches_scipy():
    from scipy import ndimage as ndi

    from ct_ai_node.pipeline.lungs import _fill_holes_per_slice

    rng = np.random.default_rng(1)
    mask = ndi.binary_dilation(rng.random((5, 60, 70)) > 0.9, iterations=2)
    expected = np.stack([ndi.binary_fill_holes(s) for s in mask])
    assert np.array_equal(_fill_holes_per_slice(mask), expected)
