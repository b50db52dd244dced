"""Issue 11: a routed series that is not analysed (refused by the analysis, or failed for
good after its retries) sends an "AI analysis not performed: <reason>" Secondary Capture
and Basic Text SR to the rule's destinations, in the source's study; switchable per rule.

Unit tests of ``writers/notice.py`` (dciodvfy on every object, damaged source headers),
the rule flag, the worker's failure-after-retries path with a real Storage SCP, and the
node end to end with a real Orthanc."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from ct_ai_node.config import NodeConfig
from ct_ai_node.jobqueue import FINAL_STATES, JobState, SqliteJobQueue
from ct_ai_node.node.dispatcher import _job_payload
from ct_ai_node.peers import dcmtk_tool, Orthanc, StoreSCP, free_port
from ct_ai_node.rules.routing import SeriesFacts, describe_action, route
from ct_ai_node.spool import InstanceMeta, Spool
from ct_ai_node.writers.common import lo
from ct_ai_node.writers.notice import (
    BASIC_TEXT_SR_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    algorithm_for_pipeline,
    build_notice,
)
from helpers_dicom import write_ct_series
from helpers_writers import dciodvfy_errors, make_ct_series, roundtrip, to_bytes
from node_harness import NodeProcess, dcmtk, node_config

REASON = "too few slices: 5 < 20"


def assert_valid(ds) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH: IOD validation skipped")
    errors, _ = dciodvfy_errors(ds)
    assert errors == [], "\n".join(errors)


def sr_texts(ds) -> dict[str, str]:
    """Concept meaning -> text of the SR's TEXT items."""
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
            for item in ds.ContentSequence if item.ValueType == "TEXT"}


def _source():
    return make_ct_series(1, 16, 16, with_pixels=False)[0]


# --- writers/notice.py ------------------------------------------------------------------


def test_notice_objects_are_valid_and_in_the_source_study():
    source = _source()
    notice = build_notice(source, REASON, algorithm_for_pipeline("radlogics"), "radlogics")
    sc, sr = (roundtrip(ds) for _, ds in notice.named())
    for ds in (sc, sr):
        assert_valid(ds)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) == (
            source.PatientName, source.PatientID, source.PatientBirthDate, source.AccessionNumber)
        assert ds.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")
    assert sc.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE and sc.Modality == "OT"
    assert sr.SOPClassUID == BASIC_TEXT_SR_STORAGE and sr.Modality == "SR"
    assert sc.ImageComments == f"AI analysis not performed: {REASON}"
    # the text is burned in: a black image with light text in its top and bottom lines
    pixels = sc.pixel_array
    assert pixels.shape == (512, 512, 3) and pixels[:60].max() > 200 and pixels[-60:].max() > 200
    assert pixels[200:400].max() == 0
    texts = sr_texts(sr)
    assert texts["Finding"].startswith(f"AI analysis not performed: {REASON}")
    assert 'series 3 "Chest 2.5mm"' in texts["Finding"]
    assert texts["Algorithm Name"] == "ct-ai-node radlogics pipeline"
    assert texts["Algorithm Version"]
    assert "NOT FOR DIAGNOSTIC USE" in texts["Comment"]
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"


def test_same_notice_same_uids_other_reason_other_uids():
    source = _source()
    algo = algorithm_for_pipeline("radlogics")
    a, b = build_notice(source, REASON, algo, "radlogics"), build_notice(source, REASON, algo, "radlogics")
    other = build_notice(source, "no lungs found", algo, "radlogics")
    uids = [(n.sc.SOPInstanceUID, n.sr.SOPInstanceUID, n.sc.SeriesInstanceUID) for n in (a, b, other)]
    assert uids[0] == uids[1]
    assert not set(uids[0]) & set(uids[2])
    assert len({a.sc.SOPInstanceUID, a.sr.SOPInstanceUID, a.sc.SeriesInstanceUID, a.sr.SeriesInstanceUID}) == 4


def _damaged_file(tmp_path: Path) -> Path:
    """A header as some exports write it: no PatientName, PatientBirthDate or StudyDate,
    an unknown character set with non-ASCII bytes, an invalid sex and study time."""
    ds = _source()
    del ds.PatientName, ds.PatientBirthDate, ds.StudyDate
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.PatientSex = "X"
    ds.StudyTime = "25:99"
    path = tmp_path / "damaged.dcm"
    raw = to_bytes(ds).replace(b"PAT001", b"PAT\xe9\xff1")  # same length: stays a valid file
    path.write_bytes(raw)
    return path


def test_notice_from_a_damaged_header(tmp_path):
    source = pydicom.dcmread(_damaged_file(tmp_path))
    study = str(source.StudyInstanceUID)
    notice = build_notice(source, REASON, algorithm_for_pipeline("ctnet"), "ctnet")  # pydicom warns, no more
    for _, ds in notice.named():
        ds = roundtrip(ds)
        assert_valid(ds)
        assert ds.StudyInstanceUID == study
        assert ds.PatientName == "" and ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert ds.StudyDate == "" and ds.StudyTime == ""
        assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.PatientID.startswith("PAT")
    assert sr_texts(roundtrip(notice.sr))["Finding"].startswith(f"AI analysis not performed: {REASON}")


