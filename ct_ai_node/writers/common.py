"""What every result object shares: identity of the node, series numbering, the AI
marking, the caption text, references to source slices and error wrapping.

Pure functions and small value types; no disk, no network.
"""

from __future__ import annotations


import contextlib
import dataclasses
import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass

from highdicom.sr import CodedConcept
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ct_ai_node import __version__
from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import CASE_CLASS_TEXT, CASE_CLASSES, AlgorithmInfo, AnalysisResult
from ct_ai_node.volume.types import Volume

#: (0008,0070) Manufacturer of every object the node writes
MANUFACTURER = "ct-ai-node"
#: (0008,1090) Manufacturer's Model Name
MODEL_NAME = "ct-ai-node"
#: (0018,1020) Software Versions
SOFTWARE_VERSION = __version__
#: (0018,1000) Device Serial Number; the node is software, there is no hardware serial
DEVICE_SERIAL_NUMBER = "ct-ai-node-" + __version__
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

#: Local coding scheme for concepts no public terminology has (DICOM PS3.16 8.2 allows
#: private schemes; the "99" prefix marks it as local).
LOCAL_SCHEME = "99CTAI"

_LO_MAX = 64  # VR LO: 64 characters


@dataclass(frozen=True)
class SeriesNumbers:
    """(0020,0011) Series Number of each output series, counted from ``base``."""

    base: int = 900

    def __post_init__(self) -> None:
        if not isinstance(self.base, int) or not 0 <= self.base <= 2**31 - 10:
            raise ValueError(f"series_number_base must be a non-negative int, got {self.base!r}")

    @property
    def seg(self) -> int:
        return self.base + 1

    @property
    def heatmap(self) -> int:
        return self.base + 2

    @property
    def key_images(self) -> int:
        return self.base + 3

    @property
    def sr(self) -> int:
        return self.base + 4

    @property
    def key_object_selection(self) -> int:
        return self.base + 5

    @property
    def notice_sc(self) -> int:
        """The "AI analysis not performed" Secondary Capture (writers.notice)."""
        return self.base + 6

    @property
    def notice_sr(self) -> int:
        return self.base + 7

    @property
    def display_sr(self) -> int:
        """The SR with the drawable finding alone (sr.build_display_sr)."""
        return self.base + 8

    @property
    def pdf_report(self) -> int:
        """The one-page PDF report (pdf_report.build_pdf_report)."""
        return self.base + 9

    @property
    def lobe_seg(self) -> int:
        """The SEG of the five lobes (seg.build_lobe_seg)."""
        return self.base + 10


