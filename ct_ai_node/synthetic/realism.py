"""How phantom lungs differ from real ones: measurements made the same way on both.

    python -m ct_ai_node.synthetic.realism --real ../shared/data/real --out docs/evaluation

writes ``realism.json`` (every number) and the generated table block of ``realism.md``
(text outside the block is kept). Real data are read from ``--real`` and never copied.

Per scan, on up to ``n_slices`` lung slices spread evenly over the lungs:

* **lung HU**: percentiles of every voxel in the lungs eroded by 3 mm (no pleura, no
  partial volume with the chest wall) and the mode of the parenchyma (values below
  -500 HU, 5 HU bins smoothed over 10 HU);
* **vessels by depth** from the pleura (distance to the nearest voxel outside the lung
  mask, in mm, 3-D): fraction of lung voxels above -500 HU and the calibre of those
  vessels, estimated in-plane as 2 x the mean distance transform on the ridge of the
  vessel mask (pixels whose distance is a 3x3 local maximum, a skeleton-like set)
  minus one pixel (the distance transform reaches the centre of the first outside
  pixel). Voxels whose depth could be cut by the edge of the volume (cropped scans)
  are left out. The 0-10 mm bin starts at 3 mm, like the histogram;
* **noise** in soft tissue: the global noise level (mode of the local SD in about 5 mm
  windows where the smoothed image lies in [-150, 150] HU) and, in the cleanest quarter
  of the square regions about 25 mm wide inside that tissue (quadratic surface removed),
  the SD and the radially averaged noise power spectrum, summarised as its peak
  frequency and the frequency below which half of the 2-D noise energy lies (lp/cm);
* **dependent density**: mean parenchymal HU (eroded lung, below -500 HU) in the
  posterior third of each slice's lung extent minus the anterior third.

Lungs are the node's lung U-Net's on both real scans and phantoms (like for like; the
classical method where the weights are absent); phantoms are also measured inside the
generator's own lungs. Phantoms: kind "normal", training seeds (1000 and up), on the
geometries of the real scans, soft, medium and sharp kernels. Each real scan's noise SD
is also read against the generator's draw for its geometry and kernel family over 200
training seeds. :func:`gaps` ranks the differences. On real scans the cleanest soft tissue
still holds anatomy at the lowest frequencies, so their NPS peak is reported, not ranked.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

PERCENTILES = (5, 25, 50, 75, 95)
ERODE_MM = 3.0
VESSEL_HU = -500.0
DEPTH_BINS_MM = (0.0, 10.0, 20.0, 40.0, math.inf)
SOFT_TISSUE_HU = (-150.0, 150.0)
NOISE_WINDOW_MM = 5.0
NPS_ROI_MM = 25.0
NPS_KEEP = 0.25
NPS_MIN_ROIS = 5
#: training seeds probed for the generator's noise range per geometry and kernel family
N_PROBE_SEEDS = 200
BINS = np.arange(-1050, 151, 50)
#: phantom kernel families of the real reconstruction kernels named in DICOM headers
KERNEL_FAMILY = {"STANDARD": "soft", "B30F": "soft", "B31F": "soft", "FC17": "soft", "B": "soft",
                 "B40F": "medium", "B41F": "medium", "FC51": "medium", "YB": "medium",
                 "B70F": "sharp", "B60F": "sharp", "LUNG": "sharp", "FC86": "sharp", "BONE": "sharp"}
FAMILIES = ("soft", "medium", "sharp")
#: training phantom seeds (ct_ai_node.training.data): validation and held-out test seeds
#: start at 50000 and 90000 and are never used here
TRAIN_SEEDS = range(1_000, 50_000)


# ----------------------------------------------------------------------------- lungs


def lung_depth_mm(lung: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) of each lung voxel to the nearest voxel outside the lungs, and where
    that distance can be trusted: not larger than the distance to the volume's faces
    (a lung cut by the field of view or the scan range has its pleura outside)."""
    lung = np.asarray(lung, bool)
    depth = np.zeros(lung.shape, np.float32)
    if not lung.any():
        return depth, np.zeros(lung.shape, bool)
    box = tuple(slice(max(0, int(i.min()) - 1), int(i.max()) + 2) for i in np.nonzero(lung))
    depth[box] = ndi.distance_transform_edt(lung[box], sampling=spacing)
    face = np.full(lung.shape, np.inf, np.float32)
    for ax, (n, s) in enumerate(zip(lung.shape, spacing)):
        i = np.arange(n, dtype=np.float32)
        d = np.minimum(i + 0.5, n - i - 0.5) * float(s)
        face = np.minimum(face, d.reshape([-1 if a == ax else 1 for a in range(lung.ndim)]))
    return depth, lung & (depth <= face)


