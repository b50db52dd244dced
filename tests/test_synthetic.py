"""Synthetic chest-CT phantoms: determinism, anatomy conventions, lesion ground
truth, HU plausibility, and the DICOM series writer (geometry, order, dciodvfy)."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import lru_cache

import numpy as np
import pydicom
import pytest

from ct_ai_node.synthetic import Phantom, generate_phantom, write_case, write_dicom_series

SMALL = (28, 128, 128)


@lru_cache(maxsize=None)
def ph(seed: int, kind: str, shape=SMALL) -> Phantom:
    return generate_phantom(seed, kind=kind, shape=shape)


def test_api_types_and_shapes():
    p = ph(1, "covid")
    assert isinstance(p, Phantom)
    assert p.hu.dtype == np.int16 and p.hu.shape == SMALL
    assert p.lung_labels.dtype == np.uint8 and p.lung_labels.shape == SMALL
    assert p.lesion_mask.dtype == bool and p.lesion_mask.shape == SMALL
    assert len(p.spacing) == 3 and all(s > 0 for s in p.spacing)
    assert p.kind == "covid" and p.seed == 1
    json.dumps(p.params)  # JSON-serialisable
    assert set(np.unique(p.lung_labels)) <= {0, 1, 2}


def test_deterministic_per_seed():
    a = generate_phantom(7, shape=(16, 96, 96))
    b = generate_phantom(7, shape=(16, 96, 96))
    c = generate_phantom(8, shape=(16, 96, 96))
    assert a.kind == b.kind
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.lung_labels, b.lung_labels)
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert a.params == b.params
    assert not np.array_equal(a.hu, c.hu)


def test_kind_drawn_from_seed_covers_all_kinds():
    kinds = {generate_phantom(s, shape=(8, 64, 64)).kind for s in range(12)}
    assert kinds == {"covid", "cap", "normal"}


def test_right_lung_is_on_low_x_and_lungs_span_the_chest():
    p = ph(2, "normal")
    z, y, x = np.nonzero(p.lung_labels == 1)
    z2, y2, x2 = np.nonzero(p.lung_labels == 2)
    assert x.size > 1000 and x2.size > 1000
    nx = p.hu.shape[2]
    assert x.mean() < nx / 2 < x2.mean()
    # the lungs are in the upper part of the scan (bases above the first slice), z ascending to the head
    lung_z = np.nonzero(p.lung_labels.reshape(p.hu.shape[0], -1).any(1))[0]
    assert lung_z[0] > 0 and lung_z[-1] < p.hu.shape[0] - 1
    # apex is small, bases are large: area in the top lung slice < area near the bottom third
    area = (p.lung_labels > 0).reshape(p.hu.shape[0], -1).sum(1)
    assert area[lung_z[-1]] < area[lung_z[0] + (lung_z[-1] - lung_z[0]) // 3]
    # the liver sits under the right dome: soft tissue on the right at the lowest lung slices
    z0 = lung_z[0]
    assert np.median(p.hu[z0][:, : nx // 3][p.hu[z0][:, : nx // 3] > -500]) > 0


def test_lesion_masks_inside_lungs_and_by_kind():
    for seed in (3, 4):
        for kind in ("covid", "cap"):
            p = ph(seed, kind)
            assert p.lesion_mask.any(), (seed, kind)
            assert not (p.lesion_mask & (p.lung_labels == 0)).any()
        n = ph(seed, "normal")
        assert not n.lesion_mask.any()
        assert n.params["lesion_lung_ratio"] == 0


def test_covid_bilateral_posterior_and_lower_weighted():
    bilateral = 0
    post_shift = []
    low_shift = []
    for seed in range(10, 18):
        p = ph(seed, "covid")
        m = p.lesion_mask
        lr = [np.count_nonzero(m & (p.lung_labels == k)) for k in (1, 2)]
        bilateral += min(lr) > 0
        zl, yl, _ = np.nonzero(p.lung_labels > 0)
        zm, ym, _ = np.nonzero(m)
        post_shift.append(ym.mean() - yl.mean())  # y grows towards posterior
        low_shift.append(zm.mean() - zl.mean())  # z grows towards the head
    assert bilateral >= 6
    assert np.mean(post_shift) > 0
    assert np.mean(low_shift) < 0


def test_cap_mostly_unilateral():
    uni = 0
    for seed in range(20, 28):
        p = ph(seed, "cap")
        lr = [np.count_nonzero(p.lesion_mask & (p.lung_labels == k)) for k in (1, 2)]
        uni += max(lr) > 0.9 * sum(lr)
    assert uni >= 5


def test_hu_ranges_plausible():
    p = generate_phantom(31, kind="normal", shape=(40, 192, 192))
    lung = p.lung_labels > 0
    med = np.median(p.hu[lung])
    assert -900 <= med <= -780, med
    assert p.hu.min() >= -1024
    # air outside the patient
    assert np.median(p.hu[:, :6, :6]) < -950
    # bone somewhere (spine, ribs)
    assert np.percentile(p.hu, 99.9) > 300
    # GGO of a covid case without consolidation; consolidation of a CAP case
    for seed in range(40, 80):
        c = generate_phantom(seed, kind="covid", shape=SMALL)
        if not c.params["lesion"]["consolidation_fraction"] and c.lesion_mask.sum() > 200:
            ggo = np.median(c.hu[c.lesion_mask])
            assert -750 <= ggo <= -250, ggo
            break
    else:  # pragma: no cover
        pytest.fail("no covid seed without consolidation found")
    from scipy import ndimage as ndi

    for seed in (23, 25):  # consolidation core (the mask also holds a thin GGO rim)
        cap = ph(seed, "cap")
        core = ndi.binary_erosion(cap.lesion_mask, structure=np.ones((1, 3, 3), bool))
        assert np.median(cap.hu[core]) > -150


def test_shape_scaling_keeps_the_chest_in_view():
    p = generate_phantom(5, kind="normal", shape=(20, 64, 64), spacing=(10.0, 3.0, 3.0))
    assert p.spacing == (10.0, 3.0, 3.0)
    lung = p.lung_labels > 0
    # no lung on the image border
    assert not lung[:, 0, :].any() and not lung[:, -1, :].any()
    assert not lung[:, :, 0].any() and not lung[:, :, -1].any()


def _read_series(paths):
    dss = [pydicom.dcmread(p) for p in paths]
    return dss


def test_dicom_series_geometry_and_order(tmp_path):
    p = ph(3, "covid")
    hfs = write_dicom_series(p, tmp_path / "hfs", patient_name="Test^Phantom", patient_id="T-1")
    ffs = write_dicom_series(p, tmp_path / "ffs", feet_first=True)
    assert len(hfs) == len(ffs) == p.hu.shape[0]
    d_h = _read_series(hfs)
    d_f = _read_series(ffs)
    dz, dy, dx = p.spacing
    for dss, first_is_top in ((d_h, True), (d_f, False)):
        inst = [int(d.InstanceNumber) for d in dss]
        assert inst == list(range(1, len(dss) + 1))
        zs = np.array([float(d.ImagePositionPatient[2]) for d in dss])
        steps = np.diff(zs)
        assert np.allclose(np.abs(steps), dz, atol=1e-3)
        assert (steps < 0).all() if first_is_top else (steps > 0).all()
        d0 = dss[0]
        assert d0.Modality == "CT" and d0.SOPClassUID == pydicom.uid.CTImageStorage
        assert [float(v) for v in d0.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert np.allclose([float(v) for v in d0.PixelSpacing], [dy, dx], atol=1e-4)
        assert float(d0.RescaleIntercept) == -1024 and float(d0.RescaleSlope) == 1
        assert d0.PatientPosition == ("HFS" if first_is_top else "FFS")
        assert d0.BodyPartExamined == "CHEST"
        assert str(d0.file_meta.TransferSyntaxUID) == pydicom.uid.ExplicitVRLittleEndian
    assert str(d_h[0].PatientName) == "Test^Phantom" and d_h[0].PatientID == "T-1"
    # feet-first changes the order of acquisition, not the geometry or the pixels
    by_z_h = {round(float(d.ImagePositionPatient[2]), 3): d for d in d_h}
    by_z_f = {round(float(d.ImagePositionPatient[2]), 3): d for d in d_f}
    assert by_z_h.keys() == by_z_f.keys()
    zs_sorted = sorted(by_z_h)
    for iz, z in enumerate(zs_sorted):
        a = by_z_h[z].pixel_array.astype(np.int32) + int(by_z_h[z].RescaleIntercept)
        b = by_z_f[z].pixel_array.astype(np.int32) + int(by_z_f[z].RescaleIntercept)
        assert np.array_equal(a, b)
        # z index 0 of the phantom = most inferior = lowest z
        assert np.array_equal(a, np.clip(p.hu[iz], -1024, None).astype(np.int32))
    assert d_h[0].FrameOfReferenceUID == d_h[-1].FrameOfReferenceUID
    assert len({d.SOPInstanceUID for d in d_h}) == len(d_h)


def test_write_case_and_cli(tmp_path):
    from ct_ai_node.synthetic.__main__ import main

    p = ph(4, "cap")
    res = write_case(p, tmp_path / "case")
    assert (tmp_path / "case" / "truth.npz").exists() and (tmp_path / "case" / "truth.json").exists()
    t = np.load(tmp_path / "case" / "truth.npz")
    assert np.array_equal(t["lung_labels"], p.lung_labels)
    assert np.array_equal(t["lesion_mask"], p.lesion_mask)
    assert np.allclose(t["spacing"], p.spacing)
    info = json.loads((tmp_path / "case" / "truth.json").read_text())
    assert info["kind"] == "cap" and info["series_instance_uid"]
    assert all(f.parent.name == "dicom" for f in res["dicom"])
    assert main(["--out", str(tmp_path / "cli"), "--seed", "9", "--kind", "normal",
                 "--shape", "12", "64", "64", "--feet-first"]) == 0
    files = sorted((tmp_path / "cli" / "dicom").glob("*.dcm"))
    assert len(files) == 12
    assert pydicom.dcmread(files[0]).PatientPosition == "FFS"
    assert (tmp_path / "cli" / "truth.json").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not on PATH")
def test_dciodvfy_clean(tmp_path):
    for seed in (3, 7):  # signed 16-bit and unsigned 12-bit pixel representations
        p = ph(seed, "covid")
        files = write_dicom_series(p, tmp_path / f"s{seed}")
        for f in (files[0], files[len(files) // 2], files[-1]):
            out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
            text = out.stdout + out.stderr
            errors = [line for line in text.splitlines() if "Error" in line]
            assert not errors, "\n".join(errors)


def test_noise_stays_bounded_on_thin_slices():
    # thin slices get z-correlated noise; the air outside the patient must stay air
    p = generate_phantom(12, kind="normal", shape=(60, 96, 96), spacing=(0.8, 4.0, 4.0))
    corner = p.hu[:, :4, :4].astype(np.float32)
    assert corner.std() < 60 and np.median(corner) < -950


def test_sample_series_are_loadable_and_match_their_truth():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "sample_series"
    for name, n_min in (("covid_like", 1), ("normal", 0)):
        files = sorted((root / name).glob("*.dcm"))
        assert len(files) >= 20, name
        assert all(f.suffix == ".dcm" for f in (root / name).iterdir()), "DICOM only in the series folder"
        t = np.load(root / f"{name}_truth" / "truth.npz")
        assert t["lung_labels"].shape[0] == len(files)
        assert (t["lesion_mask"].sum() >= n_min) and (n_min or not t["lesion_mask"].any())
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert float(ds.SliceThickness) <= 5.0 and ds.Manufacturer == "ct-ai-node synthetic phantom"
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total <= 30 * 1024 * 1024


def test_mass_distractor_is_lobulated_solid_and_never_lesion():
    from ct_ai_node.synthetic.lesions import mass_slice

    mass = dict(z=0.0, y=0.0, x=0.0, r=10.0, hu=40.0, lobulation=0.2, phases=[0.0, 0.0, 0.0],
                spicules=[[0.0, 0.0, 1.0]], spicule_mm=[12.0], reach=25.0)
    X, Y = np.meshgrid(np.arange(-30, 30.5, 0.5), np.arange(-30, 30.5, 0.5))
    m = mass_slice(mass, X, Y, 0.0)
    radius = np.hypot(X, Y)
    assert m[radius < 7].all()  # the core is solid
    assert not m[(radius > 13) & (np.abs(Y) > 2)].any()  # nothing far out but the spicule
    assert m[(np.abs(Y) < 0.3) & (X > 14) & (X < 20)].all()  # the spicule along +x
    lobes = [m[(radius > 10.5) & (radius < 11.5) & (np.abs(np.arctan2(Y, X) - a) < 0.2)].mean()
             for a in np.linspace(-3, 3, 13)]
    assert max(lobes) - min(lobes) > 0.5  # lobulated, not a sphere
    # in a whole phantom (the same seed with and without it; nothing else changes): the mass
    # adds dense voxels inside the lungs' outline and takes voxels out of the lesion mask,
    # never into it
    import ct_ai_node.synthetic.phantom as P

    real = P.plan_mass
    made = {}
    try:
        for prob in (0.0, 1.0):
            P.plan_mass = lambda rng, c, prob=prob: real(rng, c, probability=prob)
            made[prob] = P.generate_phantom(3, kind="cap", shape=(40, 128, 128))
    finally:
        P.plan_mass = real
    without, with_mass = made[0.0], made[1.0]
    assert "mass" in with_mass.params["distractors"] and "mass" not in without.params["distractors"]
    assert np.array_equal(with_mass.lung_labels, without.lung_labels)
    dense = lambda q: int(((q.hu > -150) & (q.lung_labels > 0)).sum())  # noqa: E731
    assert dense(with_mass) > dense(without)
    assert not (with_mass.lesion_mask & ~without.lesion_mask).any()


def test_masses_reach_seventy_mm_and_two_in_five_lie_beside_the_hilum():
    from ct_ai_node.synthetic.lesions import CoarseLungs, plan_mass

    z, y, x = np.arange(0, 200, 5.0), np.arange(-80, 80, 5.0), np.arange(-150, 150, 5.0)
    label = np.zeros((z.size, y.size, x.size), np.uint8)
    label[:, :, np.abs(x) > 20] = 1  # two slabs of lung either side of a mediastinum
    c = CoarseLungs(z=z, y=y, x=x, label=label, lobe=label.copy(), step=5.0)
    masses = [plan_mass(np.random.default_rng(s), c, probability=1.0) for s in range(400)]
    r = np.array([m["r"] for m in masses])
    assert r.min() >= 5.0 and r.max() <= 35.0 and (r > 25).mean() > 0.1
    medial = np.mean([abs(m["x"]) <= 60 for m in masses])  # the medial third of |x| in 20..150
    assert 0.45 < medial < 0.75  # 0.4 placed there plus the share of uniform draws that land there


def test_stomach_food_is_mottled_soft_tissue_with_gas_bubbles_outside_the_lungs():
    import ct_ai_node.synthetic.phantom as P
    from ct_ai_node.synthetic.anatomy import draw_patient

    drawn = [P.draw_stomach_food(np.random.default_rng([s, 13]), draw_patient(np.random.default_rng(s))) is not None
             for s in range(40)]
    assert 12 < sum(drawn) < 36  # drawn for about three patients in five
    # the same seed with and without food: only the abdomen changes, the lungs and lesions not
    real = P.draw_stomach_food
    made = {}
    try:
        for prob in (0.0, 1.0):
            P.draw_stomach_food = lambda rng, p, prob=prob: real(rng, p, probability=prob)
            made[prob] = P.generate_phantom(6, kind="cap", shape=(48, 160, 160))  # 6: no gas cap
    finally:
        P.draw_stomach_food = real
    without, food = made[0.0], made[1.0]
    assert food.params["patient"]["stomach_food_bubbles"] >= 15
    assert without.params["patient"]["stomach_food_bubbles"] == 0
    assert np.array_equal(food.lung_labels, without.lung_labels)
    assert np.array_equal(food.lesion_mask, without.lesion_mask)
    changed = np.abs(food.hu.astype(int) - without.hu) > 30
    lung = food.lung_labels > 0
    assert changed.sum() > 200 and (changed & lung).sum() < 0.02 * changed.sum()
    # gas bubbles in soft tissue: new dark voxels with dense voxels next to them
    new_gas = changed & (food.hu < -500) & (without.hu > -200)
    assert new_gas.sum() > 20
