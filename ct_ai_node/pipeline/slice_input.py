"""Method A's slice input: the lung-ROI crop of each axial slice, clipped to
[-1000, 0] HU, scaled to [0, 1], resized to 224x224 (Frid-Adar et al.).

Training and inference both call :func:`slice_tensors`, so the network sees the
same preparation in both. Everything outside the (slightly dilated) lung mask is set
to air: the classifier should judge lung parenchyma, not the body wall or
mediastinum, whose appearance differs most between synthetic phantoms and real scans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ct_ai_node.pipeline.geometry import Box2D, dilate_slices, resize_slices, square_roi

INPUT_SIZE = 224
HU_RANGE = (-1000.0, 0.0)


@dataclass(frozen=True)
class SliceInputSettings:
    size: int = INPUT_SIZE
    roi_margin_mm: float = 10.0
    mask_dilation_mm: float = 4.0
    #: a slice counts as a lung slice when its lung area is at least this share of
    #: the largest lung cross-section
    min_lung_fraction: float = 0.05


def lung_slice_indices(lung: np.ndarray, min_fraction: float) -> np.ndarray:
    area = lung.reshape(lung.shape[0], -1).sum(axis=1)
    if area.max(initial=0) == 0:
        return np.zeros(0, dtype=int)
    return np.flatnonzero(area >= min_fraction * area.max())


def roi_box(lung: np.ndarray, spacing, settings: SliceInputSettings) -> Box2D:
    return square_roi(lung, settings.roi_margin_mm, (spacing[1], spacing[2]))


def dilated_mask(lung_slices: np.ndarray, spacing, mm: float) -> np.ndarray:
    return dilate_slices(lung_slices, int(round(mm / spacing[1])))


def slice_tensors(hu_slices: np.ndarray, lung_slices: np.ndarray, box: Box2D, spacing,
                  settings: SliceInputSettings) -> torch.Tensor:
    """(n, y, x) HU and lung mask -> (n, 1, size, size) float32 network input."""
    crop = hu_slices[:, box.y0 : box.y1, box.x0 : box.x1].astype(np.float32, copy=True)
    mask = dilated_mask(lung_slices[:, box.y0 : box.y1, box.x0 : box.x1].astype(bool), spacing, settings.mask_dilation_mm)
    lo, hi = HU_RANGE
    crop[~mask] = lo
    x = torch.from_numpy((np.clip(crop, lo, hi) - lo) / (hi - lo))[:, None]
    return resize_slices(x, (settings.size, settings.size))


def paste_back(maps: np.ndarray, box: Box2D, shape_yx: tuple[int, int]) -> np.ndarray:
    """(n, size, size) maps in crop space -> (n, y, x) in slice space (zero outside the box)."""
    out = np.zeros((maps.shape[0], *shape_yx), np.float32)
    t = torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None]
    t = resize_slices(t, (box.height, box.width))[:, 0].numpy()
    out[:, box.y0 : box.y1, box.x0 : box.x1] = t
    return out
