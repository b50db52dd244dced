"""Identity UIDs of a loaded series: check them, and mint valid replacements.

De-identification tools and some exports leave SOP Instance UIDs empty (or one
value on every slice), write UUIDs where UIDs belong, or drop the Frame of
Reference UID. The writers must reference the source images with valid,
distinct UIDs, so ``repair_identity`` replaces every empty or invalid value in
the in-memory datasets (never on disk) with a deterministic one: the same files
give the same UIDs on every run, so a re-analysis references the same objects.

Pure: no disk, no network. Warnings name the repair and a count, never a
patient attribute.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from typing import Any, Sequence

import pydicom
from pydicom.uid import generate_uid

#: PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_UID_LENGTH = 64


def uid_text(value: Any) -> str | None:
    """A UID element value as one stripped string; None when multi-valued or not text."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if not isinstance(value, str):  # MultiValue, list: not one UID
        return None
    return value.strip(" \0")


def is_valid_uid(value: Any) -> bool:
    """True for a single, conformant UID of at most 64 characters."""
    text = uid_text(value)
    return bool(text) and len(text) <= MAX_UID_LENGTH and UID_PATTERN.match(text) is not None


def uuid_as_uid(text: str) -> str | None:
    """The standard UID form of a UUID (PS3.5 B.2: ``2.25.`` + its integer), else None."""
    try:
        return "2.25." + str(uuid.UUID(text.strip()).int)
    except (ValueError, AttributeError, TypeError):
        return None


def mint_uid(*sources: Any) -> str:
    """A valid UID derived from ``sources``: the same inputs give the same UID."""
    return str(generate_uid(entropy_srcs=[str(s) for s in sources]))


def replacement_uid(keyword: str, text: str | None, *context: Any) -> str:
    """Valid stand-in for an invalid UID value: its UUID form when it is a UUID, else minted."""
    if text:
        converted = uuid_as_uid(text)
        if converted is not None:
            return converted
    return mint_uid(keyword, text if text is not None else "<multi-valued>", *context)


def _kind(text: str | None) -> str:
    if text is None:
        return "multi-valued"
    if not text:
        return "missing or empty"
    if is_valid_uid(text):
        return "different"
    return "not a valid UID"


def _get(ds: pydicom.Dataset, keyword: str) -> str | None:
    try:
        return uid_text(ds.get(keyword))
    except Exception:  # noqa: BLE001 - an unreadable value counts as invalid
        return None


def _set_everywhere(ds: pydicom.Dataset, keyword: str, value: str) -> None:
    setattr(ds, keyword, value)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and keyword == "SOPInstanceUID":
        meta.MediaStorageSOPInstanceUID = value


def _repair_shared(
    datasets: Sequence[pydicom.Dataset],
    keyword: str,
    context: Sequence[Any],
    warnings: list[str],
) -> str:
    """Give every dataset one valid ``keyword`` value (series-level UID); returns it."""
    texts = [_get(ds, keyword) for ds in datasets]
    valid = Counter(t for t in texts if t and is_valid_uid(t))
    if valid:
        value = valid.most_common(1)[0][0]
    else:
        # every value empty or invalid: convert the most common one (stable)
        counted = Counter(t for t in texts if t is not None)
        original = counted.most_common(1)[0][0] if counted else None
        value = replacement_uid(keyword, original, *context)
    changed = Counter(_kind(t) for t in texts if t != value)
    for ds, text in zip(datasets, texts):
        if text != value:
            setattr(ds, keyword, value)
    if changed:
        kinds = ", ".join(f"{kind} on {n}" for kind, n in sorted(changed.items()))
        how = "converted from its UUID form" if value.startswith("2.25.") else "minted"
        if valid:
            how = "set to the series' value"
        warnings.append(f"{keyword} {kinds} of {len(datasets)} images: {how} ({value})")
    return value


def _study_context(datasets: Sequence[pydicom.Dataset]) -> list[str]:
    """Stable study-level inputs (hashed, never shown) shared by the series of one study."""
    first = datasets[0]
    values = [
        str(first.get(k) or "")
        for k in ("PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID")
    ]
    return values if any(values) else []


def repair_identity(
    datasets: Sequence[pydicom.Dataset],
    positions: Sequence[tuple[float, float, float] | None],
    warnings: list[str],
) -> tuple[str, str, str]:
    """Make Study, Series, Frame of Reference and SOP Instance UIDs valid and distinct.

    Parameters
    ----------
    datasets
        The source datasets of one volume (each a distinct image), modified in place.
    positions
        ImagePositionPatient of each dataset's first frame, parallel to ``datasets``:
        a slice without a usable SOP Instance UID is identified by its position.
    warnings
        One line is appended per kind of repair.

    Returns
    -------
    (study_uid, series_uid, frame_of_reference_uid)
    """
    if len(positions) != len(datasets):
        raise ValueError("positions must be parallel to datasets")
    where = sorted(",".join(f"{v:.3f}" for v in p) for p in positions if p is not None)
    fingerprint = [
        str(datasets[0].get("SeriesNumber") or ""),
        str(datasets[0].get("SeriesDescription") or ""),
        *where,
    ]
    original_series = _get(datasets[0], "SeriesInstanceUID") or ""
    study = _repair_shared(
        datasets,
        "StudyInstanceUID",
        _study_context(datasets) or [original_series, *fingerprint],
        warnings,
    )
    series = _repair_shared(datasets, "SeriesInstanceUID", [study, *fingerprint], warnings)
    frame_of_reference = _repair_shared(datasets, "FrameOfReferenceUID", [series], warnings)

    # SOP Instance UIDs: from the file meta when the data set lacks one; minted
    # (from the slice's position) when empty, invalid or shared by several images
    own = [_get(ds, "SOPInstanceUID") for ds in datasets]
    from_meta = 0
    for i, ds in enumerate(datasets):
        meta = getattr(ds, "file_meta", None)
        if own[i] == "" and meta is not None:
            text = _get(meta, "MediaStorageSOPInstanceUID")
            if text:
                own[i] = text
                ds.SOPInstanceUID = text
                from_meta += 1
    if from_meta:
        warnings.append(
            f"SOPInstanceUID empty in the data set of {from_meta} images: taken from the file meta"
        )
    counts = Counter(t for t in own if t)
    problems: Counter[str] = Counter()
    for i, ds in enumerate(datasets):
        text = own[i]
        if text and is_valid_uid(text) and counts[text] == 1:
            continue
        kind = "shared by several images" if text and counts[text] > 1 else _kind(text)
        problems[kind] += 1
        position = positions[i]
        where_i = "" if position is None else ",".join(f"{v:.3f}" for v in position)
        if kind == "not a valid UID":
            value = replacement_uid("SOPInstanceUID", text, series, where_i)
        else:
            value = mint_uid(
                "SOPInstanceUID",
                series,
                text,
                where_i,
                str(ds.get("InstanceNumber") or ""),
                str(ds.get("AcquisitionNumber") or ""),
                i if position is None else "",
            )
        _set_everywhere(ds, "SOPInstanceUID", value)
    for kind, n in sorted(problems.items()):
        how = (
            "UUIDs converted to UIDs, other values minted"
            if kind == "not a valid UID"
            else "slices identified by position, UIDs minted"
        )
        warnings.append(f"SOPInstanceUID {kind} on {n} of {len(datasets)} images: {how}")
    return study, series, frame_of_reference
