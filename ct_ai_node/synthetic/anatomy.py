"""Chest anatomy of the phantom: patient parameters and per-slice rendering of
everything outside the lung parenchyma (body, fat, muscle, bones, mediastinum,
heart, great vessels, airways, upper abdomen), plus the lung masks, lobes and
helper coordinates the lung renderer needs.

Model coordinates (mm): x towards the patient's LEFT (LPS x), y towards
POSTERIOR (LPS y), z towards the HEAD; origin in-plane at the thoracic-cavity
centre, z = 0 at the lowest point of the lungs (posterior costophrenic recess),
z = H at the lung apices. The image grid maps onto these coordinates with a
scale factor so that any field of view holds the whole chest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------- parameters


@dataclass
class Tube:
    """A straight tube (capsule) between two points (model mm, (x, y, z))."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r: float
    kind: str  # "blood", "air", "soft"
    wall: float = 0.0  # wall thickness for airways
    margin: float = 5.0  # mediastinal fat margin around it


@dataclass
class Patient:
    H: float  # lung height (base to apex), mm
    ac: float  # cavity half width
    bca: float  # cavity half depth, anterior
    bcp: float  # cavity half depth, posterior
    p_cav: float  # superellipse exponent of the cavity (anterior half)
    p_cav_post: float  # ... posterior half
    fat: float  # subcutaneous fat thickness (lateral), mm
    fat_ant: float
    fat_post: float
    muscle: float  # lateral chest-wall muscle
    pect: float  # anterior (pectoral) muscle
    back: float  # posterior paraspinal muscle
    p_body: float
    dome_r: float  # right dome top height (mm above base)
    dome_l: float
    rib_period: float
    rib_descent: float
    rib_h: float
    rib_t: float
    rib_z1: float  # z of rib 1 posteriorly
    vert_period: float
    vert_phase: float
    x_mid: float  # mediastinal midline
    med_w: float  # half width of the upper mediastinum (mm, near the spine)
    heart: tuple  # (cx, cy, cz, A, B, C, angle)
    contrast: float  # 0 = none, else HU of enhanced blood
    hu: dict = field(default_factory=dict)  # tissue HU values
    tubes: list = field(default_factory=list)
    shoulder: float = 30.0  # extra half width at shoulder level
    arms: dict | None = None  # arms down beside the chest (ICU-style scans), else None
    effusion: dict | None = None  # dependent pleural fluid (not lung), else None
    female: bool = False
    breast: float = 0.0
    fissure_tilt: tuple = (0.0, 0.0)
    stomach_gas: float = 0.0
    bowel_gas: list = field(default_factory=list)
    #: food in the stomach (mottled soft tissue with gas bubbles), else None (draw_stomach_food)
    stomach_food: dict | None = None

    @property
    def body_half_width(self) -> float:
        return self.ac + self.rib_t + 2 + self.muscle + self.fat + 2

    @property
    def body_ant(self) -> float:
        return self.bca + self.rib_t + 2 + self.pect + self.fat_ant + self.breast

    @property
    def body_post(self) -> float:
        return self.bcp + self.rib_t + 2 + self.back + self.fat_post


