"""Source headers as the writers may use them: checked and repaired copies.

The loader accepts headers that the strict result writers (highdicom, dciodvfy-clean
output) do not: de-identified exports without the type 2 patient/study attributes,
unknown character sets, dates such as ``yesterday``, person names with another VR,
multi-valued single-value attributes, orientation that differs by float noise between
slices, missing Slice Thickness, UUID-style UIDs. :func:`sanitise_volume` returns the
volume with repaired *shallow copies* of its headers (pixel data and unchanged
elements are shared, never copied; the source datasets are not modified) and one
line per kind of repair, for ``result.json`` ``warnings``.

Pure: no disk, no network. Repair notes never carry patient data.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom import charset as dcm_charset
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds

from ct_ai_node.volume.identity import is_valid_uid, replacement_uid
from ct_ai_node.volume.types import Volume

logger = logging.getLogger(__name__)

#: Type 2 attributes of the Patient, General Study and General Series modules that the
#: result objects copy from the source: present (possibly empty) in every repaired header
TYPE2_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "SeriesNumber",
)
#: Image Orientation (Patient) direction cosines agreeing within this are one orientation
ORIENTATION_TOLERANCE = 1e-3
#: Pixel Spacing values agreeing within this (mm) are one spacing
SPACING_TOLERANCE = 1e-3
#: Image Position (Patient) matching a slice's position within this (mm) is that slice
POSITION_TOLERANCE = 1e-3

_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_CS_RE = re.compile(r"^[A-Z0-9 _]*$")
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
#: VRs whose values are split on backslashes (LT, ST, UT hold one value with any text)
_MULTI_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"})
#: maximum characters per value (PN: per component group)
_MAX_LEN = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
            "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
#: enumerated values the result objects copy unchanged (anything else becomes empty)
_ENUMERATED = {"PatientSex": {"M", "F", "O"}, "LossyImageCompression": {"00", "01"}}
#: left out rather than repaired when invalid: the writers have a default for each
#: (LossyImageCompression "00"; BodyPartExamined "CHEST"), and a made-up code string
#: would make a validator ask for attributes that depend on it (e.g. Laterality)
_DROP_WHEN_INVALID = frozenset({"LossyImageCompression", "BodyPartExamined"})
#: identity UIDs repaired to the volume's own (the loader's) values
_IDENTITY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@dataclass(frozen=True)
class SanitisedSource:
    """The volume with repaired header copies, and what was repaired (one line each)."""

    volume: Volume
    notes: tuple[str, ...]


class _Notes:
    """Repair notes grouped by (attribute, what was done), counted over the headers."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._order: list[tuple[str, str]] = []
        self._plain: list[str] = []

    def line(self, text: str) -> None:
        """A note about the series, not counted per header."""
        self._plain.append(text)

    def add(self, keyword: str, what: str) -> None:
        key = (keyword, what)
        if key not in self._counts:
            self._order.append(key)
        self._counts[key] += 1

    def lines(self, n_headers: int) -> list[str]:
        return self._plain + [
            f"source header {keyword}: {what} ({self._counts[(keyword, what)]} of {n_headers} instances)"
            for keyword, what in self._order]


def _copy(ds: Dataset) -> Dataset:
    """A shallow copy with its own element dict: setting an element does not touch
    ``ds``; unchanged (raw) elements and pixel data are shared, not decoded or copied."""
    new = Dataset({tag: ds.get_item(tag) for tag in ds.keys()})
    if hasattr(ds, "file_meta"):
        new.file_meta = ds.file_meta
    return new


def _set(ds: Dataset, keyword: str, value: object) -> None:
    """Set ``keyword`` on a copy made by :func:`_copy` with a NEW element: pydicom's
    attribute assignment changes the existing element object, which the source shares."""
    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)


def _vr_of(elem, tag: int) -> str:
    vr = getattr(elem, "VR", None)
    if not vr or vr in ("UN", None):
        try:
            return dictionary_VR(tag)
        except KeyError:
            return vr or "UN"
    return str(vr)


# --- character set -----------------------------------------------------------------


def _charset_values(ds: Dataset) -> list[str] | None:
    if "SpecificCharacterSet" not in ds:
        return None
    value = ds.get_item("SpecificCharacterSet").value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        return [v.strip() for v in value.split("\\")]
    return [str(v).strip() for v in (value or [])]


