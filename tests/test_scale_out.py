"""Scale-out on a real PostgreSQL (the suite's own server): one ingress node (listener,
dispatcher, web app; no workers) and worker hosts (`ct-ai-node worker`), each in its own
working folder, sharing nothing but the database and the ingress node's DICOMweb endpoint.
Studies come by DCMTK storescu; results go to a real Orthanc."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import psycopg
import pydicom
import pytest

from ct_ai_node.jobqueue import JobState
from ct_ai_node.peers import Orthanc, dcmtk_tool, free_port
from ct_ai_node.spool import Spool
from node_harness import CHEST_RULE, SAMPLE_COVID, NodeProcess, WorkerProcess, dcmtk, node_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dcmtk_tool("storescu") and (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists())),
                       reason="DCMTK or Orthanc not installed (make test installs them)"),
]


def _new_study(source: Path, folder: Path) -> str:
    from ct_ai_node.synthetic import copy_as_new_study

    return copy_as_new_study(source, folder)


def _ingress_config(port: int, web_port: int, orthanc: Orthanc, url: str, **sections) -> dict:
    return node_config(
        port,
        destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                       "ae_title": orthanc.ae_title}],
        rules=[{**CHEST_RULE, "name": "emergency", "priority": "urgent", "destinations": ["pacs"],
                "when": [*CHEST_RULE["when"], {"calling_ae": {"equals": "EDCT"}}]},
               {**CHEST_RULE, "name": "batch", "priority": "background", "destinations": ["pacs"],
                "when": [*CHEST_RULE["when"], {"calling_ae": {"equals": "BATCH"}}]},
               {**CHEST_RULE, "destinations": ["pacs"]}],
        queue={"kind": "postgres", "url": url, "reconnect_s": 120},
        web={"host": "127.0.0.1", "port": web_port},
        **sections,
    )


def _worker_config(ingress: dict, web_port: int, **workers) -> dict:
    """The ingress node's file with the worker host's own storage and where to fetch series."""
    return {**ingress, "storage": {"root": "./var", "min_free_mb": 100},
            "workers": {"count": 1, "device": "cpu", "lease_s": ingress["workers"]["lease_s"],
                        "fetch_from": f"http://127.0.0.1:{web_port}", **workers}}


def _send(port: int, folder: Path, calling_ae: str = "STORESCU") -> None:
    sent = dcmtk("storescu", "-aet", calling_ae, "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(folder))
    assert sent.returncode == 0, sent.stderr[-1000:]


def _orthanc_study(orthanc: Orthanc, study_uid: str) -> dict[str, int]:
    """Modality -> instances of the results Orthanc holds for ``study_uid``."""
    found = httpx.post(f"{orthanc.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                       timeout=10).json()
    if not found:
        return {}
    out: dict[str, int] = {}
    for s in httpx.get(f"{orthanc.url}/studies/{found[0]}/series", timeout=10).json():
        modality = s["MainDicomTags"].get("Modality", "")
        out[modality] = out.get(modality, 0) + len(s["Instances"])
    return out


def _claimed_by(url: str, job_id: int) -> list[str]:
    """The owners that claimed ``job_id``, in order (from the shared job log)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT message FROM job_log WHERE job_id = %s AND message LIKE %s ORDER BY id",
                            (job_id, "%claimed by%")).fetchall()
    return [m.split(" claimed by ")[1].split(",")[0] for (m,) in rows]


