"""Result writers: one analysis + its source series -> DICOM result objects.

Pure functions (no disk, no network): each builder returns pydicom datasets, one new
series per output, all in the source's study. UIDs are derived from the source series,
the pipeline, the model versions and the revision (:class:`common.ResultUids`): the same
analysis twice gives the same UIDs.

==================  =========================================  ================  ======
output              builder                                    file name         series
==================  =========================================  ================  ======
SEG                 :func:`seg.build_seg`                      ``seg.dcm``       base+1
heat-map SC series  :func:`secondary_capture.build_heatmap_series`  ``heatmap_0001.dcm``  base+2
key-image SC series :func:`secondary_capture.build_key_image_series`  ``key_0001.dcm``  base+3
SR (TID 1500)       :func:`sr.build_sr`                        ``sr.dcm``        base+4
display SR          :func:`sr.build_display_sr`  (OHIF draws it)  ``sr_display.dcm``  base+8
KOS (optional)      :func:`secondary_capture.build_key_object_selection`  ``ko.dcm``  base+5
PDF report          :func:`pdf_report.build_pdf_report` (Encapsulated PDF)  ``report_pdf.dcm``  base+9
lobe SEG            :func:`seg.build_lobe_seg` (with lobes)    ``seg_lobes.dcm``  base+10
==================  =========================================  ================  ======
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers.common import ResultUids, SeriesNumbers
from ct_ai_node.writers.heatmap import HeatStyle
from ct_ai_node.writers.pdf_report import build_pdf_report
from ct_ai_node.writers.secondary_capture import (
    build_heatmap_series,
    iter_heatmap_series,
    build_key_image_series,
    build_key_object_selection,
)
from ct_ai_node.writers.seg import build_lobe_seg, build_seg
from ct_ai_node.writers.source_header import SanitisedSource, sanitise_volume
from ct_ai_node.writers.sr import build_display_sr, build_sr

logger = logging.getLogger(__name__)

__all__ = [
    "HeatStyle",
    "OutputSet",
    "ResultUids",
    "SanitisedSource",
    "SeriesNumbers",
    "build_all",
    "build_heatmap_series",
    "iter_heatmap_series",
    "build_key_image_series",
    "build_key_object_selection",
    "build_outputs",
    "build_pdf_report",
    "build_seg",
    "build_display_sr",
    "build_sr",
    "sanitise_volume",
]


@dataclass
class OutputSet:
    """The result objects of one analysis, with their file names. An object that could
    not be built is None / empty, and ``warnings`` says which and why."""

    seg: Dataset | None
    heatmaps: list[Dataset] = field(default_factory=list)
    key_images: list[Dataset] = field(default_factory=list)
    sr: Dataset | None = None
    key_object_selection: Dataset | None = None
    #: seconds spent per builder ("seg", "heatmap", "key_images", "sr", "ko", "pdf_report")
    timings_s: dict[str, float] = field(default_factory=dict)
    #: one line per source-header repair and per object that could not be built
    warnings: list[str] = field(default_factory=list)
    #: the display SR: the SR's planar finding alone, which image viewers can draw
    display_sr: Dataset | None = None
    #: the one-page PDF report as an Encapsulated PDF (Modality DOC)
    pdf_report: Dataset | None = None
    #: the SEG of the five lobes (analyses with lobes)
    lobe_seg: Dataset | None = None

    def named(self) -> Iterator[tuple[str, Dataset]]:
        """(file name, dataset) pairs: ``seg.dcm``, ``heatmap_0001.dcm``...,
        ``key_0001.dcm``..., ``sr.dcm``, ``sr_display.dcm``, ``ko.dcm``, ``report_pdf.dcm``."""
        if self.seg is not None:
            yield "seg.dcm", self.seg
        if self.lobe_seg is not None:
            yield "seg_lobes.dcm", self.lobe_seg
        for i, ds in enumerate(self.heatmaps, start=1):
            yield f"heatmap_{i:04d}.dcm", ds
        for i, ds in enumerate(self.key_images, start=1):
            yield f"key_{i:04d}.dcm", ds
        if self.sr is not None:
            yield "sr.dcm", self.sr
        if self.display_sr is not None:
            yield "sr_display.dcm", self.display_sr
        if self.key_object_selection is not None:
            yield "ko.dcm", self.key_object_selection
        if self.pdf_report is not None:
            yield "report_pdf.dcm", self.pdf_report

    def datasets(self) -> list[Dataset]:
        return [ds for _, ds in self.named()]

    def sop_classes(self) -> dict[str, str]:
        """file name -> SOP Class UID (the ``outputs`` of result.json)."""
        return {name: str(ds.SOPClassUID) for name, ds in self.named()}


def build_outputs(
    volume: Volume,
    result: AnalysisResult,
    *,
    series_number_base: int = 900,
    institution_name: str | None = None,
    heatmaps: bool = True,
    key_images: bool = True,
    key_object_selection: bool = True,
    style: HeatStyle = HeatStyle(),
    uids: ResultUids | None = None,
    sanitise: bool = True,
    pdf_report: bool = True,
) -> OutputSet:
    """Build every result object of one analysis.

    Series numbers: SEG ``base+1``, heat maps ``base+2``, key images ``base+3``, SR
    ``base+4``, key object selection ``base+5``, display SR ``base+8``, PDF report
    ``base+9``. The SR references the SEG and lists the
    key images as evidence. UIDs come from ``uids`` (by default derived from the source
    series and the model, revision 1): the same analysis gives the same UIDs.

    The source headers are first checked and repaired once for all builders
    (:func:`source_header.sanitise_volume`; ``sanitise=False`` when the caller already
    did). Each object is built on its own: one that fails is left out with a one-line
    warning in ``OutputSet.warnings`` (the SR is left out with the SEG it references,
    the KOS with the key images), and the others are kept.

    Raises
    ------
    ct_ai_node.errors.OutputError
        When no object at all could be built; it names each failure. (With
        ``heatmaps=False`` the caller builds the heat maps, and decides.)
    """
    uids = uids or ResultUids.for_analysis(volume, result)
    with warnings.catch_warnings():
        # highdicom warns about single-component person names and prints the name:
        # patient data must not reach the log, and the name is copied unchanged anyway
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        notes: list[str] = []
        if sanitise:
            source = sanitise_volume(volume)
            volume, notes = source.volume, list(source.notes)
        out = _build_outputs(volume, result, series_number_base, institution_name, heatmaps, key_images,
                             key_object_selection, style, uids, pdf_report)
    out.warnings[:0] = notes
    return out


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message, or its type when it has none."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, OutputError) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _build_outputs(volume, result, series_number_base, institution_name, heatmaps, key_images,
                   key_object_selection, style, uids: ResultUids, pdf_report: bool = True) -> OutputSet:
    numbers = SeriesNumbers(series_number_base)
    timings: dict[str, float] = {}
    failures: list[str] = []

    def timed(name: str, label: str, fn, *args, default=None, **kwargs):
        """Build one object; a failure becomes a warning and ``default``."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one writer's failure must not lose the others
            logger.warning("%s not built: %s", label, type(exc).__name__)
            logger.debug("%s failed", label, exc_info=True)
            failures.append(f"{label} not written: {one_line(exc)}")
            return default
        finally:
            timings[name] = round(time.perf_counter() - start, 3)

    seg = timed("seg", "SEG", build_seg, volume, result, numbers.seg, institution_name=institution_name, uids=uids)
    maps = (
        timed("heatmap", "heat-map series", build_heatmap_series, volume, result, numbers.heatmap,
              style=style, institution_name=institution_name, uids=uids, default=[])
        if heatmaps else []
    )
    keys = (
        timed("key_images", "key-image series", build_key_image_series, volume, result, numbers.key_images,
              style=style, institution_name=institution_name, uids=uids, default=[])
        if key_images else []
    )
    lobe_seg = (
        timed("lobe_seg", "lobe SEG", build_lobe_seg, volume, result, numbers.lobe_seg,
              institution_name=institution_name, uids=uids)
        if result.lobe_labels is not None else None
    )
    if seg is not None:
        sr = timed("sr", "SR", build_sr, volume, result, seg, keys, numbers.sr,
                   institution_name=institution_name, uids=uids, lobe_seg=lobe_seg)
    else:  # its volumetric findings reference the SEG: no SR without it
        sr = None
        failures.append("SR not written: it references the SEG, which could not be built")
    display = timed("sr_display", "display SR", build_display_sr, volume, result,
                    numbers.display_sr, institution_name=institution_name, uids=uids)
    ko = (
        timed("ko", "key object selection", build_key_object_selection, keys, numbers.key_object_selection,
              result=result, institution_name=institution_name, uids=uids)
        if key_object_selection and keys else None
    )
    pdf = (
        timed("pdf_report", "PDF report", build_pdf_report, volume, result, numbers.pdf_report,
              institution_name=institution_name, uids=uids, style=style)
        if pdf_report else None
    )
    out = OutputSet(seg, maps, keys, sr, ko, timings, failures, display_sr=display, pdf_report=pdf,
                    lobe_seg=lobe_seg)
    if not out.datasets() and heatmaps:  # without them, the caller builds the heat maps and decides
        raise OutputError("no result object could be built: " + "; ".join(failures or ["nothing to build"]))
    logger.info(
        "built %d result objects (SEG %d frames, %d heat maps, %d key images) in %.2f s%s",
        len(out.datasets()), int(seg.NumberOfFrames) if seg is not None else 0, len(maps), len(keys),
        sum(timings.values()), f"; {len(failures)} not built" if failures else "",
    )
    return out


def build_all(
    volume: Volume,
    result: AnalysisResult,
    *,
    series_number_base: int = 900,
    institution_name: str | None = None,
    uids: ResultUids | None = None,
) -> list[Dataset]:
    """Every result object of one analysis, in the order of :meth:`OutputSet.named`."""
    return build_outputs(
        volume, result, series_number_base=series_number_base, institution_name=institution_name, uids=uids
    ).datasets()