def _writers_accept(values: list[str]) -> bool:
    """Whether highdicom takes ``values`` as (0008,0005) Specific Character Set."""
    from highdicom.valuerep import _check_specific_character_set  # the writers' own rule

    try:
        _check_specific_character_set(values[0] if len(values) == 1 else values)
    except (ValueError, TypeError):
        return False
    return True


def _python_encodings(values: list[str]) -> list[str] | None:
    """Python codecs for a charset pydicom knows, else None."""
    if not all(v in dcm_charset.python_encoding for v in values):
        return None
    return [dcm_charset.python_encoding[v] for v in values]


def _decode_text(raw: bytes, encodings: list[str] | None, vr: str) -> str:
    raw = raw.rstrip(b"\x00 ")
    delimiters = {0x5C, 0x3D, 0x5E} if vr == "PN" else {0x5C}
    if encodings is not None:
        try:
            return dcm_charset.decode_bytes(raw, encodings, delimiters)
        except (UnicodeDecodeError, LookupError):
            pass
    for codec in ("utf_8", "latin_1"):  # latin_1 decodes any byte: never fails
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin_1")


def _text_value(elem, encodings: list[str] | None, vr: str):
    """The element's text as str (or list of str), from raw bytes if still raw."""
    value = elem.value
    if isinstance(value, bytes):
        text = _decode_text(value, encodings, vr)
        if vr in _MULTI_VRS and "\\" in text:
            return text.split("\\")
        return text
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return "" if value is None else str(value)


def _repair_charset(new: Dataset, notes: _Notes) -> None:
    values = _charset_values(new)
    if values is None or (values and _writers_accept(values)):
        return
    encodings = _python_encodings(values) if values and any(values) else [dcm_charset.default_encoding]
    shown = "\\".join(values)
    texts = {}
    for tag in list(new.keys()):
        elem = new.get_item(tag)
        vr = _vr_of(elem, tag)
        if vr in _TEXT_VRS and elem.value is not None:
            texts[tag] = (vr, _text_value(elem, encodings, vr))
    all_ascii = all(str(t).isascii() for _, t in texts.values())
    for tag, (vr, text) in texts.items():
        new[tag] = DataElement(tag, vr, text)
    if all_ascii:
        del new.SpecificCharacterSet
        done = "the default repertoire"
    else:
        _set(new, "SpecificCharacterSet", "ISO_IR 192")
        done = "ISO_IR 192 (UTF-8)"
    why = "empty" if not any(values) else ("not usable" if encodings else "unknown")
    notes.add("SpecificCharacterSet", f"{shown!r} {why}: text re-decoded, written as {done}")


# --- values ------------------------------------------------------------------------


def _valid_date(text: str, vr: str) -> bool:
    """``text`` is a DICOM DA / TM / DT value naming a real date and time."""
    if vr == "DA":
        date = text if _DA_RE.match(text) else None
    elif vr == "TM":
        if not _TM_RE.match(text):
            return False
        hh, mm, ss = int(text[:2]), int(text[2:4] or 0), int(text[4:6] or 0)
        return hh < 24 and mm < 60 and ss < 61
    else:
        if not _DT_RE.match(text):
            return False
        date = re.split(r"[+-]", text)[0][:8]
    if date is None:
        return False
    try:
        datetime.datetime.strptime(date, {4: "%Y", 6: "%Y%m", 8: "%Y%m%d"}[len(date)])
    except (KeyError, ValueError):
        return False
    return True


def _normalised_date(text: str, vr: str) -> str | None:
    """A legacy but unambiguous form (``2024.01.02``, ``10:15:00``) in DICOM form."""
    if vr == "DA" and re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text):
        candidate = text.replace(".", "")
    elif vr == "TM" and re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", text):
        candidate = text.replace(":", "")
    else:
        return None
    return candidate if _valid_date(candidate, vr) else None


def _strip(text: str, vr: str) -> str:
    return text.rstrip(" \x00") if vr in ("LT", "ST", "UT") else text.strip(" \x00")


