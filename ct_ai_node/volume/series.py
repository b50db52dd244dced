"""What one series is, from its headers alone: ``SeriesSummary`` and ``summarise``.

Pure: no disk, no pixel data. The folder reader, the network node's spool and the
routing rules all summarise header datasets with ``summarise`` and hand the
summaries to ``ct_ai_node.rules.selection``.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydantic import BaseModel, ConfigDict, Field

from ct_ai_node.errors import InputRejected

from .frames import (
    FrameHeader,
    frame_headers,
    image_type,
    sop_class_uid,
    uid_of,
)
from .geometry import (
    Orientation,
    StackStats,
    classify_orientation,
    same_orientation,
    slice_normal,
    stack_stats,
)
from .stack import choose_stack, image_facts, instance_key

#: ImageType values that mark a projection localizer (scout, topogram)
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})

_MODALITY_OF_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",
}


class SeriesSummary(BaseModel):
    """Header facts of one series that the selection and routing rules need."""

    model_config = ConfigDict(frozen=True)

    #: grouping key: the SeriesInstanceUID, or a derived key when it is missing
    key: str
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    #: Modality (0008,0060); inferred from the SOP class when absent
    modality: str = ""
    #: the most common SOP Class UID of the series
    sop_class_uid: str = ""
    sop_class_uids: tuple[str, ...] = ()
    transfer_syntax_uids: tuple[str, ...] = ()
    #: distinct SOP instances
    n_instances: int = Field(0, ge=0)
    #: files read (more than ``n_instances`` when a file is present twice)
    n_files: int = Field(0, ge=0)
    #: frames (slices) over all distinct instances
    n_frames: int = Field(0, ge=0)
    rows: int | None = None
    columns: int | None = None
    #: PixelSpacing (0028,0030), (row spacing, column spacing) in mm
    pixel_spacing: tuple[float, float] | None = None
    #: ImageOrientationPatient (0020,0037) of the first frame
    iop: tuple[float, float, float, float, float, float] | None = None
    orientation: Orientation = Orientation.UNKNOWN
    #: angle between the slice normal and the feet-head axis (degrees)
    axial_deviation_deg: float | None = None
    #: SliceThickness (0018,0050), the most common value
    slice_thickness: float | None = None
    #: median distance between slice positions along the normal (mm)
    spacing_mm: float | None = None
    #: positions along the normal: gaps, unevenness, tilt, duplicates
    stack: StackStats | None = None
    #: GantryDetectorTilt (0018,1120) as recorded (degrees)
    gantry_tilt_tag_deg: float | None = None
    image_type: tuple[str, ...] = ()
    series_description: str = ""
    series_number: int | None = None
    body_part: str = ""
    manufacturer: str = ""
    #: ConvolutionKernel (0018,1210), values joined with "\"
    kernel: str = ""
    protocol_name: str = ""
    #: header inconsistencies that make the series unusable, one line each
    problems: tuple[str, ...] = ()

    @property
    def is_localizer(self) -> bool:
        return bool(LOCALIZER_TYPES.intersection(self.image_type))

    @property
    def is_original_primary(self) -> bool:
        return self.image_type[:2] == ("ORIGINAL", "PRIMARY")

    @property
    def n_slices(self) -> int:
        return self.n_frames

    @property
    def effective_thickness_mm(self) -> float | None:
        """SliceThickness, else the spacing between positions."""
        return self.slice_thickness if self.slice_thickness is not None else self.spacing_mm

    @property
    def gantry_tilt_deg(self) -> float:
        """Tilt seen in the positions, else the GantryDetectorTilt tag."""
        if self.stack is not None and self.stack.n_positions >= 2:
            return self.stack.tilt_deg
        return abs(self.gantry_tilt_tag_deg or 0.0)

    @property
    def label(self) -> str:
        """Short name for reasons and logs: ``series 3 (SCOUT)``."""
        if self.series_number is not None:
            name = f"series {self.series_number}"
        elif self.series_instance_uid:
            name = f"series ...{self.series_instance_uid[-8:]}"
        else:
            name = "series without UID"
        description = " ".join(self.series_description.split())
        return f"{name} ({description})" if description else name


def _most_common(values: Iterable, default=None):
    counted = Counter(v for v in values if v is not None and v != "")
    return counted.most_common(1)[0][0] if counted else default


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return " ".join(str(value).split())


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def derived_series_key(ds: pydicom.Dataset) -> str:
    """Grouping key for an instance without SeriesInstanceUID.

    Instances of one series share study, frame of reference, series number,
    description and matrix size; the key combines those.
    """
    parts = [
        uid_of(ds, "StudyInstanceUID"),
        uid_of(ds, "FrameOfReferenceUID"),
        _text(ds, "SeriesNumber"),
        _text(ds, "SeriesDescription"),
        _text(ds, "Rows"),
        _text(ds, "Columns"),
        _text(ds, "Modality"),
    ]
    return "no-series-uid:" + "|".join(parts)


def series_key(ds: pydicom.Dataset) -> str:
    """SeriesInstanceUID (0020,000E), or ``derived_series_key`` when empty."""
    return uid_of(ds, "SeriesInstanceUID") or derived_series_key(ds)


def summarise(datasets: Sequence[pydicom.Dataset], key: str | None = None) -> SeriesSummary:
    """Summarise the header datasets of one series.

    Parameters
    ----------
    datasets
        Header datasets (pixel data not needed) of the instances of one series,
        in any order; an instance present twice is counted once.
    key
        Grouping key; defaults to ``series_key`` of the first dataset.

    Raises
    ------
    ValueError
        If ``datasets`` is empty.
    """
    if not datasets:
        raise ValueError("datasets must not be empty")
    first = datasets[0]
    key = key or series_key(first)

    # distinct images (copies dropped), then the largest consistent stack among
    # them: the same choice as the assembler's (see ``stack``)
    problems: list[str] = []
    unique: dict[tuple, tuple[pydicom.Dataset, list[FrameHeader]]] = {}
    for ds in datasets:
        try:
            headers = frame_headers(ds)
        except InputRejected as exc:  # absurd frame count: named, not looped over
            if exc.reason not in problems:
                problems.append(exc.reason)
            continue
        unique.setdefault(instance_key(ds, headers), (ds, headers))
    entries = list(unique.values())
    choice = choose_stack([image_facts(ds, headers) for ds, headers in entries])
    instances = [entries[i][0] for i in choice.kept] or [first]
    frames: list[FrameHeader] = [h for i in choice.kept for h in entries[i][1]]

    sop_classes = [sop_class_uid(ds) for ds in instances]
    sop_class = _most_common(sop_classes, "")
    modality = _most_common((_text(ds, "Modality") for ds in instances), "")
    if not modality:
        modality = _MODALITY_OF_SOP_CLASS.get(sop_class, "")

    rows, columns = _most_common(
        ((_int(ds.get("Rows")), _int(ds.get("Columns"))) for ds in instances), (None, None)
    )

    spacings = {f.pixel_spacing for f in frames if f.pixel_spacing is not None}
    if len(spacings) > 1:
        values = sorted({round(s[0], 3) for s in spacings} | {round(s[1], 3) for s in spacings})
        problems.append(
            "mixed pixel spacing in one series (" + ", ".join(f"{v:g}" for v in values[:4]) + " mm)"
        )
    pixel_spacing = _most_common(f.pixel_spacing for f in frames)

    iops = [f.orientation for f in frames if f.orientation is not None]
    iop = iops[0] if iops else None
    if iop is not None and any(not same_orientation(iop, other) for other in iops):
        problems.append("mixed orientations in one series")
    orientation, axial_dev = classify_orientation(iop)

    stack = None
    positions = [f.position for f in frames]
    if iop is not None and frames and all(p is not None for p in positions) and not problems:
        try:
            normal = slice_normal(iop)
        except ValueError:
            normal = None
        if normal is not None:
            _, stack = stack_stats(np.asarray(positions, dtype=np.float64), normal)
    if frames and any(p is None for p in positions) and len(frames) > 1:
        problems.append("slice positions (ImagePositionPatient) missing")

    thickness = _most_common(f.slice_thickness for f in frames)
    kernel_values = [_text(ds, "ConvolutionKernel") for ds in instances]
    transfer_syntaxes = sorted(
        {
            uid_of(ds.file_meta, "TransferSyntaxUID")
            for ds in instances
            if getattr(ds, "file_meta", None) is not None
        }
        - {""}
    )

    return SeriesSummary(
        key=key,
        series_instance_uid=uid_of(first, "SeriesInstanceUID"),
        study_instance_uid=uid_of(first, "StudyInstanceUID"),
        frame_of_reference_uid=uid_of(first, "FrameOfReferenceUID"),
        modality=modality.upper(),
        sop_class_uid=sop_class,
        sop_class_uids=tuple(sorted(set(sop_classes) - {""})),
        transfer_syntax_uids=tuple(transfer_syntaxes),
        n_instances=len(choice.kept),
        n_files=len(datasets),
        n_frames=len(frames),
        rows=rows,
        columns=columns,
        pixel_spacing=pixel_spacing,
        iop=iop,
        orientation=orientation,
        axial_deviation_deg=axial_dev,
        slice_thickness=thickness,
        spacing_mm=stack.spacing_mm if stack is not None else None,
        stack=stack,
        gantry_tilt_tag_deg=_float(first.get("GantryDetectorTilt")),
        image_type=_most_common((image_type(ds) for ds in instances), ()),
        series_description=_text(first, "SeriesDescription"),
        series_number=_int(first.get("SeriesNumber")),
        body_part=_text(first, "BodyPartExamined"),
        manufacturer=_text(first, "Manufacturer"),
        kernel=_most_common(kernel_values, ""),
        protocol_name=_text(first, "ProtocolName"),
        problems=tuple(problems),
    )
