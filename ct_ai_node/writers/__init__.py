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
==================  =========================================  ================  ======
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from ct_ai_node.pipeline.types import AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers.common import ResultUids, SeriesNumbers
from ct_ai_node.writers.heatmap import HeatStyle
from ct_ai_node.writers.secondary_capture import (
    build_heatmap_series,
    build_key_image_series,
    build_key_object_selection,
)
from ct_ai_node.writers.seg import build_seg
from ct_ai_node.writers.sr import DISPLAY_SR_SERIES_OFFSET, build_display_sr, build_sr

logger = logging.getLogger(__name__)

__all__ = [
    "HeatStyle",
    "OutputSet",
    "ResultUids",
    "SeriesNumbers",
    "build_all",
    "build_heatmap_series",
    "build_key_image_series",
    "build_key_object_selection",
    "build_outputs",
    "build_seg",
    "build_display_sr",
    "build_sr",
]


@dataclass
class OutputSet:
    """The result objects of one analysis, with their file names."""

    seg: Dataset
    heatmaps: list[Dataset] = field(default_factory=list)
    key_images: list[Dataset] = field(default_factory=list)
    sr: Dataset | None = None
    key_object_selection: Dataset | None = None
    #: seconds spent per builder ("seg", "heatmap", "key_images", "sr", "ko")
    timings_s: dict[str, float] = field(default_factory=dict)
    #: the display SR: the SR's planar finding alone, which image viewers can draw
    display_sr: Dataset | None = None

    def named(self) -> Iterator[tuple[str, Dataset]]:
        """(file name, dataset) pairs: ``seg.dcm``, ``heatmap_0001.dcm``...,
        ``key_0001.dcm``..., ``sr.dcm``, ``ko.dcm``."""
        yield "seg.dcm", self.seg
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
) -> OutputSet:
    """Build every result object of one analysis.

    Series numbers: SEG ``base+1``, heat maps ``base+2``, key images ``base+3``, SR
    ``base+4``, key object selection ``base+5``. The SR references the SEG and lists the
    key images as evidence. UIDs come from ``uids`` (by default derived from the source
    series and the model, revision 1): the same analysis gives the same UIDs.

    Raises
    ------
    ct_ai_node.errors.OutputError
        When an object cannot be built (e.g. no lung and no infection at all).
    """
    with warnings.catch_warnings():
        # highdicom warns about single-component person names and prints the name:
        # patient data must not reach the log, and the name is copied unchanged anyway
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return _build_outputs(volume, result, series_number_base, institution_name, heatmaps, key_images,
                              key_object_selection, style, uids or ResultUids.for_analysis(volume, result))


def _build_outputs(volume, result, series_number_base, institution_name, heatmaps, key_images,
                   key_object_selection, style, uids: ResultUids) -> OutputSet:
    numbers = SeriesNumbers(series_number_base)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 3)
        return value

    seg = timed("seg", build_seg, volume, result, numbers.seg, institution_name=institution_name, uids=uids)
    maps = (
        timed("heatmap", build_heatmap_series, volume, result, numbers.heatmap,
              style=style, institution_name=institution_name, uids=uids)
        if heatmaps else []
    )
    keys = (
        timed("key_images", build_key_image_series, volume, result, numbers.key_images,
              style=style, institution_name=institution_name, uids=uids)
        if key_images else []
    )
    sr = timed("sr", build_sr, volume, result, seg, keys, numbers.sr, institution_name=institution_name, uids=uids)
    display = timed("sr_display", build_display_sr, volume, result, numbers.base + DISPLAY_SR_SERIES_OFFSET,
                    institution_name=institution_name, uids=uids)
    ko = (
        timed("ko", build_key_object_selection, keys, numbers.key_object_selection,
              result=result, institution_name=institution_name, uids=uids)
        if key_object_selection and keys else None
    )
    out = OutputSet(seg, maps, keys, sr, ko, timings, display_sr=display)
    logger.info(
        "built %d result objects (SEG %d frames, %d heat maps, %d key images) in %.2f s",
        len(out.datasets()), int(seg.NumberOfFrames), len(maps), len(keys), sum(timings.values()),
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
