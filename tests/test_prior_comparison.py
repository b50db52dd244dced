"""Comparison with the prior study: the rule, the choice of prior, the history, the rule's
configuration, and what the SR, the caption and result.json say (pure parts and SQLite; the
real Orthanc runs are in test_prior_orthanc.py)."""

from __future__ import annotations

from datetime import datetime

import pytest

from ct_ai_node.config import ConfigError, PriorsSection, parse_config
from ct_ai_node.node.history import PatientHistory, patient_key
from ct_ai_node.pipeline.comparison import (
    caption_text,
    change_between,
    choose_prior,
    compare,
    comparison_text,
    study_datetime,
)
from ct_ai_node.pipeline.types import StudyFindings
from ct_ai_node.rules.routing import describe_action, _routed


def _study(uid: str, day: str | None, involvement: float = 0.0, score: int | None = None,
           time: str = "") -> StudyFindings:
    return StudyFindings(study_instance_uid=uid, study_datetime=study_datetime(day, time),
                         involvement_percent=involvement, lesion_volume_ml=involvement * 40,
                         ct_severity_score=score, lobe_severities=() if score is None else (score, 0, 0, 0, 0))


@pytest.mark.parametrize("date, time, expected", [
    ("20210315", "", datetime(2021, 3, 15)),
    ("20210315", "0930", datetime(2021, 3, 15, 9, 30)),
    ("20210315", "093012.123456", datetime(2021, 3, 15, 9, 30, 12)),
    ("2021.03.15", "09:30:12", datetime(2021, 3, 15, 9, 30, 12)),  # ACR-NEMA style
    ("20210315", "99", datetime(2021, 3, 15)),  # a broken time counts as midnight
    ("", "0930", None), ("2021", "", None), ("20211345", "", None), (None, None, None),
])
def test_study_datetime(date, time, expected):
    assert study_datetime(date, time) == expected


@pytest.mark.parametrize("prior, current, change", [
    ((2, 1.0), (14, 22.0), "worse"),          # score up 12
    ((14, 22.0), (11, 18.0), "improved"),     # score down 3
    ((10, 20.0), (11, 22.0), "stable"),       # one point, 2 points of involvement
    ((10, 20.0), (11, 27.0), "worse"),        # one point, but 7 points of involvement (26 % of 27)
    ((10, 40.0), (11, 45.0), "stable"),       # 5 points of 45 %: under a fifth
    ((12, 30.0), (10, 36.0), "improved"),     # the score decides when it moved two points
    ((None, 2.0), (None, 8.0), "worse"),      # no lobes: involvement alone
    ((None, 8.0), (None, 2.5), "improved"),
    ((None, 1.0), (None, 4.0), "stable"),     # under 5 points
])
def test_change_rule(prior, current, change):
    a = _study("1.1", "20210301", prior[1], prior[0])
    b = _study("1.2", "20210315", current[1], current[0])
    assert change_between(a, b)[0] == change


def test_compare_states_both_scores_the_interval_and_why():
    c = compare(_study("1.1", "20210301", 1.2, 2, "0800"), _study("1.2", "20210315", 22.0, 14, "0759"), "history")
    assert (c.change, c.interval_days, c.source) == ("worse", 13, "history")  # 13 days 23 h 59 min
    text = comparison_text(c)
    assert text.startswith("Worse than the prior study of 2021-03-01 (13 days earlier)")
    assert "CT severity score 2 -> 14 of 25" in text and "involvement 1.2 % -> 22.0 %" in text
    assert "up 12 points" in text and text.isascii()
    assert caption_text(c) == "vs prior 13 d ago: severity 2 -> 14/25, worse"
    no_lobes = compare(_study("1.1", "20210301", 8.0), _study("1.2", "20210302", 2.0), "pacs")
    assert "CT severity" not in comparison_text(no_lobes) and caption_text(no_lobes).endswith("8 -> 2 %, improved")
    with pytest.raises(ValueError):
        compare(_study("1.1", None), _study("1.2", "20210302"), "history")


