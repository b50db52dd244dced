"""One series must not hold a worker forever: a job still running after
``workers.job_timeout_s`` is failed for good (with its "not analysed" notice) and, in a
worker process, the process ends so that the node starts a fresh worker.

The hang itself is simulated (an analysis that blocks): a real input that hangs the
loader is what the loader's own bounds exist to prevent."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pydicom

from ct_ai_node.config import NodeConfig
from ct_ai_node.jobqueue import JobState, SqliteJobQueue
from ct_ai_node.node.dispatcher import _job_payload
from ct_ai_node.rules.routing import RoutedAction
from ct_ai_node.spool import InstanceMeta, Spool
from helpers_dicom import write_ct_series


def _setup(tmp_path: Path, limit_s: float) -> tuple[NodeConfig, int]:
    """A node configuration and one analyse job for a 3-slice series in its spool."""
    config = NodeConfig.model_validate({
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 10, "fsync": False},
        "workers": {"device": "cpu", "job_timeout_s": limit_s, "lease_s": 5},
        "retry": {"max_attempts": 3},
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 9, "ae_title": "PACS"}],
    })
    written = write_ct_series(tmp_path / "in", n=3, rows=16, cols=16)
    with Spool(config.storage.spool_dir, config.storage.db_path, fsync=False) as spool:
        for path in written.paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta = InstanceMeta(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                ds.Modality, "PACS", "CTAI", "127.0.0.1", str(ds.file_meta.TransferSyntaxUID))
            key = spool.store(path.read_bytes(), meta).series_key
        action = RoutedAction(rule="chest", action="analyse", pipeline="radlogics", lungs="unet",
                              destinations=("pacs",))
        payload = _job_payload(spool.get_series(key), action)
    queue = SqliteJobQueue(config.storage.db_path)
    try:
        job_id = queue.enqueue("analyse", payload, max_attempts=3)
    finally:
        queue.close()
    return config, job_id


def test_an_analysis_that_hangs_is_failed_for_good_with_its_notice(tmp_path, monkeypatch):
    import ct_ai_node.analyze
    from ct_ai_node.node.worker import Worker

    release = threading.Event()
    monkeypatch.setattr(ct_ai_node.analyze, "analyze_folder", lambda *a, **k: release.wait(60))
    config, job_id = _setup(tmp_path, limit_s=2)
    queue = SqliteJobQueue(config.storage.db_path)
    worker = Worker(config, "w1", queue=queue)
    runner = threading.Thread(target=worker.run_once, args=(("analyse",),), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while queue.get(job_id).state != JobState.DEAD and time.monotonic() < deadline:
            time.sleep(0.2)
        job = queue.get(job_id)
        assert job.state == JobState.DEAD, job  # for good: not retried 3 times
        assert "workers.job_timeout_s (2 s)" in job.last_error
        assert [c.payload.get("notice") for c in queue.children(job_id)] == [True]
        assert runner.is_alive()  # the stuck analysis itself cannot be stopped in-process
    finally:
        release.set()
        runner.join(30)
        queue.close()
    assert queue.get(job_id).state == JobState.DEAD  # its late end changes nothing


def test_a_worker_process_ends_itself_after_an_overrun(tmp_path):
    config, job_id = _setup(tmp_path, limit_s=2)
    code = textwrap.dedent(f"""
        import time
        import ct_ai_node.analyze
        from ct_ai_node.config import NodeConfig
        from ct_ai_node.node.worker import Worker

        ct_ai_node.analyze.analyze_folder = lambda *a, **k: time.sleep(3600)  # hangs
        worker = Worker(NodeConfig.model_validate_json({config.model_dump_json()!r}), "w1")
        worker.exit_on_overrun = True
        worker.run_once(("analyse",))
        print("not reached")
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent)
    from ct_ai_node.node.worker import EXIT_OVERRUN

    assert proc.returncode == EXIT_OVERRUN, proc.stderr[-2000:]
    assert "not reached" not in proc.stdout
    assert time.monotonic() - start < 60
    queue = SqliteJobQueue(config.storage.db_path)
    try:
        assert queue.get(job_id).state == JobState.DEAD
    finally:
        queue.close()
