"""One series -> ``Volume``: sort, check, decode and rescale to Hounsfield units.

``assemble`` works on datasets already in memory (the network node's spool can
hand them over); ``load_volume`` reads files first. Either refuses a stack it
cannot trust with ``InputRejected`` and a one-line reason that names the file
(never the patient): absurd frame counts or matrices, mixed pixel spacing,
missing slices, uneven spacing, strong gantry tilt, two images at one position,
truncated or corrupt pixel data.

What it can repair it repairs in memory, with one warning per kind of repair:
images of another matrix, orientation or acquisition in the series are left out
(``stack``), orientation rounding noise is unified, a file meta transfer syntax
that does not match the data is corrected, and empty, invalid or shared identity
UIDs are replaced by valid deterministic ones (``identity``).

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
from pydicom.uid import ExplicitVRLittleEndian

from ct_ai_node.errors import InputRejected

from .frames import (
    FrameHeader,
    frame_bytes,
    frame_headers,
    header_problem,
    is_multiframe,
    number_of_frames,
    sop_class_uid,
)
from .geometry import (
    SAME_POSITION_MM,
    StackLimits,
    check_stack,
    same_orientation,
    slice_normal,
    stack_stats,
)
from .identity import repair_identity
from .reader import read_dataset, read_notes
from .stack import choose_stack, image_facts, instance_key
from .types import SliceRef, Volume

logger = logging.getLogger(__name__)

#: HU given to padding (outside the scan's field of view): air
AIR_HU = -1024.0
#: nothing in a patient's CT is below this; lower values are padding (-2000, -2048, -3024)
PADDING_BELOW_HU = -1500.0
_AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: largest volume assembled (voxels): 2**31 float32 voxels are 8 GiB
MAX_VOXELS = 1 << 31
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True)
class _Slice:
    """One frame of one source dataset, before sorting."""

    source: int  # index into the list of unique datasets
    header: FrameHeader


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if i < len(names) else f"image {i + 1}"


def _workers(n: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n))


def _headers(datasets: Sequence[pydicom.Dataset], names: Sequence[str]) -> list[list[FrameHeader]]:
    """``frame_headers`` of every dataset; an absurd frame claim refuses, naming the file."""
    out = []
    for i, ds in enumerate(datasets):
        try:
            out.append(frame_headers(ds))
        except InputRejected as exc:
            raise InputRejected(f"file {_name(names, i)}: {exc.reason}") from exc
    return out


def _same_pixels(a: pydicom.Dataset, b: pydicom.Dataset) -> bool:
    try:
        return bytes(a.PixelData) == bytes(b.PixelData)
    except AttributeError:
        return False


def _dedupe(
    datasets: Sequence[pydicom.Dataset],
    headers: Sequence[list[FrameHeader]],
    names: Sequence[str],
    warnings: list[str],
) -> list[int]:
    """Indices of the distinct images: second copies of one image dropped.

    A copy has the same SOP Instance UID and frame positions (``instance_key``);
    without a usable UID, the same position, InstanceNumber, AcquisitionNumber
    and pixel data. One UID on images at different positions names different
    images (minted apart later by ``repair_identity``).
    """
    kept: list[int] = []
    seen: dict[tuple, int] = {}
    for i, ds in enumerate(datasets):
        key = instance_key(ds, headers[i])
        first = seen.get(key)
        if first is not None and (key[0] == "uid" or _same_pixels(datasets[first], ds)):
            warnings.append(f"duplicate copy of one image ignored (file {_name(names, i)})")
            continue
        seen.setdefault(key, i)
        kept.append(i)
    return kept


def _check_images(datasets: Sequence[pydicom.Dataset], names: Sequence[str]) -> None:
    """Every dataset is a grey-scale image of a sane size."""
    for ds, name in zip(datasets, names):
        if "PixelData" not in ds:
            raise InputRejected(f"file {name}: no pixel data (file truncated or not an image)")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InputRejected(f"file {name}: Rows/Columns missing") from exc
        if rows <= 0 or cols <= 0:
            raise InputRejected(f"file {name}: image size {rows}x{cols}")
        problem = header_problem(ds)
        if problem:
            raise InputRejected(f"file {name}: {problem}")
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise InputRejected(f"file {name}: not a grey-scale image (SamplesPerPixel > 1)")


def _fix_pixel_syntax(ds: pydicom.Dataset, name: str) -> str | None:
    """Match the transfer syntax to how the pixel data is really stored.

    A file meta that names a compressed syntax over native pixel data of exactly
    Rows x Columns x frames x BitsAllocated/8 bytes is read as native (returns a
    note); compressed data behind a native syntax is refused with that reason.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not syntax.is_transfer_syntax:
        return None
    data = ds.PixelData
    if not isinstance(data, (bytes, bytearray)):
        return None
    looks_encapsulated = bytes(data[:4]) == _ITEM_TAG_LE
    size = frame_bytes(ds)
    native_length = size * number_of_frames(ds) if size else None
    if syntax.is_encapsulated and not looks_encapsulated:
        if native_length is not None and len(data) in (native_length, native_length + 1):
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            return (
                f"file meta transfer syntax {syntax.name} but the pixel data is not "
                "compressed: read as native pixel data"
            )
        return None  # the decoder names what is wrong
    if not syntax.is_encapsulated and looks_encapsulated and len(data) != native_length:
        raise InputRejected(
            f"file {name}: pixel data is compressed (encapsulated) but the transfer syntax "
            f"{syntax.name} is uncompressed"
        )
    return None


