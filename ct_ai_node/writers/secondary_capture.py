"""Heat-map and key-image series as RGB Secondary Capture images.

One plain (single-frame) Secondary Capture Image per rendered slice: every PACS viewer
shows it, and the burned-in caption carries the class, probability and volumes to
viewers without SR support. Each image references its source slice ((0008,2112)
Source Image Sequence, with (0008,1160) Referenced Frame Number for a multi-frame
source) and is marked as AI output, (0028,0301) Burned In Annotation YES.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from ct_ai_node.pipeline.types import AnalysisResult
from ct_ai_node.volume.types import Volume
from ct_ai_node.writers import common
from ct_ai_node.writers.heatmap import LUNG_WINDOW, HeatStyle, render_slice

logger = logging.getLogger(__name__)

#: at most this many key images (design: the top slices by AI score)
MAX_KEY_IMAGES = 5

_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x / +y, -y / +z, -z (LPS)


def patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """(0020,0020) Patient Orientation (one letter per axis) from the row and column
    direction cosines of (0020,0037) Image Orientation (Patient)."""
    if len(orientation) != 6:
        raise ValueError(f"orientation must have 6 direction cosines, got {orientation!r}")
    letters = []
    for vec in (orientation[:3], orientation[3:]):
        axis = int(np.argmax(np.abs(vec)))
        letters.append(_AXIS_LETTERS[axis][0 if vec[axis] >= 0 else 1])
    return letters[0], letters[1]


def _display_order(volume: Volume, zs: Sequence[int]) -> list[int]:
    """``zs`` in the source's own order (instance number, then frame number), so that
    scrolling the heat maps runs like scrolling the CT."""

    def key(z: int) -> tuple[int, int, int]:
        ref = volume.slices[z]
        return (ref.instance_number or 0, ref.frame_number or 0, z)

    return sorted(zs, key=key)


class _SeriesWriter:
    """Per-series constants, computed once: UIDs, dates, geometry, patient/study
    attributes and the acquisition equipment (highdicom's ``from_ref_dataset``
    recomputes the latter for every image, about 8 ms each)."""

    def __init__(
        self,
        volume: Volume,
        result: AnalysisResult,
        *,
        series_number: int,
        description: str,
        derivation: str,
        institution_name: str | None,
        uids: common.ResultUids,
        role: str,
    ) -> None:
        self.volume = volume
        self.result = result
        self.uids, self.role = uids, role
        self.series_uid = uids.uid(role, "series")
        self.series_number = series_number
        self.description = description
        self.derivation = derivation[:1024]
        self.institution_name = institution_name
        self.dates = common.content_date_time()
        self.orientation = patient_orientation(volume.orientation)
        self.pixel_spacing = (float(volume.spacing[1]), float(volume.spacing[2]))
        self._by_uid = {ds.SOPInstanceUID: ds for ds in volume.datasets}
        # one study, one scanner: patient/study and acquisition equipment come from the
        # first source instance and serve every image of the series
        first = volume.datasets[0]
        self._patient_study = common.patient_study(first)
        try:
            self._equipment: hd.ContributingEquipment | None = (
                hd.ContributingEquipment.for_image_acquisition(first)
            )
        except (ValueError, AttributeError):  # no Manufacturer: nothing to credit
            self._equipment = None

    def image(self, z: int, rgb: np.ndarray, instance_number: int) -> hd.sc.SCImage:
        ref = common.source_ref(self.volume, z)
        source = self._by_uid[ref.sop_instance_uid]
        equipment = [copy.deepcopy(self._equipment)] if self._equipment is not None else []
        sc = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=self.series_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.uid(self.role, "instance", z),
            instance_number=instance_number,
            manufacturer=common.MANUFACTURER,
            pixel_spacing=self.pixel_spacing,
            patient_orientation=self.orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=equipment,
            series_description=self.description,
            manufacturer_model_name=common.MODEL_NAME,
            software_versions=common.SOFTWARE_VERSION,
            institution_name=self.institution_name,
            **self._patient_study,
            **self.dates,
        )
        sc.BurnedInAnnotation = "YES"
        sc.RecognizableVisualFeatures = "NO"
        sc.LossyImageCompression = "00"
        sc.DerivationDescription = self.derivation
        sc.SourceImageSequence = [ref.as_item(codes.DCM.SourceImageForImageProcessingOperation)]
        sc.SourceImageSequence[0].SpatialLocationsPreserved = "YES"
        sc.ImageComments = common.lo(
            f"slice {z + 1}/{self.volume.shape[0]} "
            f"AI slice score {float(self.result.slice_scores[z]):.2f}"
        )
        for keyword in ("PatientAge", "StudyDescription"):
            if keyword in source:
                setattr(sc, keyword, source.data_element(keyword).value)
        # (0018,0015): an Enhanced CT keeps it in a functional group; without it a
        # validator cannot tell whether (0020,0060) Laterality is required
        sc.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
        return sc


def _derivation(result: AnalysisResult, what: str, style: HeatStyle) -> str:
    center, width = LUNG_WINDOW
    return (
        f"{what}: AI heat map ({common.method_label(result.pipeline)}, {result.algorithm.name} "
        f"{result.algorithm.version}) in colour map {style.colormap} over lung window "
        f"W {width:.0f} / L {center:.0f}, inside the lungs, heat >= {style.threshold:g}; "
        f"caption burned in"
    )


def build_heatmap_series(
    volume: Volume,
    result: AnalysisResult,
    series_number: int,
    *,
    style: HeatStyle = HeatStyle(),
    institution_name: str | None = None,
    uids: common.ResultUids | None = None,
) -> list[hd.sc.SCImage]:
    """The heat-map series as a list (:func:`iter_heatmap_series`)."""
    return list(iter_heatmap_series(volume, result, series_number, style=style, institution_name=institution_name,
                                    uids=uids))


def iter_heatmap_series(
    volume: Volume,
    result: AnalysisResult,
    series_number: int,
    *,
    style: HeatStyle = HeatStyle(),
    institution_name: str | None = None,
    uids: common.ResultUids | None = None,
) -> Iterator[hd.sc.SCImage]:
    """One RGB Secondary Capture per source slice that contains lung, built one at a time
    (a writer that stores each before the next holds one image, not 300-600 of them).

    Parameters
    ----------
    volume, result
        The source series and the analysis (``heatmap`` is drawn inside
        ``lung_labels > 0`` over the lung window of ``volume.hu``).
    series_number
        (0020,0011) Series Number of the new series.
    style
        Colour map, visibility threshold and maximum opacity of the heat.
    institution_name
        (0008,0080) Institution Name, optional.

    Yields
    ------
    highdicom.sc.SCImage
        In the source's scrolling order; (0020,0013) Instance Number 1..N. None when
        no slice contains lung.
    """
    common.check_result_matches(volume, result)
    lung = np.asarray(result.lung_labels) > 0
    zs = _display_order(volume, result.lung_slices)
    if not zs:
        logger.info("no slice contains lung: no heat-map series")
        return
    uids = uids or common.ResultUids.for_analysis(volume, result)
    writer = _SeriesWriter(
        volume, result,
        series_number=series_number,
        description=common.series_description("AI heat map", result, uids.revision),
        derivation=_derivation(result, "Heat map", style),
        institution_name=institution_name,
        uids=uids,
        role="heatmap",
    )
    counted = common.with_opacity_volumes(result, volume.voxel_volume_ml)  # once, not per slice
    for number, z in enumerate(zs, start=1):
        with common.building("heat-map SC"):
            caption = common.caption_for(counted, z)
            rgb = render_slice(volume.hu[z], result.heatmap[z], lung[z], caption, style)
            image = writer.image(z, rgb, number)
        yield image


def build_key_image_series(
    volume: Volume,
    result: AnalysisResult,
    series_number: int,
    *,
    style: HeatStyle = HeatStyle(),
    institution_name: str | None = None,
    max_images: int = MAX_KEY_IMAGES,
    uids: common.ResultUids | None = None,
) -> list[hd.sc.SCImage]:
    """The top ``result.key_slices`` (at most ``max_images``) as their own SC series,
    rendered like the heat maps plus a "Key image k/N" caption line; Instance Number k
    is the rank. Empty when there are no key slices."""
    common.check_result_matches(volume, result)
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images!r}")
    n_z = volume.shape[0]
    keys: list[int] = []
    for z in result.key_slices:
        z = int(z)
        if not 0 <= z < n_z:
            raise ValueError(f"result.key_slices holds z={z}, outside 0..{n_z - 1}")
        if z not in keys:
            keys.append(z)
    keys = keys[:max_images]
    if not keys:
        return []
    lung = np.asarray(result.lung_labels) > 0
    uids = uids or common.ResultUids.for_analysis(volume, result)
    writer = _SeriesWriter(
        volume, result,
        series_number=series_number,
        description=common.series_description("AI key images", result, uids.revision),
        derivation=_derivation(result, "Key image (highest AI slice score)", style),
        institution_name=institution_name,
        uids=uids,
        role="key_images",
    )
    images = []
    counted = common.with_opacity_volumes(result, volume.voxel_volume_ml)  # once, not per slice
    with common.building("key-image SC"):
        for k, z in enumerate(keys, start=1):
            caption = common.caption_for(counted, z, key=(k, len(keys)))
            rgb = render_slice(volume.hu[z], result.heatmap[z], lung[z], caption, style)
            images.append(writer.image(z, rgb, k))
    return images


def build_key_object_selection(
    key_images: Sequence[Dataset],
    series_number: int,
    *,
    result: AnalysisResult,
    institution_name: str | None = None,
    uids: common.ResultUids | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection Document ("Of Interest") flagging ``key_images``, so that
    viewers with KOS support jump to them. UIDs from ``uids``, by default derived from the
    key-image series (itself derived from the analysis)."""
    if not key_images:
        raise ValueError("key_images is empty: nothing to select")
    uids = uids or common.ResultUids(str(key_images[0].SeriesInstanceUID), str(result.pipeline))
    algo = result.algorithm
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.uid("ko", "device"),
            name=common.lo(algo.name),
            manufacturer_name=common.MANUFACTURER,
            model_name=common.lo(algo.version),
        ),
    )
    with common.building("key object selection"):
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=list(key_images),
            observer_device_context=device,
            description=common.lo(
                f"AI key images: highest slice scores ({common.method_label(result.pipeline)})"
                + (f" {common.NOT_FOR_DIAGNOSTIC_USE}" if common.needs_disclaimer(algo) else "")
            )[:1024],
        )
        ko = hd.ko.KeyObjectSelectionDocument(
            evidence=list(key_images),
            content=content,
            series_instance_uid=uids.uid("ko", "series"),
            series_number=series_number,
            sop_instance_uid=uids.uid("ko", "instance"),
            instance_number=1,
            manufacturer=common.MANUFACTURER,
            institution_name=institution_name,
            series_description=common.series_description("AI key image selection", result, uids.revision),
        )
    return ko
