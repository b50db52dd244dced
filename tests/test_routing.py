"""Routing rules: every operator true and false, first / all / fallback, facts from headers."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from ct_ai_node.config import Condition, parse_config
from ct_ai_node.rules.routing import (
    FALLBACK,
    RoutedAction,
    SeriesFacts,
    check_condition,
    facts_from_datasets,
    route,
)
from helpers_dicom import write_ct_series

FACTS = SeriesFacts(
    tags={
        "Modality": "CT",
        "BodyPartExamined": "CHEST",
        "SeriesDescription": "Thorax 1.0 B40f",
        "SliceThickness": 1.0,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "ConvolutionKernel": "B40f",
        "ContrastBolusAgent": "",
        "SeriesNumber": 3.0,
        "PatientName": "Doe^Jane",
    },
    calling_ae="PACS",
    called_ae="CTAI",
    instance_count=120,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation="axial",
)


def cond(**spec) -> Condition:
    if "in_" in spec:
        spec["in"] = spec.pop("in_")
    return Condition.model_validate(spec)


# (condition, expected verdict, expected explanation line)
OPERATOR_CASES = [
    # equals
    (dict(tag="Modality", equals="CT"), True, 'Modality "CT" equals "CT": yes'),
    (dict(tag="Modality", equals="MR"), False, 'Modality "CT" equals "MR": no'),
    (dict(tag="Modality", equals=" CT "), True, 'Modality "CT" equals " CT ": yes'),
    (dict(tag="Modality", equals="ct"), False, 'Modality "CT" equals "ct": no'),  # case as written
    (dict(tag="SliceThickness", equals=1), True, "SliceThickness 1.0 equals 1: yes"),
    (dict(tag="SliceThickness", equals="1.0"), True, 'SliceThickness 1.0 equals "1.0": yes'),
    (dict(tag="SliceThickness", equals=2.5), False, "SliceThickness 1.0 equals 2.5: no"),
    (dict(tag="ImageType", equals="ORIGINAL\\PRIMARY\\AXIAL"), True,
     'ImageType "ORIGINAL\\PRIMARY\\AXIAL" equals "ORIGINAL\\PRIMARY\\AXIAL": yes'),
    (dict(tag="ImageType", equals="PRIMARY"), True, 'ImageType "ORIGINAL\\PRIMARY\\AXIAL" equals "PRIMARY": yes'),
    (dict(tag="ImageType", equals="DERIVED"), False, 'ImageType "ORIGINAL\\PRIMARY\\AXIAL" equals "DERIVED": no'),
    (dict(tag="StudyDescription", equals=""), True, 'StudyDescription (absent) equals "": yes'),
    (dict(tag="StudyDescription", equals="CT"), False, 'StudyDescription (absent) equals "CT": no'),
    # in
    (dict(tag="BodyPartExamined", in_=["CHEST", "THORAX", ""]), True,
     'BodyPartExamined "CHEST" in ["CHEST", "THORAX", ""]: yes'),
    (dict(tag="BodyPartExamined", in_=["ABDOMEN", "PELVIS"]), False,
     'BodyPartExamined "CHEST" in ["ABDOMEN", "PELVIS"]: no'),
    (dict(tag="StudyDescription", in_=["CHEST", ""]), True, 'StudyDescription (absent) in ["CHEST", ""]: yes'),
    (dict(tag="ContrastBolusAgent", in_=["", "NONE"]), True, 'ContrastBolusAgent "" in ["", "NONE"]: yes'),
    (dict(tag="SeriesNumber", in_=[2, 3]), True, "SeriesNumber 3.0 in [2, 3]: yes"),
    # regex
    (dict(tag="SeriesDescription", regex="(?i)lung|thorax"), True,
     'SeriesDescription "Thorax 1.0 B40f" matches regex "(?i)lung|thorax": yes'),
    (dict(tag="SeriesDescription", regex="thorax"), False,
     'SeriesDescription "Thorax 1.0 B40f" matches regex "thorax": no'),  # case as written
    (dict(tag="ImageType", regex="^AXIAL$"), True,
     'ImageType "ORIGINAL\\PRIMARY\\AXIAL" matches regex "^AXIAL$": yes'),  # any single value
    (dict(tag="ImageType", regex="^ORIGINAL\\\\PRIMARY"), True,
     'ImageType "ORIGINAL\\PRIMARY\\AXIAL" matches regex "^ORIGINAL\\\\PRIMARY": yes'),  # joined value
    # range
    (dict(tag="SliceThickness", range=[0.5, 5]), True, "SliceThickness 1.0 in range [0.5, 5]: yes"),
    (dict(tag="SliceThickness", range=[1, 1]), True, "SliceThickness 1.0 in range [1, 1]: yes"),  # inclusive
    (dict(tag="SliceThickness", range=[1.5, 5]), False, "SliceThickness 1.0 in range [1.5, 5]: no"),
    (dict(tag="Modality", range=[0, 10]), False, 'Modality "CT" in range [0, 10]: no'),  # not a number
    (dict(tag="ImageType", range=[0, 10]), False, 'ImageType "ORIGINAL\\PRIMARY\\AXIAL" in range [0, 10]: no'),
    (dict(tag="KVP", range=[80, 140]), False, "KVP (absent) in range [80, 140]: no"),
    # exists
    (dict(tag="Modality", exists=True), True, 'Modality "CT" exists: yes'),
    (dict(tag="KVP", exists=True), False, "KVP (absent) exists: no"),
    (dict(tag="KVP", exists=False), True, "KVP (absent) is absent or empty: yes"),
    (dict(tag="ContrastBolusAgent", exists=False), True, 'ContrastBolusAgent "" is absent or empty: yes'),
    (dict(tag="ContrastBolusAgent", exists=True), False, 'ContrastBolusAgent "" exists: no'),
    (dict(tag="Modality", exists=False), False, 'Modality "CT" is absent or empty: no'),
    # contains
    (dict(tag="ImageType", contains="AXIAL"), True, 'ImageType "ORIGINAL\\PRIMARY\\AXIAL" contains "AXIAL": yes'),
    (dict(tag="ImageType", contains="LOCALIZER"), False,
     'ImageType "ORIGINAL\\PRIMARY\\AXIAL" contains "LOCALIZER": no'),
    (dict(tag="ImageType", contains="AX"), False, 'ImageType "ORIGINAL\\PRIMARY\\AXIAL" contains "AX": no'),
    (dict(tag="ConvolutionKernel", contains="B40f"), True, 'ConvolutionKernel "B40f" contains "B40f": yes'),
    # facts of the series and the association
    (dict(calling_ae={"in": ["PACS", "ORTHANC"]}), True, 'calling_ae "PACS" in ["PACS", "ORTHANC"]: yes'),
    (dict(calling_ae={"equals": "MODALITY"}), False, 'calling_ae "PACS" equals "MODALITY": no'),
    (dict(called_ae={"equals": "CTAI"}), True, 'called_ae "CTAI" equals "CTAI": yes'),
    (dict(called_ae={"regex": "^RESEARCH"}), False, 'called_ae "CTAI" matches regex "^RESEARCH": no'),
    (dict(instances={"range": [20, 2000]}), True, "instances 120 in range [20, 2000]: yes"),
    (dict(instances={"range": [200, 2000]}), False, "instances 120 in range [200, 2000]: no"),
    (dict(instances={"equals": 120}), True, "instances 120 equals 120: yes"),
    (dict(image_type={"contains": "AXIAL"}), True, 'image_type "ORIGINAL\\PRIMARY\\AXIAL" contains "AXIAL": yes'),
    (dict(image_type={"contains": "SECONDARY"}), False,
     'image_type "ORIGINAL\\PRIMARY\\AXIAL" contains "SECONDARY": no'),
    (dict(orientation={"equals": "axial"}), True, 'orientation "axial" equals "axial": yes'),
    (dict(orientation={"in": ["coronal", "sagittal"]}), False, 'orientation "axial" in ["coronal", "sagittal"]: no'),
    # identifying values are never shown
    (dict(tag="PatientName", regex="Doe"), True, 'PatientName (hidden) matches regex "Doe": yes'),
]


@pytest.mark.parametrize("spec,verdict,line", OPERATOR_CASES, ids=[c[2] for c in OPERATOR_CASES])
def test_operator(spec, verdict, line):
    assert check_condition(cond(**spec), FACTS) == (verdict, line)


def test_image_type_absent():
    facts = SeriesFacts(tags={"Modality": "CT"})
    assert check_condition(cond(image_type={"contains": "AXIAL"}), facts) == (
        False, 'image_type (absent) contains "AXIAL": no')
    assert check_condition(cond(image_type={"exists": False}), facts)[0] is True


# -- rules together -------------------------------------------------------------

def _config(mode: str, fallback: dict | None = None):
    return parse_config({
        "destinations": [
            {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 4242, "ae_title": "ORTHANC"},
            {"name": "research", "kind": "orthanc", "url": "http://127.0.0.1:8042"},
        ],
        "routing": {"mode": mode, "fallback": fallback or {"action": "discard"}},
        "rules": [
            {"name": "scouts", "when": [{"image_type": {"contains": "LOCALIZER"}}], "action": "discard"},
            {"name": "chest-ct", "action": "analyse", "lungs": "classical", "destinations": ["pacs"],
             "when": [{"tag": "Modality", "equals": "CT"}, {"tag": "SliceThickness", "range": [0.5, 5]}]},
            {"name": "copy-ct", "action": "forward", "destinations": ["research"],
             "when": [{"tag": "Modality", "equals": "CT"}]},
        ],
    })


def test_mode_first_takes_the_first_match():
    cfg = _config("first")
    decision = route(cfg.rules, cfg.routing, FACTS)
    assert decision.actions == [RoutedAction("chest-ct", "analyse", "radlogics", "classical", ("pacs",),
                                             prior="history")]
    assert decision.matched and decision.work == decision.actions
    assert decision.explanation == [
        "rule scouts: not matched (1 of 1 conditions false)",
        '  image_type "ORIGINAL\\PRIMARY\\AXIAL" contains "LOCALIZER": no',
        "rule chest-ct: matched -> analyse (pipeline radlogics, lungs classical) -> pacs",
        '  Modality "CT" equals "CT": yes',
        "  SliceThickness 1.0 in range [0.5, 5]: yes",
        "rule copy-ct: not evaluated (rule chest-ct matched first)",
    ]


def test_mode_all_takes_every_match():
    cfg = _config("all")
    decision = route(cfg.rules, cfg.routing, FACTS)
    assert [(a.rule, a.action, a.destinations) for a in decision.actions] == [
        ("chest-ct", "analyse", ("pacs",)), ("copy-ct", "forward", ("research",))]
    assert decision.actions[1].pipeline is None
    assert "rule copy-ct: matched -> forward -> research" in decision.explanation
    assert not any("not evaluated" in line for line in decision.explanation)


def test_fallback_when_nothing_matches():
    mr = SeriesFacts(tags={"Modality": "MR"}, image_type=("ORIGINAL", "PRIMARY"))
    for mode in ("first", "all"):
        cfg = _config(mode)
        decision = route(cfg.rules, cfg.routing, mr)
        assert decision.actions == [RoutedAction(FALLBACK, "discard")]
        assert not decision.matched and decision.work == []
        assert decision.explanation[-1] == "no rule matched: fallback -> discard"
        assert "  Modality \"MR\" equals \"CT\": no" in decision.explanation


def test_fallback_can_forward():
    cfg = _config("first", {"action": "forward", "destinations": ["research"]})
    decision = route(cfg.rules, cfg.routing, SeriesFacts(tags={"Modality": "US"}))
    assert decision.actions == [RoutedAction(FALLBACK, "forward", None, None, ("research",))]
    assert decision.explanation[-1] == "no rule matched: fallback -> forward -> research"


def test_matching_discard_rule_wins_in_first_mode():
    cfg = _config("first")
    scout = SeriesFacts(tags={"Modality": "CT", "SliceThickness": 1.0}, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    decision = route(cfg.rules, cfg.routing, scout)
    assert decision.actions == [RoutedAction("scouts", "discard")]
    assert decision.matched and decision.work == []


def test_rule_without_conditions_matches_everything():
    cfg = parse_config({"rules": [{"name": "all", "action": "analyse"}]})
    decision = route(cfg.rules, cfg.routing, SeriesFacts())
    assert decision.actions == [RoutedAction("all", "analyse", "radlogics", "unet", (), prior="history")]
    assert decision.explanation[1] == "  (no conditions: matches every series)"


def test_no_rules_means_fallback():
    cfg = parse_config({})
    decision = route(cfg.rules, cfg.routing, FACTS)
    assert decision.actions == [RoutedAction(FALLBACK, "discard")]
    assert decision.explanation == ["no rule matched: fallback -> discard"]


# -- facts from headers ---------------------------------------------------------

def _dataset(**overrides) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.1"
    ds.Modality = "CT"
    ds.SeriesDescription = "  Lung 1.0  "
    ds.SeriesNumber = 4
    ds.SliceThickness = "1.00"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.Rows = 512
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ContrastBolusAgent = ""
    ds.ReferencedImageSequence = [Dataset()]
    ds.PixelData = b"\0\0" * 4
    ds.add_new(0x00091010, "LO", "private")
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def test_facts_from_datasets_plain_values():
    second = _dataset(SOPInstanceUID="1.2.3.2")
    duplicate = _dataset()  # the first instance received again: counted once
    facts = facts_from_datasets([_dataset(), second, duplicate], calling_ae=" PACS ", called_ae="CTAI",
                                caller_host="10.0.0.5")
    assert facts.tags["Modality"] == "CT"
    assert facts.tags["SeriesDescription"] == "Lung 1.0"
    assert facts.tags["SliceThickness"] == 1.0 and isinstance(facts.tags["SliceThickness"], float)
    assert facts.tags["SeriesNumber"] == 4.0 and isinstance(facts.tags["SeriesNumber"], float)
    assert facts.tags["Rows"] == 512
    assert facts.tags["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert facts.tags["PixelSpacing"] == ["0.7", "0.7"]
    assert facts.tags["ContrastBolusAgent"] == ""
    assert "ReferencedImageSequence" not in facts.tags and "PixelData" not in facts.tags
    assert all(isinstance(k, str) and k for k in facts.tags)  # no private, keyword-less elements
    assert facts.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert facts.orientation == "axial"
    assert facts.instance_count == 2
    assert (facts.calling_ae, facts.called_ae, facts.caller_host) == ("PACS", "CTAI", "10.0.0.5")
    assert facts.label == "series 4 (Lung 1.0)"


@pytest.mark.parametrize("iop,expected", [
    ([1, 0, 0, 0, 0, -1], "coronal"),
    ([0, 1, 0, 0, 0, -1], "sagittal"),
    ([1, 0, 0, 0, 0.7071, -0.7071], "oblique"),
    (None, "unknown"),
])
def test_facts_orientation(iop, expected):
    ds = _dataset()
    if iop is None:
        del ds.ImageOrientationPatient
    else:
        ds.ImageOrientationPatient = iop
    assert facts_from_datasets([ds], "PACS", "CTAI").orientation == expected


def test_facts_from_empty_list():
    with pytest.raises(ValueError):
        facts_from_datasets([], "PACS", "CTAI")


def test_facts_from_written_series_route_end_to_end(tmp_path):
    written = write_ct_series(tmp_path, n=24, thickness=1.0)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in written.paths]
    facts = facts_from_datasets(headers, "PACS", "CTAI")
    assert facts.instance_count == 24 and facts.orientation == "axial"
    cfg = parse_config({"rules": [{"name": "chest-ct", "action": "analyse", "when": [
        {"tag": "Modality", "equals": "CT"},
        {"tag": "BodyPartExamined", "in": ["CHEST", "THORAX", "LUNG", ""]},
        {"tag": "SliceThickness", "range": [0.5, 5]},
        {"tag": "ContrastBolusAgent", "exists": False},
        {"instances": {"range": [20, 2000]}},
        {"image_type": {"contains": "AXIAL"}},
        {"orientation": {"equals": "axial"}},
        {"tag": "PatientID", "exists": True},
    ]}]})
    decision = route(cfg.rules, cfg.routing, facts)
    assert [a.rule for a in decision.actions] == ["chest-ct"], decision.explanation
    assert "  PatientID (hidden) exists: yes" in decision.explanation
    assert not any("TEST123456" in line or "Test^Patient" in line for line in decision.explanation)