def draw_patient(rng: np.random.Generator) -> Patient:
    u = rng.random
    habitus = float(rng.beta(2.0, 2.5))  # 0 thin .. 1 obese
    frame = float(rng.normal(0.0, 1.0))
    ac = float(np.clip(123 + 9 * frame, 100, 148))
    bca = float(ac * rng.uniform(0.6, 0.72))
    bcp = float(bca * rng.uniform(1.1, 1.28))
    H = float(np.clip(rng.normal(250, 18) + 8 * frame, 205, 300))
    fat = 4 + 42 * habitus ** 1.8 + rng.uniform(-1, 4)
    female = bool(u() < 0.45)
    breast = float(rng.uniform(0, 30) * (0.5 + habitus)) if female else 0.0
    contrast = 0.0
    if u() < 0.3:
        contrast = float(rng.uniform(140, 320))
    hu = dict(
        fat=float(rng.uniform(-110, -85)),
        muscle=float(rng.uniform(40, 60)),
        blood=float(rng.uniform(35, 50)),
        myocard=float(rng.uniform(38, 50)),
        liver=float(rng.uniform(50, 68)),
        spleen=float(rng.uniform(42, 52)),
        soft=float(rng.uniform(25, 45)),
        cortical=float(rng.uniform(650, 1000)),
        cancellous=float(rng.uniform(170, 300)),
        cartilage=float(rng.uniform(90, 220)),
        med_fat=float(rng.uniform(-105, -75)),
        table=float(rng.uniform(150, 450)),
    )
    if contrast:
        hu["myocard"] = float(rng.uniform(80, 120))
    dome_r = float(H * rng.uniform(0.2, 0.32))
    dome_l = float(dome_r - rng.uniform(8, 25))
    hA = float(rng.uniform(0.4, 0.48) * ac)
    hB = float(rng.uniform(0.33, 0.4) * ac)
    h_ang = float(np.deg2rad(rng.uniform(25, 45)))
    ap_half = float(np.hypot(hA * np.sin(h_ang), hB * np.cos(h_ang)))
    heart_c = (
        float(rng.uniform(0.14, 0.26) * ac),
        # the heart lies against the anterior chest wall (behind the sternum)
        float(-bca + ap_half * rng.uniform(0.82, 0.98)),
        float(dome_l + rng.uniform(0.1, 0.16) * H + 25),
        hA, hB,
        float(rng.uniform(0.2, 0.25) * H),
        h_ang,
    )
    p = Patient(
        H=H, ac=ac, bca=bca, bcp=bcp, p_cav=float(rng.uniform(1.6, 1.95)), p_cav_post=float(rng.uniform(2.0, 2.4)),
        fat=float(fat), fat_ant=float(fat * rng.uniform(0.7, 1.1)), fat_post=float(fat * rng.uniform(0.8, 1.3)),
        muscle=float(rng.uniform(6, 14)), pect=float(rng.uniform(8, 22)), back=float(rng.uniform(22, 36)),
        p_body=float(rng.uniform(2.1, 2.8)),
        dome_r=dome_r, dome_l=dome_l,
        rib_period=float(H * rng.uniform(0.085, 0.1)), rib_descent=float(H * rng.uniform(0.38, 0.5)),
        rib_h=float(rng.uniform(7.5, 11)), rib_t=float(rng.uniform(7, 10)),
        rib_z1=float(H * rng.uniform(1.0, 1.06)),
        vert_period=float(H * rng.uniform(0.085, 0.1)), vert_phase=float(u()),
        x_mid=float(rng.uniform(-3, 6)), med_w=float(rng.uniform(20, 34)), heart=heart_c, contrast=contrast, hu=hu,
        female=female, breast=breast, shoulder=float(rng.uniform(15, 45)),
        fissure_tilt=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
        stomach_gas=float(rng.uniform(0, 1) if u() < 0.7 else 0.0),
    )
    if rng.random() < 0.25:
        p.arms = dict(gap=float(rng.uniform(3, 25)), ra=float(rng.uniform(34, 48)), rb=float(rng.uniform(42, 58)),
                      fat=float(np.clip(fat * rng.uniform(0.5, 1.0), 3, 30)), lift=float(rng.uniform(0, 10)),
                      in_fov=bool(rng.random() < 0.5))
    if rng.random() < 0.12:
        side = str(rng.choice(["right", "left", "both"], p=[0.4, 0.25, 0.35]))
        p.effusion = dict(side=side, depth=float(rng.uniform(8, 40)), top=float(rng.uniform(0.3, 0.75) * H),
                          hu=float(rng.uniform(2, 22)), atel=float(rng.uniform(3, 9)))
    p.tubes = _mediastinal_tubes(p, rng)
    for _ in range(int(rng.integers(0, 5))):
        p.bowel_gas.append((float(rng.uniform(-0.2, 0.8) * ac), float(rng.uniform(-0.7, 0.3) * bca),
                            float(rng.uniform(-60, dome_l * 0.3)), float(rng.uniform(6, 22))))
    return p


def draw_stomach_food(rng: np.random.Generator, p: Patient, probability: float = 0.6) -> dict | None:
    """Food in the stomach with ``probability``: a mottled soft-tissue matrix (-40..60 HU)
    filling the stomach from a random level back, holding 15-90 gas bubbles of 1.5-7 mm
    radius (model mm, in the stomach ellipsoid of ``Anatomy._abdomen``)."""
    if rng.random() >= probability:
        return None
    cx, cy, cz = 0.42 * p.ac, -0.28 * p.bca, p.dome_l - 40.0
    ax, ay, az = 0.3 * p.ac * 0.85, 0.42 * p.bca * 0.85, 60.0 * 0.85
    n = int(rng.integers(15, 91))
    u = rng.normal(size=(n, 3))
    u *= (rng.uniform(0, 1, n) ** (1 / 3) / np.linalg.norm(u, axis=1))[:, None]
    # bubbles crowd the upper (cranial) stomach, which lies under the dome
    u[:, 2] = np.abs(u[:, 2]) * (1.0 if rng.random() < 0.7 else np.sign(rng.normal()))
    r = rng.uniform(1.5, 7.0, n)
    bubbles = [(float(cx + a * ax), float(cy + b * ay), float(cz + c * az), float(rr)) for (a, b, c), rr in zip(u, r)]
    return dict(hu=float(rng.uniform(-40, 60)), var=float(rng.uniform(10, 60)),
                wl=[float(v) for v in rng.uniform(3, 9, 2)], ph=[float(v) for v in rng.uniform(0, 2 * np.pi, 2)],
                y_top=float(cy - ay * rng.uniform(0.2, 1.0)), bubbles=bubbles)


