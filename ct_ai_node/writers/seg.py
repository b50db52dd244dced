"""DICOM Segmentation (SEG) of the lungs and the suspected infection.

BINARY segmentation, one segment per non-empty structure (an empty segment hangs
OHIF's loader), SNOMED CT / DICOM codes, the algorithm identified in every segment, and
frames that reference the exact source slice (SOP instance, and frame number for a
multi-frame source).

When the analysis splits the infection (``AnalysisResult.consolidation_mask``), two
more segments follow "Suspected infection": "Ground-glass opacity" and
"Consolidation", which together cover it exactly. Segments overlap (each infection
voxel is also a lung voxel): a BINARY SEG stores each segment in its own frames, so
overlap is allowed; the union segment is kept for viewers and reports that read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from ct_ai_node.errors import OutputError
from ct_ai_node.pipeline.types import LEFT_LUNG, LOBE_TEXT, LOBES, RIGHT_LUNG, AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers import common

logger = logging.getLogger(__name__)

#: Weasis refuses SEG objects with more frames than this
WEASIS_MAX_FRAMES = 400

# (0062,0003) Segmented Property Category / (0062,000F) Type and its modifier, from
# CID 7150, CID 7151/7159 and CID 244 (pydicom.sr.codedict; no code invented here)
ANATOMICAL_STRUCTURE = codes.cid7150.AnatomicalStructure  # SCT 91723000
MORPHOLOGICALLY_ABNORMAL = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
LUNG = codes.SCT.Lung  # SCT 39607008
RIGHT = codes.SCT.Right  # SCT 24028007
LEFT = codes.SCT.Left  # SCT 7771000
#: SCT 409774005 "Inflammation" (morphologic abnormality, CID 7159): the closest
#: SNOMED CT morphology to "suspected infection" (pneumonic opacity) in CID 7151/7159
INFLAMMATION = codes.cid7159.Inflammation
#: DCM 112120 "Ground glass opacity" (CID 6102/6104, chest findings)
GROUND_GLASS_OPACITY = codes.DCM.GroundGlassOpacity
#: SCT 95436008 "Lung consolidation": no DICOM context group or pydicom code has it
CONSOLIDATION = hd.sr.CodedConcept("95436008", "SCT", "Lung consolidation")


@dataclass(frozen=True)
class SegmentSpec:
    """One possible segment; ``key`` names it across SEG and SR."""

    key: str
    label: str
    category: object
    type: object
    modifier: object | None
    rgb: tuple[int, int, int]


RIGHT_LUNG_SEGMENT = SegmentSpec("right_lung", "Right lung", ANATOMICAL_STRUCTURE, LUNG, RIGHT, (64, 160, 255))
LEFT_LUNG_SEGMENT = SegmentSpec("left_lung", "Left lung", ANATOMICAL_STRUCTURE, LUNG, LEFT, (64, 220, 120))
INFECTION_SEGMENT = SegmentSpec(
    "infection", "Suspected infection", MORPHOLOGICALLY_ABNORMAL, INFLAMMATION, None, (255, 64, 32)
)
#: the part of the suspected infection that is not consolidation
GGO_SEGMENT = SegmentSpec(
    "ggo", "Ground-glass opacity", MORPHOLOGICALLY_ABNORMAL, GROUND_GLASS_OPACITY, None, (255, 210, 0)
)
CONSOLIDATION_SEGMENT = SegmentSpec(
    "consolidation", "Consolidation", MORPHOLOGICALLY_ABNORMAL, CONSOLIDATION, None, (180, 40, 255)
)
SEGMENT_SPECS = (RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT, INFECTION_SEGMENT, GGO_SEGMENT, CONSOLIDATION_SEGMENT)

#: the lobes' SNOMED CT body structures (pydicom has two; the others are the SNOMED CT
#: concepts "Structure of upper/lower lobe of right/left lung"), in LOBES order
LOBE_CODES = {
    "right_upper": hd.sr.CodedConcept("42400003", "SCT", "Upper lobe of right lung"),
    "right_middle": hd.sr.CodedConcept("72481006", "SCT", "Middle lobe of right lung"),
    "right_lower": hd.sr.CodedConcept("266005", "SCT", "Lower lobe of right lung"),
    "left_upper": hd.sr.CodedConcept("44714003", "SCT", "Upper lobe of left lung"),
    "left_lower": hd.sr.CodedConcept("41224006", "SCT", "Lower lobe of left lung"),
}
LOBE_SEGMENTS = tuple(
    SegmentSpec(name, LOBE_TEXT[name], ANATOMICAL_STRUCTURE, LOBE_CODES[name], None, rgb)
    for name, rgb in zip(LOBES, ((70, 130, 230), (120, 200, 230), (40, 80, 170), (90, 200, 110), (40, 140, 60)))
)


def segment_masks(result: AnalysisResult) -> list[tuple[SegmentSpec, np.ndarray]]:
    """The non-empty segments, in SEG order, with their (z, y, x) bool masks."""
    labels = np.asarray(result.lung_labels)
    candidates = [
        (RIGHT_LUNG_SEGMENT, labels == RIGHT_LUNG),
        (LEFT_LUNG_SEGMENT, labels == LEFT_LUNG),
        (INFECTION_SEGMENT, np.asarray(result.infection_mask, dtype=bool)),
    ]
    opacities = common.opacity_masks(result)
    if opacities is not None:
        candidates += [(GGO_SEGMENT, opacities[0]), (CONSOLIDATION_SEGMENT, opacities[1])]
    return [(spec, mask) for spec, mask in candidates if mask.any()]


def segment_number(seg: hd.seg.Segmentation, key: str) -> int | None:
    """The segment number of ``key`` (a SegmentSpec key) in ``seg``, None if omitted."""
    label = {spec.key: spec.label for spec in SEGMENT_SPECS}[key]
    for item in seg.SegmentSequence:
        if item.SegmentLabel == label:
            return int(item.SegmentNumber)
    return None


def _description(
    number: int, spec: SegmentSpec, algorithm: hd.AlgorithmIdentificationSequence, uids: common.ResultUids
) -> hd.seg.SegmentDescription:
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=spec.label,
        segmented_property_category=spec.category,
        segmented_property_type=spec.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=uids.uid("seg", "segment", spec.key),
        tracking_id=spec.label,
        anatomic_regions=[LUNG] if spec.modifier is None else None,
        display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
    )
    if spec.modifier is not None:
        # Laterality is a modifier of the property type (PS3.3 C.8.20.4, Segment
        # Description Macro: (0062,0011) nested in (0062,000F)).
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(spec.modifier)
        ]
    return desc


def _content_description(specs: list[SegmentSpec]) -> str:
    """(0070,0081) Content Description (LO, 64 characters): the segments by name. With
    the opacity segments the full names do not fit: GGO is abbreviated, then the two
    lungs are named together, then "suspected" is dropped."""
    names = [{GGO_SEGMENT.key: "GGO"}.get(s.key, s.label.lower()) for s in specs]
    if names[:2] == ["right lung", "left lung"] and len(", ".join(names)) > 64 - 17:
        names[:2] = ["lungs"]
    if len(", ".join(names)) > 64 - 17:
        names = [n.replace("suspected ", "") for n in names]
    return common.lo("AI segmentation: " + ", ".join(names))


def _source_stack(volume: Volume, masks: list[np.ndarray]):
    """Source images and the (frames, rows, cols, segments) array highdicom expects:
    ``array[i]`` belongs to ``source_images[i]`` (single-frame) or to frame ``i + 1``
    of the one multi-frame source."""
    n_z, rows, cols = volume.shape
    n_seg = len(masks)
    if volume.is_multiframe:
        uids = {ref.sop_instance_uid for ref in volume.slices}
        if len(uids) != 1 or len(volume.datasets) != 1:
            raise OutputError(
                f"SEG: a multi-frame source must be one instance, got {len(uids)} instances"
            )
        source = volume.datasets[0]
        n_frames = int(source.NumberOfFrames)
        frame_index = np.array([ref.frame_number for ref in volume.slices], dtype=np.int64) - 1
        if frame_index.min() < 0 or frame_index.max() >= n_frames:
            raise OutputError(f"SEG: a frame number is outside 1..{n_frames} of the source")
        seg_major = np.zeros((n_seg, n_frames, rows, cols), dtype=np.uint8)
        for s, mask in enumerate(masks):
            seg_major[s, frame_index] = mask
        return [source], np.moveaxis(seg_major, 0, -1)
    by_uid = {ds.SOPInstanceUID: ds for ds in volume.datasets}
    try:
        sources = [by_uid[ref.sop_instance_uid] for ref in volume.slices]
    except KeyError as exc:
        raise OutputError(f"SEG: no source dataset for slice SOP instance {exc.args[0]}") from exc
    # Only the slices holding a segment: the same SEG, but highdicom's overlap check
    # and frame loop see fewer frames (about 0.5 s less for a 300-slice chest CT).
    present = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks]))
    # segment-major memory seen through a (frames, rows, cols, segments) view: highdicom's
    # overlap check (a sum over the last axis) and its per-frame copies then run over
    # contiguous planes, several times faster than on an interleaved array
    # one copy per mask straight into the result (stack + astype made three: 2 s per chest CT)
    seg_major = np.empty((len(masks), len(present), rows, cols), dtype=np.uint8)
    for s, mask in enumerate(masks):
        np.take(np.asarray(mask, dtype=bool), present, axis=0, out=seg_major[s].view(bool))
    return [sources[z] for z in present], np.moveaxis(seg_major, 0, -1)


def _segmentation(sources, stack, descriptions, uids: common.ResultUids, role: str, series_number: int, algo,
                  **kwargs) -> hd.seg.Segmentation:
    """A BINARY highdicom Segmentation with the node's equipment, UIDs of ``role`` and the
    content date and time; ``kwargs``: content description and label, series description..."""
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.uid(role, "series"),
        series_number=series_number,
        sop_instance_uid=uids.uid(role, "instance"),
        instance_number=1,
        manufacturer=common.MANUFACTURER,
        manufacturer_model_name=common.lo(algo.name),
        software_versions=common.SOFTWARE_VERSION,
        device_serial_number=common.DEVICE_SERIAL_NUMBER,
        **kwargs,
        **common.content_date_time(),
    )


def build_seg(
    volume: Volume,
    result: AnalysisResult,
    series_number: int,
    *,
    omit_empty_frames: bool = True,
    institution_name: str | None = None,
    uids: common.ResultUids | None = None,
) -> hd.seg.Segmentation:
    """Build the lung + infection SEG.

    Parameters
    ----------
    volume
        The analysed source series (its datasets become (0008,1115) Referenced Series
        Sequence and each frame's Derivation Image / Source Image Sequence).
    result
        The analysis; ``lung_labels`` gives segments "Right lung" and "Left lung",
        ``infection_mask`` gives "Suspected infection", and ``consolidation_mask`` (when
        given) splits it into "Ground-glass opacity" and "Consolidation". Empty
        segments are omitted.
    series_number
        (0020,0011) Series Number of the new SEG series.
    omit_empty_frames
        Store only frames where a segment is present (fewer frames: Weasis refuses
        more than 400).
    institution_name
        (0008,0080) Institution Name, optional.
    uids
        Where the series, instance and tracking UIDs come from; by default derived from
        the source series and the model (:class:`common.ResultUids`, revision 1).

    Raises
    ------
    OutputError
        If no segment is non-empty or highdicom cannot build the object.
    """
    common.check_result_matches(volume, result)
    uids = uids or common.ResultUids.for_analysis(volume, result)
    present = segment_masks(result)
    if not present:
        raise OutputError("SEG: lungs and infection are all empty; nothing to segment")
    algo = result.algorithm
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=common.lo(algo.name),
        family=common.algorithm_family_code(algo),
        version=common.lo(algo.version),
        source=common.MANUFACTURER,
    )
    with common.building("SEG"):
        descriptions = [
            _description(i, spec, algorithm_id, uids) for i, (spec, _) in enumerate(present, start=1)
        ]
        sources, stack = _source_stack(volume, [mask for _, mask in present])
        seg = _segmentation(
            sources, stack, descriptions, uids, "seg", series_number, algo,
            content_description=_content_description([spec for spec, _ in present]),
            content_label="AI_LUNG_INFECT",
            omit_empty_frames=omit_empty_frames,
            series_description=common.series_description("AI lung + infection SEG", result, uids.revision),
            institution_name=institution_name,
        )
    n_frames = int(seg.NumberOfFrames)
    if n_frames > WEASIS_MAX_FRAMES:
        logger.warning(
            "SEG has %d frames; Weasis refuses SEG objects over %d frames", n_frames, WEASIS_MAX_FRAMES
        )
    return seg


def lobe_segment_number(seg: hd.seg.Segmentation, name: str) -> int | None:
    """The segment number of lobe ``name`` (one of LOBES) in the lobe SEG, None if omitted."""
    label = LOBE_TEXT[name]
    for item in seg.SegmentSequence:
        if item.SegmentLabel == label:
            return int(item.SegmentNumber)
    return None


def _lobe_label_map(volume: Volume, lobe_labels: np.ndarray, numbers: dict[int, int]):
    """Source images and the (frames, rows, cols) label map highdicom takes for segments that
    never overlap: a lobe label becomes its segment number (``numbers``), and only slices
    holding a lobe are frames."""
    lobes = np.asarray(lobe_labels)
    lut = np.zeros(256, np.uint8)
    for label, number in numbers.items():
        lut[label] = number
    if volume.is_multiframe:
        source = volume.datasets[0]
        frame_index = np.array([ref.frame_number for ref in volume.slices], dtype=np.int64) - 1
        stack = np.zeros((int(source.NumberOfFrames), *lobes.shape[1:]), np.uint8)
        stack[frame_index] = lut[lobes]
        return [source], stack
    by_uid = {ds.SOPInstanceUID: ds for ds in volume.datasets}
    present = np.flatnonzero(lobes.reshape(lobes.shape[0], -1).any(axis=1))
    return [by_uid[volume.slices[z].sop_instance_uid] for z in present], lut[lobes[present]]


def build_lobe_seg(
    volume: Volume,
    result: AnalysisResult,
    series_number: int,
    *,
    institution_name: str | None = None,
    uids: common.ResultUids | None = None,
) -> hd.seg.Segmentation:
    """The SEG of the five lobes (``result.lobe_labels``), its own series beside the lung +
    infection SEG: lobes are anatomy, not findings, and one SEG holding both would pass
    1000 frames for a chest CT (Weasis refuses 400). The lobes never overlap, so highdicom
    gets one label map instead of a stack per segment (a fifth of the memory). A lobe the
    segmentation did not find is left out.

    Raises
    ------
    OutputError
        Without lobe labels, or when highdicom cannot build the object.
    """
    common.check_result_matches(volume, result)
    if result.lobe_labels is None or not np.any(result.lobe_labels):
        raise OutputError("lobe SEG: the analysis has no lobes")
    uids = uids or common.ResultUids.for_analysis(volume, result)
    found = set(np.unique(result.lobe_labels).tolist()) - {0}
    present = [(label, spec) for label, spec in enumerate(LOBE_SEGMENTS, start=1) if label in found]
    numbers = {label: number for number, (label, _) in enumerate(present, start=1)}
    algo = result.algorithm
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=common.lo(f"{algo.name} lobes"),
        family=common.algorithm_family_code(algo),
        version=common.lo(result.model_versions.get("lobes", algo.version)),
        source=common.MANUFACTURER,
    )
    with common.building("lobe SEG"):
        descriptions = [_description(numbers[label], spec, algorithm_id, uids) for label, spec in present]
        sources, stack = _lobe_label_map(volume, result.lobe_labels, numbers)
        seg = _segmentation(
            sources, stack, descriptions, uids, "lobe_seg", series_number, algo,
            content_description="AI segmentation: lung lobes",
            content_label="AI_LOBES",
            omit_empty_frames=True,
            series_description=common.series_description("AI lobe SEG", result, uids.revision),
            institution_name=institution_name,
        )
    return seg
