"""This study against the patient's prior study: improved, stable or worse.

The rule (docs/reporting.md, "Comparison with the prior study"):

1. Both studies have a CT severity score (lobes) and it moved by :data:`SCORE_STEP` points or
   more: the score decides (up: worse, down: improved). One point is within the score's own
   agreement between readers, and between our model and the phantoms' truth (docs/models.md).
2. Otherwise the share of the lungs involved decides when it moved by at least
   :data:`INVOLVEMENT_STEP_PP` percentage points *and* by at least :data:`INVOLVEMENT_STEP_RATIO`
   of the larger of the two shares (40 % -> 45 % is within what segmenting the same lungs
   twice gives; 2 % -> 8 % is not).
3. Otherwise: stable.

The prior is the most recent earlier study of the patient within ``max_interval_days``
(:func:`choose_prior`); a study without a date is never compared (no interval to state).

Pure logic: no I/O. The node's history and the PACS query live in ``node/priors.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

from ct_ai_node.pipeline.types import PriorComparison, StudyFindings

#: CT severity score points (0-25) that count as a change
SCORE_STEP = 2
#: percentage points of the lungs' volume that count as a change (with the ratio below)
INVOLVEMENT_STEP_PP = 5.0
#: ... and the least share of the larger value that change must be
INVOLVEMENT_STEP_RATIO = 0.2


def study_datetime(study_date: str | None, study_time: str | None = None) -> datetime | None:
    """StudyDate (DA, ``YYYYMMDD``; ``YYYY.MM.DD`` from old ACR-NEMA headers) and StudyTime
    (TM, ``HH[MM[SS[.F]]]``, colons tolerated) as a datetime; None without a valid date.
    A missing or unreadable time counts as midnight."""
    digits = re.sub(r"[.\-/]", "", str(study_date or "").strip())
    if not re.fullmatch(r"\d{8}", digits):
        return None
    try:
        day = datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        return None
    clock = re.match(r"(\d{2})(\d{2})?(\d{2})?", str(study_time or "").strip().replace(":", ""))
    if clock is None:
        return day
    hour, minute, second = (int(g) if g else 0 for g in clock.groups())
    if hour > 23 or minute > 59 or second > 60:
        return day
    return day.replace(hour=hour, minute=minute, second=min(second, 59))


def findings_of(analysed, study_instance_uid: str, when: datetime | None) -> StudyFindings:
    """The findings of an analysis: an ``AnalysisResult`` (this study, before its outputs are
    written) or a ``ResultDocument`` (a prior analysed for the comparison) - both carry
    ``involvement_percent``, ``lesion_volume_ml``, ``ct_severity_score``, ``case_class`` and
    ``lobes`` (each with a ``severity``)."""
    return StudyFindings(
        study_instance_uid=study_instance_uid, study_datetime=when,
        involvement_percent=float(analysed.involvement_percent or 0.0),
        lesion_volume_ml=float(analysed.lesion_volume_ml or 0.0),
        ct_severity_score=analysed.ct_severity_score, case_class=analysed.case_class,
        lobe_severities=tuple(int(lobe.severity) for lobe in analysed.lobes or ()))


def choose_prior(candidates: Sequence[StudyFindings], current: StudyFindings,
                 max_interval_days: float) -> StudyFindings | None:
    """The most recent study in ``candidates`` taken before ``current`` (by study date and
    time, another study) and at most ``max_interval_days`` before it; None when there is none
    or ``current`` has no date."""
    if current.study_datetime is None:
        return None
    earlier = [c for c in candidates
               if c.study_datetime is not None and c.study_instance_uid != current.study_instance_uid
               and c.study_datetime < current.study_datetime
               and (current.study_datetime - c.study_datetime).total_seconds() <= max_interval_days * 86400]
    return max(earlier, key=lambda c: c.study_datetime, default=None)


def change_between(prior: StudyFindings, current: StudyFindings) -> tuple[str, str]:
    """("improved" | "stable" | "worse", why in words) by the rule in the module docstring."""
    if prior.ct_severity_score is not None and current.ct_severity_score is not None:
        delta = current.ct_severity_score - prior.ct_severity_score
        if abs(delta) >= SCORE_STEP:
            return ("worse" if delta > 0 else "improved",
                    f"CT severity score {'up' if delta > 0 else 'down'} {abs(delta)} points")
    delta_pp = current.involvement_percent - prior.involvement_percent
    larger = max(current.involvement_percent, prior.involvement_percent)
    if abs(delta_pp) >= INVOLVEMENT_STEP_PP and abs(delta_pp) >= INVOLVEMENT_STEP_RATIO * larger:
        return ("worse" if delta_pp > 0 else "improved",
                f"involvement {'up' if delta_pp > 0 else 'down'} {abs(delta_pp):.1f} percentage points")
    band = f"involvement changed less than {INVOLVEMENT_STEP_PP:g} percentage points or a fifth"
    if prior.ct_severity_score is not None and current.ct_severity_score is not None:
        band = f"CT severity score within {SCORE_STEP - 1} point, " + band
    return "stable", band


def compare(prior: StudyFindings, current: StudyFindings, source: str) -> PriorComparison:
    """``current`` against ``prior`` (both with a study date/time; ``choose_prior`` picks it)."""
    if prior.study_datetime is None or current.study_datetime is None:
        raise ValueError("both studies need a study date to be compared")
    change, reason = change_between(prior, current)
    days = int((current.study_datetime - prior.study_datetime).total_seconds() // 86400)
    return PriorComparison(prior=prior, current=current, interval_days=days, change=change, source=source,
                           reason=reason)


def _score(findings: StudyFindings) -> str:
    return "-" if findings.ct_severity_score is None else str(findings.ct_severity_score)


def prior_date(c: PriorComparison) -> str:
    """The prior's study date as ``YYYY-MM-DD``."""
    return c.prior.study_datetime.strftime("%Y-%m-%d") if c.prior.study_datetime else "unknown date"


def comparison_text(c: PriorComparison) -> str:
    """One sentence for the SR, the PDF and result.json: "Worse than the prior study of
    2021-03-01 (14 days earlier): CT severity score 2 -> 14 of 25, involvement 1.2 % -> 22.0 %
    (CT severity score up 12 points)." ASCII only (DICOM text, burned-in captions)."""
    parts = []
    if c.prior.ct_severity_score is not None or c.current.ct_severity_score is not None:
        parts.append(f"CT severity score {_score(c.prior)} -> {_score(c.current)} of 25")
    parts.append(f"involvement {c.prior.involvement_percent:.1f} % -> {c.current.involvement_percent:.1f} %")
    return (f"{c.change.capitalize()} than the prior study of {prior_date(c)} "
            f"({_days(c.interval_days)} earlier): {', '.join(parts)} ({c.reason}).")


def caption_text(c: PriorComparison) -> str:
    """The short form for a heat-map caption: "vs prior 14 d ago: severity 2 -> 14/25, worse"."""
    if c.prior.ct_severity_score is not None and c.current.ct_severity_score is not None:
        what = f"severity {c.prior.ct_severity_score} -> {c.current.ct_severity_score}/25"
    else:
        what = f"involvement {c.prior.involvement_percent:.0f} -> {c.current.involvement_percent:.0f} %"
    return f"vs prior {c.interval_days} d ago: {what}, {c.change}"


def _days(n: int) -> str:
    return f"{n} day{'' if n == 1 else 's'}"
