"""A site's own labelled scans for ``ct-ai-node train --data DIR`` and ``evaluate --data DIR``.

``DIR/labels.csv`` has one row per scan (header required, extra columns ignored)::

    scan,label,lung_mask,lesion_mask,split
    p001/ct,covid,p001/lungs.nii.gz,p001/lesions.nii.gz,train
    p002.nii.gz,normal,,,val

* ``scan``: a folder with one DICOM CT series (the node's series selection picks it, as
  for ``analyze``) or a NIfTI file (``.nii`` / ``.nii.gz``), relative to DIR;
* ``label``: ``covid`` (COVID-19-like pneumonia), ``cap`` (other pneumonia), ``normal``
  or ``other``; ``1`` / ``0`` also work (covid / other);
* ``lung_mask`` (optional): NIfTI on the scan's voxel grid, 1 right and 2 left lung, or any
  non-zero value (then split into right and left here); without it the lungs come from
  the classical segmentation;
* ``lesion_mask`` (optional): NIfTI on the scan's grid, non-zero on the infection. Without
  it the methods that learn from masks use what a volume label allows (method B labels
  every lung slice of a COVID-19-like scan positive; method C trains without the
  attention loss; the infection U-Net skips the scan);
* ``split`` (optional): ``train``, ``val`` or ``test``; left empty, every fifth scan (in
  file order) is validation.

Every scan is brought to the phantoms' layout: (z, y, x) with z inferior to superior, y
anterior to posterior, x patient right to left (DICOM's LPS axes), spacing in mm.
Problems are reported as one line naming the row and the field.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ct_ai_node.errors import InputRejected

LABELS = {"covid": "covid", "1": "covid", "cap": "cap", "normal": "normal", "other": "other", "0": "other"}
SPLITS = ("train", "val", "test")
CSV_NAME = "labels.csv"
#: the orientation every loaded scan is brought to (rows along +x, columns along +y, LPS)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class SiteCase:
    """One row of ``labels.csv``; ``id`` is negative so it never meets a phantom seed."""

    id: int
    scan: str
    kind: str
    lung_mask: str | None = None
    lesion_mask: str | None = None
    split: str = "train"

    @property
    def name(self) -> str:
        return Path(self.scan).name


@dataclass
class SiteScan:
    """A loaded site scan, shaped like a synthetic phantom (same attribute names)."""

    hu: np.ndarray  # int16 (z, y, x)
    lung_labels: np.ndarray  # uint8, 1 right, 2 left
    lesion_mask: np.ndarray  # bool
    spacing: tuple[float, float, float]
    kind: str
    seed: int
    has_lesion_mask: bool = False
    params: dict = field(default_factory=dict)


def read_site_cases(data_dir: Path) -> list[SiteCase]:
    """Parse and check ``DIR/labels.csv`` (files exist, labels and splits known)."""
    data_dir = Path(data_dir)
    path = data_dir / CSV_NAME
    if not path.is_file():
        raise InputRejected(f"--data {data_dir}: no {CSV_NAME} (columns scan,label[,lung_mask,lesion_mask,split])")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputRejected(f"{path}: no rows")
    missing_cols = {"scan", "label"} - set(rows[0])
    if missing_cols:
        raise InputRejected(f"{path}: missing column(s) {', '.join(sorted(missing_cols))}")
    cases = []
    for i, row in enumerate(rows):
        where = f"{path.name} row {i + 2}"
        scan = (row.get("scan") or "").strip()
        if not scan or not (data_dir / scan).exists():
            raise InputRejected(f"{where}: scan {scan!r} not found in {data_dir}")
        label = (row.get("label") or "").strip().lower()
        if label not in LABELS:
            raise InputRejected(f"{where}: label {label!r} is not one of covid, cap, normal, other, 1, 0")
        masks = {}
        for col in ("lung_mask", "lesion_mask"):
            value = (row.get(col) or "").strip() or None
            if value is not None and not (data_dir / value).is_file():
                raise InputRejected(f"{where}: {col} {value!r} not found in {data_dir}")
            masks[col] = value
        split = (row.get("split") or "").strip().lower() or ("val" if i % 5 == 4 else "train")
        if split not in SPLITS:
            raise InputRejected(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        cases.append(SiteCase(id=-(i + 1), scan=str(data_dir / scan), kind=LABELS[label], split=split,
                              lung_mask=str(data_dir / masks["lung_mask"]) if masks["lung_mask"] else None,
                              lesion_mask=str(data_dir / masks["lesion_mask"]) if masks["lesion_mask"] else None))
    return cases


def split_cases(cases: list[SiteCase], split: str) -> list[SiteCase]:
    return [c for c in cases if c.split == split]


# ---------------------------------------------------------------- loading

def _nifti_zyx(path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI image as (z, y, x) in LPS order (z inferior -> superior) with its spacing."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))  # RAS+: x to the left->right, y post->ant, z inf->sup
    except Exception as exc:  # nibabel raises several types for a damaged file
        raise InputRejected(f"{Path(path).name}: not a readable NIfTI file ({exc})") from exc
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputRejected(f"{Path(path).name}: a 3D volume was expected, got shape {data.shape}")
    zooms = img.header.get_zooms()[:3]
    # RAS (x: R->L is decreasing x) -> LPS axes: flip x and y, then (x, y, z) -> (z, y, x)
    vol = np.transpose(data[::-1, ::-1, :], (2, 1, 0))
    return np.ascontiguousarray(vol), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def _dicom_zyx(folder: str, policy=None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``policy``: the series selection (``SelectionPolicy``; the node's default when None)."""
    from ct_ai_node.volume import load_series_from_folder

    vol, _selection, _report = load_series_from_folder(folder, policy)
    row, col = np.asarray(vol.orientation[:3]), np.asarray(vol.orientation[3:])
    hu = vol.hu
    # axis-aligned axial scans only; a mirrored row or column direction is flipped back
    if abs(abs(row[0]) - 1) > 0.05 or abs(abs(col[1]) - 1) > 0.05:
        raise InputRejected(f"{Path(folder).name}: not an axial series (ImageOrientationPatient "
                            f"{np.round(vol.orientation, 3).tolist()}); training needs axial scans")
    if row[0] < 0:
        hu = hu[:, :, ::-1]
    if col[1] < 0:
        hu = hu[:, ::-1, :]
    return np.ascontiguousarray(hu), tuple(float(v) for v in vol.spacing)  # type: ignore[return-value]


