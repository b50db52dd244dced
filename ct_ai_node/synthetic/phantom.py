"""The phantom generator: draws a patient and a scan, renders the chest slice by
slice, mixes in lung parenchyma, vessels, airways, lesions, distractors, then
reconstruction blur and CT noise.

Array convention (``Phantom``): (z, y, x); z index 0 = most INFERIOR slice,
y = anterior (0) -> posterior, x = patient right (0) -> patient left.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy, Grid2D, Patient, draw_patient, draw_stomach_food
from .fields import NoiseBank, SmoothField, TextureBank
from .lesions import CoarseLungs, mass_slice, plan_distractors, plan_lesions, plan_mass
from ._blas import single_threaded_blas
from .vessels import SplatVolume, grow_tree

KINDS = ("covid", "cap", "normal")
MURRAY = 2.7  # vessel radius ~ territory^(1/MURRAY)

#: bumped whenever a seed's phantom changes, so that caches of prepared phantoms made by an
#: earlier generator are not reused (2: issue 12 realism: gravity gradient, lung density,
#: noise texture, lung masses; 3: food in the stomach, larger and perihilar masses)
GENERATOR_VERSION = 3

#: stage timings (s) of the last ``generate_phantom`` call in this process
LAST_TIMINGS: dict[str, float] = {}

# (name, blur sigma in px at 0.7 mm, noise peak frequency (cycles/px), noise factor)
KERNELS = {
    "soft": [("B30f", 0.95, 0.16, 0.8), ("STANDARD", 0.9, 0.17, 0.85), ("FC17", 0.9, 0.17, 0.85), ("B", 0.85, 0.18, 0.9)],
    # medium peaks lowered from 0.22-0.23 (issue 12: real B40f noise is coarser, docs/evaluation/realism.md)
    "medium": [("B40f", 0.75, 0.16, 1.0), ("FC51", 0.7, 0.17, 1.05), ("YB", 0.75, 0.16, 1.0)],
    "sharp": [("B70f", 0.45, 0.33, 2.6), ("LUNG", 0.5, 0.3, 2.2), ("FC86", 0.45, 0.34, 2.5), ("BONE", 0.45, 0.35, 2.8)],
}


@dataclass
class Phantom:
    hu: np.ndarray  # int16 (z, y, x)
    lung_labels: np.ndarray  # uint8: 0 background, 1 right lung, 2 left lung
    lesion_mask: np.ndarray  # bool
    spacing: tuple[float, float, float]  # (z, y, x) mm
    kind: str
    seed: int
    params: dict = field(default_factory=dict)
    #: uint8: 0 outside the lungs, 1..5 the lobes in ``pipeline.types.LOBES`` order (right upper,
    #: middle, lower; left upper, lower), as the generator's fissure planes divide the lungs
    lobe_labels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


@dataclass
class ScanGeometry:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # physical mm
    s_xy: float  # physical mm per model mm in-plane
    s_z: float
    zm: np.ndarray  # model z of each slice
    ym: np.ndarray
    xm: np.ndarray
    thickness: float  # physical slice thickness


def _draw_geometry(rng, p: Patient, an: Anatomy, shape, spacing) -> ScanGeometry:
    m_inf = float(rng.uniform(15, 55))
    m_sup = float(rng.uniform(12, 40))
    z0, z1 = -m_inf, p.H + m_sup
    a_body = max(an.body_axes(z)[0] for z in (0.0, 0.5 * p.H, p.H, z1))
    if p.arms is not None and p.arms["in_fov"]:  # otherwise the arms are cut by the field of view
        a_body = max(a_body, max(abs(cx) + p.arms["ra"] for z in (0.0, 0.5 * p.H) for cx, _ in an.arm_centres(z)))
    width = 2 * a_body
    ant = an.body_axes(0.4 * p.H)[1]
    depth = ant + p.body_post + 45.0  # + table
    need = max(width, depth) * 1.04
    if shape is None or shape[0] == 0:
        # a realistic scan; shape (0, ny, nx) keeps its field of view and slices but
        # samples the plane with fewer pixels (cheaper training data for coarse inputs)
        ny, nx = (512, 512) if shape is None else (int(shape[1]), int(shape[2]))
        if spacing is None:
            fov = max(need * rng.uniform(1.02, 1.25), 0.55 * 512)
            px = min(0.9, fov / 512) * 512 / max(ny, nx)
            dz = float(rng.choice([0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0], p=[.08, .2, .2, .1, .1, .12, .05, .15]))
            spacing = (dz, px, px)
        nz = int(math.ceil((z1 - z0) / spacing[0]))
        shape = (nz, ny, nx)
    nz, ny, nx = shape
    if spacing is None:
        fov = need * rng.uniform(1.02, 1.2)
        px = fov / max(ny, nx)
        dz = (z1 - z0) / nz
        spacing = (dz, px, px)
    dz, dy, dx = (float(v) for v in spacing)
    fov_x, fov_y = nx * dx, ny * dy
    s_xy = min(1.0, fov_x / (width * 1.03), fov_y / (depth * 1.03))
    L = nz * dz
    s_z = min(1.0, L / (z1 - z0))
    # centre the scan on the chest (z), with the surplus split at random
    z_len_model = L / s_z
    z_start = z0 - rng.uniform(0, 1) * max(0.0, z_len_model - (z1 - z0))
    zm = z_start + (np.arange(nz) + 0.5) * dz / s_z
    c_y = (p.body_post + 45.0 - ant) / 2.0
    jx = rng.uniform(-0.03, 0.03) * fov_x
    jy = rng.uniform(-0.02, 0.02) * fov_y
    ym = ((np.arange(ny) - (ny - 1) / 2) * dy + jy) / s_xy + c_y
    xm = ((np.arange(nx) - (nx - 1) / 2) * dx + jx) / s_xy
    thickness = dz if dz >= 1.0 else float(rng.choice([dz, 1.0]))
    return ScanGeometry(tuple(shape), (dz, dy, dx), s_xy, s_z, zm, ym, xm, float(thickness))


def _coarse_lungs(an: Anatomy, geo: ScanGeometry, step: float) -> CoarseLungs:
    p = an.p
    y = np.arange(max(geo.ym[0], -p.bca - 12), min(geo.ym[-1], p.bcp + 12) + 1e-6, step)
    x = np.arange(max(geo.xm[0], -p.ac - 12), min(geo.xm[-1], p.ac + 12) + 1e-6, step)
    z = np.arange(max(geo.zm[0], -80.0), min(geo.zm[-1], p.H + 10) + 1e-6, step)
    g = Grid2D(y, x)
    lab = np.zeros((len(z), len(y), len(x)), np.uint8)
    lobe = np.zeros_like(lab)
    for i, zz in enumerate(z):
        o = an.render(float(zz), g, need_hu=False)
        lab[i] = o.label
    # lobes from the fissure geometry (same formulas as the full render)
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    k = 0.32 * p.H / (0.5 * (p.bca + p.bcp))
    right = X < p.x_mid
    ft = np.where(right, p.fissure_tilt[0], p.fissure_tilt[1])
    z_obl = np.where(right, 0.4 * p.H, 0.43 * p.H) + k * Y + ft * np.abs(X)
    lower = Z < z_obl
    z_hor = 0.56 * p.H + 0.05 * X
    lobe[lab == 1] = 1
    lobe[(lab == 1) & ~lower & (Z < z_hor)] = 2
    lobe[(lab == 1) & lower] = 3
    lobe[lab == 2] = 4
    lobe[(lab == 2) & lower] = 5
    return CoarseLungs(z, y, x, lab, lobe, step)


def _to_vox(geo: ScanGeometry, pts_zyx: np.ndarray) -> np.ndarray:
    """Model mm (z, y, x) -> voxel index coordinates."""
    out = np.empty_like(pts_zyx, dtype=np.float64)
    out[:, 0] = (pts_zyx[:, 0] - geo.zm[0]) / (geo.zm[1] - geo.zm[0] if len(geo.zm) > 1 else 1.0)
    out[:, 1] = (pts_zyx[:, 1] - geo.ym[0]) / (geo.ym[1] - geo.ym[0])
    out[:, 2] = (pts_zyx[:, 2] - geo.xm[0]) / (geo.xm[1] - geo.xm[0])
    return out


def _build_trees(rng, an: Anatomy, geo: ScanGeometry, c: CoarseLungs):
    """Vessel occupancy and airway (wall, lumen) splat volumes."""
    p = an.p
    px_model = (geo.xm[1] - geo.xm[0])
    dz_model = (geo.zm[1] - geo.zm[0]) if len(geo.zm) > 1 else px_model
    zr = px_model / dz_model
    vessels = SplatVolume(geo.shape, zr)
    walls = SplatVolume(geo.shape, zr)
    lumen = SplatVolume(geo.shape, zr)
    r_leaf = max(0.18, 0.25 * px_model)
    info = {}
    tree_store = []
    for side, lab in (("right", 1), ("left", 2)):
        cells = np.argwhere(c.label == lab)
        if len(cells) < 20:
            continue
        for tree_kind, root in (("artery", p.hila[side]), ("vein", p.hila["vein_r" if side == "right" else "vein_l"])):
            r_root = rng.uniform(6.0, 7.5) if tree_kind == "artery" else rng.uniform(5.5, 7.0)
            n_pts = int(np.clip((r_root / r_leaf) ** MURRAY, 200, 20000))
            j = rng.integers(0, len(cells), n_pts)
            pts = np.stack([c.z[cells[j, 0]], c.y[cells[j, 1]], c.x[cells[j, 2]]], 1)
            pts += rng.uniform(-0.5, 0.5, pts.shape) * c.step
            root_zyx = np.array([root[2], root[1], root[0]], np.float64)
            tr = grow_tree(pts, root_zyx, rng, r_leaf=r_root / n_pts ** (1 / MURRAY), murray=MURRAY,
                           frac=(0.45, 0.75))
            tree_store.append((side, tree_kind, tr))
            # the finest twigs (single-point territories) are below CT resolution: not drawn
            vis = tr.n >= 2
            a = _to_vox(geo, tr.p0[vis])
            b = _to_vox(geo, tr.p1[vis])
            vessels.add_segments(a, b, tr.r[vis] / px_model, ctrl=_to_vox(geo, tr.ctrl[vis]))
            info[f"{side}_{tree_kind}_segments"] = int(len(tr.r))
            if tree_kind == "artery":
                # bronchi run beside the arteries: offset each segment sideways
                big = tr.r > 0.55
                if big.any():
                    d = tr.p1[big] - tr.p0[big]
                    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
                    ref = np.array([0.0, 1.0, 0.0]) if side == "right" else np.array([0.0, 1.0, 0.3])
                    off = np.cross(d, ref)
                    off /= np.linalg.norm(off, axis=1, keepdims=True) + 1e-9
                    rb = tr.r[big] * 0.85
                    wall = np.maximum(0.3, 0.22 * rb)
                    shift = off * (tr.r[big] + rb + wall)[:, None]
                    a2 = _to_vox(geo, tr.p0[big] + shift)
                    b2 = _to_vox(geo, tr.p1[big] + shift)
                    vis = rb > 1.0
                    if vis.any():
                        walls.add_segments(a2[vis], b2[vis], (rb[vis] + wall[vis]) / px_model)
                        walls.add_segments(a2[vis], b2[vis], rb[vis] / px_model, weight=-1.0)
                    lumen.add_segments(a2, b2, rb / px_model)
    return vessels, walls, lumen, info, tree_store


def generate_phantom(seed: int, kind: str | None = None, shape: tuple[int, int, int] | None = None,
                     spacing: tuple[float, float, float] | None = None) -> Phantom:
    """A synthetic chest CT, deterministic per seed.

    ``kind``: "covid", "cap", "normal" or None (drawn from the seed). ``shape``
    (z, y, x) and ``spacing`` (z, y, x) mm: None draws a realistic scan (512x512,
    0.55-0.9 mm pixels, 0.8-5 mm slices covering the chest); ``shape`` (0, ny, nx)
    draws the same realistic scan sampled on ny x nx pixels (same patient, slices and,
    while the pixels stay under 2 mm, lesions; other texture); with any other given
    shape the anatomy is scaled to fit the field of view. Arrays are (z, y, x) with z
    index 0 the most inferior slice, y anterior -> posterior, x patient right ->
    left.
    """
    with single_threaded_blas():
        return _generate(int(seed), kind, shape, spacing)


def _generate(seed, kind, shape, spacing) -> Phantom:
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    if kind is None:
        kind = str(rng.choice(KINDS))
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    # draws added in issue 12 (realism) come from their own stream, so that every earlier
    # draw of a seed (patient, geometry, lesions) stays what it was
    rng_real = np.random.default_rng([seed, 12])
    peak_f, sharp_f, coarse_u = (float(v) for v in rng_real.uniform([0.75, 1.0, 0.0], [1.25, 1.45, 1.0]))
    p = draw_patient(rng)
    # generator 3 draws (issue 12: what real thick-slice negatives were mistaken for)
    p.stomach_food = draw_stomach_food(np.random.default_rng([seed, 13]), p)
    an = Anatomy(p)
    geo = _draw_geometry(rng, p, an, shape, spacing)
    nz, ny, nx = geo.shape
    dz, dy, dx = geo.spacing
    px_model = dx / geo.s_xy
    dz_model = dz / geo.s_z
    # scan / reconstruction
    family = str(rng.choice(["soft", "medium", "sharp"], p=[0.45, 0.3, 0.25]))
    kname, blur0, fpk, nfac = KERNELS[family][int(rng.integers(len(KERNELS[family])))]
    blur_px = float(np.clip(blur0 * 0.7 / dx * rng.uniform(0.85, 1.15), 0.35, 1.3))
    # realism (issue 12): noise peak random +-25 % per scan; sharp kernels up to 3.8x as
    # noisy as medium ones (real B70f / B40f of one acquisition: 3.6x)
    fpk *= peak_f
    if family == "sharp":
        nfac *= sharp_f
    size_factor = (p.body_half_width / 160.0) ** 1.5
    # measured on real scans: soft-tissue noise ~15 HU at 5 mm, ~20 at 2.5 mm, ~40 at 1.25 mm
    # (standard kernels); sharp kernels 2-3x; air outside the body about 0.4x
    noise_sd = float(np.clip(21.0 * (2.5 / geo.thickness) ** 0.6 * rng.uniform(0.7, 1.3) * nfac * size_factor, 7, 90))
    if shape is not None and shape[0] == 0:
        # the same scan on coarser pixels: each averages more of the 512-matrix noise
        # (a half on a 256 matrix); real resampled volumes keep more and whiter noise, so
        # randomise between that and the full-resolution level
        noise_sd *= (max(geo.shape[1:]) / 512) ** coarse_u
    # lung density: non-dependent level, supine gravity gradient (measured on real
    # scans: about -930 anteriorly to -720 in the dependent lung), slight apex-base gradient
    # (issue 12: -945..-875 left the phantoms' median lung 15-70 HU below real scans once
    # the gravity gradient was halved; shifted and widened, per patient)
    lung_hu0 = float(rng.uniform(-935, -835))
    # measured on real scans (docs/evaluation/realism.md): posterior minus anterior third
    # +23 to +42 HU, about half of this parameter; was 80-190 (twice the real gradient)
    # drawn so that most scans sit in the real range and a tail reaches the old, stronger
    # gradients (shallow inspiration, dependent haze): 40-190 HU, median about 80
    grav = 40.0 + 150.0 * float(rng.uniform(0.0, 1.0)) ** 2
    grav_exp = float(rng.uniform(1.3, 2.2))
    cc_grad = float(rng.uniform(0, 35))
    sharpen = float(rng.uniform(0.25, 0.6)) if family == "sharp" else 0.0

    # coarse lungs, lesions, trees
    tm = LAST_TIMINGS
    tm.clear()
    t0 = time.perf_counter()
    c = _coarse_lungs(an, geo, step=max(3.0, 1.5 * px_model))
    tm["coarse"] = time.perf_counter() - t0
    plan = plan_lesions(kind, rng, c, p.H)
    distract = plan_distractors(kind, rng, c, p.H)
    mass = plan_mass(rng_real, c)
    if mass is not None:
        distract["mass"] = mass
    tm["plan"] = time.perf_counter() - t0 - tm["coarse"]
    vessels, walls, lumen, tree_info, trees = _build_trees(rng, an, geo, c)
    for sv in (vessels, walls, lumen):
        sv.finalize()
    tm["trees"] = time.perf_counter() - t0 - tm["coarse"] - tm["plan"]
    t_anat = t_lung = t_post = 0.0
    t_prep0 = time.perf_counter()
    box = ((geo.zm[0] - 5, geo.zm[-1] + 5), (geo.ym[0], geo.ym[-1]), (geo.xm[0], geo.xm[-1]))
    tex = SmoothField(rng, box, 10.0)  # regional lung density variation
    px_phys = dx
    zstep = lambda mm: mm / dz_model  # noqa: E731  (z node spacing in slices)
    micro = TextureBank(rng, nz, ny, nx, corr_px=1.6 / px_phys, z_step=zstep(2.0))
    patchy = TextureBank(rng, nz, ny, nx, corr_px=8.0 / px_phys, z_step=zstep(6.0))
    lines = TextureBank(rng, nz, ny, nx, corr_px=4.0 / px_phys, z_step=zstep(3.0)) if plan.F is not None else None
    reticular = float(rng.uniform(25, 90))  # fine septal lines inside every GGO
    ggo_micro = float(rng.uniform(20, 45))  # fine-scale heterogeneity inside GGO
    noise_bank = NoiseBank(rng, ny, nx, f_peak=fpk * (0.7 / max(dx, 0.3)) ** 0.3, n_bank=8 if nx >= 384 else 12)

    g = Grid2D(geo.ym, geo.xm)
    n_sub = int(np.clip(round(geo.thickness / (2.5 * geo.s_z)), 1, 3))
    sub_off = (np.arange(n_sub) - (n_sub - 1) / 2) * (geo.thickness / geo.s_z) / n_sub

    hu_out = np.empty(geo.shape, np.int16)
    lab_out = np.zeros(geo.shape, np.uint8)
    lobe_out = np.zeros(geo.shape, np.uint8)
    les_out = np.zeros(geo.shape, bool)
    blood = p.contrast if p.contrast else p.hu["blood"]
    tex_amp = float(rng.uniform(10, 24))
    micro_amp = float(rng.uniform(8, 22))
    fis_amp = float(rng.uniform(0, 350)) if rng.random() < 0.7 else 0.0
    ggo_var = float(rng.uniform(20, 70))  # local spread of GGO density (HU)
    tex_m = tex.matrices(geo.zm, geo.ym, geo.xm)
    nod = distract.get("nodule")
    emph = distract.get("emphysema")
    atel = distract.get("atelectasis")
    noise_prev = None
    tm["prep"] = time.perf_counter() - t_prep0
    rho = 0.0 if dz >= 2.0 else float(np.clip(0.6 - 0.3 * dz, 0.0, 0.5))
    for iz in range(nz):
        zc = float(geo.zm[iz])
        t1 = time.perf_counter()
        acc = None
        lungfrac = None
        centre = None
        for k, off in enumerate(sub_off):
            o = an.render(zc + float(off), g)
            lm = o.label > 0
            base = lung_hu0 + grav * o.post ** grav_exp + cc_grad * float(np.clip(0.6 - zc / p.H, -0.4, 0.6))
            h = o.hu
            h[lm] = base[lm]
            if o.dense is not None:
                h[o.dense] = -180.0 + 60.0 * float(np.sin(zc))
            if acc is None:
                acc = h
                lungfrac = lm.astype(np.float32)
            else:
                acc += h
                lungfrac += lm
            if k == n_sub // 2:
                centre = o
        if n_sub > 1:
            acc /= n_sub
            lungfrac /= n_sub
        hu = acc
        lab = centre.label
        t2 = time.perf_counter()
        t_anat += t2 - t1
        les = None
        win = g.window(lungfrac > 0, pad=3)
        if win is not None:
            # everything lung-specific happens in the lungs' bounding window
            h = hu[win]
            lf = lungfrac[win]
            lb = lab[win] > 0
            tz = np.tensordot(tex_m[0][iz], tex.lattice, axes=(0, 0))
            tx2 = tex_m[1][win[0]] @ tz @ tex_m[2][win[1]].T
            h += lf * (tex_amp * tx2 + micro_amp * micro.slice(iz, win))
            if fis_amp > 0 and centre.fissure is not None:
                h += lf * fis_amp * np.exp(-(centre.fissure[win] / 0.7) ** 2) * lb
            # distractors (not part of the lesion mask)
            if atel is not None and zc < atel["zmax"] and centre.pleura is not None:
                # dependent subpleural atelectasis: a thin band along the posterior chest wall
                band = atel["width"] * (1.0 + 0.4 * patchy.slice(iz, win))
                da = np.clip((band - centre.pleura[win]) / 1.0, 0, 1) * (centre.post[win] > 0.55) * lb
                h += lf * da * (atel["hu"] - h)
            if emph is not None and zc > emph["zmin"]:
                holes = (patchy.slice(iz, win) > 1.9 - 5 * emph["density"]) & lb
                h[holes] = emph["hu"] + 8 * micro.slice(iz, win)[holes]
            # lesions
            pt = patchy.slice(iz, win)
            ggo, cons = plan.slice_fields(zc, geo.ym, geo.xm, centre.lobe[win] if centre.lobe is not None else None,
                                          perturb=pt, win=win)
            if ggo is not None:
                ggo *= lf
                target = plan.ggo_hu + ggo_var * pt
                het = np.clip(0.85 + 0.15 * pt, 0.55, 1.0)
                delta_g = ggo * het * (target - h)
                if lines is not None:
                    web = np.exp(-(lines.slice(iz, win) / 0.22) ** 2)
                    delta_g += ggo * ((reticular + plan.crazy) * web + ggo_micro * micro.slice(iz, win))
                h += delta_g
                # ground truth: the lesion's extent (as an annotator outlines it), where it
                # raises the density by a clearly visible amount
                les = (ggo > 0.5) & (delta_g > 60.0)
                if cons is not None:
                    cons *= lf * np.clip(0.8 + 0.25 * pt, 0.4, 1.0)
                    h += cons * (plan.cons_hu + 25 * pt + 20 * micro.slice(iz, win) - h)
                    les |= cons > 0.5
                les &= lb
            if nod is not None and abs(zc - nod["z"]) < nod["r"] + dz_model:
                dd = (g.X[win] - nod["x"]) ** 2 + (g.Y[win] - nod["y"]) ** 2 + (zc - nod["z"]) ** 2
                h[(dd < nod["r"] ** 2) & lb] = nod["hu"]
            if mass is not None and abs(zc - mass["z"]) < mass["reach"]:
                m = mass_slice(mass, g.X[win], g.Y[win], zc) & lb
                h[m] = mass["hu"] + 12.0 * micro.slice(iz, win)[m]
                if les is not None:
                    les &= ~m  # a tumour is not an opacity of pneumonia
            # vessels and airways (partial volume occupancy); vessels look fuller in inflamed lung
            v = vessels.slice(iz)
            if v is not None:
                v = v[win]
                if ggo is not None:
                    v *= 1.0 + 0.6 * ggo
                np.clip(v, 0, 1, out=v)
                v *= lf
                h += v * (blood - h)
            w = walls.slice(iz)
            if w is not None:
                w = w[win]
                np.clip(w, 0, 1, out=w)
                w *= lf
                h += w * (p.hu["soft"] - h)
            lu = lumen.slice(iz)
            if lu is not None:
                lu = lu[win]
                np.clip(lu, 0, 1, out=lu)
                lu *= lf
                h += lu * (-1000.0 - h)
            hu[win] = h
        t3 = time.perf_counter()
        t_lung += t3 - t2
        # reconstruction blur and noise
        hu = ndi.gaussian_filter(hu, blur_px, mode="nearest", truncate=3.0)
        if sharpen > 0:  # edge-enhancing (sharp / lung) reconstruction kernels
            hu += sharpen * (hu - ndi.gaussian_filter(hu, 1.6, mode="nearest", truncate=3.0))
        nz_slice = noise_bank.draw()
        if noise_prev is not None and rho > 0:
            nz_slice = rho * noise_prev + math.sqrt(1 - rho * rho) * nz_slice
        noise_prev = nz_slice
        # noise is lower in the air around the patient (about 0.4x, measured on real scans)
        hu += nz_slice * np.where(centre.body, np.float32(noise_sd), np.float32(0.4 * noise_sd))
        np.clip(hu, -1024, 3071, out=hu)
        hu_out[iz] = np.rint(hu)
        lab_out[iz] = lab
        if centre.lobe is not None:
            lobe_out[iz] = np.where(lab > 0, centre.lobe, 0)
        if les is not None:
            les_out[iz][win] = les
        t_post += time.perf_counter() - t3
    tm["setup"] = t0 - t_start
    tm.update(anatomy=t_anat, lung=t_lung, blur_noise=t_post, total=time.perf_counter() - t_start)
    ratio = float(les_out.sum() / max(1, (lab_out > 0).sum()))
    params = dict(
        kind=kind, seed=int(seed), shape=list(geo.shape), spacing=[float(v) for v in geo.spacing],
        slice_thickness=float(geo.thickness), scale_inplane=float(geo.s_xy), scale_z=float(geo.s_z),
        kernel=kname, kernel_family=family, blur_px=blur_px, noise_sd=noise_sd, noise_peak_cycles_px=fpk,
        coarse_noise_exponent=coarse_u,
        lung_hu=lung_hu0, gravity_gradient_hu=grav, gravity_exponent=grav_exp, contrast_hu=float(p.contrast),
        patient=dict(lung_height_mm=p.H, cavity_half_width_mm=p.ac, fat_mm=p.fat, female=p.female,
                     body_width_mm=2 * p.body_half_width,
                     stomach_food_bubbles=0 if p.stomach_food is None else len(p.stomach_food["bubbles"])),
        lesion=plan.params, distractors=sorted(distract), lesion_lung_ratio=ratio,
        lung_volume_ml=float((lab_out > 0).sum() * dz * dy * dx / 1000.0),
        lesion_volume_ml=float(les_out.sum() * dz * dy * dx / 1000.0),
        trees=tree_info,
    )
    return Phantom(hu_out, lab_out, les_out, (float(dz), float(dy), float(dx)), kind, int(seed), params,
                   lobe_labels=lobe_out)


def phantom_volume(ph: Phantom):
    """A phantom as the pipeline sees a loaded series (``volume.types.Volume``, axial, no
    DICOM round trip)."""
    from ct_ai_node.volume.types import SliceRef, Volume

    dz = ph.spacing[0]
    slices = [SliceRef(f"2.25.{ph.seed}.{z}", "1.2.840.10008.5.1.4.1.1.2", z + 1, None, (0.0, 0.0, z * dz))
              for z in range(ph.hu.shape[0])]
    return Volume(hu=ph.hu.astype(np.float32), spacing=tuple(ph.spacing), orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                  slices=slices, datasets=[], study_instance_uid="2.25.1", series_instance_uid=f"2.25.{ph.seed}",
                  frame_of_reference_uid=None)