def lung_slices(lung: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` slice indices spread evenly over the slices holding lung."""
    zs = np.flatnonzero(np.asarray(lung).reshape(lung.shape[0], -1).any(axis=1))
    if zs.size <= n:
        return zs
    return zs[np.unique(np.round(np.linspace(0, zs.size - 1, n)).astype(int))]


# ----------------------------------------------------------------------------- lung HU


def parenchyma_mode(values: np.ndarray, bin_hu: float = 5.0) -> float:
    """Most frequent HU of the parenchyma (values below the vessel threshold)."""
    v = np.asarray(values, np.float64)
    v = v[v < VESSEL_HU]
    if v.size == 0:
        return float("nan")
    edges = np.arange(-1025.0, VESSEL_HU + bin_hu, bin_hu)
    h, _ = np.histogram(v, edges)
    h = ndi.gaussian_filter1d(h.astype(np.float64), 10.0 / bin_hu / 2.0)
    i = int(np.argmax(h))
    return float(0.5 * (edges[i] + edges[i + 1]))


def hu_summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, PERCENTILES)
    h, _ = np.histogram(v, BINS)
    return {"n": int(v.size), **{f"p{p}": round(float(x), 1) for p, x in zip(PERCENTILES, q)},
            "mean": round(float(v.mean()), 1), "mode_parenchyma": parenchyma_mode(v),
            "histogram": {"edges_hu": BINS.tolist(), "fraction": [round(float(x), 4) for x in h / max(1, h.sum())]}}


# ----------------------------------------------------------------------------- vessels


def ridge_diameters(vessel2d: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge pixels of an in-plane vessel mask and the calibre (mm) each one measures:
    2 x the distance to the nearest outside pixel centre, minus one pixel."""
    v = np.asarray(vessel2d, bool)
    if not v.any():
        return np.zeros(v.shape, bool), np.zeros(0, np.float32)
    d = ndi.distance_transform_edt(v, sampling=px)
    ridge = v & (d >= ndi.maximum_filter(d, size=3))
    return ridge, (2.0 * d[ridge] - px).astype(np.float32)


def vessels_by_depth(hu, lung, depth, trusted, spacing, zs) -> list[dict]:
    """Per depth bin: fraction of lung voxels above -500 HU and the mean vessel calibre."""
    px = float(spacing[2])
    frac_num = np.zeros(len(DEPTH_BINS_MM) - 1)
    frac_den = np.zeros_like(frac_num)
    cal = [[] for _ in frac_num]
    for z in zs:
        d = depth[z]
        keep = trusted[z] & (d > ERODE_MM)
        hot = hu[z] > VESSEL_HU
        ridge, diam = ridge_diameters(lung[z] & hot, px)
        rd = d[ridge]
        rkeep = keep[ridge]
        for b in range(len(frac_num)):
            lo, hi = DEPTH_BINS_MM[b], DEPTH_BINS_MM[b + 1]
            m = keep & (d > lo) & (d <= hi)
            frac_den[b] += m.sum()
            frac_num[b] += (m & hot).sum()
            cal[b].append(diam[rkeep & (rd > lo) & (rd <= hi)])
    out = []
    for b in range(len(frac_num)):
        c = np.concatenate(cal[b]) if cal[b] else np.zeros(0)
        lo, hi = DEPTH_BINS_MM[b], DEPTH_BINS_MM[b + 1]
        out.append({"depth_mm": f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">{lo:g}",
                    "n_voxels": int(frac_den[b]),
                    "fraction_above_minus500": round(float(frac_num[b] / frac_den[b]), 6) if frac_den[b] else None,
                    "n_ridge": int(c.size), "calibre_mm": round(float(c.mean()), 2) if c.size else None})
    return out


# ----------------------------------------------------------------------------- dependent density


def dependent_density(hu, lung, zs) -> dict:
    """Mean parenchymal HU in the posterior minus the anterior third of each slice's lung
    extent (y runs anterior -> posterior), pooled over the slices ``zs``."""
    sums = np.zeros(2)
    counts = np.zeros(2)
    for z in zs:
        ys = np.flatnonzero(lung[z].any(axis=1))
        if ys.size < 3:
            continue
        y0, y1 = ys[0], ys[-1] + 1
        t1, t2 = y0 + (y1 - y0) / 3.0, y0 + 2.0 * (y1 - y0) / 3.0
        yy = np.arange(lung.shape[1])[:, None] + 0.5
        par = lung[z] & (hu[z] < VESSEL_HU)
        for k, band in enumerate((yy < t1, yy >= t2)):
            m = par & band
            sums[k] += hu[z][m].sum(dtype=np.float64)
            counts[k] += m.sum()
    if counts.min() == 0:
        return {"anterior_hu": None, "posterior_hu": None, "posterior_minus_anterior_hu": None}
    ant, post = sums / counts
    return {"anterior_hu": round(float(ant), 1), "posterior_hu": round(float(post), 1),
            "posterior_minus_anterior_hu": round(float(post - ant), 1)}


# ----------------------------------------------------------------------------- noise


def _odd(n: float, lo: int = 3) -> int:
    n = max(lo, int(round(n)))
    return n if n % 2 else n + 1


def body_mask_2d(h: np.ndarray) -> np.ndarray:
    """The patient on one slice: the largest component above -500 HU, holes filled."""
    body = ndi.binary_opening(h > -500, iterations=2)
    lab, n = ndi.label(body)
    if n == 0:
        return body
    sizes = ndi.sum(body, lab, range(1, n + 1))
    return ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def soft_tissue_mask_2d(h: np.ndarray, px: float) -> np.ndarray:
    """Soft tissue inside the body, 5 mm from the skin, where the image smoothed over
    about 1.5 mm lies in [-150, 150] HU (fat, muscle, organs, unenhanced blood)."""
    body = ndi.binary_erosion(body_mask_2d(h), iterations=max(1, int(round(5.0 / px))))
    sm = ndi.gaussian_filter(h.astype(np.float32), 1.5 / px)
    return body & (sm >= SOFT_TISSUE_HU[0]) & (sm <= SOFT_TISSUE_HU[1])


def global_noise_sd(slices, masks, px: float) -> float:
    """Global noise level: the mode of the local SD in windows of about 5 mm (7 pixels
    at least) lying wholly in the mask (Bessel-corrected)."""
    w = _odd(NOISE_WINDOW_MM / px, 7)
    n = w * w
    sds = []
    for h, m in zip(slices, masks):
        h = h.astype(np.float64)
        mean = ndi.uniform_filter(h, w)
        var = (ndi.uniform_filter(h * h, w) - mean * mean) * n / (n - 1)
        inside = ndi.uniform_filter(m.astype(np.float32), w) > 0.999
        sds.append(np.sqrt(np.clip(var[inside], 0, None)))
    s = np.concatenate(sds) if sds else np.zeros(0)
    if s.size < 50:
        return float("nan")
    hi = float(np.percentile(s, 99))
    step = max(0.1, hi / 400)
    h, e = np.histogram(s, np.arange(0, hi + step, step))
    h = ndi.gaussian_filter1d(h.astype(np.float64), 2.0)
    i = int(np.argmax(h))
    return float(0.5 * (e[i] + e[i + 1]))


@functools.lru_cache(maxsize=8)
def _quadratic_residual_operator(n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - (n - 1) / 2.0
    a = np.stack([np.ones(n * n), yy.ravel(), xx.ravel(), (yy * yy).ravel(), (xx * xx).ravel(), (xx * yy).ravel()], 1)
    return np.eye(n * n) - a @ np.linalg.pinv(a)


def detrend(roi: np.ndarray) -> np.ndarray:
    """``roi`` minus its least-squares quadratic surface (slow anatomy and cupping)."""
    n = roi.shape[0]
    return (_quadratic_residual_operator(n) @ roi.astype(np.float64).ravel()).reshape(roi.shape)


def noise_rois(h: np.ndarray, mask: np.ndarray, n: int) -> list[np.ndarray]:
    """Square ``n`` x ``n`` regions on a half-overlapping grid lying wholly in ``mask``,
    quadratic surface removed."""
    raw = [h[y:y + n, x:x + n] for y in range(0, h.shape[0] - n + 1, n // 2)
           for x in range(0, h.shape[1] - n + 1, n // 2) if mask[y:y + n, x:x + n].all()]
    if not raw:
        return []
    flat = np.stack(raw).reshape(len(raw), -1).astype(np.float64) @ _quadratic_residual_operator(n).T
    return list(flat.reshape(len(raw), n, n))


def nps_radial(rois, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged 2-D noise power spectrum of square regions (HU^2 mm^2) against
    frequency in lp/cm, from the first ring above 0 up to the Nyquist frequency."""
    rois = np.asarray(rois, np.float64)
    n = rois.shape[-1]
    nps2 = (np.abs(np.fft.fft2(rois)) ** 2).mean(axis=0) * px * px / (n * n)
    f = np.fft.fftfreq(n, px)
    fr = np.hypot(f[:, None], f[None, :])
    df = 1.0 / (n * px)
    k = np.rint(fr / df).astype(int)
    kmax = n // 2
    sel = (k >= 1) & (k <= kmax)
    tot = np.bincount(k[sel], nps2[sel], minlength=kmax + 1)
    cnt = np.bincount(k[sel], minlength=kmax + 1)
    ks = np.arange(1, kmax + 1)
    return ks * df * 10.0, tot[ks] / np.maximum(cnt[ks], 1)


def nps_summary(f: np.ndarray, nps: np.ndarray) -> dict:
    """Peak frequency and the frequency below which half of the 2-D noise energy
    (integral of NPS x 2 pi f) lies, lp/cm. FBP noise spectra are flat near their top
    (within 1 % over +-10 %), so the peak is the centroid of the band around the maximum
    where the profile (smoothed over 3 rings) stays within 10 % of it."""
    sm = ndi.uniform_filter1d(nps, 3, mode="nearest")
    i = int(np.argmax(sm))
    lo, hi = i, i
    while lo > 0 and sm[lo - 1] >= 0.9 * sm[i]:
        lo -= 1
    while hi < sm.size - 1 and sm[hi + 1] >= 0.9 * sm[i]:
        hi += 1
    peak = float(np.sum(f[lo:hi + 1] * sm[lo:hi + 1]) / np.sum(sm[lo:hi + 1]))
    energy = np.cumsum(nps * f)
    half = 0.5 * energy[-1]
    i = int(np.searchsorted(energy, half))
    if i == 0:
        f50 = f[0]
    else:
        f50 = f[i - 1] + (half - energy[i - 1]) / max(energy[i] - energy[i - 1], 1e-12) * (f[i] - f[i - 1])
    return {"peak_lpcm": round(peak, 2), "f50_lpcm": round(float(f50), 2), "nyquist_lpcm": round(float(f[-1]), 2)}


def noise_measures(hu, spacing, zs) -> dict:
    """Global noise level, and SD and NPS of the cleanest soft-tissue regions: the
    quarter with the lowest SD (least anatomy left after the quadratic; on phantoms this
    recovers the generator's noise SD and NPS peak, see tests/test_realism.py)."""
    px = float(spacing[2])
    slices = [hu[z] for z in zs]
    masks = [soft_tissue_mask_2d(h, px) for h in slices]
    gnl = global_noise_sd(slices, masks, px)
    n = 2 * max(8, int(round(NPS_ROI_MM / px / 2)))
    cands = [r for h, m in zip(slices, masks) for r in noise_rois(h, m, n)]
    out = {"sd_global_hu": round(gnl, 1) if math.isfinite(gnl) else None, "n_candidate_rois": len(cands),
           "roi_mm": round(n * px, 1)}
    sds = np.array([r.std() for r in cands])
    rois = [cands[i] for i in np.argsort(sds)[:max(NPS_MIN_ROIS, int(NPS_KEEP * len(cands)))]]
    out["n_rois"] = len(rois)
    if len(rois) < NPS_MIN_ROIS:
        return out
    f, nps = nps_radial(rois, px)
    out["sd_roi_hu"] = round(float(np.sqrt(np.mean([r.var() for r in rois]))), 1)
    out["nps"] = {**nps_summary(f, nps), "f_lpcm": [round(float(x), 2) for x in f],
                  "nps_normalised": [round(float(x), 3) for x in nps / nps.max()]}
    return out


# ----------------------------------------------------------------------------- one scan


def _lung_measures(hu, spacing, lung_labels, n_slices: int) -> dict:
    lung = np.asarray(lung_labels) > 0
    depth, trusted = lung_depth_mm(lung, spacing)
    zs = lung_slices(lung, n_slices)
    core = depth > ERODE_MM
    vals = np.concatenate([hu[z][core[z]] for z in zs]) if zs.size else np.zeros(0)
    return {"n_slices_measured": int(zs.size),
            "lung_ml": round(float(lung.sum() * np.prod(spacing) / 1000.0), 1),
            "hu": hu_summary(vals),
            "vessels": vessels_by_depth(hu, lung, depth, trusted, spacing, zs),
            "dependent": dependent_density(hu, core, zs)}


def measure(hu: np.ndarray, spacing, lung_labels: np.ndarray, n_slices: int = 24) -> dict:
    """Every measure of one scan (arrays in the phantoms' layout, z inferior -> superior,
    y anterior -> posterior; ``spacing`` (z, y, x) mm; ``lung_labels`` > 0 in the lungs)."""
    out = _lung_measures(hu, spacing, lung_labels, n_slices)
    out["noise"] = noise_measures(hu, spacing, lung_slices(np.asarray(lung_labels) > 0, n_slices))
    return out


# ----------------------------------------------------------------------------- scans (I/O)


@functools.lru_cache(maxsize=1)
def _segmenter():
    """The lung segmentation load_background uses: the U-Net, or the classical method
    where its weights are absent (a fresh checkout)."""
    from ct_ai_node.pipeline.run import create_lung_segmenter

    try:
        return create_lung_segmenter("unet"), "unet"
    except Exception:
        return create_lung_segmenter("classical"), "classical"


def _lung_labels(hu, spacing) -> np.ndarray:
    seg, _ = _segmenter()
    return np.asarray(seg(hu.astype(np.float32), spacing, (1, 0, 0, 0, 1, 0)), np.uint8)


def _header(path: Path) -> dict:
    if not path.is_dir():
        return {"kernel": None, "manufacturer": None, "format": "nifti"}
    import pydicom

    f = next(p for p in sorted(path.iterdir()) if p.is_file())
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    k = ds.get("ConvolutionKernel")
    k = "\\".join(k) if isinstance(k, (list, pydicom.multival.MultiValue)) else (str(k) if k else None)
    return {"kernel": k, "manufacturer": str(ds.get("Manufacturer", "")) or None, "format": "dicom",
            "slice_thickness_mm": float(ds.SliceThickness) if ds.get("SliceThickness") else None,
            "contrast": str(ds.get("ContrastBolusAgent", "")) or None}


def _label(name: str, head: dict, spacing) -> str:
    """Short, readable scan name: collection, kernel or file, slice spacing."""
    top = name.split("/")[0]
    extra = head["kernel"] or re.sub(r"\.nii(\.gz)?$", "", name.split("/")[-1]).split("_ct_")[0]
    return f"{top} {extra} {spacing[0]:g}mm"


def measure_real(root: Path, n_slices: int, min_lung_ml: float = 1000.0) -> list[dict]:
    from ct_ai_node.training.real_backgrounds import discover_backgrounds, load_background

    out = []
    for bg in discover_backgrounds(root):
        try:
            b = load_background(bg.path)
        except Exception as exc:  # a series the node would refuse: not a chest background
            logger.info("real scan skipped (%s)", type(exc).__name__)
            logger.debug("skipped %s: %s", bg.name, exc)
            continue
        if b.lung_ml < min_lung_ml:
            logger.debug("skipped %s: lungs %.0f ml", bg.name, b.lung_ml)
            continue
        head = _header(Path(bg.path))
        fam = KERNEL_FAMILY.get((head["kernel"] or "").upper())
        r = {"source": "real", "name": _label(bg.name, head, b.spacing), "path": bg.name, **head,
             "kernel_family": fam, "spacing_mm": [round(v, 4) for v in b.spacing], "shape": list(b.hu.shape),
             "lungs": _segmenter()[1], **measure(b.hu, b.spacing, b.lung_labels, n_slices)}
        out.append(r)
        logger.info("measured real scan %d", len(out))
    return out


def _geometry_key(spacing) -> tuple[float, float]:
    """Slice spacing and pixel size, what phantoms are matched on."""
    return (round(float(spacing[0]), 2), round(float(spacing[2]), 3))


def phantom_plan(real: list[dict], n: int, seed0: int = TRAIN_SEEDS.start) -> list[dict]:
    """``n`` phantoms on the real scans' geometries (thickest slices first), kernel
    families cycling soft, medium, sharp per geometry; seeds are the first training
    seeds whose drawn kernel has that family (the kernel draw does not depend on the
    geometry). A real scan of at least 384 pixels gets a 512 matrix phantom (the whole
    chest on the real pixels); a cropped one 256 (the generator's coarse mode: a 512
    scan's field of view sampled on 256 pixels, as resampled real volumes are)."""
    geos: dict[tuple, int] = {}
    for r in real:
        k = _geometry_key(r["spacing_mm"])
        geos[k] = max(geos.get(k, 0), 512 if max(r["shape"][1:]) >= 384 else 256)
    order = sorted(geos, key=lambda g: -g[0]) or [(2.5, 0.7)]
    used: set[int] = set()
    plan = []
    for i in range(n):
        dz, px = order[i % len(order)]
        fam = FAMILIES[(i // len(order)) % len(FAMILIES)]
        seed = seed0
        while seed in used or _probe(seed, dz, px)["kernel_family"] != fam:
            seed += 1
        used.add(seed)
        m = geos.get((dz, px), 512)
        plan.append({"seed": seed, "family": fam, "spacing": (dz, px, px), "shape": (0, m, m)})
    return plan


@functools.lru_cache(maxsize=4096)
def _probe(seed: int, dz: float, px: float) -> dict:
    """The generator's parameters for ``seed`` on this geometry (kernel, noise)."""
    from .phantom import generate_phantom

    return generate_phantom(seed, "normal", (2, 16, 16), (dz, px, px)).params


def generator_noise_sd(spacing, matrix: int, family: str | None, seeds) -> dict:
    """The noise SD the generator draws (its ``noise_sd``; the measures recover it within
    a few %) for phantoms of this geometry and kernel family over ``seeds``: the range a
    real scan's noise should fall in. Tiny probes suffice: the draw does not depend on the
    matrix, except that the coarse mode (a 512 field of view on fewer pixels) scales it
    by (matrix / 512) ** coarse_noise_exponent, drawn per scan (phantom.py)."""
    v = []
    for seed in seeds:
        pr = _probe(int(seed), float(spacing[0]), float(spacing[2]))
        if family is None or pr["kernel_family"] == family:
            v.append(float(pr["noise_sd"]) * min(1.0, matrix / 512) ** pr["coarse_noise_exponent"])
    v = np.asarray(v)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": round(float(v.mean()), 1), "sd": round(float(v.std()), 1),
            "min": round(float(v.min()), 1), "p5": round(float(np.percentile(v, 5)), 1),
            "p95": round(float(np.percentile(v, 95)), 1), "max": round(float(v.max()), 1)}


def measure_phantoms(plan: list[dict], n_slices: int) -> list[dict]:
    from .phantom import generate_phantom

    out = []
    for p in plan:
        ph = generate_phantom(p["seed"], "normal", p["shape"], p["spacing"])
        labels = _lung_labels(ph.hu, ph.spacing)
        pr = ph.params
        fpk = _nominal_peak_lpcm(pr, ph.spacing[2])
        out.append({"source": "phantom", "name": f"phantom {ph.seed} {pr['kernel']} {ph.spacing[0]:g}mm",
                    "seed": ph.seed, "kernel": pr["kernel"], "kernel_family": pr["kernel_family"],
                    "spacing_mm": [round(v, 4) for v in ph.spacing], "shape": list(ph.hu.shape),
                    "lungs": _segmenter()[1],
                    "nominal": {"noise_sd_hu": round(pr["noise_sd"], 1), "nps_peak_lpcm": round(fpk, 2),
                                "lung_hu": round(pr["lung_hu"], 1),
                                "gravity_gradient_hu": round(pr["gravity_gradient_hu"], 1),
                                "blur_px": round(pr["blur_px"], 2), "distractors": pr["distractors"]},
                    **measure(ph.hu, ph.spacing, labels, n_slices),
                    # the same lung measures inside the generator's own lungs: tells a gap of
                    # the image from one of the lung U-Net on phantoms
                    "with_phantom_lungs": _lung_measures(ph.hu, ph.spacing, ph.lung_labels, n_slices)})
        logger.info("measured phantom %d", ph.seed)
    return out


def _nominal_peak_lpcm(params: dict, px: float) -> float:
    """The generator's noise peak of a phantom (phantom.py: its ``noise_peak_cycles_px``,
    scaled with pixels; phantoms made before it was recorded: the kernel's table value)."""
    fpk = params.get("noise_peak_cycles_px")
    if fpk is None:
        from .phantom import KERNELS

        fpk = next(k[2] for fam in KERNELS.values() for k in fam if k[0] == params["kernel"])
    return fpk * (0.7 / max(px, 0.3)) ** 0.3 / px * 10.0


# ----------------------------------------------------------------------------- comparison


def _get(scan: dict, path: str):
    v = scan
    for k in path.split("."):
        if isinstance(v, list):
            v = v[int(k)]
        elif isinstance(v, dict):
            v = v.get(k)
        else:
            return None
        if v is None:
            return None
    return v


#: (key, label, scale floor, matched by kernel family too). The NPS peak is reported but
#: not ranked: on real scans the cleanest soft tissue still holds anatomy (and streaks)
#: whose power rises towards 0 lp/cm and hides the noise peak; f50 is weighted by
#: frequency and stays a fair comparison.
METRICS = [("hu.p5", "lung HU p5", 10, False), ("hu.p25", "lung HU p25", 10, False),
           ("hu.p50", "lung HU median", 10, False), ("hu.p75", "lung HU p75", 10, False),
           ("hu.p95", "lung HU p95", 10, False), ("hu.mode_parenchyma", "parenchyma mode HU", 10, False),
           *[(f"vessels.{i}.fraction_above_minus500", f"vessel fraction {b}", 0.005, False)
             for i, b in enumerate(("0-10", "10-20", "20-40", ">40"))],
           *[(f"vessels.{i}.calibre_mm", f"vessel calibre {b} mm", 0.2, False)
             for i, b in enumerate(("0-10", "10-20", "20-40", ">40"))],
           ("noise.sd_global_hu", "noise SD (global) HU", 1.0, True), ("noise.sd_roi_hu", "noise SD (ROI) HU", 1.0, True),
           ("noise.nps.f50_lpcm", "NPS f50 lp/cm", 0.3, True),
           ("dependent.posterior_minus_anterior_hu", "posterior - anterior HU", 10, False)]


#: metrics compared with the generator's own range (``generator_noise_sd_hu`` of the
#: real scan) rather than with the few measured phantoms
FROM_GENERATOR = {"noise.sd_global_hu": "generator_noise_sd_hu", "noise.sd_roi_hu": "generator_noise_sd_hu"}


def matched(real: dict, phantoms: list[dict], by_family: bool) -> list[dict]:
    """Phantoms of the real scan's slice spacing and pixel size (and kernel family,
    where known, for noise); all phantoms when none match."""
    g = _geometry_key(real["spacing_mm"])
    m = [p for p in phantoms if _geometry_key(p["spacing_mm"]) == g]
    if by_family and real.get("kernel_family"):
        m = [p for p in m if p["kernel_family"] == real["kernel_family"]]
    return m or phantoms


def gaps(real: list[dict], phantoms: list[dict]) -> list[dict]:
    """Per metric: each real value against the mean of its matched phantoms (noise SD:
    the generator's draw), in units of the spread of that metric over the phantoms of
    the scan's geometry, every kernel family (the generator's SD for noise SD; at least
    the metric's floor): one phantom may match a scan and kernel. Sorted by the mean z
    (a gap of one sign on every scan is one to close; a large mean absolute z with a
    small mean is spread between patients, for randomisation)."""
    out = []
    for key, label, floor, fam in METRICS:
        rows = []
        for r in real:
            rv = _get(r, key)
            gen = r.get(FROM_GENERATOR.get(key, ""), {})
            if gen.get("n"):
                mu, sd, lo, hi, ref = gen["mean"], gen["sd"], gen["min"], gen["max"], f"generator ({gen['n']} seeds)"
            else:
                pv = [v for v in (_get(p, key) for p in matched(r, phantoms, fam)) if v is not None]
                if not pv:
                    continue
                geo = [v for v in (_get(p, key) for p in matched(r, phantoms, False)) if v is not None]
                mu, sd, lo, hi, ref = float(np.mean(pv)), float(np.std(geo)), min(pv), max(pv), f"{len(pv)} phantoms"
            if rv is None:
                continue
            rows.append({"scan": r["name"], "real": rv, "phantom_mean": round(mu, 3), "phantom_min": lo,
                         "phantom_max": hi, "reference": ref, "z": round((rv - mu) / max(sd, floor), 2)})
        if rows:
            out.append({"metric": key, "label": label, "mean_abs_z": round(float(np.mean([abs(x["z"]) for x in rows])), 2),
                        "mean_z": round(float(np.mean([x["z"] for x in rows])), 2),
                        "mean_real_minus_phantom": float(f"{np.mean([x['real'] - x['phantom_mean'] for x in rows]):.4g}"),
                        "real_above": sum(x["z"] > 0 for x in rows),
                        "outside_phantom_range": sum(not x["phantom_min"] <= x["real"] <= x["phantom_max"] for x in rows),
                        "n_real": len(rows), "per_scan": rows})
    return sorted(out, key=lambda g: (-abs(g["mean_z"]), -g["mean_abs_z"]))


# ----------------------------------------------------------------------------- report


def _f(v, nd=0):
    return "-" if v is None else f"{v:.{nd}f}"


def _g(v):
    """A value of either scale (fractions, mm, HU) with sensible digits."""
    return _f(v, 2 if v is not None and abs(v) < 10 else 0)


SCAN_HEADER = ["scan", "kernel", "lung HU p5 / p25 / p50 / p75 / p95", "mode",
               "vessel % >-500 HU by depth 0-10 / 10-20 / 20-40 / >40 mm", "calibre mm (same bins)",
               "noise SD global / ROI HU", "NPS peak / f50 lp/cm", "post-ant HU"]
GAP_HEADER = ["metric", "real", "matched phantoms mean (range)", "mean real - phantom", "mean z / mean abs z",
              "real above / outside range"]


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def table_md(scans: list[dict], gap_list: list[dict], top: int = 8) -> str:
    lines = [_row(SCAN_HEADER), _row(["---"] * len(SCAN_HEADER))]
    for s in scans:
        h, v, n = s["hu"], s["vessels"], s["noise"]
        nps = n.get("nps") or {}
        kern = (s.get("kernel") or "not in NIfTI") + (f" ({s['kernel_family']})" if s.get("kernel_family") else "")
        frac = [None if b["fraction_above_minus500"] is None else 100 * b["fraction_above_minus500"] for b in v]
        lines.append(_row([
            s["name"], kern, " / ".join(_f(h.get(f"p{p}")) for p in PERCENTILES), _f(h.get("mode_parenchyma")),
            " / ".join(_f(x, 1) for x in frac), " / ".join(_f(b["calibre_mm"], 1) for b in v),
            f"{_f(n.get('sd_global_hu'), 1)} / {_f(n.get('sd_roi_hu'), 1)}",
            f"{_f(nps.get('peak_lpcm'), 1)} / {_f(nps.get('f50_lpcm'), 1)}",
            _f(s["dependent"]["posterior_minus_anterior_hu"])]))
    lines += ["", f"Largest gaps (real vs phantoms of the same geometry; noise also of the same kernel family where "
                  f"the header names it, noise SD against the generator's draw over {N_PROBE_SEEDS} training seeds, "
                  f"marked gen; z = gap / SD of the metric over the phantoms of that geometry or the generator's "
                  f"draw), top {top}:", "", _row(GAP_HEADER), _row(["---"] * len(GAP_HEADER))]
    for g in gap_list[:top]:
        rows = g["per_scan"]
        ph = "; ".join(f"{_g(x['phantom_mean'])} ({_g(x['phantom_min'])}..{_g(x['phantom_max'])})"
                       + (" gen" if x["reference"].startswith("generator") else "") for x in rows)
        lines.append(_row([g["label"], ", ".join(_g(x["real"]) for x in rows), ph, f"{g['mean_real_minus_phantom']:.3g}",
                           f"{g['mean_z']:+.1f} / {g['mean_abs_z']:.1f}",
                           f"{g['real_above']}/{g['n_real']} above, {g['outside_phantom_range']}/{g['n_real']} outside"]))
    return "\n".join(lines)


BEGIN, END = "<!-- realism-table: generated by python -m ct_ai_node.synthetic.realism -->", "<!-- /realism-table -->"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "realism.json").write_text(json.dumps(result, indent=1) + "\n")
    block = f"{BEGIN}\n{table_md(result['scans'], result['gaps'])}\n{END}"
    md = out / "realism.md"
    text = md.read_text() if md.exists() else "# Phantom vs real lung parenchyma\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.write_text(text)


def run(real_root: Path, n_phantoms: int = 8, n_slices: int = 24, seed0: int = TRAIN_SEEDS.start) -> dict:
    real = measure_real(real_root, n_slices)
    plan = phantom_plan(real, n_phantoms, seed0)
    probe = range(seed0, seed0 + N_PROBE_SEEDS)
    for r in real:
        m = 512 if max(r["shape"][1:]) >= 384 else 256  # as phantom_plan
        r["generator_noise_sd_hu"] = generator_noise_sd(r["spacing_mm"], m, r.get("kernel_family"), probe)
    phantoms = measure_phantoms(plan, n_slices)
    settings = {"erode_mm": ERODE_MM, "vessel_hu": VESSEL_HU,
                "depth_bins_mm": [b if math.isfinite(b) else None for b in DEPTH_BINS_MM],
                "soft_tissue_hu": list(SOFT_TISSUE_HU), "noise_window_mm": NOISE_WINDOW_MM, "nps_roi_mm": NPS_ROI_MM,
                "n_slices": n_slices, "phantom_kind": "normal", "phantom_seed0": seed0}
    return {"generated_by": "python -m ct_ai_node.synthetic.realism", "settings": settings,
            "scans": real + phantoms, "gaps": gaps(real, phantoms)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ct_ai_node.synthetic.realism", description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default="../shared/data/real", help="folder with the real chest CT (read only)")
    ap.add_argument("--out", required=True, help="folder for realism.json and realism.md")
    ap.add_argument("--phantoms", type=int, default=8)
    ap.add_argument("--slices", type=int, default=24, help="lung slices measured per scan")
    ap.add_argument("--seed0", type=int, default=TRAIN_SEEDS.start)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.seed0 not in TRAIN_SEEDS:
        ap.error(f"--seed0 {args.seed0}: phantoms come from the training seeds "
                 f"({TRAIN_SEEDS.start}..{TRAIN_SEEDS.stop - 1}), never validation or held-out test seeds")
    result = run(Path(args.real), args.phantoms, args.slices, args.seed0)
    write_outputs(result, Path(args.out))
    print(table_md(result["scans"], result["gaps"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
