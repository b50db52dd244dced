"""The web app in headless Chromium (Debian ``chromium``, npm ``playwright-core`` installed by
``make test`` into ``.ohif/``), against a running node: log in, see the analysed phantom study
sent by ``storescu``, open its page with the heat-map preview, re-run it and watch it
complete, add a destination and Test it (C-ECHO to a real ``storescp``), write a rule, try it
with the rule tester, save it, and see it act on the next series without a restart; a
viewer cannot edit; the audit log lists the changes. Screenshots: ``out/test-artifacts/web/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers_dicom import write_ct_series

from ct_ai_node.jobqueue import JobState
from ct_ai_node.peers import StoreSCP, free_port, wait_for_port
from ct_ai_node.web.auth import hash_password
from node_harness import CHEST_RULE, SAMPLE_COVID, NodeProcess, dcmtk, node_config

REPO = Path(__file__).resolve().parent.parent
PLAYWRIGHT = REPO / ".ohif" / "node_modules" / "playwright-core"
FLOW = Path(__file__).resolve().parent / "web" / "admin_flow.mjs"
ARTIFACTS = REPO / "out" / "test-artifacts" / "web"
ADMIN, VIEWER = ("alice", "alice-password-1"), ("victor", "victor-password-1")


def _missing() -> list[str]:
    missing = []
    if not shutil.which("chromium"):
        missing.append("chromium (Debian package 'chromium')")
    if not shutil.which("node"):
        missing.append("node")
    if not (PLAYWRIGHT / "index.mjs").is_file():
        missing.append("playwright-core (.ohif/node_modules; `make ohif-viewer`)")
    if dcmtk("storescu", "--version").returncode != 0:
        missing.append("DCMTK storescu")
    return missing


pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"missing: {', '.join(_missing())} (make test installs them)")


def test_admin_in_a_browser_reruns_configures_and_a_viewer_cannot(tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with StoreSCP(tmp_path / "archive").start() as archive:
        port, web_port = free_port(), free_port()
        users = [{"name": ADMIN[0], "role": "admin", "password_hash": hash_password(ADMIN[1])},
                 {"name": VIEWER[0], "role": "viewer", "password_hash": hash_password(VIEWER[1])}]
        config = node_config(port, destinations=[], rules=[CHEST_RULE],
                             web={"host": "127.0.0.1", "port": web_port, "users": users})
        mr = write_ct_series(tmp_path / "mr", n=5, rows=32, cols=32, modality="MR", description="MR knee")
        with NodeProcess(tmp_path / "node", config) as node:
            wait_for_port(web_port, 60, node.proc)
            pid = node.proc.pid
            sent = dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(SAMPLE_COVID))
            assert sent.returncode == 0, sent.stderr[-1000:]
            (job,) = node.wait_jobs("analyse", 1)
            assert job.state is JobState.DONE, node.log()[-3000:]

            spec = {"chromium": shutil.which("chromium"), "playwright": str(PLAYWRIGHT),
                    "base": f"http://127.0.0.1:{web_port}", "outDir": str(ARTIFACTS), "admin": ADMIN,
                    "viewer": VIEWER, "jobId": job.id, "archive": {"port": archive.port},
                    "mrFile": str(mr.paths[0]), "timeoutMs": 60_000}
            spec_path = tmp_path / "spec.json"
            spec_path.write_text(json.dumps(spec))
            run = subprocess.run(["node", str(FLOW), str(spec_path)], capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            facts = json.loads(run.stdout)
            (ARTIFACTS / "facts.json").write_text(json.dumps(facts, indent=1))
            assert "error" not in facts, facts.get("error")

            # logged in, the study on the dashboard and its page with the preview
            assert f"/login" in facts["steps"][0] and "alice (admin)" in facts["whoami"]
            assert "chest-ct" in facts["dashboard"] and "No users are configured" not in facts["dashboard"]
            assert "COVID-19-like" in facts["jobPage"] or "pneumonia" in facts["jobPage"]
            assert facts["previewWidth"] > 100
            assert f"job {job.id} (analyse) claimed by CTAI-w0" in facts["jobPage"]  # its log lines
            # re-run: a new job that completed
            assert f"re-run as job" in facts["rerunFlash"] and facts["rerunUrl"] != f"{spec['base']}/jobs/{job.id}"
            assert "done" in facts["rerunState"], facts["rerunState"]
            # configuration through the pages
            assert "destinations: added archive" in facts["destinationSaved"]
            assert "answered success" in facts["destinationTest"], facts["destinationTest"]
            assert "mr-archive" in facts["ruleTest"] and "forward" in facts["ruleTest"], facts["ruleTest"]
            assert "mr-archive" in facts["rulesAfterTest"]  # the typed rules stay in the editor
            assert "rules: added mr-archive" in facts["ruleSaved"]
            for entry in ("rerun", "destinations: added archive", "rules: added mr-archive", "test-destination"):
                assert entry in facts["audit"], entry
            # the viewer
            assert facts["viewerSaveButtons"] == 0 and facts["viewerReadonly"] is not None
            assert facts["viewerRerunButtons"] == 0 and facts["viewerForcedSave"] == 403

            # the saved rule acts on the next series, without a restart
            sent = dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(tmp_path / "mr"))
            assert sent.returncode == 0, sent.stderr[-1000:]
            deadline = time.monotonic() + 60
            while len(archive.received()) < 5 and time.monotonic() < deadline:
                time.sleep(0.3)
            assert len(archive.received()) == 5, node.log()[-3000:]
            assert node.proc.pid == pid and node.proc.poll() is None
    assert (ARTIFACTS / "02-job.png").is_file() and (ARTIFACTS / "06-rule-saved.png").is_file()
