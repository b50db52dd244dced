"""The web app of a running node (``ct-ai-node serve``): add a destination and test it with
a C-ECHO to a real storescp, write a rule and try it with the rule tester, save, and see
it act on the next series; change who may call; all without restarting the node."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from helpers_dicom import write_ct_series

from ct_ai_node.peers import StoreSCP, free_port, wait_for_port
from node_harness import NodeProcess, dcmtk, node_config

pytestmark = pytest.mark.skipif(dcmtk("storescu", "--version").returncode != 0,
                                reason="DCMTK storescu not installed (make test installs it)")

MR_RULE = """- name: mr-archive
  when:
  - tag: Modality
    equals: MR
  action: forward
  destinations: [archive]
"""


def test_configure_a_destination_and_a_rule_then_it_acts_without_restart(tmp_path):
    with StoreSCP(tmp_path / "storescp").start() as archive:
        port, web_port = free_port(), free_port()
        config = node_config(port, destinations=[], rules=[], web={"host": "127.0.0.1", "port": web_port})
        with NodeProcess(tmp_path / "node", config) as node, \
                httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=30) as web:
            pid = node.proc.pid
            wait_for_port(web_port, 60, node.proc)
            page = web.get("/config")
            assert page.status_code == 200 and "Save and apply" in page.text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)

            # a destination with a typo in it: check-config's message, nothing saved
            bad = web.post("/api/config/destinations", json={"text": "- {name: archive, kind: dicom, port: 104}\n"})
            assert bad.status_code == 422
            assert "destinations.0.host: Field required" in bad.json()["problems"]
            dead_port = free_port()
            text = (f"- {{name: archive, kind: dicom, host: 127.0.0.1, port: {archive.port}, ae_title: STORESCP}}\n"
                    f"- {{name: nobody, kind: dicom, host: 127.0.0.1, port: {dead_port}, ae_title: NOBODY}}\n")
            saved = web.post("/api/config/destinations", json={"text": text})
            assert saved.json() == {"ok": True, "message": "destinations: added archive, nobody"}, saved.text
            echo = web.post("/api/destinations/archive/test", json={})
            assert echo.json()["ok"] is True and "answered success" in echo.json()["message"]
            down = web.post("/api/destinations/nobody/test", json={})
            assert down.json()["ok"] is False and "no DICOM answer" in down.json()["message"]

            # the rule tester, on an uploaded MR file, with the rules as typed (not saved yet)
            mr = write_ct_series(tmp_path / "mr", n=5, rows=32, cols=32, modality="MR", description="MR knee")
            tested = web.post("/api/rules/test", data={"csrf": csrf, "text": MR_RULE, "calling_ae": "STORESCU"},
                              files={"file": ("mr.dcm", mr.paths[0].read_bytes(), "application/dicom")})
            assert tested.status_code == 200 and "mr-archive" in tested.text and "archive" in tested.text
            assert web.get("/api/config/rules").json()["text"] == ""  # still unsaved
            # the same tester as JSON on the rules in force: nothing matches yet
            none = web.post("/api/rules/test", data={"csrf": csrf, "calling_ae": "STORESCU"},
                            files={"file": ("mr.dcm", mr.paths[0].read_bytes(), "application/dicom")})
            assert "mr-archive" not in none.text

            # save the rule through the page's form, then send an MR series: forwarded
            form = web.post("/api/config/rules", data={"csrf": csrf, "text": MR_RULE, "do": "save"})
            assert form.status_code == 303 and form.headers["location"] == "/config"
            assert "rules: added mr-archive" in web.get("/config").text
            sent = dcmtk("storescu", "-aet", "STORESCU", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(tmp_path / "mr"))
            assert sent.returncode == 0, sent.stderr[-1000:]
            node.wait_jobs("forward", 1)
            deadline = time.monotonic() + 60
            while len(archive.received()) < 5 and time.monotonic() < deadline:
                time.sleep(0.3)
            assert len(archive.received()) == 5, node.log()[-3000:]

            # who may call: from now on only STORESCU
            saved = web.post("/api/config/allowed_callers", json={"text": "- {ae_title: STORESCU}\n"})
            assert saved.json()["message"] == "allowed_callers: anyone -> STORESCU@*"
            assert dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "CTAI", "127.0.0.1", str(port)).returncode != 0
            assert dcmtk("echoscu", "-aet", "STORESCU", "-aec", "CTAI", "127.0.0.1", str(port)).returncode == 0

            # the node's own port: saved for the next restart; the listener stays where it is
            node_text = web.get("/api/config/node").json()["text"]
            moved = web.post("/api/config/node", json={"text": node_text.replace(f"port: {port}",
                                                                                   f"port: {free_port()}")})
            assert "in force after the node's next restart" in moved.json()["message"], moved.text
            assert "not in force until the node restarts: node" in web.get("/config").text
            assert dcmtk("echoscu", "-aet", "STORESCU", "-aec", "CTAI", "127.0.0.1", str(port)).returncode == 0

            assert node.proc.pid == pid and node.proc.poll() is None  # never restarted
            saved_file = node.config_path.read_text()
            assert "mr-archive" in saved_file and "STORESCU" in saved_file
            audit = [(e["action"], e["outcome"], e["detail"]) for e in web.get("/api/audit").json()]
            assert ("config", "ok", "rules: added mr-archive") in audit
            assert ("config", "ok", "destinations: added archive, nobody") in audit
            assert any(a == "test-destination" and o == "failed" for a, o, _ in audit)


def test_a_study_posted_by_stow_rs_is_analysed_and_its_results_reach_orthanc(tmp_path):
    from ct_ai_node.egress.stow import multipart_related
    from ct_ai_node.jobqueue import JobState
    from ct_ai_node.peers import Orthanc
    from node_harness import CHEST_RULE, SAMPLE_COVID
    from test_node_e2e import RESULT_MODALITIES, _orthanc_series_modalities, _study_uid

    with Orthanc(tmp_path / "orthanc").start() as orthanc:
        port, web_port = free_port(), free_port()
        config = node_config(
            port, destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                                 "ae_title": orthanc.ae_title}],
            rules=[{**CHEST_RULE, "destinations": ["pacs"]}], web={"host": "127.0.0.1", "port": web_port})
        with NodeProcess(tmp_path / "node", config) as node:
            wait_for_port(web_port, 60, node.proc)
            body, ctype = multipart_related([p.read_bytes() for p in sorted(SAMPLE_COVID.glob("*.dcm"))])
            answer = httpx.post(f"http://127.0.0.1:{web_port}/dicomweb/studies", content=body,
                                headers={"Content-Type": ctype}, timeout=60)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["00081199"]["Value"]) == 56
            analysed = node.wait_jobs("analyse", 1)
            assert [j.state for j in analysed] == [JobState.DONE], node.log()[-3000:]
            assert len(node.wait_jobs("deliver", 1)) == 1
            metrics = httpx.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10).text
            # what happened: 56 instances in one routed series, one analysis, one delivery to pacs
            for line in ('ctai_jobs{kind="analyse",state="done"} 1.0', 'ctai_jobs{kind="deliver",state="done"} 1.0',
                         'ctai_deliveries{destination="pacs",state="done"} 1.0', 'ctai_series{state="routed"} 1.0',
                         'ctai_instances{state="routed"} 56.0'):
                assert line in metrics, (line, metrics)
        modalities = _orthanc_series_modalities(orthanc, _study_uid(SAMPLE_COVID))
        assert RESULT_MODALITIES <= set(modalities), modalities