def test_choose_prior_takes_the_latest_earlier_study_within_the_interval():
    current = _study("9", "20210315", time="1200")
    candidates = [
        _study("1", "20200101"),            # too old for 365 days
        _study("2", "20210201"),
        _study("3", "20210315", time="0800"),  # the same morning: earlier, so a prior
        _study("4", "20210316"),            # later
        _study("5", None),                  # undated
        _study("9", "20210101"),            # the same study (another series of it)
    ]
    assert choose_prior(candidates, current, 365).study_instance_uid == "3"
    assert choose_prior(candidates[:2], current, 365).study_instance_uid == "2"
    assert choose_prior(candidates[:1], current, 365) is None
    assert choose_prior(candidates[:1], current, 500).study_instance_uid == "1"
    assert choose_prior(candidates, _study("9", None), 365) is None  # no date: nothing to compare


def test_patient_key_hides_the_id_and_separates_issuers():
    key = patient_key("P-1", "HOSP-A")
    assert key and "P-1" not in key and len(key) == 64
    assert key == patient_key(" P-1 ", "HOSP-A")
    assert key != patient_key("P-1", "HOSP-B") != patient_key("P-1")
    assert key != patient_key("P-1", "HOSP-A", salt="site secret")
    assert patient_key("") is None and patient_key(None) is None


def test_history_keeps_the_latest_series_per_study_and_forgets_old_rows(tmp_path):
    history = PatientHistory(tmp_path / "node.db")
    key, other = patient_key("P-1"), patient_key("P-2")
    history.record(key, "1.1.1", "radlogics", _study("1.1", "20210301", 3.0, 4), "spool", 7)
    history.record(key, "1.1.2", "radlogics", _study("1.1", "20210301", 5.0, 6), "pacs")  # another series
    history.record(key, "1.2.1", "radlogics", _study("1.2", "20210315", 20.0, 12), "spool", 8)
    history.record(key, "1.2.1", "lungs-only", _study("1.2", "20210315", 1.0, 1), "spool", 9)
    history.record(other, "2.1.1", "radlogics", _study("2.1", "20210310", 1.0, 1), "spool", 10)
    studies = {s.study_instance_uid: s for s in history.studies(key, "radlogics")}
    assert set(studies) == {"1.1", "1.2"}
    assert (studies["1.1"].involvement_percent, studies["1.1"].ct_severity_score) == (5.0, 6)
    assert studies["1.2"].study_datetime == datetime(2021, 3, 15) and studies["1.2"].lobe_severities == (12, 0, 0, 0, 0)
    assert history.sources(key, "1.1") == ["spool", "pacs"]
    # a re-analysis of the same series replaces its row
    history.record(key, "1.2.1", "radlogics", _study("1.2", "20210315", 21.0, 13), "spool", 11)
    assert {s.ct_severity_score for s in history.studies(key, "radlogics")} == {6, 13}
    assert history.forget_older_than(3600) == 0
    assert history.forget_older_than(-1) == 5 and history.studies(key, "radlogics") == []


_CONFIG = {
    "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"},
                     {"name": "web", "kind": "stow", "url": "http://127.0.0.1:8042/dicom-web"},
                     {"name": "rest", "kind": "orthanc", "url": "http://127.0.0.1:8042"}],
    "rules": [],
}


def _rule(**fields) -> dict:
    return {**_CONFIG, "rules": [{"name": "chest", "action": "analyse", "destinations": ["pacs"], **fields}]}


def test_rule_prior_settings_and_their_errors():
    config = parse_config(_rule())
    assert config.rules[0].prior == "history" and config.rules[0].prior_source is None
    assert isinstance(config.priors, PriorsSection) and config.priors.max_interval_days == 730
    assert parse_config(_rule(prior="query", prior_source="web")).rules[0].prior_source == "web"  # DICOMweb
    action = _routed("chest", parse_config(_rule(prior="query", prior_source="pacs")).rules[0])
    assert (action.prior, action.prior_source) == ("query", "pacs")
    assert "priors from pacs" in describe_action(action)
    assert "no prior comparison" in describe_action(_routed("chest", parse_config(_rule(prior="off")).rules[0]))
    cases = [
        (_rule(prior="query"), "rules.0.prior_source: prior query needs the destination to ask (prior_source)"),
        (_rule(prior="history", prior_source="pacs"), "rules.0.prior_source: only with prior: query, not history"),
        (_rule(prior="query", prior_source="rest"),
         "rules.0.prior_source: 'rest' is not a destination of kind dicom or stow (those: pacs, web)"),
        (_rule(prior="sometimes"), "rules.0.prior: Input should be 'off', 'history' or 'query'"),
        ({**_CONFIG, "rules": [{"name": "fwd", "action": "forward", "destinations": ["pacs"], "prior": "history"}]},
         "rules.0.prior: only for action analyse, not forward"),
        ({**_CONFIG, "priors": {"max_interval_days": 0}}, "priors.max_interval_days: Input should be greater than 0"),
    ]
    for data, expected in cases:
        with pytest.raises(ConfigError) as info:
            parse_config(data)
        assert expected in info.value.problems, info.value.problems