def _mediastinal_tubes(p: Patient, rng) -> list[Tube]:
    H, ac, bca = p.H, p.ac, p.bca
    j = lambda s: float(rng.normal(0, s))  # noqa: E731
    y_vb = p.bcp - 22
    y_eso = y_vb - 15 - 9
    y_tr = y_eso - 17
    zc = H * (0.6 + j(0.02))  # carina
    t: list[Tube] = []
    # trachea and main bronchi (air, wall)
    rt = float(np.clip(9.5 + j(1.0), 7.5, 12))
    t.append(Tube((-1, y_tr, H * 1.3), (-1 + j(2), y_tr, zc + 6), rt, "air", wall=1.8, margin=4))
    hil_r = (-0.44 * ac, y_tr + 18 + j(4), zc - 22 + j(4))
    hil_l = (0.45 * ac, y_tr + 24 + j(4), zc - 36 + j(4))
    t.append(Tube((-1, y_tr, zc + 6), (-0.27 * ac, y_tr + 6, zc - 14), rt * 0.75, "air", wall=1.6, margin=3))
    t.append(Tube((-0.27 * ac, y_tr + 6, zc - 14), hil_r, rt * 0.55, "air", wall=1.0, margin=1))
    t.append(Tube((-1, y_tr, zc + 6), (0.3 * ac, y_tr + 14, zc - 28), rt * 0.7, "air", wall=1.6, margin=3))
    t.append(Tube((0.3 * ac, y_tr + 14, zc - 28), hil_l, rt * 0.55, "air", wall=1.0, margin=1))
    # oesophagus
    t.append(Tube((6, y_eso, H * 1.3), (14, y_eso + 4, -60), 7.5, "soft", margin=4))
    # aorta: ascending, arch, descending
    ra = float(np.clip(14 + j(1.5), 11, 19))
    z_arch = zc + H * 0.08 + j(5)
    hx, hy, hz = p.heart[:3]
    a0 = (hx - 0.28 * ac, hy + 10, hz + 0.05 * H)
    a1 = (-0.1 * ac, -0.35 * bca, z_arch - 15)
    a2 = (0.0, -0.1 * bca, z_arch + 5)
    a3 = (0.15 * ac, y_vb - 40, z_arch + 2)
    a4 = (0.2 * ac, y_vb - 12, z_arch - 20)
    a5 = (0.17 * ac, y_vb - 6, -80)
    for q0, q1 in ((a0, a1), (a1, a2), (a2, a3), (a3, a4), (a4, a5)):
        t.append(Tube(q0, q1, ra, "blood", margin=5))
    # supra-aortic vessels
    for xo, rr in ((-0.12 * ac, 6.5), (0.02 * ac, 4.5), (0.12 * ac, 5.0)):
        t.append(Tube((xo * 0.5, a2[1] + 10, z_arch), (xo * 1.6, a2[1] + 5, H * 1.35), rr, "blood", margin=4))
    # SVC and brachiocephalic veins
    t.append(Tube((-0.28 * ac, -0.2 * bca, hz + 0.1 * H), (-0.26 * ac, -0.25 * bca, z_arch + 25), 9.5, "blood", margin=4))
    t.append(Tube((-0.26 * ac, -0.25 * bca, z_arch + 25), (-0.35 * ac, -0.3 * bca, H * 1.35), 7.5, "blood", margin=4))
    t.append(Tube((-0.26 * ac, -0.25 * bca, z_arch + 25), (0.45 * ac, -0.35 * bca, z_arch + 45), 5.5, "blood", margin=3))
    # pulmonary trunk and arteries to the hila
    pt0 = (hx - 0.05 * ac, hy - 0.2 * bca, hz + 0.12 * H)
    pt1 = (0.06 * ac, -0.2 * bca, zc - 4)
    rp = float(np.clip(13 + j(1.5), 10, 17))
    t.append(Tube(pt0, pt1, rp, "blood", margin=4))
    t.append(Tube(pt1, (0.3 * ac, hil_l[1] - 12, zc - 8), rp * 0.75, "blood", margin=3))
    t.append(Tube((0.3 * ac, hil_l[1] - 12, zc - 8), (hil_l[0] + 4, hil_l[1] - 2, hil_l[2] + 8), rp * 0.6, "blood", margin=1))
    t.append(Tube(pt1, (-0.15 * ac, -0.05 * bca, zc - 14), rp * 0.75, "blood", margin=3))
    t.append(Tube((-0.15 * ac, -0.05 * bca, zc - 14), (hil_r[0] + 6, hil_r[1] - 10, hil_r[2] + 2), rp * 0.6, "blood", margin=1))
    # pulmonary veins into the left atrium
    la = (hx - 0.1 * ac, hy + 0.45 * p.heart[4], hz + 0.05 * H)
    for side in (-1, 1):
        for dz in (12, -12):
            end = (side * 0.42 * ac, la[1] + 12, la[2] + dz * 1.6)
            t.append(Tube(la, end, 6.5, "blood", margin=1))
    p.hila = dict(right=hil_r, left=hil_l, carina=(-1, y_tr, zc), z_arch=z_arch,
                  vein_r=(-0.42 * ac, la[1] + 12, la[2]), vein_l=(0.42 * ac, la[1] + 12, la[2]))
    return t


# ------------------------------------------------------------ slice geometry

NT = 2048  # angular resolution of the outline look-up tables


