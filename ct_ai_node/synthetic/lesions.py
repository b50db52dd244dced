"""Lesions (ground truth) and distractors.

Planning happens on a coarse analysis grid of the lungs (about 3 mm): foci are
placed, shaped by smooth noise and their threshold is solved so that the lesion
occupies the drawn fraction of the lung. Rendering interpolates the coarse
fields onto each full-resolution slice (two small matrix products) and turns
them into HU changes:

- covid: bilateral, multifocal, subpleural, posterior and lower-lobe predominant
  ground glass (-700..-350 HU, vessels stay visible because they are mixed in
  afterwards), sometimes consolidation cores and crazy paving;
- cap: lobar or segmental consolidation (-50..+50 HU) bounded by the fissure
  planes of its lobe, air bronchograms (airway lumens stay air), a thin GGO rim;
- distractors (not in the mask): dependent atelectasis, a small solid nodule,
  centrilobular emphysema, a lobulated, spiculated solid mass (a lung cancer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .fields import SmoothField, smoothstep


def linear_matrix(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """(len(fine), len(coarse)) linear interpolation matrix (coarse ascending, uniform)."""
    c0 = coarse[0]
    st = coarse[1] - coarse[0] if len(coarse) > 1 else 1.0
    u = np.clip((fine - c0) / st, 0, len(coarse) - 1)
    i0 = np.clip(np.floor(u).astype(np.int64), 0, max(0, len(coarse) - 2))
    f = u - i0
    m = np.zeros((len(fine), len(coarse)), np.float32)
    rows = np.arange(len(fine))
    m[rows, i0] = 1 - f
    if len(coarse) > 1:
        m[rows, np.minimum(i0 + 1, len(coarse) - 1)] += f
    return m


@dataclass
class CoarseLungs:
    """Lungs on the coarse analysis grid (model mm)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    label: np.ndarray  # uint8 (z, y, x)
    lobe: np.ndarray  # uint8
    step: float

    def voxel_ml(self):
        return self.step ** 3 / 1000.0


@dataclass
class LesionPlan:
    kind: str
    coarse: CoarseLungs | None = None
    F: np.ndarray | None = None  # main extent field (coarse)
    Fc: np.ndarray | None = None  # consolidation field (coarse), default F
    tau_ggo: float = 1e9
    w_ggo: float = 0.1
    tau_cons: float = 1e9
    w_cons: float = 0.05
    rough: float = 1.0  # border roughness (in units of w_ggo)
    ggo_hu: float = -550.0
    cons_hu: float = 0.0
    crazy: float = 0.0  # crazy-paving line amplitude (HU)
    lobes: tuple = ()  # CAP: lobes the consolidation is confined to
    params: dict = field(default_factory=dict)
    distractors: dict = field(default_factory=dict)
    fine_field: SmoothField | None = None
    var_field: SmoothField | None = None
    _my: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- render
    def slice_fields(self, zm: float, ym: np.ndarray, xm: np.ndarray, lobe_slice: np.ndarray | None,
                     perturb: np.ndarray | None = None, win=None):
        """(ggo density, consolidation density) on one full-res slice (or window),
        or (None, None). ``perturb`` (unit-variance texture) roughens the borders."""
        if self.F is None:
            return None, None
        c = self.coarse
        if zm < c.z[0] - c.step or zm > c.z[-1] + c.step:
            return None, None
        key = (len(ym), len(xm), float(ym[0]), float(xm[0]))
        if key not in self._my:
            self._my.clear()
            self._my[key] = (linear_matrix(ym, c.y), linear_matrix(xm, c.x))
        my, mx = self._my[key]
        if win is not None:
            my, mx = my[win[0]], mx[win[1]]
        u = np.clip((zm - c.z[0]) / c.step, 0, len(c.z) - 1)
        i0 = int(min(np.floor(u), len(c.z) - 2)) if len(c.z) > 1 else 0
        f = float(u - i0)
        i1 = min(i0 + 1, len(c.z) - 1)
        Fz = self.F[i0] * (1 - f) + self.F[i1] * f
        if Fz.max() < self.tau_ggo - 2 * self.w_ggo:
            return None, None
        Ff = my @ Fz @ mx.T
        if perturb is not None:
            Ff = Ff + (self.rough * self.w_ggo) * perturb
        ggo = smoothstep((Ff - self.tau_ggo) / self.w_ggo + 0.5)
        cons = None
        if self.tau_cons < 1e8:
            if self.Fc is not None:
                Fcz = self.Fc[i0] * (1 - f) + self.Fc[i1] * f
                Fcf = my @ Fcz @ mx.T
                if perturb is not None:
                    Fcf = Fcf + (0.5 * self.w_cons) * perturb
            else:
                Fcf = Ff
            cons = smoothstep((Fcf - self.tau_cons) / self.w_cons + 0.5)
        if self.lobes and lobe_slice is not None:
            inl = np.isin(lobe_slice, self.lobes)
            if cons is not None:
                cons *= inl
            # the GGO rim may cross into neighbouring lung only slightly
            ggo *= np.where(inl, 1.0, 0.0)
        return ggo.astype(np.float32), (cons.astype(np.float32) if cons is not None else None)


