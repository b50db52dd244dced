"""Pure geometry helpers on (z, y, x) arrays: resampling, lung ROI boxes, patient sides.

No disk, no network; torch is used only as a fast resampler on the CPU or GPU passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Box2D:
    """An in-plane box [y0, y1) x [x0, x1) in voxel indices."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def square_roi(mask: np.ndarray, margin_mm: float, spacing_yx: tuple[float, float]) -> Box2D:
    """The square in-plane box around everything in ``mask`` (z, y, x or y, x) plus a margin,
    clipped to the image. Square so that resizing to the network input keeps the aspect."""
    plane = mask.any(axis=0) if mask.ndim == 3 else mask
    rows, cols = plane.shape
    ys, xs = np.nonzero(plane)
    if ys.size == 0:
        return Box2D(0, rows, 0, cols)
    my = int(round(margin_mm / spacing_yx[0]))
    mx = int(round(margin_mm / spacing_yx[1]))
    y0, y1 = ys.min() - my, ys.max() + 1 + my
    x0, x1 = xs.min() - mx, xs.max() + 1 + mx
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    side = min(side, max(rows, cols))
    y0 = int(round(cy - side / 2)); x0 = int(round(cx - side / 2))
    y0 = min(max(y0, 0), max(rows - side, 0)); x0 = min(max(x0, 0), max(cols - side, 0))
    return Box2D(y0, min(y0 + side, rows), x0, min(x0 + side, cols))


def resize_slices(stack: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (n, c, h, w) to (n, c, *size)."""
    if tuple(stack.shape[-2:]) == tuple(size):
        return stack
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(stack, size=size, mode=mode, **kwargs)


def zoom_volume(volume: np.ndarray, shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Resample a (z, y, x) array to ``shape`` (trilinear for order 1, nearest for 0)."""
    if tuple(volume.shape) == tuple(shape):
        return volume
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    mode = "trilinear" if order == 1 else "nearest"
    kwargs = {"align_corners": False} if order == 1 else {}
    out = F.interpolate(t, size=shape, mode=mode, **kwargs)[0, 0].numpy()
    return out


def patient_x_of_columns(orientation: tuple[float, ...], spacing_yx: tuple[float, float], shape_yx: tuple[int, int]) -> np.ndarray:
    """LPS x (patient left is +) of every in-plane voxel, up to a constant offset.

    ImageOrientationPatient gives the row direction (increasing column index) and the
    column direction (increasing row index); x grows towards the patient's left.
    """
    rx, cx = orientation[0], orientation[3]
    ys = np.arange(shape_yx[0], dtype=np.float32)[:, None] * spacing_yx[0] * cx
    xs = np.arange(shape_yx[1], dtype=np.float32)[None, :] * spacing_yx[1] * rx
    return ys + xs
