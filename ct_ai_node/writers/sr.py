"""TID 1500 Measurement Report (Comprehensive 3D SR) of one analysis.

Content, under an observer context that names the algorithm as the device:

- one volumetric ROI group (TID 1411) per lung, referencing its SEG segment, with the
  lung's volume;
- one volumetric ROI group for the suspected infection (SEG segment), with its volume
  and the percentage of lung involved;
- when the analysis splits the infection, one group each for the ground-glass opacity
  and the consolidation, with volume and percentage of lung: volumetric ROI groups
  referencing their SEG segments, or plain measurement groups when the part is empty
  (0 ml, no segment);
- one measurement group (TID 1501) with the total lung volume;
- one measurement group for the classification: probability of COVID-19-like
  pneumonia, the decision threshold, COVID-19 present/absent, the Corona score and the
  positive slice ratio; with a three-class result also the case class (a coded
  "AI case class" evaluation), Pneumonia present/absent and one probability per class;
- one planar ROI group (TID 1410) with a closed SCOORD POLYLINE (first point == last) on the source CT: the outline
  of the largest infection region on the top key slice (or of the right lung when there
  is no infection), with its area; with a three-class result its tracking identifier
  ends with the case class, which is also a coded evaluation in the group.

OHIF v3 (3.13) cannot open this report: its SR loader expects every measurement group
to carry geometry and throws on the volumetric and classification groups. So a second,
*display* SR (:func:`build_display_sr`, TID 1500 too) holds only the planar group, with
the same tracking UID: viewers draw it on the CT image, while the full report stays the
one with the SEG-referencing findings.

Codes come from pydicom's code dictionary or SNOMED CT (Pneumonia, COVID-19, Lung
consolidation); concepts no public terminology has (Corona score, positive slice ratio,
percentage of lung involved, decision threshold, the case class and its values -- a
"COVID-19-like" pattern is not a COVID-19 diagnosis -- and the per-class probabilities)
use the local scheme ``99CTAI``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import CASE_CLASS_TEXT, LEFT_LUNG, LOBE_TEXT, RIGHT_LUNG, AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers import common, seg as seg_writer
from ct_ai_node.writers.contour import largest_component, outline, polygon_area

logger = logging.getLogger(__name__)

CodedConcept = hd.sr.CodedConcept

# --- codes ---------------------------------------------------------------------------
#: SCT 840539006, "Disease caused by severe acute respiratory syndrome coronavirus 2";
#: "COVID-19" is its SNOMED CT synonym (the full name exceeds the 64 characters of
#: (0008,0104) Code Meaning)
COVID_19 = CodedConcept("840539006", "SCT", "COVID-19")
#: LOINC 24627-2 "CT Chest" (procedure reported)
CT_CHEST = CodedConcept("24627-2", "LN", "CT Chest")
PROBABILITY = codes.DCM.Probability  # DCM 122157
VOLUME = codes.SCT.Volume  # SCT 118565006
AREA = codes.SCT.Area  # SCT 42798000
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
CORONA_SCORE = CodedConcept("CORONA-SCORE", common.LOCAL_SCHEME, "Corona score")
POSITIVE_SLICE_RATIO = CodedConcept("POS-SLICE-RATIO", common.LOCAL_SCHEME, "Positive slice ratio")
LUNG_INVOLVEMENT = CodedConcept("LUNG-INVOLVED", common.LOCAL_SCHEME, "Percentage of lung volume involved")
DECISION_THRESHOLD = CodedConcept("DECISION-THRESH", common.LOCAL_SCHEME, "AI decision threshold")
#: SCT 233604007 "Pneumonia" (disorder): present for both pneumonia classes
PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
#: the three-class result: concept name and one value per class (CASE_CLASSES)
CASE_CLASS = CodedConcept("CASE-CLASS", common.LOCAL_SCHEME, "AI case class")
CASE_CLASS_CODES = {
    "covid_like": CodedConcept("COVID-LIKE-PNEU", common.LOCAL_SCHEME, CASE_CLASS_TEXT["covid_like"]),
    "other_pneumonia": CodedConcept("OTHER-PNEU", common.LOCAL_SCHEME, CASE_CLASS_TEXT["other_pneumonia"]),
    "no_pneumonia": CodedConcept("NO-PNEU", common.LOCAL_SCHEME, CASE_CLASS_TEXT["no_pneumonia"]),
}
#: the probability of each class (``probability``, DCM 122157, stays P(COVID-19-like))
CLASS_PROBABILITY_CODES = {
    "covid_like": CodedConcept("P-COVID-LIKE", common.LOCAL_SCHEME, "Probability of COVID-19-like pneumonia"),
    "other_pneumonia": CodedConcept("P-OTHER-PNEU", common.LOCAL_SCHEME,
                                    "Probability of other pneumonia (not COVID-19-like)"),
    "no_pneumonia": CodedConcept("P-NO-PNEU", common.LOCAL_SCHEME, "Probability of no pneumonia"),
}

#: (0008,0110) Coding Scheme Identification of the local scheme
LOCAL_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=common.LOCAL_SCHEME,
    name="ct-ai-node local codes",
    responsible_organization=common.MANUFACTURER,
)

ML = CodedConcept("ml", "UCUM", "milliliter")
MM2 = codes.UCUM.SquareMillimeter
PERCENT = codes.UCUM.Percent
RATIO = codes.UCUM.Ratio
PROBABILITY_UNIT = CodedConcept("{probability}", "UCUM", "probability")
SCORE_UNIT = CodedConcept("{score}", "UCUM", "score")

#: issue 16: the lobes and the radiologists' scores (docs/reporting.md)
LOBE_INVOLVEMENT = CodedConcept("LOBE-INVOLVED", common.LOCAL_SCHEME, "Percentage of lobe volume involved")
OPACITY_VOLUME = CodedConcept("OPACITY-VOL", common.LOCAL_SCHEME, "Volume of opacity in lobe")
GGO_VOLUME = CodedConcept("GGO-VOL", common.LOCAL_SCHEME, "Volume of ground-glass opacity in lobe")
CONSOLIDATION_VOLUME = CodedConcept("CONS-VOL", common.LOCAL_SCHEME, "Volume of consolidation in lobe")
LOBE_SEVERITY = CodedConcept("LOBE-SEVERITY", common.LOCAL_SCHEME, "CT severity score of lobe (0-5)")
CT_SEVERITY = CodedConcept("CT-SEVERITY", common.LOCAL_SCHEME, "CT severity score (0-25)")
CO_RADS = CodedConcept("CO-RADS-AI", common.LOCAL_SCHEME, "CO-RADS category suggested by AI")
RSNA_CATEGORY = CodedConcept("RSNA-CAT-AI", common.LOCAL_SCHEME, "RSNA category suggested by AI")
#: the comparison with the prior study (pipeline/comparison.py; local codes: docs/reporting.md)
PRIOR_CHANGE = CodedConcept("PRIOR-CHANGE", common.LOCAL_SCHEME, "Change since prior study")
PRIOR_CHANGE_CODES = {c: CodedConcept(f"PRIOR-{c.upper()}", common.LOCAL_SCHEME, c.capitalize())
                      for c in ("improved", "stable", "worse")}
PRIOR_INTERVAL = CodedConcept("PRIOR-INTERVAL", common.LOCAL_SCHEME, "Interval since prior study")
PRIOR_CT_SEVERITY = CodedConcept("PRIOR-SEVERITY", common.LOCAL_SCHEME, "CT severity score of prior study (0-25)")
PRIOR_INVOLVEMENT = CodedConcept("PRIOR-INVOLVED", common.LOCAL_SCHEME,
                                 "Percentage of lung volume involved in prior study")
DAYS = CodedConcept("d", "UCUM", "day")
#: code values stay within the 16 characters of (0008,0100) Code Value
RSNA_CODES = {"typical": "RSNA-TYPICAL", "indeterminate": "RSNA-INDETERM", "atypical": "RSNA-ATYPICAL",
              "negative": "RSNA-NEGATIVE"}



@dataclass(frozen=True)
class DrawnRegion:
    """The planar region put into the SR: where and what."""

    z: int
    points: np.ndarray  # (n, 2) (column, row), closed
    area_mm2: float
    is_infection: bool
    laterality: object | None  # codes.SCT.Right / Left / None


def _laterality_of(labels_2d: np.ndarray, region: np.ndarray):
    inside = labels_2d[region]
    right, left = int((inside == RIGHT_LUNG).sum()), int((inside == LEFT_LUNG).sum())
    if right == left == 0:
        return None
    return codes.SCT.Right if right >= left else codes.SCT.Left


def choose_region(volume: Volume, result: AnalysisResult) -> DrawnRegion:
    """The region to draw: the largest infection region on the top key slice that has
    infection (else on the slice with most infection); without infection, the right
    lung (else the left lung) on the top key slice or its largest slice."""
    infection = np.asarray(result.infection_mask, dtype=bool)
    labels = np.asarray(result.lung_labels)
    is_infection = bool(infection.any())
    if is_infection:
        target = infection
    elif (labels == RIGHT_LUNG).any():
        target = labels == RIGHT_LUNG
    elif (labels == LEFT_LUNG).any():
        target = labels == LEFT_LUNG
    else:
        raise OutputError("SR: neither infection nor lungs found; no region to draw")
    area_per_slice = target.reshape(target.shape[0], -1).sum(axis=1)
    keys = [int(z) for z in result.key_slices if 0 <= int(z) < len(area_per_slice)]
    with_target = [z for z in keys if area_per_slice[z] > 0]
    z = with_target[0] if with_target else int(np.argmax(area_per_slice))
    region = largest_component(target[z])
    points = outline(region)
    _, dy, dx = volume.spacing
    area_mm2 = polygon_area(points) * dy * dx
    return DrawnRegion(z, points, float(area_mm2), is_infection, _laterality_of(labels[z], region))


def _device_context(result: AnalysisResult) -> hd.sr.ObserverContext:
    algo = result.algorithm
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # the same algorithm version is the same device, run after run
            uid=generate_uid(entropy_srcs=[common.MANUFACTURER, algo.name, algo.version]),
            name=common.lo(algo.name),
            manufacturer_name=common.MANUFACTURER,
            model_name=common.lo(f"{common.method_label(result.pipeline)} {algo.version}"),
        ),
    )


def _algorithm_id(result: AnalysisResult) -> hd.sr.AlgorithmIdentification:
    algo = result.algorithm
    return hd.sr.AlgorithmIdentification(
        name=common.lo(algo.name),
        version=common.lo(algo.version),
        family=common.algorithm_family_code(algo),
        manufacturer=common.MANUFACTURER,
    )


def _tracking(text: str, uids: common.ResultUids) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=uids.uid("sr", "tracking", text), identifier=text)


def _measurement(name, value: float, unit, algorithm_id=None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm_id)


def _segment_ref(seg: Dataset, number: int, volume: Volume) -> hd.sr.ReferencedSegment:
    """Segment ``number`` of ``seg``, derived from the source series.

    The source is named as a series (TID 1411 allows either), not image by image as
    ``ReferencedSegment.from_segmentation`` does: 250 image items per lung would
    triple the SR and its build time.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
    )


