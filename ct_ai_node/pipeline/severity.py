"""Per-lobe involvement and the CT severity score (Pan et al., Radiology 2020).

Radiologists grade each of the five lobes by the share of it that the opacities involve:
0 none, 1 under 5 %, 2 5-25 %, 3 26-50 %, 4 51-75 %, 5 over 75 %; the total (0-25) is the
CT severity score. The published grades are whole percentages ("26-50 %"); on a continuous
share the boundaries here are: 0 exactly none, 1 below 5 %, 2 from 5 % to 25 %, 3 above 25 %
to 50 %, 4 above 50 % to 75 %, 5 above 75 %.

A lobe holding less than :data:`MIN_LOBE_OPACITY_ML` of opacity grades 0: a speck of a few
voxels is below what the opacity model resolves reliably (on held-out normal phantoms its
stray voxels made every lobe "1" and the total 3-5 points too high), and below what a reader
would call involvement. Its volume and share are still reported as measured.

Pure logic: arrays in, numbers out (no I/O).
"""

from __future__ import annotations

import numpy as np

from ct_ai_node.pipeline.types import LOBES, LobeInvolvement

#: upper share (%) of each grade 1..4; grade 5 is anything above the last
GRADE_UPPER_PERCENT = (5.0, 25.0, 50.0, 75.0)
#: less opacity than this (ml; a focus of about 12 mm) in a lobe grades 0
MIN_LOBE_OPACITY_ML = 1.0


def lobe_severity(involvement_percent: float, opacity_ml: float | None = None) -> int:
    """The 0-5 grade of one lobe from the share (%) of it that the opacities involve; 0 when
    ``opacity_ml`` (the opacity's volume in the lobe, when given) is below
    :data:`MIN_LOBE_OPACITY_ML`.

    Raises
    ------
    ValueError
        If the share is not a number from 0 to 100.
    """
    p = float(involvement_percent)
    if not 0.0 <= p <= 100.0:  # also refuses NaN
        raise ValueError(f"involvement_percent must be 0-100, got {involvement_percent!r}")
    if p == 0.0 or (opacity_ml is not None and opacity_ml < MIN_LOBE_OPACITY_ML):
        return 0
    if p < GRADE_UPPER_PERCENT[0]:
        return 1
    for grade, upper in enumerate(GRADE_UPPER_PERCENT[1:], start=2):
        if p <= upper:
            return grade
    return 5


def lobe_involvement(lobe_labels: np.ndarray, opacity: np.ndarray, consolidation: np.ndarray | None,
                     spacing) -> list[LobeInvolvement]:
    """One :class:`LobeInvolvement` per lobe of :data:`LOBES` (label value = index + 1).

    ``opacity``: the suspected infection (ground glass and consolidation), bool (z, y, x);
    ``consolidation``: its consolidation part (None: all of it counts as ground glass). Only
    the opacity inside a lobe counts; a lobe the segmentation did not find has volume 0 and
    grade 0."""
    if lobe_labels.shape != opacity.shape:
        raise ValueError(f"lobe labels {lobe_labels.shape} and opacity {opacity.shape} differ in shape")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    n = len(LOBES) + 1
    labels = np.asarray(lobe_labels)
    # three counts per label in one pass each (bincount is linear, unlike one mask per lobe)
    volume = np.bincount(labels.ravel(), minlength=n)[:n]
    lesion = np.bincount(labels[np.asarray(opacity, bool)], minlength=n)[:n]
    if consolidation is not None:
        cons = np.bincount(labels[np.asarray(consolidation, bool) & np.asarray(opacity, bool)], minlength=n)[:n]
    else:
        cons = np.zeros(n, np.int64)
    out = []
    for i, name in enumerate(LOBES, start=1):
        # graded from the share as reported, so that the table and the grade never disagree
        share = round(100.0 * lesion[i] / volume[i], 3) if volume[i] else 0.0
        ggo_ml, cons_ml = round(float(lesion[i] - cons[i]) * voxel_ml, 3), round(float(cons[i]) * voxel_ml, 3)
        out.append(LobeInvolvement(
            name=name, volume_ml=round(float(volume[i]) * voxel_ml, 3), ggo_ml=ggo_ml, consolidation_ml=cons_ml,
            involvement_percent=share, severity=lobe_severity(min(share, 100.0), ggo_ml + cons_ml)))
    return out


def ct_severity_score(lobes: list[LobeInvolvement]) -> int:
    """The total of the lobes' grades, 0-25."""
    if len(lobes) != len(LOBES):
        raise ValueError(f"the score needs all {len(LOBES)} lobes, got {len(lobes)}")
    return int(sum(lobe.severity for lobe in lobes))


__all__ = ["GRADE_UPPER_PERCENT", "MIN_LOBE_OPACITY_ML", "ct_severity_score", "lobe_involvement", "lobe_severity"]