@dataclass
class SliceOut:
    hu: np.ndarray | None  # float32 (ny, nx); lung voxels hold 0 (filled by the lung renderer)
    label: np.ndarray  # uint8, 1 right lung, 2 left lung
    lobe: np.ndarray | None  # uint8 lobe id inside lungs (1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL)
    post: np.ndarray | None  # float32 dependent-position coordinate in [0, 1] (1 = most posterior)
    fissure: np.ndarray | None  # float32 distance to the nearest fissure (mm)
    body: np.ndarray | None = None  # bool, inside the patient's skin
    dense: np.ndarray | None = None  # bool, compressed (atelectatic) lung next to an effusion
    pleura: np.ndarray | None = None  # float32, distance to the chest wall (mm, radial), lungs only


class Grid2D:
    """In-plane model coordinates (mm) of an image grid, with per-grid caches."""

    def __init__(self, y: np.ndarray, x: np.ndarray, p_cav: float = 2.0, p_body: float = 2.0):
        self.y1 = np.asarray(y, np.float32)
        self.x1 = np.asarray(x, np.float32)
        Y, X = np.meshgrid(self.y1, self.x1, indexing="ij")
        self.X, self.Y = X, Y
        self.R = np.sqrt(X * X + Y * Y) + np.float32(1e-3)
        th = np.arctan2(Y, X)  # -pi..pi
        self.ang = np.clip(((th + np.pi) / (2 * np.pi) * NT).astype(np.int32), 0, NT - 1)
        self.S = (Y / self.R).astype(np.float32)
        self.phi = np.arctan2(np.abs(X), Y).astype(np.float32)  # 0 posterior midline .. pi anterior
        self.cache: dict = {}

    def window(self, mask: np.ndarray, pad: int = 2):
        """Bounding slices of a 2-D mask (or None)."""
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(mask.any(axis=0))
        ny, nx = mask.shape
        return (slice(max(0, rows[0] - pad), min(ny, rows[-1] + pad + 1)),
                slice(max(0, cols[0] - pad), min(nx, cols[-1] + pad + 1)))


_TH = (np.arange(NT) + 0.5) / NT * 2 * np.pi - np.pi
_TC = np.abs(np.cos(_TH))
_TS = np.sin(_TH)


def outline_table(a: float, b_ant: float, b_post: float, p: float, p_post: float | None = None) -> np.ndarray:
    """Radius of the superellipse |x/a|^p + |y/b|^p = 1 for each table angle
    (b = b_post and exponent p_post where y > 0, i.e. posterior)."""
    b = np.where(_TS > 0, b_post, b_ant)
    pp = np.where(_TS > 0, p if p_post is None else p_post, p)
    return ((_TC ** pp) * a ** -pp + (np.abs(_TS) ** pp) * b ** -pp) ** (-1.0 / pp)


def _smoothstep(x):
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3 - 2 * t)