def _pleura_distance(c: CoarseLungs) -> np.ndarray:
    lung = c.label > 0
    out = np.zeros(lung.shape, np.float32)
    sl = ndi.find_objects(lung.astype(np.uint8))
    if not sl or sl[0] is None:
        return out
    box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl[0])
    out[box] = ndi.distance_transform_edt(lung[box]) * c.step
    return out


def plan_lesions(kind: str, rng: np.random.Generator, c: CoarseLungs, H: float) -> LesionPlan:
    plan = LesionPlan(kind=kind, coarse=c)
    lung = c.label > 0
    n_lung = int(lung.sum())
    if kind == "normal" or n_lung == 0:
        return plan
    Z, Y, X = np.meshgrid(c.z, c.y, c.x, indexing="ij")
    box = ((c.z[0], c.z[-1]), (c.y[0], c.y[-1]), (c.x[0], c.x[-1]))
    noise = SmoothField(rng, box, 14.0).grid(c.z, c.y, c.x)
    if kind == "covid":
        sev = rng.random()
        if sev < 0.25:
            ratio = float(np.exp(rng.uniform(np.log(0.0008), np.log(0.005))))
            n_foci = int(rng.integers(2, 6))
        elif sev < 0.72:
            ratio = float(np.exp(rng.uniform(np.log(0.005), np.log(0.1))))
            n_foci = int(rng.integers(3, 12))
        else:
            ratio = float(rng.uniform(0.1, 0.5))
            n_foci = int(rng.integers(6, 16))
        dist = _pleura_distance(c)
        post = (Y - c.y[0]) / max(1e-6, c.y[-1] - c.y[0])
        low = np.clip(1.15 - Z / H, 0.05, 1.2)
        w = np.exp(-dist / 9.0) * (0.25 + post) ** 2 * low ** 1.5
        w = np.where(lung, w, 0).ravel()
        w /= w.sum()
        # bilateral: first two foci one per lung (mostly)
        idx = []
        lab_flat = c.label.ravel()
        bilateral = rng.random() < (0.93 if ratio > 0.005 else 0.75)
        for side in ((1, 2) if bilateral else (int(rng.integers(1, 3)),)):
            ws = np.where(lab_flat == side, w, 0)
            if ws.sum() > 0:
                idx.append(int(rng.choice(len(ws), p=ws / ws.sum())))
        while len(idx) < n_foci:
            if not bilateral:
                ws = np.where(lab_flat == lab_flat[idx[0]], w, 0)
                idx.append(int(rng.choice(len(ws), p=ws / ws.sum())))
            else:
                idx.append(int(rng.choice(len(w), p=w)))
        V_lung = n_lung * c.step ** 3
        V_each = ratio * V_lung / n_foci * rng.lognormal(0, 0.5, n_foci)
        F = np.full(lung.shape, -1.0, np.float32)
        cz, cy, cx = np.unravel_index(np.array(idx), lung.shape)
        for k in range(n_foci):
            r = (3 * V_each[k] / (4 * np.pi)) ** (1 / 3) * 1.25
            r = float(np.clip(r, 4.0, 120.0))
            ax = r * rng.uniform(0.6, 1.4, 3)
            # only the focus' bounding box (q < 1 + margin) matters: F starts at -1
            bb = []
            for coord, cc, a_ in ((c.z, c.z[cz[k]], ax[0]), (c.y, c.y[cy[k]], ax[1]), (c.x, c.x[cx[k]], ax[2])):
                i0, i1 = np.searchsorted(coord, [cc - 1.5 * a_, cc + 1.5 * a_])
                bb.append(slice(int(i0), int(max(i1, i0 + 1))))
            bb = tuple(bb)
            q = (((c.z[bb[0]] - c.z[cz[k]]) / ax[0]) ** 2)[:, None, None] \
                + (((c.y[bb[1]] - c.y[cy[k]]) / ax[1]) ** 2)[None, :, None] \
                + (((c.x[bb[2]] - c.x[cx[k]]) / ax[2]) ** 2)[None, None, :]
            np.maximum(F[bb], (1 - q).astype(np.float32), out=F[bb])
        F = F + 0.3 * noise
        # peripheral (subpleural) predominance: the deep central lung is involved last
        F -= 0.7 * np.clip((dist - 12.0) / 40.0, 0.0, 1.0)
        F[~lung] = -5.0
        vals = F[lung]
        tau = float(np.quantile(vals, 1.0 - ratio))
        plan.F = F.astype(np.float32)
        plan.tau_ggo = tau
        plan.w_ggo = float(rng.uniform(0.2, 0.45))
        plan.rough = float(rng.uniform(0.3, 0.7))
        plan.ggo_hu = float(rng.uniform(-680, -380))
        cons_frac = 0.0
        if rng.random() < 0.5:
            cons_frac = float(rng.uniform(0.03, 0.25))
            # consolidation: inside the lesions, dependent (posterior) and peripheral parts first
            Fc = F + 0.5 * (post - 0.5) - 0.01 * dist + 0.15 * SmoothField(rng, box, 8.0).grid(c.z, c.y, c.x)
            Fc = np.where(F > tau, Fc, -5.0).astype(np.float32)
            plan.Fc = Fc
            plan.tau_cons = float(np.quantile(Fc[lung], 1.0 - ratio * cons_frac))
            plan.w_cons = float(rng.uniform(0.12, 0.25))
            plan.cons_hu = float(rng.uniform(-90, 40))
        if rng.random() < 0.45:
            plan.crazy = float(rng.uniform(80, 220))
        plan.params = dict(lesion_ratio_target=ratio, n_foci=n_foci, bilateral=bool(bilateral),
                           ggo_hu=plan.ggo_hu, consolidation_fraction=cons_frac,
                           consolidation_hu=plan.cons_hu if cons_frac else None, crazy_paving=plan.crazy > 0)
    elif kind == "cap":
        # lobar / segmental consolidation
        lobe_w = {1: 0.22, 2: 0.12, 3: 0.26, 4: 0.16, 5: 0.24}
        lobes_present = [k for k in lobe_w if (c.lobe == k).any()]
        pw = np.array([lobe_w[k] for k in lobes_present])
        first = int(rng.choice(lobes_present, p=pw / pw.sum()))
        chosen = [first]
        if rng.random() < 0.25:
            same = [k for k in lobes_present if (k <= 3) == (first <= 3) and k != first]
            other = [k for k in lobes_present if (k <= 3) != (first <= 3)]
            pool = same if (rng.random() < 0.6 and same) else other
            if pool:
                chosen.append(int(rng.choice(pool)))
        F = np.full(lung.shape, -5.0, np.float32)
        seg_info = []
        for lb in chosen:
            m = c.lobe == lb
            inner = ndi.distance_transform_edt(m) * c.step
            deep = inner >= min(12.0, 0.6 * inner.max())
            zz, yy, xx = np.nonzero(deep)
            if rng.random() < 0.5:  # segmental: a ball well inside the lobe
                j = int(rng.integers(len(zz)))
                rad = float(rng.uniform(32, 65))
                d = np.sqrt((Z - c.z[zz[j]]) ** 2 + (Y - c.y[yy[j]]) ** 2 + (X - c.x[xx[j]]) ** 2)
                f = 1 - d / rad
                seg_info.append("segmental")
            else:  # lobar: the whole lobe, thinning towards the hilum
                f = np.full(lung.shape, 0.6, np.float32)
                seg_info.append("lobar")
            f = f + 0.3 * noise
            F = np.where(m, np.maximum(F, f), F)
        plan.F = F.astype(np.float32)
        plan.tau_cons = 0.0
        plan.w_cons = 0.06
        plan.tau_ggo = -float(rng.uniform(0.05, 0.2))
        plan.w_ggo = 0.1
        plan.ggo_hu = float(rng.uniform(-650, -450))
        plan.cons_hu = float(rng.uniform(-40, 45))
        plan.lobes = tuple(chosen)
        les = F > plan.tau_ggo
        plan.params = dict(lobes=chosen, extent=seg_info, consolidation_hu=plan.cons_hu,
                           lesion_ratio_estimate=float(les[lung].mean()),
                           unilateral=bool(len({k <= 3 for k in chosen}) == 1))
    return plan


