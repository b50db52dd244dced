"""Orthanc -> node -> Orthanc: the Python plugin (orthanc/ctai_autoroute.py) sends a stable CT
series to the node; the node's results come back into the same study in Orthanc."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pydicom
import pytest

from ct_ai_node.jobqueue import JobState
from ct_ai_node.peers import dcmtk_tool, Orthanc, free_port
from node_harness import CHEST_RULE, REPO, SAMPLE_COVID, NodeProcess, dcmtk, node_config

PLUGIN = REPO / "orthanc" / "ctai_autoroute.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/share/orthanc/plugins/libOrthancPython.so").exists()
                       or not dcmtk_tool("storescu"),
                       reason="orthanc-python or DCMTK not installed (make test installs them)"),
]


def test_stable_series_goes_through_the_node_and_results_come_back(tmp_path):
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", python_script=PLUGIN,
                      modalities={"ctai": ("CTAI", "127.0.0.1", node_port)},
                      extra_config={"StableAge": 2, "CtAiNode": {"Modality": "ctai", "Modalities": ["CT"],
                                                                 "MinInstances": 20}})
    with orthanc.start():
        config = node_config(
            node_port,
            destinations=[{"name": "orthanc", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                           "ae_title": orthanc.ae_title}],
            rules=[{**CHEST_RULE, "destinations": ["orthanc"]}],
            allowed_callers=[{"ae_title": orthanc.ae_title, "host": "127.0.0.1"}],
        )
        with NodeProcess(tmp_path / "node", config) as node:
            sent = dcmtk("storescu", "-aec", orthanc.ae_title, "+sd", "127.0.0.1", str(orthanc.dicom_port),
                         str(SAMPLE_COVID))
            assert sent.returncode == 0, sent.stderr[-500:]
            job = node.wait_jobs("analyse", 1, timeout_s=240)[0]
            assert job.state == JobState.DONE, job
            assert job.payload["calling_ae"] == orthanc.ae_title
            study_uid = str(pydicom.dcmread(sorted(SAMPLE_COVID.glob("*.dcm"))[0], stop_before_pixels=True)
                            .StudyInstanceUID)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                studies = httpx.get(f"{orthanc.url}/studies", params={"expand": ""}, timeout=10).json()
                series = [httpx.get(f"{orthanc.url}/series/{s}", timeout=10).json()
                          for st in studies for s in st["Series"]]
                modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
                if {"SEG", "SR", "KO"} <= set(modalities):
                    break
                time.sleep(0.5)
            assert len(studies) == 1 and studies[0]["MainDicomTags"]["StudyInstanceUID"] == study_uid
            assert {"CT", "SEG", "SR", "OT", "KO"} <= set(modalities), modalities
            time.sleep(4)  # results become stable too: the plugin must not send them to the node
            assert len(node.jobs("analyse")) == 1
        log = (tmp_path / "orthanc" / "orthanc.log").read_text(errors="replace")
        assert "sent to ctai" in log
