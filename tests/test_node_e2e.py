"""The node on the network, end to end, with real peers on loopback:
DCMTK storescu/echoscu/storescp, a real Orthanc, ``ct-ai-node serve`` as a process."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ct_ai_node.jobqueue import JobState
from ct_ai_node.peers import dcmtk_tool, Orthanc, StoreSCP, free_port
from ct_ai_node.spool import Spool
from helpers_dicom import write_ct_series
from node_harness import CHEST_RULE, SAMPLE_COVID, NodeProcess, dcmtk, node_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dcmtk_tool("storescu") and (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists())),
                       reason="DCMTK or Orthanc not installed (make test installs them)"),
]

RESULT_MODALITIES = {"SEG", "SR", "OT", "KO"}


def _study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm"),
                               stop_before_pixels=True).StudyInstanceUID)


def _orthanc_series_modalities(orthanc: Orthanc, study_uid: str) -> list[str]:
    found = httpx.post(f"{orthanc.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                       timeout=10).json()
    if not found:
        return []
    series = httpx.get(f"{orthanc.url}/studies/{found[0]}/series", timeout=10).json()
    return sorted(s["MainDicomTags"].get("Modality", "") for s in series)


def test_storescu_to_node_results_reach_orthanc_and_storescp(tmp_path):
    """storescu -> node -> SEG, SC series, SR in the same study in a real Orthanc and at a storescp;
    echoscu works; an unknown caller is refused; a non-matching series is forwarded or discarded."""
    with Orthanc(tmp_path / "orthanc").start() as orthanc, StoreSCP(tmp_path / "storescp").start() as scp:
        port = free_port()
        config = node_config(
            port,
            destinations=[
                {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                 "ae_title": orthanc.ae_title},
                {"name": "archive", "kind": "dicom", "host": "127.0.0.1", "port": scp.port, "ae_title": "STORESCP"},
            ],
            rules=[
                {**CHEST_RULE, "destinations": ["pacs", "archive"]},
                {"name": "mr-to-archive", "when": [{"tag": "Modality", "equals": "MR"}], "action": "forward",
                 "destinations": ["archive"]},
            ],
            allowed_callers=[{"ae_title": "STORESCU", "host": "127.0.0.1"}],
            web={"host": "127.0.0.1", "port": (status_port := free_port())},
        )
        with NodeProcess(tmp_path / "node", config) as node:
            assert dcmtk("echoscu", "-aet", "STORESCU", "-aec", "CTAI", "127.0.0.1", str(port)).returncode == 0
            refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "CTAI", "127.0.0.1", str(port))
            assert refused.returncode != 0
            assert "reject" in (refused.stdout + refused.stderr).lower()

            mr_dir, other_dir = tmp_path / "mr", tmp_path / "other"
            write_ct_series(mr_dir, n=5, rows=32, cols=32, modality="MR", description="MR head")
            write_ct_series(other_dir, n=5, rows=32, cols=32, description="Scout", series_number=7)  # < 20 slices
            for folder in (SAMPLE_COVID, mr_dir, other_dir):
                sent = dcmtk("storescu", "-aet", "STORESCU", "-aec", "CTAI", "+sd", "127.0.0.1", str(port),
                             str(folder))
                assert sent.returncode == 0, sent.stderr[-1000:]
            # the intruder cannot store either
            assert dcmtk("storescu", "-aet", "INTRUDER", "-aec", "CTAI", "+sd", "127.0.0.1", str(port),
                         str(mr_dir)).returncode != 0

            analysed = node.wait_jobs("analyse", 1)
            forwarded = node.wait_jobs("forward", 1)
            assert [j.state for j in analysed] == [JobState.DONE], analysed
            assert [j.state for j in forwarded] == [JobState.DONE], forwarded
            assert len(node.wait_jobs("deliver", 3)) == 3
            # the scout series matched no rule: discarded (kept in the spool, never analysed)
            with Spool(node.root / "spool", node.root / "node.db") as spool:
                states = sorted((r.instance_count, r.state) for r in spool.series())
            assert states == [(5, "discarded"), (5, "routed"), (56, "routed")]
            assert len(analysed) == 1

            # the administrator's status page, JSON and Prometheus metrics
            status = httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=10).json()
            assert status["jobs_by_state"]["done"] == 5  # analyse, forward, 3 deliveries
            assert status["series_by_state"] == {"routed": 2, "discarded": 1}
            metrics = httpx.get(f"http://127.0.0.1:{status_port}/metrics", timeout=10).text
            assert 'ctai_jobs{kind="analyse",state="done"} 1.0' in metrics
            page = httpx.get(f"http://127.0.0.1:{status_port}/", timeout=10).text
            assert "Studies" in page and "chest-ct" in page and "No users are configured" in page
            assert httpx.get(f"http://127.0.0.1:{status_port}/healthz", timeout=10).json()["status"] == "ok"
            job_page = httpx.get(f"http://127.0.0.1:{status_port}/jobs/{analysed[0].id}", timeout=10).text
            assert f"/jobs/{analysed[0].id}/preview/0.png" in job_page and "archive" in job_page
            png = httpx.get(f"http://127.0.0.1:{status_port}/jobs/{analysed[0].id}/preview/0.png", timeout=10)
            assert png.status_code == 200 and png.content[:4] == b"\x89PNG"

        study = _study_uid(SAMPLE_COVID)
        modalities = _orthanc_series_modalities(orthanc, study)
        assert RESULT_MODALITIES <= set(modalities), modalities
        assert "CT" not in modalities  # only results were sent to Orthanc
        n_orthanc = len(httpx.get(f"{orthanc.url}/instances", timeout=10).json())
        outputs = list((node.root / "outbox" / f"job-{analysed[0].id}").glob("*.dcm"))
        assert n_orthanc == len(outputs) > 10

        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in scp.received()]
        results = [d for d in received if d.Modality != "MR"]
        assert len(results) == len(outputs)
        assert {d.StudyInstanceUID for d in results} == {study}
        assert sum(d.Modality == "MR" for d in received) == 5  # forwarded unchanged


def test_destination_down_then_back_and_dead_letter(tmp_path):
    """The C-STORE destination is down when results are ready: retried, delivered once it is
    back. A destination that refuses for good (HTTP 404) ends in dead letter with a reason,
    without holding up the other."""
    with Orthanc(tmp_path / "orthanc").start() as orthanc:
        port, late_port = free_port(), free_port()
        config = node_config(
            port,
            destinations=[
                {"name": "late", "kind": "dicom", "host": "127.0.0.1", "port": late_port, "ae_title": "STORESCP"},
                {"name": "wrong", "kind": "stow", "url": f"{orthanc.url}/no-such-dicom-web"},
            ],
            rules=[{**CHEST_RULE, "destinations": ["late", "wrong"]}],
            retry={"max_attempts": 30, "backoff_initial_s": 1, "backoff_max_s": 2},
        )
        with NodeProcess(tmp_path / "node", config) as node:
            assert dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(SAMPLE_COVID)).returncode == 0
            deadline = time.monotonic() + 240
            late = None
            while time.monotonic() < deadline:  # wait for the first failed attempt at "late"
                late = next((j for j in node.jobs("deliver") if j.payload["destination"] == "late"), None)
                if late is not None and late.last_error:
                    break
                time.sleep(0.3)
            assert late is not None and late.last_error, node.log()[-3000:]
            assert late.state in (JobState.QUEUED, JobState.RUNNING)
            wrong = next(j for j in node.wait_jobs("deliver", 2, final=False) if j.payload["destination"] == "wrong")

            with StoreSCP(tmp_path / "late", port=late_port).start() as scp:
                parent = node.wait_jobs("analyse", 1)[0]
                delivered = {j.payload["destination"]: j for j in node.jobs("deliver")}
                assert delivered["late"].state == JobState.DONE and delivered["late"].attempts >= 2
                wrong = delivered["wrong"]
                assert wrong.state == JobState.DEAD
                assert "404" in wrong.last_error and "wrong" in wrong.last_error
                assert parent.state == JobState.FAILED and "wrong" in parent.last_error
                assert len(scp.received()) == len(list((node.root / "outbox" / f"job-{parent.id}").glob("*.dcm")))

                # other work continues: a second study is analysed and delivered meanwhile
                second = tmp_path / "second"
                shutil.copytree(SAMPLE_COVID, second)
                _new_study(second)
                assert dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(second)).returncode == 0
                jobs = node.wait_jobs("analyse", 2)
                assert [j.state for j in jobs] == [JobState.FAILED, JobState.FAILED]  # "wrong" fails both
                assert all(j.payload["destination"] == "late" and j.state == JobState.DONE
                           for j in node.jobs("deliver") if j.payload["destination"] == "late")


def _new_study(folder: Path) -> None:
    """Give a copied series new UIDs (a different study of the same phantom)."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    for p in folder.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(p)


