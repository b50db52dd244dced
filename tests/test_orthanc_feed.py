"""Orthanc as the source without a plugin: the node follows a real Orthanc's /changes feed,
pulls each stable CT series over REST, and sends the results back into the same study
(REST). Restarted in between, it processes nothing twice and misses nothing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from ct_ai_node.jobqueue import JobState
from ct_ai_node.peers import Orthanc, dcmtk_tool, free_port
from ct_ai_node.spool import Spool
from node_harness import CHEST_RULE, SAMPLE_COVID, NodeProcess, dcmtk, node_config
from test_scale_out import _new_study, _orthanc_study

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dcmtk_tool("storescu") and (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists())),
                       reason="DCMTK or Orthanc not installed (make test installs them)"),
]


def _store_into_orthanc(orthanc: Orthanc, folder: Path) -> None:
    sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", orthanc.ae_title, "+sd", "127.0.0.1",
                 str(orthanc.dicom_port), str(folder))
    assert sent.returncode == 0, sent.stderr[-1000:]


def _wait_results(orthanc: Orthanc, study: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    held = {}
    while time.monotonic() < deadline:
        held = _orthanc_study(orthanc, study)
        if {"SEG", "SR", "OT", "KO"} <= set(held):
            return held
        time.sleep(0.5)
    raise AssertionError(f"no results in Orthanc for {study}: {held}")


def test_changes_feed_pulls_stable_series_and_survives_a_restart(tmp_path):
    # StableAge 1 s: a series counts as stable one second after its last instance
    with Orthanc(tmp_path / "orthanc", extra_config={"StableAge": 1}).start() as orthanc:
        studies = [_new_study(SAMPLE_COVID, tmp_path / f"study{i}") for i in range(2)]
        # something already in Orthanc before the node first starts is not its business (start_at: now)
        before = _new_study(SAMPLE_COVID, tmp_path / "before")
        _store_into_orthanc(orthanc, tmp_path / "before")
        time.sleep(3)

        config = node_config(
            free_port(),
            destinations=[{"name": "orthanc", "kind": "orthanc", "url": orthanc.url}],
            rules=[{**CHEST_RULE, "when": [*CHEST_RULE["when"], {"calling_ae": {"equals": "ORTHANC"}}],
                    "destinations": ["orthanc"]}],
            orthanc_feed={"url": orthanc.url, "poll_s": 0.5},
        )
        node = NodeProcess(tmp_path / "node", config).start()
        try:
            deadline = time.monotonic() + 30
            while "starting at change" not in node.log() and time.monotonic() < deadline:
                time.sleep(0.2)
            _store_into_orthanc(orthanc, tmp_path / "study0")
            first = _wait_results(orthanc, studies[0])
            jobs = node.wait_jobs("analyse", 1)
            assert [j.state for j in jobs] == [JobState.DONE]
            node.stop()

            # stored while the node is down: found after the restart
            _store_into_orthanc(orthanc, tmp_path / "study1")
            time.sleep(3)  # stable before the node is back
            node.start()
            second = _wait_results(orthanc, studies[1])
            jobs = node.wait_jobs("analyse", 2)
            time.sleep(3)  # a few more polls: nothing else may turn up
            jobs = node.jobs("analyse")
        finally:
            node.stop()
        assert len(jobs) == 2 and all(j.state == JobState.DONE for j in jobs), jobs
        # the first study was not analysed again, nor was the one from before the first start,
        # nor were the results sent back into Orthanc pulled in (modalities: [CT])
        assert _orthanc_study(orthanc, studies[0]) == first
        assert set(_orthanc_study(orthanc, before)) == {"CT"}
        with Spool(node.root / "spool", node.root / "node.db") as spool:
            series = spool.series()
        assert len(series) == 2 and {s.calling_ae for s in series} == {"ORTHANC"}
        assert all(s.instance_count == 56 for s in series)
        # results are in the studies they belong to
        for study, held in zip(studies, (first, second)):
            assert held["CT"] == 56 and held["SEG"] == 2  # the lung + infection SEG and the lobe SEG
        found = httpx.post(f"{orthanc.url}/tools/find", json={"Level": "Series", "Query": {"Modality": "SEG"}},
                           timeout=10).json()
        assert len(found) == 4  # two studies, two SEG series each