def _segment_groups(
    volume: Volume,
    result: AnalysisResult,
    seg: Dataset,
    algorithm_id: hd.sr.AlgorithmIdentification,
    uids: common.ResultUids,
) -> list:
    groups = []
    labels = np.asarray(result.lung_labels)
    voxel_ml = volume.voxel_volume_ml
    for spec, value, laterality in (
        (seg_writer.RIGHT_LUNG_SEGMENT, RIGHT_LUNG, codes.SCT.Right),
        (seg_writer.LEFT_LUNG_SEGMENT, LEFT_LUNG, codes.SCT.Left),
    ):
        number = seg_writer.segment_number(seg, spec.key)
        if number is None:
            continue
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(f"{spec.label} (AI segmentation)", uids),
                referenced_segment=_segment_ref(seg, number, volume),
                finding_type=seg_writer.LUNG,
                finding_category=seg_writer.ANATOMICAL_STRUCTURE,
                finding_sites=[hd.sr.FindingSite(seg_writer.LUNG, laterality=laterality)],
                algorithm_id=algorithm_id,
                measurements=[_measurement(VOLUME, np.count_nonzero(labels == value) * voxel_ml, ML)],
            )
        )
    number = seg_writer.segment_number(seg, seg_writer.INFECTION_SEGMENT.key)
    if number is not None:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking("Suspected infection (AI segmentation)", uids),
                referenced_segment=_segment_ref(seg, number, volume),
                finding_type=seg_writer.INFLAMMATION,
                finding_category=seg_writer.MORPHOLOGICALLY_ABNORMAL,
                finding_sites=[hd.sr.FindingSite(seg_writer.LUNG)],
                algorithm_id=algorithm_id,
                measurements=[
                    _measurement(VOLUME, result.lesion_volume_ml, ML),
                    _measurement(LUNG_INVOLVEMENT, result.involvement_percent, PERCENT),
                ],
            )
        )
    return groups


