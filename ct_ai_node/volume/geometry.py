"""Pure geometry of a slice stack: orientation, order, spacing, gaps and tilt.

No disk, no pixel data: every function here works on ImageOrientationPatient
(IOP) and ImagePositionPatient (IPP) values, so the series summary (used by the
selection rules) and the volume assembler judge a stack with the same code and
reach the same verdict.

Conventions: patient coordinates are DICOM LPS; the slice normal is
``cross(row_cosines, column_cosines)``; a slice's position along the stack is
``dot(IPP, normal)``.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

#: two positions closer than this along the normal are "the same position" (mm)
SAME_POSITION_MM = 0.01
#: IOPs of one series whose cosines differ by more than this are "mixed"
ORIENTATION_TOLERANCE = 0.01


class Orientation(str, Enum):
    """Anatomical plane of an image, from ImageOrientationPatient (0020,0037)."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"
    OBLIQUE = "oblique"
    UNKNOWN = "unknown"


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal ``cross(row, column)`` of an ImageOrientationPatient value.

    Raises
    ------
    ValueError
        If ``iop`` does not hold six numbers or its direction cosines are
        degenerate (zero length or parallel).
    """
    values = np.asarray([float(v) for v in iop], dtype=np.float64)
    if values.shape != (6,):
        raise ValueError(f"iop must hold 6 values, got {len(values)}")
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    if not math.isfinite(length) or length < 1e-6:
        raise ValueError(f"iop has degenerate direction cosines: {list(values)}")
    return normal / length


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two lines (not vectors: 0..90 degrees)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    cos = abs(float(np.dot(a, b))) / (na * nb)
    return math.degrees(math.acos(min(1.0, cos)))


def classify_orientation(
    iop: Sequence[float] | None, tolerance_deg: float = 10.0
) -> tuple[Orientation, float | None]:
    """Plane of an image and the angle of its normal from the patient's z axis.

    Parameters
    ----------
    iop
        ImageOrientationPatient (0020,0037), or None when absent.
    tolerance_deg
        How far the slice normal may deviate from an axis and still count as
        that plane.

    Returns
    -------
    (orientation, axial_deviation_deg)
        ``axial_deviation_deg`` is the angle between the slice normal and the
        feet-head axis; None when ``iop`` is absent or invalid.
    """
    if iop is None:
        return Orientation.UNKNOWN, None
    try:
        normal = slice_normal(iop)
    except (ValueError, TypeError):
        return Orientation.UNKNOWN, None
    axes = {
        Orientation.SAGITTAL: np.array([1.0, 0.0, 0.0]),
        Orientation.CORONAL: np.array([0.0, 1.0, 0.0]),
        Orientation.AXIAL: np.array([0.0, 0.0, 1.0]),
    }
    angles = {name: angle_deg(normal, axis) for name, axis in axes.items()}
    axial_dev = angles[Orientation.AXIAL]
    best = min(angles, key=angles.__getitem__)
    if angles[best] <= tolerance_deg:
        return best, axial_dev
    return Orientation.OBLIQUE, axial_dev


def same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when two IOP values agree within ``ORIENTATION_TOLERANCE``."""
    return bool(
        np.max(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))
        <= ORIENTATION_TOLERANCE
    )


class StackStats(BaseModel):
    """What the positions of a stack of parallel slices say about it.

    All distances are along the slice normal, in mm.
    """

    model_config = ConfigDict(frozen=True)

    n_positions: int = Field(ge=0)
    #: median step between neighbouring positions; None for fewer than 2
    spacing_mm: float | None = None
    #: lowest and highest position along the normal
    first_mm: float | None = None
    last_mm: float | None = None
    #: the largest step: (from, to, step) along the normal
    largest_step: tuple[float, float, float] | None = None
    #: the largest relative deviation |step - spacing| / spacing among steps that
    #: are not gaps (a gap is reported as ``largest_step`` instead)
    max_deviation: float = 0.0
    #: the step with the largest deviation: (from, to, step)
    most_uneven_step: tuple[float, float, float] | None = None
    #: angle between the stacking direction (first to last position) and the
    #: slice normal: gantry tilt or a sheared stack
    tilt_deg: float = 0.0
    #: a position held by two different images, if any
    duplicate_at_mm: float | None = None

    @property
    def extent_mm(self) -> float:
        if self.first_mm is None or self.last_mm is None:
            return 0.0
        return self.last_mm - self.first_mm


