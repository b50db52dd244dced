"""One series -> ``Volume``: sort, check, decode and rescale to Hounsfield units.

``assemble`` works on datasets already in memory (the network node's spool can
hand them over); ``load_volume`` reads files first. Either refuses a stack it
cannot trust with ``InputRejected`` and a one-line reason that names the file
(never the patient): mixed sizes or orientations, missing slices, uneven spacing,
strong gantry tilt, two images at one position, truncated or corrupt pixel data.

Slices are ordered by their position along the slice normal,
``dot(ImagePositionPatient, cross(row, column))``, never by InstanceNumber.
Memory: the HU volume (float32) is allocated once and each slice is decoded and
rescaled into it, so at most the encoded source bytes (kept in
``Volume.datasets`` for the writers) and the float volume are held together.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pydicom
from pydicom.pixels import pixel_array
from pydicom.uid import generate_uid

from ct_ai_node.errors import InputRejected

from .frames import FrameHeader, frame_headers, is_multiframe, sop_class_uid, sop_instance_uid
from .geometry import (
    SAME_POSITION_MM,
    StackLimits,
    check_stack,
    same_orientation,
    slice_normal,
    stack_stats,
)
from .reader import read_dataset
from .types import SliceRef, Volume

logger = logging.getLogger(__name__)

#: HU given to padding (outside the scan's field of view): air
AIR_HU = -1024.0
#: nothing in a patient's CT is below this; lower values are padding (-2000, -2048, -3024)
PADDING_BELOW_HU = -1500.0
_AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class _Slice:
    """One frame of one source dataset, before sorting."""

    source: int  # index into the list of unique datasets
    header: FrameHeader


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if i < len(names) else f"image {i + 1}"


def _workers(n: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n))


def _dedupe(
    datasets: Sequence[pydicom.Dataset], names: Sequence[str], warnings: list[str]
) -> tuple[list[pydicom.Dataset], list[str]]:
    """Drop second copies of one SOP instance; refuse two different ones with one UID."""
    kept: list[pydicom.Dataset] = []
    kept_names: list[str] = []
    seen: dict[str, int] = {}
    for i, ds in enumerate(datasets):
        uid = sop_instance_uid(ds)
        if uid and uid in seen:
            first = kept[seen[uid]]
            a = [f.position for f in frame_headers(first)]
            b = [f.position for f in frame_headers(ds)]
            if a != b:
                raise InputRejected(
                    f"files {kept_names[seen[uid]]} and {_name(names, i)} share one SOP Instance "
                    "UID but lie at different positions"
                )
            warnings.append(f"duplicate copy of one image ignored (file {_name(names, i)})")
            continue
        if uid:
            seen[uid] = len(kept)
        kept.append(ds)
        kept_names.append(_name(names, i))
    return kept, kept_names


def _check_images(datasets: Sequence[pydicom.Dataset], names: Sequence[str]) -> tuple[int, int]:
    """Every dataset is a grey-scale image of one size; returns (rows, columns)."""
    sizes: dict[tuple[int, int], str] = {}
    for ds, name in zip(datasets, names):
        if "PixelData" not in ds:
            raise InputRejected(f"file {name}: no pixel data (file truncated or not an image)")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InputRejected(f"file {name}: Rows/Columns missing") from exc
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise InputRejected(f"file {name}: not a grey-scale image (SamplesPerPixel > 1)")
        sizes.setdefault((rows, cols), name)
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c} ({n})" for (r, c), n in list(sizes.items())[:3])
        raise InputRejected(f"mixed image sizes in one series: {shown}")
    return next(iter(sizes))


def _check_frames(
    slices: Sequence[_Slice], names: Sequence[str], warnings: list[str]
) -> tuple[tuple[float, ...], tuple[float, float]]:
    """Common orientation and pixel spacing; returns (iop, pixel_spacing)."""
    missing = [s for s in slices if s.header.orientation is None]
    if missing and len(slices) > 1:
        raise InputRejected(
            f"file {_name(names, missing[0].source)}: image orientation "
            "(ImageOrientationPatient) missing"
        )
    if missing:
        warnings.append("image orientation missing: assumed axial")
        iop: tuple[float, ...] = _AXIAL_IOP
    else:
        iop = tuple(float(v) for v in slices[0].header.orientation or ())
        for s in slices:
            if not same_orientation(iop, s.header.orientation or ()):
                raise InputRejected(
                    f"mixed orientations in one series (file {_name(names, s.source)})"
                )
    try:
        slice_normal(iop)
    except ValueError as exc:
        raise InputRejected(f"invalid image orientation {list(iop)}") from exc

    first = slices[0].header.pixel_spacing
    for s in slices:
        ps = s.header.pixel_spacing
        if ps is None:
            raise InputRejected(
                f"file {_name(names, s.source)}: PixelSpacing missing "
                "(volumes cannot be measured)"
            )
        if first is None or max(abs(ps[0] - first[0]), abs(ps[1] - first[1])) > 1e-3:
            raise InputRejected(
                f"mixed pixel spacing in one series: {first[0]:g} and {ps[0]:g} mm "
                f"(file {_name(names, s.source)})"
            )
    assert first is not None
    return iop, (float(first[0]), float(first[1]))


def _sort(
    slices: list[_Slice],
    names: Sequence[str],
    normal: np.ndarray,
    limits: StackLimits,
    warnings: list[str],
) -> tuple[list[_Slice], float | None]:
    """Order slices along the normal; refuse gaps, duplicates, unevenness, tilt."""
    positions = [s.header.position for s in slices]
    if any(p is None for p in positions):
        if len(slices) > 1:
            missing = next(s for s in slices if s.header.position is None)
            raise InputRejected(
                f"file {_name(names, missing.source)}: slice position (ImagePositionPatient) missing"
            )
        warnings.append("slice position missing: assumed (0, 0, 0)")
        positions = [(0.0, 0.0, 0.0)]
    order, stats = stack_stats(np.asarray(positions, dtype=np.float64), normal, limits.gap_factor)
    ordered = [slices[i] for i in order]
    if stats.duplicate_at_mm is not None:
        dist = np.asarray(positions, dtype=np.float64)[order] @ normal
        i = int(np.argmax(np.diff(dist) < SAME_POSITION_MM))
        a, b = ordered[i], ordered[i + 1]
        raise InputRejected(
            f"two images at the same position ({dist[i]:.2f} mm along the normal): "
            f"{_name(names, a.source)} and {_name(names, b.source)}"
        )
    fatal, stack_warnings = check_stack(stats, limits)
    if fatal:
        raise InputRejected(fatal)
    warnings.extend(stack_warnings)
    return ordered, stats.spacing_mm


def _padding_mask(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (0028,0120) or inside its range limit."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == value
    lo, hi = sorted((value, int(limit)))
    return (stored >= lo) & (stored <= hi)


def _decode(ds: pydicom.Dataset, name: str) -> np.ndarray:
    """Stored pixel values of every frame of ``ds`` (frames, rows, columns)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    encapsulated = bool(syntax is not None and syntax.is_transfer_syntax and syntax.is_encapsulated)
    if not encapsulated:
        have = len(ds.PixelData)
        need = (
            int(ds.Rows) * int(ds.Columns) * (int(ds.get("NumberOfFrames") or 1))
            * int(ds.get("BitsAllocated") or 16) // 8
        )
        if have < need:
            raise InputRejected(
                f"file {name}: pixel data too short ({have} of {need} bytes; truncated or corrupt)"
            )
    try:
        arr = pixel_array(ds)
    except InputRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is corrupt input
        message = " ".join(str(exc).split())[:120]
        raise InputRejected(
            f"file {name}: pixel data cannot be decoded ({type(exc).__name__}: {message})"
        ) from exc
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    return arr