def plan_distractors(kind: str, rng: np.random.Generator, c: CoarseLungs, H: float) -> dict:
    p = 0.65 if kind == "normal" else 0.3
    d: dict = {}
    if rng.random() < p:
        d["atelectasis"] = dict(width=float(rng.uniform(2.0, 7.0)), hu=float(rng.uniform(-450, -100)),
                                zmax=float(H * rng.uniform(0.25, 0.6)))
    if rng.random() < p * 0.6:
        lung_idx = np.argwhere(c.label > 0)
        if len(lung_idx):
            j = lung_idx[int(rng.integers(len(lung_idx)))]
            d["nodule"] = dict(z=float(c.z[j[0]]), y=float(c.y[j[1]]), x=float(c.x[j[2]]),
                               r=float(rng.uniform(2.5, 6.0)), hu=float(rng.uniform(-20, 60)))
    if rng.random() < p * 0.5:
        d["emphysema"] = dict(zmin=float(H * rng.uniform(0.45, 0.7)), density=float(rng.uniform(0.03, 0.15)),
                              hu=float(rng.uniform(-990, -955)))
    return d


def plan_mass(rng: np.random.Generator, c: CoarseLungs, probability: float = 0.3) -> dict | None:
    """A solid lung mass (not pneumonia, not in the lesion mask) with probability
    ``probability``: lobulated (three angular harmonics), 10-70 mm across, soft-tissue
    density, with 0-8 spicules reaching 4-15 mm into the lung; two in five lie against the
    hilum, where lung cancers often grow. Real non-COVID scans hold tumours like this;
    without them in training the opacity model took one for consolidation (issue 12: a
    Lung-PET-CT-Dx adenocarcinoma, 5-7 cm beside the right hilum)."""
    if rng.random() >= probability:
        return None
    lung_idx = np.argwhere(c.label > 0)
    if not len(lung_idx):
        return None
    if rng.random() < 0.4:
        # perihilar: the medial third of the lungs, between a quarter and three quarters up
        ax = np.abs(c.x[lung_idx[:, 2]])
        zq = c.z[lung_idx[:, 0]]
        z0, z1 = np.quantile(zq, [0.25, 0.75])
        near = (ax <= np.quantile(ax, 0.3)) & (zq >= z0) & (zq <= z1)
        if near.any():
            lung_idx = lung_idx[near]
    j = lung_idx[int(rng.integers(len(lung_idx)))]
    r = float(5.0 + 30.0 * rng.uniform(0.0, 1.0) ** 1.5)
    n_sp = int(rng.integers(0, 9))
    dirs = rng.normal(size=(n_sp, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-9
    lengths = rng.uniform(4.0, 15.0, n_sp)
    return dict(z=float(c.z[j[0]]), y=float(c.y[j[1]]), x=float(c.x[j[2]]), r=r,
                hu=float(rng.uniform(0.0, 60.0)), lobulation=float(rng.uniform(0.08, 0.25)),
                phases=[float(v) for v in rng.uniform(0, 2 * np.pi, 3)],
                spicules=[[float(v) for v in d] for d in dirs], spicule_mm=[float(v) for v in lengths],
                reach=float(r * 1.3 + (lengths.max() if n_sp else 0.0)))


def mass_slice(mass: dict, X: np.ndarray, Y: np.ndarray, z: float) -> np.ndarray:
    """Where the mass of :func:`plan_mass` is on the plane ``z`` (mm grids ``X``, ``Y``)."""
    dx, dy, dz = X - mass["x"], Y - mass["y"], z - mass["z"]
    d = np.sqrt(dx * dx + dy * dy + dz * dz)
    theta = np.arctan2(dy, dx)
    elev = np.arctan2(dz, np.hypot(dx, dy) + 1e-6)
    a, (p1, p2, p3) = mass["lobulation"], mass["phases"]
    r_eff = mass["r"] * (1.0 + a * (np.cos(3 * theta + p1) * np.cos(2 * elev + p2) + 0.5 * np.cos(5 * theta + p3)))
    inside = d < r_eff
    for u, length in zip(mass["spicules"], mass["spicule_mm"]):
        t = np.clip(dx * u[2] + dy * u[1] + dz * u[0], 0.0, mass["r"] + length)
        perp2 = (dx - t * u[2]) ** 2 + (dy - t * u[1]) ** 2 + (dz - t * u[0]) ** 2
        inside |= perp2 < (0.9 * (1.0 - t / (mass["r"] + length)) + 0.35) ** 2
    return inside