def _repair_values(new: Dataset, notes: _Notes) -> None:
    """Dates/times, person names, single-value attributes, lengths, enumerated values
    of the top-level string attributes (sequences are left as they are)."""
    encodings = _python_encodings(_charset_values(new) or [""])
    for tag in list(new.keys()):
        if tag.group in (0x0002, 0x7FE0) or tag.is_private or tag == 0x00080005:
            continue
        keyword = keyword_for_tag(tag)
        try:
            wanted_vr = dictionary_VR(tag) if keyword else ""
        except KeyError:  # a repeating-group or retired tag without a single VR
            continue
        if wanted_vr not in _MULTI_VRS | _TEXT_VRS:
            continue
        elem = new.get_item(tag)
        vr = _vr_of(elem, tag)
        value = elem.value
        if value is None:
            continue
        raw = isinstance(value, bytes)
        # fast path: a short raw value of the right VR without a backslash needs no look
        if (raw and vr == wanted_vr and vr not in ("DA", "TM", "DT", "DS", "IS", "CS") and b"\\" not in value
                and len(value) <= _MAX_LEN.get(vr, 1 << 30)):
            continue
        try:
            text = _text_value(elem, encodings, wanted_vr)
        except Exception:  # a value no codec reads: written empty  # noqa: BLE001
            text = ""
            notes.add(keyword, "unreadable: written empty")
        values = [str(v) for v in text] if isinstance(text, (list, tuple, MultiValue)) else [str(text)]
        changed = vr != wanted_vr
        if changed:
            notes.add(keyword, f"had VR {vr}: written as {wanted_vr}")
        if len(values) > 1 and dictionary_VM(tag) == "1":
            values = values[:1]
            notes.add(keyword, "held several values: the first kept")
            changed = True
        fixed = []
        for v in values:
            v = _strip(v, wanted_vr)
            v2 = v
            if wanted_vr in ("DA", "TM", "DT") and v2 and not _valid_date(v2, wanted_vr):
                normal = _normalised_date(v2, wanted_vr)
                notes.add(keyword, f"not a valid {wanted_vr}: " + ("normalised" if normal else "written empty"))
                v2 = normal or ""
            elif wanted_vr == "CS" and v2 and not _CS_RE.match(v2):
                v2 = re.sub(r"[^A-Z0-9 _]", "_", v2.upper())
                if keyword not in _ENUMERATED and keyword not in _DROP_WHEN_INVALID:
                    notes.add(keyword, "held characters a code string may not: replaced")
            if keyword in _ENUMERATED and v2:
                v2 = v2.upper()
                if v2 not in _ENUMERATED[keyword]:
                    if keyword not in _DROP_WHEN_INVALID:
                        notes.add(keyword, "held a value outside its defined terms: written empty")
                    v2 = ""
            if wanted_vr == "PN":
                v2 = _sane_person_name(v2, keyword, notes)
            limit = _MAX_LEN.get(wanted_vr)
            if limit and wanted_vr != "PN" and len(v2) > limit:
                notes.add(keyword, f"longer than {limit} characters: clipped")
                v2 = v2[:limit].rstrip()
            if wanted_vr in ("DS", "IS") and v2:
                v2 = _number_or_empty(v2, wanted_vr, keyword, notes)
            changed = changed or v2 != v
            fixed.append(v2)
        if changed and keyword in _DROP_WHEN_INVALID:
            del new[tag]
            notes.add(keyword, "invalid: left out (the writers' default used)")
        elif changed:
            new[tag] = DataElement(tag, wanted_vr, fixed[0] if len(fixed) == 1 else fixed)


def _sane_person_name(name: str, keyword: str, notes: _Notes) -> str:
    """At most 3 component groups of 5 components, 64 characters each, no control
    characters (ESC excepted: ISO 2022 code extensions)."""
    cleaned = "".join(ch for ch in name if ch == "\x1b" or ch >= " ")
    groups = cleaned.split("=")[:3]
    out = []
    for group in groups:
        parts = group.split("^")
        if len(parts) > 5:
            parts = parts[:4] + [" ".join(parts[4:])]
        text = "^".join(parts)
        if len(text) > 64:
            text = text[:64]
        out.append(text)
    fixed = "=".join(out).rstrip("=^ ")
    if fixed != name.rstrip("=^ "):
        notes.add(keyword, "was not a valid person name: cleaned")
    return fixed


def _number_or_empty(text: str, vr: str, keyword: str, notes: _Notes) -> str:
    try:
        number = float(text)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(text)
        if vr == "IS":
            if number != int(number) or abs(number) >= 2**31:
                raise ValueError(text)
            return str(int(number)) if text != str(int(number)) and len(text) > 12 else text
        return text if len(text) <= 16 else format_number_as_ds(number)
    except ValueError:
        notes.add(keyword, f"not a valid {vr}: written empty")
        return ""


