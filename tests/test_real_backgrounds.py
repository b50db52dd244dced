"""Synthetic lesions blended into real lungs (training/real_backgrounds.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ct_ai_node.training.real_backgrounds import (
    AIRWAY_HU,
    Background,
    background_cases,
    blend,
    discover_backgrounds,
    is_held_out,
    parenchyma_noise,
)
from helpers_dicom import REAL_DATA


def fake_chest(seed: int = 0):
    """A box chest in the training layout: body, two lungs with noisy parenchyma, a few
    bright vessels, an airway; spacing 2.5 x 1 x 1 mm."""
    rng = np.random.default_rng(seed)
    hu = np.full((48, 160, 160), -1000.0, np.float32)
    hu[:, 10:150, 10:150] = 40.0  # body
    lab = np.zeros(hu.shape, np.uint8)
    lab[4:44, 30:130, 20:75] = 1
    lab[4:44, 30:130, 85:140] = 2
    lung = lab > 0
    hu[lung] = -860.0 + rng.normal(0, 15, int(lung.sum()))
    hu[:, 60:62, 30:70] = 30.0  # a vessel running through the right lung
    hu[:, 80:83, 100:103] = -1000.0  # an airway in the left lung
    return hu, lab


@pytest.mark.parametrize("kind", ["covid", "cap"])
def test_blend_inserts_a_lesion_inside_the_lungs_only(kind):
    hu, lab = fake_chest()
    out, lesion = blend(hu, lab, (2.5, 1.0, 1.0), kind, np.random.default_rng(3), noise_sd=15.0)
    lung = lab > 0
    assert lesion.any() and not (lesion & ~lung).any()
    # nothing changes outside the lungs
    np.testing.assert_array_equal(out[~lung], np.clip(np.rint(hu[~lung]), -1024, 3071).astype(np.int16))
    # the lesion is denser than the lung it replaced, and lung away from it is untouched
    assert np.median(out[lesion]) > np.median(hu[lesion]) + 150
    far = lung & ~lesion
    changed = np.abs(out.astype(np.float32) - np.rint(hu)) > 1
    assert changed[far].mean() < 0.2
    if kind == "cap":
        assert np.median(out[lesion]) > -300  # consolidation
    else:
        assert np.median(out[lesion]) < -200  # ground glass (consolidation cores at most)


def test_blend_keeps_vessels_noise_and_airways():
    hu, lab = fake_chest()
    out, lesion = blend(hu, lab, (2.5, 1.0, 1.0), "cap", np.random.default_rng(5), noise_sd=15.0)
    # where the consolidation covers the airway, its lumen stays air (air bronchogram)
    airway = np.zeros(hu.shape, bool)
    airway[:, 81, 101] = True
    covered = airway & lesion
    if covered.any():
        assert np.median(out[covered]) < AIRWAY_HU + 150
    out2, les2 = blend(hu, lab, (2.5, 1.0, 1.0), "covid", np.random.default_rng(7), noise_sd=15.0)
    vessel = np.zeros(hu.shape, bool)
    vessel[:, 60:62, 30:70] = True
    if (vessel & les2).any():  # ground glass never darkens a vessel
        assert (out2[vessel & les2] >= np.rint(hu[vessel & les2]) - 1).all()
    # ground glass keeps the voxel noise: the lesion is not flat
    assert out2[les2].std() > 10


def test_same_draw_same_case_other_draw_other_case():
    hu, lab = fake_chest()
    a = blend(hu, lab, (2.5, 1.0, 1.0), "covid", np.random.default_rng(11), 15.0)
    b = blend(hu, lab, (2.5, 1.0, 1.0), "covid", np.random.default_rng(11), 15.0)
    c = blend(hu, lab, (2.5, 1.0, 1.0), "covid", np.random.default_rng(12), 15.0)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_parenchyma_noise_measures_the_noise():
    hu, lab = fake_chest()
    assert parenchyma_noise(hu, lab > 0) == pytest.approx(15.0, rel=0.2)


def test_discovery_held_out_and_case_ids(tmp_path):
    series = tmp_path / "coll_a" / "study" / "series1"
    series.mkdir(parents=True)
    for i in range(25):
        (series / f"{i}.dcm").write_bytes(b"x")
    few = tmp_path / "coll_b"
    few.mkdir()
    for i in range(3):
        (few / f"{i}.dcm").write_bytes(b"x")
    (tmp_path / "coll_c").mkdir()
    (tmp_path / "coll_c" / "chest.nii.gz").write_bytes(b"x")
    found = discover_backgrounds(tmp_path)
    assert [b.name for b in found] == ["coll_a/study/series1", "coll_c/chest.nii.gz"]
    assert is_held_out(found[0], ("coll_a",)) and not is_held_out(found[0], ("coll",))
    assert is_held_out(found[1], ("coll_c/chest.nii.gz",))
    cases = background_cases(found, {"covid": 2, "cap": 1, "normal": 1})
    val = background_cases(found, {"covid": 2, "cap": 1, "normal": 1}, first_draw=1000)
    ids = [c.id for c in cases + val]
    assert len(set(ids)) == len(ids) and max(ids) < 0
    assert len({c.scan for c in cases + val}) == len(ids)  # cache keys differ per insertion


@pytest.mark.skipif(not (REAL_DATA / "totalsegmentator_testfiles").is_dir(),
                    reason=f"real CT samples not found at {REAL_DATA}")
def test_a_real_scan_gets_a_lesion_in_its_lungs():
    path = REAL_DATA / "totalsegmentator_testfiles" / "pulmonary_report_ct_cropped_chestCTA_1p5mm.nii.gz"
    case = background_cases([Background(path.name, str(path))], {"covid": 1})[0]
    scan = case.load()
    lung = scan.lung_labels > 0
    assert lung.sum() * np.prod(scan.spacing) / 1000 > 400
    assert scan.lesion_mask.any() and not (scan.lesion_mask & ~lung).any()
    assert -800 < np.median(scan.hu[scan.lesion_mask]) < 0
