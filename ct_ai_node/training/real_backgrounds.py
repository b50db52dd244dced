"""Real chest CT as training backgrounds: synthetic lesions blended into real lungs.

A model trained on phantoms alone learns the difference between phantom and real lung
texture as well as the lesions (on real scans it called nodules, tumours and normal
parenchyma "COVID-19-like"). Here the lesions of :mod:`ct_ai_node.synthetic.lesions`
(COVID-19-like: bilateral, peripheral, posterior, lower-lobe ground glass with
consolidation and crazy paving; CAP-like: lobar or segmental consolidation with air
bronchograms) are planned on a real scan's own lungs and blended into its HU values,
so that their masks are known while everything around them (vessels, fissures, noise,
nodules, tumours, dependent density) is real. "normal" cases are the real scan as it is:
a real negative.

Blending keeps what is real:

* ground glass raises the local mean of the parenchyma towards the lesion's HU and
  leaves the voxel-to-voxel noise and the vessels (brighter than the target) as they are;
* consolidation replaces the tissue by the lesion's HU plus noise of the scan's own
  level, except in the airways (air bronchograms: voxels whose local mean is below
  -930 HU stay air);
* crazy paving adds a fine reticular web inside ground glass.

The lesion mask is what an annotator would outline: ground glass at least half-dense
that raised the tissue by more than 60 HU (and the vessels running through it), or
consolidation at least half-dense, inside the lungs.

Lungs come from the node's own lung U-Net (what inference sees). Lobes, which CAP-like
consolidation follows, are approximated by oblique and horizontal planes through each
lung (the phantoms' fissure model), which is enough for a lobar or segmental extent.

Backgrounds are found in a folder (:func:`discover_backgrounds`): every folder holding
at least ``min_slices`` DICOM files and every NIfTI file, kept when its lungs are at least
``min_lung_ml``. Names relative to the folder identify them (held-out lists, reports).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ct_ai_node.synthetic.lesions import CoarseLungs, plan_lesions

logger = logging.getLogger(__name__)

#: coarse planning grid (mm), as the phantom generator's
PLAN_STEP_MM = 3.0
#: case ids of background cases start below this (site cases use small negative ids)
ID_BASE = -1_000_000
KIND_CODES = {"covid": 0, "cap": 1, "normal": 2}
#: where the local mean stays below this, consolidation leaves the voxel as air (airways)
AIRWAY_HU = -930.0


@dataclass(frozen=True)
class Background:
    """A real chest CT usable as a background: ``path`` a DICOM folder or NIfTI file."""

    name: str
    path: str


@dataclass(frozen=True)
class BackgroundCase:
    """Background ``path`` with lesions of ``kind`` inserted (draw ``draw`` of the random
    plan); "normal": the background as it is. Usable wherever a training case is
    (:func:`ct_ai_node.training.data.make_case`)."""

    id: int
    path: str
    name: str
    kind: str
    draw: int

    @property
    def scan(self) -> str:
        """Cache key: the file and the insertion (one background gives many cases)."""
        return f"{self.path}#{self.kind}-{self.draw}"

    @property
    def lesion_mask(self) -> bool:  # train_infection skips site cases without masks
        return True

    def load(self):
        return insert_lesions(self)


def discover_backgrounds(root: Path, min_slices: int = 20) -> list[Background]:
    """Every DICOM series folder (at least ``min_slices`` files ending in .dcm, or
    without suffix) and NIfTI file under ``root``, sorted by name."""
    root = Path(root)
    found: list[Background] = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        files = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in (".dcm", "")]
        if len(files) >= min_slices:
            found.append(Background(str(folder.relative_to(root)), str(folder)))
    for f in sorted(root.rglob("*.nii*")):
        if f.name.endswith((".nii", ".nii.gz")):
            found.append(Background(str(f.relative_to(root)), str(f)))
    return found


def is_held_out(bg: Background, held_out: tuple[str, ...]) -> bool:
    """``held_out`` entries name a background or a folder above it."""
    return any(bg.name == h or bg.name.startswith(h.rstrip("/") + "/") for h in held_out)


def background_cases(backgrounds: list[Background], kinds: dict[str, int], first_draw: int = 0) -> list[BackgroundCase]:
    """``kinds[k]`` cases of kind ``k`` per background, draws ``first_draw``.. (use disjoint
    draw ranges for training and validation)."""
    out = []
    for b, bg in enumerate(backgrounds):
        for kind, n in kinds.items():
            for d in range(first_draw, first_draw + n):
                cid = ID_BASE - (b * 100_000 + KIND_CODES[kind] * 10_000 + d)
                out.append(BackgroundCase(cid, bg.path, bg.name, kind, d))
    return out


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedBackground:
    hu: np.ndarray  # int16 (z, y, x), z inferior -> superior, y anterior -> posterior, x right -> left
    spacing: tuple[float, float, float]
    lung_labels: np.ndarray  # uint8, 1 right, 2 left
    noise_sd: float  # voxel noise of the lung parenchyma (HU)

    @property
    def lung_ml(self) -> float:
        return float((self.lung_labels > 0).sum()) * float(np.prod(self.spacing)) / 1000.0


def thick_series_policy():
    """The node's series selection, with routine chest series of up to 10 mm accepted
    (real scans to learn from and to evaluate on, not what the node analyses by default)."""
    from ct_ai_node.rules.selection import SelectionPolicy

    return SelectionPolicy(max_thickness_mm=10.0, max_spacing_mm=10.0)


@functools.lru_cache(maxsize=2)
def load_background(path: str) -> LoadedBackground:
    """The scan in the phantoms' layout with the lung U-Net's lungs (cached per process)."""
    from ct_ai_node.pipeline.run import create_lung_segmenter
    from ct_ai_node.training.site_data import AXIAL, _dicom_zyx, _nifti_zyx

    hu, spacing = _dicom_zyx(path, thick_series_policy()) if Path(path).is_dir() else _nifti_zyx(path)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    try:
        lungs = create_lung_segmenter("unet")
    except Exception:  # weights absent (a fresh checkout before training): the classical method
        lungs = create_lung_segmenter("classical")
    labels = np.asarray(lungs(hu.astype(np.float32), spacing, AXIAL), np.uint8)
    for a in (hu, labels):
        a.flags.writeable = False
    return LoadedBackground(hu, tuple(float(v) for v in spacing), labels, parenchyma_noise(hu, labels > 0))


def parenchyma_noise(hu: np.ndarray, lung: np.ndarray) -> float:
    """Robust SD of the high-pass residual (voxel minus its 3x3 mean) inside the lungs,
    away from vessels: the noise a consolidation of this scan must carry."""
    zs = np.flatnonzero(lung.reshape(lung.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return 20.0
    vals = []
    for z in zs[:: max(1, zs.size // 12)]:
        h = hu[z].astype(np.float32)
        r = h - ndi.uniform_filter(h, 3)
        m = ndi.binary_erosion(lung[z], iterations=3) & (h < -700)
        if m.sum() > 200:
            vals.append(r[m])
    if not vals:
        return 20.0
    v = np.concatenate(vals)
    # the 3x3 mean removes 1/9 of the variance of white noise: undo it
    return float(np.clip(1.4826 * np.median(np.abs(v - np.median(v))) / math.sqrt(8.0 / 9.0), 5.0, 120.0))


# ----------------------------------------------------------------------------- lungs and lobes


def _lobes(label: np.ndarray, zm: np.ndarray, ym: np.ndarray, xm: np.ndarray, H: float, y_c: float, depth: float,
           x_mid: float) -> np.ndarray:
    """Pseudo-lobes (1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL) of ``label`` on the grid given by
    broadcastable coordinates: the oblique fissure rises from front to back, the
    horizontal one splits the right upper from the middle lobe."""
    Z, Y, X = np.broadcast_arrays(zm, ym, xm)
    lower = Z < 0.42 * H + 0.32 * H * (Y - y_c) / max(depth, 1.0)
    z_hor = 0.56 * H + 0.05 * (X - x_mid)
    lobe = np.zeros(label.shape, np.uint8)
    right, left = label == 1, label == 2
    lobe[right] = 1
    lobe[right & ~lower & (Z < z_hor)] = 2
    lobe[right & lower] = 3
    lobe[left] = 4
    lobe[left & lower] = 5
    return lobe


@dataclass
class _Frame:
    """The background's lungs in planning coordinates (mm; z from the lung base up)."""

    z0: int
    H: float
    y_c: float
    depth: float
    x_mid: float