def _choose(
    datasets: Sequence[pydicom.Dataset],
    headers: Sequence[list[FrameHeader]],
    names: Sequence[str],
    warnings: list[str],
) -> list[int]:
    """Indices of the images of the largest consistent stack (``stack.choose_stack``)."""
    choice = choose_stack([image_facts(ds, h) for ds, h in zip(datasets, headers)])
    note = choice.note(names)
    if note:
        warnings.append(note)
    return choice.kept


def _unify_orientation(
    datasets: Sequence[pydicom.Dataset], reference: pydicom.Dataset, warnings: list[str]
) -> None:
    """Give every single-frame dataset the reference's ImageOrientationPatient.

    Slices of one stack whose orientations differ by rounding noise (within
    ``ORIENTATION_TOLERANCE``) would make the writers see "different"
    orientations; the in-memory headers get the reference slice's value.
    """
    if is_multiframe(reference) or "ImageOrientationPatient" not in reference:
        return
    value = list(reference.ImageOrientationPatient)
    iop = [float(v) for v in value]
    worst = 0.0
    changed = 0
    for ds in datasets:
        if ds is reference or is_multiframe(ds):
            continue
        try:
            values = [float(v) for v in ds.ImageOrientationPatient]
            diff = max(abs(a - b) for a, b in zip(values, iop, strict=True))
        except (AttributeError, TypeError, ValueError):
            continue
        if diff > 0.0:
            ds.ImageOrientationPatient = value
            worst = max(worst, diff)
            changed += 1
    if changed:
        warnings.append(
            f"ImageOrientationPatient differs by up to {worst:.1e} between slices "
            f"(rounding): the first slice's value set on {changed} images"
        )


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

    headers = _headers(datasets, names)
    kept = _dedupe(datasets, headers, names, warnings)
    datasets = [datasets[i] for i in kept]
    names = [names[i] for i in kept]
    headers = [headers[i] for i in kept]
    _check_images(datasets, names)
    kept = _choose(datasets, headers, names, warnings)
    datasets = [datasets[i] for i in kept]
    names = [names[i] for i in kept]
    headers = [headers[i] for i in kept]
    notes: Counter[str] = Counter()
    for ds, name in zip(datasets, names):
        notes.update(read_notes(ds))
        note = _fix_pixel_syntax(ds, name)
        if note:
            notes[note] += 1
    for text, count in notes.items():
        warnings.append(f"{text} ({count} of {len(datasets)} images)")

    slices = [
        _Slice(source=i, header=header) for i, hs in enumerate(headers) for header in hs
    ]
    iop, pixel_spacing = _check_frames(slices, names, warnings)
    normal = slice_normal(iop)
    ordered, spacing_z = _sort(slices, names, normal, limits, warnings)
    _unify_orientation(datasets, datasets[slices[0].source], warnings)

    thickness = Counter(
        s.header.slice_thickness for s in ordered if s.header.slice_thickness is not None
    ).most_common(1)
    slice_thickness = thickness[0][0] if thickness else None
    if spacing_z is None:
        spacing_z = slice_thickness or 1.0
        warnings.append(f"single slice: z spacing taken as {spacing_z:g} mm")
    elif slice_thickness is None:
        slice_thickness = float(spacing_z)
        warnings.append(
            f"SliceThickness missing: taken as the slice spacing ({spacing_z:.3g} mm)"
        )

    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if len(ordered) * rows * cols > MAX_VOXELS:
        raise InputRejected(
            f"volume of {len(ordered)}x{rows}x{cols} voxels exceeds the limit of "
            f"{MAX_VOXELS} voxels"
        )
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

    used: list[int] = []
    for s in ordered:
        if s.source not in used:
            used.append(s.source)
    used_datasets = [datasets[i] for i in used]
    study_uid, series_uid, frame_uid = repair_identity(
        used_datasets, [headers[i][0].position for i in used], warnings
    )
    for ds in used_datasets:
        if not str(ds.get("SOPClassUID") or "").strip() and sop_class_uid(ds):
            ds.SOPClassUID = sop_class_uid(ds)  # from the file meta
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
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=sop_class_uid(ds),
                instance_number=instance_number,
                frame_number=s.header.frame_number if is_multiframe(ds) else None,
                position=tuple(float(v) for v in position),  # type: ignore[arg-type]
            )
        )
    volume = Volume(
        hu=hu,
        spacing=(float(spacing_z), pixel_spacing[0], pixel_spacing[1]),
        orientation=iop,  # type: ignore[arg-type]
        slices=slices_out,
        datasets=used_datasets,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_uid,
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
