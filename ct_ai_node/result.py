"""``result.json``: the machine-readable outcome of one analysis (design.md contract).

Keys are stable; new ones may be added. Built purely from the volume, the analysis
result and the written outputs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ct_ai_node.pipeline.types import AnalysisResult
from ct_ai_node.volume.types import Volume


class SliceScore(BaseModel):
    sop_instance_uid: str
    instance_number: int | None
    frame_number: int | None = None
    score: float
    #: True when the classifier did not run on this slice and the score was interpolated
    #: from its neighbours (thin-slice scans), or the slice holds no lung (score 0)
    interpolated: bool = False
    #: the method's own score of the slice when ``score`` is the opacity's (three-class result)
    method_score: float | None = None


class LobeResult(BaseModel):
    """One lobe's opacity and CT severity score (0-5, Pan et al. 2020)."""

    name: str  # right_upper, right_middle, right_lower, left_upper, left_lower
    volume_ml: float
    involvement_percent: float
    severity: int
    ggo_ml: float
    consolidation_ml: float


class CategorySuggestionResult(BaseModel):
    """An AI suggestion for the radiologist: CO-RADS 1-5 and the RSNA category, with the
    features that led to it (docs/reporting.md)."""

    co_rads: int
    rsna: Literal["typical", "indeterminate", "atypical", "negative"]
    features: list[str] = Field(default_factory=list)


class StudyFindingsResult(BaseModel):
    """One study's findings as a comparison saw them."""

    study_instance_uid: str
    study_date: str | None  # YYYY-MM-DD
    ct_severity_score: int | None
    involvement_percent: float
    lesion_volume_ml: float
    case_class: str | None = None
    #: each lobe's 0-5 grade, right upper .. left lower; empty without lobes
    lobe_severities: list[int] = Field(default_factory=list)


class ComparisonResult(BaseModel):
    """This study against the patient's prior study (docs/reporting.md: the rule)."""

    change: Literal["improved", "stable", "worse"]
    interval_days: int
    #: history: the node analysed the prior before; pacs: found by C-FIND, retrieved, analysed
    source: Literal["history", "pacs"]
    reason: str
    #: the sentence the SR and the PDF carry
    text: str
    ct_severity_score_change: int | None
    involvement_change_pp: float
    prior: StudyFindingsResult
    current: StudyFindingsResult


class ResultDocument(BaseModel):
    status: Literal["done", "rejected", "failed"]
    reason: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    pipeline: str | None = None
    model_versions: dict[str, str] = Field(default_factory=dict)
    algorithm: str | None = None
    trained_on: str | None = None
    probability: float | None = None
    threshold: float | None = None
    label: str | None = None
    #: the three-class result: one of CASE_CLASSES ("covid_like", "other_pneumonia",
    #: "no_pneumonia"); None when the pipeline gave none (``label`` alone then)
    case_class: str | None = None
    case_class_text: str | None = None
    #: class -> probability, in CASE_CLASSES order; ``probability`` is its "covid_like"
    class_probabilities: dict[str, float] = Field(default_factory=dict)
    #: the method's (pipeline's) own P(COVID-19-like) when the three-class result decided
    method_probability: float | None = None
    positive_slice_ratio: float | None = None
    positive_slices: list[int] = Field(default_factory=list, description="instance numbers")
    lung_volume_ml: float | None = None
    right_lung_volume_ml: float | None = None
    left_lung_volume_ml: float | None = None
    lesion_volume_ml: float | None = None
    involvement_percent: float | None = None
    corona_score_ml: float | None = None
    #: the suspected infection split into ground-glass opacity and consolidation (they
    #: add up to lesion_volume_ml); None when the pipeline did not split it
    ggo_volume_ml: float | None = None
    consolidation_volume_ml: float | None = None
    key_slices: list[int] = Field(default_factory=list, description="instance numbers, best first")
    outputs: dict[str, str] = Field(default_factory=dict, description="file name -> SOP Class UID")
    timings_s: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    skipped_series: list[str] = Field(default_factory=list)
    slice_scores: list[SliceScore] = Field(default_factory=list)
    version: str | None = None
    #: 1 for a series' first results; 2.. when the series changed and was analysed again
    revision: int = 1
    #: SOP Instance UID of the SR this revision replaces (named in its Predecessor Documents)
    predecessor_sr: str | None = None
    #: one entry per lobe (right upper, middle, lower; left upper, lower); empty without a
    #: lobe segmentation
    lobes: list[LobeResult] = Field(default_factory=list)
    #: the lobes' severities added up, 0-25; None without lobes
    ct_severity_score: int | None = None
    category_suggestion: CategorySuggestionResult | None = None
    #: against the patient's prior study; None without one
    comparison: ComparisonResult | None = None


