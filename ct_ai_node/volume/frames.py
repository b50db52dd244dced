"""Per-frame header facts of one DICOM image, single-frame or Enhanced CT.

Pure: works on a ``pydicom.Dataset`` already in memory (read with or without
pixel data). A classic CT Image Storage instance is one frame whose geometry is
in the top-level attributes; an Enhanced / Legacy Converted Enhanced CT instance
holds N frames whose geometry lives in the Shared (5200,9229) and Per-frame
(5200,9230) Functional Groups Sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pydicom

from ct_ai_node.errors import InputRejected

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"

#: SOP classes whose images are CT slices
CT_SOP_CLASSES = (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
)


#: most frames one instance may claim: bounds the work per header (a CT has < 3000 slices)
MAX_FRAMES = 10000
#: largest Rows / Columns accepted (CT matrices are 512..2048)
MAX_MATRIX = 4096
#: item tag (FFFE,E000) in little endian: encapsulated pixel data starts with it
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True)
class FrameHeader:
    """Geometry and value transform of one frame (one slice)."""

    #: 1-based frame number inside a multi-frame instance, else None
    frame_number: int | None
    #: ImagePositionPatient (0020,0032), mm LPS
    position: tuple[float, float, float] | None
    #: ImageOrientationPatient (0020,0037)
    orientation: tuple[float, float, float, float, float, float] | None
    #: PixelSpacing (0028,0030): (between rows, between columns) in mm
    pixel_spacing: tuple[float, float] | None
    #: SliceThickness (0018,0050), mm
    slice_thickness: float | None
    #: RescaleSlope (0028,1053) and RescaleIntercept (0028,1052)
    slope: float
    intercept: float


def _float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        items = list(value) if not isinstance(value, (str, bytes)) else [value]
    except TypeError:
        return None
    if len(items) != n:
        return None
    out = tuple(_float(v) for v in items)
    if any(v is None for v in out):
        return None
    return out  # type: ignore[return-value]


def uid_of(ds: pydicom.Dataset, keyword: str) -> str:
    """A UID attribute as a stripped string ('' when absent or empty)."""
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def sop_instance_uid(ds: pydicom.Dataset) -> str:
    """SOPInstanceUID (0008,0018), else the file meta's MediaStorageSOPInstanceUID."""
    uid = uid_of(ds, "SOPInstanceUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = uid_of(ds.file_meta, "MediaStorageSOPInstanceUID")
    return uid


def sop_class_uid(ds: pydicom.Dataset) -> str:
    """SOPClassUID (0008,0016), else the file meta's MediaStorageSOPClassUID."""
    uid = uid_of(ds, "SOPClassUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = uid_of(ds.file_meta, "MediaStorageSOPClassUID")
    return uid


def number_of_frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames (0028,0008), 1 when absent or invalid."""
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return max(n, 1)


def claimed_frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames as written (0 when absent or not a number), unclamped."""
    try:
        return int(ds.get("NumberOfFrames") or 0)
    except (TypeError, ValueError):
        return 0


def native_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    """Length of a native (not encapsulated) Pixel Data value in memory, else None."""
    if "PixelData" not in ds:
        return None
    try:
        data = ds.PixelData
    except Exception:  # noqa: BLE001 - unreadable pixel data is judged by the decoder
        return None
    if not isinstance(data, (bytes, bytearray)) or data[:4] == _ITEM_TAG_LE:
        return None
    return len(data)


def frame_bytes(ds: pydicom.Dataset) -> int | None:
    """Bytes of one native frame (Rows x Columns x samples x BitsAllocated / 8)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.get("BitsAllocated") or 16)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits % 8 or rows <= 0 or cols <= 0 or samples <= 0:
        return None
    return rows * cols * samples * bits // 8


def header_problem(ds: pydicom.Dataset, pixel_bytes: int | None = None) -> str | None:
    """Why the image size or frame count a header claims cannot be trusted, else None.

    Checked before any work proportional to the claim: Rows/Columns above
    ``MAX_MATRIX``, NumberOfFrames above ``MAX_FRAMES``, a frame count that
    differs from the number of per-frame functional group items, or more frames
    than the native pixel data (``pixel_bytes``, else the value in memory) holds.
    """
    for keyword in ("Rows", "Columns"):
        try:
            value = int(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
        if value > MAX_MATRIX:
            return f"{keyword} {value} exceeds the limit of {MAX_MATRIX}"
    n = claimed_frames(ds)
    if n > MAX_FRAMES:
        return f"NumberOfFrames {n} exceeds the limit of {MAX_FRAMES} frames"
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None:
        described = len(per_frame)
        if described != max(n, 1):
            return (
                f"NumberOfFrames {n} but {described} frames described "
                "(PerFrameFunctionalGroupsSequence)"
            )
    if n > 1:
        if pixel_bytes is None:
            pixel_bytes = native_pixel_bytes(ds)
        size = frame_bytes(ds)
        if pixel_bytes is not None and size and n * size > pixel_bytes:
            return (
                f"NumberOfFrames {n} but the pixel data holds {pixel_bytes // size} frames "
                f"({pixel_bytes} bytes)"
            )
    return None


def is_multiframe(ds: pydicom.Dataset) -> bool:
    """True for instances whose frames are described by functional groups."""
    return "PerFrameFunctionalGroupsSequence" in ds or number_of_frames(ds) > 1


def _group_item(groups: Any, index: int) -> pydicom.Dataset | None:
    try:
        return groups[index]
    except (IndexError, TypeError):
        return None


def _from_groups(
    per_frame: pydicom.Dataset | None,
    shared: pydicom.Dataset | None,
    sequence: str,
    keyword: str,
) -> Any:
    """``keyword`` from the first item of ``sequence``, per-frame before shared."""
    for group in (per_frame, shared):
        if group is None or sequence not in group:
            continue
        seq = group.get(sequence)
        if seq and keyword in seq[0]:
            return seq[0].get(keyword)
    return None


def frame_headers(ds: pydicom.Dataset) -> list[FrameHeader]:
    """One ``FrameHeader`` per frame of ``ds``, in stored frame order.

    The work is bounded by the frames actually present: a frame count that
    ``header_problem`` finds absurd or inconsistent is refused at once.

    Raises
    ------
    InputRejected
        With ``header_problem``'s one-line reason (no file name: callers add it).
    """
    if not is_multiframe(ds):
        return [
            FrameHeader(
                frame_number=None,
                position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                slice_thickness=_float(ds.get("SliceThickness")),
                slope=_float(ds.get("RescaleSlope")) or 1.0,
                intercept=_float(ds.get("RescaleIntercept")) or 0.0,
            )
        ]
    problem = header_problem(ds)
    if problem:
        raise InputRejected(problem)
    n = number_of_frames(ds)
    shared = _group_item(ds.get("SharedFunctionalGroupsSequence"), 0)
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    top_slope = _float(ds.get("RescaleSlope"))
    top_intercept = _float(ds.get("RescaleIntercept"))
    frames = []
    for i in range(n):
        item = _group_item(per_frame_seq, i)
        slope = _float(_from_groups(item, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float(
            _from_groups(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        )
        position = _floats(
            _from_groups(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3
        )
        orientation = _floats(
            _from_groups(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        )
        spacing = _floats(_from_groups(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thickness = _float(_from_groups(item, shared, "PixelMeasuresSequence", "SliceThickness"))
        frames.append(
            FrameHeader(
                frame_number=i + 1,
                position=position,  # type: ignore[arg-type]
                orientation=orientation  # type: ignore[arg-type]
                or _floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=spacing or _floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                slice_thickness=thickness if thickness is not None else _float(ds.get("SliceThickness")),
                slope=slope if slope is not None else (top_slope or 1.0),
                intercept=intercept if intercept is not None else (top_intercept or 0.0),
            )
        )
    return frames


def image_type(ds: pydicom.Dataset) -> tuple[str, ...]:
    """ImageType (0008,0008) values, upper case; FrameType as a fallback."""
    value: Sequence[Any] | Any = ds.get("ImageType")
    if value is None:
        shared = _group_item(ds.get("SharedFunctionalGroupsSequence"), 0)
        value = _from_groups(None, shared, "CTImageFrameTypeSequence", "FrameType")
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value)
