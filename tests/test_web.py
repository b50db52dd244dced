"""The administrator's web app over real HTTP on loopback (uvicorn on a free port, httpx):
open mode on loopback, users and API tokens with roles, CSRF, job actions with their
audit trail, heat-map previews, /metrics, /healthz."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from helpers_dicom import write_ct_series
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ct_ai_node.config import ConfigError, NodeConfig, load_config
from ct_ai_node.jobqueue import JobState, JobStateError, SqliteJobQueue
from ct_ai_node.node import job_actions
from ct_ai_node.peers import free_port
from ct_ai_node.spool import Spool
from ct_ai_node.web.auth import hash_password, new_token
from ct_ai_node.web.server import WebServer
from test_node_robustness import store_file

SC_UID = "1.2.840.10008.5.1.4.1.1.7"
ADMIN_PW, VIEWER_PW = "admin-secret-1", "viewer-secret-1"


def _services() -> dict:
    return {"DICOM listener": {"up": True, "detail": "CTAI on port 11112"}, "workers": {"up": True, "detail": "1 of 1"}}


def _config(tmp_path: Path, **web) -> NodeConfig:
    return NodeConfig.model_validate({
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 10, "fsync": False},
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 4242, "ae_title": "PACS"}],
        "rules": [{"name": "chest-ct", "when": [{"tag": "Modality", "equals": "CT"}], "action": "analyse",
                   "destinations": ["pacs"]}],
        "web": {"host": "127.0.0.1", "port": free_port(), **web},
    })


def _write_sc(path: Path, comments: str | None = None) -> None:
    ds = pydicom.Dataset()
    if comments is not None:
        ds.ImageComments = comments
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SC_UID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 8, 8, 3, 0
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "RGB", 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((8, 8, 3), 200, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def node(tmp_path):
    """A node's database with one analysed series (job done, delivery done, an SC preview and
    result.json in its outbox) and one queued analysis."""

    def make(**web):
        config = _config(tmp_path, **web)
        st = config.storage
        spool = Spool(st.spool_dir, st.db_path, fsync=False)
        queue = SqliteJobQueue(st.db_path)
        key = None
        for path in write_ct_series(tmp_path / "ct", n=2, rows=16, cols=16).paths:
            key = store_file(spool, path)
        payload = {"series_key": key, "rule": "chest-ct", "pipeline": "radlogics", "destinations": ["pacs"]}
        done = queue.enqueue("analyse", payload, key="a1")
        out = st.outbox_dir / f"job-{done}"
        out.mkdir(parents=True)
        _write_sc(out / "sc-1.dcm")
        (out / "result.json").write_text(json.dumps({
            "status": "done", "pipeline": "radlogics", "case_class": "covid_like",
            "case_class_text": "COVID-19-like pneumonia", "probability": 0.93, "lesion_volume_ml": 212.4,
            "study_instance_uid": "1.2.3.4",
            "outputs": {"sc-1.dcm": SC_UID}, "timings_s": {"total": 12.5}}))
        child = queue.enqueue("deliver", {"destination": "pacs", "files": [str(out / "sc-1.dcm")], "series_key": key},
                              key="d1", parent_id=done)
        for job_id in (done, child):
            queue.claim(["analyse", "deliver"], "w", 60)
            queue.complete(job_id)
        waiting = queue.enqueue("analyse", payload, key="a2")
        server = WebServer(config, _services).start()
        parts.extend([server, spool, queue])
        return config, server, queue, spool, {"done": done, "child": child, "waiting": waiting, "key": key}

    parts: list = []
    yield make
    for part in parts:
        (part.stop if isinstance(part, WebServer) else part.close)()


def _csrf(client: httpx.Client, path: str = "/") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text[:300]
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def test_open_mode_on_loopback_dashboard_actions_and_audit(node):
    config, server, queue, spool, ids = node(viewer_url="http://127.0.0.1:3000/viewer?StudyInstanceUIDs={study}")
    base = f"http://127.0.0.1:{server.port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "No users are configured" in page.text and "127.0.0.1" in page.text
        assert "COVID-19-like pneumonia, P 0.93, 212 ml" in page.text and "chest-ct" in page.text
        assert "pacs" in page.text and "ok" in page.text  # the destination's latest delivery
        assert client.get("/healthz").json() == {"status": "ok", "down": []}
        status = client.get("/status").json()
        assert status["jobs_by_state"]["done"] == 2 and status["jobs_by_state"]["queued"] == 1
        assert 'ctai_jobs{kind="analyse",state="done"} 1.0' in client.get("/metrics").text
        # a page under another host name (DNS rebinding onto loopback) is refused
        assert client.get("/", headers={"Host": "attacker.example"}).status_code == 400

        # the job page: result, preview, deliveries
        job = client.get(f"/jobs/{ids['done']}")
        assert "COVID-19-like pneumonia" in job.text and f"/jobs/{ids['done']}/preview/0.png" in job.text
        assert 'href="http://127.0.0.1:3000/viewer?StudyInstanceUIDs=1.2.3.4"' in job.text
        png = client.get(f"/jobs/{ids['done']}/preview/0.png")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get(f"/jobs/{ids['done']}/preview/5.png").status_code == 404

        # a form post without the CSRF token (what a foreign page can send) does nothing
        forged = client.post(f"/api/jobs/{ids['waiting']}/cancel", data={"action": "cancel"})
        assert forged.status_code == 403 and "CSRF" in forged.text
        assert queue.get(ids["waiting"]).state is JobState.QUEUED
        # the page's own form: cancelled, back to the job page with a message
        token = _csrf(client, f"/jobs/{ids['waiting']}")
        done = client.post(f"/api/jobs/{ids['waiting']}/cancel", data={"csrf": token})
        assert done.status_code == 303 and done.headers["location"] == f"/jobs/{ids['waiting']}"
        assert queue.get(ids["waiting"]).state is JobState.DEAD
        assert queue.get(ids["waiting"]).last_error == "cancelled by local"
        assert "cancelled" in client.get(f"/jobs/{ids['waiting']}").text

        # JSON (as scripts on this machine send it): re-run the finished analysis
        rerun = client.post(f"/api/jobs/{ids['done']}/rerun", json={})
        assert rerun.status_code == 200, rerun.text
        new_id = rerun.json()["job_id"]
        new = queue.get(new_id)
        assert new.kind == "analyse" and new.state is JobState.QUEUED
        assert new.payload["rerun_of"] == ids["done"] and new.payload["destinations"] == ["pacs"]
        # a second click while the re-run waits is refused, with the reason
        again = client.post(f"/api/jobs/{ids['done']}/rerun", json={})
        assert again.status_code == 409 and f"job {new_id}" in again.json()["detail"]
        # re-send: the delivery goes out again, the parent waits for it
        resent = client.post(f"/api/jobs/{ids['done']}/resend", json={})
        assert resent.status_code == 200, resent.text
        assert queue.get(ids["child"]).state is JobState.QUEUED
        assert queue.get(ids["done"]).state is JobState.SENDING
        assert client.post(f"/api/jobs/{ids['done']}/explode", json={}).status_code == 404

        audit = client.get("/api/audit").json()
        assert [(e["user"], e["action"], e["outcome"]) for e in audit][:5] == [
            ("local", "resend", "ok"), ("local", "rerun", "refused"), ("local", "created", "ok"),
            ("local", "rerun", "ok"), ("local", "cancel", "ok")]
        assert "Audit log" in client.get("/audit").text


def test_users_roles_tokens_and_csrf(node):
    viewer_token, viewer_hash = new_token()
    admin_token, admin_hash = new_token()
    config, server, queue, spool, ids = node(
        users=[{"name": "alice", "role": "admin", "password_hash": hash_password(ADMIN_PW)},
               {"name": "victor", "role": "viewer", "password_hash": hash_password(VIEWER_PW)}],
        api_tokens=[{"name": "monitoring", "role": "viewer", "token_hash": viewer_hash},
                    {"name": "scripts", "role": "admin", "token_hash": admin_hash}])
    base = f"http://127.0.0.1:{server.port}"
    with httpx.Client(base_url=base, timeout=10) as anonymous:
        first = anonymous.get("/jobs/1")
        assert first.status_code == 303 and first.headers["location"] == "/login?next=/jobs/1"
        assert anonymous.get("/api/status").status_code == 401
        assert anonymous.get("/status").status_code == 401
        assert anonymous.get("/healthz").status_code == 200  # for load balancers: no data in it
        assert anonymous.get("/api/status", headers={"Authorization": "Bearer ctai_wrong"}).status_code == 401
        assert anonymous.post(f"/api/jobs/{ids['waiting']}/cancel", json={}).status_code == 401

    # tokens: a viewer reads, an admin acts (no CSRF for bearer tokens)
    with httpx.Client(base_url=base, timeout=10, headers={"Authorization": f"Bearer {viewer_token}"}) as monitor:
        assert monitor.get("/api/status").json()["jobs_by_state"]["queued"] == 1
        refused = monitor.post(f"/api/jobs/{ids['waiting']}/cancel", json={})
        assert refused.status_code == 403 and "viewer" in refused.json()["detail"]
    with httpx.Client(base_url=base, timeout=10, headers={"Authorization": f"Bearer {admin_token}"}) as script:
        assert script.post(f"/api/jobs/{ids['waiting']}/cancel").status_code == 200
        assert queue.get(ids["waiting"]).last_error == "cancelled by scripts"

    with httpx.Client(base_url=base, timeout=10) as browser:
        login = browser.get("/login")
        assert "No users are configured" not in login.text
        token = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
        wrong = browser.post("/login", data={"csrf": token, "name": "alice", "password": "nope", "next": "/"})
        assert wrong.status_code == 303 and "Wrong user name or password" in browser.get("/login").text
        token = _csrf(browser, "/login")
        assert browser.post("/login", data={"csrf": "forged", "name": "victor", "password": VIEWER_PW}).status_code == 403
        ok = browser.post("/login", data={"csrf": token, "name": "victor", "password": VIEWER_PW, "next": "/jobs/1"})
        assert ok.status_code == 303 and ok.headers["location"] == "/jobs/1"
        page = browser.get("/jobs/1")
        assert "victor (viewer)" in page.text and "Re-run" not in page.text  # no buttons for viewers
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        refused = browser.post(f"/api/jobs/{ids['done']}/rerun", data={"csrf": token})
        assert refused.status_code == 403 and "viewer" in refused.text
        assert browser.post("/logout", data={"csrf": token}).status_code == 303
        assert browser.get("/").status_code == 303  # logged out

        token = _csrf(browser, "/login")
        # an open redirect after log-in is not followed off the site
        ok = browser.post("/login", data={"csrf": token, "name": "alice", "password": ADMIN_PW,
                                          "next": "//attacker.example/"})
        assert ok.headers["location"] == "/"
        page = browser.get(f"/jobs/{ids['done']}")
        assert "alice (admin)" in page.text and "Re-run" in page.text
        for secret in (ADMIN_PW, "argon2", "sha256:"):
            assert secret not in page.text and secret not in browser.get("/api/status").text
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        assert browser.post(f"/api/jobs/{ids['done']}/rerun", data={"csrf": token}).status_code == 303
        assert browser.post(f"/api/jobs/{ids['done']}/rerun", json={}).status_code == 409  # JSON: no CSRF needed

    entries = [(e.user, e.action, e.outcome) for e in server.audit.entries()]
    assert ("alice", "login", "refused") in entries and ("victor", "rerun", "refused") not in entries
    assert ("alice", "rerun", "ok") in entries and ("scripts", "cancel", "ok") in entries
    assert ("victor", "login", "ok") in entries and ("victor", "logout", "ok") in entries


def test_actions_refuse_with_reasons(node):
    config, server, queue, spool, ids = node()
    with pytest.raises(JobStateError, match="queued"):
        job_actions.rerun(queue, spool, ids["waiting"], "x")
    with pytest.raises(JobStateError, match="only a queued job"):
        queue.cancel(ids["done"], "x")
    with pytest.raises(JobStateError, match="only a failed or dead job"):
        job_actions.requeue(queue, ids["done"])
    with pytest.raises(JobStateError, match="deliver job"):
        job_actions.resend(queue, ids["child"])
    claimed = queue.claim(["analyse"], "w", 60)
    assert claimed.id == ids["waiting"]
    with pytest.raises(JobStateError, match="by a worker"):
        job_actions.cancel(queue, ids["waiting"], "x")
    queue.fail(ids["waiting"], "boom", retryable=False, owner="w")
    assert job_actions.requeue_dead(queue) == [f"job {ids['waiting']} queued again"]
    # retention removed the results and the images: re-send and re-run say so
    for f in (config.storage.outbox_dir / f"job-{ids['done']}").glob("*.dcm"):
        f.unlink()
    with pytest.raises(JobStateError, match="result files were removed"):
        job_actions.resend(queue, ids["done"])
    assert spool.remove_series(ids["key"])
    with pytest.raises(JobStateError, match="no longer in the spool"):
        job_actions.rerun(queue, spool, ids["done"], "x")


def test_web_config_is_checked(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config_text(tmp_path, "web: {host: 0.0.0.0, port: 8080}\n")
    assert any(p.startswith("web.users: needed when host is '0.0.0.0'") for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        load_config_text(tmp_path, "web:\n  host: 0.0.0.0\n  users: [{name: a, role: admin, password_hash: hunter22}]\n")
    assert any("web.users.0.password_hash: " in p and "never the password" in p for p in err.value.problems)
    assert "hunter22" not in str(err.value)
    # the old read-only page's section is read as the web app's
    config = load_config_text(tmp_path, "status: {host: 127.0.0.1, port: 8099}\n")
    assert config.web.port == 8099 and config.web.open
    user = {"name": "a", "role": "admin", "password_hash": hash_password("long enough")}
    config = NodeConfig.model_validate({"web": {"host": "0.0.0.0", "users": [user]}})
    assert "argon2" not in repr(config) and "argon2" not in config.model_dump_json()


def load_config_text(tmp_path: Path, text: str) -> NodeConfig:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return load_config(path)


def test_cli_makes_password_hashes_and_tokens_the_app_accepts():
    from typer.testing import CliRunner

    from ct_ai_node.cli import app
    from ct_ai_node.config import WebSection
    from ct_ai_node.web.auth import check_bearer, check_password

    runner = CliRunner()
    hashed = runner.invoke(app, ["web", "hash-password", "--password", "a long password"])
    assert hashed.exit_code == 0, hashed.output
    made = runner.invoke(app, ["web", "new-token"])
    token = re.search(r"(ctai_\S+)", made.output).group(1)
    digest = re.search(r"(sha256:[0-9a-f]{64})", made.output).group(1)
    web = WebSection(users=[{"name": "bob", "role": "admin", "password_hash": hashed.output.strip()}],
                     api_tokens=[{"name": "cron", "token_hash": digest}])
    assert check_password(web, "bob", "a long password").role == "admin"
    assert check_password(web, "bob", "a long passwor") is None and check_password(web, "eve", "x") is None
    assert check_bearer(web, f"Bearer {token}").name == "cron"
    assert check_bearer(web, "Bearer ctai_other") is None
    assert runner.invoke(app, ["web", "hash-password", "--password", "short"]).exit_code != 0


# -- STOW-RS ingress ---------------------------------------------------------------------------

def _stow(client: httpx.Client, files: list[bytes], **headers) -> httpx.Response:
    from ct_ai_node.egress.stow import multipart_related

    body, ctype = multipart_related(files)
    return client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **headers})


def test_stow_rs_ingress_stores_answers_and_refuses(node, tmp_path):
    sender_token, sender_hash = new_token()
    viewer_token, viewer_hash = new_token()
    config, server, queue, spool, ids = node(
        api_tokens=[{"name": "modality", "role": "sender", "token_hash": sender_hash},
                    {"name": "monitor", "role": "viewer", "token_hash": viewer_hash}],
        users=[{"name": "pacs", "role": "sender", "password_hash": hash_password(ADMIN_PW)}])
    series = write_ct_series(tmp_path / "stow", n=3, rows=16, cols=16, description="stow")
    files = [p.read_bytes() for p in series.paths]
    uids = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.paths)
    before = {r.key for r in spool.series()}
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
        assert _stow(client, files).status_code == 401  # no credentials
        assert _stow(client, files, Authorization=f"Bearer {viewer_token}").status_code == 403
        bad_pw = httpx.BasicAuth("pacs", "wrong").auth_flow(httpx.Request("GET", "http://x")).__next__()
        assert _stow(client, files, Authorization=bad_pw.headers["Authorization"]).status_code == 401
        # a sender may not read the pages or the API
        assert client.get("/api/status", headers={"Authorization": f"Bearer {sender_token}"}).status_code == 403

        ok = _stow(client, files, Authorization=f"Bearer {sender_token}")
        assert ok.status_code == 200, ok.text
        assert ok.headers["content-type"].startswith("application/dicom+json")
        stored = sorted(i["00081155"]["Value"][0] for i in ok.json()["00081199"]["Value"])
        assert stored == uids
        new = [r for r in spool.series() if r.key not in before]
        assert [(r.instance_count, r.calling_ae, r.called_ae) for r in new] == [(3, "MODALITY", "CTAI")]
        assert new[0].released_at is not None  # complete without waiting for the quiet time alone
        for path in spool.instance_paths(new[0].key):
            assert pydicom.dcmread(path).file_meta.SourceApplicationEntityTitle == "MODALITY"

        # Basic authentication of a sender user; one damaged part of two: 202 with the reason
        basic = httpx.BasicAuth("pacs", ADMIN_PW).auth_flow(httpx.Request("GET", "http://x")).__next__()
        mixed = _stow(client, [files[0], b"\0" * 300], Authorization=basic.headers["Authorization"])
        assert mixed.status_code == 202, mixed.text
        assert mixed.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        assert len(mixed.json()["00081199"]["Value"]) == 1
        # nothing usable: 409; not multipart: 415
        assert _stow(client, [b"junk"], Authorization=f"Bearer {sender_token}").status_code == 409
        wrong = client.post("/dicomweb/studies", content=files[0], headers={
            "Content-Type": "application/dicom", "Authorization": f"Bearer {sender_token}"})
        assert wrong.status_code == 415 and "multipart/related" in wrong.json()["detail"]
    # the user "pacs" is another caller: its instance lands in a series of its own (as by C-STORE)
    assert sorted((r.calling_ae, r.instance_count) for r in spool.series() if r.key not in before) == [
        ("MODALITY", 3), ("PACS", 1)]


def test_stow_rs_below_min_free_answers_507_and_stores_nothing(tmp_path):
    import shutil

    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    config = _config(tmp_path)
    config = config.model_copy(update={"storage": config.storage.model_copy(update={"min_free_mb": free_mb + 10_000})})
    server = WebServer(config, _services).start()
    try:
        files = [p.read_bytes() for p in write_ct_series(tmp_path / "s", n=2, rows=16, cols=16).paths]
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            full = _stow(client, files)  # open mode on loopback: the caller is DICOMWEB
        assert full.status_code == 507 and "nothing was stored" in full.json()["detail"]
        assert full.headers["retry-after"] == "300"
        assert server.spool.series() == [] and not list((tmp_path / "var" / "spool").rglob("*.dcm"))
    finally:
        server.stop()


def test_job_page_previews_are_the_highest_scoring_slices(tmp_path):
    from ct_ai_node.web.views import PREVIEWS_SHOWN, previews

    folder = tmp_path / "job-7"
    folder.mkdir()
    scores = [0.1, 0.9, 0.2, 0.95, 0.3, 0.8, 0.05, 0.7, 0.6, 0.01]
    outputs = {}
    for i, score in enumerate(scores):
        name = f"heatmap_{i + 1:04d}.dcm"
        _write_sc(folder / name, f"slice {i + 1}/10 AI slice score {score:.2f}")
        outputs[name] = SC_UID
    (folder / "result.json").write_text(json.dumps({"status": "done", "outputs": outputs}))
    chosen = [p.name for p in previews(tmp_path, 7)]
    assert len(chosen) == PREVIEWS_SHOWN == 6
    assert chosen == ["heatmap_0002.dcm", "heatmap_0004.dcm", "heatmap_0005.dcm", "heatmap_0006.dcm",
                      "heatmap_0008.dcm", "heatmap_0009.dcm"]


def test_job_log_keeps_a_jobs_lines_while_it_runs(tmp_path):
    import logging

    from ct_ai_node.node.job_log import MAX_LINES, JobLog, JobLogHandler

    log = JobLog(tmp_path / "node.db")
    handler = JobLogHandler(log, "CTAI-w0")
    logger = logging.getLogger("ct_ai_node.test_job_log")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("before any job")
        handler.job_id = 5
        logger.info("analysing %d slices", 300)
        logger.debug("not kept: DEBUG may quote headers")
        for i in range(MAX_LINES + 10):
            logger.warning("line %d", i)
        handler.job_id = None
        logger.info("after the job")
    finally:
        logger.removeHandler(handler)
    lines = log.lines(5)
    assert lines[0]["message"] == "analysing 300 slices" and lines[0]["process"] == "CTAI-w0"
    assert len(lines) == MAX_LINES and "more than" in lines[-1]["message"]
    assert not any("DEBUG" in line["message"] or "before" in line["message"] for line in lines)
    assert log.lines(6) == []


def test_stow_rs_refuses_a_request_over_the_size_limit_even_without_a_length(tmp_path):
    config = _config(tmp_path, stow_max_mb=0.01)
    server = WebServer(config, _services).start()
    try:
        files = [p.read_bytes() for p in write_ct_series(tmp_path / "s", n=2, rows=64, cols=64).paths]
        from ct_ai_node.egress.stow import multipart_related

        body, ctype = multipart_related(files)

        def chunked():
            for i in range(0, len(body), 4096):
                yield body[i:i + 4096]

        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            sized = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            streamed = client.post("/dicomweb/studies", content=chunked(), headers={"Content-Type": ctype})
        assert sized.status_code == 413 and "at most 0.01 MB" in sized.json()["detail"]
        assert streamed.status_code == 413
        assert server.spool.series() == []
    finally:
        server.stop()


def test_wado_rs_gives_workers_the_spool_series_byte_for_byte(node, tmp_path):
    """A worker on another host fetches a series from the spool over WADO-RS with its token
    (role worker); viewers, senders and strangers get nothing; a wrong series is a 404; the
    fetched files are the received bytes."""
    from ct_ai_node.node.series_fetch import FetchError, SeriesSource, spool_series_path

    worker_token, worker_hash = new_token()
    viewer_token, viewer_hash = new_token()
    config, server, queue, spool, ids = node(
        users=[{"name": "alice", "role": "admin", "password_hash": hash_password(ADMIN_PW)}],
        api_tokens=[{"name": "gpu1", "role": "worker", "token_hash": worker_hash},
                    {"name": "monitoring", "role": "viewer", "token_hash": viewer_hash}])
    key = ids["key"]
    rec = spool.get_series(key)
    path = spool_series_path(key, rec.study_instance_uid, rec.series_instance_uid)
    base = f"http://127.0.0.1:{server.port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {viewer_token}"}).status_code == 403
        as_worker = {"Authorization": f"Bearer {worker_token}"}
        assert client.get(path.replace(rec.series_instance_uid, "1.2.3"), headers=as_worker).status_code == 404
        # a worker token opens nothing else
        assert client.get("/api/status", headers=as_worker).status_code == 403

    def worker_config(token):
        return NodeConfig.model_validate({
            "storage": {"root": str(tmp_path / "worker")},
            "workers": {"fetch_from": base, **({"fetch_token": token} if token else {})}})

    payload = {"series_key": key, "study_uid": rec.study_instance_uid, "series_uid": rec.series_instance_uid}
    folder, files, uids = SeriesSource(worker_config(worker_token)).open(payload, tmp_path / "fetched")
    assert folder == tmp_path / "fetched" and len(files) == 2
    received = sorted(p.read_bytes() for p in spool.instance_paths(key))
    assert sorted(p.read_bytes() for p in files) == received
    assert sorted(uids) == sorted(spool.instance_uids(key))
    with pytest.raises(FetchError, match="role worker") as refused:
        SeriesSource(worker_config(None)).open(payload, tmp_path / "fetched")
    assert not refused.value.retryable
    with pytest.raises(FetchError, match="no longer holds") as gone:
        SeriesSource(worker_config(worker_token)).open({**payload, "series_key": "x-1-abc"}, tmp_path / "f2")
    assert not gone.value.retryable


def test_job_log_neither_waits_nor_recurses_while_the_shared_database_is_away(postgres, pg_url):
    """A worker's log lines while PostgreSQL is away are dropped at once (the node's own log
    has them), even while another thread waits to keep a result summary, which the lines the
    database code logs meanwhile must not deadlock."""
    import logging
    import threading
    import time

    from ct_ai_node.node.job_log import JobLog, JobLogHandler

    log = JobLog(pg_url)
    handler = JobLogHandler(log, "w0")
    logger = logging.getLogger("ct_ai_node")
    logger.addHandler(handler)
    handler.job_id = 1
    done = threading.Event()
    try:
        logging.getLogger("ct_ai_node.test").warning("before the outage")
        postgres.pause()
        try:
            started = time.monotonic()
            logging.getLogger("ct_ai_node.test").warning("during the outage")
            assert time.monotonic() - started < 5
            keeper = threading.Thread(target=lambda: (log.set_summary(1, {"status": "done"}), done.set()))
            keeper.start()
            time.sleep(2)
            started = time.monotonic()
            logging.getLogger("ct_ai_node.test").warning("still away")  # not held up by the waiting thread
            assert time.monotonic() - started < 5 and not done.is_set()
        finally:
            postgres.resume()
        assert done.wait(60)
    finally:
        logger.removeHandler(handler)
    assert log.summaries([1]) == {1: {"status": "done"}}
    assert [line["message"] for line in log.lines(1)] == ["before the outage"]
