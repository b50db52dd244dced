"""Folder of DICOM files -> series -> selection -> HU ``Volume``.

    scan_folder(path)            headers of every file, grouped by series   (reader)
    summarise(datasets)          SeriesSummary from header datasets, pure   (series)
    select_series(summaries)     the series to analyse, pure rules          (rules.selection)
    load_volume(paths)           pixel data -> sorted, checked HU volume    (assemble)
    load_series_from_folder(...) all of the above, one call

    choose_stack(images)         the largest consistent stack of a series   (stack)
    repair_identity(...)         valid, deterministic UIDs in memory        (identity)

Every refusal is ``InputRejected`` with a one-line reason.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ct_ai_node.errors import InputRejected

from .assemble import assemble, load_volume
from .geometry import Orientation, StackLimits
from .reader import ScannedInstance, ScanReport, ScanResult, SkippedFile, read_dataset, scan_folder
from .series import SeriesSummary, summarise
from .types import SliceRef, Volume

if TYPE_CHECKING:  # rules.selection imports this package: no import cycle at run time
    from ct_ai_node.rules.selection import Selection, SelectionPolicy

logger = logging.getLogger(__name__)

__all__ = [
    "Orientation",
    "ScanReport",
    "ScanResult",
    "ScannedInstance",
    "SeriesSummary",
    "SkippedFile",
    "SliceRef",
    "StackLimits",
    "Volume",
    "assemble",
    "load_series_from_folder",
    "load_volume",
    "read_dataset",
    "scan_folder",
    "summarise",
]


def _damage_note(scan: ScanResult) -> str:
    """"; damaged DICOM file x.dcm skipped (...)" when the scan set damaged files aside."""
    damaged = scan.damaged
    if not damaged:
        return ""
    first = damaged[0]
    detail = first.reason.split(": ", 1)[-1]
    more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
    return f"; damaged DICOM file {first.path.name}{more} skipped ({detail})"


def load_series_from_folder(
    path: str | os.PathLike[str], policy: SelectionPolicy | None = None
) -> tuple[Volume, Selection, ScanReport]:
    """Scan a folder, choose the series to analyse and load it.

    Parameters
    ----------
    path
        Folder walked recursively (any file names, non-DICOM files skipped).
    policy
        ``ct_ai_node.rules.selection.SelectionPolicy``; the default policy when None.

    Returns
    -------
    (Volume, Selection, ScanReport)
        The volume also carries the selection's warnings.

    Raises
    ------
    InputRejected
        With a one-line reason: no files, no DICOM files, no CT series, no
        suitable series (the best candidate's reason), or the chosen series
        cannot be loaded (missing slices, corrupt or truncated file, ...).
    """
    from ct_ai_node.rules.selection import SelectionPolicy, select_series

    if policy is None:
        policy = SelectionPolicy()
    root = Path(path)
    if not root.exists():
        raise InputRejected(f"input not found: {root}")
    scan = scan_folder(root)
    if scan.n_files == 0:
        raise InputRejected(f"no files in {root}")
    if not scan.series:
        raise InputRejected(f"no DICOM files among {scan.n_files} files" + _damage_note(scan))
    summaries = scan.summaries()
    report = scan.report(summaries)
    selection = select_series(summaries, policy)
    # reasons and labels carry the series description (free text): DEBUG only
    if selection.skipped:
        logger.info("%d other series skipped", len(selection.skipped))
    for _key, reason in selection.skipped:
        logger.debug("series skipped: %s", reason)
    if selection.chosen is None:
        raise InputRejected((selection.reason or "no suitable series") + _damage_note(scan))
    chosen = selection.chosen
    logger.info("series chosen: %d slices, %s mm", chosen.n_frames, chosen.effective_thickness_mm)
    logger.debug("series chosen: %s", chosen.label)
    try:
        volume = load_volume(scan.paths(chosen.key), limits=policy.stack_limits())
    except InputRejected as exc:
        note = _damage_note(scan)
        if not note:
            raise
        raise InputRejected(exc.reason + note) from exc
    for text in [*scan.warnings, *selection.warnings]:
        if text not in volume.warnings:
            volume.warnings.append(text)
    return volume, selection, report