def _frame(labels: np.ndarray, spacing) -> _Frame:
    dz, dy, dx = spacing
    lung = labels > 0
    zs = np.flatnonzero(lung.reshape(lung.shape[0], -1).any(axis=1))
    ys = np.flatnonzero(lung.any(axis=(0, 2)))
    right = np.flatnonzero((labels == 1).any(axis=(0, 1)))
    left = np.flatnonzero((labels == 2).any(axis=(0, 1)))
    x_mid = ((right.max() + left.min()) / 2.0 * dx) if right.size and left.size else labels.shape[2] / 2.0 * dx
    return _Frame(int(zs[0]), float((zs[-1] - zs[0] + 1) * dz), float((ys[0] + ys[-1]) / 2.0 * dy),
                  float(max((ys[-1] - ys[0]) / 2.0 * dy, 1.0)), float(x_mid))


def coarse_lungs(labels: np.ndarray, spacing, fr: _Frame, step: float = PLAN_STEP_MM) -> CoarseLungs:
    """The background's lungs on the planning grid (nearest voxel), with pseudo-lobes."""
    dz, dy, dx = spacing
    nz, ny, nx = labels.shape
    z = np.arange(0.0, fr.H + 1e-6, step)
    y = np.arange(0.0, ny * dy, step)
    x = np.arange(0.0, nx * dx, step)
    iz = np.clip(np.rint(z / dz).astype(int) + fr.z0, 0, nz - 1)
    iy = np.clip(np.rint(y / dy).astype(int), 0, ny - 1)
    ix = np.clip(np.rint(x / dx).astype(int), 0, nx - 1)
    lab = labels[np.ix_(iz, iy, ix)].astype(np.uint8)
    lobe = _lobes(lab, z[:, None, None], y[None, :, None], x[None, None, :], fr.H, fr.y_c, fr.depth, fr.x_mid)
    return CoarseLungs(z, y, x, lab, lobe, step)