def _fill(
    ds: pydicom.Dataset,
    name: str,
    targets: list[tuple[int, FrameHeader]],
    hu: np.ndarray,
) -> int:
    """Decode ``ds`` and write its frames, in HU, into ``hu[z]``; returns padded voxels."""
    stored = _decode(ds, name)
    padded = 0
    for z, header in targets:
        index = (header.frame_number or 1) - 1
        if index >= stored.shape[0]:
            raise InputRejected(f"file {name}: frame {index + 1} missing from the pixel data")
        frame = stored[index]
        out = hu[z]
        np.copyto(out, frame, casting="unsafe")
        if header.slope != 1.0:
            out *= np.float32(header.slope)
        if header.intercept != 0.0:
            out += np.float32(header.intercept)
        mask = out < PADDING_BELOW_HU
        explicit = _padding_mask(ds, frame)
        if explicit is not None:
            mask |= explicit
        count = int(np.count_nonzero(mask))
        if count:
            out[mask] = AIR_HU
            padded += count
    return padded


def _repair_uids(datasets: Sequence[pydicom.Dataset], warnings: list[str]) -> None:
    """Fill empty SOP/Series/Study UIDs so that writers can reference the images.

    SOPInstanceUID and SOPClassUID come from the file meta (they are the same
    values by definition); an empty Series or Study Instance UID is replaced
    by a UID derived from the instance UIDs, the same on every run.
    """
    filled = 0
    for ds in datasets:
        for keyword, getter in (("SOPInstanceUID", sop_instance_uid), ("SOPClassUID", sop_class_uid)):
            if not str(ds.get(keyword) or "").strip():
                value = getter(ds)
                if value:
                    setattr(ds, keyword, value)
                    filled += 1
    if filled:
        warnings.append("SOP Instance/Class UIDs missing in the data set: taken from the file meta")
    instance_uids = sorted(sop_instance_uid(ds) for ds in datasets)
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID"):
        values = {str(ds.get(keyword) or "").strip() for ds in datasets}
        if "" in values:
            present = sorted(values - {""})
            value = present[0] if present else generate_uid(entropy_srcs=[keyword, *instance_uids])
            for ds in datasets:
                if not str(ds.get(keyword) or "").strip():
                    setattr(ds, keyword, value)
            warnings.append(f"{keyword} missing: set to {value}")


