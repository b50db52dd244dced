"""Realism measures (ct_ai_node.synthetic.realism) on arrays with known answers: noise
SD and NPS of known noise, calibre of vessels of known radius, vessel fraction by depth,
dependent density of a known gradient, the pleura left out of the lung histogram; and
on a phantom, the generator's own noise SD and NPS peak recovered."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ct_ai_node.synthetic import generate_phantom
from ct_ai_node.synthetic import realism as R

RNG = np.random.default_rng(12)


def coloured_noise(shape, peak_cyc_px: float, rng) -> np.ndarray:
    """Unit-SD noise with NPS ~ f exp(-(f/fc)^2), fc = peak sqrt(2): its peak is at
    ``peak_cyc_px`` cycles per pixel (an FBP-like ramp times an apodisation window)."""
    *lead, ny, nx = shape
    f = np.hypot(np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :])
    amp = np.sqrt(f * np.exp(-((f / (peak_cyc_px * math.sqrt(2))) ** 2)))
    out = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * amp, s=(ny, nx))
    return out / out.std()


def body_phantom(noise: np.ndarray, sd: float) -> np.ndarray:
    """Slices of a 40 HU ellipse in air, ``noise`` x ``sd`` added inside the body."""
    nz, ny, nx = noise.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    body = ((yy - ny / 2) / (0.42 * ny)) ** 2 + ((xx - nx / 2) / (0.46 * nx)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0)[None] + noise * sd * body[None]
    return hu


# ----------------------------------------------------------------------------- noise


def test_white_noise_sd_and_flat_nps():
    px, sd = 0.7, 20.0
    hu = body_phantom(RNG.standard_normal((6, 256, 256)), sd)
    out = R.noise_measures(hu, (2.5, px, px), np.arange(6))
    assert out["sd_global_hu"] == pytest.approx(sd, rel=0.05)
    assert out["sd_roi_hu"] == pytest.approx(sd, rel=0.05)
    assert out["n_rois"] >= 20
    prof = np.array(out["nps"]["nps_normalised"])
    # flat: no band of frequencies favoured (the first ring, ~0.4 lp/cm, is part of
    # what the quadratic surface removes)
    assert prof[1:].min() > 0.85 and prof[0] > 0.4, prof
    # half of the 2-D energy of a flat spectrum lies inside f_nyquist / sqrt(2)
    assert out["nps"]["f50_lpcm"] == pytest.approx(out["nps"]["nyquist_lpcm"] / math.sqrt(2), rel=0.08)


def test_nps_level_integrates_to_the_variance():
    px, sd, n = 0.5, 15.0, 32
    rois = [R.detrend(r) for r in RNG.standard_normal((200, n, n)) * sd]
    f, nps = R.nps_radial(rois, px)
    # white noise: NPS = sd^2 px^2 at every frequency
    assert np.mean(nps) == pytest.approx(sd * sd * px * px, rel=0.06)
    assert f[-1] == pytest.approx(10.0 / (2 * px))  # Nyquist in lp/cm


@pytest.mark.parametrize("peak", [0.12, 0.3])
def test_nps_peak_of_coloured_noise(peak):
    px = 0.7
    hu = body_phantom(coloured_noise((6, 256, 256), peak, RNG), 30.0)
    out = R.noise_measures(hu, (2.5, px, px), np.arange(6))
    ring = 10.0 / out["roi_mm"]  # width of one frequency ring, lp/cm
    assert out["nps"]["peak_lpcm"] == pytest.approx(peak / px * 10.0, abs=1.01 * ring)
    assert out["sd_roi_hu"] == pytest.approx(30.0, rel=0.1)
    assert out["nps"]["f50_lpcm"] < out["nps"]["nyquist_lpcm"] / math.sqrt(2)


def test_phantom_noise_recovered():
    """On a phantom (anatomy, soft tissue, lungs) the measures return the generator's
    own noise SD and NPS peak: what the real-scan numbers are read against."""
    ph = generate_phantom(1002, "normal", (0, 512, 512), (8.0, 0.65, 0.65))
    zs = R.lung_slices(ph.lung_labels > 0, 10)
    out = R.noise_measures(ph.hu, ph.spacing, zs)
    assert out["sd_global_hu"] == pytest.approx(ph.params["noise_sd"], rel=0.1)
    assert out["sd_roi_hu"] == pytest.approx(ph.params["noise_sd"], rel=0.1)
    nominal = R._nominal_peak_lpcm(ph.params, ph.spacing[2])
    assert out["nps"]["peak_lpcm"] == pytest.approx(nominal, abs=1.01 * 10.0 / out["roi_mm"])


# ----------------------------------------------------------------------------- vessels


@pytest.mark.parametrize("radius_mm", [1.0, 2.5])
def test_ridge_calibre_of_disc_and_strip(radius_mm):
    px = 0.25
    yy, xx = np.mgrid[0:200, 0:200] * px
    disc = np.hypot(yy - 25, xx - 25) <= radius_mm
    _, d = R.ridge_diameters(disc, px)
    assert d.mean() == pytest.approx(2 * radius_mm, abs=px)
    strip = (np.abs(yy - 25) <= radius_mm) & (xx > 5) & (xx < 45)
    _, d = R.ridge_diameters(strip, px)
    assert np.median(d) == pytest.approx(2 * radius_mm, abs=px)


def lung_box(nz=24, n=240, dz=5.0, px=0.5, margin=20, zmargin=2):
    lung = np.zeros((nz, n, n), bool)
    lung[zmargin:nz - zmargin, margin:n - margin, margin:n - margin] = True
    return lung, (dz, px, px)


def test_depth_and_trusted_mask():
    lung, sp = lung_box()
    depth, trusted = R.lung_depth_mm(lung, sp)
    # a voxel 10 pixels inside the box's side, mid-z: 10 px (centre to centre) + 1 px
    assert depth[12, 120, 30] == pytest.approx(11 * sp[1])
    assert trusted[lung].all()
    # the same lung cut by the field of view: its edge voxels cannot know their depth
    cut = lung.copy()
    cut[:, :, :20] = cut[:, :, 20:21]
    depth, trusted = R.lung_depth_mm(cut, sp)
    assert not trusted[12, 120, 0] and trusted[12, 120, 120]


@pytest.mark.parametrize("radius_mm", [1.0, 2.5])
def test_vessels_by_depth_fraction_and_calibre(radius_mm):
    lung, sp = lung_box(nz=40)
    hu = np.where(lung, -850.0, 0.0)
    yy, xx = np.mgrid[0:240, 0:240] * sp[1]
    centre = 60.0  # mm: the box's centre, 50 mm from its sides
    vessel = np.hypot(yy - centre, xx - centre) <= radius_mm
    hu[:, vessel] = 40.0
    depth, trusted = R.lung_depth_mm(lung, sp)
    zs = np.arange(12, 28)  # > 50 mm from the box's ends in z: depth set in-plane
    bins = R.vessels_by_depth(hu, lung, depth, trusted, sp, zs)
    assert [b["depth_mm"] for b in bins] == ["0-10", "10-20", "20-40", ">40"]
    # the vessel is deeper than 40 mm: nothing above -500 HU nearer the pleura
    assert all(b["fraction_above_minus500"] == 0 for b in bins[:3])
    assert bins[3]["fraction_above_minus500"] * bins[3]["n_voxels"] == pytest.approx(vessel.sum() * len(zs), rel=1e-3)
    assert bins[3]["calibre_mm"] == pytest.approx(2 * radius_mm, abs=sp[1])


# ----------------------------------------------------------------------------- HU and gravity


@pytest.mark.parametrize("gradient", [0.0, 1.0, -0.5])
def test_dependent_density_of_known_gradient(gradient):
    lung, sp = lung_box(nz=6, zmargin=1)
    ys = np.arange(240)[:, None] * sp[1]
    hu = np.where(lung, -900.0 + gradient * ys, 0.0)
    out = R.dependent_density(hu, lung, np.arange(1, 5))
    extent = 200 * sp[1]
    # thirds centred at 1/6 and 5/6 of the extent: 2/3 of the extent apart
    assert out["posterior_minus_anterior_hu"] == pytest.approx(2 / 3 * gradient * extent, abs=0.5)


def test_lung_histogram_leaves_the_pleura_out():
    lung, sp = lung_box(nz=10, zmargin=1)
    hu = np.where(lung, RNG.normal(-850, 30, lung.shape), 0.0)
    # a 2 mm bright rim inside the lung mask (pleura and partial volume)
    depth, _ = R.lung_depth_mm(lung, sp)
    hu[lung & (depth <= 2.0)] = -300.0
    out = R.measure(hu, sp, lung.astype(np.uint8), n_slices=8)["hu"]
    assert out["p50"] == pytest.approx(-850, abs=3)
    assert out["p95"] == pytest.approx(-850 + 1.645 * 30, abs=5)  # -300 would be here without erosion
    assert out["mode_parenchyma"] == pytest.approx(-850, abs=6)


# ----------------------------------------------------------------------------- comparison and report


def scan(name, value, source="real", spacing=(2.5, 0.7, 0.7), family=None):
    return {"name": name, "source": source, "spacing_mm": list(spacing), "shape": [10, 512, 512],
            "kernel_family": family, "hu": {"p50": value}}


def test_gaps_match_geometry_and_rank():
    real = [scan("r1", -880.0)]
    ph = [scan("p1", -830.0, "phantom"), scan("p2", -860.0, "phantom"),
          scan("p3", -880.0, "phantom", spacing=(8.0, 0.65, 0.65))]  # other geometry: not compared
    g = next(x for x in R.gaps(real, ph) if x["metric"] == "hu.p50")
    row = g["per_scan"][0]
    assert row["phantom_mean"] == pytest.approx(-845.0)
    assert row["z"] == pytest.approx(-35.0 / 15.0, abs=0.01)  # phantoms' SD 15 HU
    assert g["outside_phantom_range"] == 1 and g["real_above"] == 0


def test_noise_gap_read_against_the_generator_range():
    real = [scan("r1", -880.0, family="sharp")]
    real[0]["noise"] = {"sd_global_hu": 40.0}
    real[0]["generator_noise_sd_hu"] = {"n": 50, "mean": 25.0, "sd": 5.0, "min": 15.0, "max": 38.0}
    ph = [dict(scan("p1", -830.0, "phantom", family="sharp"), noise={"sd_global_hu": 39.5})]
    g = next(x for x in R.gaps(real, ph) if x["metric"] == "noise.sd_global_hu")
    assert g["per_scan"][0]["z"] == pytest.approx(3.0) and g["outside_phantom_range"] == 1


def test_phantom_plan_covers_geometries_and_kernel_families():
    real = [{"spacing_mm": [8.0, 0.65, 0.65], "shape": [30, 512, 512]},
            {"spacing_mm": [1.5, 1.5, 1.5], "shape": [160, 126, 120]}]
    plan = R.phantom_plan(real, 5)
    assert [p["spacing"][0] for p in plan] == [8.0, 1.5, 8.0, 1.5, 8.0]
    assert [p["family"] for p in plan] == ["soft", "soft", "medium", "medium", "sharp"]
    assert [p["shape"][1] for p in plan] == [512, 256, 512, 256, 512]
    seeds = [p["seed"] for p in plan]
    assert len(set(seeds)) == 5 and min(seeds) >= 1000
    for p in plan:  # the family the plan names is the one the generator draws
        assert R._probe(p["seed"], p["spacing"][0], p["spacing"][2])["kernel_family"] == p["family"]
    r = R.generator_noise_sd((8.0, 0.65, 0.65), 512, "sharp", range(1000, 1060))
    s = R.generator_noise_sd((8.0, 0.65, 0.65), 512, "soft", range(1000, 1060))
    assert r["n"] + s["n"] < 60 and r["mean"] > 1.8 * s["mean"]  # sharp kernels are noisier


def test_outputs_keep_the_text_around_the_table(tmp_path):
    s = R.measure(*_tiny_scan())
    s.update(name="t", source="real", kernel="STANDARD", kernel_family="soft")
    result = {"scans": [s], "gaps": []}
    md = tmp_path / "realism.md"
    md.write_text(f"# title\n\nbefore\n\n{R.BEGIN}\nold table\n{R.END}\n\nafter: the largest gaps\n")
    R.write_outputs(result, tmp_path)
    text = md.read_text()
    assert "before" in text and "after: the largest gaps" in text and "old table" not in text
    assert "| t | STANDARD (soft) |" in text
    assert (tmp_path / "realism.json").exists()


def _tiny_scan():
    lung, sp = lung_box(nz=6, n=120, zmargin=1, margin=10)
    hu = np.where(lung, RNG.normal(-850, 20, lung.shape), 40.0)
    return hu, sp, lung.astype(np.uint8), 4


@pytest.mark.parametrize("seed0", ["50", "50000", "90000"])
def test_cli_refuses_seeds_outside_training(tmp_path, seed0, capsys):
    with pytest.raises(SystemExit):
        R.main(["--out", str(tmp_path), "--real", str(tmp_path), "--seed0", seed0])
    assert "training seeds" in capsys.readouterr().err
