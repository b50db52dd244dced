"""Write a phantom as a CT Image Storage series (one file per slice), and a case
folder with the ground truth beside it.

Geometry: ImageOrientationPatient 1\\0\\0\\0\\1\\0 (rows run to the patient's left,
columns to posterior), ImagePositionPatient z = z index * spacing + offset
(increasing superior, LPS). InstanceNumber follows the acquisition: head-first
scans start at the head (InstanceNumber 1 = most superior slice), feet-first
scans at the feet. The patient name goes into the headers only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from .phantom import Phantom

MANUFACTURER = "ct-ai-node synthetic phantom"
MODEL = "ct-ai-node phantom generator"
SOFTWARE = "ct_ai_node.synthetic 1.0"


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _da(d: _dt.date) -> str:
    return d.strftime("%Y%m%d")


def _tm(t: _dt.time) -> str:
    return t.strftime("%H%M%S") + ".000000"


def write_dicom_series(
    phantom: Phantom,
    out_dir: str | Path,
    *,
    patient_id: str = "PHANTOM-0001",
    patient_name: str = "Phantom^Covid",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    feet_first: bool = False,
    slice_thickness: float | None = None,
    accession: str | None = None,
    study_description: str = "CT CHEST",
    series_description: str | None = None,
    study_date: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int | None = None,
    unsigned: bool | None = None,
) -> list[Path]:
    """Write one file per slice into ``out_dir``; returns the paths in
    InstanceNumber order. UIDs and the drawn header details are deterministic
    for a given phantom seed (``seed`` overrides) unless UIDs are passed in."""
    if transfer_syntax != ExplicitVRLittleEndian:
        from pydicom.uid import ImplicitVRLittleEndian

        if transfer_syntax != ImplicitVRLittleEndian:
            raise ValueError("only uncompressed little-endian transfer syntaxes are supported")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = phantom.seed if seed is None else int(seed)
    rng = np.random.default_rng([seed, 0xD1C0])
    pr = phantom.params
    nz, ny, nx = phantom.hu.shape
    dz, dy, dx = phantom.spacing
    key = (seed, patient_id, phantom.kind, nz, ny, nx)
    study_uid = study_instance_uid or _uid("study", *key)
    series_uid = series_instance_uid or _uid("series", series_number, feet_first, *key)
    for_uid = frame_of_reference_uid or _uid("for", *key)
    if study_date:
        sdate = _dt.datetime.strptime(study_date, "%Y%m%d").date()
    else:
        sdate = _dt.date(2020, 3, 1) + _dt.timedelta(days=int(rng.integers(0, 1400)))
    stime = _dt.time(int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    patient = pr.get("patient", {})
    sex = "F" if patient.get("female") else "M"
    age = int(rng.integers(24, 88))
    birth = _dt.date(sdate.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    if (birth.month, birth.day) > (sdate.month, sdate.day):
        age -= 1
    accession = accession or "SYN" + hashlib.sha1(repr(key).encode()).hexdigest()[:10].upper()
    table_height = float(rng.uniform(120, 180))
    tube_current = int(80 + 250 * rng.random())
    thickness = float(slice_thickness or pr.get("slice_thickness") or dz)
    kernel = str(pr.get("kernel", "B40f"))
    kvp = float(rng.choice([100, 120, 120, 120, 140]))
    if unsigned is None:
        unsigned = bool(rng.random() < 0.5)
    bits_stored = 12 if unsigned and rng.random() < 0.6 else 16
    series_description = series_description or f"Synthetic chest CT {thickness:g}mm {kernel}"
    fov_x = nx * dx
    fov_y = ny * dy
    x0 = -(nx - 1) / 2.0 * dx
    y0 = -(ny - 1) / 2.0 * dy + float(rng.uniform(-20, 20))
    z_off = float(np.round(rng.uniform(-400, -150), 1))
    created = _dt.datetime.combine(sdate, stime) + _dt.timedelta(minutes=int(rng.integers(2, 15)))
    # HU -> stored values
    lo = -1024
    hi = (4095 if bits_stored == 12 else (65535 if unsigned else 32767)) - 1024
    hu = np.clip(phantom.hu, lo, hi).astype(np.int32) + 1024
    stored = hu.astype(np.uint16 if unsigned else np.int16)

    paths = []
    order = list(range(nz - 1, -1, -1)) if not feet_first else list(range(nz))
    for inst, iz in enumerate(order, start=1):
        sop_uid = _uid("sop", iz, series_uid)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = _da(created.date())
        ds.InstanceCreationTime = _tm(created.time())
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = _da(sdate)
        ds.SeriesDate = _da(sdate)
        ds.AcquisitionDate = _da(sdate)
        ds.ContentDate = _da(sdate)
        ds.StudyTime = _tm(stime)
        ds.SeriesTime = _tm(stime)
        acq = (_dt.datetime.combine(sdate, stime) + _dt.timedelta(seconds=30 + 0.05 * inst)).time()
        ds.AcquisitionTime = _tm(acq)
        ds.ContentTime = _tm(acq)
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.InstitutionName = "Synthetic Phantom Institute"
        ds.ReferringPhysicianName = "Referrer^Synthetic"
        ds.StationName = "PHANTOMCT"
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = MODEL
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = _da(birth)
        ds.PatientSex = sex
        ds.PatientAge = f"{age:03d}Y"
        ds.BodyPartExamined = "CHEST"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = f"{thickness:.4g}"
        ds.KVP = f"{kvp:g}"
        ds.DataCollectionDiameter = "500"
        ds.DeviceSerialNumber = "SYN0001"
        ds.SoftwareVersions = SOFTWARE
        ds.ProtocolName = "Chest routine (synthetic)"
        ds.ReconstructionDiameter = f"{fov_x:.2f}"
        ds.DistanceSourceToDetector = "1040"
        ds.DistanceSourceToPatient = "570"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = f"{table_height:.1f}"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = str(tube_current)
        ds.Exposure = "100"
        ds.FilterType = "BODY FILTER"
        ds.GeneratorPower = "48"
        ds.FocalSpots = "1.2"
        ds.ConvolutionKernel = kernel
        ds.PatientPosition = "FFS" if feet_first else "HFS"
        ds.RevolutionTime = 0.5
        ds.SingleCollimationWidth = 0.625
        ds.TotalCollimationWidth = 40.0
        ds.SpiralPitchFactor = 1.0
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = inst
        z = z_off + iz * dz
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.WindowCenter = ["-600", "40"]
        ds.WindowWidth = ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(stored[iz]).tobytes()
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "CTAINODE_SYN"
        ds.file_meta = meta
        path = out / f"CT{inst:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_case(phantom: Phantom, out_dir: str | Path, **series_kwargs) -> dict[str, Path | list[Path]]:
    """``out_dir/dicom/CT*.dcm`` plus ``out_dir/truth.npz`` (lung_labels,
    lesion_mask, spacing; arrays in the phantom's (z, y, x) order, z index 0 =
    most inferior slice) and ``out_dir/truth.json`` (kind, params)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_dicom_series(phantom, out / "dicom", **series_kwargs)
    npz, js = write_truth(phantom, out, files)
    return {"dicom": files, "truth_npz": npz, "truth_json": js}