def _findings_result(f) -> StudyFindingsResult:
    return StudyFindingsResult(
        study_instance_uid=f.study_instance_uid,
        study_date=f.study_datetime.strftime("%Y-%m-%d") if f.study_datetime else None,
        ct_severity_score=f.ct_severity_score, involvement_percent=round(f.involvement_percent, 2),
        lesion_volume_ml=round(f.lesion_volume_ml, 2), case_class=f.case_class,
        lobe_severities=list(f.lobe_severities))


def comparison_result(c) -> ComparisonResult:
    """result.json's ``comparison`` from a ``PriorComparison``."""
    from ct_ai_node.pipeline.comparison import comparison_text

    scores = (c.prior.ct_severity_score, c.current.ct_severity_score)
    return ComparisonResult(
        change=c.change, interval_days=c.interval_days, source=c.source, reason=c.reason,
        text=comparison_text(c),
        ct_severity_score_change=None if None in scores else scores[1] - scores[0],
        involvement_change_pp=round(c.current.involvement_percent - c.prior.involvement_percent, 2),
        prior=_findings_result(c.prior), current=_findings_result(c.current))


def _instance_numbers(volume: Volume, zs) -> list[int]:
    out = []
    for z in zs:
        ref = volume.slices[int(z)]
        out.append(int(ref.instance_number) if ref.instance_number is not None else int(z) + 1)
    return out


def result_document(volume: Volume, result: AnalysisResult, outputs: dict[str, str], timings: dict[str, float],
                    skipped: list[str], version: str, extra_warnings: Sequence[str] = ()) -> ResultDocument:
    """``warnings``: the analysis's (the loader's among them) then ``extra_warnings``
    (the writers' source-header repairs and objects not written)."""
    from ct_ai_node.pipeline.scoring import volume_ml
    from ct_ai_node.pipeline.types import CASE_CLASS_TEXT, CASE_CLASSES, LEFT_LUNG, RIGHT_LUNG
    from ct_ai_node.writers.common import opacity_volumes_ml

    scored = set(result.scored_slices)
    # known classes first, in their fixed order; an unexpected key is kept, not dropped
    order = [*CASE_CLASSES, *sorted(set(result.class_probabilities) - set(CASE_CLASSES))]
    probabilities = {k: round(float(result.class_probabilities[k]), 4) for k in order
                     if k in result.class_probabilities}
    ggo_ml, consolidation_ml = opacity_volumes_ml(result, volume.voxel_volume_ml)

    return ResultDocument(
        status="done",
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        pipeline=result.pipeline,
        model_versions=result.model_versions,
        algorithm=f"{result.algorithm.name} {result.algorithm.version}",
        trained_on=result.algorithm.trained_on,
        probability=round(result.probability, 4),
        threshold=result.threshold,
        label=result.label,
        case_class=result.case_class,
        case_class_text=CASE_CLASS_TEXT.get(result.case_class) if result.case_class is not None else None,
        class_probabilities=probabilities,
        method_probability=None if result.case_class is None or result.method_probability is None
        else round(result.method_probability, 4),
        positive_slice_ratio=round(result.positive_slice_ratio, 4),
        positive_slices=sorted(_instance_numbers(volume, result.positive_slices)),
        lung_volume_ml=round(result.lung_volume_ml, 1),
        right_lung_volume_ml=round(volume_ml(result.lung_labels == RIGHT_LUNG, volume.spacing), 1),
        left_lung_volume_ml=round(volume_ml(result.lung_labels == LEFT_LUNG, volume.spacing), 1),
        lesion_volume_ml=round(result.lesion_volume_ml, 2),
        involvement_percent=round(result.involvement_percent, 2),
        corona_score_ml=round(result.corona_score_ml, 2),
        ggo_volume_ml=None if ggo_ml is None else round(ggo_ml, 2),
        consolidation_volume_ml=None if consolidation_ml is None else round(consolidation_ml, 2),
        key_slices=_instance_numbers(volume, result.key_slices),
        outputs=outputs,
        timings_s=timings,
        warnings=[*result.warnings, *(w for w in extra_warnings if w not in result.warnings)],
        skipped_series=skipped,
        slice_scores=[
            SliceScore(sop_instance_uid=ref.sop_instance_uid, instance_number=ref.instance_number,
                       frame_number=ref.frame_number, score=round(float(result.slice_scores[z]), 4),
                       interpolated=bool(scored) and z not in scored,
                       method_score=None if result.method_slice_scores is None
                       else round(float(result.method_slice_scores[z]), 4))
            for z, ref in enumerate(volume.slices)
        ],
        version=version,
        lobes=[LobeResult(name=lobe.name, volume_ml=round(lobe.volume_ml, 1),
                          involvement_percent=round(lobe.involvement_percent, 2), severity=lobe.severity,
                          ggo_ml=round(lobe.ggo_ml, 2), consolidation_ml=round(lobe.consolidation_ml, 2))
               for lobe in result.lobes],
        ct_severity_score=result.ct_severity_score,
        category_suggestion=None if result.category is None else CategorySuggestionResult(
            co_rads=result.category.co_rads, rsna=result.category.rsna, features=list(result.category.features)),
        comparison=None if result.comparison is None else comparison_result(result.comparison),
    )