class Anatomy:
    """Renders axial slices of one patient's chest (model coordinates)."""

    def __init__(self, p: Patient):
        self.p = p
        self.y_vb = p.bcp - 30.0
        self.k_obl = 0.32 * p.H / (0.5 * (p.bca + p.bcp))

    # --- z profiles -------------------------------------------------------
    def cavity_axes(self, z: float) -> tuple[float, float, float]:
        p = self.p
        t = z / p.H
        widen = 1.0 + 0.05 * float(np.clip(0.45 - t, 0.0, 0.45)) / 0.45
        e = float(np.clip((t - 0.55) / 0.65, 0.0, 1.0))
        g = float(np.sqrt(max(0.0, 1.0 - e * e)))
        return p.ac * widen * (0.72 + 0.28 * g), p.bca * widen * (0.55 + 0.45 * g), p.bcp * widen * (0.85 + 0.15 * g)

    def body_axes(self, z: float) -> tuple[float, float, float]:
        p = self.p
        t = z / p.H
        sh = float(_smoothstep((t - 0.62) / 0.38))
        a = p.body_half_width + p.shoulder * sh
        ba = p.bca + p.rib_t + 2 + p.pect + p.fat_ant + p.breast * float(_smoothstep((0.65 - abs(t - 0.42)) / 0.3))
        return a, ba, p.body_post

    def lobe_planes(self, X, Y):
        p = self.p
        right = X < p.x_mid
        ft = np.where(right, p.fissure_tilt[0], p.fissure_tilt[1])
        z_obl = np.where(right, 0.4 * p.H, 0.43 * p.H) + self.k_obl * Y + ft * np.abs(X)
        z_hor = 0.56 * p.H + 0.05 * X
        return z_obl.astype(np.float32), z_hor.astype(np.float32)

    def _prepare(self, g: Grid2D) -> dict:
        c = g.cache
        if c.get("_anat") is self:
            return c
        c.clear()
        c["_anat"] = self
        p = self.p
        X, Y = g.X, g.Y
        c["right"] = X < p.x_mid
        # diaphragm domes
        xd, yd = 0.33 * p.ac, -0.2 * p.bca
        dy = Y - yd
        Dy = np.where(dy < 0, 1.6 * p.bca, 0.95 * (p.bcp - yd))
        q = ((np.abs(X) - xd) / (0.52 * p.ac)) ** 2 + (dy / Dy) ** 2
        zd = np.where(c["right"], p.dome_r, p.dome_l) * (1.0 - q)
        c["zd"] = np.maximum(zd, -0.12 * p.H).astype(np.float32)
        # apices: the allowed in-plane ellipse shrinks linearly in area from z0 up
        # to the apex (a paraboloid), centred postero-laterally
        xa = np.where(c["right"], -0.45 * p.ac, 0.45 * p.ac)
        ya = 0.2 * p.bcp
        Ay = np.where(Y < ya, 1.45 * p.bca, 0.95 * p.bcp)
        c["qa"] = (((X - xa) / (0.62 * p.ac)) ** 2 + ((Y - ya) / Ay) ** 2).astype(np.float32)
        c["z_ap"] = np.where(c["right"], p.H + 4.0, p.H).astype(np.float32)
        # heart (in-plane quadratic form; the z factor is applied per slice)
        hx, hy, hz, A, B, C, ang = p.heart
        ca, sa = np.cos(ang), np.sin(ang)
        U = (X - hx) * ca - (Y - hy) * sa
        V = (X - hx) * sa + (Y - hy) * ca
        c["qh"] = ((U / A) ** 2 + (V / B) ** 2).astype(np.float32)
        c["qh_m"] = ((U / (A + 3)) ** 2 + (V / (B + 3)) ** 2).astype(np.float32)
        c["strip"] = ((np.abs(X - p.x_mid) < 2.5) & (Y < -0.3 * p.bca)) | ((np.abs(X) < 16.0) & (Y > self.y_vb))
        # upper mediastinal envelope: narrow behind the sternum, wider towards the spine
        shape_y = 0.4 + 0.6 * np.clip((Y + p.bca) / (0.75 * (p.bca + self.y_vb)), 0.0, 1.0)
        c["med_env"] = np.where(Y < self.y_vb + 4, np.abs(X - p.x_mid - 4.0) / shape_y, 1e3).astype(np.float32)
        c["q_vb"] = ((X / 17.0) ** 2 + ((Y - self.y_vb) / 14.0) ** 2).astype(np.float32)
        # lobes and dependent coordinate
        c["z_obl"], c["z_hor"] = self.lobe_planes(X, Y)
        c["post"] = np.clip((Y + p.bca) / (p.bca + p.bcp), 0.0, 1.0).astype(np.float32)
        # fat thickness per direction (anterior / lateral / posterior)
        Sp = np.maximum(g.S, 0.0)
        Sn = np.maximum(-g.S, 0.0)
        c["fat_t"] = (p.fat + (p.fat_ant - p.fat) * Sn * Sn + (p.fat_post - p.fat) * Sp * Sp).astype(np.float32)
        # ribs: posterior-to-anterior descent
        c["zk"] = (p.rib_z1 - p.rib_descent * (g.phi / np.pi) ** 1.25).astype(np.float32)
        # table and mattress (z invariant)
        bg = np.full(X.shape, -1000.0, np.float32)
        y_t = p.body_post + 6.0 + 0.0006 * X * X
        bg[(Y > y_t + 1.6) & (Y < y_t + 25.8) & (np.abs(X) < 228)] = -940.0
        tbl = ((np.abs(Y - y_t) < 1.6) | (np.abs(Y - y_t - 28.0) < 2.2)) & (np.abs(X) < 230)
        bg[tbl] = p.hu["table"]
        c["bg"] = bg
        return c

    # --- slice ------------------------------------------------------------
    def render(self, z: float, g: Grid2D, need_hu: bool = True) -> SliceOut:
        p = self.p
        c = self._prepare(g)
        R = g.R
        hu_ = p.hu
        a_c, bca, bcp = self.cavity_axes(z)
        r_cav = outline_table(a_c, bca, bcp, p.p_cav, p.p_cav_post).astype(np.float32)[g.ang]
        cavity = R < r_cav
        zd = c["zd"]
        above = z > zd
        lungable = (R < r_cav - 1.5) & above
        z0 = 0.4 * p.H
        if z > z0:
            lungable &= c["qa"] < (c["z_ap"] - z) / (c["z_ap"] - z0)
        win = g.window(lungable, pad=4)
        # mediastinum
        hx, hy, hz, A, B, C, ang = p.heart
        wz = 1.0 - ((z - hz) / C) ** 2
        wz2 = 1.0 - ((z - hz) / (C + 3)) ** 2
        t = z / p.H
        vs = 0.82 + 0.18 * float(np.clip(1.0 - t, 0.0, 1.0))
        med = c["strip"] | (c["q_vb"] < 1.6 * vs * vs)
        w_env = p.med_w * float(_smoothstep((t - 0.45) / 0.18))
        if w_env > 0:
            med |= c["med_env"] < w_env
        if wz2 > 0:
            med |= (c["qh_m"] < wz2) & (z > zd - 4)
        heart = (c["qh"] < wz) & (z > zd - 2) if wz > 0 else None
        tube_hits = []
        for tb in p.tubes:
            d2, box = _tube_dist2(tb, z, g)
            if d2 is None:
                continue
            sl = (slice(box[0], box[1]), slice(box[2], box[3]))
            med[sl] |= d2 < (tb.r + tb.margin) ** 2
            tube_hits.append((tb, d2, sl))
        lung = lungable & ~med
        right = c["right"]
        eff = None
        eff_atel = None
        if p.effusion is not None and z < p.effusion["top"] and win is not None:
            e = p.effusion
            depth = e["depth"] * float(np.sqrt(max(0.0, 1.0 - max(0.0, z) / e["top"])))
            # a dependent crescent along the posterior chest wall (meniscus), thickest posteriorly
            thick = depth * np.clip((g.S - 0.15) / 0.85, 0.0, 1.0) ** 0.7
            d_wall = r_cav - R
            eff = lung & (d_wall < thick)
            if e["side"] != "both":
                eff &= right if e["side"] == "right" else ~right
            lung = lung & ~eff
            eff_atel = lung & (d_wall < thick + e["atel"] * (thick > 1.0))
            if e["side"] != "both":
                eff_atel &= right if e["side"] == "right" else ~right
        label = np.zeros(R.shape, np.uint8)
        if win is not None:
            lw = lung[win]
            lab_w = label[win]
            lab_w[lw] = 2
            lab_w[lw & right[win]] = 1
        if not need_hu:
            return SliceOut(None, label, None, None, None)

        # --- HU ---------------------------------------------------------
        hu = c["bg"].copy()
        a_b, ba_b, bp_b = self.body_axes(z)
        r_body = outline_table(a_b, ba_b, bp_b, p.p_body).astype(np.float32)[g.ang]
        body = R < r_body
        hu[body] = hu_["soft"]
        hu[R < r_body - 1.8] = hu_["fat"]
        hu[R < r_body - 1.8 - c["fat_t"]] = hu_["muscle"]
        hu[cavity] = hu_["med_fat"]
        if p.arms is not None and z < 1.12 * p.H:
            self._arms(z, g, hu)
        abd = cavity & ~above
        wa = g.window(abd)
        if wa is not None:
            self._abdomen(z, g, wa, zd[wa], abd[wa], hu)
        hu[cavity & above & (z < zd + 4.5)] = hu_["muscle"]  # diaphragm
        if heart is not None:
            hu[heart] = hu_["myocard"]
            if p.contrast:
                hu[heart & (c["qh"] < 0.6 * wz)] = p.contrast
        blood = p.contrast if p.contrast else hu_["blood"]
        for tb, d2, sl in tube_hits:
            inside = d2 < tb.r ** 2
            sub = hu[sl]
            if tb.kind == "blood":
                sub[inside] = blood
            elif tb.kind == "air":
                sub[inside] = hu_["soft"]
                sub[d2 < (tb.r - tb.wall) ** 2] = -1000.0
            else:
                sub[inside] = hu_["soft"]
        self._bones(z, g, r_cav, r_body, hu)
        hu[lung] = 0.0
        if eff is not None:
            hu[eff] = p.effusion["hu"]
        lobe = np.zeros(R.shape, np.uint8)
        d_fis = None
        if win is not None:
            zo = c["z_obl"][win]
            zh = c["z_hor"][win]
            lab_w = label[win]
            lower = z < zo
            lob = lobe[win]
            r_ = lab_w == 1
            l_ = lab_w == 2
            lob[r_] = 1
            lob[r_ & ~lower & (z < zh)] = 2
            lob[r_ & lower] = 3
            lob[l_] = 4
            lob[l_ & lower] = 5
            d = np.abs(z - zo) / np.float32(np.sqrt(1.0 + self.k_obl ** 2))
            d = np.where(r_ & ~lower, np.minimum(d, np.abs(z - zh)), d)
            d_fis = np.full(R.shape, 1e3, np.float32)
            d_fis[win] = d
        pleura = None
        if win is not None:
            pleura = np.full(R.shape, 1e3, np.float32)
            pleura[win] = (r_cav[win] - R[win])
        return SliceOut(hu, label, lobe, c["post"], d_fis, body, eff_atel, pleura)

    # --- helpers ----------------------------------------------------------
    def arm_centres(self, z: float):
        p = self.p
        a = p.arms
        t = z / p.H
        merge = float(_smoothstep((t - 0.8) / 0.3))
        off = p.body_half_width + a["gap"] * (1 - merge) + a["ra"] * (1 - 0.5 * merge) + p.shoulder * merge * 0.3
        cy = p.body_post - a["rb"] - a["lift"]  # resting on the table
        return [(-off, cy), (off, cy)]

    def _arms(self, z, g: Grid2D, hu):
        p = self.p
        a = p.arms
        h = p.hu
        for cx, cy in self.arm_centres(z):
            ix0, ix1 = np.searchsorted(g.x1, [cx - a["ra"] - 2, cx + a["ra"] + 2])
            iy0, iy1 = np.searchsorted(g.y1, [cy - a["rb"] - 2, cy + a["rb"] + 2])
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            w = (slice(iy0, iy1), slice(ix0, ix1))
            X, Y = g.X[w] - cx, g.Y[w] - cy
            sub = hu[w]
            q = np.sqrt((X / a["ra"]) ** 2 + (Y / a["rb"]) ** 2)
            sub[q < 1] = h["soft"]
            sub[q < 1 - 1.8 / a["ra"]] = h["fat"]
            sub[q < 1 - (1.8 + a["fat"]) / a["ra"]] = h["muscle"]
            d2 = (X + 0.1 * a["ra"] * np.sign(cx)) ** 2 + Y ** 2
            sub[d2 < 11.0 ** 2] = h["cortical"]
            sub[d2 < 7.5 ** 2] = -40.0  # fatty marrow

    def _abdomen(self, z, g: Grid2D, w, zd, abd, hu_full):
        p = self.p
        h = p.hu
        X, Y = g.X[w], g.Y[w]
        hu = hu_full[w]
        x_lv = -0.05 * p.ac + 0.55 * p.ac * np.clip(-Y / p.bca, 0.0, 1.0)
        is_liver = X < x_lv
        hu[abd] = h["fat"] * 0.35 + h["soft"] * 0.65
        hu[abd & (is_liver | (z > zd - 6.0))] = h["liver"]
        qs = ((X - 0.68 * p.ac) / (0.2 * p.ac)) ** 2 + ((Y - 0.35 * p.bcp) / (0.42 * p.bcp)) ** 2 + ((z - p.dome_l + 50) / 48) ** 2
        hu[abd & (qs < 1) & ~is_liver] = h["spleen"]
        cz = p.dome_l - 40
        qst = ((X - 0.42 * p.ac) / (0.3 * p.ac)) ** 2 + ((Y + 0.28 * p.bca) / (0.42 * p.bca)) ** 2 + ((z - cz) / 60) ** 2
        st = abd & (qst < 1) & (z < zd - 4) & ~is_liver
        if st.any():
            hu[st] = h["soft"] + 10
            inner = st & (qst < 0.8)
            hu[inner] = 22.0
            if p.stomach_food is not None:
                self._food(z, X, Y, inner, hu)
            if p.stomach_gas > 0:
                y_lvl = -0.7 * p.bca + p.stomach_gas * 0.5 * p.bca
                hu[inner & (Y < y_lvl)] = -1000.0
        for gx, gy, gz, gr in p.bowel_gas:
            qg = ((X - gx) ** 2 + (Y - gy) ** 2 + (z - gz) ** 2) / gr ** 2
            m = abd & (qg < 1.3) & ~is_liver
            if m.any():
                hu[m] = h["soft"]
                hu[m & (qg < 1)] = -1000.0
        for sx in (-1, 1):
            qk = ((X - sx * 0.42 * p.ac) / 26) ** 2 + ((Y - 0.55 * p.bcp) / 32) ** 2 + ((z + 85) / 55) ** 2
            hu[abd & (qk < 1)] = 32.0
        hu_full[w] = hu

    def _food(self, z, X, Y, inner, hu):
        """Stomach contents: soft tissue of uneven density with gas bubbles. Under the left
        dome of a thick-slice scan this looks like consolidation with air bronchograms; a
        lung or opacity model that never saw it took it for lung (issue 12, Lung-PET-CT-Dx)."""
        f = self.p.stomach_food
        m = inner & (Y > f["y_top"])
        if not m.any():
            return
        Xm, Ym = X[m], Y[m]
        v = f["hu"] + f["var"] * np.cos(Xm / f["wl"][0] + f["ph"][0]) * np.cos(Ym / f["wl"][1] + f["ph"][1] + z / 23.0)
        for bx, by, bz, br in f["bubbles"]:
            dz2 = (z - bz) ** 2
            if dz2 >= br * br:
                continue
            v[(Xm - bx) ** 2 + (Ym - by) ** 2 < br * br - dz2] = -1000.0
        hu[m] = v

    def _bones(self, z, g: Grid2D, r_cav, r_body, hu):
        p = self.p
        h = p.hu
        c = g.cache
        cort, canc = h["cortical"], h["cancellous"]
        t = z / p.H
        # --- vertebra (local window)
        vs = 0.82 + 0.18 * float(np.clip(1.0 - t, 0.0, 1.0))
        ix0, ix1 = np.searchsorted(g.x1, [-40.0, 40.0])
        iy0, iy1 = np.searchsorted(g.y1, [self.y_vb - 20.0, self.y_vb + 75.0])
        if ix1 > ix0 and iy1 > iy0:
            w = (slice(iy0, iy1), slice(ix0, ix1))
            X, Y = g.X[w], g.Y[w]
            sub = hu[w]
            vrx, vry = 17.0 * vs, 14.0 * vs
            phase = ((z / p.vert_period) + p.vert_phase) % 1.0
            qv = (X / vrx) ** 2 + ((Y - self.y_vb) / vry) ** 2
            if phase < 0.17:
                sub[qv < 1] = 85.0
            else:
                sub[qv < 1] = cort
                sub[qv < 0.8] = canc
            yc = self.y_vb + vry + 8.5 * vs
            dc2 = X * X + (Y - yc) ** 2
            bone = (dc2 < (13.5 * vs) ** 2) & (Y > yc - 6)
            if phase > 0.25:
                bone |= (np.abs(X) < 4.5) & (Y > yc) & (Y < yc + 38 * vs)
                ux = np.abs(X)
                bone |= (ux > 8) & (ux < 32 * vs) & (np.abs(Y - (yc - 2 + 0.35 * (ux - 8))) < 4.5)
            sub[bone] = canc + 150
            sub[bone & ~((dc2 < (11.5 * vs) ** 2) | ((np.abs(X) < 2.8) & (Y > yc + 2)))] = cort * 0.9
            sub[dc2 < (7.5 * vs) ** 2] = 15.0
        # --- ribs (only on the pixels of the rib band)
        R = g.R
        rr_full = (R - (r_cav + 1.0)) / p.rib_t
        idx = np.flatnonzero((rr_full > 0) & (rr_full < 1))
        if idx.size:
            hf = hu.reshape(-1)
            rr = rr_full.reshape(-1)[idx]
            phi = g.phi.reshape(-1)[idx]
            kf = (c["zk"].reshape(-1)[idx] - z) / p.rib_period
            k = np.rint(kf)
            dz = (kf - k) * p.rib_period
            q = ((rr - 0.5) / 0.5) ** 2 + (dz / (0.5 * p.rib_h)) ** 2
            kk = k + 1
            end = np.where(kk <= 7, 2.75, np.where(kk <= 10, 2.45, 1.5 + 0.15 * (12 - kk)))
            cart_start = np.where(kk <= 7, 2.25, 2.05)
            valid = (kk >= 1) & (kk <= 12) & (phi > 0.2) & (phi < end) & (q < 1)
            vals = np.where(q < 0.45, canc, cort)
            vals = np.where(phi > cart_start, h["cartilage"], vals)
            hf[idx[valid]] = vals[valid]
        # --- sternum
        if 0.2 < t < 0.9:
            w_ = 7.0 if t < 0.3 else (25.0 if t > 0.76 else 15.0)
            th = 7.0 if t > 0.76 else 5.5
            a_c, bca, bcp = self.cavity_axes(z)
            yc_s = -(bca + 1.0 + th)
            ix0, ix1 = np.searchsorted(g.x1, [-w_ - 2, w_ + 2])
            iy0, iy1 = np.searchsorted(g.y1, [yc_s - th - 2, yc_s + th + 2])
            if ix1 > ix0 and iy1 > iy0:
                w = (slice(iy0, iy1), slice(ix0, ix1))
                qs = (g.X[w] / w_) ** 4 + ((g.Y[w] - yc_s) / th) ** 2
                sub = hu[w]
                sub[qs < 1] = cort
                sub[qs < 0.6] = canc
        # --- scapulae
        if 0.45 < t < 1.15:
            top = float(_smoothstep((t - 0.45) / 0.2))
            r0 = r_cav + p.rib_t + 4.0
            sc = (R > r0) & (R < r0 + 4.5) & (g.phi > 0.6) & (g.phi < 0.6 + 0.85 * top) & (R < r_body - c["fat_t"] - 1)
            hu[sc] = cort * 0.8
        # --- clavicles
        if t > 0.9:
            a_b, ba_b, bp_b = self.body_axes(z)
            ax = np.abs(g.X)
            z_cl = p.H * 1.04 + 0.12 * ax
            y_cl = -(ba_b - p.fat_ant - 10.0) + 0.25 * ax
            dq = ((z - z_cl) / 8.0) ** 2 + ((g.Y - y_cl) / 7.0) ** 2
            cl = (dq < 1) & (ax > 14) & (ax < 0.8 * a_b)
            hu[cl] = np.where(dq[cl] < 0.5, canc, cort)