@dataclass(frozen=True)
class ReportRef:
    """An SR already sent for a series: what a later revision's SR names in (0040,A360)
    Predecessor Documents Sequence."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, ds: Dataset) -> "ReportRef":
        return cls(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                   str(ds.SOPInstanceUID))

    def as_predecessor_item(self) -> Dataset:
        """A Hierarchical SOP Instance Reference Macro item (PS3.3 Table C.17-3)."""
        sop = Dataset()
        sop.ReferencedSOPClassUID = self.sop_class_uid
        sop.ReferencedSOPInstanceUID = self.sop_instance_uid
        series = Dataset()
        series.SeriesInstanceUID = self.series_uid
        series.ReferencedSOPSequence = [sop]
        item = Dataset()
        item.StudyInstanceUID = self.study_uid
        item.ReferencedSeriesSequence = [series]
        return item


@dataclass(frozen=True)
class ResultUids:
    """The UIDs of one analysis's result objects, derived from what was analysed, and the
    revision they are (with the report they replace).

    Every UID is a hash of (source series, pipeline, model versions, revision) and the
    object's role, so re-running the same analysis on the same series yields the same
    SOP Instance UIDs: a re-sent or re-analysed series replaces (or is ignored by) the
    PACS instead of duplicating. A later revision (the series changed) gets new UIDs.
    """

    source_series_uid: str
    pipeline: str
    #: model name -> version (``AnalysisResult.model_versions``) plus the algorithm version
    model_versions: tuple[tuple[str, str], ...] = ()
    #: 1 for the first analysis of a series, 2.. when it was analysed again after it changed
    revision: int = 1
    #: the report of the revision this one replaces (its SR names it as predecessor)
    predecessor: ReportRef | None = None

    def __post_init__(self) -> None:
        if not str(self.source_series_uid).strip():
            raise ValueError("source_series_uid is empty: result UIDs need the source series")
        if not isinstance(self.revision, int) or self.revision < 1:
            raise ValueError(f"revision must be an int >= 1, got {self.revision!r}")

    @classmethod
    def for_analysis(cls, volume: Volume, result: AnalysisResult, revision: int = 1,
                     predecessor: ReportRef | None = None) -> "ResultUids":
        versions = {**result.model_versions, "algorithm": result.algorithm.version}
        return cls(str(volume.series_instance_uid), str(result.pipeline),
                   tuple(sorted((str(k), str(v)) for k, v in versions.items())), revision, predecessor)

    def uid(self, *role: object) -> str:
        """The UID of ``role``, e.g. ``uid("seg", "series")`` or ``uid("heatmap", 3)``."""
        sources = [MANUFACTURER, self.source_series_uid, self.pipeline,
                   *(f"{k}={v}" for k, v in self.model_versions), *(str(r) for r in role)]
        if self.revision > 1:  # revision 1 keeps the UIDs results had before revisions existed
            sources.append(f"revision={self.revision}")
        return str(generate_uid(entropy_srcs=sources))


def lo(text: str) -> str:
    """Clip ``text`` to the 64 characters a LO attribute may hold."""
    text = " ".join(str(text).split())
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 1] + "~"


def needs_disclaimer(algorithm: AlgorithmInfo) -> bool:
    return not algorithm.clinically_validated


def method_label(pipeline: str) -> str:
    """A short, human name of the pipeline: ``"a"``/``"method_a"`` -> ``"method A"``."""
    text = str(pipeline).strip()
    match = re.fullmatch(r"(?:method[ _-]?)?([a-zA-Z])", text)
    if match:
        return f"method {match.group(1).upper()}"
    return text.replace("_", " ") or "unknown method"


def series_description(kind: str, result: AnalysisResult, revision: int = 1) -> str:
    """(0008,103E) Series Description, e.g. ``AI heat map (method A) NOT FOR DIAGNOSTIC USE``;
    from the second revision of a series' results on, ``AI report (method A) rev 2 ...``.

    The disclaimer and the revision are always kept, so ``kind`` and the method are
    shortened first.
    """
    suffix = (f" rev {revision}" if revision > 1 else "") + (
        f" {NOT_FOR_DIAGNOSTIC_USE}" if needs_disclaimer(result.algorithm) else "")
    text = f"{kind} ({method_label(result.pipeline)})"
    room = _LO_MAX - len(suffix)
    if len(text) > room:
        text = text[: room - 1] + "~"
    return text + suffix


def algorithm_family_code(algorithm: AlgorithmInfo):
    """A code of CID 7162 "Algorithm Family" matching ``algorithm.family`` by meaning."""
    wanted = algorithm.family.strip().lower()
    cid = codes.cid7162
    for name in cid.dir():
        code = getattr(cid, name)
        if code.meaning.lower() == wanted:
            return code
    return cid.ArtificialIntelligence


def now() -> datetime.datetime:
    return datetime.datetime.now()


def content_date_time(when: datetime.datetime | None = None) -> dict[str, object]:
    """Keyword arguments for highdicom's (0008,0023) Content Date / (0008,0033) Time and
    (0008,0021) Series Date / (0008,0031) Series Time."""
    when = when or now()
    return {
        "content_date": when.date(),
        "content_time": when.time().replace(microsecond=0),
        "series_date": when.date(),
        "series_time": when.time().replace(microsecond=0),
    }


def patient_study(first: Dataset) -> dict[str, object]:
    """Keyword arguments for highdicom's Patient and General Study attributes, copied from
    a (sanitised) source header: one study, so the first instance serves every object."""
    return {
        "study_instance_uid": first.StudyInstanceUID,
        "patient_id": first.get("PatientID"),
        "patient_name": first.get("PatientName"),
        "patient_birth_date": first.get("PatientBirthDate"),
        "patient_sex": first.get("PatientSex") or None,
        "accession_number": first.get("AccessionNumber"),
        "study_id": first.get("StudyID"),
        "study_date": first.get("StudyDate"),
        "study_time": first.get("StudyTime"),
        "referring_physician_name": first.get("ReferringPhysicianName"),
        "specific_character_set": first.get("SpecificCharacterSet"),
    }


@dataclass(frozen=True)
class SourceRef:
    """One source slice as a DICOM image reference."""

    sop_class_uid: str
    sop_instance_uid: str
    #: 1-based frame number inside a multi-frame source, else None
    frame_number: int | None

    def as_item(self, purpose: object | None = None) -> Dataset:
        """An Image SOP Instance Reference Macro item (optionally with purpose)."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.sop_class_uid
        item.ReferencedSOPInstanceUID = self.sop_instance_uid
        if self.frame_number is not None:
            item.ReferencedFrameNumber = self.frame_number
        if purpose is not None:
            item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(purpose)]
        return item