# -- a finished job's result.json, summarised (web app, notifications) ---------------------

#: the fields of result.json a summary keeps (no UIDs, no patient data)
SUMMARY_KEYS = ("status", "reason", "pipeline", "case_class", "case_class_text", "probability", "label",
                "method_probability", "lesion_volume_ml", "ggo_volume_ml", "consolidation_volume_ml",
                "involvement_percent", "lung_volume_ml", "key_slices", "revision", "trained_on", "warnings",
                "ct_severity_score")


def read_result(outbox: Path, job_id: int) -> dict | None:
    """The job's ``result.json`` (None when there is none; ``{"unreadable": ...}`` when damaged)."""
    path = Path(outbox) / f"job-{job_id}" / "result.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"unreadable": f"result.json cannot be read ({type(exc).__name__})"}
    return summarize_result(doc)


def summarize_result(doc: dict) -> dict:
    """What the web app shows of a ``result.json`` document (small: no per-slice lists)."""
    out = {k: doc.get(k) for k in SUMMARY_KEYS if doc.get(k) not in (None, [], {})}
    timings = doc.get("timings_s") or {}
    if "total" in timings:
        out["seconds"] = timings["total"]
    out["outputs"] = len(doc.get("outputs") or {})
    if doc.get("study_instance_uid"):
        out["study_instance_uid"] = doc["study_instance_uid"]
    comparison = doc.get("comparison") or {}
    if comparison.get("change"):
        out["prior_change"] = comparison["change"]
        out["prior_interval_days"] = comparison.get("interval_days")
    return out


def result_line(result: dict | None) -> str:
    """One line for the dashboard: "COVID-19-like pneumonia, P 0.93, 212 ml" or the reason."""
    if not result:
        return ""
    if "unreadable" in result:
        return result["unreadable"]
    if result.get("status") != "done":
        return f"{result.get('status', '?')}: {result.get('reason') or ''}".strip()
    parts = [result.get("case_class_text") or result.get("label") or "done"]
    if result.get("probability") is not None:
        parts.append(f"P {result['probability']:.2f}")
    if result.get("lesion_volume_ml") is not None:
        parts.append(f"{result['lesion_volume_ml']:.0f} ml")
    if result.get("prior_change"):
        parts.append(f"{result['prior_change']} vs prior ({result.get('prior_interval_days')} d)")
    return ", ".join(parts)
