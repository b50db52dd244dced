"""The pattern of the opacities -> three-class case result.

What tells COVID-19 pneumonia from other pneumonia on CT is where and what the opacities
are (RSNA / CO-RADS reporting language): COVID-19 gives bilateral, multifocal,
peripheral, posterior and lower-zone ground glass, with consolidation later; bacterial
pneumonia gives lobar or segmental consolidation, often one-sided; nodules and tumours are
few, compact and solid; a normal scan has (next to) no opacity. A classifier of texture
alone learns whatever separates its training images (on phantoms: phantom versus real
lung), so the case decision here reads the trained opacity segmentation instead, through
a handful of interpretable features, and a small multinomial logistic regression fitted
on validation cases that include real negatives (``ct-ai-node calibrate pattern``).

Pure logic: arrays in, numbers out (no I/O).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ct_ai_node.pipeline.geometry import superior_last
from ct_ai_node.pipeline.types import CASE_CLASSES, LEFT_LUNG, RIGHT_LUNG

#: HU from which an opacity counts as consolidation (ground glass below); the usual
#: split of quantitative CT severity scoring
CONSOLIDATION_HU = -300.0
#: features are computed on a grid this coarse in-plane (mm) (distances, components)
FEATURE_PIXEL_MM = 3.0

FEATURES = (
    "extent",  # log10 of the opacity's share of the lungs in % (+0.01)
    "bilateral",  # min(right, left) / total opacity: 0 one-sided .. 0.5 symmetric
    "peripheral",  # share of the opacity in the outer third of the lung (distance to the pleura)
    "lower",  # share of the opacity in the lower half of the lungs' height
    "posterior",  # share of the opacity in the posterior half of the lungs' depth
    "consolidation",  # share of the opacity at or above CONSOLIDATION_HU
    "foci",  # log(1 + number of separate opacities of at least 0.5 ml)
    "largest",  # share of the opacity in its largest focus
)


#: a slice's opacity score is one half where the opacity covers this share of the slice's
#: lung, and at least SLICE_HALF_MM2 (the rule that labels training slices positive)
SLICE_HALF_FRACTION = 0.005
SLICE_HALF_MM2 = 40.0


def slice_opacity_scores(infection: np.ndarray, lung: np.ndarray, spacing) -> np.ndarray:
    """Per slice ``a / (a + h)``: ``a`` the opacity's area, ``h`` the larger of
    :data:`SLICE_HALF_MM2` and :data:`SLICE_HALF_FRACTION` of the slice's lung area; 0 on
    slices without lung. Monotone in the opacity's area, 0.5 at the slice-label rule."""
    px = float(spacing[1]) * float(spacing[2])
    n = infection.shape[0]
    a = (infection & lung).reshape(n, -1).sum(axis=1) * px
    lung_a = lung.reshape(n, -1).sum(axis=1) * px
    h = np.maximum(SLICE_HALF_MM2, SLICE_HALF_FRACTION * lung_a)
    s = a / (a + h)
    s[lung_a == 0] = 0.0
    return s.astype(np.float32)


def consolidation_mask(hu: np.ndarray, infection: np.ndarray) -> np.ndarray:
    """The part of ``infection`` at or above :data:`CONSOLIDATION_HU` (HU averaged over
    3x3 pixels so that noise does not speckle the split)."""
    out = np.zeros(infection.shape, bool)
    zs = np.flatnonzero(infection.reshape(infection.shape[0], -1).any(axis=1))
    for z in zs:
        m = infection[z]
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = max(ys.min() - 1, 0), ys.max() + 2, max(xs.min() - 1, 0), xs.max() + 2
        local = ndi.uniform_filter(hu[z, y0:y1, x0:x1].astype(np.float32), 3)
        out[z, y0:y1, x0:x1] = m[y0:y1, x0:x1] & (local >= CONSOLIDATION_HU)
    return out