def source_ref(volume: Volume, z: int) -> SourceRef:
    if not 0 <= z < len(volume.slices):
        raise ValueError(f"slice index z={z} is outside the volume (0..{len(volume.slices) - 1})")
    ref = volume.slices[z]
    return SourceRef(ref.sop_class_uid, ref.sop_instance_uid, ref.frame_number)


def check_result_matches(volume: Volume, result: AnalysisResult) -> None:
    """Raise ValueError naming the field whose shape does not fit the volume."""
    shape = volume.shape
    if len(volume.slices) != shape[0]:
        raise ValueError(
            f"volume.slices has {len(volume.slices)} entries, volume.hu has {shape[0]} slices"
        )
    if not volume.datasets:
        raise ValueError("volume.datasets is empty: the writers need the source headers")
    for name in ("lung_labels", "infection_mask", "heatmap", "consolidation_mask"):
        arr = getattr(result, name)
        if arr is None and name == "consolidation_mask":  # optional: no opacity split
            continue
        if tuple(arr.shape) != shape:
            raise ValueError(f"result.{name} has shape {tuple(arr.shape)}, volume is {shape}")
    if len(result.slice_scores) != shape[0]:
        raise ValueError(
            f"result.slice_scores has {len(result.slice_scores)} values, volume has {shape[0]} slices"
        )


@contextlib.contextmanager
def building(what: str) -> Iterator[None]:
    """Wrap third-party failures while building ``what`` into one OutputError."""
    try:
        yield
    except OutputError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError) as exc:
        raise OutputError(f"{what}: {' '.join(str(exc).split())}") from exc


# --- three-class result and opacities -------------------------------------------------


def case_class_text(result: AnalysisResult) -> str | None:
    """The case class in words (``CASE_CLASS_TEXT``); None when the pipeline gave no
    three-class result."""
    if result.case_class is None:
        return None
    try:
        return CASE_CLASS_TEXT[result.case_class]
    except KeyError:
        raise ValueError(
            f"result.case_class must be one of {CASE_CLASSES} or None, got {result.case_class!r}"
        ) from None


def class_probabilities(result: AnalysisResult) -> dict[str, float]:
    """``result.class_probabilities`` in ``CASE_CLASSES`` order; empty when not given.
    A key outside ``CASE_CLASSES`` is a pipeline error (ValueError): a report must not
    silently drop a probability."""
    probs = result.class_probabilities or {}
    unknown = sorted(set(probs) - set(CASE_CLASSES))
    if unknown:
        raise ValueError(f"result.class_probabilities has keys outside {CASE_CLASSES}: {unknown}")
    return {name: float(probs[name]) for name in CASE_CLASSES if name in probs}


def opacity_masks(result: AnalysisResult) -> tuple[np.ndarray, np.ndarray] | None:
    """(ground-glass opacity, consolidation) bool masks, or None without a consolidation
    mask. Consolidation is clipped to the infection mask so that the two always split
    the "Suspected infection" segment exactly (the contract says subset; a stray voxel
    outside would be an opacity no other output counts)."""
    if result.consolidation_mask is None:
        return None
    infection = np.asarray(result.infection_mask, dtype=bool)
    consolidation = np.asarray(result.consolidation_mask, dtype=bool) & infection
    return infection & ~consolidation, consolidation


def opacity_volumes_ml(result: AnalysisResult, voxel_ml: float) -> tuple[float | None, float | None]:
    """(ground-glass opacity, consolidation) volumes in ml: the pipeline's values, else
    counted from the masks, else None."""
    ggo, consolidation = result.ggo_volume_ml, result.consolidation_volume_ml
    if ggo is not None and consolidation is not None:
        return float(ggo), float(consolidation)
    masks = opacity_masks(result)  # three passes over the whole volume: only when needed
    if masks is not None:
        if ggo is None:
            ggo = float(np.count_nonzero(masks[0]) * voxel_ml)
        if consolidation is None:
            consolidation = float(np.count_nonzero(masks[1]) * voxel_ml)
    return (None if ggo is None else float(ggo), None if consolidation is None else float(consolidation))


