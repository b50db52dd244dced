"""Synthetic source series and analysis results for the writer tests.

Everything is built in memory: a small CT series with realistic headers (single-frame
CT Image Storage, or one Legacy Converted Enhanced CT multi-frame instance whose frames
run in the opposite direction to the volume's z axis), the matching ``Volume``, and an
``AnalysisResult`` with two ellipsoid lungs and a blob of infection.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ct_ai_node.pipeline.types import (
    LABEL_POSITIVE,
    LEFT_LUNG,
    RIGHT_LUNG,
    AlgorithmInfo,
    AnalysisResult,
)
from ct_ai_node.volume.types import SliceRef, Volume

ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_ct_series(
    n_slices: int = 24,
    rows: int = 64,
    columns: int = 64,
    *,
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.7),
    hu: np.ndarray | None = None,
    with_pixels: bool = True,
) -> list[Dataset]:
    """Single-frame CT Image Storage datasets, one per slice, ascending z."""
    dz, dy, dx = spacing
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    if hu is None and with_pixels:
        hu = phantom_hu(n_slices, rows, columns)
    datasets = []
    for z in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = "20240102"
        ds.SeriesDate = "20240102"
        ds.AcquisitionDate = "20240102"
        ds.ContentDate = "20240102"
        ds.StudyTime = "101500"
        ds.SeriesTime = "101600"
        ds.AcquisitionTime = "101610"
        ds.ContentTime = "101610"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "Phantom Scanners"
        ds.ManufacturerModelName = "Synthetic 64"
        ds.InstitutionName = "Test Hospital"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "Chest 2.5mm"
        ds.PatientName = "Phantom^Pat"
        ds.PatientID = "PAT001"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.PatientAge = "064Y"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = dz
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "S1"
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [-0.5 * columns * dx, -0.5 * rows * dy, -100.0 + z * dz]
        ds.ImageOrientationPatient = list(ORIENTATION)
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = -100.0 + z * dz
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [dy, dx]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        if with_pixels:
            ds.PixelData = (hu[z] + 1024).astype(np.int16).tobytes()
        datasets.append(ds)
    return datasets


def phantom_hu(n: int, rows: int, columns: int) -> np.ndarray:
    hu = np.full((n, rows, columns), -1000.0, np.float32)
    zz, yy, xx = np.ogrid[:n, :rows, :columns]
    body = ((yy - rows / 2) / (0.45 * rows)) ** 2 + ((xx - columns / 2) / (0.48 * columns)) ** 2 <= 1
    hu[np.broadcast_to(body, hu.shape)] = 40.0
    right, left = lung_masks(n, rows, columns)
    hu[right | left] = -850.0
    return hu


def lung_masks(n: int, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Two ellipsoids; the patient's right lung is on the image's left (low x)."""
    zz, yy, xx = np.ogrid[:n, :rows, :columns]
    cz, rz = (n - 1) / 2, 0.42 * n
    cy, ry = rows / 2, 0.3 * rows
    rx = 0.17 * columns

    def ellipsoid(cx: float) -> np.ndarray:
        return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    return ellipsoid(0.3 * columns), ellipsoid(0.7 * columns)