def sort_positions(positions: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of the slices along ``normal`` (ascending) and their distances.

    Returns ``(order, distances_sorted)``; the sort is stable so equal
    positions keep their input order.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    dist = positions @ np.asarray(normal, dtype=np.float64)
    order = np.argsort(dist, kind="stable")
    return order, dist[order]


def stack_stats(
    positions: np.ndarray, normal: np.ndarray, gap_factor: float = 1.5
) -> tuple[np.ndarray, StackStats]:
    """Sort a stack along its normal and measure its spacing, gaps and tilt.

    Parameters
    ----------
    positions
        ``(n, 3)`` ImagePositionPatient values, one per slice (already free of
        exact duplicates of the same image).
    normal
        The common slice normal.
    gap_factor
        A step larger than ``gap_factor`` times the median step is a gap
        (missing slices) and does not count towards ``max_deviation``.

    Returns
    -------
    (order, stats)
        ``order`` sorts the input slices by ascending position along the normal.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = positions.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.intp), StackStats(n_positions=0)
    order, dist = sort_positions(positions, normal)
    if n == 1:
        return order, StackStats(n_positions=1, first_mm=float(dist[0]), last_mm=float(dist[0]))

    steps = np.diff(dist)
    same = steps < SAME_POSITION_MM
    duplicate_at = float(dist[1:][same][0]) if same.any() else None
    real_steps = steps[~same]
    if real_steps.size == 0:
        return order, StackStats(
            n_positions=n,
            first_mm=float(dist[0]),
            last_mm=float(dist[-1]),
            duplicate_at_mm=duplicate_at,
        )
    spacing = float(np.median(real_steps))

    i_big = int(np.argmax(steps))
    largest = (float(dist[i_big]), float(dist[i_big + 1]), float(steps[i_big]))

    regular = (~same) & (steps <= gap_factor * spacing)
    max_dev = 0.0
    uneven = None
    if regular.any():
        dev = np.where(regular, np.abs(steps - spacing) / spacing, -1.0)
        i_dev = int(np.argmax(dev))
        max_dev = float(dev[i_dev])
        uneven = (float(dist[i_dev]), float(dist[i_dev + 1]), float(steps[i_dev]))

    ordered = positions[order]
    direction = ordered[-1] - ordered[0]
    tilt = angle_deg(direction, np.asarray(normal, dtype=np.float64))

    return order, StackStats(
        n_positions=n,
        spacing_mm=spacing,
        first_mm=float(dist[0]),
        last_mm=float(dist[-1]),
        largest_step=largest,
        max_deviation=max_dev,
        most_uneven_step=uneven,
        tilt_deg=tilt,
        duplicate_at_mm=duplicate_at,
    )


class StackLimits(BaseModel):
    """How irregular a stack may be before it is refused."""

    model_config = ConfigDict(frozen=True)

    #: a step above ``gap_factor`` x the median step means missing slices
    gap_factor: float = Field(1.5, gt=1.0, le=10.0)
    #: relative step deviation above which a warning is given
    warn_deviation: float = Field(0.02, ge=0.0, le=1.0)
    #: relative step deviation above which the stack is refused
    max_deviation: float = Field(0.2, gt=0.0, le=1.0)
    #: tilt above which a warning is given (degrees)
    warn_tilt_deg: float = Field(0.5, ge=0.0, le=90.0)
    #: tilt above which the stack is refused (degrees)
    max_tilt_deg: float = Field(30.0, ge=0.0, le=90.0)


def _mm(value: float) -> str:
    return f"{value:.1f}" if abs(value - round(value, 1)) < 1e-6 else f"{value:.2f}"


def check_stack(stats: StackStats, limits: StackLimits) -> tuple[str | None, list[str]]:
    """Judge a stack: a one-line reason to refuse it (or None) and warnings."""
    warnings: list[str] = []
    if stats.duplicate_at_mm is not None:
        return (
            f"two images at the same position ({_mm(stats.duplicate_at_mm)} mm along the normal)",
            warnings,
        )
    spacing = stats.spacing_mm
    if spacing is None:
        return None, warnings
    if stats.largest_step is not None and stats.n_positions >= 3:
        lo, hi, step = stats.largest_step
        if step > limits.gap_factor * spacing:
            return (
                f"missing slices: gap of {_mm(step)} mm between positions "
                f"{_mm(lo)} and {_mm(hi)} mm (expected {_mm(spacing)} mm)",
                warnings,
            )
    if stats.most_uneven_step is not None and stats.max_deviation > limits.warn_deviation:
        lo, hi, step = stats.most_uneven_step
        text = (
            f"uneven slice spacing: step of {_mm(step)} mm between positions "
            f"{_mm(lo)} and {_mm(hi)} mm (median {_mm(spacing)} mm, "
            f"{100 * stats.max_deviation:.0f}% off)"
        )
        if stats.max_deviation > limits.max_deviation:
            return text, warnings
        warnings.append(text)
    if stats.tilt_deg > limits.warn_tilt_deg:
        text = f"gantry tilt {stats.tilt_deg:.1f} deg (slice positions not along the normal)"
        if stats.tilt_deg > limits.max_tilt_deg:
            return f"{text} > {limits.max_tilt_deg:g} deg", warnings
        warnings.append(text + "; the volume is not resampled")
    return None, warnings