def _add_type2(new: Dataset, notes: _Notes) -> None:
    for keyword in TYPE2_KEYWORDS:
        if keyword not in new:
            new.add(DataElement(tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword)), None))
            notes.add(keyword, "missing: written empty")


# --- geometry ----------------------------------------------------------------------


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
    except Exception:  # an undecodable value reads as missing  # noqa: BLE001
        return None
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value]))
    except (TypeError, ValueError):
        return None
    if len(values) != n or any(v != v for v in values):
        return None
    return values


def _ds_values(values: Iterable[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _snap(datasets: list[Dataset], keyword: str, n: int, wanted: Sequence[float], tolerance: float,
          notes: _Notes, fill: bool) -> None:
    """Give every header one shared ``keyword`` value: the most common exact source value
    when all agree with ``wanted`` within ``tolerance``; ``wanted`` fills missing ones."""
    read = [_floats(ds, keyword, n) for ds in datasets]
    close = [v for v in read if v is not None and max(abs(a - b) for a, b in zip(v, wanted)) <= tolerance]
    if len(close) != len([v for v in read if v is not None]):
        return  # headers disagree beyond noise: not ours to pick (the loader chose the stack)
    shared = Counter(close).most_common(1)[0][0] if close else tuple(float(v) for v in wanted)
    formatted = _ds_values(shared)
    for ds, value in zip(datasets, read):
        if value is None:
            if fill:
                _set(ds, keyword, formatted)
                notes.add(keyword, "missing or unreadable: taken from the volume geometry")
        elif value != shared:
            _set(ds, keyword, formatted)
            notes.add(keyword, f"differed by float noise (<= {tolerance:g}): one shared value written")


def _repair_geometry(datasets: list[Dataset], volume: Volume, notes: _Notes) -> None:
    if volume.is_multiframe:
        return  # geometry lives in the functional groups, which the loader checked
    _snap(datasets, "ImageOrientationPatient", 6, volume.orientation, ORIENTATION_TOLERANCE, notes, fill=True)
    _snap(datasets, "PixelSpacing", 2, volume.spacing[1:], SPACING_TOLERANCE, notes, fill=True)
    thickness = volume.slice_thickness if volume.slice_thickness and volume.slice_thickness > 0 else volume.spacing[0]
    for ds in datasets:
        value = _floats(ds, "SliceThickness", 1)
        if value is None or not value[0] > 0:
            _set(ds, "SliceThickness", format_number_as_ds(float(thickness)))
            notes.add("SliceThickness", "missing or invalid: taken from the volume spacing")


# --- identity ----------------------------------------------------------------------


def _dataset_of_slices(volume: Volume) -> list[int] | None:
    """Index into ``volume.datasets`` of each slice, by SOP Instance UID, else by
    position (slices identified by geometry), else by order; None if they do not pair."""
    datasets, slices = volume.datasets, volume.slices
    if volume.is_multiframe:
        return [0] * len(slices) if len(datasets) == 1 else None
    by_uid: dict[str, int] = {}
    for i, ds in enumerate(datasets):
        uid = _uid_in(ds, "SOPInstanceUID")
        by_uid[uid] = -1 if uid in by_uid else i
    index = [by_uid.get(ref.sop_instance_uid, -1) if isinstance(ref.sop_instance_uid, str) else -1
             for ref in slices]
    if all(i >= 0 for i in index) and len(set(index)) == len(slices):
        return index
    positions = [_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    index = []
    for ref in slices:
        hits = [i for i, p in enumerate(positions)
                if p is not None and max(abs(a - b) for a, b in zip(p, ref.position)) <= POSITION_TOLERANCE]
        index.append(hits[0] if len(hits) == 1 else -1)
    if all(i >= 0 for i in index) and len(set(index)) == len(slices):
        return index
    if len(datasets) == len(slices):
        return list(range(len(slices)))
    return None


def _repair_identity(volume: Volume, notes: _Notes) -> tuple[Volume, list[Dataset]]:
    """Valid identity UIDs on the volume, and headers carrying the volume's UIDs."""
    fields = {}
    study = volume.study_instance_uid
    if not is_valid_uid(study):
        study = replacement_uid("StudyInstanceUID", study)
        fields["study_instance_uid"] = study
        notes.line("StudyInstanceUID not a valid UID after loading: a derived UID written")
    series = volume.series_instance_uid
    if not is_valid_uid(series):
        series = replacement_uid("SeriesInstanceUID", series, study)
        fields["series_instance_uid"] = series
        notes.line("SeriesInstanceUID not a valid UID after loading: a derived UID written")
    frame = volume.frame_of_reference_uid
    if not is_valid_uid(frame):
        frame = replacement_uid("FrameOfReferenceUID", frame, series)
        fields["frame_of_reference_uid"] = frame
        notes.line("FrameOfReferenceUID missing or not a valid UID after loading: a derived UID written")

    pairing = _dataset_of_slices(volume)
    if pairing is None:
        copies = [_copy(ds) for ds in volume.datasets]
        notes.line("source headers: not paired with the volume's slices (by SOP Instance UID or position): "
                   "used as loaded")
        slices = list(volume.slices)
    else:
        order = list(dict.fromkeys(pairing))  # order of first appearance in slices
        if len(order) < len(volume.datasets):
            notes.line(f"source headers: {len(volume.datasets) - len(order)} of {len(volume.datasets)} are of "
                       "instances outside the analysed stack: left out of the results' references")
        copy_of = {i: _copy(volume.datasets[i]) for i in order}
        copies = [copy_of[i] for i in order]
        slices, seen = [], set()
        for z, (ref, i) in enumerate(zip(volume.slices, pairing)):
            uid = ref.sop_instance_uid
            if not is_valid_uid(uid) or (uid in seen and not volume.is_multiframe):
                uid = replacement_uid("SOPInstanceUID", uid, series, ref.position, ref.instance_number, z)
                ref = dataclasses.replace(ref, sop_instance_uid=uid)
                notes.add("SOPInstanceUID", "not a valid or unique UID after loading: replaced by a derived UID")
            seen.add(uid)
            slices.append(ref)
            ds = copy_of[i]
            if _uid_in(ds, "SOPInstanceUID") != uid:
                _set(ds, "SOPInstanceUID", uid)
            if not is_valid_uid(_uid_in(ds, "SOPClassUID")) and is_valid_uid(ref.sop_class_uid):
                _set(ds, "SOPClassUID", ref.sop_class_uid)
                notes.add("SOPClassUID", "missing or invalid: taken from the loaded slice")
    for ds in copies:
        for keyword, uid in zip(_IDENTITY_UIDS, (study, series, frame)):
            if _uid_in(ds, keyword) != uid:
                _set(ds, keyword, uid)
        if "PositionReferenceIndicator" not in ds:  # type 2 beside the Frame of Reference UID
            _set(ds, "PositionReferenceIndicator", "")
    return dataclasses.replace(volume, slices=slices, datasets=copies, **fields), copies


def _uid_in(ds: Dataset, keyword: str) -> str:
    if keyword not in ds:
        return ""
    value = ds.get_item(keyword).value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").rstrip("\x00 ")
        return value if "\\" not in value else ""
    if isinstance(value, (list, tuple, MultiValue)):
        return ""
    return "" if value is None else str(value)


# --- entry point -------------------------------------------------------------------


def sanitise_headers(datasets: list[Dataset], volume: Volume) -> list[str]:
    """Repair ``datasets`` (already copies, modified in place) for the writers: known
    character set, valid dates and times, person names with VR PN, single-value
    attributes with one value, values within their VR's length, type 2 attributes
    present, one shared orientation and pixel spacing, a slice thickness. Returns the
    repair notes."""
    notes = _Notes()
    for ds in datasets:
        _repair_charset(ds, notes)
        _repair_values(ds, notes)
        _add_type2(ds, notes)
    _repair_geometry(datasets, volume, notes)
    return notes.lines(len(datasets))


def sanitise_volume(volume: Volume) -> SanitisedSource:
    """The volume as the writers should see it: valid identity UIDs, and shallow,
    repaired copies of its headers (``volume`` and its datasets are left unchanged;
    the HU array and pixel data are shared). Headers no slice refers to are dropped."""
    notes = _Notes()
    try:
        fixed, copies = _repair_identity(volume, notes)
        lines = notes.lines(len(copies)) + sanitise_headers(copies, fixed)
    except Exception as exc:  # noqa: BLE001 - a bug here must not stop the writers
        logger.warning("source headers not checked: %s", type(exc).__name__)
        logger.debug("sanitise_volume failed", exc_info=True)
        return SanitisedSource(volume, (f"source headers not checked ({type(exc).__name__}): used as loaded",))
    return SanitisedSource(fixed, tuple(lines))
