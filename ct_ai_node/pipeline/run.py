"""Pipeline stages on one volume: lungs -> classification + localisation ->
infection mask -> scores. Returns an :class:`AnalysisResult` for the writers."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ct_ai_node.errors import InputRejected
from ct_ai_node.pipeline import pattern, scoring, severity
from ct_ai_node.pipeline.category import suggest_category
from ct_ai_node.pipeline.lungs import ClassicalLungSegmenter, UNetLungSegmenter
from ct_ai_node.pipeline.methods import Method
from ct_ai_node.pipeline.types import LABEL_NEGATIVE, LABEL_POSITIVE, AnalysisResult
from ct_ai_node.volume.types import Volume

logger = logging.getLogger(__name__)

LUNG_UNET_WEIGHTS = "lung_unet2d"
#: P(COVID-19-like) from which the three-class result calls a scan COVID-19-like
THREE_CLASS_THRESHOLD = 0.5


@dataclass(frozen=True)
class PipelineSettings:
    #: a series whose segmented lungs are smaller than this is not a chest CT we can read
    min_lung_volume_ml: float = 400.0
    key_images: int = 5
    infection_threshold: float = 0.5
    infection_min_hu: float = -750.0


def create_lung_segmenter(kind: str, device: torch.device | str = "cpu", weights_dir: Path | None = None):
    if kind == "classical":
        return ClassicalLungSegmenter()
    if kind == "unet":
        from ct_ai_node.models.weights import load_model

        loaded = load_model(LUNG_UNET_WEIGHTS, weights_dir, device)
        return UNetLungSegmenter(loaded.module, loaded.version, device)
    raise ValueError(f"unknown lung segmentation {kind!r}; use 'classical' or 'unet'")


@dataclass
class Opacities:
    """What the opacity stage found: the mask inside the lungs, its consolidation part,
    and, when the segmenter carries a case model, the pattern features and the three
    class probabilities (empty otherwise)."""

    mask: np.ndarray  # bool (z, y, x)
    consolidation: np.ndarray  # bool (z, y, x), subset of mask
    features: dict[str, float]
    class_probabilities: dict[str, float]


def segment_opacities(segmenter, hu: np.ndarray, spacing, orientation, lung_labels: np.ndarray) -> Opacities:
    """The opacity U-Net's mask inside the lungs, split at the consolidation level, and the
    case model's probabilities of its pattern (shared by ``analyse_volume``, calibration and
    the benchmark, so that all three measure the same stage)."""
    lung = lung_labels > 0
    mask, _probability = segmenter(hu, spacing, lung_labels)
    mask = np.asarray(mask, bool) & lung
    consolidation = pattern.consolidation_mask(hu, mask)
    features: dict[str, float] = {}
    probabilities: dict[str, float] = {}
    case_model = getattr(segmenter, "case_model", None)
    if case_model is not None:
        features = pattern.pattern_features(hu, spacing, orientation, lung_labels, mask, consolidation)
        probabilities = case_model.probabilities(features)
    return Opacities(mask, consolidation, features, probabilities)


def analyse_volume(volume: Volume, method: Method, lung_segmenter, settings: PipelineSettings | None = None,
                   pipeline_name: str | None = None, infection_segmenter=None, lobe_segmenter=None) -> AnalysisResult:
    """Lungs -> method -> infection mask -> scores. The infection mask comes from the
    method's heat map (thresholded, smoothed, inside the lungs), or, when an
    ``infection_segmenter`` is given, from that network (the SEG's "suspected
    infection" segment, lesion volume and involvement then use it; it is split into
    ground glass and consolidation by HU). When the segmenter carries a case model
    (``case_model``, :mod:`ct_ai_node.pipeline.pattern`), the case result is its
    three-class result and ``probability`` its P(COVID-19-like), and the slice scores
    are the opacity's (:func:`~ct_ai_node.pipeline.pattern.slice_opacity_scores`); the
    method's own probability and slice scores stay in ``method_probability`` and
    ``method_slice_scores``, and its heat map explains. With a ``lobe_segmenter`` the result
    also has the lobes, each lobe's involvement and CT severity score (``pipeline.severity``);
    the category suggestion (``pipeline.category``) is there either way."""
    s = settings or PipelineSettings()
    timings: dict[str, float] = {}
    warnings = list(volume.warnings)

    t = time.perf_counter()
    labels = lung_segmenter(volume.hu, volume.spacing, volume.orientation)
    timings["lungs"] = round(time.perf_counter() - t, 3)
    lung = labels > 0
    lung_ml = scoring.volume_ml(lung, volume.spacing)
    if lung_ml < s.min_lung_volume_ml:
        raise InputRejected(f"no lungs found: segmented lung volume {lung_ml:.0f} ml < {s.min_lung_volume_ml:.0f} ml "
                            "(is this a chest CT?)")
    zs = np.flatnonzero(lung.reshape(lung.shape[0], -1).any(axis=1))
    if zs[0] == 0 or zs[-1] == lung.shape[0] - 1:
        warnings.append("the lungs reach the first or last slice: the scan may not cover the whole chest")

    lobe_labels = None
    if lobe_segmenter is not None:
        t = time.perf_counter()
        lobe_labels = lobe_segmenter(volume.hu, volume.spacing, volume.orientation, labels)
        timings["lobes"] = round(time.perf_counter() - t, 3)

    out = method(volume.hu, volume.spacing, volume.orientation, labels)
    timings.update(out.timings_s)

    t = time.perf_counter()
    consolidation = None
    class_probabilities: dict[str, float] = {}
    features: dict[str, float] = {}
    if infection_segmenter is not None:
        found = segment_opacities(infection_segmenter, volume.hu, volume.spacing, volume.orientation, labels)
        infection, consolidation, class_probabilities = found.mask, found.consolidation, found.class_probabilities
        features = found.features
    else:
        heat_pos = np.zeros_like(out.heatmap)
        heat_pos[out.positive_slices] = out.heatmap[out.positive_slices]
        infection = scoring.infection_mask_from_heatmap(
            heat_pos, lung, volume.hu, volume.spacing,
            threshold=out.infection_threshold if out.infection_threshold is not None else s.infection_threshold,
            min_hu=s.infection_min_hu,
        )
    lesion_ml = scoring.volume_ml(infection, volume.spacing)
    probability, threshold = float(out.probability), float(out.threshold)
    slice_scores, positive_slices, ratio = out.slice_scores, np.asarray(out.positive_slices, int), out.positive_slice_ratio
    scored_slices = [] if out.scored_slices is None else [int(z) for z in out.scored_slices]
    case_class = None
    if class_probabilities:
        # the three-class result decides: COVID-19-like when its probability reaches one
        # half, otherwise the likelier of the other two classes
        probability, threshold = class_probabilities["covid_like"], THREE_CLASS_THRESHOLD
        case_class = "covid_like" if probability >= threshold else max(
            ("other_pneumonia", "no_pneumonia"), key=lambda c: class_probabilities[c])
        # slices are scored by the opacity the SEG shows (every slice, none interpolated);
        # the method's own scores stay beside them
        slice_scores = pattern.slice_opacity_scores(infection, lung, volume.spacing)
        positive_slices = zs[slice_scores[zs] >= 0.5]
        ratio = positive_slices.size / max(zs.size, 1)
        scored_slices = []
    positive = probability >= threshold
    corona = scoring.corona_score_ml(out.heatmap, positive_slices, volume.spacing)
    candidates = positive_slices if len(positive_slices) else zs
    key = scoring.top_slices(slice_scores, candidates, s.key_images)
    timings["infection_and_scores"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    lobes = severity.lobe_involvement(lobe_labels, infection, consolidation, volume.spacing) \
        if lobe_labels is not None else []
    if not features:  # the pattern of the opacities, for the category suggestion
        features = pattern.pattern_features(volume.hu, volume.spacing, volume.orientation, labels, infection,
                                            consolidation)
    involvement = scoring.involvement_percent(lesion_ml, lung_ml)
    category = suggest_category(case_class, class_probabilities, features, lesion_ml, involvement, lobes or None)
    timings["lobes_and_category"] = round(time.perf_counter() - t, 3)

    model_versions = dict(out.model_versions)
    model_versions["lungs"] = f"{getattr(lung_segmenter, 'name', 'lungs')}/{getattr(lung_segmenter, 'version', '1')}"
    if infection_segmenter is not None:
        model_versions["infection"] = f"{getattr(infection_segmenter, 'name', 'infection')}/" \
                                      f"{getattr(infection_segmenter, 'version', '1')}"
    if lobe_segmenter is not None:
        model_versions["lobes"] = f"{getattr(lobe_segmenter, 'name', 'lobes')}/{getattr(lobe_segmenter, 'version', '1')}"
    algorithm = out.algorithm
    if case_class is not None:  # the case result is the opacity model's: say what it learnt from
        algorithm = dataclasses.replace(algorithm,
                                        trained_on=getattr(infection_segmenter, "trained_on", algorithm.trained_on))
    return AnalysisResult(
        algorithm=algorithm,
        pipeline=pipeline_name or getattr(method, "name", "unknown"),
        probability=probability,
        threshold=threshold,
        label=LABEL_POSITIVE if positive else LABEL_NEGATIVE,
        slice_scores=slice_scores,
        positive_slice_ratio=float(ratio),
        positive_slices=[int(z) for z in positive_slices],
        lung_labels=labels,
        infection_mask=infection,
        heatmap=out.heatmap,
        lung_volume_ml=lung_ml,
        lesion_volume_ml=lesion_ml,
        involvement_percent=involvement,
        corona_score_ml=corona,
        key_slices=key,
        model_versions=model_versions,
        timings_s=timings,
        warnings=warnings,
        scored_slices=scored_slices,
        case_class=case_class,
        class_probabilities={k: round(float(v), 6) for k, v in class_probabilities.items()},
        consolidation_mask=consolidation,
        ggo_volume_ml=None if consolidation is None else scoring.volume_ml(infection & ~consolidation, volume.spacing),
        consolidation_volume_ml=None if consolidation is None else scoring.volume_ml(consolidation, volume.spacing),
        method_probability=float(out.probability),
        method_slice_scores=out.slice_scores if case_class is not None else None,
        lobe_labels=lobe_labels,
        lobes=lobes,
        ct_severity_score=severity.ct_severity_score(lobes) if lobes else None,
        category=category,
    )