def _analysed(patient_id: str | None, study_uid: str, day: str, involvement: float, score: int):
    """A volume header and an analysis result as PriorLookup sees them."""
    from types import SimpleNamespace

    from pydicom.dataset import Dataset

    header = Dataset()
    if patient_id is not None:
        header.PatientID = patient_id
    header.StudyDate = day
    volume = SimpleNamespace(datasets=[header], study_instance_uid=study_uid, series_instance_uid=study_uid + ".1")
    lobes = [SimpleNamespace(severity=score // 5)] * 5
    result = SimpleNamespace(involvement_percent=involvement, lesion_volume_ml=involvement * 40,
                             ct_severity_score=score, case_class="covid_like", lobes=lobes)
    return volume, result


def test_lookup_compares_with_the_history_when_the_pacs_is_away(tmp_path):
    from ct_ai_node.ingress.prior_retrieve import PacsQuery
    from ct_ai_node.node.priors import PriorLookup
    from ct_ai_node.peers import free_port

    history = PatientHistory(tmp_path / "node.db")
    settings = PriorsSection()
    first = PriorLookup(history, settings, "radlogics", job_id=1)
    assert first.compare(*_analysed("P-9", "1.1", "20210301", 2.0, 3)) == (None, [])  # no prior yet
    first.record(*_analysed("P-9", "1.1", "20210301", 2.0, 3))

    nobody = PacsQuery("127.0.0.1", free_port(), "PACS", "CTAI", timeout_s=2)
    lookup = PriorLookup(history, settings, "radlogics", "query", nobody, analyse_prior=lambda folder: None,
                         scratch=tmp_path / "scratch", job_id=2)
    comparison, notes = lookup.compare(*_analysed("P-9", "1.2", "20210305", 12.0, 10))
    assert comparison is not None and (comparison.change, comparison.source, comparison.interval_days) == (
        "worse", "history", 4)
    assert len(notes) == 1 and notes[0].startswith("no prior study from the PACS: association with PACS@127.0.0.1")

    assert first.compare(*_analysed(None, "1.3", "20210306", 1.0, 1)) == (
        None, ["no comparison with a prior study: the series has no PatientID"])
    assert first.compare(*_analysed("P-9", "1.3", "", 1.0, 1)) == (
        None, ["no comparison with a prior study: the study has no StudyDate"])
    # another patient: nothing
    assert first.compare(*_analysed("P-10", "2.1", "20210306", 1.0, 1)) == (None, [])


def test_the_retention_pass_forgets_old_findings(tmp_path):
    """priors.history_days: the node's retention pass deletes findings analysed longer ago,
    with one history connection kept from pass to pass."""
    import logging
    import time

    from ct_ai_node.config import NodeConfig
    from ct_ai_node.node import Node

    config = NodeConfig.model_validate({
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 0}, "workers": {"count": 0},
        "priors": {"history_days": 1 / 86400}})  # one second
    node = Node(config, log_level=logging.WARNING)
    history = PatientHistory(config.storage.db_path)
    history.record(patient_key("P-1"), "1.1.1", "radlogics", _study("1.1", "20210301", 3.0, 4), "spool")
    node._retain()
    assert len(history.studies(patient_key("P-1"), "radlogics")) == 1  # not a second old yet
    opened = node._history
    time.sleep(1.2)
    node._retain()
    assert history.studies(patient_key("P-1"), "radlogics") == [] and node._history is opened