@pytest.mark.parametrize("bad", ["1.2.abc.3", "1.02.3", "", "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"])
def test_an_invalid_study_uid_is_replaced_by_a_valid_stable_one(bad):
    source = _source()
    source.StudyInstanceUID = bad
    algo = algorithm_for_pipeline("radlogics")
    notice = build_notice(source, REASON, algo, "radlogics")
    for _, ds in notice.named():
        assert_valid(roundtrip(ds))
    assert notice.sc.StudyInstanceUID == notice.sr.StudyInstanceUID
    assert notice.sc.StudyInstanceUID == build_notice(source, REASON, algo, "radlogics").sc.StudyInstanceUID
    if bad.startswith("f81d"):  # a UUID: its standard form, as the loader repairs it
        assert notice.sc.StudyInstanceUID == "2.25.329800735698586629295641978511506172918"


# --- the rule flag ------------------------------------------------------------------------


def _config(rules: list[dict], **extra) -> NodeConfig:
    return NodeConfig.model_validate({
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 4242, "ae_title": "PACS"}],
        "rules": rules, **extra})


def test_rule_flag_defaults_on_can_be_switched_off_and_is_only_for_analyse():
    cfg = _config([
        {"name": "off", "when": [{"tag": "SeriesDescription", "equals": "off"}], "action": "analyse",
         "destinations": ["pacs"], "notify_not_analysed": False},
        {"name": "on", "action": "analyse", "destinations": ["pacs"]},
    ])
    assert [r.notify_not_analysed for r in cfg.rules] == [False, True]
    facts = SeriesFacts(tags={"Modality": "CT", "SeriesDescription": "off"}, calling_ae="PACS", called_ae="CTAI",
                        instance_count=5)
    off = route(cfg.rules, cfg.routing, facts).actions[0]
    on = route(cfg.rules, cfg.routing, SeriesFacts(**{**facts.__dict__, "tags": {"Modality": "CT"}})).actions[0]
    assert (off.rule, off.notify_not_analysed, on.rule, on.notify_not_analysed) == ("off", False, "on", True)
    assert "no not-analysed notice" in describe_action(off) and "notice" not in describe_action(on)
    with pytest.raises(ValidationError) as err:
        _config([{"name": "fwd", "action": "forward", "destinations": ["pacs"], "notify_not_analysed": True}])
    assert [(e["loc"], e["msg"]) for e in err.value.errors()] == [
        (("rules", 0, "notify_not_analysed"), "only for action analyse, not forward")]


# --- the worker: failure after retries ----------------------------------------------------


def _store(spool: Spool, path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = InstanceMeta(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality,
                        "PACS", "CTAI", "127.0.0.1", str(ds.file_meta.TransferSyntaxUID))
    return spool.store(path.read_bytes(), meta).series_key


def test_analysis_failing_for_good_sends_one_notice_after_the_last_attempt(tmp_path, monkeypatch):
    import ct_ai_node.analyze
    from ct_ai_node.node.worker import Worker
    from ct_ai_node.rules.routing import RoutedAction

    def broken_analysis(*args, **kwargs):
        raise RuntimeError("GPU fell off the bus")

    monkeypatch.setattr(ct_ai_node.analyze, "analyze_folder", broken_analysis)
    written = write_ct_series(tmp_path / "in", n=3, rows=16, cols=16)
    with StoreSCP(tmp_path / "pacs").start() as scp:
        config = NodeConfig.model_validate({
            "storage": {"root": str(tmp_path / "var"), "min_free_mb": 10, "fsync": False},
            "workers": {"device": "cpu"},
            "retry": {"max_attempts": 2},
            "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": scp.port,
                              "ae_title": "STORESCP"}],
        })
        spool = Spool(config.storage.spool_dir, config.storage.db_path, fsync=False)
        queue = SqliteJobQueue(config.storage.db_path, backoff_initial_s=0, backoff_max_s=0)
        try:
            key = [_store(spool, p) for p in written.paths][0]
            action = RoutedAction(rule="chest", action="analyse", pipeline="radlogics", lungs="unet",
                                  destinations=("pacs",))
            job_id = queue.enqueue("analyse", _job_payload(spool.get_series(key), action), max_attempts=2)
            worker = Worker(config, "w1", queue=queue, spool=spool)

            worker.run_once(("analyse",))
            assert queue.get(job_id).state == JobState.QUEUED and queue.children(job_id) == []  # a retry follows
            worker.run_once(("analyse",))
            job = queue.get(job_id)
            assert job.state == JobState.DEAD and "GPU fell off the bus" in job.last_error
            children = queue.children(job_id)
            assert [(c.kind, c.payload["destination"], c.payload["notice"]) for c in children] == [
                ("deliver", "pacs", True)]
            out = config.storage.outbox_dir / f"job-{job_id}"
            assert sorted(p.name for p in out.glob("*.dcm")) == ["notice_sc.dcm", "notice_sr.dcm"]
            doc = json.loads((out / "result.json").read_text())
            assert doc["notice_outputs"] == {"notice_sc.dcm": SECONDARY_CAPTURE_IMAGE_STORAGE,
                                             "notice_sr.dcm": BASIC_TEXT_SR_STORAGE}
            worker._not_analysed(job, "once more")  # a second call (e.g. after a crash) adds nothing
            assert [c.id for c in queue.children(job_id)] == [children[0].id]

            worker.run_once(("deliver",))
            assert queue.get(children[0].id).state == JobState.DONE
        finally:
            queue.close()
            spool.close()
        received = [pydicom.dcmread(p) for p in scp.received()]
    assert sorted(d.Modality for d in received) == ["OT", "SR"]
    assert {d.StudyInstanceUID for d in received} == {written.study_instance_uid}
    sr = next(d for d in received if d.Modality == "SR")
    finding = sr_texts(sr)["Finding"]
    assert finding.startswith("AI analysis not performed: the analysis failed (2 attempt(s)): RuntimeError: GPU")


