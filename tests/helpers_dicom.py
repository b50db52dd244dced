"""Synthetic CT series on disk for the volume and selection tests.

``write_ct_series`` writes valid CT Image Storage files with realistic headers
(Siemens-like tags, patient module, rescale, windowing); ``write_enhanced_ct``
writes one Enhanced CT Image Storage file with per-frame functional groups.
Every writer returns what the loader should find (HU volume ascending along the
slice normal, positions, UIDs) so tests compare against ground truth.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/real"


@dataclass
class WrittenSeries:
    """What was written, in ascending order along the slice normal."""

    paths: list[Path]
    hu: np.ndarray  # float32 (z, y, x), the HU the loader must produce
    positions: list[tuple[float, float, float]]
    sop_instance_uids: list[str]
    instance_numbers: list[int]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    iop: tuple[float, ...]
    extra: dict = field(default_factory=dict)


def stored_pattern(n: int, rows: int, cols: int) -> np.ndarray:
    """Stored values that differ per slice, row and column (int16, >= 0)."""
    k = np.arange(n, dtype=np.int32)[:, None, None]
    y = np.arange(rows, dtype=np.int32)[None, :, None]
    x = np.arange(cols, dtype=np.int32)[None, None, :]
    return (24 + 30 * k + 3 * y + x).astype(np.int16)


def _file_meta(sop_class: str, sop_uid: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    return meta


def _common(ds: Dataset, *, modality: str, study_uid: str, series_uid: str, frame_uid: str,
            series_number: int, description: str, feet_first: bool) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "SOMATOM Test"
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT Thorax"
    ds.SeriesDescription = description
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST123456"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS" if feet_first else "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""


def write_ct_series(
    directory: str | Path,
    n: int = 30,
    rows: int = 64,
    cols: int = 64,
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.7),
    *,
    shuffle_names: bool = True,
    feet_first: bool = False,
    tilt_deg: float = 0.0,
    shear_deg: float = 0.0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    thickness: float | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    series_number: int = 2,
    description: str = "Thorax 2.5 B40f",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    modality: str = "CT",
    sop_class: str = CT_IMAGE_STORAGE,
    iop: Sequence[float] | None = None,
    z0: float = -350.0,
    skip: Sequence[int] = (),
    offsets: Mapping[int, float] | None = None,
    stored: np.ndarray | None = None,
    pixel_padding_value: int | None = None,
    name_prefix: str = "",
    seed: int = 0,
) -> WrittenSeries:
    """Write a synthetic CT series, one file per slice.

    Slice ``k`` lies at ``z0 + k * spacing[0]`` along the slice normal (plus
    ``offsets[k]``); slices in ``skip`` are not written. ``tilt_deg`` tilts the
    image plane about the x axis while the table moves along z (a tilted
    gantry); ``shear_deg`` keeps the plane axial and shifts positions in y.
    InstanceNumbers run from the top (head) down, as scanners often do, and
    are shuffled together with the file names when ``shuffle_names``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    thickness = spacing[0] if thickness is None else thickness
    offsets = dict(offsets or {})

    if iop is None:
        t = math.radians(tilt_deg)
        row = (-1.0, 0.0, 0.0) if feet_first else (1.0, 0.0, 0.0)
        col = (0.0, math.cos(t), -math.sin(t))
        iop = (*row, *col)
    iop = tuple(float(v) for v in iop)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    if tilt_deg:
        # table moves along z; the step along z is longer than along the normal
        direction = np.array([0.0, 0.0, 1.0 if normal[2] >= 0 else -1.0])
        step = direction * spacing[0] / math.cos(math.radians(tilt_deg))
    else:
        step = normal * spacing[0]
    if shear_deg:
        step = step + np.array([0.0, 1.0, 0.0]) * spacing[0] * math.tan(math.radians(shear_deg))
    origin = np.array([-cols * spacing[2] / 2, -rows * spacing[1] / 2, 0.0]) + normal * z0

    if stored is None:
        stored = stored_pattern(n, rows, cols)
    kept = [k for k in range(n) if k not in set(skip)]
    numbers = list(range(len(kept), 0, -1))  # instance 1 = highest slice
    if shuffle_names:
        rng.shuffle(numbers)
    names = [f"{name_prefix}{i:04d}" for i in range(len(kept))]
    if shuffle_names:
        names = [f"{name_prefix}{rng.getrandbits(40):010x}" for _ in kept]
        exts = ["", ".dcm", ".DCM", ".ima"]
        names = [nm + exts[i % len(exts)] for i, nm in enumerate(names)]

    out = WrittenSeries([], np.empty(0), [], [], [], series_uid, study_uid, frame_uid, iop)
    hu_slices = []
    for idx, k in enumerate(kept):
        sop_uid = generate_uid()
        position = origin + step * k + step / np.linalg.norm(step) * offsets.get(k, 0.0)
        position = tuple(round(float(v), 4) for v in position)
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
        _common(ds, modality=modality, study_uid=study_uid, series_uid=series_uid,
                frame_uid=frame_uid, series_number=series_number, description=description,
                feet_first=feet_first)
        ds.ImageType = list(image_type)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = numbers[idx]
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.SliceThickness = thickness
        ds.KVP = 120
        ds.ConvolutionKernel = "B40f"
        ds.GantryDetectorTilt = tilt_deg
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        if pixel_padding_value is not None:
            ds.PixelPaddingValue = pixel_padding_value
        frame = np.ascontiguousarray(stored[k].astype(np.int16))
        ds.PixelData = frame.tobytes()
        path = directory / names[idx]
        ds.save_as(path, enforce_file_format=True)
        out.paths.append(path)
        out.positions.append(position)
        out.sop_instance_uids.append(sop_uid)
        out.instance_numbers.append(numbers[idx])
        hu_slices.append(frame.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    out.hu = np.stack(hu_slices) if hu_slices else np.empty((0, rows, cols), np.float32)
    return out


def _item(**kwargs) -> Dataset:
    item = Dataset()
    for key, value in kwargs.items():
        setattr(item, key, value)
    return item


def write_enhanced_ct(
    directory: str | Path,
    n: int = 24,
    rows: int = 32,
    cols: int = 32,
    spacing: tuple[float, float, float] = (1.5, 0.8, 0.8),
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    shuffle_frames: bool = True,
    per_frame_rescale: bool = False,
    seed: int = 1,
    name: str = "enhanced",
) -> WrittenSeries:
    """Write one Enhanced CT Image Storage file whose frames are out of order.

    ``extra["frame_of_z"][z]`` is the 1-based frame number holding slice z.
    With ``per_frame_rescale`` the PixelValueTransformationSequence is in the
    per-frame groups (intercept varying per frame) instead of the shared group.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    study_uid, series_uid, frame_uid, sop_uid = (generate_uid() for _ in range(4))
    stored = stored_pattern(n, rows, cols)
    order = list(range(n))  # frame i holds slice order[i]
    if shuffle_frames:
        rng.shuffle(order)
    intercepts = [intercept - (10 * i if per_frame_rescale else 0) for i in range(n)]
    iop = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_uid, ExplicitVRLittleEndian)
    _common(ds, modality="CT", study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid,
            series_number=7, description="Enhanced Thorax 1.5", feet_first=False)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.ContentDate = "20240102"
    ds.ContentTime = "101500"
    ds.AcquisitionDateTime = "20240102101500"
    ds.NumberOfFrames = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    shared = _item(
        PixelMeasuresSequence=DicomSequence(
            [_item(PixelSpacing=[spacing[1], spacing[2]], SliceThickness=spacing[0])]
        ),
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=list(iop))]),
        CTImageFrameTypeSequence=DicomSequence(
            [_item(FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])]
        ),
    )
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence(
            [_item(RescaleIntercept=intercept, RescaleSlope=slope, RescaleType="HU")]
        )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    frames = []
    positions = {}
    hu = np.empty((n, rows, cols), np.float32)
    for i, k in enumerate(order):
        position = (-cols * spacing[2] / 2, -rows * spacing[1] / 2, -200.0 + k * spacing[0])
        positions[k] = position
        group = _item(
            PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=list(position))]),
            FrameContentSequence=DicomSequence(
                [_item(StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1])]
            ),
        )
        if per_frame_rescale:
            group.PixelValueTransformationSequence = DicomSequence(
                [_item(RescaleIntercept=intercepts[i], RescaleSlope=slope, RescaleType="HU")]
            )
        per_frame.append(group)
        frames.append(stored[k])
        hu[k] = stored[k].astype(np.float32) * slope + intercepts[i]
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(np.stack(frames).astype(np.int16)).tobytes()
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    frame_of_z = [order.index(k) + 1 for k in range(n)]
    return WrittenSeries(
        paths=[path],
        hu=hu,
        positions=[positions[k] for k in range(n)],
        sop_instance_uids=[sop_uid],
        instance_numbers=[1],
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=frame_uid,
        iop=iop,
        extra={"frame_of_z": frame_of_z},
    )


def write_mr_series(directory: str | Path, n: int = 25) -> WrittenSeries:
    """An axial MR series (MR Image Storage) with CT-like geometry."""
    return write_ct_series(
        directory, n=n, modality="MR", sop_class=MR_IMAGE_STORAGE, intercept=0.0,
        description="t1_vibe_tra", image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
    )


def read_back(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)