def _send_one_by_one(port: int, files: list[Path], statuses: dict, stop: threading.Event) -> None:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", port, ae_title="CTAI")
    if not assoc.is_established:
        return
    try:
        for path in files:
            if stop.is_set():
                break
            ds = pydicom.dcmread(path)
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # the association is gone: the node was killed
                break
            if status is None or "Status" not in status:
                break  # the node died mid-instance: no success was said
            statuses[str(ds.SOPInstanceUID)] = int(status.Status)
            time.sleep(0.05)
    finally:
        if assoc.is_established:
            assoc.abort()


def _slices_analysed(node: NodeProcess, job_id: int) -> int:
    path = node.root / "outbox" / f"job-{job_id}" / "result.json"
    try:
        return len(json.loads(path.read_text()).get("slice_scores", []))
    except (OSError, ValueError):
        return 0


def test_sigkill_during_ingest_and_during_processing(tmp_path):
    """SIGKILL while instances arrive: every instance that got a success status is in the
    spool after the restart. SIGKILL while the analysis runs: after the restart the job is
    picked up again and completes."""
    with StoreSCP(tmp_path / "pacs").start() as scp:
        port = free_port()
        config = node_config(
            port,
            destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": scp.port,
                           "ae_title": "STORESCP"}],
            rules=[{**CHEST_RULE, "destinations": ["pacs"]}],
            workers={"count": 1, "lease_s": 6, "device": "cpu"},
            completeness={"quiet_time_s": 3, "check_interval_s": 0.5},
        )
        files = sorted(SAMPLE_COVID.glob("*.dcm"))
        node = NodeProcess(tmp_path / "node", config).start()
        try:
            statuses: dict[str, int] = {}
            stop = threading.Event()
            sender = threading.Thread(target=_send_one_by_one, args=(port, files, statuses, stop))
            sender.start()
            deadline = time.monotonic() + 60
            while len(statuses) < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            node.kill()  # mid-transfer
            stop.set()
            sender.join(30)
            ok = {uid for uid, s in statuses.items() if s == 0}
            assert 20 <= len(ok) < len(files)

            node.start()  # recover
            with Spool(node.root / "spool", node.root / "node.db") as spool:
                spooled = {uid for rec in spool.series() for uid in spool.instance_uids(rec.key)}
            assert ok <= spooled, f"lost {len(ok - spooled)} acknowledged instance(s)"

            # the PACS sends the whole series again (as after any failed transfer)
            assert dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(SAMPLE_COVID)).returncode == 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                running = [j for j in node.jobs("analyse") if j.state == JobState.RUNNING]
                if running:
                    break
                time.sleep(0.2)
            assert running, node.log()[-3000:]
            killed = running[0].id
            time.sleep(2.0)  # well inside the analysis
            node.kill()
            assert node.queue().get(killed).state == JobState.RUNNING  # nobody finished it

            # after the restart the job comes back when its lease (6 s) runs out. The partial
            # series may have been routed on its own before the re-send completed it: then
            # there are two analyses (revisions 1 and 2), both must end done
            node.start()
            deadline = time.monotonic() + 240
            while True:  # until the whole series (all its slices) has been analysed
                jobs = node.wait_jobs("analyse", 1, timeout_s=240)
                if any(_slices_analysed(node, j.id) == len(files) for j in jobs) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert all(j.state == JobState.DONE for j in jobs), jobs
            assert {j.id: j for j in jobs}[killed].attempts >= 2
            node.wait_jobs("deliver", len(jobs))
            outputs = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                       for j in jobs for f in (node.root / "outbox" / f"job-{j.id}").glob("*.dcm")}
            assert len(scp.received()) == len(outputs) > 10
            with Spool(node.root / "spool", node.root / "node.db") as spool:
                assert sum(r.instance_count for r in spool.series()) == len(files)
        finally:
            node.stop()


def test_example_config_works_as_is(tmp_path):
    """deployment/node.example.yaml, unchanged: CTAI on 11112, results to an Orthanc at
    127.0.0.1:4242 (AE ORTHANC); storage under ./var of the working directory."""
    import socket

    for p in (11112, 4242):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                pytest.skip(f"port {p} is in use on this machine")
    example = Path(__file__).resolve().parent.parent / "deployment" / "node.example.yaml"
    with Orthanc(tmp_path / "orthanc", dicom_port=4242).start() as orthanc:
        with NodeProcess(tmp_path / "site", example) as node:
            assert node.port == 11112
            sent = dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", "11112", str(SAMPLE_COVID))
            assert sent.returncode == 0, sent.stderr[-500:]
            job = node.wait_jobs("analyse", 1, timeout_s=300)[0]
            assert job.state == JobState.DONE, job
            assert (tmp_path / "site" / "var" / "node.db").is_file()
            assert (tmp_path / "site" / "var" / "spool").is_dir()
        modalities = _orthanc_series_modalities(orthanc, _study_uid(SAMPLE_COVID))
        assert RESULT_MODALITIES <= set(modalities), modalities
