"""Comparison with the prior study through a real Orthanc (issue 16's acceptance):

* own history: two studies of one patient (the second with more disease) reach the node in
  turn through Orthanc (its /changes feed); the second SR states "worse" with both CT severity
  scores and the interval;
* query the PACS: a prior that only Orthanc holds is found (C-FIND, or QIDO-RS), retrieved
  (C-GET, or WADO-RS) and analysed before the new study, which is then compared with it; nothing
  is sent for the prior.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import pydicom
import pytest

from ct_ai_node.node.history import PatientHistory, patient_key
from ct_ai_node.peers import Orthanc, dcmtk_tool, free_port
from ct_ai_node.synthetic import copy_as_new_study
from node_harness import CHEST_RULE, REPO, SAMPLE_COVID, NodeProcess, dcmtk, node_config
from test_orthanc_feed import _store_into_orthanc, _wait_results
from test_scale_out import _orthanc_study

SAMPLE_NORMAL = REPO / "sample_series" / "normal"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dcmtk_tool("storescu") and (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists())),
                       reason="DCMTK or Orthanc not installed (make test installs them)"),
]

PATIENT = {"PatientID": "SYN-PRIOR-0001", "IssuerOfPatientID": "SITE-A"}


def _content(items, out: dict[str, list]) -> dict[str, list]:
    """Concept code value -> the values of the SR content items with that concept (text,
    number, code value), the whole tree."""
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        if "TextValue" in item:
            out.setdefault(name, []).append(str(item.TextValue))
        elif "MeasuredValueSequence" in item:
            out.setdefault(name, []).append(float(item.MeasuredValueSequence[0].NumericValue))
        elif "ConceptCodeSequence" in item:
            out.setdefault(name, []).append(str(item.ConceptCodeSequence[0].CodeValue))
        if "ContentSequence" in item:
            _content(item.ContentSequence, out)
    return out


def _report_of(orthanc: Orthanc, study_uid: str) -> dict[str, list]:
    """The content of the full AI report (the SR with the classification) Orthanc holds."""
    found = httpx.post(f"{orthanc.url}/tools/find", json={"Level": "Instance", "Expand": True,
                       "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}, timeout=10).json()
    for instance in found:
        data = httpx.get(f"{orthanc.url}/instances/{instance['ID']}/file", timeout=30).content
        ds = pydicom.dcmread(io.BytesIO(data))
        content = _content(ds.ContentSequence, {})
        if "CT-SEVERITY" in content:  # the full report, not the display SR
            return content
    raise AssertionError(f"no AI report with a CT severity score in {study_uid}")


def _result(node: NodeProcess, study_uid: str) -> dict:
    for path in sorted((node.root / "outbox").glob("job-*/result.json")):
        doc = json.loads(path.read_text())
        if doc.get("study_instance_uid") == study_uid:
            return doc
    raise AssertionError(f"no result.json for {study_uid}")


def _assert_worse_than_the_prior(report: dict[str, list], doc: dict, prior_uid: str) -> None:
    comparison = doc["comparison"]
    assert comparison["change"] == "worse" and comparison["interval_days"] == 14, comparison
    assert comparison["prior"]["study_instance_uid"] == prior_uid
    assert comparison["prior"]["study_date"] == "2021-03-01" and comparison["current"]["study_date"] == "2021-03-15"
    prior_score, score = comparison["prior"]["ct_severity_score"], comparison["current"]["ct_severity_score"]
    assert score == doc["ct_severity_score"] and score - prior_score >= 2
    assert f"CT severity score {prior_score} -> {score} of 25" in comparison["text"]
    # the SR: the change coded, both scores, the interval, and the sentence viewers list
    assert report["PRIOR-CHANGE"] == ["PRIOR-WORSE"]
    assert report["PRIOR-SEVERITY"] == [prior_score] and score in report["CT-SEVERITY"]
    assert report["PRIOR-INTERVAL"] == [14.0]
    titles = report["112039"]  # Tracking Identifier
    assert "AI comparison with prior study of 2021-03-01 (14 days earlier): worse" in titles


def test_second_study_of_a_patient_is_compared_with_the_first_through_orthanc(tmp_path):
    with Orthanc(tmp_path / "orthanc", extra_config={"StableAge": 1}).start() as orthanc:
        config = node_config(
            free_port(),
            destinations=[{"name": "orthanc", "kind": "orthanc", "url": orthanc.url}],
            rules=[{**CHEST_RULE, "when": [*CHEST_RULE["when"], {"calling_ae": {"equals": "ORTHANC"}}],
                    "destinations": ["orthanc"]}],  # prior: history is the default
            orthanc_feed={"url": orthanc.url, "poll_s": 0.5},
        )
        node = NodeProcess(tmp_path / "node", config).start()
        try:
            first = copy_as_new_study(SAMPLE_NORMAL, tmp_path / "first", StudyDate="20210301", **PATIENT)
            _store_into_orthanc(orthanc, tmp_path / "first")
            _wait_results(orthanc, first)
            second = copy_as_new_study(SAMPLE_COVID, tmp_path / "second", StudyDate="20210315", **PATIENT)
            _store_into_orthanc(orthanc, tmp_path / "second")
            _wait_results(orthanc, second)
            node.wait_jobs("analyse", 2)

            assert "comparison" not in _result(node, first) or _result(node, first)["comparison"] is None
            assert "PRIOR-CHANGE" not in _report_of(orthanc, first)
            doc = _result(node, second)
            assert doc["comparison"]["source"] == "history"
            _assert_worse_than_the_prior(_report_of(orthanc, second), doc, first)
            # another patient's study of the same day is not this patient's prior
            other = copy_as_new_study(SAMPLE_COVID, tmp_path / "other", StudyDate="20210316",
                                      PatientID="SYN-PRIOR-0001", IssuerOfPatientID="SITE-B")
            _store_into_orthanc(orthanc, tmp_path / "other")
            _wait_results(orthanc, other)
            assert _result(node, other)["comparison"] is None
        finally:
            node.stop()


@pytest.mark.parametrize("source", ["pacs", "pacs-web"])
def test_prior_only_in_the_pacs_is_found_retrieved_and_analysed_first(tmp_path, source):
    """``pacs``: C-FIND + C-GET at Orthanc's DICOM port; ``pacs-web``: QIDO-RS + WADO-RS at its
    DICOMweb root."""
    port = free_port()
    # Orthanc lets the node query and retrieve: it knows its AE title
    with Orthanc(tmp_path / "orthanc", modalities={"ctai": ("CTAI", "127.0.0.1", port)}).start() as orthanc:
        prior = copy_as_new_study(SAMPLE_NORMAL, tmp_path / "prior", StudyDate="20210301", **PATIENT)
        _store_into_orthanc(orthanc, tmp_path / "prior")
        # neither a later study of the patient nor another patient's study may be taken for the prior
        later = copy_as_new_study(SAMPLE_NORMAL, tmp_path / "later", StudyDate="20210320", **PATIENT)
        _store_into_orthanc(orthanc, tmp_path / "later")
        stranger = copy_as_new_study(SAMPLE_NORMAL, tmp_path / "stranger", StudyDate="20210310",
                                     PatientID="SYN-PRIOR-0002")
        _store_into_orthanc(orthanc, tmp_path / "stranger")

        config = node_config(
            port,
            destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                           "ae_title": orthanc.ae_title},
                          {"name": "pacs-web", "kind": "stow", "url": orthanc.dicomweb_url}],
            rules=[{**CHEST_RULE, "destinations": ["pacs"], "prior": "query", "prior_source": source}],
        )
        node = NodeProcess(tmp_path / "node", config).start()
        try:
            current = copy_as_new_study(SAMPLE_COVID, tmp_path / "current", StudyDate="20210315", **PATIENT)
            sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "CTAI", "+sd", "127.0.0.1", str(port),
                         str(tmp_path / "current"))
            assert sent.returncode == 0, sent.stderr[-1000:]
            _wait_results(orthanc, current)
            jobs = node.wait_jobs("analyse", 1)
            assert len(jobs) == 1  # the prior is no job of its own: analysed inside this one

            doc = _result(node, current)
            assert doc["comparison"]["source"] == "pacs"
            _assert_worse_than_the_prior(_report_of(orthanc, current), doc, prior)
            # the prior was analysed first and kept in the history; nothing was sent for it
            history = PatientHistory(node.root / "node.db")
            key = patient_key(PATIENT["PatientID"], PATIENT["IssuerOfPatientID"])
            assert history.sources(key, prior) == ["pacs"] and history.sources(key, current) == ["spool"]
            rows = {s.study_instance_uid: s for s in history.studies(key, "radlogics")}
            assert set(rows) == {prior, current}
            assert all(_orthanc_study(orthanc, uid) == {"CT": 56} for uid in (prior, later, stranger))
            assert not list((node.root / "outbox").glob("prior-*"))  # the retrieved copy is gone
        finally:
            node.stop()
