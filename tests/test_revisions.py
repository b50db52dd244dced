"""Re-analysis without duplicates: the same series again gives the same result UIDs; a
series that changed gives the next revision, whose SR names the previous one."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pydicom
import pytest

from ct_ai_node.jobqueue import JobState
from ct_ai_node.node.revisions import (
    AnalysisRecord,
    RevisionLog,
    instance_fingerprint,
    plan_revision,
)
from ct_ai_node.peers import dcmtk_tool, Orthanc, free_port
from ct_ai_node.writers import build_outputs
from ct_ai_node.writers.common import ReportRef, ResultUids
from helpers_writers import dciodvfy_errors, make_ct_series, make_result, make_volume
from node_harness import CHEST_RULE, SAMPLE_COVID, NodeProcess, dcmtk, node_config

R1 = ReportRef("1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4.5")
R2 = ReportRef("1.2.3", "1.2.3.6", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.6.7")


def test_fingerprint_is_the_set_of_instances():
    assert instance_fingerprint(["1.2", "1.3"]) == instance_fingerprint(["1.3", "1.2", "1.2"])
    assert instance_fingerprint(["1.2", "1.3"]) != instance_fingerprint(["1.2"])


def test_plan_first_same_again_and_changed():
    assert plan_revision([], "a").revision == 1
    assert plan_revision([], "a").predecessor is None
    first = [AnalysisRecord(1, "a", R1)]
    # the same instances again: the same revision, nothing replaced
    assert plan_revision(first, "a") == plan_revision([], "a")
    # changed: the next revision replaces the newest
    changed = plan_revision(first, "b")
    assert (changed.revision, changed.predecessor) == (2, R1)
    both = [*first, AnalysisRecord(2, "b", R2)]
    assert plan_revision(both, "b").revision == 2 and plan_revision(both, "b").predecessor == R1
    assert plan_revision(both, "c").revision == 3 and plan_revision(both, "c").predecessor == R2
    # back to the first instance set: that revision's UIDs again
    assert plan_revision(both, "a").revision == 1


def test_revision_log_keeps_rows_per_series_and_pipeline(tmp_path):
    log = RevisionLog(tmp_path / "node.db")
    log.record("s1", "radlogics", 1, "a", R1, job_id=3)
    log.record("s1", "radlogics", 1, "a", R1, job_id=4)  # a re-run replaces its row
    log.record("s1", "ctnet", 1, "x", None)
    assert log.records("s1", "radlogics") == [AnalysisRecord(1, "a", R1)]
    assert log.records("s1", "ctnet") == [AnalysisRecord(1, "x", None)]
    assert log.plan("s1", "radlogics", "b").predecessor == R1
    assert RevisionLog(tmp_path / "node.db").plan("s2", "radlogics", "a").revision == 1


def test_second_revision_sr_names_its_predecessor_and_says_its_revision():
    volume = make_volume(make_ct_series())
    result = make_result(volume)
    first = build_outputs(volume, result)
    assert "PredecessorDocumentsSequence" not in first.sr
    assert "rev" not in first.sr.SeriesDescription
    previous = ReportRef.of(first.sr)
    second = build_outputs(volume, result, uids=ResultUids.for_analysis(volume, result, 2, previous))
    item = second.sr.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == first.sr.StudyInstanceUID
    assert item.ReferencedSeriesSequence[0].SeriesInstanceUID == first.sr.SeriesInstanceUID
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.sr.SOPInstanceUID
    for ds in second.datasets():
        assert "rev 2" in ds.SeriesDescription, ds.SeriesDescription
    assert {ds.SOPInstanceUID for ds in first.datasets()}.isdisjoint(ds.SOPInstanceUID for ds in second.datasets())
    if shutil.which("dciodvfy"):
        errors, _ = dciodvfy_errors(second.sr)
        assert errors == []


# --- the node, a real Orthanc ------------------------------------------------------


def _orthanc_results(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """SOP Instance UID -> tags of every result instance (not CT) in the study."""
    found = httpx.post(f"{orthanc.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                       timeout=10).json()
    assert found, "the study is not in Orthanc"
    out = {}
    for inst in httpx.get(f"{orthanc.url}/studies/{found[0]}/instances", timeout=10).json():
        tags = httpx.get(f"{orthanc.url}/instances/{inst['ID']}/simplified-tags", timeout=10).json()
        if tags.get("Modality") != "CT":
            out[tags["SOPInstanceUID"]] = tags
    return out


def _send(port: int, files: list[Path]) -> None:
    sent = dcmtk("storescu", "-aet", "STORESCU", "-aec", "CTAI", "127.0.0.1", str(port), *map(str, files))
    assert sent.returncode == 0, sent.stderr[-1000:]


@pytest.mark.slow
@pytest.mark.skipif(not (dcmtk_tool("storescu") and (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists())),
                    reason="DCMTK or Orthanc not installed (make test installs them)")
def test_resent_series_gives_one_result_set_and_late_instances_a_second_revision(tmp_path):
    files = sorted(SAMPLE_COVID.glob("*.dcm"))
    first_part, late = files[:-8], files[-8:]
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with Orthanc(tmp_path / "orthanc").start() as orthanc:
        port = free_port()
        config = node_config(
            port,
            destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                           "ae_title": orthanc.ae_title}],
            rules=[{**CHEST_RULE, "destinations": ["pacs"]}],
        )
        with NodeProcess(tmp_path / "node", config) as node:
            _send(port, first_part)
            [job1] = node.wait_jobs("analyse", 1)
            assert job1.state == JobState.DONE, job1.last_error
            node.wait_jobs("deliver", 1)
            once = _orthanc_results(orthanc, study)
            assert len(once) > 5

            # the same instances again: analysed again, the same UIDs: nothing new in Orthanc
            _send(port, first_part)
            jobs = sorted(node.wait_jobs("analyse", 2), key=lambda j: j.id)
            assert [j.state for j in jobs] == [JobState.DONE] * 2, [j.last_error for j in jobs]
            node.wait_jobs("deliver", 2)
            assert set(_orthanc_results(orthanc, study)) == set(once)
            out = node.root / "outbox"
            again = sorted(p.name for p in (out / f"job-{jobs[1].id}").glob("*.dcm"))
            assert again == sorted(p.name for p in (out / f"job-{job1.id}").glob("*.dcm"))
            sr1 = str(pydicom.dcmread(out / f"job-{job1.id}" / "sr.dcm", stop_before_pixels=True).SOPInstanceUID)
            assert sr1 in once

            # the series completed late: a second revision whose SR names the first
            _send(port, late)
            jobs = sorted(node.wait_jobs("analyse", 3), key=lambda j: j.id)
            assert [j.state for j in jobs] == [JobState.DONE] * 3, [j.last_error for j in jobs]
            node.wait_jobs("deliver", 3)
            sr2 = pydicom.dcmread(out / f"job-{jobs[2].id}" / "sr.dcm", stop_before_pixels=True)
            ref = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == sr1
            assert "rev 2" in sr2.SeriesDescription
            both = _orthanc_results(orthanc, study)
            assert set(once) < set(both)  # revision 1 stays, revision 2 is added beside it
            assert str(sr2.SOPInstanceUID) in both
            new = [both[uid].get("SeriesDescription", "") for uid in set(both) - set(once)]
            assert new and all("rev 2" in text for text in new), sorted(set(new))