def _first_claims(url: str) -> dict[int, float]:
    """Job id -> when a worker first claimed it (its first line in the shared job log)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT job_id, MIN(at) FROM job_log WHERE message LIKE %s GROUP BY job_id",
                            ("%claimed by%",)).fetchall()
    return dict(rows)


def test_ingress_and_three_worker_hosts_kill_one(tmp_path, pg_url):
    """Six studies by storescu; three worker hosts fetch them from the ingress node over WADO-RS
    and send the results to Orthanc themselves. One worker host is killed (SIGKILL) during an
    analysis: its job is run again by another and completes. Every study's results reach
    Orthanc exactly once."""
    with Orthanc(tmp_path / "orthanc").start() as orthanc:
        port, web_port = free_port(), free_port()
        ingress_cfg = _ingress_config(port, web_port, orthanc, pg_url,
                                      workers={"count": 0, "lease_s": 8, "device": "cpu"})
        studies = [_new_study(SAMPLE_COVID, tmp_path / f"study{i}") for i in range(6)]
        workdirs = [tmp_path / f"worker{i}" for i in range(3)]
        with NodeProcess(tmp_path / "ingress", ingress_cfg) as ingress:
            workers = [WorkerProcess(w, _worker_config(ingress_cfg, web_port)).start() for w in workdirs]
            try:
                for i in range(6):
                    _send(port, tmp_path / f"study{i}")
                # kill the worker host that runs the first analysis, well inside it
                deadline = time.monotonic() + 180
                running = []
                while not running and time.monotonic() < deadline:
                    running = [j for j in ingress.jobs("analyse") if j.state == JobState.RUNNING]
                    time.sleep(0.2)
                assert running, ingress.log()[-3000:]
                victim_job = running[0]
                time.sleep(1.5)
                assert ingress.queue().get(victim_job.id).state == JobState.RUNNING
                host = next(i for i, w in enumerate(workers) if str(w.proc.pid) in victim_job.lease_owner)
                workers[host].kill()

                jobs = ingress.wait_jobs("analyse", 6, timeout_s=420)
                assert all(j.state == JobState.DONE for j in jobs), [(j.id, j.state, j.last_error) for j in jobs]
                assert ingress.queue().get(victim_job.id).attempts >= 2
                owners = _claimed_by(pg_url, victim_job.id)
                assert str(workers[host].proc.pid) in owners[0] and str(workers[host].proc.pid) not in owners[-1]
                deliveries = ingress.wait_jobs("deliver", 6)
                assert all(d.state == JobState.DONE for d in deliveries) and len(deliveries) == 6

                # nothing was shared but the database: no worker has a spool with the series
                for w in workdirs:
                    assert not any((w / "var" / "spool").glob("*/*.dcm"))
                # the ingress node's job page shows a remote worker's log lines from the database
                page = httpx.get(f"http://127.0.0.1:{web_port}/jobs/{jobs[0].id}", timeout=10)
                assert page.status_code == 200 and "claimed by" in page.text
                # ... and its result, kept in the database by the worker that made it
                api = httpx.get(f"http://127.0.0.1:{web_port}/api/jobs/{jobs[0].id}", timeout=10).json()
                assert api["job"]["result"]["status"] == "done" and api["job"]["result_line"]
                assert api["job"]["result_line"] in httpx.get(f"http://127.0.0.1:{web_port}/", timeout=10).text
                with Spool(ingress.root / "spool", ingress.root / "node.db") as spool:
                    assert sorted(r.state for r in spool.series()) == ["routed"] * 6
            finally:
                for w in workers:
                    w.stop()

        made = {}  # study -> how many result objects the analysis that completed wrote
        for job in jobs:
            # the killed host's half-written folder of the victim job does not count
            done_in = [w for w in workdirs if (w / "var" / "outbox" / f"job-{job.id}" / "result.json").is_file()
                       and not (job.id == victim_job.id and w == workdirs[host])]
            assert len(done_in) == 1, f"job {job.id}: results in {done_in}"
            outputs = list((done_in[0] / "var" / "outbox" / f"job-{job.id}").glob("*.dcm"))
            study = str(pydicom.dcmread(outputs[0], stop_before_pixels=True).StudyInstanceUID)
            made[study] = len(outputs)
        assert sorted(made) == sorted(studies)
        for study, n_outputs in made.items():
            held = _orthanc_study(orthanc, study)
            assert {"SEG", "SR", "OT", "KO"} <= set(held), held
            assert sum(held.values()) == n_outputs, (study, held, n_outputs)  # exactly once: no doubles


def test_urgent_first_and_database_outage(tmp_path, pg_url, postgres):
    """One worker host. Four background studies, then an urgent one: the urgent study is the
    next analysed. Then PostgreSQL stops for 30 s mid-run: the ingress node keeps receiving
    (a study sent meanwhile is in its spool), the worker waits and resumes, nothing is lost."""
    with Orthanc(tmp_path / "orthanc").start() as orthanc:
        port, web_port = free_port(), free_port()
        ingress_cfg = _ingress_config(port, web_port, orthanc, pg_url,
                                      workers={"count": 0, "lease_s": 60, "device": "cpu"})
        folders = [tmp_path / f"study{i}" for i in range(6)]
        studies = [_new_study(SAMPLE_COVID, f) for f in folders]
        with NodeProcess(tmp_path / "ingress", ingress_cfg) as ingress:
            worker = WorkerProcess(tmp_path / "worker", _worker_config(ingress_cfg, web_port)).start()
            try:
                for folder in folders[:4]:
                    _send(port, folder, "BATCH")
                background = ingress.wait_jobs("analyse", 4, final=False, timeout_s=60)
                _send(port, folders[4], "EDCT")
                deadline = time.monotonic() + 60
                while len(ingress.jobs("analyse")) < 5 and time.monotonic() < deadline:
                    time.sleep(0.2)
                urgent = next(j for j in ingress.jobs("analyse") if j.payload["rule"] == "emergency")
                assert urgent.priority == 0 and {j.priority for j in background} == {2}

                # the database goes away for 30 s while the worker analyses
                deadline = time.monotonic() + 120
                while not any(j.state == JobState.RUNNING for j in ingress.jobs("analyse")):
                    assert time.monotonic() < deadline, worker.log()[-3000:]
                    time.sleep(0.2)
                postgres.pause()
                stopped = time.monotonic()
                try:
                    _send(port, folders[5])  # the listener does not need the database
                    with Spool(ingress.root / "spool", ingress.root / "node.db") as spool:
                        assert sum(r.instance_count for r in spool.series()) == 6 * 56
                    time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))
                finally:
                    postgres.resume()

                jobs = ingress.wait_jobs("analyse", 6, timeout_s=480)
                assert all(j.state == JobState.DONE for j in jobs), [(j.id, j.state, j.last_error) for j in jobs]
                assert len(ingress.wait_jobs("deliver", 6)) == 6
                assert "cannot reach the job queue" in worker.log() or "unreachable" in worker.log()
            finally:
                worker.stop()
        # whatever was already running when it came, the urgent study is the next one analysed,
        # ahead of the background studies that were waiting
        claims = _first_claims(pg_url)
        later = [job_id for job_id, at in sorted(claims.items(), key=lambda kv: kv[1]) if at >= urgent.created_at]
        assert later[0] == urgent.id, (later, claims, urgent.created_at)
        assert set(later[1:]) & {j.id for j in background}, "no background study was left waiting"
        for study in studies:
            held = _orthanc_study(orthanc, study)
            assert {"SEG", "SR", "OT", "KO"} <= set(held), (study, held)
