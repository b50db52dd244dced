"""The optional FHIR DiagnosticReport destination (issue 16, item 5): the report built from
a real analysis and validated with the ``fhir.resources`` R4B models, the destination
against a real HTTP server on loopback that honours FHIR conditional create
(``If-None-Exist``), and the ``kind: fhir`` configuration."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from ct_ai_node import config_edit
from ct_ai_node.config import ConfigError, FhirDestination as FhirConfig, parse_config
from ct_ai_node.egress import DestinationError, FhirDestination, destination_from_config
from ct_ai_node.egress.fhir import find_sr
from ct_ai_node.writers.fhir_report import diagnostic_report, fhir_datetime
from ct_ai_node.writers.seg import LOBE_CODES

SAMPLE = Path(__file__).resolve().parents[1] / "sample_series" / "covid_like"
DISCLAIMER = "AI suggestion, NOT FOR DIAGNOSTIC USE (trained on "


# -- one real analysis ----------------------------------------------------------------

@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """(outbox folder, result.json document, the SR's header, the result files) of one
    analysis of the bundled COVID-19-like sample."""
    from ct_ai_node.analyze import AnalyzeOptions, analyze_folder

    out = tmp_path_factory.mktemp("job-1")
    doc = analyze_folder(SAMPLE, out, AnalyzeOptions(parallel_writers=False))
    assert doc.status == "done", doc.reason
    result = json.loads((out / "result.json").read_text())
    header = pydicom.dcmread(out / "sr.dcm", stop_before_pixels=True)
    return out, result, header, [out / name for name in result["outputs"]]


@pytest.fixture()
def report(analysed):
    _, result, header, _ = analysed
    return diagnostic_report(result, header)


def _contained(rep: dict) -> dict[str, dict]:
    return {o["id"]: o for o in rep.get("contained", [])}


def _codes(concept: dict) -> set[tuple[str, str]]:
    return {(c.get("system"), c.get("code")) for c in concept.get("coding", [])}


def test_report_validates_as_fhir_r4b(report):
    """The whole resource, contained Observations included, parses with the R4B models
    (R4B's DiagnosticReport and Observation are R4's), and nothing is dropped on the way."""
    try:
        from fhir.resources.R4B.diagnosticreport import DiagnosticReport
        from fhir.resources.R4B.observation import Observation
    except ImportError:
        pytest.skip("fhir.resources not installed (pip install -e '.[test]')")
    model = DiagnosticReport.model_validate(report)
    assert json.loads(model.model_dump_json())["conclusion"] == report["conclusion"]
    assert len(model.contained) == len(report["contained"]) > 0
    for obs in report["contained"]:
        Observation.model_validate(obs)
    assert all(type(c).__name__ == "Observation" for c in model.contained)
    # the validator must be able to fail: a time of day without a zone is not an instant
    broken = copy.deepcopy(report)
    broken["issued"] = broken["issued"][:19]
    with pytest.raises(Exception):
        DiagnosticReport.model_validate(broken)


def test_report_header_parts(analysed, report):
    _, result, header, _ = analysed
    assert report["resourceType"] == "DiagnosticReport"
    assert report["status"] == "preliminary"
    assert ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD") in _codes(report["category"][0])
    assert _codes(report["code"]) == {("http://loinc.org", "24627-2")}
    assert report["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{header.SOPInstanceUID}"}]
    subject = report["subject"]
    assert subject["type"] == "Patient" and subject["identifier"]["value"] == header.PatientID
    assert "reference" not in subject  # a logical reference: the node knows no FHIR ids
    assert report["imagingStudy"] == [{"type": "ImagingStudy", "identifier": {
        "system": "urn:dicom:uid", "value": f"urn:oid:{header.StudyInstanceUID}"}}]
    assert report["basedOn"][0]["identifier"]["value"] == header.AccessionNumber
    d = header.StudyDate
    assert report["effectiveDateTime"].startswith(f"{d[:4]}-{d[4:6]}-{d[6:]}T")
    c = header.ContentDate
    assert report["issued"].startswith(f"{c[:4]}-{c[4:6]}-{c[6:]}T")
    assert result["study_instance_uid"] == header.StudyInstanceUID


def test_report_conclusion(analysed, report):
    _, result, _, _ = analysed
    text = report["conclusion"]
    assert text.startswith(f"{DISCLAIMER}{result['trained_on']})"), text
    assert (result.get("case_class_text") or result["label"]) in text
    assert f"CT severity score: {result['ct_severity_score']}/25" in text
    assert f"CO-RADS {result['category_suggestion']['co_rads']}" in text
    assert "mL" in text and "% of the lung volume" in text
    assert "Comparison" not in text  # no prior study in this analysis
    # the narrative says the same, escaped for XHTML
    assert report["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')
    assert "NOT FOR DIAGNOSTIC USE" in report["text"]["div"]
    co_rads = result["category_suggestion"]["co_rads"]
    assert report["conclusionCode"][0]["coding"][0]["code"] == f"CO-RADS-{co_rads}"


def test_report_observations(analysed, report):
    _, result, _, _ = analysed
    contained = _contained(report)
    # every result entry points at a contained Observation and every one is pointed at
    refs = [r["reference"] for r in report["result"]]
    assert sorted(refs) == sorted(f"#{i}" for i in contained)
    assert all(o["resourceType"] == "Observation" and o["status"] == "preliminary" for o in contained.values())
    assert contained["ct-severity"]["valueInteger"] == result["ct_severity_score"]
    lobes = {k: o for k, o in contained.items() if k.startswith("severity-")}
    assert len(lobes) == len(result["lobes"]) == 5
    assert sum(o["valueInteger"] for o in lobes.values()) == result["ct_severity_score"]
    sites = {c["code"] for o in lobes.values() for c in o["bodySite"]["coding"]}
    assert sites == {str(c.value) for c in LOBE_CODES.values()}
    volume = contained["infection-volume"]["valueQuantity"]
    assert volume == {"value": result["lesion_volume_ml"], "unit": "mL", "system": "http://unitsofmeasure.org",
                      "code": "mL"}
    share = contained["involvement"]["valueQuantity"]
    assert share["code"] == "%" and share["value"] == result["involvement_percent"]
    p = contained["probability"]["valueQuantity"]["value"]
    assert 0.0 <= p <= 1.0 and p == result["probability"]


def test_report_comparison_issuer_and_zone(analysed):
    _, result, header, _ = analysed
    result = {**result, "comparison": {"change": "worse", "interval_days": 9,
                                       "text": "Worse than the prior study of 2021-03-06 (9 days earlier).",
                                       "prior": {}, "current": {}}}
    header = copy.deepcopy(header)
    header.TimezoneOffsetFromUTC = "+0130"
    header.IssuerOfPatientID = "1.2.3.4"
    rep = diagnostic_report(result, header)
    assert "Comparison: Worse than the prior study of 2021-03-06 (9 days earlier)." in rep["conclusion"]
    assert rep["effectiveDateTime"].endswith("+01:30")
    assert rep["subject"]["identifier"]["system"] == "urn:oid:1.2.3.4"
    header.IssuerOfPatientID = "https://hospital.example/mrn"
    assert diagnostic_report(result, header)["subject"]["identifier"]["system"] == "https://hospital.example/mrn"
    header.IssuerOfPatientID = "HOSP"  # not a URI: named as the assigner, not passed off as a system
    ident = diagnostic_report(result, header)["subject"]["identifier"]
    assert "system" not in ident and ident["assigner"] == {"display": "HOSP"}
    del header.PatientID
    assert "subject" not in diagnostic_report(result, header)
    # the training text comes from result.json, not from the code
    text = diagnostic_report({**result, "trained_on": "two cats"}, header)["conclusion"]
    assert text.startswith(f"{DISCLAIMER}two cats)")


def test_report_refuses_a_result_that_is_not_done(analysed):
    _, result, header, _ = analysed
    with pytest.raises(ValueError, match="rejected"):
        diagnostic_report({**result, "status": "rejected"}, header)


def test_fhir_datetime():
    assert fhir_datetime("20210315", "170559.123", "-0500") == "2021-03-15T17:05:59-05:00"
    assert fhir_datetime("20210315", "", "") == "2021-03-15"
    assert fhir_datetime("20210315", "1705", "+0000") == "2021-03-15T17:05:00+00:00"
    assert fhir_datetime("", "1705", "") is None
    assert fhir_datetime("20211345", "", "") is None  # month 13


# -- a FHIR server on loopback ----------------------------------------------------------

class FhirServer:
    """Stores DiagnosticReports POSTed to /fhir/DiagnosticReport; honours If-None-Exist
    (identifier=system|value). ``fail_with`` (503, 400 ...) makes it answer that instead."""

    def __init__(self):
        self.requests: list[dict] = []
        self.stored: list[dict] = []
        self.fail_with: int | None = None
        self.token: str | None = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, doc: dict | None = None, headers: dict | None = None):
                body = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # the CapabilityStatement; with ``server.token`` set, only for it
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._answer(401)
                elif self.path == "/fhir/metadata":
                    self._answer(200, {"resourceType": "CapabilityStatement", "status": "active"})
                else:
                    self._answer(404)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    if server.fail_with is not None:
                        self._answer(server.fail_with, {"resourceType": "OperationOutcome", "issue": [{
                            "severity": "error", "code": "invalid",
                            "diagnostics": "DiagnosticReport.status: bad value\nsecond line"}]})
                        return
                    if self.path != "/fhir/DiagnosticReport":
                        self._answer(404)
                        return
                    resource = json.loads(body)
                    wanted = self.headers.get("If-None-Exist", "")
                    if wanted.startswith("identifier="):
                        system, _, value = wanted[len("identifier="):].partition("|")
                        for old in server.stored:
                            if any(i.get("system") == system and i.get("value") == value
                                   for i in old.get("identifier", [])):
                                self._answer(200, old)
                                return
                    resource["id"] = str(len(server.stored) + 1)
                    server.stored.append(resource)
                    self._answer(201, None, {"Location": f"/fhir/DiagnosticReport/{resource['id']}/_history/1"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fhir_server():
    server = FhirServer()
    yield server
    server.close()


def _destination(url: str, **extra) -> FhirDestination:
    """Through the configuration, as the worker builds it."""
    cfg = parse_config({"destinations": [{"name": "ehr", "kind": "fhir", "url": url, **extra}]})
    dest = destination_from_config(cfg.destinations[0])
    assert isinstance(dest, FhirDestination)
    return dest


def test_send_creates_one_report_and_a_resend_creates_none(analysed, fhir_server, caplog):
    _, _, header, files = analysed
    dest = _destination(fhir_server.url + "/", token="s3cret-token")
    with caplog.at_level(logging.DEBUG):
        first = dest.send(files)
    assert (first.sent, first.already_present, first.destination) == (1, 0, "ehr")
    assert first.bytes_sent > 0
    assert len(fhir_server.requests) == 1 and len(fhir_server.stored) == 1
    req = fhir_server.requests[0]
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert req["path"] == "/fhir/DiagnosticReport"
    assert headers["content-type"].startswith("application/fhir+json")
    assert headers["authorization"] == "Bearer s3cret-token"
    assert headers["if-none-exist"] == f"identifier=urn:dicom:uid|urn:oid:{header.SOPInstanceUID}"
    sent = json.loads(req["body"])
    assert sent["resourceType"] == "DiagnosticReport" and sent["conclusion"].startswith(DISCLAIMER)
    # patient data stays out of the log
    assert header.PatientID not in caplog.text and str(header.AccessionNumber) not in caplog.text

    again = dest.send(files)
    assert (again.sent, again.already_present, again.total) == (0, 1, 1)
    assert len(fhir_server.requests) == 2  # one POST per send
    assert len(fhir_server.stored) == 1  # nothing new


def test_basic_auth(analysed, fhir_server):
    _, _, _, files = analysed
    _destination(fhir_server.url, username="ctai", password="pw").send(files)
    headers = {k.lower(): v for k, v in fhir_server.requests[0]["headers"].items()}
    assert headers["authorization"].startswith("Basic ")


def test_server_error_is_retryable(analysed, fhir_server):
    _, _, _, files = analysed
    fhir_server.fail_with = 503
    with pytest.raises(DestinationError) as info:
        _destination(fhir_server.url).send(files)
    assert info.value.retryable and "HTTP 503" in str(info.value) and str(info.value).startswith("ehr: ")
    assert fhir_server.stored == []


def test_refused_report_is_not_retryable_with_the_servers_words(analysed, fhir_server):
    _, _, _, files = analysed
    fhir_server.fail_with = 400
    with pytest.raises(DestinationError) as info:
        _destination(fhir_server.url).send(files)
    message = str(info.value)
    assert not info.value.retryable
    assert "HTTP 400" in message and "DiagnosticReport.status: bad value second line" in message
    assert "\n" not in message


def test_wrong_base_url_is_not_retryable(analysed, fhir_server):
    _, _, _, files = analysed
    with pytest.raises(DestinationError) as info:
        _destination(fhir_server.url.replace("/fhir", "/nothing")).send(files)
    assert not info.value.retryable and "HTTP 404" in str(info.value)


def test_nobody_listening_is_retryable(analysed):
    _, _, _, files = analysed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DestinationError) as info:
        _destination(f"http://127.0.0.1:{port}/fhir", timeout_s=5).send(files)
    assert info.value.retryable


def _copy_sr(analysed, folder: Path, name: str = "sr.dcm", result: dict | None = None) -> Path:
    out, doc, _, _ = analysed
    folder.mkdir()
    shutil.copy(out / "sr.dcm", folder / name)
    shutil.copy(out / "seg.dcm", folder / "seg.dcm")
    if result is not None:
        (folder / "result.json").write_text(json.dumps({**doc, **result}))
    return folder


def test_notices_and_missing_results_are_skipped(analysed, fhir_server, tmp_path, caplog):
    dest = _destination(fhir_server.url)
    rejected = _copy_sr(analysed, tmp_path / "rejected", "notice_sr.dcm", {"status": "rejected", "reason": "MR"})
    no_result = _copy_sr(analysed, tmp_path / "no-result")
    no_sr = _copy_sr(analysed, tmp_path / "no-sr", result={})
    with caplog.at_level(logging.INFO, logger="ct_ai_node.egress.fhir"):
        for files in ([rejected / "notice_sr.dcm", rejected / "seg.dcm"], [no_result / "sr.dcm"], [no_sr / "seg.dcm"]):
            report = dest.send(files)
            assert (report.sent, report.total) == (0, 0)
    assert fhir_server.requests == []
    assert caplog.text.count("no DiagnosticReport sent") == 3


def test_the_sr_is_found_by_modality(analysed, fhir_server, tmp_path):
    folder = _copy_sr(analysed, tmp_path / "renamed", "result_sr.dcm", result={})
    files = [folder / "seg.dcm", folder / "result_sr.dcm"]
    assert find_sr(files) == folder / "result_sr.dcm"
    assert _destination(fhir_server.url).send(files).sent == 1


def test_damaged_result_is_not_retryable(analysed, fhir_server, tmp_path):
    folder = _copy_sr(analysed, tmp_path / "damaged", result={})
    (folder / "result.json").write_text("{not json")
    with pytest.raises(DestinationError) as info:
        _destination(fhir_server.url).send([folder / "sr.dcm"])
    assert not info.value.retryable and "result.json" in str(info.value)
    assert fhir_server.requests == []


# -- configuration ------------------------------------------------------------------------

def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_fhir_destination_parses():
    cfg = parse_config({
        "destinations": [{"name": "ehr", "kind": "fhir", "url": "https://fhir.example.org/r4/", "token": "t0ken",
                          "timeout_s": 20}],
        "rules": [{"name": "chest", "when": [{"tag": "Modality", "equals": "CT"}], "action": "analyse",
                   "destinations": ["ehr"]}],
    })
    dest = cfg.destination("ehr")
    assert isinstance(dest, FhirConfig)
    assert dest.url == "https://fhir.example.org/r4" and dest.timeout_s == 20
    assert dest.token.get_secret_value() == "t0ken"
    assert "t0ken" not in repr(cfg) and "t0ken" not in cfg.model_dump_json()
    built = destination_from_config(dest)
    assert (built.url, built.token, built.timeout_s) == ("https://fhir.example.org/r4", "t0ken", 20.0)


def test_fhir_destination_problems_name_the_field():
    assert "destinations.0.url: Field required" in _problems({"destinations": [{"name": "ehr", "kind": "fhir"}]})
    assert "destinations.0.url: 'ftp://h/fhir' is not an http:// or https:// URL" in _problems(
        {"destinations": [{"name": "ehr", "kind": "fhir", "url": "ftp://h/fhir"}]})
    assert "destinations.0.token: token or username/password, not both" in _problems(
        {"destinations": [{"name": "ehr", "kind": "fhir", "url": "http://h/fhir", "token": "t",
                           "username": "u", "password": "p"}]})
    assert "destinations.0.ae_title: unknown field" in _problems(
        {"destinations": [{"name": "ehr", "kind": "fhir", "url": "http://h/fhir", "ae_title": "X"}]})
    assert "destinations.0.kind: must be one of dicom, stow, orthanc, fhir, got 'hl7'" in _problems(
        {"destinations": [{"name": "ehr", "kind": "hl7", "url": "http://h/fhir"}]})


def test_web_editor_masks_the_token():
    data = {"destinations": [{"name": "ehr", "kind": "fhir", "url": "http://h/fhir", "token": "t0ken"}]}
    text = config_edit.section_text(data, "destinations")
    assert "t0ken" not in text and config_edit.MASK in text
    saved = config_edit.with_section(data, "destinations", config_edit.parse_section(text, "destinations"))
    assert saved["destinations"][0]["token"] == "t0ken"  # a mask saved back keeps the token
    with pytest.raises(ConfigError) as info:
        config_edit.with_section({}, "destinations", config_edit.parse_section(text, "destinations"))
    assert info.value.problems == ["destinations.0.token: type the token (no saved one for 'ehr')"]


def test_web_test_button_asks_the_capability_statement_with_the_token(fhir_server):
    from ct_ai_node.egress.probe import probe_destination

    fhir_server.token = "s3cret-token"
    config = {"destinations": [{"name": "ehr", "kind": "fhir", "url": fhir_server.url, "token": "s3cret-token"}]}
    result = probe_destination(parse_config(config), "ehr", timeout_s=5)
    assert result.ok and "/fhir/metadata answered HTTP 200" in result.message, result
    config["destinations"][0]["token"] = "wrong"
    result = probe_destination(parse_config(config), "ehr", timeout_s=5)
    assert not result.ok and "refused the credentials (HTTP 401)" in result.message, result