def _posterior_down(orientation) -> bool:
    """True when the row index runs anterior -> posterior (column direction towards +y LPS)."""
    return float(orientation[4]) >= 0.0


def _lung_box(lung: np.ndarray, fy: int, fx: int) -> tuple[slice, slice, slice] | None:
    """The lungs' slices and their in-plane box widened by one coarse pixel (so that
    lung never touches the box's edge where it did not touch the volume's), its start on
    the coarse grid's phase (multiples of ``fy``, ``fx``): features computed inside it
    equal those of the whole volume. None without lung."""
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    ys = np.flatnonzero(lung[zs[0] : zs[-1] + 1].any(axis=(0, 2)))
    xs = np.flatnonzero(lung[zs[0] : zs[-1] + 1].any(axis=(0, 1)))
    y0, x0 = max(0, (ys[0] - fy) // fy * fy), max(0, (xs[0] - fx) // fx * fx)
    return (slice(zs[0], zs[-1] + 1), slice(y0, ys[-1] + 1 + fy), slice(x0, xs[-1] + 1 + fx))


def pattern_features(hu: np.ndarray, spacing, orientation, lung_labels: np.ndarray, infection: np.ndarray,
                     consolidation: np.ndarray | None = None) -> dict[str, float]:
    """The :data:`FEATURES` of one scan (all 0 but ``extent`` when there is no opacity)."""
    dz, dy, dx = (float(v) for v in spacing)
    lung = lung_labels > 0
    fy, fx = max(1, int(round(FEATURE_PIXEL_MM / dy))), max(1, int(round(FEATURE_PIXEL_MM / dx)))
    box = _lung_box(lung, fy, fx)
    if box is not None:  # the same features on the lungs' box: a fraction of the voxels
        lung, lung_labels, infection, hu = lung[box], lung_labels[box], infection[box], hu[box]
        consolidation = None if consolidation is None else consolidation[box]
    vox = dz * dy * dx / 1000.0
    lung_ml = float(lung.sum()) * vox
    inf = infection & lung
    n_inf = int(inf.sum())
    les_ml = n_inf * vox
    f = {k: 0.0 for k in FEATURES}
    f["extent"] = math.log10(100.0 * les_ml / max(lung_ml, 1e-6) + 0.01)
    if n_inf == 0:
        return f
    right = float((inf & (lung_labels == RIGHT_LUNG)).sum())
    left = float((inf & (lung_labels == LEFT_LUNG)).sum())
    f["bilateral"] = min(right, left) / max(right + left, 1.0)
    cons = consolidation if consolidation is not None else consolidation_mask(hu, inf)
    f["consolidation"] = float((cons & inf).sum()) / n_inf

    # height and depth of the lungs, by slice and row counts of opacity
    zs = np.flatnonzero(lung.reshape(lung.shape[0], -1).any(axis=1))
    z_mid = (zs[0] + zs[-1]) / 2.0
    per_z = inf.reshape(inf.shape[0], -1).sum(axis=1).astype(np.float64)
    lower_half = np.arange(inf.shape[0]) < z_mid if superior_last(orientation) else np.arange(inf.shape[0]) > z_mid
    f["lower"] = float(per_z[lower_half].sum() / n_inf)
    rows = np.flatnonzero(lung.any(axis=(0, 2)))
    y_mid = (rows[0] + rows[-1]) / 2.0
    per_y = inf.sum(axis=(0, 2)).astype(np.float64)
    post_half = np.arange(inf.shape[1]) > y_mid if _posterior_down(orientation) else np.arange(inf.shape[1]) < y_mid
    f["posterior"] = float(per_y[post_half].sum() / n_inf)

    # peripheral share and foci on a coarse grid (3 mm pixels; slices as they are)
    lung_c = lung[:, ::fy, ::fx]
    inf_c = inf[:, ::fy, ::fx]
    if not inf_c.any():  # opacity thinner than the coarse grid: take the full grid
        lung_c, inf_c, fy, fx = lung, inf, 1, 1
    peripheral = 0.0
    for z in np.flatnonzero(inf_c.reshape(inf_c.shape[0], -1).any(axis=1)):
        depth = ndi.distance_transform_edt(lung_c[z], sampling=(dy * fy, dx * fx))
        labels, n = ndi.label(lung_c[z])
        if n == 0:
            continue
        deepest = ndi.maximum(depth, labels, index=np.arange(1, n + 1))
        rel = depth / np.maximum(np.concatenate([[1.0], deepest])[labels], 1e-6)
        peripheral += float((inf_c[z] & (rel <= 1.0 / 3.0)).sum())
    f["peripheral"] = peripheral / max(float(inf_c.sum()), 1.0)
    comp, n = ndi.label(inf_c)
    if n:
        sizes = np.bincount(comp.ravel())[1:].astype(np.float64) * dz * dy * fy * dx * fx / 1000.0
        f["foci"] = math.log1p(float((sizes >= 0.5).sum()))
        f["largest"] = float(sizes.max() / max(sizes.sum(), 1e-9))
    return f


@dataclass(frozen=True)
class PatternModel:
    """Multinomial logistic regression over standardised :data:`FEATURES` ->
    probabilities of :data:`CASE_CLASSES`."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]  # (classes, features)
    bias: tuple[float, ...]
    classes: tuple[str, ...] = CASE_CLASSES
    #: how it was fitted (cases, cross-validated figures), for the model card
    provenance: str = ""

    def probabilities(self, feats: dict[str, float]) -> dict[str, float]:
        x = (np.array([feats[k] for k in self.features]) - np.array(self.mean)) / np.array(self.scale)
        logits = np.array(self.weights) @ x + np.array(self.bias)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return {c: float(v) for c, v in zip(self.classes, p)}

    def to_json(self) -> str:
        return json.dumps({"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                           "weights": [list(w) for w in self.weights], "bias": list(self.bias),
                           "classes": list(self.classes), "provenance": self.provenance}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PatternModel":
        d = json.loads(text)
        return cls(tuple(d["features"]), tuple(d["mean"]), tuple(d["scale"]), tuple(tuple(w) for w in d["weights"]),
                   tuple(d["bias"]), tuple(d.get("classes", CASE_CLASSES)), d.get("provenance", ""))


def fit_pattern_model(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None, l2: float = 1.0,
                      features: tuple[str, ...] = FEATURES, iterations: int = 3000) -> PatternModel:
    """Fit the regression on rows ``X`` (n, features) with class indices ``y`` (into
    :data:`CASE_CLASSES`); ``l2`` penalises the weights (not the biases); plain gradient
    descent with a step the curvature bound keeps stable (the problem is small and convex)."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, int)
    w_s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    w_s = w_s / w_s.sum()
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-6] = 1.0
    Z = (X - mean) / scale
    k = len(CASE_CLASSES)
    Y = np.eye(k)[y]
    W = np.zeros((k, Z.shape[1]))
    b = np.zeros(k)
    # step 1/L, L bounding the curvature of the weighted softmax loss (1/2 of the largest
    # eigenvalue of the weighted Gram matrix, bias column included) plus the penalty's
    Zb = np.hstack([Z, np.ones((len(y), 1))]) * np.sqrt(w_s)[:, None]
    lr = 1.0 / (0.5 * float(np.linalg.norm(Zb, 2)) ** 2 + l2 / len(y))
    for _ in range(iterations):
        logits = Z @ W.T + b
        logits -= logits.max(axis=1, keepdims=True)
        P = np.exp(logits)
        P /= P.sum(axis=1, keepdims=True)
        G = (P - Y) * w_s[:, None]
        W -= lr * (G.T @ Z + l2 * W / len(y))
        b -= lr * G.sum(axis=0)
    return PatternModel(tuple(features), tuple(float(v) for v in mean), tuple(float(v) for v in scale),
                        tuple(tuple(float(v) for v in r) for r in W), tuple(float(v) for v in b))