def make_volume(datasets: list[Dataset], hu: np.ndarray | None = None) -> Volume:
    """A Volume over single-frame datasets given in ascending z order."""
    first = datasets[0]
    rows, columns = int(first.Rows), int(first.Columns)
    if hu is None:
        hu = np.stack(
            [np.frombuffer(ds.PixelData, np.int16).reshape(rows, columns) for ds in datasets]
        ).astype(np.float32) - 1024.0 if "PixelData" in first else np.zeros(
            (len(datasets), rows, columns), np.float32
        )
    slices = [
        SliceRef(
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            instance_number=int(ds.InstanceNumber),
            frame_number=None,
            position=tuple(float(v) for v in ds.ImagePositionPatient),
        )
        for ds in datasets
    ]
    dz = float(datasets[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    return Volume(
        hu=hu,
        spacing=(dz, float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
        orientation=ORIENTATION,
        slices=slices,
        datasets=list(datasets),
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        frame_of_reference_uid=first.FrameOfReferenceUID,
        slice_thickness=float(first.SliceThickness),
    )


def make_multiframe_volume(datasets: list[Dataset]) -> Volume:
    """A Volume over one Legacy Converted Enhanced CT instance made from ``datasets``.

    The frames are stored head first (descending z) so that frame number and z index
    run in opposite directions, which is what a writer must not get wrong.
    """
    single = make_volume(datasets)
    reversed_sources = list(reversed(datasets))
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=reversed_sources,
        series_instance_uid=generate_uid(),
        series_number=4,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    mf = pydicom.dcmread(io.BytesIO(to_bytes(mf)))
    n = len(datasets)
    slices = [
        SliceRef(
            sop_instance_uid=mf.SOPInstanceUID,
            sop_class_uid=mf.SOPClassUID,
            instance_number=int(mf.InstanceNumber),
            frame_number=n - z,
            position=single.slices[z].position,
        )
        for z in range(n)
    ]
    return Volume(
        hu=single.hu,
        spacing=single.spacing,
        orientation=single.orientation,
        slices=slices,
        datasets=[mf],
        study_instance_uid=mf.StudyInstanceUID,
        series_instance_uid=mf.SeriesInstanceUID,
        frame_of_reference_uid=mf.FrameOfReferenceUID,
        slice_thickness=single.slice_thickness,
    )


def make_result(
    volume: Volume,
    *,
    with_infection: bool = True,
    probability: float = 0.87,
    algorithm: AlgorithmInfo | None = None,
) -> AnalysisResult:
    n, rows, columns = volume.shape
    right, left = lung_masks(n, rows, columns)
    labels = np.zeros((n, rows, columns), np.uint8)
    labels[right] = RIGHT_LUNG
    labels[left] = LEFT_LUNG
    zz, yy, xx = np.ogrid[:n, :rows, :columns]
    blob = (
        ((zz - 0.6 * n) / (0.15 * n)) ** 2
        + ((yy - 0.55 * rows) / (0.12 * rows)) ** 2
        + ((xx - 0.28 * columns) / (0.08 * columns)) ** 2
    ) <= 1
    infection = blob & right if with_infection else np.zeros_like(blob)
    heat = np.exp(
        -(
            ((zz - 0.6 * n) / (0.2 * n)) ** 2
            + ((yy - 0.55 * rows) / (0.18 * rows)) ** 2
            + ((xx - 0.28 * columns) / (0.12 * columns)) ** 2
        )
    ).astype(np.float32)
    if not with_infection:
        heat *= 0.1
    lung = labels > 0
    heat = np.where(lung, heat, 0).astype(np.float32)
    scores = np.where(lung.any(axis=(1, 2)), heat.max(axis=(1, 2)), 0).astype(np.float32)
    positive = [int(z) for z in np.flatnonzero(scores > 0.5)]
    lung_slices = int(lung.any(axis=(1, 2)).sum())
    voxel_ml = volume.voxel_volume_ml
    lung_ml = float(lung.sum() * voxel_ml)
    lesion_ml = float(infection.sum() * voxel_ml)
    key = [int(z) for z in np.argsort(-scores, kind="stable")[:5] if scores[z] > 0]
    return AnalysisResult(
        algorithm=algorithm
        or AlgorithmInfo(
            name="ct-ai-node method A (slice ResNet + fused Grad-CAM)",
            version="0.1.0+phantom-a1b2c3d4",
        ),
        pipeline="method_a",
        probability=probability,
        threshold=0.5,
        label=LABEL_POSITIVE if probability >= 0.5 else "No COVID-19-like pneumonia",
        slice_scores=scores,
        positive_slice_ratio=len(positive) / max(lung_slices, 1),
        positive_slices=positive,
        lung_labels=labels,
        infection_mask=infection,
        heatmap=heat,
        lung_volume_ml=lung_ml,
        lesion_volume_ml=lesion_ml,
        involvement_percent=100.0 * lesion_ml / lung_ml,
        corona_score_ml=float(heat[positive].sum() * voxel_ml),
        key_slices=key,
    )


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def dciodvfy_errors(ds: Dataset) -> tuple[list[str], list[str]]:
    """Run dciodvfy on ``ds``; return (error lines, warning lines)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise FileNotFoundError("dciodvfy")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "obj.dcm"
        path.write_bytes(to_bytes(ds))
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if "Error" in line]
    warnings = [line for line in lines if "Warning" in line]
    return errors, warnings