def _opacity_groups(
    volume: Volume,
    result: AnalysisResult,
    seg: Dataset,
    algorithm_id: hd.sr.AlgorithmIdentification,
    uids: common.ResultUids,
) -> list:
    """Ground-glass opacity and consolidation, when the analysis split the infection:
    volumetric ROI groups on their SEG segments, or plain measurement groups (same
    tracking identifier) for a part without a segment (empty, or no mask given)."""
    volumes = common.opacity_volumes_ml(result, volume.voxel_volume_ml)
    groups = []
    for spec, value in zip((seg_writer.GGO_SEGMENT, seg_writer.CONSOLIDATION_SEGMENT), volumes):
        if value is None:
            continue
        measurements = [_measurement(VOLUME, value, ML)]
        if result.lung_volume_ml > 0:
            measurements.append(_measurement(LUNG_INVOLVEMENT, 100.0 * value / result.lung_volume_ml, PERCENT))
        common_args = dict(
            tracking_identifier=_tracking(f"{spec.label} (AI segmentation)", uids),
            finding_type=spec.type,
            finding_category=spec.category,
            finding_sites=[hd.sr.FindingSite(seg_writer.LUNG)],
            algorithm_id=algorithm_id,
            measurements=measurements,
        )
        number = seg_writer.segment_number(seg, spec.key)
        if number is not None:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=_segment_ref(seg, number, volume), **common_args))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common_args))
    return groups