def _mask(path: str, shape: tuple[int, ...], what: str, scan: str) -> np.ndarray:
    m, _ = _nifti_zyx(path)
    if m.shape != shape:
        raise InputRejected(f"{Path(path).name}: {what} has shape {m.shape}, the scan {Path(scan).name} {shape}")
    return m


def load_site_case(case: SiteCase) -> SiteScan:
    """Read the scan and its masks (lungs from the classical method when absent)."""
    if Path(case.scan).is_dir():
        hu, spacing = _dicom_zyx(case.scan)
    else:
        hu, spacing = _nifti_zyx(case.scan)
    hu = np.clip(np.rint(hu), -2048, 4095).astype(np.int16)
    if case.lung_mask:
        m = _mask(case.lung_mask, hu.shape, "lung mask", case.scan)
        labels = m.astype(np.uint8) if set(np.unique(m).tolist()) <= {0, 1, 2} else (m > 0).astype(np.uint8)
        if labels.max() == 1:  # one label for both lungs: split them as the node does
            from ct_ai_node.pipeline.lungs import LungSegmentationSettings, split_left_right

            labels = split_left_right(labels > 0, AXIAL, spacing[1:],
                                      LungSegmentationSettings().min_component_fraction)
    else:
        from ct_ai_node.pipeline.lungs import ClassicalLungSegmenter

        labels = ClassicalLungSegmenter()(hu.astype(np.float32), spacing, AXIAL)
    if case.lesion_mask:
        lesion = _mask(case.lesion_mask, hu.shape, "lesion mask", case.scan) > 0
    else:
        lesion = np.zeros(hu.shape, bool)
    return SiteScan(hu=hu, lung_labels=labels.astype(np.uint8), lesion_mask=lesion, spacing=spacing,
                    kind=case.kind, seed=case.id, has_lesion_mask=case.lesion_mask is not None)
