"""Which action a complete series gets: pure rules over ``SeriesFacts``.

``route(rules, routing, facts)`` checks the configured rules (``ct_ai_node.config.Rule``)
in order and returns a ``RoutingDecision``: the actions to take and, for every
rule, why it matched or not, each condition with the value seen. No disk, no
network: the node's scheduler and ``ct-ai-node rules test`` call the same code.

Comparison semantics (one place, so the explanation and the verdict agree):

- text is compared after stripping, case as written (DICOM code strings are
  upper case: ``equals: CT``); ``regex`` uses ``re.search``;
- an absent attribute reads as the empty text for ``equals``/``in``/``regex``/
  ``contains`` (so ``in: [CHEST, ""]`` also accepts a series without the
  attribute); ``range`` on it is false; ``exists`` is true only for a present,
  non-empty value;
- numbers compare as numbers when either side is a number (``SliceThickness
  equals 1`` matches "1.0"); ``range`` is inclusive and false for a value that
  is not a single number;
- a multi-valued attribute (``ImageType``) matches ``equals``/``in``/``regex``
  when either its values joined with a backslash (``ORIGINAL\\PRIMARY\\AXIAL``)
  or any single value matches; ``contains`` is true when one value equals the
  operand (on a single value that is plain equality).

Explanations show header values; the values of identifying attributes (patient,
accession, physicians) are shown as ``(hidden)``. Log them at DEBUG only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pydicom
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

from ct_ai_node.config import ActionSpec, Condition, RoutingSection, Rule

#: attributes whose values an explanation never shows (they identify people)
IDENTIFYING = frozenset({
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "IssuerOfPatientID",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "OtherPatientIDs", "OtherPatientNames",
    "PerformingPhysicianName", "PhysiciansOfRecord", "ReferringPhysicianName",
    "RequestingPhysician", "StudyID",
})
#: Patient* attributes that describe the set-up, not the person: shown
_PATIENT_NOT_IDENTIFYING = frozenset({"PatientPosition", "PatientOrientation"})
#: value representations routing ignores: binary data and sequences
_SKIPPED_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"DS", "IS", "FL", "FD"})


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules may look at for one series."""

    #: DICOM keyword -> value of the first instance: text stripped, DS/IS/FL/FD
    #: as float, binary integers as int, multi-valued as a list of texts
    tags: dict[str, object] = field(default_factory=dict)
    calling_ae: str = ""
    called_ae: str = ""
    caller_host: str | None = None
    instance_count: int = 0
    #: ImageType values, upper case
    image_type: tuple[str, ...] = ()
    #: axial, coronal, sagittal, oblique or unknown (from ImageOrientationPatient)
    orientation: str = "unknown"

    @property
    def label(self) -> str:
        """Short name for output: ``series 2 (Thorax 2.5 B40f)`` (as SeriesSummary.label)."""
        number = self.tags.get("SeriesNumber")
        uid = self.tags.get("SeriesInstanceUID")
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            name = f"series {number:g}"
        elif isinstance(uid, str) and uid:
            name = f"series ...{uid[-8:]}"
        else:
            name = "series without UID"
        description = self.tags.get("SeriesDescription")
        description = " ".join(description.split()) if isinstance(description, str) else ""
        return f"{name} ({description})" if description else name


@dataclass(frozen=True)
class RoutedAction:
    """One action a rule (or the fallback, ``rule == "fallback"``) asks for."""

    rule: str
    action: str
    pipeline: str | None = None
    lungs: str | None = None
    destinations: tuple[str, ...] = ()
    #: analyse: send an "AI analysis not performed" notice when the analysis refuses the
    #: series or fails for good (meaningless for the other actions)
    notify_not_analysed: bool = True
    #: urgent, normal or background: the order workers take the jobs in
    priority: str = "normal"
    #: analyse: compare with the prior study - off, history or query (``prior_source`` asked);
    #: an analyse rule's default is history (config)
    prior: str = "off"
    prior_source: str | None = None


@dataclass(frozen=True)
class RoutingDecision:
    """The actions for a series and, line by line, why."""

    actions: list[RoutedAction]
    explanation: list[str]

    @property
    def matched(self) -> bool:
        """True when a rule matched (False: the fallback acted)."""
        return any(a.rule != FALLBACK for a in self.actions)

    @property
    def work(self) -> list[RoutedAction]:
        """The actions that do something (analyse, forward), without discards."""
        return [a for a in self.actions if a.action != "discard"]


#: ``RoutedAction.rule`` of the fallback action
FALLBACK = "fallback"


# -- facts from headers ---------------------------------------------------------