def _lobe_groups(
    volume: Volume,
    result: AnalysisResult,
    lobe_seg: Dataset | None,
    algorithm_id: hd.sr.AlgorithmIdentification,
    uids: common.ResultUids,
) -> list:
    """One group per lobe (finding site: the lobe's SNOMED CT code): its volume, the opacity in
    it (ground glass, consolidation), its involvement and its CT severity score; volumetric on
    the lobe SEG's segment when there is one."""
    groups = []
    for lobe in result.lobes:
        code = seg_writer.LOBE_CODES[lobe.name]
        args = dict(
            tracking_identifier=_tracking(f"{LOBE_TEXT[lobe.name]} (AI segmentation)", uids),
            finding_type=code,
            finding_category=seg_writer.ANATOMICAL_STRUCTURE,
            finding_sites=[hd.sr.FindingSite(code)],
            algorithm_id=algorithm_id,
            measurements=[
                _measurement(VOLUME, lobe.volume_ml, ML),
                _measurement(OPACITY_VOLUME, lobe.ggo_ml + lobe.consolidation_ml, ML),
                _measurement(GGO_VOLUME, lobe.ggo_ml, ML),
                _measurement(CONSOLIDATION_VOLUME, lobe.consolidation_ml, ML),
                _measurement(LOBE_INVOLVEMENT, lobe.involvement_percent, PERCENT),
                _measurement(LOBE_SEVERITY, lobe.severity, SCORE_UNIT),
            ],
        )
        number = seg_writer.lobe_segment_number(lobe_seg, lobe.name) if lobe_seg is not None else None
        if number is not None:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=_segment_ref(lobe_seg, number, volume), **args))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**args))
    return groups


