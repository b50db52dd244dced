"""The volume contract: one CT series as a HU array plus the geometry and the
references every writer needs. Produced by ``ct_ai_node.volume.assemble``,
consumed by the pipeline and the writers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pydicom


@dataclass(frozen=True)
class SliceRef:
    """Where slice ``z`` of the volume came from."""

    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    #: 1-based frame number inside a multi-frame (Enhanced CT) source, else None
    frame_number: int | None
    #: ImagePositionPatient of this slice (mm, LPS)
    position: tuple[float, float, float]


@dataclass
class Volume:
    """A CT series as a Hounsfield-unit volume.

    ``hu[z, y, x]``: z runs along the slice normal (cross product of the row and
    column direction cosines), ascending; y is the row index, x the column index.
    """

    hu: np.ndarray  # float32 (z, y, x)
    #: (z, y, x) spacing in mm; z from the slice positions, not SliceThickness
    spacing: tuple[float, float, float]
    #: ImageOrientationPatient (row cosines, column cosines)
    orientation: tuple[float, float, float, float, float, float]
    slices: list[SliceRef]
    #: the source datasets (headers and pixel data) of the slices in the volume
    #: only, one per source instance, in the order of first appearance in
    #: ``slices``; identity UIDs made valid in memory (``identity.repair_identity``)
    datasets: list[pydicom.Dataset]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    slice_thickness: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0

    @property
    def is_multiframe(self) -> bool:
        return any(s.frame_number is not None for s in self.slices)

    def release_source_pixels(self) -> None:
        """Drop the encoded pixel data from ``datasets`` (``hu`` holds the image): the
        writers need only the headers, and the pixels of a 600-slice series are 300 MB
        held through the whole analysis."""
        for ds in self.datasets:
            for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if keyword in ds:
                    delattr(ds, keyword)

    def dataset_for(self, z: int) -> pydicom.Dataset:
        """The source dataset holding slice ``z``."""
        uid = self.slices[z].sop_instance_uid
        for ds in self.datasets:
            if ds.SOPInstanceUID == uid:
                return ds
        raise KeyError(uid)
