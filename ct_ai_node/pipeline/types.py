"""What a pipeline returns: the contract between pipeline stages, the writers and
``result.json``. Pure data, no behaviour beyond derived properties."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

#: label values in ``AnalysisResult.lung_labels``
RIGHT_LUNG = 1
LEFT_LUNG = 2

LABEL_POSITIVE = "COVID-19-like pneumonia"
LABEL_NEGATIVE = "No COVID-19-like pneumonia"

#: the case classes, in this order everywhere (result.json, SR)
CASE_CLASSES = ("covid_like", "other_pneumonia", "no_pneumonia")
CASE_CLASS_TEXT = {"covid_like": "COVID-19-like pneumonia", "other_pneumonia": "Other pneumonia (not COVID-19-like)",
                   "no_pneumonia": "No pneumonia"}


#: the five lobes, in this order everywhere (result.json, SEG, SR, PDF); a lobe's label value
#: in ``AnalysisResult.lobe_labels`` (and the phantom generator's) is its index + 1
LOBES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_lower")
LOBE_TEXT = {"right_upper": "Right upper lobe", "right_middle": "Right middle lobe",
             "right_lower": "Right lower lobe", "left_upper": "Left upper lobe", "left_lower": "Left lower lobe"}


@dataclass(frozen=True)
class LobeInvolvement:
    """The opacity in one lobe and its CT severity score (0-5; ``pipeline.severity``)."""

    name: str  # one of LOBES
    volume_ml: float
    ggo_ml: float
    consolidation_ml: float
    #: (ground glass + consolidation) share of the lobe, %
    involvement_percent: float
    severity: int


@dataclass(frozen=True)
class CategorySuggestion:
    """An AI suggestion of the reporting category, for the radiologist (``pipeline.category``)."""

    co_rads: int  # 1-5 (CO-RADS 6 needs a positive RT-PCR: never suggested)
    rsna: str  # "typical", "indeterminate", "atypical" or "negative"
    #: the features that led to it, in words, most telling first
    features: tuple[str, ...] = ()


#: how a study changed since its prior (``pipeline.comparison``)
CHANGES = ("improved", "stable", "worse")


@dataclass(frozen=True)
class StudyFindings:
    """What a comparison needs of one analysed study: this one or a prior."""

    study_instance_uid: str
    #: StudyDate + StudyTime (midnight without a time); None when the header has no date
    study_datetime: datetime | None
    involvement_percent: float
    lesion_volume_ml: float
    #: 0-25; None when the analysis had no lobes
    ct_severity_score: int | None = None
    case_class: str | None = None
    #: each lobe's 0-5 grade in LOBES order; empty without lobes
    lobe_severities: tuple[int, ...] = ()


@dataclass(frozen=True)
class PriorComparison:
    """This study against the patient's prior study (``pipeline.comparison``)."""

    prior: StudyFindings
    current: StudyFindings
    #: whole days from the prior's study date/time to this one's
    interval_days: int
    change: str  # one of CHANGES
    #: "history" (the node analysed the prior before) or "pacs" (found by a query, retrieved
    #: and analysed for this comparison)
    source: str
    #: why this change, in words ("CT severity score up 12 points")
    reason: str


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identifies the model in every output (SEG AlgorithmIdentification, SC caption, SR)."""

    name: str  # e.g. "ct-ai-node method A (slice ResNet + fused Grad-CAM)"
    version: str  # e.g. "0.1.0+phantom-a1b2c3d4"
    family: str = "Artificial Intelligence"
    #: short provenance shown to the radiologist
    trained_on: str = "synthetic chest-CT phantoms only"
    clinically_validated: bool = False


@dataclass
class AnalysisResult:
    """Everything one analysis found, in the volume's geometry (z, y, x)."""

    algorithm: AlgorithmInfo
    pipeline: str
    probability: float  # 0..1, COVID-19-like pneumonia
    threshold: float
    label: str  # LABEL_POSITIVE or LABEL_NEGATIVE
    slice_scores: np.ndarray  # float32 (z,), 0 for slices without lung
    positive_slice_ratio: float
    positive_slices: list[int]  # z indices
    lung_labels: np.ndarray  # uint8 (z, y, x): 0, RIGHT_LUNG, LEFT_LUNG
    infection_mask: np.ndarray  # bool (z, y, x)
    heatmap: np.ndarray  # float32 (z, y, x) in [0, 1]
    lung_volume_ml: float
    lesion_volume_ml: float
    involvement_percent: float
    corona_score_ml: float
    #: z indices of the slices shown as key images, most important first
    key_slices: list[int] = field(default_factory=list)
    model_versions: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: z indices the classifier ran on; other lung slices' scores are interpolated
    #: (empty: every slice was scored)
    scored_slices: list[int] = field(default_factory=list)
    #: one of CASE_CLASSES; None when the pipeline gave no three-class result
    case_class: str | None = None
    #: keys CASE_CLASSES, sum 1
    class_probabilities: dict[str, float] = field(default_factory=dict)
    #: bool (z, y, x), subset of infection_mask; the rest of infection_mask is ground-glass opacity
    consolidation_mask: np.ndarray | None = None
    ggo_volume_ml: float | None = None
    consolidation_volume_ml: float | None = None
    #: the method's own P(COVID-19-like) when the three-class result replaced it
    method_probability: float | None = None
    #: the method's own slice scores when the opacity scores replaced them (float32 (z,))
    method_slice_scores: np.ndarray | None = None
    #: uint8 (z, y, x): 0 outside the lungs, 1..5 the LOBES; None without a lobe segmentation
    lobe_labels: np.ndarray | None = None
    #: one entry per lobe in LOBES order (empty without lobes)
    lobes: list[LobeInvolvement] = field(default_factory=list)
    #: sum of the lobes' severities, 0-25 (None without lobes)
    ct_severity_score: int | None = None
    category: CategorySuggestion | None = None
    #: against the patient's prior study; None without one (or when not asked for)
    comparison: PriorComparison | None = None

    @property
    def is_positive(self) -> bool:
        return self.label == LABEL_POSITIVE

    @property
    def lung_slices(self) -> list[int]:
        return [int(z) for z in np.flatnonzero(self.lung_labels.reshape(self.lung_labels.shape[0], -1).any(axis=1))]