# ----------------------------------------------------------------------------- insertion


def _smooth_noise(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise (a smooth random texture)."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return n / max(float(n.std()), 1e-6)


def insert_lesions(case: BackgroundCase):
    """The background of ``case`` with its lesions: a :class:`~ct_ai_node.training.site_data.SiteScan`
    (hu int16, lung labels, lesion mask, spacing, kind)."""
    from ct_ai_node.training.site_data import SiteScan

    bg = load_background(case.path)
    labels = np.array(bg.lung_labels)
    lesion = np.zeros(bg.hu.shape, bool)
    if case.kind == "normal" or not labels.any():
        return SiteScan(hu=np.array(bg.hu), lung_labels=labels, lesion_mask=lesion, spacing=bg.spacing,
                        kind=case.kind, seed=case.id, has_lesion_mask=True)
    rng = np.random.default_rng([abs(case.id), case.draw, 12])
    hu_out, lesion = blend(bg.hu, labels, bg.spacing, case.kind, rng, bg.noise_sd)
    return SiteScan(hu=hu_out, lung_labels=labels, lesion_mask=lesion, spacing=bg.spacing, kind=case.kind,
                    seed=case.id, has_lesion_mask=True)


def blend(hu: np.ndarray, labels: np.ndarray, spacing, kind: str, rng: np.random.Generator,
          noise_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Plan lesions of ``kind`` on the lungs ``labels`` and blend them into ``hu``
    (see the module docstring). Returns (hu int16, lesion mask bool)."""
    dz, dy, dx = spacing
    fr = _frame(labels, spacing)
    c = coarse_lungs(labels, spacing, fr)
    plan = plan_lesions(kind, rng, c, fr.H)
    out = np.array(hu, dtype=np.int16)
    lesion = np.zeros(hu.shape, bool)
    if plan.F is None:
        return out, lesion
    nz, ny, nx = hu.shape
    ym = np.arange(ny) * dy
    xm = np.arange(nx) * dx
    px = (dy + dx) / 2.0
    ggo_var = float(rng.uniform(20, 70))  # local spread of the ground glass density (HU)
    crazy_scale = 3.0 / px  # crazy-paving web: interlobular septa about 3 mm apart
    lung_z = np.flatnonzero(labels.reshape(nz, -1).any(axis=1))
    for z in lung_z:
        zm = (z - fr.z0 + 0.5) * dz
        lab = labels[z]
        lobe = _lobes(lab, np.float32(zm), ym[:, None], xm[None, :], fr.H, fr.y_c, fr.depth, fr.x_mid)
        perturb = _smooth_noise(rng, (ny, nx), 2.0 / px)
        ggo, cons = plan.slice_fields(float(zm), ym, xm, lobe, perturb=perturb)
        if ggo is None:
            continue
        inside = lab > 0
        h = hu[z].astype(np.float32)
        base = ndi.gaussian_filter(h, 1.5 / px)
        pt = _smooth_noise(rng, (ny, nx), 6.0 / px)
        target = plan.ggo_hu + ggo_var * pt
        delta = ggo * np.clip(target - base, 0.0, None)  # vessels brighter than the target stay
        if plan.crazy > 0:
            web = np.clip(1.0 - np.abs(_smooth_noise(rng, (ny, nx), crazy_scale / 2.5)) / 0.3, 0.0, 1.0)
            delta += ggo * plan.crazy * web
        h += delta
        # the outline an annotator draws: the opacity and the vessels running through it
        les = (ggo > 0.5) & ((delta > 60.0) | (base > target))
        if cons is not None:
            cons = cons * np.where(base < AIRWAY_HU, 0.1, 1.0)  # air bronchograms
            tissue = plan.cons_hu + 25.0 * pt + noise_sd * rng.standard_normal((ny, nx)).astype(np.float32)
            h += cons * (tissue - h)
            les |= cons > 0.5
        les &= inside
        # outside the lungs nothing changes (the fields can reach the chest wall)
        h = np.where(inside, h, hu[z])
        out[z] = np.clip(np.rint(h), -1024, 3071).astype(np.int16)
        lesion[z] = les
    return out, lesion


# ----------------------------------------------------------------------------- training sets

#: cases per background: kind -> count (training; validation uses later draws)
TRAIN_KINDS = {"covid": 6, "cap": 3, "normal": 2}
VAL_KINDS = {"covid": 2, "cap": 1, "normal": 1}
#: validation draws start here, so that no insertion is in both sets
VAL_DRAW0 = 1000


def usable_backgrounds(root: Path, held_out: tuple[str, ...] = (), min_lung_ml: float = 400.0,
                       log=logger.info) -> list[Background]:
    """The backgrounds under ``root`` that are not held out and whose lungs (lung U-Net)
    are at least ``min_lung_ml`` (a chest, not an abdomen with lung bases); each one
    skipped is logged with its reason."""
    keep = []
    for bg in discover_backgrounds(root):
        if is_held_out(bg, held_out):
            log(f"background {bg.name}: held out")
            continue
        try:
            ml = load_background(bg.path).lung_ml
        except Exception as exc:  # one unreadable series must not stop training
            log(f"background {bg.name}: skipped ({exc})")
            continue
        if ml < min_lung_ml:
            log(f"background {bg.name}: skipped (lungs {ml:.0f} ml < {min_lung_ml:.0f} ml)")
            continue
        keep.append(bg)
    return keep


def background_fit_cases(root: Path, held_out: tuple[str, ...] = (), train_kinds: dict | None = None,
                         val_kinds: dict | None = None, log=logger.info) -> tuple[list, list]:
    """(training, validation) background cases of every usable background under ``root``:
    the same real scans in both, with different insertions (draws)."""
    bgs = usable_backgrounds(root, held_out, log=log)
    return (background_cases(bgs, train_kinds or TRAIN_KINDS),
            background_cases(bgs, val_kinds or VAL_KINDS, first_draw=VAL_DRAW0))
