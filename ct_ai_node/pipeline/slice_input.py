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

from ct_ai_node.pipeline.geometry import Box2D, dilate_slices, fill_between, resize_slices, square_roi, strided_indices

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


# --- shared by the slice methods (A, B): score every few slices, explain candidates ---

class SliceBatch:
    """The network inputs of one volume's slices, made once per slice: scoring and the
    explanation reuse them (``take`` builds the ones still missing)."""

    def __init__(self, hu: np.ndarray, lung: np.ndarray, box: Box2D, spacing, settings: SliceInputSettings):
        self.hu, self.lung, self.box, self.spacing, self.settings = hu, lung, box, spacing, settings
        self.x = torch.zeros((0, 1, settings.size, settings.size))
        self.index: dict[int, int] = {}

    def take(self, zs) -> torch.Tensor:
        missing = [int(z) for z in zs if int(z) not in self.index]
        if missing:
            extra = slice_tensors(self.hu[missing], self.lung[missing], self.box, self.spacing, self.settings)
            self.index.update({z: self.x.shape[0] + k for k, z in enumerate(missing)})
            self.x = torch.cat([self.x, extra])
        return self.x[[self.index[int(z)] for z in zs]]


def strided_scores(batch: SliceBatch, zs: np.ndarray, stride: int, score) -> tuple[np.ndarray, np.ndarray]:
    """Scores (z,) of the lung slices ``zs``: ``score`` (inputs -> (n,)) runs on slices
    ``stride`` apart and both ends; the slices between get scores interpolated along z.
    Returns ``(scores, scored_slices)``."""
    run_z = strided_indices(zs, stride)
    scores = np.zeros(batch.hu.shape[0], np.float32)
    if run_z.size:
        run_scores = score(batch.take(run_z))
        filled = fill_between({int(z): np.float32(v) for z, v in zip(run_z, run_scores)}, zs)
        scores[zs] = [filled[int(z)] for z in zs]
    return scores, run_z


def slice_maps_in_volume(batch: SliceBatch, map_z: np.ndarray, explain, fill_z: np.ndarray | None) -> np.ndarray:
    """Heat (z, y, x) in [0, 1]: ``explain`` (inputs -> (n, size, size) maps) on slices
    ``map_z``, interpolated along z over ``fill_z`` when given, pasted back into the slice
    geometry and kept inside the dilated lungs."""
    hu, s = batch.hu, batch.settings
    heat = np.zeros(hu.shape, np.float32)
    if len(map_z) == 0:
        return heat
    maps = explain(batch.take(map_z))
    crop_maps = {int(z): m for z, m in zip(map_z, maps)}
    if fill_z is not None:
        crop_maps = fill_between(crop_maps, fill_z)
    sel = np.array(sorted(crop_maps), dtype=int)
    inside = dilated_mask(batch.lung[sel], batch.spacing, s.mask_dilation_mm)
    pasted = paste_back(np.stack([crop_maps[int(z)] for z in sel]), batch.box, hu.shape[1:])
    heat[sel] = np.clip(pasted, 0.0, 1.0) * inside
    return heat