def _comparison_groups(result: AnalysisResult, algorithm_id, uids: common.ResultUids) -> list:
    """The comparison with the prior study: the change (coded), the interval, the CT severity
    score and the involvement then and now; its tracking identifier (the text viewers list)
    says it in words. Empty without a prior."""
    c = result.comparison
    if c is None:
        return []
    from ct_ai_node.pipeline.comparison import prior_date

    measurements = [_measurement(PRIOR_INTERVAL, c.interval_days, DAYS)]
    if c.prior.ct_severity_score is not None and c.current.ct_severity_score is not None:
        measurements += [_measurement(PRIOR_CT_SEVERITY, c.prior.ct_severity_score, SCORE_UNIT),
                         _measurement(CT_SEVERITY, c.current.ct_severity_score, SCORE_UNIT)]
    measurements += [_measurement(PRIOR_INVOLVEMENT, c.prior.involvement_percent, PERCENT),
                     _measurement(LUNG_INVOLVEMENT, c.current.involvement_percent, PERCENT)]
    return [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"AI comparison with prior study of {prior_date(c)} "
                                      f"({c.interval_days} days earlier): {c.change}", uids),
        finding_type=COVID_19,
        finding_sites=[hd.sr.FindingSite(seg_writer.LUNG)],
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PRIOR_CHANGE, PRIOR_CHANGE_CODES[c.change])],
    )]


def _category_evaluations(result: AnalysisResult) -> list[hd.sr.QualitativeEvaluation]:
    """The suggested CO-RADS and RSNA categories (AI suggestions); empty without one."""
    cat = result.category
    if cat is None:
        return []
    return [
        hd.sr.QualitativeEvaluation(CO_RADS, CodedConcept(f"CO-RADS-{cat.co_rads}", common.LOCAL_SCHEME,
                                                          f"CO-RADS {cat.co_rads} (AI suggestion)")),
        hd.sr.QualitativeEvaluation(RSNA_CATEGORY, CodedConcept(RSNA_CODES[cat.rsna], common.LOCAL_SCHEME,
                                                                f"RSNA {cat.rsna} (AI suggestion)")),
    ]


def _class_evaluations(result: AnalysisResult) -> list[hd.sr.QualitativeEvaluation]:
    """The coded case class; empty without a three-class result."""
    if common.case_class_text(result) is None:
        return []
    return [hd.sr.QualitativeEvaluation(CASE_CLASS, CASE_CLASS_CODES[result.case_class])]


def _summary_groups(result: AnalysisResult, algorithm_id, uids: common.ResultUids) -> list:
    lungs = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("Both lungs (AI segmentation)", uids),
        finding_type=seg_writer.LUNG,
        finding_category=seg_writer.ANATOMICAL_STRUCTURE,
        finding_sites=[hd.sr.FindingSite(seg_writer.LUNG)],
        algorithm_id=algorithm_id,
        measurements=[_measurement(VOLUME, result.lung_volume_ml, ML)],
    )
    class_text = common.case_class_text(result)
    if class_text is None:
        title = f"AI classification: {result.label} (p={result.probability:.2f})"
    else:
        title = f"AI classification: {class_text} (P(COVID-19-like)={result.probability:.2f})"
    measurements = [
        _measurement(PROBABILITY, result.probability, PROBABILITY_UNIT),
        _measurement(DECISION_THRESHOLD, result.threshold, PROBABILITY_UNIT),
        _measurement(CORONA_SCORE, result.corona_score_ml, ML),
        _measurement(POSITIVE_SLICE_RATIO, result.positive_slice_ratio, RATIO),
    ]
    measurements += [
        _measurement(CLASS_PROBABILITY_CODES[name], value, PROBABILITY_UNIT)
        for name, value in common.class_probabilities(result).items()
    ]
    if result.ct_severity_score is not None:
        measurements.append(_measurement(CT_SEVERITY, result.ct_severity_score, SCORE_UNIT))
    evaluations = [hd.sr.QualitativeEvaluation(COVID_19, PRESENT if result.is_positive else ABSENT)]
    if class_text is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(PNEUMONIA, ABSENT if result.case_class == "no_pneumonia" else PRESENT))
        evaluations += _class_evaluations(result)
    evaluations += _category_evaluations(result)
    classification = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(title, uids),
        finding_type=COVID_19,
        finding_sites=[hd.sr.FindingSite(seg_writer.LUNG)],
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    return [lungs, classification]