def write_truth(phantom: Phantom, out_dir: str | Path, files: list[Path] | None = None) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "truth.npz"
    np.savez_compressed(npz, lung_labels=phantom.lung_labels, lesion_mask=phantom.lesion_mask,
                        spacing=np.asarray(phantom.spacing, np.float64))
    info = {
        "kind": phantom.kind,
        "seed": phantom.seed,
        "spacing_zyx_mm": list(phantom.spacing),
        "shape_zyx": list(phantom.hu.shape),
        "axes": "z index 0 = most inferior slice (ascending ImagePositionPatient z); y anterior->posterior; "
                "x patient right->left; lung_labels 1 = right lung, 2 = left lung",
        "params": phantom.params,
    }
    if files:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        info["study_instance_uid"] = str(first.StudyInstanceUID)
        info["series_instance_uid"] = str(first.SeriesInstanceUID)
    js = out / "truth.json"
    js.write_text(json.dumps(info, indent=1, default=float))
    return npz, js


def copy_as_new_study(source: str | Path, folder: str | Path, **attributes) -> str:
    """Copy the series in ``source`` into ``folder`` (created) as a different study: new
    Study, Series and SOP Instance UIDs, pixels and everything else unchanged except the
    ``attributes`` given by keyword (``PatientID="P1", StudyDate="20210301"``: studies of one
    patient). For tests and benchmarks that need several studies of one sample. Returns the
    Study Instance UID."""
    import pydicom
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted(Path(source).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / path.name)
    return study
