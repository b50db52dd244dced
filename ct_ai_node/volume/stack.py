"""Which images of one series form the stack to load: pure, headers only.

A series may hold more than one stack: two acquisitions with different
matrices (512x512 and 256x256), a few images in another orientation, or two
acquisitions over the same positions. The volume takes the largest group of
images that share matrix and orientation (within ``ORIENTATION_TOLERANCE``),
and within it, when images collide at one position, the largest acquisition;
the rest is left out and named in a warning. The series summary (selection)
and the assembler use the same choice, so both count the same slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pydicom

from .frames import FrameHeader, sop_instance_uid
from .geometry import SAME_POSITION_MM, same_orientation, slice_normal
from .identity import uid_text

Position = tuple[float, float, float]


@dataclass(frozen=True)
class ImageFacts:
    """What the choice needs to know about one image (one dataset)."""

    rows: int | None
    columns: int | None
    #: ImageOrientationPatient of its first frame
    orientation: tuple[float, ...] | None
    #: AcquisitionNumber as text ('' when absent)
    acquisition: str
    #: ImagePositionPatient of each of its frames
    positions: tuple[Position | None, ...]

    @property
    def n_frames(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class StackChoice:
    """Indices of the images kept, and of those left out with a short why."""

    kept: list[int]
    left_out: list[tuple[str, list[int]]] = field(default_factory=list)

    def note(self, names: Sequence[str] | None = None) -> str | None:
        """One warning line naming what was left out (None when nothing was)."""
        if not self.left_out:
            return None
        n_out = sum(len(ix) for _, ix in self.left_out)
        parts = []
        for why, indices in self.left_out:
            text = why
            if names is not None and indices and indices[0] < len(names):
                text += f" (e.g. file {names[indices[0]]})"
            parts.append(text)
        return (
            f"{n_out} of {n_out + len(self.kept)} images left out of the volume "
            f"(another stack in the series): " + "; ".join(parts)
        )


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def image_facts(ds: pydicom.Dataset, headers: Sequence[FrameHeader]) -> ImageFacts:
    """``ImageFacts`` of a dataset whose ``frame_headers`` are ``headers``."""
    return ImageFacts(
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        orientation=headers[0].orientation if headers else None,
        acquisition=str(ds.get("AcquisitionNumber") or "").strip(),
        positions=tuple(h.position for h in headers),
    )


def instance_key(ds: pydicom.Dataset, headers: Sequence[FrameHeader]) -> tuple:
    """What makes two datasets copies of one image.

    The SOP Instance UID together with the frame positions: one UID on images
    at different positions (a de-identification tool writing one value into
    every file) names different images. Without a usable UID, position,
    InstanceNumber and AcquisitionNumber identify the image.
    """
    positions = tuple(h.position for h in headers)
    try:
        text = uid_text(ds.get("SOPInstanceUID"))  # None when multi-valued
        if text == "":
            text = sop_instance_uid(ds)  # the file meta's, if any
    except Exception:  # noqa: BLE001 - an unreadable value is no UID
        text = None
    if text:
        return ("uid", text, positions)
    return (
        "position",
        positions,
        str(ds.get("InstanceNumber") or "").strip(),
        str(ds.get("AcquisitionNumber") or "").strip(),
    )


def _frames(images: Sequence[ImageFacts], indices: Sequence[int]) -> int:
    return sum(images[i].n_frames for i in indices)


def _by_matrix_and_orientation(images: Sequence[ImageFacts]) -> list[list[int]]:
    groups: list[tuple[tuple, tuple[float, ...] | None, list[int]]] = []
    unoriented: list[int] = []
    for i, image in enumerate(images):
        matrix = (image.rows, image.columns)
        if image.orientation is None:
            unoriented.append(i)
            continue
        for g_matrix, g_iop, members in groups:
            if (
                g_matrix == matrix
                and g_iop is not None
                and same_orientation(g_iop, image.orientation)
            ):
                members.append(i)
                break
        else:
            groups.append((matrix, image.orientation, [i]))
    # an image without orientation joins a stack of its matrix (the loader then
    # names it as the image whose orientation is missing) rather than vanishing
    for i in unoriented:
        matrix = (images[i].rows, images[i].columns)
        for g_matrix, _iop, members in groups:
            if g_matrix == matrix:
                members.append(i)
                break
        else:
            groups.append((matrix, None, [i]))
    return [sorted(members) for _m, _o, members in groups]


def _collides(images: Sequence[ImageFacts], indices: Sequence[int]) -> bool:
    """True when two different images of ``indices`` lie at one position."""
    iop = next((images[i].orientation for i in indices if images[i].orientation), None)
    if iop is None:
        return False
    try:
        normal = slice_normal(iop)
    except ValueError:
        return False
    dist = [
        float(np.dot(p, normal)) for i in indices for p in images[i].positions if p is not None
    ]
    if len(dist) < 2:
        return False
    steps = np.diff(np.sort(np.asarray(dist)))
    return bool((steps < SAME_POSITION_MM).any())


def choose_stack(images: Sequence[ImageFacts]) -> StackChoice:
    """The largest consistent stack among ``images`` (see the module docstring)."""
    if not images:
        return StackChoice(kept=[])
    groups = _by_matrix_and_orientation(images)
    best = min(
        groups,
        key=lambda g: (
            -_frames(images, g),
            -((images[g[0]].rows or 0) * (images[g[0]].columns or 0)),
            g[0],
        ),
    )
    matrix = (images[best[0]].rows, images[best[0]].columns)
    left_out: list[tuple[str, list[int]]] = []
    for group in groups:
        if group is best:
            continue
        rows, cols = images[group[0]].rows, images[group[0]].columns
        if (rows, cols) != matrix:
            why = f"{len(group)} images of {rows}x{cols}"
        else:
            why = f"{len(group)} images in another orientation"
        left_out.append((why, group))

    kept = best
    acquisitions = {images[i].acquisition for i in kept}
    if len(acquisitions) > 1 and _collides(images, kept):
        by_acq: dict[str, list[int]] = {}
        for i in kept:
            by_acq.setdefault(images[i].acquisition, []).append(i)
        # only a clean split: each acquisition a stack of its own (not one
        # acquisition number per slice with a stray duplicate among them)
        if all(len(g) >= 2 and not _collides(images, g) for g in by_acq.values()):
            chosen = min(by_acq.values(), key=lambda g: (-_frames(images, g), g[0]))
            for acq, group in by_acq.items():
                if group is not chosen:
                    name = f"acquisition {acq}" if acq else "without AcquisitionNumber"
                    left_out.append((f"{len(group)} images of {name} at the same positions", group))
            kept = chosen
    return StackChoice(kept=list(kept), left_out=left_out)