# --- the node end to end, with a real Orthanc ---------------------------------------------


def _orthanc_study(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    found = httpx.post(f"{orthanc.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                       timeout=10).json()
    if not found:
        return []
    instances = httpx.get(f"{orthanc.url}/studies/{found[0]}/instances", timeout=10).json()
    return [pydicom.dcmread(io.BytesIO(httpx.get(f"{orthanc.url}/instances/{i['ID']}/file", timeout=10).content))
            for i in instances]


@pytest.mark.slow
@pytest.mark.skipif(not (dcmtk_tool("storescu") and (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists())),
                    reason="DCMTK or Orthanc not installed (make test installs them)")
def test_node_sends_not_analysed_notice_to_orthanc_unless_switched_off(tmp_path):
    """Two 5-slice CT series, each matched by an analyse rule without an instance-count
    condition, so the analysis itself refuses them: the rule with the notice on gets an SC
    and an SR in the same study in Orthanc; the rule with it off sends nothing."""
    with Orthanc(tmp_path / "orthanc").start() as orthanc:
        port = free_port()
        analyse = {"action": "analyse", "pipeline": "radlogics", "destinations": ["pacs"]}
        config = node_config(
            port,
            destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                           "ae_title": orthanc.ae_title}],
            rules=[
                {"name": "quiet", "when": [{"tag": "SeriesDescription", "equals": "quiet"}], **analyse,
                 "notify_not_analysed": False},
                {"name": "chest", "when": [{"tag": "Modality", "equals": "CT"}], **analyse},
            ],
        )
        on = write_ct_series(tmp_path / "on", n=5, rows=32, cols=32, description="Thorax 2.5")
        off = write_ct_series(tmp_path / "off", n=5, rows=32, cols=32, description="quiet",
                              study_uid=generate_uid(), series_number=4)
        with NodeProcess(tmp_path / "node", config) as node:
            for folder in (tmp_path / "on", tmp_path / "off"):
                sent = dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(folder))
                assert sent.returncode == 0, sent.stderr[-1000:]
            jobs = {j.payload["rule"]: j for j in node.wait_jobs("analyse", 2, timeout_s=180)}
            assert {r: j.state for r, j in jobs.items()} == {"chest": JobState.FAILED, "quiet": JobState.FAILED}
            reason = jobs["chest"].last_error.removeprefix("not analysed: ")
            assert jobs["chest"].last_error.startswith("not analysed: ") and reason
            assert jobs["quiet"].last_error.startswith("not analysed: ")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                deliveries = node.jobs("deliver")
                if deliveries and all(d.state in FINAL_STATES for d in deliveries):
                    break
                time.sleep(0.3)
            assert [(d.parent_id, d.state) for d in deliveries] == [(jobs["chest"].id, JobState.DONE)], node.log()[-3000:]
            assert node.queue().children(jobs["quiet"].id) == []
            assert node.jobs("analyse")[0].state == JobState.FAILED  # still failed with its reason
        objects = _orthanc_study(orthanc, on.study_instance_uid)
        assert sorted(d.Modality for d in objects) == ["OT", "SR"]
        sc = next(d for d in objects if d.Modality == "OT")
        sr = next(d for d in objects if d.Modality == "SR")
        assert sc.ImageComments == lo(f"AI analysis not performed: {reason}")
        assert np.asarray(sc.pixel_array).max() > 200
        assert sr_texts(sr)["Finding"].startswith(f"AI analysis not performed: {reason}")
        source = pydicom.dcmread(on.paths[0], stop_before_pixels=True)
        assert {(d.PatientID, str(d.PatientName)) for d in objects} == {(source.PatientID, str(source.PatientName))}
        assert _orthanc_study(orthanc, off.study_instance_uid) == []
        assert len(httpx.get(f"{orthanc.url}/instances", timeout=10).json()) == 2
