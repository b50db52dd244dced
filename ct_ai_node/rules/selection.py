"""Which series of a study to analyse: pure rules over ``SeriesSummary`` values.

``select_series`` checks every series against a ``SelectionPolicy`` in a fixed
order (modality, SOP class, localizer, single slice, orientation, consistency,
stack geometry, slice count, thickness, spacing), skips each unsuitable one with
a one-line reason, and among the rest prefers ORIGINAL\\PRIMARY images, then the
thinnest slices, then the most slices. No disk, no network: the folder loader
and the network node's routing rules call it with the same summaries.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ct_ai_node.volume.frames import CT_SOP_CLASSES
from ct_ai_node.volume.geometry import Orientation, StackLimits, check_stack
from ct_ai_node.volume.series import SeriesSummary

_SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
}


def sop_class_name(uid: str) -> str:
    """Readable name of a SOP Class UID (the UID itself when unknown)."""
    return _SOP_CLASS_NAMES.get(uid, uid or "no SOP class")


class SelectionPolicy(BaseModel):
    """Which series qualify for analysis. Field errors name the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Modality (0008,0060) values accepted
    modalities: tuple[str, ...] = ("CT",)
    #: SOP Class UIDs accepted (CT, Enhanced CT, Legacy Converted Enhanced CT)
    sop_classes: tuple[str, ...] = CT_SOP_CLASSES
    #: fewest slices a series must have
    min_slices: int = Field(20, ge=2, le=10000)
    #: thickest slices accepted, SliceThickness (0018,0050) in mm
    max_thickness_mm: float = Field(5.0, gt=0.0, le=50.0)
    #: widest spacing between slice positions accepted (mm)
    max_spacing_mm: float = Field(5.0, gt=0.0, le=50.0)
    #: how far the slice normal may deviate from the feet-head axis (degrees)
    max_axial_deviation_deg: float = Field(10.0, ge=0.0, le=45.0)
    #: largest gantry tilt accepted (degrees); tilted stacks are warned about
    max_gantry_tilt_deg: float = Field(30.0, ge=0.0, le=60.0)
    #: a step above this multiple of the median step means missing slices
    gap_factor: float = Field(1.5, gt=1.0, le=10.0)
    #: relative step deviation above which a stack is refused as uneven
    max_spacing_deviation: float = Field(0.2, gt=0.0, le=1.0)
    #: refuse DERIVED / SECONDARY images instead of only preferring ORIGINAL\PRIMARY
    require_original: bool = False

    @field_validator("modalities")
    @classmethod
    def _modalities_upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("modalities must name at least one modality")
        return tuple(v.strip().upper() for v in value)

    @field_validator("sop_classes")
    @classmethod
    def _sop_classes_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("sop_classes must name at least one SOP Class UID")
        for uid in value:
            parts = uid.split(".")
            if len(uid) > 64 or len(parts) < 2 or not all(p.isdigit() for p in parts):
                raise ValueError(f"sop_classes: {uid!r} is not a UID")
        return value

    @model_validator(mode="after")
    def _deviation_below_gap(self) -> "SelectionPolicy":
        if 1.0 + self.max_spacing_deviation > self.gap_factor:
            raise ValueError(
                "max_spacing_deviation must be below gap_factor - 1 "
                f"(got {self.max_spacing_deviation} with gap_factor {self.gap_factor})"
            )
        return self

    def stack_limits(self) -> StackLimits:
        """The stack geometry limits this policy implies (used by the loader too)."""
        return StackLimits(
            gap_factor=self.gap_factor,
            max_deviation=self.max_spacing_deviation,
            max_tilt_deg=self.max_gantry_tilt_deg,
        )


@dataclass(frozen=True)
class Selection:
    """Outcome of ``select_series``."""

    #: the series to analyse, or None
    chosen: SeriesSummary | None
    #: (series key, one-line reason) for every series not chosen
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: why nothing was chosen (None when a series was chosen)
    reason: str | None = None
    #: notes about the chosen series (tilt, uneven spacing, derived images)
    warnings: list[str] = field(default_factory=list)


def _mm(value: float) -> str:
    return f"{value:.1f}" if abs(value * 10 - round(value * 10)) < 1e-6 else f"{value:.2f}"


Check = Callable[[SeriesSummary, SelectionPolicy], "str | None"]