def assemble(
    datasets: Sequence[pydicom.Dataset],
    *,
    names: Sequence[str] | None = None,
    limits: StackLimits | None = None,
) -> Volume:
    """Build a HU ``Volume`` from the datasets (with pixel data) of one series.

    Parameters
    ----------
    datasets
        CT Image Storage instances (one slice each) and/or Enhanced CT
        instances (many frames each), any order, possibly with duplicate copies.
    names
        File names for reasons and warnings, parallel to ``datasets``.
    limits
        Stack geometry limits (gaps, unevenness, tilt); defaults to
        ``StackLimits()``.

    Raises
    ------
    InputRejected
        With a one-line reason when the stack cannot be trusted.
    """
    if isinstance(datasets, pydicom.Dataset):
        raise TypeError("datasets must be a sequence of pydicom.Dataset, got one Dataset")
    if not datasets:
        raise InputRejected("no images in the series")
    if names is not None and len(names) != len(datasets):
        raise ValueError(f"names must match datasets: {len(names)} names, {len(datasets)} datasets")
    limits = limits or StackLimits()
    names = list(names) if names is not None else [f"image {i + 1}" for i in range(len(datasets))]
    warnings: list[str] = []

    datasets, names = _dedupe(datasets, names, warnings)
    rows, cols = _check_images(datasets, names)
    slices = [
        _Slice(source=i, header=header)
        for i, ds in enumerate(datasets)
        for header in frame_headers(ds)
    ]
    iop, pixel_spacing = _check_frames(slices, names, warnings)
    normal = slice_normal(iop)
    ordered, spacing_z = _sort(slices, names, normal, limits, warnings)

    thickness = Counter(
        s.header.slice_thickness for s in ordered if s.header.slice_thickness is not None
    ).most_common(1)
    slice_thickness = thickness[0][0] if thickness else None
    if spacing_z is None:
        spacing_z = slice_thickness or 1.0
        warnings.append(f"single slice: z spacing taken as {spacing_z:g} mm")

    hu = np.empty((len(ordered), rows, cols), dtype=np.float32)
    targets: dict[int, list[tuple[int, FrameHeader]]] = {}
    for z, s in enumerate(ordered):
        targets.setdefault(s.source, []).append((z, s.header))
    jobs = list(targets.items())
    if len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=_workers(len(jobs))) as pool:
            padded = sum(
                pool.map(lambda job: _fill(datasets[job[0]], names[job[0]], job[1], hu), jobs)
            )
    else:
        padded = sum(_fill(datasets[src], names[src], tg, hu) for src, tg in jobs)
    if padded:
        warnings.append(
            f"{padded} padding voxels (outside the field of view: PixelPaddingValue or below "
            f"{PADDING_BELOW_HU:g} HU) set to {AIR_HU:g} HU"
        )

    _repair_uids(datasets, warnings)
    slices_out = []
    for s in ordered:
        ds = datasets[s.source]
        try:
            instance_number = int(ds.get("InstanceNumber"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            instance_number = None
        position = s.header.position or (0.0, 0.0, 0.0)
        slices_out.append(
            SliceRef(
                sop_instance_uid=sop_instance_uid(ds),
                sop_class_uid=sop_class_uid(ds),
                instance_number=instance_number,
                frame_number=s.header.frame_number if is_multiframe(ds) else None,
                position=tuple(float(v) for v in position),  # type: ignore[arg-type]
            )
        )
    used: list[int] = []
    for s in ordered:
        if s.source not in used:
            used.append(s.source)
    first = datasets[ordered[0].source]
    volume = Volume(
        hu=hu,
        spacing=(float(spacing_z), pixel_spacing[0], pixel_spacing[1]),
        orientation=iop,  # type: ignore[arg-type]
        slices=slices_out,
        datasets=[datasets[i] for i in used],
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID") or "") or None,
        slice_thickness=slice_thickness,
        warnings=warnings,
    )
    for text in warnings:
        logger.warning("volume: %s", text)
    logger.info(
        "assembled volume %s from %d images, spacing %.2f x %.2f x %.2f mm",
        "x".join(map(str, volume.shape)),
        len(used),
        *volume.spacing,
    )
    return volume


def load_volume(
    paths: Sequence[str | os.PathLike[str]], *, limits: StackLimits | None = None
) -> Volume:
    """Read the files of one series and ``assemble`` them into a HU ``Volume``.

    Raises
    ------
    InputRejected
        With a one-line reason naming the file when a file cannot be read or
        the stack cannot be trusted.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"paths must be a sequence of file paths, got one path: {paths!r}")
    if not paths:
        raise InputRejected("no files given for the series")
    with ThreadPoolExecutor(max_workers=_workers(len(paths))) as pool:
        datasets = list(pool.map(read_dataset, paths))
    names = [os.path.basename(os.fspath(p)) for p in paths]
    return assemble(datasets, names=names, limits=limits)