def _planar_group(
    volume: Volume, result: AnalysisResult, region: DrawnRegion, algorithm_id, uids: common.ResultUids
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    ref = common.source_ref(volume, region.z)
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=ref.sop_class_uid,
        referenced_sop_instance_uid=ref.sop_instance_uid,
        referenced_frame_numbers=[ref.frame_number] if ref.frame_number is not None else None,
    )
    where = f"slice {region.z + 1}/{volume.shape[0]}"
    number = volume.slices[region.z].instance_number
    if number is not None and ref.frame_number is None:  # what viewers show as the image number
        where += f", instance {number}"
    if region.is_infection:
        text = f"Largest suspected infection region on key slice ({where})"
        finding_type, category = seg_writer.INFLAMMATION, seg_writer.MORPHOLOGICALLY_ABNORMAL
    else:
        side = "right" if region.laterality == codes.SCT.Right else "left"
        text = f"No infection found: outline of the {side} lung ({where})"
        finding_type, category = seg_writer.LUNG, seg_writer.ANATOMICAL_STRUCTURE
    class_text = common.case_class_text(result)
    if class_text is not None:  # the display SR's only text: viewers show the class with the region
        text += f"; AI case class: {class_text}"
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(text, uids),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: first == last (PS3.3 C.18.6.1.2)
            graphic_data=region.points,
            source_image=source,
        ),
        finding_type=finding_type,
        finding_category=category,
        finding_sites=[hd.sr.FindingSite(seg_writer.LUNG, laterality=region.laterality)],
        algorithm_id=algorithm_id,
        measurements=[_measurement(AREA, region.area_mm2, MM2)],
        qualitative_evaluations=_class_evaluations(result) or None,
    )


def _library_images(volume: Volume, region: DrawnRegion) -> list[Dataset] | None:
    """TID 1600 image library: the image the drawn region lies on.

    Only the referenced image, not the whole series: each entry adds about 20 content
    items, and 300 of them make building the SR take seconds. A multi-frame source gets
    no library: highdicom's entry descriptors (TID 1604) need single-frame geometry
    attributes, and the instance is listed as evidence anyway.
    """
    if volume.is_multiframe:
        return None
    return [volume.dataset_for(region.z)]


