"""The disk edge for headers: walk a folder, keep the DICOM files, group by series.

``scan_folder`` reads headers only (``stop_before_pixels``), so a 300-file
series scans in a fraction of a second. Everything it decides per file is
recorded: a file that is not DICOM, a DICOMDIR, a damaged header each appear in
``ScanResult.skipped`` with a one-line reason, never as an exception.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.datadict
import pydicom.dataset
import pydicom.tag
import pydicom.uid
from pydantic import BaseModel, ConfigDict
from pydicom.errors import InvalidDicomError

from ct_ai_node.errors import InputRejected

from .frames import (
    CT_SOP_CLASSES,
    MEDIA_STORAGE_DIRECTORY_STORAGE,
    header_problem,
    sop_class_uid,
    sop_instance_uid,
    uid_of,
)
from .series import SeriesSummary, series_key, summarise

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
#: first element groups that a DICOM stream without preamble can start with
_RAW_START_GROUPS = (0x0002, 0x0008)
#: the attributes a scan keeps (headers only, no patient module): what the series
#: summary, the selection and routing rules use. Reading only these is about twice
#: as fast on real vendor headers as reading and checking every element.
SCAN_KEYWORDS = (
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID",
    "Modality", "Manufacturer", "StationName", "StudyDescription", "SeriesDescription",
    "ManufacturerModelName", "BodyPartExamined", "ContrastBolusAgent", "SliceThickness",
    "ProtocolName", "GantryDetectorTilt", "ConvolutionKernel", "StudyInstanceUID",
    "SeriesInstanceUID", "SeriesNumber", "AcquisitionNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID",
    "SliceLocation", "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames",
    "Rows", "Columns", "PixelSpacing", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "DirectoryRecordSequence",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)
_SCAN_TAGS = [pydicom.datadict.tag_for_keyword(k) for k in SCAN_KEYWORDS]

#: prefix of the skip reason of a DICOM file that is damaged (vs. not DICOM at all)
DAMAGED = "damaged DICOM file"
#: what ``read_dataset`` repaired in memory, kept on the dataset for the volume's warnings
NOTES_ATTR = "_ct_ai_node_read_notes"
#: value representations: two of these letters after a tag mean explicit VR
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: elements the loader needs: an unreadable one refuses the file, any other is dropped
_NEEDED_TAGS = frozenset(_SCAN_TAGS) | {
    pydicom.datadict.tag_for_keyword(k)
    for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "HighBit")
}


def read_notes(ds: pydicom.Dataset) -> list[str]:
    """What ``read_dataset`` repaired in memory for ``ds`` (one line each)."""
    return list(getattr(ds, NOTES_ATTR, ()))


def _add_note(ds: pydicom.Dataset, text: str) -> None:
    notes = getattr(ds, NOTES_ATTR, None)
    if notes is None:
        notes = []
        object.__setattr__(ds, NOTES_ATTR, notes)
    notes.append(text)


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not part of any series, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ScannedInstance:
    """One DICOM file: where it is and its header (``SCAN_KEYWORDS`` only)."""

    path: Path
    header: pydicom.Dataset
    #: why the file's pixel data cannot be used (truncated, too short), else None
    damage: str | None = None

    @property
    def sop_instance_uid(self) -> str:
        return sop_instance_uid(self.header)


class ScanReport(BaseModel):
    """What a folder scan found, without the datasets: safe to log and serialise.

    Holds no patient data: paths are relative to the scanned folder.
    """

    model_config = ConfigDict(frozen=True)

    n_files: int
    n_dicom: int
    #: (relative path, reason) of every file that was not used
    skipped_files: list[tuple[str, str]] = []
    series: list[SeriesSummary] = []
    warnings: list[str] = []

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.skipped_files))


@dataclass
class ScanResult:
    """DICOM files of a folder, grouped by series."""

    root: Path
    n_files: int = 0
    #: series key (SeriesInstanceUID, or a derived key) -> instances
    series: dict[str, list[ScannedInstance]] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_dicom(self) -> int:
        return sum(len(v) for v in self.series.values())

    @property
    def damaged(self) -> list[SkippedFile]:
        """DICOM files skipped because they are damaged (not part of any series)."""
        return [s for s in self.skipped if s.reason.startswith(DAMAGED)]

    def paths(self, key: str) -> list[Path]:
        """File paths of one series."""
        return [inst.path for inst in self.series[key]]

    def summaries(self) -> list[SeriesSummary]:
        """One ``SeriesSummary`` per series, largest first.

        Damaged files found by the scan (truncated, pixel data too short) are
        added to the summary's ``problems``, first, naming the file.
        """
        out = []
        for key, insts in self.series.items():
            summary = summarise([i.header for i in insts], key=key)
            damaged = [i for i in insts if i.damage]
            if damaged:
                text = f"file {damaged[0].path.name}: {damaged[0].damage}"
                if len(damaged) > 1:
                    text += f" (and {len(damaged) - 1} more damaged files)"
                summary = summary.model_copy(update={"problems": (text, *summary.problems)})
            out.append(summary)
        return sorted(out, key=lambda s: (-s.n_frames, s.key))

    def report(self, summaries: list[SeriesSummary] | None = None) -> ScanReport:
        def rel(path: Path) -> str:
            try:
                return str(path.relative_to(self.root))
            except ValueError:
                return path.name

        return ScanReport(
            n_files=self.n_files,
            n_dicom=self.n_dicom,
            skipped_files=[(rel(s.path), s.reason) for s in self.skipped],
            series=summaries if summaries is not None else self.summaries(),
            warnings=list(self.warnings),
        )


def iter_files(root: Path):
    """Every regular file below ``root``, recursively, in a stable order."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                yield path


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM stream written without preamble starts with a low group tag."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    return group in _RAW_START_GROUPS and element < 0x0100


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits % 8:
        return None
    return rows * cols * samples * frames * bits // 8