def _tube_dist2(tb: Tube, z: float, g: Grid2D):
    """Squared 3-D distance from the slice pixels to the tube axis, in the
    tube's bounding box on this slice; (None, None) if the slice misses it."""
    x0, y0, z0 = tb.p0
    x1, y1, z1 = tb.p1
    reach = tb.r + tb.margin
    if z < min(z0, z1) - reach or z > max(z0, z1) + reach:
        return None, None
    d = np.array([x1 - x0, y1 - y0, z1 - z0], np.float64)
    L2 = float(d @ d) + 1e-9
    if abs(d[2]) > 1e-6:
        ta = (z - reach - z0) / d[2]
        tb_ = (z + reach - z0) / d[2]
        lo, hi = max(0.0, min(ta, tb_)), min(1.0, max(ta, tb_))
    else:
        lo, hi = 0.0, 1.0
    xs = (x0 + lo * d[0], x0 + hi * d[0])
    ys = (y0 + lo * d[1], y0 + hi * d[1])
    ix0, ix1 = np.searchsorted(g.x1, [min(xs) - reach, max(xs) + reach])
    iy0, iy1 = np.searchsorted(g.y1, [min(ys) - reach, max(ys) + reach])
    if ix1 <= ix0 or iy1 <= iy0:
        return None, None
    Xs = g.x1[ix0:ix1][None, :]
    Ys = g.y1[iy0:iy1][:, None]
    px, py, pz = Xs - x0, Ys - y0, np.float32(z - z0)
    tt = np.clip((px * np.float32(d[0]) + py * np.float32(d[1]) + pz * np.float32(d[2])) / np.float32(L2), 0.0, 1.0)
    ex = px - tt * np.float32(d[0])
    ey = py - tt * np.float32(d[1])
    ez = pz - tt * np.float32(d[2])
    return ex * ex + ey * ey + ez * ez, (iy0, iy1, ix0, ix1)
