"""Outline of a 2D mask region as a closed polygon, for SR SCOORD regions.

The outline follows pixel edges ("crack following"), so the polygon encloses exactly
the region's pixels: its area equals pixel count x pixel area, the number a radiologist
sees both in the SR and in the viewer's own measurement of the drawn polygon.
Coordinates are DICOM image coordinates (PS3.3 C.18.6.1.2): (column, row) with
(0, 0) the top-left corner of the top-left pixel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# a directed edge is (start vertex, end vertex) on the pixel-corner grid, (x, y)
# walked with the region on the right in image coordinates (y down), i.e. clockwise
# on screen


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` with its holes filled."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def _edges(region: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Boundary edges of ``region`` keyed by start vertex, region on the right."""
    padded = np.pad(region, 1)
    inner = padded[1:-1, 1:-1]
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(ys: np.ndarray, xs: np.ndarray, d0: tuple[int, int], d1: tuple[int, int]) -> None:
        for y, x in zip(ys.tolist(), xs.tolist()):
            start = (x + d0[0], y + d0[1])
            out.setdefault(start, []).append((x + d1[0], y + d1[1]))

    # pixel (y, x) spans corners (x, y)..(x+1, y+1); keep the pixel on the right
    ys, xs = np.nonzero(inner & ~padded[:-2, 1:-1])  # top side free: walk left -> right
    add(ys, xs, (0, 0), (1, 0))
    ys, xs = np.nonzero(inner & ~padded[1:-1, 2:])  # right side free: walk down
    add(ys, xs, (1, 0), (1, 1))
    ys, xs = np.nonzero(inner & ~padded[2:, 1:-1])  # bottom side free: walk right -> left
    add(ys, xs, (1, 1), (0, 1))
    ys, xs = np.nonzero(inner & ~padded[1:-1, :-2])  # left side free: walk up
    add(ys, xs, (0, 1), (0, 0))
    return out


def outline(region: np.ndarray) -> np.ndarray:
    """The outer boundary of the single region ``region`` as a closed polygon.

    Returns an (n, 2) float32 array of (column, row) vertices, the first vertex repeated
    at the end (SCOORD POLYGON). Collinear vertices are dropped.
    """
    region = np.asarray(region, dtype=bool)
    if region.ndim != 2:
        raise ValueError(f"region must be 2D, got shape {region.shape}")
    if not region.any():
        raise ValueError("region is empty: no outline")
    edges = _edges(region)
    ys, xs = np.nonzero(region)
    first = int(np.argmin(ys * (region.shape[1] + 1) + xs))  # top-most, then left-most
    start = (int(xs[first]), int(ys[first]))  # its top-left corner lies on the outline
    path = [start]
    prev_dir = (1, 0)
    current = start
    for _ in range(sum(len(v) for v in edges.values()) + 1):
        options = edges[current]
        if len(options) == 1:
            nxt = options[0]
        else:
            # a pinch vertex (two pixels touching diagonally): turn left, away from the
            # pixel just passed, to go on around the diagonal neighbour; this keeps to
            # the outer boundary of an 8-connected region
            def turn(end: tuple[int, int]) -> int:
                d = (end[0] - current[0], end[1] - current[1])
                return prev_dir[0] * d[1] - prev_dir[1] * d[0]  # < 0: left turn (y down)

            nxt = min(options, key=turn)
        options.remove(nxt)
        prev_dir = (nxt[0] - current[0], nxt[1] - current[1])
        current = nxt
        if current == start:
            break
        path.append(current)
    else:  # pragma: no cover - a closed boundary always returns to its start
        raise RuntimeError("outline did not close")
    pts = np.array(path + [start], dtype=np.float32)
    # drop vertices in the middle of straight runs
    d_in = pts[1:-1] - pts[:-2]
    d_out = pts[2:] - pts[1:-1]
    straight = (d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) == 0
    keep = np.concatenate([[True], ~straight, [True]])
    return pts[keep]


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon (first == last vertex), in pixel units."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)