def _plain(elem: DataElement) -> object:
    """A header value as plain Python: text, number, or list of texts."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        items = [str(v).strip() for v in value]
        if not items:
            return ""
        if len(items) > 1:
            return items
        value = value[0]
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("binary value")
    if elem.VR in _FLOAT_VRS:
        text = str(value).strip()
        return float(value) if text else ""
    if elem.VR in _INT_VRS and isinstance(value, int):
        return int(value)
    return str(value).strip()


def header_values(ds: pydicom.Dataset) -> dict[str, object]:
    """Keyword -> plain value for the top-level public attributes of ``ds``.

    Sequences, pixel data and other binary values are left out; so is any
    value pydicom cannot convert (a damaged element must not stop routing).
    """
    tags: dict[str, object] = {}
    for tag in ds.keys():
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - a corrupt element is left out
            continue
        if elem.tag.is_private or not elem.keyword or elem.VR in _SKIPPED_VRS:
            continue
        try:
            tags[elem.keyword] = _plain(elem)
        except (TypeError, ValueError, OverflowError):
            continue
    return tags


def _orientation(ds: pydicom.Dataset) -> str:
    # reuse the volume code: handles classic and enhanced (per-frame) headers alike
    from ct_ai_node.volume.frames import frame_headers
    from ct_ai_node.volume.geometry import classify_orientation

    try:
        frames = frame_headers(ds)
    except Exception:  # noqa: BLE001 - an unreadable orientation is "unknown", not an error
        return "unknown"
    iop = frames[0].orientation if frames else None
    return classify_orientation(iop)[0].value


def facts_from_datasets(
    datasets: Sequence[pydicom.Dataset],
    calling_ae: str,
    called_ae: str,
    caller_host: str | None = None,
) -> SeriesFacts:
    """Build ``SeriesFacts`` from the header datasets of one series.

    ``tags`` come from the first dataset; ``instance_count`` counts distinct
    SOP Instance UIDs (an instance sent twice counts once).

    Raises
    ------
    ValueError
        If ``datasets`` is empty.
    """
    from ct_ai_node.volume.frames import image_type, sop_instance_uid

    if not datasets:
        raise ValueError("datasets must not be empty")
    first = datasets[0]
    uids = {sop_instance_uid(ds) or f"anonymous-{i}" for i, ds in enumerate(datasets)}
    return SeriesFacts(
        tags=header_values(first),
        calling_ae=calling_ae.strip(),
        called_ae=called_ae.strip(),
        caller_host=caller_host,
        instance_count=len(uids),
        image_type=image_type(first),
        orientation=_orientation(first),
    )


# -- evaluation -----------------------------------------------------------------

_ABSENT = object()


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _values(seen: object) -> list[object]:
    """Candidates an operand is compared with: joined text plus each single value."""
    if seen is _ABSENT or seen is None:
        return [""]
    if isinstance(seen, (list, tuple)):
        return ["\\".join(str(v) for v in seen), *seen]
    return [seen]


def _same(seen: object, expected: object) -> bool:
    if isinstance(seen, (int, float)) or isinstance(expected, (int, float)):
        a, b = _number(seen), _number(expected)
        if a is not None and b is not None:
            return a == b
    return str(seen).strip() == str(expected).strip()


def _text(value: object) -> str:
    return value if isinstance(value, str) else (f"{value:g}" if isinstance(value, float) else str(value))


def _test(op: str, operand: Any, seen: object) -> bool:
    """The verdict of one operator on the value seen (``_ABSENT`` when missing)."""
    if op == "exists":
        present = seen is not _ABSENT and seen is not None and seen != "" and seen != [] and seen != ()
        return present == operand
    if op == "range":
        number = _number(seen) if not isinstance(seen, (list, tuple)) else None
        return number is not None and operand[0] <= number <= operand[1]
    if op == "equals":
        return any(_same(v, operand) for v in _values(seen))
    if op == "in":
        return any(_same(v, o) for v in _values(seen) for o in operand)
    if op == "regex":
        pattern = re.compile(operand)
        return any(pattern.search(_text(v)) for v in _values(seen))
    if op == "contains":
        if isinstance(seen, (list, tuple)):
            items: Iterable[object] = seen
        elif isinstance(seen, str):
            items = seen.split("\\")
        else:
            items = _values(seen)
        return any(_same(v, operand) for v in items)
    raise ValueError(f"unknown operator {op!r}")  # the config model allows no other


def _seen(condition: Condition, facts: SeriesFacts) -> object:
    target = condition.target
    if target == "tag":
        return facts.tags.get(condition.tag, _ABSENT)
    if target == "instances":
        return facts.instance_count
    if target == "image_type":
        return list(facts.image_type) if facts.image_type else _ABSENT
    return getattr(facts, target)


def _show(value: object) -> str:
    """A value for an explanation line: texts quoted, lists joined with a backslash."""
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, (list, tuple)):
        return '"' + "\\".join(str(v) for v in value) + '"'
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _show_operand(op: str, operand: Any) -> str:
    def one(v: object) -> str:
        return f'"{v}"' if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)

    if op == "range":
        return f"in range [{operand[0]:g}, {operand[1]:g}]"
    if op == "in":
        return "in [" + ", ".join(one(v) for v in operand) + "]"
    if op == "regex":
        return f'matches regex "{operand}"'
    if op == "exists":
        return "exists" if operand else "is absent or empty"
    return f"{op} {one(operand)}"


def _hidden(condition: Condition) -> bool:
    keyword = condition.tag or ""
    return keyword in IDENTIFYING or (
        keyword.startswith("Patient") and keyword not in _PATIENT_NOT_IDENTIFYING
    )


def check_condition(condition: Condition, facts: SeriesFacts) -> tuple[bool, str]:
    """Verdict of one condition and its explanation line
    (``SliceThickness 1.0 in range [0.5, 5]: yes``)."""
    op, operand = condition.test
    seen = _seen(condition, facts)
    verdict = _test(op, operand, seen)
    shown = "(hidden)" if _hidden(condition) and seen is not _ABSENT else _show(seen)
    return verdict, f"{condition.subject} {shown} {_show_operand(op, operand)}: {'yes' if verdict else 'no'}"


def _routed(name: str, spec: ActionSpec) -> RoutedAction:
    return RoutedAction(rule=name, action=spec.action, pipeline=spec.pipeline, lungs=spec.lungs,
                        destinations=tuple(spec.destinations),
                        notify_not_analysed=spec.notify_not_analysed is not False, priority=spec.priority,
                        prior=spec.prior or "off", prior_source=spec.prior_source)


def describe_action(action: RoutedAction) -> str:
    """``analyse (pipeline radlogics, lungs unet) -> pacs``."""
    text = action.action
    if action.action == "analyse":
        notice = "" if action.notify_not_analysed else ", no not-analysed notice"
        prior = {"off": ", no prior comparison", "history": "",
                 "query": f", priors from {action.prior_source}"}.get(action.prior, "")
        text += f" (pipeline {action.pipeline}, lungs {action.lungs}{notice}{prior})"
    if action.destinations:
        text += " -> " + ", ".join(action.destinations)
    if action.priority != "normal" and action.action != "discard":
        text += f", {action.priority}"
    return text


def route(rules: Sequence[Rule], routing: RoutingSection, facts: SeriesFacts) -> RoutingDecision:
    """Check ``rules`` in order against ``facts``.

    Mode ``first``: the first rule whose conditions all hold acts, later rules
    are not evaluated. Mode ``all``: every matching rule acts, in order. When
    none matches, ``routing.fallback`` acts (``RoutedAction.rule == "fallback"``).

    ``explanation`` has a line per rule (``rule chest-ct: matched -> analyse ...``
    or ``rule x: not matched``), each followed by one indented line per
    condition with the value seen, and a last line when the fallback acts.
    """
    actions: list[RoutedAction] = []
    explanation: list[str] = []
    for rule in rules:
        if actions and routing.mode == "first":
            explanation.append(f"rule {rule.name}: not evaluated (rule {actions[0].rule} matched first)")
            continue
        results = [check_condition(c, facts) for c in rule.when]
        if all(ok for ok, _ in results):
            action = _routed(rule.name, rule)
            actions.append(action)
            explanation.append(f"rule {rule.name}: matched -> {describe_action(action)}")
        else:
            failed = sum(1 for ok, _ in results if not ok)
            explanation.append(f"rule {rule.name}: not matched ({failed} of {len(results)} conditions false)")
        if not rule.when:
            explanation.append("  (no conditions: matches every series)")
        explanation.extend(f"  {line}" for _, line in results)
    if not actions:
        action = _routed(FALLBACK, routing.fallback)
        actions.append(action)
        explanation.append(f"no rule matched: fallback -> {describe_action(action)}")
    return RoutingDecision(actions=actions, explanation=explanation)


__all__ = [
    "FALLBACK",
    "RoutedAction",
    "RoutingDecision",
    "SeriesFacts",
    "check_condition",
    "describe_action",
    "facts_from_datasets",
    "header_values",
    "route",
]