def _pixel_data_damage(fp, ds: pydicom.Dataset, file_size: int) -> str | None:
    """Check the Pixel Data element that ``fp`` stands at without reading it.

    ``dcmread(..., stop_before_pixels=True)`` leaves ``fp`` at the Pixel Data
    tag; its length field tells whether the file holds all the bytes it
    announces, and whether that is as many as Rows x Columns x frames need.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax is not None and getattr(syntax, "is_deflated", False):
        # pydicom inflated the data set into memory: ``fp`` does not stand at
        # the pixel data; the full read checks its length
        return header_problem(ds)
    position = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        if "PixelData" not in ds and ("Rows" in ds or sop_class_uid(ds) in CT_SOP_CLASSES):
            return "truncated before the pixel data"
        return header_problem(ds)
    little = True
    if syntax is not None and getattr(syntax, "is_transfer_syntax", False):
        little = syntax.is_little_endian
    # explicit or implicit VR from the bytes themselves: the file meta may be
    # wrong about it (pydicom then reads the data set with the right one)
    implicit = not (head[4:6] in _LONG_VRS and head[6:8] == b"\0\0")
    fmt = "<" if little else ">"
    group, element = struct.unpack(fmt + "HH", head[:4])
    if (group, element) != (0x7FE0, 0x0010):
        return header_problem(ds)
    if implicit:
        (length,) = struct.unpack(fmt + "I", head[4:8])
        header_length = 8
    else:
        (length,) = struct.unpack(fmt + "I", head[8:12])
        header_length = 12
    if length == 0xFFFFFFFF:  # encapsulated (compressed): checked when decoded
        return header_problem(ds)
    problem = header_problem(ds, pixel_bytes=length)
    if problem:
        return problem
    available = file_size - position - header_length
    if available < length:
        return f"truncated, pixel data {max(available, 0)} of {length} bytes"
    expected = _expected_pixel_bytes(ds)
    if expected is not None and length < expected:
        return f"corrupt pixel data, {length} bytes instead of {expected}"
    return None


def unreadable_elements(ds: pydicom.Dataset) -> list[str]:
    """Convert every element of ``ds`` now; remove and name those that fail.

    pydicom converts element values lazily, so a corrupt value (unknown VR,
    wrong length) would otherwise raise later, wherever it is first used. After
    this call every remaining element can be read safely.
    """
    bad: list[str] = []
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
            items = list(elem.value) if elem.VR == "SQ" else []
        except Exception:  # noqa: BLE001 - any conversion failure means a corrupt value
            bad.append(str(pydicom.tag.Tag(tag)))
            del ds[tag]
            continue
        for item in items:
            bad.extend(unreadable_elements(item))
    return bad


def read_header(path: Path) -> tuple[pydicom.Dataset | None, str | None]:  # noqa: C901
    """Read the header of ``path`` if it is a DICOM file.

    Returns ``(dataset, damage)`` for a DICOM file, where ``damage`` says why
    its pixel data is unusable (or is None), and ``(None, reason)`` otherwise.
    A file without the 128-byte preamble and "DICM" prefix counts as DICOM only
    if it starts like a DICOM data set and carries a valid SOP Class UID, so
    random binary files are not mistaken for images.
    """
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError as exc:
        return None, f"cannot be read ({type(exc).__name__})"
    if not head:
        return None, "empty file"
    has_prefix = len(head) == 132 and head[128:132] == b"DICM"
    if len(head) < 132 and not head.strip(b"\0"):
        return None, f"{DAMAGED}: truncated in the preamble"
    if not has_prefix and not _looks_like_raw_dicom(head):
        return None, "not DICOM"
    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            if not has_prefix:  # a guess: garbage must not spray charset warnings
                warnings.simplefilter("ignore")
            ds = pydicom.dcmread(
                fp, stop_before_pixels=True, force=not has_prefix, specific_tags=_SCAN_TAGS
            )
            bad = unreadable_elements(ds)
            if getattr(ds, "file_meta", None) is not None:
                bad += unreadable_elements(ds.file_meta)
            damage = _pixel_data_damage(fp, ds, os.fstat(fp.fileno()).st_size)
    except InvalidDicomError:
        return None, "not DICOM"
    except Exception as exc:  # noqa: BLE001 - any parser failure means a damaged header
        logger.debug("header of %s unreadable: %r", path, exc)
        if not has_prefix:
            return None, "not DICOM"
        return None, f"{DAMAGED}: unreadable header ({type(exc).__name__})"
    if bad:
        logger.debug("header of %s: unreadable elements %s", path, bad)
        damage = f"damaged header (unreadable element {bad[0]})"
        if not has_prefix:
            return None, "not DICOM"
    if not has_prefix:
        uid = uid_of(ds, "SOPClassUID")
        if not _UID_RE.match(uid):
            return None, "not DICOM"
        _ensure_transfer_syntax(ds)
    media_class = uid_of(getattr(ds, "file_meta", pydicom.Dataset()), "MediaStorageSOPClassUID")
    if (
        path.name.upper() == "DICOMDIR"
        or media_class == MEDIA_STORAGE_DIRECTORY_STORAGE
        or "DirectoryRecordSequence" in ds
    ):
        return None, "DICOMDIR (media index, not an image)"
    if not sop_class_uid(ds):
        return None, "DICOM without SOP Class UID"
    if damage and not uid_of(ds, "SeriesInstanceUID"):
        # cut off before it says which series it belongs to
        return None, f"{DAMAGED}: {damage}"
    return ds, damage


def scan_folder(path: str | os.PathLike[str]) -> ScanResult:
    """Read the headers of every file below ``path`` and group them by series.

    Parameters
    ----------
    path
        A folder (walked recursively; any file names, any order) or one file.

    Returns
    -------
    ScanResult
        Series keyed by SeriesInstanceUID (0020,000E); instances without one are
        grouped by a key derived from study, frame of reference, series number
        and description, with a warning.
    """
    root = Path(path)
    result = ScanResult(root=root)
    derived = 0
    for file in iter_files(root):
        result.n_files += 1
        ds, reason = read_header(file)
        if ds is None:
            result.skipped.append(SkippedFile(file, reason or "not DICOM"))
            continue
        key = series_key(ds)
        if not uid_of(ds, "SeriesInstanceUID"):
            derived += 1
        result.series.setdefault(key, []).append(ScannedInstance(file, ds, damage=reason))
    if derived:
        result.warnings.append(
            f"{derived} file(s) without SeriesInstanceUID grouped by study, frame of "
            "reference, series number and description"
        )
    logger.info(
        "scanned folder: %d files, %d DICOM, %d series, %d skipped",
        result.n_files,
        result.n_dicom,
        len(result.series),
        len(result.skipped),
    )
    logger.debug("scanned %s", root)
    return result


def read_dataset(path: str | os.PathLike[str]) -> pydicom.Dataset:
    """Read one DICOM file with its pixel data.

    Raises
    ------
    InputRejected
        If the file cannot be read or is not DICOM; the reason names the file
        (its name only, never the folder, which may carry patient data).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError as exc:
        raise InputRejected(f"file {path.name}: cannot be read ({type(exc).__name__})") from exc
    has_prefix = len(head) == 132 and head[128:132] == b"DICM"
    if not has_prefix and not _looks_like_raw_dicom(head):
        raise InputRejected(f"file {path.name}: not DICOM")
    try:
        ds = pydicom.dcmread(path, force=not has_prefix)
    except Exception as exc:  # noqa: BLE001 - wrapped into a one-line reason
        raise InputRejected(
            f"file {path.name}: damaged DICOM ({type(exc).__name__})"
        ) from exc
    bad = unreadable_elements(ds)
    if getattr(ds, "file_meta", None) is not None:
        bad += unreadable_elements(ds.file_meta)
    needed = [tag for tag in bad if _needed(tag)]
    if needed:
        raise InputRejected(f"file {path.name}: damaged header (unreadable element {needed[0]})")
    if bad:  # private or unused attributes: they do not matter to the volume
        logger.debug("file %s: unreadable elements dropped %s", path.name, bad)
        _add_note(ds, "unreadable private or unused elements dropped")
    _ensure_transfer_syntax(ds)
    if has_prefix:
        note = _fix_transfer_syntax(ds, path)
        if note:
            _add_note(ds, note)
    return ds