def with_opacity_volumes(result: AnalysisResult, voxel_ml: float) -> AnalysisResult:
    """``result`` with its ground-glass and consolidation volumes filled in
    (``opacity_volumes_ml``), so that per-slice captions read them instead of counting the
    whole masks again for every slice (that cost 8 s for a 300-slice series)."""
    ggo, consolidation = opacity_volumes_ml(result, voxel_ml)
    return dataclasses.replace(result, ggo_volume_ml=ggo, consolidation_volume_ml=consolidation)


# --- caption text --------------------------------------------------------------------


def _fmt_ml(value: float) -> str:
    return f"{value:.0f} ml" if abs(value) >= 10 else f"{value:.1f} ml"


def headline(result: AnalysisResult) -> str:
    """``AI: Other pneumonia (not COVID-19-like)  P(COVID-19-like)=0.12`` with a
    three-class result, else ``AI: COVID-19-like pneumonia  p=0.87``."""
    text = case_class_text(result)
    if text is None:
        return f"AI: {result.label}  p={result.probability:.2f}"
    return f"AI: {text}  P(COVID-19-like)={result.probability:.2f}"


def opacities_line(result: AnalysisResult, voxel_ml: float | None = None) -> str | None:
    """``GGO 95 ml  consolidation 12 ml``; None when the analysis did not split the
    infection (or gave only one of the two and ``voxel_ml`` is unknown)."""
    if voxel_ml is None:
        ggo, consolidation = result.ggo_volume_ml, result.consolidation_volume_ml
    else:
        ggo, consolidation = opacity_volumes_ml(result, voxel_ml)
    if ggo is None or consolidation is None:
        return None
    return f"GGO {_fmt_ml(ggo)}  consolidation {_fmt_ml(consolidation)}"


def numbers_line(result: AnalysisResult) -> str:
    """The SR's key numbers, for viewers that do not show SR."""
    line = (
        f"lesion {_fmt_ml(result.lesion_volume_ml)} ({result.involvement_percent:.1f}% of lungs)"
        f"  corona score {_fmt_ml(result.corona_score_ml)}"
    )
    if result.ct_severity_score is not None:  # with lobes: the score radiologists write
        line += f"  CT severity {result.ct_severity_score}/25"
    return line


def provenance_lines(result: AnalysisResult) -> tuple[str, str]:
    """``("ct-ai-node method A 0.1.0", "trained on synthetic chest-CT phantoms only")``"""
    algo = result.algorithm
    return (
        f"{MANUFACTURER} {method_label(result.pipeline)} {algo.version}",
        f"trained on {algo.trained_on}",
    )


@dataclass(frozen=True)
class Caption:
    """Lines burned into a secondary capture: ``top`` first line first, ``bottom``
    last line last."""

    top: tuple[str, ...]
    bottom: tuple[str, ...]


def caption_for(result: AnalysisResult, z: int, key: tuple[int, int] | None = None,
                voxel_ml: float | None = None) -> Caption:
    """The caption of slice ``z``; ``key=(k, n)`` adds the key-image line.

    With a three-class result the class text makes the headline too long to share a
    line with the slice score (it would be set in a smaller font on a 512 matrix), so
    the slice score opens the second line, followed by the opacity volumes."""
    score = float(result.slice_scores[z])
    if result.case_class is None:
        top = [f"{headline(result)}  slice score {score:.2f}", numbers_line(result)]
    else:
        second = f"slice score {score:.2f}"
        opacities = opacities_line(result, voxel_ml)
        if opacities is not None:
            second += f"  {opacities}"
        top = [headline(result), second, numbers_line(result)]
    if result.comparison is not None:
        from ct_ai_node.pipeline.comparison import caption_text

        top.append(caption_text(result.comparison))
    if key is not None:
        top.append(f"Key image {key[0]}/{key[1]}: highest AI slice score")
    bottom = list(provenance_lines(result))
    if needs_disclaimer(result.algorithm):
        bottom.append(NOT_FOR_DIAGNOSTIC_USE)
    return Caption(tuple(top), tuple(bottom))