def _check_modality(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    if s.modality not in p.modalities:
        return f"modality {s.modality or 'unknown'}, not {'/'.join(p.modalities)}"
    return None


def _check_sop_class(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    if s.sop_class_uid not in p.sop_classes:
        return f"{sop_class_name(s.sop_class_uid)} is not a CT image SOP class"
    if len(s.sop_class_uids) > 1:
        return "mixed SOP classes in one series"
    return None


def _check_localizer(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    return "localizer image" if s.is_localizer else None


def _check_original(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    if p.require_original and not s.is_original_primary:
        return "not ORIGINAL\\PRIMARY images (" + "\\".join(s.image_type[:2]) + ")"
    return None


def _check_single(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    if s.n_frames > 1:
        return None
    # no usable frame because of a header problem (absurd NumberOfFrames, damaged
    # file): that problem is the true reason, not "single slice"
    return s.problems[0] if s.problems and s.n_frames == 0 else "single slice"


def _check_orientation(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    if s.orientation is Orientation.UNKNOWN or s.axial_deviation_deg is None:
        return "no image orientation (ImageOrientationPatient missing)"
    deviation = s.axial_deviation_deg
    if deviation <= p.max_axial_deviation_deg:
        return None
    # A tilted gantry tilts the image plane by the tilt angle while the table
    # still moves along the feet-head axis: accept it as axial up to the limit.
    tilt = s.gantry_tilt_deg
    if tilt > 0.5 and abs(tilt - deviation) <= 1.0 and deviation <= p.max_gantry_tilt_deg:
        return None
    if s.orientation in (Orientation.CORONAL, Orientation.SAGITTAL):
        return f"{s.orientation.value} images, not axial"
    return f"oblique images ({deviation:.0f} deg from axial), not axial"


def _check_consistency(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    return s.problems[0] if s.problems else None


def _check_stack(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    if s.stack is None:
        return None
    fatal, _ = check_stack(s.stack, p.stack_limits())
    return fatal


def _check_count(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    if s.n_frames < p.min_slices:
        return f"only {s.n_frames} slices (< {p.min_slices})"
    return None


def _check_thickness(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    thickness = s.slice_thickness
    if thickness is not None and thickness > p.max_thickness_mm + 1e-3:
        return f"slice thickness {_mm(thickness)} mm > {_mm(p.max_thickness_mm)} mm"
    return None


def _check_spacing(s: SeriesSummary, p: SelectionPolicy) -> str | None:
    spacing = s.spacing_mm
    if spacing is not None and spacing > p.max_spacing_mm + 0.05:
        return f"slice spacing {_mm(spacing)} mm > {_mm(p.max_spacing_mm)} mm"
    return None


#: in order: a series failing a later check is a better candidate
CHECKS: tuple[Check, ...] = (
    _check_modality,
    _check_sop_class,
    _check_localizer,
    _check_original,
    _check_single,
    _check_orientation,
    _check_consistency,
    _check_stack,
    _check_count,
    _check_thickness,
    _check_spacing,
)


def evaluate(summary: SeriesSummary, policy: SelectionPolicy) -> tuple[int, str | None]:
    """Index of the first failed check (``len(CHECKS)`` when all pass) and its reason."""
    for i, check in enumerate(CHECKS):
        reason = check(summary, policy)
        if reason is not None:
            return i, " ".join(reason.split())
    return len(CHECKS), None


def _preference(s: SeriesSummary) -> tuple:
    thickness = s.effective_thickness_mm
    return (
        0 if s.is_original_primary else 1,
        thickness if thickness is not None else float("inf"),
        -s.n_frames,
        s.series_number if s.series_number is not None else 1 << 30,
        s.key,
    )


def _why_not_preferred(loser: SeriesSummary, winner: SeriesSummary) -> str:
    if winner.is_original_primary and not loser.is_original_primary:
        return f"{winner.label} preferred: ORIGINAL\\PRIMARY images"
    wt, lt = winner.effective_thickness_mm, loser.effective_thickness_mm
    if wt is not None and (lt is None or wt < lt):
        shown = f"{_mm(wt)} mm < {_mm(lt)} mm" if lt is not None else f"{_mm(wt)} mm"
        return f"{winner.label} preferred: thinner slices ({shown})"
    if winner.n_frames > loser.n_frames:
        return f"{winner.label} preferred: more slices ({winner.n_frames} > {loser.n_frames})"
    return f"{winner.label} preferred"


def _no_modality_reason(summaries: Sequence[SeriesSummary], policy: SelectionPolicy) -> str:
    found = Counter(s.modality or "unknown" for s in summaries)
    parts = ", ".join(
        f"{m} ({n} series)" for m, n in sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return f"no {'/'.join(policy.modalities)} series: found {parts}"


def select_series(
    summaries: Sequence[SeriesSummary], policy: SelectionPolicy | None = None
) -> Selection:
    """Choose the series to analyse.

    Parameters
    ----------
    summaries
        One summary per series of the study (any order).
    policy
        The rules; ``SelectionPolicy()`` when None.

    Returns
    -------
    Selection
        ``chosen`` is the best qualifying series or None; every other series is
        in ``skipped`` with a one-line reason prefixed by its label
        (``series 5: slice thickness 8.0 mm > 5.0 mm``). When nothing qualifies,
        ``reason`` is that of the best candidate (the one that passed the most
        checks), or ``no CT series: found MR (1 series)``.
    """
    if policy is None:
        policy = SelectionPolicy()
    if not isinstance(policy, SelectionPolicy):
        raise TypeError(f"policy must be a SelectionPolicy, got {type(policy).__name__}")
    if not summaries:
        return Selection(chosen=None, reason="no series")

    evaluated = []
    for s in summaries:
        stage, reason = evaluate(s, policy)
        evaluated.append((s, stage, reason))

    qualifying = sorted((s for s, stage, _ in evaluated if reason_free(stage)), key=_preference)
    skipped: list[tuple[str, str]] = []
    for s, _stage, reason in evaluated:
        if reason is not None:
            skipped.append((s.key, f"{s.label}: {reason}"))

    if not qualifying:
        if all(stage == 0 for _, stage, _ in evaluated):
            reason = _no_modality_reason(summaries, policy)
        else:
            best = max(evaluated, key=lambda e: (e[1], e[0].n_frames))
            reason = f"{best[0].label}: {best[2]}"
            others = len(summaries) - 1
            if others:
                reason += f" (and {others} other series skipped)"
        return Selection(chosen=None, skipped=skipped, reason=reason)

    chosen = qualifying[0]
    for s in qualifying[1:]:
        skipped.append((s.key, f"{s.label}: {_why_not_preferred(s, chosen)}"))

    warnings: list[str] = []
    if chosen.stack is not None:
        _, warnings = check_stack(chosen.stack, policy.stack_limits())
    if not chosen.is_original_primary and chosen.image_type:
        warnings.append(f"{chosen.label}: images are " + "\\".join(chosen.image_type[:2]))
    return Selection(chosen=chosen, skipped=skipped, warnings=warnings)


def reason_free(stage: int) -> bool:
    """True when a series passed every check."""
    return stage == len(CHECKS)