def _needed(tag_text: str) -> bool:
    """True for an element (named as ``unreadable_elements`` names it) the loader uses."""
    try:
        group, element = (int(part, 16) for part in tag_text.strip("()").split(","))
    except ValueError:
        return True
    if group == 0x0002:
        return True  # file meta: the transfer syntax
    return (group << 16 | element) in _NEEDED_TAGS


def _data_set_start(head: bytes) -> int | None:
    """Offset of the first data set element after the preamble and file meta."""
    off = 132
    while off + 8 <= len(head):
        (group,) = struct.unpack("<H", head[off : off + 2])
        if group != 0x0002:
            return off
        vr = head[off + 4 : off + 6]
        if vr in _LONG_VRS:
            if off + 12 > len(head):
                return None
            (length,) = struct.unpack("<I", head[off + 8 : off + 12])
            off += 12 + length
        else:
            (length,) = struct.unpack("<H", head[off + 6 : off + 8])
            off += 8 + length
    return None


def _fix_transfer_syntax(ds: pydicom.Dataset, path: Path) -> str | None:
    """Set the transfer syntax the data set is really encoded in, when the file meta is wrong.

    pydicom reads an implicit VR data set behind a file meta that says explicit
    VR (and the reverse) by looking at the bytes; the data set then still
    carries the wrong syntax. Returns a one-line note when it was corrected.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_deflated:
        return None
    if not syntax.is_little_endian:
        return None
    try:
        with open(path, "rb") as fp:
            head = fp.read(8192)
    except OSError:
        return None
    start = _data_set_start(head)
    if start is None or start + 8 > len(head):
        return None
    explicit = head[start + 4 : start + 6] in _VRS
    if explicit != syntax.is_implicit_VR:
        return None
    actual = pydicom.uid.ExplicitVRLittleEndian if explicit else pydicom.uid.ImplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = actual
    return (
        f"file meta transfer syntax {syntax.name} does not match the data set "
        f"({'explicit' if explicit else 'implicit'} VR): read as {actual.name}"
    )


def _ensure_transfer_syntax(ds: pydicom.Dataset) -> None:
    """Give a data set read without file meta the transfer syntax it was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    if implicit:
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = (
            pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
        )
