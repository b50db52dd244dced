"""Pure geometry helpers on (z, y, x) arrays: resampling, lung ROI boxes, patient sides.

No disk, no network; torch is used only as a fast resampler on the CPU or GPU passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
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


def patient_x_of_columns(orientation: tuple[float, ...], spacing_yx: tuple[float, float], shape_yx: tuple[int, int]) -> np.ndarray:
    """LPS x (patient left is +) of every in-plane voxel, up to a constant offset.

    ImageOrientationPatient gives the row direction (increasing column index) and the
    column direction (increasing row index); x grows towards the patient's left.
    """
    rx, cx = orientation[0], orientation[3]
    ys = np.arange(shape_yx[0], dtype=np.float32)[:, None] * spacing_yx[0] * cx
    xs = np.arange(shape_yx[1], dtype=np.float32)[None, :] * spacing_yx[1] * rx
    return ys + xs


def superior_last(orientation) -> bool:
    """True when the volume's z index runs inferior -> superior (slice normal towards +z LPS)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return float(np.cross(row, col)[2]) >= 0.0


def work_shape(shape: tuple[int, int, int], work_size: int) -> tuple[int, int, int]:
    """``shape`` (z, y, x) with the in-plane sides scaled so that the longer is at most
    ``work_size`` (aspect kept; z untouched)."""
    z, y, x = shape
    f = min(1.0, work_size / max(y, x))
    return z, max(int(round(y * f)), 1), max(int(round(x * f)), 1)


def resize_stack(stack: np.ndarray, size_yx: tuple[int, int], mode: str = "bilinear", chunk: int = 32) -> np.ndarray:
    """Resize every slice of a (z, y, x) array in-plane (z untouched), in chunks so the
    float copy stays small. Downsampling uses antialiasing; ``mode="nearest"`` keeps labels."""
    if tuple(stack.shape[1:]) == tuple(size_yx):
        return stack
    out = np.empty((stack.shape[0], *size_yx), np.float32 if mode != "nearest" else stack.dtype)
    down = size_yx[0] < stack.shape[1]
    halve = mode != "nearest" and stack.shape[1] == 2 * size_yx[0] and stack.shape[2] == 2 * size_yx[1]
    for z0 in range(0, stack.shape[0], chunk):
        t = torch.from_numpy(np.ascontiguousarray(stack[z0 : z0 + chunk], dtype=np.float32))[:, None]
        if halve:  # exactly half size: a 2x2 mean is the antialiased result, and cheap
            r = F.avg_pool2d(t, 2)
        elif mode == "nearest":
            r = F.interpolate(t, size=size_yx, mode="nearest")
        else:
            r = F.interpolate(t, size=size_yx, mode=mode, align_corners=False, antialias=down)
        out[z0 : z0 + chunk] = r[:, 0].numpy().astype(out.dtype, copy=False)
    return out


def dilate_slices(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """In-plane dilation of a (n, y, x) mask by a disk of radius ``radius_px``: the same
    result as ``scipy.ndimage.binary_dilation`` with a disk, much faster. The disk is a
    stack of horizontal segments; each is a running maximum along x (cost independent
    of the width), shifted up or down and OR-ed."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if radius_px <= 0 or m.size == 0:
        return m.astype(bool)
    r = int(radius_px)
    rows = m.shape[1]
    out = np.zeros(m.shape, bool)
    segments: dict[int, np.ndarray] = {}
    for dy in range(-r, r + 1):
        w = int(np.floor(np.sqrt(r * r - dy * dy)))
        if w not in segments:
            segments[w] = ndi.maximum_filter1d(m, size=2 * w + 1, axis=2, mode="constant", cval=0).astype(bool)
        seg = segments[w]
        # a source pixel at row y marks rows y + dy
        if dy >= 0:
            out[:, dy:] |= seg[:, : rows - dy]
        else:
            out[:, : rows + dy] |= seg[:, -dy:]
    return out


def strided_indices(indices: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th index plus the first and last of each run of consecutive
    indices, so anything left out lies between two chosen neighbours."""
    idx = np.asarray(indices, dtype=int)
    if idx.size == 0 or stride <= 1:
        return idx
    breaks = np.flatnonzero(np.diff(idx) != 1)
    edges = np.concatenate([[0], breaks, breaks + 1, [idx.size - 1]])
    chosen = np.union1d(np.arange(0, idx.size, stride), edges)
    return idx[chosen]


def fill_between(maps: dict[int, np.ndarray], wanted: np.ndarray) -> dict[int, np.ndarray]:
    """Linear interpolation along z of 2D maps computed at some slices (``maps``) for
    every slice in ``wanted`` that lies between two computed ones."""
    known = np.array(sorted(maps), dtype=int)
    out = dict(maps)
    for z in np.asarray(wanted, dtype=int):
        if int(z) in out or known.size == 0:
            continue
        hi = int(np.searchsorted(known, z))
        if hi == 0 or hi == known.size:
            continue
        a, b = int(known[hi - 1]), int(known[hi])
        w = (z - a) / (b - a)
        out[int(z)] = (1 - w) * maps[a] + w * maps[b]
    return out


def fill_between_inplace(stack: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Like :func:`fill_between` for a preallocated (z, ...) array whose slices at
    ``known`` are computed: the slices strictly between two known ones are filled by
    linear interpolation in place (no per-slice dictionaries or final stacking)."""
    known = np.unique(np.asarray(known, dtype=int))
    for a, b in zip(known[:-1], known[1:]):
        for z in range(int(a) + 1, int(b)):
            w = (z - a) / (b - a)
            np.multiply(stack[a], 1.0 - w, out=stack[z])
            stack[z] += w * stack[b]
    return stack


def labels_in(labels: np.ndarray, wanted, n_labels: int | None = None) -> np.ndarray:
    """``np.isin(labels, wanted)`` for a label image, by table lookup (isin sorts the
    whole image: several times slower on a 300-slice volume)."""
    n = int(labels.max()) if n_labels is None else int(n_labels)
    table = np.zeros(n + 1, bool)
    wanted = np.asarray(wanted, dtype=np.intp).ravel()
    table[wanted[(wanted >= 0) & (wanted <= n)]] = True
    return table[labels]


def bounding_box(mask: np.ndarray, margin: int | tuple[int, ...] = 0) -> tuple[slice, ...] | None:
    """Index slices of the box around ``mask`` plus ``margin`` voxels (None when empty);
    the heavy 3D steps run inside this box instead of the whole field of view."""
    if not mask.any():
        return None
    margins = (margin,) * mask.ndim if isinstance(margin, int) else margin
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margins[axis], 0), min(int(idx[-1]) + 1 + margins[axis], mask.shape[axis])))
    return tuple(box)
