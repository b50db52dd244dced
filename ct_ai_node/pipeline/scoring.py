"""Pure scoring: case decision, calibrated probability, volumes, Corona score.

No disk, no network, no GPU: numbers in, numbers out, so the rules are easy to test
with hand-made cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ct_ai_node.pipeline.geometry import bounding_box, labels_in


@dataclass(frozen=True)
class CaseDecision:
    """Case-level rule of method A: positive when the share of lung slices classified
    positive exceeds ``ratio_threshold``. ``slope`` turns the ratio into a calibrated
    probability, ``p = sigmoid(slope * (ratio - ratio_threshold))``, so p = 0.5 exactly
    at the decision threshold (both fitted on validation phantoms, see the model card)."""

    slice_threshold: float = 0.5
    ratio_threshold: float = 0.1
    slope: float = 30.0

    def positive_slices(self, slice_scores: np.ndarray, lung_slices: np.ndarray) -> np.ndarray:
        scores = np.asarray(slice_scores)
        lung = np.asarray(lung_slices, dtype=int)
        return lung[scores[lung] >= self.slice_threshold]

    def ratio(self, slice_scores: np.ndarray, lung_slices: np.ndarray) -> float:
        lung = np.asarray(lung_slices, dtype=int)
        if lung.size == 0:
            return 0.0
        return float(self.positive_slices(slice_scores, lung).size / lung.size)

    def probability(self, ratio: float) -> float:
        return 1.0 / (1.0 + math.exp(-self.slope * (ratio - self.ratio_threshold)))

    def is_positive(self, ratio: float) -> bool:
        return ratio > self.ratio_threshold


def volume_ml(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def involvement_percent(lesion_ml: float, lung_ml: float) -> float:
    return 0.0 if lung_ml <= 0 else 100.0 * lesion_ml / lung_ml


def corona_score_ml(heatmap: np.ndarray, positive_slices: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Sum of the localisation maps over the positive slices times the voxel size
    (x, y, z), in cm³ (= ml) as in Frid-Adar et al."""
    idx = np.asarray(positive_slices, dtype=int)
    if idx.size == 0:
        return 0.0
    return float(heatmap[idx].sum(dtype=np.float64)) * float(np.prod(spacing)) / 1000.0


def infection_mask_from_heatmap(
    heatmap: np.ndarray,
    lung: np.ndarray,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    threshold: float = 0.5,
    sigma_mm: float = 3.0,
    min_hu: float = -750.0,
    min_component_ml: float = 0.1,
) -> np.ndarray:
    """Stack of slice maps -> 3D Gaussian smoothing -> threshold -> inside the lungs.

    Voxels darker than ``min_hu`` are not infection whatever the map says: ground-glass
    opacity starts around -750 HU, so this keeps the mask on abnormal parenchyma instead
    of the whole blob that Grad-CAM's coarse resolution draws.
    """
    out = np.zeros(lung.shape, bool)
    sigma = [max(sigma_mm / s, 0.0) for s in spacing]
    # work inside the box of the heat (plus the smoothing reach) instead of the whole field
    reach = tuple(int(np.ceil(3 * sg)) for sg in sigma)
    box = bounding_box(heatmap > 0, reach)
    if box is None:
        return out
    smooth = ndi.gaussian_filter(heatmap[box].astype(np.float32), sigma=sigma, truncate=3.0)
    mask = (smooth >= threshold) & lung[box] & (hu[box] >= min_hu)
    if not mask.any():
        return out
    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:] * float(np.prod(spacing)) / 1000.0
    keep = np.flatnonzero(sizes >= min_component_ml) + 1
    out[box] = labels_in(lab, keep, n)
    return out


def top_slices(slice_scores: np.ndarray, candidates: np.ndarray, k: int) -> list[int]:
    """The ``k`` candidate slices with the highest scores, best first."""
    cand = np.asarray(candidates, dtype=int)
    if cand.size == 0:
        return []
    order = np.argsort(-np.asarray(slice_scores)[cand], kind="stable")
    return [int(z) for z in cand[order[:k]]]