def build_sr(
    volume: Volume,
    result: AnalysisResult,
    seg_dataset: Dataset,
    key_images: Sequence[Dataset] = (),
    series_number: int = 904,
    *,
    institution_name: str | None = None,
    image_library: bool = True,
    uids: common.ResultUids | None = None,
    lobe_seg: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report.

    Parameters
    ----------
    volume, result
        The source series and the analysis.
    seg_dataset
        The SEG built by :func:`ct_ai_node.writers.seg.build_seg` for this result;
        volumetric groups reference its segments.
    key_images
        Key-image (or heat-map) instances to list as evidence, optional.
    series_number
        (0020,0011) Series Number of the new SR series.
    institution_name
        (0008,0080) Institution Name, optional.
    image_library
        Add the image the drawn region lies on to the TID 1600 image library
        (single-frame sources only).
    uids
        Where the series, instance and tracking UIDs come from; by default derived from
        the source series and the model (:class:`common.ResultUids`, revision 1).
    lobe_seg
        The lobe SEG (:func:`ct_ai_node.writers.seg.build_lobe_seg`) when the analysis has
        lobes: the per-lobe groups reference its segments (plain groups without it).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        COMPLETE, PRELIMINARY and UNVERIFIED (a machine report nobody signed). The
        source images, the SEG and ``key_images`` are its evidence ((0040,A375)
        Current Requested Procedure Evidence Sequence).
    """
    common.check_result_matches(volume, result)
    if seg_dataset is None or getattr(seg_dataset, "Modality", None) != "SEG":
        raise ValueError("seg_dataset must be the SEG dataset built for this result")
    if seg_dataset.StudyInstanceUID != volume.study_instance_uid:
        raise ValueError(
            "seg_dataset belongs to another study "
            f"({seg_dataset.StudyInstanceUID} != {volume.study_instance_uid})"
        )
    uids = uids or common.ResultUids.for_analysis(volume, result)
    with common.building("SR"):
        algorithm_id = _algorithm_id(result)
        region = choose_region(volume, result)
        groups = [
            *_segment_groups(volume, result, seg_dataset, algorithm_id, uids),
            *_opacity_groups(volume, result, seg_dataset, algorithm_id, uids),
            *_lobe_groups(volume, result, lobe_seg, algorithm_id, uids),
            *_summary_groups(result, algorithm_id, uids),
            *_comparison_groups(result, algorithm_id, uids),
            _planar_group(volume, result, region, algorithm_id, uids),
        ]
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=_device_context(result)),
            procedure_reported=CT_CHEST,
            imaging_measurements=groups,
            referenced_images=_library_images(volume, region) if image_library else None,
        )
        evidence = [*volume.datasets, seg_dataset, *([lobe_seg] if lobe_seg is not None else []), *key_images]
        sr = _report_object(report, evidence, "sr", series_number,
                            common.series_description("AI report", result, uids.revision), uids, institution_name)
        if uids.predecessor is not None:  # a later revision names the report it replaces
            sr.PredecessorDocumentsSequence = [uids.predecessor.as_predecessor_item()]
    return sr


def _report_object(report: hd.sr.MeasurementReport, evidence: list[Dataset], role: str, series_number: int,
                   description: str, uids: common.ResultUids, institution_name: str | None) -> hd.sr.Comprehensive3DSR:
    """The SR instance around ``report``; its series and instance UIDs are ``uids.uid(role, ...)``."""
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids.uid(role, "series"),
        series_number=series_number,
        sop_instance_uid=uids.uid(role, "instance"),
        instance_number=1,
        manufacturer=common.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=description,
        manufacturer_model_name=common.MODEL_NAME,
        software_versions=common.SOFTWARE_VERSION,
        coding_schemes=[LOCAL_CODING_SCHEME],
        **common.content_date_time(),
    )


def build_display_sr(
    volume: Volume,
    result: AnalysisResult,
    series_number: int = common.SeriesNumbers().display_sr,
    *,
    institution_name: str | None = None,
    image_library: bool = True,
    uids: common.ResultUids | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the display SR: a TID 1500 report with only the planar region (TID 1410).

    Image viewers that draw SR measurements (OHIF v3) need every measurement group to
    carry geometry on a loaded image; this report is the full report's drawable part:
    the same planar group (same tracking UID, so the same finding), its area, on the
    source CT image it was drawn on, and with a three-class result the case class (in
    its tracking identifier, the text viewers show, and coded). The full report
    (:func:`build_sr`) keeps the volumes, the SEG references and the classification.

    Parameters are those of :func:`build_sr`; series and instance UIDs come from
    ``uids.uid("sr_display", ...)``.
    """
    common.check_result_matches(volume, result)
    uids = uids or common.ResultUids.for_analysis(volume, result)
    with common.building("display SR"):
        region = choose_region(volume, result)
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=_device_context(result)),
            procedure_reported=CT_CHEST,
            imaging_measurements=[_planar_group(volume, result, region, _algorithm_id(result), uids)],
            referenced_images=_library_images(volume, region) if image_library else None,
        )
        return _report_object(report, list(volume.datasets), "sr_display", series_number,
                              common.series_description("AI finding on image", result, uids.revision),
                              uids, institution_name)
